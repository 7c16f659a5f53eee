//! ZooKeeper-side faults, end to end: real `ochopod` processes against real ZooKeeper servers
//! that go away for longer than the session timeout, lose an ensemble member, lose their data,
//! or hold znodes this agent did not write.
//!
//! Each test records the cluster facts once it has formed: sub-process starts, seqs, the
//! version of the `hash` znode and the configuration rounds in the logs. It compares them after
//! the fault, so a sub-process restart or a needless configuration round fails the test.

mod faults_common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Instant;

use faults_common::{
    child_of, starts, wait_formed, Admin, ForeignPod, LogsOnPanic, RECORDER, WAIT,
};
use nix::sys::signal::Signal;
use serde_json::json;
use support::pods::{field, is_leader, leader_index, PodProcess, PodSpec};
use support::{four_letter, shared_server, unique_namespace, wait_until, ZkEnsemble, ZkServer};

/// Facts of a formed cluster that no fault may change unless a round is expected.
struct Baseline {
    starts: Vec<usize>,
    seqs: Vec<i64>,
    rounds: usize,
}

impl Baseline {
    fn take(pods: &[&PodProcess]) -> Baseline {
        Baseline {
            starts: pods.iter().map(|pod| starts(pod).len()).collect(),
            seqs: pods.iter().map(|pod| seq(pod)).collect(),
            rounds: rounds_started(pods),
        }
    }

    /// Asserts that no sub-process was restarted and every pod kept its seq.
    fn assert_pods_untouched(&self, pods: &[&PodProcess]) {
        for (index, pod) in pods.iter().enumerate() {
            let lines = starts(pod);
            assert_eq!(
                lines.len(),
                self.starts[index],
                "pod {index}: no sub-process restart: {lines:?}"
            );
            let info = pod.info().unwrap();
            assert_eq!(info["restarts"].as_u64(), Some(0), "pod {index}: restarts");
            assert_eq!(seq(pod), self.seqs[index], "pod {index} keeps its seq");
        }
    }
}

fn seq(pod: &PodProcess) -> i64 {
    pod.info().unwrap()["seq"].as_i64().unwrap()
}

/// Counts the configuration rounds started by any of `pods`, from their logs.
fn rounds_started(pods: &[&PodProcess]) -> usize {
    pods.iter()
        .map(|pod| {
            pod.log_text()
                .matches("configuration round starting")
                .count()
        })
        .sum()
}

fn spec(zk: &str, namespace: &str, session_timeout: &str) -> PodSpec {
    PodSpec::new(zk, namespace, "web")
        .env("ochopod_session_timeout", session_timeout)
        .shell(RECORDER)
}

/// Starts pods named `names` and waits until they formed one cluster with every pod in the
/// snapshot and no round pending.
fn start_cluster(
    root: &std::path::Path,
    admin: &Admin,
    cluster: &str,
    spec: impl Fn() -> PodSpec,
    names: &[&str],
) -> Vec<PodProcess> {
    let pods: Vec<PodProcess> = names
        .iter()
        .map(|name| PodProcess::start(root, name, &spec()))
        .collect();
    let refs: Vec<&PodProcess> = pods.iter().collect();
    wait_until(WAIT, "every pod in the snapshot", || {
        admin.snapshot_keys(cluster).len() == pods.len()
    });
    wait_formed(&refs);
    pods
}

#[test]
fn long_outage_reregisters_without_round() {
    let server = ZkServer::start();
    let namespace = unique_namespace("outage");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let pods = start_cluster(
        root.path(),
        &admin,
        &cluster,
        || spec(&server.connect_string(), &namespace, "2"),
        &["a", "b", "c"],
    );
    let refs: Vec<&PodProcess> = pods.iter().collect();
    let baseline = Baseline::take(&refs);
    let hash = admin.hash_stat(&cluster).expect("a stored hash");
    let owners = admin.registrations(&cluster);

    // Down for longer than the session timeout: each client gives its session up (1.4 times
    // the timeout after the last reply) and the session actor starts a new client.
    server.stop();
    wait_until(WAIT, "every pod giving its session up", || {
        pods.iter()
            .all(|pod| pod.log_text().contains("registering again"))
    });
    server.restart();
    let restarted = Instant::now();

    // The server restores the old sessions from its data. The pods register on new ones and
    // replace their nodes, then wait for the old lock nodes to expire.
    wait_until(WAIT, "every registration held by a new session", || {
        let now = admin.registrations(&cluster);
        now.len() == owners.len()
            && now
                .iter()
                .all(|(child, owner)| owners.get(child).is_some_and(|old| old != owner))
    });
    wait_formed(&refs);
    eprintln!("formed again {:?} after the restart", restarted.elapsed());

    assert_eq!(
        admin.registrations(&cluster).keys().collect::<Vec<_>>(),
        owners.keys().collect::<Vec<_>>(),
        "every pod registers again under the same key and seq"
    );
    assert_eq!(
        admin.hash_stat(&cluster).unwrap().version,
        hash.version,
        "the new leader adopts the stored hash: no configuration round"
    );
    assert_eq!(
        rounds_started(&refs),
        baseline.rounds,
        "no round starts after the outage"
    );
    baseline.assert_pods_untouched(&refs);
}

/// Returns the index of the ensemble member serving the session `session_id`.
fn server_of_session(ensemble: &ZkEnsemble, session_id: i64) -> Option<usize> {
    let marker = format!("sid={:#x}", session_id as u64);
    ensemble.servers().iter().position(|server| {
        four_letter(&server.connect_string(), "cons").is_ok_and(|reply| reply.contains(&marker))
    })
}

#[test]
fn ensemble_member_loss_moves_session() {
    let ensemble = ZkEnsemble::start(3);
    let namespace = unique_namespace("member");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&ensemble.connect_string());
    let pods = start_cluster(
        root.path(),
        &admin,
        &cluster,
        || spec(&ensemble.connect_string(), &namespace, "4"),
        &["a", "b", "c"],
    );
    let refs: Vec<&PodProcess> = pods.iter().collect();
    let baseline = Baseline::take(&refs);
    let hash = admin.hash_stat(&cluster).unwrap();
    let owners = admin.registrations(&cluster);

    // Stop the member the leader is connected to: the leader's session must move.
    let leader = leader_index(&refs);
    let leader_child = child_of(&admin, &cluster, &pods[leader]);
    let session = owners[&leader_child];
    let member = wait_until(WAIT, "the member serving the leader's session", || {
        server_of_session(&ensemble, session)
    });
    let resumed_before: Vec<usize> = pods
        .iter()
        .map(|pod| pod.log_text().matches("session resumed").count())
        .collect();
    ensemble.server(member).stop();
    let stopped = Instant::now();

    wait_until(
        WAIT,
        "the leader's session resumed on another member",
        || pods[leader].log_text().matches("session resumed").count() > resumed_before[leader],
    );
    eprintln!(
        "session resumed {:?} after its member stopped",
        stopped.elapsed()
    );
    let moved = wait_until(WAIT, "the leader's session on a running member", || {
        server_of_session(&ensemble, session)
    });
    assert_ne!(moved, member);
    wait_formed(&refs);

    assert_eq!(
        admin.registrations(&cluster),
        owners,
        "every registration stays on its session"
    );
    assert_eq!(admin.hash_stat(&cluster).unwrap().version, hash.version);
    assert_eq!(
        rounds_started(&refs),
        baseline.rounds,
        "no configuration round"
    );
    assert!(
        refs.iter()
            .all(|pod| !pod.log_text().contains("registering again")),
        "no session is lost"
    );
    assert_eq!(leader_index(&refs), leader, "the leader keeps the lead");
    baseline.assert_pods_untouched(&refs);
}

#[test]
fn wiped_server_rebuilds_sessions_and_cluster() {
    let server = ZkServer::start();
    let namespace = unique_namespace("wipe");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let mut pods = start_cluster(
        root.path(),
        &admin,
        &cluster,
        || spec(&server.connect_string(), &namespace, "4"),
        &["a", "b", "c"],
    );

    // A leader change first, so that the pods obey an epoch above the first lock node's.
    let refs: Vec<&PodProcess> = pods.iter().collect();
    let leader = leader_index(&refs);
    let first_epoch = pods[leader].info().unwrap()["epoch"].as_i64().unwrap();
    let mut old = pods.remove(leader);
    old.signal(Signal::SIGTERM);
    old.wait_exit(WAIT);
    pods.push(PodProcess::start(
        root.path(),
        "d",
        &spec(&server.connect_string(), &namespace, "4"),
    ));
    let refs: Vec<&PodProcess> = pods.iter().collect();
    wait_until(WAIT, "a round over the three pods left", || {
        let registered: BTreeSet<String> = admin
            .registrations(&cluster)
            .keys()
            .map(|child| child.rsplit_once('.').unwrap().0.to_string())
            .collect();
        registered.len() == 3 && admin.snapshot_keys(&cluster) == registered
    });
    wait_formed(&refs);
    let epochs: BTreeSet<i64> = refs
        .iter()
        .map(|pod| pod.info().unwrap()["epoch"].as_i64().unwrap())
        .collect();
    assert_eq!(
        epochs.len(),
        1,
        "every pod obeyed the same leader: {epochs:?}"
    );
    assert!(
        epochs.iter().all(|epoch| *epoch > first_epoch),
        "every pod obeyed the second leader: {epochs:?}, the first was {first_epoch}"
    );
    let baseline = Baseline::take(&refs);
    let before: Vec<String> = admin.registrations(&cluster).into_keys().collect();

    // Wipe the data and restart within the session timeout, so the server has no record of
    // the sessions the clients come back with.
    server.stop();
    fs::remove_dir_all(server.data_dir().join("version-2")).unwrap();
    server.restart();
    let restarted = Instant::now();

    wait_until(WAIT, "every pod registered again", || {
        admin.registrations(&cluster).len() == 3
    });
    eprintln!(
        "registered again {:?} after the restart",
        restarted.elapsed()
    );
    wait_until(WAIT, "a round over the re-formed cluster", || {
        admin.snapshot_keys(&cluster).len() == 3 && admin.hash_stat(&cluster).is_some()
    });
    eprintln!(
        "configured again {:?} after the restart",
        restarted.elapsed()
    );
    wait_formed(&refs);

    for pod in &refs {
        let log = pod.log_text();
        assert!(
            log.contains("registering again"),
            "the client is rebuilt after the server rejected its session"
        );
        assert_eq!(field(&pod.info().unwrap(), "session"), "connected");
    }
    let after: Vec<String> = admin.registrations(&cluster).into_keys().collect();
    assert_eq!(after, before, "every pod keeps its key and seq");
    // Nothing changed for the pods: their sub-processes keep running.
    baseline.assert_pods_untouched(&refs);

    // Pods started after the wipe get seqs no other pod holds.
    pods.push(PodProcess::start(
        root.path(),
        "e",
        &spec(&server.connect_string(), &namespace, "4"),
    ));
    pods.push(PodProcess::start(
        root.path(),
        "f",
        &spec(&server.connect_string(), &namespace, "4"),
    ));
    let refs: Vec<&PodProcess> = pods.iter().collect();
    wait_until(WAIT, "the newcomers in the snapshot", || {
        admin.snapshot_keys(&cluster).len() == 5
    });
    wait_formed(&refs);
    let oldest = refs[..3].iter().map(|pod| seq(pod)).max().unwrap();
    for newcomer in &refs[3..] {
        assert!(
            seq(newcomer) > oldest,
            "newcomers get seqs above the older pods'"
        );
    }
    let mut seqs: Vec<i64> = refs.iter().map(|pod| seq(pod)).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 5, "seqs stay unique after the wipe: {seqs:?}");
}

/// Writes the pods of another cluster into `pods/`: a node whose data is not JSON, a node whose
/// name is not `<key>.<seq>`, and a valid registration of another agent with extra keys.
#[test]
fn foreign_and_malformed_registrations() {
    let server = shared_server();
    let namespace = unique_namespace("foreign");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let pods_path = format!("/ochopod/clusters/{cluster}/pods");

    admin.write(&format!("{pods_path}/garbage"), b"\x00\xffnot json");
    admin.write(&format!("{pods_path}/0badc0de.0000000900"), b"{\"ip\": ");
    let foreign = ForeignPod::start();
    let registration = json!({
        "application": "legacy", "task": "t-1", "node": "local", "seq": 901,
        "zk": server.connect_string(), "binding": "local", "namespace": namespace,
        "cluster": "web", "port": "8080", "ip": "127.0.0.1", "public": "127.0.0.1",
        "ports": {"8080": foreign.port}, "debug": false, "local": true, "status": "",
        "version": "python-1.0", "fwk": "marathon-ec2", "labels": {"team": "ops"},
    });
    admin.write(
        &format!("{pods_path}/f0e1d2c3.0000000901"),
        registration.to_string().as_bytes(),
    );

    let pods: Vec<PodProcess> = ["a", "b"]
        .iter()
        .map(|name| {
            PodProcess::start(
                root.path(),
                name,
                &spec(&server.connect_string(), &namespace, "10"),
            )
        })
        .collect();
    let refs: Vec<&PodProcess> = pods.iter().collect();
    wait_until(WAIT, "the two pods and the foreign one configured", || {
        admin.snapshot_keys(&cluster).len() == 3
    });
    wait_formed(&refs);

    let (data, _) = admin
        .read(&format!("/ochopod/clusters/{cluster}/snapshot"))
        .unwrap();
    let snapshot: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&data).unwrap();
    let kept = &snapshot["f0e1d2c3"];
    assert_eq!(kept["fwk"], "marathon-ec2", "unknown keys are kept");
    assert_eq!(kept["labels"]["team"], "ops");
    assert_eq!(kept["seq"], 901);
    assert!(
        !snapshot.contains_key("0badc0de"),
        "invalid data is skipped"
    );
    let paths = foreign.paths();
    for verb in ["check", "on", "ok"] {
        assert!(
            paths
                .iter()
                .any(|path| path.starts_with(&format!("/control/{verb}"))),
            "the foreign pod got `{verb}`: {paths:?}"
        );
    }

    let leader = leader_index(&refs);
    let log = pods[leader].log_text();
    assert!(log.contains("skipping pods/0badc0de.0000000900"), "{log}");
    let seqs: BTreeSet<i64> = refs.iter().map(|pod| seq(pod)).collect();
    assert_eq!(seqs.len(), 2, "every real pod has its own seq: {seqs:?}");
    assert!(!seqs.contains(&900), "{seqs:?}");
    assert!(!seqs.contains(&901), "{seqs:?}");
    for pod in &refs {
        assert_eq!(starts(pod).len(), 1, "every real pod configured once");
    }
}

#[test]
fn invalid_dependency_snapshot_ignored() {
    let server = shared_server();
    let namespace = unique_namespace("badsnap");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let dependency = format!("/ochopod/clusters/{namespace}.db/snapshot");
    admin.write(&dependency, b"<html>not a snapshot</html>");

    let pods = start_cluster(
        root.path(),
        &admin,
        &cluster,
        || spec(&server.connect_string(), &namespace, "10").env("ochopod_depends_on", "db"),
        &["a", "b"],
    );
    let refs: Vec<&PodProcess> = pods.iter().collect();
    let leader = leader_index(&refs);
    assert!(
        pods[leader]
            .log_text()
            .contains("snapshot is not valid JSON"),
        "the leader warns about the snapshot"
    );
    let hash = admin.hash_stat(&cluster).unwrap();

    // Repairing the dependency's snapshot reconfigures the cluster with it.
    let db = json!({"d1": {"ip": "127.0.0.1", "port": "8080", "seq": 1,
        "namespace": namespace, "cluster": "db", "ports": {"5432": 31432}}});
    admin.write(&dependency, db.to_string().as_bytes());
    wait_until(WAIT, "a round with the repaired dependency", || {
        admin
            .hash_stat(&cluster)
            .is_some_and(|stat| stat.version > hash.version)
    });
    wait_formed(&refs);
    for pod in &refs {
        let lines = starts(pod);
        assert_eq!(
            lines.len(),
            2,
            "the changed dependency restarts the sub-process: {lines:?}"
        );
    }
}

#[test]
fn deleted_hash_rewritten_by_next_leader() {
    let server = shared_server();
    let namespace = unique_namespace("nohash");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(root.path().to_path_buf());
    let admin = Admin::new(&server.connect_string());
    let pods = start_cluster(
        root.path(),
        &admin,
        &cluster,
        || spec(&server.connect_string(), &namespace, "2"),
        &["a", "b", "c"],
    );
    let refs: Vec<&PodProcess> = pods.iter().collect();
    let baseline = Baseline::take(&refs);
    let hash_path = format!("/ochopod/clusters/{cluster}/hash");
    let (hash, _) = admin.read(&hash_path).unwrap();

    admin.delete(&hash_path);

    // A new leader finds no hash: it runs a round, which leaves every sub-process alone and
    // writes the same hash again.
    let leader = leader_index(&refs);
    let (status, _) = support::pods::http(pods[leader].control_port, "POST", "/reset", "").unwrap();
    assert_eq!(status, 200);
    wait_until(WAIT, "another pod leading", || {
        refs.iter()
            .enumerate()
            .any(|(index, pod)| index != leader && pod.info().is_some_and(|info| is_leader(&info)))
    });
    // The same pods give the same hash.
    wait_until(WAIT, "the hash written again", || {
        admin
            .try_read(&hash_path)
            .flatten()
            .is_some_and(|(data, _)| data == hash)
    });
    wait_formed(&refs);
    assert!(
        refs.iter().any(|pod| pod
            .log_text()
            .contains("the stored hash is missing beside a snapshot")),
        "the new leader warns about the missing hash"
    );
    baseline.assert_pods_untouched(&refs);
}
