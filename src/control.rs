//! The control server: the pod's HTTP API, used by the leader, by operators and by platform
//! probes.
//!
//! | request | effect |
//! | --- | --- |
//! | `GET`/`POST /info` | runtime facts of the pod |
//! | `GET`/`POST /log` | the last 32 KiB of the pod log, as a JSON array of lines |
//! | `POST /reset` | drops the ZooKeeper session and registers again |
//! | `POST /control/<verb>[/<timeout s>]` | queues a control request to the lifecycle |
//! | `GET /health` | 200 while the pod is not dead, 503 once it is |
//! | `GET /metrics` | Prometheus text format |
//!
//! Every reply but `/metrics` is JSON, and every error is `{"error": "..."}`, including 401,
//! 404, 405 and 413. With a `token` setting, `/control/*` and `/reset` require it and reply 401
//! without it (see [`auth`]). `/info`, `/log`, `/health` and `/metrics` stay open, so platform
//! probes and monitoring need no secret.
//!
//! The server only reads shared facts (`Telemetry`) and forwards requests to the lifecycle and
//! session actors, so it keeps no pod state of its own besides request counters.
//! It runs as tasks on the pod's arbiter, with no thread of its own: the work behind each
//! request happens in the actors.

mod auth;
mod client;
mod metrics;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::{error::DispatchError, HttpService};
use actix_service::{map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Service};
use actix_web::http::header::{HeaderMap, CONTENT_LENGTH, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, ResponseError};
use futures::StreamExt;
use log::{debug, error, info, warn};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::cluster::Cluster;
use crate::lifecycle::{Control, ControlBody, Verb};
use crate::registration::AGENT_VERSION;
use crate::session::ResetSession;
use crate::settings::{Settings, MAX_SECONDS};
use crate::telemetry::{ProcessState, Telemetry};

pub use auth::{authorize, carries_credentials, sign, AuthError, SIGNATURE_HEADER};
pub use client::{request, send, Credentials, JsonBody, SendError};

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Timeout of a control request whose path names none.
pub const DEFAULT_CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// Header carrying the epoch of the leader that sends a control request.
pub const EPOCH_HEADER: &str = "X-Ochopod-Epoch";

/// Pending connections the listening socket queues. Besides one leader and a few operators,
/// monitoring and health probes may connect in bursts. A connection the queue cannot take waits
/// for a SYN retransmission, one second or more.
const BACKLOG: u32 = 1024;

/// Shortest time between two log lines about rejected credentials; the rejections in between
/// are counted in the next line.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Time a stopping server leaves open connections to finish the requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Connections served at once; more wait in the backlog until one closes. Bounds the file
/// descriptors and memory that a flood of clients can take from the pod.
const MAX_CONNECTIONS: usize = 1024;

/// Time an idle connection stays open for a next request.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Time a client has to send a request's head once connected; slower clients get 408.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to send a request's body once its head arrived. Slower clients get 408
/// and the connection is closed, so a body that never comes does not hold a connection slot.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a connection's writes may stay blocked before it is closed: a client that sends
/// requests but never reads the replies would otherwise hold a slot for good.
const WRITE_STALL_LIMIT: Duration = Duration::from_secs(10);

/// Interval between two checks of a connection for a write stall.
const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Pause after a failed `accept`, so that running out of file descriptors does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Inputs of the control server: the listen address, the facts to publish and the actors that
/// requests go to.
pub struct ControlServer {
    /// Address to listen on; port 0 picks a free port.
    pub address: SocketAddr,
    pub telemetry: Arc<Telemetry>,
    /// The lifecycle actor, which runs control requests one at a time.
    pub lifecycle: Recipient<Control>,
    /// The ZooKeeper session actor, which handles `/reset`.
    pub session: Recipient<ResetSession>,
    /// Static facts for `/info` before the pod is registered.
    pub settings: Arc<Settings>,
}

/// A control server running in the current actix `System`.
pub struct RunningControlServer {
    /// The address the server listens on (with the port picked when port 0 was asked for).
    pub address: SocketAddr,
    stop: watch::Sender<bool>,
}

impl RunningControlServer {
    /// Stops accepting connections at once; open connections get a short grace to finish
    /// the requests in flight, then close.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `server.address` and serves the API on it from tasks spawned on the current actix
/// arbiter. Fails when the address cannot be bound.
///
/// The server runs no thread of its own: accepting and every connection are tasks beside the
/// pod's actors. An agent is one thread lighter for it, and a thousand embedded pods do not
/// mean a thousand server threads.
pub fn start_control_server(server: ControlServer) -> io::Result<RunningControlServer> {
    let cluster = server.settings.qualified_cluster();
    let state = web::Data::new(State {
        telemetry: server.telemetry,
        lifecycle: server.lifecycle,
        session: server.session,
        settings: server.settings,
        responses: Mutex::new(BTreeMap::new()),
        rejections: Mutex::new(Rejections::default()),
    });

    let listener = listen(server.address)?;
    let address = listener.local_addr()?;

    let app = App::new()
        .app_data(state.clone())
        .wrap_fn(|request, service| {
            let state = request.app_data::<web::Data<State>>().cloned();
            let method = request.method().clone();
            let path = request.path().to_string();
            let response = service.call(request);
            async move {
                let response = response.await?;
                debug!(
                    "control server: {method} {path} -> {}",
                    response.status().as_u16()
                );
                if let Some(state) = state {
                    state.count_response(response.status());
                }
                Ok(response)
            }
        })
        .service(
            web::resource("/info")
                .route(web::get().to(info))
                .route(web::post().to(info))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/log")
                .route(web::get().to(log_lines))
                .route(web::post().to(log_lines))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/reset")
                .route(web::post().to(reset))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(["/control/{verb}", "/control/{verb}/{timeout}"])
                .route(web::post().to(control))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/health")
                .route(web::get().to(health))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/metrics")
                .route(web::get().to(metrics))
                .default_service(web::to(method_not_allowed)),
        )
        .default_service(web::to(not_found));
    let factory = HttpService::build()
        .keep_alive(KEEP_ALIVE)
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .local_addr(address)
        .h1(map_config(
            app.into_factory()
                .map_err(|error: actix_web::Error| error.error_response()),
            |_| AppConfig::default(),
        ));

    let (stop, stopped) = watch::channel(false);
    actix::spawn(async move {
        let service = match factory.new_service(()).await {
            Ok(service) => Rc::new(service),
            Err(()) => {
                error!("cluster {cluster}: control server on {address} failed to start");
                return;
            }
        };
        accept(listener, service, stopped).await;
        info!("cluster {cluster}: control server on {address} stopped");
    });
    info!("control server listening on {address}");
    Ok(RunningControlServer { address, stop })
}

/// Binds `address` with a backlog of [`BACKLOG`] pending connections.
fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

/// Accepts connections until `stopped` turns true, serving each from its own task. At most
/// [`MAX_CONNECTIONS`] are served at once; the next ones wait in the backlog. After the stop,
/// open connections get [`SHUTDOWN_GRACE`] to finish the requests in flight.
async fn accept<S>(listener: TcpListener, service: Rc<S>, mut stopped: watch::Receiver<bool>)
where
    S: Service<(WatchedStream, Option<SocketAddr>), Response = (), Error = DispatchError> + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let Ok(slot) = slot else { return };

        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or a connection reset before it was accepted: the
                    // listener itself is fine, so wait a little and go on.
                    warn!("control server: cannot accept a connection: {error}");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            },
            _ = stopped.wait_for(|stop| *stop) => return,
        };

        let service = service.clone();
        let mut stopping = stopped.clone();
        let (stream, stalled_since) = WatchedStream::new(stream);
        actix::spawn(async move {
            let _slot = slot;
            tokio::select! {
                served = service.call((stream, Some(peer))) => {
                    if let Err(error) = served {
                        debug!("control server: connection from {peer} ended with an error: {error:?}");
                    }
                }
                _ = async {
                    let _ = stopping.wait_for(|stop| *stop).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {}
                () = write_stall(&stalled_since) => {
                    warn!(
                        "control server: closed the connection from {peer}: it read none of \
                         its replies for {} s",
                        WRITE_STALL_LIMIT.as_secs()
                    );
                }
            }
        });
    }
}

/// Resolves once the connection's writes have been blocked for [`WRITE_STALL_LIMIT`]: the
/// client stopped reading its replies, and holds a connection slot and the replies queued for
/// it. A request that is still being worked on writes nothing, so it never counts as a stall.
async fn write_stall(stalled_since: &Cell<Option<Instant>>) {
    loop {
        tokio::time::sleep(STALL_CHECK_INTERVAL).await;
        if stalled_since
            .get()
            .is_some_and(|since| since.elapsed() >= WRITE_STALL_LIMIT)
        {
            return;
        }
    }
}

/// A client connection that records since when its writes are blocked, for [`write_stall`].
struct WatchedStream {
    stream: TcpStream,
    stalled_since: Rc<Cell<Option<Instant>>>,
}

impl WatchedStream {
    fn new(stream: TcpStream) -> (Self, Rc<Cell<Option<Instant>>>) {
        let stalled_since = Rc::new(Cell::new(None));
        let watched = WatchedStream {
            stream,
            stalled_since: stalled_since.clone(),
        };
        (watched, stalled_since)
    }

    /// Records the outcome of a write: blocked from now on unless it already was, or moving.
    fn track<T>(&self, poll: &Poll<T>) {
        if poll.is_pending() {
            if self.stalled_since.get().is_none() {
                self.stalled_since.set(Some(Instant::now()));
            }
        } else {
            self.stalled_since.set(None);
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(context, data);
        self.track(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(context, buffers);
        self.track(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(context);
        self.track(&poll);
        poll
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

/// State shared by every handler.
struct State {
    telemetry: Arc<Telemetry>,
    lifecycle: Recipient<Control>,
    session: Recipient<ResetSession>,
    settings: Arc<Settings>,
    /// Replies sent, by status code, for `/metrics`.
    responses: Mutex<BTreeMap<u16, u64>>,
    rejections: Mutex<Rejections>,
}

/// Requests rejected for their credentials since the last log line about them.
#[derive(Default)]
struct Rejections {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl State {
    fn count_response(&self, status: StatusCode) {
        let mut responses = self
            .responses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *responses.entry(status.as_u16()).or_default() += 1;
    }

    /// Checks the credentials of a request that changes the pod. Rejections are logged at most
    /// once per [`REJECTION_LOG_INTERVAL`], so a burst of them adds one line to the log.
    fn authorize(&self, request: &HttpRequest, body: &[u8]) -> Result<(), ApiError> {
        let Err(error) = authorize(self.settings.token.as_ref(), request.headers(), body) else {
            return Ok(());
        };

        let mut rejections = self
            .rejections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rejections.unlogged += 1;
        let due = rejections
            .last_logged
            .is_none_or(|last| last.elapsed() >= REJECTION_LOG_INTERVAL);
        if due {
            let peer = request
                .peer_addr()
                .map_or_else(|| "an unknown address".to_string(), |peer| peer.to_string());
            warn!(
                "cluster {}: rejected {} {} from {peer}: {error} ({} rejected since the last such line)",
                self.settings.qualified_cluster(),
                request.method(),
                request.path(),
                rejections.unlogged
            );
            rejections.last_logged = Some(Instant::now());
            rejections.unlogged = 0;
        }
        Err(ApiError::new(StatusCode::UNAUTHORIZED, error.to_string()))
    }
}

/// An error reply: `{"error": message}` with `status`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// Closes the connection after the reply, because the rest of the request was not read.
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            close: false,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn too_large() -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes; send at most 1 MiB"),
        )
        .closing()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((WWW_AUTHENTICATE, "Bearer realm=\"ochopod\""));
        }
        if self.close {
            response.force_close();
        }
        response.json(json!({ "error": self.message }))
    }
}

async fn not_found(request: HttpRequest) -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", request.method(), request.path()),
    )
    .error_response()
}

async fn method_not_allowed(request: HttpRequest) -> HttpResponse {
    let allowed = match request.path() {
        "/info" | "/log" => "GET or POST",
        "/health" | "/metrics" => "GET",
        _ => "POST",
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} not allowed on {}; use {allowed}",
            request.method(),
            request.path()
        ),
    )
    .error_response()
}

/// Reads the request body, rejecting more than `MAX_BODY_BYTES` (413) before buffering it
/// when the length is announced.
async fn read_body(headers: &HeaderMap, mut payload: web::Payload) -> Result<web::Bytes, ApiError> {
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES) {
        return Err(ApiError::too_large());
    }

    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    let mut body = web::BytesMut::new();
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, payload.next()).await else {
            let expected = announced.map_or_else(String::new, |length| format!(" of {length}"));
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s ({} bytes{expected} received); \
                     send the whole body right after the headers",
                    BODY_TIMEOUT.as_secs(),
                    body.len()
                ),
            )
            .closing());
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|error| {
            ApiError::bad_request(format!("cannot read the request body: {error}"))
        })?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads the body of a request that changes the pod and checks its credentials. A request
/// without any is rejected before its body is read; a signed one needs the whole body.
async fn read_authorized_body(
    request: &HttpRequest,
    payload: web::Payload,
    state: &State,
) -> Result<web::Bytes, ApiError> {
    if !carries_credentials(request.headers()) {
        state.authorize(request, b"")?;
    }
    let body = read_body(request.headers(), payload).await?;
    state.authorize(request, &body)?;
    Ok(body)
}

async fn info(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    read_body(request.headers(), payload).await?;
    Ok(HttpResponse::Ok().json(info_document(&state.telemetry, &state.settings)))
}

/// Builds the `/info` document from the shared facts, falling back on the settings for what
/// the registration does not hold yet.
fn info_document(telemetry: &Telemetry, settings: &Settings) -> serde_json::Value {
    let facts = telemetry.facts();
    let registration = &facts.registration;
    let or_setting = |registered: &str, setting: &str| {
        if registered.is_empty() {
            setting.to_string()
        } else {
            registered.to_string()
        }
    };
    let dependencies = if facts.dependencies.is_empty() {
        &settings.depends_on
    } else {
        &facts.dependencies
    };
    let metrics = if facts.metrics.is_null() {
        json!({})
    } else {
        facts.metrics.clone()
    };

    json!({
        "application": registration.application,
        "task": registration.task,
        "node": registration.node,
        "ip": registration.ip,
        "public": registration.public,
        "port": or_setting(&registration.port, &settings.port.to_string()),
        "ports": registration.ports,
        "seq": registration.seq,
        "namespace": or_setting(&registration.namespace, &settings.namespace),
        "cluster": or_setting(&registration.cluster, &settings.cluster),
        "binding": or_setting(&registration.binding, &settings.binding),
        "zk": registration.zk,
        "dependencies": dependencies,
        "process": facts.process,
        "state": facts.role.as_str(),
        "status": registration.status,
        "metrics": metrics,
        "uptime": telemetry.uptime(),
        "restarts": facts.restarts,
        "pid": facts.pid,
        "epoch": facts.epoch,
        "session": facts.session.as_str(),
        "zookeeper_error": facts.zookeeper_error,
        "version": AGENT_VERSION,
    })
}

async fn log_lines(request: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    read_body(request.headers(), payload).await?;
    Ok(HttpResponse::Ok().json(crate::logging::recent_lines()))
}

async fn reset(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    read_authorized_body(&request, payload, &state).await?;
    let cluster = state.settings.qualified_cluster();
    match state.session.send(ResetSession).await {
        Ok(Ok(())) => {
            info!("cluster {cluster}: session reset requested over HTTP");
            Ok(HttpResponse::Ok().json(json!({})))
        }
        Ok(Err(reason)) => {
            warn!("cluster {cluster}: session reset requested over HTTP failed: {reason}");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reset failed: {reason}"),
            ))
        }
        Err(error) => {
            error!("cluster {cluster}: session reset not delivered: session actor unreachable ({error})");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reset failed: the ZooKeeper session actor is not running ({error})"),
            ))
        }
    }
}

async fn control(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let outcome = run_control(&request, payload, &state).await;
    let counter = if outcome.is_ok() {
        &state.telemetry.requests_ok
    } else {
        &state.telemetry.requests_failed
    };
    Telemetry::count(counter);
    outcome
}

async fn run_control(
    request: &HttpRequest,
    payload: web::Payload,
    state: &State,
) -> Result<HttpResponse, ApiError> {
    // Credentials first, so that a caller without them learns nothing about the rest.
    let body = read_authorized_body(request, payload, state).await?;

    let verb_text = request.match_info().get("verb").unwrap_or_default();
    let verb = Verb::parse(verb_text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown verb `{verb_text}`; use check, on, off, ok, kill or signal"
        ))
    })?;
    let timeout = parse_timeout(request.match_info().get("timeout"))?;
    let epoch = parse_epoch(request.headers())?;
    let body = parse_body(verb, &body)?;

    let cluster = state.settings.qualified_cluster();
    let started = Instant::now();
    let message = Control {
        verb,
        body,
        epoch,
        deadline: started + timeout,
    };
    let reply = tokio::time::timeout(timeout, state.lifecycle.send(message)).await;
    let elapsed = started.elapsed().as_millis();

    match reply {
        Ok(Ok(Ok(value))) => {
            info!(
                "cluster {cluster}: control {} done in {elapsed} ms",
                verb.as_str()
            );
            let value = if value.is_null() { json!({}) } else { value };
            Ok(HttpResponse::Ok().json(value))
        }
        Ok(Ok(Err(failure))) => {
            let status = StatusCode::from_u16(failure.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            warn!(
                "cluster {cluster}: control {} failed with {} after {elapsed} ms: {failure}",
                verb.as_str(),
                status.as_u16()
            );
            Err(ApiError::new(status, failure.to_string()))
        }
        Ok(Err(error)) => {
            error!("cluster {cluster}: control {} not delivered: lifecycle actor unreachable ({error})", verb.as_str());
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the lifecycle actor is not running ({error})"),
            ))
        }
        Err(_) => {
            warn!(
                "cluster {cluster}: control {} not done within {timeout:?}",
                verb.as_str()
            );
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "control {} not done within {} s",
                    verb.as_str(),
                    timeout.as_secs_f64()
                ),
            ))
        }
    }
}

/// Parses the optional timeout segment of `/control/<verb>/<timeout>`, in seconds.
fn parse_timeout(segment: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = segment else {
        return Ok(DEFAULT_CONTROL_TIMEOUT);
    };
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(ApiError::bad_request(format!(
            "invalid timeout `{text}`: expected a number of seconds above 0 and at most {MAX_SECONDS}"
        ))),
    }
}

/// Parses a control request's body: a cluster view straight into its type for every verb but
/// `signal`, free JSON otherwise. A body that is JSON but not a view is passed on as JSON, so
/// that the lifecycle's reply reports what is wrong with its shape. An empty body is `{}`.
fn parse_body(verb: Verb, body: &[u8]) -> Result<ControlBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ControlBody::Json(json!({})));
    }
    if verb != Verb::Signal {
        if let Ok(view) = serde_json::from_slice::<Cluster>(body) {
            return Ok(ControlBody::View(Box::new(view)));
        }
    }
    serde_json::from_slice(body)
        .map(ControlBody::Json)
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
}

/// Parses the `X-Ochopod-Epoch` header; absent means the request does not come from a leader.
fn parse_epoch(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(EPOCH_HEADER) else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    text.trim().parse::<i64>().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid {EPOCH_HEADER} header `{text}`: expected an integer"
        ))
    })
}

async fn health(state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let facts = state.telemetry.facts();
    if facts.process == ProcessState::Dead {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pod is dead",
        ));
    }
    Ok(HttpResponse::Ok()
        .json(json!({ "ok": true, "process": facts.process, "session": facts.session.as_str() })))
}

async fn metrics(state: web::Data<State>) -> HttpResponse {
    let responses = state
        .responses
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let text = metrics::render(&state.telemetry, &responses);
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(text)
}
