//! The control server over real HTTP on 127.0.0.1, in front of fake lifecycle and session
//! actors.

use std::sync::atomic::{AtomicUsize, Ordering};

use awc::http::Method;
use serde_json::Value;

use super::*;
use crate::lifecycle::ControlError;
use crate::registration::Registration;
use crate::settings::Token;
use crate::telemetry::Role;

/// Control requests the fake lifecycle received: verb, body and epoch.
type Received = Arc<Mutex<Vec<(Verb, Value, Option<i64>)>>>;

/// Replies from the body's `key` (which survives the parsing of a cluster view):
/// `fail:check`, `fail:dead`, `fail:stale` or `fail:bad` picks an error, `sleep:<ms>` delays
/// the reply, anything else is echoed back.
struct FakeLifecycle {
    received: Received,
}

impl Actor for FakeLifecycle {
    type Context = Context<Self>;
}

impl Handler<Control> for FakeLifecycle {
    type Result = ResponseFuture<Result<Value, ControlError>>;

    fn handle(&mut self, control: Control, _: &mut Self::Context) -> Self::Result {
        let body = control.body.to_json();
        self.received
            .lock()
            .unwrap()
            .push((control.verb, body.clone(), control.epoch));
        Box::pin(async move {
            let key = body.get("key").and_then(Value::as_str).unwrap_or_default();
            if let Some(delay) = key.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            match key.strip_prefix("fail:") {
                Some("check") => Err(ControlError::Failed("check failed: disk full".to_string())),
                Some("dead") => Err(ControlError::Dead),
                Some("stale") => Err(ControlError::StaleEpoch {
                    received: control.epoch.unwrap_or(0),
                    highest: 9,
                }),
                Some("bad") => Err(ControlError::BadRequest(
                    "the body is not a cluster view".to_string(),
                )),
                _ => Ok(json!({ "verb": control.verb.as_str(), "echo": body })),
            }
        })
    }
}

struct FakeSession {
    resets: Arc<AtomicUsize>,
}

impl Actor for FakeSession {
    type Context = Context<Self>;
}

impl Handler<ResetSession> for FakeSession {
    type Result = Result<(), String>;

    fn handle(&mut self, _: ResetSession, _: &mut Self::Context) -> Self::Result {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Harness {
    server: RunningControlServer,
    telemetry: Arc<Telemetry>,
    received: Received,
    resets: Arc<AtomicUsize>,
    client: awc::Client,
}

impl Harness {
    fn start() -> Harness {
        Harness::start_with_token(None)
    }

    /// Starts a server whose `/control/*` and `/reset` require `token`, when given.
    fn start_with_token(token: Option<&str>) -> Harness {
        let telemetry = Arc::new(Telemetry::default());
        let received = Received::default();
        let resets = Arc::new(AtomicUsize::new(0));
        let lifecycle = FakeLifecycle {
            received: received.clone(),
        }
        .start();
        let session = FakeSession {
            resets: resets.clone(),
        }
        .start();
        let settings = Settings {
            namespace: "test.ns".to_string(),
            cluster: "web".to_string(),
            depends_on: vec!["db".to_string()],
            token: token.map(Token::new),
            ..Settings::default()
        };

        let server = start_control_server(ControlServer {
            address: "127.0.0.1:0".parse().unwrap(),
            telemetry: telemetry.clone(),
            lifecycle: lifecycle.recipient(),
            session: session.recipient(),
            settings: Arc::new(settings),
        })
        .unwrap();
        Harness {
            server,
            telemetry,
            received,
            resets,
            client: awc::Client::default(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.address)
    }

    /// Sends a request and returns the status, the content type and the body as JSON.
    async fn call(&self, method: Method, path: &str, body: &str) -> (u16, String, Value) {
        let mut response = self
            .client
            .request(method, self.url(path))
            .timeout(Duration::from_secs(10))
            .send_body(body.to_string())
            .await
            .unwrap();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = response.body().limit(MAX_BODY_BYTES * 2).await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (response.status().as_u16(), content_type, value)
    }

    async fn stop(self) {
        self.server.stop();
    }
}

fn error_text(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

#[actix::test]
async fn control_verbs_reach_lifecycle() {
    let harness = Harness::start();

    let (status, content_type, body) = harness
        .call(Method::POST, "/control/on", r#"{"key":"k1","pods":{}}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    assert_eq!(body["verb"], "on");
    assert_eq!(body["echo"]["key"], "k1");

    let (status, _, body) = harness.call(Method::POST, "/control/signal/5", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["echo"], json!({}), "an empty body is the empty object");

    let received = harness.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].0, Verb::On);
    assert_eq!(received[1].0, Verb::Signal);
    assert_eq!(received[1].2, None);
    assert_eq!(harness.telemetry.requests_ok.load(Ordering::Relaxed), 2);
    harness.stop().await;
}

#[actix::test]
async fn control_failures_map_to_statuses() {
    let harness = Harness::start();
    let cases = [
        ("check", 406, "check failed: disk full"),
        ("dead", 410, "the pod is dead"),
        ("stale", 409, "stale leader epoch"),
        ("bad", 400, "not a cluster view"),
    ];
    for (failure, expected_status, expected_text) in cases {
        let body = format!(r#"{{"key":"fail:{failure}"}}"#);
        let (status, content_type, reply) =
            harness.call(Method::POST, "/control/check", &body).await;
        assert_eq!(status, expected_status, "{failure}: {reply}");
        assert_eq!(content_type, "application/json");
        assert!(
            error_text(&reply).contains(expected_text),
            "{failure}: {reply}"
        );
    }
    assert_eq!(harness.telemetry.requests_failed.load(Ordering::Relaxed), 4);
    harness.stop().await;
}

#[actix::test]
async fn control_times_out_with_408() {
    let harness = Harness::start();
    let started = Instant::now();
    let (status, _, reply) = harness
        .call(Method::POST, "/control/on/0.2", r#"{"key":"sleep:3000"}"#)
        .await;
    assert_eq!(status, 408);
    assert_eq!(error_text(&reply), "control on not done within 0.2 s");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the reply took {:?}",
        started.elapsed()
    );
    harness.stop().await;
}

#[actix::test]
async fn control_rejects_invalid_requests() {
    let harness = Harness::start();
    let cases = [
        ("/control/start", "{}", "unknown verb `start`"),
        ("/control/on/abc", "{}", "invalid timeout `abc`"),
        ("/control/on/0", "{}", "invalid timeout `0`"),
        ("/control/on/-1", "{}", "invalid timeout `-1`"),
        ("/control/on/100000", "{}", "invalid timeout `100000`"),
        (
            "/control/on",
            "{not json",
            "invalid JSON body: key must be a string",
        ),
    ];
    for (path, body, expected) in cases {
        let (status, _, reply) = harness.call(Method::POST, path, body).await;
        assert_eq!(status, 400, "{path}: {reply}");
        assert!(error_text(&reply).starts_with(expected), "{path}: {reply}");
    }
    assert!(
        harness.received.lock().unwrap().is_empty(),
        "no invalid request may reach the lifecycle"
    );
    harness.stop().await;
}

#[actix::test]
async fn epoch_header_parsed() {
    let harness = Harness::start();

    let mut response = harness
        .client
        .post(harness.url("/control/ok"))
        .insert_header((EPOCH_HEADER, "12"))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.body().await.unwrap();
    assert_eq!(harness.received.lock().unwrap()[0].2, Some(12));

    let mut response = harness
        .client
        .post(harness.url("/control/ok"))
        .insert_header((EPOCH_HEADER, "twelve"))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let reply: Value = serde_json::from_slice(&response.body().await.unwrap()).unwrap();
    assert_eq!(
        error_text(&reply),
        "invalid X-Ochopod-Epoch header `twelve`: expected an integer"
    );
    harness.stop().await;
}

#[actix::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let harness = Harness::start();
    let cases = [
        (
            Method::GET,
            "/nothing",
            404,
            "no such endpoint: GET /nothing",
        ),
        (
            Method::GET,
            "/control/on",
            405,
            "method GET not allowed on /control/on; use POST",
        ),
        (Method::GET, "/reset", 405, "use POST"),
        (Method::DELETE, "/info", 405, "use GET or POST"),
        (Method::POST, "/health", 405, "use GET"),
        (Method::POST, "/metrics", 405, "use GET"),
    ];
    for (method, path, expected_status, expected_text) in cases {
        let (status, content_type, reply) = harness.call(method.clone(), path, "").await;
        assert_eq!(status, expected_status, "{method} {path}");
        assert_eq!(content_type, "application/json", "{method} {path}");
        assert!(
            error_text(&reply).contains(expected_text),
            "{method} {path}: {reply}"
        );
    }
    harness.stop().await;
}

#[actix::test]
async fn large_bodies_get_413() {
    let harness = Harness::start();

    let (status, content_type, reply) = harness
        .call(
            Method::POST,
            "/control/signal",
            &" ".repeat(MAX_BODY_BYTES + 1),
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(content_type, "application/json");
    assert!(
        error_text(&reply).contains("larger than 1048576 bytes"),
        "{reply}"
    );

    // Without a Content-Length, the limit applies while reading.
    let chunks = (0..17).map(|_| Ok::<_, std::io::Error>(web::Bytes::from(vec![b' '; 64 * 1024])));
    let mut response = harness
        .client
        .post(harness.url("/control/signal"))
        .send_stream(futures::stream::iter(chunks))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let reply: Value = serde_json::from_slice(&response.body().await.unwrap()).unwrap();
    assert!(error_text(&reply).contains("larger than"), "{reply}");

    let (status, _, _) = harness
        .call(Method::POST, "/control/signal", &" ".repeat(MAX_BODY_BYTES))
        .await;
    assert_eq!(status, 200, "exactly 1 MiB is accepted");
    harness.stop().await;
}

#[actix::test]
async fn info_reports_facts() {
    let harness = Harness::start();
    harness.telemetry.update(|facts| {
        facts.registration = Registration {
            application: "app".to_string(),
            ip: "127.0.0.1".to_string(),
            seq: 7,
            port: "8080".to_string(),
            ports: BTreeMap::from([("8080".to_string(), 31000)]),
            status: "3 pods".to_string(),
            ..Registration::default()
        };
        facts.process = ProcessState::Running;
        facts.role = Role::LeaderConfiguring;
        facts.restarts = 2;
        facts.metrics = json!({"load": 1});
        facts.zookeeper_error = Some("cannot register in ZooKeeper: denied".to_string());
    });

    for method in [Method::GET, Method::POST] {
        let (status, content_type, info) = harness.call(method, "/info", "").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "application/json");
        assert_eq!(info["application"], "app");
        assert_eq!(info["seq"], 7);
        assert_eq!(info["port"], "8080");
        assert_eq!(info["ports"]["8080"], 31000);
        assert_eq!(
            info["namespace"], "test.ns",
            "from the settings until registered"
        );
        assert_eq!(info["cluster"], "web");
        assert_eq!(info["dependencies"], json!(["db"]));
        assert_eq!(info["process"], "running");
        assert_eq!(info["state"], "leader (configuring)");
        assert_eq!(info["status"], "3 pods");
        assert_eq!(info["metrics"], json!({"load": 1}));
        assert_eq!(info["restarts"], 2);
        assert_eq!(
            info["zookeeper_error"],
            "cannot register in ZooKeeper: denied"
        );
        assert_eq!(info["version"], AGENT_VERSION);
        assert!(info["uptime"].as_f64().unwrap() >= 0.0);
    }
    harness.stop().await;
}

#[actix::test]
async fn log_returns_recent_lines() {
    crate::logging::init();
    log::warn!("control test marker line");
    let harness = Harness::start();

    let (status, content_type, lines) = harness.call(Method::GET, "/log", "").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let lines = lines.as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|line| line.as_str().unwrap().ends_with("control test marker line")),
        "{lines:?}"
    );
    harness.stop().await;
}

#[actix::test]
async fn reset_reaches_session() {
    let harness = Harness::start();
    let (status, _, reply) = harness.call(Method::POST, "/reset", "").await;
    assert_eq!(status, 200);
    assert_eq!(reply, json!({}));
    assert_eq!(harness.resets.load(Ordering::SeqCst), 1);
    harness.stop().await;
}

#[actix::test]
async fn health_turns_503_when_dead() {
    let harness = Harness::start();
    let (status, _, reply) = harness.call(Method::GET, "/health", "").await;
    assert_eq!(status, 200);
    assert_eq!(reply["ok"], true);

    harness
        .telemetry
        .update(|facts| facts.process = ProcessState::Dead);
    let (status, content_type, reply) = harness.call(Method::GET, "/health", "").await;
    assert_eq!(status, 503);
    assert_eq!(content_type, "application/json");
    assert_eq!(error_text(&reply), "the pod is dead");
    harness.stop().await;
}

#[actix::test]
async fn metrics_count_responses() {
    let harness = Harness::start();
    harness.call(Method::GET, "/nothing", "").await;
    harness.call(Method::POST, "/control/on", "{}").await;

    let mut response = harness
        .client
        .get(harness.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(content_type, metrics::CONTENT_TYPE);
    let text = String::from_utf8(response.body().await.unwrap().to_vec()).unwrap();
    assert!(
        text.contains("# TYPE ochopod_http_responses_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("ochopod_http_responses_total{code=\"404\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("ochopod_control_requests_total{outcome=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("ochopod_process_state{state=\"stopped\"} 1\n"),
        "{text}"
    );
    harness.stop().await;
}

#[actix::test]
async fn client_send_carries_epoch_and_timeout() {
    let harness = Harness::start();
    let address = harness.server.address.to_string();
    let client = awc::Client::default();

    let body = json!({"key": "k"});
    let (status, reply) = send(
        &client,
        &address,
        Verb::Check,
        Duration::from_secs(5),
        &Credentials {
            epoch: Some(3),
            token: None,
        },
        (&body).into(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(reply["echo"]["key"], "k");
    assert_eq!(harness.received.lock().unwrap()[0].2, Some(3));

    let slow = json!({"key": "sleep:3000"});
    let (status, reply) = send(
        &client,
        &address,
        Verb::On,
        Duration::from_millis(200),
        &Credentials::default(),
        (&slow).into(),
    )
    .await
    .unwrap();
    assert_eq!(status, 408, "{reply}");

    let (status, info) = request(
        &client,
        Method::GET,
        &address,
        "/info",
        Duration::from_secs(5),
        &Credentials::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(info["cluster"], "web");
    harness.stop().await;

    let closed = unused_address();
    let error = request(
        &client,
        Method::GET,
        &closed,
        "/info",
        Duration::from_secs(5),
        &Credentials::default(),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, SendError::Request { .. }), "{error}");
}

/// Returns a loopback address where nothing listens.
fn unused_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

const TOKEN: &str = "s3cret-t0ken-for-tests-0123456789";

/// Sends a request with extra headers and returns the status, the `WWW-Authenticate` header and
/// the body as JSON.
async fn call_with_headers(
    harness: &Harness,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Value) {
    let mut request = harness
        .client
        .post(harness.url(path))
        .timeout(Duration::from_secs(10));
    for (name, value) in headers {
        request = request.insert_header((*name, *value));
    }
    let mut response = request.send_body(body.to_string()).await.unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = response.body().await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (response.status().as_u16(), challenge, value)
}

#[actix::test]
async fn token_required_on_control_and_reset() {
    let harness = Harness::start_with_token(Some(TOKEN));
    let bearer = format!("Bearer {TOKEN}");
    let wrong = "Bearer not-the-token-at-all-0000000".to_string();

    for path in ["/control/check", "/control/nonsense", "/reset"] {
        let (status, challenge, reply) = call_with_headers(&harness, path, "{}", &[]).await;
        assert_eq!(status, 401, "{path}: {reply}");
        assert!(challenge.starts_with("Bearer"), "{path}: {challenge}");
        assert!(
            error_text(&reply).contains("missing credentials"),
            "{reply}"
        );

        let (status, _, reply) =
            call_with_headers(&harness, path, "{}", &[("Authorization", &wrong)]).await;
        assert_eq!(status, 401, "{path}: {reply}");
        assert!(
            error_text(&reply).contains("invalid credentials"),
            "{reply}"
        );
        assert!(!reply.to_string().contains(TOKEN), "{reply}");
    }
    assert!(harness.received.lock().unwrap().is_empty());
    assert_eq!(harness.resets.load(Ordering::SeqCst), 0);

    let (status, _, reply) = call_with_headers(
        &harness,
        "/control/check",
        r#"{"key":"k"}"#,
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (status, _, reply) =
        call_with_headers(&harness, "/reset", "", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(harness.resets.load(Ordering::SeqCst), 1);
    harness.stop().await;
}

#[actix::test]
async fn token_signature_covers_body() {
    let harness = Harness::start_with_token(Some(TOKEN));
    let token = Token::new(TOKEN);
    let body = r#"{"hello":"world"}"#;
    let signature = sign(&token, body.as_bytes());

    let (status, _, reply) = call_with_headers(
        &harness,
        "/control/signal",
        body,
        &[(SIGNATURE_HEADER, &signature)],
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["echo"]["hello"], "world");

    let (status, _, reply) = call_with_headers(
        &harness,
        "/control/signal",
        r#"{"hello":"mallory"}"#,
        &[(SIGNATURE_HEADER, &signature)],
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(harness.received.lock().unwrap().len(), 1);
    harness.stop().await;
}

#[actix::test]
async fn token_leaves_read_endpoints_open() {
    let harness = Harness::start_with_token(Some(TOKEN));
    for (method, path) in [
        (Method::GET, "/info"),
        (Method::POST, "/info"),
        (Method::GET, "/log"),
        (Method::GET, "/health"),
    ] {
        let (status, _, reply) = harness.call(method, path, "").await;
        assert_eq!(status, 200, "{path}: {reply}");
        assert!(!reply.to_string().contains(TOKEN), "{path}: {reply}");
    }
    harness.stop().await;
}

#[actix::test]
async fn client_sends_bearer_token() {
    let harness = Harness::start_with_token(Some(TOKEN));
    let address = harness.server.address.to_string();
    let client = awc::Client::default();
    let body = json!({"key": "k"});

    let without = send(
        &client,
        &address,
        Verb::Check,
        Duration::from_secs(5),
        &Credentials::default(),
        (&body).into(),
    )
    .await
    .unwrap();
    assert_eq!(without.0, 401, "{}", without.1);

    let credentials = Credentials {
        epoch: Some(4),
        token: Some(Token::new(TOKEN)),
    };
    let (status, reply) = send(
        &client,
        &address,
        Verb::Check,
        Duration::from_secs(5),
        &credentials,
        (&body).into(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(harness.received.lock().unwrap()[0].2, Some(4));
    harness.stop().await;
}
