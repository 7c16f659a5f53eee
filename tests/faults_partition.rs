//! Partitions and frozen processes, end to end. Real `ochopod` processes each reach ZooKeeper
//! through their own fault proxy, so a test can cut one pod off while the pods still reach
//! each other over HTTP. The last test stops the leader with SIGSTOP past its session timeout.

mod faults_common;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use faults_common::{
    child_of, info_within, obeyed, starts, wait_formed, Admin, LogsOnPanic, RECORDER, WAIT,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::pods::{field, http_with_headers, is_leader, leader_index, PodProcess, PodSpec};
use support::proxy::{Fault, FaultProxy};
use support::{shared_server, unique_namespace, wait_until};

/// A pod behind its own proxy to the shared ZooKeeper server.
struct ProxiedPod {
    pod: PodProcess,
    proxy: FaultProxy,
}

fn start_proxied(root: &std::path::Path, name: &str, spec: impl Fn(&str) -> PodSpec) -> ProxiedPod {
    let proxy = FaultProxy::start(shared_server().address());
    let pod = PodProcess::start(root, name, &spec(&proxy.connect_string()));
    ProxiedPod { pod, proxy }
}

fn spec(zk: &str, namespace: &str, session_timeout: &str) -> PodSpec {
    PodSpec::new(zk, namespace, "web")
        .env("ochopod_session_timeout", session_timeout)
        .shell(RECORDER)
}

fn refs(pods: &[ProxiedPod]) -> Vec<&PodProcess> {
    pods.iter().map(|proxied| &proxied.pod).collect()
}

fn key_of(child: &str) -> String {
    child.rsplit_once('.').unwrap().0.to_string()
}

fn rounds_started(pods: &[&PodProcess]) -> usize {
    pods.iter()
        .map(|pod| {
            pod.log_text()
                .matches("configuration round starting")
                .count()
        })
        .sum()
}

fn epoch(pod: &PodProcess) -> i64 {
    pod.info().unwrap()["epoch"].as_i64().unwrap()
}

/// One sample: when it was taken and the state each pod reported (`None`: no reply).
type Sample = (Instant, Vec<Option<String>>);

/// Samples `/info` of every pod until stopped, recording which pods report a leader state.
/// A pod that does not reply within 200 ms (frozen) counts as not leading.
struct LeaderSampler {
    running: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LeaderSampler {
    fn start(ports: Vec<u16>) -> LeaderSampler {
        let running = Arc::new(AtomicBool::new(true));
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let (flag, record) = (running.clone(), samples.clone());
        let thread = thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                let states: Vec<Option<String>> = ports
                    .iter()
                    .map(|port| {
                        info_within(*port, Duration::from_millis(200))
                            .map(|info| field(&info, "state"))
                    })
                    .collect();
                record.lock().unwrap().push((Instant::now(), states));
                thread::sleep(Duration::from_millis(10));
            }
        });
        LeaderSampler {
            running,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the samples.
    fn finish(mut self) -> Vec<Sample> {
        self.running.store(false, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.samples.lock().unwrap().clone()
    }
}

/// Asserts that no sample shows two pods in a leader state at once.
fn assert_single_leader(samples: &[Sample]) {
    assert!(samples.len() > 10, "too few samples: {}", samples.len());
    for (at, states) in samples {
        let leaders = states
            .iter()
            .filter(|state| {
                state
                    .as_deref()
                    .is_some_and(|state| state.starts_with("leader"))
            })
            .count();
        assert!(leaders <= 1, "two pods lead at once ({at:?}): {states:?}");
    }
}

#[test]
fn follower_cut_off_rejoins_same_seq() {
    let namespace = unique_namespace("cutfollower");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&shared_server().connect_string());
    let pods: Vec<ProxiedPod> = ["a", "b", "c"]
        .iter()
        .map(|name| start_proxied(root.path(), name, |zk| spec(zk, &namespace, "2")))
        .collect();
    let all = refs(&pods);
    wait_until(WAIT, "three pods configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&all);
    let starts_before: Vec<usize> = all.iter().map(|pod| starts(pod).len()).collect();

    let leader = leader_index(&all);
    let follower = (leader + 1) % pods.len();
    let child = child_of(&admin, &cluster, &pods[follower].pod);
    let key = key_of(&child);
    let seq = pods[follower].pod.info().unwrap()["seq"].as_i64().unwrap();

    pods[follower].proxy.set(Fault::Cut);
    let cut = Instant::now();
    wait_until(
        WAIT,
        "the leader configuring the cluster without the follower",
        || {
            let keys = admin.snapshot_keys(&cluster);
            keys.len() == 2 && !keys.contains(&key)
        },
    );
    eprintln!(
        "configured without the follower {:?} after the cut",
        cut.elapsed()
    );
    assert_eq!(
        field(&pods[follower].pod.info().unwrap(), "process"),
        "running",
        "a pod cut off from ZooKeeper keeps its sub-process"
    );

    pods[follower].proxy.set(Fault::None);
    let healed = Instant::now();
    wait_until(WAIT, "the follower configured back in", || {
        admin.snapshot_keys(&cluster).contains(&key)
    });
    eprintln!("configured back in {:?} after the heal", healed.elapsed());
    wait_formed(&all);

    assert!(
        admin.registrations(&cluster).contains_key(&child),
        "the follower registers again under the same key and seq"
    );
    assert_eq!(
        pods[follower].pod.info().unwrap()["seq"].as_i64(),
        Some(seq)
    );
    assert!(pods[follower].pod.log_text().contains("registering again"));
    assert_eq!(
        epoch(&pods[follower].pod),
        epoch(&pods[leader].pod),
        "the leader sent its requests to the follower again"
    );
    for (index, pod) in all.iter().enumerate() {
        assert_eq!(
            starts(pod).len(),
            starts_before[index],
            "pod {index}: no sub-process restart"
        );
    }
}

#[test]
fn leader_cut_off_replaced_and_fenced() {
    let namespace = unique_namespace("cutleader");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&shared_server().connect_string());
    let session_timeout = Duration::from_secs(2);
    let pods: Vec<ProxiedPod> = ["a", "b", "c"]
        .iter()
        .map(|name| start_proxied(root.path(), name, |zk| spec(zk, &namespace, "2")))
        .collect();
    let all = refs(&pods);
    wait_until(WAIT, "three pods configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&all);

    let old = leader_index(&all);
    let old_epoch = epoch(&pods[old].pod);
    let old_key = key_of(&child_of(&admin, &cluster, &pods[old].pod));
    let sampler = LeaderSampler::start(all.iter().map(|pod| pod.control_port).collect());

    // Cut off from ZooKeeper only, by a network that drops every packet: the pods still
    // reach the old leader over HTTP.
    let cut = Instant::now();
    pods[old].proxy.set(Fault::Blackhole);
    wait_until(WAIT, "the old leader stepping down", || {
        pods[old].pod.info().is_some_and(|info| !is_leader(&info))
    });
    let stepped_down = cut.elapsed();
    assert!(
        stepped_down <= session_timeout,
        "the old leader stops leading within the session timeout, not after {stepped_down:?}"
    );

    let new = wait_until(WAIT, "a new leader", || {
        (0..pods.len()).find(|index| {
            *index != old && pods[*index].pod.info().is_some_and(|info| is_leader(&info))
        })
    });
    wait_until(
        WAIT,
        "the new leader configuring the cluster without the old one",
        || {
            let keys = admin.snapshot_keys(&cluster);
            keys.len() == 2 && !keys.contains(&old_key)
        },
    );
    eprintln!(
        "stepped down {stepped_down:?} and replaced by a configured leader {:?} after the cut",
        cut.elapsed()
    );
    let new_epoch = epoch(&pods[new].pod);
    assert!(
        new_epoch > old_epoch,
        "epochs grow: {old_epoch} then {new_epoch}"
    );

    // A late request of the old leader, with its epoch, is rejected by every pod that obeyed
    // the new one.
    let view = json!({"pods": {"a": {}}, "dependencies": {}, "key": "a"}).to_string();
    for (index, proxied) in pods.iter().enumerate() {
        if index == old {
            continue;
        }
        let (status, reply) = http_with_headers(
            proxied.pod.control_port,
            "POST",
            "/control/on",
            &view,
            &[("X-Ochopod-Epoch", &old_epoch.to_string())],
        )
        .unwrap();
        assert_eq!(status, 409, "pod {index}: {reply}");
        assert!(reply["error"]
            .as_str()
            .is_some_and(|error| error.contains("stale")));
    }

    pods[old].proxy.set(Fault::None);
    wait_until(
        WAIT,
        "the old leader configured back in as a follower",
        || admin.snapshot_keys(&cluster).contains(&old_key),
    );
    wait_formed(&all);
    let samples = sampler.finish();
    assert_single_leader(&samples);
    assert_eq!(
        epoch(&pods[old].pod),
        new_epoch,
        "the old leader obeys the new one"
    );
    for pod in &all {
        let epochs: Vec<i64> = obeyed(pod).into_iter().map(|(_, epoch)| epoch).collect();
        assert!(
            epochs.windows(2).all(|pair| pair[0] <= pair[1]),
            "obeyed epochs never go back: {epochs:?}"
        );
    }
}

#[test]
fn stale_epoch_rejected_with_409() {
    let server = shared_server();
    let namespace = unique_namespace("stale");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let pod = PodProcess::start(
        root.path(),
        "a",
        &spec(&server.connect_string(), &namespace, "10"),
    );
    wait_formed(&[&pod]);
    let obeyed = epoch(&pod);
    let view = json!({"pods": {"a": {}}, "dependencies": {}, "key": "a"}).to_string();
    let check = |epoch: Option<i64>| -> (u16, Value) {
        let header = epoch.map(|epoch| epoch.to_string());
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|value| ("X-Ochopod-Epoch", value.as_str()))
            .collect();
        http_with_headers(pod.control_port, "POST", "/control/check", &view, &headers).unwrap()
    };

    let (status, reply) = check(Some(obeyed - 1));
    assert_eq!(status, 409, "{reply}");
    let error = reply["error"].as_str().expect("a JSON error");
    assert!(
        error.contains(&(obeyed - 1).to_string()) && error.contains(&obeyed.to_string()),
        "the error names both epochs: {error}"
    );

    let (status, reply) = check(Some(obeyed));
    assert_eq!(status, 200, "the current epoch is obeyed: {reply}");
    let (status, reply) = check(None);
    assert_eq!(status, 200, "operators send no epoch: {reply}");
    assert_eq!(epoch(&pod), obeyed, "rejected requests change nothing");
}

#[test]
fn leader_flapping_causes_no_round() {
    let namespace = unique_namespace("flapleader");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&shared_server().connect_string());
    let pods: Vec<ProxiedPod> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            start_proxied(root.path(), name, |zk| {
                spec(zk, &namespace, "10").env("ochopod_damper", "3")
            })
        })
        .collect();
    let all = refs(&pods);
    wait_until(WAIT, "three pods configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&all);
    let hash = admin.hash_stat(&cluster).unwrap();
    let rounds = rounds_started(&all);
    let leader = leader_index(&all);

    // Each cut is far shorter than the session timeout: the leader's session resumes.
    for _ in 0..3 {
        let resumed = pods[leader]
            .pod
            .log_text()
            .matches("session resumed")
            .count();
        pods[leader].proxy.set(Fault::Cut);
        wait_until(WAIT, "the leader disconnected", || {
            pods[leader]
                .pod
                .info()
                .is_some_and(|info| field(&info, "session") == "disconnected")
        });
        pods[leader].proxy.set(Fault::None);
        wait_until(WAIT, "the leader's session resumed", || {
            pods[leader]
                .pod
                .log_text()
                .matches("session resumed")
                .count()
                > resumed
        });
    }
    wait_formed(&all);

    assert_eq!(leader_index(&all), leader, "the leader keeps the lead");
    assert_eq!(admin.hash_stat(&cluster).unwrap().version, hash.version);
    assert_eq!(rounds_started(&all), rounds, "no configuration round");
    assert!(all.iter().all(|pod| starts(pod).len() == 1));
}

#[test]
fn follower_flapping_within_damper_causes_no_round() {
    let namespace = unique_namespace("flapfollower");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&shared_server().connect_string());
    let steady = |zk: &str| spec(zk, &namespace, "10").env("ochopod_damper", "3");
    let mut pods: Vec<ProxiedPod> = ["a", "b"]
        .iter()
        .map(|name| start_proxied(root.path(), name, steady))
        .collect();
    wait_formed(&refs(&pods));
    // The flapping pod joins last, so it is a follower, with a short session timeout so that
    // each flap expires its session.
    pods.push(start_proxied(root.path(), "c", |zk| {
        spec(zk, &namespace, "1").env("ochopod_damper", "3")
    }));
    let all = refs(&pods);
    wait_until(WAIT, "three pods configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&all);
    let hash = admin.hash_stat(&cluster).unwrap();
    let rounds = rounds_started(&all);
    let leader = leader_index(&all);
    let child = child_of(&admin, &cluster, &pods[2].pod);
    let reverted = pods[leader]
        .pod
        .log_text()
        .matches("change reverted within the damper")
        .count();

    for _ in 0..2 {
        pods[2].proxy.set(Fault::Blackhole);
        wait_until(
            WAIT,
            "the server expiring the flapping pod's session",
            || !admin.registrations(&cluster).contains_key(&child),
        );
        pods[2].proxy.set(Fault::None);
        wait_until(WAIT, "the flapping pod registered again", || {
            admin.registrations(&cluster).contains_key(&child)
        });
    }
    wait_until(WAIT, "the leader cancelling both pending rounds", || {
        pods[leader]
            .pod
            .log_text()
            .matches("change reverted within the damper")
            .count()
            >= reverted + 2
    });
    wait_formed(&all);

    assert_eq!(admin.hash_stat(&cluster).unwrap().version, hash.version);
    assert_eq!(rounds_started(&all), rounds, "no configuration round");
    assert!(all.iter().all(|pod| starts(pod).len() == 1));
}

#[test]
fn frozen_leader_steps_down_on_resume() {
    let server = shared_server();
    let namespace = unique_namespace("frozen");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let pod_spec = || spec(&server.connect_string(), &namespace, "2").env("ochopod_damper", "2");
    let mut pods: Vec<PodProcess> = ["a", "b", "c"]
        .iter()
        .map(|name| PodProcess::start(root.path(), name, &pod_spec()))
        .collect();
    let all: Vec<&PodProcess> = pods.iter().collect();
    wait_until(WAIT, "three pods configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&all);
    let old = leader_index(&all);
    let old_epoch = epoch(&pods[old]);
    let old_key = key_of(&child_of(&admin, &cluster, &pods[old]));

    // A newcomer leaves a round pending on the leader when it freezes, so the leader has a
    // reason to send requests the moment it runs again.
    pods.push(PodProcess::start(root.path(), "d", &pod_spec()));
    wait_until(WAIT, "a round pending on the leader", || {
        pods[old]
            .info()
            .is_some_and(|info| field(&info, "state") == "leader (configuration pending)")
    });
    let sampler = LeaderSampler::start(pods.iter().map(|pod| pod.control_port).collect());
    pods[old].signal(Signal::SIGSTOP);
    let obeyed_before = obeyed(&pods[old]).len();

    let new = wait_until(
        WAIT,
        "a new leader configuring the cluster without the frozen one",
        || {
            let keys = admin.snapshot_keys(&cluster);
            if keys.len() != 3 || keys.contains(&old_key) {
                return None;
            }
            (0..pods.len()).find(|index| {
                *index != old
                    && pods[*index]
                        .info()
                        .is_some_and(|info| field(&info, "state") == "leader")
            })
        },
    );
    let new_epoch = epoch(&pods[new]);
    assert!(new_epoch > old_epoch);

    pods[old].signal(Signal::SIGCONT);
    let resumed = Instant::now();
    wait_until(
        WAIT,
        "the resumed pod configured back in as a follower",
        || admin.snapshot_keys(&cluster).contains(&old_key),
    );
    eprintln!("configured back in {:?} after SIGCONT", resumed.elapsed());
    let all: Vec<&PodProcess> = pods.iter().collect();
    wait_formed(&all);
    let samples = sampler.finish();
    assert_single_leader(&samples);

    let late: Vec<(String, i64)> = obeyed(&pods[old])
        .into_iter()
        .skip(obeyed_before)
        .filter(|(_, epoch)| *epoch == old_epoch)
        .collect();
    assert!(
        late.is_empty(),
        "no request with the old epoch is obeyed after the freeze: {late:?}"
    );
    assert_eq!(
        epoch(&pods[old]),
        new_epoch,
        "the resumed pod obeys the new leader"
    );
    assert_eq!(field(&pods[old].info().unwrap(), "state"), "follower");
}
