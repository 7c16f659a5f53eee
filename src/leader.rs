//! The leader actor: while this pod holds the cluster's lock, it watches the cluster and its
//! dependencies and drives configuration rounds over every pod.
//!
//! Reactive model: nothing polls. A ZooKeeper watch on `pods/` and on each dependency's
//! `snapshot` (plus the cluster list when a dependency has wildcards) wakes the actor. It then
//! computes the hash of (pods, dependency snapshots) and compares it with the stored `hash`.
//! Equal means nothing to do. Different means a round is pending; it starts when the damper
//! expires, unless the hash came back to the stored value first. Changes that arrive during a
//! round are coalesced into one next round.
//!
//! A round: `check` every pod, drop the pods that answer 410 (dead), abort on any other
//! failure; with `full_shutdown` turn every pod `off`; `on` every pod; `ok` every pod; then
//! write `snapshot` and `hash`. Every request carries the leader's epoch for fencing.
//!
//! Leadership is a lease as well as a lock: the actor confirms its session with a `sync` every
//! seventh of the session timeout, and holds the lead for two thirds of the timeout after the
//! last confirmed request. ZooKeeper cannot expire the session, and so elect another leader,
//! before a full timeout after that request. A leader that was frozen (SIGSTOP, a long pause)
//! or cut off therefore stops starting rounds and sending requests, and `/info` stops
//! reporting it as leader, before any other pod can lead, even before it hears from
//! ZooKeeper that its session is gone.
//!
//! Registrations are cached by child name: a watch event reads only the children not seen
//! before, so a growing cluster costs one read per new pod, not one per pod per change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::stream::{self, StreamExt};
use log::{debug, error, info, warn};
use zookeeper_client as zk;

use crate::acl::{self, AtZnode, ZnodeError, ZookeeperAccess};
use crate::cluster::{Cluster, Pods};
use crate::control;
use crate::election::LeadershipEvent;
use crate::layout;
use crate::lifecycle::Verb;
use crate::plan::{self, Dependency};
use crate::registration::Registration;
use crate::session::UpdateStatus;
use crate::steps::Model;
use crate::telemetry::{Role, Telemetry};

/// Shortest wait before a failed round is tried again, so a damper of 0 does not spin.
const MIN_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Maximum wait between two attempts of a round that keeps failing over the same cluster
/// state. The wait doubles from the damper (at least `MIN_RETRY_DELAY`) up to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Delay before a failed ZooKeeper read of the leader is tried again, unless ZooKeeper denied
/// it (see [`acl::denied_retry_delay`]).
const READ_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Share of the negotiated session timeout the lead lasts after the last confirmed request.
const LEASE_SHARE: (u32, u32) = (2, 3);

/// Share of the negotiated session timeout between two lease renewals. The lease outlasts
/// three failed renewals in a row. The share is just below the 3/20 of the timeout after
/// which the ZooKeeper client pings an idle session, so each renewal replaces a ping. An idle
/// leader then sends 7 packets per session timeout, against 5 to 7 pings from a follower.
const RENEW_SHARE: (u32, u32) = (1, 7);

/// Control requests in flight at once during a parallel round.
const FAN_OUT: usize = 64;

/// A `pods/` child and the result of reading its data.
type FetchedChild = (String, Result<(Vec<u8>, zk::Stat), zk::Error>);

/// The leader's settings, fixed for the life of the actor.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// The cluster, `<namespace>.<cluster>`.
    pub cluster: String,
    pub namespace: String,
    pub depends_on: Vec<String>,
    pub damper: Duration,
    pub full_shutdown: bool,
    pub sequential: bool,
    pub control_timeout: Duration,
    pub probe_every: Duration,
    /// Shared token sent with every control request, when the cluster has one.
    pub token: Option<crate::settings::Token>,
    /// ACLs of the `snapshot` and `hash` znodes, and the explanation of a denied request.
    pub access: ZookeeperAccess,
}

/// The leader actor.
pub struct Leader {
    config: LeaderConfig,
    dependencies: Vec<Dependency>,
    model: Arc<dyn Model>,
    telemetry: Arc<Telemetry>,
    session: Recipient<UpdateStatus>,

    client: Option<zk::Client>,
    epoch: i64,
    /// Elected and connected: the only state in which rounds run.
    active: bool,
    /// Bumped on every election event, so that stale watches and replies are ignored.
    generation: u64,

    /// Registrations by `pods/` child name; `None` for a child whose data is not a registration.
    children: BTreeMap<String, Option<Registration>>,
    /// Snapshot of each dependency cluster, by its name in the view.
    snapshots: BTreeMap<String, Pods>,
    /// Hash stored in ZooKeeper at the last configuration.
    stored_hash: Option<String>,
    /// Whether the stored hash was read for the current lead.
    hash_known: bool,
    /// Whether `pods/` was listed for the current lead.
    pods_known: bool,
    /// Whether the dependencies were read for the current lead.
    dependencies_known: bool,
    /// Reads that ZooKeeper denied during the current lead, for the retry backoff.
    read_denials: u32,

    pending: Option<SpawnHandle>,
    /// Hash of the state the last round failed on, while its retry is pending.
    retry_for: Option<String>,
    /// Rounds failed in a row over the same state, for the retry backoff.
    failures: u32,
    round: Option<SpawnHandle>,
    /// A change arrived during the round: evaluate again when it ends.
    dirty: bool,
    /// The view of the last successful round, for the probe.
    last_view: Option<Cluster>,
}

impl Leader {
    pub fn new(
        config: LeaderConfig,
        model: Arc<dyn Model>,
        telemetry: Arc<Telemetry>,
        session: Recipient<UpdateStatus>,
    ) -> Self {
        let dependencies = config
            .depends_on
            .iter()
            .map(|spec| Dependency::parse(spec, &config.namespace))
            .collect();
        Leader {
            config,
            dependencies,
            model,
            telemetry,
            session,
            client: None,
            epoch: 0,
            active: false,
            generation: 0,
            children: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            stored_hash: None,
            hash_known: false,
            pods_known: false,
            dependencies_known: false,
            read_denials: 0,
            pending: None,
            retry_for: None,
            failures: 0,
            round: None,
            dirty: false,
            last_view: None,
        }
    }

    fn set_role(&self, role: Role) {
        self.telemetry.update(|facts| facts.role = role);
    }

    fn set_lease(&self, lease: Option<Instant>) {
        self.telemetry.update(|facts| facts.leader_lease = lease);
    }

    /// Logs a failed read (`action`, such as "list the pods") and returns the delay before it
    /// is tried again: `READ_RETRY_DELAY`, or the growing denial backoff when ZooKeeper denied
    /// the read.
    fn read_failed(&mut self, action: &str, err: &ZnodeError) -> Duration {
        match self
            .config
            .access
            .explain_denial(&err.error, Some(&err.path))
        {
            Some(explanation) => {
                self.read_denials = self.read_denials.saturating_add(1);
                let delay = acl::denied_retry_delay(self.read_denials);
                error!(
                    "cluster {}: cannot {action}: {explanation}; retrying in {} s",
                    self.config.cluster,
                    delay.as_secs()
                );
                delay
            }
            None => {
                warn!("cluster {}: cannot {action}: {err}", self.config.cluster);
                READ_RETRY_DELAY
            }
        }
    }

    /// Confirms the session with ZooKeeper and extends the lease from the moment the request
    /// was sent, then schedules the next renewal for the same lead.
    fn renew_lease(&mut self, ctx: &mut Context<Self>) {
        let (true, Some(client)) = (self.active, self.client.clone()) else {
            return;
        };
        let generation = self.generation;
        let timeout = client.session_timeout();
        let lease = timeout * LEASE_SHARE.0 / LEASE_SHARE.1;
        let every = timeout * RENEW_SHARE.0 / RENEW_SHARE.1;
        let path = layout::cluster(&self.config.cluster);
        let sent = Instant::now();
        let confirm = async move { client.sync(&path).await };

        ctx.spawn(confirm.into_actor(self).map(move |result, leader, ctx| {
            if generation != leader.generation {
                return;
            }
            match result {
                Ok(()) => leader.set_lease(Some(sent + lease)),
                Err(err) => debug!(
                    "cluster {}: lease not renewed: {err}",
                    leader.config.cluster
                ),
            }
            ctx.run_later(every, move |leader, ctx| {
                if generation == leader.generation {
                    leader.renew_lease(ctx);
                }
            });
        }));
    }

    /// Stops every timer, watch and round of the current lead.
    fn stand_down(&mut self, ctx: &mut Context<Self>) {
        self.active = false;
        self.generation += 1;
        if let Some(handle) = self.pending.take() {
            ctx.cancel_future(handle);
        }
        if let Some(handle) = self.round.take() {
            ctx.cancel_future(handle);
            warn!(
                "cluster {}: configuration round abandoned",
                self.config.cluster
            );
        }
        self.dirty = false;
        self.retry_for = None;
        self.failures = 0;
    }

    /// Arms every watch and reads the whole state anew: after an election or a resumed session.
    /// The lead counts only once ZooKeeper confirmed the session, so the lease starts expired.
    fn take_charge(&mut self, ctx: &mut Context<Self>) {
        self.active = true;
        self.set_lease(Some(Instant::now()));
        self.renew_lease(ctx);
        self.hash_known = false;
        self.pods_known = false;
        self.dependencies_known = self.dependencies.is_empty();
        self.read_denials = 0;
        self.read_hash(ctx);
        self.watch_pods(ctx);
        self.watch_dependencies(ctx);
    }

    fn read_hash(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let generation = self.generation;
        let path = layout::hash(&self.config.cluster);
        let snapshot = layout::snapshot(&self.config.cluster);
        let read = async move {
            match client.get_data(&path).await {
                Ok((data, _)) => Ok(StoredHash::Found(data)),
                Err(zk::Error::NoNode) => match client.check_stat(&snapshot).await.at(&snapshot)? {
                    Some(_) => Ok(StoredHash::Lost),
                    None => Ok(StoredHash::Never),
                },
                Err(err) => Err(err).at(&path),
            }
        };

        ctx.spawn(read.into_actor(self).map(move |result, leader, ctx| {
            if generation != leader.generation {
                return;
            }
            match result {
                Ok(StoredHash::Found(data)) => {
                    let hash = String::from_utf8_lossy(&data).trim().to_string();
                    leader.stored_hash = (!hash.is_empty()).then_some(hash);
                }
                Ok(StoredHash::Never) => leader.stored_hash = None,
                Ok(StoredHash::Lost) => {
                    warn!(
                        "cluster {}: the stored hash is missing beside a snapshot; \
                         configuring the cluster to write it again",
                        leader.config.cluster
                    );
                    leader.stored_hash = None;
                }
                Err(err) => {
                    let delay = leader.read_failed("read the stored hash", &err);
                    ctx.run_later(delay, move |leader, ctx| {
                        if generation == leader.generation {
                            leader.read_hash(ctx);
                        }
                    });
                    return;
                }
            }
            leader.hash_known = true;
            leader.evaluate(ctx);
        }));
    }

    /// Lists `pods/` with a watch, reads the new children, and evaluates.
    fn watch_pods(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let generation = self.generation;
        let directory = layout::pods(&self.config.cluster);
        let known: BTreeSet<String> = self.children.keys().cloned().collect();

        let read = async move {
            let (children, watcher) = client
                .list_and_watch_children(&directory)
                .await
                .at(&directory)?;
            let new: Vec<String> = children
                .iter()
                .filter(|child| !known.contains(*child))
                .cloned()
                .collect();
            let reads = new.into_iter().map(|child| {
                let client = client.clone();
                let path = format!("{directory}/{child}");
                async move { (child, client.get_data(&path).await) }
            });
            let fetched: Vec<_> = stream::iter(reads)
                .buffer_unordered(FAN_OUT)
                .collect()
                .await;
            Ok::<_, ZnodeError>((children, fetched, watcher))
        };

        ctx.spawn(read.into_actor(self).map(move |result, leader, ctx| {
            if generation != leader.generation {
                return;
            }
            match result {
                Ok((children, fetched, watcher)) => {
                    leader.merge_children(children, fetched);
                    leader.pods_known = true;
                    leader.on_change(watcher, ctx, Self::watch_pods);
                    leader.evaluate(ctx);
                }
                Err(err) => {
                    let delay = leader.read_failed("list the pods", &err);
                    ctx.run_later(delay, move |leader, ctx| {
                        if generation == leader.generation {
                            leader.watch_pods(ctx);
                        }
                    });
                }
            }
        }));
    }

    fn merge_children(&mut self, children: Vec<String>, fetched: Vec<FetchedChild>) {
        let present: BTreeSet<String> = children.into_iter().collect();
        self.children.retain(|child, _| present.contains(child));

        for (child, result) in fetched {
            match result {
                Ok((data, _)) => match serde_json::from_slice::<Registration>(&data) {
                    Ok(registration) => {
                        self.children.insert(child, Some(registration));
                    }
                    Err(err) => {
                        warn!(
                            "cluster {}: skipping pods/{child}: not a registration ({err})",
                            self.config.cluster
                        );
                        self.children.insert(child, None);
                    }
                },
                // Gone between the listing and the read: the next watch event drops it.
                Err(zk::Error::NoNode) => {}
                Err(err) => {
                    let path = format!("{}/{child}", layout::pods(&self.config.cluster));
                    match self.config.access.explain_denial(&err, Some(&path)) {
                        Some(explanation) => error!(
                            "cluster {}: skipping pods/{child}: {explanation}",
                            self.config.cluster
                        ),
                        None => warn!(
                            "cluster {}: cannot read pods/{child}: {err}",
                            self.config.cluster
                        ),
                    }
                }
            }
        }
    }

    /// Re-runs `rearm` when `watcher` fires, unless the lead changed in between.
    fn on_change(
        &mut self,
        watcher: zk::OneshotWatcher,
        ctx: &mut Context<Self>,
        rearm: fn(&mut Self, &mut Context<Self>),
    ) {
        let generation = self.generation;
        ctx.spawn(
            watcher
                .changed()
                .into_actor(self)
                .map(move |event, leader, ctx| {
                    if generation != leader.generation || event.event_type == zk::EventType::Session
                    {
                        return;
                    }
                    debug!(
                        "cluster {}: {:?} on {}",
                        leader.config.cluster, event.event_type, event.path
                    );
                    rearm(leader, ctx);
                }),
        );
    }

    /// Resolves the dependencies, reads their snapshots with watches, and evaluates.
    fn watch_dependencies(&mut self, ctx: &mut Context<Self>) {
        if self.dependencies.is_empty() {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let generation = self.generation;
        let dependencies = self.dependencies.clone();
        let namespace = self.config.namespace.clone();
        let own = self.config.cluster.clone();

        let read = async move {
            let mut watchers = Vec::new();
            let mut clusters = Vec::new();
            if dependencies.iter().any(|dependency| dependency.wildcard) {
                match client.list_and_watch_children(layout::CLUSTERS).await {
                    Ok((children, watcher)) => {
                        clusters = children;
                        watchers.push(watcher);
                    }
                    Err(zk::Error::NoNode) => {
                        let (_, watcher) = client
                            .check_and_watch_stat(layout::CLUSTERS)
                            .await
                            .at(layout::CLUSTERS)?;
                        watchers.push(watcher);
                    }
                    Err(err) => return Err(err).at(layout::CLUSTERS),
                }
            }

            let mut snapshots = BTreeMap::new();
            let resolved: BTreeSet<String> = dependencies
                .iter()
                .flat_map(|dependency| dependency.resolve(&clusters))
                .filter(|name| *name != own)
                .collect();
            for qualified in resolved {
                let path = layout::snapshot(&qualified);
                let name = plan::dependency_name(&qualified, &namespace);
                match client.get_and_watch_data(&path).await {
                    Ok((data, _, watcher)) => {
                        watchers.push(watcher);
                        match serde_json::from_slice::<Pods>(&data) {
                            Ok(pods) => {
                                snapshots.insert(name, pods);
                            }
                            Err(err) => warn!("dependency {qualified}: snapshot is not valid JSON ({err}), ignoring it"),
                        }
                    }
                    Err(zk::Error::NoNode) => {
                        // Not configured yet: watch for its snapshot to appear.
                        let (stat, watcher) = client.check_and_watch_stat(&path).await.at(&path)?;
                        watchers.push(watcher);
                        if stat.is_some() {
                            // Created between the two requests: the watch fires on the next
                            // change, so read again at once.
                            return Err(zk::Error::NoNode).at(&path);
                        }
                    }
                    Err(err) => return Err(err).at(&path),
                }
            }
            Ok((snapshots, watchers))
        };

        ctx.spawn(read.into_actor(self).map(move |result, leader, ctx| {
            if generation != leader.generation {
                return;
            }
            match result {
                Ok((snapshots, watchers)) => {
                    leader.snapshots = snapshots;
                    leader.dependencies_known = true;
                    leader.watch_any(watchers, ctx);
                    leader.evaluate(ctx);
                }
                // Only a snapshot created between its read and its watch ends the read with
                // `NoNode`: nothing failed, so read again at once.
                Err(ZnodeError {
                    error: zk::Error::NoNode,
                    ..
                }) => {
                    debug!(
                        "cluster {}: a dependency snapshot appeared during the read; reading again",
                        leader.config.cluster
                    );
                    leader.watch_dependencies(ctx);
                }
                Err(err) => {
                    let delay = leader.read_failed("read the dependencies", &err);
                    ctx.run_later(delay, move |leader, ctx| {
                        if generation == leader.generation {
                            leader.watch_dependencies(ctx);
                        }
                    });
                }
            }
        }));
    }

    /// Re-reads the dependencies when the first of `watchers` fires.
    fn watch_any(&mut self, watchers: Vec<zk::OneshotWatcher>, ctx: &mut Context<Self>) {
        if watchers.is_empty() {
            return;
        }
        let generation = self.generation;
        let first = futures::future::select_all(
            watchers
                .into_iter()
                .map(|watcher| Box::pin(watcher.changed())),
        );
        ctx.spawn(
            first
                .into_actor(self)
                .map(move |(event, _, _), leader, ctx| {
                    if generation != leader.generation || event.event_type == zk::EventType::Session
                    {
                        return;
                    }
                    debug!(
                        "cluster {}: dependency {:?} on {}",
                        leader.config.cluster, event.event_type, event.path
                    );
                    leader.watch_dependencies(ctx);
                }),
        );
    }

    fn current_pods(&self) -> Pods {
        let registered: BTreeMap<String, Registration> = self
            .children
            .iter()
            .filter_map(|(child, registration)| {
                registration
                    .clone()
                    .map(|registration| (child.clone(), registration))
            })
            .collect();
        plan::pods_by_key(&registered)
    }

    /// Compares the current state with the stored hash and schedules a round when they differ.
    fn evaluate(&mut self, ctx: &mut Context<Self>) {
        // Judge only a complete picture: a partial one would look like a change.
        if !self.active || !self.hash_known || !self.pods_known || !self.dependencies_known {
            return;
        }
        if self.round.is_some() {
            self.dirty = true;
            return;
        }
        let hash = plan::state_hash(&self.current_pods(), &self.snapshots);
        if self.stored_hash.as_deref() == Some(hash.as_str()) {
            if let Some(handle) = self.pending.take() {
                ctx.cancel_future(handle);
                info!(
                    "cluster {}: change reverted within the damper, no configuration",
                    self.config.cluster
                );
            }
            self.set_role(Role::Leader);
            return;
        }
        if self.pending.is_some() {
            // A retry waits out its backoff only while the state is the one that failed.
            match &self.retry_for {
                Some(failed) if *failed != hash => {
                    if let Some(handle) = self.pending.take() {
                        ctx.cancel_future(handle);
                    }
                    self.retry_for = None;
                    self.failures = 0;
                }
                _ => return,
            }
        }
        info!(
            "cluster {}: change detected, configuring in {:.1} s",
            self.config.cluster,
            self.config.damper.as_secs_f64()
        );
        self.set_role(Role::LeaderPending);
        self.pending = Some(ctx.run_later(self.config.damper, |leader, ctx| {
            leader.pending = None;
            leader.start_round(ctx);
        }));
    }

    fn start_round(&mut self, ctx: &mut Context<Self>) {
        if !self.active {
            return;
        }
        let pods = self.current_pods();
        let dependencies = self.snapshots.clone();
        let hash = plan::state_hash(&pods, &dependencies);
        if self.stored_hash.as_deref() == Some(hash.as_str()) {
            self.set_role(Role::Leader);
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        if !leading(&self.telemetry) {
            // The lease ended: wait for the next renewal rather than act on an old lead.
            info!(
                "cluster {}: lead not confirmed by ZooKeeper, configuration deferred",
                self.config.cluster
            );
            self.pending = Some(ctx.run_later(MIN_RETRY_DELAY, |leader, ctx| {
                leader.pending = None;
                leader.start_round(ctx);
            }));
            return;
        }

        self.set_role(Role::LeaderConfiguring);
        info!(
            "cluster {}: configuration round starting over {} pods",
            self.config.cluster,
            pods.len()
        );
        let started = Instant::now();
        let generation = self.generation;
        let round = Round {
            telemetry: self.telemetry.clone(),
            // A client per round: its pooled connections to the pods close when the round
            // ends, instead of lingering half-closed after the pods' keep-alive expires, one
            // descriptor per pod, until the next round.
            http: awc::Client::default(),
            epoch: self.epoch,
            config: self.config.clone(),
            dependencies,
        };
        let cluster = self.config.cluster.clone();
        let access = self.config.access.clone();

        let work = async move {
            let configured = match round.run(pods).await {
                Ok(configured) => configured,
                Err(reason) => return Err((reason, hash)),
            };
            if let Err(err) = write_outcome(&client, &access, &cluster, &configured, &hash).await {
                let reason = access
                    .explain_denial(&err.error, Some(&err.path))
                    .unwrap_or_else(|| err.to_string());
                return Err((
                    format!("cannot write the snapshot and hash: {reason}"),
                    hash,
                ));
            }
            Ok((configured, hash))
        };

        self.round = Some(ctx.spawn(work.into_actor(self).map(move |result, leader, ctx| {
            if generation != leader.generation {
                return;
            }
            leader.round = None;
            let elapsed = started.elapsed();
            match result {
                Ok((configured, hash)) => {
                    Telemetry::count(&leader.telemetry.rounds);
                    info!(
                        "cluster {}: configuration round done over {} pods in {} ms",
                        leader.config.cluster,
                        configured.len(),
                        elapsed.as_millis()
                    );
                    leader.stored_hash = Some(hash);
                    leader.failures = 0;
                    leader.retry_for = None;
                    leader.last_view = Some(plan::view_for("", &configured, &leader.snapshots));
                    leader.set_role(Role::Leader);
                    leader.dirty = false;
                    leader.evaluate(ctx);
                }
                Err((reason, hash)) => {
                    Telemetry::count(&leader.telemetry.failed_rounds);
                    if leader.retry_for.as_deref() != Some(hash.as_str()) {
                        leader.failures = 0;
                    }
                    let delay = retry_delay(leader.config.damper, leader.failures);
                    leader.failures = leader.failures.saturating_add(1);
                    leader.retry_for = Some(hash);
                    error!(
                        "cluster {}: configuration round failed after {} ms: {reason}; retrying in {:.1} s",
                        leader.config.cluster,
                        elapsed.as_millis(),
                        delay.as_secs_f64()
                    );
                    leader.set_role(Role::LeaderPending);
                    leader.dirty = false;
                    leader.pending = Some(ctx.run_later(delay, |leader, ctx| {
                        leader.pending = None;
                        leader.start_round(ctx);
                    }));
                }
            }
        })));
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        if !self.active || self.round.is_some() {
            return;
        }
        let Some(view) = self.last_view.clone() else {
            return;
        };
        let model = self.model.clone();
        let generation = self.generation;
        let probe = async move { model.probe(&view).await };
        ctx.spawn(probe.into_actor(self).map(move |result, leader, _| {
            if generation != leader.generation {
                return;
            }
            let status = match result {
                Ok(status) => status,
                Err(err) => {
                    warn!("cluster {}: probe failed: {err}", leader.config.cluster);
                    format!("* {err}")
                }
            };
            leader
                .telemetry
                .update(|facts| facts.registration.status = status.clone());
            leader.session.do_send(UpdateStatus(status));
        }));
    }
}

impl Actor for Leader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if !self.config.probe_every.is_zero() {
            ctx.run_interval(self.config.probe_every, |leader, ctx| leader.probe(ctx));
        }
    }
}

impl Handler<LeadershipEvent> for Leader {
    type Result = ();

    fn handle(&mut self, event: LeadershipEvent, ctx: &mut Self::Context) {
        self.stand_down(ctx);
        match event {
            LeadershipEvent::Elected { epoch, client } => {
                self.set_role(Role::Leader);
                self.epoch = epoch;
                self.client = Some(client);
                self.children.clear();
                self.snapshots.clear();
                self.last_view = None;
                self.take_charge(ctx);
            }
            LeadershipEvent::Resumed { client } => {
                self.client = Some(client);
                self.set_role(Role::Leader);
                self.take_charge(ctx);
            }
            LeadershipEvent::Suspended => {
                // Another pod may lead by the time the session resumes: report none meanwhile.
                self.set_role(Role::Follower);
                info!(
                    "cluster {}: leader suspended, no configuration until the session resumes",
                    self.config.cluster
                );
            }
            LeadershipEvent::Deposed => {
                self.set_lease(None);
                self.client = None;
                self.children.clear();
                self.snapshots.clear();
                self.stored_hash = None;
                self.last_view = None;
            }
        }
    }
}

/// The `hash` znode as a new lead finds it.
enum StoredHash {
    Found(Vec<u8>),
    /// Neither hash nor snapshot: the cluster was never configured.
    Never,
    /// A snapshot without a hash: the hash was deleted by hand or lost.
    Lost,
}

/// Returns whether this pod leads now: elected, not suspended, and within its lease.
fn leading(telemetry: &Telemetry) -> bool {
    telemetry.facts().role.is_leader()
}

/// Returns the wait before retrying a round that failed `failures` times in a row before: the
/// damper (at least `MIN_RETRY_DELAY`), doubled per earlier failure, at most `MAX_RETRY_DELAY`.
fn retry_delay(damper: Duration, failures: u32) -> Duration {
    let base = damper.max(MIN_RETRY_DELAY);
    base.saturating_mul(1 << failures.min(16))
        .min(MAX_RETRY_DELAY.max(base))
}

/// One configuration round, detached from the actor so it can run as a plain future.
struct Round {
    /// Checked before every request: a round resumed after the lead ended sends nothing.
    telemetry: Arc<Telemetry>,
    http: awc::Client,
    epoch: i64,
    config: LeaderConfig,
    dependencies: BTreeMap<String, Pods>,
}

impl Round {
    /// Runs the round over `pods` and returns the pods it configured.
    async fn run(&self, mut pods: Pods) -> Result<Pods, String> {
        let replies = self.phase(Verb::Check, &pods).await;
        for (key, reply) in replies {
            match reply {
                Ok(200) => {}
                Ok(410) => {
                    info!(
                        "cluster {}: dropping dead pod {key} from the round",
                        self.config.cluster
                    );
                    pods.remove(&key);
                }
                Ok(status) => return Err(format!("pod {key} answered {status} to check")),
                Err(err) => return Err(format!("pod {key} did not answer check: {err}")),
            }
        }

        if self.config.full_shutdown {
            self.require(Verb::Off, &pods).await?;
        }
        self.require(Verb::On, &pods).await?;

        for (key, reply) in self.phase(Verb::Ok, &pods).await {
            match reply {
                Ok(200) => {}
                Ok(status) => warn!(
                    "cluster {}: pod {key} answered {status} to ok",
                    self.config.cluster
                ),
                Err(err) => warn!(
                    "cluster {}: pod {key} did not answer ok: {err}",
                    self.config.cluster
                ),
            }
        }
        Ok(pods)
    }

    /// Sends `verb` to every pod and fails unless every reply is 200.
    async fn require(&self, verb: Verb, pods: &Pods) -> Result<(), String> {
        for (key, reply) in self.phase(verb, pods).await {
            match reply {
                Ok(200) => {}
                Ok(status) => {
                    return Err(format!("pod {key} answered {status} to {}", verb.as_str()))
                }
                Err(err) => {
                    return Err(format!("pod {key} did not answer {}: {err}", verb.as_str()))
                }
            }
        }
        Ok(())
    }

    /// Sends `verb` to every pod, in parallel or one by one, and returns each HTTP status.
    async fn phase(&self, verb: Verb, pods: &Pods) -> Vec<(String, Result<u16, String>)> {
        let views = plan::ViewBodies::new(pods, &self.dependencies);
        let credentials = control::Credentials {
            epoch: Some(self.epoch),
            token: self.config.token.clone(),
        };
        let requests = pods.iter().map(|(key, pod)| {
            let address = pod.control_address();
            let key = key.clone();
            let views = &views;
            let credentials = &credentials;
            async move {
                if !leading(&self.telemetry) {
                    return (key, Err("no longer the leader".to_string()));
                }
                let body = control::JsonBody::from_json_bytes(views.for_pod(&key));
                let reply = control::send(
                    &self.http,
                    &address,
                    verb,
                    self.config.control_timeout,
                    credentials,
                    body,
                )
                .await
                .map(|(status, _)| status)
                .map_err(|err| err.to_string());
                (key, reply)
            }
        });
        let concurrency = if self.config.sequential { 1 } else { FAN_OUT };
        stream::iter(requests).buffered(concurrency).collect().await
    }
}

/// Writes the snapshot (configured pods by key) and the hash of the configured state in one
/// transaction, so that no reader (dependents, the next leader) reads one without the other.
async fn write_outcome(
    client: &zk::Client,
    access: &ZookeeperAccess,
    cluster: &str,
    pods: &Pods,
    hash: &str,
) -> Result<(), ZnodeError> {
    let snapshot = serde_json::to_vec(pods).expect("pods always serialize");
    let (snapshot_path, hash_path) = (layout::snapshot(cluster), layout::hash(cluster));
    ensure_node(client, access, &snapshot_path, &snapshot).await?;
    ensure_node(client, access, &hash_path, hash.as_bytes()).await?;

    let mut writer = client.new_multi_writer();
    writer
        .add_set_data(&snapshot_path, &snapshot, None)
        .at(&snapshot_path)?;
    writer
        .add_set_data(&hash_path, hash.as_bytes(), None)
        .at(&hash_path)?;
    match writer.commit().await {
        Ok(_) => Ok(()),
        // The operations are in this order: the index names the znode that failed.
        Err(zk::MultiWriteError::OperationFailed { index: 1, source }) => {
            Err(source).at(&hash_path)
        }
        Err(err) => Err(err).at(&snapshot_path),
    }
}

/// Creates a persistent node holding `data` unless it exists.
async fn ensure_node(
    client: &zk::Client,
    access: &ZookeeperAccess,
    path: &str,
    data: &[u8],
) -> Result<(), ZnodeError> {
    let options = zk::CreateMode::Persistent.with_acls(access.cluster_acls());
    match client.create(path, data, &options).await {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
        Err(err) => Err(err).at(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_limit() {
        let no_damper = Duration::ZERO;
        assert_eq!(retry_delay(no_damper, 0), Duration::from_secs(1));
        assert_eq!(retry_delay(no_damper, 1), Duration::from_secs(2));
        assert_eq!(retry_delay(no_damper, 3), Duration::from_secs(8));
        assert_eq!(retry_delay(no_damper, 10), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(no_damper, u32::MAX), MAX_RETRY_DELAY);
        assert_eq!(
            retry_delay(Duration::from_secs(5), 0),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(90), 2),
            Duration::from_secs(90)
        );
    }
}
