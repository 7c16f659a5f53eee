//! The operator commands: `ls`, `info`, `log`, `on`, `off`, `kill`, `reset` and `signal`.
//!
//! Each reads the registrations of the matching clusters from ZooKeeper, then talks to each
//! matching pod's control server at the address it registered (`ip` and its reachable control
//! port), all pods at once, each request bounded by the command's timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use awc::http::Method;
use futures::future::join_all;
use ochopod::acl::ZookeeperAccess;
use ochopod::cluster::Pods;
use ochopod::control::{self, Credentials, SendError};
use ochopod::layout;
use ochopod::lifecycle::Verb;
use ochopod::plan::{self, Dependency};
use ochopod::registration::Registration;
use ochopod::settings::Token;
use serde_json::{json, Value};
use zookeeper_client as zk;

use super::output::{errln, outln};
use super::pattern::Pattern;

/// The arguments every operator command needs.
pub struct Target {
    /// ZooKeeper connection string.
    pub zk: String,
    pub pattern: Pattern,
    /// Bound of each ZooKeeper connection and HTTP request.
    pub timeout: Duration,
    /// Print JSON instead of text.
    pub json: bool,
    /// Shared token sent with the requests that change pods.
    pub token: Option<Token>,
    /// Credentials of the ZooKeeper session.
    pub access: ZookeeperAccess,
}

/// The action an operator command performs on each pod.
#[derive(Clone, Debug)]
pub enum Action {
    Info,
    Log,
    Reset,
    /// A control verb, with the body for `signal` (the other verbs build theirs).
    Control(Verb, Value),
}

/// One registered pod of a matching cluster.
#[derive(Clone, Debug)]
struct Pod {
    cluster: String,
    key: String,
    registration: Registration,
}

impl Pod {
    fn address(&self) -> String {
        self.registration.control_address()
    }

    fn label(&self) -> String {
        format!("{} #{}", self.cluster, self.registration.seq)
    }
}

/// The pods of the matching clusters, and what a control request body needs.
struct Found {
    /// Every pod of every matching cluster, by cluster then key.
    clusters: BTreeMap<String, Pods>,
    /// The pods the pattern selects, in cluster then seq order.
    targets: Vec<Pod>,
    /// Every cluster name under the clusters znode, to resolve wildcard dependencies.
    all_clusters: Vec<String>,
}

/// Runs `ochopod ls`; returns the exit code.
pub async fn list(target: Target) -> i32 {
    let (client, found) = match find(&target).await {
        Ok(found) => found,
        Err(message) => return fail(&message),
    };
    drop(client);

    let http = awc::Client::default();
    let replies = join_all(
        found
            .targets
            .iter()
            .map(|pod| get(&http, pod, "/info", target.timeout)),
    )
    .await;

    let mut rows = Vec::new();
    let mut documents = Vec::new();
    for (pod, reply) in found.targets.iter().zip(replies) {
        let (state, process, error) = match &reply {
            Ok((200, info)) => (text(&info["state"]), text(&info["process"]), None),
            Ok((status, body)) => (
                "unreachable".to_string(),
                "-".to_string(),
                Some(format!("status {status}: {body}")),
            ),
            Err(error) => (
                "unreachable".to_string(),
                "-".to_string(),
                Some(error.to_string()),
            ),
        };
        let registration = &pod.registration;
        rows.push(vec![
            pod.cluster.clone(),
            registration.seq.to_string(),
            registration.ip.clone(),
            format_ports(&registration.ports),
            state.clone(),
            process.clone(),
            registration.status.clone(),
        ]);
        documents.push(json!({
            "cluster": pod.cluster,
            "key": pod.key,
            "seq": registration.seq,
            "ip": registration.ip,
            "ports": registration.ports,
            "state": state,
            "process": process,
            "status": registration.status,
            "error": error,
            "registration": registration,
        }));
    }

    if target.json {
        print_json(&Value::Array(documents));
    } else {
        print_table(
            &[
                "CLUSTER", "SEQ", "IP", "PORTS", "STATE", "PROCESS", "STATUS",
            ],
            &rows,
        );
    }
    0
}

/// Runs `info`, `log`, `reset` or a control verb on every matching pod; returns 0 when every
/// pod replied 200, 1 otherwise.
pub async fn act(target: Target, action: Action) -> i32 {
    let (client, found) = match find(&target).await {
        Ok(found) => found,
        Err(message) => return fail(&message),
    };
    if found.targets.is_empty() {
        return fail(&format!("no pod matches `{}`", target.pattern.as_str()));
    }

    let http = awc::Client::default();
    let bodies = match &action {
        Action::Control(Verb::On | Verb::Check | Verb::Ok, _) => {
            views(&client, &http, &found, target.timeout).await
        }
        _ => BTreeMap::new(),
    };
    drop(client);

    let requests = found.targets.iter().map(|pod| {
        let body = bodies.get(&pod.key).cloned().unwrap_or_else(|| json!({}));
        perform(&http, pod, &action, body, &target)
    });
    let replies = join_all(requests).await;

    let mut failures = 0;
    let mut documents = Vec::new();
    for (pod, reply) in found.targets.iter().zip(replies) {
        let (status, body) = match reply {
            Ok((status, body)) => (Some(status), body),
            Err(error) => (None, json!({ "error": error.to_string() })),
        };
        if status != Some(200) {
            failures += 1;
        }
        documents.push((pod, status, body));
    }

    if target.json {
        let array = documents
            .iter()
            .map(|(pod, status, body)| {
                json!({ "cluster": pod.cluster, "key": pod.key, "seq": pod.registration.seq,
                        "address": pod.address(), "status": status, "reply": body })
            })
            .collect();
        print_json(&Value::Array(array));
    } else {
        print_replies(&action, &documents);
    }
    i32::from(failures > 0)
}

/// Performs `action` on `pod`. Only the requests that change the pod carry the token, so it
/// does not travel where no pod requires it.
async fn perform(
    http: &awc::Client,
    pod: &Pod,
    action: &Action,
    body: Value,
    target: &Target,
) -> Result<(u16, Value), SendError> {
    let timeout = target.timeout;
    let credentials = Credentials {
        epoch: None,
        token: target.token.clone(),
    };
    match action {
        Action::Info => get(http, pod, "/info", timeout).await,
        Action::Log => get(http, pod, "/log", timeout).await,
        Action::Reset => {
            control::request(
                http,
                Method::POST,
                &pod.address(),
                "/reset",
                timeout,
                &credentials,
                None,
            )
            .await
        }
        Action::Control(Verb::Signal, signal_body) => {
            control::send(
                http,
                &pod.address(),
                Verb::Signal,
                timeout,
                &credentials,
                signal_body.into(),
            )
            .await
        }
        Action::Control(verb, _) => {
            control::send(
                http,
                &pod.address(),
                *verb,
                timeout,
                &credentials,
                (&body).into(),
            )
            .await
        }
    }
}

async fn get(
    http: &awc::Client,
    pod: &Pod,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Value), SendError> {
    let open = Credentials::default();
    control::request(
        http,
        Method::GET,
        &pod.address(),
        path,
        timeout,
        &open,
        None,
    )
    .await
}

/// Builds the cluster view each target pod gets with `on`, `check` or `ok`, as its leader
/// would: the pods of its cluster, and the snapshot of each cluster its dependencies name
/// (read from `/info` of one pod of the cluster).
async fn views(
    client: &zk::Client,
    http: &awc::Client,
    found: &Found,
    timeout: Duration,
) -> BTreeMap<String, Value> {
    let mut bodies = BTreeMap::new();
    for (cluster, pods) in &found.clusters {
        let Some(first) = found.targets.iter().find(|pod| &pod.cluster == cluster) else {
            continue;
        };
        let namespace = first.registration.namespace.clone();
        let specs: Vec<String> = match get(http, first, "/info", timeout).await {
            Ok((200, info)) => info["dependencies"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| item.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };

        let mut dependencies = BTreeMap::new();
        for spec in specs {
            for qualified in Dependency::parse(&spec, &namespace).resolve(&found.all_clusters) {
                if let Some(snapshot) = read_snapshot(client, &qualified).await {
                    dependencies.insert(plan::dependency_name(&qualified, &namespace), snapshot);
                }
            }
        }

        for pod in found.targets.iter().filter(|pod| &pod.cluster == cluster) {
            let view = plan::view_for(&pod.key, pods, &dependencies);
            bodies.insert(
                pod.key.clone(),
                serde_json::to_value(view).expect("a cluster view always serializes"),
            );
        }
    }
    bodies
}

async fn read_snapshot(client: &zk::Client, qualified: &str) -> Option<Pods> {
    let (data, _) = client.get_data(&layout::snapshot(qualified)).await.ok()?;
    serde_json::from_slice(&data).ok()
}

/// Connects to ZooKeeper and reads the registrations of the matching clusters.
async fn find(target: &Target) -> Result<(zk::Client, Found), String> {
    let connecting = target
        .access
        .connector()
        .with_session_timeout(target.timeout)
        .connect(&target.zk);
    let client = match tokio::time::timeout(target.timeout, connecting).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            return Err(format!(
                "cannot connect to ZooKeeper at {}: {}",
                target.zk,
                explain(&error, &target.access)
            ))
        }
        Err(_) => {
            return Err(format!(
                "cannot connect to ZooKeeper at {} within {} s; check --zk",
                target.zk,
                target.timeout.as_secs_f64()
            ))
        }
    };

    let reading = read_clusters(&client, &target.pattern, &target.access);
    let found = match tokio::time::timeout(target.timeout, reading).await {
        Ok(found) => found?,
        Err(_) => {
            return Err(format!(
                "reading {} timed out after {} s",
                layout::CLUSTERS,
                target.timeout.as_secs_f64()
            ))
        }
    };
    Ok((client, found))
}

async fn read_clusters(
    client: &zk::Client,
    pattern: &Pattern,
    access: &ZookeeperAccess,
) -> Result<Found, String> {
    let mut all_clusters = match client.list_children(layout::CLUSTERS).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(error) => {
            return Err(format!(
                "cannot list {}: {}",
                layout::CLUSTERS,
                explain(&error, access)
            ))
        }
    };
    all_clusters.sort();

    let mut clusters = BTreeMap::new();
    let mut targets = Vec::new();
    for cluster in all_clusters
        .iter()
        .filter(|cluster| pattern.matches_cluster(cluster))
    {
        let pods_path = layout::pods(cluster);
        let children = match client.list_children(&pods_path).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => continue,
            Err(error) => {
                return Err(format!(
                    "cannot list {pods_path}: {}",
                    explain(&error, access)
                ))
            }
        };

        let mut registrations = BTreeMap::new();
        for child in children {
            let path = format!("{pods_path}/{child}");
            match client.get_data(&path).await {
                Ok((data, _)) => match serde_json::from_slice::<Registration>(&data) {
                    Ok(registration) => {
                        registrations.insert(child, registration);
                    }
                    Err(error) => {
                        errln!("ochopod: skipping {path}: invalid registration JSON ({error})")
                    }
                },
                // The pod left between the listing and the read.
                Err(zk::Error::NoNode) => {}
                Err(error) => {
                    return Err(format!("cannot read {path}: {}", explain(&error, access)))
                }
            }
        }

        let pods = plan::pods_by_key(&registrations);
        let mut selected: Vec<Pod> = pods
            .iter()
            .filter(|(_, registration)| pattern.matches_seq(registration.seq))
            .map(|(key, registration)| Pod {
                cluster: cluster.clone(),
                key: key.clone(),
                registration: registration.clone(),
            })
            .collect();
        selected.sort_by_key(|pod| pod.registration.seq);
        targets.extend(selected);
        clusters.insert(cluster.clone(), pods);
    }
    Ok(Found {
        clusters,
        targets,
        all_clusters,
    })
}

/// Describes a failed ZooKeeper request, with what to pass when ZooKeeper denied it.
fn explain(error: &zk::Error, access: &ZookeeperAccess) -> String {
    match (error, access.is_authenticated()) {
        (zk::Error::NoAuth, false) => format!(
            "{error}: the znode is not world-readable. Pass the cluster's credentials with \
             --zookeeper-auth or ochopod_zookeeper_auth"
        ),
        (zk::Error::NoAuth, true) => format!(
            "{error}: the znode's ACL does not grant the credentials of --zookeeper-auth or \
             ochopod_zookeeper_auth. Pass the cluster's credentials"
        ),
        (zk::Error::AuthFailed, _) => format!(
            "{error}: ZooKeeper rejected the session's authentication. Check \
             --zookeeper-auth or ochopod_zookeeper_auth and what the servers require"
        ),
        _ => error.to_string(),
    }
}

fn print_replies(action: &Action, documents: &[(&Pod, Option<u16>, Value)]) {
    match action {
        Action::Info => {
            for (pod, status, body) in documents {
                outln!(
                    "== {} ({}) {}",
                    pod.label(),
                    pod.address(),
                    status_text(*status)
                );
                print_json(body);
            }
        }
        Action::Log => {
            for (pod, status, body) in documents {
                outln!(
                    "== {} ({}) {}",
                    pod.label(),
                    pod.address(),
                    status_text(*status)
                );
                match body.as_array() {
                    Some(lines) => lines.iter().for_each(|line| outln!("{}", text(line))),
                    None => outln!("{body}"),
                }
            }
        }
        Action::Reset | Action::Control(..) => {
            let rows: Vec<Vec<String>> = documents
                .iter()
                .map(|(pod, status, body)| {
                    vec![
                        pod.cluster.clone(),
                        pod.registration.seq.to_string(),
                        pod.address(),
                        status_text(*status),
                        body.to_string(),
                    ]
                })
                .collect();
            print_table(&["CLUSTER", "SEQ", "ADDRESS", "STATUS", "REPLY"], &rows);
        }
    }
}

fn status_text(status: Option<u16>) -> String {
    status.map_or_else(|| "unreachable".to_string(), |status| status.to_string())
}

/// Returns a JSON string's text, or the JSON of any other value.
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn format_ports(ports: &BTreeMap<String, u16>) -> String {
    let pairs: Vec<String> = ports
        .iter()
        .map(|(inner, outer)| format!("{inner}:{outer}"))
        .collect();
    if pairs.is_empty() {
        "-".to_string()
    } else {
        pairs.join(",")
    }
}

fn print_json(value: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values always serialize")
    );
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let format_row = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    outln!("{}", format_row(header.to_vec()));
    for row in rows {
        outln!("{}", format_row(row.iter().map(String::as_str).collect()));
    }
}

fn fail(message: &str) -> i32 {
    errln!("ochopod: {message}");
    1
}
