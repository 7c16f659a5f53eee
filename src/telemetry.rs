//! Runtime facts of a pod that the control server publishes in `/info` and `/metrics`.
//!
//! Each fact has one writer, the actor that owns it: the lifecycle writes the process state,
//! the election and leader write the role, the session writes the session state and the
//! ZooKeeper error. The control server only reads. A plain mutex is enough: every critical
//! section is a copy of a few fields.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::registration::Registration;

/// State of the sub-process as `/info` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Not running: not configured yet, turned off, or between two restarts.
    #[default]
    Stopped,
    Running,
    /// Being torn down.
    Terminating,
    /// Terminal: the pod was killed or its work is done.
    Dead,
}

/// Role of the pod in its cluster, as `/info` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Follower,
    Leader,
    /// Leader with a change waiting for the damper to expire.
    LeaderPending,
    /// Leader running a configuration round.
    LeaderConfiguring,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Leader => "leader",
            Role::LeaderPending => "leader (configuration pending)",
            Role::LeaderConfiguring => "leader (configuring)",
        }
    }

    pub fn is_leader(self) -> bool {
        self != Role::Follower
    }
}

/// State of the ZooKeeper session as `/metrics` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionState {
    #[default]
    Connecting,
    Connected,
    Disconnected,
    Expired,
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Connected => "connected",
            SessionState::Disconnected => "disconnected",
            SessionState::Expired => "expired",
            SessionState::Closed => "closed",
        }
    }
}

/// The facts, copied out by readers.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// The pod's registration as last written to ZooKeeper (seq is 0 until registered).
    pub registration: Registration,
    pub process: ProcessState,
    pub role: Role,
    pub session: SessionState,
    /// Dependencies as configured (`depends_on`).
    pub dependencies: Vec<String>,
    /// Metrics returned by the last sanity check.
    pub metrics: serde_json::Value,
    /// Sub-process restarts since the agent started.
    pub restarts: u64,
    /// Pid of the running sub-process.
    pub pid: Option<u32>,
    /// Highest leader epoch this pod has obeyed.
    pub epoch: i64,
    /// End of the leader's lease, set by the leader actor to a share of the session timeout
    /// after the last request ZooKeeper confirmed, so ZooKeeper cannot have expired the session
    /// before it. Past it, a leader role reads as `Follower`, so a leader that was frozen or
    /// cut off stops reporting the lead before another pod may take it. `None` leaves the role
    /// as written.
    pub leader_lease: Option<Instant>,
    /// Explanation of the ZooKeeper denial (credentials or ACLs) that keeps this pod from
    /// connecting or registering, with what to check. `None` once the pod is registered.
    pub zookeeper_error: Option<String>,
}

/// Shared, single-writer-per-field facts plus request counters.
#[derive(Debug)]
pub struct Telemetry {
    facts: Mutex<Facts>,
    started: Instant,
    /// Configuration rounds this pod finished as leader.
    pub rounds: AtomicU64,
    /// Configuration rounds this pod gave up as leader.
    pub failed_rounds: AtomicU64,
    /// Control requests served, by outcome class.
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            facts: Mutex::new(Facts::default()),
            started: Instant::now(),
            rounds: AtomicU64::new(0),
            failed_rounds: AtomicU64::new(0),
            requests_ok: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
        }
    }
}

impl Telemetry {
    /// Returns a copy of the current facts, with a leader role whose lease ended read as
    /// `Follower`.
    pub fn facts(&self) -> Facts {
        let mut facts = self
            .facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if facts
            .leader_lease
            .is_some_and(|lease| Instant::now() >= lease)
        {
            facts.role = Role::Follower;
        }
        facts
    }

    /// Changes the facts under the lock; `change` must be short.
    pub fn update(&self, change: impl FnOnce(&mut Facts)) {
        let mut facts = self
            .facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut facts);
    }

    /// Returns the seconds since the agent started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
