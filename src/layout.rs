//! Znode paths of the ZooKeeper layout, the same as the original Ochopod's.
//!
//! ```text
//! /ochopod/clusters/<namespace>.<cluster>/pods/<key>.<seq>   ephemeral, a registration each
//! /ochopod/clusters/<namespace>.<cluster>/coordinator/...    ephemeral sequential lock nodes
//! /ochopod/clusters/<namespace>.<cluster>/snapshot           pods of the last configuration
//! /ochopod/clusters/<namespace>.<cluster>/hash               hash of the last configuration
//! ```

/// Parent of every cluster znode.
pub const CLUSTERS: &str = "/ochopod/clusters";

/// Returns the znode of the cluster `<namespace>.<cluster>`.
pub fn cluster(qualified: &str) -> String {
    format!("{CLUSTERS}/{qualified}")
}

pub fn pods(qualified: &str) -> String {
    format!("{CLUSTERS}/{qualified}/pods")
}

pub fn coordinator(qualified: &str) -> String {
    format!("{CLUSTERS}/{qualified}/coordinator")
}

pub fn snapshot(qualified: &str) -> String {
    format!("{CLUSTERS}/{qualified}/snapshot")
}

pub fn hash(qualified: &str) -> String {
    format!("{CLUSTERS}/{qualified}/hash")
}
