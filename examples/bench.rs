//! Benchmark of the `ochopod` binary against a real ZooKeeper server on 127.0.0.1: how fast
//! clusters form, grow and hand leadership over, and what an idle agent costs.
//!
//! Run it with `scripts/bench [--runs N]`, which builds the release binary first, or with
//! `cargo build --release --bin ochopod && cargo run --release --example bench -- --runs N`.
//! It starts its own ZooKeeper server (the jars that `scripts/install-deps` installs) and
//! real `ochopod run` processes with the local binding, repeats every scenario `--runs`
//! times, and prints min, median and max of each figure.
//!
//! Timing sources, all wall-clock (`CLOCK_REALTIME`) so that they compare across processes:
//! - a pod's spawn: taken by the bench just before `fork`/`exec`;
//! - a sub-process start: the sub-process appends `date +%s%N` to a file first thing, so the
//!   figure includes the start of `/bin/sh` and `date` (about 1 to 2 ms);
//! - ZooKeeper changes (registrations, snapshot writes): the arrival of the event of a
//!   persistent recursive watch that the bench sets on the cluster's znode before acting,
//!   taken by the bench's ZooKeeper client thread.
//!
//! Pod logs go to a temporary directory that is removed at the end, unless `--keep-logs` is
//! given or a scenario fails.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use nix::sys::signal::Signal;
use serde_json::Value;
use support::pods::{binary, http, PodProcess, PodSpec};
use support::{unique_namespace, ZkServer};
use zookeeper_client as zk;

/// Maximum time for any awaited state (a cluster formed, a round done, an agent exited).
const WAIT: Duration = Duration::from_secs(30);

/// Interval between two reads of the sub-process start files. The figures come from the
/// timestamps inside the files, so the interval only delays the bench, not the result. A
/// shorter interval would take CPU time from the agents, which share the machine.
const FILE_POLL: Duration = Duration::from_millis(5);

/// Interval between two `/info` requests while waiting for a cluster to form (untimed).
const INFO_POLL: Duration = Duration::from_millis(25);

/// Interval between two `/info` requests to a leader whose end of round is timed.
const LEADER_POLL: Duration = Duration::from_millis(2);

/// Sub-process of every pod: records its start time in ns since the epoch and its pid
/// (`exec` keeps the pid), then idles.
const RECORDER: &str = r#"echo "$(date +%s%N) $$" >> starts; exec sleep 600"#;

/// Cluster name of every pod. Each scenario run gets its own namespace.
const CLUSTER: &str = "bench";

/// Session timeout in s of the pods whose leader is killed with SIGKILL.
const KILL_SESSION_TIMEOUT_S: u64 = 2;

/// Idle time before the RSS is read, and window over which the idle CPU time is measured.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(10);

/// Log line of the leader at the end of a configuration round.
const ROUND_DONE: &str = "configuration round done over ";

#[derive(Parser)]
#[command(
    about = "Measures cluster formation, scale-up, leader handover, idle footprint and \
                   start-up of the ochopod binary against a local ZooKeeper server"
)]
struct Args {
    /// Number of runs of every scenario.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,

    /// Number of untimed 3-pod clusters formed first, so that the ZooKeeper JVM has compiled
    /// its hot paths before the first measured run.
    #[arg(long, default_value_t = 2)]
    warmup: u32,

    /// RUST_LOG of the agents. With `debug`, the pod logs show where a round spends its time.
    #[arg(long, default_value = "info")]
    log_level: String,

    /// Keeps the pod logs and prints the directory that contains them.
    #[arg(long)]
    keep_logs: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(message) = run(&args) {
        eprintln!("bench: {message}");
        std::process::exit(1);
    }
}

/// Starts ZooKeeper, runs the warm-up and every scenario `args.runs` times, and prints the
/// table, also after a failed scenario.
fn run(args: &Args) -> Result<(), String> {
    let binary = Path::new(binary());
    if !binary.is_file() {
        return Err(format!(
            "{} not found; build it first with `cargo build --release --bin ochopod`, \
             or run scripts/bench",
            binary.display()
        ));
    }

    let logs = tempfile::Builder::new()
        .prefix("ochopod-bench-")
        .tempdir()
        .map_err(|error| format!("failed to create a log directory: {error}"))?;
    eprintln!(
        "bench: binary {} ({})",
        binary.display(),
        describe_binary(binary)
    );
    eprintln!("bench: starting ZooKeeper");
    let server = ZkServer::try_start()?;
    let probe = Probe::connect(&server.connect_string())?;

    let mut bench = Bench {
        zk_connect: server.connect_string(),
        probe,
        logs: logs.path().to_path_buf(),
        log_level: args.log_level.clone(),
        keep_logs: args.keep_logs,
        results: Results::default(),
    };
    let started = Instant::now();
    let outcome = bench
        .warm_up(args.warmup)
        .and_then(|()| (1..=args.runs).try_for_each(|run| bench.run_all(run, args.runs)));
    print_table(&bench.results, args.runs);
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());

    if let Err(message) = outcome {
        let kept = logs.keep();
        return Err(format!(
            "{message}\npod logs are kept in {}",
            kept.display()
        ));
    }
    if args.keep_logs {
        println!("pod logs: {}", logs.keep().display());
    }
    Ok(())
}

/// Describes the age of the binary, and warns when a source file is newer: cargo does not
/// rebuild the crate's binary for an example.
fn describe_binary(binary: &Path) -> String {
    let Ok(built) = fs::metadata(binary).and_then(|metadata| metadata.modified()) else {
        return "age unknown".to_string();
    };
    let age = built.elapsed().unwrap_or_default().as_secs();
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    match newest_modification(&sources) {
        Some(newest) if newest > built => format!(
            "built {age} s ago, OLDER than {}: it may be stale, \
             run `cargo build --release --bin ochopod` or scripts/bench",
            sources.display()
        ),
        _ => format!("built {age} s ago"),
    }
}

/// Returns the latest modification time of the files under `dir`.
fn newest_modification(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        let modified = if metadata.is_dir() {
            newest_modification(&entry.path())
        } else {
            metadata.modified().ok()
        };
        newest = newest.max(modified);
    }
    newest
}

/// Shared state of all scenarios.
struct Bench {
    zk_connect: String,
    probe: Probe,
    logs: PathBuf,
    log_level: String,
    /// Whether to save each pod's `/log` (timestamps in ms, unlike stderr) before stopping it.
    keep_logs: bool,
    results: Results,
}

impl Bench {
    /// Forms and stops `count` 3-pod clusters, and drops their figures.
    fn warm_up(&mut self, count: u32) -> Result<(), String> {
        for round in 1..=count {
            eprintln!("bench: warm-up {round} of {count}");
            let (namespace, cluster, dir) = self.scenario(0, &format!("warmup{round}"))?;
            let spec = self.spec(&namespace);
            let pods: Vec<PodProcess> = (0..3)
                .map(|index| PodProcess::start(&dir, &format!("pod{index}"), &spec))
                .collect();
            let outcome = wait_formed(&pods).and_then(|()| self.wait_snapshot_len(&cluster, 3));
            self.finish(pods, outcome)?;
        }
        Ok(())
    }

    fn run_all(&mut self, run: u32, runs: u32) -> Result<(), String> {
        eprintln!("bench: run {run} of {runs}");
        self.converge(run, 3)?;
        self.converge(run, 10)?;
        self.scale_up(run)?;
        self.handover(run, Signal::SIGTERM)?;
        self.handover(run, Signal::SIGKILL)?;
        self.register(run)
    }

    fn spec(&self, namespace: &str) -> PodSpec {
        PodSpec::new(&self.zk_connect, namespace, CLUSTER)
            .env("RUST_LOG", &self.log_level)
            .env("ochopod_damper", "0")
            .shell(RECORDER)
    }

    /// Returns a fresh namespace, its fully qualified cluster and a log directory.
    fn scenario(&self, run: u32, name: &str) -> Result<(String, String, PathBuf), String> {
        let namespace = unique_namespace(name);
        let cluster = format!("{namespace}.{CLUSTER}");
        let dir = self.logs.join(format!("run{run}-{name}"));
        fs::create_dir_all(&dir)
            .map_err(|error| format!("failed to create {}: {error}", dir.display()))?;
        Ok((namespace, cluster, dir))
    }

    /// Spawns `size` pods back to back and measures from the last spawn until every
    /// sub-process started. The 3-pod cluster then stays idle for the footprint figures.
    fn converge(&mut self, run: u32, size: usize) -> Result<(), String> {
        let name = format!("converge{size}");
        let (namespace, cluster, dir) = self.scenario(run, &name)?;
        let spec = self.spec(&namespace);
        let pods: Vec<PodProcess> = (0..size)
            .map(|index| PodProcess::start(&dir, &format!("pod{index}"), &spec))
            .collect();

        let outcome = (|| {
            let last_spawn = pods.last().expect("at least one pod").spawned_at;
            let starts = wait_subprocess_starts(&pods, FILE_POLL)?;
            let all_running = starts.into_iter().max().expect("at least one pod");
            let prefix = format!("{size} pods");
            let target = if size <= 3 { "<= 100" } else { "<= 300" };
            self.results.add_static(
                format!("{prefix}: last spawn -> all sub-processes started"),
                target,
                "ms",
                millis_between(last_spawn, all_running),
            );

            self.wait_snapshot_len(&cluster, size)?;
            // The leader logs the round after writing the snapshot.
            wait_formed(&pods)?;
            let rounds = poll("the leader to log its round", FILE_POLL, || {
                let rounds = round_durations(&pods);
                (!rounds.is_empty()).then_some(rounds)
            })?;
            self.results.add_static(
                format!("{prefix}: configuration rounds until formed"),
                "-",
                "rounds",
                rounds.len() as f64,
            );
            self.results.add_static(
                format!("{prefix}: last round (leader log)"),
                "-",
                "ms",
                rounds[rounds.len() - 1],
            );

            for pod in &pods {
                let spent = CpuTime::read(pod.pid())?;
                self.results.add_static(
                    format!("{prefix}: CPU time per agent from spawn to formed"),
                    "-",
                    "ms",
                    spent.scheduled_ns as f64 / 1e6,
                );
            }

            if size == 3 {
                self.measure_idle(&pods)?;
            }
            Ok(())
        })();
        self.finish(pods, outcome)
    }

    /// Reads the RSS of every agent after the cluster idled for a while, then the CPU time
    /// the agents use over a window.
    fn measure_idle(&mut self, pods: &[PodProcess]) -> Result<(), String> {
        thread::sleep(IDLE_SETTLE);
        for pod in pods {
            let rss_kib = status_number(pod.pid(), "VmRSS")?;
            self.results.add(
                "idle RSS per agent",
                "<= 8.0",
                "MiB",
                rss_kib as f64 / 1024.0,
            );
            // The split shows whether the binary's pages or the heap and stacks dominate.
            let anonymous_kib = status_number(pod.pid(), "RssAnon")?;
            self.results.add(
                "idle RSS per agent: anonymous (heap, stacks)",
                "-",
                "MiB",
                anonymous_kib as f64 / 1024.0,
            );
            let file_kib = status_number(pod.pid(), "RssFile")?;
            self.results.add(
                "idle RSS per agent: file-backed (binary, libraries)",
                "-",
                "MiB",
                file_kib as f64 / 1024.0,
            );
            let threads = status_number(pod.pid(), "Threads")?;
            self.results
                .add("threads per agent", "-", "threads", threads as f64);
        }

        let before: Vec<CpuTime> = pods
            .iter()
            .map(|pod| CpuTime::read(pod.pid()))
            .collect::<Result<_, _>>()?;
        let packets_before = self.agent_packets()?;
        let window_start = Instant::now();
        thread::sleep(IDLE_CPU_WINDOW);
        let window = window_start.elapsed().as_secs_f64();
        let packets_after = self.agent_packets()?;
        self.results.add(
            "idle 3-pod cluster: packets received by ZooKeeper",
            "<= 1",
            "per s",
            packets_after.saturating_sub(packets_before) as f64 / window,
        );
        for (pod, before) in pods.iter().zip(before) {
            let after = CpuTime::read(pod.pid())?;
            let scheduled = (after.scheduled_ns - before.scheduled_ns) as f64 / 1e9;
            let ticks = (after.ticks - before.ticks) as f64 / clock_ticks_per_second();
            self.results.add(
                "idle CPU per agent (schedstat, ns resolution)",
                "<= 0.1",
                "%",
                100.0 * scheduled / window,
            );
            self.results.add(
                "idle CPU per agent (utime+stime, tick resolution)",
                "<= 0.1",
                "%",
                100.0 * ticks / window,
            );
            self.results.add(
                "idle wake-ups per agent (all threads)",
                "-",
                "per s",
                (after.timeslices - before.timeslices) as f64 / window,
            );
        }
        Ok(())
    }

    /// Returns the packets ZooKeeper received on every client connection but the bench's own,
    /// from the `cons` command: at that moment, the connections of the idle 3-pod cluster.
    fn agent_packets(&self) -> Result<u64, String> {
        let own = format!("sid={}", self.probe.client.session_id());
        let connections = support::zk::four_letter(&self.zk_connect, "cons")
            .map_err(|error| format!("ZooKeeper did not answer `cons`: {error}"))?;
        Ok(connections
            .lines()
            .filter(|line| line.contains("sid=0x") && !line.contains(&format!("{own},")))
            .filter_map(|line| {
                let (_, after) = line.split_once("recved=")?;
                after.split(',').next()?.parse::<u64>().ok()
            })
            .sum())
    }

    /// Forms a 3-pod cluster, spawns a 4th pod and measures until it runs its sub-process
    /// and until the leader wrote the 4-pod snapshot (the end of the round).
    fn scale_up(&mut self, run: u32) -> Result<(), String> {
        let (namespace, cluster, dir) = self.scenario(run, "scaleup")?;
        let spec = self.spec(&namespace);
        let mut pods: Vec<PodProcess> = (0..3)
            .map(|index| PodProcess::start(&dir, &format!("pod{index}"), &spec))
            .collect();

        let outcome = (|| {
            wait_formed(&pods)?;
            self.wait_snapshot_len(&cluster, 3)?;
            let leader = leader_position(&pods)?;
            let mut watch = self.probe.watch(&cluster)?;

            pods.push(PodProcess::start(&dir, "pod3", &spec));
            let spawned = pods[3].spawned_at;
            let started = wait_subprocess_starts(&pods[3..], Duration::from_millis(1))?[0];
            // The new sub-process runs inside the round, so the leader is busy by now and
            // reports `leader` again only once the round is over.
            let leader_idle = poll("the leader to finish its round", LEADER_POLL, || {
                let info = pods[leader].info()?;
                (info["state"] == "leader").then(SystemTime::now)
            })?;
            let round_done = watch.wait_snapshot_len(&cluster, 4)?;

            self.results.add(
                "scale-up 3->4: spawn -> new sub-process started",
                "<= 100",
                "ms",
                millis_between(spawned, started),
            );
            self.results.add(
                "scale-up 3->4: spawn -> 4-pod snapshot written",
                "<= 100",
                "ms",
                millis_between(spawned, round_done),
            );
            self.results.add(
                "scale-up 3->4: spawn -> leader idle again (/info)",
                "<= 100",
                "ms",
                millis_between(spawned, leader_idle),
            );
            Ok(())
        })();
        self.finish(pods, outcome)
    }

    /// Forms a 3-pod cluster, sends `signal` to the leader and measures until its
    /// registration is deleted and until the survivors wrote a 2-pod snapshot.
    fn handover(&mut self, run: u32, signal: Signal) -> Result<(), String> {
        let graceful = signal == Signal::SIGTERM;
        let name = if graceful { "sigterm" } else { "sigkill" };
        let (namespace, cluster, dir) = self.scenario(run, name)?;
        let mut spec = self.spec(&namespace);
        if !graceful {
            spec = spec.env(
                "ochopod_session_timeout",
                &KILL_SESSION_TIMEOUT_S.to_string(),
            );
        }
        let mut pods: Vec<PodProcess> = (0..3)
            .map(|index| PodProcess::start(&dir, &format!("pod{index}"), &spec))
            .collect();

        let outcome = (|| {
            wait_formed(&pods)?;
            self.wait_snapshot_len(&cluster, 3)?;
            let leader = leader_position(&pods)?;
            let mut watch = self.probe.watch(&cluster)?;

            let signaled = SystemTime::now();
            pods[leader].signal(signal);
            let unregistered = watch.wait_registration(&cluster, zk::EventType::NodeDeleted)?;
            let snapshot = watch.wait_snapshot_len(&cluster, 2)?;
            let mut old_leader = pods.remove(leader);
            old_leader.wait_exit(WAIT);
            if !graceful {
                kill_orphaned_subprocess(&old_leader);
            }

            if graceful {
                self.results.add(
                    "SIGTERM leader -> its registration deleted",
                    "-",
                    "ms",
                    millis_between(signaled, unregistered),
                );
                self.results.add(
                    "SIGTERM leader -> 2-pod snapshot written",
                    "<= 300",
                    "ms",
                    millis_between(signaled, snapshot),
                );
            } else {
                let timeout_ms = (KILL_SESSION_TIMEOUT_S * 1000) as f64;
                self.results.add(
                    "SIGKILL leader -> session expired (registration deleted)",
                    "~2000 (ZooKeeper)",
                    "ms",
                    millis_between(signaled, unregistered),
                );
                self.results.add(
                    "SIGKILL leader: session expired -> 2-pod snapshot",
                    "-",
                    "ms",
                    millis_between(unregistered, snapshot),
                );
                self.results.add(
                    "SIGKILL leader -> 2-pod snapshot, minus the 2 s session timeout",
                    "<= 300",
                    "ms",
                    millis_between(signaled, snapshot) - timeout_ms,
                );
            }
            Ok(())
        })();
        self.finish(pods, outcome)
    }

    /// Spawns one pod alone and measures until its registration exists and until its
    /// sub-process runs.
    fn register(&mut self, run: u32) -> Result<(), String> {
        let (namespace, cluster, dir) = self.scenario(run, "register")?;
        let spec = self.spec(&namespace);
        let mut watch = self.probe.watch(&cluster)?;
        let pods = vec![PodProcess::start(&dir, "pod0", &spec)];

        let outcome = (|| {
            let registered = watch.wait_registration(&cluster, zk::EventType::NodeCreated)?;
            let seq_written = watch.wait_registration(&cluster, zk::EventType::NodeDataChanged)?;
            let started = wait_subprocess_starts(&pods, FILE_POLL)?[0];
            self.results.add(
                "1 pod: spawn -> registered in ZooKeeper",
                "<= 20",
                "ms",
                millis_between(pods[0].spawned_at, registered),
            );
            self.results.add(
                "1 pod: spawn -> registration rewritten with its seq",
                "-",
                "ms",
                millis_between(pods[0].spawned_at, seq_written),
            );
            self.results.add(
                "1 pod: spawn -> sub-process started",
                "-",
                "ms",
                millis_between(pods[0].spawned_at, started),
            );
            Ok(())
        })();
        self.finish(pods, outcome)
    }

    /// Stops `pods` after saving their `/log` with `--keep-logs`, and returns `outcome`.
    fn finish(&self, pods: Vec<PodProcess>, outcome: Result<(), String>) -> Result<(), String> {
        if self.keep_logs || outcome.is_err() {
            for pod in &pods {
                save_ring_log(pod);
                let spawned = pod
                    .spawned_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let _ = fs::write(
                    pod.log.with_extension("spawned"),
                    format!("{}\n", spawned.as_nanos()),
                );
            }
        }
        stop_all(pods);
        outcome
    }

    /// Waits, untimed, until the stored snapshot of `cluster` contains `len` pods.
    fn wait_snapshot_len(&self, cluster: &str, len: usize) -> Result<(), String> {
        poll(
            &format!("the snapshot of {cluster} to contain {len} pods"),
            INFO_POLL,
            || (self.probe.snapshot_len(cluster) == Some(len)).then_some(()),
        )
    }
}

/// Sends SIGTERM to every running pod at once, then waits up to `WAIT` for each to exit.
/// Dropping a pod that still runs after that kills it.
fn stop_all(mut pods: Vec<PodProcess>) {
    for pod in &mut pods {
        if let Ok(None) = pod.child.try_wait() {
            pod.signal(Signal::SIGTERM);
        }
    }

    let deadline = Instant::now() + WAIT;
    for pod in &mut pods {
        while matches!(pod.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(FILE_POLL);
        }
    }
}

/// Writes the pod's `/log` reply, one line each, beside its stderr log as `<name>.ring.log`.
fn save_ring_log(pod: &PodProcess) {
    let Ok((200, Value::Array(lines))) = http(pod.control_port, "GET", "/log", "") else {
        return;
    };
    let text: String = lines
        .iter()
        .filter_map(Value::as_str)
        .map(|line| format!("{line}\n"))
        .collect();
    let _ = fs::write(pod.log.with_extension("ring.log"), text);
}

/// Calls `ready` every `interval` until it returns a value, for at most `WAIT`.
fn poll<T>(
    what: &str,
    interval: Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = ready() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {WAIT:?} waiting for {what}"));
        }
        thread::sleep(interval);
    }
}

/// Waits until every pod's sub-process recorded its start, and returns the start times.
fn wait_subprocess_starts(
    pods: &[PodProcess],
    interval: Duration,
) -> Result<Vec<SystemTime>, String> {
    poll("every sub-process to start", interval, || {
        pods.iter().map(|pod| first_start(&pod.dir)).collect()
    })
}

/// Returns the first start time recorded in `dir/starts`, or `None` before the sub-process
/// wrote it.
fn first_start(dir: &Path) -> Option<SystemTime> {
    let nanos: u64 = first_start_field(dir, 0)?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// Returns field `index` (0: start time in ns, 1: pid) of the first line of `dir/starts`.
fn first_start_field(dir: &Path, index: usize) -> Option<String> {
    let text = fs::read_to_string(dir.join("starts")).ok()?;
    let line = text.lines().next()?;
    line.split_whitespace().nth(index).map(str::to_string)
}

/// Kills the sub-process of a pod whose agent was killed with SIGKILL, because no agent
/// tears it down any more.
fn kill_orphaned_subprocess(pod: &PodProcess) {
    let Some(pid) = first_start_field(&pod.dir, 1).and_then(|pid| pid.parse::<i32>().ok()) else {
        return;
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

/// Waits until every pod runs its sub-process, one is `leader` and the others `follower`.
fn wait_formed(pods: &[PodProcess]) -> Result<(), String> {
    poll("every pod running with one idle leader", INFO_POLL, || {
        let infos: Vec<Value> = pods.iter().map(PodProcess::info).collect::<Option<_>>()?;
        let running = infos.iter().all(|info| info["process"] == "running");
        let leaders = infos
            .iter()
            .filter(|info| info["state"] == "leader")
            .count();
        let followers = infos
            .iter()
            .filter(|info| info["state"] == "follower")
            .count();
        (running && leaders == 1 && followers == pods.len() - 1).then_some(())
    })
}

fn leader_position(pods: &[PodProcess]) -> Result<usize, String> {
    pods.iter()
        .position(|pod| pod.info().is_some_and(|info| info["state"] == "leader"))
        .ok_or_else(|| "no pod reports state `leader` in /info".to_string())
}

/// Returns the durations in ms of the configuration rounds logged by any of `pods`, in
/// the order of the pods.
fn round_durations(pods: &[PodProcess]) -> Vec<f64> {
    pods.iter()
        .flat_map(|pod| {
            pod.log_text()
                .lines()
                .filter_map(|line| {
                    let rest = &line[line.find(ROUND_DONE)? + ROUND_DONE.len()..];
                    let (_, duration) = rest.split_once(" pods in ")?;
                    duration.trim().strip_suffix("ms")?.trim().parse().ok()
                })
                .collect::<Vec<f64>>()
        })
        .collect()
}

fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(elapsed) => elapsed.as_secs_f64() * 1000.0,
        Err(error) => -error.duration().as_secs_f64() * 1000.0,
    }
}

/// Returns the number of a `/proc/<pid>/status` line such as `VmRSS:  7812 kB` (in kB) or
/// `Threads:  9`.
fn status_number(pid: i32, name: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&path).map_err(|error| format!("failed to read {path}: {error}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| format!("no {name} line in {path}"))
}

/// CPU time a process used so far, from two sources.
struct CpuTime {
    /// Sum of the on-CPU time of all threads, from `/proc/<pid>/task/*/schedstat`, in ns.
    scheduled_ns: u64,
    /// `utime + stime` from `/proc/<pid>/stat`, in clock ticks.
    ticks: u64,
    /// Sum of the number of times each thread was scheduled onto a CPU (wake-ups).
    timeslices: u64,
}

impl CpuTime {
    fn read(pid: i32) -> Result<CpuTime, String> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&stat_path)
            .map_err(|error| format!("failed to read {stat_path}: {error}"))?;
        // Fields after the command name, which is in parentheses and may contain spaces:
        // state is field 3, utime field 14 and stime field 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |number: usize| {
            fields
                .get(number - 3)
                .and_then(|value| value.parse::<u64>().ok())
        };
        let ticks = field(14)
            .zip(field(15))
            .map(|(utime, stime)| utime + stime)
            .ok_or_else(|| format!("no utime and stime in {stat_path}"))?;

        let tasks = format!("/proc/{pid}/task");
        let mut scheduled_ns = 0;
        let mut timeslices = 0;
        let entries =
            fs::read_dir(&tasks).map_err(|error| format!("failed to read {tasks}: {error}"))?;
        for entry in entries.flatten() {
            // A thread that exited meanwhile has no schedstat any more. Its fields are the
            // time on CPU in ns, the time spent waiting for a CPU, and the number of timeslices.
            let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let numbers: Vec<u64> = text
                .split_whitespace()
                .map(|value| value.parse().unwrap_or(0))
                .collect();
            scheduled_ns += numbers.first().copied().unwrap_or(0);
            timeslices += numbers.get(2).copied().unwrap_or(0);
        }
        Ok(CpuTime {
            scheduled_ns,
            ticks,
            timeslices,
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// ZooKeeper client of the bench, on a tokio runtime driven by its own thread so that the
/// session stays alive while the bench thread sleeps.
struct Probe {
    runtime: tokio::runtime::Handle,
    client: zk::Client,
}

impl Probe {
    fn connect(connect: &str) -> Result<Probe, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("failed to build a tokio runtime: {error}"))?;
        let handle = runtime.handle().clone();
        thread::Builder::new()
            .name("zk-probe".to_string())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .map_err(|error| format!("failed to start the ZooKeeper client thread: {error}"))?;

        let client = handle
            .block_on(
                zk::Client::connector()
                    .with_session_timeout(Duration::from_secs(30))
                    .connect(connect),
            )
            .map_err(|error| format!("failed to connect to ZooKeeper at {connect}: {error}"))?;
        Ok(Probe {
            runtime: handle,
            client,
        })
    }

    /// Sets a persistent recursive watch on the cluster's znode, which may not exist yet.
    ///
    /// A task on the probe's thread takes the arrival time of each event at once, and reads
    /// the snapshot after each write of it, because the bench thread may be busy elsewhere
    /// when the event arrives.
    fn watch(&self, cluster: &str) -> Result<Watch, String> {
        let path = cluster_path(cluster);
        let mut watcher = self
            .runtime
            .block_on(
                self.client
                    .watch(&path, zk::AddWatchMode::PersistentRecursive),
            )
            .map_err(|error| format!("failed to watch {path}: {error}"))?;

        let (events, receiver) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = self.client.clone();
        self.runtime.spawn(async move {
            tokio::pin!(stopped);
            loop {
                let event = tokio::select! {
                    event = watcher.changed() => event,
                    _ = &mut stopped => return,
                };
                let arrived = SystemTime::now();
                if event.event_type == zk::EventType::Session {
                    continue;
                }
                let written = matches!(
                    event.event_type,
                    zk::EventType::NodeCreated | zk::EventType::NodeDataChanged
                );
                let snapshot_len = if written && event.path.ends_with("/snapshot") {
                    read_snapshot_len(&client, &event.path).await
                } else {
                    None
                };
                let stamped = StampedEvent {
                    event,
                    arrived,
                    snapshot_len,
                };
                if events.send(stamped).is_err() {
                    return;
                }
            }
        });
        Ok(Watch {
            events: receiver,
            _stop: stop,
        })
    }

    /// Returns the number of pods in the stored snapshot, or `None` while there is none.
    fn snapshot_len(&self, cluster: &str) -> Option<usize> {
        let path = format!("{}/snapshot", cluster_path(cluster));
        self.runtime
            .block_on(read_snapshot_len(&self.client, &path))
    }
}

/// Returns the number of pods in the snapshot at `path`, or `None` while there is none.
async fn read_snapshot_len(client: &zk::Client, path: &str) -> Option<usize> {
    let (data, _) = client.get_data(path).await.ok()?;
    let snapshot: serde_json::Map<String, Value> = serde_json::from_slice(&data).ok()?;
    Some(snapshot.len())
}

fn cluster_path(cluster: &str) -> String {
    format!("/ochopod/clusters/{cluster}")
}

/// A node event under a watched cluster, with the time it reached the bench.
struct StampedEvent {
    event: zk::WatchedEvent,
    arrived: SystemTime,
    /// Number of pods in the snapshot read just after a write of the snapshot.
    snapshot_len: Option<usize>,
}

/// Node events under one cluster's znode, in the order ZooKeeper sent them.
struct Watch {
    events: mpsc::Receiver<StampedEvent>,
    /// Ends the task that forwards the events when the watch is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Watch {
    /// Waits for the next event that `matches` accepts and returns when it arrived.
    fn wait_for(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&StampedEvent) -> bool,
    ) -> Result<SystemTime, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let stamped = self
                .events
                .recv_timeout(remaining)
                .map_err(|_| format!("timed out after {WAIT:?} waiting for {what}"))?;
            if matches(&stamped) {
                return Ok(stamped.arrived);
            }
        }
    }

    /// Waits for a registration under `pods/` to be created or deleted.
    fn wait_registration(
        &mut self,
        cluster: &str,
        event_type: zk::EventType,
    ) -> Result<SystemTime, String> {
        let prefix = format!("{}/pods/", cluster_path(cluster));
        self.wait_for(
            &format!("a {event_type:?} event under {prefix}"),
            |stamped| {
                stamped.event.event_type == event_type && stamped.event.path.starts_with(&prefix)
            },
        )
    }

    /// Waits for a write of the snapshot that leaves it with `len` pods.
    fn wait_snapshot_len(&mut self, cluster: &str, len: usize) -> Result<SystemTime, String> {
        self.wait_for(
            &format!("a snapshot of {cluster} with {len} pods"),
            |stamped| stamped.snapshot_len == Some(len),
        )
    }
}

/// Samples of every figure, in the order the figures were first measured.
#[derive(Default)]
struct Results {
    rows: Vec<Row>,
}

struct Row {
    figure: String,
    target: &'static str,
    unit: &'static str,
    samples: Vec<f64>,
}

impl Results {
    fn add(&mut self, figure: &str, target: &'static str, unit: &'static str, value: f64) {
        self.add_static(figure.to_string(), target, unit, value);
    }

    fn add_static(&mut self, figure: String, target: &'static str, unit: &'static str, value: f64) {
        match self.rows.iter_mut().find(|row| row.figure == figure) {
            Some(row) => row.samples.push(value),
            None => self.rows.push(Row {
                figure,
                target,
                unit,
                samples: vec![value],
            }),
        }
    }
}

fn print_table(results: &Results, runs: u32) {
    let header = ["figure", "target", "min", "median", "max", "unit", "n"];
    let mut lines: Vec<[String; 7]> = vec![header.map(str::to_string)];
    for row in &results.rows {
        let mut samples = row.samples.clone();
        samples.sort_by(f64::total_cmp);
        let middle = samples.len() / 2;
        let median = if samples.len() % 2 == 1 {
            samples[middle]
        } else {
            (samples[middle - 1] + samples[middle]) / 2.0
        };
        let decimals = if row.unit == "%" { 3 } else { 1 };
        lines.push([
            row.figure.clone(),
            row.target.to_string(),
            format!("{:.*}", decimals, samples[0]),
            format!("{median:.decimals$}"),
            format!("{:.*}", decimals, samples[samples.len() - 1]),
            row.unit.to_string(),
            samples.len().to_string(),
        ]);
    }

    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            lines
                .iter()
                .map(|line| line[column].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!();
    println!("ochopod bench: {runs} runs, release binary, local ZooKeeper, damper 0");
    for (index, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                // The figure names are left-aligned, the numbers right-aligned.
                if column == 0 || column == 5 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        println!("{}", cells.join("  "));
        if index == 0 {
            let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
            println!("{}", rule.join("  "));
        }
    }
}
