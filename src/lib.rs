//! Ochopod: the entrypoint agent of a containerised cluster.
//!
//! Each pod registers in ZooKeeper, takes part in electing one leader per cluster, and runs the
//! sub-process its configuration step returns. The leader watches the cluster and its
//! dependencies and, on every change, drives a configuration round over all pods.
//!
//! The parts, each an actor or a plain module:
//!
//! - [`settings`]: what the operator chose, merged and validated.
//! - [`binding`]: the platform probe that finds the pod's identity (actor).
//! - [`registration`]: the JSON a pod stores in ZooKeeper.
//! - [`cluster`]: the view of the cluster a configuration round hands to each pod.
//! - [`steps`]: the `LifeCycle` and `Model` traits an application implements.
//! - [`layout`]: the znode paths of the ZooKeeper layout.
//! - [`acl`]: the ZooKeeper credentials of a pod and the ACLs of the znodes it creates.
//! - [`session`]: the ZooKeeper session, the pod's registration and re-registration (actor).
//! - [`election`]: the lock recipe that elects one leader per cluster (actor).
//! - [`plan`]: the leader's decisions as plain functions (dependencies, hash, views).
//! - [`lifecycle`]: the pod's state machine and its control queue (actor).
//! - [`supervisor`]: the sub-process, its restarts, sanity checks and tear-down (actor).
//! - [`reaper`]: process-wide child reaping and signal intake (PID 1 duties).
//! - [`hooks`]: the binary's lifecycle steps, run as hook executables.
//! - [`telemetry`]: runtime facts published by `/info` and `/metrics`.
//! - [`control`]: the HTTP control server and its client.
//! - [`logging`]: the process logger and the last 32 KiB of log lines for `/log`.

pub mod acl;
pub mod binding;
pub mod cluster;
pub mod control;
pub mod election;
pub mod hooks;
pub mod layout;
pub mod leader;
pub mod lifecycle;
pub mod logging;
pub mod plan;
pub mod pod;
pub mod reaper;
pub mod registration;
pub mod session;
pub mod settings;
pub mod steps;
pub mod supervisor;
pub mod telemetry;
