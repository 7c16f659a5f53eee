//! The cluster view: what a configuration round sends every pod about its cluster and the
//! clusters it depends on.
//!
//! The leader builds one view per round and sends it, with the receiving pod's `key`, as the
//! body of each control request. The pod derives its index, the cluster size and the
//! environment of its sub-process from it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::registration::Registration;

/// Pods of one cluster, by pod key.
pub type Pods = BTreeMap<String, Registration>;

/// The cluster as seen by one pod during a configuration round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cluster {
    /// Key of the pod this view was sent to.
    pub key: String,
    /// Every pod of the cluster, by key.
    pub pods: Pods,
    /// The snapshot of each dependency, by dependency name: the cluster name for a cluster of the
    /// same namespace, `<namespace>.<cluster>` for one of another namespace.
    pub dependencies: BTreeMap<String, Pods>,
}

impl Cluster {
    /// Returns the position of this pod among the key-sorted pods, if it is part of the view.
    pub fn index(&self) -> Option<usize> {
        self.pods.keys().position(|key| *key == self.key)
    }

    /// Returns the number of pods in the cluster.
    pub fn size(&self) -> usize {
        self.pods.len()
    }

    /// Returns the registration of this pod, if it is part of the view.
    pub fn me(&self) -> Option<&Registration> {
        self.pods.get(&self.key)
    }

    /// Returns the comma-separated `ip:port` endpoints at which the pods of `dependency` expose
    /// their container port `port`, sorted by pod key. `public` picks each pod's public address
    /// instead of its internal one. An unknown dependency gives an empty string.
    pub fn grep(&self, dependency: &str, port: u16, public: bool) -> String {
        let Some(pods) = self.dependencies.get(dependency) else {
            return String::new();
        };
        pods.values()
            .map(|pod| {
                let host = if public { &pod.public } else { &pod.ip };
                format!("{}:{}", host, pod.reachable_port(port))
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Returns the environment a sub-process gets from this view: `OCHOPOD_INDEX`,
    /// `OCHOPOD_SEQ`, `OCHOPOD_SIZE`, `OCHOPOD_CLUSTER_JSON`, and one
    /// `OCHOPOD_DEP_<NAME>_<PORT>` per dependency and exposed container port.
    ///
    /// Dependency names that differ only in characters other than ASCII letters and digits
    /// (`x-y` and `x_y`, `a.b` and `a_b`) map to the same variable. The name that sorts first
    /// (by bytes: `-` before `.` before `_`) then gets it, and
    /// [`Cluster::dependency_collisions`] lists the others.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut environment = BTreeMap::new();
        if let Some(index) = self.index() {
            environment.insert("OCHOPOD_INDEX".to_string(), index.to_string());
        }
        if let Some(me) = self.me() {
            environment.insert("OCHOPOD_SEQ".to_string(), me.seq.to_string());
        }
        environment.insert("OCHOPOD_SIZE".to_string(), self.size().to_string());
        let json = serde_json::to_string(self).expect("a cluster view always serializes");
        environment.insert("OCHOPOD_CLUSTER_JSON".to_string(), json);

        for (name, port) in self.dependency_ports() {
            // The dependencies are visited in name order, so the first name keeps a variable.
            environment
                .entry(dependency_variable(name, port))
                .or_insert_with(|| self.grep(name, port, false));
        }
        environment
    }

    /// Returns the dependencies whose `OCHOPOD_DEP_<NAME>_<PORT>` variable another dependency
    /// already got (see [`Cluster::environment`]), in variable then name order.
    pub fn dependency_collisions(&self) -> Vec<DependencyCollision> {
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        let mut collisions = Vec::new();
        for (name, port) in self.dependency_ports() {
            let variable = dependency_variable(name, port);
            match owners.get(&variable) {
                Some(kept) => collisions.push(DependencyCollision {
                    variable,
                    kept: kept.to_string(),
                    ignored: name.to_string(),
                }),
                None => {
                    owners.insert(variable, name);
                }
            }
        }
        collisions.sort_by(|left, right| {
            (&left.variable, &left.ignored).cmp(&(&right.variable, &right.ignored))
        });
        collisions
    }

    /// Returns each dependency name with each container port its pods expose, in name then
    /// port order.
    fn dependency_ports(&self) -> impl Iterator<Item = (&str, u16)> {
        self.dependencies.iter().flat_map(|(name, pods)| {
            let ports: BTreeSet<u16> = pods
                .values()
                .flat_map(|pod| pod.ports.keys().filter_map(|port| port.parse().ok()))
                .collect();
            ports.into_iter().map(move |port| (name.as_str(), port))
        })
    }
}

/// Two dependencies whose names map to the same `OCHOPOD_DEP_<NAME>_<PORT>` variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DependencyCollision {
    pub variable: String,
    /// The dependency whose endpoints the variable holds: the name that sorts first.
    pub kept: String,
    /// The dependency left out of the variable. Its pods are still in `OCHOPOD_CLUSTER_JSON`.
    pub ignored: String,
}

/// Returns the `OCHOPOD_DEP_<NAME>_<PORT>` variable of a dependency's container port.
fn dependency_variable(name: &str, port: u16) -> String {
    format!("OCHOPOD_DEP_{}_{}", environment_name(name), port)
}

/// Turns a dependency name into the part of an environment variable name: upper case, with
/// every character that is not an ASCII letter or digit replaced by `_`.
pub fn environment_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ip: &str, seq: i64, ports: &[(u16, u16)]) -> Registration {
        Registration {
            ip: ip.to_string(),
            public: format!("public-{ip}"),
            seq,
            ports: ports
                .iter()
                .map(|(inner, outer)| (inner.to_string(), *outer))
                .collect(),
            ..Registration::default()
        }
    }

    fn view() -> Cluster {
        let pods = BTreeMap::from([
            ("b".to_string(), pod("10.0.0.2", 2, &[])),
            ("a".to_string(), pod("10.0.0.1", 1, &[])),
        ]);
        let zookeeper = BTreeMap::from([
            ("z1".to_string(), pod("10.0.1.1", 7, &[(2181, 31001)])),
            ("z2".to_string(), pod("10.0.1.2", 8, &[(2181, 2181)])),
        ]);
        Cluster {
            key: "b".to_string(),
            pods,
            dependencies: BTreeMap::from([("zoo-keeper".to_string(), zookeeper)]),
        }
    }

    #[test]
    fn index_follows_key_order() {
        let cluster = view();
        assert_eq!(cluster.index(), Some(1));
        assert_eq!(cluster.size(), 2);
    }

    #[test]
    fn grep_lists_remapped_endpoints() {
        let cluster = view();
        assert_eq!(
            cluster.grep("zoo-keeper", 2181, false),
            "10.0.1.1:31001,10.0.1.2:2181"
        );
        assert_eq!(
            cluster.grep("zoo-keeper", 2181, true),
            "public-10.0.1.1:31001,public-10.0.1.2:2181"
        );
        assert_eq!(cluster.grep("absent", 2181, false), "");
    }

    #[test]
    fn environment_keeps_first_colliding_dependency() {
        let mut cluster = view();
        let store = |ip: &str| BTreeMap::from([("s".to_string(), pod(ip, 1, &[(6379, 6379)]))]);
        cluster.dependencies = BTreeMap::from([
            ("x_y".to_string(), store("10.0.2.3")),
            ("x-y".to_string(), store("10.0.2.1")),
            ("x.y".to_string(), store("10.0.2.2")),
            ("other".to_string(), store("10.0.2.4")),
        ]);

        let environment = cluster.environment();
        assert_eq!(environment["OCHOPOD_DEP_X_Y_6379"], "10.0.2.1:6379");
        assert_eq!(environment["OCHOPOD_DEP_OTHER_6379"], "10.0.2.4:6379");

        let collision = |ignored: &str| DependencyCollision {
            variable: "OCHOPOD_DEP_X_Y_6379".to_string(),
            kept: "x-y".to_string(),
            ignored: ignored.to_string(),
        };
        assert_eq!(
            cluster.dependency_collisions(),
            vec![collision("x.y"), collision("x_y")]
        );
        assert_eq!(view().dependency_collisions(), vec![]);
    }

    #[test]
    fn environment_names_dependencies() {
        let environment = view().environment();
        assert_eq!(environment["OCHOPOD_INDEX"], "1");
        assert_eq!(environment["OCHOPOD_SEQ"], "2");
        assert_eq!(environment["OCHOPOD_SIZE"], "2");
        assert_eq!(
            environment["OCHOPOD_DEP_ZOO_KEEPER_2181"],
            "10.0.1.1:31001,10.0.1.2:2181"
        );
        assert!(environment["OCHOPOD_CLUSTER_JSON"].contains("\"zoo-keeper\""));
    }
}
