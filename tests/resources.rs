//! Resources and shutdown under load (issue "Reliability and security"), on the real binary:
//! the accept loop at a low open-files limit, 3000 concurrent keep-alive clients served
//! byte-exact, and SIGTERM with a couple of hundred requests in flight.
//!
//! The tests of this file take turns (`SERIAL`): each one loads both cores by itself, and
//! the first one measures the proxy's CPU time. Every wait is bounded and driven by an
//! event (a log line, a counter reaching its target, a connection closing); the only timed
//! sleeps are the CPU measurement window and the mock upstream's pacing.

// The `/proc` readers and the tests using them are Linux-only; elsewhere their helpers
// are unused.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use support::daemon::*;
#[cfg(target_os = "linux")]
use support::limits::{has_prlimit, open_files_limits};
use support::*;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch, Barrier, Notify, Semaphore};
use tokio::task::JoinSet;

/// One test at a time: see the module docs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CHAT: &str = "/v1/chat/completions";

// ---------------------------------------------------------------------------------------
// Helpers: processes and their resources.
// ---------------------------------------------------------------------------------------

#[cfg(target_os = "linux")]
/// The binary with `-c config`, its open-files limit set to `nofile` (soft and hard) by
/// `prlimit` or, without util-linux, by the shell's `ulimit`. Both exec the proxy, so the
/// child's pid is the proxy's. The environment is [`proxy_command`]'s.
fn limited_command(dir: &TempDir, config: &Path, nofile: u64) -> Command {
    let plain = proxy_command(dir.path(), &["-c", config.to_str().unwrap()]);
    let mut cmd = if has_prlimit() {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}")).arg("--");
        cmd
    } else {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""));
        cmd
    };
    cmd.arg(BIN).args(plain.get_args()).current_dir(dir.path());
    for (key, value) in plain.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd
}

#[cfg(target_os = "linux")]
/// User plus system CPU time of a process, in clock ticks (`/proc/<pid>/stat` fields 14
/// and 15, counted after the parenthesised command name, which may contain spaces).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(target_os = "linux")]
/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we know of).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(target_os = "linux")]
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Helpers: traffic.
// ---------------------------------------------------------------------------------------

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One HTTP/1.1 connection to the proxy; the connection task's handle resolves when the
/// connection closes.
async fn connect_http1(port: u16) -> Result<(Sender, tokio::task::JoinHandle<()>), String> {
    let stream = TcpStream::connect(local(port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, task))
}

/// A request in origin form with a `Host` header, as HTTP/1.1 clients send it.
fn http1_request(
    port: u16,
    method: &str,
    path: &str,
    json: bool,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    if json {
        builder = builder.header("content-type", "application/json");
    }
    builder.body(Full::new(body)).unwrap()
}

/// What a client got for one request: its status, content-length and the whole body, or
/// why it broke.
struct Got {
    status: u16,
    content_length: Option<usize>,
    body: Bytes,
}

/// Sends `request` on `sender` and reads the whole response, bounded by `limit`.
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    limit: Duration,
) -> Result<Got, String> {
    let work = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no response head: {e}"))?;
        read_response(response).await
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no complete response within {limit:?}"))?
}

async fn read_response(response: Response<Incoming>) -> Result<Got, String> {
    let status = response.status().as_u16();
    let content_length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("status {status}, body broke off: {e}"))?
        .to_bytes();
    Ok(Got {
        status,
        content_length,
        body,
    })
}

/// `Ok` when `got` is a 200 whose body is exactly `expected` (and whose content-length, when
/// present, says so).
fn check(got: &Got, expected: &[u8], what: &str) -> Result<(), String> {
    if got.status != 200 {
        return Err(format!(
            "{what}: status {} body {:?}",
            got.status,
            String::from_utf8_lossy(&got.body)
        ));
    }
    if let Some(length) = got.content_length {
        if length != got.body.len() {
            return Err(format!(
                "{what}: content-length {length}, {} bytes",
                got.body.len()
            ));
        }
    }
    if got.body[..] != *expected {
        let at = got
            .body
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.body.len().min(expected.len()));
        return Err(format!(
            "{what}: {} bytes, expected {}; first difference at byte {at}",
            got.body.len(),
            expected.len()
        ));
    }
    Ok(())
}

/// Deterministic bytes of every value 0..=255 (not UTF-8), different for each `seed`.
fn unique_bytes(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 32);
    out.extend_from_slice(format!("[{seed}]").as_bytes());
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push((state >> 24) as u8);
    }
    Bytes::from(out)
}

/// A Chat Completions request body whose single message is `token`.
fn chat_body(token: &str, stream: bool) -> Bytes {
    let stream = if stream { ",\"stream\":true" } else { "" };
    Bytes::from(format!(
        "{{\"model\":\"m-1\",\"messages\":[{{\"role\":\"user\",\"content\":\"{token}\"}}]{stream}}}"
    ))
}

/// The message content of a Chat Completions request body (the mock's echo key).
fn token_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["messages"][0]["content"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "no-token".to_owned())
}

/// The events of the mock's Chat Completions stream for `token`: the role chunk, `deltas`
/// content chunks `"{token}-{k} "`, the finish chunk, the usage chunk and `[DONE]`.
fn chat_events(token: &str, deltas: usize) -> Vec<Bytes> {
    const PREFIX: &str =
        "\"id\":\"chatcmpl-r\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m-1\"";
    let mut events = vec![Bytes::from(format!(
        "data: {{{PREFIX},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"
    ))];
    for k in 0..deltas {
        events.push(Bytes::from(format!(
            "data: {{{PREFIX},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{token}-{k} \"}},\"finish_reason\":null}}]}}\n\n"
        )));
    }
    events.push(Bytes::from(format!(
        "data: {{{PREFIX},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    )));
    events.push(Bytes::from(format!(
        "data: {{{PREFIX},\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{deltas},\"total_tokens\":{}}}}}\n\n",
        deltas + 3
    )));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn concat(parts: &[Bytes]) -> Bytes {
    Bytes::from(parts.concat())
}

/// The Chat Completions object the conversion of [`chat_events`] must produce.
fn expected_completion(token: &str, deltas: usize) -> Value {
    let content: String = (0..deltas).map(|k| format!("{token}-{k} ")).collect();
    json!({"id":"chatcmpl-r","object":"chat.completion","created":7,"model":"m-1",
           "choices":[{"index":0,"message":{"role":"assistant","content":content,"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],
           "usage":{"prompt_tokens":3,"completion_tokens":deltas,"total_tokens":deltas + 3},"system_fingerprint":null})
}

/// The token of the reference conversion whose bytes every other conversion is compared to.
const REFERENCE: &str = "tok-ref";

/// One conversion for [`REFERENCE`], checked field by field; its bytes become the template
/// that every other conversion must match exactly, token substituted.
async fn conversion_template(port: u16, deltas: usize) -> Vec<u8> {
    let (mut sender, _task) = connect_http1(port).await.unwrap();
    let got = exchange(
        &mut sender,
        http1_request(port, "POST", CHAT, true, chat_body(REFERENCE, false)),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{:?}", String::from_utf8_lossy(&got.body));
    let value: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(value, expected_completion(REFERENCE, deltas));
    got.body.to_vec()
}

fn expected_conversion(template: &[u8], token: &str) -> Vec<u8> {
    String::from_utf8(template.to_vec())
        .unwrap()
        .replace(REFERENCE, token)
        .into_bytes()
}

/// The proxy's config: one rule to `upstream`, request heads allowed `header_read` seconds
/// (kept-alive clients wait for each other in some tests).
fn one_rule_config(port: u16, upstream: &str, header_read: u64) -> String {
    format!(
        "{{\"headerReadTimeoutSeconds\": {header_read}, \"rules\": [{}]}}\n",
        rule(port, upstream)
    )
}

/// An upstream that answers every Chat Completions call with the whole stream of
/// [`chat_events`] for its token at once, and echoes anything else: the request body, or
/// the path when the body is empty.
async fn echo_and_chat_upstream(deltas: usize) -> MockUpstream {
    let handler: Handler = Arc::new(move |req: Request<Incoming>| {
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            if path.ends_with("/chat/completions") {
                let events = chat_events(&token_of(&body), deltas);
                return response(
                    200,
                    &[("content-type", "text/event-stream")],
                    full(concat(&events)),
                );
            }
            let echoed = if body.is_empty() {
                Bytes::from(path)
            } else {
                body
            };
            response(
                200,
                &[("content-type", "application/octet-stream")],
                full(echoed),
            )
        })
    });
    MockUpstream::with_handler(handler).await
}

/// A count the test waits on.
#[derive(Default)]
struct Counter {
    n: AtomicUsize,
    changed: Notify,
}

impl Counter {
    fn add(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    /// Waits until the count reaches `target`, bounded by `limit`.
    async fn until(&self, target: usize, limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.get() >= target {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                panic!("{what}: {} of {target} within {limit:?}", self.get());
            }
        }
    }
}

/// Collects every task's result; panics with the first failures.
async fn all_ok(tasks: &mut JoinSet<Result<(), String>>, limit: Duration, what: &str) {
    let mut failures = Vec::new();
    let mut done = 0;
    let finished = tokio::time::timeout(limit, async {
        while let Some(result) = tasks.join_next().await {
            done += 1;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(format!("task panicked: {e}")),
            }
        }
    })
    .await;
    assert!(
        finished.is_ok(),
        "{what}: only {done} tasks finished within {limit:?}; failures so far: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(
        failures.is_empty(),
        "{what}: {} of {done} failed, first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------
// Out of file descriptors.
// ---------------------------------------------------------------------------------------

/// At `RLIMIT_NOFILE` 64 and 150 idle connections held open, `accept` fails with EMFILE:
/// the proxy stays up, logs a warning, backs off instead of spinning (CPU time over a
/// one-second window with the limit exhausted), keeps serving a connection it already
/// has, and serves new clients again once the extra connections close.
// Reads the proxy's limits, descriptors and CPU time from `/proc`.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_at_the_open_files_limit_and_recovers() {
    const LIMIT: u64 = 64;
    const HELD: usize = 150;
    let _serial = SERIAL.lock().await;
    let upstream = echo_and_chat_upstream(3).await;
    let dir = TempDir::new("nofile");
    let port = free_port();
    let path = dir.write("config.json", &one_rule_config(port, &upstream.url(), 30));
    let mut daemon = start_command(limited_command(&dir, &path, LIMIT), 1).await;
    let pid = daemon.pid();
    assert_eq!(
        open_files_limits(&pid.to_string()),
        Some((LIMIT, LIMIT)),
        "the limit did not reach the proxy"
    );

    // A kept-alive client served before the limit is reached: its upstream connection
    // stays in the proxy's pool.
    let (mut kept, _kept_task) = connect_http1(port).await.unwrap();
    let got = exchange(
        &mut kept,
        http1_request(port, "GET", "/v1/before", false, Bytes::new()),
        WAIT,
    )
    .await
    .unwrap();
    check(&got, b"/v1/before", "before the limit").unwrap();

    // More idle connections than the limit allows: the kernel completes every handshake
    // (backlog 1024), the proxy accepts until it runs out of descriptors.
    let mut held = Vec::with_capacity(HELD);
    for i in 0..HELD {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(local(port)))
            .await
            .unwrap_or_else(|_| panic!("connection {i} timed out"))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        held.push(stream);
    }
    let warning = daemon
        .wait_for("the accept warning", |l| l.contains("accept failed"))
        .await;
    assert!(
        warning.contains("WARN") && warning.contains("os error 24"),
        "{warning}"
    );
    let fds = open_fds(pid);
    assert!(
        fds as u64 >= LIMIT - 2,
        "the limit is not exhausted: {fds} descriptors open"
    );

    // One second with the limit exhausted: a spinning accept loop would burn the whole
    // second on one core (this sleep is the measurement window).
    let ticks = clock_ticks_per_second();
    let before = cpu_ticks(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = (cpu_ticks(pid) - before) as f64 / ticks;
    let window = window.elapsed().as_secs_f64();
    assert!(
        daemon.is_running(),
        "the proxy died at the limit\n{}",
        daemon.dump()
    );
    assert!(
        used < 0.3,
        "the proxy used {used:.2} s of CPU in {window:.2} s with its descriptors exhausted\n{}",
        daemon.dump()
    );

    // A connection it already has is still served (pooled upstream connection, no new
    // descriptor needed).
    let got = exchange(
        &mut kept,
        http1_request(port, "GET", "/v1/during", false, Bytes::new()),
        WAIT,
    )
    .await
    .unwrap();
    check(&got, b"/v1/during", "on a kept connection at the limit").unwrap();

    // Recovery: the extra clients leave; new clients are served, in both modes.
    drop(held);
    let recovering = Instant::now();
    let got = exchange(
        &mut connect_http1(port).await.unwrap().0,
        http1_request(port, "GET", "/v1/after", false, Bytes::new()),
        WAIT,
    )
    .await
    .unwrap();
    check(&got, b"/v1/after", "after the extra connections closed").unwrap();
    let recovered = recovering.elapsed();
    let template = Arc::new(conversion_template(port, 3).await);
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let template = template.clone();
        tasks.spawn(async move {
            let (mut sender, _task) = connect_http1(port).await?;
            let body = unique_bytes(i, 1000);
            let got = exchange(
                &mut sender,
                http1_request(port, "POST", "/v1/upload", false, body.clone()),
                WAIT,
            )
            .await?;
            check(&got, &body, &format!("echo {i} after recovery"))?;
            let token = format!("tok-{i}");
            let got = exchange(
                &mut sender,
                http1_request(port, "POST", CHAT, true, chat_body(&token, false)),
                WAIT,
            )
            .await?;
            check(
                &got,
                &expected_conversion(&template, &token),
                &format!("conversion {i} after recovery"),
            )
        });
    }
    all_ok(&mut tasks, WAIT * 2, "after recovery").await;

    daemon.stop().await;
    let warnings = daemon
        .seen
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    // Backoff doubles from 5 ms to 1 s: a few retries a second, not thousands.
    assert!(
        warnings < 60,
        "{warnings} accept warnings: the loop does not back off\n{}",
        daemon.dump()
    );
    eprintln!(
        "limit {LIMIT}: {used:.3} s CPU in a {window:.2} s window at the limit, \
         {warnings} accept warnings, served again {recovered:?} after the extra clients left"
    );
}

// ---------------------------------------------------------------------------------------
// 3000 concurrent keep-alive clients.
// ---------------------------------------------------------------------------------------

/// 3000 clients, each on its own kept-alive HTTP/1.1 connection, all open at the same time:
/// every one sends an upload echoed by the upstream, waits until all are connected, sends
/// a second one on the same connection, then a third request that is a conversion, a
/// streaming passthrough or another echo. Every byte of every response is checked.
// Raises the open-files limit and counts the proxy's descriptors through `/proc`.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_concurrent_keep_alive_clients_are_served_byte_exact() {
    const CLIENTS: usize = 3000;
    const DELTAS: usize = 3;
    let _serial = SERIAL.lock().await;
    // This process holds every client socket and the mock's end of every upstream
    // connection; the proxy (which inherits the limit) holds the other two ends.
    let needed = (2 * CLIENTS + 1024) as u64;
    if !support::limits::require_open_files(needed, "3000 keep-alive clients") {
        return;
    }

    let upstream = echo_and_chat_upstream(DELTAS).await;
    let dir = TempDir::new("c3000");
    let port = free_port();
    // Clients kept alive wait for the others to connect: allow them two minutes.
    let path = dir.write("config.json", &one_rule_config(port, &upstream.url(), 120));
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    // Start-up lines, not 9000 request lines.
    cmd.env("RUST_LOG", "info,openai_stream_proxy::access=warn");
    let mut daemon = start_command(cmd, 1).await;
    let pid = daemon.pid();
    let template = Arc::new(conversion_template(port, DELTAS).await);

    let started = Instant::now();
    // At most 128 connections being opened at once, so the listen backlog never overflows.
    let opening = Arc::new(Semaphore::new(128));
    let all_open = Arc::new(Barrier::new(CLIENTS + 1));
    let (go_tx, _) = broadcast::channel::<()>(1);
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut tasks = JoinSet::new();
    for i in 0..CLIENTS {
        let (opening, all_open, mut go) = (opening.clone(), all_open.clone(), go_tx.subscribe());
        let (template, counts) = (template.clone(), counts.clone());
        tasks.spawn(async move {
            let first = async {
                let permit = opening.acquire_owned().await.unwrap();
                let (mut sender, task) = connect_http1(port).await?;
                let body = unique_bytes(i as u64 * 3, 64 + (i * 37) % 4000);
                let got = exchange(
                    &mut sender,
                    http1_request(port, "POST", "/v1/files", false, body.clone()),
                    WAIT * 3,
                )
                .await?;
                check(&got, &body, "first request")?;
                drop(permit);
                Ok::<_, String>((sender, task))
            }
            .await;
            // Every client reaches the barrier, failed or not, so the others are not held up.
            all_open.wait().await;
            let (mut sender, task) = first.map_err(|e| format!("client {i}: {e}"))?;
            let _ = go.recv().await;
            let body = unique_bytes(i as u64 * 3 + 1, 64 + (i * 101) % 8000);
            let got = exchange(
                &mut sender,
                http1_request(port, "PUT", "/v1/files/again", false, body.clone()),
                WAIT * 3,
            )
            .await?;
            check(&got, &body, &format!("client {i}, second request"))?;
            let token = format!("tok-{i}");
            let (request, expected, what) = match i % 3 {
                0 => (
                    http1_request(port, "POST", CHAT, true, chat_body(&token, false)),
                    expected_conversion(&template, &token),
                    "conversion",
                ),
                1 => (
                    http1_request(port, "POST", CHAT, true, chat_body(&token, true)),
                    concat(&chat_events(&token, DELTAS)).to_vec(),
                    "streaming passthrough",
                ),
                _ => {
                    let body = unique_bytes(i as u64 * 3 + 2, 10 + (i * 53) % 2000);
                    (
                        http1_request(port, "POST", "/v1/echo", false, body.clone()),
                        body.to_vec(),
                        "third echo",
                    )
                }
            };
            let got = exchange(&mut sender, request, WAIT * 3).await?;
            check(&got, &expected, &format!("client {i}, {what}"))?;
            counts[i % 3].fetch_add(1, Ordering::Relaxed);
            if task.is_finished() {
                return Err(format!(
                    "client {i}: the proxy closed a kept-alive connection"
                ));
            }
            Ok(())
        });
    }
    tokio::time::timeout(WAIT * 6, all_open.wait())
        .await
        .expect("the clients did not all connect in time");
    let opened = started.elapsed();
    // Every client's connection is open in the proxy at this moment.
    let fds_all_open = open_fds(pid);
    assert!(
        fds_all_open >= CLIENTS,
        "only {fds_all_open} descriptors open in the proxy with {CLIENTS} clients connected"
    );
    go_tx.send(()).unwrap();
    all_ok(&mut tasks, WAIT * 6, "3000 keep-alive clients").await;
    let finished = started.elapsed();
    assert!(daemon.is_running(), "the proxy exited\n{}", daemon.dump());
    daemon.stop().await;
    let counts: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "{CLIENTS} keep-alive clients: all connected after {opened:?} ({fds_all_open} proxy \
         descriptors), {} requests done after {finished:?} (conversions {}, streaming \
         passthrough {}, echoes {})",
        CLIENTS * 3,
        counts[0],
        counts[1],
        2 * CLIENTS + counts[2]
    );
}

// ---------------------------------------------------------------------------------------
// SIGTERM under load.
// ---------------------------------------------------------------------------------------

/// How many requests are in flight when SIGTERM arrives.
const IN_FLIGHT: usize = 200;
/// Of which on one HTTP/2 connection (the rest on their own HTTP/1.1 connections).
const OVER_H2: usize = 20;
/// Deltas after the release, and the pause before each.
const PACED_DELTAS: usize = 10;
const PACE: Duration = Duration::from_millis(150);

/// The chunks of file `i`: 12 chunks of unique bytes.
fn file_chunks(i: usize) -> Vec<Bytes> {
    (0..12)
        .map(|k| unique_bytes((i * 100 + k) as u64, 500 + (i * 13 + k * 7) % 1500))
        .collect()
}

/// The held upstream: every counted request gets its head and first chunk at once, the
/// rest only after `release` turns true, paced by [`PACE`] (about 1.5 s). `/v1/probe` and
/// `/v1/warm` are answered at once and not counted.
async fn held_upstream(arrived: Arc<Counter>, release: watch::Receiver<bool>) -> MockUpstream {
    let handler: Handler = Arc::new(move |req: Request<Incoming>| {
        let (arrived, mut release) = (arrived.clone(), release.clone());
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            if path == "/v1/probe" || path == "/v1/warm" {
                return response(200, &[("content-type", "text/plain")], full(path));
            }
            let (chunks, content_type) = if path.ends_with("/chat/completions") {
                (
                    chat_events(&token_of(&body), PACED_DELTAS),
                    "text/event-stream",
                )
            } else {
                let i = path.rsplit('/').next().and_then(|n| n.parse().ok());
                (file_chunks(i.unwrap_or(0)), "application/octet-stream")
            };
            let (tx, out) = channel_body();
            tokio::spawn(async move {
                let mut chunks = chunks.into_iter();
                if let Some(first) = chunks.next() {
                    let _ = tx.send(Ok(first)).await;
                }
                let _ = release.wait_for(|go| *go).await;
                for chunk in chunks {
                    tokio::time::sleep(PACE).await;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            });
            arrived.add();
            response(200, &[("content-type", content_type)], out)
        })
    });
    MockUpstream::with_handler(handler).await
}

/// The three kinds of request in flight.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Conversion,
    StreamingChat,
    File,
}

fn kind(i: usize) -> Kind {
    match i % 4 {
        0 => Kind::Conversion,
        1 | 2 => Kind::StreamingChat,
        _ => Kind::File,
    }
}

/// Request `i` and the exact body it must get.
fn in_flight_request(i: usize, template: &[u8]) -> (&'static str, String, bool, Bytes, Vec<u8>) {
    let token = format!("tok-{i}");
    match kind(i) {
        Kind::Conversion => (
            "POST",
            CHAT.to_owned(),
            true,
            chat_body(&token, false),
            expected_conversion(template, &token),
        ),
        Kind::StreamingChat => (
            "POST",
            CHAT.to_owned(),
            true,
            chat_body(&token, true),
            concat(&chat_events(&token, PACED_DELTAS)).to_vec(),
        ),
        Kind::File => (
            "GET",
            format!("/v1/files/{i}"),
            false,
            Bytes::new(),
            concat(&file_chunks(i)).to_vec(),
        ),
    }
}

/// Reads a response, counting `started` at its first body byte (passthrough bodies start
/// before SIGTERM), and checks it against `expected`.
async fn read_in_flight(
    response: Response<Incoming>,
    expected: &[u8],
    started: &Counter,
    what: &str,
) -> Result<(), String> {
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            format!(
                "{what}: status {status}, body broke off after {} bytes: {e}",
                all.len()
            )
        })?;
        if let Some(data) = frame.data_ref() {
            if all.is_empty() && !data.is_empty() {
                started.add();
            }
            all.extend_from_slice(data);
        }
    }
    let got = Got {
        status,
        content_length: None,
        body: Bytes::from(all),
    };
    check(&got, expected, what)
}

/// What a connection attempted after SIGTERM got.
#[derive(Debug, PartialEq)]
enum Late {
    Refused,
    /// Accepted by the kernel but closed or reset before any response byte.
    Closed,
    /// Served whole (the proxy had accepted it before its listener closed).
    Served,
}

async fn late_attempt(port: u16) -> Result<Late, String> {
    let stream = match TcpStream::connect(local(port)).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(Late::Refused),
        // The handshake raced the listener's close: the kernel reset a connection that no
        // one had accepted. Nothing was sent, so this is "closed before any byte".
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            return Ok(Late::Closed)
        }
        Err(e) => return Err(format!("connect: {e}")),
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return Ok(Late::Closed);
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http1_request(port, "GET", "/v1/probe", false, Bytes::new());
    let response = match tokio::time::timeout(WAIT, async {
        sender.ready().await?;
        sender.send_request(request).await
    })
    .await
    {
        Err(_) => return Err("a late connection hung without an answer".to_owned()),
        // Closed or reset before the response head: nothing was half-delivered.
        Ok(Err(_)) => return Ok(Late::Closed),
        Ok(Ok(response)) => response,
    };
    let got = tokio::time::timeout(WAIT, read_response(response))
        .await
        .map_err(|_| "a late response hung".to_owned())??;
    check(&got, b"/v1/probe", "a late connection's response")?;
    Ok(Late::Served)
}

/// 200 requests in flight (conversions, streaming passthrough and file downloads, on
/// HTTP/1.1 and HTTP/2; passthrough bodies already half-delivered) when SIGTERM arrives:
/// every one gets its complete, exact response; connections attempted after the signal
/// are refused or closed, never half-answered; an idle kept-alive connection is closed;
/// the process exits 0 well within the drain limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_completes_every_accepted_request_and_refuses_new_ones() {
    let _serial = SERIAL.lock().await;
    let arrived = Arc::new(Counter::default());
    let started = Arc::new(Counter::default());
    let (release_tx, release_rx) = watch::channel(false);
    let upstream = held_upstream(arrived.clone(), release_rx).await;
    let dir = TempDir::new("sigterm-load");
    let port = free_port();
    let path = dir.write("config.json", &one_rule_config(port, &upstream.url(), 30));
    let mut daemon = start(&dir, &path, 1).await;

    // The conversion template, from a request released at once by a second mock.
    let template = {
        let quick = echo_and_chat_upstream(PACED_DELTAS).await;
        let quick_port = free_port();
        let quick_dir = TempDir::new("sigterm-template");
        let quick_path = quick_dir.write(
            "config.json",
            &one_rule_config(quick_port, &quick.url(), 30),
        );
        let mut quick_daemon = start(&quick_dir, &quick_path, 1).await;
        let template = conversion_template(quick_port, PACED_DELTAS).await;
        quick_daemon.stop().await;
        Arc::new(template)
    };

    // An idle kept-alive connection, served once before the signal.
    let (mut idle, idle_task) = connect_http1(port).await.unwrap();
    let got = exchange(
        &mut idle,
        http1_request(port, "GET", "/v1/warm", false, Bytes::new()),
        WAIT,
    )
    .await
    .unwrap();
    check(&got, b"/v1/warm", "the idle connection's request").unwrap();

    let mut tasks = JoinSet::new();
    // HTTP/1.1: one connection per request.
    let mut passthrough = 0;
    for i in OVER_H2..IN_FLIGHT {
        if !matches!(kind(i), Kind::Conversion) {
            passthrough += 1;
        }
        let (template, started) = (template.clone(), started.clone());
        tasks.spawn(async move {
            let (method, path, json, body, expected) = in_flight_request(i, &template);
            let what = format!("request {i} ({:?}, HTTP/1.1)", kind(i));
            let (mut sender, _task) = connect_http1(port)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let response = sender
                .send_request(http1_request(port, method, &path, json, body))
                .await
                .map_err(|e| format!("{what}: no response head: {e}"))?;
            read_in_flight(response, &expected, &started, &what).await
        });
    }
    // HTTP/2 (prior knowledge): the rest as streams of one connection.
    let stream = TcpStream::connect(local(port)).await.unwrap();
    let (h2, h2_connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2_task = tokio::spawn(h2_connection);
    for i in 0..OVER_H2 {
        if !matches!(kind(i), Kind::Conversion) {
            passthrough += 1;
        }
        let (template, started, mut h2) = (template.clone(), started.clone(), h2.clone());
        tasks.spawn(async move {
            let (method, path, json, body, expected) = in_flight_request(i, &template);
            let what = format!("request {i} ({:?}, HTTP/2)", kind(i));
            let mut request = Request::builder()
                .method(method)
                .uri(format!("http://127.0.0.1:{port}{path}"));
            if json {
                request = request.header("content-type", "application/json");
            }
            let request = request.body(Full::new(body)).unwrap();
            h2.ready()
                .await
                .map_err(|e| format!("{what}: connection not ready: {e}"))?;
            let response = h2
                .send_request(request)
                .await
                .map_err(|e| format!("{what}: no response head: {e}"))?;
            read_in_flight(response, &expected, &started, &what).await
        });
    }
    drop(h2);

    // Every request has reached the upstream, every passthrough body has started.
    arrived
        .until(IN_FLIGHT, WAIT * 3, "requests at the upstream")
        .await;
    started
        .until(passthrough, WAIT * 3, "passthrough bodies started")
        .await;
    assert_eq!(arrived.get(), IN_FLIGHT);

    daemon.signal("TERM");
    let signalled = Instant::now();
    // Connections attempted from now on: refused, or closed before any byte of a response,
    // or (accepted before the listener closed) answered whole.
    let late = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..500 {
            let outcome = late_attempt(port).await;
            let refused = outcome == Ok(Late::Refused);
            seen.push(outcome);
            if refused {
                break;
            }
        }
        seen
    });
    daemon
        .wait_for("the shutdown line", |l| l.contains("shutting down"))
        .await;
    let late = tokio::time::timeout(WAIT * 2, late)
        .await
        .expect("late connection attempts hung")
        .unwrap();
    let bad: Vec<&String> = late.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(bad.is_empty(), "late connections: {bad:?}");
    assert_eq!(
        late.last(),
        Some(&Ok(Late::Refused)),
        "the port never refused after SIGTERM: {late:?}"
    );
    assert!(
        wait_refused(port).await,
        "new connections accepted after SIGTERM"
    );
    // The idle kept-alive connection is closed, not left open to the end of the drain.
    tokio::time::timeout(WAIT, idle_task)
        .await
        .expect("the idle kept-alive connection was not closed")
        .unwrap();
    assert!(
        daemon.is_running(),
        "the proxy exited with {IN_FLIGHT} requests in flight\n{}",
        daemon.dump()
    );

    // The upstream finishes its bodies (about 1.5 s); every response must arrive whole.
    release_tx.send(true).unwrap();
    all_ok(&mut tasks, WAIT * 3, "requests in flight at SIGTERM").await;
    let _ = tokio::time::timeout(WAIT, h2_task).await;

    let status = daemon.wait_exit(Duration::from_secs(35)).await;
    let exited = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.dump());
    assert!(
        exited < openai_stream_proxy::server::DEFAULT_DRAIN,
        "exit took {exited:?}"
    );
    assert!(
        daemon.stderr().contains("all connections drained")
            && !daemon.stderr().contains("drain limit"),
        "{}",
        daemon.dump()
    );
    let complete = daemon
        .seen
        .iter()
        .filter(|l| {
            is_access_line(l)
                && has_field(l, "status", "200")
                && has_field(l, "outcome", "complete")
                && !l.contains("/v1/probe")
                && !l.contains("/v1/warm")
        })
        .count();
    assert_eq!(complete, IN_FLIGHT, "{}", daemon.dump());
    let served_late = late.iter().filter(|o| **o == Ok(Late::Served)).count();
    eprintln!(
        "SIGTERM with {IN_FLIGHT} requests in flight: all complete, exit 0 after {exited:?}; \
         {} late attempts ({served_late} served whole, the rest refused or closed)",
        late.len()
    );
}
