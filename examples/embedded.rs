//! Many pods inside one actix `System`, through the library: how an actix application embeds a
//! pod, and how the large-cluster benchmark runs.
//!
//! Starts its own ZooKeeper server on a free loopback port (Debian's `zookeeper` package, see
//! `scripts/install-deps`), then `--pods N` pods of one cluster, each with its own key,
//! ZooKeeper session and control port. The pods implement `LifeCycle` in Rust and run no
//! sub-process (`start = false`): configuring is all they do. Prints the time from the first
//! pod's start to every pod configured, the rounds the leader ran, and the process's memory.
//!
//! With `--leader binary`, the leader is a real `ochopod run` process started first (so it wins
//! the election), and the other N - 1 pods run embedded, so the leader's own memory and
//! ZooKeeper traffic are measured separately. The example then adds one more pod and counts the
//! packets ZooKeeper received on the leader's connection for that change (from the server's
//! `cons` command).
//!
//! ```sh
//! cargo run --release --example embedded -- --pods 100
//! cargo build --release --bin ochopod --example embedded
//! target/release/examples/embedded --pods 1000 --leader binary
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use ochopod::cluster::Cluster;
use ochopod::pod::Pod;
use ochopod::settings::Settings;
use ochopod::steps::{LifeCycle, Model, StepError, SubCommand};
use ochopod::telemetry::{Role, Telemetry};
use support::pods::{free_port, PodProcess, PodSpec};
use support::ZkServer;

/// Maximum wait for the cluster to form, and for the leader binary to lead.
const WAIT: Duration = Duration::from_secs(300);

const NAMESPACE: &str = "bench";
const CLUSTER: &str = "embedded";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LeaderKind {
    /// Every pod, leader included, runs in this process.
    Embedded,
    /// The leader is an `ochopod run` process of the same build profile.
    Binary,
}

#[derive(Parser)]
#[command(about = "Forms one cluster of many pods inside one process and measures it")]
struct Args {
    /// Pods in the cluster, the leader included.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=5000))]
    pods: u32,

    /// Process the leader runs in.
    #[arg(long, value_enum, default_value_t = LeaderKind::Embedded)]
    leader: LeaderKind,

    /// Idle time in seconds before the process memory is read again. The control servers
    /// close idle connections after 5 s.
    #[arg(long, default_value_t = 0)]
    settle: u64,
}

/// Counts the pods configured for the cluster size the benchmark waits for.
struct Counting {
    expected: Arc<AtomicUsize>,
    configured: Arc<AtomicUsize>,
}

#[async_trait]
impl LifeCycle for Counting {
    async fn configure(&self, cluster: &Cluster) -> Result<SubCommand, StepError> {
        if cluster.size() == self.expected.load(Ordering::Relaxed) {
            self.configured.fetch_add(1, Ordering::Relaxed);
        }
        Ok(SubCommand::default())
    }
}

struct Quiet;

impl Model for Quiet {}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Returns the local port of `pid`'s TCP connection to `remote_port` on loopback, read from
/// its file descriptors and `/proc/net/tcp`.
fn connection_port(pid: u32, remote_port: u16) -> Option<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|entry| {
            let target = fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_string_lossy();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        let remote = u16::from_str_radix(remote.split(':').nth(1)?, 16).ok()?;
        (remote == remote_port && inodes.iter().any(|known| known == inode))
            .then(|| u16::from_str_radix(local.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

/// Returns the packets ZooKeeper received on the connection from local port `port`.
fn packets_from(server: &ZkServer, port: u16) -> Option<u64> {
    let connections = server.four_letter("cons").ok()?;
    let marker = format!(":{port}[");
    connections.lines().find_map(|line| {
        if !line.contains(&marker) {
            return None;
        }
        let (_, after) = line.split_once("recved=")?;
        after.split(',').next()?.parse().ok()
    })
}

fn settings(server: &ZkServer) -> Settings {
    Settings {
        binding: "local".to_string(),
        zk: server.connect_string(),
        namespace: NAMESPACE.to_string(),
        cluster: CLUSTER.to_string(),
        start: false,
        ports: BTreeMap::from([("8080".to_string(), free_port())]),
        ..Settings::default()
    }
}

fn fail(message: String) -> ! {
    eprintln!("embedded: {message}");
    std::process::exit(1);
}

/// Polls `done` every 5 ms until it holds, or exits after [`WAIT`].
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            fail(format!(
                "gave up waiting for {what} after {} s",
                WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    let args = Args::parse();
    let pods = args.pods as usize;
    let server = ZkServer::start();
    println!("ZooKeeper on {}", server.connect_string());

    let logs = tempfile::Builder::new()
        .prefix("ochopod-embedded-")
        .tempdir()
        .unwrap_or_else(|error| fail(format!("cannot create a log directory: {error}")));
    let leader = (args.leader == LeaderKind::Binary).then(|| {
        let spec = PodSpec::new(&server.connect_string(), NAMESPACE, CLUSTER)
            .env("RUST_LOG", "info")
            .env("ochopod_damper", "0")
            .shell("exec sleep 3600");
        PodProcess::start(logs.path(), "leader", &spec)
    });
    let embedded = if leader.is_some() { pods - 1 } else { pods };

    let expected = Arc::new(AtomicUsize::new(pods));
    let configured = Arc::new(AtomicUsize::new(0));
    let system = actix::System::new();
    system.block_on(async {
        if let Some(leader) = &leader {
            wait_for("the leader binary to lead", || {
                leader
                    .info()
                    .and_then(|info| info["state"].as_str().map(|state| state == "leader"))
                    .unwrap_or(false)
            })
            .await;
        }

        let started = Instant::now();
        let mut running = Vec::with_capacity(embedded + 1);
        let mut telemetries = Vec::with_capacity(embedded + 1);
        for _ in 0..embedded {
            let steps = Arc::new(Counting {
                expected: expected.clone(),
                configured: configured.clone(),
            });
            let telemetry = Arc::new(Telemetry::default());
            telemetries.push(telemetry.clone());
            match Pod::start(settings(&server), steps, Arc::new(Quiet), telemetry, None).await {
                Ok(pod) => running.push(pod),
                Err(err) => fail(format!("pod {} failed to start: {err}", running.len())),
            }
        }
        let all_started = started.elapsed();

        wait_for("every pod to be configured", || {
            configured.load(Ordering::Relaxed) >= embedded
        })
        .await;
        let converged = started.elapsed();
        let rss = status_kib(std::process::id(), "VmRSS");
        let peak = status_kib(std::process::id(), "VmHWM");

        println!("pods                      {pods} ({embedded} embedded)");
        println!("all pods started in       {} ms", all_started.as_millis());
        println!(
            "all pods configured in    {} ms (from the first embedded start)",
            converged.as_millis()
        );
        if leader.is_none() {
            // The pods count themselves configured at `on`; the round ends after `ok` and the
            // snapshot write, when the leader is back to plain `leader`.
            let count = |counter: fn(&Telemetry) -> &std::sync::atomic::AtomicU64| -> u64 {
                telemetries
                    .iter()
                    .map(|telemetry| counter(telemetry).load(Ordering::Relaxed))
                    .sum()
            };
            wait_for("the leader to end its round", || {
                count(|telemetry| &telemetry.rounds) > 0
                    && telemetries
                        .iter()
                        .any(|telemetry| telemetry.facts().role == Role::Leader)
            })
            .await;
            println!(
                "configuration rounds      {} done, {} failed",
                count(|telemetry| &telemetry.rounds),
                count(|telemetry| &telemetry.failed_rounds)
            );
        }
        println!(
            "process memory (RSS)      {} (peak {})",
            mib(rss),
            mib(peak)
        );
        println!(
            "threads                   {}",
            fs::read_dir("/proc/self/task").map_or(0, |tasks| tasks.count())
        );

        if args.settle > 0 {
            tokio::time::sleep(Duration::from_secs(args.settle)).await;
            println!(
                "process memory after {} s  {}",
                args.settle,
                mib(status_kib(std::process::id(), "VmRSS"))
            );
            // Tells memory the pods hold from memory that glibc's allocator keeps after it was
            // freed: `malloc_trim` hands the free pages back to the kernel.
            // SAFETY: `malloc_trim` only walks the allocator's own free lists.
            unsafe { libc::malloc_trim(0) };
            println!(
                "process memory, trimmed    {}",
                mib(status_kib(std::process::id(), "VmRSS"))
            );
        }

        if let Some(leader) = &leader {
            let pid = leader.pid() as u32;
            println!(
                "leader memory (RSS)       {} (peak {})",
                mib(status_kib(pid, "VmRSS")),
                mib(status_kib(pid, "VmHWM"))
            );

            // One more pod: the packets the leader sends ZooKeeper for that change.
            let port = connection_port(pid, server.port())
                .unwrap_or_else(|| fail("cannot find the leader's ZooKeeper connection".into()));
            let before = packets_from(&server, port)
                .unwrap_or_else(|| fail("`cons` does not list the leader's connection".into()));
            configured.store(0, Ordering::Relaxed);
            expected.store(pods + 1, Ordering::Relaxed);
            let joined = Instant::now();
            let steps = Arc::new(Counting {
                expected: expected.clone(),
                configured: configured.clone(),
            });
            match Pod::start(
                settings(&server),
                steps,
                Arc::new(Quiet),
                Arc::new(Telemetry::default()),
                None,
            )
            .await
            {
                Ok(pod) => running.push(pod),
                Err(err) => fail(format!("the extra pod failed to start: {err}")),
            }
            wait_for("every pod to be configured with the extra pod", || {
                configured.load(Ordering::Relaxed) > embedded
            })
            .await;
            let scaled = joined.elapsed();
            // Let the leader write the snapshot and hash after the last `ok`.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = packets_from(&server, port).unwrap_or(before);
            println!(
                "one more pod: configured  {} ms (every pod, {} pods)",
                scaled.as_millis(),
                pods + 1
            );
            println!(
                "one more pod: leader's ZooKeeper packets {} (requests and pings in {} ms)",
                after.saturating_sub(before),
                joined.elapsed().as_millis()
            );
            println!(
                "leader memory after       {} (peak {})",
                mib(status_kib(pid, "VmRSS")),
                mib(status_kib(pid, "VmHWM"))
            );
        }

        // No graceful stop: each pod leaving would make the leader configure the shrinking
        // cluster again. The sessions end with the process, and ZooKeeper with its drop.
        drop(running);
    });
    drop(leader);
}
