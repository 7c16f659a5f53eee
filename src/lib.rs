//! Ochopod: the entrypoint agent of a containerised cluster.
//!
//! Each pod registers in ZooKeeper, takes part in electing one leader per cluster, and runs the
//! sub-process its configuration step returns. The leader watches the cluster and its
//! dependencies and, on every change, drives a configuration round over all pods.
//!
//! The parts, each an actor or a plain module:
//!
//! - [`registration`]: the JSON a pod stores in ZooKeeper.
//! - [`cluster`]: the view of the cluster a configuration round hands to each pod.
//! - [`steps`]: the `LifeCycle` and `Model` traits an application implements.
//! - [`layout`]: the znode paths of the ZooKeeper layout.
//! - [`session`]: the ZooKeeper session, the pod's registration and re-registration (actor).
//! - [`election`]: the lock recipe that elects one leader per cluster (actor).
//! - [`plan`]: the leader's decisions as plain functions (dependencies, hash, views).
//! - [`telemetry`]: runtime facts published by `/info` and `/metrics`.

pub mod cluster;
pub mod election;
pub mod layout;
pub mod plan;
pub mod registration;
pub mod session;
pub mod steps;
pub mod telemetry;
