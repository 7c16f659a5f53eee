//! The session and election actors alone, against a real ZooKeeper server, with recording
//! actors in place of their peers.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use ochopod::acl::ZookeeperAccess;
use ochopod::election::{Election, LeadershipEvent, Resign};
use ochopod::layout;
use ochopod::registration::{child_name, Registration};
use ochopod::session::{CloseSession, Session, SessionConfig, SessionEvent, Subscribe};
use ochopod::telemetry::Telemetry;
use support::proxy::{Fault, FaultProxy};
use support::{shared_server, unique_namespace, wait_until_async};
use zookeeper_client as zk;

const WAIT: Duration = Duration::from_secs(20);

/// Records every message it gets, for assertions.
struct Recorder<M> {
    seen: Arc<Mutex<Vec<M>>>,
}

impl<M: Message<Result = ()> + Unpin + 'static> Actor for Recorder<M> {
    type Context = Context<Self>;
}

impl<M: Message<Result = ()> + Unpin + 'static> Handler<M> for Recorder<M> {
    type Result = ();

    fn handle(&mut self, message: M, _: &mut Context<Self>) {
        self.seen.lock().unwrap().push(message);
    }
}

fn recorder<M: Message<Result = ()> + Unpin + Send + 'static>(
) -> (Addr<Recorder<M>>, Arc<Mutex<Vec<M>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    (Recorder { seen: seen.clone() }.start(), seen)
}

fn start_session(connect: &str, namespace: &str, key: &str, timeout: Duration) -> Addr<Session> {
    let registration = Registration {
        namespace: namespace.to_string(),
        cluster: "web".to_string(),
        ip: "127.0.0.1".to_string(),
        ..Registration::default()
    };
    let config = SessionConfig {
        connect: connect.to_string(),
        session_timeout: timeout,
        access: ZookeeperAccess::default(),
    };
    Session::new(
        config,
        key.to_string(),
        registration,
        Arc::new(Telemetry::default()),
    )
    .start()
}

async fn admin(connect: &str) -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(connect)
        .await
        .unwrap()
}

/// Expires the session behind `proxy`: blackholes it until the server drops the session's
/// ephemeral node at `witness`, then heals it, so the client hears of the expiry.
async fn expire(proxy: &FaultProxy, admin: &zk::Client, witness: &str) {
    proxy.set(Fault::Blackhole);
    wait_until_async(WAIT, "the server expiring the session", || async {
        admin.check_stat(witness).await.unwrap().is_none()
    })
    .await;
    proxy.set(Fault::None);
}

fn registered_client(events: &Arc<Mutex<Vec<SessionEvent>>>) -> Option<zk::Client> {
    events
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|event| match event {
            SessionEvent::Registered { client } => Some(client.clone()),
            _ => None,
        })
}

fn count_registered(events: &Arc<Mutex<Vec<SessionEvent>>>) -> usize {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|event| matches!(event, SessionEvent::Registered { .. }))
        .count()
}

#[actix::test]
async fn session_registers_with_json_and_seq() {
    let server = shared_server();
    let namespace = unique_namespace("session");
    let session = start_session(
        &server.connect_string(),
        &namespace,
        "k1",
        Duration::from_secs(10),
    );
    let (subscriber, events) = recorder::<SessionEvent>();
    session
        .send(Subscribe(subscriber.recipient()))
        .await
        .unwrap();

    wait_until_async(WAIT, "registration", || async {
        registered_client(&events).is_some()
    })
    .await;

    let admin = admin(&server.connect_string()).await;
    let pods = admin
        .list_children(&layout::pods(&format!("{namespace}.web")))
        .await
        .unwrap();
    assert_eq!(pods.len(), 1);
    let (key, seq) = ochopod::registration::parse_child_name(&pods[0]).unwrap();
    assert_eq!(key, "k1");

    let path = format!("{}/{}", layout::pods(&format!("{namespace}.web")), pods[0]);
    let (data, stat) = admin.get_data(&path).await.unwrap();
    let registration: Registration = serde_json::from_slice(&data).unwrap();
    assert_eq!(registration.seq, seq);
    assert_eq!(registration.ip, "127.0.0.1");
    assert_ne!(
        stat.ephemeral_owner, 0,
        "the registration must be ephemeral"
    );
}

#[actix::test]
async fn session_expiry_registers_same_seq() {
    let server = shared_server();
    let namespace = unique_namespace("expiry");
    let cluster = format!("{namespace}.web");
    let proxy = FaultProxy::start(server.address());
    let session = start_session(
        &proxy.connect_string(),
        &namespace,
        "k2",
        Duration::from_secs(2),
    );
    let (subscriber, events) = recorder::<SessionEvent>();
    session
        .send(Subscribe(subscriber.recipient()))
        .await
        .unwrap();

    let first = wait_until_async(WAIT, "first registration", || async {
        registered_client(&events)
    })
    .await;
    let admin = admin(&server.connect_string()).await;
    let before = admin.list_children(&layout::pods(&cluster)).await.unwrap();
    assert_eq!(before.len(), 1);

    let witness = format!("{}/{}", layout::pods(&cluster), before[0]);
    expire(&proxy, &admin, &witness).await;

    wait_until_async(WAIT, "registration on a new session", || async {
        count_registered(&events) >= 2
    })
    .await;
    let second = registered_client(&events).unwrap();
    assert_ne!(first.session_id(), second.session_id());
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|event| matches!(event, SessionEvent::Lost)),
        "subscribers must hear that the session was lost"
    );

    let after = admin.list_children(&layout::pods(&cluster)).await.unwrap();
    assert_eq!(
        after, before,
        "the pod must register again under the same key and seq"
    );
    let path = format!("{}/{}", layout::pods(&cluster), after[0]);
    let stat = admin.check_stat(&path).await.unwrap().unwrap();
    assert_eq!(stat.ephemeral_owner, second.session_id().0);
}

#[actix::test]
async fn session_close_deletes_registration() {
    let server = shared_server();
    let namespace = unique_namespace("close");
    let cluster = format!("{namespace}.web");
    let session = start_session(
        &server.connect_string(),
        &namespace,
        "k3",
        Duration::from_secs(10),
    );
    let (subscriber, events) = recorder::<SessionEvent>();
    session
        .send(Subscribe(subscriber.recipient()))
        .await
        .unwrap();
    wait_until_async(WAIT, "registration", || async {
        registered_client(&events).is_some()
    })
    .await;

    session.send(CloseSession).await.unwrap();

    let admin = admin(&server.connect_string()).await;
    let pods = admin.list_children(&layout::pods(&cluster)).await.unwrap();
    assert!(pods.is_empty(), "registration left behind: {pods:?}");
}

struct Member {
    session: Addr<Session>,
    election: Addr<Election>,
    leadership: Arc<Mutex<Vec<LeadershipEvent>>>,
    session_events: Arc<Mutex<Vec<SessionEvent>>>,
}

async fn start_member(connect: &str, namespace: &str, key: &str) -> Member {
    let session = start_session(connect, namespace, key, Duration::from_secs(2));
    let (leader, leadership) = recorder::<LeadershipEvent>();
    let cluster = format!("{namespace}.web");
    let election = Election::new(
        cluster,
        key.to_string(),
        ZookeeperAccess::default(),
        leader.recipient(),
        Arc::new(Telemetry::default()),
    )
    .start();
    session
        .send(Subscribe(election.clone().recipient()))
        .await
        .unwrap();
    let (observer, session_events) = recorder::<SessionEvent>();
    session.send(Subscribe(observer.recipient())).await.unwrap();
    Member {
        session,
        election,
        leadership,
        session_events,
    }
}

fn elected_epoch(member: &Member) -> Option<i64> {
    let events = member.leadership.lock().unwrap();
    match events.last() {
        Some(LeadershipEvent::Elected { epoch, .. }) => Some(*epoch),
        _ => None,
    }
}

fn was_deposed(member: &Member) -> bool {
    matches!(
        member.leadership.lock().unwrap().last(),
        Some(LeadershipEvent::Deposed)
    )
}

#[actix::test]
async fn election_elects_one_and_hands_over() {
    let server = shared_server();
    let namespace = unique_namespace("election");
    let proxy = FaultProxy::start(server.address());
    let first = start_member(&proxy.connect_string(), &namespace, "a").await;
    let first_epoch = wait_until_async(WAIT, "first member elected", || async {
        elected_epoch(&first)
    })
    .await;

    let second = start_member(&server.connect_string(), &namespace, "b").await;
    wait_until_async(WAIT, "second member registered", || async {
        registered_client(&second.session_events).is_some()
    })
    .await;
    let admin = admin(&server.connect_string()).await;
    wait_until_async(WAIT, "two lock nodes", || async {
        admin
            .list_children(&layout::coordinator(&format!("{namespace}.web")))
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    assert!(
        second.leadership.lock().unwrap().is_empty(),
        "only one member may lead"
    );

    let pods = admin
        .list_children(&layout::pods(&format!("{namespace}.web")))
        .await
        .unwrap();
    let first_pod = pods.iter().find(|child| child.starts_with("a.")).unwrap();
    let witness = format!("{}/{first_pod}", layout::pods(&format!("{namespace}.web")));
    expire(&proxy, &admin, &witness).await;

    let second_epoch = wait_until_async(WAIT, "second member elected", || async {
        elected_epoch(&second)
    })
    .await;
    assert!(
        second_epoch > first_epoch,
        "epochs must grow: {first_epoch} then {second_epoch}"
    );
    wait_until_async(WAIT, "first member deposed", || async {
        first
            .leadership
            .lock()
            .unwrap()
            .iter()
            .any(|event| matches!(event, LeadershipEvent::Deposed))
    })
    .await;

    // The first member registers again and waits behind the new leader.
    wait_until_async(WAIT, "first member registered again", || async {
        count_registered(&first.session_events) >= 2
    })
    .await;
    assert!(was_deposed(&first) || elected_epoch(&first).is_none());

    second.election.send(Resign).await.unwrap();
    second.session.send(CloseSession).await.unwrap();
    let third_epoch = wait_until_async(WAIT, "first member elected again", || async {
        elected_epoch(&first)
    })
    .await;
    assert!(third_epoch > second_epoch);
    let _ = child_name("a", third_epoch);
}
