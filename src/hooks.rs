//! The binary's lifecycle: each step of [`LifeCycle`] and [`Model`] runs an executable hook.
//!
//! The settings map step names to executables (`hooks.configure = "/opt/pod/configure"`), so a
//! pod's behaviour can be written in any language. A hook gets the cluster view as JSON on
//! stdin, and in its environment the agent's own, the pod facts as JSON in `ochopod`, the
//! settings' `env`, the cluster view's variables (`OCHOPOD_INDEX`, `OCHOPOD_CLUSTER_JSON`, ...)
//! and `OCHOPOD_HOOK` with the step name. Steps called without a view (`initialize`,
//! `sanity_check`, `tear_down`, `signaled`, `finalize`) get the view of the last `configure`.
//! A hook fails by exiting non-zero, and its stderr becomes the reason. A hook that runs longer
//! than `hook_timeout` fails too, and it is killed with its process group.
//!
//! What each hook prints on stdout:
//!
//! - `configure`: nothing to keep the static command, or
//!   `{"command": "string" | ["argv", ...], "env": {"NAME": "value", ...}}`. A string command
//!   runs through `/bin/sh -c` when the `shell` setting is on and is split into shell words
//!   otherwise; an array is run as is.
//! - `sanity_check`: optional metrics as JSON (text that is not JSON is published as a string).
//!   It also gets the sub-process pid in `OCHOPOD_PID`.
//! - `signaled`: the JSON reply of the `signal` request (nothing means `{}`); stdin is the
//!   request body instead of the view.
//! - `probe`: the status text of the leader.
//! - `tear_down`: nothing. A `tear_down` hook means that the hook stops the sub-process (pid in
//!   `OCHOPOD_PID`), so the agent sends no SIGTERM and only waits for the grace period before
//!   SIGKILL.
//!
//! A step without a hook does nothing and succeeds.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use log::{debug, warn};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::lifecycle::command_words;
use crate::reaper;
use crate::settings::{seconds, Settings};
use crate::steps::{LifeCycle, Model, StepError, SubCommand, TearDown};
use crate::supervisor::pod_facts;
use crate::telemetry::Telemetry;

/// Names of the steps a hook can implement.
pub const HOOK_STEPS: [&str; 9] = [
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

/// Maximum bytes of a hook's stdout kept. The reader drains and drops the rest, so a verbose hook
/// does not block on a full pipe.
const MAX_STDOUT: usize = 1024 * 1024;

/// Maximum bytes of a hook's stderr kept for the failure reason.
const MAX_STDERR: usize = 64 * 1024;

/// Maximum characters of stderr quoted in a failure reason (the end, where errors usually are).
const MAX_REASON_CHARS: usize = 1000;

/// Maximum characters of invalid output quoted in an error (the beginning).
const MAX_QUOTED_CHARS: usize = 200;

/// Maximum characters of a probe status, which every pod listing shows.
const MAX_STATUS_CHARS: usize = 1000;

/// Time a hook's output may stay open after the hook exited, because a process it started in
/// the background keeps it open. The output read by then is used.
const OUTPUT_LINGER: Duration = Duration::from_millis(500);

/// Problem with the binary's lifecycle settings (hooks, working directory, static command),
/// found at start.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum HookError {
    #[error("unknown hook `{name}`: {}", unknown_step_hint(.suggestion))]
    UnknownStep {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error(
        "hook `{name}`: {} does not exist; correct `hooks.{name}` in the settings or create the file",
        .path.display()
    )]
    Missing { name: String, path: PathBuf },
    #[error("hook `{name}`: cannot read {}: {reason}; check the permissions of the path", .path.display())]
    Unreadable {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("hook `{name}`: {} is not a file; point `hooks.{name}` at an executable file", .path.display())]
    NotAFile { name: String, path: PathBuf },
    #[error(
        "hook `{name}`: {} is not executable (mode {mode:o}); make it executable with `chmod +x {}`",
        .path.display(),
        .path.display()
    )]
    NotExecutable {
        name: String,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "setting `cwd`: {} is not a usable directory ({reason}); create it or correct `cwd`",
        .path.display()
    )]
    WorkingDirectory { path: PathBuf, reason: String },
    #[error(
        "the command's program `{program}` is not an executable file ({searched}); install it, \
         correct the command, or print a command from a `configure` hook"
    )]
    ProgramNotFound { program: String, searched: String },
    #[error(
        "no command to run: set `command` in the settings, give one after `--`, add a \
         `configure` hook that prints one, or set `start = false` if the pod runs no sub-process"
    )]
    NoCommand,
}

fn unknown_step_hint(suggestion: &Option<&'static str>) -> String {
    let valid = HOOK_STEPS.join(", ");
    match suggestion {
        Some(step) => {
            format!("no lifecycle step has this name; did you mean `{step}`? Valid names: {valid}")
        }
        None => format!("no lifecycle step has this name; valid names: {valid}"),
    }
}

/// The [`LifeCycle`] and [`Model`] of the binary, running the hooks of the settings.
pub struct HookRunner {
    /// Absolute path of each hook, by step name.
    hooks: BTreeMap<String, PathBuf>,
    timeout: Duration,
    cwd: Option<PathBuf>,
    /// Whether a string command printed by `configure` runs through `/bin/sh -c`.
    shell: bool,
    env: BTreeMap<String, String>,
    telemetry: Arc<Telemetry>,
    /// The view of the last `configure`, for the steps called without one.
    last_view: Mutex<Option<Cluster>>,
}

impl HookRunner {
    /// Creates the runner of `settings.hooks`; call [`HookRunner::validate`] first to reject
    /// missing hooks at start instead of at their first use. Relative hook paths are resolved
    /// against the agent's working directory now, so `cwd` does not change their meaning.
    pub fn new(settings: &Settings, telemetry: Arc<Telemetry>) -> Self {
        let hooks = settings
            .hooks
            .iter()
            .map(|(name, path)| (name.clone(), absolute(path)))
            .collect();
        HookRunner {
            hooks,
            timeout: seconds(settings.hook_timeout),
            cwd: settings.cwd.clone(),
            shell: settings.shell,
            env: settings.env.clone(),
            telemetry,
            last_view: Mutex::new(None),
        }
    }

    /// Checks what the binary's lifecycle needs before it starts: the `cwd` directory exists,
    /// every hook names a known step and is an executable file, and a sub-process that starts
    /// has a command: a static command whose program can be found, or a `configure` hook that
    /// may print one.
    ///
    /// # Errors
    ///
    /// Returns the first of [`HookRunner::problems`].
    pub fn validate(settings: &Settings) -> Result<(), HookError> {
        match Self::problems(settings).into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Returns every problem [`HookRunner::validate`] looks for, in this order: the directory,
    /// the hooks in step name order, then the command. Each names the setting, its path and
    /// the fix.
    pub fn problems(settings: &Settings) -> Vec<HookError> {
        let mut problems = Vec::new();
        if let Some(cwd) = &settings.cwd {
            problems.extend(check_directory(cwd).err());
        }
        for (name, path) in &settings.hooks {
            problems.extend(check_hook(name, path).err());
        }
        problems.extend(check_command(settings).err());
        problems
    }

    fn remember_view(&self, cluster: &Cluster) {
        *self
            .last_view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(cluster.clone());
    }

    fn last_view(&self) -> Option<Cluster> {
        self.last_view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Runs the hook of `step` with `view` (or the last configured view) and returns its stdout,
    /// or `None` when the step has no hook.
    async fn run(
        &self,
        step: &'static str,
        view: Option<&Cluster>,
        stdin: Option<Vec<u8>>,
        extra_env: &[(&str, String)],
    ) -> Result<Option<String>, StepError> {
        let Some(path) = self.hooks.get(step) else {
            return Ok(None);
        };
        let remembered;
        let view = match view {
            Some(view) => Some(view),
            None => {
                remembered = self.last_view();
                remembered.as_ref()
            }
        };
        let input = match stdin {
            Some(input) => input,
            None => serde_json::to_vec(&view.cloned().unwrap_or_default())
                .expect("a cluster view always serializes"),
        };

        let mut command = Command::new(path);
        command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("ochopod", pod_facts(&self.telemetry))
            .envs(&self.env)
            .envs(view.map(Cluster::environment).unwrap_or_default())
            .env("OCHOPOD_HOOK", step)
            .envs(extra_env.iter().map(|(name, value)| (*name, value)));
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let spawned = reaper::spawn(&mut command).map_err(|error| {
            StepError(format!(
                "hook `{step}` ({}) could not start: {error}",
                path.display()
            ))
        })?;
        let pid = spawned.pid;
        debug!("[pid {pid}] hook `{step}` started");

        if let Some(stdin) = spawned.stdin {
            feed(pid, stdin, input);
        }
        let mut stdout = Collector::start(pid, spawned.stdout, MAX_STDOUT);
        let mut stderr = Collector::start(pid, spawned.stderr, MAX_STDERR);

        let mut exit = spawned.exit;
        let mut guard = KillOnDrop {
            group: pid,
            armed: true,
        };
        let exit = match tokio::time::timeout(self.timeout, &mut exit).await {
            Ok(exit) => exit,
            Err(_) => {
                // The whole group goes, so a hook stuck in a child process ends too.
                kill_group(pid);
                exit.await;
                guard.armed = false;
                return Err(StepError(format!(
                    "hook `{step}` ({}) timed out after {:.1?} and was killed; make it faster or raise \
                     `hook_timeout`",
                    path.display(),
                    self.timeout
                )));
            }
        };

        guard.armed = false;

        let _ = tokio::time::timeout(OUTPUT_LINGER, async {
            stdout.wait().await;
            stderr.wait().await;
        })
        .await;
        let errors = stderr.take();
        if !exit.success() {
            return Err(StepError(format!(
                "hook `{step}` ({}) ended with {exit}: {}",
                path.display(),
                failure_reason(&errors)
            )));
        }
        if !errors.is_empty() {
            debug!(
                "[pid {pid}] hook `{step}` stderr: {}",
                String::from_utf8_lossy(&errors).trim_end()
            );
        }
        debug!("[pid {pid}] hook `{step}` done");
        Ok(Some(String::from_utf8_lossy(&stdout.take()).into_owned()))
    }
}

/// Checks that a hook names a known step and is an executable file.
fn check_hook(name: &str, path: &Path) -> Result<(), HookError> {
    if !HOOK_STEPS.contains(&name) {
        return Err(HookError::UnknownStep {
            name: name.to_string(),
            suggestion: closest_step(name),
        });
    }

    let path = absolute(path);
    let metadata = match std::fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(HookError::Missing {
                name: name.to_string(),
                path,
            });
        }
        Err(error) => {
            return Err(HookError::Unreadable {
                name: name.to_string(),
                path,
                reason: error.to_string(),
            });
        }
    };
    if !metadata.is_file() {
        return Err(HookError::NotAFile {
            name: name.to_string(),
            path,
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 {
        return Err(HookError::NotExecutable {
            name: name.to_string(),
            path,
            mode,
        });
    }
    Ok(())
}

/// Checks that `path` is a directory the sub-process and hooks can run in.
fn check_directory(path: &Path) -> Result<(), HookError> {
    let invalid = |reason: String| HookError::WorkingDirectory {
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::metadata(path).map_err(|error| invalid(error.to_string()))?;
    if !metadata.is_dir() {
        return Err(invalid("not a directory".to_string()));
    }
    Ok(())
}

/// Checks that a pod that starts a sub-process has a command: a static command, or a
/// `configure` hook that may print one. Without either, every `on` would fail and kill the pod.
fn check_command(settings: &Settings) -> Result<(), HookError> {
    let has_static_command = !settings.argv.is_empty() || settings.command.is_some();
    if settings.start && !has_static_command && !settings.hooks.contains_key("configure") {
        return Err(HookError::NoCommand);
    }
    check_static_program(settings)
}

/// Checks that the program of the static command is an executable file when the command is
/// sure to run as given. That is the case when the sub-process starts (`start`), no `configure`
/// hook may return another command, no `initialize` hook may install the program first, and
/// the command does not run through a shell.
fn check_static_program(settings: &Settings) -> Result<(), HookError> {
    let hooked = ["configure", "initialize"]
        .iter()
        .any(|step| settings.hooks.contains_key(*step));
    if !settings.start || hooked || settings.shell {
        return Ok(());
    }
    // An invalid `command` is reported by the settings; nothing to add here.
    let Ok(Some(command)) = crate::lifecycle::static_command(settings) else {
        return Ok(());
    };
    let Some(program) = command.argv.first() else {
        return Ok(());
    };

    // A path with a slash is taken relative to the sub-process's working directory; a bare
    // name is looked up in the PATH the sub-process gets.
    if program.contains('/') {
        let base = settings
            .cwd
            .clone()
            .unwrap_or_else(|| absolute(Path::new(".")));
        let path = base.join(program);
        if is_executable_file(&path) {
            return Ok(());
        }
        return Err(HookError::ProgramNotFound {
            program: program.clone(),
            searched: format!("looked at {}", path.display()),
        });
    }
    let search_path = settings
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    if std::env::split_paths(&search_path)
        .any(|directory| is_executable_file(&directory.join(program)))
    {
        return Ok(());
    }
    Err(HookError::ProgramNotFound {
        program: program.clone(),
        searched: format!("searched PATH={search_path}"),
    })
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

#[async_trait]
impl LifeCycle for HookRunner {
    async fn initialize(&self) -> Result<(), StepError> {
        self.run("initialize", None, None, &[]).await.map(drop)
    }

    async fn can_configure(&self, cluster: &Cluster) -> Result<(), StepError> {
        self.run("can_configure", Some(cluster), None, &[])
            .await
            .map(drop)
    }

    async fn configure(&self, cluster: &Cluster) -> Result<SubCommand, StepError> {
        self.remember_view(cluster);
        match self.run("configure", Some(cluster), None, &[]).await? {
            Some(output) => parse_configure_output(&output, self.shell).map_err(StepError),
            None => Ok(SubCommand::default()),
        }
    }

    async fn configured(&self, cluster: &Cluster) -> Result<(), StepError> {
        self.run("configured", Some(cluster), None, &[])
            .await
            .map(drop)
    }

    async fn sanity_check(&self, pid: u32) -> Result<Option<Value>, StepError> {
        let output = self
            .run(
                "sanity_check",
                None,
                None,
                &[("OCHOPOD_PID", pid.to_string())],
            )
            .await?;
        Ok(output.and_then(|output| parse_metrics(&output)))
    }

    async fn tear_down(&self, pid: u32) -> Result<TearDown, StepError> {
        match self
            .run("tear_down", None, None, &[("OCHOPOD_PID", pid.to_string())])
            .await?
        {
            Some(_) => Ok(TearDown::Requested),
            None => Ok(TearDown::Default),
        }
    }

    async fn signaled(&self, body: &Value) -> Result<Value, StepError> {
        let input = serde_json::to_vec(body).expect("a JSON value always serializes");
        match self.run("signaled", None, Some(input), &[]).await? {
            Some(output) => parse_reply(&output).map_err(StepError),
            None => Ok(serde_json::json!({})),
        }
    }

    async fn finalize(&self) -> Result<(), StepError> {
        self.run("finalize", None, None, &[]).await.map(drop)
    }
}

#[async_trait]
impl Model for HookRunner {
    async fn probe(&self, cluster: &Cluster) -> Result<String, StepError> {
        let output = self.run("probe", Some(cluster), None, &[]).await?;
        Ok(output
            .map(|output| truncate_chars(output.trim(), MAX_STATUS_CHARS))
            .unwrap_or_default())
    }
}

/// Output of a `configure` hook.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigureOutput {
    #[serde(default)]
    command: Option<CommandSpec>,
    #[serde(default)]
    env: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandSpec {
    Text(String),
    Argv(Vec<String>),
}

/// Parses the stdout of a `configure` hook; an empty output or an absent command keeps the
/// static command (an empty `argv`).
fn parse_configure_output(output: &str, shell: bool) -> Result<SubCommand, String> {
    let text = output.trim();
    if text.is_empty() {
        return Ok(SubCommand::default());
    }
    let parsed: ConfigureOutput = serde_json::from_str(text).map_err(|error| {
        format!(
            "configure printed invalid output ({error}); expected nothing or \
             {{\"command\": \"...\" or [...], \"env\": {{...}}}}, got: {}",
            quote(text)
        )
    })?;

    let (argv, shell) = match parsed.command {
        None => (Vec::new(), false),
        Some(CommandSpec::Text(text)) if text.trim().is_empty() => (Vec::new(), false),
        Some(CommandSpec::Text(text)) => {
            let words = command_words(&text, shell).map_err(|reason| {
                format!(
                    "configure printed a command that cannot be split into words ({reason}): {}",
                    quote(&text)
                )
            })?;
            (words, shell)
        }
        Some(CommandSpec::Argv(argv)) => (argv, false),
    };

    let mut env = BTreeMap::new();
    for (name, value) in parsed.env {
        let value = match value {
            Value::String(text) => text,
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            other => {
                return Err(format!(
                    "configure printed `env.{name}` as {other}; each value must be a string, a number or a boolean"
                ));
            }
        };
        env.insert(name, value);
    }
    Ok(SubCommand {
        argv,
        shell,
        env,
        cwd: None,
    })
}

/// Parses the stdout of a `sanity_check` hook: JSON metrics, else the text itself.
fn parse_metrics(output: &str) -> Option<Value> {
    let text = output.trim();
    if text.is_empty() {
        return None;
    }
    Some(
        serde_json::from_str(text)
            .unwrap_or_else(|_| Value::String(truncate_chars(text, MAX_QUOTED_CHARS))),
    )
}

/// Parses the stdout of a `signaled` hook: the JSON reply, `{}` when empty.
fn parse_reply(output: &str) -> Result<Value, String> {
    let text = output.trim();
    if text.is_empty() {
        return Ok(serde_json::json!({}));
    }
    serde_json::from_str(text)
        .map_err(|error| format!("signaled printed invalid JSON ({error}): {}", quote(text)))
}

/// Returns the end of a failed hook's stderr, which usually contains the error.
fn failure_reason(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return "no output on stderr".to_string();
    }
    let count = text.chars().count();
    if count <= MAX_REASON_CHARS {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - MAX_REASON_CHARS).collect();
    format!("...{tail}")
}

/// Quotes the beginning of `text` for an error message.
fn quote(text: &str) -> String {
    format!("{:?}", truncate_chars(text, MAX_QUOTED_CHARS))
}

fn truncate_chars(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match std::env::current_dir() {
        Ok(directory) => directory.join(path),
        Err(_) => path.to_path_buf(),
    }
}

/// Returns the step name nearest to `name` when it is close enough to be a typo.
fn closest_step(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase().replace('-', "_");
    HOOK_STEPS
        .iter()
        .map(|step| (edit_distance(&name, step), *step))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, step)| step)
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Kills a hook's process group when the future running the hook is dropped before the hook
/// exited, for example by a caller's own time limit, so an abandoned hook does not run on.
struct KillOnDrop {
    group: u32,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            debug!(
                "[pid {}] hook abandoned before it exited; killing its process group",
                self.group
            );
            kill_group(self.group);
        }
    }
}

fn kill_group(group: u32) {
    // ESRCH only means the group is already gone.
    let _ = killpg(Pid::from_raw(group as i32), Signal::SIGKILL);
}

/// Writes `input` to a hook's stdin from a thread, then closes it. A hook that exits without
/// reading its input makes the write fail, which is fine.
fn feed(pid: u32, mut stdin: impl Write + Send + 'static, input: Vec<u8>) {
    let writer = move || {
        if let Err(error) = stdin.write_all(&input) {
            debug!("[pid {pid}] hook stdin closed early: {error}");
        }
    };
    if let Err(error) = thread::Builder::new()
        .name(format!("hook-{pid}-stdin"))
        .spawn(writer)
    {
        warn!("[pid {pid}] cannot start the thread writing the hook's stdin: {error}");
    }
}

/// Reads one output stream of a hook on a thread of its own, keeping at most `limit` bytes.
struct Collector {
    buffer: Arc<Mutex<Vec<u8>>>,
    /// Resolves (or fails, if the thread never started) at the end of the stream.
    done: oneshot::Receiver<()>,
}

impl Collector {
    fn start(pid: u32, stream: Option<impl Read + Send + 'static>, limit: usize) -> Collector {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let (sender, done) = oneshot::channel();
        let Some(mut stream) = stream else {
            let _ = sender.send(());
            return Collector { buffer, done };
        };

        let shared = buffer.clone();
        let reader = move || {
            let mut chunk = [0u8; 8192];
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(read) => {
                        let mut buffer = shared
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        let room = limit.saturating_sub(buffer.len());
                        buffer.extend_from_slice(&chunk[..read.min(room)]);
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = sender.send(());
        };
        if let Err(error) = thread::Builder::new()
            .name(format!("hook-{pid}-output"))
            .spawn(reader)
        {
            warn!("[pid {pid}] cannot start the thread reading the hook's output: {error}");
        }
        Collector { buffer, done }
    }

    async fn wait(&mut self) {
        let _ = (&mut self.done).await;
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(
            &mut *self
                .buffer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_output_empty_keeps_static_command() {
        assert_eq!(
            parse_configure_output("  \n", false),
            Ok(SubCommand::default())
        );
        let only_env = parse_configure_output(r#"{"env": {"A": "1"}}"#, false).unwrap();
        assert!(only_env.argv.is_empty());
        assert_eq!(only_env.env["A"], "1");
    }

    #[test]
    fn configure_output_string_command() {
        let split =
            parse_configure_output(r#"{"command": "redis-server --port '6 379'"}"#, false).unwrap();
        assert_eq!(split.argv, vec!["redis-server", "--port", "6 379"]);
        assert!(!split.shell);

        let shell = parse_configure_output(r#"{"command": "a && b"}"#, true).unwrap();
        assert_eq!(shell.argv, vec!["a && b"]);
        assert!(shell.shell);
    }

    #[test]
    fn configure_output_argv_and_env() {
        let output = r#"{"command": ["server", "--flag"], "env": {"PORT": 6379, "DEBUG": true, "NAME": "x"}}"#;
        let command = parse_configure_output(output, true).unwrap();
        assert_eq!(command.argv, vec!["server", "--flag"]);
        assert!(!command.shell);
        assert_eq!(command.env["PORT"], "6379");
        assert_eq!(command.env["DEBUG"], "true");
        assert_eq!(command.env["NAME"], "x");
    }

    #[test]
    fn configure_output_invalid_is_quoted() {
        let error = parse_configure_output("starting server\n{", false).unwrap_err();
        assert!(error.contains("invalid output"), "{error}");
        assert!(error.contains("\"starting server\\n{\""), "{error}");

        let unknown = parse_configure_output(r#"{"cmd": "x"}"#, false).unwrap_err();
        assert!(unknown.contains("unknown field `cmd`"), "{unknown}");

        let nested = parse_configure_output(r#"{"env": {"A": [1]}}"#, false).unwrap_err();
        assert!(nested.contains("`env.A`"), "{nested}");
    }

    #[test]
    fn configure_output_long_quote_is_cut() {
        let output = "x".repeat(5000);
        let error = parse_configure_output(&output, false).unwrap_err();
        assert!(error.len() < 600, "{error}");
        assert!(error.contains("..."), "{error}");
    }

    #[test]
    fn metrics_accept_json_or_text() {
        assert_eq!(parse_metrics(""), None);
        assert_eq!(
            parse_metrics(r#"{"load": 3}"#),
            Some(serde_json::json!({"load": 3}))
        );
        assert_eq!(
            parse_metrics("all good\n"),
            Some(Value::String("all good".to_string()))
        );
    }

    #[test]
    fn reply_defaults_to_empty_object() {
        assert_eq!(parse_reply("\n"), Ok(serde_json::json!({})));
        assert_eq!(parse_reply("[1]"), Ok(serde_json::json!([1])));
        assert!(parse_reply("nope").unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn failure_reason_keeps_the_end() {
        assert_eq!(failure_reason(b"  \n"), "no output on stderr");
        assert_eq!(failure_reason(b"boom\n"), "boom");
        let long = format!("{}END", "a".repeat(3000));
        let reason = failure_reason(long.as_bytes());
        assert!(reason.starts_with("..."));
        assert!(reason.ends_with("END"));
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS + 3);
    }

    #[test]
    fn closest_step_suggests_typos() {
        assert_eq!(closest_step("sanity-check"), Some("sanity_check"));
        assert_eq!(closest_step("configur"), Some("configure"));
        assert_eq!(closest_step("teardown"), Some("tear_down"));
        assert_eq!(closest_step("zzzzzzzzzzzz"), None);
    }
}
