//! Sub-processes that misbehave, run under the real `ochopod` binary against a real ZooKeeper
//! server: crash loops, ignored SIGTERM, forked grandchildren and daemons, orphans piling up
//! under an agent that is PID 1, and the signals an agent forwards. What is left running is
//! checked in `/proc`.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use support::pods::{field, http, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Starts a one-pod cluster running `script` with extra settings, and waits until the
/// sub-process runs.
fn start_pod(root: &Path, script: &str, env: &[(&str, &str)]) -> PodProcess {
    let server = shared_server();
    let mut spec = PodSpec::new(
        &server.connect_string(),
        &unique_namespace("process"),
        "web",
    )
    .shell(script);
    for (name, value) in env {
        spec = spec.env(name, value);
    }
    PodProcess::start(root, "pod", &spec)
}

/// Waits until `/info` shows a running sub-process and returns its pid.
fn wait_running(pod: &PodProcess) -> i32 {
    wait_until(WAIT, "the sub-process running", || {
        let info = pod.info()?;
        (field(&info, "process") == "running")
            .then(|| info["pid"].as_i64())
            .flatten()
    }) as i32
}

/// Waits until `file` in the pod's directory exists and contains at least `lines` lines, and
/// returns them.
fn wait_lines(pod: &PodProcess, file: &str, lines: usize) -> Vec<String> {
    let path = pod.dir.join(file);
    wait_until(WAIT, &format!("{lines} lines in {file}"), || {
        let text = fs::read_to_string(&path).ok()?;
        let found: Vec<String> = text.lines().map(str::to_string).collect();
        (found.len() >= lines).then_some(found)
    })
}

/// Returns the state letter of `pid` from `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), or `None`
/// when no such process exists.
fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; the state follows it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.trim_start().chars().next()
}

/// Returns the pids listed one per line in `file` of the pod's directory.
fn recorded_pids(pod: &PodProcess, file: &str) -> Vec<i32> {
    fs::read_to_string(pod.dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Returns the pids of the processes in `/proc` whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `POST /control/off/<timeout>` with an empty cluster view and returns the status and
/// the time the request took.
fn turn_off(pod: &PodProcess, timeout_seconds: u32) -> (u16, Duration) {
    let started = Instant::now();
    let (status, reply) = http(
        pod.control_port,
        "POST",
        &format!("/control/off/{timeout_seconds}"),
        "{}",
    )
    .unwrap();
    let elapsed = started.elapsed();
    assert!(status == 200 || status == 408, "off: {status} {reply}");
    (status, elapsed)
}

/// Parses the `date +%s.%N` lines of a file into seconds.
fn timestamps(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .map(|line| line.trim().parse::<f64>().unwrap())
        .collect()
}

#[test]
fn crash_loop_backs_off_then_turns_off() {
    let root = tempfile::tempdir().unwrap();
    let pod = start_pod(
        root.path(),
        "date +%s.%N >> starts; exit 3",
        &[("ochopod_checks", "6"), ("ochopod_check_every", "1")],
    );

    // Restarts come after 1 s, then after 2 s. Six failed checks, one per second, turn the pod
    // off, normally before the third restart, which is due 4 s later.
    let restarts = wait_until(WAIT, "the pod turned off after failed checks", || {
        let info = pod.info()?;
        let off =
            field(&info, "process") == "stopped" && pod.log_text().contains("turning the pod off");
        off.then(|| info["restarts"].as_u64()).flatten()
    });
    assert!(
        restarts >= 2,
        "{restarts} restarts before the pod turned off"
    );
    let starts = timestamps(&wait_lines(&pod, "starts", restarts as usize + 1));
    assert_eq!(starts.len() as u64, restarts + 1, "starts: {starts:?}");
    let first_gap = starts[1] - starts[0];
    let second_gap = starts[2] - starts[1];
    assert!((0.8..1.8).contains(&first_gap), "first delay {first_gap}");
    assert!(
        (1.8..3.0).contains(&second_gap),
        "second delay {second_gap}"
    );

    let log = pod.log_text();
    assert!(log.contains("6 sanity checks failed in a row"), "{log}");
    assert!(log.contains("restarting in 2.0s"), "{log}");

    // Absence of a later start: the next restart, due 2^restarts seconds after the last start,
    // would have happened by then.
    let next_delay = 2f64.powi(restarts as i32).min(30.0);
    let due = starts[starts.len() - 1] + next_delay + 1.5;
    while now_seconds() < due {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        wait_lines(&pod, "starts", 1).len(),
        starts.len(),
        "restarted after off"
    );
    let info = pod.info().unwrap();
    assert_eq!(field(&info, "process"), "stopped");
    assert!(info["pid"].is_null(), "{info}");
    let (status, _) = http(pod.control_port, "GET", "/health", "").unwrap();
    assert_eq!(status, 200, "a pod turned off is not dead");
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sub-process that records each SIGTERM and keeps running.
const IGNORES_TERM: &str =
    "trap 'echo TERM >> terms' TERM; echo $$ > pid; while true; do sleep 0.1; done";

/// Waits until a script that traps signals has written its `pid` file, after its traps: before
/// that, SIGTERM or SIGUSR1 ends it, and the supervisor may report it running earlier.
fn wait_trap_set(pod: &PodProcess) {
    wait_lines(pod, "pid", 1);
}

#[test]
fn ignored_sigterm_gets_sigkill_after_grace() {
    let root = tempfile::tempdir().unwrap();
    let pod = start_pod(root.path(), IGNORES_TERM, &[("ochopod_grace", "2")]);
    let pid = wait_running(&pod);
    wait_trap_set(&pod);

    let (status, elapsed) = turn_off(&pod, 30);
    assert_eq!(status, 200);
    assert!(
        elapsed >= Duration::from_millis(1900),
        "SIGKILL came before the grace period: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(6), "off took {elapsed:?}");
    assert_eq!(wait_lines(&pod, "terms", 1), vec!["TERM"]);
    assert_eq!(process_state(pid), None, "pid {pid} still exists");
    assert!(pod.log_text().contains("sending SIGKILL"));
}

#[test]
fn soft_pod_never_sends_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let pod = start_pod(
        root.path(),
        IGNORES_TERM,
        &[("ochopod_grace", "1"), ("ochopod_soft", "true")],
    );
    let pid = wait_running(&pod);
    wait_trap_set(&pod);

    let (status, elapsed) = turn_off(&pod, 3);
    assert_eq!(
        status, 408,
        "a soft tear-down of a process ignoring SIGTERM never ends"
    );
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(wait_lines(&pod, "terms", 1), vec!["TERM"]);
    assert!(
        matches!(process_state(pid), Some(state) if state != 'Z'),
        "pid {pid} was killed although the pod is soft"
    );
    assert!(pod.log_text().contains("soft: waiting without SIGKILL"));
    assert!(!pod.log_text().contains("sending SIGKILL"));

    // The test ends the stubborn group itself; the pending tear-down then completes.
    killpg(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_until(WAIT, "the tear-down completing", || {
        pod.info()
            .is_some_and(|info| field(&info, "process") == "stopped")
    });
    assert_eq!(process_state(pid), None);
}

/// Sub-process that starts a background child, a grandchild, a double-forked daemon that
/// stays in its process group, and daemons that leave it with `setsid`. Each records its pid.
const FORKER: &str = r#"
sleep 600 & echo $! >> pids
sh -c 'sleep 600 & echo $! >> pids; wait' & echo $! >> pids
( sleep 600 & echo $! >> pids )
setsid sleep 600 & echo $! >> pids
sh -c 'setsid sh -c "sleep 600 & echo \$! >> pids; wait" & echo $! >> pids'
echo $$ >> pids
wait
"#;

#[test]
fn tear_down_leaves_no_descendant() {
    let root = tempfile::tempdir().unwrap();
    let pod = start_pod(root.path(), FORKER, &[("ochopod_grace", "3")]);
    let pid = wait_running(&pod);
    wait_lines(&pod, "pids", 8);
    let pids: BTreeSet<i32> = recorded_pids(&pod, "pids").into_iter().collect();
    assert!(pids.contains(&pid), "{pids:?}");
    for pid in &pids {
        assert!(process_state(*pid).is_some(), "pid {pid} did not start");
    }

    let (status, elapsed) = turn_off(&pod, 30);
    assert_eq!(status, 200);
    assert!(
        elapsed < Duration::from_secs(3),
        "SIGTERM was enough: {elapsed:?}"
    );
    let left: Vec<(i32, char)> = pids
        .iter()
        .filter_map(|pid| Some((*pid, process_state(*pid)?)))
        .collect();
    assert!(left.is_empty(), "left after the tear-down: {left:?}");
}

#[test]
fn exited_subprocess_daemons_torn_down() {
    // A sub-process that daemonizes and exits 0: its work is done, the pod is killed, and the
    // daemons it left go with it.
    let root = tempfile::tempdir().unwrap();
    let script = "setsid sleep 600 & echo $! >> pids; (sleep 600 & echo $! >> pids); exit 0";
    let pod = start_pod(root.path(), script, &[("ochopod_grace", "3")]);
    wait_lines(&pod, "pids", 2);
    let pids = recorded_pids(&pod, "pids");

    wait_until(WAIT, "the pod dead after its sub-process completed", || {
        pod.info()
            .is_some_and(|info| field(&info, "process") == "dead")
    });
    wait_until(WAIT, "the daemons gone", || {
        pids.iter().all(|pid| process_state(*pid).is_none())
    });
}

/// Returns the pid namespace of `pid` (the target of `/proc/<pid>/ns/pid`).
fn pid_namespace(pid: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|target| target.to_string_lossy().into_owned())
}

/// Counts the zombies among the processes of `namespace`.
fn zombies_in(namespace: &str) -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| pid_namespace(*pid).as_deref() == Some(namespace))
        .filter(|pid| process_state(*pid) == Some('Z'))
        .count()
}

#[test]
fn pid_one_reaps_orphans() {
    assert!(
        Path::new("/usr/bin/unshare").exists() || Path::new("/bin/unshare").exists(),
        "this test needs unshare from util-linux"
    );
    let root = tempfile::tempdir().unwrap();
    let server = shared_server();
    // Each round leaves an orphan that exits 50 ms later, reparented to the agent.
    let script = "while true; do ( sleep 0.05 & ); echo x >> orphans; sleep 0.01; done";
    let spec = PodSpec::new(&server.connect_string(), &unique_namespace("pid1"), "web")
        .wrapped(&[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ])
        .shell(script);
    let pod = PodProcess::start(root.path(), "pod", &spec);

    let agent = wait_until(WAIT, "the agent forked by unshare", || {
        children_of(pod.pid()).first().copied()
    });
    let status = fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|line| line.starts_with("NSpid:"))
        .unwrap();
    assert!(
        nspid.split_whitespace().last() == Some("1"),
        "the agent is not PID 1 of its namespace: {nspid}"
    );
    let namespace = pid_namespace(agent).unwrap();
    wait_running(&pod);

    // Sample while hundreds of orphans come and go. A reaper that missed them would pile up one
    // zombie per orphan. A working one leaves only those whose SIGCHLD it has not handled yet,
    // a few more when the test host is busy.
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        samples.push(zombies_in(&namespace));
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphans = fs::read_to_string(pod.dir.join("orphans"))
        .unwrap()
        .lines()
        .count();
    assert!(orphans >= 30, "only {orphans} orphans were made");
    let most = samples.iter().copied().max().unwrap();
    let mean = samples.iter().sum::<usize>() as f64 / samples.len() as f64;
    assert!(most <= 20, "{most} zombies at once among {orphans} orphans");
    assert!(
        mean <= 3.0,
        "{mean:.1} zombies on average among {orphans} orphans"
    );
    let (status, _) = http(pod.control_port, "GET", "/health", "").unwrap();
    assert_eq!(status, 200);

    // SIGTERM to PID 1 from outside its namespace stops the pod cleanly.
    kill(Pid::from_raw(agent), Signal::SIGTERM).unwrap();
    let mut pod = pod;
    assert_eq!(pod.wait_exit(WAIT).code(), Some(0));
}

#[test]
fn agent_sigterm_forwarded_before_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let script = "trap 'date +%s.%N >> terms' TERM; trap 'echo USR1 >> usr1' USR1; \
                  echo $$ > pid; while true; do sleep 0.1; done";
    let mut pod = start_pod(root.path(), script, &[("ochopod_grace", "2")]);
    let pid = wait_running(&pod);
    wait_trap_set(&pod);

    pod.signal(Signal::SIGUSR1);
    assert_eq!(wait_lines(&pod, "usr1", 1), vec!["USR1"]);

    let sent = now_seconds();
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(WAIT);
    let exited = now_seconds();
    assert_eq!(status.code(), Some(0), "{}", pod.log_text());

    let terms = timestamps(&wait_lines(&pod, "terms", 1));
    assert!(
        terms[0] - sent < 1.0,
        "SIGTERM reached the sub-process late"
    );
    assert!(
        exited - terms[0] >= 1.9,
        "SIGKILL before the grace period: {}",
        exited - terms[0]
    );
    assert_eq!(process_state(pid), None);
}

#[test]
fn agent_sigterm_exits_when_subprocess_does() {
    let root = tempfile::tempdir().unwrap();
    let script =
        "trap 'echo TERM >> terms; exit 0' TERM; echo $$ > pid; while true; do sleep 0.1; done";
    let mut pod = start_pod(root.path(), script, &[("ochopod_grace", "20")]);
    let pid = wait_running(&pod);
    wait_trap_set(&pod);

    let sent = Instant::now();
    pod.signal(Signal::SIGTERM);
    assert_eq!(pod.wait_exit(WAIT).code(), Some(0));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the agent waited for the grace period although the sub-process exited: {:?}",
        sent.elapsed()
    );
    assert_eq!(wait_lines(&pod, "terms", 1), vec!["TERM"]);
    assert_eq!(process_state(pid), None);
}
