//! The load of the soak test (`bench/soak.sh`); loopback only.
//!
//! ```sh
//! soak_load --proxy 127.0.0.1:PORT --pid PROXY_PID --duration 600 --rate 200 --out target/soak
//! ```
//!
//! Sends a steady mix of conversions, passthrough (streams, paced streams, uploads, plain
//! GETs, over HTTP/1.1 keep-alive, fresh HTTP/1.1 connections and HTTP/2) and WebSocket
//! sessions through the proxy for `--duration` seconds at `--rate` starts per second (open
//! loop: the schedule never waits for answers), and samples the proxy's RSS and open file
//! descriptors every `--sample-every` seconds.
//!
//! The upstream is `examples/bench_upstream.rs`, whose streams are deterministic
//! (`bench/sse_gen.rs`), so every answer is checked: a passthrough stream must equal
//! `sse_gen::full_stream` byte for byte; the first conversion of each shape is checked
//! field by field and every later one must equal it byte for byte; uploads and
//! `GET /v1/models` must answer `ok`; WebSocket messages are unique and must come back
//! unchanged. Anything else (a status other than 200, a different body, a broken
//! connection, no complete answer within 30 s, a start skipped because `--max-in-flight`
//! were already running) is an error. `cancel` requests hang up mid-stream on purpose.
//!
//! Writes `samples.csv` (`t_s,phase,rss_kib,fds,threads,requests,errors,in_flight`; phase
//! `idle` before the load, `load`, then `drained` once every answer is in and the client
//! connections are closed) and `result.json` into `--out`, and exits 1 on any error.

#[path = "../bench/sse_gen.rs"]
mod sse_gen;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sse_gen::Api;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(about = "Soak load for openai-stream-proxy: steady mixed traffic, every answer checked")]
struct Args {
    /// The proxy's listening address.
    #[arg(long)]
    proxy: SocketAddr,
    /// The proxy's process id (RSS and descriptors are read from /proc/PID).
    #[arg(long)]
    pid: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Requests and WebSocket sessions started per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds between two samples.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    /// Most requests in flight; a start beyond it is skipped and counted as an error.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Seed of the mode and shape choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only these modes (comma-separated names as in result.json), in their usual
    /// proportions: for finding which traffic a trend comes from.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory for samples.csv and result.json.
    #[arg(long)]
    out: PathBuf,
}

/// Longest time one request or session may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    ConvertChat,
    ConvertResponses,
    StreamChat,
    StreamResponses,
    PacedStream,
    Upload,
    Models,
    WebSocket,
    Cancel,
}

/// The mix, in starts per hundred.
const MIX: [(Mode, u64); 9] = [
    (Mode::ConvertChat, 25),
    (Mode::ConvertResponses, 10),
    (Mode::StreamChat, 18),
    (Mode::StreamResponses, 6),
    (Mode::PacedStream, 10),
    (Mode::Upload, 10),
    (Mode::Models, 10),
    (Mode::WebSocket, 8),
    (Mode::Cancel, 3),
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::ConvertChat => "convert_chat",
            Mode::ConvertResponses => "convert_responses",
            Mode::StreamChat => "passthrough_stream_chat",
            Mode::StreamResponses => "passthrough_stream_responses",
            Mode::PacedStream => "passthrough_paced_stream",
            Mode::Upload => "passthrough_upload",
            Mode::Models => "passthrough_get",
            Mode::WebSocket => "websocket_session",
            Mode::Cancel => "cancel_mid_stream",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Mode::ConvertChat | Mode::ConvertResponses => "convert",
            Mode::WebSocket => "websocket",
            _ => "passthrough",
        }
    }

    fn index(self) -> usize {
        MIX.iter().position(|(m, _)| *m == self).unwrap()
    }
}

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// How one request goes over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// A pooled kept-alive HTTP/1.1 connection.
    KeepAlive,
    /// A new HTTP/1.1 connection, closed after the response.
    Fresh,
    /// A stream of one of the shared HTTP/2 connections.
    Http2,
}

/// One planned start.
struct Plan {
    mode: Mode,
    wire: Wire,
    n: u64,
    events: usize,
    delta: usize,
    size: usize,
}

fn plan(rng: &mut Rng, mix: &[(Mode, u64)], n: u64) -> Plan {
    let total: u64 = mix.iter().map(|(_, w)| w).sum();
    let mut roll = rng.next() % total;
    let mut mode = mix[0].0;
    for &(m, w) in mix {
        if roll < w {
            mode = m;
            break;
        }
        roll -= w;
    }
    let wire = match (mode, rng.next() % 100) {
        (Mode::Cancel | Mode::WebSocket, _) => Wire::Fresh,
        (_, 0..=4) => Wire::Fresh,
        (_, 5..=19) => Wire::Http2,
        _ => Wire::KeepAlive,
    };
    let (events, delta) = match mode {
        Mode::ConvertChat => (rng.pick(&[5, 20, 80]), rng.pick(&[0, 32])),
        Mode::ConvertResponses => (rng.pick(&[5, 20]), rng.pick(&[0, 32])),
        Mode::StreamChat => (rng.pick(&[5, 20, 200]), rng.pick(&[0, 64])),
        Mode::StreamResponses => (rng.pick(&[5, 20]), rng.pick(&[0, 64])),
        Mode::PacedStream => (20, 0),
        Mode::Cancel => (40, 0),
        _ => (0, 0),
    };
    let size = rng.pick(&[1024, 16 * 1024, 256 * 1024]);
    Plan {
        mode,
        wire,
        n,
        events,
        delta,
        size,
    }
}

#[derive(Default)]
struct Counts {
    ok: [AtomicU64; MIX.len()],
    errors: [AtomicU64; MIX.len()],
    http1_keep_alive: AtomicU64,
    http1_fresh: AtomicU64,
    http2: AtomicU64,
    ws_messages: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicUsize,
}

impl Counts {
    fn requests(&self) -> u64 {
        self.ok
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.errors()
    }

    fn errors(&self) -> u64 {
        self.errors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.skipped.load(Ordering::Relaxed)
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

struct Shared {
    proxy: SocketAddr,
    counts: Counts,
    /// Idle kept-alive HTTP/1.1 connections, with the time each became idle.
    pool: Mutex<Vec<(H1, Instant)>>,
    /// The shared HTTP/2 connections, reopened when one breaks.
    h2: Vec<tokio::sync::Mutex<Option<H2>>>,
    /// The first conversion of each shape, checked field by field.
    references: Mutex<HashMap<(Mode, usize, usize), Bytes>>,
    /// The first errors, for the report.
    examples: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, mode: Mode, message: String) {
        self.counts.errors[mode.index()].fetch_add(1, Ordering::Relaxed);
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 50 {
            examples.push(format!("{}: {message}", mode.name()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connections.

async fn connect_h1(addr: SocketAddr) -> Result<H1, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn connect_h2(addr: SocketAddr) -> Result<H2, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The proxy closes a connection idle for its `headerReadTimeoutSeconds` (30 s by default);
/// like any HTTP client, the load never reuses one that may be about to close.
const MAX_IDLE: Duration = Duration::from_secs(15);

/// The most recently used idle connection that is still open and not idle too long.
fn take_idle(pool: &Mutex<Vec<(H1, Instant)>>) -> Option<H1> {
    let mut pool = pool.lock().unwrap();
    // Connections at the bottom of the stack are the oldest: drop the stale ones.
    pool.retain(|(sender, since)| !sender.is_closed() && since.elapsed() < MAX_IDLE);
    pool.pop().map(|(sender, _)| sender)
}

/// Sends `request` the way `wire` says and returns the response head; the HTTP/1.1
/// connection comes back with it so a kept-alive one can return to the pool.
async fn send(
    shared: &Shared,
    wire: Wire,
    slot: usize,
    mut request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Option<H1>), String> {
    let addr = shared.proxy;
    match wire {
        Wire::KeepAlive | Wire::Fresh => {
            let pooled = if wire == Wire::KeepAlive {
                take_idle(&shared.pool)
            } else {
                None
            };
            let mut sender = match pooled {
                Some(sender) => sender,
                None => connect_h1(addr).await?,
            };
            sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            request
                .headers_mut()
                .insert("host", addr.to_string().parse().unwrap());
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("no response head: {e}"))?;
            Ok((response, (wire == Wire::KeepAlive).then_some(sender)))
        }
        Wire::Http2 => {
            let mut sender = {
                let mut slot = shared.h2[slot % shared.h2.len()].lock().await;
                match slot.as_ref() {
                    Some(sender) if !sender.is_closed() => sender.clone(),
                    _ => {
                        let sender = connect_h2(addr).await?;
                        *slot = Some(sender.clone());
                        sender
                    }
                }
            };
            let uri = format!("http://{addr}{}", request.uri());
            *request.uri_mut() = uri.parse().unwrap();
            sender
                .ready()
                .await
                .map_err(|e| format!("HTTP/2 connection not ready: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("no response head: {e}"))?;
            Ok((response, None))
        }
    }
}

fn post_json(path: &str, body: String) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-soak-0000000000000000")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The whole body, or why it broke.
async fn whole(response: Response<Incoming>) -> Result<(u16, Bytes), String> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("status {status}, body broke off: {e}"))?
        .to_bytes();
    Ok((status, body))
}

fn expect_200(status: u16, body: &[u8]) -> Result<(), String> {
    if status == 200 {
        Ok(())
    } else {
        Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))
    }
}

fn expect_same(got: &[u8], expected: &[u8]) -> Result<(), String> {
    if got == expected {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    Err(format!(
        "body differs: {} bytes, expected {}, first difference at byte {at}",
        got.len(),
        expected.len()
    ))
}

// ---------------------------------------------------------------------------------------
// The modes.

/// A conversion: the first of its shape is checked field by field and kept; every later
/// one must equal it byte for byte.
fn check_conversion(shared: &Shared, plan: &Plan, body: &Bytes) -> Result<(), String> {
    let key = (plan.mode, plan.events, plan.delta);
    if let Some(reference) = shared.references.lock().unwrap().get(&key) {
        return expect_same(body, reference);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let text = sse_gen::full_text(plan.events, plan.delta);
    let events = plan.events as u64;
    let fine = match plan.mode {
        Mode::ConvertChat => {
            v["object"] == "chat.completion"
                && v["choices"][0]["message"]["content"] == text.as_str()
                && v["choices"][0]["finish_reason"] == "stop"
                && v["usage"]["completion_tokens"] == events
        }
        _ => {
            v["object"] == "response"
                && v["status"] == "completed"
                && v["output"][0]["content"][0]["text"] == text.as_str()
                && v["usage"]["output_tokens"] == events
        }
    };
    if !fine {
        return Err(format!("wrong conversion: {v}"));
    }
    shared
        .references
        .lock()
        .unwrap()
        .entry(key)
        .or_insert_with(|| body.clone());
    Ok(())
}

async fn http_mode(shared: &Shared, plan: &Plan) -> Result<(), String> {
    let api = |mode| {
        if mode == Mode::ConvertResponses || mode == Mode::StreamResponses {
            Api::Responses
        } else {
            Api::Chat
        }
    };
    let shape = format!("events={}&delta={}", plan.events, plan.delta);
    let request = match plan.mode {
        Mode::ConvertChat => post_json(
            &format!("/v1/chat/completions?{shape}"),
            format!(
                "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"soak {}\"}}]}}",
                plan.n
            ),
        ),
        Mode::ConvertResponses => post_json(
            &format!("/v1/responses?{shape}"),
            format!("{{\"model\":\"gpt-4o\",\"input\":\"soak {}\"}}", plan.n),
        ),
        Mode::StreamChat | Mode::PacedStream | Mode::Cancel => {
            let pace = if plan.mode == Mode::StreamChat {
                ""
            } else {
                "&pace_ms=25"
            };
            post_json(
                &format!("/v1/chat/completions?{shape}{pace}"),
                format!(
                    "{{\"model\":\"gpt-4o\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"soak {}\"}}]}}",
                    plan.n
                ),
            )
        }
        Mode::StreamResponses => post_json(
            &format!("/v1/responses?{shape}"),
            format!(
                "{{\"model\":\"gpt-4o\",\"stream\":true,\"input\":\"soak {}\"}}",
                plan.n
            ),
        ),
        Mode::Upload => Request::post("/v1/files")
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(vec![
                (plan.n % 251) as u8;
                plan.size
            ])))
            .unwrap(),
        Mode::Models | Mode::WebSocket => Request::get("/v1/models")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    };
    let (response, keep) = send(shared, plan.wire, plan.n as usize, request).await?;
    if plan.mode == Mode::Cancel {
        // Read the first bytes, then hang up.
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let first = match body.frame().await {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            Some(Err(e)) => return Err(format!("status {status}, stream broke off: {e}")),
            None => Bytes::new(),
        };
        expect_200(status, &first)?;
        let expected = sse_gen::full_stream(Api::Chat, plan.events, plan.delta);
        if first.is_empty() || !expected.starts_with(&first) {
            return Err("the first bytes of the stream differ".into());
        }
        return Ok(());
    }
    let (status, body) = whole(response).await?;
    expect_200(status, &body)?;
    match plan.mode {
        Mode::ConvertChat | Mode::ConvertResponses => check_conversion(shared, plan, &body)?,
        Mode::StreamChat | Mode::StreamResponses | Mode::PacedStream => expect_same(
            &body,
            &sse_gen::full_stream(api(plan.mode), plan.events, plan.delta),
        )?,
        _ => expect_same(&body, b"ok")?,
    }
    if let Some(sender) = keep {
        if sender.is_ready() {
            let mut pool = shared.pool.lock().unwrap();
            if pool.len() < 256 {
                pool.push((sender, Instant::now()));
            }
        }
    }
    Ok(())
}

/// A session of five unique messages (text and binary), each echoed, then a clean close.
async fn websocket(shared: &Shared, n: u64) -> Result<(), String> {
    let tcp = TcpStream::connect(shared.proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{}/v1/realtime?model=soak-{n}", shared.proxy);
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    for k in 0..5u64 {
        let message = if k == 2 {
            Message::binary(vec![((n + k) % 251) as u8; 8192])
        } else {
            Message::text(format!("soak session {n} message {k}"))
        };
        ws.send(message.clone())
            .await
            .map_err(|e| format!("send {k}: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(echo)) if echo == message => break,
                Some(Ok(other)) => return Err(format!("message {k}: got {other:?}")),
                Some(Err(e)) => return Err(format!("message {k}: {e}")),
                None => return Err(format!("message {k}: the session ended")),
            }
        }
        shared.counts.ws_messages.fetch_add(2, Ordering::Relaxed);
    }
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    // Read until the close handshake completes.
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn run_one(shared: Arc<Shared>, plan: Plan) {
    let work = async {
        if plan.mode == Mode::WebSocket {
            websocket(&shared, plan.n).await
        } else {
            http_mode(&shared, &plan).await
        }
    };
    let result = match tokio::time::timeout(REQUEST_LIMIT, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("no complete answer within {REQUEST_LIMIT:?}")),
    };
    match result {
        Ok(()) => {
            shared.counts.ok[plan.mode.index()].fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => shared.error(plan.mode, format!("#{} over {:?}: {e}", plan.n, plan.wire)),
    }
    if plan.mode != Mode::WebSocket {
        let counter = match plan.wire {
            Wire::KeepAlive => &shared.counts.http1_keep_alive,
            Wire::Fresh => &shared.counts.http1_fresh,
            Wire::Http2 => &shared.counts.http2,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    shared.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------
// Sampling.

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Sampler {
    pid: u32,
    start: Instant,
    file: std::fs::File,
    rows: Vec<Value>,
}

impl Sampler {
    fn sample(&mut self, phase: &str, counts: &Counts) {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let row = json!({
            "t_s": (self.start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "phase": phase,
            "rss_kib": status_field(self.pid, "VmRSS:"),
            "fds": fds,
            "threads": status_field(self.pid, "Threads:"),
            "requests": counts.requests(),
            "errors": counts.errors(),
            "in_flight": counts.in_flight.load(Ordering::Relaxed),
        });
        let _ = writeln!(
            self.file,
            "{},{},{},{},{},{},{},{}",
            row["t_s"],
            phase,
            row["rss_kib"],
            row["fds"],
            row["threads"],
            row["requests"],
            row["errors"],
            row["in_flight"]
        );
        let _ = self.file.flush();
        self.rows.push(row);
    }
}

// ---------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let errors = runtime.block_on(soak(args));
    if errors == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

async fn soak(args: Args) -> u64 {
    let mix: Vec<(Mode, u64)> = MIX
        .into_iter()
        .filter(|(m, _)| args.only.is_empty() || args.only.iter().any(|o| o == m.name()))
        .collect();
    if mix.is_empty() {
        eprintln!(
            "--only names no mode; the modes are {}",
            MIX.map(|(m, _)| m.name()).join(", ")
        );
        return 1;
    }
    std::fs::create_dir_all(&args.out).expect("--out");
    let mut file = std::fs::File::create(args.out.join("samples.csv")).expect("samples.csv");
    writeln!(
        file,
        "t_s,phase,rss_kib,fds,threads,requests,errors,in_flight"
    )
    .unwrap();
    let shared = Arc::new(Shared {
        proxy: args.proxy,
        counts: Counts::default(),
        pool: Mutex::new(Vec::new()),
        h2: (0..4).map(|_| tokio::sync::Mutex::new(None)).collect(),
        references: Mutex::new(HashMap::new()),
        examples: Mutex::new(Vec::new()),
    });
    let sampler = Arc::new(Mutex::new(Sampler {
        pid: args.pid,
        start: Instant::now(),
        file,
        rows: Vec::new(),
    }));
    sampler.lock().unwrap().sample("idle", &shared.counts);

    let every = Duration::from_secs_f64(args.sample_every.max(0.5));
    let sampling = {
        let (sampler, shared) = (sampler.clone(), shared.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                sampler.lock().unwrap().sample("load", &shared.counts);
            }
        })
    };

    // The open-loop schedule: start i is due at i / rate, whatever the answers do.
    let mut rng = Rng(args.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut n: u64 = 0;
    loop {
        let due = start + period.mul_f64(n as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let plan = plan(&mut rng, &mix, n);
        n += 1;
        if shared.counts.in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
            shared.counts.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        shared.counts.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_one(shared.clone(), plan));
    }
    let load_s = start.elapsed().as_secs_f64();

    // Every answer in (bounded by the per-request limit), then the client connections close.
    let waited = tokio::time::Instant::now();
    while shared.counts.in_flight.load(Ordering::Relaxed) > 0
        && waited.elapsed() < REQUEST_LIMIT + Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sampling.abort();
    sampler.lock().unwrap().sample("load", &shared.counts);
    shared.pool.lock().unwrap().clear();
    for slot in &shared.h2 {
        *slot.lock().await = None;
    }
    // Let the proxy see the closes, then sample the drained state twice.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        sampler.lock().unwrap().sample("drained", &shared.counts);
    }

    let c = &shared.counts;
    let mut modes = serde_json::Map::new();
    let mut groups: HashMap<&str, (u64, u64)> = HashMap::new();
    for (mode, _) in MIX {
        let ok = c.ok[mode.index()].load(Ordering::Relaxed);
        let errors = c.errors[mode.index()].load(Ordering::Relaxed);
        modes.insert(
            mode.name().to_owned(),
            json!({"group": mode.group(), "ok": ok, "errors": errors}),
        );
        let g = groups.entry(mode.group()).or_default();
        g.0 += ok;
        g.1 += errors;
    }
    let errors = c.errors();
    let result = json!({
        "duration_s": args.duration,
        "load_s": load_s,
        "rate": args.rate,
        "seed": args.seed,
        "sample_every_s": every.as_secs_f64(),
        "started": n,
        "requests": c.requests(),
        "errors": errors,
        "skipped_over_max_in_flight": c.skipped.load(Ordering::Relaxed),
        "still_in_flight": c.in_flight.load(Ordering::Relaxed),
        "modes": modes,
        "groups": groups.iter().map(|(g, (ok, e))| (g.to_string(), json!({"ok": ok, "errors": e}))).collect::<serde_json::Map<_, _>>(),
        "http1_keep_alive": c.http1_keep_alive.load(Ordering::Relaxed),
        "http1_fresh_connection": c.http1_fresh.load(Ordering::Relaxed),
        "http2": c.http2.load(Ordering::Relaxed),
        "websocket_messages": c.ws_messages.load(Ordering::Relaxed),
        "error_examples": shared.examples.lock().unwrap().clone(),
        "samples": sampler.lock().unwrap().rows.clone(),
    });
    std::fs::write(
        args.out.join("result.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .expect("result.json");
    println!(
        "soak_load: {} requests in {load_s:.0} s, {errors} errors ({})",
        c.requests(),
        MIX.iter()
            .map(|(m, _)| format!("{} {}", m.name(), c.ok[m.index()].load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    errors
}
