//! The steps an application plugs into a pod: the `LifeCycle` trait (pod behaviour) and the
//! `Model` trait (the leader's probe).
//!
//! Every method has a default, so an implementation only writes the steps it needs. The binary
//! implements both traits by running hook executables (`crate::hooks`); a Rust application
//! implements them directly.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::cluster::Cluster;

/// Failure of one step, with the reason shown to the leader and in the pod log.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

impl StepError {
    pub fn new(reason: impl Into<String>) -> Self {
        StepError(reason.into())
    }
}

/// Sub-process returned by a `configure` step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubCommand {
    /// Program and arguments; with `shell`, a single string run through `/bin/sh -c`.
    pub argv: Vec<String>,
    /// Run `argv[0]` through `/bin/sh -c`.
    pub shell: bool,
    /// Environment added to the agent's own, after the `ochopod` facts and the cluster view.
    pub env: BTreeMap<String, String>,
    /// Working directory; the agent's when absent.
    pub cwd: Option<PathBuf>,
}

/// Outcome of the `tear_down` step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TearDown {
    /// The step stopped nothing: the agent sends SIGTERM, then SIGKILL after the grace.
    Default,
    /// The step asked the sub-process to stop: the agent only waits for the grace, then SIGKILL.
    Requested,
}

/// Behaviour of a pod, called by the lifecycle actor one step at a time.
#[async_trait]
pub trait LifeCycle: Send + Sync + 'static {
    /// Runs once, before the very first `configure`.
    async fn initialize(&self) -> Result<(), StepError> {
        Ok(())
    }

    /// Tells whether the pod can take part in the coming configuration (`check` verb).
    async fn can_configure(&self, _cluster: &Cluster) -> Result<(), StepError> {
        Ok(())
    }

    /// Prepares the pod for `cluster` and returns the sub-process to run.
    async fn configure(&self, cluster: &Cluster) -> Result<SubCommand, StepError>;

    /// Runs once the whole cluster is configured (`ok` verb).
    async fn configured(&self, _cluster: &Cluster) -> Result<(), StepError> {
        Ok(())
    }

    /// Checks the running sub-process; may return metrics to publish.
    async fn sanity_check(&self, _pid: u32) -> Result<Option<serde_json::Value>, StepError> {
        Ok(None)
    }

    /// Stops the sub-process gracefully, or leaves it to the agent's SIGTERM.
    async fn tear_down(&self, _pid: u32) -> Result<TearDown, StepError> {
        Ok(TearDown::Default)
    }

    /// Handles the `signal` verb; its reply is returned to the caller.
    async fn signaled(&self, _body: &serde_json::Value) -> Result<serde_json::Value, StepError> {
        Ok(serde_json::json!({}))
    }

    /// Runs once when the pod is killed, after the tear-down.
    async fn finalize(&self) -> Result<(), StepError> {
        Ok(())
    }
}

/// Behaviour of the cluster's leader.
#[async_trait]
pub trait Model: Send + Sync + 'static {
    /// Probes the cluster as last configured; the returned text becomes the leader's status.
    async fn probe(&self, _cluster: &Cluster) -> Result<String, StepError> {
        Ok(String::new())
    }
}
