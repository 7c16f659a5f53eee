//! Helpers shared by the fault suites `faults_zookeeper` and `faults_partition`. They provide
//! a blocking ZooKeeper admin client that survives outages, and `/info` polling with short
//! timeouts so that a frozen pod cannot stall a test. They also read the cluster facts the
//! tests compare before and after a fault.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use zookeeper_client as zk;

use crate::support::pods::{self, PodProcess};
use crate::support::wait_until;

/// Deadline of every wait for the cluster to settle.
pub const WAIT: Duration = Duration::from_secs(30);

/// Sub-process that appends `<index> <size> <seq> <pid>` to `starts` in its directory at each
/// start, then sleeps.
pub const RECORDER: &str =
    r#"echo "$OCHOPOD_INDEX $OCHOPOD_SIZE $OCHOPOD_SEQ $$" >> starts; exec sleep 600"#;

/// A blocking ZooKeeper client for test assertions. It builds a new session when the current
/// one is lost (outage, wiped server), so a poll simply gets `None` until ZooKeeper is back.
pub struct Admin {
    connect: String,
    /// Runtime driven by a thread of its own, so that the client keeps its session alive
    /// between two requests.
    runtime: tokio::runtime::Handle,
    client: Mutex<Option<zk::Client>>,
    /// Dropping it ends the runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Admin {
    pub fn new(connect: &str) -> Admin {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            let _ = runtime.block_on(stopped);
        });
        Admin {
            connect: connect.to_string(),
            runtime: handle_rx.recv().unwrap(),
            client: Mutex::new(None),
            _stop: stop,
        }
    }

    /// Runs `future` on the admin runtime and waits for its output.
    fn block_on<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (output_tx, output_rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = output_tx.send(future.await);
        });
        output_rx.recv().expect("the admin runtime runs")
    }

    /// Runs `request` on a connected client; `None` when ZooKeeper cannot be reached now.
    fn run<T, F, Fut>(&self, request: F) -> Option<Result<T, zk::Error>>
    where
        T: Send + 'static,
        F: FnOnce(zk::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, zk::Error>> + Send + 'static,
    {
        let mut slot = self.client.lock().unwrap();
        if slot
            .as_ref()
            .is_some_and(|client| client.state().is_terminated())
        {
            *slot = None;
        }
        if slot.is_none() {
            let connect = self.connect.clone();
            let attempt = self.block_on(async move {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    zk::Client::connector()
                        .with_session_timeout(Duration::from_secs(10))
                        .connect(&connect),
                )
                .await
            });
            match attempt {
                Ok(Ok(client)) => *slot = Some(client),
                _ => return None,
            }
        }
        let client = slot.clone().unwrap();
        drop(slot);
        let request = request(client);
        let outcome = self
            .block_on(async move { tokio::time::timeout(Duration::from_secs(3), request).await });
        match outcome {
            // A server that lost its data refuses the old session until the client gives up
            // (1.4 times the session timeout): a new client is quicker.
            Ok(Err(zk::Error::ConnectionLoss))
            | Ok(Err(zk::Error::SessionExpired))
            | Ok(Err(zk::Error::ClientClosed))
            | Err(_) => {
                *self.client.lock().unwrap() = None;
                None
            }
            Ok(result) => Some(result),
        }
    }

    /// Reads a znode: `Some(None)` when it does not exist, `None` when ZooKeeper is unreachable.
    pub fn try_read(&self, path: &str) -> Option<Option<(Vec<u8>, zk::Stat)>> {
        let owned = path.to_string();
        match self.run(|client| async move { client.get_data(&owned).await })? {
            Ok(found) => Some(Some(found)),
            Err(zk::Error::NoNode) => Some(None),
            Err(err) => panic!("cannot read {path}: {err}"),
        }
    }

    /// Reads a znode, waiting while ZooKeeper is unreachable.
    pub fn read(&self, path: &str) -> Option<(Vec<u8>, zk::Stat)> {
        wait_until(WAIT, &format!("ZooKeeper to read {path}"), || {
            self.try_read(path)
        })
    }

    /// Lists the children of a znode with the stat of each; empty when it does not exist.
    pub fn children(&self, path: &str) -> BTreeMap<String, zk::Stat> {
        wait_until(WAIT, &format!("ZooKeeper to list {path}"), || {
            let parent = path.to_string();
            let listed = self.run(|client| async move {
                let children = match client.list_children(&parent).await {
                    Ok(children) => children,
                    Err(zk::Error::NoNode) => return Ok(BTreeMap::new()),
                    Err(err) => return Err(err),
                };
                let mut stats = BTreeMap::new();
                for child in children {
                    if let Some(stat) = client.check_stat(&format!("{parent}/{child}")).await? {
                        stats.insert(child, stat);
                    }
                }
                Ok(stats)
            })?;
            Some(listed.unwrap_or_else(|err| panic!("cannot list {path}: {err}")))
        })
    }

    /// Writes a persistent znode, creating it and its parents when missing.
    pub fn write(&self, path: &str, data: &[u8]) {
        wait_until(WAIT, &format!("ZooKeeper to write {path}"), || {
            let (owned, data) = (path.to_string(), data.to_vec());
            self.run(|client| async move {
                let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                match client.set_data(&owned, &data, None).await {
                    Ok(_) => return Ok(()),
                    Err(zk::Error::NoNode) => {}
                    Err(err) => return Err(err),
                }
                let (parent, _) = owned.rsplit_once('/').unwrap();
                client.mkdir(parent, &options).await?;
                client.create(&owned, &data, &options).await.map(|_| ())
            })
            .map(|result| result.unwrap_or_else(|err| panic!("cannot write {path}: {err}")))
        })
    }

    /// Deletes a znode; a missing one is fine.
    pub fn delete(&self, path: &str) {
        wait_until(WAIT, &format!("ZooKeeper to delete {path}"), || {
            let owned = path.to_string();
            self.run(|client| async move {
                match client.delete(&owned, None).await {
                    Ok(()) | Err(zk::Error::NoNode) => Ok(()),
                    Err(err) => Err(err),
                }
            })
            .map(|result| result.unwrap_or_else(|err| panic!("cannot delete {path}: {err}")))
        })
    }

    /// Returns the keys of the cluster's `snapshot`, empty when it is missing or unreachable.
    pub fn snapshot_keys(&self, cluster: &str) -> BTreeSet<String> {
        let Some(Some((data, _))) = self.try_read(&format!("/ochopod/clusters/{cluster}/snapshot"))
        else {
            return BTreeSet::new();
        };
        let snapshot: serde_json::Map<String, Value> = serde_json::from_slice(&data).unwrap();
        snapshot.keys().cloned().collect()
    }

    /// Returns the stat of the cluster's `hash` znode, `None` when it is missing.
    pub fn hash_stat(&self, cluster: &str) -> Option<zk::Stat> {
        self.read(&format!("/ochopod/clusters/{cluster}/hash"))
            .map(|(_, stat)| stat)
    }

    /// Returns the `pods/` children of the cluster with the session that owns each.
    pub fn registrations(&self, cluster: &str) -> BTreeMap<String, i64> {
        self.children(&format!("/ochopod/clusters/{cluster}/pods"))
            .into_iter()
            .map(|(child, stat)| (child, stat.ephemeral_owner))
            .collect()
    }
}

/// Returns the lines of the `starts` file of a pod.
pub fn starts(pod: &PodProcess) -> Vec<String> {
    fs::read_to_string(pod.dir.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Returns `/info` of the pod listening on `port`, or `None` when it does not reply within
/// `timeout` (a stopped process accepts the connection but never replies).
pub fn info_within(port: u16, timeout: Duration) -> Option<Value> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream
        .write_all(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    let (_, body) = text.split_once("\r\n\r\n")?;
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    serde_json::from_str(&body[start..=end]).ok()
}

/// Waits until every pod runs its sub-process and exactly one pod leads with no round pending.
pub fn wait_formed(pods: &[&PodProcess]) {
    pods::wait_formed(pods, WAIT);
}

/// Returns the `pods/` child name of a pod, `<key>.<seq>`, found by the seq in its `/info`.
pub fn child_of(admin: &Admin, cluster: &str, pod: &PodProcess) -> String {
    let seq: i64 = pod.info().unwrap()["seq"].as_i64().unwrap();
    let suffix = format!(".{seq:010}");
    admin
        .registrations(cluster)
        .into_keys()
        .find(|child| child.ends_with(&suffix))
        .unwrap_or_else(|| panic!("no registration with seq {seq} in {cluster}"))
}

/// Returns the lines of the pod's log that record an obeyed control request, as
/// (verb, epoch) pairs in log order.
pub fn obeyed(pod: &PodProcess) -> Vec<(String, i64)> {
    pod.log_text()
        .lines()
        .filter_map(|line| {
            let rest = line.split_once("control `")?.1;
            let (verb, rest) = rest.split_once("` started (epoch ")?;
            let epoch = rest.split_once(')')?.0.parse().ok()?;
            Some((verb.to_string(), epoch))
        })
        .collect()
}

/// A stand-in for a pod of another agent: an HTTP server on 127.0.0.1 that replies to every
/// request with 200 and `{}`, and records the request paths it received.
pub struct ForeignPod {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl ForeignPod {
    pub fn start() -> ForeignPod {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else {
                    continue;
                };
                let seen = seen.clone();
                thread::spawn(move || serve_foreign(&mut stream, &seen));
            }
        });
        ForeignPod { port, requests }
    }

    /// Returns the request paths received so far.
    pub fn paths(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one request (headers and `Content-Length` body), records its path, replies 200.
fn serve_foreign(stream: &mut TcpStream, seen: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        let Ok(count) = stream.read(&mut buffer) else {
            return;
        };
        if count == 0 {
            return;
        }
        received.extend_from_slice(&buffer[..count]);
        if let Some(end) = find(&received, b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while received.len() < head_end + length {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
        }
    }
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    seen.lock().unwrap().push(path);
    let _ = stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Prints the tail of every `*.log` file in a directory when the test panics, so a failure
/// shows what the pods did. Declare it after the directory and before the pods.
pub struct LogsOnPanic(pub std::path::PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|extension| extension == "log") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!("--- last lines of {}:\n{}", path.display(), tail.join("\n"));
            }
        }
    }
}
