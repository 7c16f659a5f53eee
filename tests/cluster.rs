//! End to end: real `ochopod` processes forming clusters on a real ZooKeeper server, with
//! shell sub-processes that record what they saw.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::pods::{field, http, leader_index, wait_formed, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until, ZkServer};
use zookeeper_client as zk;

const WAIT: Duration = Duration::from_secs(30);

/// Sub-process that appends `<index> <size> <seq> <pid>` to `starts` in its directory at each
/// start.
const RECORDER: &str =
    r#"echo "$OCHOPOD_INDEX $OCHOPOD_SIZE $OCHOPOD_SEQ $$" >> starts; exec sleep 600"#;

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Reads a znode's data, or `None` when it does not exist.
fn read_node(connect: &str, path: &str) -> Option<(Vec<u8>, zk::Stat)> {
    block_on(async {
        let client = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(connect)
            .await
            .unwrap();
        match client.get_data(path).await {
            Ok(found) => Some(found),
            Err(zk::Error::NoNode) => None,
            Err(err) => panic!("cannot read {path}: {err}"),
        }
    })
}

fn list_children(connect: &str, path: &str) -> Vec<String> {
    block_on(async {
        let client = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(connect)
            .await
            .unwrap();
        client.list_children(path).await.unwrap_or_default()
    })
}

/// Returns the lines of the `starts` file of a pod.
fn starts(pod: &PodProcess) -> Vec<String> {
    fs::read_to_string(pod.dir.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn start_pods(root: &Path, spec: impl Fn() -> PodSpec, names: &[&str]) -> Vec<PodProcess> {
    names
        .iter()
        .map(|name| PodProcess::start(root, name, &spec()))
        .collect()
}

fn snapshot_keys(connect: &str, cluster: &str) -> BTreeSet<String> {
    let Some((data, _)) = read_node(connect, &format!("/ochopod/clusters/{cluster}/snapshot"))
    else {
        return BTreeSet::new();
    };
    let snapshot: serde_json::Map<String, Value> = serde_json::from_slice(&data).unwrap();
    snapshot.keys().cloned().collect()
}

#[test]
fn three_pods_form_cluster() {
    let server = shared_server();
    let namespace = unique_namespace("form");
    let root = tempfile::tempdir().unwrap();
    // The damper gathers the three registrations into one round, so each sub-process starts
    // once, with the whole cluster, even when the pods start seconds apart on a busy machine.
    let spec = || {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_damper", "3")
            .shell(RECORDER)
    };
    let pods = start_pods(root.path(), spec, &["a", "b", "c"]);

    wait_formed(&pods, WAIT);
    wait_until(WAIT, "snapshot with three pods", || {
        snapshot_keys(&server.connect_string(), &format!("{namespace}.web")).len() == 3
    });

    let infos: Vec<Value> = pods.iter().map(|pod| pod.info().unwrap()).collect();
    let seqs: BTreeSet<String> = infos.iter().map(|info| field(info, "seq")).collect();
    assert_eq!(seqs.len(), 3, "every pod has its own seq: {seqs:?}");

    let mut indexes = Vec::new();
    for (pod, info) in pods.iter().zip(&infos) {
        let lines = starts(pod);
        assert_eq!(lines.len(), 1, "sub-process started once: {lines:?}");
        let fields: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!(fields[1], "3", "OCHOPOD_SIZE");
        assert_eq!(fields[2], field(info, "seq"), "OCHOPOD_SEQ matches /info");
        indexes.push(fields[0].parse::<usize>().unwrap());
    }
    indexes.sort();
    assert_eq!(indexes, vec![0, 1, 2]);

    let hash = read_node(
        &server.connect_string(),
        &format!("/ochopod/clusters/{namespace}.web/hash"),
    );
    assert!(
        hash.is_some_and(|(data, _)| data.len() == 64),
        "a sha-256 hash is stored"
    );
}

fn join_fourth(strict: bool) {
    let server = shared_server();
    let namespace = unique_namespace(if strict { "strict" } else { "lenient" });
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = || {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_strict", if strict { "true" } else { "false" })
            .env("ochopod_damper", "3")
            .shell(RECORDER)
    };
    let mut pods = start_pods(root.path(), spec, &["a", "b", "c"]);
    wait_formed(&pods, WAIT);
    wait_until(WAIT, "snapshot with three pods", || {
        snapshot_keys(&server.connect_string(), &cluster).len() == 3
    });

    pods.push(PodProcess::start(root.path(), "d", &spec()));
    wait_until(WAIT, "snapshot with four pods", || {
        snapshot_keys(&server.connect_string(), &cluster).len() == 4
    });
    wait_formed(&pods, WAIT);

    let newcomer = starts(&pods[3]);
    assert_eq!(newcomer.len(), 1);
    let fields: Vec<&str> = newcomer[0].split(' ').collect();
    assert_eq!(fields[1], "4", "{newcomer:?}");
    assert_eq!(
        fields[2],
        field(&pods[3].info().unwrap(), "seq"),
        "{newcomer:?}"
    );
    for pod in &pods[..3] {
        let lines = starts(pod);
        if strict {
            assert_eq!(
                lines.len(),
                2,
                "strict pods restart with the new cluster: {lines:?}"
            );
            assert!(lines[1].split(' ').nth(1) == Some("4"), "{lines:?}");
        } else {
            assert_eq!(
                lines.len(),
                1,
                "non-strict pods keep their sub-process: {lines:?}"
            );
        }
    }
}

#[test]
fn fourth_pod_joins_without_restarts() {
    join_fourth(false);
}

#[test]
fn fourth_pod_joins_strict_restarts_all() {
    join_fourth(true);
}

#[test]
fn leader_sigkill_hands_over() {
    let server = shared_server();
    let namespace = unique_namespace("failover");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = || {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_session_timeout", "2")
            .shell(RECORDER)
    };
    let mut pods = start_pods(root.path(), spec, &["a", "b", "c"]);
    wait_formed(&pods, WAIT);
    wait_until(WAIT, "snapshot with three pods", || {
        snapshot_keys(&server.connect_string(), &cluster).len() == 3
    });

    let leader = leader_index(&pods);
    let mut old = pods.remove(leader);
    let orphan = starts(&old)[0].split(' ').nth(3).unwrap().to_string();
    old.signal(Signal::SIGKILL);
    old.wait_exit(WAIT);
    wait_until(WAIT, "the killed agent's sub-process gone with it", || {
        !Path::new(&format!("/proc/{orphan}")).exists()
    });

    wait_until(WAIT, "snapshot with the two survivors", || {
        snapshot_keys(&server.connect_string(), &cluster).len() == 2
    });
    wait_formed(&pods, WAIT);
}

#[test]
fn sigterm_exits_zero_and_unregisters() {
    let server = shared_server();
    let namespace = unique_namespace("sigterm");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let mut pod = PodProcess::start(
        root.path(),
        "a",
        &PodSpec::new(&server.connect_string(), &namespace, "web").shell(RECORDER),
    );
    wait_formed(std::slice::from_ref(&pod), WAIT);
    assert_eq!(
        list_children(
            &server.connect_string(),
            &format!("/ochopod/clusters/{cluster}/pods")
        )
        .len(),
        1
    );

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", pod.log_text());

    // No waiting: the registration must be gone as soon as the agent exited.
    let left = list_children(
        &server.connect_string(),
        &format!("/ochopod/clusters/{cluster}/pods"),
    );
    assert!(left.is_empty(), "registration left behind: {left:?}");
}

#[test]
fn failing_subprocess_is_restarted() {
    let server = shared_server();
    let namespace = unique_namespace("crash");
    let root = tempfile::tempdir().unwrap();
    // Fails on its first run, then stays up.
    let script = r#"echo start >> starts; if [ "$(wc -l < starts)" -lt 2 ]; then exit 3; fi; exec sleep 600"#;
    let pod = PodProcess::start(
        root.path(),
        "a",
        &PodSpec::new(&server.connect_string(), &namespace, "web").shell(script),
    );

    wait_until(WAIT, "a restart after the failure", || {
        starts(&pod).len() >= 2
    });
    wait_until(WAIT, "sub-process running after its restart", || {
        pod.info().is_some_and(|info| {
            field(&info, "process") == "running" && info["restarts"].as_u64() >= Some(1)
        })
    });
}

#[test]
fn completed_subprocess_kills_pod() {
    let server = shared_server();
    let namespace = unique_namespace("done");
    let root = tempfile::tempdir().unwrap();
    let pod = PodProcess::start(
        root.path(),
        "a",
        &PodSpec::new(&server.connect_string(), &namespace, "web")
            .shell("echo done >> starts; exit 0"),
    );

    wait_until(WAIT, "pod dead after its sub-process exited 0", || {
        pod.info()
            .is_some_and(|info| field(&info, "process") == "dead")
    });
    let view = r#"{"key": "a", "pods": {"a": {}}, "dependencies": {}}"#;
    let (status, reply) = http(pod.control_port, "POST", "/control/on", view).unwrap();
    assert_eq!(status, 410);
    assert!(reply["error"].is_string());
    let (status, _) = http(pod.control_port, "GET", "/log", "").unwrap();
    assert_eq!(status, 200, "a dead pod still serves its log");
    assert_eq!(
        starts(&pod).len(),
        1,
        "a completed sub-process is not restarted"
    );
}

#[test]
fn short_zookeeper_restart_changes_nothing() {
    let server = ZkServer::start();
    let namespace = unique_namespace("blip");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = || {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_session_timeout", "10")
            .shell(RECORDER)
    };
    let pods = start_pods(root.path(), spec, &["a", "b", "c"]);
    wait_formed(&pods, WAIT);
    wait_until(WAIT, "snapshot with three pods", || {
        snapshot_keys(&server.connect_string(), &cluster).len() == 3
    });
    let (_, before) = read_node(
        &server.connect_string(),
        &format!("/ochopod/clusters/{cluster}/hash"),
    )
    .unwrap();

    server.restart();
    // The leader re-reads its watches on resumption, so by then any round would have started.
    wait_until(WAIT, "every session resumed", || {
        pods.iter()
            .all(|pod| pod.log_text().contains("session resumed"))
    });
    wait_formed(&pods, WAIT);

    let (_, after) = read_node(
        &server.connect_string(),
        &format!("/ochopod/clusters/{cluster}/hash"),
    )
    .unwrap();
    assert_eq!(
        after.version, before.version,
        "no configuration round may follow a short outage"
    );
    for pod in &pods {
        assert_eq!(starts(pod).len(), 1, "no sub-process restart");
        assert_eq!(pod.info().unwrap()["restarts"].as_u64(), Some(0));
    }
}

#[test]
fn invalid_setting_exits_two() {
    let output = std::process::Command::new(support::pods::binary())
        .args(["run", "--port", "0"])
        .env("ochopod_local", "true")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("port"),
        "the message names the setting: {message}"
    );

    let output = std::process::Command::new(support::pods::binary())
        .arg("run")
        .env("ochopod_local", "true")
        .env("ochopod_damper", "soon")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("damper") && message.contains("soon"),
        "names the setting and value: {message}"
    );
}

#[test]
fn operator_off_then_on_restarts_pods() {
    let server = shared_server();
    let zk = server.connect_string();
    let namespace = unique_namespace("operator");
    let root = tempfile::tempdir().unwrap();
    let spec = || PodSpec::new(&zk, &namespace, "web").shell(RECORDER);
    let pods = start_pods(root.path(), spec, &["a", "b"]);
    wait_formed(&pods, WAIT);
    let pattern = format!("{namespace}.web");
    let ochopod = |verb: &str| {
        std::process::Command::new(support::pods::binary())
            .args([verb, &pattern, "--zk", &zk, "--timeout", "20"])
            .output()
            .expect("run the ochopod binary")
    };

    let output = ochopod("off");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for pod in &pods {
        assert_eq!(field(&pod.info().unwrap(), "process"), "stopped");
    }

    // `on` sends each pod the view its leader would, which the pod accepts.
    let output = ochopod("on");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for pod in &pods {
        assert_eq!(field(&pod.info().unwrap(), "process"), "running");
        wait_until(WAIT, "the second start recorded", || starts(pod).len() >= 2);
        let starts = starts(pod);
        assert_eq!(starts.len(), 2, "{starts:?}");
        let fields: Vec<&str> = starts[1].split(' ').collect();
        assert_eq!(fields[1], "2", "the view has both pods: {starts:?}");
        assert_eq!(
            starts[0].split(' ').nth(2),
            fields.get(2).copied(),
            "same seq: {starts:?}"
        );
    }
}
