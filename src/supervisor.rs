//! The supervisor actor: the owner of the pod's sub-process and its process group.
//!
//! The lifecycle sends it the command to run ([`Spawn`]) and the request to stop ([`Stop`]).
//! Between the two, the supervisor keeps the sub-process alive on its own. It starts the command
//! in a new process group, restarts it after a crash with a growing delay, and runs the sanity
//! checks. On request it tears the whole group down: the `tear_down` step or SIGTERM, then
//! SIGKILL once the grace period is over unless the pod is `soft`. What the lifecycle must act
//! on (work done, pod unhealthy) comes back as [`ProcessEvent`]s. The process state, pid,
//! restarts and metrics go to the telemetry.
//!
//! Every child goes through [`crate::reaper::spawn`], so the supervisor never waits on a pid
//! itself: the reaper resolves each child's exit future and the actor reacts to it. Signals for
//! the group also reach the daemons that left it (see [`Run`]).

mod run;

use std::io::{BufRead, BufReader, Read};
use std::mem;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use actix::prelude::*;
use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

pub use run::RUN_ID_VARIABLE;

use crate::reaper::{self, Exit};
use crate::settings::{seconds, Settings};
use crate::steps::{LifeCycle, SubCommand, TearDown};
use crate::telemetry::{ProcessState, Telemetry};
use run::Run;

/// Delay before restarting a sub-process that crashed for the first time in a row; each further
/// crash in a row doubles it, up to [`MAX_RESTART_DELAY`].
pub const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Maximum delay between two restarts of a crashing sub-process.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// A sub-process that ran at least this long before it crashed counts as stable: it is restarted
/// after [`FIRST_RESTART_DELAY`] again instead of after the grown delay.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// Time between two checks of whether a process group is gone during a tear-down.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Time between two searches for processes that left the group, once the group is gone; each
/// search reads the process table.
const ESCAPED_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Environment variables of the agent's secrets (in any case), which sub-processes do not
/// inherit: the shared token and the ZooKeeper credentials.
const SECRET_VARIABLES: &[&str] = &["ochopod_token", "ochopod_zookeeper_auth"];

/// Maximum length in bytes of one logged line of sub-process output; longer lines are split.
const MAX_LOGGED_LINE: u64 = 16 * 1024;

/// Settings of the supervisor: the lifecycle settings plus the restart delays (fixed in
/// production, short in tests).
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorConfig {
    /// Time between the `tear_down` step (or SIGTERM) and SIGKILL.
    pub grace: Duration,
    /// Never send SIGKILL: wait for the group for as long as it takes.
    pub soft: bool,
    /// Sanity checks that may fail in a row before the supervisor reports the pod unhealthy.
    pub checks: u32,
    /// Time between two sanity checks, also the time limit of one check; zero disables them.
    pub check_every: Duration,
    /// Log each line of the sub-process output instead of letting it inherit the agent's.
    pub pipe_subprocess: bool,
    pub first_restart_delay: Duration,
    pub max_restart_delay: Duration,
    /// Run time after which a crash no longer counts as part of a crash loop.
    pub stable_run: Duration,
}

impl SupervisorConfig {
    /// Takes the lifecycle settings of the pod and the default restart delays.
    pub fn from_settings(settings: &Settings) -> Self {
        SupervisorConfig {
            grace: seconds(settings.grace),
            soft: settings.soft,
            checks: settings.checks,
            check_every: seconds(settings.check_every),
            pipe_subprocess: settings.pipe_subprocess,
            first_restart_delay: FIRST_RESTART_DELAY,
            max_restart_delay: MAX_RESTART_DELAY,
            stable_run: STABLE_RUN,
        }
    }
}

/// Starts `SubCommand` as the pod's sub-process and returns its pid. Fails with
/// [`SupervisorError::Busy`] while another one is supervised: stop it first.
#[derive(Debug, Message)]
#[rtype(result = "Result<u32, SupervisorError>")]
pub struct Spawn(pub SubCommand);

/// Stops supervising and tears the sub-process group down; resolves once the group is gone.
/// Stopping an idle supervisor resolves at once.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct Stop;

/// Sends a signal to the sub-process group.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct Forward(pub Signal);

/// Returns the pid of the running sub-process, if one runs.
#[derive(Debug, Message)]
#[rtype(result = "Option<u32>")]
pub struct GetPid;

/// Event of the sub-process that the lifecycle acts on.
#[derive(Clone, Debug, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub enum ProcessEvent {
    /// The sub-process exited with code 0: its work is done and it is not restarted.
    Completed { pid: u32 },
    /// The sub-process crashed and runs again as `pid`; `restarts` counts every restart since
    /// the agent started.
    Restarted { pid: u32, restarts: u64 },
    /// `failures` sanity checks failed in a row; the supervisor stopped checking and the pod
    /// should be turned off. `pid` is absent when no process ran at the last check.
    Unhealthy { pid: Option<u32>, failures: u32 },
}

/// Failure of a supervisor request.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SupervisorError {
    #[error("the command is empty: there is no program to run")]
    EmptyCommand,
    #[error("cannot start `{program}`: {reason}")]
    Spawn { program: String, reason: String },
    #[error("process group {group} is still supervised; stop it before starting another")]
    Busy { group: u32 },
    #[error("no sub-process is running")]
    NotRunning,
    #[error("cannot send {signal} to process group {group}: {errno}")]
    Signal {
        signal: Signal,
        group: u32,
        errno: Errno,
    },
    #[error("the supervisor stopped before the request was done")]
    Gone,
}

/// State of the sub-process, as tracked by the supervisor.
enum Process {
    /// Nothing supervised. `last` is the last run when its sub-process exited with code 0:
    /// processes it left behind still count and are torn down by the next `Stop`.
    Idle {
        last: Option<Run>,
    },
    Running(Child),
    /// The sub-process crashed; `timer` starts `command` again. `run` is the crashed run, whose
    /// remaining processes are killed before the restart.
    Restarting {
        command: SubCommand,
        run: Run,
        timer: SpawnHandle,
    },
    /// A tear-down is under way; `waiters` resolve once every process of `run` is gone.
    Stopping {
        run: Run,
        waiters: Vec<oneshot::Sender<()>>,
    },
}

struct Child {
    /// Pid of the sub-process, which is also its process group id.
    pid: u32,
    /// Value of [`RUN_ID_VARIABLE`] in the environment of the sub-process.
    run_id: String,
    command: SubCommand,
    started: Instant,
    /// Tells the exit of this process from the exit of one it replaced.
    generation: u64,
}

impl Child {
    fn run(&self) -> Run {
        Run {
            group: self.pid,
            id: self.run_id.clone(),
        }
    }
}

/// State of the sanity checks.
#[derive(Default)]
struct Health {
    /// Failed checks in a row.
    failures: u32,
    /// The sub-process crashed since the last check, which fails the next check.
    crashed: bool,
    /// A check is running: the next tick skips instead of starting a second one.
    checking: bool,
    /// Changes whenever checks stop, so the result of a check started before is dropped.
    round: u64,
    timer: Option<SpawnHandle>,
}

/// The actor owning the sub-process; see the module documentation.
pub struct Supervisor {
    config: SupervisorConfig,
    steps: Arc<dyn LifeCycle>,
    telemetry: Arc<Telemetry>,
    events: Recipient<ProcessEvent>,
    process: Process,
    generation: u64,
    /// Delay before the next restart of a crashing sub-process.
    restart_delay: Duration,
    health: Health,
}

impl Supervisor {
    /// Creates an idle supervisor. `steps` supplies `sanity_check` and `tear_down`; `events`
    /// receives the [`ProcessEvent`]s, normally the lifecycle actor.
    pub fn new(
        config: SupervisorConfig,
        steps: Arc<dyn LifeCycle>,
        telemetry: Arc<Telemetry>,
        events: Recipient<ProcessEvent>,
    ) -> Self {
        let restart_delay = config.first_restart_delay;
        Supervisor {
            config,
            steps,
            telemetry,
            events,
            process: Process::Idle { last: None },
            generation: 0,
            restart_delay,
            health: Health::default(),
        }
    }

    /// Spawns `command` in a new process group and starts watching its exit.
    fn start(
        &mut self,
        command: SubCommand,
        ctx: &mut Context<Self>,
    ) -> Result<u32, SupervisorError> {
        let run_id = Run::new_id();
        let mut process = build_command(&command, &pod_facts(&self.telemetry), &run_id)?;
        if self.config.pipe_subprocess {
            process.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let spawned = reaper::spawn(&mut process).map_err(|error| SupervisorError::Spawn {
            program: program_name(&command),
            reason: error.to_string(),
        })?;

        let pid = spawned.pid;
        if let Some(stdout) = spawned.stdout {
            log_output(pid, "stdout", stdout);
        }
        if let Some(stderr) = spawned.stderr {
            log_output(pid, "stderr", stderr);
        }
        info!("[pid {pid}] started `{}`", program_name(&command));

        self.generation += 1;
        let generation = self.generation;
        ctx.spawn(
            spawned
                .exit
                .into_actor(self)
                .map(move |exit, supervisor, ctx| {
                    supervisor.handle_exit(pid, generation, exit, ctx)
                }),
        );
        self.process = Process::Running(Child {
            pid,
            run_id,
            command,
            started: Instant::now(),
            generation,
        });
        self.publish(ProcessState::Running, Some(pid));
        Ok(pid)
    }

    /// Reacts to the exit of a sub-process: done on code 0, restart otherwise.
    fn handle_exit(&mut self, pid: u32, generation: u64, exit: Exit, ctx: &mut Context<Self>) {
        let child = match mem::replace(&mut self.process, Process::Idle { last: None }) {
            Process::Running(child) if child.generation == generation => child,
            other => {
                // Torn down on request, or replaced: the exit needs no reaction.
                if matches!(other, Process::Stopping { .. }) {
                    info!("[pid {pid}] exited with {exit} during the tear-down");
                }
                self.process = other;
                return;
            }
        };
        let ran = child.started.elapsed();

        // Exit code 0: the work is done. Processes the sub-process left behind stay until the
        // lifecycle stops the run.
        if exit.success() {
            info!("[pid {pid}] completed after {ran:.1?}");
            self.stop_checks(ctx);
            self.process = Process::Idle {
                last: Some(child.run()),
            };
            self.publish(ProcessState::Stopped, None);
            self.events.do_send(ProcessEvent::Completed { pid });
            return;
        }

        // A crash: ask what is left of the run to stop, and start the command again later.
        if ran >= self.config.stable_run {
            self.restart_delay = self.config.first_restart_delay;
        }
        let run = child.run();
        signal_in_background(run.clone(), Signal::SIGTERM);
        self.health.crashed = true;
        let delay = self.schedule_restart(child.command, run, ctx);
        warn!("[pid {pid}] exited with {exit} after {ran:.1?}; restarting in {delay:.1?}");
        self.publish(ProcessState::Stopped, None);
    }

    /// Arms the restart timer and grows the delay for the next crash; returns the delay used.
    fn schedule_restart(
        &mut self,
        command: SubCommand,
        run: Run,
        ctx: &mut Context<Self>,
    ) -> Duration {
        let delay = self.restart_delay;
        self.restart_delay = (delay * 2).min(self.config.max_restart_delay);
        let timer = ctx.run_later(delay, |supervisor, ctx| supervisor.restart(ctx));
        self.process = Process::Restarting {
            command,
            run,
            timer,
        };
        delay
    }

    fn restart(&mut self, ctx: &mut Context<Self>) {
        // A timer that fires after a `Stop` took over must leave the tear-down, and the requests
        // waiting for it, in place.
        let (command, run) = match mem::replace(&mut self.process, Process::Idle { last: None }) {
            Process::Restarting { command, run, .. } => (command, run),
            other => {
                self.process = other;
                return;
            }
        };

        // Processes of the crashed run had the whole restart delay to stop after SIGTERM.
        if !self.config.soft {
            signal_in_background(run.clone(), Signal::SIGKILL);
        }

        match self.start(command.clone(), ctx) {
            Ok(pid) => {
                let mut restarts = 0;
                self.telemetry.update(|facts| {
                    facts.restarts += 1;
                    restarts = facts.restarts;
                });
                info!("[pid {pid}] restarted (restart {restarts} since the agent started)");
                self.events
                    .do_send(ProcessEvent::Restarted { pid, restarts });
            }
            Err(error) => {
                self.health.crashed = true;
                let group = run.group;
                let delay = self.schedule_restart(command, run, ctx);
                warn!("[pid {group}] restart failed: {error}; next attempt in {delay:.1?}");
            }
        }
    }

    /// Moves to `Stopping` and runs the tear-down of `run` in the background. While the leader
    /// runs, the `tear_down` step goes first. Unless the step stops the process itself, the run
    /// gets SIGTERM, and SIGKILL once the grace period is over unless `soft`. Processes that
    /// left the group get the same signals, and SIGTERM as soon as the group is gone when the
    /// step stopped the sub-process.
    fn begin_stop(
        &mut self,
        leader: Option<u32>,
        run: Run,
        waiters: Vec<oneshot::Sender<()>>,
        ctx: &mut Context<Self>,
    ) {
        let group = run.group;
        self.process = Process::Stopping {
            run: run.clone(),
            waiters,
        };
        self.publish(ProcessState::Terminating, leader);
        info!("[pid {group}] tearing down process group {group}");

        let steps = self.steps.clone();
        let grace = self.config.grace;
        let soft = self.config.soft;
        let tear_down = async move {
            // One deadline for the whole tear-down, so it ends within the grace period even when
            // the `tear_down` step takes long.
            let deadline = Instant::now() + grace;
            let requested = match leader {
                Some(pid) => run_tear_down_step(steps.as_ref(), pid, deadline).await,
                None => false,
            };
            if !requested {
                signal_run(run.clone(), Signal::SIGTERM).await;
            }
            if wait_group_gone(group, Some(deadline)).await {
                if requested {
                    signal_run(run.clone(), Signal::SIGTERM).await;
                }
                if wait_escaped_gone(&run, Some(deadline)).await {
                    return;
                }
            }

            if soft {
                warn!("[pid {group}] still running {grace:.1?} after the tear-down began; soft: waiting without SIGKILL");
            } else {
                warn!("[pid {group}] still running {grace:.1?} after the tear-down began; sending SIGKILL");
                signal_run(run.clone(), Signal::SIGKILL).await;
            }
            wait_group_gone(group, None).await;
            wait_escaped_gone(&run, None).await;
        };
        ctx.spawn(
            tear_down
                .into_actor(self)
                .map(move |(), supervisor, _| supervisor.finish_stop(group)),
        );
    }

    fn finish_stop(&mut self, group: u32) {
        let Process::Stopping { waiters, .. } =
            mem::replace(&mut self.process, Process::Idle { last: None })
        else {
            unreachable!("only the tear-down of process group {group} leaves the Stopping state");
        };
        info!("[pid {group}] process group {group} is gone");
        self.publish(ProcessState::Stopped, None);
        for waiter in waiters {
            // A requester that gave up no longer waits for the reply.
            let _ = waiter.send(());
        }
    }

    fn start_checks(&mut self, ctx: &mut Context<Self>) {
        if self.health.timer.is_some() || self.config.check_every.is_zero() {
            return;
        }
        let timer = ctx.run_interval(self.config.check_every, |supervisor, ctx| {
            supervisor.run_check(ctx)
        });
        self.health.timer = Some(timer);
    }

    fn stop_checks(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.health.timer.take() {
            ctx.cancel_future(timer);
        }
        self.health = Health {
            round: self.health.round + 1,
            ..Health::default()
        };
    }

    fn run_check(&mut self, ctx: &mut Context<Self>) {
        if self.health.checking {
            debug!("the previous sanity check still runs; skipping this one");
            return;
        }
        let pid = match &self.process {
            Process::Running(child) => child.pid,
            Process::Restarting { .. } => {
                let reason = "the sub-process crashed and waits for its restart".to_string();
                self.record_check(None, Err(reason), ctx);
                return;
            }
            Process::Idle { .. } | Process::Stopping { .. } => return,
        };

        self.health.checking = true;
        let round = self.health.round;
        let steps = self.steps.clone();
        let limit = self.config.check_every;
        let check = async move {
            match tokio::time::timeout(limit, steps.sanity_check(pid)).await {
                Ok(result) => result.map_err(|error| error.0),
                Err(_) => Err(format!(
                    "the sanity check did not finish within {limit:.1?}"
                )),
            }
        };
        ctx.spawn(check.into_actor(self).map(move |result, supervisor, ctx| {
            if supervisor.health.round == round {
                supervisor.health.checking = false;
                supervisor.record_check(Some(pid), result, ctx);
            }
        }));
    }

    /// Counts one sanity check: it fails when the step failed or the sub-process crashed since
    /// the previous check.
    fn record_check(
        &mut self,
        pid: Option<u32>,
        result: Result<Option<serde_json::Value>, String>,
        ctx: &mut Context<Self>,
    ) {
        let crashed = mem::take(&mut self.health.crashed);
        let subject = pid.map_or_else(|| "no process".to_string(), |pid| format!("pid {pid}"));

        let reason = match (result, crashed) {
            (Ok(metrics), false) => {
                self.health.failures = 0;
                if let Some(metrics) = metrics {
                    self.telemetry.update(|facts| facts.metrics = metrics);
                }
                debug!("[{subject}] sanity check passed");
                return;
            }
            (Err(reason), _) => reason,
            (Ok(_), true) => "the sub-process crashed since the previous check".to_string(),
        };

        self.health.failures += 1;
        let failures = self.health.failures;
        let limit = self.config.checks.max(1);
        warn!("[{subject}] sanity check failed ({failures} of {limit} allowed in a row): {reason}");
        if failures >= limit {
            error!("[{subject}] {failures} sanity checks failed in a row; the pod is unhealthy");
            if let Some(timer) = self.health.timer.take() {
                ctx.cancel_future(timer);
            }
            self.events
                .do_send(ProcessEvent::Unhealthy { pid, failures });
        }
    }

    /// Publishes the process state and pid. `Dead` is terminal and written by the lifecycle
    /// only, so a tear-down that ends after the pod died leaves it in place.
    fn publish(&self, state: ProcessState, pid: Option<u32>) {
        self.telemetry.update(|facts| {
            if facts.process != ProcessState::Dead {
                facts.process = state;
            }
            facts.pid = pid;
        });
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    /// Sends SIGTERM to a sub-process group still supervised when the actor stops without a
    /// [`Stop`] (its system shut down), so the sub-process does not outlive its supervisor
    /// unnoticed. Nothing waits for the group to go.
    fn stopped(&mut self, _: &mut Self::Context) {
        let run = match &self.process {
            Process::Running(child) => child.run(),
            Process::Restarting { run, .. } | Process::Stopping { run, .. } => run.clone(),
            Process::Idle { .. } => return,
        };
        let group = run.group;
        warn!("[pid {group}] supervisor stopped while process group {group} was supervised; sending SIGTERM");
        run.signal(Signal::SIGTERM);
    }
}

impl Handler<Spawn> for Supervisor {
    type Result = Result<u32, SupervisorError>;

    fn handle(&mut self, Spawn(command): Spawn, ctx: &mut Self::Context) -> Self::Result {
        match &self.process {
            Process::Running(Child { pid: group, .. })
            | Process::Restarting {
                run: Run { group, .. },
                ..
            }
            | Process::Stopping {
                run: Run { group, .. },
                ..
            } => return Err(SupervisorError::Busy { group: *group }),
            Process::Idle { .. } => {}
        }

        // A new command starts a new supervision history.
        self.stop_checks(ctx);
        self.restart_delay = self.config.first_restart_delay;
        let pid = self.start(command, ctx)?;
        self.start_checks(ctx);
        Ok(pid)
    }
}

impl Handler<Stop> for Supervisor {
    type Result = ResponseFuture<Result<(), SupervisorError>>;

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) -> Self::Result {
        let (sender, receiver) = oneshot::channel();
        self.stop_checks(ctx);

        match mem::replace(&mut self.process, Process::Idle { last: None }) {
            // Nothing ran.
            Process::Idle { last: None } => {
                let _ = sender.send(());
            }
            // The last sub-process completed; what it left behind goes now. The tear-down ends
            // at once when nothing is left.
            Process::Idle { last: Some(run) } => self.begin_stop(None, run, vec![sender], ctx),
            Process::Running(child) => {
                self.begin_stop(Some(child.pid), child.run(), vec![sender], ctx)
            }
            Process::Restarting { run, timer, .. } => {
                ctx.cancel_future(timer);
                self.publish(ProcessState::Stopped, None);
                self.begin_stop(None, run, vec![sender], ctx);
            }
            // A tear-down is already under way: wait for the same one.
            Process::Stopping { run, mut waiters } => {
                waiters.push(sender);
                self.process = Process::Stopping { run, waiters };
            }
        }

        Box::pin(async move { receiver.await.map_err(|_| SupervisorError::Gone) })
    }
}

impl Handler<Forward> for Supervisor {
    type Result = Result<(), SupervisorError>;

    fn handle(&mut self, Forward(signal): Forward, _: &mut Self::Context) -> Self::Result {
        let group = match &self.process {
            Process::Running(child) => child.pid,
            Process::Stopping { run, .. } => run.group,
            Process::Idle { .. } | Process::Restarting { .. } => {
                return Err(SupervisorError::NotRunning)
            }
        };
        match killpg(Pid::from_raw(group as i32), signal) {
            Ok(()) | Err(Errno::ESRCH) => {
                debug!("[pid {group}] forwarded {signal} to process group {group}");
                Ok(())
            }
            Err(errno) => Err(SupervisorError::Signal {
                signal,
                group,
                errno,
            }),
        }
    }
}

impl Handler<GetPid> for Supervisor {
    type Result = Option<u32>;

    fn handle(&mut self, _: GetPid, _: &mut Self::Context) -> Self::Result {
        match &self.process {
            Process::Running(child) => Some(child.pid),
            _ => None,
        }
    }
}

/// Returns the pod's facts as the JSON held by the `ochopod` variable of sub-processes and
/// hooks: the registration as last published in the telemetry.
pub fn pod_facts(telemetry: &Telemetry) -> String {
    serde_json::to_string(&telemetry.facts().registration)
        .expect("a registration always serializes")
}

/// Builds the command of a sub-process: its own process group (so a tear-down reaches every
/// process it started), no stdin, the agent's environment without its secrets, plus
/// `ochopod`, the run id and the command's own.
fn build_command(
    command: &SubCommand,
    facts: &str,
    run_id: &str,
) -> Result<Command, SupervisorError> {
    let Some(program) = command.argv.first() else {
        return Err(SupervisorError::EmptyCommand);
    };

    let mut process = if command.shell {
        // A shell command is one string; words given apart are joined back into it.
        let mut shell = Command::new("/bin/sh");
        shell.arg("-c").arg(command.argv.join(" "));
        shell
    } else {
        let mut direct = Command::new(program);
        direct.args(&command.argv[1..]);
        direct
    };
    process
        .process_group(0)
        .stdin(Stdio::null())
        .env("ochopod", facts);
    // The workload has no use for the control API's token or the ZooKeeper credentials, but
    // hooks, which are the operator's own code, keep them.
    for (name, _) in std::env::vars_os() {
        if SECRET_VARIABLES
            .iter()
            .any(|secret| name.eq_ignore_ascii_case(secret))
        {
            process.env_remove(name);
        }
    }
    // The run id comes last, so that no `configure` output can replace it.
    process.envs(&command.env).env(RUN_ID_VARIABLE, run_id);
    if let Some(cwd) = &command.cwd {
        process.current_dir(cwd);
    }

    // An agent killed with SIGKILL cannot tear its sub-process down; the kernel then kills the
    // sub-process instead of leaving it orphaned. Linux sends the signal when the thread that
    // forked exits, which for an actor is its arbiter's thread.
    // SAFETY: the closure runs between fork and exec and only makes the prctl system call,
    // which is async-signal-safe.
    unsafe {
        process.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL)).map_err(std::io::Error::from)
        });
    }
    Ok(process)
}

/// Names the program of a command for logs and errors, without its arguments, which may hold
/// secrets.
fn program_name(command: &SubCommand) -> String {
    if command.shell {
        "/bin/sh -c ...".to_string()
    } else {
        command.argv.first().cloned().unwrap_or_default()
    }
}

/// Runs the `tear_down` step until `deadline`; returns true when the step asked the
/// sub-process to stop. A failed or late step leaves the stop to SIGTERM.
async fn run_tear_down_step(steps: &dyn LifeCycle, pid: u32, deadline: Instant) -> bool {
    let limit = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(limit, steps.tear_down(pid)).await {
        Ok(Ok(TearDown::Requested)) => true,
        Ok(Ok(TearDown::Default)) => false,
        Ok(Err(error)) => {
            warn!("[pid {pid}] tear_down step failed: {error}; sending SIGTERM");
            false
        }
        Err(_) => {
            warn!("[pid {pid}] tear_down step did not finish within the grace period; sending SIGTERM");
            false
        }
    }
}

/// Sends `signal` to every process of `run`, reading the process table on a blocking thread.
async fn signal_run(run: Run, signal: Signal) {
    let group = run.group;
    if tokio::task::spawn_blocking(move || run.signal(signal))
        .await
        .is_err()
    {
        warn!("[pid {group}] the thread sending {signal} to process group {group} failed");
    }
}

/// Sends `signal` to every process of `run` without waiting, from a synchronous handler.
fn signal_in_background(run: Run, signal: Signal) {
    actix::spawn(signal_run(run, signal));
}

/// Tells whether any process, zombies included, is left in `group`.
fn group_alive(group: u32) -> bool {
    // Signal 0 only checks for existence; EPERM still means a process exists.
    killpg(Pid::from_raw(group as i32), None) != Err(Errno::ESRCH)
}

/// Polls until `group` is gone; returns false when `deadline` passes first.
async fn wait_group_gone(group: u32, deadline: Option<Instant>) -> bool {
    wait_for(GROUP_POLL_INTERVAL, deadline, || async move {
        !group_alive(group)
    })
    .await
}

/// Polls until no process that left the group of `run` is left; returns false when `deadline`
/// passes first.
async fn wait_escaped_gone(run: &Run, deadline: Option<Instant>) -> bool {
    wait_for(ESCAPED_POLL_INTERVAL, deadline, || {
        let run = run.clone();
        async move {
            tokio::task::spawn_blocking(move || run.escaped().is_empty())
                .await
                .unwrap_or(true)
        }
    })
    .await
}

/// Evaluates `done` every `interval` until it returns true; returns false when `deadline`
/// passes first.
async fn wait_for<F, Done>(interval: Duration, deadline: Option<Instant>, mut done: F) -> bool
where
    F: FnMut() -> Done,
    Done: std::future::Future<Output = bool>,
{
    loop {
        if done().await {
            return true;
        }
        let mut pause = interval;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Logs every line of one output stream of `pid` at info, from a thread of its own, until the
/// last process holding the stream closes it.
fn log_output(pid: u32, stream: &'static str, output: impl Read + Send + 'static) {
    let reader = move || {
        let mut reader = BufReader::new(output);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader
                .by_ref()
                .take(MAX_LOGGED_LINE)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    info!("[pid {pid}] {}", text.trim_end_matches(['\n', '\r']));
                }
                Err(error) => {
                    debug!("[pid {pid}] stopped reading {stream}: {error}");
                    return;
                }
            }
        }
    };
    if let Err(error) = thread::Builder::new()
        .name(format!("pid-{pid}-{stream}"))
        .spawn(reader)
    {
        warn!("[pid {pid}] cannot start the thread logging {stream}: {error}");
    }
}
