//! The `ochopod` binary's command line: settings errors and precedence, `check-config`, and the
//! operator commands against a real ZooKeeper server and fake control servers on 127.0.0.1.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use support::pods::{binary, free_port};
use support::{shared_server, unique_namespace};
use zookeeper_client::{Acls, Client, CreateMode};

/// Builds a command of the binary with only the given environment variables.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary());
    command.args(args).env_clear().env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Runs the binary with only the given environment variables.
fn ochopod(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("run the ochopod binary")
}

/// Runs the binary with its stdout on a pipe whose reader is already closed, as in
/// `ochopod ls | head -0`.
fn ochopod_into_closed_pipe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command(args, env)
        .stdout(writer)
        .output()
        .expect("run the ochopod binary")
}

/// Checks that a command whose stdout was closed ended as a Unix tool does: killed by SIGPIPE,
/// without a panic message.
fn assert_ended_by_sigpipe(args: &[&str], output: &Output) {
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGPIPE),
        "{args:?}: {:?}, stderr: {}",
        output.status,
        stderr(output)
    );
    assert!(
        !stderr(output).contains("panicked"),
        "{args:?}: {}",
        stderr(output)
    );
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn toml_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

#[test]
fn run_port_zero_exits_2() {
    let output = ochopod(&["run", "--port", "0"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("setting `port` (from flag --port)"),
        "{message}"
    );
    assert!(message.contains("from 1 to 65535"), "{message}");
}

#[test]
fn run_reports_every_invalid_setting() {
    let output = ochopod(
        &["run", "--damper", "-1", "--binding", "mesos"],
        &[("OCHOPOD_CLUSTER", "a.b")],
    );
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("setting `damper` (from flag --damper)"),
        "{message}"
    );
    assert!(
        message.contains("setting `binding` (from flag --binding)"),
        "{message}"
    );
    assert!(
        message.contains("setting `cluster` (from environment variable OCHOPOD_CLUSTER)"),
        "{message}"
    );
}

#[test]
fn print_settings_shows_precedence() {
    let file = toml_file("damper = 5\ncluster = \"from-file\"\ngrace = 7\n[env]\nA = \"1\"\n");
    let config = file.path().to_str().unwrap();
    let output = ochopod(
        &[
            "run",
            "--config",
            config,
            "--grace",
            "9",
            "--strict",
            "--print-settings",
            "--",
            "sleep",
            "3",
        ],
        &[
            ("ochopod_cluster", "from-env"),
            ("OCHOPOD_GRACE", "8"),
            ("OCHOPOD_DEPENDS_ON", "zookeeper,kafka-*"),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let settings: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(settings["damper"], 5.0);
    assert_eq!(settings["cluster"], "from-env");
    assert_eq!(settings["grace"], 9.0);
    assert_eq!(settings["strict"], true);
    assert_eq!(settings["depends_on"], json!(["zookeeper", "kafka-*"]));
    assert_eq!(settings["env"], json!({"A": "1"}));
    assert_eq!(settings["port"], 8080);
}

/// Writes an executable shell script `name` into `directory`.
fn write_hook(directory: &Path, name: &str) -> PathBuf {
    let path = directory.join(name);
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn check_config_accepts_valid_file() {
    let directory = tempfile::tempdir().unwrap();
    write_hook(directory.path(), "configure.sh");
    let file = directory.path().join("settings.toml");
    std::fs::write(&file, "cluster = \"redis\"\nnamespace = \"shop.staging\"\ndepends_on = [\"zookeeper\"]\n[hooks]\nconfigure = \"./configure.sh\"\n").unwrap();
    let output = ochopod(
        &["check-config", file.to_str().unwrap()],
        &[("OCHOPOD_PORT", "0")],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "the environment must not count: {}",
        stderr(&output)
    );
    assert!(stdout(&output).starts_with("OK: "), "{}", stdout(&output));
}

#[test]
fn check_config_reports_hook_problems() {
    let directory = tempfile::tempdir().unwrap();
    let plain = write_hook(directory.path(), "probe.sh");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The settings file names it relative to its own directory.
    let plain = directory.path().join("./probe.sh");
    let file = directory.path().join("settings.toml");
    std::fs::write(
        &file,
        "command = \"sleep 1\"\n[hooks]\nconfigure = \"./absent.sh\"\nprobe = \"./probe.sh\"\n",
    )
    .unwrap();

    let output = ochopod(&["check-config", file.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 2, "{message}");
    let absent = directory.path().join("./absent.sh");
    assert!(
        message.contains(&format!(
            "hook `configure`: {} does not exist",
            absent.display()
        )),
        "{message}"
    );
    assert!(message.contains("hooks.configure"), "{message}");
    assert!(
        message.contains(&format!(
            "hook `probe`: {} is not executable",
            plain.display()
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("chmod +x {}", plain.display())),
        "{message}"
    );
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
}

#[test]
fn check_config_requires_command() {
    let file = toml_file("cluster = \"redis\"\n");
    let path = file.path().to_str().unwrap();
    let output = ochopod(&["check-config", path], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("no command to run"),
        "{}",
        stderr(&output)
    );

    // The command that `run` would get after `--` counts.
    let search_path = std::env::var("PATH").unwrap_or_default();
    let output = ochopod(
        &["check-config", path, "--", "sleep", "1"],
        &[("PATH", &search_path)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let configure_only = toml_file("cluster = \"redis\"\nstart = false\n");
    let output = ochopod(
        &["check-config", configure_only.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn check_config_reports_every_error() {
    let file = toml_file("port = 0\ndampr = 3\ncluster = \"a.b\"\ngrace = \"long\"\n");
    let output = ochopod(&["check-config", file.path().to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));

    let message = stderr(&output);
    assert_eq!(message.lines().count(), 4, "{message}");
    assert!(message.contains("setting `port`"), "{message}");
    assert!(
        message.contains("unknown setting `dampr`") && message.contains("did you mean `damper`?"),
        "{message}"
    );
    assert!(message.contains("setting `cluster`"), "{message}");
    assert!(
        message.contains("setting `grace`") && message.contains("\"long\""),
        "{message}"
    );
}

#[test]
fn check_config_missing_file() {
    let output = ochopod(&["check-config", "/nonexistent/ochopod.toml"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("cannot read settings file /nonexistent/ochopod.toml"),
        "{message}"
    );
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn invalid_operator_arguments_exit_2() {
    for (args, expected) in [
        (
            vec!["ls", "--zk", "host:0"],
            "invalid ZooKeeper connection string",
        ),
        (vec!["info", "shop.*#x"], "is not a pod seq"),
        (vec!["on", "shop.*", "--timeout", "-1"], "invalid --timeout"),
        (
            vec!["signal", "shop.*", "--body", "{oops"],
            "invalid --body",
        ),
    ] {
        let output = ochopod(&args, &[]);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

/// Requests a fake control server received: method, path and body.
type Requests = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Starts a control server on 127.0.0.1 that plays a running leader pod, and returns its port.
fn fake_pod() -> (u16, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Requests::default();
    let seen = requests.clone();

    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();

            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let body_json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock().unwrap().push((method, path.clone(), body_json));

            let reply = match path.as_str() {
                "/info" => json!({"state": "leader", "process": "running", "dependencies": ["db"]}),
                "/log" => json!(["first line", "second line"]),
                _ => json!({}),
            }
            .to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, requests)
}

fn registration(namespace: &str, cluster: &str, seq: i64, control_port: u16) -> Value {
    json!({
        "application": "app", "task": "task", "node": "local", "seq": seq, "zk": "", "binding": "local",
        "namespace": namespace, "cluster": cluster, "port": "8080", "ip": "127.0.0.1", "public": "127.0.0.1",
        "ports": {"8080": control_port}, "debug": false, "local": true, "status": format!("status {seq}"),
        "version": "test",
    })
}

/// Creates `path` with `data` and any missing parent, as persistent znodes.
async fn create(client: &Client, path: &str, data: &[u8]) {
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let mut parent = String::new();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for (index, part) in parts.iter().enumerate() {
        parent.push('/');
        parent.push_str(part);
        let content: &[u8] = if index + 1 == parts.len() { data } else { b"" };
        match client.create(&parent, content, &options).await {
            Ok(_) | Err(zookeeper_client::Error::NodeExists) => {}
            Err(error) => panic!("cannot create {parent}: {error}"),
        }
    }
}

/// Registers two pods of `<namespace>.web`, one served by a fake control server and one whose
/// control port is closed, plus a snapshot of `<namespace>.db`.
fn populate(namespace: &str, live_port: u16, dead_port: u16) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::connect(&shared_server().connect_string())
            .await
            .unwrap();
        let base = format!("/ochopod/clusters/{namespace}");
        let live = registration(namespace, "web", 3, live_port).to_string();
        let dead = registration(namespace, "web", 4, dead_port).to_string();
        create(
            &client,
            &format!("{base}.web/pods/key-a.0000000003"),
            live.as_bytes(),
        )
        .await;
        create(
            &client,
            &format!("{base}.web/pods/key-b.0000000004"),
            dead.as_bytes(),
        )
        .await;
        let snapshot = json!({"key-z": registration(namespace, "db", 1, 9999)}).to_string();
        create(&client, &format!("{base}.db/snapshot"), snapshot.as_bytes()).await;
    });
}

#[test]
fn operator_commands_against_zookeeper() {
    let zk = shared_server().connect_string();
    let namespace = unique_namespace("cli");
    let (live_port, requests) = fake_pod();
    let dead_port = free_port();
    populate(&namespace, live_port, dead_port);
    let web = format!("{namespace}.web");

    // ls, as JSON: both pods, the unreachable one marked so.
    let output = ochopod(
        &["ls", &format!("{namespace}.*"), "--zk", &zk, "--json"],
        &[],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let pods: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let pods = pods.as_array().unwrap();
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert_eq!(pods[0]["cluster"], web.as_str());
    assert_eq!(pods[0]["seq"], 3);
    assert_eq!(pods[0]["state"], "leader");
    assert_eq!(pods[0]["process"], "running");
    assert_eq!(pods[0]["status"], "status 3");
    assert_eq!(pods[1]["seq"], 4);
    assert_eq!(pods[1]["state"], "unreachable");
    assert!(pods[1]["error"]
        .as_str()
        .unwrap()
        .contains(&dead_port.to_string()));

    // ls, as a table.
    let output = ochopod(&["ls", &web, "--zk", &zk, "--timeout", "2"], &[]);
    let table = stdout(&output);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("CLUSTER") && lines[0].contains("PROCESS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(&web) && lines[1].contains(&format!("8080:{live_port}")),
        "{table}"
    );
    assert!(
        lines[1].contains("leader") && lines[1].contains("running"),
        "{table}"
    );

    // on, to one pod: the body is the view its leader would send.
    let output = ochopod(&["on", &format!("{web}#3"), "--zk", &zk], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let control = requests
        .lock()
        .unwrap()
        .iter()
        .find(|(_, path, _)| path.starts_with("/control/"))
        .cloned();
    let (method, path, view) = control.expect("the pod got a control request");
    assert_eq!(method, "POST");
    assert_eq!(path, "/control/on/60");
    assert_eq!(view["key"], "key-a");
    assert_eq!(view["pods"]["key-b"]["seq"], 4);
    assert_eq!(view["dependencies"]["db"]["key-z"]["cluster"], "db");

    // off, to the cluster: one pod does not reply, so the exit code is 1.
    let output = ochopod(&["off", &web, "--zk", &zk, "--timeout", "2"], &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(requests
        .lock()
        .unwrap()
        .iter()
        .any(|(_, path, _)| path == "/control/off/2"));
    assert!(
        stdout(&output).contains("unreachable"),
        "{}",
        stdout(&output)
    );

    // log, to one pod.
    let output = ochopod(&["log", &format!("{web}#3"), "--zk", &zk], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("first line\nsecond line\n"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn operator_commands_without_match() {
    let zk = shared_server().connect_string();
    let pattern = format!("{}.*", unique_namespace("none"));

    // `ls` of an empty set is a valid listing.
    let output = ochopod(&["ls", &pattern, "--zk", &zk, "--json"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&output)).unwrap(),
        json!([])
    );
    let output = ochopod(&["ls", &pattern, "--zk", &zk], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output).lines().count(), 1, "{}", stdout(&output));
    assert!(
        stdout(&output).starts_with("CLUSTER"),
        "{}",
        stdout(&output)
    );

    // A command that acts on pods and finds none fails.
    for verb in ["info", "log", "on", "off", "kill", "reset", "signal"] {
        let output = ochopod(&[verb, &pattern, "--zk", &zk], &[]);
        assert_eq!(output.status.code(), Some(1), "{verb}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(&format!("no pod matches `{pattern}`")),
            "{verb}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).is_empty(), "{verb}: {}", stdout(&output));
    }
}

#[test]
fn help_lists_exit_codes() {
    let output = ochopod(&["--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout(&output);
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(
        help.contains("`ls` also exits 0 when no pod matches"),
        "{help}"
    );
    assert!(help.contains("a pattern that matches no pod"), "{help}");
    assert!(help.contains("141"), "{help}");

    let output = ochopod(&["ls", "--help"], &[]);
    assert!(
        stdout(&output).contains("also when no pod matches"),
        "{}",
        stdout(&output)
    );

    for verb in ["info", "log", "on", "off", "kill", "reset", "signal"] {
        let output = ochopod(&[verb, "--help"], &[]);
        assert!(
            stdout(&output).contains("when no pod matches the pattern"),
            "{verb}: {}",
            stdout(&output)
        );
    }
}

#[test]
fn operator_commands_without_zookeeper() {
    let zk = format!("127.0.0.1:{}", free_port());
    let output = ochopod(&["ls", "--zk", &zk, "--timeout", "1"], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!("cannot connect to ZooKeeper at {zk}")),
        "{}",
        stderr(&output)
    );
}

#[test]
fn closed_stdout_ends_by_sigpipe() {
    let zk = shared_server().connect_string();
    let namespace = unique_namespace("pipe");
    let (live_port, _requests) = fake_pod();
    populate(&namespace, live_port, free_port());
    let live_pod = format!("{namespace}.web#3");
    let no_match = format!("{}.*", unique_namespace("none"));
    let file = toml_file("cluster = \"redis\"\nstart = false\n");
    let config = file.path().to_str().unwrap();

    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "--print-settings", "--", "sleep", "1"],
        vec!["check-config", config],
        vec!["ls", &no_match, "--zk", &zk],
        vec!["ls", &no_match, "--zk", &zk, "--json"],
        vec!["ls", &live_pod, "--zk", &zk],
        vec!["info", &live_pod, "--zk", &zk],
        vec!["log", &live_pod, "--zk", &zk],
        vec!["off", &live_pod, "--zk", &zk],
        vec!["signal", &live_pod, "--zk", &zk, "--json"],
    ];
    for args in cases {
        let output = ochopod_into_closed_pipe(&args, &[]);
        assert_ended_by_sigpipe(&args, &output);
    }
}
