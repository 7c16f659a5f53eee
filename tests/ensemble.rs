//! End to end: the ZooKeeper example of `examples/zookeeper-ensemble`, run by real `ochopod`
//! pods on a real ZooKeeper server, forms a real ZooKeeper ensemble, grows it, heals it, and
//! hands its endpoints to a cluster that depends on it.
//!
//! The servers run with a 200 ms tick so that the ensemble forms in seconds. The test prints
//! how long forming and growing took, which `--nocapture` shows. The example's `measure` script
//! runs it a few times and sums the numbers up.

mod support;
mod workload;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::pods::{field, free_port, PodProcess, PodSpec};
use support::{four_letter, shared_server, unique_namespace};
use workload::{
    block_on, connect, dependency_starts, hash_version, last_endpoints, wait_for, wait_formed,
    DEPENDENCY_RECORDER, WAIT,
};
use zookeeper_client as zk;

const POD_TOML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/zookeeper-ensemble/pod.toml"
);

/// JVM flags of the test servers: the C1 compiler alone starts a JVM faster.
const JVM_FLAGS: &str = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1";

/// Lines of each pod log shown when the ensemble does not form.
const LOG_TAIL_LINES: usize = 60;

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One pod of the example and the loopback port its ZooKeeper server serves clients on.
struct Server {
    pod: PodProcess,
    client_port: u16,
}

impl Server {
    fn start(root: &Path, name: &str, namespace: &str) -> Server {
        let client_port = free_port();
        let spec = PodSpec::new(&shared_server().connect_string(), namespace, "zookeeper")
            .arg("--config")
            .arg(POD_TOML)
            .env("PORT_2181", &client_port.to_string())
            .env("PORT_2888", &free_port().to_string())
            .env("PORT_3888", &free_port().to_string())
            .env("ZK_TICK_TIME", "200")
            // 4 s to join and 2 s of lag at most, as the test servers of tests/support allow,
            // because JVMs that compete for the CPUs pause.
            .env("ZK_INIT_LIMIT", "20")
            .env("ZK_SYNC_LIMIT", "10")
            .env("ZK_JVM_FLAGS", JVM_FLAGS)
            // Pods started together are configured in one round.
            .env("ochopod_damper", "1")
            // The check period is also the time limit of one check, which runs a few processes
            // and may wait 2 s for each reply: shorter periods fail on a loaded machine.
            .env("ochopod_check_every", "5");
        Server {
            pod: PodProcess::start(root, name, &spec),
            client_port,
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Returns the `Mode:` of `srvr` (`leader`, `follower`), or `None` while the server does not
    /// serve.
    fn mode(&self) -> Option<String> {
        let reply = four_letter(&self.address(), "srvr").ok()?;
        reply
            .lines()
            .find_map(|line| line.strip_prefix("Mode: "))
            .map(|mode| mode.trim().to_string())
    }

    /// Returns the pid of the ZooKeeper server from `/info`.
    fn server_pid(&self) -> Option<u32> {
        self.pod.info()?["pid"].as_u64().map(|pid| pid as u32)
    }
}

/// Returns the modes of all servers, or `None` unless exactly one leads and the others follow.
fn ensemble_modes(servers: &[&Server]) -> Option<Vec<String>> {
    let modes: Vec<String> = servers
        .iter()
        .map(|server| server.mode().unwrap_or_else(|| "down".to_string()))
        .collect();
    let leaders = modes.iter().filter(|mode| *mode == "leader").count();
    let followers = modes.iter().filter(|mode| *mode == "follower").count();
    (leaders == 1 && followers == servers.len() - 1).then_some(modes)
}

/// Waits until exactly one server leads and the others follow; on timeout, panics with each
/// server's mode and the end of its pod's log.
fn wait_ensemble(servers: &[&Server], what: &str) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(modes) = ensemble_modes(servers) {
            return modes;
        }
        if Instant::now() >= deadline {
            let mut report = String::new();
            for server in servers {
                let log = server.pod.log_text();
                // The test's own `srvr` polls would fill the tail.
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|line| !line.contains("NIOServerCnxn - Processing"))
                    .collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                report.push_str(&format!(
                    "\n--- {} (mode {:?}), end of {}:\n{tail}\n",
                    server.address(),
                    server.mode(),
                    server.pod.log.display()
                ));
            }
            panic!("timed out after {WAIT:?} waiting for {what}{report}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Checks that the last start of the client's sub-process got the client endpoints of
/// `servers`, and returns what it got otherwise.
fn expect_endpoints(
    client: &PodProcess,
    servers: &[&Server],
) -> Result<(), Option<BTreeSet<String>>> {
    let expected: BTreeSet<String> = servers.iter().map(|server| server.address()).collect();
    match last_endpoints(client, "OCHOPOD_DEP_ZOOKEEPER_2181") {
        Some(endpoints) if endpoints == expected => Ok(()),
        other => Err(other),
    }
}

/// Creates `path` with `data` through one server. A request that fails on the way (the server
/// is catching up after a restart) is sent again until `WAIT` has passed.
fn write_through(server: &Server, path: &str, data: &[u8]) {
    block_on(async {
        let deadline = Instant::now() + WAIT;
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let mut retried = false;
        loop {
            let client = connect(&server.address()).await;
            match client.create(path, data, &options).await {
                Ok(_) => return,
                // The lost reply of an earlier attempt may hide its success.
                Err(zk::Error::NodeExists) if retried => return,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("cannot create {path} on {} yet: {err}", server.address());
                    retried = true;
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Err(err) => panic!("cannot create {path} on {}: {err}", server.address()),
            }
        }
    });
}

/// Reads `path` through one server, after a `sync` so that the server caught up with the leader.
/// A read that fails on the way is tried again until `WAIT` has passed.
fn read_through(server: &Server, path: &str) -> Vec<u8> {
    block_on(async {
        let deadline = Instant::now() + WAIT;
        loop {
            let client = connect(&server.address()).await;
            let read = async {
                client.sync(path).await?;
                client.get_data(path).await
            };
            match read.await {
                Ok((data, _)) => return data,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("cannot read {path} on {} yet: {err}", server.address());
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Err(err) => panic!("cannot read {path} on {}: {err}", server.address()),
            }
        }
    })
}

/// Fails the test at once, with the fix, when the hooks' JSON tool is missing: the pods would
/// only report it in their logs.
fn require_jq() {
    let found = std::process::Command::new("jq")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "the example's hooks need jq in PATH: install Debian's jq package"
    );
}

#[test]
fn example_ensemble_forms_grows_and_heals() {
    require_jq();
    let namespace = unique_namespace("ensemble");
    let coordinator = shared_server().connect_string();
    let root = tempfile::tempdir().unwrap();

    // A cluster that depends on the ensemble, started first: it is configured again each time
    // the ensemble's membership changes.
    let client_spec = PodSpec::new(&coordinator, &namespace, "client")
        .env("ochopod_depends_on", "zookeeper")
        .shell(DEPENDENCY_RECORDER);
    let client = PodProcess::start(root.path(), "client", &client_spec);

    // Three pods form a three-server ensemble.
    let a = Server::start(root.path(), "a", &namespace);
    let b = Server::start(root.path(), "b", &namespace);
    let third_started = Instant::now();
    let c = Server::start(root.path(), "c", &namespace);
    let three = [&a, &b, &c];
    // Progress, which `--nocapture` shows: where the time of a slow run went.
    let phase = |name: &str| {
        println!(
            "phase: {name}, {} ms after the third pod started",
            third_started.elapsed().as_millis()
        )
    };
    wait_ensemble(&three, "one leader and two followers");
    let formed_in = third_started.elapsed();
    println!("timing: form3_ms={}", formed_in.as_millis());

    let path = format!("/{namespace}");
    write_through(&a, &path, b"written through a");
    assert_eq!(read_through(&b, &path), b"written through a");
    assert_eq!(read_through(&c, &path), b"written through a");

    phase("three servers written and read");
    wait_for("three endpoints in the client sub-process", || {
        expect_endpoints(&client, &three)
    });

    phase("three endpoints in the client");
    // The sanity check publishes each server's mode as metrics.
    wait_for("the servers' modes in their sanity metrics", || {
        let metrics: Vec<serde_json::Value> = three
            .iter()
            .map(|server| {
                server
                    .pod
                    .info()
                    .map(|info| info["metrics"].clone())
                    .unwrap_or_default()
            })
            .collect();
        let metric_modes: Vec<String> = metrics
            .iter()
            .map(|metrics| field(metrics, "mode"))
            .collect();
        match ensemble_modes(&three) {
            Some(modes) if modes == metric_modes => Ok(()),
            modes => Err((metrics, modes)),
        }
    });

    phase("sanity metrics");
    // Two more pods: every server restarts with five members.
    let grown_from = Instant::now();
    let d = Server::start(root.path(), "d", &namespace);
    let e = Server::start(root.path(), "e", &namespace);
    let five = [&a, &b, &c, &d, &e];
    wait_ensemble(&five, "one leader and four followers");
    let grown_in = grown_from.elapsed();
    println!("timing: grow5_ms={}", grown_in.as_millis());
    for server in five {
        let config = std::fs::read_to_string(server.pod.dir.join("zookeeper/zoo.cfg")).unwrap();
        let members = config
            .lines()
            .filter(|line| line.starts_with("server."))
            .count();
        assert_eq!(members, 5, "zoo.cfg of {}:\n{config}", server.address());
    }
    assert_eq!(read_through(&d, &path), b"written through a");
    assert_eq!(read_through(&e, &path), b"written through a");

    phase("five servers read");
    wait_for("five endpoints in the client sub-process", || {
        expect_endpoints(&client, &five)
    });
    // The client pod is not strict: it restarted only when the ensemble's membership changed.
    let client_starts = dependency_starts(&client);
    for pair in client_starts.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "a restart without a change: {client_starts:?}"
        );
    }

    // Killing the leader's server: the pod restarts it and it rejoins the ensemble, without a
    // configuration round.
    phase("five endpoints in the client");
    let hash_before = hash_version(&coordinator, &format!("{namespace}.zookeeper"));
    let leader = *five
        .iter()
        .find(|server| server.mode().as_deref() == Some("leader"))
        .expect("a leader");
    let killed = leader.server_pid().expect("the pid of the leader's server");
    kill(Pid::from_raw(killed as i32), Signal::SIGKILL).unwrap();
    wait_for("the killed server restarted", || {
        let info = leader.pod.info().unwrap_or_default();
        let restarted = info["restarts"].as_u64() >= Some(1)
            && info["pid"].as_u64().is_some_and(|pid| pid as u32 != killed);
        if restarted {
            Ok(())
        } else {
            Err((
                info["pid"].clone(),
                info["restarts"].clone(),
                info["process"].clone(),
            ))
        }
    });
    phase("killed server restarted");
    wait_ensemble(&five, "the ensemble with the restarted server");
    phase("ensemble healed");

    let healed = format!("{path}/healed");
    write_through(leader, &healed, b"after the restart");
    let other = five
        .iter()
        .find(|server| server.client_port != leader.client_port)
        .unwrap();
    assert_eq!(read_through(other, &healed), b"after the restart");
    assert_eq!(
        hash_version(&coordinator, &format!("{namespace}.zookeeper")),
        hash_before,
        "a restarted server is no change of the cluster"
    );
    assert_eq!(
        dependency_starts(&client).len(),
        client_starts.len(),
        "the client keeps its sub-process"
    );
    assert_eq!(field(&leader.pod.info().unwrap(), "process"), "running");
    wait_formed(&five.map(|server| &server.pod));
}
