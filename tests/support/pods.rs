//! Real `ochopod` processes for end-to-end tests, and a small blocking HTTP client for their
//! control ports.

use std::borrow::Borrow;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::wait::wait_until;

/// Path of the `ochopod` binary: the one cargo built for this integration test, or, for an
/// example (where cargo defines no `CARGO_BIN_EXE_ochopod`), the binary of the same profile,
/// `target/<profile>/ochopod` beside `target/<profile>/examples/<example>`.
///
/// Cargo builds that binary for an example only when asked (`cargo build --bin ochopod`).
pub fn binary() -> &'static str {
    static BINARY: OnceLock<String> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = option_env!("CARGO_BIN_EXE_ochopod") {
            return path.to_string();
        }
        let executable = std::env::current_exe().expect("path of the running executable");
        let profile_dir = executable
            .parent()
            .and_then(Path::parent)
            .expect("the executable lies in target/<profile>/examples");
        profile_dir.join("ochopod").to_string_lossy().into_owned()
    })
}

/// Ports that [`free_port`] hands out: below Linux's default ephemeral range (32768 to 60999),
/// from which the kernel picks the local port of every outgoing connection. A port picked
/// with `bind(0)` comes from that range and, once released, can become the local end of
/// another test's ZooKeeper or HTTP connection before the pod binds it.
const PORT_RANGE: std::ops::Range<u16> = 20000..32768;

/// Returns a loopback port that was free a moment ago and that no earlier call of this
/// process returned.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    // Test binaries start at different places in the range, so that pods a previous binary
    // left behind are unlikely to hold the ports this one tries first.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORT_RANGE.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port between {} and {}",
        PORT_RANGE.start,
        PORT_RANGE.end - 1
    );
}

/// Sends one HTTP/1.1 request to `127.0.0.1:port` and returns the status and the JSON body
/// (`Value::Null` when the body is not JSON).
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, Value)> {
    http_with_headers(port, method, path, body, &[])
}

/// Like `http`, with extra request headers.
pub fn http_with_headers(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;

    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP reply: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or("");
    let body = decode_chunked(body);
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

fn decode_chunked(body: &str) -> String {
    // Bodies of unknown length come chunked; a JSON body never starts with a hex digit line.
    let mut lines = body.split("\r\n");
    let Some(first) = lines.next() else {
        return String::new();
    };
    if u64::from_str_radix(first.trim(), 16).is_err() || body.trim_start().starts_with(['{', '[']) {
        return body.to_string();
    }
    let mut decoded = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        decoded.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    decoded
}

/// One `ochopod run` process with its own directory, control port and log file.
pub struct PodProcess {
    pub child: Child,
    /// Port the control server listens on (the remapped `PORT_<port>`).
    pub control_port: u16,
    /// Working directory of the pod's sub-process.
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Wall-clock time taken just before the process was spawned.
    pub spawned_at: SystemTime,
}

/// What to start: settings as environment variables plus the command after `--`.
pub struct PodSpec {
    pub zk: String,
    pub namespace: String,
    pub cluster: String,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub command: Vec<String>,
    /// Program and arguments that run the binary, such as `unshare --pid --fork`; empty runs
    /// it directly.
    pub wrapper: Vec<String>,
}

impl PodSpec {
    pub fn new(zk: &str, namespace: &str, cluster: &str) -> PodSpec {
        PodSpec {
            zk: zk.to_string(),
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            env: Vec::new(),
            args: Vec::new(),
            command: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn env(mut self, name: &str, value: &str) -> PodSpec {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn arg(mut self, arg: &str) -> PodSpec {
        self.args.push(arg.to_string());
        self
    }

    /// Runs the binary through `wrapper` (a program and its arguments).
    pub fn wrapped(mut self, wrapper: &[&str]) -> PodSpec {
        self.wrapper = wrapper.iter().map(|word| word.to_string()).collect();
        self
    }

    /// Runs `script` through `/bin/sh -c` as the sub-process.
    pub fn shell(mut self, script: &str) -> PodSpec {
        self.command = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        self
    }
}

impl PodProcess {
    /// Starts a pod in `root/<name>` with the local binding.
    pub fn start(root: &Path, name: &str, spec: &PodSpec) -> PodProcess {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        let log = root.join(format!("{name}.log"));
        let control_port = free_port();

        let mut command = match spec.wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        command
            .arg("run")
            .args(&spec.args)
            .env("ochopod_local", "true")
            .env("ochopod_zk", &spec.zk)
            .env("ochopod_namespace", &spec.namespace)
            .env("ochopod_cluster", &spec.cluster)
            .env("ochopod_cwd", &dir)
            .env("ochopod_grace", "5")
            .env("PORT_8080", control_port.to_string())
            .env("RUST_LOG", "debug")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap());
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        if !spec.command.is_empty() {
            command.arg("--").args(&spec.command);
        }
        let spawned_at = SystemTime::now();
        let child = command.spawn().expect("start the ochopod binary");
        PodProcess {
            child,
            control_port,
            dir,
            log,
            spawned_at,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Returns `/info`, or `None` while the control server does not reply.
    pub fn info(&self) -> Option<Value> {
        match http(self.control_port, "GET", "/info", "") {
            Ok((200, info)) => Some(info),
            _ => None,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pod did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for PodProcess {
    /// Stops the pod gracefully, so that it tears its sub-process down, and kills it when it
    /// does not exit in time.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Returns the `/info` field `name` as text: a string as it is, any other value as JSON.
pub fn field(info: &Value, name: &str) -> String {
    match &info[name] {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Waits up to `timeout` until every pod runs its sub-process, exactly one pod leads with no
/// round pending, and all the others follow.
pub fn wait_formed<P: Borrow<PodProcess>>(pods: &[P], timeout: Duration) {
    wait_until(timeout, "every pod running with one idle leader", || {
        let infos: Option<Vec<Value>> = pods.iter().map(|pod| pod.borrow().info()).collect();
        let Some(infos) = infos else {
            return false;
        };
        let running = infos.iter().all(|info| field(info, "process") == "running");
        let leaders = infos
            .iter()
            .filter(|info| field(info, "state") == "leader")
            .count();
        let followers = infos
            .iter()
            .filter(|info| field(info, "state") == "follower")
            .count();
        running && leaders == 1 && followers == pods.len() - 1
    });
}

/// Returns whether `/info` reports one of the leader states.
pub fn is_leader(info: &Value) -> bool {
    field(info, "state").starts_with("leader")
}

/// Returns the index of the pod reporting a leader state.
pub fn leader_index<P: Borrow<PodProcess>>(pods: &[P]) -> usize {
    pods.iter()
        .position(|pod| pod.borrow().info().is_some_and(|info| is_leader(&info)))
        .expect("a leader")
}
