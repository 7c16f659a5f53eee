//! One run of the sub-process: its process group, plus the processes that left the group.
//!
//! Signalling the process group reaches every descendant that stayed in it, but a daemon leaves
//! it with `setsid`. To find those, every run gets a unique [`RUN_ID_VARIABLE`] in its
//! environment, which its descendants inherit. Because the agent is a child subreaper, the
//! kernel hands orphaned descendants to the agent, so they stay in its process tree. A
//! tear-down therefore signals the group and each descendant of the agent whose environment
//! carries the run's id.
//!
//! NOTE: a process that replaced its environment (`env -i`, `execve` with a new one) is not
//! found, and neither is one orphaned while the agent could not become a subreaper.

use std::collections::HashMap;
use std::fs;

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Environment variable holding the id of the run; the sub-process and its descendants inherit
/// it.
pub const RUN_ID_VARIABLE: &str = "OCHOPOD_RUN_ID";

/// A run of the sub-process: the process group the supervisor created and the id in the
/// environment of every process of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Pid of the sub-process, which is also its process group id.
    pub group: u32,
    pub id: String,
}

impl Run {
    /// Returns a new run id, unique for the life of the host.
    pub fn new_id() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Sends `signal` to the process group and to each process that left it; a process already
    /// gone is not an error.
    pub fn signal(&self, signal: Signal) {
        let group = self.group;
        match killpg(Pid::from_raw(group as i32), signal) {
            Ok(()) => debug!("[pid {group}] sent {signal} to process group {group}"),
            Err(Errno::ESRCH) => {}
            Err(errno) => {
                warn!("[pid {group}] cannot send {signal} to process group {group}: {errno}")
            }
        }

        for pid in self.escaped() {
            match kill(Pid::from_raw(pid as i32), signal) {
                Ok(()) => {
                    debug!("[pid {group}] sent {signal} to pid {pid}, which left process group {group}")
                }
                Err(Errno::ESRCH) => {}
                Err(errno) => warn!("[pid {group}] cannot send {signal} to pid {pid}: {errno}"),
            }
        }
    }

    /// Returns the pids of the agent's descendants that carry this run's id and are outside its
    /// process group. Zombies carry no environment, so they are not listed.
    pub fn escaped(&self) -> Vec<u32> {
        let marker = format!("{RUN_ID_VARIABLE}={}", self.id);
        descendants(std::process::id())
            .into_iter()
            .filter(|(_, group)| *group != self.group)
            .map(|(pid, _)| pid)
            .filter(|pid| carries(*pid, marker.as_bytes()))
            .collect()
    }
}

/// Returns the descendants of `ancestor` as (pid, process group) pairs, read from `/proc`.
fn descendants(ancestor: u32) -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        if let Some((parent, group)) = parent_and_group(pid) {
            children.entry(parent).or_default().push((pid, group));
        }
    }

    let mut found = Vec::new();
    let mut pending = vec![ancestor];
    while let Some(parent) = pending.pop() {
        for &(pid, group) in children.get(&parent).into_iter().flatten() {
            found.push((pid, group));
            pending.push(pid);
        }
    }
    found
}

/// Reads the parent pid and the process group of `pid` from `/proc/<pid>/stat`.
fn parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain any character; fields follow it:
    // state, parent pid, process group.
    let fields = &stat[stat.rfind(')')? + 1..];
    let mut fields = fields.split_whitespace().skip(1);
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

/// Tells whether the environment of `pid` contains the `NAME=value` entry `marker`.
fn carries(pid: u32, marker: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|byte| *byte == 0)
                .any(|entry| entry == marker)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    /// Starts `script` in its own process group with the run id, through the reaper.
    fn spawn_run(script: &str) -> Run {
        let id = Run::new_id();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .process_group(0)
            .env(RUN_ID_VARIABLE, &id);
        let spawned = crate::reaper::spawn(&mut command).unwrap();
        Run {
            group: spawned.pid,
            id,
        }
    }

    fn alive(run: &Run) -> bool {
        killpg(Pid::from_raw(run.group as i32), None) != Err(Errno::ESRCH)
            || !run.escaped().is_empty()
    }

    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn escaped_finds_setsid_daemons_only() {
        let run = spawn_run("setsid sleep 30 & sleep 30 & wait");
        let other = spawn_run("setsid sleep 30 & wait");
        wait_for("the daemon of each run", || {
            run.escaped().len() == 1 && other.escaped().len() == 1
        });
        let daemon = run.escaped()[0];
        assert_ne!(daemon, other.escaped()[0]);
        assert!(!run.escaped().contains(&run.group));

        run.signal(Signal::SIGKILL);
        wait_for("the run gone", || !alive(&run));
        assert!(alive(&other), "another run was signalled");
        other.signal(Signal::SIGKILL);
        wait_for("the other run gone", || !alive(&other));
    }
}
