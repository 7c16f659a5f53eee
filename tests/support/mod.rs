//! Helpers for integration tests: real ZooKeeper servers, ochopod pod processes and
//! polling with deadlines.
//!
//! A test file includes them with `mod support;`. Each test binary uses a subset,
//! so unused items are allowed.
#![allow(dead_code, unused_imports)]

pub mod pods;
pub mod proxy;
pub mod wait;
pub mod zk;

pub use wait::{wait_until, wait_until_async, PollOutcome};
pub use zk::{
    four_letter, four_letter_with_timeout, shared_server, unique_namespace, ZkEnsemble, ZkServer,
    MAX_SESSION_TIMEOUT_MS, MIN_SESSION_TIMEOUT_MS, TICK_TIME_MS,
};
