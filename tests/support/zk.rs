//! Real Apache ZooKeeper servers for integration tests.
//!
//! Each server is a JVM that runs the ZooKeeper jars of Debian's `zookeeper` package
//! (3.8.0 on Debian 12), or the classpath in `OCHOPOD_ZK_CLASSPATH`. It listens on
//! 127.0.0.1 only, on ports picked free at start, and keeps its configuration, data
//! and log in a temporary directory. `scripts/install-deps` installs the package.
//!
//! Every server process gets `PR_SET_PDEATHSIG` = SIGKILL, so it dies with the test
//! binary even when the binary is killed and no `Drop` runs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::prctl;
use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};
use tempfile::TempDir;

/// Environment variable that replaces the Debian jars with another server classpath.
pub const CLASSPATH_ENV: &str = "OCHOPOD_ZK_CLASSPATH";

/// ZooKeeper `tickTime` in ms. Followers must sync within `SYNC_LIMIT_TICKS` ticks.
pub const TICK_TIME_MS: u64 = 200;

/// Minimum session timeout in ms that the servers grant (ZooKeeper's default is 2 ticks).
pub const MIN_SESSION_TIMEOUT_MS: u64 = 400;

/// Maximum session timeout in ms that the servers grant (ZooKeeper's default is 20 ticks).
pub const MAX_SESSION_TIMEOUT_MS: u64 = 60_000;

const INIT_LIMIT_TICKS: u64 = 20;
const SYNC_LIMIT_TICKS: u64 = 10;

/// Server jar of Debian's `libzookeeper-java`. Its manifest `Class-Path` names the
/// dependency jars, so it is the whole classpath apart from a logging backend.
const DEBIAN_ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// SLF4J backend that writes to stderr. Without one the server logs nothing.
const DEBIAN_SLF4J_SIMPLE_JAR: &str = "/usr/share/java/slf4j-simple.jar";

const SERVER_MAIN_CLASS: &str = "org.apache.zookeeper.server.quorum.QuorumPeerMain";

/// A small heap, because a test may run several servers at once.
const JVM_OPTIONS: &[&str] = &[
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
];

/// Maximum time for a server to start serving, and for an ensemble to elect a leader.
/// It is generous because the JVMs may compete with cargo for 2 cores.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum time that `stop` waits after SIGTERM before it sends SIGKILL, and that
/// `pause` and `resume` wait for the threads to stop or continue.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Default connect, read and write timeout of `four_letter`.
const FOUR_LETTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Timeout of the `srvr` probes that poll a starting server.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Number of fresh port sets that `start` tries when a picked port was taken meanwhile.
const START_ATTEMPTS: usize = 5;

const LOG_TAIL_LINES: usize = 40;

/// Log line of a JVM that failed to bind one of its ports.
const ADDRESS_IN_USE: &str = "Address already in use";

/// One ZooKeeper server process, standalone or a member of a `ZkEnsemble`.
///
/// All methods take `&self`, so the handle can be shared between threads. Dropping it
/// kills the process (SIGKILL) and removes the temporary directory.
pub struct ZkServer {
    /// Description for messages, such as "ZooKeeper server on 127.0.0.1:40123".
    label: String,
    client_port: u16,
    /// Contains `zoo.cfg`, `data/` and `zookeeper.log`.
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    process: Mutex<ProcessState>,
}

#[derive(Default)]
struct ProcessState {
    child: Option<Child>,
    /// Length of the log file when the current process was spawned.
    log_offset: u64,
}

/// Why a server did not start serving.
struct StartFailure {
    message: String,
    /// The process exited after failing to bind a port, so another port may work.
    address_in_use: bool,
}

/// Client, quorum and leader-election ports of one ensemble member.
#[derive(Clone, Copy)]
struct MemberPorts {
    client: u16,
    quorum: u16,
    election: u16,
}

impl ZkServer {
    /// Starts a standalone server on a free 127.0.0.1 port and waits until it serves.
    ///
    /// Panics when the server does not start, with the tail of its log.
    pub fn start() -> ZkServer {
        Self::try_start().unwrap_or_else(|message| panic!("{message}"))
    }

    /// Starts a standalone server like `start`, and returns the failure as a message.
    pub fn try_start() -> Result<ZkServer, String> {
        Self::try_start_with_config("")
    }

    /// Starts a standalone server like `start`, with `extra` appended to its `zoo.cfg` (lines
    /// such as `enforce.auth.enabled=true`).
    pub fn start_with_config(extra: &str) -> ZkServer {
        Self::try_start_with_config(extra).unwrap_or_else(|message| panic!("{message}"))
    }

    fn try_start_with_config(extra: &str) -> Result<ZkServer, String> {
        for attempt in 1..=START_ATTEMPTS {
            let port = pick_free_ports(1)?[0];
            let label = format!("ZooKeeper server on 127.0.0.1:{port}");
            let server = ZkServer::create(label, port, None, extra)?;
            server.spawn()?;

            match server.wait_until_serving(Instant::now() + START_TIMEOUT) {
                Ok(_) => return Ok(server),
                Err(failure) if failure.address_in_use && attempt < START_ATTEMPTS => continue,
                Err(failure) => return Err(failure.message),
            }
        }
        unreachable!("the last start attempt returns")
    }

    /// Creates the temporary directory and configuration, without starting a process.
    fn create(
        label: String,
        client_port: u16,
        quorum: Option<(usize, &[MemberPorts])>,
        extra: &str,
    ) -> Result<ZkServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("ochopod-zk-")
            .tempdir()
            .map_err(|error| {
                format!("failed to create a temporary directory for {label}: {error}")
            })?;
        let data_dir = dir.path().join("data");
        fs::create_dir(&data_dir)
            .map_err(|error| format!("failed to create {}: {error}", data_dir.display()))?;

        let mut config = format!(
            "tickTime={TICK_TIME_MS}\n\
             initLimit={INIT_LIMIT_TICKS}\n\
             syncLimit={SYNC_LIMIT_TICKS}\n\
             minSessionTimeout={MIN_SESSION_TIMEOUT_MS}\n\
             maxSessionTimeout={MAX_SESSION_TIMEOUT_MS}\n\
             dataDir={}\n\
             clientPortAddress=127.0.0.1\n\
             clientPort={client_port}\n\
             admin.enableServer=false\n\
             4lw.commands.whitelist=*\n\
             # Benchmarks connect hundreds of pods from 127.0.0.1; the default caps one\n\
             # address at 60 connections.\n\
             maxClientCnxns=0\n\
             # Skipping fsync speeds up writes. A killed process still keeps its data,\n\
             # because written data stays in the page cache.\n\
             forceSync=no\n",
            data_dir.display()
        );
        if let Some((index, members)) = quorum {
            for (other_index, ports) in members.iter().enumerate() {
                config.push_str(&format!(
                    "server.{}=127.0.0.1:{}:{}\n",
                    other_index + 1,
                    ports.quorum,
                    ports.election
                ));
            }
            let myid_path = data_dir.join("myid");
            fs::write(&myid_path, format!("{}\n", index + 1))
                .map_err(|error| format!("failed to write {}: {error}", myid_path.display()))?;
        }
        config.push_str(extra);

        let config_path = dir.path().join("zoo.cfg");
        fs::write(&config_path, config)
            .map_err(|error| format!("failed to write {}: {error}", config_path.display()))?;
        let log_path = dir.path().join("zookeeper.log");

        Ok(ZkServer {
            label,
            client_port,
            dir,
            config_path,
            log_path,
            process: Mutex::new(ProcessState::default()),
        })
    }

    /// Spawns the JVM with output appended to the log, unless a process is running.
    fn spawn(&self) -> Result<(), String> {
        let mut state = self.lock_process();
        if state.child.is_some() {
            return Err(format!("{} is already running", self.label));
        }

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|error| format!("failed to open {}: {error}", self.log_path.display()))?;
        let log_offset = log.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        let log_for_stderr = log
            .try_clone()
            .map_err(|error| format!("failed to open {}: {error}", self.log_path.display()))?;

        let java = java_path();
        let mut command = Command::new(&java);
        command
            .args(JVM_OPTIONS)
            .arg("-cp")
            .arg(zookeeper_classpath())
            .arg(SERVER_MAIN_CLASS)
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);

        let child = spawn_with_parent_death_signal(command).map_err(|error| {
            let hint = if error.kind() == io::ErrorKind::NotFound {
                " (no Java runtime found; run scripts/install-deps or set JAVA_HOME)"
            } else {
                ""
            };
            format!(
                "failed to run {} for {}: {error}{hint}",
                java.display(),
                self.label
            )
        })?;
        state.child = Some(child);
        state.log_offset = log_offset;
        Ok(())
    }

    /// Polls `srvr` until the server reports a mode, and returns that mode.
    fn wait_until_serving(&self, deadline: Instant) -> Result<String, StartFailure> {
        loop {
            if let Some(status) = self.exit_status() {
                let log_tail = self.log_tail_of_current_process(LOG_TAIL_LINES);
                return Err(StartFailure {
                    address_in_use: log_tail.contains(ADDRESS_IN_USE),
                    message: format!(
                        "{} exited with {status} before serving; last lines of {}:\n{log_tail}",
                        self.label,
                        self.log_path.display()
                    ),
                });
            }

            if let Some(mode) = self.mode_with_timeout(PROBE_TIMEOUT) {
                return Ok(mode);
            }

            if Instant::now() >= deadline {
                return Err(StartFailure {
                    address_in_use: false,
                    message: format!(
                        "{} did not serve within {START_TIMEOUT:?}; last lines of {}:\n{}",
                        self.label,
                        self.log_path.display(),
                        self.log_tail_of_current_process(LOG_TAIL_LINES)
                    ),
                });
            }
            thread::sleep(PROBE_INTERVAL);
        }
    }

    /// Returns the connect string, "127.0.0.1:PORT".
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Returns the client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Returns the client address, 127.0.0.1:PORT.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// Returns the directory that contains the snapshots and transaction logs.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Returns the path of the server log, which collects the output of every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns the last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        read_log_tail(&self.log_path, 0, lines)
    }

    /// Returns the process id, or `None` when no process is running.
    pub fn pid(&self) -> Option<u32> {
        self.lock_process().child.as_ref().map(Child::id)
    }

    /// Returns whether the process is running (a paused process counts as running).
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none() && self.lock_process().child.is_some()
    }

    /// Sends `command` ("ruok", "srvr", "stat" and so on) and returns the reply.
    pub fn four_letter(&self, command: &str) -> io::Result<String> {
        four_letter(&self.connect_string(), command)
    }

    /// Returns the mode from `srvr` ("standalone", "leader", "follower"), or `None`
    /// when the server does not reply within 2 s or is not serving.
    pub fn mode(&self) -> Option<String> {
        self.mode_with_timeout(FOUR_LETTER_TIMEOUT)
    }

    fn mode_with_timeout(&self, timeout: Duration) -> Option<String> {
        let reply = four_letter_with_timeout(&self.connect_string(), "srvr", timeout).ok()?;
        parse_mode(&reply)
    }

    /// Stops the server with SIGTERM, then SIGKILL after 10 s, and reaps it.
    ///
    /// Does nothing when the process is not running. The data directory stays.
    pub fn stop(&self) {
        let mut state = self.lock_process();
        let Some(mut child) = state.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }

        let pid = child_pid(&child);
        // A paused process keeps SIGTERM pending until it continues.
        let _ = signal::kill(pid, Signal::SIGTERM);
        let _ = signal::kill(pid, Signal::SIGCONT);

        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => thread::sleep(PROBE_INTERVAL),
                Err(error) => panic!("failed to wait for {}: {error}", self.label),
            }
        }
        eprintln!(
            "{} ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL",
            self.label
        );
        kill_and_reap(&mut child);
    }

    /// Kills the server with SIGKILL and reaps it. Does nothing when it is not running.
    pub fn kill(&self) {
        if let Some(mut child) = self.lock_process().child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Stops the server if it runs, starts it again on the same port with the same
    /// data, and waits until it serves.
    ///
    /// An ensemble member serves only while a quorum of members runs. Panics when the
    /// server does not serve within 60 s, with the tail of its log.
    pub fn restart(&self) {
        self.stop();

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.spawn().unwrap_or_else(|message| panic!("{message}"));
            match self.wait_until_serving(deadline) {
                Ok(_) => return,
                // Another socket may hold the port for a moment, such as a client
                // connection that the kernel gave this port as its local port.
                Err(failure) if failure.address_in_use && Instant::now() < deadline => {
                    self.kill();
                    thread::sleep(PROBE_INTERVAL);
                }
                Err(failure) => panic!("restart failed: {}", failure.message),
            }
        }
    }

    /// Suspends the server with SIGSTOP and waits until all its threads have stopped.
    /// It keeps its sockets but stops replying.
    pub fn pause(&self) {
        let pid = self.signal(Signal::SIGSTOP);
        // kill() only queues the signal, so a busy JVM thread may still send a reply
        // right after it returns.
        self.wait_for_stop_state(pid, true);
    }

    /// Continues a paused server with SIGCONT and waits until its threads run again.
    pub fn resume(&self) {
        let pid = self.signal(Signal::SIGCONT);
        self.wait_for_stop_state(pid, false);
    }

    /// Sends `signal` to the process and returns its id.
    fn signal(&self, signal: Signal) -> Pid {
        let state = self.lock_process();
        let child = state
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("cannot send {signal} to {}: it is not running", self.label));
        let pid = child_pid(child);
        signal::kill(pid, signal)
            .unwrap_or_else(|error| panic!("failed to send {signal} to {}: {error}", self.label));
        pid
    }

    /// Polls `/proc` until all threads of `pid` are stopped when `stopped` is true, or
    /// until they are no longer all stopped when it is false.
    fn wait_for_stop_state(&self, pid: Pid, stopped: bool) {
        let expected = if stopped {
            "stop after SIGSTOP"
        } else {
            "continue after SIGCONT"
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while all_threads_stopped(pid) != stopped {
            if Instant::now() >= deadline {
                panic!(
                    "{} (pid {pid}) did not {expected} within {STOP_TIMEOUT:?}",
                    self.label
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Returns the exit status once the process has exited, and reaps it.
    fn exit_status(&self) -> Option<ExitStatus> {
        let mut state = self.lock_process();
        let status = state.child.as_mut()?.try_wait().ok().flatten()?;
        state.child = None;
        Some(status)
    }

    fn log_tail_of_current_process(&self, lines: usize) -> String {
        let offset = self.lock_process().log_offset;
        read_log_tail(&self.log_path, offset, lines)
    }

    /// Locks the process state. A test that panicked while holding the lock leaves
    /// the state consistent, so poisoning is ignored.
    fn lock_process(&self) -> MutexGuard<'_, ProcessState> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills the process without blocking on the lock and without panicking, for
    /// the exit handler.
    fn kill_at_exit(&self) {
        let mut state = match self.process.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if let Some(mut child) = state.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            // The test harness prints this output only for the failing test.
            eprintln!(
                "last lines of the log of {} ({}):\n{}",
                self.label,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

/// A quorum of ZooKeeper servers on 127.0.0.1, each with its own client, quorum and
/// leader-election port.
pub struct ZkEnsemble {
    servers: Vec<ZkServer>,
}

impl ZkEnsemble {
    /// Starts `size` servers and waits until all of them serve and exactly one leads.
    ///
    /// Panics when `size` is below 2 or the ensemble does not form within 60 s.
    pub fn start(size: usize) -> ZkEnsemble {
        Self::try_start(size).unwrap_or_else(|message| panic!("{message}"))
    }

    /// Starts an ensemble like `start`, and returns the failure as a message.
    pub fn try_start(size: usize) -> Result<ZkEnsemble, String> {
        assert!(
            size >= 2,
            "an ensemble needs at least 2 servers, got {size}"
        );

        for attempt in 1..=START_ATTEMPTS {
            let ports = pick_free_ports(3 * size)?;
            let members: Vec<MemberPorts> = ports
                .chunks(3)
                .map(|chunk| MemberPorts {
                    client: chunk[0],
                    quorum: chunk[1],
                    election: chunk[2],
                })
                .collect();

            let mut servers = Vec::with_capacity(size);
            for (index, ports) in members.iter().enumerate() {
                let label = format!(
                    "ZooKeeper ensemble member {} on 127.0.0.1:{}",
                    index + 1,
                    ports.client
                );
                servers.push(ZkServer::create(
                    label,
                    ports.client,
                    Some((index, &members)),
                    "",
                )?);
            }
            for server in &servers {
                server.spawn()?;
            }

            let deadline = Instant::now() + START_TIMEOUT;
            let failure = servers
                .iter()
                .find_map(|server| server.wait_until_serving(deadline).err());
            match failure {
                None => {}
                Some(failure) if failure.address_in_use && attempt < START_ATTEMPTS => continue,
                Some(failure) => return Err(failure.message),
            }

            let ensemble = ZkEnsemble { servers };
            ensemble.wait_for_single_leader(deadline)?;
            return Ok(ensemble);
        }
        unreachable!("the last start attempt returns")
    }

    /// Returns the number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Returns the server at `index` (0-based; its ZooKeeper `myid` is `index + 1`).
    pub fn server(&self, index: usize) -> &ZkServer {
        &self.servers[index]
    }

    /// Returns all servers, in `myid` order.
    pub fn servers(&self) -> &[ZkServer] {
        &self.servers
    }

    /// Returns the connect string that lists every server, "127.0.0.1:P1,127.0.0.1:P2,...".
    pub fn connect_string(&self) -> String {
        self.servers
            .iter()
            .map(ZkServer::connect_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Returns the mode of each server, `None` for a server that is down, paused or
    /// not serving.
    pub fn modes(&self) -> Vec<Option<String>> {
        self.servers
            .iter()
            .map(|server| server.mode_with_timeout(PROBE_TIMEOUT))
            .collect()
    }

    /// Returns the index of the only server in mode "leader", or `None` when no
    /// server or more than one server reports it.
    pub fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = self
            .modes()
            .iter()
            .enumerate()
            .filter(|(_, mode)| mode.as_deref() == Some("leader"))
            .map(|(index, _)| index)
            .collect();
        match leaders.as_slice() {
            [leader] => Some(*leader),
            _ => None,
        }
    }

    /// Waits until exactly one server leads and returns its index.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        self.wait_for_single_leader(Instant::now() + timeout)
            .unwrap_or_else(|message| panic!("{message}"))
    }

    fn wait_for_single_leader(&self, deadline: Instant) -> Result<usize, String> {
        loop {
            if let Some(leader) = self.leader() {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the ensemble {} has no single leader; server modes: {:?}",
                    self.connect_string(),
                    self.modes()
                ));
            }
            thread::sleep(PROBE_INTERVAL);
        }
    }
}

static SHARED_SERVER: OnceLock<ZkServer> = OnceLock::new();

/// Returns a standalone server that all tests of this test binary share, and starts
/// it on first use.
///
/// Tests on the shared server must keep their znodes under their own namespace
/// (see `unique_namespace`) and must not stop, restart, pause or kill it. A test
/// that needs any of that starts its own `ZkServer`. The server is killed and its
/// directory removed when the test binary exits.
pub fn shared_server() -> &'static ZkServer {
    SHARED_SERVER.get_or_init(|| {
        let server = ZkServer::start();
        // SAFETY: atexit only registers a function pointer, and the handler neither
        // panics nor unwinds.
        let registered = unsafe { libc::atexit(remove_shared_server_at_exit) };
        if registered != 0 {
            eprintln!(
                "failed to register the exit handler; {} stays behind",
                server.dir.path().display()
            );
        }
        server
    })
}

/// Kills the shared server and removes its directory. Statics are never dropped, so
/// `Drop` does not do it. `PR_SET_PDEATHSIG` still kills the server when the binary
/// dies without running exit handlers.
extern "C" fn remove_shared_server_at_exit() {
    if let Some(server) = SHARED_SERVER.get() {
        server.kill_at_exit();
        let _ = fs::remove_dir_all(server.dir.path());
    }
}

/// Returns a fresh namespace, "{prefix}-{process id}-{counter}". The counter makes
/// it unique within the test binary, and the process id keeps binaries apart.
pub fn unique_namespace(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{counter}", std::process::id())
}

/// Sends a four-letter command ("ruok", "srvr", "stat", ...) to the server at `address`
/// ("127.0.0.1:PORT") and returns the reply, with a 2 s timeout.
pub fn four_letter(address: &str, command: &str) -> io::Result<String> {
    four_letter_with_timeout(address, command, FOUR_LETTER_TIMEOUT)
}

/// Sends a four-letter command like `four_letter`, with `timeout` for connect, each
/// read and each write.
///
/// Rejects an address that is not a loopback address, so tests never reach another host.
pub fn four_letter_with_timeout(
    address: &str,
    command: &str,
    timeout: Duration,
) -> io::Result<String> {
    if command.len() != 4 || !command.bytes().all(|byte| byte.is_ascii_lowercase()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid four-letter command {command:?}: expected 4 lowercase ASCII letters"),
        ));
    }
    let socket_address = address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address {address:?} resolves to nothing"),
        )
    })?;
    if !socket_address.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address {address:?} is not a loopback address"),
        ));
    }

    let mut stream = TcpStream::connect_timeout(&socket_address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(command.as_bytes())?;

    // The server closes the connection after the reply.
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Returns the value of the "Mode: " line of a `srvr` or `stat` reply.
fn parse_mode(reply: &str) -> Option<String> {
    reply
        .lines()
        .find_map(|line| line.strip_prefix("Mode: "))
        .map(|mode| mode.trim().to_string())
}

/// Returns the ZooKeeper server classpath: `OCHOPOD_ZK_CLASSPATH` when set, else the
/// Debian jars.
fn zookeeper_classpath() -> String {
    if let Ok(classpath) = std::env::var(CLASSPATH_ENV) {
        if !classpath.trim().is_empty() {
            return classpath;
        }
    }

    if !Path::new(DEBIAN_ZOOKEEPER_JAR).is_file() {
        panic!(
            "ZooKeeper not found: {DEBIAN_ZOOKEEPER_JAR} is missing and {CLASSPATH_ENV} is not set. \
             Run scripts/install-deps to install Debian's zookeeper package, \
             or set {CLASSPATH_ENV} to a ZooKeeper server classpath."
        );
    }
    let mut classpath = DEBIAN_ZOOKEEPER_JAR.to_string();
    if Path::new(DEBIAN_SLF4J_SIMPLE_JAR).is_file() {
        classpath.push(':');
        classpath.push_str(DEBIAN_SLF4J_SIMPLE_JAR);
    }
    classpath
}

/// Returns `$JAVA_HOME/bin/java` when it exists, else `java` from `PATH`.
fn java_path() -> PathBuf {
    if let Some(java_home) = std::env::var_os("JAVA_HOME") {
        let java = Path::new(&java_home).join("bin").join("java");
        if java.is_file() {
            return java;
        }
    }
    PathBuf::from("java")
}

/// Returns `count` distinct ports that were free on 127.0.0.1.
///
/// The listeners are closed before the server binds the ports, so another process
/// may take one in between. Callers retry with new ports when that happens.
fn pick_free_ports(count: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|error| format!("failed to pick a free port on 127.0.0.1: {error}"))?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|error| format!("failed to read a picked port: {error}"))
}

/// Spawns `command` with `PR_SET_PDEATHSIG` = SIGKILL from one thread that lives as
/// long as the test binary.
///
/// Linux sends the parent-death signal when the thread that forked the child exits,
/// not the process. The test harness ends a thread after each test, so a server
/// forked on a test thread would die with it. That would kill the shared server, or
/// a server that a test restarts from a `spawn_blocking` thread.
fn spawn_with_parent_death_signal(mut command: Command) -> io::Result<Child> {
    type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();

    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("zookeeper-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in receiver {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("failed to start the thread that spawns ZooKeeper servers");
        sender
    });

    let test_process = unistd::getpid();
    // SAFETY: the closure runs between fork and exec and makes only the prctl and
    // getppid system calls, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The test binary may have exited before prctl took effect.
            if unistd::getppid() != test_process {
                return Err(io::Error::other(
                    "the test binary exited before the server started",
                ));
            }
            Ok(())
        });
    }

    let (reply_sender, reply_receiver) = mpsc::channel();
    spawner
        .send((command, reply_sender))
        .map_err(|_| io::Error::other("the thread that spawns ZooKeeper servers has stopped"))?;
    reply_receiver
        .recv()
        .map_err(|_| io::Error::other("the thread that spawns ZooKeeper servers has stopped"))?
}

/// Returns whether every thread of `pid` is in state T (stopped by a signal), read
/// from `/proc/PID/task/TID/stat`. Returns false when the process has no threads left.
fn all_threads_stopped(pid: Pid) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut thread_count = 0;
    for task in tasks.flatten() {
        // A thread that exits between read_dir and this read no longer counts.
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The state follows the command name, which is in parentheses and may
        // contain spaces or parentheses itself.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state != Some('T') {
            return false;
        }
        thread_count += 1;
    }
    thread_count > 0
}

fn child_pid(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("process ids fit in i32"))
}

/// Sends SIGKILL to the child and reaps it, ignoring a child that has already exited.
fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Returns the last `lines` lines of the log after byte `offset`, or a note when the
/// log cannot be read.
fn read_log_tail(path: &Path, offset: u64, lines: usize) -> String {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset))?;
        file.read_to_end(&mut bytes)
    });
    if let Err(error) = read {
        return format!("(failed to read {}: {error})", path.display());
    }

    let text = String::from_utf8_lossy(&bytes);
    let all_lines: Vec<&str> = text.lines().collect();
    let start = all_lines.len().saturating_sub(lines);
    all_lines[start..].join("\n")
}
