//! Helpers shared by the workload tests (`ensemble`, `dependencies`): ZooKeeper reads, the
//! files that test sub-processes append to at each start, and waiting for clusters to settle.
//!
//! A test file includes them with `mod support; mod workload;`. Each binary uses a subset.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use zookeeper_client as zk;

use crate::support::pods::{self, PodProcess};

/// Time a cluster may take to form, reconfigure or heal.
pub const WAIT: Duration = Duration::from_secs(60);

/// How long an observed state must stay the same to count as settled. Watches and rounds take
/// milliseconds on an idle machine; the margin covers a loaded one.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Sub-process that appends one line per start to `deps` in its directory: the
/// `OCHOPOD_DEP_*` variables it got, sorted and separated by spaces, then sleeps.
pub const DEPENDENCY_RECORDER: &str =
    r#"printf '%s\n' "$(env | grep '^OCHOPOD_DEP_' | sort | tr '\n' ' ')" >> deps; exec sleep 600"#;

pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Connects a client to `connect` ("host:port,...") with a 10 s session timeout, trying again
/// until `WAIT` has passed: a server that has just joined an ensemble may not create sessions
/// yet.
pub async fn connect(connect: &str) -> zk::Client {
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(connect)
            .await;
        match attempt {
            Ok(client) => return client,
            Err(err) if Instant::now() < deadline => {
                eprintln!("cannot connect to ZooKeeper at {connect} yet: {err}; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("cannot connect to ZooKeeper at {connect} within {WAIT:?}: {err}"),
        }
    }
}

/// Reads a znode's data, or `None` when it does not exist.
pub fn read_node(server: &str, path: &str) -> Option<(Vec<u8>, zk::Stat)> {
    block_on(async {
        let client = connect(server).await;
        match client.get_data(path).await {
            Ok(found) => Some(found),
            Err(zk::Error::NoNode) => None,
            Err(err) => panic!("cannot read {path}: {err}"),
        }
    })
}

/// Returns the version of the cluster's `hash` znode, which changes with every configuration
/// round. `None` before the first round.
pub fn hash_version(server: &str, cluster: &str) -> Option<i32> {
    read_node(server, &format!("/ochopod/clusters/{cluster}/hash")).map(|(_, stat)| stat.version)
}

/// Returns the configuration rounds the pod completed as leader, from its `/metrics`, or
/// `None` while its control server does not reply.
pub fn rounds(pod: &PodProcess) -> Option<u64> {
    let text = get_text(pod.control_port, "/metrics").ok()?;
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix("ochopod_configuration_rounds_total "))?;
    value.trim().parse::<f64>().ok().map(|rounds| rounds as u64)
}

/// Sends `GET path` to `127.0.0.1:port` and returns the body as text.
fn get_text(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("GET {path}: {reply}")));
    }
    Ok(reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// Returns the keys of the pods in the cluster's `snapshot`, empty when there is none.
pub fn snapshot_keys(server: &str, cluster: &str) -> BTreeSet<String> {
    let Some((data, _)) = read_node(server, &format!("/ochopod/clusters/{cluster}/snapshot"))
    else {
        return BTreeSet::new();
    };
    let snapshot: serde_json::Map<String, Value> = serde_json::from_slice(&data).unwrap();
    snapshot.keys().cloned().collect()
}

/// Returns the lines of a file in the pod's directory, empty when it does not exist yet.
pub fn lines(pod: &PodProcess, name: &str) -> Vec<String> {
    fs::read_to_string(pod.dir.join(name))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Returns the `OCHOPOD_DEP_*` variables of each start of a `DEPENDENCY_RECORDER`
/// sub-process, in start order.
pub fn dependency_starts(pod: &PodProcess) -> Vec<BTreeMap<String, String>> {
    lines(pod, "deps")
        .iter()
        .map(|line| {
            line.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        })
        .collect()
}

/// Returns the endpoints of one `OCHOPOD_DEP_*` variable at the last start, sorted.
pub fn last_endpoints(pod: &PodProcess, variable: &str) -> Option<BTreeSet<String>> {
    let starts = dependency_starts(pod);
    let value = starts.last()?.get(variable)?.clone();
    Some(value.split(',').map(str::to_string).collect())
}

/// Waits until every pod runs its sub-process and exactly one pod leads with no round pending.
pub fn wait_formed(pods: &[&PodProcess]) {
    pods::wait_formed(pods, WAIT);
}

/// Waits until `probe` returns `Ok` and returns its value, polling every 100 ms for up to
/// `WAIT`. On timeout the panic message shows the last `Err`: the state that did not match.
pub fn wait_for<T, E: Debug>(what: &str, mut probe: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match probe() {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last state: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `probe` returns the same value for `SETTLE` in a row, and returns that value.
pub fn wait_settled<T: PartialEq + Debug>(what: &str, mut probe: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + WAIT;
    let mut value = probe();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let next = probe();
        if next != value {
            value = next;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not settle within {WAIT:?}; last value {value:?}"
        );
    }
}

/// Writes `contents` to `name` in `directory` and returns its path.
pub fn write_file(directory: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = directory.join(name);
    fs::write(&path, contents).unwrap();
    path
}
