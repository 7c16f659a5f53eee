//! End to end: clusters that depend on other clusters, with real `ochopod` processes on a real
//! ZooKeeper server.
//!
//! Dependent pods run a sub-process that records the `OCHOPOD_DEP_*` variables of each start,
//! so a test reads both the endpoints a pod received and how often its sub-process started. Pods are not
//! strict: a sub-process restarts only when the dependencies of its pod changed. Rounds are
//! counted through the version of each cluster's `hash` znode, which every round writes once.

mod support;
mod workload;

use std::collections::BTreeSet;
use std::path::Path;

use support::pods::{free_port, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until};
use workload::{
    dependency_starts, last_endpoints, rounds, snapshot_keys, wait_formed, wait_settled,
    write_file, DEPENDENCY_RECORDER, WAIT,
};

/// Starts a pod of `cluster` that exposes container port 6379 on a free loopback port and
/// sleeps; returns it with that port.
fn start_store(root: &Path, name: &str, namespace: &str, cluster: &str) -> (PodProcess, u16) {
    start_store_with_damper(root, name, namespace, cluster, "0")
}

/// Starts a store like `start_store`, whose leader waits `damper` seconds before its first
/// round: its cluster exists that long before its snapshot.
fn start_store_with_damper(
    root: &Path,
    name: &str,
    namespace: &str,
    cluster: &str,
    damper: &str,
) -> (PodProcess, u16) {
    let port = free_port();
    let spec = PodSpec::new(&shared_server().connect_string(), namespace, cluster)
        .env("PORT_6379", &port.to_string())
        .env("ochopod_damper", damper)
        .shell("exec sleep 600");
    (PodProcess::start(root, name, &spec), port)
}

/// Starts a pod of `cluster` depending on `depends_on` (the `ochopod_depends_on` variable, not
/// set when empty), whose sub-process records its dependencies.
fn start_dependent(
    root: &Path,
    name: &str,
    namespace: &str,
    cluster: &str,
    depends_on: &str,
) -> PodProcess {
    let mut spec = PodSpec::new(&shared_server().connect_string(), namespace, cluster)
        .shell(DEPENDENCY_RECORDER);
    if !depends_on.is_empty() {
        spec = spec.env("ochopod_depends_on", depends_on);
    }
    PodProcess::start(root, name, &spec)
}

fn endpoints(ports: &[u16]) -> BTreeSet<String> {
    ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect()
}

/// Returns the `OCHOPOD_DEP_<NAME>_<PORT>` variable of a dependency name: upper case, with `_`
/// for every character that is not a letter or digit.
fn dependency_variable(name: &str, port: u16) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("OCHOPOD_DEP_{name}_{port}")
}

/// Rounds each leader completed, from its `/metrics`, and starts of each pod's sub-process.
fn counts(leaders: &[&PodProcess], pods: &[&PodProcess]) -> (Vec<Option<u64>>, Vec<usize>) {
    let completed = leaders.iter().map(|leader| rounds(leader)).collect();
    let starts = pods
        .iter()
        .map(|pod| dependency_starts(pod).len())
        .collect();
    (completed, starts)
}

#[test]
fn relative_dependency_from_file_appears_later() {
    let namespace = unique_namespace("later");
    let root = tempfile::tempdir().unwrap();
    let config = write_file(root.path(), "web.toml", "depends_on = [\"store\"]\n");
    let spec = PodSpec::new(&shared_server().connect_string(), &namespace, "web")
        .arg("--config")
        .arg(config.to_str().unwrap())
        .shell(DEPENDENCY_RECORDER);
    let web = PodProcess::start(root.path(), "web", &spec);

    // Configured without its dependency, which has no cluster yet.
    wait_formed(&[&web]);
    wait_until(WAIT, "the first start of the web sub-process", || {
        dependency_starts(&web).len() == 1
    });
    assert!(
        dependency_starts(&web)[0].is_empty(),
        "no dependency variable before the store exists: {:?}",
        dependency_starts(&web)
    );
    let info = web.info().unwrap();
    assert_eq!(info["dependencies"], serde_json::json!(["store"]));

    // The store cluster appears: the web cluster is configured again and its pod restarts.
    let (_store, port) = start_store(root.path(), "store", &namespace, "store");
    wait_until(WAIT, "the store endpoint in the web sub-process", || {
        last_endpoints(&web, "OCHOPOD_DEP_STORE_6379") == Some(endpoints(&[port]))
    });

    let (_, starts) = wait_settled("the web cluster", || counts(&[&web], &[&web]));
    assert_eq!(
        starts,
        vec![2],
        "one start without the store and one with it: {:?}",
        dependency_starts(&web)
    );
}

#[test]
fn absolute_dependency_across_namespaces() {
    let infra = unique_namespace("infra");
    let app = unique_namespace("app");
    let server = shared_server().connect_string();
    let root = tempfile::tempdir().unwrap();

    // A store in another namespace, and one of the same name in the dependent's namespace that
    // an absolute dependency must not pick.
    let (_store_a, port_a) = start_store(root.path(), "store-a", &infra, "store");
    let (_decoy, _) = start_store(root.path(), "decoy", &app, "store");
    wait_until(WAIT, "both stores configured", || {
        snapshot_keys(&server, &format!("{infra}.store")).len() == 1
            && snapshot_keys(&server, &format!("{app}.store")).len() == 1
    });

    let web = start_dependent(root.path(), "web", &app, "web", &format!("/{infra}.store"));
    let variable = dependency_variable(&format!("{infra}.store"), 6379);
    wait_until(
        WAIT,
        "the other namespace's store in the web sub-process",
        || last_endpoints(&web, &variable) == Some(endpoints(&[port_a])),
    );
    let last = dependency_starts(&web).pop().unwrap();
    assert!(
        !last.contains_key("OCHOPOD_DEP_STORE_6379"),
        "the store of the web pod's own namespace is not a dependency: {last:?}"
    );

    // A second store pod in the other namespace reaches the dependent.
    let (_store_b, port_b) = start_store(root.path(), "store-b", &infra, "store");
    wait_until(WAIT, "both stores of the other namespace", || {
        last_endpoints(&web, &variable) == Some(endpoints(&[port_a, port_b]))
    });
}

#[test]
fn wildcard_dependency_follows_new_clusters() {
    let namespace = unique_namespace("wildcard");
    let root = tempfile::tempdir().unwrap();

    let (_cache_a, port_a) = start_store(root.path(), "cache-a", &namespace, "cache-a");
    let (_db, _) = start_store(root.path(), "db", &namespace, "db");
    // A wildcard matches within one name: not the cluster `web` of the namespace
    // `<namespace>.cache-x`, although a glob `*` would also match `x.web`.
    let nested_namespace = format!("{namespace}.cache-x");
    let (_nested, _) = start_store(root.path(), "nested", &nested_namespace, "web");
    wait_until(WAIT, "the nested cluster configured", || {
        snapshot_keys(
            &shared_server().connect_string(),
            &format!("{nested_namespace}.web"),
        )
        .len()
            == 1
    });
    // The pattern also matches the dependent's own cluster, which must not depend on itself.
    let client = start_dependent(root.path(), "client", &namespace, "cache-client", "cache-*");
    wait_until(WAIT, "cache-a in the client sub-process", || {
        last_endpoints(&client, "OCHOPOD_DEP_CACHE_A_6379") == Some(endpoints(&[port_a]))
    });

    // A cluster created later that matches the pattern is picked up. Its snapshot comes 2 s
    // after the cluster, so the client's leader first finds the cluster without one.
    let (_cache_b, port_b) =
        start_store_with_damper(root.path(), "cache-b", &namespace, "cache-b", "2");
    wait_until(WAIT, "cache-b in the client sub-process", || {
        last_endpoints(&client, "OCHOPOD_DEP_CACHE_B_6379") == Some(endpoints(&[port_b]))
    });

    let last = dependency_starts(&client).pop().unwrap();
    assert_eq!(
        last.get("OCHOPOD_DEP_CACHE_A_6379"),
        Some(&format!("127.0.0.1:{port_a}"))
    );
    let names: Vec<&String> = last.keys().collect();
    assert!(
        names
            .iter()
            .all(|name| name.starts_with("OCHOPOD_DEP_CACHE_A_")
                || name.starts_with("OCHOPOD_DEP_CACHE_B_")),
        "only cache-a and cache-b; not db, the nested cluster or the client's own cluster: \
         {names:?}"
    );
}

#[test]
fn dependency_cycle_settles() {
    let namespace = unique_namespace("cycle");
    let root = tempfile::tempdir().unwrap();
    let ping_a = start_dependent(root.path(), "ping-a", &namespace, "ping", "pong");
    let pong_a = start_dependent(root.path(), "pong-a", &namespace, "pong", "ping");
    wait_until(WAIT, "each cluster in the other's sub-process", || {
        last_endpoints(&ping_a, "OCHOPOD_DEP_PONG_8080").is_some()
            && last_endpoints(&pong_a, "OCHOPOD_DEP_PING_8080").is_some()
    });

    // Each cluster runs its first round, and at most one more once the other's first snapshot
    // exists. The snapshot writes of those second rounds change nothing, so no third follows.
    // Each cluster's only pod leads it and counts its rounds.
    let pods = [&ping_a, &pong_a];
    let (rounds, starts) = wait_settled("the cycle", || counts(&pods, &pods));
    for (cluster, rounds) in ["ping", "pong"].iter().zip(&rounds) {
        assert!(
            matches!(rounds, Some(1 | 2)),
            "{cluster}: one or two rounds, not {rounds:?}"
        );
    }

    // A new ping pod changes ping's snapshot, so pong is configured again. Then ping reads
    // pong's rewritten but equal snapshot and runs no round.
    let ping_b = start_dependent(root.path(), "ping-b", &namespace, "ping", "pong");
    wait_until(WAIT, "both ping pods in the pong sub-process", || {
        last_endpoints(&pong_a, "OCHOPOD_DEP_PING_8080").is_some_and(|ping| ping.len() == 2)
    });
    // ping-a keeps the lead of ping.
    let (rounds_after, starts_after) =
        wait_settled("the cycle after growth", || counts(&pods, &pods));
    assert_eq!(
        rounds_after,
        vec![rounds[0].map(|v| v + 1), rounds[1].map(|v| v + 1)],
        "one more round in each cluster"
    );
    assert_eq!(
        starts_after[0], starts[0],
        "ping-a keeps its sub-process: its dependency pong did not change"
    );
    assert_eq!(
        starts_after[1],
        starts[1] + 1,
        "pong-a restarts once: its dependency ping changed"
    );
    assert_eq!(dependency_starts(&ping_b).len(), 1);
}

#[test]
fn dependency_chain_follows_snapshot_changes() {
    let namespace = unique_namespace("chain");
    let root = tempfile::tempdir().unwrap();
    let back_a = start_dependent(root.path(), "back-a", &namespace, "back", "");
    let middle_a = start_dependent(root.path(), "middle-a", &namespace, "middle", "back");
    let front_a = start_dependent(root.path(), "front-a", &namespace, "front", "middle");
    wait_until(WAIT, "every link of the chain configured", || {
        last_endpoints(&middle_a, "OCHOPOD_DEP_BACK_8080").is_some()
            && last_endpoints(&front_a, "OCHOPOD_DEP_MIDDLE_8080").is_some()
    });
    // The first pod of each cluster leads it for the whole test.
    let pods = [&back_a, &middle_a, &front_a];
    let (rounds, starts) = wait_settled("the chain", || counts(&pods, &pods));

    // Growing back changes back's snapshot, so middle is configured again. Middle's pods stay
    // the same, so front reads middle's snapshot rewritten with equal content and runs no round.
    let _back_b = start_dependent(root.path(), "back-b", &namespace, "back", "");
    wait_until(WAIT, "both back pods in the middle sub-process", || {
        last_endpoints(&middle_a, "OCHOPOD_DEP_BACK_8080").is_some_and(|back| back.len() == 2)
    });
    let (rounds_1, starts_1) = wait_settled("the chain after back grew", || counts(&pods, &pods));
    let plus = |rounds: &[Option<u64>], added: [u64; 3]| -> Vec<Option<u64>> {
        rounds
            .iter()
            .zip(added)
            .map(|(rounds, added)| rounds.map(|rounds| rounds + added))
            .collect()
    };
    assert_eq!(
        rounds_1,
        plus(&rounds, [1, 1, 0]),
        "rounds of back, middle, front"
    );
    assert_eq!(
        starts_1,
        vec![starts[0], starts[1] + 1, starts[2]],
        "only middle-a restarts"
    );

    // Growing middle changes middle's snapshot, so front is configured again.
    let _middle_b = start_dependent(root.path(), "middle-b", &namespace, "middle", "back");
    wait_until(WAIT, "both middle pods in the front sub-process", || {
        last_endpoints(&front_a, "OCHOPOD_DEP_MIDDLE_8080").is_some_and(|middle| middle.len() == 2)
    });
    let (rounds_2, starts_2) = wait_settled("the chain after middle grew", || counts(&pods, &pods));
    assert_eq!(
        rounds_2,
        plus(&rounds_1, [0, 1, 1]),
        "rounds of back, middle, front"
    );
    assert_eq!(
        starts_2,
        vec![starts_1[0], starts_1[1], starts_1[2] + 1],
        "only front-a restarts"
    );
}

#[test]
fn colliding_dependency_names_keep_first() {
    let namespace = unique_namespace("collide");
    let server = shared_server().connect_string();
    let root = tempfile::tempdir().unwrap();

    // `x-y` and `x_y` both map to OCHOPOD_DEP_X_Y_6379.
    let (_dashed, dashed_port) = start_store(root.path(), "dashed", &namespace, "x-y");
    let (_underscored, _) = start_store(root.path(), "underscored", &namespace, "x_y");
    wait_until(WAIT, "both stores configured", || {
        snapshot_keys(&server, &format!("{namespace}.x-y")).len() == 1
            && snapshot_keys(&server, &format!("{namespace}.x_y")).len() == 1
    });

    let web = start_dependent(root.path(), "web", &namespace, "web", "x_y,x-y");
    wait_until(WAIT, "the dependencies in the web sub-process", || {
        dependency_starts(&web).len() == 1
    });
    assert_eq!(
        last_endpoints(&web, "OCHOPOD_DEP_X_Y_6379"),
        Some(endpoints(&[dashed_port])),
        "the name that sorts first, `x-y`, keeps the variable"
    );
    let log = web.log_text();
    assert!(
        log.contains("dependencies `x-y` and `x_y` map to the same variable OCHOPOD_DEP_X_Y_6379"),
        "{log}"
    );
}
