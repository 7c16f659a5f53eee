//! The election actor: takes part in electing one leader per cluster with the ZooKeeper lock
//! recipe, and notifies the leader actor when this pod gains, suspends, resumes or loses the lead.
//!
//! Each pod creates an ephemeral sequential node under `coordinator/`; the lowest sequence
//! number holds the lock. A waiter watches only the node just below its own, so the death of a
//! leader wakes one pod instead of the whole cluster. The winner's epoch comes from its
//! sequence number: it grows with every new lock node, so pods can fence off requests from an
//! older leader. The epoch also carries the creation time of `coordinator/` (see [`epoch`]). The
//! sequence numbers start again from 0 when that znode is created anew, because ZooKeeper lost
//! its data or an operator deleted the cluster, while the pods still remember the epochs of the
//! lost state.
//!
//! While the session is disconnected a leader must assume it may have lost the lock, so the
//! leader actor is suspended. When the same session resumes, the lock node is read again and
//! its owner compared with the current session before the lead is resumed. A lost session
//! always deposes.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, error, info, warn};
use zookeeper_client as zk;

use crate::acl::{self, ZookeeperAccess};
use crate::layout;
use crate::session::SessionEvent;
use crate::telemetry::{Role, Telemetry};

/// Delay before a failed ZooKeeper request of the election is tried again, unless ZooKeeper
/// denied it (see [`acl::denied_retry_delay`]).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Leadership change sent by the election to the leader actor.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub enum LeadershipEvent {
    /// This pod holds the lock; `epoch` is its fencing token (see [`epoch`]).
    Elected { epoch: i64, client: zk::Client },
    /// The session is disconnected: stop driving configuration until `Resumed` or `Deposed`.
    Suspended,
    /// The session is back and the lock node is still ours: re-arm every watch and re-read.
    Resumed { client: zk::Client },
    /// This pod no longer holds the lock.
    Deposed,
}

/// Deletes the lock node and leaves the election, for a graceful shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resign;

/// The election actor.
pub struct Election {
    cluster: String,
    key: String,
    /// ACLs of the lock nodes, and the explanation of a denied request.
    access: ZookeeperAccess,
    client: Option<zk::Client>,
    /// Name of this pod's node under `coordinator/` and its sequence number.
    lock: Option<(String, i64)>,
    /// Whether a `create` of the lock node may have succeeded without its reply reaching us.
    create_sent: bool,
    /// Requests that ZooKeeper denied in a row, for the retry backoff.
    denials: u32,
    leading: bool,
    resigned: bool,
    /// Bumped whenever the session changes, so that stale watches and replies are ignored.
    generation: u64,
    leader: Recipient<LeadershipEvent>,
    telemetry: Arc<Telemetry>,
}

impl Election {
    pub fn new(
        cluster: String,
        key: String,
        access: ZookeeperAccess,
        leader: Recipient<LeadershipEvent>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Election {
            cluster,
            key,
            access,
            client: None,
            lock: None,
            create_sent: false,
            denials: 0,
            leading: false,
            resigned: false,
            generation: 0,
            leader,
            telemetry,
        }
    }

    fn prefix(&self) -> String {
        format!("{}-lock-", self.key)
    }

    fn depose(&mut self, reason: &str) {
        if self.leading {
            self.leading = false;
            info!("cluster {}: no longer the leader ({reason})", self.cluster);
            self.telemetry.update(|facts| facts.role = Role::Follower);
            self.leader.do_send(LeadershipEvent::Deposed);
        }
    }

    fn retry(&mut self, ctx: &mut Context<Self>, what: &str, err: zk::Error) {
        match err {
            zk::Error::SessionExpired | zk::Error::ClientClosed => {
                debug!(
                    "cluster {}: election request stopped by the end of its session",
                    self.cluster
                )
            }
            err => {
                // Every request of the election is about the lock nodes under `coordinator`.
                let directory = layout::coordinator(&self.cluster);
                let delay = match self.access.explain_denial(&err, Some(&directory)) {
                    Some(explanation) => {
                        self.denials = self.denials.saturating_add(1);
                        let delay = acl::denied_retry_delay(self.denials);
                        error!(
                            "cluster {}: election {what} failed: {explanation}; retrying in {} s \
                             (denial {} in a row)",
                            self.cluster,
                            delay.as_secs(),
                            self.denials
                        );
                        delay
                    }
                    None => {
                        warn!(
                            "cluster {}: election {what} failed: {err}; retrying in {RETRY_DELAY:?}",
                            self.cluster
                        );
                        RETRY_DELAY
                    }
                };
                let generation = self.generation;
                ctx.run_later(delay, move |election, ctx| {
                    if election.generation == generation {
                        election.acquire(ctx);
                    }
                });
            }
        }
    }

    /// Creates this pod's lock node (or finds it), then checks who holds the lock.
    fn acquire(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        if self.lock.is_some() {
            self.check(ctx);
            return;
        }

        let generation = self.generation;
        let directory = layout::coordinator(&self.cluster);
        let prefix = self.prefix();
        let search_first = self.create_sent;
        self.create_sent = true;
        let acls = self.access.cluster_acls();

        let attempt = async move {
            if search_first {
                let children = client.list_children(&directory).await?;
                if let Some(found) = children
                    .into_iter()
                    .find(|child| child.starts_with(&prefix))
                {
                    if let Some(seq) = lock_sequence(&found) {
                        return Ok((found, seq));
                    }
                }
            }
            let options = zk::CreateMode::EphemeralSequential.with_acls(acls);
            let (_, sequence) = client
                .create(&format!("{directory}/{prefix}"), b"", &options)
                .await?;
            let seq = sequence.into_i64();
            Ok::<_, zk::Error>((format!("{prefix}{sequence}"), seq))
        };

        ctx.spawn(attempt.into_actor(self).map(move |result, election, ctx| {
            if generation != election.generation {
                return;
            }
            match result {
                Ok(lock) => {
                    debug!("cluster {}: lock node {} created", election.cluster, lock.0);
                    election.create_sent = false;
                    election.denials = 0;
                    election.lock = Some(lock);
                    election.check(ctx);
                }
                Err(err) => election.retry(ctx, "lock creation", err),
            }
        }));
    }

    /// Lists the lock nodes: the lowest one leads, any other pod watches its predecessor.
    fn check(&mut self, ctx: &mut Context<Self>) {
        let (Some(client), Some((name, seq))) = (self.client.clone(), self.lock.clone()) else {
            return;
        };
        let generation = self.generation;
        let directory = layout::coordinator(&self.cluster);

        let attempt = async move {
            let (children, stat) = client.get_children(&directory).await?;
            let mut locks: Vec<(i64, String)> = children
                .into_iter()
                .filter_map(|child| lock_sequence(&child).map(|seq| (seq, child)))
                .collect();
            locks.sort();

            if !locks.iter().any(|(_, child)| *child == name) {
                return Ok(Standing::Lost);
            }
            let Some((_, predecessor)) = locks
                .into_iter()
                .take_while(|(other, _)| *other < seq)
                .last()
            else {
                return Ok(Standing::Lowest(epoch(stat.ctime, seq)));
            };
            let path = format!("{directory}/{predecessor}");
            match client.check_and_watch_stat(&path).await? {
                (Some(_), watcher) => Ok(Standing::Waiting(predecessor, watcher)),
                (None, _) => Ok(Standing::Recheck),
            }
        };

        ctx.spawn(attempt.into_actor(self).map(move |result, election, ctx| {
            if generation != election.generation {
                return;
            }
            match result {
                Ok(Standing::Lowest(epoch)) => election.lead(epoch),
                Ok(Standing::Recheck) => election.check(ctx),
                Ok(Standing::Lost) => {
                    warn!(
                        "cluster {}: lock node vanished, creating a new one",
                        election.cluster
                    );
                    election.lock = None;
                    election.depose("lock node vanished");
                    election.acquire(ctx);
                }
                Ok(Standing::Waiting(predecessor, watcher)) => {
                    election.depose("another pod holds a lower lock node");
                    debug!(
                        "cluster {}: waiting for lock node {predecessor} to go",
                        election.cluster
                    );
                    election.wait_for(watcher, ctx);
                }
                Err(err) => election.retry(ctx, "lock check", err),
            }
        }));
    }

    fn wait_for(&mut self, watcher: zk::OneshotWatcher, ctx: &mut Context<Self>) {
        let generation = self.generation;
        ctx.spawn(
            watcher
                .changed()
                .into_actor(self)
                .map(move |_, election, ctx| {
                    if generation == election.generation {
                        election.check(ctx);
                    }
                }),
        );
    }

    fn lead(&mut self, epoch: i64) {
        if self.leading {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        self.leading = true;
        info!(
            "cluster {}: elected leader with epoch {epoch}",
            self.cluster
        );
        self.telemetry.update(|facts| facts.role = Role::Leader);
        self.leader
            .do_send(LeadershipEvent::Elected { epoch, client });
    }

    /// After the session resumed: confirms the lock node is still ours before resuming the lead.
    fn verify(&mut self, ctx: &mut Context<Self>) {
        let (Some(client), Some((name, _))) = (self.client.clone(), self.lock.clone()) else {
            self.acquire(ctx);
            return;
        };
        let generation = self.generation;
        let path = format!("{}/{name}", layout::coordinator(&self.cluster));

        let attempt = async move {
            let stat = client.check_stat(&path).await?;
            Ok::<_, zk::Error>(
                stat.is_some_and(|stat| stat.ephemeral_owner == client.session_id().0),
            )
        };

        ctx.spawn(attempt.into_actor(self).map(move |result, election, ctx| {
            if generation != election.generation {
                return;
            }
            match result {
                Ok(true) => {
                    if election.leading {
                        if let Some(client) = election.client.clone() {
                            info!(
                                "cluster {}: lock node {name} still held, resuming the lead",
                                election.cluster
                            );
                            election.leader.do_send(LeadershipEvent::Resumed { client });
                        }
                    }
                    election.check(ctx);
                }
                Ok(false) => {
                    election.lock = None;
                    election.depose("lock node lost while disconnected");
                    election.acquire(ctx);
                }
                Err(err) => election.retry(ctx, "lock verification", err),
            }
        }));
    }
}

/// Outcome of a lock check.
enum Standing {
    /// Our node is the lowest: we lead with this epoch.
    Lowest(i64),
    /// Another node is below ours: wait for it to go.
    Waiting(String, zk::OneshotWatcher),
    /// The predecessor vanished between the listing and the watch: list again.
    Recheck,
    /// Our node is gone.
    Lost,
}

/// Lock sequence numbers per second of `coordinator/` creation time in an epoch.
const EPOCH_SEQUENCE_SPAN: i64 = 1_000_000_000;

/// Returns the epoch of the leader holding lock node `seq` under a `coordinator/` znode created
/// at `created_ms` (ZooKeeper `ctime`, ms since 1970). It is the creation time in seconds
/// followed by nine decimal digits of the sequence number, so that it reads as both.
///
/// Within one `coordinator/` znode the epoch grows with the sequence number. When the znode is
/// created anew, its later creation time puts every new epoch above the old ones, which pods
/// may still remember. This holds as long as the ZooKeeper servers' clocks do not go back by
/// more than the age of the old znode, and a cluster creates fewer than 10^9 lock nodes.
pub fn epoch(created_ms: i64, seq: i64) -> i64 {
    (created_ms / 1000) * EPOCH_SEQUENCE_SPAN + seq
}

/// Returns the sequence number of a lock node name (`<key>-lock-<seq>`).
fn lock_sequence(name: &str) -> Option<i64> {
    name.rsplit_once("-lock-")
        .and_then(|(_, seq)| seq.parse().ok())
}

impl Actor for Election {
    type Context = Context<Self>;
}

impl Handler<SessionEvent> for Election {
    type Result = ();

    fn handle(&mut self, event: SessionEvent, ctx: &mut Self::Context) {
        if self.resigned {
            return;
        }
        self.generation += 1;
        match event {
            SessionEvent::Registered { client } => {
                self.client = Some(client);
                self.lock = None;
                self.create_sent = false;
                self.denials = 0;
                self.depose("new session");
                self.acquire(ctx);
            }
            SessionEvent::Suspended => {
                if self.leading {
                    info!(
                        "cluster {}: leadership suspended while ZooKeeper is unreachable",
                        self.cluster
                    );
                    self.leader.do_send(LeadershipEvent::Suspended);
                }
            }
            SessionEvent::Resumed { client } => {
                self.client = Some(client);
                self.verify(ctx);
            }
            SessionEvent::Lost => {
                self.client = None;
                self.lock = None;
                self.create_sent = false;
                self.depose("session lost");
            }
        }
    }
}

impl Handler<Resign> for Election {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Resign, _: &mut Self::Context) -> Self::Result {
        self.resigned = true;
        self.generation += 1;
        self.depose("shutting down");
        let client = self.client.take();
        let lock = self.lock.take();
        let directory = layout::coordinator(&self.cluster);
        Box::pin(
            async move {
                if let (Some(client), Some((name, _))) = (client, lock) {
                    let path = format!("{directory}/{name}");
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), client.delete(&path, None))
                            .await;
                }
            }
            .into_actor(self),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_grows_with_sequence_then_creation_time() {
        let created = 1_764_880_000_123;
        assert_eq!(epoch(created, 7), 1_764_880_000_000_000_007);
        assert!(epoch(created, 8) > epoch(created, 7));
        // A coordinator created anew a second later starts its sequence again from 0.
        assert!(epoch(created + 1000, 0) > epoch(created, 999_999));
    }

    #[test]
    fn lock_sequence_parses_suffix() {
        assert_eq!(lock_sequence("abc-def-lock-0000000012"), Some(12));
        assert_eq!(lock_sequence("abc-lock-x"), None);
        assert_eq!(lock_sequence("other"), None);
    }
}
