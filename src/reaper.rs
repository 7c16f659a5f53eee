//! Process-wide child reaping and signal intake.
//!
//! A process that runs pods has to collect the exit status of every child it has. These are the
//! sub-processes and hooks it spawns, and the orphans the kernel hands over to it as PID 1 of
//! its container or as a child subreaper. One thread owns all waiting: it wakes on
//! SIGCHLD, collects every exited child with `waitpid(-1, WNOHANG)`, and sends each status to
//! the waiter registered for that pid. It reaps the statuses of unknown pids (orphans) and drops
//! them, so no zombie is left behind.
//!
//! Because that thread collects every child of the process, code in a process that uses this
//! module must spawn its children through [`spawn`]. A `std::process::Child` spawned elsewhere
//! loses its status to the reaper: its `wait` fails with ECHILD, and `Command::spawn` may panic
//! when its `exec` fails, because std then waits for the failed child itself.
//!
//! [`subscribe_signals`] is the other half of the PID 1 duties: it delivers the signals an
//! operator or a platform sends to the agent (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) to an
//! actor. The binary calls it; a library user embedding pods in an application that handles its
//! own signals does not.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::thread;

use actix::prelude::*;
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;
use signal_hook::iterator::Signals;
use tokio::sync::oneshot;

/// End of a child process: its exit code or the signal that killed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The process called `exit` with this code.
    Code(i32),
    /// The process was killed by this signal number.
    Signal(i32),
}

impl Exit {
    /// Returns true for exit code 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    /// Decodes a raw status from `waitpid`. Only exits and deaths by signal reach the reaper,
    /// because it never requests stopped or continued children (no `WUNTRACED`, `WCONTINUED`).
    fn from_wait_status(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(number) => match Signal::try_from(number) {
                Ok(signal) => write!(f, "signal {signal}"),
                Err(_) => write!(f, "signal {number}"),
            },
        }
    }
}

/// The exit status of one spawned child, resolved by the reaper thread.
///
/// Await it inside an async runtime, or call [`ExitFuture::wait_blocking`] outside of one.
/// Dropping it is fine: the reaper still collects the child and drops its status.
#[derive(Debug)]
pub struct ExitFuture {
    pid: u32,
    receiver: oneshot::Receiver<Exit>,
}

impl ExitFuture {
    /// Returns the pid of the child this future waits for.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Blocks the calling thread until the child exits.
    ///
    /// # Panics
    ///
    /// Panics when called from inside an async runtime, as `tokio`'s `blocking_recv` does.
    pub fn wait_blocking(self) -> Exit {
        let pid = self.pid;
        self.receiver
            .blocking_recv()
            .unwrap_or_else(|_| lost_waiter(pid))
    }
}

impl Future for ExitFuture {
    type Output = Exit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exit> {
        let pid = self.pid;
        Pin::new(&mut self.receiver)
            .poll(cx)
            .map(|received| received.unwrap_or_else(|_| lost_waiter(pid)))
    }
}

/// Reports a broken invariant: the reaper keeps every waiter until it sends the status.
fn lost_waiter(pid: u32) -> Exit {
    panic!("the reaper dropped the waiter of pid {pid} without sending its exit status")
}

/// A child started by [`spawn`]: its pid, the pipes std created for it, and its exit status.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub exit: ExitFuture,
}

/// Signals the agent takes from its platform or operator and hands to [`subscribe_signals`].
pub const AGENT_SIGNALS: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// One signal received by the agent process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct AgentSignal(pub Signal);

/// Starts `command` and registers its pid with the reaper before the child can be reaped.
///
/// The caller sets up the command (pipes, process group, environment); this function never
/// calls `Child::wait`, the reaper thread does the waiting. The first call starts the reaper
/// thread and makes this process a child subreaper.
///
/// # Errors
///
/// Returns the error of `Command::spawn`, or an error when the reaper could not start (the
/// SIGCHLD handler could not be installed or its thread could not be created).
pub fn spawn(command: &mut Command) -> io::Result<Spawned> {
    let reaper = reaper()?;

    // Holding the registry lock across the spawn keeps the reaper thread out of `waitpid` until
    // the waiter is registered, so even a child that exits at once is routed to it. It also
    // lets std wait for a child whose `exec` failed without the reaper taking that status.
    let mut registry = reaper.lock();
    let mut child = command.spawn()?;
    let pid = child.id();
    let (sender, receiver) = oneshot::channel();
    registry.waiters.insert(pid, sender);
    drop(registry);

    Ok(Spawned {
        pid,
        stdin: child.stdin.take(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        exit: ExitFuture { pid, receiver },
    })
}

/// Starts the reaper thread and makes this process a child subreaper, if not done yet.
///
/// [`spawn`] does this on first use. An agent that is PID 1 calls it at start, so orphans are
/// reaped even before (or without) its first child.
///
/// # Errors
///
/// Returns an error when the SIGCHLD handler or the thread cannot be set up.
pub fn start() -> io::Result<()> {
    reaper().map(drop)
}

/// Delivers SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to `recipient`, from a thread of its
/// own, for the life of the process.
///
/// Once this is called these signals no longer stop the process by themselves: the recipient
/// decides what each one does. Calling it twice delivers each signal to both recipients.
///
/// # Errors
///
/// Returns an error when the signal handlers cannot be installed or the thread cannot start.
pub fn subscribe_signals(recipient: Recipient<AgentSignal>) -> io::Result<()> {
    let mut signals = Signals::new(AGENT_SIGNALS.map(|signal| signal as libc::c_int))?;
    thread::Builder::new()
        .name("ochopod-signals".to_string())
        .spawn(move || {
            for number in signals.forever() {
                let Ok(signal) = Signal::try_from(number) else {
                    continue;
                };
                info!("agent received {signal}");
                recipient.do_send(AgentSignal(signal));
            }
        })?;
    Ok(())
}

/// The process-wide reaper: the waiters of spawned children, by pid.
struct Reaper {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// One sender per child spawned through [`spawn`] and not reaped yet.
    waiters: HashMap<u32, oneshot::Sender<Exit>>,
}

/// Returns the reaper, starting it on first use.
fn reaper() -> io::Result<&'static Reaper> {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    static THREAD: OnceLock<Result<(), String>> = OnceLock::new();

    let reaper = REAPER.get_or_init(|| {
        become_subreaper();
        Reaper {
            registry: Mutex::new(Registry::default()),
        }
    });
    THREAD
        .get_or_init(|| {
            start_reaper_thread(reaper)
                .map_err(|error| format!("cannot start the child reaper: {error}"))
        })
        .as_ref()
        .map_err(|reason| io::Error::other(reason.clone()))?;
    Ok(reaper)
}

/// Asks the kernel to hand orphaned descendants to this process instead of to PID 1, so their
/// statuses reach the reaper even when the agent is not PID 1 (a shell or a test harness above
/// it). A failure only costs that, so it is logged and ignored.
fn become_subreaper() {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => debug!("process {} is now a child subreaper", std::process::id()),
        Err(errno) => warn!(
            "cannot make process {} a child subreaper ({errno}); orphans of the sub-process go \
             to PID 1 instead of this agent",
            std::process::id()
        ),
    }
}

fn start_reaper_thread(reaper: &'static Reaper) -> io::Result<()> {
    // The handler is installed before the thread starts: a SIGCHLD that arrives in between
    // stays pending in `signals` and wakes the first iteration.
    let mut signals = Signals::new([libc::SIGCHLD])?;
    thread::Builder::new()
        .name("ochopod-reaper".to_string())
        .spawn(move || {
            // Children may have exited before the handler existed.
            reaper.reap_exited();
            for _ in signals.forever() {
                reaper.reap_exited();
            }
        })?;
    Ok(())
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A waiter map stays consistent even if a holder panicked: every change is one insert
        // or one remove.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Collects every exited child and sends each status to its waiter. SIGCHLD signals
    /// coalesce, so one wake-up may stand for many exits: the loop runs until no exited child
    /// is left.
    fn reap_exited(&self) {
        let mut registry = self.lock();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: `waitpid` only writes the status through the valid pointer it is given.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                // Children remain, none has exited yet.
                return;
            }
            if pid < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    // ECHILD: no child left at all.
                    _ => return,
                }
            }

            let exit = Exit::from_wait_status(status);
            let pid = pid as u32;
            match registry.waiters.remove(&pid) {
                Some(waiter) => {
                    debug!("[pid {pid}] reaped with {exit}");
                    // The receiver may be gone: its owner no longer cares about the status.
                    let _ = waiter.send(exit);
                }
                None => debug!("[pid {pid}] reaped an orphan ({exit})"),
            }
        }
    }
}
