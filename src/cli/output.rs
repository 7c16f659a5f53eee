//! Output of the subcommands on stdout and stderr.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`ochopod ls | head -1`),
//! because Rust programs ignore SIGPIPE. These macros end the process the way SIGPIPE ends a
//! Unix tool instead: silently, killed by SIGPIPE, which shells report as exit status 141.
//! Work already done (a control request sent, a pod turned on) is not undone.

use std::fmt;
use std::io::{self, Write};

use nix::sys::signal::{self, SigHandler, SigSet, Signal};

/// Prints a line on stdout, like `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::print_line(format_args!($($arg)*))
    };
}

/// Prints a line on stderr, like `eprintln!`.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::output::print_error_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// Exit status of a process that cannot write its output for another reason than a closed
/// pipe, such as a full disk.
const WRITE_FAILED: i32 = 1;

/// Writes one line on stdout. A closed pipe ends the process as SIGPIPE would. Any other write
/// error is reported on stderr and ends the process with status 1.
pub fn print_line(line: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => die_of_sigpipe(),
        Err(error) => {
            drop(stdout);
            print_error_line(format_args!("ochopod: cannot write to stdout: {error}"));
            std::process::exit(WRITE_FAILED);
        }
    }
}

/// Writes one line on stderr. A closed pipe ends the process as SIGPIPE would. Other errors
/// are ignored, because there is nowhere left to report them.
pub fn print_error_line(line: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    let written = stderr
        .write_fmt(line)
        .and_then(|()| stderr.write_all(b"\n"));
    if let Err(error) = written {
        if error.kind() == io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
    }
}

/// Ends the process by SIGPIPE with its default action, as a C program writing to a closed
/// pipe would end, so that shells and `set -o pipefail` see the usual status 141.
fn die_of_sigpipe() -> ! {
    // SAFETY: setting the default action installs no handler code, and nothing else in the
    // operator commands changes the SIGPIPE disposition.
    let _ = unsafe { signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let _ = pipe.thread_unblock();
    let _ = signal::raise(Signal::SIGPIPE);
    // Only reached when the signal could not be delivered.
    std::process::exit(128 + Signal::SIGPIPE as i32);
}
