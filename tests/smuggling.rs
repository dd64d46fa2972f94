//! Request smuggling and hostile clients (issue "Reliability and security", downstream part).
//!
//! Every attack is sent on a raw socket, followed by a second, legitimate request pipelined
//! on the same connection. The upstream is a strict raw-socket parser that records the bytes
//! it receives and every request it can frame (RFC 9112, no leniency), so each case checks
//! exactly what the upstream saw: nothing smuggled, nothing ambiguous, nothing but the
//! requests the client sent as separate requests.
//!
//! `SMUGGLING_TRACE=1 cargo test --test smuggling -- --nocapture --test-threads 1` prints
//! what each case produced (statuses, close, what the upstream completed).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openai_stream_proxy::{ProxyService, Server, UpstreamUrl};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

// ---------------------------------------------------------------------------------------
// The strict upstream.
// ---------------------------------------------------------------------------------------

/// One request as the strict upstream framed it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The whole message arrived (a body cut by a closed connection is not complete).
    complete: bool,
    /// Anything a lenient parser could read differently from a strict one.
    violations: Vec<String>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A raw HTTP/1.1 upstream with a strict parser; it answers each complete request with
/// `200` and the body `"<method> <target> <body length>"`, keeping the connection alive.
struct StrictUpstream {
    upstream: RawUpstream,
    seen: Arc<Mutex<Vec<Seen>>>,
    raw: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<Open>,
}

/// Open upstream connections, and a signal when one ends.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    changed: Notify,
}

impl StrictUpstream {
    async fn start() -> StrictUpstream {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let raw: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let open: Arc<Open> = Arc::default();
        let (s, r, o) = (seen.clone(), raw.clone(), open.clone());
        let upstream = RawUpstream::start(move |stream| {
            let (seen, raw, open) = (s.clone(), r.clone(), o.clone());
            open.count.fetch_add(1, Ordering::SeqCst);
            async move {
                serve_strict(stream, seen, raw).await;
                open.count.fetch_sub(1, Ordering::SeqCst);
                open.changed.notify_waiters();
            }
        })
        .await;
        StrictUpstream {
            upstream,
            seen,
            raw,
            open,
        }
    }

    /// Waits (bounded) until every upstream connection has ended, so that what a closed
    /// connection left unfinished has been recorded too.
    async fn settle(&self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let changed = self.open.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            let _ = tokio::time::timeout_at(deadline.into(), changed).await;
        }
        panic!("upstream connections still open {WAIT:?} after the proxy stopped");
    }

    fn url(&self) -> String {
        self.upstream.url()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Everything the upstream received, all connections, for failure messages.
    fn raw_text(&self) -> String {
        self.raw
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, bytes)| format!("[conn {i}] {:?}", String::from_utf8_lossy(bytes)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A connection's read side that logs every byte it reads.
struct Logged {
    stream: TcpStream,
    buf: Vec<u8>,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    index: usize,
}

impl Logged {
    /// Reads more bytes; `false` at EOF, error or after `WAIT` of silence.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.log.lock().unwrap()[self.index].extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// Takes bytes up to and including the first occurrence of `end`.
    async fn take_through(&mut self, end: &[u8], cap: usize) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, end) {
                return Some(self.buf.drain(..i + end.len()).collect());
            }
            if self.buf.len() > cap || !self.fill().await {
                return None;
            }
        }
    }

    async fn take_exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

async fn serve_strict(
    stream: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    raw: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    let index = {
        let mut raw = raw.lock().unwrap();
        raw.push(Vec::new());
        raw.len() - 1
    };
    let mut conn = Logged {
        stream,
        buf: Vec::new(),
        log: raw,
        index,
    };
    for _ in 0..64 {
        // The head ends at the first empty line; a lenient sender's bare LF must not make
        // this parser hang, so "\n\n" also ends it (and is reported as a violation).
        let head = loop {
            let crlf = find(&conn.buf, b"\r\n\r\n").map(|i| i + 4);
            let lf = find(&conn.buf, b"\n\n").map(|i| i + 2);
            let end = match (crlf, lf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(end) = end {
                break Some(conn.buf.drain(..end).collect::<Vec<u8>>());
            }
            if conn.buf.len() > 256 * 1024 || !conn.fill().await {
                break None;
            }
        };
        let Some(head) = head else {
            if !conn.buf.is_empty() {
                seen.lock().unwrap().push(Seen {
                    method: String::new(),
                    target: String::new(),
                    headers: Vec::new(),
                    body: Vec::new(),
                    complete: false,
                    violations: vec![format!(
                        "connection ended inside a request head: {:?}",
                        String::from_utf8_lossy(&conn.buf)
                    )],
                });
            }
            return;
        };
        let mut request = parse_head(&head);
        let framing = framing(&mut request);
        let complete = match framing {
            Framing::None => true,
            Framing::Length(n) => match conn.take_exact(n).await {
                Some(body) => {
                    request.body = body;
                    true
                }
                None => {
                    request.body = std::mem::take(&mut conn.buf);
                    false
                }
            },
            Framing::Chunked => read_chunked(&mut conn, &mut request).await,
            Framing::Invalid => false,
        };
        request.complete = complete;
        let answer = format!(
            "{} {} {}",
            request.method,
            request.target,
            request.body.len()
        );
        seen.lock().unwrap().push(request);
        if !complete {
            return;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if conn.stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn parse_head(head: &[u8]) -> Seen {
    let mut violations = Vec::new();
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            violations.push(format!("bare LF at byte {i}"));
        }
        if b == b'\r' && head.get(i + 1) != Some(&b'\n') {
            violations.push(format!("bare CR at byte {i}"));
        }
    }
    let text = String::from_utf8_lossy(head).into_owned();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default().to_owned();
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" {
        violations.push(format!("malformed request line {request_line:?}"));
    }
    let method = parts.first().copied().unwrap_or_default().to_owned();
    let target = parts.get(1).copied().unwrap_or_default().to_owned();
    if !method.bytes().all(is_tchar) || method.is_empty() {
        violations.push(format!("bad method {method:?}"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        violations.push(format!("target not in origin-form: {target:?}"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            violations.push(format!("obs-fold line {line:?}"));
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            violations.push(format!("header line without colon {line:?}"));
            continue;
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            violations.push(format!("bad header name {name:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            violations.push(format!("control character in {name}: {value:?}"));
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    Seen {
        method,
        target,
        headers,
        body: Vec::new(),
        complete: false,
        violations,
    }
}

enum Framing {
    None,
    Length(usize),
    Chunked,
    Invalid,
}

/// RFC 9112 §6.3, strictly: anything ambiguous is a violation and the message unframeable.
fn framing(request: &mut Seen) -> Framing {
    let te: Vec<String> = request
        .header("transfer-encoding")
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cl: Vec<String> = request
        .header("content-length")
        .iter()
        .map(|s| s.to_string())
        .collect();
    let hosts = request.header("host").len();
    if hosts != 1 {
        request.violations.push(format!("{hosts} host headers"));
    }
    if !te.is_empty() && !cl.is_empty() {
        request
            .violations
            .push("both transfer-encoding and content-length".into());
        return Framing::Invalid;
    }
    if !te.is_empty() {
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") {
            request
                .violations
                .push(format!("transfer-encoding other than one chunked: {te:?}"));
            return Framing::Invalid;
        }
        return Framing::Chunked;
    }
    match cl.as_slice() {
        [] => Framing::None,
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) => {
            match one.parse::<usize>() {
                Ok(n) if n <= 64 * 1024 * 1024 => Framing::Length(n),
                _ => {
                    request.violations.push(format!("content-length {one:?}"));
                    Framing::Invalid
                }
            }
        }
        _ => {
            request
                .violations
                .push(format!("ambiguous content-length {cl:?}"));
            Framing::Invalid
        }
    }
}

/// Strict chunked body (hex size, optional extension, CRLF, data, CRLF; trailers ignored).
async fn read_chunked(conn: &mut Logged, request: &mut Seen) -> bool {
    for _ in 0..100_000 {
        let Some(line) = conn.take_through(b"\r\n", 4096).await else {
            return false;
        };
        let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let size = line.split(';').next().unwrap_or_default();
        if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            request
                .violations
                .push(format!("invalid chunk size line {line:?}"));
            return false;
        }
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            // Trailer section up to the empty line.
            loop {
                match conn.take_through(b"\r\n", 64 * 1024).await {
                    Some(line) if line == b"\r\n" => return true,
                    Some(_) => continue,
                    None => return false,
                }
            }
        }
        let Some(data) = conn.take_exact(size + 2).await else {
            return false;
        };
        if !data.ends_with(b"\r\n") {
            request
                .violations
                .push("chunk data not followed by CRLF".into());
            return false;
        }
        request.body.extend_from_slice(&data[..size]);
    }
    false
}

// ---------------------------------------------------------------------------------------
// The client side.
// ---------------------------------------------------------------------------------------

/// One response the client received.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// What came back on the client's connection.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    /// The connection was closed by the proxy (EOF or reset) within the wait.
    closed: bool,
    /// Bytes left after the last complete response (a cut or garbled response).
    leftover: Vec<u8>,
    raw: Vec<u8>,
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it (bounded).
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> Exchange {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    // The proxy may close before it has read everything: write errors are expected.
    let _ = stream.write_all(bytes).await;
    let mut raw = Vec::new();
    let mut closed = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let (answers, leftover) = parse_responses(&raw);
    Exchange {
        answers,
        closed,
        leftover,
        raw,
    }
}

/// Splits a byte stream into HTTP/1.1 responses (content-length or chunked framing).
fn parse_responses(raw: &[u8]) -> (Vec<Answer>, Vec<u8>) {
    let mut answers = Vec::new();
    let mut rest = raw;
    while let Some(end) = find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let mut body_start = &rest[end + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let body;
        if head.contains("transfer-encoding: chunked") {
            let mut collected = Vec::new();
            loop {
                let Some(i) = find(body_start, b"\r\n") else {
                    return (answers, rest.to_vec());
                };
                let size = std::str::from_utf8(&body_start[..i]).ok().and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap().trim(), 16).ok()
                });
                let Some(size) = size else {
                    return (answers, rest.to_vec());
                };
                if body_start.len() < i + 2 + size + 2 {
                    return (answers, rest.to_vec());
                }
                collected.extend_from_slice(&body_start[i + 2..i + 2 + size]);
                body_start = &body_start[i + 2 + size + 2..];
                if size == 0 {
                    break;
                }
            }
            body = collected;
        } else {
            let n = length.unwrap_or(0);
            if body_start.len() < n {
                return (answers, rest.to_vec());
            }
            body = body_start[..n].to_vec();
            body_start = &body_start[n..];
        }
        answers.push(Answer { status, body });
        rest = body_start;
    }
    (answers, rest.to_vec())
}

/// The legitimate request pipelined after every attack.
const SECOND: &str = "GET /second HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n";

/// A request line the strict upstream must never see: the smuggled one.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: client.example\r\n\r\n";

/// What the upstream must have seen, complete, in order: (method, target, body).
type Expected = &'static [(&'static str, &'static str, &'static str)];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// `400` (or another 4xx) from the proxy, connection closed, nothing complete upstream.
    Rejected(u16),
    /// The proxy closed without a response; nothing complete upstream.
    Closed,
    /// Forwarded, re-framed, as exactly these requests; then the connection closed
    /// without serving the pipelined request (RFC 9112 §6.1 for CL+TE).
    ForwardedThenClosed(Expected),
    /// Forwarded and the pipelined request served too: both answered by the upstream.
    Forwarded(Expected),
}

struct Case {
    name: &'static str,
    /// The attack; `SECOND` is appended.
    attack: String,
    /// Safe outcomes, the first being the one observed today.
    allowed: &'static [Outcome],
}

fn case(name: &'static str, attack: impl Into<String>, allowed: &'static [Outcome]) -> Case {
    Case {
        name,
        attack: attack.into(),
        allowed,
    }
}

const REJECTED: &[Outcome] = &[Outcome::Rejected(400), Outcome::Closed];

async fn proxy_with_strict_upstream() -> (StrictUpstream, ProxyHandle) {
    let upstream = StrictUpstream::start().await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    (upstream, proxy)
}

/// Runs one case on a fresh proxy and upstream; returns a failure description or `None`.
async fn run_case(case: &Case) -> Option<String> {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let mut bytes = case.attack.clone().into_bytes();
    bytes.extend_from_slice(SECOND.as_bytes());
    let got = exchange(proxy.addr, &bytes).await;
    // Let the upstream finish recording what it was sent (it reads until the proxy's
    // upstream connection closes or goes idle; the proxy is stopped first).
    proxy.shutdown().await;
    upstream.settle().await;
    let seen = upstream.seen();
    let mut problems = Vec::new();

    // Invariants, whatever the outcome.
    for s in &seen {
        if !s.violations.is_empty() {
            problems.push(format!(
                "upstream saw an ambiguous message: {:?}",
                s.violations
            ));
        }
        if s.target.contains("smuggled") {
            problems.push(format!("upstream saw the smuggled request: {s:?}"));
        }
        if s.header("host") != [upstream.upstream.addr.to_string().as_str()] {
            problems.push(format!("upstream host header {:?}", s.header("host")));
        }
    }
    if !got.leftover.is_empty() {
        problems.push(format!(
            "client got a cut or garbled response: {:?}",
            String::from_utf8_lossy(&got.leftover)
        ));
    }
    if !got.closed {
        problems.push(
            "the connection was still open 5 s after the pipelined `Connection: close` request"
                .into(),
        );
    }

    let complete: Vec<(String, String, Vec<u8>)> = seen
        .iter()
        .filter(|s| s.complete)
        .map(|s| (s.method.clone(), s.target.clone(), s.body.clone()))
        .collect();
    let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
    let matches = |outcome: &Outcome| -> bool {
        let forwarded = |expected: Expected| {
            complete.len() == expected.len()
                && complete.iter().zip(expected).all(|(got, want)| {
                    got.0 == want.0 && got.1 == want.1 && got.2 == want.2.as_bytes()
                })
        };
        match outcome {
            Outcome::Rejected(status) => complete.is_empty() && statuses == [*status],
            Outcome::Closed => complete.is_empty() && statuses.is_empty(),
            Outcome::ForwardedThenClosed(expected) => {
                forwarded(expected)
                    && statuses.len() == expected.len()
                    && statuses.iter().all(|s| *s == 200)
            }
            Outcome::Forwarded(expected) => {
                forwarded(expected)
                    && expected.last().map(|e| e.1) == Some("/second")
                    && statuses.len() == expected.len()
                    && statuses.iter().all(|s| *s == 200)
            }
        }
    };
    if std::env::var_os("SMUGGLING_TRACE").is_some() {
        eprintln!(
            "{:<70} client {statuses:?} closed={} | upstream complete {:?}",
            case.name,
            got.closed,
            complete
                .iter()
                .map(|(m, t, b)| format!("{m} {t} {:?}", String::from_utf8_lossy(b)))
                .collect::<Vec<_>>()
        );
    }
    if !case.allowed.iter().any(matches) {
        problems.push(format!(
            "outcome not allowed: client got statuses {statuses:?}, upstream completed {:?}; allowed {:?}",
            complete
                .iter()
                .map(|(m, t, b)| format!("{m} {t} ({} body bytes: {:?})", b.len(), String::from_utf8_lossy(b)))
                .collect::<Vec<_>>(),
            case.allowed
        ));
    }
    if problems.is_empty() {
        None
    } else {
        Some(format!(
            "case {:?}:\n  - {}\n  client received: {:?}\n  upstream received:\n{}",
            case.name,
            problems.join("\n  - "),
            String::from_utf8_lossy(&got.raw),
            upstream.raw_text()
        ))
    }
}

async fn run_cases(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        if let Some(failure) = run_case(case).await {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

fn post(headers: &str, body: &str) -> String {
    format!("POST /a HTTP/1.1\r\nHost: client.example\r\n{headers}\r\n{body}")
}

// ---------------------------------------------------------------------------------------
// Content-Length and Transfer-Encoding.
// ---------------------------------------------------------------------------------------

/// The classic CL.TE and TE.CL payloads: hyper lets Transfer-Encoding win and drops
/// Content-Length; the request is re-framed upstream and the connection is closed after the
/// response (RFC 9112 §6.1), so the bytes a Content-Length reader would have taken as a
/// second request are never parsed. (The proxy's own CL+TE refusal in `route()` never
/// sees such a request: hyper has removed Content-Length before the service is called.)
#[tokio::test]
async fn content_length_with_transfer_encoding_is_reframed_and_the_connection_closed() {
    let smuggled_chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    run_cases(vec![
        case(
            "CL.TE: content-length covers a smuggled request after the last chunk",
            post(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    cl_te_body.len()
                ),
                &cl_te_body,
            ),
            &[
                Outcome::ForwardedThenClosed(&[("POST", "/a", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "TE.CL: transfer-encoding first, content-length covers only the chunk size",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                &smuggled_chunk,
            ),
            &[
                Outcome::ForwardedThenClosed(&[("POST", "/a", SMUGGLED)]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "CL.TE with a lower-case, tab-separated chunked",
            post(
                &format!(
                    "content-length: {}\r\ntransfer-encoding:\tCHUNKED\r\n",
                    cl_te_body.len()
                ),
                &cl_te_body,
            ),
            &[
                Outcome::ForwardedThenClosed(&[("POST", "/a", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "content-length: 0 with transfer-encoding",
            post(
                "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                &smuggled_chunk,
            ),
            &[
                Outcome::ForwardedThenClosed(&[("POST", "/a", SMUGGLED)]),
                Outcome::Rejected(400),
            ],
        ),
    ])
    .await;
}

#[tokio::test]
async fn obfuscated_transfer_encodings_are_rejected() {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let with_cl = |te: &str| {
        post(
            &format!("Content-Length: {}\r\n{te}\r\n", body.len()),
            &body,
        )
    };
    run_cases(vec![
        case("xchunked", with_cl("Transfer-Encoding: xchunked"), REJECTED),
        case("chunked-x", with_cl("Transfer-Encoding: chunked-x"), REJECTED),
        case(
            "chunked, identity (chunked not last)",
            with_cl("Transfer-Encoding: chunked, identity"),
            REJECTED,
        ),
        case("identity", with_cl("Transfer-Encoding: identity"), REJECTED),
        case("quoted", with_cl("Transfer-Encoding: \"chunked\""), REJECTED),
        case(
            "space before the colon",
            with_cl("Transfer-Encoding : chunked"),
            REJECTED,
        ),
        case(
            "vertical tab before the value",
            with_cl("Transfer-Encoding:\x0bchunked"),
            REJECTED,
        ),
        case(
            "form feed before the value",
            with_cl("Transfer-Encoding:\x0cchunked"),
            REJECTED,
        ),
        case(
            "a second transfer-encoding line that is not chunked",
            with_cl("Transfer-Encoding: chunked\r\nTransfer-Encoding: x"),
            REJECTED,
        ),
        case(
            "obs-fold continuation of transfer-encoding",
            with_cl("Transfer-Encoding:\r\n chunked"),
            REJECTED,
        ),
        case(
            "NUL inside the value",
            with_cl("Transfer-Encoding: chunked\x00"),
            REJECTED,
        ),
        case(
            "transfer-encoding in HTTP/1.0",
            format!(
                "POST /a HTTP/1.0\r\nHost: client.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            REJECTED,
        ),
        case(
            "chunked without content-length, not last",
            post("Transfer-Encoding: chunked, gzip\r\n", "0\r\n\r\n"),
            REJECTED,
        ),
    ])
    .await;
}

#[tokio::test]
async fn conflicting_or_malformed_content_lengths_are_rejected() {
    let body = SMUGGLED;
    let n = body.len();
    run_cases(vec![
        case(
            "two different content-length lines",
            post(
                &format!("Content-Length: 5\r\nContent-Length: {n}\r\n"),
                body,
            ),
            REJECTED,
        ),
        case(
            "a list of two different lengths",
            post(&format!("Content-Length: 5, {n}\r\n"), body),
            REJECTED,
        ),
        case(
            "plus sign",
            post(&format!("Content-Length: +{n}\r\n"), body),
            REJECTED,
        ),
        case("negative", post("Content-Length: -1\r\n", body), REJECTED),
        case(
            "hexadecimal",
            post("Content-Length: 0x2f\r\n", body),
            REJECTED,
        ),
        case("empty value", post("Content-Length:\r\n", body), REJECTED),
        case(
            "overflowing u64",
            post("Content-Length: 99999999999999999999999\r\n", body),
            REJECTED,
        ),
        case(
            "obs-fold continuation of content-length",
            post(&format!("Content-Length:\r\n {n}\r\n"), body),
            REJECTED,
        ),
        case(
            "identical duplicates are one length (RFC 9112 §6.3)",
            post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
            &[Outcome::Forwarded(&[
                ("POST", "/a", "hello"),
                ("GET", "/second", ""),
            ])],
        ),
    ])
    .await;
}

/// RFC 9112 §6.1: "A server that receives a request message with a transfer coding it does
/// not understand SHOULD respond with 501 (Not Implemented)." hyper only decodes the final
/// `chunked` and the proxy drops `Transfer-Encoding` as hop-by-hop, so the upstream gets
/// the still gzip-coded bytes as if they were the body, with nothing saying they are coded.
/// Not a desync (the message is re-framed), but a silently corrupted request; nginx answers
/// 501, HAProxy 422.
#[tokio::test]
async fn unsupported_transfer_codings_are_refused_not_dropped() {
    let allowed: &[Outcome] = &[
        Outcome::Rejected(501),
        Outcome::Rejected(400),
        Outcome::Closed,
    ];
    run_cases(vec![
        case(
            "gzip, chunked",
            post(
                "Transfer-Encoding: gzip, chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            allowed,
        ),
        case(
            "deflate on its own line, then chunked",
            post(
                "Transfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            allowed,
        ),
    ])
    .await;
}

/// The same on the way back: an upstream response in `gzip, chunked` would reach the
/// client un-chunked but still gzip-coded, with the only header saying so dropped as
/// hop-by-hop. It is a 502 instead; `chunked` passes (with the no-op `identity` too), and
/// so does a bodiless answer whatever it names.
#[tokio::test]
async fn responses_in_unsupported_transfer_codings_are_refused_not_relayed() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let head = read_head(&mut stream).await;
        let (coding, body) = if head.starts_with("GET /gzip") {
            ("gzip, chunked", "5\r\nhello\r\n0\r\n\r\n")
        } else if head.starts_with("GET /identity") {
            // The obsolete no-op coding: the body is not coded, and goes through.
            ("identity, chunked", "5\r\nhello\r\n0\r\n\r\n")
        } else if head.starts_with("HEAD") {
            ("gzip, chunked", "")
        } else {
            ("chunked", "5\r\nhello\r\n0\r\n\r\n")
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: {coding}\r\nconnection: close\r\n\r\n{body}"
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let get = |path: &str| {
        http::Request::get(proxy.url(path))
            .body(http_body_util::Full::<bytes::Bytes>::default())
            .unwrap()
    };
    let (parts, body) = send(get("/gzip")).await;
    assert_eq!(parts.status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(envelope(&body).0, "upstream_error");
    for path in ["/chunked", "/identity"] {
        let (parts, body) = send(get(path)).await;
        assert_eq!(parts.status, 200, "{path}");
        assert_eq!(&body[..], b"hello", "{path}");
    }
    let head = http::Request::head(proxy.url("/gzip"))
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let (parts, _) = send(head).await;
    assert_eq!(parts.status, 200);
}

// ---------------------------------------------------------------------------------------
// Chunked bodies.
// ---------------------------------------------------------------------------------------

/// An invalid chunk is found only after the head has been forwarded (the body streams):
/// the upstream must then see a request that never completes, and the client a 400 or a
/// closed connection, never a response to the smuggled bytes.
#[tokio::test]
async fn invalid_chunk_sizes_never_complete_a_request_upstream() {
    let chunked = |body: &str| post("Transfer-Encoding: chunked\r\n", body);
    // After each invalid chunk, bytes that read as a request to a parser that resyncs.
    let tail = format!("\r\n0\r\n\r\n{SMUGGLED}");
    let allowed: &[Outcome] = &[Outcome::Rejected(400), Outcome::Closed];
    run_cases(vec![
        case(
            "non-hex size",
            chunked(&format!("zz\r\nhello{tail}")),
            allowed,
        ),
        case(
            "negative size",
            chunked(&format!("-5\r\nhello{tail}")),
            allowed,
        ),
        case(
            "0x prefix",
            chunked(&format!("0x5\r\nhello{tail}")),
            allowed,
        ),
        case(
            "size overflowing u64",
            chunked(&format!("1ffffffffffffffff5\r\nhello{tail}")),
            allowed,
        ),
        case(
            "data longer than its size",
            chunked(&format!("3\r\nhello{tail}")),
            allowed,
        ),
        case(
            "data shorter than its size",
            chunked(&format!("9\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
            allowed,
        ),
        case(
            "size line with a space inside the number",
            chunked(&format!("1 0\r\nhello{tail}")),
            allowed,
        ),
    ])
    .await;
}

// ---------------------------------------------------------------------------------------
// Line endings, obs-fold, control characters.
// ---------------------------------------------------------------------------------------

/// Bare LF is accepted by hyper (RFC 9112 §2.2 allows a recipient to), and every request is
/// re-framed with CRLF upstream: a header hidden behind a bare LF is a header to the proxy
/// and is forwarded as one, so the upstream cannot read the message differently.
#[tokio::test]
async fn bare_lf_requests_are_reframed_with_crlf() {
    let body = SMUGGLED;
    run_cases(vec![
        case(
            "every line ends in a bare LF",
            "GET /a HTTP/1.1\nHost: client.example\n\n",
            &[
                Outcome::Forwarded(&[("GET", "/a", ""), ("GET", "/second", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "content-length behind a bare LF inside another header line",
            format!(
                "POST /a HTTP/1.1\r\nHost: client.example\r\nX-Hide: y\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            &[
                Outcome::Forwarded(&[("POST", "/a", SMUGGLED), ("GET", "/second", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "transfer-encoding behind a bare LF, with content-length",
            format!(
                "POST /a HTTP/1.1\r\nHost: client.example\r\nX-Hide: y\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[
                Outcome::ForwardedThenClosed(&[("POST", "/a", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "chunk size lines ending in a bare LF",
            post("Transfer-Encoding: chunked\r\n", &format!("5\nhello\n0\n\n{SMUGGLED}")),
            &[
                Outcome::Rejected(400),
                Outcome::Closed,
                Outcome::ForwardedThenClosed(&[("POST", "/a", "hello")]),
            ],
        ),
    ])
    .await;
}

#[tokio::test]
async fn obs_fold_bare_cr_and_control_characters_are_rejected() {
    let plain =
        |header: &str| format!("GET /a HTTP/1.1\r\nHost: client.example\r\n{header}\r\n\r\n");
    run_cases(vec![
        case(
            "obs-fold in an ordinary header",
            plain("X-Folded: a\r\n b"),
            REJECTED,
        ),
        case("obs-fold with a tab", plain("X-Folded: a\r\n\tb"), REJECTED),
        case("bare CR inside a value", plain("X-Cr: a\rb"), REJECTED),
        case("bare CR ending a line", plain("X-Cr: a\r"), REJECTED),
        case("NUL in a value", plain("X-Nul: a\x00b"), REJECTED),
        case("SOH in a value", plain("X-Ctl: a\x01b"), REJECTED),
        case("ESC in a value", plain("X-Ctl: a\x1bb"), REJECTED),
        case("DEL in a value", plain("X-Ctl: a\x7fb"), REJECTED),
        case(
            "control character in a name",
            plain("X-\x01Name: a"),
            REJECTED,
        ),
        case("space inside a name", plain("X Name: a"), REJECTED),
        case("empty name", plain(": a"), REJECTED),
        case(
            "NUL in the request target",
            "GET /a\x00b HTTP/1.1\r\nHost: client.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "two spaces in the request line",
            "GET  /a HTTP/1.1\r\nHost: client.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "unknown HTTP version",
            "GET /a HTTP/1.2\r\nHost: client.example\r\n\r\n",
            &[
                Outcome::Rejected(400),
                Outcome::Closed,
                Outcome::Rejected(505),
            ],
        ),
        case(
            "missing host in HTTP/1.1",
            "GET /a HTTP/1.1\r\nX: y\r\n\r\n",
            REJECTED,
        ),
    ])
    .await;
}

// ---------------------------------------------------------------------------------------
// Request targets and hosts.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn absolute_form_and_other_hosts_never_leave_the_configured_upstream() {
    run_cases(vec![
        case(
            "absolute-form http URI naming another host",
            "GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "absolute-form https URI",
            "GET https://evil.example/v1/models HTTP/1.1\r\nHost: client.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "absolute-form without a path",
            "GET http://evil.example HTTP/1.1\r\nHost: client.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "absolute-form with userinfo",
            "GET http://user@evil.example/x HTTP/1.1\r\nHost: client.example\r\n\r\n",
            REJECTED,
        ),
        case(
            "absolute-form in HTTP/1.0",
            "GET http://evil.example/x HTTP/1.0\r\n\r\n",
            REJECTED,
        ),
        case(
            "CONNECT to another host",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            REJECTED,
        ),
        case(
            "a path that looks like a network-path reference",
            "GET //evil.example/x HTTP/1.1\r\nHost: client.example\r\n\r\n",
            &[
                Outcome::Forwarded(&[("GET", "//evil.example/x", ""), ("GET", "/second", "")]),
                Outcome::Rejected(400),
            ],
        ),
        case(
            "origin-form with a foreign Host header",
            "GET /a HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            &[Outcome::Forwarded(&[
                ("GET", "/a", ""),
                ("GET", "/second", ""),
            ])],
        ),
    ])
    .await;
}

/// The absolute-form check applies to the request line, not only to the first request of a
/// connection: an absolute-form request pipelined after a good one is refused too, and the
/// good one has been answered by then.
#[tokio::test]
async fn absolute_form_pipelined_after_a_good_request_is_refused() {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let got = exchange(
        proxy.addr,
        b"GET /first HTTP/1.1\r\nHost: client.example\r\n\r\nGET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [200, 400],
        "{:?}",
        String::from_utf8_lossy(&got.raw)
    );
    assert_eq!(got.answers[0].body, b"GET /first 0");
    proxy.shutdown().await;
    upstream.settle().await;
    let targets: Vec<String> = upstream.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(targets, ["/first"], "{}", upstream.raw_text());
}

/// RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
/// HTTP/1.1 request message that lacks a Host header field and to any request message that
/// contains more than one Host header field line or a Host header field with an invalid
/// field value." The proxy replaces `host` with the upstream's authority, so no request can
/// reach another host through it; but the duplicate is still forwarded instead of refused.
#[tokio::test]
async fn two_host_headers_are_rejected() {
    run_cases(vec![case(
        "two different Host lines",
        "GET /a HTTP/1.1\r\nHost: client.example\r\nHost: evil.example\r\n\r\n",
        REJECTED,
    )])
    .await;
}

// ---------------------------------------------------------------------------------------
// Oversized heads.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_header_lines_and_counts_get_431() {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let huge_line = format!(
        "GET /a HTTP/1.1\r\nHost: client.example\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /a HTTP/1.1\r\nHost: client.example\r\n{many}\r\n");
    for (name, request, want) in [
        ("a 1 MiB header line", huge_line, 431),
        ("200 header lines", many, 431),
        (
            "a 70 KB request target",
            format!(
                "GET /{} HTTP/1.1\r\nHost: client.example\r\n\r\n",
                "a".repeat(70_000)
            ),
            // Larger than the 64 KiB head limit: refused as a whole head (hyper answers
            // 431 before it could judge the target alone, which would be 414).
            431,
        ),
    ] {
        let got = exchange(proxy.addr, request.as_bytes()).await;
        let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
        assert_eq!(
            statuses,
            [want],
            "{name}: {:?}",
            String::from_utf8_lossy(&got.raw)
        );
        assert!(got.closed, "{name}: connection left open");
    }
    // Just under the limits, a request is served.
    let fifty: String = (0..50)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(100)))
        .collect();
    let got = exchange(
        proxy.addr,
        format!("GET /ok HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n{fifty}\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(got.answers.len(), 1);
    assert_eq!(got.answers[0].status, 200);
    proxy.shutdown().await;
    upstream.settle().await;
    let targets: Vec<String> = upstream.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(targets, ["/ok"], "{}", upstream.raw_text());
}

/// hyper's only head limit used to be its read buffer (about 400 KiB by default): a single
/// 200 KiB header line was accepted and forwarded, and every connection may hold that much
/// while it trickles its head within the header-read timeout (measured: 500 such connections
/// took the daemon from 15 to 98 MiB RSS). nginx refuses a line over 8 KiB, HAProxy a head
/// over ~16 KiB. The proxy now caps both the buffer and the head at 64 KiB.
#[tokio::test]
async fn a_64_kib_header_line_gets_431() {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let request = format!(
        "GET /a HTTP/1.1\r\nHost: client.example\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let got = exchange(proxy.addr, request.as_bytes()).await;
    let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [431]);
    proxy.shutdown().await;
    upstream.settle().await;
    assert!(upstream.seen().is_empty());
}

// ---------------------------------------------------------------------------------------
// Slow clients.
// ---------------------------------------------------------------------------------------

/// An in-process proxy with a 1 s header-read timeout.
async fn proxy_with_header_timeout(upstream: &str) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ProxyService::new(
        UpstreamUrl::parse(upstream).unwrap(),
        options(),
        direct_client(),
    );
    let server = Server::from_listeners(vec![(listener, service)])
        .with_header_read_timeout(Duration::from_secs(1));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    (addr, stop)
}

/// How long until the proxy closes `stream` (reading and discarding), bounded by `limit`;
/// `None` if still open then. `trickle` is written one byte every 100 ms meanwhile.
async fn time_to_close(
    stream: &mut TcpStream,
    trickle: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut pending = trickle.iter();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if started.elapsed() >= limit {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                Ok(_) => continue,
            },
            _ = tick.tick() => {
                if let Some(b) = pending.next() {
                    if stream.write_all(&[*b]).await.is_err() {
                        return Some(started.elapsed());
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn slowloris_heads_and_idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let upstream = StrictUpstream::start().await;
    let (addr, _stop) = proxy_with_header_timeout(&upstream.url()).await;
    let limit = Duration::from_secs(4);

    // A partial head, then silence.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let closed = time_to_close(&mut stream, b"", limit).await;
    assert!(
        closed.is_some_and(|d| d >= Duration::from_millis(900) && d < Duration::from_secs(3)),
        "partial head: closed after {closed:?}"
    );

    // A head trickled one byte every 100 ms: progress does not extend the deadline.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"G").await.unwrap();
    let closed = time_to_close(
        &mut stream,
        b"ET /a HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        limit,
    )
    .await;
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(3)),
        "trickled head: closed after {closed:?}"
    );

    // An idle keep-alive connection after one complete exchange.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut stream, b"GET /a 0").await;
    let closed = time_to_close(&mut stream, b"", limit).await;
    assert!(
        closed.is_some_and(|d| d >= Duration::from_millis(900) && d < Duration::from_secs(3)),
        "idle keep-alive: closed after {closed:?}"
    );
    assert_eq!(upstream.seen().len(), 1);
}

/// Before hyper's HTTP/1 parser runs, the server reads up to 24 bytes to tell HTTP/1 from the
/// HTTP/2 preface; that wait is bounded by the header-read timeout too, so a client that
/// connects and sends nothing, or a prefix of the HTTP/2 preface, cannot hold a connection.
#[tokio::test]
async fn silent_connections_and_partial_http2_prefaces_are_closed_after_the_header_timeout() {
    let upstream = StrictUpstream::start().await;
    let (addr, _stop) = proxy_with_header_timeout(&upstream.url()).await;
    let limit = Duration::from_secs(4);
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (silent, partial) = tokio::join!(
        time_to_close(&mut silent, b"", limit),
        time_to_close(&mut partial, b"", limit),
    );
    let quick = |d: Option<Duration>| d.is_some_and(|d| d < Duration::from_secs(3));
    assert!(
        quick(silent) && quick(partial),
        "closed after (None = still open after {limit:?}): nothing sent {silent:?}, \
         partial HTTP/2 preface {partial:?}"
    );
}

/// An HTTP/2 connection with no open stream is closed after the header-read timeout, as an
/// idle HTTP/1 one is (hyper's HTTP/2 server has no idle limit of its own; nginx closes such
/// a connection after its keepalive_timeout, HAProxy after `timeout http-keep-alive`).
#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_header_timeout() {
    let upstream = StrictUpstream::start().await;
    let (addr, _stop) = proxy_with_header_timeout(&upstream.url()).await;
    let mut idle_h2 = TcpStream::connect(addr).await.unwrap();
    let mut hello = h2::PREFACE.to_vec();
    hello.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    idle_h2.write_all(&hello).await.unwrap();
    let closed = time_to_close(&mut idle_h2, b"", Duration::from_secs(4)).await;
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(3)),
        "idle HTTP/2 connection closed after {closed:?}"
    );
}

/// The idle limit counts only time with no open stream: an HTTP/2 stream that lasts several
/// header timeouts (a slow event stream, as a reasoning model's) is never cut by it.
#[tokio::test]
async fn http2_streams_longer_than_the_header_timeout_are_never_cut() {
    let (tx, body) = channel_body();
    let body = Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = body.lock().unwrap().take().expect("one request");
        response(200, &[("content-type", "text/event-stream")], body)
    })
    .await;
    let (addr, _stop) = proxy_with_header_timeout(&upstream.url()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = http::Request::get(format!("http://{addr}/v1/events"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), h2.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut body = response.into_body();
    // Five events 600 ms apart: the stream lasts three header timeouts of 1 s.
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let event = format!("data: {n}\n\n");
        tx.send(Ok(bytes::Bytes::from(event.clone())))
            .await
            .unwrap();
        let frame = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        .expect("event not relayed")
        .expect("stream ended early")
        .expect("stream cut");
        assert_eq!(frame.into_data().unwrap(), event.as_bytes());
    }
    drop(tx);
    // The end of the stream may come as an empty DATA frame carrying END_STREAM.
    for _ in 0..2 {
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        .unwrap();
        match end {
            None => return,
            Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.is_empty()) => continue,
            other => panic!("the stream did not end cleanly: {other:?}"),
        }
    }
    panic!("the stream did not end");
}

/// The real binary reads `headerReadTimeoutSeconds` from its config.
#[tokio::test]
async fn header_read_timeout_seconds_is_read_from_the_config() {
    let upstream = StrictUpstream::start().await;
    let dir = daemon::TempDir::new("header-timeout");
    let port = daemon::free_port();
    let config = format!(
        "{{\"headerReadTimeoutSeconds\": 1, \"rules\": [{}]}}",
        daemon::rule(port, &upstream.url())
    );
    let path = dir.write("config.json", &config);
    let mut proxy = daemon::start(&dir, &path, 1).await;
    let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed = time_to_close(&mut stream, b"", Duration::from_secs(4)).await;
    assert!(
        closed.is_some_and(|d| d >= Duration::from_millis(900) && d < Duration::from_secs(3)),
        "closed after {closed:?}\n{}",
        proxy.dump()
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// The strict upstream itself: the checks above are only as good as its eye.
// ---------------------------------------------------------------------------------------

/// Sent straight to the strict upstream (no proxy), the attacks are recognised: this is
/// what "nothing desynchronised reached the upstream" is measured with.
#[tokio::test]
async fn the_strict_upstream_recognises_the_attacks_it_guards_against() {
    let upstream = StrictUpstream::start().await;
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    for attack in [
        post(
            &format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                cl_te_body.len()
            ),
            &cl_te_body,
        ),
        "GET /a HTTP/1.1\nHost: x\n\n".to_owned(),
        "GET /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n".to_owned(),
        post("Content-Length: 1\r\nContent-Length: 2\r\n", "ab"),
        post("Transfer-Encoding: chunked\r\n", "zz\r\n"),
    ] {
        let mut stream = TcpStream::connect(upstream.upstream.addr).await.unwrap();
        stream.write_all(attack.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
    }
    // A content-length reader sees the request smuggled in a plain body: that is what the
    // target check catches.
    let mut stream = TcpStream::connect(upstream.upstream.addr).await.unwrap();
    stream
        .write_all(format!("{}{SMUGGLED}", post("Content-Length: 0\r\n", "")).as_bytes())
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
    upstream.settle().await;
    let seen = upstream.seen();
    let flagged = seen.iter().filter(|s| !s.violations.is_empty()).count();
    assert!(flagged >= 5, "{seen:#?}");
    assert!(seen.iter().any(|s| s.target == "/smuggled"), "{seen:#?}");
}

// ---------------------------------------------------------------------------------------
// HTTP/2 downgrade: the proxy accepts cleartext HTTP/2 and speaks HTTP/1.1 upstream, the
// setting of the H2.CL / H2.TE desync attacks. Frames are written by hand, because a real
// HTTP/2 client refuses to send what these cases send.
// ---------------------------------------------------------------------------------------

mod h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK integer with an `n`-bit prefix; `first` carries the pattern bits.
    fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128) as u8 | 0x80);
            value /= 128;
        }
        out.push(value as u8);
    }

    /// A header block of literal fields without indexing, new names, no Huffman: any
    /// bytes at all, which is the point.
    pub fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            integer(&mut out, 0, 7, name.len());
            out.extend_from_slice(name);
            integer(&mut out, 0, 7, value.len());
            out.extend_from_slice(value);
        }
        out
    }

    /// The `:status` of a response header block, for the encodings a server uses for it
    /// as the first field of a fresh connection.
    pub fn status(block: &[u8]) -> Option<u16> {
        let first = *block.first()?;
        let statics = [
            (8, 200),
            (9, 204),
            (10, 206),
            (11, 304),
            (12, 400),
            (13, 404),
            (14, 500),
        ];
        if first & 0x80 != 0 {
            return statics
                .iter()
                .find(|(i, _)| *i == (first & 0x7f))
                .map(|(_, s)| *s);
        }
        // Literal with an indexed `:status` name (index 8..=14, any representation).
        let index = if first & 0x40 != 0 {
            first & 0x3f
        } else {
            first & 0x0f
        };
        if !(8..=14).contains(&index) {
            return None;
        }
        let len_byte = *block.get(1)?;
        let (huffman, len) = (len_byte & 0x80 != 0, (len_byte & 0x7f) as usize);
        let value = block.get(2..2 + len)?;
        let text = if huffman {
            huffman_digits(value)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        text.parse().ok()
    }

    /// Huffman-decodes a string of ASCII digits (RFC 7541 Appendix B: '0'-'2' are 5-bit
    /// codes 0-2, '3'-'9' are 6-bit codes 0x19-0x1f).
    fn huffman_digits(bytes: &[u8]) -> Option<String> {
        let bits: Vec<u8> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let mut out = String::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i..].iter().all(|b| *b == 1) && bits.len() - i < 8 {
                break; // padding
            }
            let take = |n: usize| -> Option<u8> {
                bits.get(i..i + n)
                    .map(|s| s.iter().fold(0u8, |acc, b| acc << 1 | b))
            };
            let five = take(5)?;
            if five <= 2 {
                out.push((b'0' + five) as char);
                i += 5;
                continue;
            }
            let six = take(6)?;
            if (0x19..=0x1f).contains(&six) {
                out.push((b'3' + six - 0x19) as char);
                i += 6;
                continue;
            }
            return None;
        }
        Some(out)
    }
}

/// How the proxy answered an HTTP/2 stream.
#[derive(Debug, Clone, PartialEq)]
enum H2Answer {
    /// RST_STREAM on the stream, or GOAWAY, with the error code.
    Reset(u32),
    /// A response head with this status (0 when not decodable).
    Status(u16),
    /// Nothing within the wait.
    Nothing,
}

/// Sends one HTTP/2 request (head and optional body) on a fresh prior-knowledge connection.
async fn h2_exchange(
    proxy: SocketAddr,
    fields: &[(&[u8], &[u8])],
    body: Option<&[u8]>,
) -> H2Answer {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut out = h2::PREFACE.to_vec();
    out.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    let flags = h2::END_HEADERS | if body.is_none() { h2::END_STREAM } else { 0 };
    out.extend(h2::frame(h2::HEADERS, flags, 1, &h2::block(fields)));
    if let Some(body) = body {
        out.extend(h2::frame(h2::DATA, h2::END_STREAM, 1, body));
    }
    let _ = stream.write_all(&out).await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                h2::SETTINGS if flags & 1 == 0 => {
                    let _ = stream.write_all(&h2::frame(h2::SETTINGS, 1, 0, &[])).await;
                }
                h2::RST_STREAM if id == 1 => {
                    return H2Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
                }
                h2::GOAWAY => {
                    return H2Answer::Reset(u32::from_be_bytes(payload[4..8].try_into().unwrap()))
                }
                h2::HEADERS if id == 1 => {
                    return H2Answer::Status(h2::status(&payload).unwrap_or(0));
                }
                _ => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return H2Answer::Nothing,
        }
    }
}

/// H2.CL and H2.TE desync, CRLF injection through HPACK (which can carry any byte), and
/// other malformed HTTP/2 requests (RFC 9113 §8.1.1, §8.2) are refused at the HTTP/2
/// layer: nothing of them reaches the upstream as a request, let alone a second one.
#[tokio::test]
async fn http2_downgrade_attacks_are_refused_before_the_upstream() {
    let pseudo: [(&[u8], &[u8]); 4] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/a"),
        (b":authority", b"client.example"),
    ];
    let with = |extra: &[(&'static [u8], &'static [u8])]| -> Vec<(&'static [u8], &'static [u8])> {
        pseudo
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    let smuggled_chunked = format!("0\r\n\r\n{SMUGGLED}");
    type Fields = Vec<(&'static [u8], &'static [u8])>;
    let cases: Vec<(&str, Fields, Option<Vec<u8>>)> = vec![
        (
            "H2.CL: content-length 0 with a body holding a request",
            with(&[(b"content-length", b"0")]),
            Some(SMUGGLED.as_bytes().to_vec()),
        ),
        (
            "H2.CL: content-length larger than the body",
            with(&[(b"content-length", b"100")]),
            Some(b"0123456789".to_vec()),
        ),
        (
            "H2.TE: transfer-encoding chunked",
            with(&[(b"transfer-encoding", b"chunked")]),
            Some(smuggled_chunked.into_bytes()),
        ),
        (
            "CRLF injection in a header value",
            with(&[(b"x-inject", b"a\r\nTransfer-Encoding: chunked")]),
            Some(b"0\r\n\r\n".to_vec()),
        ),
        (
            "LF injection in a header value",
            with(&[(b"x-inject", b"a\nContent-Length: 0")]),
            Some(SMUGGLED.as_bytes().to_vec()),
        ),
        (
            "CRLF injection in a header name",
            with(&[(b"x-inject\r\ntransfer-encoding", b"chunked")]),
            None,
        ),
        ("upper-case header name", with(&[(b"X-Upper", b"1")]), None),
        (
            "connection-specific header",
            with(&[(b"connection", b"keep-alive")]),
            None,
        ),
        ("te other than trailers", with(&[(b"te", b"gzip")]), None),
        (
            "CRLF and a request line inside :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/a HTTP/1.1\r\nHost: x\r\n\r\nGET /smuggled"),
                (b":authority", b"client.example"),
            ],
            None,
        ),
        (
            "space inside :method",
            vec![
                (b":method", b"GET /smuggled"),
                (b":scheme", b"http"),
                (b":path", b"/a"),
                (b":authority", b"client.example"),
            ],
            None,
        ),
        (
            "missing :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"client.example"),
            ],
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields, body) in &cases {
        let (upstream, proxy) = proxy_with_strict_upstream().await;
        let answer = h2_exchange(proxy.addr, fields, body.as_deref()).await;
        proxy.shutdown().await;
        upstream.settle().await;
        let seen = upstream.seen();
        let complete: Vec<&Seen> = seen.iter().filter(|s| s.complete).collect();
        let refused = matches!(answer, H2Answer::Reset(_) | H2Answer::Status(400));
        let mut problems = Vec::new();
        if !refused {
            problems.push(format!("not refused: {answer:?}"));
        }
        if !complete.is_empty() {
            problems.push("a complete request reached the upstream".to_owned());
        }
        if seen
            .iter()
            .any(|s| !s.violations.is_empty() || s.target.contains("smuggled"))
        {
            problems.push("the upstream saw an ambiguous or smuggled request".to_owned());
        }
        if std::env::var_os("SMUGGLING_TRACE").is_some() {
            eprintln!(
                "{name:<60} {answer:?} | upstream saw {} request(s)",
                seen.len()
            );
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {name:?}: {}\n  upstream received:\n{}",
                problems.join("; "),
                upstream.raw_text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// An HTTP/2 request names its host in `:authority` (and maybe `host`); neither decides
/// where it goes or what Host the upstream sees.
#[tokio::test]
async fn http2_authority_never_reaches_the_upstream() {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let answer = h2_exchange(
        proxy.addr,
        &[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/a"),
            (b":authority", b"evil.example"),
            (b"host", b"other.example"),
        ],
        None,
    )
    .await;
    assert_eq!(answer, H2Answer::Status(200));
    proxy.shutdown().await;
    upstream.settle().await;
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{}", upstream.raw_text());
    assert_eq!(seen[0].target, "/a");
    assert_eq!(
        seen[0].header("host"),
        [upstream.upstream.addr.to_string().as_str()]
    );
    assert!(seen[0].violations.is_empty(), "{:?}", seen[0].violations);

    // The control for the refusals above: the same hand-written frames, well formed, pass.
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let answer = h2_exchange(
        proxy.addr,
        &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/a"),
            (b":authority", b"client.example"),
            (b"content-length", b"10"),
        ],
        Some(b"0123456789"),
    )
    .await;
    assert_eq!(answer, H2Answer::Status(200));
    proxy.shutdown().await;
    upstream.settle().await;
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{}", upstream.raw_text());
    assert_eq!(seen[0].body, b"0123456789");
    assert!(
        seen[0].complete && seen[0].violations.is_empty(),
        "{seen:?}"
    );
}

/// The head limit holds to the byte, however the kernel splits the head: a head of exactly
/// 64 KiB is served, one byte more is refused (and the connection closed) before anything
/// goes upstream.
#[tokio::test]
async fn the_64_kib_head_limit_is_exact() {
    let (upstream, proxy) = proxy_with_strict_upstream().await;
    let head = |len: usize, connection: &str| {
        let fixed =
            format!("GET /ok HTTP/1.1\r\nHost: client.example\r\n{connection}X-Pad: \r\n\r\n");
        format!(
            "GET /ok HTTP/1.1\r\nHost: client.example\r\n{connection}X-Pad: {}\r\n\r\n",
            "p".repeat(len - fixed.len())
        )
    };
    let at_limit = head(64 * 1024, "Connection: close\r\n");
    assert_eq!(at_limit.len(), 64 * 1024);
    let got = exchange(proxy.addr, at_limit.as_bytes()).await;
    let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200]);
    // Keep-alive: the connection closes because of the refusal, not because it was asked.
    let over = head(64 * 1024 + 1, "");
    assert_eq!(over.len(), 64 * 1024 + 1);
    let got = exchange(proxy.addr, over.as_bytes()).await;
    let statuses: Vec<u16> = got.answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [431]);
    assert!(got.closed, "connection left open after 431");
    proxy.shutdown().await;
    upstream.settle().await;
    let targets: Vec<String> = upstream.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(targets, ["/ok"], "{}", upstream.raw_text());
}
