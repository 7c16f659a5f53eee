//! A pod assembled from its actors, and the binary's main loop.
//!
//! [`Pod::start`] starts every actor of one pod inside the current actix `System`: the platform
//! probe, the lifecycle and its supervisor, the control server, the ZooKeeper session, the
//! election and the leader. Several pods can run in one `System`, each with its own key,
//! session and control port; that is how an actix application embeds a pod.
//!
//! The shutdown order is a protocol: leave the election (so no round starts from here), tear
//! the sub-process down, close the session (so the registration vanishes at once), then stop
//! the control server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use actix::prelude::*;
use log::{error, info, warn};
use nix::sys::signal::Signal;

use crate::acl::ZookeeperAccess;
use crate::binding::{BindingError, Host, Identify, Identity, PlatformProbe};
use crate::control::{start_control_server, ControlServer, RunningControlServer};
use crate::election::{Election, Resign};
use crate::hooks::{HookError, HookRunner};
use crate::leader::{Leader, LeaderConfig};
use crate::lifecycle::{
    Lifecycle, LifecycleConfig, LifecycleError, PodDead, Shutdown, SupervisorLink,
};
use crate::reaper::{self, AgentSignal};
use crate::session::{CloseSession, Session, SessionConfig, Subscribe};
use crate::settings::{seconds, Settings};
use crate::steps::{LifeCycle, Model};
use crate::supervisor::{Forward, Supervisor, SupervisorConfig};
use crate::telemetry::Telemetry;

/// Failure to start a pod.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    Binding(#[from] BindingError),
    #[error("{0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("{0}")]
    Hooks(#[from] HookError),
    #[error(
        "cannot listen on {address} for the control server: {source}; free that port, or choose \
         another with the `port` setting (or, with the local binding, its `PORT_<port>` remapping)"
    )]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the platform probe stopped before answering")]
    ProbeStopped,
}

/// A running pod: the addresses of its actors and of its control server.
pub struct Pod {
    pub key: String,
    pub identity: Identity,
    pub telemetry: Arc<Telemetry>,
    pub session: Addr<Session>,
    pub election: Addr<Election>,
    pub leader: Addr<Leader>,
    pub lifecycle: Addr<Lifecycle>,
    pub supervisor: Addr<Supervisor>,
    /// Address the control server listens on.
    pub control_address: SocketAddr,
    server: RunningControlServer,
}

impl Pod {
    /// Starts a pod with the given steps in the current actix `System`. `telemetry` receives
    /// the pod's runtime facts (steps may read them); `on_dead` receives `PodDead` when the pod dies with
    /// `exit_when_dead` set.
    pub async fn start(
        settings: Settings,
        steps: Arc<dyn LifeCycle>,
        model: Arc<dyn Model>,
        telemetry: Arc<Telemetry>,
        on_dead: Option<Recipient<PodDead>>,
    ) -> Result<Pod, PodError> {
        let settings = Arc::new(settings);
        let key = uuid::Uuid::new_v4().to_string();
        let cluster = settings.qualified_cluster();

        // Who and where we are, before anything touches ZooKeeper.
        let probe = PlatformProbe::new(settings.clone(), Host::current()).start();
        let identity = probe
            .send(Identify)
            .await
            .map_err(|_| PodError::ProbeStopped)??;
        let mut registration = identity.registration();
        registration.extra.clear();
        telemetry.update(|facts| {
            facts.registration = registration.clone();
            facts.dependencies = settings.depends_on.clone();
        });

        // The lifecycle and its supervisor point at each other.
        let lifecycle_config = LifecycleConfig::from_settings(&settings)?;
        let supervisor_config = SupervisorConfig::from_settings(&settings);
        let (supervisor_tx, supervisor_rx) = std::sync::mpsc::channel();
        let lifecycle = {
            let steps = steps.clone();
            let telemetry = telemetry.clone();
            Lifecycle::create(move |ctx| {
                let supervisor = Supervisor::new(
                    supervisor_config,
                    steps.clone(),
                    telemetry.clone(),
                    ctx.address().recipient(),
                )
                .start();
                let link = SupervisorLink::to(&supervisor);
                let _ = supervisor_tx.send(supervisor);
                Lifecycle::new(lifecycle_config, steps, link, telemetry, on_dead)
            })
        };
        let supervisor = supervisor_rx
            .recv()
            .expect("the lifecycle starts its supervisor");

        let access = ZookeeperAccess::from_settings(&settings);
        let session_config = SessionConfig {
            connect: identity.zk.clone(),
            session_timeout: seconds(settings.session_timeout),
            access: access.clone(),
        };
        let session =
            Session::new(session_config, key.clone(), registration, telemetry.clone()).start();

        // The control server listens before the pod registers, so the leader can reach it.
        let address = SocketAddr::new(listen_ip(&identity), identity.listen_port());
        let server = start_control_server(ControlServer {
            address,
            telemetry: telemetry.clone(),
            lifecycle: lifecycle.clone().recipient(),
            session: session.clone().recipient(),
            settings: settings.clone(),
        })
        .map_err(|source| PodError::Listen { address, source })?;
        let control_address = server.address;

        let leader_config = LeaderConfig {
            cluster: cluster.clone(),
            namespace: settings.namespace.clone(),
            depends_on: settings.depends_on.clone(),
            damper: seconds(settings.damper),
            full_shutdown: settings.full_shutdown,
            sequential: settings.sequential,
            control_timeout: seconds(settings.control_timeout),
            probe_every: seconds(settings.probe_every),
            token: settings.token.clone(),
            access: access.clone(),
        };
        let leader = Leader::new(
            leader_config,
            model,
            telemetry.clone(),
            session.clone().recipient(),
        )
        .start();
        let election = Election::new(
            cluster.clone(),
            key.clone(),
            access,
            leader.clone().recipient(),
            telemetry.clone(),
        )
        .start();
        session.do_send(Subscribe(election.clone().recipient()));

        info!("cluster {cluster}: pod {key} started, control server on {control_address}");
        Ok(Pod {
            key,
            identity,
            telemetry,
            session,
            election,
            leader,
            lifecycle,
            supervisor,
            control_address,
            server,
        })
    }

    /// Stops the pod: leaves the election, tears the sub-process down, closes the session and
    /// stops the control server, in that order.
    pub async fn stop(&self) {
        let cluster = format!("{}.{}", self.identity.namespace, self.identity.cluster);
        info!("cluster {cluster}: pod {} stopping", self.key);
        let _ = self.election.send(Resign).await;
        let _ = self.lifecycle.send(Shutdown).await;
        let _ = self.session.send(CloseSession).await;
        self.server.stop();
        info!("cluster {cluster}: pod {} stopped", self.key);
    }
}

/// Returns the address the control server binds. With the local binding it is the registered
/// address (127.0.0.1 unless the `ip` setting names another one of this host), so the pod
/// listens where the leader reaches it. Inside a container it is every interface.
fn listen_ip(identity: &Identity) -> IpAddr {
    if identity.binding == "local" {
        identity
            .ip
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// Event that ends the binary's main loop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
enum Ending {
    Signal(Signal),
    Dead(String),
}

/// Relays process signals and the pod's death to the main loop.
struct Relay {
    supervisor: Option<Addr<Supervisor>>,
    ending: tokio::sync::mpsc::UnboundedSender<Ending>,
}

impl Actor for Relay {
    type Context = Context<Self>;
}

impl Handler<AgentSignal> for Relay {
    type Result = ();

    fn handle(&mut self, AgentSignal(signal): AgentSignal, _: &mut Self::Context) {
        match signal {
            Signal::SIGTERM | Signal::SIGINT => {
                let _ = self.ending.send(Ending::Signal(signal));
            }
            other => match &self.supervisor {
                Some(supervisor) => {
                    info!("forwarding {other} to the sub-process");
                    supervisor.do_send(Forward(other));
                }
                None => {
                    warn!("{other} received before the sub-process supervisor started, ignoring it")
                }
            },
        }
    }
}

impl Handler<PodDead> for Relay {
    type Result = ();

    fn handle(&mut self, PodDead { reason }: PodDead, _: &mut Self::Context) {
        let _ = self.ending.send(Ending::Dead(reason));
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct AttachSupervisor(Addr<Supervisor>);

impl Handler<AttachSupervisor> for Relay {
    type Result = ();

    fn handle(&mut self, AttachSupervisor(supervisor): AttachSupervisor, _: &mut Self::Context) {
        self.supervisor = Some(supervisor);
    }
}

/// Prints a start-up error on stderr. Unlike `eprintln!`, it does not panic when stderr is
/// closed, so the exit code still reports what went wrong.
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write;

    let _ = writeln!(std::io::stderr(), "ochopod: {message}");
}

/// Runs the binary: one pod whose steps are the hooks and static command of `settings`, until
/// SIGTERM or SIGINT (or its death, with `exit_when_dead`). Returns the process exit code.
pub fn run_binary(settings: Settings) -> i32 {
    crate::logging::init();
    // As PID 1 the agent must reap orphans even before it spawns a child of its own.
    if let Err(err) = reaper::start() {
        report(format_args!("cannot start the child reaper: {err}"));
        return 1;
    }
    let problems = HookRunner::problems(&settings);
    if !problems.is_empty() {
        for problem in problems {
            report(format_args!("{problem}"));
        }
        return 2;
    }
    if let Err(err) = LifecycleConfig::from_settings(&settings) {
        report(format_args!("{err}"));
        return 2;
    }

    let system = System::new();
    system.block_on(async move {
        let (ending_tx, mut ending_rx) = tokio::sync::mpsc::unbounded_channel();
        let relay = Relay { supervisor: None, ending: ending_tx }.start();
        if let Err(err) = reaper::subscribe_signals(relay.clone().recipient()) {
            error!("cannot install the signal handlers: {err}");
            return 1;
        }

        let telemetry = Arc::new(Telemetry::default());
        let hooks = Arc::new(HookRunner::new(&settings, telemetry.clone()));
        let on_dead = settings.exit_when_dead.then(|| relay.clone().recipient());
        let pod = match Pod::start(settings, hooks.clone(), hooks, telemetry, on_dead).await {
            Ok(pod) => pod,
            Err(err) => {
                error!("{err}");
                report(format_args!("{err}"));
                return 1;
            }
        };
        relay.do_send(AttachSupervisor(pod.supervisor.clone()));

        let code = match ending_rx.recv().await {
            Some(Ending::Signal(signal)) => {
                info!("{signal} received, shutting down");
                0
            }
            Some(Ending::Dead(reason)) => {
                info!("pod dead ({reason}), exiting");
                0
            }
            None => 1,
        };
        // A second signal during the shutdown cuts it short.
        let stop = pod.stop();
        tokio::select! {
            _ = stop => {}
            Some(Ending::Signal(signal)) = ending_rx.recv() => warn!("{signal} received again, exiting at once"),
        }
        code
    })
}
