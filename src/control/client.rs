//! The client side of the control API, used by the leader (control requests to every pod) and by
//! the operator commands. It needs a running actix `System`, because `awc` does.

use std::time::Duration;

use actix_web::web::Bytes;
use awc::http::header::{AUTHORIZATION, CONTENT_TYPE};
use awc::http::Method;

use super::EPOCH_HEADER;
use crate::lifecycle::Verb;
use crate::settings::Token;

/// Largest reply body read; a pod's largest reply is `/log`, at most 32 KiB of lines.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Extra time a control request waits past its own timeout, so that the pod's 408 reply, sent
/// when the timeout expires on its side, arrives before the client gives up.
const REPLY_MARGIN: Duration = Duration::from_secs(2);

/// Facts about the sender that a request carries: the epoch of the leader that sends it, and
/// the shared token of the cluster, sent as `Authorization: Bearer`.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// Absent for operators and tools, which are not leaders.
    pub epoch: Option<i64>,
    pub token: Option<Token>,
}

/// A serialized JSON request body. The leader builds one per pod from bytes shared by the whole
/// round, so a round over N pods does not serialize the cluster N times.
#[derive(Clone, Debug)]
pub struct JsonBody(Bytes);

impl JsonBody {
    /// Wraps bytes that hold one JSON document.
    pub fn from_json_bytes(bytes: impl Into<Bytes>) -> Self {
        JsonBody(bytes.into())
    }
}

impl From<&serde_json::Value> for JsonBody {
    fn from(value: &serde_json::Value) -> Self {
        JsonBody(Bytes::from(
            serde_json::to_vec(value).expect("a JSON value always serializes"),
        ))
    }
}

/// Failure to get a usable reply. A reply with an error status is not a failure here, because
/// the caller gets the status and the body.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SendError {
    #[error("request {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("request {url} got no reply within {} s", timeout.as_secs_f64())]
    TimedOut { url: String, timeout: Duration },
    #[error("reply to {url} (status {status}) is not JSON: {reason}")]
    InvalidReply {
        url: String,
        status: u16,
        reason: String,
    },
}

/// Sends `POST /control/<verb>/<timeout>` to the pod at `address` (`ip:port`) with `body` and
/// `credentials`; returns the reply status and JSON body. The request waits for
/// `timeout` plus a margin, so a pod that runs out of time replies 408 instead of the client
/// timing out.
pub async fn send(
    client: &awc::Client,
    address: &str,
    verb: Verb,
    timeout: Duration,
    credentials: &Credentials,
    body: JsonBody,
) -> Result<(u16, serde_json::Value), SendError> {
    let path = format!("/control/{}/{}", verb.as_str(), timeout.as_secs_f64());
    request(
        client,
        Method::POST,
        address,
        &path,
        timeout + REPLY_MARGIN,
        credentials,
        Some(body),
    )
    .await
}

/// Sends one request to the control server at `address` and returns the reply status and JSON
/// body (`null` when the body is empty).
pub async fn request(
    client: &awc::Client,
    method: Method,
    address: &str,
    path: &str,
    timeout: Duration,
    credentials: &Credentials,
    body: Option<JsonBody>,
) -> Result<(u16, serde_json::Value), SendError> {
    let url = format!("http://{address}{path}");
    let exchange = async {
        let mut request = client.request(method, &url).timeout(timeout);
        if let Some(epoch) = credentials.epoch {
            request = request.insert_header((EPOCH_HEADER, epoch.to_string()));
        }
        if let Some(token) = &credentials.token {
            request = request.insert_header((AUTHORIZATION, format!("Bearer {}", token.expose())));
        }
        let sent = match body {
            Some(JsonBody(body)) => {
                request
                    .insert_header((CONTENT_TYPE, "application/json"))
                    .send_body(body)
                    .await
            }
            None => request.send().await,
        };
        let mut response = sent.map_err(|error| match error {
            awc::error::SendRequestError::Timeout => SendError::TimedOut {
                url: url.clone(),
                timeout,
            },
            error => SendError::Request {
                url: url.clone(),
                reason: error.to_string(),
            },
        })?;

        let status = response.status().as_u16();
        let bytes = response
            .body()
            .limit(MAX_REPLY_BYTES)
            .await
            .map_err(|error| SendError::Request {
                url: url.clone(),
                reason: error.to_string(),
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, serde_json::Value::Null));
        }
        let value = serde_json::from_slice(&bytes).map_err(|error| SendError::InvalidReply {
            url: url.clone(),
            status,
            reason: error.to_string(),
        })?;
        Ok((status, value))
    };

    match tokio::time::timeout(timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(SendError::TimedOut {
            url: url.clone(),
            timeout,
        }),
    }
}
