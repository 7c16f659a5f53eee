//! Hostile and heavy HTTP input against the control server of a real `ochopod` pod: malformed
//! bodies and paths, oversized bodies, bursts of concurrent requests and idle connections. Every
//! rejection must be a 4xx with a JSON `error`, and the pod must keep running its sub-process.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::pods::{http, http_with_headers, PodProcess, PodSpec};
use support::{shared_server, unique_namespace, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// `signaled` hook: records `begin <body>` and `end <body>` around a short pause, then replies
/// with the body it got.
const SIGNALED_HOOK: &str = r#"#!/bin/sh
body=$(cat)
echo "begin $body" >> signals
sleep 0.01
echo "end $body" >> signals
printf '{"got": %s}' "$body"
"#;

fn write_hook(dir: &Path, name: &str, script: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

/// A one-pod cluster with the recording `signaled` hook, its sub-process running.
struct Fixture {
    pod: PodProcess,
    /// Pid of the sub-process once configured, which must not change.
    pid: i64,
    _root: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let hook = write_hook(root.path(), "signaled", SIGNALED_HOOK);
        let server = shared_server();
        let spec = PodSpec::new(&server.connect_string(), &unique_namespace("http"), "web")
            .arg("--hooks")
            .arg(&format!("signaled={hook}"))
            .shell("exec sleep 600");
        let pod = PodProcess::start(root.path(), "pod", &spec);
        let pid = wait_until(WAIT, "the sub-process running", || {
            let info = pod.info()?;
            (info["process"] == "running")
                .then(|| info["pid"].as_i64())
                .flatten()
        });
        Fixture {
            pod,
            pid,
            _root: root,
        }
    }

    fn port(&self) -> u16 {
        self.pod.control_port
    }

    /// Asserts that the pod still runs the same sub-process, never restarted, and is healthy.
    fn assert_unharmed(&self) {
        let (status, health) = http(self.port(), "GET", "/health", "").unwrap();
        assert_eq!(status, 200, "{health}");
        let info = self.pod.info().expect("/info answers");
        assert_eq!(info["process"], "running", "{info}");
        assert_eq!(info["pid"].as_i64(), Some(self.pid), "{info}");
        assert_eq!(info["restarts"], 0, "{info}");
    }

    /// Returns the lines the `signaled` hook recorded.
    fn signals(&self) -> Vec<String> {
        fs::read_to_string(self.pod.dir.join("signals"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Sends raw bytes and returns the status and JSON body of the reply. A server may close the
/// connection before it has read a body it rejects; the reply is read all the same.
fn raw_request(port: u16, head: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may reply (413, 431) and close while the request is still being sent.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);

    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => reply.extend_from_slice(&chunk[..read]),
            Err(error) if reply.is_empty() => panic!("no reply: {error}"),
            Err(_) => break,
        }
        if complete_reply(&reply) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Tells whether `reply` contains a whole response with a `content-length` body.
fn complete_reply(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .is_some_and(|length| body.len() >= length)
}

fn assert_rejected(case: &str, status: u16, reply: &Value, expected_status: u16, words: &str) {
    assert_eq!(status, expected_status, "{case}: {reply}");
    let error = reply["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no JSON error in {reply}"));
    assert!(
        error.to_lowercase().contains(&words.to_lowercase()),
        "{case}: `{error}` does not mention `{words}`"
    );
}

#[test]
fn malformed_requests_rejected_pod_unharmed() {
    let fixture = Fixture::start();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "invalid JSON",
            "/control/check",
            "{not json".into(),
            400,
            "invalid JSON body",
        ),
        (
            "truncated JSON",
            "/control/on",
            r#"{"pods": {"#.into(),
            400,
            "invalid JSON body",
        ),
        (
            "control characters",
            "/control/check",
            "\u{0}\u{1}".into(),
            400,
            "invalid JSON body",
        ),
        (
            "nested too deep",
            "/control/signal",
            deep,
            400,
            "recursion limit",
        ),
        (
            "array view",
            "/control/on",
            "[1, 2]".into(),
            400,
            "must be a cluster view",
        ),
        (
            "string view",
            "/control/check",
            "\"pods\"".into(),
            400,
            "must be a cluster view",
        ),
        (
            "pods of wrong type",
            "/control/on",
            r#"{"pods": 5}"#.into(),
            400,
            "invalid cluster view",
        ),
        (
            "pod of wrong type",
            "/control/check",
            r#"{"pods": {"a": {"ip": 5}}}"#.into(),
            400,
            "invalid cluster view",
        ),
        (
            "empty view",
            "/control/check",
            "{}".into(),
            400,
            "has no `key`",
        ),
        (
            "view without the receiving pod",
            "/control/on",
            r#"{"key": "a", "pods": {"b": {}}, "dependencies": {}}"#.into(),
            400,
            "is not a view of this pod",
        ),
        (
            "view without pods",
            "/control/ok",
            r#"{"key": "a"}"#.into(),
            400,
            "is not one of its 0 `pods`",
        ),
        (
            "unknown verb",
            "/control/explode",
            "{}".into(),
            400,
            "unknown verb `explode`",
        ),
        (
            "verb in capitals",
            "/control/ON",
            "{}".into(),
            400,
            "unknown verb",
        ),
        (
            "non-numeric timeout",
            "/control/check/soon",
            "{}".into(),
            400,
            "invalid timeout `soon`",
        ),
        (
            "negative timeout",
            "/control/check/-5",
            "{}".into(),
            400,
            "invalid timeout `-5`",
        ),
        (
            "zero timeout",
            "/control/check/0",
            "{}".into(),
            400,
            "above 0",
        ),
        (
            "huge timeout",
            "/control/check/1e300",
            "{}".into(),
            400,
            "at most 86400",
        ),
        (
            "overflowing timeout",
            "/control/check/99999999999999999999999",
            "{}".into(),
            400,
            "invalid timeout",
        ),
        (
            "infinite timeout",
            "/control/check/inf",
            "{}".into(),
            400,
            "invalid timeout",
        ),
        (
            "NaN timeout",
            "/control/check/NaN",
            "{}".into(),
            400,
            "invalid timeout",
        ),
        (
            "extra path segment",
            "/control/check/5/6",
            "{}".into(),
            404,
            "no such endpoint",
        ),
        (
            "unknown endpoint",
            "/controls",
            "{}".into(),
            404,
            "no such endpoint",
        ),
    ];
    for (case, path, body, status, words) in &cases {
        let (got, reply) = http(fixture.port(), "POST", path, body).unwrap();
        assert_rejected(case, got, &reply, *status, words);
    }

    let (status, reply) = http_with_headers(
        fixture.port(),
        "POST",
        "/control/check",
        "{}",
        &[("X-Ochopod-Epoch", "yesterday")],
    )
    .unwrap();
    assert_rejected("invalid epoch", status, &reply, 400, "X-Ochopod-Epoch");

    let (status, reply) = http(fixture.port(), "GET", "/control/check", "").unwrap();
    assert_rejected("GET on a verb", status, &reply, 405, "use POST");
    let (status, reply) = http(fixture.port(), "DELETE", "/info", "").unwrap();
    assert_rejected("DELETE /info", status, &reply, 405, "use GET or POST");

    // None of it reached the lifecycle: the hook never ran.
    assert!(fixture.signals().is_empty(), "{:?}", fixture.signals());
    fixture.assert_unharmed();
}

#[test]
fn protocol_errors_get_4xx() {
    let fixture = Fixture::start();
    let big_header = format!(
        "GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let cases = [
        ("garbage request line", "GARBAGE\r\n\r\n".to_string(), 400),
        ("header over the limit", big_header, 431),
        (
            "non-numeric length",
            "POST /control/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n"
                .to_string(),
            400,
        ),
        (
            "length and chunked together",
            "POST /control/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_string(),
            400,
        ),
    ];
    // NOTE: these replies come from the HTTP parser of actix-http before any handler runs, so
    // they have an empty body instead of a JSON `error`.
    for (case, request, expected) in cases {
        let (status, _) = raw_request(fixture.port(), &request, b"");
        assert_eq!(status, expected, "{case}");
    }
    assert!(fixture.signals().is_empty());
    fixture.assert_unharmed();
}

#[test]
fn oversized_bodies_get_413() {
    let fixture = Fixture::start();
    let body = vec![b' '; 2 * 1024 * 1024];

    for path in ["/control/signal", "/info", "/reset"] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let (status, reply) = raw_request(fixture.port(), &head, &body);
        assert_rejected(&format!("announced {path}"), status, &reply, 413, "1 MiB");
    }

    // Without a length, the server counts while it reads.
    let mut chunked = Vec::new();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend_from_slice(&[b' '; 64 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /control/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (status, reply) = raw_request(fixture.port(), head, &chunked);
    assert_rejected("chunked", status, &reply, 413, "1 MiB");

    // Exactly 1 MiB is still accepted.
    let mut limit = vec![b' '; 1024 * 1024];
    limit[..2].copy_from_slice(b"{}");
    let head = format!(
        "POST /control/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        limit.len()
    );
    let (status, reply) = raw_request(fixture.port(), &head, &limit);
    assert_eq!(status, 200, "{reply}");

    assert_eq!(
        fixture.signals().len(),
        2,
        "only the accepted body ran the hook"
    );
    fixture.assert_unharmed();
}

#[test]
fn concurrent_signals_all_served_one_at_a_time() {
    let fixture = Fixture::start();
    let port = fixture.port();
    let start = Arc::new(Barrier::new(50));

    let senders: Vec<_> = (0..50)
        .map(|n| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let body = format!(r#"{{"n":{n}}}"#);
                http(port, "POST", "/control/signal", &body).unwrap()
            })
        })
        .collect();
    for (n, sender) in senders.into_iter().enumerate() {
        let (status, reply) = sender.join().unwrap();
        assert_eq!(status, 200, "request {n}: {reply}");
        assert_eq!(reply["got"]["n"], n, "request {n}: {reply}");
    }

    // One hook at a time: every `begin` is followed by its own `end`.
    let lines = fixture.signals();
    assert_eq!(lines.len(), 100, "{lines:?}");
    let mut seen = Vec::new();
    for pair in lines.chunks(2) {
        let begin = pair[0].strip_prefix("begin ").expect("begin line");
        let end = pair[1].strip_prefix("end ").expect("end line");
        assert_eq!(begin, end, "two hooks overlapped: {pair:?}");
        let body: Value = serde_json::from_str(begin).unwrap();
        seen.push(body["n"].as_u64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<u64>>(), "a request was lost");
    fixture.assert_unharmed();
}

#[test]
fn queued_signals_served_in_arrival_order() {
    let fixture = Fixture::start();
    let port = fixture.port();

    // The first request keeps the lifecycle busy while the others arrive one after another.
    let first = thread::spawn(move || http(port, "POST", "/control/signal", r#"{"n":0}"#).unwrap());
    wait_until(WAIT, "the first hook running", || {
        !fixture.signals().is_empty()
    });

    let mut streams = Vec::new();
    for n in 1..20 {
        let body = format!(r#"{{"n":{n}}}"#);
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let request = format!(
            "POST /control/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        streams.push(stream);
        // A round trip on another connection gives the server's single worker time to read
        // this request before the next one goes out.
        let (status, _) = http(port, "GET", "/health", "").unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(first.join().unwrap().0, 200);
    for mut stream in streams {
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    let order: Vec<u64> = fixture
        .signals()
        .iter()
        .filter_map(|line| line.strip_prefix("begin "))
        .map(|body| {
            serde_json::from_str::<Value>(body).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, (0..20).collect::<Vec<u64>>());
}

#[test]
fn thousand_concurrent_info_requests() {
    let fixture = Fixture::start();
    let port = fixture.port();
    let start = Arc::new(Barrier::new(1000));

    let began = Instant::now();
    let clients: Vec<_> = (0..1000)
        .map(|_| {
            let start = start.clone();
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    start.wait();
                    http(port, "GET", "/info", "").map(|(status, _)| status)
                })
                .unwrap()
        })
        .collect();
    let statuses: Vec<_> = clients
        .into_iter()
        .map(|client| client.join().unwrap())
        .collect();
    let elapsed = began.elapsed();
    eprintln!("1000 concurrent /info requests served in {elapsed:?}");

    let failed: Vec<_> = statuses
        .iter()
        .filter(|status| !matches!(status, Ok(200)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(elapsed < WAIT, "1000 requests took {elapsed:?}");
    fixture.assert_unharmed();
}

#[test]
fn idle_connections_do_not_block() {
    let fixture = Fixture::start();
    let port = fixture.port();

    // Connections that send nothing, and connections that stop in the middle of a request head.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    for _ in 0..50 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(b"POST /control/signal HTTP/1.1\r\nHost: 127.")
            .unwrap();
        idle.push(stream);
    }

    let (status, info) = http(port, "GET", "/info", "").unwrap();
    assert_eq!(status, 200, "{info}");
    // Served while they were still open, not after the server dropped them.
    assert!(
        still_open(&idle[idle.len() - 1]),
        "/info was only served once the idle connections had been closed"
    );

    // The server drops connections that never finish their request head, so they cannot pile up.
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        let outcome = stream.read_to_end(&mut rest);
        assert!(
            outcome.is_ok(),
            "an idle connection was kept open for 20 s: {outcome:?}"
        );
    }
    assert!(fixture.signals().is_empty());
    fixture.assert_unharmed();
}

/// Tells whether the server has neither closed nor reset `stream`, without consuming data.
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open = match stream.peek(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    open
}

#[test]
fn stalled_bodies_get_408_and_close() {
    let fixture = Fixture::start();

    // Open endpoints accept a body too, so no token would stop this.
    for path in ["/info", "/control/signal"] {
        let mut stream = TcpStream::connect(("127.0.0.1", fixture.port())).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{\"a\":"
        );
        stream.write_all(head.as_bytes()).unwrap();

        let mut reply = Vec::new();
        let outcome = stream.read_to_end(&mut reply);
        assert!(
            outcome.is_ok(),
            "{path}: the connection with a stalled body stayed open: {outcome:?}"
        );
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let error: Value = serde_json::from_str(body).unwrap();
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains("did not arrive"), "{path}: {message}");
        assert!(message.contains("5 bytes of 1000"), "{path}: {message}");
    }

    assert!(fixture.signals().is_empty());
    fixture.assert_unharmed();
}

#[test]
fn unread_replies_close_connection() {
    let fixture = Fixture::start();
    let stream = TcpStream::connect(("127.0.0.1", fixture.port())).unwrap();
    stream.set_nonblocking(true).unwrap();

    // Pipelined requests whose replies are never read, until both directions are full.
    let request = b"GET /log HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut blocked_since: Option<Instant> = None;
    let flood_deadline = Instant::now() + WAIT;
    while blocked_since.is_none_or(|since| since.elapsed() < Duration::from_secs(1)) {
        assert!(Instant::now() < flood_deadline, "the server kept reading");
        match (&stream).write(request) {
            Ok(_) => blocked_since = None,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                blocked_since.get_or_insert_with(Instant::now);
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("the server closed the connection while it was read: {error}"),
        }
    }

    // Meanwhile the pod serves others.
    fixture.assert_unharmed();

    // The server gives the connection up; a write then fails instead of blocking.
    wait_until(
        Duration::from_secs(60),
        "the stalled connection closed",
        || match (&stream).write(b"G") {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => None,
            Ok(_) => None,
            Err(_) => Some(()),
        },
    );
    wait_until(WAIT, "the stall logged", || {
        fixture
            .pod
            .log_text()
            .contains("read none of its replies")
            .then_some(())
    });
    fixture.assert_unharmed();
}
