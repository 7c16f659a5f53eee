//! The lifecycle actor with fake steps and a fake supervisor: every verb, the queue order,
//! epoch fencing, supervisor events and shutdown.

#[allow(dead_code)]
#[path = "support/wait.rs"]
mod wait;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;
use ochopod::cluster::{Cluster, Pods};
use ochopod::lifecycle::{
    Control, ControlError, GetPhase, Lifecycle, LifecycleConfig, Phase, PodDead, Shutdown,
    SupervisorLink, Verb,
};
use ochopod::registration::Registration;
use ochopod::steps::{LifeCycle, StepError, SubCommand};
use ochopod::supervisor::{ProcessEvent, Spawn, Stop, SupervisorError};
use ochopod::telemetry::{ProcessState, Telemetry};
use serde_json::{json, Value};
use wait::wait_until_async;

const PATIENCE: Duration = Duration::from_secs(10);

/// Every step and supervisor call, in the order they happened.
type Log = Arc<Mutex<Vec<String>>>;

/// Steps that log their calls; a step listed in `failing` fails, one in `delays` takes that
/// long, and `configure` returns `command`.
#[derive(Default)]
struct FakeSteps {
    log: Log,
    failing: HashSet<&'static str>,
    delays: HashMap<&'static str, Duration>,
    command: SubCommand,
}

impl FakeSteps {
    async fn step(&self, name: &'static str) -> Result<(), StepError> {
        self.log.lock().unwrap().push(name.to_string());
        if let Some(delay) = self.delays.get(name) {
            tokio::time::sleep(*delay).await;
            self.log.lock().unwrap().push(format!("{name} done"));
        }
        if self.failing.contains(name) {
            return Err(StepError::new(format!("{name} refused")));
        }
        Ok(())
    }
}

#[async_trait]
impl LifeCycle for FakeSteps {
    async fn initialize(&self) -> Result<(), StepError> {
        self.step("initialize").await
    }

    async fn can_configure(&self, _: &Cluster) -> Result<(), StepError> {
        self.step("can_configure").await
    }

    async fn configure(&self, _: &Cluster) -> Result<SubCommand, StepError> {
        self.step("configure").await.map(|()| self.command.clone())
    }

    async fn configured(&self, _: &Cluster) -> Result<(), StepError> {
        self.step("configured").await
    }

    async fn signaled(&self, body: &Value) -> Result<Value, StepError> {
        self.step("signaled")
            .await
            .map(|()| json!({"received": body}))
    }

    async fn finalize(&self) -> Result<(), StepError> {
        self.step("finalize").await
    }
}

/// Stands in for the supervisor: logs `spawn` and `stop`, hands out pids from 1000.
struct FakeSupervisor {
    log: Log,
    spawned: Arc<Mutex<Vec<SubCommand>>>,
    next_pid: u32,
}

impl Actor for FakeSupervisor {
    type Context = Context<Self>;
}

impl Handler<Spawn> for FakeSupervisor {
    type Result = Result<u32, SupervisorError>;

    fn handle(&mut self, Spawn(command): Spawn, _: &mut Self::Context) -> Self::Result {
        self.log.lock().unwrap().push("spawn".to_string());
        self.spawned.lock().unwrap().push(command);
        self.next_pid += 1;
        Ok(self.next_pid - 1)
    }
}

impl Handler<Stop> for FakeSupervisor {
    type Result = Result<(), SupervisorError>;

    fn handle(&mut self, _: Stop, _: &mut Self::Context) -> Self::Result {
        self.log.lock().unwrap().push("stop".to_string());
        Ok(())
    }
}

/// Records the `PodDead` notices the lifecycle sends its owner.
struct Owner(Arc<Mutex<Vec<PodDead>>>);

impl Actor for Owner {
    type Context = Context<Self>;
}

impl Handler<PodDead> for Owner {
    type Result = ();

    fn handle(&mut self, notice: PodDead, _: &mut Self::Context) {
        self.0.lock().unwrap().push(notice);
    }
}

struct Pod {
    lifecycle: Addr<Lifecycle>,
    log: Log,
    spawned: Arc<Mutex<Vec<SubCommand>>>,
    dead_notices: Arc<Mutex<Vec<PodDead>>>,
    telemetry: Arc<Telemetry>,
}

impl Pod {
    fn start(config: LifecycleConfig, mut steps: FakeSteps) -> Pod {
        let log = Log::default();
        steps.log = log.clone();

        let spawned = Arc::new(Mutex::new(Vec::new()));
        let supervisor = FakeSupervisor {
            log: log.clone(),
            spawned: spawned.clone(),
            next_pid: 1000,
        }
        .start();

        let dead_notices = Arc::new(Mutex::new(Vec::new()));
        let owner = Owner(dead_notices.clone()).start();
        let telemetry = Arc::new(Telemetry::default());

        let link = SupervisorLink {
            spawn: supervisor.clone().recipient(),
            stop: supervisor.recipient(),
        };
        let lifecycle = Lifecycle::new(
            config,
            Arc::new(steps),
            link,
            telemetry.clone(),
            Some(owner.recipient()),
        )
        .start();
        Pod {
            lifecycle,
            log,
            spawned,
            dead_notices,
            telemetry,
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn request(&self, verb: Verb, body: Value, epoch: Option<i64>) -> Control {
        Control {
            verb,
            body: body.into(),
            epoch,
            deadline: Instant::now() + PATIENCE,
        }
    }

    async fn control(
        &self,
        verb: Verb,
        body: Value,
        epoch: Option<i64>,
    ) -> Result<Value, ControlError> {
        self.lifecycle
            .send(self.request(verb, body, epoch))
            .await
            .unwrap()
    }

    async fn phase(&self) -> Phase {
        self.lifecycle.send(GetPhase).await.unwrap()
    }
}

fn config() -> LifecycleConfig {
    LifecycleConfig {
        strict: false,
        start: true,
        exit_when_dead: false,
        command: Some(SubCommand {
            argv: vec!["server".to_string(), "--port=1".to_string()],
            ..SubCommand::default()
        }),
        env: BTreeMap::new(),
        cwd: None,
    }
}

/// Returns the view of a two-pod cluster depending on one ZooKeeper pod at `zookeeper_ip`.
fn view(zookeeper_ip: &str) -> Value {
    let pod = |ip: &str| Registration {
        ip: ip.to_string(),
        ..Registration::default()
    };
    let cluster = Cluster {
        key: "b".to_string(),
        pods: Pods::from([
            ("a".to_string(), pod("10.0.0.1")),
            ("b".to_string(), pod("10.0.0.2")),
        ]),
        dependencies: BTreeMap::from([(
            "zookeeper".to_string(),
            Pods::from([("z".to_string(), pod(zookeeper_ip))]),
        )]),
    };
    serde_json::to_value(cluster).unwrap()
}

#[actix::test]
async fn check_runs_can_configure() {
    let pod = Pod::start(config(), FakeSteps::default());
    assert_eq!(
        pod.control(Verb::Check, view("z1"), None).await,
        Ok(json!({}))
    );
    assert_eq!(pod.log(), ["can_configure"]);
    assert_eq!(pod.phase().await, Phase::Unconfigured);

    let refusing = Pod::start(
        config(),
        FakeSteps {
            failing: HashSet::from(["can_configure"]),
            ..FakeSteps::default()
        },
    );
    let error = refusing
        .control(Verb::Check, view("z1"), None)
        .await
        .unwrap_err();
    assert_eq!(error.http_status(), 406);
    assert!(
        error.to_string().contains("can_configure refused"),
        "{error}"
    );
    assert_eq!(
        refusing.phase().await,
        Phase::Unconfigured,
        "a failed check must not kill the pod"
    );
}

#[actix::test]
async fn first_on_initializes_configures_starts() {
    let pod = Pod::start(config(), FakeSteps::default());
    assert_eq!(pod.control(Verb::On, view("z1"), None).await, Ok(json!({})));
    assert_eq!(pod.log(), ["initialize", "configure", "spawn"]);
    assert_eq!(pod.phase().await, Phase::Running);

    // The static command, with the cluster view in the environment.
    let spawned = pod.spawned.lock().unwrap()[0].clone();
    assert_eq!(spawned.argv, ["server", "--port=1"]);
    assert_eq!(spawned.env["OCHOPOD_INDEX"], "1");
    assert_eq!(spawned.env["OCHOPOD_SIZE"], "2");
}

#[actix::test]
async fn repeated_on_keeps_process_unless_dependencies_change() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(pod.log(), ["initialize", "configure", "spawn"]);

    pod.control(Verb::On, view("z2"), None).await.unwrap();
    assert_eq!(
        pod.log(),
        [
            "initialize",
            "configure",
            "spawn",
            "stop",
            "configure",
            "spawn"
        ]
    );
    assert_eq!(pod.phase().await, Phase::Running);
}

#[actix::test]
async fn strict_on_always_restarts() {
    let pod = Pod::start(
        LifecycleConfig {
            strict: true,
            ..config()
        },
        FakeSteps::default(),
    );
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(
        pod.log(),
        [
            "initialize",
            "configure",
            "spawn",
            "stop",
            "configure",
            "spawn"
        ]
    );
}

#[actix::test]
async fn off_then_on_starts_again() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(
        pod.control(Verb::Off, Value::Null, None).await,
        Ok(json!({}))
    );
    assert_eq!(pod.phase().await, Phase::Configured);

    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(
        pod.log(),
        [
            "initialize",
            "configure",
            "spawn",
            "stop",
            "configure",
            "spawn"
        ]
    );
    assert_eq!(pod.phase().await, Phase::Running);
}

#[actix::test]
async fn start_false_configures_only() {
    let pod = Pod::start(
        LifecycleConfig {
            start: false,
            command: None,
            ..config()
        },
        FakeSteps::default(),
    );
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(pod.log(), ["initialize", "configure"]);
    assert_eq!(pod.phase().await, Phase::Configured);
}

#[actix::test]
async fn ok_runs_configured() {
    let pod = Pod::start(config(), FakeSteps::default());
    assert_eq!(pod.control(Verb::Ok, view("z1"), None).await, Ok(json!({})));
    assert_eq!(pod.log(), ["configured"]);
}

#[actix::test]
async fn signal_returns_step_reply() {
    let pod = Pod::start(config(), FakeSteps::default());
    let reply = pod
        .control(Verb::Signal, json!({"action": "flush"}), None)
        .await;
    assert_eq!(reply, Ok(json!({"received": {"action": "flush"}})));
}

#[actix::test]
async fn kill_makes_pod_dead() {
    let pod = Pod::start(
        LifecycleConfig {
            exit_when_dead: true,
            ..config()
        },
        FakeSteps::default(),
    );
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(
        pod.control(Verb::Kill, Value::Null, None).await,
        Ok(json!({}))
    );
    assert_eq!(
        pod.log(),
        ["initialize", "configure", "spawn", "stop", "finalize"]
    );
    assert_eq!(pod.phase().await, Phase::Dead);
    assert_eq!(pod.telemetry.facts().process, ProcessState::Dead);

    for verb in [Verb::Check, Verb::On, Verb::Kill] {
        let error = pod.control(verb, view("z1"), None).await.unwrap_err();
        assert_eq!(error.http_status(), 410, "{verb:?}");
    }
    wait_until_async(PATIENCE, "the dead notice", || async {
        !pod.dead_notices.lock().unwrap().is_empty()
    })
    .await;
}

#[actix::test]
async fn failed_configure_kills_pod() {
    let pod = Pod::start(
        config(),
        FakeSteps {
            failing: HashSet::from(["configure"]),
            ..FakeSteps::default()
        },
    );
    let error = pod.control(Verb::On, view("z1"), None).await.unwrap_err();
    assert_eq!(error.http_status(), 406);
    assert!(error.to_string().contains("configure refused"), "{error}");
    assert_eq!(pod.phase().await, Phase::Dead);
    assert_eq!(
        pod.control(Verb::Check, view("z1"), None).await,
        Err(ControlError::Dead)
    );
    assert!(
        pod.dead_notices.lock().unwrap().is_empty(),
        "exit_when_dead is off"
    );
}

#[actix::test]
async fn stale_epoch_rejected() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), Some(5)).await.unwrap();

    let stale = pod.control(Verb::Check, view("z1"), Some(4)).await;
    assert_eq!(
        stale,
        Err(ControlError::StaleEpoch {
            received: 4,
            highest: 5
        })
    );
    assert_eq!(stale.unwrap_err().http_status(), 409);

    assert!(pod.control(Verb::Check, view("z1"), Some(5)).await.is_ok());
    assert!(pod.control(Verb::Check, view("z1"), None).await.is_ok());
    assert!(pod.control(Verb::Check, view("z1"), Some(7)).await.is_ok());
    assert_eq!(pod.telemetry.facts().epoch, 7);
    assert_eq!(
        pod.control(Verb::Check, view("z1"), Some(5)).await,
        Err(ControlError::StaleEpoch {
            received: 5,
            highest: 7
        })
    );
}

#[actix::test]
async fn invalid_body_rejected() {
    let pod = Pod::start(config(), FakeSteps::default());
    let error = pod
        .control(Verb::On, json!("pods"), None)
        .await
        .unwrap_err();
    assert_eq!(error.http_status(), 400);
    assert!(pod.log().is_empty());
}

#[actix::test]
async fn requests_served_in_arrival_order() {
    let steps = FakeSteps {
        delays: HashMap::from([
            ("can_configure", Duration::from_millis(150)),
            ("configured", Duration::from_millis(10)),
            ("signaled", Duration::from_millis(10)),
        ]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);

    let check = pod
        .lifecycle
        .send(pod.request(Verb::Check, view("z1"), None));
    let ok = pod.lifecycle.send(pod.request(Verb::Ok, view("z1"), None));
    let signal = pod
        .lifecycle
        .send(pod.request(Verb::Signal, json!({}), None));
    let (check, ok, signal) = futures::join!(check, ok, signal);
    assert!(check.unwrap().is_ok());
    assert!(ok.unwrap().is_ok());
    assert!(signal.unwrap().is_ok());

    assert_eq!(
        pod.log(),
        [
            "can_configure",
            "can_configure done",
            "configured",
            "configured done",
            "signaled",
            "signaled done"
        ]
    );
}

#[actix::test]
async fn expired_request_times_out() {
    let steps = FakeSteps {
        delays: HashMap::from([("can_configure", Duration::from_millis(200))]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);

    let slow = pod
        .lifecycle
        .send(pod.request(Verb::Check, view("z1"), None));
    let hasty = Control {
        deadline: Instant::now() + Duration::from_millis(50),
        ..pod.request(Verb::Check, view("z1"), None)
    };
    let hasty = pod.lifecycle.send(hasty);
    let (slow, hasty) = futures::join!(slow, hasty);

    assert!(slow.unwrap().is_ok());
    assert_eq!(hasty.unwrap(), Err(ControlError::TimedOut));
    assert_eq!(
        pod.log(),
        ["can_configure", "can_configure done"],
        "the expired request must not run"
    );
}

#[actix::test]
async fn completed_process_kills_pod() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), None).await.unwrap();

    // An event about another process is ignored.
    pod.lifecycle
        .send(ProcessEvent::Completed { pid: 999 })
        .await
        .unwrap();
    assert_eq!(pod.phase().await, Phase::Running);

    pod.lifecycle
        .send(ProcessEvent::Completed { pid: 1000 })
        .await
        .unwrap();
    wait_until_async(PATIENCE, "the pod to die", || async {
        pod.phase().await == Phase::Dead
    })
    .await;
    assert_eq!(
        pod.log(),
        ["initialize", "configure", "spawn", "stop", "finalize"]
    );
}

#[actix::test]
async fn completed_after_restart_uses_new_pid() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    pod.lifecycle
        .send(ProcessEvent::Restarted {
            pid: 2000,
            restarts: 1,
        })
        .await
        .unwrap();

    pod.lifecycle
        .send(ProcessEvent::Completed { pid: 1000 })
        .await
        .unwrap();
    assert_eq!(pod.phase().await, Phase::Running);
    pod.lifecycle
        .send(ProcessEvent::Completed { pid: 2000 })
        .await
        .unwrap();
    wait_until_async(PATIENCE, "the pod to die", || async {
        pod.phase().await == Phase::Dead
    })
    .await;
}

#[actix::test]
async fn unhealthy_process_turns_pod_off() {
    let pod = Pod::start(config(), FakeSteps::default());
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    pod.lifecycle
        .send(ProcessEvent::Unhealthy {
            pid: Some(1000),
            failures: 3,
        })
        .await
        .unwrap();

    wait_until_async(PATIENCE, "the pod to turn off", || async {
        pod.phase().await == Phase::Configured
    })
    .await;
    assert_eq!(pod.log(), ["initialize", "configure", "spawn", "stop"]);

    // The pod stays configured and can be turned on again.
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(pod.phase().await, Phase::Running);
}

#[actix::test]
async fn shutdown_stops_and_rejects_queue() {
    let steps = FakeSteps {
        delays: HashMap::from([("can_configure", Duration::from_millis(200))]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);
    pod.control(Verb::On, view("z1"), None).await.unwrap();

    let running = pod
        .lifecycle
        .send(pod.request(Verb::Check, view("z1"), None));
    let queued = pod.lifecycle.send(pod.request(Verb::Ok, view("z1"), None));
    let shutdown = pod.lifecycle.send(Shutdown);
    let (running, queued, shutdown) = futures::join!(running, queued, shutdown);

    shutdown.unwrap();
    assert!(running.unwrap().is_ok(), "the running step finishes");
    assert_eq!(queued.unwrap(), Err(ControlError::Dead));
    assert!(pod.log().contains(&"stop".to_string()));
    assert!(!pod.log().contains(&"configured".to_string()));
    assert_eq!(pod.phase().await, Phase::Dead);
    assert_eq!(pod.telemetry.facts().process, ProcessState::Dead);
    assert_eq!(
        pod.control(Verb::Check, view("z1"), None).await,
        Err(ControlError::Dead)
    );
}

#[actix::test]
async fn timed_out_on_starts_nothing() {
    let steps = FakeSteps {
        delays: HashMap::from([("configure", Duration::from_millis(300))]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);

    // The first `on` expires while configure runs.
    let hasty = Control {
        deadline: Instant::now() + Duration::from_millis(100),
        ..pod.request(Verb::On, view("z1"), None)
    };
    assert_eq!(
        pod.lifecycle.send(hasty).await.unwrap(),
        Err(ControlError::TimedOut)
    );
    assert_eq!(pod.log(), ["initialize", "configure", "configure done"]);
    assert_eq!(pod.phase().await, Phase::Unconfigured);
    assert!(pod.dead_notices.lock().unwrap().is_empty());

    // The next `on` configures again, without a second initialize, and starts.
    assert_eq!(pod.control(Verb::On, view("z1"), None).await, Ok(json!({})));
    assert_eq!(
        pod.log(),
        [
            "initialize",
            "configure",
            "configure done",
            "configure",
            "configure done",
            "spawn"
        ]
    );
    assert_eq!(pod.phase().await, Phase::Running);
}

#[actix::test]
async fn timed_out_reconfiguration_leaves_pod_off() {
    let steps = FakeSteps {
        delays: HashMap::from([("configure", Duration::from_millis(300))]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);
    pod.control(Verb::On, view("z1"), None).await.unwrap();
    assert_eq!(pod.phase().await, Phase::Running);

    // A changed dependency tears the sub-process down, then the request expires in configure.
    let hasty = Control {
        deadline: Instant::now() + Duration::from_millis(100),
        ..pod.request(Verb::On, view("z2"), None)
    };
    assert_eq!(
        pod.lifecycle.send(hasty).await.unwrap(),
        Err(ControlError::TimedOut)
    );
    let spawns = pod.log().iter().filter(|entry| *entry == "spawn").count();
    assert_eq!(spawns, 1, "{:?}", pod.log());
    assert_eq!(pod.phase().await, Phase::Configured);

    // The pod runs no sub-process, so the same view configures it and starts one.
    pod.control(Verb::On, view("z2"), None).await.unwrap();
    let spawns = pod.log().iter().filter(|entry| *entry == "spawn").count();
    assert_eq!(spawns, 2, "{:?}", pod.log());
    assert_eq!(pod.phase().await, Phase::Running);
}

#[actix::test]
async fn shutdown_during_on_prevents_spawn() {
    let steps = FakeSteps {
        delays: HashMap::from([("configure", Duration::from_millis(200))]),
        ..FakeSteps::default()
    };
    let pod = Pod::start(config(), steps);

    let on = pod.lifecycle.send(pod.request(Verb::On, view("z1"), None));
    let shutdown = async {
        wait_until_async(PATIENCE, "configure to start", || async {
            pod.log().contains(&"configure".to_string())
        })
        .await;
        pod.lifecycle.send(Shutdown).await.unwrap();
    };
    let (on, ()) = futures::join!(on, shutdown);

    assert_eq!(on.unwrap(), Err(ControlError::Dead));
    assert!(!pod.log().contains(&"spawn".to_string()), "{:?}", pod.log());
}
