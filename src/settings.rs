//! Settings of a pod: what the operator chose, merged from defaults, a TOML file, the
//! environment and command-line flags (later wins), and validated before anything starts.
//!
//! Every value is checked where it is read, so an error names the setting, the value, where the
//! value came from (file, environment variable or flag) and what is allowed. The rules that
//! involve several settings run once all sources are merged. `Settings::check` collects every
//! error; `Settings::load` stops at the first one.

mod source;
mod token;
mod value;
mod zookeeper_auth;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use source::{Sources, KEYS};
pub use token::{check_token, Token, MAX_TOKEN_CHARS, MIN_TOKEN_CHARS, REDACTED};
pub use value::MAX_SECONDS;
pub use zookeeper_auth::{
    check_zookeeper_auth, ZookeeperAuth, MAX_ZOOKEEPER_AUTH_CHARS, MIN_ZOOKEEPER_PASSWORD_CHARS,
};

/// Every setting of a pod, after merging and validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    // Core settings.
    /// ZooKeeper connection string, with an optional chroot (`host:port,host:port/chroot`).
    /// Empty means "ask the binding".
    pub zk: String,
    pub namespace: String,
    pub cluster: String,
    /// Control port inside the container.
    pub port: u16,
    /// Platform binding: `auto`, `local`, `marathon`, `kubernetes`, `docker` or `ec2`.
    pub binding: String,
    pub debug: bool,
    /// Run the sub-process on the first `on` (false: configure only).
    pub start: bool,
    /// ZooKeeper session timeout, in seconds.
    pub session_timeout: f64,
    /// Address to register instead of the one the binding finds.
    pub ip: Option<String>,
    /// Exit the agent once the pod is dead, instead of idling.
    pub exit_when_dead: bool,
    /// Shared secret that `/control/*` and `/reset` requests must carry; none means open.
    /// Printed as a placeholder by `Debug` and `Serialize`.
    pub token: Option<Token>,
    /// `user:password` that every ZooKeeper session of the pod authenticates with (ZooKeeper's
    /// `digest` scheme). With it, the znodes the pod creates grant every right to that identity
    /// only, plus READ to anyone when `zookeeper_world_read` is set. Without it, anyone may do
    /// anything with them. `Debug` and `Serialize` hide the password.
    pub zookeeper_auth: Option<ZookeeperAuth>,
    /// Let anyone read the znodes the pod creates when `zookeeper_auth` is set, so dependent
    /// clusters with other credentials, monitoring and `ochopod ls` can read them.
    pub zookeeper_world_read: bool,

    // Model settings (leader behaviour).
    /// Seconds the leader waits after a change before configuring.
    pub damper: f64,
    /// Clusters this one depends on: `name`, `/namespace.name`, or glob patterns.
    pub depends_on: Vec<String>,
    /// Turn every pod off before configuring.
    pub full_shutdown: bool,
    /// Configure one pod at a time instead of all in parallel.
    pub sequential: bool,
    /// Timeout of each control request the leader sends, in seconds.
    pub control_timeout: f64,
    /// Seconds between two leader probes.
    pub probe_every: f64,

    // Lifecycle settings (pod behaviour).
    /// Sanity checks that may fail in a row before the pod turns off.
    pub checks: u32,
    /// Seconds between two sanity checks.
    pub check_every: f64,
    /// Working directory of the sub-process and hooks.
    pub cwd: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when tearing the sub-process down.
    pub grace: f64,
    /// Copy the sub-process output into the pod log.
    pub pipe_subprocess: bool,
    /// Run the command through `/bin/sh -c`.
    pub shell: bool,
    /// Never SIGKILL the sub-process.
    pub soft: bool,
    /// Re-run the sub-process on every configuration.
    pub strict: bool,

    // The binary's lifecycle.
    /// Static command of the sub-process (a shell-quoted string, split into words unless `shell`).
    pub command: Option<String>,
    /// Command given after `--` on the command line; wins over `command`.
    #[serde(skip)]
    pub argv: Vec<String>,
    /// Extra environment of the sub-process.
    pub env: BTreeMap<String, String>,
    /// Hook executables by step name (`configure`, `sanity_check`, ...).
    pub hooks: BTreeMap<String, PathBuf>,
    /// Seconds a hook may run before it is killed and counted as failed.
    pub hook_timeout: f64,

    // Binding inputs.
    /// `PORT_<n>` style remappings, container port to reachable port (filled from the
    /// environment by the binding; may also be set in the file for tests).
    pub ports: BTreeMap<String, u16>,
    /// Files the marathon binding reads the ZooKeeper URL from when `zk` is empty.
    pub mesos_zk_files: Vec<PathBuf>,
    /// Base URL of the EC2 instance metadata service (`http://host[:port]`), read by the `ec2`
    /// binding only. It has no default on purpose: the agent never contacts a metadata address
    /// unless the operator names it.
    pub ec2_metadata_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            zk: String::new(),
            namespace: "default".to_string(),
            cluster: "default".to_string(),
            port: 8080,
            binding: "auto".to_string(),
            debug: false,
            start: true,
            session_timeout: 10.0,
            ip: None,
            exit_when_dead: false,
            token: None,
            zookeeper_auth: None,
            zookeeper_world_read: true,
            damper: 0.0,
            depends_on: Vec::new(),
            full_shutdown: false,
            sequential: false,
            control_timeout: 60.0,
            probe_every: 60.0,
            checks: 1,
            check_every: 60.0,
            cwd: None,
            grace: 60.0,
            pipe_subprocess: false,
            shell: false,
            soft: false,
            strict: false,
            command: None,
            argv: Vec::new(),
            env: BTreeMap::new(),
            hooks: BTreeMap::new(),
            hook_timeout: 60.0,
            ports: BTreeMap::new(),
            mesos_zk_files: vec![
                PathBuf::from("/etc/mesos/zk"),
                PathBuf::from("/opt/mesosphere/etc/mesos-slave-common"),
            ],
            ec2_metadata_url: None,
        }
    }
}

/// Turns a number of seconds from the settings into a `Duration`; validation has already
/// rejected negative and non-finite values.
pub fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

impl Settings {
    /// Returns `<namespace>.<cluster>`.
    pub fn qualified_cluster(&self) -> String {
        format!("{}.{}", self.namespace, self.cluster)
    }

    /// Merges `sources` over the defaults and validates the result, stopping at the first
    /// error.
    pub fn load(sources: &Sources) -> Result<Settings, SettingsError> {
        Settings::check(sources).map_err(|mut errors| errors.remove(0))
    }

    /// Merges `sources` over the defaults and validates the result, returning every error
    /// found (never an empty list).
    pub fn check(sources: &Sources) -> Result<Settings, Vec<SettingsError>> {
        source::merge(sources)
    }
}

/// Checks a ZooKeeper connection string (`host[:port][,host[:port]...][/chroot]`), returning
/// what is expected when it is invalid. An empty string is accepted.
pub fn check_zookeeper(text: &str) -> Result<(), String> {
    value::zookeeper(text)
}

/// Binding names accepted by the `binding` setting.
pub const BINDINGS: &[&str] = &["auto", "local", "marathon", "kubernetes", "docker", "ec2"];

/// Hook names accepted as keys of the `hooks` table.
pub const HOOKS: &[&str] = &[
    "initialize",
    "can_configure",
    "configure",
    "configured",
    "sanity_check",
    "tear_down",
    "signaled",
    "finalize",
    "probe",
];

/// Source of a setting's value, so that an error points at the place to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A key of the TOML file at this path.
    File(PathBuf),
    /// The environment variable of this name.
    Env(String),
    /// The command-line flag for this setting.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(formatter, "(built-in default)"),
            Origin::File(path) => write!(formatter, "(in {})", path.display()),
            Origin::Env(name) => write!(formatter, "(from environment variable {name})"),
            Origin::Flag(key) => write!(formatter, "(from flag --{})", key.replace('_', "-")),
        }
    }
}

/// Reason the settings cannot be used. Each message names the setting or file, the value, and
/// what is allowed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SettingsError {
    /// The settings file cannot be read.
    #[error("cannot read settings file {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// The settings file is not valid TOML.
    #[error("settings file {} is not valid TOML: {reason}", path.display())]
    Syntax { path: PathBuf, reason: String },
    /// A key of the settings file is not a setting.
    #[error("unknown setting `{key}` {origin}: {hint}")]
    UnknownKey {
        key: String,
        origin: Origin,
        hint: String,
    },
    /// A value has the wrong type or is out of range.
    #[error("setting `{key}` {origin} has an invalid value {value}: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
        origin: Origin,
    },
}

impl SettingsError {
    /// Returns the setting (or `file` for file errors) the error is about.
    pub fn key(&self) -> &str {
        match self {
            SettingsError::Unreadable { .. } | SettingsError::Syntax { .. } => "file",
            SettingsError::UnknownKey { key, .. } | SettingsError::Invalid { key, .. } => key,
        }
    }
}
