//! The binary's subcommands: `run` starts a pod, the others are operator tools over ZooKeeper
//! and the pods' control servers.

pub mod operator;
pub mod output;
pub mod pattern;
pub mod run;

use ochopod::settings::Settings;

/// Starts the pod with validated settings and returns the process exit code.
pub fn start_pod(settings: Settings) -> i32 {
    ochopod::pod::run_binary(settings)
}
