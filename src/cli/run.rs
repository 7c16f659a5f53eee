//! `ochopod run` and `ochopod check-config`: the settings flags, their merge with the file and
//! the environment, and the report of invalid settings (exit code 2, before anything starts).

use std::path::PathBuf;

use clap::Args;
use ochopod::hooks::HookRunner;
use ochopod::settings::{Settings, SettingsError, Sources};

use super::output::{errln, outln};

/// Declares the flags that set one setting each, as text that the settings loader converts and
/// validates like the environment's, so that every invalid value gets the same message.
macro_rules! setting_flags {
    ($( $(#[$attribute:meta])* $field:ident ),* $(,)?) => {
        /// One flag per setting; each wins over the file and the environment.
        #[derive(Args, Debug, Default)]
        #[command(next_help_heading = "Settings (each overrides the file and the environment)")]
        pub struct SettingFlags {
            $( $(#[$attribute])* #[arg(long)] pub $field: Option<String>, )*

            /// Extra environment of the sub-process, KEY=VALUE; repeatable.
            #[arg(long, value_name = "KEY=VALUE")]
            pub env: Vec<String>,
            /// Hook executable of a step, STEP=PATH (steps: initialize, can_configure, configure,
            /// configured, sanity_check, tear_down, signaled, finalize, probe); repeatable.
            #[arg(long, value_name = "STEP=PATH")]
            pub hooks: Vec<String>,
            /// Remapped port, CONTAINER_PORT=REACHABLE_PORT; repeatable.
            #[arg(long, value_name = "PORT=PORT")]
            pub ports: Vec<String>,
        }

        impl SettingFlags {
            /// Returns the flags given, as (setting, text) pairs.
            pub fn pairs(&self) -> Vec<(String, String)> {
                let mut pairs = Vec::new();
                $( if let Some(text) = &self.$field {
                    pairs.push((stringify!($field).to_string(), text.clone()));
                } )*
                for (key, entries) in [("env", &self.env), ("hooks", &self.hooks), ("ports", &self.ports)] {
                    pairs.extend(entries.iter().map(|entry| (key.to_string(), entry.clone())));
                }
                pairs
            }
        }
    };
}

setting_flags! {
    /// ZooKeeper connection string, host:port[,host:port...][/chroot] [default: from the binding]
    #[arg(value_name = "HOSTS")]
    zk,
    /// Namespace, dot-separated names [default: default]
    #[arg(value_name = "NAME")]
    namespace,
    /// Cluster name [default: default]
    #[arg(value_name = "NAME")]
    cluster,
    /// Control port inside the container [default: 8080]
    #[arg(value_name = "PORT")]
    port,
    /// Platform binding: auto, local, marathon, kubernetes, docker or ec2 [default: auto]
    #[arg(value_name = "NAME")]
    binding,
    /// Debug flag published in the registration [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    debug,
    /// Run the sub-process on the first `on` [default: true]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    start,
    /// ZooKeeper session timeout, in seconds [default: 10]
    #[arg(value_name = "SECONDS")]
    session_timeout,
    /// Address to register instead of the one the binding finds
    #[arg(value_name = "ADDRESS")]
    ip,
    /// Exit once the pod is dead instead of idling [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    exit_when_dead,
    /// Shared secret that /control and /reset requests must carry [default: none, open].
    /// Prefer ochopod_token or the file: other users can read a flag in the process list
    #[arg(value_name = "SECRET")]
    token,
    /// ZooKeeper digest credentials, USER:PASSWORD. The cluster's znodes then grant every right
    /// to that identity only [default: none, znodes open to anyone]. Prefer
    /// ochopod_zookeeper_auth or the file: other users can read a flag in the process list
    #[arg(value_name = "USER:PASSWORD")]
    zookeeper_auth,
    /// Let anyone read the cluster's znodes when zookeeper_auth is set [default: true]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    zookeeper_world_read,
    /// Seconds the leader waits after a change before configuring [default: 0]
    #[arg(value_name = "SECONDS")]
    damper,
    /// Clusters this one depends on, comma-separated: name, /namespace.name, or glob patterns
    #[arg(value_name = "LIST")]
    depends_on,
    /// Turn every pod off before configuring [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    full_shutdown,
    /// Configure one pod at a time instead of all in parallel [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    sequential,
    /// Timeout of each control request the leader sends, in seconds [default: 60]
    #[arg(value_name = "SECONDS")]
    control_timeout,
    /// Seconds between two leader probes [default: 60]
    #[arg(value_name = "SECONDS")]
    probe_every,
    /// Sanity checks that may fail in a row before the pod turns off [default: 1]
    #[arg(value_name = "COUNT")]
    checks,
    /// Seconds between two sanity checks [default: 60]
    #[arg(value_name = "SECONDS")]
    check_every,
    /// Working directory of the sub-process and hooks [default: the agent's]
    #[arg(value_name = "DIR")]
    cwd,
    /// Seconds between SIGTERM and SIGKILL when tearing the sub-process down [default: 60]
    #[arg(value_name = "SECONDS")]
    grace,
    /// Copy the sub-process output into the pod log [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pipe_subprocess,
    /// Run the command through /bin/sh -c [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    shell,
    /// Never SIGKILL the sub-process [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    soft,
    /// Re-run the sub-process on every configuration [default: false]
    #[arg(value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    strict,
    /// Static command of the sub-process, as one shell-quoted string (after `--` wins)
    #[arg(value_name = "COMMAND")]
    command,
    /// Seconds a hook may run before it is killed [default: 60]
    #[arg(value_name = "SECONDS")]
    hook_timeout,
    /// Files holding the marathon ZooKeeper zk:// URL, comma-separated
    /// [default: /etc/mesos/zk,/opt/mesosphere/etc/mesos-slave-common]
    #[arg(value_name = "LIST")]
    mesos_zk_files,
    /// URL of the EC2 instance metadata service, needed by the ec2 binding (no default)
    #[arg(value_name = "URL")]
    ec2_metadata_url,
}

/// Arguments of `ochopod run`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    /// TOML settings file; its keys are the setting names (depends_on = ["zookeeper"], ...)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the merged settings as JSON and exit without starting the pod
    #[arg(long)]
    pub print_settings: bool,

    #[command(flatten)]
    pub settings: SettingFlags,

    /// Command of the sub-process, after `--`; wins over the `command` setting
    #[arg(last = true, value_name = "COMMAND")]
    pub argv: Vec<String>,
}

/// Loads the settings from the file, the process environment and the flags, or prints every
/// error and returns `Err(2)`.
pub fn load_settings(args: &RunArgs) -> Result<Settings, i32> {
    let sources = Sources {
        file: args.config.clone(),
        env: Sources::process_env(),
        flags: args.settings.pairs(),
        argv: args.argv.clone(),
    };
    Settings::check(&sources).map_err(|errors| {
        report(&errors);
        2
    })
}

/// Runs `ochopod run`; returns the exit code.
pub fn run(args: RunArgs) -> i32 {
    let settings = match load_settings(&args) {
        Ok(settings) => settings,
        Err(code) => return code,
    };

    if args.print_settings {
        let json = serde_json::to_string_pretty(&settings).expect("settings always serialize");
        outln!("{json}");
        return 0;
    }
    super::start_pod(settings)
}

/// Runs `ochopod check-config FILE [-- COMMAND]`: checks the file alone (not the environment)
/// and the command after `--` as `run` does before it starts (settings, hooks, `cwd`, command),
/// and prints every error, or `OK`.
pub fn check_config(file: PathBuf, argv: Vec<String>) -> i32 {
    let sources = Sources {
        file: Some(file.clone()),
        argv,
        ..Sources::default()
    };
    let settings = match Settings::check(&sources) {
        Ok(settings) => settings,
        Err(errors) => {
            report(&errors);
            return 2;
        }
    };

    let problems = HookRunner::problems(&settings);
    if !problems.is_empty() {
        for problem in problems {
            errln!("ochopod: {problem}");
        }
        return 2;
    }
    outln!("OK: {} is valid", file.display());
    0
}

fn report(errors: &[SettingsError]) {
    for error in errors {
        errln!("ochopod: {error}");
    }
}
