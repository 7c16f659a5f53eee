//! The ZooKeeper session actor: owns the client, keeps the pod registered, and notifies the other
//! actors when the session comes, goes or comes back.
//!
//! It is the only place that maps the client's session states onto what the pod does:
//!
//! - `Disconnected`: the session may still come back; subscribers get `Suspended` (a leader
//!   stops driving configuration until it has checked its lock again).
//! - `SyncConnected` after a disconnection: subscribers get `Resumed` with the same client, and
//!   must re-arm their watches and re-read what they watch, because events that fired while the
//!   connection was down may be lost.
//! - `Expired`, `AuthFailed`, or `Closed` while not closing: the ephemeral nodes are gone.
//!   Subscribers get `Lost`, the actor builds a new client and registers again under the same
//!   key and seq, then subscribers get `Registered` with the new client.
//!
//! A connection or registration that fails is tried again after a second. One that ZooKeeper
//! denies (`NoAuth`, `AuthFailed`) is logged as an error that names the znode and what to
//! check, and `/info` shows it as `zookeeper_error`. It is tried again after a delay that
//! doubles up to a minute, because only an operator can change credentials or ACLs.
//!
//! The first registration is an ephemeral sequential node `pods/<key>.`; its sequence number
//! becomes the pod's seq for the life of the process. Later registrations create the plain
//! ephemeral node `pods/<key>.<seq>`, so a pod keeps its seq across session expiry. When a
//! `create` fails with a connection loss, the node may exist anyway: the next attempt first
//! looks for a child named after the key before creating another one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, error, info, warn};
use zookeeper_client as zk;

use crate::acl::{self, AtZnode, ZnodeError, ZookeeperAccess};
use crate::layout;
use crate::registration::{child_name, parse_child_name, Registration};
use crate::telemetry::{SessionState, Telemetry};

/// Delay before a failed connection or registration is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a graceful close waits for ZooKeeper to confirm the node deletion.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Session change sent to the subscribers.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub enum SessionEvent {
    /// The pod is registered on a new session: watches must be armed and state read anew.
    Registered { client: zk::Client },
    /// The connection dropped; the session may still come back.
    Suspended,
    /// The same session is connected again: watches must be re-armed and state re-read.
    Resumed { client: zk::Client },
    /// The session is gone and with it every ephemeral node of this pod.
    Lost,
}

/// Adds a subscriber to the session events. A subscriber that joins after the registration
/// gets `Registered` at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<SessionEvent>);

/// Drops the session and registers again on a new one (`POST /reset`). The sub-process is left
/// alone.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), String>")]
pub struct ResetSession;

/// Deletes the registration and closes the session, for a graceful shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSession;

/// Publishes a new status in the pod's registration.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateStatus(pub String);

/// A state change reported by the client of one generation.
#[derive(Message)]
#[rtype(result = "()")]
struct StateChanged {
    generation: u64,
    state: zk::SessionState,
}

/// Connection settings, fixed for the life of the actor.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// ZooKeeper connection string, with an optional chroot.
    pub connect: String,
    pub session_timeout: Duration,
    /// Credentials of every session and ACLs of the znodes the session actor creates.
    pub access: ZookeeperAccess,
}

/// The session actor.
pub struct Session {
    config: SessionConfig,
    /// The registration to publish; its `seq` is set once known.
    registration: Registration,
    /// The pod's key, fixed for the life of the process.
    key: String,
    /// The seq of the first registration, reused by every later one.
    seq: Option<i64>,
    /// Whether a `create` of the sequential node was sent and may have succeeded unseen.
    create_sent: bool,
    /// Connections and registrations that ZooKeeper denied in a row, for the retry backoff.
    denials: u32,
    client: Option<zk::Client>,
    /// Bumped for every new client, so that late replies of an older client are ignored.
    generation: u64,
    registered: bool,
    disconnected: bool,
    closing: bool,
    subscribers: Vec<Recipient<SessionEvent>>,
    telemetry: Arc<Telemetry>,
}

impl Session {
    pub fn new(
        config: SessionConfig,
        key: String,
        registration: Registration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Session {
            config,
            registration,
            key,
            seq: None,
            create_sent: false,
            denials: 0,
            client: None,
            generation: 0,
            registered: false,
            disconnected: false,
            closing: false,
            subscribers: Vec::new(),
            telemetry,
        }
    }

    fn cluster(&self) -> String {
        self.registration.qualified_cluster()
    }

    fn publish(&mut self, event: SessionEvent) {
        self.subscribers.retain(|subscriber| subscriber.connected());
        for subscriber in &self.subscribers {
            subscriber.do_send(event.clone());
        }
    }

    fn set_state(&self, state: SessionState) {
        self.telemetry.update(|facts| facts.session = state);
    }

    /// Builds a new client, then registers on its session.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        self.client = None;
        self.registered = false;
        self.disconnected = false;
        self.set_state(SessionState::Connecting);

        let generation = self.generation;
        let connect = self.config.connect.clone();
        let connector = self
            .config
            .access
            .connector()
            .with_session_timeout(self.config.session_timeout);
        let attempt = async move { connector.connect(&connect).await };

        ctx.spawn(attempt.into_actor(self).map(move |result, session, ctx| {
            if generation != session.generation || session.closing {
                return;
            }
            match result {
                Ok(client) => {
                    info!(
                        "cluster {}: ZooKeeper session {} established with {}",
                        session.cluster(),
                        client.session_id(),
                        session.config.connect
                    );
                    session.watch_state(client.state_watcher(), ctx);
                    session.client = Some(client);
                    session.set_state(SessionState::Connected);
                    session.register(ctx);
                }
                Err(err) => {
                    let failure =
                        format!("cannot connect to ZooKeeper at {}", session.config.connect);
                    session.retry_later(&failure, &err, None, ctx, Self::connect);
                }
            }
        }));
    }

    /// Logs a failed connection or registration (a request on `znode`, if any) and schedules
    /// `retry` on the same generation: after `RETRY_DELAY`, or after the growing denial backoff
    /// when ZooKeeper denied access.
    fn retry_later(
        &mut self,
        failure: &str,
        err: &zk::Error,
        znode: Option<&str>,
        ctx: &mut Context<Self>,
        retry: fn(&mut Self, &mut Context<Self>),
    ) {
        let delay = match self.config.access.explain_denial(err, znode) {
            Some(explanation) => {
                self.denials = self.denials.saturating_add(1);
                let delay = acl::denied_retry_delay(self.denials);
                error!(
                    "cluster {}: {failure}: {explanation}; retrying in {} s (denial {} in a row)",
                    self.cluster(),
                    delay.as_secs(),
                    self.denials
                );
                self.telemetry.update(|facts| {
                    facts.zookeeper_error = Some(format!("{failure}: {explanation}"))
                });
                delay
            }
            None => {
                let on_znode = znode.map(|path| format!("{path}: ")).unwrap_or_default();
                warn!(
                    "cluster {}: {failure}: {on_znode}{err}; retrying in {RETRY_DELAY:?}",
                    self.cluster()
                );
                RETRY_DELAY
            }
        };
        let generation = self.generation;
        ctx.run_later(delay, move |session, ctx| {
            if session.generation == generation && !session.closing {
                retry(session, ctx);
            }
        });
    }

    /// Forwards the state changes of the current client to the actor.
    fn watch_state(&self, mut watcher: zk::StateWatcher, ctx: &mut Context<Self>) {
        let generation = self.generation;
        let address = ctx.address();
        actix::spawn(async move {
            loop {
                let state = watcher.changed().await;
                if address
                    .try_send(StateChanged { generation, state })
                    .is_err()
                    || state.is_terminated()
                {
                    break;
                }
            }
        });
    }

    /// Creates the pod's node (or finds it), then notifies the subscribers.
    fn register(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let generation = self.generation;
        let cluster = self.cluster();
        let key = self.key.clone();
        let seq = self.seq;
        let search_first = self.create_sent;
        self.create_sent = seq.is_none();
        let registration = self.registration.clone();
        let access = self.config.access.clone();

        let attempt = async move {
            create_registration(
                &client,
                &access,
                &cluster,
                &key,
                seq,
                search_first,
                registration,
            )
            .await
        };

        ctx.spawn(attempt.into_actor(self).map(move |result, session, ctx| {
            if generation != session.generation || session.closing {
                return;
            }
            match result {
                Ok(seq) => {
                    session.seq = Some(seq);
                    session.create_sent = false;
                    session.registered = true;
                    session.denials = 0;
                    session.registration.seq = seq;
                    let registration = session.registration.clone();
                    session.telemetry.update(|facts| {
                        facts.registration = registration;
                        facts.zookeeper_error = None;
                    });
                    info!(
                        "cluster {}: registered as {} (seq {seq})",
                        session.cluster(),
                        child_name(&session.key, seq)
                    );
                    if let Some(client) = session.client.clone() {
                        session.publish(SessionEvent::Registered { client });
                    }
                }
                Err(ZnodeError {
                    error: zk::Error::SessionExpired | zk::Error::ClientClosed,
                    ..
                }) => {
                    debug!(
                        "cluster {}: registration stopped by the end of its session",
                        session.cluster()
                    );
                }
                Err(ZnodeError {
                    error: zk::Error::AuthFailed,
                    ..
                }) => {
                    debug!(
                        "cluster {}: registration stopped by a failed authentication, which \
                         the session state reports",
                        session.cluster()
                    );
                }
                Err(ZnodeError { path, error }) => {
                    let failure = "cannot register in ZooKeeper";
                    session.retry_later(failure, &error, Some(&path), ctx, Self::register);
                }
            }
        }));
    }

    fn handle_state(&mut self, state: zk::SessionState, ctx: &mut Context<Self>) {
        use zk::SessionState::*;

        match state {
            Disconnected => {
                warn!(
                    "cluster {}: disconnected from ZooKeeper, waiting for the session to resume",
                    self.cluster()
                );
                self.disconnected = true;
                self.set_state(SessionState::Disconnected);
                if self.registered {
                    self.publish(SessionEvent::Suspended);
                }
            }
            SyncConnected | ConnectedReadOnly => {
                // The client's state channel keeps only the latest state, so a quick reconnect
                // can arrive without the `Disconnected` before it. The first state of a client
                // is consumed when it connects, so any connected state seen here follows a
                // disconnection, seen or not.
                self.set_state(SessionState::Connected);
                self.disconnected = false;
                info!("cluster {}: ZooKeeper session resumed", self.cluster());
                if let (true, Some(client)) = (self.registered, self.client.clone()) {
                    self.publish(SessionEvent::Resumed { client });
                }
            }
            Expired | AuthFailed | Closed => {
                if self.closing {
                    self.set_state(SessionState::Closed);
                    return;
                }
                self.set_state(SessionState::Expired);
                self.publish(SessionEvent::Lost);
                if state == AuthFailed {
                    // Reconnecting at once would fail the same way: back off like a denied
                    // connection, on a generation that ignores the failed client.
                    self.generation += 1;
                    self.client = None;
                    self.registered = false;
                    let failure = "ZooKeeper ended the session";
                    self.retry_later(failure, &zk::Error::AuthFailed, None, ctx, Self::connect);
                } else {
                    warn!(
                        "cluster {}: ZooKeeper session {state:?}, registering again",
                        self.cluster()
                    );
                    self.connect(ctx);
                }
            }
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!(
            "cluster {}: connecting to ZooKeeper at {}",
            self.cluster(),
            self.config.connect
        );
        self.connect(ctx);
    }
}

impl Handler<StateChanged> for Session {
    type Result = ();

    fn handle(&mut self, message: StateChanged, ctx: &mut Self::Context) {
        if message.generation == self.generation {
            self.handle_state(message.state, ctx);
        }
    }
}

impl Handler<Subscribe> for Session {
    type Result = ();

    fn handle(&mut self, Subscribe(subscriber): Subscribe, _: &mut Self::Context) {
        if let (true, Some(client)) = (self.registered, self.client.clone()) {
            subscriber.do_send(SessionEvent::Registered { client });
        }
        self.subscribers.push(subscriber);
    }
}

impl Handler<ResetSession> for Session {
    type Result = Result<(), String>;

    fn handle(&mut self, _: ResetSession, ctx: &mut Self::Context) -> Self::Result {
        if self.closing {
            return Err("the agent is shutting down".to_string());
        }
        info!(
            "cluster {}: dropping the ZooKeeper session on request, registering again",
            self.cluster()
        );
        self.publish(SessionEvent::Lost);
        self.connect(ctx);
        Ok(())
    }
}

impl Handler<UpdateStatus> for Session {
    type Result = ();

    fn handle(&mut self, UpdateStatus(status): UpdateStatus, ctx: &mut Self::Context) {
        if self.registration.status == status {
            return;
        }
        self.registration.status = status;
        let (Some(client), Some(seq), true) = (self.client.clone(), self.seq, self.registered)
        else {
            return;
        };
        let path = format!(
            "{}/{}",
            layout::pods(&self.cluster()),
            child_name(&self.key, seq)
        );
        let data =
            serde_json::to_vec(&self.registration).expect("a registration always serializes");
        let cluster = self.cluster();
        ctx.spawn(
            async move {
                if let Err(err) = client.set_data(&path, &data, None).await {
                    warn!("cluster {cluster}: cannot publish the pod status in {path}: {err}");
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<CloseSession> for Session {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: CloseSession, _: &mut Self::Context) -> Self::Result {
        self.closing = true;
        self.generation += 1;
        let client = self.client.take();
        let node = self.seq.map(|seq| {
            format!(
                "{}/{}",
                layout::pods(&self.cluster()),
                child_name(&self.key, seq)
            )
        });
        let cluster = self.cluster();
        self.publish(SessionEvent::Lost);

        Box::pin(
            async move {
                let (Some(client), Some(node)) = (client, node) else {
                    return;
                };
                // Deleting the node makes the pod vanish at once for the leader, whatever the
                // other clones of the client still do. Dropping the last clone closes the session.
                match tokio::time::timeout(CLOSE_TIMEOUT, client.delete(&node, None)).await {
                    Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => {
                        info!("cluster {cluster}: registration {node} deleted")
                    }
                    Ok(Err(err)) => {
                        warn!("cluster {cluster}: cannot delete registration {node}: {err}")
                    }
                    Err(_) => warn!("cluster {cluster}: deleting registration {node} timed out"),
                }
            }
            .into_actor(self)
            .map(|_, session, _| session.set_state(SessionState::Closed)),
        )
    }
}

/// Creates the registration node of the pod and returns its seq.
///
/// `search_first` is set when an earlier sequential `create` may have succeeded without its
/// reply reaching us: the pod's node is then looked up by key before creating another one.
async fn create_registration(
    client: &zk::Client,
    access: &ZookeeperAccess,
    cluster: &str,
    key: &str,
    seq: Option<i64>,
    search_first: bool,
    mut registration: Registration,
) -> Result<i64, ZnodeError> {
    let pods = layout::pods(cluster);
    create_directories(client, access, cluster).await?;

    let ephemeral = zk::CreateMode::Ephemeral.with_acls(access.cluster_acls());
    let seq = match seq {
        Some(seq) => seq,
        None => {
            let found = if search_first {
                find_by_key(client, &pods, key).await?
            } else {
                None
            };
            let data = serde_json::to_vec(&registration).expect("a registration always serializes");
            let drawn = match found {
                Some(seq) => seq,
                None => create_sequential(client, access, &pods, key, &data).await?,
            };
            ensure_seq_unique(client, access, cluster, &pods, key, drawn, &data).await?
        }
    };

    registration.seq = seq;
    let path = format!("{pods}/{}", child_name(key, seq));
    let data = serde_json::to_vec(&registration).expect("a registration always serializes");
    match client.create(&path, &data, &ephemeral).await {
        Ok(_) => {}
        Err(zk::Error::NodeExists) => {
            // Our own node (created by the sequential create above, or by an earlier attempt on
            // this session): write the full registration, with its seq, into it.
            let stat = client.check_stat(&path).await.at(&path)?;
            let owner = stat.map(|stat| stat.ephemeral_owner).unwrap_or_default();
            if owner != client.session_id().0 {
                // Left by an earlier session of this process that the server has not expired
                // yet: replace it so that it vanishes with our current session.
                warn!("cluster {cluster}: replacing {path}, still held by an older session {owner:#x}");
                client
                    .delete(&path, None)
                    .await
                    .or_else(ignore_no_node)
                    .at(&path)?;
                client.create(&path, &data, &ephemeral).await.at(&path)?;
            } else {
                client.set_data(&path, &data, None).await.at(&path)?;
            }
        }
        Err(err) => return Err(err).at(&path),
    }
    Ok(seq)
}

/// Creates the cluster's `pods` and `coordinator` znodes and their parents unless they exist.
///
/// Without credentials every znode is open, as before ACLs existed. With credentials the
/// parents that every cluster shares are created open (and only when missing, so that an
/// operator may create them with stricter ACLs), and the cluster's own znodes get the cluster's
/// ACLs. A cluster directory that an agent without credentials created stays open: it is
/// reported, not changed.
async fn create_directories(
    client: &zk::Client,
    access: &ZookeeperAccess,
    cluster: &str,
) -> Result<(), ZnodeError> {
    let directory = zk::CreateMode::Persistent.with_acls(access.cluster_acls());
    if access.is_authenticated() {
        let shared = zk::CreateMode::Persistent.with_acls(access.shared_acls());
        let clusters = layout::CLUSTERS;
        if client.check_stat(clusters).await.at(clusters)?.is_none() {
            client.mkdir(clusters, &shared).await.at(clusters)?;
        }
    }

    let pods = layout::pods(cluster);
    client.mkdir(&pods, &directory).await.at(&pods)?;
    let coordinator = layout::coordinator(cluster);
    client
        .mkdir(&coordinator, &directory)
        .await
        .at(&coordinator)?;

    if access.is_authenticated() {
        let path = layout::cluster(cluster);
        let (acls, _) = client.get_acl(&path).await.at(&path)?;
        if let Some(permission) = acl::world_permission_beyond_read(&acls) {
            warn!(
                "cluster {cluster}: {path} grants {permission} to anyone, so `zookeeper_auth` \
                 does not protect it: its znodes were created without credentials and keep \
                 their ACLs. Set the ACLs of the cluster's persistent znodes with zkCli \
                 (`setAcl -R {path} auth::cdrwa,world:anyone:r` in a session that ran \
                 `addauth digest <user>:<password>`), or delete them while no pod runs"
            );
        }
    }
    Ok(())
}

/// Creates the ephemeral sequential node `pods/<key>.` and returns its sequence number.
async fn create_sequential(
    client: &zk::Client,
    access: &ZookeeperAccess,
    pods: &str,
    key: &str,
    data: &[u8],
) -> Result<i64, ZnodeError> {
    let sequential = zk::CreateMode::EphemeralSequential.with_acls(access.cluster_acls());
    let (_, sequence) = client
        .create(&format!("{pods}/{key}."), data, &sequential)
        .await
        .at(pods)?;
    Ok(sequence.into_i64())
}

/// Returns a seq for a new pod that no other pod holds, starting from `drawn`, the sequence
/// number of the pod's node `pods/<key>.<drawn>`.
///
/// ZooKeeper numbers sequential nodes from a counter of the parent znode, which counts child
/// creations. When `pods/` is created anew, because the servers lost their data or an operator
/// deleted the cluster, the counter starts again from 0. The pods of the lost state register
/// again with their old seqs, so a new pod can draw a seq another pod holds. Such a seq is
/// given back (its node deleted), the counter is moved past the highest seq in use, and a new
/// node is drawn, so the pods that join later get seqs above every older one again.
///
/// Only an exact collision counts: a seq above `drawn` may come from a pod that registered at
/// the same time from the same counter. A child named with an absurd seq (written by hand) is
/// only avoided, not passed, so it cannot stall the registration.
async fn ensure_seq_unique(
    client: &zk::Client,
    access: &ZookeeperAccess,
    cluster: &str,
    pods: &str,
    key: &str,
    mut drawn: i64,
    data: &[u8],
) -> Result<i64, ZnodeError> {
    loop {
        let children = client.list_children(pods).await.at(pods)?;
        let taken: BTreeSet<i64> = children
            .iter()
            .filter_map(|child| parse_child_name(child))
            .filter(|(owner, _)| *owner != key)
            .map(|(_, seq)| seq)
            .collect();
        if !taken.contains(&drawn) {
            return Ok(drawn);
        }

        let highest = taken.last().copied().unwrap_or(drawn);
        warn!(
            "cluster {cluster}: drawn seq {drawn} is held by another pod (the pods znode was \
             created anew); drawing another one above seq {highest}"
        );
        let own = format!("{pods}/{}", child_name(key, drawn));
        client
            .delete(&own, None)
            .await
            .or_else(ignore_no_node)
            .at(&own)?;
        // The counter is at drawn + 1 or more, so highest - drawn more creations pass highest.
        let steps = highest - drawn;
        if steps <= MAX_COUNTER_ADVANCE {
            advance_counter(client, access, pods, key, steps).await?;
        }
        drawn = create_sequential(client, access, pods, key, data).await?;
    }
}

/// Largest move of the `pods/` counter made to keep seqs growing, in counter steps.
const MAX_COUNTER_ADVANCE: i64 = 100_000;

/// Largest number of create and delete pairs sent in one multi request by `advance_counter`.
const ADVANCE_BATCH: i64 = 500;

/// Moves the sequence counter of `pods` forward by `steps`, creating and deleting a scratch
/// child `steps` times: ZooKeeper counts every creation of a child.
async fn advance_counter(
    client: &zk::Client,
    access: &ZookeeperAccess,
    pods: &str,
    key: &str,
    steps: i64,
) -> Result<(), ZnodeError> {
    let scratch = format!("{pods}/{key}.advance");
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(access.cluster_acls());
    let mut left = steps;
    while left > 0 {
        let pairs = left.min(ADVANCE_BATCH);
        let mut writer = client.new_multi_writer();
        for _ in 0..pairs {
            writer.add_create(&scratch, b"", &ephemeral).at(&scratch)?;
            writer.add_delete(&scratch, None).at(&scratch)?;
        }
        writer.commit().await.at(&scratch)?;
        left -= pairs;
    }
    Ok(())
}

/// Finds the seq of the pod's node among the children of `pods`.
async fn find_by_key(
    client: &zk::Client,
    pods: &str,
    key: &str,
) -> Result<Option<i64>, ZnodeError> {
    let children = client.list_children(pods).await.at(pods)?;
    Ok(children
        .iter()
        .filter_map(|child| parse_child_name(child))
        .find(|(owner, _)| *owner == key)
        .map(|(_, seq)| seq))
}

fn ignore_no_node(err: zk::Error) -> Result<(), zk::Error> {
    match err {
        zk::Error::NoNode => Ok(()),
        err => Err(err),
    }
}
