//! The process-wide reaper: exit statuses reach their waiters, orphans are reaped.

#[allow(dead_code)]
#[path = "support/wait.rs"]
mod wait;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use ochopod::reaper::{self, Exit};
use wait::wait_until;

fn shell(script: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script);
    command
}

/// Returns the state letter and parent pid of `pid` from `/proc`, or `None` once it is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last one.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

#[test]
fn exit_code_reaches_waiter() {
    let spawned = reaper::spawn(&mut shell("exit 7")).unwrap();
    assert_eq!(spawned.exit.wait_blocking(), Exit::Code(7));
}

#[test]
fn death_by_signal_reaches_waiter() {
    let spawned = reaper::spawn(&mut shell("kill -KILL $$")).unwrap();
    assert_eq!(spawned.exit.wait_blocking(), Exit::Signal(9));
    assert_eq!(Exit::Signal(9).to_string(), "signal SIGKILL");
}

#[test]
fn immediate_exits_all_routed() {
    // Children that exit before `spawn` returns must still reach their own waiter.
    let children: Vec<_> = (0..40)
        .map(|code| {
            (
                code,
                reaper::spawn(&mut shell(&format!("exit {code}"))).unwrap(),
            )
        })
        .collect();
    for (code, child) in children {
        assert_eq!(
            child.exit.wait_blocking(),
            Exit::Code(code),
            "pid {}",
            child.pid
        );
    }
}

#[tokio::test]
async fn exit_future_resolves_in_async_code() {
    let spawned = reaper::spawn(&mut shell("sleep 0.05; exit 3")).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), spawned.exit)
        .await
        .unwrap();
    assert_eq!(exit, Exit::Code(3));
}

#[test]
fn pipes_are_handed_over() {
    let mut command = shell("echo hello");
    command.stdout(Stdio::piped());
    let spawned = reaper::spawn(&mut command).unwrap();
    let mut output = String::new();
    spawned.stdout.unwrap().read_to_string(&mut output).unwrap();
    assert_eq!(output, "hello\n");
    assert_eq!(spawned.exit.wait_blocking(), Exit::Code(0));
}

#[test]
fn failed_exec_returns_error() {
    // Setting PATH makes std fork and exec by itself and wait for the failed child, which must
    // not race with the reaper.
    let mut command = Command::new("no-such-program-for-ochopod");
    command.env("PATH", "/nonexistent");
    let error = reaper::spawn(&mut command).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn orphaned_grandchild_is_reaped() {
    // The shell starts a grandchild in the background and exits at once, orphaning it.
    let mut command = shell("sleep 0.5 >/dev/null & echo $!");
    command.stdout(Stdio::piped());
    let spawned = reaper::spawn(&mut command).unwrap();
    let mut output = String::new();
    spawned.stdout.unwrap().read_to_string(&mut output).unwrap();
    let grandchild: u32 = output.trim().parse().unwrap();
    assert_eq!(spawned.exit.wait_blocking(), Exit::Code(0));

    // As a child subreaper this process adopts the orphan.
    let (state, parent) = proc_state(grandchild).expect("the grandchild sleeps for 0.5 s");
    assert_ne!(state, 'Z');
    assert_eq!(parent, std::process::id());

    // Once it exits, the reaper collects it: no zombie stays in /proc.
    wait_until(Duration::from_secs(5), "the orphan to be reaped", || {
        proc_state(grandchild).is_none()
    });
}
