//! The leader actor alone: a real ZooKeeper server stores the registrations, fake pods (small
//! HTTP servers on 127.0.0.1) record the control requests, and the test plays the election.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use ochopod::acl::ZookeeperAccess;
use ochopod::election::LeadershipEvent;
use ochopod::layout;
use ochopod::leader::{Leader, LeaderConfig};
use ochopod::registration::Registration;
use ochopod::session::UpdateStatus;
use ochopod::steps::Model;
use ochopod::telemetry::Telemetry;
use support::{shared_server, unique_namespace, wait_until_async};
use zookeeper_client as zk;

const WAIT: Duration = Duration::from_secs(20);

/// One control request as a fake pod saw it.
#[derive(Clone, Debug)]
struct Seen {
    verb: String,
    epoch: Option<i64>,
    key: String,
    size: usize,
}

/// A fake pod: replies to every control request with the status set for its verb (200 by
/// default) and records it.
struct FakePod {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    statuses: Arc<Mutex<BTreeMap<String, u16>>>,
}

impl FakePod {
    fn start() -> FakePod {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let statuses: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
        let (seen_in, statuses_in) = (seen.clone(), statuses.clone());
        let server = HttpServer::new(move || {
            let seen = seen_in.clone();
            let statuses = statuses_in.clone();
            App::new().route(
                "/control/{verb}/{timeout}",
                web::post().to(
                    move |request: HttpRequest, body: web::Json<serde_json::Value>| {
                        let seen = seen.clone();
                        let statuses = statuses.clone();
                        async move {
                            let verb = request.match_info().get("verb").unwrap().to_string();
                            let epoch = request
                                .headers()
                                .get("X-Ochopod-Epoch")
                                .and_then(|value| value.to_str().ok())
                                .and_then(|value| value.parse().ok());
                            let key = body["key"].as_str().unwrap_or_default().to_string();
                            let size = body["pods"].as_object().map(|pods| pods.len()).unwrap_or(0);
                            seen.lock().unwrap().push(Seen {
                                verb: verb.clone(),
                                epoch,
                                key,
                                size,
                            });
                            let status =
                                statuses.lock().unwrap().get(&verb).copied().unwrap_or(200);
                            HttpResponse::build(
                                actix_web::http::StatusCode::from_u16(status).unwrap(),
                            )
                            .json(serde_json::json!({}))
                        }
                    },
                ),
            )
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
        let port = server.addrs()[0].port();
        actix::spawn(server.run());
        FakePod {
            port,
            seen,
            statuses,
        }
    }

    fn verbs(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|seen| seen.verb.clone())
            .collect()
    }
}

struct NoProbe;

impl Model for NoProbe {}

/// Swallows status updates in place of the session actor.
struct StatusSink;

impl Actor for StatusSink {
    type Context = Context<Self>;
}

impl Handler<UpdateStatus> for StatusSink {
    type Result = ();

    fn handle(&mut self, _: UpdateStatus, _: &mut Context<Self>) {}
}

async fn admin(connect: &str) -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(connect)
        .await
        .unwrap()
}

/// Registers a fake pod under `cluster` on `client`'s session and returns its child name.
async fn register(client: &zk::Client, cluster: &str, key: &str, pod: &FakePod) -> String {
    let pods = layout::pods(cluster);
    client
        .mkdir(
            &pods,
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .unwrap();
    let registration = Registration {
        ip: "127.0.0.1".to_string(),
        port: pod.port.to_string(),
        namespace: cluster.split('.').next().unwrap().to_string(),
        cluster: "web".to_string(),
        ..Registration::default()
    };
    let data = serde_json::to_vec(&registration).unwrap();
    let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    let (_, sequence) = client
        .create(&format!("{pods}/{key}."), &data, &options)
        .await
        .unwrap();
    format!("{key}.{sequence}")
}

fn start_leader(cluster: &str, damper: Duration) -> Addr<Leader> {
    let config = LeaderConfig {
        cluster: cluster.to_string(),
        namespace: cluster.split('.').next().unwrap().to_string(),
        depends_on: Vec::new(),
        damper,
        full_shutdown: false,
        sequential: false,
        control_timeout: Duration::from_secs(5),
        probe_every: Duration::ZERO,
        token: None,
        access: ZookeeperAccess::default(),
    };
    let sink = StatusSink.start();
    Leader::new(
        config,
        Arc::new(NoProbe),
        Arc::new(Telemetry::default()),
        sink.recipient(),
    )
    .start()
}

async fn snapshot_size(client: &zk::Client, cluster: &str) -> Option<usize> {
    let (data, _) = client.get_data(&layout::snapshot(cluster)).await.ok()?;
    let pods: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&data).ok()?;
    Some(pods.len())
}

#[actix::test]
async fn leader_configures_all_pods_with_epoch() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("leader"));
    let client = admin(&server.connect_string()).await;
    let pods = [FakePod::start(), FakePod::start()];
    register(&client, &cluster, "a", &pods[0]).await;
    register(&client, &cluster, "b", &pods[1]).await;

    let leader = start_leader(&cluster, Duration::ZERO);
    leader.do_send(LeadershipEvent::Elected {
        epoch: 7,
        client: client.clone(),
    });

    wait_until_async(WAIT, "snapshot of two pods", || async {
        snapshot_size(&client, &cluster).await == Some(2)
    })
    .await;
    for (pod, key) in pods.iter().zip(["a", "b"]) {
        assert_eq!(pod.verbs(), vec!["check", "on", "ok"]);
        for seen in pod.seen.lock().unwrap().iter() {
            assert_eq!(seen.epoch, Some(7), "every request carries the epoch");
            assert_eq!(seen.key, key, "each pod gets its own key");
            assert_eq!(seen.size, 2);
        }
    }
    let (hash, _) = client.get_data(&layout::hash(&cluster)).await.unwrap();
    assert_eq!(hash.len(), 64);

    // A third pod joins: one more round, over three pods.
    let third = FakePod::start();
    register(&client, &cluster, "c", &third).await;
    wait_until_async(WAIT, "snapshot of three pods", || async {
        snapshot_size(&client, &cluster).await == Some(3)
    })
    .await;
    assert_eq!(third.verbs(), vec!["check", "on", "ok"]);
    assert_eq!(pods[0].verbs().len(), 6);
}

#[actix::test]
async fn new_leader_adopts_stored_hash() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("adopt"));
    let client = admin(&server.connect_string()).await;
    let pod = FakePod::start();
    register(&client, &cluster, "a", &pod).await;

    let first = start_leader(&cluster, Duration::ZERO);
    first.do_send(LeadershipEvent::Elected {
        epoch: 1,
        client: client.clone(),
    });
    wait_until_async(WAIT, "first round", || async {
        snapshot_size(&client, &cluster).await == Some(1)
    })
    .await;
    first.do_send(LeadershipEvent::Deposed);

    let second = start_leader(&cluster, Duration::ZERO);
    second.do_send(LeadershipEvent::Elected {
        epoch: 2,
        client: client.clone(),
    });

    // A newcomer forces one round. Had the new leader also reconfigured the unchanged
    // cluster on election, the first pod would have seen one more check/on/ok.
    let newcomer = FakePod::start();
    register(&client, &cluster, "b", &newcomer).await;
    wait_until_async(WAIT, "round for the newcomer", || async {
        snapshot_size(&client, &cluster).await == Some(2)
    })
    .await;
    assert_eq!(
        pod.verbs().len(),
        6,
        "one round on election would be one too many: {:?}",
        pod.verbs()
    );
    let epochs: Vec<Option<i64>> = newcomer
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|seen| seen.epoch)
        .collect();
    assert!(epochs.iter().all(|epoch| *epoch == Some(2)), "{epochs:?}");
}

#[actix::test]
async fn dead_pod_dropped_from_round() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("dead"));
    let client = admin(&server.connect_string()).await;
    let alive = FakePod::start();
    let dead = FakePod::start();
    dead.statuses
        .lock()
        .unwrap()
        .insert("check".to_string(), 410);
    register(&client, &cluster, "a", &alive).await;
    register(&client, &cluster, "b", &dead).await;

    let leader = start_leader(&cluster, Duration::ZERO);
    leader.do_send(LeadershipEvent::Elected {
        epoch: 3,
        client: client.clone(),
    });

    wait_until_async(WAIT, "snapshot without the dead pod", || async {
        snapshot_size(&client, &cluster).await == Some(1)
    })
    .await;
    assert_eq!(dead.verbs(), vec!["check"]);
    let sizes: Vec<usize> = alive
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|seen| seen.verb == "on")
        .map(|seen| seen.size)
        .collect();
    assert_eq!(
        sizes,
        vec![1],
        "the live pod is configured without the dead one"
    );
}

#[actix::test]
async fn failed_check_aborts_round() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("abort"));
    let client = admin(&server.connect_string()).await;
    let good = FakePod::start();
    let refusing = FakePod::start();
    refusing
        .statuses
        .lock()
        .unwrap()
        .insert("check".to_string(), 406);
    register(&client, &cluster, "a", &good).await;
    register(&client, &cluster, "b", &refusing).await;

    let leader = start_leader(&cluster, Duration::ZERO);
    leader.do_send(LeadershipEvent::Elected {
        epoch: 4,
        client: client.clone(),
    });

    wait_until_async(WAIT, "two attempts", || async {
        refusing.verbs().len() >= 2
    })
    .await;
    assert!(
        good.verbs().iter().all(|verb| verb == "check"),
        "no pod is turned on: {:?}",
        good.verbs()
    );
    assert_eq!(
        snapshot_size(&client, &cluster).await,
        None,
        "no snapshot after a failed round"
    );

    // Once the pod accepts, the retry configures both.
    refusing.statuses.lock().unwrap().clear();
    wait_until_async(WAIT, "snapshot after the retry", || async {
        snapshot_size(&client, &cluster).await == Some(2)
    })
    .await;
}

#[actix::test]
async fn deposed_leader_stops_configuring() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("deposed"));
    let client = admin(&server.connect_string()).await;
    let pod = FakePod::start();
    register(&client, &cluster, "a", &pod).await;

    let leader = start_leader(&cluster, Duration::ZERO);
    leader.do_send(LeadershipEvent::Elected {
        epoch: 5,
        client: client.clone(),
    });
    wait_until_async(WAIT, "first round", || async {
        snapshot_size(&client, &cluster).await == Some(1)
    })
    .await;

    leader.send(LeadershipEvent::Deposed).await.unwrap();
    let other = FakePod::start();
    register(&client, &cluster, "b", &other).await;

    // A live leader reacts within milliseconds. A fresh leader on the same state proves that
    // the change was visible, and the deposed one must not have touched the newcomer.
    let witness = start_leader(&cluster, Duration::ZERO);
    witness.do_send(LeadershipEvent::Elected {
        epoch: 6,
        client: client.clone(),
    });
    wait_until_async(WAIT, "round by the new leader", || async {
        snapshot_size(&client, &cluster).await == Some(2)
    })
    .await;
    let epochs: Vec<Option<i64>> = other
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|seen| seen.epoch)
        .collect();
    assert!(
        epochs.iter().all(|epoch| *epoch == Some(6)),
        "only the new leader configures: {epochs:?}"
    );
}

#[actix::test]
async fn damper_absorbs_reverted_change() {
    let server = shared_server();
    let cluster = format!("{}.web", unique_namespace("damper"));
    let client = admin(&server.connect_string()).await;
    let pod = FakePod::start();
    register(&client, &cluster, "a", &pod).await;

    let leader = start_leader(&cluster, Duration::from_secs(2));
    leader.do_send(LeadershipEvent::Elected {
        epoch: 8,
        client: client.clone(),
    });
    wait_until_async(WAIT, "first round", || async {
        snapshot_size(&client, &cluster).await == Some(1)
    })
    .await;
    assert_eq!(pod.verbs().len(), 3);

    // A pod that comes and goes within the damper.
    let flapping = FakePod::start();
    let child = register(&client, &cluster, "b", &flapping).await;
    client
        .delete(&format!("{}/{child}", layout::pods(&cluster)), None)
        .await
        .unwrap();

    // A later, lasting change proves the leader is still reacting; the flap must not have
    // caused a round of its own.
    let lasting = FakePod::start();
    register(&client, &cluster, "c", &lasting).await;
    wait_until_async(WAIT, "round for the lasting change", || async {
        snapshot_size(&client, &cluster).await == Some(2)
    })
    .await;
    assert!(
        flapping.verbs().is_empty(),
        "the flapping pod was never configured"
    );
    assert_eq!(
        pod.verbs().len(),
        6,
        "one round for the lasting change only: {:?}",
        pod.verbs()
    );
}
