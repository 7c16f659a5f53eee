//! Invalid settings and misbehaving hooks, through the real `ochopod` binary. A problem found at
//! start-up stops the agent with exit code 2 and a message naming the setting, before it
//! connects to ZooKeeper. A hook that fails at run time fails its request with 406 and the
//! reason, which the pod log records too.

mod support;

use std::fs;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::pods::{binary, free_port, http, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A loopback port posing as ZooKeeper, to tell whether the agent tried to connect.
struct FakeZookeeper {
    listener: TcpListener,
}

impl FakeZookeeper {
    fn new() -> FakeZookeeper {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        FakeZookeeper { listener }
    }

    fn connect_string(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    /// Asserts that no process connected. The kernel completes connections into the backlog
    /// without `accept`, so an attempt made by a process that exited since is still seen.
    fn assert_untouched(&self, case: &str) {
        match self.listener.accept() {
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("{case}: the agent connected to ZooKeeper from {peer}"),
            Err(error) => panic!("{case}: accept failed: {error}"),
        }
    }
}

/// Runs `ochopod run` with only the given environment, the local binding and a fake
/// ZooKeeper, and returns its output once it exits.
fn run_agent(args: &[&str], env: &[(&str, &str)], zookeeper: &FakeZookeeper) -> Output {
    let mut command = Command::new(binary());
    command
        .arg("run")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("ochopod_local", "true")
        .env("ochopod_zk", zookeeper.connect_string())
        .env("PORT_8080", free_port().to_string());
    for (name, value) in env {
        command.env(name, value);
    }
    // An agent that wrongly starts would run until killed: bound the wait.
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the agent with {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts exit code 2, no ZooKeeper connection, and a message containing every word.
fn assert_start_error(case: &str, output: &Output, zookeeper: &FakeZookeeper, words: &[&str]) {
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{case}: {message}");
    for word in words {
        assert!(
            message.contains(word),
            "{case}: `{word}` missing in: {message}"
        );
    }
    zookeeper.assert_untouched(case);
}

fn toml_file(dir: &Path, contents: &str) -> String {
    let path = dir.join("settings.toml");
    fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}

fn write_hook(dir: &Path, name: &str, script: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn unknown_key_names_closest_setting() {
    let dir = tempfile::tempdir().unwrap();
    let zookeeper = FakeZookeeper::new();

    let file = toml_file(dir.path(), "gracee = 5\n");
    let output = run_agent(&["--config", &file, "--", "sleep", "1"], &[], &zookeeper);
    assert_start_error(
        "unknown key in the file",
        &output,
        &zookeeper,
        &["unknown setting `gracee`", "did you mean `grace`?", &file],
    );

    let output = run_agent(&["--gracee", "5"], &[], &zookeeper);
    assert_start_error(
        "unknown flag",
        &output,
        &zookeeper,
        &["--gracee", "--grace"],
    );
}

#[test]
fn wrong_types_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let zookeeper = FakeZookeeper::new();
    let file = toml_file(
        dir.path(),
        "grace = \"soon\"\nchecks = 1.5\ndepends_on = 5\nstrict = \"maybe\"\nport = 70000\n",
    );
    let output = run_agent(&["--config", &file], &[], &zookeeper);
    assert_start_error(
        "wrong types",
        &output,
        &zookeeper,
        &[
            "setting `grace`",
            "\"soon\"",
            "a number of seconds",
            "setting `checks`",
            "a whole number",
            "setting `depends_on`",
            "a list of strings",
            "setting `strict`",
            "a boolean",
            "setting `port`",
            "from 1 to 65535",
        ],
    );

    let output = run_agent(&[], &[("OCHOPOD_GRACE", "-1")], &zookeeper);
    assert_start_error(
        "negative grace in the environment",
        &output,
        &zookeeper,
        &["setting `grace`", "OCHOPOD_GRACE", "from 0 to 86400"],
    );
}

#[test]
fn unreadable_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let zookeeper = FakeZookeeper::new();

    let missing = dir.path().join("absent.toml");
    let missing = missing.to_string_lossy();
    let output = run_agent(&["--config", &missing], &[], &zookeeper);
    assert_start_error(
        "missing file",
        &output,
        &zookeeper,
        &["cannot read settings file", &missing, "No such file"],
    );

    let directory = dir.path().to_string_lossy();
    let output = run_agent(&["--config", &directory], &[], &zookeeper);
    assert_start_error(
        "directory",
        &output,
        &zookeeper,
        &["cannot read settings file", &directory],
    );

    let binary_file = dir.path().join("binary.toml");
    fs::write(&binary_file, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let binary_file = binary_file.to_string_lossy();
    let output = run_agent(&["--config", &binary_file], &[], &zookeeper);
    assert_start_error(
        "not UTF-8",
        &output,
        &zookeeper,
        &["cannot read settings file", "UTF-8"],
    );

    let file = toml_file(dir.path(), "grace = [\n");
    let output = run_agent(&["--config", &file], &[], &zookeeper);
    assert_start_error(
        "invalid TOML",
        &output,
        &zookeeper,
        &["is not valid TOML", &file],
    );
}

#[test]
fn hook_problems_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let zookeeper = FakeZookeeper::new();

    let missing = dir.path().join("absent").to_string_lossy().into_owned();
    let output = run_agent(
        &["--hooks", &format!("configure={missing}")],
        &[],
        &zookeeper,
    );
    assert_start_error(
        "missing hook",
        &output,
        &zookeeper,
        &[
            "hook `configure`",
            &missing,
            "does not exist",
            "hooks.configure",
        ],
    );

    let plain = dir.path().join("plain");
    fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
    let plain = plain.to_string_lossy().into_owned();
    let output = run_agent(&["--hooks", &format!("probe={plain}")], &[], &zookeeper);
    assert_start_error(
        "hook not executable",
        &output,
        &zookeeper,
        &["hook `probe`", "is not executable", "chmod +x"],
    );

    let directory = dir.path().to_string_lossy().into_owned();
    let output = run_agent(
        &["--hooks", &format!("finalize={directory}")],
        &[],
        &zookeeper,
    );
    assert_start_error(
        "hook is a directory",
        &output,
        &zookeeper,
        &["is not a file"],
    );

    let output = run_agent(&["--hooks", "configur=/bin/true"], &[], &zookeeper);
    assert_start_error(
        "unknown step",
        &output,
        &zookeeper,
        &["`hooks`", "\"configur\"", "configure"],
    );
}

#[test]
fn unusable_cwd_or_program_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let zookeeper = FakeZookeeper::new();

    let absent = dir.path().join("absent").to_string_lossy().into_owned();
    let output = run_agent(&["--cwd", &absent, "--", "sleep", "1"], &[], &zookeeper);
    assert_start_error(
        "missing cwd",
        &output,
        &zookeeper,
        &["setting `cwd`", &absent, "not a usable directory"],
    );

    let output = run_agent(
        &["--", "no-such-program-anywhere", "--flag"],
        &[],
        &zookeeper,
    );
    assert_start_error(
        "unknown program",
        &output,
        &zookeeper,
        &["`no-such-program-anywhere`", "searched PATH="],
    );

    let output = run_agent(&["--command", "./server --port 1"], &[], &zookeeper);
    assert_start_error(
        "relative program",
        &output,
        &zookeeper,
        &["`./server`", "looked at"],
    );

    // A configure hook may print another command, and a shell resolves its own words: neither
    // is judged at start.
    let hook = write_hook(dir.path(), "configure", "#!/bin/sh\nexit 0\n");
    let mut agent = Command::new(binary())
        .args([
            "run",
            "--hooks",
            &format!("configure={hook}"),
            "--",
            "no-such-program",
        ])
        .env_clear()
        .env("ochopod_local", "true")
        .env("ochopod_zk", zookeeper.connect_string())
        .env("ochopod_session_timeout", "1")
        .env("PORT_8080", free_port().to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(WAIT, "the agent connecting to ZooKeeper", || {
        zookeeper.listener.accept().is_ok()
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn missing_command_exits_2() {
    let zookeeper = FakeZookeeper::new();

    let output = run_agent(&[], &[], &zookeeper);
    assert_start_error(
        "no command and no configure hook",
        &output,
        &zookeeper,
        &[
            "no command to run",
            "after `--`",
            "`configure` hook",
            "`start = false`",
        ],
    );
}

/// `signaled` hook whose behaviour depends on the request body's `mode`.
const SIGNALED_HOOK: &str = r#"#!/bin/sh
body=$(cat)
case "$body" in
  *sleep*) echo $$ > sleeping; exec sleep 30 ;;
  *garbage*) echo "this is not JSON" ;;
  *fail*) echo "disk full on /data" >&2; exit 3 ;;
  *) echo '{"ok": true}' ;;
esac
"#;

#[test]
fn runtime_hook_failures_get_406() {
    let root = tempfile::tempdir().unwrap();
    let signaled = write_hook(root.path(), "signaled", SIGNALED_HOOK);
    let broken = write_hook(
        root.path(),
        "can_configure",
        "#!/nonexistent/interpreter\nexit 0\n",
    );
    let server = shared_server();
    let spec = PodSpec::new(&server.connect_string(), &unique_namespace("hooks"), "web")
        .env("ochopod_hook_timeout", "1")
        .env("ochopod_damper", "5")
        .arg("--hooks")
        .arg(&format!("signaled={signaled}"))
        .arg("--hooks")
        .arg(&format!("can_configure={broken}"))
        .shell("exec sleep 600");
    let pod = PodProcess::start(root.path(), "pod", &spec);
    wait_until(WAIT, "the control server", || pod.info().is_some());
    let port = pod.control_port;

    let (status, reply) = http(port, "POST", "/control/signal", r#"{"mode":"ok"}"#).unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["ok"], true);

    let started = Instant::now();
    let (status, reply) = http(port, "POST", "/control/signal", r#"{"mode":"sleep"}"#).unwrap();
    assert_406(
        &reply,
        status,
        &["hook `signaled`", "timed out after 1.0s", "hook_timeout"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let hook_pid: i32 = fs::read_to_string(pod.dir.join("sleeping"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(WAIT, "the timed-out hook gone", || {
        !Path::new(&format!("/proc/{hook_pid}")).exists()
    });

    let (status, reply) = http(port, "POST", "/control/signal", r#"{"mode":"garbage"}"#).unwrap();
    assert_406(
        &reply,
        status,
        &["signaled printed invalid JSON", "this is not JSON"],
    );

    let (status, reply) = http(port, "POST", "/control/signal", r#"{"mode":"fail"}"#).unwrap();
    assert_406(&reply, status, &["exit code 3", "disk full on /data"]);

    let view = r#"{"key": "a", "pods": {"a": {}}, "dependencies": {}}"#;
    let (status, reply) = http(port, "POST", "/control/check", view).unwrap();
    assert_406(
        &reply,
        status,
        &["can_configure failed", "could not start", &broken],
    );

    let log = pod.log_text();
    for reason in [
        "timed out after 1.0s",
        "signaled printed invalid JSON",
        "disk full on /data",
        "could not start",
    ] {
        assert!(log.contains(reason), "the log lacks `{reason}`");
    }
    let (status, _) = http(port, "GET", "/health", "").unwrap();
    assert_eq!(status, 200, "hook failures do not kill the pod");
}

fn assert_406(reply: &Value, status: u16, words: &[&str]) {
    assert_eq!(status, 406, "{reply}");
    let error = reply["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {reply}"));
    for word in words {
        assert!(error.contains(word), "`{word}` missing in: {error}");
    }
}

#[test]
fn configure_printing_invalid_json_kills_pod() {
    let root = tempfile::tempdir().unwrap();
    let configure = write_hook(
        root.path(),
        "configure",
        "#!/bin/sh\necho 'starting up...'\necho '{\"command\": '\n",
    );
    let server = shared_server();
    let spec = PodSpec::new(
        &server.connect_string(),
        &unique_namespace("configure"),
        "web",
    )
    .arg("--hooks")
    .arg(&format!("configure={configure}"))
    .shell("exec sleep 600");
    let pod = PodProcess::start(root.path(), "pod", &spec);

    wait_until(WAIT, "the pod dead after configure failed", || {
        pod.info().is_some_and(|info| info["process"] == "dead")
    });
    let (status, _) = http(pod.control_port, "GET", "/health", "").unwrap();
    assert_eq!(status, 503);
    let log = pod.log_text();
    assert!(log.contains("configure printed invalid output"), "{log}");
    assert!(log.contains("starting up..."), "the log quotes the output");
    assert!(log.contains("failed with 406"), "{log}");
}

#[test]
fn configure_outliving_control_timeout_starts_nothing() {
    let root = tempfile::tempdir().unwrap();
    // Counts its runs in the pod directory; the first run outlives the leader's 1 s timeout.
    let configure = write_hook(
        root.path(),
        "configure",
        "#!/bin/sh\ncount=$(( $(cat configures 2>/dev/null || echo 0) + 1 ))\necho $count > configures\n[ $count -gt 1 ] || sleep 2\n",
    );
    let server = shared_server();
    let spec = PodSpec::new(&server.connect_string(), &unique_namespace("late"), "web")
        .env("ochopod_control_timeout", "1")
        .arg("--hooks")
        .arg(&format!("configure={configure}"))
        .shell("cat configures >> starts; exec sleep 600");
    let pod = PodProcess::start(root.path(), "pod", &spec);

    wait_until(WAIT, "the sub-process running with an idle leader", || {
        pod.info()
            .is_some_and(|info| info["process"] == "running" && info["state"] == "leader")
    });
    let starts = fs::read_to_string(pod.dir.join("starts")).unwrap();
    assert_eq!(
        starts.lines().count(),
        1,
        "one start, by a request that did not time out: {starts}"
    );
    assert_ne!(
        starts.trim(),
        "1",
        "the sub-process started from the configure run whose request timed out"
    );
    let log = pod.log_text();
    assert!(
        log.contains("on: the request timed out during configure"),
        "{log}"
    );
}
