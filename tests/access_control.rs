//! The shared token end to end, with real `ochopod` pods on a real ZooKeeper server. Pods that
//! share a token form a cluster and reject control requests without it. Their read endpoints
//! stay open, and the token appears neither in `/info`, `/log`, the log file and printed
//! settings, nor in the sub-process environment.

mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::pods::{binary, field, http, http_with_headers, wait_formed, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until};

const WAIT: Duration = Duration::from_secs(30);

const TOKEN: &str = "9f2c4e7a1b3d5f60718293a4b5c6d7e8";

/// Sub-process that saves its environment, then sleeps.
const SAVE_ENV: &str = "env > environment; exec sleep 600";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn cluster_with_token_forms_and_guards_control() {
    let server = shared_server();
    let namespace = unique_namespace("token");
    let root = tempfile::tempdir().unwrap();
    let spec = || {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_token", TOKEN)
            .shell(SAVE_ENV)
    };
    let pods: Vec<PodProcess> = ["a", "b"]
        .iter()
        .map(|name| PodProcess::start(root.path(), name, &spec()))
        .collect();
    wait_formed(&pods, WAIT);
    let port = pods[0].control_port;

    for path in [
        "/control/check",
        "/control/kill",
        "/control/signal",
        "/reset",
    ] {
        let (status, reply) = http(port, "POST", path, "{}").unwrap();
        assert_eq!(status, 401, "{path} without token: {reply}");
        assert!(
            field(&reply, "error").contains("missing credentials"),
            "{reply}"
        );

        let wrong = bearer("0000000000000000000000000000000000");
        let (status, reply) =
            http_with_headers(port, "POST", path, "{}", &[("Authorization", &wrong)]).unwrap();
        assert_eq!(status, 401, "{path} with a wrong token: {reply}");
        assert!(!reply.to_string().contains(TOKEN));
    }

    let (status, reply) = http_with_headers(
        port,
        "POST",
        "/control/signal",
        "{}",
        &[("Authorization", &bearer(TOKEN))],
    )
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    let body = r#"{"from":"a signed request"}"#;
    let signature = ochopod::control::sign(&ochopod::settings::Token::new(TOKEN), body.as_bytes());
    let (status, reply) = http_with_headers(
        port,
        "POST",
        "/control/signal",
        body,
        &[("X-Ochopod-Signature", &signature)],
    )
    .unwrap();
    assert_eq!(status, 200, "{reply}");

    for path in ["/info", "/log", "/health", "/metrics"] {
        let (status, reply) = http(port, "GET", path, "").unwrap();
        assert_eq!(status, 200, "{path} is open: {reply}");
        assert!(!reply.to_string().contains(TOKEN), "{path} shows the token");
    }

    assert!(
        pods[0].log_text().contains("rejected POST"),
        "rejections are logged"
    );

    // The rejected requests changed nothing.
    for pod in &pods {
        let info = pod.info().unwrap();
        assert_eq!(field(&info, "process"), "running", "{info}");
        let log = pod.log_text();
        assert!(
            !log.contains(TOKEN),
            "the log file of a pod shows the token"
        );

        let environment = fs::read_to_string(pod.dir.join("environment")).unwrap();
        assert!(
            !environment.contains(TOKEN),
            "the sub-process got the token"
        );
        assert!(environment.contains("OCHOPOD_RUN_ID="), "{environment}");
    }
}

#[test]
fn pod_with_other_token_refuses_leader() {
    let server = shared_server();
    let namespace = unique_namespace("token-mismatch");
    let root = tempfile::tempdir().unwrap();
    let spec = |token: &str| {
        PodSpec::new(&server.connect_string(), &namespace, "web")
            .env("ochopod_token", token)
            .env("ochopod_damper", "1")
            .shell(SAVE_ENV)
    };
    let first = PodProcess::start(root.path(), "a", &spec(TOKEN));
    wait_formed(std::slice::from_ref(&first), WAIT);
    let second = PodProcess::start(root.path(), "b", &spec("another-token-of-the-right-length"));

    // The leader's rounds now fail on the second pod, which never starts its sub-process.
    wait_until(WAIT, "the leader reporting the 401", || {
        first.log_text().contains("answered 401 to check")
    });
    let info = second.info().unwrap();
    assert_eq!(field(&info, "process"), "stopped", "{info}");
    assert!(second.log_text().contains("rejected POST /control/check"));
}

#[test]
fn print_settings_redacts_token() {
    let output = Command::new(binary())
        .args(["run", "--print-settings", "--token", TOKEN])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(!printed.contains(TOKEN), "{printed}");
    let settings: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(settings["token"], "<redacted>");

    let output = Command::new(binary())
        .args(["run", "--print-settings"])
        .env_clear()
        .env("ochopod_token", "too short")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("`token`"), "{message}");
    assert!(!message.contains("too short"), "{message}");
}

#[test]
fn operator_commands_send_token() {
    let server = shared_server();
    let namespace = unique_namespace("token-cli");
    let root = tempfile::tempdir().unwrap();
    let spec = PodSpec::new(&server.connect_string(), &namespace, "web")
        .env("ochopod_token", TOKEN)
        .shell(SAVE_ENV);
    let pod = PodProcess::start(root.path(), "a", &spec);
    wait_formed(std::slice::from_ref(&pod), WAIT);

    let pattern = format!("{namespace}.web");
    let signal = |env: &[(&str, &str)], extra: &[&str]| {
        let mut command = Command::new(binary());
        command
            .args([
                "signal",
                &pattern,
                "--zk",
                &server.connect_string(),
                "--json",
            ])
            .args(extra)
            .env_clear()
            .env("RUST_LOG", "warn");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().unwrap()
    };

    let refused = signal(&[], &[]);
    assert_eq!(refused.status.code(), Some(1));
    let replies: Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(replies[0]["status"], 401, "{replies}");

    let accepted = signal(&[("ochopod_token", TOKEN)], &[]);
    assert_eq!(accepted.status.code(), Some(0), "{:?}", accepted);
    let accepted = signal(&[], &["--token", TOKEN]);
    assert_eq!(accepted.status.code(), Some(0), "{:?}", accepted);

    let invalid = signal(&[], &["--token", "short"]);
    assert_eq!(invalid.status.code(), Some(2));
    let message = String::from_utf8_lossy(&invalid.stderr);
    assert!(message.contains("invalid token"), "{message}");
    assert!(!message.contains("\"short\""), "{message}");

    let info = pod.info().unwrap();
    assert_eq!(field(&info, "process"), "running", "{info}");
}
