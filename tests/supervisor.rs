//! The supervisor actor against real sub-processes: completion, crash loops, sanity checks,
//! signals and tear-downs, with a recorder standing in for the lifecycle.

#[allow(dead_code)]
#[path = "support/wait.rs"]
mod wait;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use ochopod::cluster::Cluster;
use ochopod::steps::{LifeCycle, StepError, SubCommand, TearDown};
use ochopod::supervisor::{
    Forward, GetPid, ProcessEvent, Spawn, Stop, Supervisor, SupervisorConfig, SupervisorError,
};
use ochopod::telemetry::{ProcessState, Telemetry};
use serde_json::{json, Value};
use wait::wait_until_async;

const PATIENCE: Duration = Duration::from_secs(10);

/// Steps with a scripted sanity check and tear-down, recording the pids they were given.
struct Steps {
    sanity: Result<Option<Value>, String>,
    tear_down: TearDown,
    tear_down_pids: Mutex<Vec<u32>>,
}

impl Steps {
    fn healthy() -> Self {
        Steps {
            sanity: Ok(None),
            tear_down: TearDown::Default,
            tear_down_pids: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl LifeCycle for Steps {
    async fn configure(&self, _: &Cluster) -> Result<SubCommand, StepError> {
        Ok(SubCommand::default())
    }

    async fn sanity_check(&self, _: u32) -> Result<Option<Value>, StepError> {
        self.sanity.clone().map_err(StepError)
    }

    async fn tear_down(&self, pid: u32) -> Result<TearDown, StepError> {
        self.tear_down_pids.lock().unwrap().push(pid);
        Ok(self.tear_down)
    }
}

type Events = Arc<Mutex<Vec<(Instant, ProcessEvent)>>>;

/// Stands in for the lifecycle: records every process event with its arrival time.
struct Recorder(Events);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<ProcessEvent> for Recorder {
    type Result = ();

    fn handle(&mut self, event: ProcessEvent, _: &mut Self::Context) {
        self.0.lock().unwrap().push((Instant::now(), event));
    }
}

struct Harness {
    supervisor: Addr<Supervisor>,
    telemetry: Arc<Telemetry>,
    events: Events,
    steps: Arc<Steps>,
}

impl Harness {
    fn start(config: SupervisorConfig, steps: Steps) -> Harness {
        let events = Events::default();
        let recorder = Recorder(events.clone()).start();
        let telemetry = Arc::new(Telemetry::default());
        let steps = Arc::new(steps);
        let supervisor = Supervisor::new(
            config,
            steps.clone(),
            telemetry.clone(),
            recorder.recipient(),
        )
        .start();
        Harness {
            supervisor,
            telemetry,
            events,
            steps,
        }
    }

    fn events(&self) -> Vec<ProcessEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, event)| event.clone())
            .collect()
    }

    async fn spawn(&self, script: &str, env: &[(&str, &Path)]) -> u32 {
        let command = SubCommand {
            argv: vec![script.to_string()],
            shell: true,
            env: env
                .iter()
                .map(|(name, path)| (name.to_string(), path.display().to_string()))
                .collect(),
            cwd: None,
        };
        self.supervisor.send(Spawn(command)).await.unwrap().unwrap()
    }
}

fn config() -> SupervisorConfig {
    SupervisorConfig {
        grace: Duration::from_millis(500),
        soft: false,
        checks: 1,
        check_every: Duration::ZERO,
        pipe_subprocess: false,
        first_restart_delay: Duration::from_millis(50),
        max_restart_delay: Duration::from_millis(400),
        stable_run: Duration::from_secs(60),
    }
}

fn group_alive(group: u32) -> bool {
    killpg(Pid::from_raw(group as i32), None).is_ok()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn marker(directory: &tempfile::TempDir) -> PathBuf {
    directory.path().join("marker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A shell loop that notes every SIGTERM in `$MARK` and keeps running. It writes `ready` once
/// the trap is set: a SIGTERM before that would end the shell at once.
const NOTES_SIGTERM: &str =
    r#"trap 'echo term >> "$MARK"' TERM; echo ready >> "$MARK"; while :; do sleep 0.05; done"#;

/// Waits until a script started with `$MARK` has set its traps.
async fn wait_ready(mark: &Path) {
    wait_until_async(PATIENCE, "the script to set its traps", || async {
        read(mark).contains("ready")
    })
    .await;
}

#[actix::test]
async fn exit_zero_reports_completed() {
    let harness = Harness::start(config(), Steps::healthy());
    let pid = harness.spawn("exit 0", &[]).await;

    wait_until_async(PATIENCE, "the completed event", || async {
        harness.events().contains(&ProcessEvent::Completed { pid })
    })
    .await;
    let facts = harness.telemetry.facts();
    assert_eq!(facts.process, ProcessState::Stopped);
    assert_eq!(facts.pid, None);
    assert_eq!(facts.restarts, 0);
}

#[actix::test]
async fn sub_process_gets_pod_facts_and_env() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let harness = Harness::start(config(), Steps::healthy());
    harness
        .telemetry
        .update(|facts| facts.registration.cluster = "shop".to_string());

    harness
        .spawn(r#"printf '%s' "$ochopod" > "$MARK""#, &[("MARK", &mark)])
        .await;

    let facts: Value = wait_until_async(PATIENCE, "the facts in the marker", || async {
        serde_json::from_str(&read(&mark)).ok()
    })
    .await;
    assert_eq!(facts["cluster"], "shop");
}

#[actix::test]
async fn crash_loop_backs_off_then_unhealthy() {
    let config = SupervisorConfig {
        checks: 3,
        check_every: Duration::from_millis(250),
        ..config()
    };
    let harness = Harness::start(config, Steps::healthy());
    harness.spawn("exit 3", &[]).await;

    let unhealthy = wait_until_async(PATIENCE, "the unhealthy event", || async {
        harness
            .events()
            .into_iter()
            .find(|event| matches!(event, ProcessEvent::Unhealthy { .. }))
    })
    .await;
    assert!(
        matches!(unhealthy, ProcessEvent::Unhealthy { failures: 3, .. }),
        "{unhealthy:?}"
    );

    let restarts: Vec<Instant> = harness
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, event)| matches!(event, ProcessEvent::Restarted { .. }))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        restarts.len() >= 3,
        "only {} restarts before the pod turned unhealthy",
        restarts.len()
    );
    let first_gap = restarts[1] - restarts[0];
    let second_gap = restarts[2] - restarts[1];
    assert!(
        second_gap > first_gap,
        "delays did not grow: {first_gap:?} then {second_gap:?}"
    );
    assert!(harness.telemetry.facts().restarts >= 3);

    harness.supervisor.send(Stop).await.unwrap().unwrap();
    assert_eq!(harness.supervisor.send(GetPid).await.unwrap(), None);
}

#[actix::test]
async fn failing_sanity_checks_report_unhealthy() {
    let config = SupervisorConfig {
        checks: 2,
        check_every: Duration::from_millis(50),
        ..config()
    };
    let steps = Steps {
        sanity: Err("port 6379 closed".to_string()),
        ..Steps::healthy()
    };
    let harness = Harness::start(config, steps);
    let pid = harness.spawn("exec sleep 30", &[]).await;

    wait_until_async(PATIENCE, "the unhealthy event", || async {
        harness.events().contains(&ProcessEvent::Unhealthy {
            pid: Some(pid),
            failures: 2,
        })
    })
    .await;
    harness.supervisor.send(Stop).await.unwrap().unwrap();
    assert!(!process_exists(pid));
}

#[actix::test]
async fn sanity_check_metrics_published() {
    let config = SupervisorConfig {
        check_every: Duration::from_millis(50),
        ..config()
    };
    let steps = Steps {
        sanity: Ok(Some(json!({"connections": 12}))),
        ..Steps::healthy()
    };
    let harness = Harness::start(config, steps);
    harness.spawn("exec sleep 30", &[]).await;

    wait_until_async(PATIENCE, "the metrics in the telemetry", || async {
        harness.telemetry.facts().metrics == json!({"connections": 12})
    })
    .await;
    assert!(harness.events().is_empty(), "{:?}", harness.events());
    harness.supervisor.send(Stop).await.unwrap().unwrap();
}

#[actix::test]
async fn stop_sends_sigkill_after_grace() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let harness = Harness::start(config(), Steps::healthy());
    let pid = harness.spawn(NOTES_SIGTERM, &[("MARK", &mark)]).await;
    wait_ready(&mark).await;
    assert_eq!(harness.telemetry.facts().process, ProcessState::Running);

    let started = Instant::now();
    harness.supervisor.send(Stop).await.unwrap().unwrap();
    let elapsed = started.elapsed();

    assert!(read(&mark).contains("term"), "SIGTERM was not sent first");
    assert!(
        elapsed >= Duration::from_millis(500),
        "SIGKILL came before the grace: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "the tear-down took {elapsed:?}"
    );
    assert!(!group_alive(pid));
    assert_eq!(
        harness.steps.tear_down_pids.lock().unwrap().as_slice(),
        &[pid]
    );
    assert_eq!(harness.telemetry.facts().process, ProcessState::Stopped);
}

#[actix::test]
async fn soft_stop_never_sends_sigkill() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let config = SupervisorConfig {
        soft: true,
        grace: Duration::from_millis(200),
        ..config()
    };
    let harness = Harness::start(config, Steps::healthy());
    let pid = harness.spawn(NOTES_SIGTERM, &[("MARK", &mark)]).await;
    wait_ready(&mark).await;

    let stop = actix::spawn(harness.supervisor.send(Stop));
    wait_until_async(PATIENCE, "the SIGTERM note", || async {
        read(&mark).contains("term")
    })
    .await;

    // Well past the grace, the process must still run and the stop still wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(group_alive(pid), "the soft tear-down killed the process");
    assert!(!stop.is_finished());
    assert_eq!(harness.telemetry.facts().process, ProcessState::Terminating);

    // This test started the process, so it may end it; the stop then completes.
    killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    stop.await.unwrap().unwrap().unwrap();
    assert!(!group_alive(pid));
}

#[actix::test]
async fn stop_tears_down_whole_group() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let harness = Harness::start(config(), Steps::healthy());
    let pid = harness
        .spawn(r#"sleep 30 & echo $! > "$MARK"; wait"#, &[("MARK", &mark)])
        .await;
    let grandchild: u32 = wait_until_async(PATIENCE, "the grandchild pid", || async {
        read(&mark).trim().parse().ok()
    })
    .await;
    assert!(process_exists(grandchild));

    let started = Instant::now();
    harness.supervisor.send(Stop).await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "SIGTERM should have been enough"
    );
    assert!(!group_alive(pid));
    assert!(
        !process_exists(grandchild),
        "grandchild {grandchild} survived or stayed a zombie"
    );
}

#[actix::test]
async fn requested_tear_down_skips_sigterm() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let config = SupervisorConfig {
        grace: Duration::from_millis(300),
        ..config()
    };
    let steps = Steps {
        tear_down: TearDown::Requested,
        ..Steps::healthy()
    };
    let harness = Harness::start(config, steps);
    let pid = harness.spawn(NOTES_SIGTERM, &[("MARK", &mark)]).await;
    wait_ready(&mark).await;

    let started = Instant::now();
    harness.supervisor.send(Stop).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        read(&mark),
        "ready\n",
        "the agent sent SIGTERM although the step asked to stop"
    );
    assert_eq!(
        harness.steps.tear_down_pids.lock().unwrap().as_slice(),
        &[pid]
    );
    assert!(!group_alive(pid));
}

#[actix::test]
async fn forward_reaches_group() {
    let directory = tempfile::tempdir().unwrap();
    let mark = marker(&directory);
    let harness = Harness::start(config(), Steps::healthy());
    let script =
        r#"trap 'echo usr1 >> "$MARK"' USR1; echo ready >> "$MARK"; while :; do sleep 0.05; done"#;
    harness.spawn(script, &[("MARK", &mark)]).await;
    wait_ready(&mark).await;

    harness
        .supervisor
        .send(Forward(Signal::SIGUSR1))
        .await
        .unwrap()
        .unwrap();
    wait_until_async(PATIENCE, "the SIGUSR1 note", || async {
        read(&mark).contains("usr1")
    })
    .await;
    harness.supervisor.send(Stop).await.unwrap().unwrap();

    let idle = harness
        .supervisor
        .send(Forward(Signal::SIGUSR1))
        .await
        .unwrap();
    assert_eq!(idle, Err(SupervisorError::NotRunning));
}

#[actix::test]
async fn spawn_rejects_missing_program_and_second_process() {
    let harness = Harness::start(config(), Steps::healthy());
    let missing = SubCommand {
        argv: vec!["/nonexistent/server".to_string()],
        ..SubCommand::default()
    };
    let error = harness
        .supervisor
        .send(Spawn(missing))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, SupervisorError::Spawn { program, .. } if program == "/nonexistent/server"),
        "{error}"
    );

    let empty = harness
        .supervisor
        .send(Spawn(SubCommand::default()))
        .await
        .unwrap();
    assert_eq!(empty, Err(SupervisorError::EmptyCommand));

    let pid = harness.spawn("exec sleep 30", &[]).await;
    assert_eq!(harness.supervisor.send(GetPid).await.unwrap(), Some(pid));
    let second = harness
        .supervisor
        .send(Spawn(SubCommand {
            argv: vec!["true".to_string()],
            ..SubCommand::default()
        }))
        .await;
    assert_eq!(second.unwrap(), Err(SupervisorError::Busy { group: pid }));

    harness.supervisor.send(Stop).await.unwrap().unwrap();
}

#[actix::test]
async fn piped_output_is_logged_with_pid() {
    ochopod::logging::init();
    let config = SupervisorConfig {
        pipe_subprocess: true,
        ..config()
    };
    let harness = Harness::start(config, Steps::healthy());
    let pid = harness
        .spawn("echo hello from the pod; echo oops >&2", &[])
        .await;

    let stdout_line = format!("[pid {pid}] hello from the pod");
    let stderr_line = format!("[pid {pid}] oops");
    wait_until_async(PATIENCE, "both output lines in the pod log", || async {
        let lines = ochopod::logging::recent_lines();
        lines.iter().any(|line| line.contains(&stdout_line))
            && lines.iter().any(|line| line.contains(&stderr_line))
    })
    .await;
}
