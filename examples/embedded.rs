//! Many pods inside one actix `System`, through the library: how an actix application embeds a
//! pod, and how the large-cluster benchmark runs.
//!
//! Starts its own ZooKeeper server on a free loopback port (Debian's `zookeeper` package, see
//! `scripts/install-deps`), then `--pods N` pods of one cluster, each with its own key,
//! ZooKeeper session and control port. The pods implement `LifeCycle` in Rust and run no
//! sub-process (`start = false`): configuring is all they do. Prints the time from the first
//! pod's start to every pod configured, the leader's round time, and the process's memory.
//!
//! ```sh
//! cargo run --release --example embedded -- --pods 100
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ochopod::cluster::Cluster;
use ochopod::pod::Pod;
use ochopod::settings::Settings;
use ochopod::steps::{LifeCycle, Model, StepError, SubCommand};
use ochopod::telemetry::Telemetry;
use support::pods::free_port;
use support::ZkServer;

/// Counts the pods configured for the cluster size the benchmark waits for.
struct Counting {
    expected: usize,
    configured: Arc<AtomicUsize>,
}

#[async_trait]
impl LifeCycle for Counting {
    async fn configure(&self, cluster: &Cluster) -> Result<SubCommand, StepError> {
        if cluster.size() == self.expected {
            self.configured.fetch_add(1, Ordering::Relaxed);
        }
        Ok(SubCommand::default())
    }
}

struct Quiet;

impl Model for Quiet {}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

fn parse_pods() -> usize {
    let arguments: Vec<String> = std::env::args().collect();
    match arguments.iter().position(|argument| argument == "--pods") {
        Some(index) => match arguments
            .get(index + 1)
            .and_then(|value| value.parse().ok())
        {
            Some(pods) if pods > 0 => pods,
            _ => {
                eprintln!("embedded: --pods takes a positive number");
                std::process::exit(2);
            }
        },
        None => 10,
    }
}

fn main() {
    let pods = parse_pods();
    let server = ZkServer::start();
    println!("ZooKeeper on {}", server.connect_string());

    let configured = Arc::new(AtomicUsize::new(0));
    let system = actix::System::new();
    system.block_on(async {
        let started = Instant::now();
        let mut running = Vec::with_capacity(pods);
        for _ in 0..pods {
            let settings = Settings {
                binding: "local".to_string(),
                zk: server.connect_string(),
                namespace: "bench".to_string(),
                cluster: "embedded".to_string(),
                start: false,
                ports: BTreeMap::from([("8080".to_string(), free_port())]),
                ..Settings::default()
            };
            let steps = Arc::new(Counting {
                expected: pods,
                configured: configured.clone(),
            });
            let telemetry = Arc::new(Telemetry::default());
            match Pod::start(settings, steps, Arc::new(Quiet), telemetry, None).await {
                Ok(pod) => running.push(pod),
                Err(err) => {
                    eprintln!("embedded: pod {} failed to start: {err}", running.len());
                    std::process::exit(1);
                }
            }
        }
        let all_started = started.elapsed();

        let deadline = Instant::now() + Duration::from_secs(300);
        while configured.load(Ordering::Relaxed) < pods {
            if Instant::now() > deadline {
                eprintln!(
                    "embedded: only {} of {pods} pods configured after 300 s",
                    configured.load(Ordering::Relaxed)
                );
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let converged = started.elapsed();

        println!("pods                      {pods}");
        println!("all pods started in       {} ms", all_started.as_millis());
        println!(
            "all pods configured in    {} ms (from the first start)",
            converged.as_millis()
        );
        println!("resident memory           {} MiB", resident_kib() / 1024);
        println!("threads                   {}", thread_count());

        for pod in &running {
            pod.stop().await;
        }
    });
}
