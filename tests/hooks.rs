//! The hook runner against real hook scripts in temporary directories.

#[allow(dead_code)]
#[path = "support/wait.rs"]
mod wait;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ochopod::cluster::{Cluster, Pods};
use ochopod::hooks::{HookError, HookRunner};
use ochopod::registration::Registration;
use ochopod::settings::Settings;
use ochopod::steps::{LifeCycle, Model, SubCommand, TearDown};
use ochopod::telemetry::Telemetry;
use serde_json::{json, Value};
use tempfile::TempDir;
use wait::wait_until;

/// Writes an executable shell script `name` into `directory`.
fn write_hook(directory: &Path, name: &str, body: &str) -> PathBuf {
    let path = directory.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Settings running the given hooks (step name, script body), with `$DIR` set to a scratch
/// directory in their environment. The pod starts no sub-process, so it needs no command.
fn settings_with(directory: &TempDir, hooks: &[(&str, &str)]) -> Settings {
    let hooks = hooks
        .iter()
        .map(|(step, body)| (step.to_string(), write_hook(directory.path(), step, body)))
        .collect();
    Settings {
        hooks,
        hook_timeout: 5.0,
        env: BTreeMap::from([("DIR".to_string(), directory.path().display().to_string())]),
        start: false,
        ..Settings::default()
    }
}

fn runner(settings: &Settings) -> HookRunner {
    HookRunner::validate(settings).unwrap();
    let telemetry = Arc::new(Telemetry::default());
    telemetry.update(|facts| facts.registration.cluster = "shop".to_string());
    HookRunner::new(settings, telemetry)
}

fn cluster() -> Cluster {
    let pod = |ip: &str| Registration {
        ip: ip.to_string(),
        ..Registration::default()
    };
    Cluster {
        key: "b".to_string(),
        pods: Pods::from([
            ("a".to_string(), pod("10.0.0.1")),
            ("b".to_string(), pod("10.0.0.2")),
        ]),
        dependencies: BTreeMap::new(),
    }
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn configure_reads_view_and_prints_command() {
    let directory = tempfile::tempdir().unwrap();
    let body = r#"cat > "$DIR/stdin.json"
printf '%s' "$ochopod" > "$DIR/facts.json"
printf '{"command": ["server", "%s"], "env": {"INDEX": "%s"}}' "$OCHOPOD_HOOK" "$OCHOPOD_INDEX""#;
    let runner = runner(&settings_with(&directory, &[("configure", body)]));

    let command = runner.configure(&cluster()).await.unwrap();
    assert_eq!(command.argv, ["server", "configure"]);
    assert_eq!(command.env["INDEX"], "1");

    let stdin: Cluster = serde_json::from_str(&read(directory.path().join("stdin.json"))).unwrap();
    assert_eq!(stdin, cluster());
    let facts: Value = serde_json::from_str(&read(directory.path().join("facts.json"))).unwrap();
    assert_eq!(facts["cluster"], "shop");
}

#[tokio::test]
async fn configure_without_output_keeps_static_command() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(&directory, &[("configure", "exit 0")]));
    assert_eq!(
        runner.configure(&cluster()).await.unwrap(),
        SubCommand::default()
    );
}

#[tokio::test]
async fn configure_invalid_output_fails() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(
        &directory,
        &[("configure", "echo 'starting up'")],
    ));
    let error = runner.configure(&cluster()).await.unwrap_err().to_string();
    assert!(error.contains("invalid output"), "{error}");
    assert!(error.contains("starting up"), "{error}");
}

#[tokio::test]
async fn hook_timeout_kills_its_group() {
    let directory = tempfile::tempdir().unwrap();
    let body = r#"sleep 30 >/dev/null & echo $! > "$DIR/child"; wait"#;
    let mut settings = settings_with(&directory, &[("can_configure", body)]);
    settings.hook_timeout = 0.3;
    let runner = runner(&settings);

    let started = Instant::now();
    let error = runner
        .can_configure(&cluster())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.contains("`can_configure`"), "{error}");
    assert!(error.contains("timed out after 300.0ms"), "{error}");

    let child: u32 = read(directory.path().join("child")).trim().parse().unwrap();
    wait_until(
        Duration::from_secs(5),
        "the hook's child to be killed and reaped",
        || !Path::new(&format!("/proc/{child}")).exists(),
    );
}

#[tokio::test]
async fn abandoned_hook_is_killed() {
    let directory = tempfile::tempdir().unwrap();
    let body = r#"sleep 30 >/dev/null & echo $! > "$DIR/child"; wait"#;
    let runner = runner(&settings_with(&directory, &[("can_configure", body)]));
    let view = cluster();

    // Drive the hook until its child is known, then drop it as a caller's time limit would.
    let mut hook = Box::pin(runner.can_configure(&view));
    let child: u32 = loop {
        tokio::select! {
            result = &mut hook => panic!("the hook ended on its own: {result:?}"),
            () = tokio::time::sleep(Duration::from_millis(25)) => {
                if let Ok(pid) = read(directory.path().join("child")).trim().parse() {
                    break pid;
                }
            }
        }
    };
    drop(hook);

    wait_until(
        Duration::from_secs(5),
        "the abandoned hook's child to be killed",
        || !Path::new(&format!("/proc/{child}")).exists(),
    );
}

#[tokio::test]
async fn non_zero_exit_reports_stderr() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(
        &directory,
        &[("configured", "echo progress; echo 'disk full' >&2; exit 3")],
    ));
    let error = runner.configured(&cluster()).await.unwrap_err().to_string();
    assert!(error.contains("`configured`"), "{error}");
    assert!(error.contains("exit code 3"), "{error}");
    assert!(error.ends_with("disk full"), "{error}");
}

#[tokio::test]
async fn steps_without_hooks_succeed() {
    let runner = runner(&Settings {
        start: false,
        ..Settings::default()
    });
    runner.initialize().await.unwrap();
    runner.can_configure(&cluster()).await.unwrap();
    assert_eq!(
        runner.configure(&cluster()).await.unwrap(),
        SubCommand::default()
    );
    assert_eq!(runner.sanity_check(1).await.unwrap(), None);
    assert_eq!(runner.tear_down(1).await.unwrap(), TearDown::Default);
    assert_eq!(runner.signaled(&json!({"a": 1})).await.unwrap(), json!({}));
    assert_eq!(runner.probe(&cluster()).await.unwrap(), "");
    runner.finalize().await.unwrap();
}

#[tokio::test]
async fn tear_down_hook_gets_pid() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(
        &directory,
        &[("tear_down", r#"echo "$OCHOPOD_PID" > "$DIR/pid""#)],
    ));
    assert_eq!(runner.tear_down(4321).await.unwrap(), TearDown::Requested);
    assert_eq!(read(directory.path().join("pid")).trim(), "4321");
}

#[tokio::test]
async fn sanity_check_sees_last_view_and_prints_metrics() {
    let directory = tempfile::tempdir().unwrap();
    let hooks = [
        ("configure", "exit 0"),
        (
            "sanity_check",
            r#"printf '{"pid": %s, "index": "%s"}' "$OCHOPOD_PID" "$OCHOPOD_INDEX""#,
        ),
    ];
    let runner = runner(&settings_with(&directory, &hooks));
    runner.configure(&cluster()).await.unwrap();

    let metrics = runner.sanity_check(77).await.unwrap();
    assert_eq!(metrics, Some(json!({"pid": 77, "index": "1"})));
}

#[tokio::test]
async fn signaled_gets_body_and_replies() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(
        &directory,
        &[("signaled", r#"printf '{"echo": %s}' "$(cat)""#)],
    ));
    let reply = runner.signaled(&json!({"action": "flush"})).await.unwrap();
    assert_eq!(reply, json!({"echo": {"action": "flush"}}));
}

#[tokio::test]
async fn probe_prints_status() {
    let directory = tempfile::tempdir().unwrap();
    let runner = runner(&settings_with(
        &directory,
        &[("probe", "echo '2 pods serving'")],
    ));
    assert_eq!(runner.probe(&cluster()).await.unwrap(), "2 pods serving");
}

#[test]
fn validate_accepts_executable_hooks() {
    let directory = tempfile::tempdir().unwrap();
    let settings = settings_with(&directory, &[("configure", "exit 0"), ("probe", "exit 0")]);
    assert_eq!(HookRunner::validate(&settings), Ok(()));
}

#[test]
fn validate_rejects_missing_hook() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("absent");
    let settings = Settings {
        hooks: BTreeMap::from([("configure".to_string(), path.clone())]),
        ..Settings::default()
    };
    let error = HookRunner::validate(&settings).unwrap_err();
    assert_eq!(
        error,
        HookError::Missing {
            name: "configure".to_string(),
            path: path.clone()
        }
    );
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()) && message.contains("hooks.configure"),
        "{message}"
    );
}

#[test]
fn validate_rejects_non_executable_hook() {
    let directory = tempfile::tempdir().unwrap();
    let path = write_hook(directory.path(), "check", "exit 0");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings = Settings {
        hooks: BTreeMap::from([("can_configure".to_string(), path.clone())]),
        ..Settings::default()
    };
    let error = HookRunner::validate(&settings).unwrap_err();
    assert!(
        matches!(error, HookError::NotExecutable { mode: 0o644, .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("chmod +x {}", path.display())),
        "{error}"
    );
}

#[test]
fn validate_rejects_directory() {
    let directory = tempfile::tempdir().unwrap();
    let settings = Settings {
        hooks: BTreeMap::from([("finalize".to_string(), directory.path().to_path_buf())]),
        ..Settings::default()
    };
    let error = HookRunner::validate(&settings).unwrap_err();
    assert!(matches!(error, HookError::NotAFile { .. }), "{error:?}");
}

#[test]
fn validate_suggests_step_for_unknown_name() {
    let directory = tempfile::tempdir().unwrap();
    let settings = settings_with(&directory, &[("sanity-check", "exit 0")]);
    let error = HookRunner::validate(&settings).unwrap_err();
    assert_eq!(
        error,
        HookError::UnknownStep {
            name: "sanity-check".to_string(),
            suggestion: Some("sanity_check")
        }
    );
    assert!(
        error.to_string().contains("did you mean `sanity_check`?"),
        "{error}"
    );
}

#[test]
fn validate_rejects_pod_without_command() {
    let directory = tempfile::tempdir().unwrap();
    let without_command = Settings {
        start: true,
        ..settings_with(&directory, &[("probe", "exit 0")])
    };
    let error = HookRunner::validate(&without_command).unwrap_err();
    assert_eq!(error, HookError::NoCommand);
    let message = error.to_string();
    assert!(message.contains("no command to run"), "{message}");
    assert!(message.contains("`configure` hook"), "{message}");
    assert!(message.contains("`start = false`"), "{message}");

    // Any one of a static command, a `configure` hook or `start = false` is enough.
    let with_command = Settings {
        command: Some("sleep 1".to_string()),
        ..without_command.clone()
    };
    assert_eq!(HookRunner::validate(&with_command), Ok(()));
    let with_argv = Settings {
        argv: vec!["sleep".to_string(), "1".to_string()],
        ..without_command.clone()
    };
    assert_eq!(HookRunner::validate(&with_argv), Ok(()));
    let with_configure = Settings {
        start: true,
        ..settings_with(&directory, &[("configure", "exit 0")])
    };
    assert_eq!(HookRunner::validate(&with_configure), Ok(()));
    let configure_only = Settings {
        start: false,
        ..without_command
    };
    assert_eq!(HookRunner::validate(&configure_only), Ok(()));
}

#[test]
fn problems_lists_every_problem() {
    let directory = tempfile::tempdir().unwrap();
    let absent = directory.path().join("absent");
    let plain = write_hook(directory.path(), "plain", "exit 0");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings = Settings {
        hooks: BTreeMap::from([
            ("can_configure".to_string(), absent.clone()),
            ("probe".to_string(), plain.clone()),
        ]),
        ..Settings::default()
    };

    let problems = HookRunner::problems(&settings);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert_eq!(
        problems[0],
        HookError::Missing {
            name: "can_configure".to_string(),
            path: absent
        }
    );
    assert!(
        matches!(&problems[1], HookError::NotExecutable { name, path, .. } if name == "probe" && *path == plain),
        "{:?}",
        problems[1]
    );
    assert_eq!(problems[2], HookError::NoCommand);
}
