//! The lifecycle actor: the pod's state machine.
//!
//! It takes control requests one at a time in arrival order, runs the `LifeCycle` steps, and
//! drives the supervisor. The verbs (`check`, `on`, `off`, `ok`, `kill`, `signal`) come from the
//! leader or an operator over HTTP. The supervisor adds its own events (the sub-process
//! completed, the pod is unhealthy) to the same queue, so every change of the pod happens in one
//! order. The decisions themselves (may this request run, must `on` restart the sub-process,
//! which command and environment does it get) are plain functions over plain data, tested
//! without actors. The actor only sequences them with the asynchronous steps.
//!
//! The pod's phases are [`Phase::Unconfigured`], [`Phase::Configured`], [`Phase::Running`] and
//! the terminal [`Phase::Dead`]: once dead, every control request gets 410.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use log::{error, info, warn};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::cluster::{Cluster, Pods};
use crate::settings::Settings;
use crate::steps::{LifeCycle, SubCommand};
use crate::supervisor::{ProcessEvent, Spawn, Stop, Supervisor};
use crate::telemetry::{ProcessState, Telemetry};

/// Control verbs of `POST /control/<verb>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Check,
    On,
    Off,
    Ok,
    Kill,
    Signal,
}

impl Verb {
    /// Parses a verb of the HTTP API.
    pub fn parse(text: &str) -> Option<Verb> {
        match text {
            "check" => Some(Verb::Check),
            "on" => Some(Verb::On),
            "off" => Some(Verb::Off),
            "ok" => Some(Verb::Ok),
            "kill" => Some(Verb::Kill),
            "signal" => Some(Verb::Signal),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Check => "check",
            Verb::On => "on",
            Verb::Off => "off",
            Verb::Ok => "ok",
            Verb::Kill => "kill",
            Verb::Signal => "signal",
        }
    }
}

/// One control request, queued to the lifecycle.
#[derive(Debug, Message)]
#[rtype(result = "Result<serde_json::Value, ControlError>")]
pub struct Control {
    pub verb: Verb,
    /// Request body: the cluster view for every verb but `signal`, whose body is free JSON.
    pub body: ControlBody,
    /// Epoch of the leader that sent the request (`X-Ochopod-Epoch`), absent for operators.
    pub epoch: Option<i64>,
    /// When the caller stops waiting: a request dequeued after it is not run.
    pub deadline: Instant,
}

/// The body of a control request: JSON as received, or a cluster view the control server
/// already parsed from the request bytes (the common case, which skips an intermediate JSON
/// tree of the whole cluster).
#[derive(Debug)]
pub enum ControlBody {
    Json(serde_json::Value),
    View(Box<Cluster>),
}

impl ControlBody {
    /// Returns the body as JSON, serializing a parsed view.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ControlBody::Json(value) => value.clone(),
            ControlBody::View(view) => {
                serde_json::to_value(view).expect("a cluster view always serializes")
            }
        }
    }
}

impl From<serde_json::Value> for ControlBody {
    fn from(value: serde_json::Value) -> Self {
        ControlBody::Json(value)
    }
}

/// Reason a control request was not done. Each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ControlError {
    /// 406: a `check` or `configure` step failed.
    #[error("{0}")]
    Failed(String),
    /// 408: not done before the deadline.
    #[error("not done within the timeout")]
    TimedOut,
    /// 410: the pod is dead.
    #[error("the pod is dead and takes no more control requests")]
    Dead,
    /// 409: the request comes from a leader older than one already obeyed.
    #[error("stale leader epoch {received}: this pod already obeyed epoch {highest}")]
    StaleEpoch { received: i64, highest: i64 },
    /// 400: the body is not what the verb expects.
    #[error("{0}")]
    BadRequest(String),
}

impl ControlError {
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::Failed(_) => 406,
            ControlError::TimedOut => 408,
            ControlError::Dead => 410,
            ControlError::StaleEpoch { .. } => 409,
            ControlError::BadRequest(_) => 400,
        }
    }
}

/// Stops the sub-process for good when the agent itself is asked to stop (SIGTERM or SIGINT).
///
/// Queued and future control requests get 410 from then on; a step already running finishes,
/// but it can no longer start a sub-process. Resolves once the sub-process group is gone. The
/// `finalize` step does not run: it belongs to the `kill` verb.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Returns the current phase of the pod.
#[derive(Debug, Message)]
#[rtype(result = "Phase")]
pub struct GetPhase;

/// Sent to the pod's owner when the pod died and `exit_when_dead` is set, so the agent exits
/// instead of idling.
#[derive(Clone, Debug, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct PodDead {
    /// Cause of the death, for the log.
    pub reason: String,
}

/// Phase of the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No `on` has succeeded yet.
    Unconfigured,
    /// Configured, with no sub-process: turned off, or configured with `start` false.
    Configured,
    /// Configured, with a supervised sub-process (possibly waiting for a restart).
    Running,
    /// Terminal: killed, its work done, a failed `on`, or the agent shutting down.
    Dead,
}

/// Invalid lifecycle settings.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LifecycleError {
    #[error("invalid `command` setting {command:?}: {reason}; check its quotes")]
    InvalidCommand { command: String, reason: String },
}

/// Settings of the lifecycle.
#[derive(Clone, Debug, PartialEq)]
pub struct LifecycleConfig {
    /// Re-run the sub-process on every `on`, not only when the dependencies changed.
    pub strict: bool,
    /// Start the sub-process on `on` (false: configure only).
    pub start: bool,
    /// Ask the owner to exit once the pod is dead, through [`PodDead`].
    pub exit_when_dead: bool,
    /// The static command, used when `configure` returns no program.
    pub command: Option<SubCommand>,
    /// Environment of the sub-process from the settings, below the cluster view's.
    pub env: BTreeMap<String, String>,
    /// Working directory of the sub-process when `configure` sets none.
    pub cwd: Option<PathBuf>,
}

impl LifecycleConfig {
    /// Takes the lifecycle settings; the static command is `settings.argv` when given, else
    /// `settings.command`.
    ///
    /// # Errors
    ///
    /// Returns [`LifecycleError::InvalidCommand`] when `command` cannot be split into words.
    pub fn from_settings(settings: &Settings) -> Result<Self, LifecycleError> {
        Ok(LifecycleConfig {
            strict: settings.strict,
            start: settings.start,
            exit_when_dead: settings.exit_when_dead,
            command: static_command(settings)?,
            env: settings.env.clone(),
            cwd: settings.cwd.clone(),
        })
    }
}

/// Returns the static command of the settings: the words after `--`, else the `command`
/// setting, with the `shell` setting applied.
///
/// # Errors
///
/// Returns [`LifecycleError::InvalidCommand`] when `command` cannot be split into words.
pub fn static_command(settings: &Settings) -> Result<Option<SubCommand>, LifecycleError> {
    let argv = if !settings.argv.is_empty() {
        settings.argv.clone()
    } else if let Some(text) = &settings.command {
        command_words(text, settings.shell).map_err(|reason| LifecycleError::InvalidCommand {
            command: text.clone(),
            reason,
        })?
    } else {
        return Ok(None);
    };
    Ok(Some(SubCommand {
        argv,
        shell: settings.shell,
        ..SubCommand::default()
    }))
}

/// Turns a command string into the `argv` of a [`SubCommand`]: the whole string when it runs
/// through the shell, its shell-quoted words otherwise.
///
/// # Errors
///
/// Returns the reason when the string has unbalanced quotes.
pub fn command_words(text: &str, shell: bool) -> Result<Vec<String>, String> {
    if shell {
        return Ok(vec![text.to_string()]);
    }
    shell_words::split(text).map_err(|error| error.to_string())
}

/// The two supervisor messages the lifecycle sends, as recipients so tests can stand in a fake.
#[derive(Clone)]
pub struct SupervisorLink {
    pub spawn: Recipient<Spawn>,
    pub stop: Recipient<Stop>,
}

impl SupervisorLink {
    /// Links to a running [`Supervisor`].
    pub fn to(supervisor: &Addr<Supervisor>) -> Self {
        SupervisorLink {
            spawn: supervisor.clone().recipient(),
            stop: supervisor.clone().recipient(),
        }
    }
}

/// A control request after its body was checked.
#[derive(Debug)]
enum Request {
    Check(Cluster),
    On(Cluster),
    Off,
    Ok(Cluster),
    Kill,
    Signal(Value),
}

/// One entry of the queue: a control request, or an event of the supervisor.
enum Work {
    Control {
        verb: Verb,
        request: Request,
        epoch: Option<i64>,
        deadline: Instant,
    },
    /// The sub-process `pid` exited with code 0.
    Completed { pid: u32 },
    /// Too many sanity checks failed in a row.
    Unhealthy,
}

impl Work {
    fn name(&self) -> &'static str {
        match self {
            Work::Control { verb, .. } => verb.as_str(),
            Work::Completed { .. } => "completed",
            Work::Unhealthy => "unhealthy",
        }
    }
}

struct Job {
    work: Work,
    /// Absent for supervisor events, which have no requester.
    reply: Option<oneshot::Sender<Result<Value, ControlError>>>,
}

/// The pod's state as the transition functions see it.
#[derive(Clone, Debug, PartialEq)]
struct PodState {
    phase: Phase,
    /// `initialize` has run.
    initialized: bool,
    /// Highest leader epoch obeyed; requests with a lower one are stale.
    highest_epoch: Option<i64>,
    /// Dependencies at the last successful `on`, without the pod statuses.
    dependencies: Option<BTreeMap<String, Pods>>,
    /// The sub-process as last reported by the supervisor.
    pid: Option<u32>,
}

impl PodState {
    fn new() -> Self {
        PodState {
            phase: Phase::Unconfigured,
            initialized: false,
            highest_epoch: None,
            dependencies: None,
            pid: None,
        }
    }
}

/// Plan of an `on` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnPlan {
    /// Leave the running sub-process alone and reply at once.
    Keep,
    /// Configure (after `initialize` the first time) and start the sub-process, after tearing
    /// the running one down when `stop_first`.
    Configure { stop_first: bool, initialize: bool },
}

/// Outcome of an `on` whose steps did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnOutcome {
    /// Configured, with the pid of the started sub-process (`None` when `start` is false).
    Configured(Option<u32>),
    /// The request's deadline passed before `configure` ran or while it ran (`configured`):
    /// nothing was started.
    Expired { configured: bool },
}

/// Decides whether a request taken from the queue may run.
fn admit(
    state: &PodState,
    epoch: Option<i64>,
    deadline: Instant,
    now: Instant,
) -> Result<(), ControlError> {
    if state.phase == Phase::Dead {
        return Err(ControlError::Dead);
    }
    if now >= deadline {
        return Err(ControlError::TimedOut);
    }
    if let (Some(received), Some(highest)) = (epoch, state.highest_epoch) {
        if received < highest {
            return Err(ControlError::StaleEpoch { received, highest });
        }
    }
    Ok(())
}

/// Decides what `on` does: a running sub-process is only replaced when the pod is `strict` or
/// its dependencies changed since the last configuration.
fn plan_on(state: &PodState, cluster: &Cluster, strict: bool) -> OnPlan {
    let running = state.phase == Phase::Running;
    if running
        && !strict
        && !dependencies_changed(state.dependencies.as_ref(), &cluster.dependencies)
    {
        return OnPlan::Keep;
    }
    OnPlan::Configure {
        stop_first: running,
        initialize: !state.initialized,
    }
}

/// Tells whether the dependencies differ from the last configuration's, ignoring the pod
/// statuses, which change with every leader probe.
fn dependencies_changed(
    previous: Option<&BTreeMap<String, Pods>>,
    current: &BTreeMap<String, Pods>,
) -> bool {
    match previous {
        None => true,
        Some(previous) => *previous != without_status(current),
    }
}

fn without_status(dependencies: &BTreeMap<String, Pods>) -> BTreeMap<String, Pods> {
    dependencies
        .iter()
        .map(|(name, pods)| {
            let pods = pods
                .iter()
                .map(|(key, pod)| (key.clone(), pod.identity_only()))
                .collect();
            (name.clone(), pods)
        })
        .collect()
}

/// Completes what `configure` returned into the command to start: the static command when it
/// returned no program, and the environment layered as settings, then cluster view, then
/// `configure` (later wins).
fn resolve_command(
    configured: SubCommand,
    config: &LifecycleConfig,
    cluster: &Cluster,
) -> Result<SubCommand, String> {
    let mut command = if configured.argv.is_empty() {
        let Some(fallback) = &config.command else {
            return Err(
                "configure returned no command and no static command is set; set `command` in \
                 the settings, give one after `--`, or return one from configure"
                    .to_string(),
            );
        };
        SubCommand {
            argv: fallback.argv.clone(),
            shell: fallback.shell,
            ..configured
        }
    } else {
        configured
    };

    let mut env = config.env.clone();
    env.extend(cluster.environment());
    env.append(&mut command.env);
    command.env = env;
    if command.cwd.is_none() {
        command.cwd = config.cwd.clone();
    }
    Ok(command)
}

/// Checks the body of a control request against its verb.
fn parse_request(verb: Verb, body: impl Into<ControlBody>) -> Result<Request, ControlError> {
    let body = match body.into() {
        ControlBody::View(view) => {
            return Ok(match verb {
                Verb::Check => Request::Check(view_of_pod(verb, *view)?),
                Verb::On => Request::On(view_of_pod(verb, *view)?),
                Verb::Ok => Request::Ok(view_of_pod(verb, *view)?),
                Verb::Off => Request::Off,
                Verb::Kill => Request::Kill,
                Verb::Signal => Request::Signal(
                    serde_json::to_value(*view).expect("a cluster view always serializes"),
                ),
            })
        }
        ControlBody::Json(body) => body,
    };
    match verb {
        Verb::Check => Ok(Request::Check(view_of_pod(verb, parse_view(verb, body)?)?)),
        Verb::On => Ok(Request::On(view_of_pod(verb, parse_view(verb, body)?)?)),
        Verb::Ok => Ok(Request::Ok(view_of_pod(verb, parse_view(verb, body)?)?)),
        // Operators turn pods off without a view, so `off` takes any view, even `{}`.
        Verb::Off if body.is_null() => Ok(Request::Off),
        Verb::Off => parse_view(verb, body).map(|_| Request::Off),
        Verb::Kill => Ok(Request::Kill),
        Verb::Signal => Ok(Request::Signal(body)),
    }
}

/// Checks that `view` is a view of the receiving pod: its `key` is one of its `pods`, as in
/// every view a leader or `ochopod on` sends. Without that, the pod finds no index, seq or
/// registration of its own in the view.
fn view_of_pod(verb: Verb, view: Cluster) -> Result<Cluster, ControlError> {
    let verb = verb.as_str();
    if view.key.is_empty() {
        return Err(ControlError::BadRequest(format!(
            "the cluster view of `{verb}` has no `key`: send the key of the receiving pod, with \
             that pod in `pods`, as the leader and `ochopod on` do"
        )));
    }
    if view.me().is_none() {
        return Err(ControlError::BadRequest(format!(
            "the cluster view of `{verb}` is not a view of this pod: its `key` {:?} is not one \
             of its {} `pods`; put the receiving pod in `pods`, as the leader and `ochopod on` do",
            view.key,
            view.pods.len()
        )));
    }
    Ok(view)
}

fn parse_view(verb: Verb, body: Value) -> Result<Cluster, ControlError> {
    if !body.is_object() {
        return Err(ControlError::BadRequest(format!(
            "the body of `{}` must be a cluster view (a JSON object with `pods`, `dependencies` \
             and `key`), not {}",
            verb.as_str(),
            json_kind(&body)
        )));
    }
    serde_json::from_value(body).map_err(|error| {
        ControlError::BadRequest(format!(
            "invalid cluster view in the body of `{}`: {error}",
            verb.as_str()
        ))
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null or an empty body",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The pod's state machine; see the module documentation.
pub struct Lifecycle {
    config: LifecycleConfig,
    steps: Arc<dyn LifeCycle>,
    supervisor: SupervisorLink,
    telemetry: Arc<Telemetry>,
    on_dead: Option<Recipient<PodDead>>,
    state: PodState,
    queue: VecDeque<Job>,
    /// A job is running; the next one waits for it.
    busy: bool,
    /// Set by [`Shutdown`]; a running `on` checks it right before it starts the sub-process.
    shutting_down: Arc<AtomicBool>,
}

impl Lifecycle {
    /// Creates the lifecycle of an unconfigured pod. `steps` are the application's steps,
    /// `supervisor` the actor running the sub-process, `on_dead` the owner notified when the pod
    /// dies with `exit_when_dead` set.
    pub fn new(
        config: LifecycleConfig,
        steps: Arc<dyn LifeCycle>,
        supervisor: SupervisorLink,
        telemetry: Arc<Telemetry>,
        on_dead: Option<Recipient<PodDead>>,
    ) -> Self {
        Lifecycle {
            config,
            steps,
            supervisor,
            telemetry,
            on_dead,
            state: PodState::new(),
            queue: VecDeque::new(),
            busy: false,
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    fn enqueue(&mut self, job: Job, ctx: &mut Context<Self>) {
        self.queue.push_back(job);
        self.run_next(ctx);
    }

    /// Starts the next job unless one runs; each job starts the next when it ends.
    fn run_next(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let Some(Job { work, reply }) = self.queue.pop_front() else {
            return;
        };

        self.busy = true;
        let name = work.name();
        let started = Instant::now();
        let work = self.start_work(work);
        ctx.spawn(work.map(move |result, lifecycle, ctx| {
            let elapsed = started.elapsed();
            match &result {
                Ok(_) => info!("control `{name}` done in {elapsed:.1?}"),
                Err(error) => warn!("control `{name}` not done after {elapsed:.1?}: {error}"),
            }
            if let Some(reply) = reply {
                // The requester may have given up waiting.
                let _ = reply.send(result);
            }
            lifecycle.busy = false;
            lifecycle.run_next(ctx);
        }));
    }

    fn start_work(&mut self, work: Work) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        match work {
            Work::Control {
                verb,
                request,
                epoch,
                deadline,
            } => {
                if let Err(error) = admit(&self.state, epoch, deadline, Instant::now()) {
                    return Box::pin(fut::ready(Err(error)));
                }
                self.obey_epoch(epoch);
                match epoch {
                    Some(epoch) => info!("control `{}` started (epoch {epoch})", verb.as_str()),
                    None => info!("control `{}` started (no leader epoch)", verb.as_str()),
                }
                match request {
                    Request::Check(cluster) => self.check(cluster),
                    Request::On(cluster) => self.turn_on(cluster, deadline),
                    Request::Off => self.turn_off(),
                    Request::Ok(cluster) => self.confirm(cluster),
                    Request::Kill => self.kill("killed by a `kill` request"),
                    Request::Signal(body) => self.signal(body),
                }
            }

            // The exit of a sub-process that is still the pod's: the work is done.
            Work::Completed { pid }
                if self.state.phase == Phase::Running && self.state.pid == Some(pid) =>
            {
                self.kill("the sub-process completed (exit code 0)")
            }

            Work::Unhealthy if self.state.phase == Phase::Running => {
                warn!("too many failed sanity checks: turning the pod off");
                self.turn_off()
            }

            // An event about a sub-process the pod no longer runs.
            Work::Completed { .. } | Work::Unhealthy => Box::pin(fut::ready(Ok(Value::Null))),
        }
    }

    fn obey_epoch(&mut self, epoch: Option<i64>) {
        let Some(epoch) = epoch else {
            return;
        };
        if self
            .state
            .highest_epoch
            .is_some_and(|highest| highest >= epoch)
        {
            return;
        }
        self.state.highest_epoch = Some(epoch);
        self.telemetry.update(|facts| facts.epoch = epoch);
    }

    fn check(&mut self, cluster: Cluster) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let steps = self.steps.clone();
        let step = async move {
            match steps.can_configure(&cluster).await {
                Ok(()) => Ok(json!({})),
                Err(error) => Err(ControlError::Failed(format!(
                    "can_configure failed: {error}"
                ))),
            }
        };
        Box::pin(step.into_actor(self))
    }

    /// Runs `on`. A request whose deadline passes while the steps run starts nothing, because
    /// its caller already received 408 and its leader will configure the pod again, possibly
    /// with another view. The pod is then left unconfigured (or configured
    /// without a sub-process, when one was torn down), so the next `on` configures again.
    fn turn_on(
        &mut self,
        cluster: Cluster,
        deadline: Instant,
    ) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let (stop_first, initialize) = match plan_on(&self.state, &cluster, self.config.strict) {
            OnPlan::Keep => {
                info!("on: dependencies unchanged and not strict: the sub-process keeps running");
                return Box::pin(fut::ready(Ok(json!({}))));
            }
            OnPlan::Configure {
                stop_first,
                initialize,
            } => (stop_first, initialize),
        };

        for collision in cluster.dependency_collisions() {
            warn!(
                "on: dependencies `{}` and `{}` map to the same variable {}: it holds the \
                 endpoints of `{}`, and `{}` is only in OCHOPOD_CLUSTER_JSON",
                collision.kept,
                collision.ignored,
                collision.variable,
                collision.kept,
                collision.ignored
            );
        }

        let steps = self.steps.clone();
        let supervisor = self.supervisor.clone();
        let config = self.config.clone();
        let shutting_down = self.shutting_down.clone();
        let dependencies = without_status(&cluster.dependencies);
        let work = async move {
            if stop_first {
                info!("on: tearing the sub-process down before configuring again");
                stop_supervisor(&supervisor).await?;
            }
            if initialize {
                steps
                    .initialize()
                    .await
                    .map_err(|error| format!("initialize failed: {error}"))?;
            }
            if Instant::now() >= deadline {
                return Ok(OnOutcome::Expired { configured: false });
            }
            let configured = steps
                .configure(&cluster)
                .await
                .map_err(|error| format!("configure failed: {error}"))?;
            // Checked right before the spawn, so a request that expired while `configure` ran
            // does not start the sub-process.
            if Instant::now() >= deadline {
                return Ok(OnOutcome::Expired { configured: true });
            }
            if !config.start {
                return Ok(OnOutcome::Configured(None));
            }

            let command = resolve_command(configured, &config, &cluster)?;
            // Checked right before the spawn and in the same poll, so a `Shutdown` either comes
            // first and prevents it, or sends its `Stop` after this `Spawn`.
            if shutting_down.load(Ordering::SeqCst) {
                return Err("the agent is shutting down".to_string());
            }
            match supervisor.spawn.send(Spawn(command)).await {
                Ok(Ok(pid)) => Ok(OnOutcome::Configured(Some(pid))),
                Ok(Err(error)) => Err(format!("cannot start the sub-process: {error}")),
                Err(_) => Err("cannot start the sub-process: the supervisor is gone".to_string()),
            }
        };

        Box::pin(work.into_actor(self).map(move |result, lifecycle, _| {
            if lifecycle.state.phase == Phase::Dead {
                // The agent shut down meanwhile; its `Stop` takes care of any sub-process.
                return Err(ControlError::Dead);
            }
            match result {
                Ok(OnOutcome::Expired { configured }) => {
                    let when = if configured { "during" } else { "before" };
                    warn!(
                        "on: the request timed out {when} configure: the sub-process is not \
                         started from it, and the next `on` configures again"
                    );
                    lifecycle.state.initialized |= initialize;
                    if lifecycle.state.phase == Phase::Running {
                        // `stop_first` tore the sub-process down.
                        lifecycle.state.phase = Phase::Configured;
                        lifecycle.state.pid = None;
                    }
                    Err(ControlError::TimedOut)
                }
                Ok(OnOutcome::Configured(pid)) => {
                    lifecycle.state.initialized = true;
                    lifecycle.state.dependencies = Some(dependencies);
                    lifecycle.state.pid = pid;
                    lifecycle.state.phase = if pid.is_some() {
                        Phase::Running
                    } else {
                        Phase::Configured
                    };
                    Ok(json!({}))
                }
                Err(reason) => {
                    error!("on failed: {reason}");
                    lifecycle.become_dead(&format!("`on` failed: {reason}"));
                    Err(ControlError::Failed(reason))
                }
            }
        }))
    }

    fn turn_off(&mut self) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let supervisor = self.supervisor.clone();
        let stop = async move { stop_supervisor(&supervisor).await };
        Box::pin(stop.into_actor(self).map(|result, lifecycle, _| {
            if lifecycle.state.phase == Phase::Running {
                lifecycle.state.phase = Phase::Configured;
            }
            lifecycle.state.pid = None;
            result.map(|()| json!({})).map_err(ControlError::Failed)
        }))
    }

    fn confirm(
        &mut self,
        cluster: Cluster,
    ) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let steps = self.steps.clone();
        let step = async move {
            match steps.configured(&cluster).await {
                Ok(()) => Ok(json!({})),
                Err(error) => Err(ControlError::Failed(format!("configured failed: {error}"))),
            }
        };
        Box::pin(step.into_actor(self))
    }

    /// Tears the sub-process down, runs `finalize` and leaves the pod dead, whatever fails on
    /// the way: a dead pod takes no more requests, so there is nothing to retry.
    fn kill(
        &mut self,
        reason: &'static str,
    ) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let supervisor = self.supervisor.clone();
        let steps = self.steps.clone();
        let work = async move {
            if let Err(error) = stop_supervisor(&supervisor).await {
                error!("kill: {error}");
            }
            if let Err(error) = steps.finalize().await {
                error!("kill: finalize failed: {error}");
            }
        };
        Box::pin(work.into_actor(self).map(move |(), lifecycle, _| {
            lifecycle.become_dead(reason);
            Ok(json!({}))
        }))
    }

    fn signal(&mut self, body: Value) -> ResponseActFuture<Self, Result<Value, ControlError>> {
        let steps = self.steps.clone();
        let step = async move {
            steps
                .signaled(&body)
                .await
                .map_err(|error| ControlError::Failed(format!("signaled failed: {error}")))
        };
        Box::pin(step.into_actor(self))
    }

    fn become_dead(&mut self, reason: &str) {
        info!("the pod is dead: {reason}");
        self.state.phase = Phase::Dead;
        self.state.pid = None;
        self.telemetry
            .update(|facts| facts.process = ProcessState::Dead);
        if self.config.exit_when_dead {
            if let Some(owner) = &self.on_dead {
                owner.do_send(PodDead {
                    reason: reason.to_string(),
                });
            }
        }
    }
}

/// Sends [`Stop`] and waits for the sub-process group to be gone.
async fn stop_supervisor(supervisor: &SupervisorLink) -> Result<(), String> {
    match supervisor.stop.send(Stop).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("cannot tear the sub-process down: {error}")),
        Err(_) => Err("cannot tear the sub-process down: the supervisor is gone".to_string()),
    }
}

impl Actor for Lifecycle {
    type Context = Context<Self>;
}

impl Handler<Control> for Lifecycle {
    type Result = ResponseFuture<Result<Value, ControlError>>;

    fn handle(&mut self, control: Control, ctx: &mut Self::Context) -> Self::Result {
        let Control {
            verb,
            body,
            epoch,
            deadline,
        } = control;

        // An invalid body is rejected at once: waiting in the queue would not make it valid.
        let request = match parse_request(verb, body) {
            Ok(request) => request,
            Err(error) => return Box::pin(async move { Err(error) }),
        };

        let (sender, receiver) = oneshot::channel();
        let work = Work::Control {
            verb,
            request,
            epoch,
            deadline,
        };
        self.enqueue(
            Job {
                work,
                reply: Some(sender),
            },
            ctx,
        );
        Box::pin(async move { receiver.await.unwrap_or(Err(ControlError::Dead)) })
    }
}

impl Handler<ProcessEvent> for Lifecycle {
    type Result = ();

    fn handle(&mut self, event: ProcessEvent, ctx: &mut Self::Context) {
        if self.state.phase == Phase::Dead {
            return;
        }
        match event {
            // Not queued: the new pid must be known before a later `Completed` is judged.
            ProcessEvent::Restarted { pid, .. } => {
                if self.state.phase == Phase::Running {
                    self.state.pid = Some(pid);
                }
            }
            ProcessEvent::Completed { pid } => self.enqueue(
                Job {
                    work: Work::Completed { pid },
                    reply: None,
                },
                ctx,
            ),
            ProcessEvent::Unhealthy { .. } => self.enqueue(
                Job {
                    work: Work::Unhealthy,
                    reply: None,
                },
                ctx,
            ),
        }
    }
}

impl Handler<Shutdown> for Lifecycle {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        info!("shutting down: tearing the sub-process down");
        self.shutting_down.store(true, Ordering::SeqCst);
        self.state.phase = Phase::Dead;
        self.state.pid = None;
        for job in self.queue.drain(..) {
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(ControlError::Dead));
            }
        }

        let supervisor = self.supervisor.clone();
        let stop = async move { stop_supervisor(&supervisor).await };
        Box::pin(stop.into_actor(self).map(|result, lifecycle, _| {
            if let Err(error) = result {
                error!("shutdown: {error}");
            }
            lifecycle
                .telemetry
                .update(|facts| facts.process = ProcessState::Dead);
            info!("shutdown: the sub-process is gone");
        }))
    }
}

impl Handler<GetPhase> for Lifecycle {
    type Result = MessageResult<GetPhase>;

    fn handle(&mut self, _: GetPhase, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.phase)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registration::Registration;

    fn pod(ip: &str, status: &str) -> Registration {
        Registration {
            ip: ip.to_string(),
            status: status.to_string(),
            ..Registration::default()
        }
    }

    fn view_with_dependency(ip: &str, status: &str) -> Cluster {
        let zookeeper = Pods::from([("z1".to_string(), pod(ip, status))]);
        Cluster {
            key: "a".to_string(),
            pods: Pods::from([("a".to_string(), pod("10.0.0.1", ""))]),
            dependencies: BTreeMap::from([("zookeeper".to_string(), zookeeper)]),
        }
    }

    fn running_with(cluster: &Cluster) -> PodState {
        PodState {
            phase: Phase::Running,
            initialized: true,
            dependencies: Some(without_status(&cluster.dependencies)),
            pid: Some(42),
            ..PodState::new()
        }
    }

    fn config() -> LifecycleConfig {
        LifecycleConfig {
            strict: false,
            start: true,
            exit_when_dead: false,
            command: Some(SubCommand {
                argv: vec!["server".to_string()],
                ..SubCommand::default()
            }),
            env: BTreeMap::from([
                ("FROM_SETTINGS".to_string(), "settings".to_string()),
                ("OVERRIDDEN".to_string(), "settings".to_string()),
            ]),
            cwd: Some(PathBuf::from("/srv")),
        }
    }

    #[test]
    fn admit_rejects_dead_late_and_stale() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut state = PodState::new();
        assert_eq!(admit(&state, None, later, now), Ok(()));
        assert_eq!(admit(&state, None, now, now), Err(ControlError::TimedOut));

        state.highest_epoch = Some(5);
        assert_eq!(admit(&state, Some(5), later, now), Ok(()));
        assert_eq!(admit(&state, Some(6), later, now), Ok(()));
        assert_eq!(admit(&state, None, later, now), Ok(()));
        assert_eq!(
            admit(&state, Some(4), later, now),
            Err(ControlError::StaleEpoch {
                received: 4,
                highest: 5
            })
        );

        state.phase = Phase::Dead;
        assert_eq!(admit(&state, Some(9), later, now), Err(ControlError::Dead));
    }

    #[test]
    fn plan_on_first_time_initializes() {
        let cluster = view_with_dependency("10.0.1.1", "");
        assert_eq!(
            plan_on(&PodState::new(), &cluster, false),
            OnPlan::Configure {
                stop_first: false,
                initialize: true
            }
        );
    }

    #[test]
    fn plan_on_keeps_running_process_when_nothing_changed() {
        let cluster = view_with_dependency("10.0.1.1", "");
        let state = running_with(&cluster);
        assert_eq!(plan_on(&state, &cluster, false), OnPlan::Keep);

        // A new probe status of a dependency is no change of the dependency.
        let probed = view_with_dependency("10.0.1.1", "leader says hi");
        assert_eq!(plan_on(&state, &probed, false), OnPlan::Keep);
    }

    #[test]
    fn plan_on_restarts_when_strict_or_dependencies_changed() {
        let cluster = view_with_dependency("10.0.1.1", "");
        let state = running_with(&cluster);
        let restart = OnPlan::Configure {
            stop_first: true,
            initialize: false,
        };
        assert_eq!(plan_on(&state, &cluster, true), restart);

        let moved = view_with_dependency("10.0.1.2", "");
        assert_eq!(plan_on(&state, &moved, false), restart);
    }

    #[test]
    fn plan_on_configures_stopped_pod() {
        let cluster = view_with_dependency("10.0.1.1", "");
        let state = PodState {
            phase: Phase::Configured,
            pid: None,
            ..running_with(&cluster)
        };
        assert_eq!(
            plan_on(&state, &cluster, false),
            OnPlan::Configure {
                stop_first: false,
                initialize: false
            }
        );
    }

    #[test]
    fn resolve_command_falls_back_to_static_command() {
        let cluster = view_with_dependency("10.0.1.1", "");
        let configured = SubCommand {
            env: BTreeMap::from([("OVERRIDDEN".to_string(), "configure".to_string())]),
            ..SubCommand::default()
        };
        let command = resolve_command(configured, &config(), &cluster).unwrap();
        assert_eq!(command.argv, vec!["server"]);
        assert_eq!(command.cwd, Some(PathBuf::from("/srv")));
        assert_eq!(command.env["FROM_SETTINGS"], "settings");
        assert_eq!(command.env["OVERRIDDEN"], "configure");
        assert_eq!(command.env["OCHOPOD_INDEX"], "0");
        assert_eq!(command.env["OCHOPOD_SIZE"], "1");
    }

    #[test]
    fn resolve_command_prefers_configured_command() {
        let cluster = Cluster::default();
        let configured = SubCommand {
            argv: vec!["other".to_string(), "--flag".to_string()],
            cwd: Some(PathBuf::from("/tmp")),
            ..SubCommand::default()
        };
        let command = resolve_command(configured, &config(), &cluster).unwrap();
        assert_eq!(command.argv, vec!["other", "--flag"]);
        assert_eq!(command.cwd, Some(PathBuf::from("/tmp")));
    }

    #[test]
    fn resolve_command_without_any_command_fails() {
        let config = LifecycleConfig {
            command: None,
            ..config()
        };
        let error =
            resolve_command(SubCommand::default(), &config, &Cluster::default()).unwrap_err();
        assert!(error.contains("no static command"), "{error}");
    }

    #[test]
    fn static_command_sources() {
        let mut settings = Settings {
            command: Some("redis-server --port '6379'".to_string()),
            ..Settings::default()
        };
        let command = static_command(&settings).unwrap().unwrap();
        assert_eq!(command.argv, vec!["redis-server", "--port", "6379"]);
        assert!(!command.shell);

        settings.shell = true;
        let command = static_command(&settings).unwrap().unwrap();
        assert_eq!(command.argv, vec!["redis-server --port '6379'"]);
        assert!(command.shell);

        settings.argv = vec!["from".to_string(), "cli".to_string()];
        assert_eq!(
            static_command(&settings).unwrap().unwrap().argv,
            vec!["from", "cli"]
        );

        let unbalanced = Settings {
            command: Some("echo 'oops".to_string()),
            ..Settings::default()
        };
        assert!(matches!(
            static_command(&unbalanced),
            Err(LifecycleError::InvalidCommand { .. })
        ));
        assert_eq!(static_command(&Settings::default()), Ok(None));
    }

    #[test]
    fn parse_request_requires_view_of_pod() {
        let view = view_with_dependency("10.0.1.1", "");
        for verb in [Verb::Check, Verb::On, Verb::Ok] {
            let empty = parse_request(verb, json!({})).unwrap_err();
            assert_eq!(empty.http_status(), 400, "{verb:?}");
            assert!(empty.to_string().contains("has no `key`"), "{empty}");

            let other = Cluster {
                key: "stranger".to_string(),
                ..view.clone()
            };
            for body in [
                ControlBody::Json(serde_json::to_value(&other).unwrap()),
                ControlBody::View(Box::new(other.clone())),
            ] {
                let error = parse_request(verb, body).unwrap_err();
                assert_eq!(error.http_status(), 400, "{verb:?}");
                assert!(
                    error
                        .to_string()
                        .contains("\"stranger\" is not one of its 1 `pods`"),
                    "{error}"
                );
            }

            let parsed = ControlBody::View(Box::new(view.clone()));
            assert!(parse_request(verb, parsed).is_ok(), "{verb:?}");
        }
    }

    #[test]
    fn parse_request_checks_bodies() {
        let view = serde_json::to_value(view_with_dependency("10.0.1.1", "")).unwrap();
        assert!(matches!(
            parse_request(Verb::On, view.clone()),
            Ok(Request::On(_))
        ));
        assert!(matches!(
            parse_request(Verb::Off, Value::Null),
            Ok(Request::Off)
        ));
        assert!(matches!(parse_request(Verb::Off, view), Ok(Request::Off)));
        assert!(matches!(
            parse_request(Verb::Kill, json!("anything")),
            Ok(Request::Kill)
        ));
        assert!(matches!(
            parse_request(Verb::Signal, json!([1, 2])),
            Ok(Request::Signal(_))
        ));

        for verb in [Verb::Check, Verb::On, Verb::Ok] {
            let error = parse_request(verb, Value::Null).unwrap_err();
            assert_eq!(error.http_status(), 400);
        }
        assert!(matches!(
            parse_request(Verb::Off, json!({})),
            Ok(Request::Off)
        ));
        let wrong_type = parse_request(Verb::On, json!({"pods": 5})).unwrap_err();
        assert!(
            wrong_type.to_string().contains("invalid cluster view"),
            "{wrong_type}"
        );
        let array = parse_request(Verb::Check, json!([])).unwrap_err();
        assert!(array.to_string().contains("not an array"), "{array}");
    }
}
