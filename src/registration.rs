//! The registration of a pod: the JSON document each pod stores in its `pods/<key>.<seq>` znode.
//!
//! The field names and types follow the original Ochopod wire format so that tools written for it
//! keep reading our registrations. Keys this agent does not know (written by other agents) are
//! kept in `extra` and written back unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of this agent, published in every registration.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One pod as registered in ZooKeeper.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registration {
    /// Application the pod belongs to (Marathon application id, Kubernetes pod name, ...).
    pub application: String,
    /// Task identifier given by the platform.
    pub task: String,
    /// Host the pod runs on.
    pub node: String,
    /// Sequence number ZooKeeper assigned to the pod's first registration.
    pub seq: i64,
    /// ZooKeeper connection string the pod uses.
    pub zk: String,
    /// Platform binding that produced this identity (`local`, `marathon`, ...).
    pub binding: String,
    pub namespace: String,
    pub cluster: String,
    /// Control port inside the container, as a string (the original format).
    pub port: String,
    /// Address other pods reach this pod at.
    pub ip: String,
    /// Address reachable from outside the platform network.
    pub public: String,
    /// Container port (as a string) to the port it is reachable at.
    pub ports: BTreeMap<String, u16>,
    pub debug: bool,
    pub local: bool,
    /// Free-form status: the leader's last probe result, empty otherwise.
    pub status: String,
    /// Version of the agent that wrote the registration.
    pub version: String,
    /// Keys written by other agents, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Registration {
    /// Returns the port `container_port` is reachable at: its remapped port, or itself when the
    /// platform did not remap it.
    pub fn reachable_port(&self, container_port: u16) -> u16 {
        self.ports
            .get(&container_port.to_string())
            .copied()
            .unwrap_or(container_port)
    }

    /// Returns the address (`ip:port`) of this pod's control server.
    pub fn control_address(&self) -> String {
        let port: u16 = self.port.parse().unwrap_or(8080);
        format!("{}:{}", self.ip, self.reachable_port(port))
    }

    /// Returns the fully qualified cluster name, `<namespace>.<cluster>`.
    pub fn qualified_cluster(&self) -> String {
        format!("{}.{}", self.namespace, self.cluster)
    }

    /// Returns a copy without the fields that change while a pod runs and must not count as a
    /// change of the cluster (the `status`).
    pub fn identity_only(&self) -> Registration {
        Registration {
            status: String::new(),
            ..self.clone()
        }
    }
}

/// Splits a `pods/` child name `<key>.<seq>` into its key and sequence number.
pub fn parse_child_name(name: &str) -> Option<(&str, i64)> {
    let (key, seq) = name.rsplit_once('.')?;
    let seq = seq.parse().ok()?;
    (!key.is_empty()).then_some((key, seq))
}

/// Formats the `pods/` child name of a pod, padding the sequence as ZooKeeper does.
pub fn child_name(key: &str, seq: i64) -> String {
    format!("{key}.{seq:010}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_survive_round_trip() {
        let text = r#"{"ip":"10.0.0.1","seq":3,"foreign":{"a":1},"ports":{"8080":31000}}"#;
        let registration: Registration = serde_json::from_str(text).unwrap();
        assert_eq!(registration.seq, 3);
        assert_eq!(registration.extra["foreign"], serde_json::json!({"a": 1}));

        let written = serde_json::to_value(&registration).unwrap();
        assert_eq!(written["foreign"], serde_json::json!({"a": 1}));
    }

    #[test]
    fn reachable_port_falls_back_to_itself() {
        let registration = Registration {
            ports: BTreeMap::from([("8080".to_string(), 31000)]),
            ..Registration::default()
        };
        assert_eq!(registration.reachable_port(8080), 31000);
        assert_eq!(registration.reachable_port(2181), 2181);
    }

    #[test]
    fn child_name_round_trip() {
        let name = child_name("a1b2", 42);
        assert_eq!(name, "a1b2.0000000042");
        assert_eq!(parse_child_name(&name), Some(("a1b2", 42)));
        assert_eq!(parse_child_name("nodot"), None);
        assert_eq!(parse_child_name(".12"), None);
    }
}
