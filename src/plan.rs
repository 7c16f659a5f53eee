//! The leader's decisions as plain functions over plain data: which clusters a dependency names,
//! the hash that shows whether the cluster changed, and the view each pod gets.
//!
//! Keeping these apart from the actor lets them be tested without ZooKeeper, timers or threads.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cluster::{Cluster, Pods};
use crate::registration::{parse_child_name, Registration};

/// A dependency as written in `depends_on`, resolved against the pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dependency {
    /// The text as configured.
    pub spec: String,
    /// Glob pattern over fully qualified cluster names (`<namespace>.<cluster>`).
    pub pattern: String,
    /// Whether the pattern has wildcards, so that new clusters may match it later.
    pub wildcard: bool,
}

impl Dependency {
    /// Resolves `spec`: `/ns.name` is absolute, anything else is relative to `namespace`.
    pub fn parse(spec: &str, namespace: &str) -> Dependency {
        let pattern = match spec.strip_prefix('/') {
            Some(absolute) => absolute.to_string(),
            None => format!("{namespace}.{spec}"),
        };
        let wildcard = pattern.contains(['*', '?', '[']);
        Dependency {
            spec: spec.to_string(),
            pattern,
            wildcard,
        }
    }

    /// Returns the clusters among `clusters` (fully qualified names) this dependency names. A
    /// dependency without wildcards always names its one cluster, existing or not.
    ///
    /// A wildcard matches within one dot-separated name, like `*` within one directory of a
    /// path: `kafka-*` in namespace `shop` names `shop.kafka-a` but not the cluster `b` of the
    /// namespace `shop.kafka-a`. A glob `*` alone would match across dots.
    pub fn resolve(&self, clusters: &[String]) -> Vec<String> {
        if !self.wildcard {
            return vec![self.pattern.clone()];
        }
        let Ok(pattern) = glob::Pattern::new(&self.pattern) else {
            return Vec::new();
        };
        let names = self.pattern.split('.').count();
        clusters
            .iter()
            .filter(|cluster| cluster.split('.').count() == names && pattern.matches(cluster))
            .cloned()
            .collect()
    }
}

/// Returns the name a dependency cluster has in the cluster view: its cluster name when it is
/// in `namespace`, its fully qualified name otherwise.
pub fn dependency_name(qualified: &str, namespace: &str) -> String {
    match qualified
        .strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('.'))
    {
        Some(name) if !name.contains('.') => name.to_string(),
        _ => qualified.to_string(),
    }
}

/// Builds the pods of a cluster, by key, from the registrations cached by child name. The seq
/// comes from the child name, which ZooKeeper wrote; when two children share a key, the
/// higher seq wins.
pub fn pods_by_key(children: &BTreeMap<String, Registration>) -> Pods {
    let mut pods = Pods::new();
    for (child, registration) in children {
        let Some((key, seq)) = parse_child_name(child) else {
            continue;
        };
        if pods
            .get(key)
            .is_some_and(|known: &Registration| known.seq > seq)
        {
            continue;
        }
        let mut registration = registration.clone();
        registration.seq = seq;
        pods.insert(key.to_string(), registration);
    }
    pods
}

/// Returns the hash of a cluster state: its pods and the snapshots of its dependencies. The
/// `status` of each pod is left out, because it changes without the cluster changing.
pub fn state_hash(pods: &Pods, dependencies: &BTreeMap<String, Pods>) -> String {
    let strip = |pods: &Pods| -> BTreeMap<String, Registration> {
        pods.iter()
            .map(|(key, pod)| (key.clone(), pod.identity_only()))
            .collect()
    };
    let dependencies: BTreeMap<&String, BTreeMap<String, Registration>> = dependencies
        .iter()
        .map(|(name, pods)| (name, strip(pods)))
        .collect();
    let state = serde_json::json!({ "pods": strip(pods), "dependencies": dependencies });

    let mut digest = Sha256::new();
    digest.update(serde_json::to_vec(&state).expect("a cluster state always serializes"));
    hex::encode(digest.finalize())
}

/// Returns the view sent to the pod `key`.
pub fn view_for(key: &str, pods: &Pods, dependencies: &BTreeMap<String, Pods>) -> Cluster {
    Cluster {
        key: key.to_string(),
        pods: pods.clone(),
        dependencies: dependencies.clone(),
    }
}

/// The cluster views of one phase of a round, serialized once.
///
/// Every pod gets the same pods and dependencies; only `key` differs. The shared part is
/// serialized once per phase, and each pod's body is its key followed by those bytes, the
/// same JSON document that serializing [`view_for`] gives. A round over N pods thus costs N
/// copies of the view instead of N clones and N serializations.
pub struct ViewBodies {
    /// `"pods":{...},"dependencies":{...}}`: a serialized view without its opening brace and
    /// its `key`.
    shared: Vec<u8>,
}

impl ViewBodies {
    pub fn new(pods: &Pods, dependencies: &BTreeMap<String, Pods>) -> Self {
        #[derive(Serialize)]
        struct Shared<'a> {
            pods: &'a Pods,
            dependencies: &'a BTreeMap<String, Pods>,
        }

        let mut shared =
            serde_json::to_vec(&Shared { pods, dependencies }).expect("a view always serializes");
        shared.remove(0);
        ViewBodies { shared }
    }

    /// Returns the JSON view for the pod `key`.
    pub fn for_pod(&self, key: &str) -> Vec<u8> {
        let key = serde_json::to_vec(key).expect("a string always serializes");
        let mut body = Vec::with_capacity(key.len() + self.shared.len() + 8);
        body.extend_from_slice(b"{\"key\":");
        body.extend_from_slice(&key);
        body.push(b',');
        body.extend_from_slice(&self.shared);
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ip: &str) -> Registration {
        Registration {
            ip: ip.to_string(),
            ..Registration::default()
        }
    }

    #[test]
    fn shared_view_bodies_match_the_serialized_view() {
        let pods = Pods::from([
            ("a\"quoted".to_string(), pod("10.0.0.1")),
            ("b".to_string(), pod("10.0.0.2")),
        ]);
        let dependencies = BTreeMap::from([(
            "zk".to_string(),
            Pods::from([("z".to_string(), pod("10.0.0.9"))]),
        )]);
        let bodies = ViewBodies::new(&pods, &dependencies);
        for key in ["a\"quoted", "b", "unknown"] {
            let expected = serde_json::to_vec(&view_for(key, &pods, &dependencies)).unwrap();
            assert_eq!(
                String::from_utf8(bodies.for_pod(key)).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }

        let empty = ViewBodies::new(&Pods::new(), &BTreeMap::new());
        let parsed: Cluster = serde_json::from_slice(&empty.for_pod("k")).unwrap();
        assert_eq!(parsed, view_for("k", &Pods::new(), &BTreeMap::new()));
    }

    #[test]
    fn dependency_forms_resolve() {
        let clusters = vec![
            "shop.kafka-a".to_string(),
            "shop.kafka-b".to_string(),
            "shop.web".to_string(),
        ];

        let relative = Dependency::parse("zookeeper", "shop");
        assert_eq!(relative.resolve(&clusters), vec!["shop.zookeeper"]);

        let absolute = Dependency::parse("/infra.zookeeper", "shop");
        assert_eq!(absolute.resolve(&clusters), vec!["infra.zookeeper"]);

        let wildcard = Dependency::parse("kafka-*", "shop");
        assert!(wildcard.wildcard);
        assert_eq!(
            wildcard.resolve(&clusters),
            vec!["shop.kafka-a", "shop.kafka-b"]
        );
    }

    #[test]
    fn wildcard_stays_within_one_name() {
        let clusters = vec![
            "shop.kafka-a".to_string(),
            "shop.kafka-a.web".to_string(),
            "shop.staging.kafka-b".to_string(),
            "infra.kafka-c".to_string(),
        ];

        let relative = Dependency::parse("kafka-*", "shop");
        assert_eq!(relative.resolve(&clusters), vec!["shop.kafka-a"]);

        let any_namespace = Dependency::parse("/*.kafka-*", "shop");
        assert_eq!(
            any_namespace.resolve(&clusters),
            vec!["shop.kafka-a", "infra.kafka-c"]
        );
    }

    #[test]
    fn dependency_name_is_relative_in_namespace() {
        assert_eq!(dependency_name("shop.zookeeper", "shop"), "zookeeper");
        assert_eq!(
            dependency_name("infra.zookeeper", "shop"),
            "infra.zookeeper"
        );
        assert_eq!(
            dependency_name("shop.staging.zookeeper", "shop"),
            "shop.staging.zookeeper"
        );
    }

    #[test]
    fn pods_by_key_takes_seq_from_child_name() {
        let children = BTreeMap::from([
            ("a.0000000004".to_string(), pod("10.0.0.1")),
            ("a.0000000002".to_string(), pod("10.0.0.9")),
            ("b.0000000003".to_string(), pod("10.0.0.2")),
            ("garbage".to_string(), pod("10.0.0.3")),
        ]);
        let pods = pods_by_key(&children);
        assert_eq!(pods.len(), 2);
        assert_eq!(pods["a"].seq, 4);
        assert_eq!(pods["a"].ip, "10.0.0.1");
        assert_eq!(pods["b"].seq, 3);
    }

    #[test]
    fn hash_ignores_status_only() {
        let mut pods = Pods::from([("a".to_string(), pod("10.0.0.1"))]);
        let dependencies = BTreeMap::new();
        let before = state_hash(&pods, &dependencies);

        pods.get_mut("a").unwrap().status = "busy".to_string();
        assert_eq!(state_hash(&pods, &dependencies), before);

        pods.get_mut("a").unwrap().ip = "10.0.0.2".to_string();
        assert_ne!(state_hash(&pods, &dependencies), before);
    }

    #[test]
    fn hash_covers_dependencies() {
        let pods = Pods::from([("a".to_string(), pod("10.0.0.1"))]);
        let empty = BTreeMap::new();
        let with_zookeeper = BTreeMap::from([(
            "zookeeper".to_string(),
            Pods::from([("z".to_string(), pod("10.0.1.1"))]),
        )]);
        assert_ne!(
            state_hash(&pods, &empty),
            state_hash(&pods, &with_zookeeper)
        );
    }
}
