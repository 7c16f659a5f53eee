//! The `ochopod` binary. `run` starts a pod as a container's entrypoint, and the other
//! subcommands are operator tools that read ZooKeeper and call the pods' control servers.
//!
//! Exit codes are listed in `EXIT_CODES`, which `ochopod --help` prints.

mod cli;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ochopod::acl::ZookeeperAccess;
use ochopod::lifecycle::Verb;
use ochopod::settings::{check_token, check_zookeeper, Token, ZookeeperAuth, MAX_SECONDS};

use cli::operator::{Action, Target};
use cli::output::errln;
use cli::pattern::Pattern;
use cli::run::RunArgs;

/// ZooKeeper of the operator commands when neither `--zk` nor `ochopod_zk`/`OCHOPOD_ZK` is set.
const DEFAULT_ZOOKEEPER: &str = "127.0.0.1:2181";

/// Exit codes of every subcommand, printed after the help. A pattern that matches no pod is an
/// error for the commands that act on pods, because nothing was done, but `ls` of an empty set
/// is a valid listing.
const EXIT_CODES: &str = "\
Exit codes:
  0    success; `ls` also exits 0 when no pod matches, with an empty list
  1    failure at run time: ZooKeeper unreachable, a pattern that matches no pod (info, log, on,
       off, kill, reset, signal), or a pod that did not reply 200
  2    invalid command line or settings, reported before anything starts
  141  stdout closed before all output was written (ended by SIGPIPE, as `ls | head` ends)";

/// Exit codes of `ls`, printed after its help.
const LIST_EXIT_CODES: &str = "\
Exit codes: 0 with the pods found, also when no pod matches (an empty list); 1 when ZooKeeper \
cannot be read; 2 for invalid arguments.";

/// Exit codes of the commands that act on pods, printed after their help.
const TARGET_EXIT_CODES: &str = "\
Exit codes: 0 when every matching pod replied 200; 1 when a pod did not, when no pod matches the \
pattern, or when ZooKeeper cannot be read; 2 for invalid arguments.";

#[derive(Parser, Debug)]
#[command(
    name = "ochopod",
    version,
    about = "Container agent that clusters pods through ZooKeeper",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pod: register in ZooKeeper, take part in the leader election, supervise the
    /// sub-process
    Run(Box<RunArgs>),
    /// List the pods of the matching clusters: cluster, seq, ip, ports, state, process, status
    Ls(ListArgs),
    /// Print /info of each matching pod
    Info(TargetArgs),
    /// Print the last log lines of each matching pod
    Log(TargetArgs),
    /// Turn the matching pods on, with a cluster view built as their leader would
    On(TargetArgs),
    /// Turn the matching pods off
    Off(TargetArgs),
    /// Kill the matching pods: tear the sub-process down and finalize; they stay dead
    Kill(TargetArgs),
    /// Make the matching pods drop their ZooKeeper session and register again
    Reset(TargetArgs),
    /// Run the signaled step of the matching pods with a JSON body
    Signal(SignalArgs),
    /// Validate a TOML settings file, its hooks and its command, and report every error
    CheckConfig {
        /// The TOML settings file
        file: PathBuf,
        /// Command of the sub-process that `run` would get after `--`
        #[arg(last = true, value_name = "COMMAND")]
        argv: Vec<String>,
    },
}

/// Arguments shared by the operator commands: the ZooKeeper address, the output format and the
/// timeout.
#[derive(Args, Debug)]
struct Common {
    /// ZooKeeper connection string [default: ochopod_zk or OCHOPOD_ZK, else 127.0.0.1:2181]
    #[arg(long, value_name = "HOSTS")]
    zk: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// Seconds each ZooKeeper connection and request may take [default: 5, or 60 for on, off,
    /// kill and signal]
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Shared token of the pods, sent with on, off, kill, reset and signal [default:
    /// ochopod_token or OCHOPOD_TOKEN]. Other users can read a flag in the process list
    #[arg(long, value_name = "SECRET")]
    token: Option<String>,
    /// USER:PASSWORD that the ZooKeeper session authenticates with (digest scheme), needed when
    /// the clusters' znodes are not world-readable [default: ochopod_zookeeper_auth or
    /// OCHOPOD_ZOOKEEPER_AUTH]. Other users can read a flag in the process list
    #[arg(long, value_name = "USER:PASSWORD")]
    zookeeper_auth: Option<String>,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true, after_help = LIST_EXIT_CODES)]
struct ListArgs {
    /// Glob over <namespace>.<cluster>, optionally #<seq>, e.g. 'shop.*' or '*.redis#3'
    #[arg(default_value = "*")]
    pattern: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true, after_help = TARGET_EXIT_CODES)]
struct TargetArgs {
    /// Glob over <namespace>.<cluster>, optionally #<seq>, e.g. 'shop.*' or '*.redis#3'
    pattern: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true, after_help = TARGET_EXIT_CODES)]
struct SignalArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// JSON body handed to the signaled step
    #[arg(long, value_name = "JSON", default_value = "{}")]
    body: String,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(_) => ochopod::logging::init(),
        _ => ochopod::logging::init_with_default("warn"),
    }

    let code = match cli.command {
        Command::Run(args) => cli::run::run(*args),
        Command::CheckConfig { file, argv } => cli::run::check_config(file, argv),
        Command::Ls(args) => operate(&args.pattern, &args.common, None, Duration::from_secs(5)),
        Command::Info(args) => operate(
            &args.pattern,
            &args.common,
            Some(Action::Info),
            Duration::from_secs(5),
        ),
        Command::Log(args) => operate(
            &args.pattern,
            &args.common,
            Some(Action::Log),
            Duration::from_secs(5),
        ),
        Command::Reset(args) => operate(
            &args.pattern,
            &args.common,
            Some(Action::Reset),
            Duration::from_secs(5),
        ),
        Command::On(args) => control(&args, Verb::On, serde_json::Value::Null),
        Command::Off(args) => control(&args, Verb::Off, serde_json::Value::Null),
        Command::Kill(args) => control(&args, Verb::Kill, serde_json::Value::Null),
        Command::Signal(args) => match serde_json::from_str(&args.body) {
            Ok(body) => control(&args.target, Verb::Signal, body),
            Err(error) => usage_error(&format!(
                "invalid --body {:?}: not JSON ({error})",
                args.body
            )),
        },
    };
    std::process::exit(code);
}

fn control(args: &TargetArgs, verb: Verb, body: serde_json::Value) -> i32 {
    operate(
        &args.pattern,
        &args.common,
        Some(Action::Control(verb, body)),
        Duration::from_secs(60),
    )
}

/// Runs an operator command (`ls` when `action` is `None`) in an actix `System`.
fn operate(
    pattern: &str,
    common: &Common,
    action: Option<Action>,
    default_timeout: Duration,
) -> i32 {
    let target = match target(pattern, common, default_timeout) {
        Ok(target) => target,
        Err(message) => return usage_error(&message),
    };
    actix::System::new().block_on(async move {
        match action {
            None => cli::operator::list(target).await,
            Some(action) => cli::operator::act(target, action).await,
        }
    })
}

/// Checks the operator command's arguments.
fn target(pattern: &str, common: &Common, default_timeout: Duration) -> Result<Target, String> {
    let pattern = Pattern::parse(pattern)?;

    let zk = common
        .zk
        .clone()
        .or_else(|| std::env::var("OCHOPOD_ZK").ok())
        .or_else(|| std::env::var("ochopod_zk").ok())
        .filter(|zk| !zk.is_empty())
        .unwrap_or_else(|| DEFAULT_ZOOKEEPER.to_string());
    check_zookeeper(&zk).map_err(|expected| {
        format!("invalid ZooKeeper connection string {zk:?}: expected {expected}")
    })?;

    let timeout = match common.timeout {
        None => default_timeout,
        Some(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS => {
            Duration::from_secs_f64(seconds)
        }
        Some(seconds) => {
            return Err(format!(
                "invalid --timeout {seconds}: expected seconds above 0 and at most {MAX_SECONDS}"
            ));
        }
    };
    let token = common
        .token
        .clone()
        .or_else(|| std::env::var("OCHOPOD_TOKEN").ok())
        .or_else(|| std::env::var("ochopod_token").ok())
        .filter(|token| !token.is_empty());
    if let Some(token) = &token {
        check_token(token).map_err(|expected| format!("invalid token: expected {expected}"))?;
    }
    let auth = common
        .zookeeper_auth
        .clone()
        .or_else(|| std::env::var("OCHOPOD_ZOOKEEPER_AUTH").ok())
        .or_else(|| std::env::var("ochopod_zookeeper_auth").ok())
        .filter(|auth| !auth.is_empty())
        .map(|auth| ZookeeperAuth::parse(&auth))
        .transpose()
        .map_err(|expected| {
            format!(
                "invalid ZooKeeper credentials (--zookeeper-auth or ochopod_zookeeper_auth): \
                 expected {expected}"
            )
        })?;

    Ok(Target {
        zk,
        pattern,
        timeout,
        json: common.json,
        token: token.map(Token::new),
        // The operator commands create no znode, so only the credentials matter.
        access: ZookeeperAccess::new(auth, true),
    })
}

fn usage_error(message: &str) -> i32 {
    errln!("ochopod: {message}");
    2
}
