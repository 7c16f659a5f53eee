//! Tests of the ZooKeeper test harness in `tests/support` against real servers.

mod support;

use std::time::Duration;

use support::{
    four_letter, four_letter_with_timeout, shared_server, unique_namespace, wait_until, ZkEnsemble,
    ZkServer,
};
use zookeeper_client::{Acls, Client, CreateMode};

#[test]
fn standalone_server_serves() {
    let server = ZkServer::start();

    assert_eq!(
        server.connect_string(),
        format!("127.0.0.1:{}", server.port())
    );
    assert_eq!(
        four_letter(&server.connect_string(), "ruok").unwrap(),
        "imok"
    );
    assert_eq!(server.mode().as_deref(), Some("standalone"));

    let stat = server.four_letter("stat").unwrap();
    assert!(
        stat.contains("Mode: standalone"),
        "unexpected stat reply: {stat}"
    );
}

#[test]
fn stop_closes_port_and_restart_reopens_it() {
    let server = ZkServer::start();
    let port = server.port();
    let first_pid = server.pid().expect("server runs after start");

    server.stop();
    assert!(!server.is_running());
    assert!(server.pid().is_none());
    let error = four_letter(&server.connect_string(), "ruok").unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);

    server.restart();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(first_pid));
    assert_eq!(server.four_letter("ruok").unwrap(), "imok");
    assert_eq!(server.mode().as_deref(), Some("standalone"));
}

#[tokio::test]
async fn restart_keeps_znodes() {
    let server = ZkServer::start();
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());

    let client = Client::connect(&server.connect_string()).await.unwrap();
    client
        .create("/after-stop", b"stopped", &persistent)
        .await
        .unwrap();
    client
        .create("/after-kill", b"killed", &persistent)
        .await
        .unwrap();
    drop(client);

    // stop and restart block the runtime's only thread, so no client may be connected.
    server.stop();
    server.restart();
    let client = Client::connect(&server.connect_string()).await.unwrap();
    let (data, _) = client.get_data("/after-stop").await.unwrap();
    assert_eq!(data, b"stopped");
    drop(client);

    server.kill();
    assert!(!server.is_running());
    server.restart();
    let client = Client::connect(&server.connect_string()).await.unwrap();
    let (data, _) = client.get_data("/after-kill").await.unwrap();
    assert_eq!(data, b"killed");
}

#[test]
fn paused_server_replies_after_resume() {
    let server = ZkServer::start();

    server.pause();
    let error =
        four_letter_with_timeout(&server.connect_string(), "ruok", Duration::from_millis(300))
            .unwrap_err();
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "expected a read timeout from a paused server, got {error:?}"
    );

    server.resume();
    assert_eq!(server.four_letter("ruok").unwrap(), "imok");
}

#[test]
fn shared_server_starts_once() {
    let first = shared_server();
    let second = shared_server();

    assert!(std::ptr::eq(first, second));
    assert_eq!(first.four_letter("ruok").unwrap(), "imok");
}

#[test]
fn unique_namespace_differs_per_call() {
    let first = unique_namespace("harness");
    let second = unique_namespace("harness");

    assert_ne!(first, second);
    assert!(
        first.starts_with(&format!("harness-{}-", std::process::id())),
        "unexpected namespace {first}"
    );
}

#[test]
fn four_letter_rejects_remote_address() {
    let error = four_letter("192.0.2.1:2181", "ruok").unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn four_letter_rejects_invalid_command() {
    for command in ["ruok\n", "RUOK", "ru", "stats"] {
        let error = four_letter("127.0.0.1:2181", command).unwrap_err();
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::InvalidInput,
            "command {command:?}"
        );
    }
}

#[test]
fn ensemble_elects_one_leader_again() {
    let ensemble = ZkEnsemble::start(3);
    assert_eq!(ensemble.len(), 3);
    assert_eq!(ensemble.connect_string().split(',').count(), 3);

    let modes = ensemble.modes();
    let leaders = modes
        .iter()
        .filter(|mode| mode.as_deref() == Some("leader"))
        .count();
    let followers = modes
        .iter()
        .filter(|mode| mode.as_deref() == Some("follower"))
        .count();
    assert_eq!(leaders, 1, "modes: {modes:?}");
    assert_eq!(followers, 2, "modes: {modes:?}");

    // Losing the leader makes the two others elect one of them.
    let old_leader = ensemble.leader().expect("one leader after start");
    ensemble.server(old_leader).stop();
    let new_leader = ensemble.wait_for_leader(Duration::from_secs(30));
    assert_ne!(new_leader, old_leader);

    // The old leader rejoins as a follower.
    ensemble.server(old_leader).restart();
    wait_until(
        Duration::from_secs(30),
        "the old leader to rejoin as a follower",
        || ensemble.server(old_leader).mode().as_deref() == Some("follower"),
    );
    assert_eq!(ensemble.leader(), Some(new_leader));
}
