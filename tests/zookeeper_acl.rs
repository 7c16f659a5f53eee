//! ZooKeeper digest authentication end to end, with real `ochopod` pods on real ZooKeeper
//! servers. Pods that share `zookeeper_auth` form a cluster whose znodes grant every right to
//! their digest identity and READ to anyone. Other clients can read but not change them, pods
//! with other credentials cannot join and log why, and the password appears nowhere.

mod support;

use std::fs;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::pods::{binary, field, http, wait_formed, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until, wait_until_async, ZkServer};
use zookeeper_client as zk;

const WAIT: Duration = Duration::from_secs(30);

const USER: &str = "shop";
const PASSWORD: &str = "7c1e4a9b2d5f8a0c3e6b";
const OTHER_PASSWORD: &str = "0000aaaa1111bbbb2222";

/// Sub-process that saves its environment, then sleeps.
const SAVE_ENV: &str = "env > environment; exec sleep 600";

fn auth(password: &str) -> String {
    format!("{USER}:{password}")
}

fn pod_spec(zk: &str, namespace: &str, cluster: &str, auth: Option<&str>) -> PodSpec {
    let spec = PodSpec::new(zk, namespace, cluster).shell(SAVE_ENV);
    match auth {
        Some(auth) => spec.env("ochopod_zookeeper_auth", auth),
        None => spec,
    }
}

async fn client(connect: &str, auth: Option<&str>) -> zk::Client {
    let connector = zk::Client::connector().with_session_timeout(Duration::from_secs(10));
    let connector = match auth {
        Some(auth) => connector.with_auth("digest", auth.as_bytes()),
        None => connector,
    };
    connector.connect(connect).await.unwrap()
}

/// Checks that `acls` grant ALL to the digest identity of `USER` and READ to anyone, and
/// nothing else.
fn assert_protected(acls: &[zk::Acl], path: &str) {
    assert_eq!(acls.len(), 2, "{path}: {acls:?}");
    let digest = acls
        .iter()
        .find(|acl| acl.scheme() == "digest")
        .unwrap_or_else(|| panic!("{path} has no digest ACL: {acls:?}"));
    assert_eq!(digest.permission(), zk::Permission::ALL, "{path}: {acls:?}");
    assert!(
        digest.id().starts_with(&format!("{USER}:")),
        "{path}: {acls:?}"
    );
    assert!(!digest.id().contains(PASSWORD), "{path}: {acls:?}");
    let world = acls
        .iter()
        .find(|acl| acl.scheme() == "world")
        .unwrap_or_else(|| panic!("{path} has no world ACL: {acls:?}"));
    assert_eq!(world.id(), "anyone", "{path}: {acls:?}");
    assert_eq!(world.permission(), zk::Permission::READ, "{path}: {acls:?}");
}

fn ochopod(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command.args(args).env_clear().env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run the ochopod binary")
}

#[tokio::test]
async fn cluster_with_auth_protects_znodes() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD)));
    let pods: Vec<PodProcess> = ["a", "b", "c"]
        .iter()
        .map(|name| PodProcess::start(root.path(), name, &spec))
        .collect();
    wait_formed(&pods.iter().collect::<Vec<_>>(), WAIT);

    let anonymous = client(&connect, None).await;
    let stranger = client(&connect, Some(&auth(OTHER_PASSWORD))).await;
    let hash_path = format!("/ochopod/clusters/{cluster}/hash");
    let snapshot_path = format!("/ochopod/clusters/{cluster}/snapshot");
    wait_until_async(WAIT, "the snapshot and hash written", || async {
        anonymous.check_stat(&hash_path).await.unwrap().is_some()
    })
    .await;

    // Every znode of the cluster: digest ALL and world READ, read by a client without
    // credentials.
    let pods_path = format!("/ochopod/clusters/{cluster}/pods");
    let coordinator_path = format!("/ochopod/clusters/{cluster}/coordinator");
    let registrations = anonymous.list_children(&pods_path).await.unwrap();
    assert_eq!(registrations.len(), 3, "{registrations:?}");
    let locks = anonymous.list_children(&coordinator_path).await.unwrap();
    assert_eq!(locks.len(), 3, "{locks:?}");
    let mut paths = vec![
        format!("/ochopod/clusters/{cluster}"),
        pods_path.clone(),
        coordinator_path.clone(),
        snapshot_path.clone(),
        hash_path.clone(),
    ];
    paths.extend(
        registrations
            .iter()
            .map(|child| format!("{pods_path}/{child}")),
    );
    paths.extend(
        locks
            .iter()
            .map(|child| format!("{coordinator_path}/{child}")),
    );
    let owner = client(&connect, Some(&auth(PASSWORD))).await;
    for path in &paths {
        let (acls, _) = anonymous.get_acl(path).await.unwrap();
        assert_protected(&acls, path);
        // ZooKeeper (3.8) shows the password digest only to callers with ADMIN permission.
        assert_eq!(acls[0].id(), format!("{USER}:x"), "{path}: {acls:?}");
        let (acls, _) = owner.get_acl(path).await.unwrap();
        assert_protected(&acls, path);
        assert_eq!(acls[0].id().len(), USER.len() + 1 + 28, "{path}: {acls:?}");
    }
    let (shared, _) = anonymous.get_acl("/ochopod/clusters").await.unwrap();
    assert_eq!(
        &shared[..],
        &*zk::Acls::anyone_all(),
        "the shared parent stays open for other clusters"
    );

    // Others read everything but change nothing.
    let (hash, _) = anonymous.get_data(&hash_path).await.unwrap();
    let (snapshot, _) = anonymous.get_data(&snapshot_path).await.unwrap();
    let snapshot: Value = serde_json::from_slice(&snapshot).unwrap();
    assert_eq!(snapshot.as_object().unwrap().len(), 3, "{snapshot}");
    let registration = format!("{pods_path}/{}", registrations[0]);
    anonymous.get_data(&registration).await.unwrap();
    for other in [&anonymous, &stranger] {
        for path in [&hash_path, &snapshot_path, &registration] {
            assert_eq!(
                other.set_data(path, b"{}", None).await.err(),
                Some(zk::Error::NoAuth),
                "set {path}"
            );
            assert_eq!(
                other.delete(path, None).await,
                Err(zk::Error::NoAuth),
                "delete {path}"
            );
            assert_eq!(
                other
                    .set_acl(path, &zk::Acls::anyone_all(), None)
                    .await
                    .err(),
                Some(zk::Error::NoAuth),
                "set the ACL of {path}"
            );
        }
        let sequential = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        for (directory, name) in [(&pods_path, "fake."), (&coordinator_path, "fake-lock-")] {
            let result = other
                .create(&format!("{directory}/{name}"), b"{}", &sequential)
                .await;
            assert_eq!(
                result.err(),
                Some(zk::Error::NoAuth),
                "create in {directory}"
            );
        }
    }
    let (unchanged, _) = anonymous.get_data(&hash_path).await.unwrap();
    assert_eq!(unchanged, hash);

    // The password shows nowhere: not in /info, /log, the log file or the sub-process.
    for pod in &pods {
        for path in ["/info", "/log"] {
            let (status, reply) = http(pod.control_port, "GET", path, "").unwrap();
            assert_eq!(status, 200, "{path}: {reply}");
            assert!(!reply.to_string().contains(PASSWORD), "{path} shows it");
        }
        assert!(!pod.log_text().contains(PASSWORD), "the log file shows it");
        let environment = fs::read_to_string(pod.dir.join("environment")).unwrap();
        assert!(
            !environment.contains(PASSWORD),
            "the sub-process got the password"
        );
        assert!(
            !environment
                .to_lowercase()
                .contains("ochopod_zookeeper_auth"),
            "{environment}"
        );
        let info = pod.info().unwrap();
        assert_eq!(info["zookeeper_error"], Value::Null, "{info}");
    }

    // A new session (after /reset, as after an expiry) authenticates again: the pod's new
    // registration is protected like the first one.
    let info = pods[1].info().unwrap();
    let seq = info["seq"].as_i64().unwrap();
    let child = registrations
        .iter()
        .find(|child| ochopod::registration::parse_child_name(child).map(|(_, s)| s) == Some(seq))
        .unwrap()
        .clone();
    let path = format!("{pods_path}/{child}");
    let (_, before) = anonymous.get_data(&path).await.unwrap();
    let (status, reply) = http(pods[1].control_port, "POST", "/reset", "{}").unwrap();
    assert_eq!(status, 200, "{reply}");
    wait_until_async(WAIT, "the registration on a new session", || async {
        match anonymous.check_stat(&path).await.unwrap() {
            Some(stat) => stat.ephemeral_owner != before.ephemeral_owner,
            None => false,
        }
    })
    .await;
    let (acls, _) = anonymous.get_acl(&path).await.unwrap();
    assert_protected(&acls, &path);
    wait_formed(&pods.iter().collect::<Vec<_>>(), WAIT);
}

#[test]
fn pod_with_other_auth_cannot_join() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-mismatch");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let first = PodProcess::start(
        root.path(),
        "a",
        &pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD))),
    );
    wait_formed(&[&first], WAIT);

    let stranger = PodProcess::start(
        root.path(),
        "b",
        &pod_spec(&connect, &namespace, "web", Some(&auth(OTHER_PASSWORD))),
    );
    let anonymous = PodProcess::start(
        root.path(),
        "c",
        &pod_spec(&connect, &namespace, "web", None),
    );

    let pods_path = format!("/ochopod/clusters/{cluster}/pods");
    let denied = format!("denied the request on {pods_path}");
    wait_until(WAIT, "the denial logged by both pods", || {
        stranger.log_text().contains(&denied) && anonymous.log_text().contains(&denied)
    });
    let log = stranger.log_text();
    assert!(log.contains("digest user `shop`"), "{log}");
    assert!(
        log.contains("differ from those of the pods that created the cluster's znodes"),
        "{log}"
    );
    assert!(
        anonymous
            .log_text()
            .contains("requires credentials. Set `zookeeper_auth`"),
        "{}",
        anonymous.log_text()
    );
    let info = stranger.info().unwrap();
    assert!(field(&info, "zookeeper_error").contains(&denied), "{info}");
    assert_eq!(field(&info, "process"), "stopped", "{info}");

    // The retries back off: 1, 2, 4 s... so over 8 s a few denials, not one a second.
    let started = stranger.log_text().matches(&denied).count();
    std::thread::sleep(Duration::from_secs(8));
    let log = stranger.log_text();
    let later = log.matches(&denied).count() - started;
    assert!(
        (1..=4).contains(&later),
        "{later} denials in 8 s after the first {started}:\n{log}"
    );
    assert!(log.contains("retrying in 4 s"), "{log}");
    assert!(!log.contains(OTHER_PASSWORD), "the log shows the password");

    // The cluster keeps running with its one pod.
    let info = first.info().unwrap();
    assert_eq!(field(&info, "state"), "leader", "{info}");
    assert_eq!(field(&info, "process"), "running", "{info}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let children = runtime.block_on(async {
        client(&connect, None)
            .await
            .list_children(&pods_path)
            .await
            .unwrap()
    });
    assert_eq!(children.len(), 1, "{children:?}");
    assert!(!first.log_text().contains(PASSWORD));
}

#[tokio::test]
async fn changed_acls_block_election_and_round() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-changed");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD)));
    let first = PodProcess::start(root.path(), "a", &spec);
    wait_formed(&[&first], WAIT);

    // An operator leaves the lock directory and the hash readable only, even to the cluster.
    let owner = client(&connect, Some(&auth(PASSWORD))).await;
    let coordinator_path = format!("/ochopod/clusters/{cluster}/coordinator");
    let hash_path = format!("/ochopod/clusters/{cluster}/hash");
    wait_until_async(WAIT, "the hash written", || async {
        owner.check_stat(&hash_path).await.unwrap().is_some()
    })
    .await;
    for path in [&coordinator_path, &hash_path] {
        owner
            .set_acl(path, &zk::Acls::anyone_read(), None)
            .await
            .unwrap();
    }

    // The second pod registers but cannot take part in the election, and the leader's round
    // that adds it cannot store its outcome.
    let second = PodProcess::start(root.path(), "b", &spec);
    let election_denied = format!(
        "election lock creation failed: ZooKeeper denied the request on {coordinator_path}"
    );
    let write_denied =
        format!("cannot write the snapshot and hash: ZooKeeper denied the request on {hash_path}");
    wait_until(WAIT, "the election denial logged", || {
        second.log_text().contains(&election_denied)
    });
    wait_until(WAIT, "the round's denial logged", || {
        first.log_text().contains(&write_denied)
    });
    let log = second.log_text();
    assert!(log.contains("retrying in 1 s (denial 1 in a row)"), "{log}");
    assert!(!log.contains(PASSWORD), "the log shows the password");
    let info = first.info().unwrap();
    assert!(
        field(&info, "state").starts_with("leader"),
        "the leader keeps its lead: {info}"
    );
}

#[tokio::test]
async fn open_cluster_warned_not_changed() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-open");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let open = PodProcess::start(
        root.path(),
        "a",
        &pod_spec(&connect, &namespace, "web", None),
    );
    wait_formed(&[&open], WAIT);

    // A pod with credentials joins the cluster that a pod without them created.
    let protected = PodProcess::start(
        root.path(),
        "b",
        &pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD))),
    );
    wait_formed(&[&open, &protected], WAIT);
    let cluster_path = format!("/ochopod/clusters/{cluster}");
    let warning =
        format!("{cluster_path} grants ALL to anyone, so `zookeeper_auth` does not protect it");
    let log = protected.log_text();
    assert!(log.contains(&warning), "{log}");

    let anonymous = client(&connect, None).await;
    let (acls, _) = anonymous.get_acl(&cluster_path).await.unwrap();
    assert_eq!(&acls[..], &*zk::Acls::anyone_all(), "the ACL is left alone");
    let seq = protected.info().unwrap()["seq"].as_i64().unwrap();
    let pods_path = format!("{cluster_path}/pods");
    let children = anonymous.list_children(&pods_path).await.unwrap();
    let own = children
        .iter()
        .find(|child| ochopod::registration::parse_child_name(child).map(|(_, s)| s) == Some(seq))
        .unwrap();
    let path = format!("{pods_path}/{own}");
    let (acls, _) = anonymous.get_acl(&path).await.unwrap();
    assert_protected(&acls, &path);
}

#[test]
fn dependent_with_other_auth_reads_snapshot() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-dependency");
    let root = tempfile::tempdir().unwrap();
    let database = PodProcess::start(
        root.path(),
        "db",
        &pod_spec(&connect, &namespace, "db", Some(&auth(PASSWORD))),
    );
    wait_formed(&[&database], WAIT);

    let web = PodProcess::start(
        root.path(),
        "web",
        &pod_spec(&connect, &namespace, "web", Some(&auth(OTHER_PASSWORD)))
            .env("ochopod_depends_on", "db"),
    );
    wait_formed(&[&web], WAIT);
    let environment = wait_until(WAIT, "the sub-process environment", || {
        fs::read_to_string(web.dir.join("environment")).ok()
    });
    assert!(
        environment.contains("OCHOPOD_DEP_DB_8080=127.0.0.1:"),
        "{environment}"
    );
}

#[tokio::test]
async fn private_cluster_needs_credentials_to_read() {
    let server = shared_server();
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-private");
    let cluster = format!("{namespace}.web");
    let root = tempfile::tempdir().unwrap();
    let spec = pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD)))
        .env("ochopod_zookeeper_world_read", "false");
    let pod = PodProcess::start(root.path(), "a", &spec);
    wait_formed(&[&pod], WAIT);

    let pods_path = format!("/ochopod/clusters/{cluster}/pods");
    let owner = client(&connect, Some(&auth(PASSWORD))).await;
    let registrations = owner.list_children(&pods_path).await.unwrap();
    assert_eq!(registrations.len(), 1, "{registrations:?}");
    let registration = format!("{pods_path}/{}", registrations[0]);
    for path in [&pods_path, &registration] {
        let (acls, _) = owner.get_acl(path).await.unwrap();
        assert_eq!(acls.len(), 1, "{path}: {acls:?}");
        assert_eq!(acls[0].scheme(), "digest", "{path}: {acls:?}");
        assert_eq!(
            acls[0].permission(),
            zk::Permission::ALL,
            "{path}: {acls:?}"
        );
    }

    let anonymous = client(&connect, None).await;
    assert_eq!(
        anonymous.list_children(&pods_path).await,
        Err(zk::Error::NoAuth)
    );
    let stat = anonymous.check_stat(&registration).await.unwrap();
    assert!(stat.is_some(), "ZooKeeper checks no ACL on exists");
    assert_eq!(
        anonymous.get_data(&registration).await.err(),
        Some(zk::Error::NoAuth)
    );

    let pattern = cluster.clone();
    let listing =
        |env: &[(&str, &str)]| ochopod(&["ls", &pattern, "--zk", &connect, "--json"], env);
    let denied = listing(&[]);
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    let message = String::from_utf8_lossy(&denied.stderr);
    assert!(message.contains(&pods_path), "{message}");
    assert!(message.contains("--zookeeper-auth"), "{message}");

    let secret = auth(PASSWORD);
    let listed = listing(&[("ochopod_zookeeper_auth", &secret)]);
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let rows: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["state"], "leader", "{rows}");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(PASSWORD));
}

#[test]
fn enforced_auth_rejects_pod_without_credentials() {
    let server =
        ZkServer::start_with_config("enforce.auth.enabled=true\nenforce.auth.schemes=digest\n");
    let connect = server.connect_string();
    let namespace = unique_namespace("acl-enforced");
    let root = tempfile::tempdir().unwrap();

    let anonymous = PodProcess::start(
        root.path(),
        "a",
        &pod_spec(&connect, &namespace, "web", None),
    );
    wait_until(WAIT, "the failed authentication logged", || {
        anonymous.log_text().contains("authentication failed")
    });
    let log = anonymous.log_text();
    assert!(log.contains("Set `zookeeper_auth`"), "{log}");
    let info = anonymous.info().unwrap();
    assert!(
        field(&info, "zookeeper_error").contains("authentication failed"),
        "{info}"
    );

    let authenticated = PodProcess::start(
        root.path(),
        "b",
        &pod_spec(&connect, &namespace, "web", Some(&auth(PASSWORD))),
    );
    wait_formed(&[&authenticated], WAIT);
}

/// Arguments, environment, and the origin an error must name.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn invalid_zookeeper_auth_exits_2() {
    let cases: [Case; 4] = [
        (
            &["run"],
            &[("ochopod_zookeeper_auth", "shop:short")],
            "environment variable ochopod_zookeeper_auth",
        ),
        (
            &["run", "--zookeeper-auth", "shop-0123456789abcdef"],
            &[],
            "flag --zookeeper-auth",
        ),
        (
            &["run", "--zookeeper-auth", ":0123456789abcdef"],
            &[],
            "flag --zookeeper-auth",
        ),
        (
            &[
                "ls",
                "--zk",
                "127.0.0.1:1",
                "--zookeeper-auth",
                "shop:short",
            ],
            &[],
            "--zookeeper-auth or ochopod_zookeeper_auth",
        ),
    ];
    for (args, env, origin) in cases {
        let output = ochopod(args, env);
        let message = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(message.contains("zookeeper_auth"), "{message}");
        assert!(message.contains(origin), "{message}");
        assert!(message.contains("openssl rand"), "{message}");
        for secret in ["short", "0123456789abcdef"] {
            assert!(!message.contains(secret), "{message}");
        }
    }

    let output = ochopod(&["run"], &[("OCHOPOD_ZOOKEEPER_WORLD_READ", "false")]);
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("`zookeeper_world_read`"), "{message}");
}

#[test]
fn print_settings_redacts_zookeeper_auth() {
    let secret = auth(PASSWORD);
    for (args, env) in [
        (
            vec!["run", "--print-settings"],
            vec![("ochopod_zookeeper_auth", secret.as_str())],
        ),
        (
            vec![
                "run",
                "--print-settings",
                "--zookeeper-auth",
                secret.as_str(),
            ],
            vec![],
        ),
    ] {
        let output = ochopod(&args, &env);
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(!printed.contains(PASSWORD), "{printed}");
        let settings: Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(settings["zookeeper_auth"], "shop:<redacted>");
        assert_eq!(settings["zookeeper_world_read"], true);
    }
}
