//! The load generator of the benchmark suite (`bench/run.sh`); loopback only.
//!
//! Sub-commands, each bounded in time and writing one JSON result (latencies in µs):
//! - `closed`: C connections, each sending the next request when the last one ended.
//! - `open`: a fixed offered rate (open loop); latency counts from the request's start.
//! - `stream`: N concurrent paced SSE streams: time to first event, the one-way delay of
//!   every stamped event (`"x_ts"` from the mock), the largest gap between events, stalls.
//! - `burst`: N requests on N pre-opened connections at once, sampling a process's RSS.
//! - `ws`: N idle WebSocket sessions held open while a process's RSS is measured.
//! - `startup`: spawn a command N times; time until its port accepts a connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(about = "Load generator for the openai-stream-proxy benchmarks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Target {
    /// http://127.0.0.1:PORT/path?query
    #[arg(long)]
    url: String,
    /// Request body (POST); GET when absent.
    #[arg(long)]
    body: Option<String>,
    /// Where to write the JSON result.
    #[arg(long)]
    out: String,
    /// A label copied into the result.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    Closed {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    Open {
        #[command(flatten)]
        target: Target,
        /// Requests per second offered.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Most requests in flight before the generator counts the rest as dropped.
        #[arg(long, default_value_t = 2000)]
        max_in_flight: usize,
    },
    Stream {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// Spread the stream starts over this long.
        #[arg(long, default_value_t = 1000)]
        ramp_ms: u64,
        /// A gap between two events longer than this is a stall.
        #[arg(long, default_value_t = 200)]
        stall_ms: u64,
        /// The mock's base URL, to read its peak of concurrently open streams.
        #[arg(long)]
        mock: Option<String>,
        /// Give up on the whole run after this long.
        #[arg(long, default_value_t = 60.0)]
        deadline: f64,
    },
    Burst {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Processes whose RSS is sampled (summed).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        #[arg(long, default_value_t = 60.0)]
        deadline: f64,
    },
    Ws {
        /// ws://127.0.0.1:PORT/path
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// How long to let the processes settle with every session open.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
        #[arg(long)]
        out: String,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long, default_value_t = 60.0)]
        deadline: f64,
    },
    Startup {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: String,
        #[arg(long, default_value = "")]
        label: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (out, result) = match args.cmd {
        Cmd::Closed {
            target,
            concurrency,
            duration,
            warmup,
        } => {
            let out = target.out.clone();
            (
                out,
                runtime.block_on(closed(target, concurrency, duration, warmup)),
            )
        }
        Cmd::Open {
            target,
            rate,
            duration,
            warmup,
            max_in_flight,
        } => {
            let out = target.out.clone();
            (
                out,
                runtime.block_on(open(target, rate, duration, warmup, max_in_flight)),
            )
        }
        Cmd::Stream {
            target,
            streams,
            ramp_ms,
            stall_ms,
            mock,
            deadline,
        } => {
            let out = target.out.clone();
            (
                out,
                runtime.block_on(stream(target, streams, ramp_ms, stall_ms, mock, deadline)),
            )
        }
        Cmd::Burst {
            target,
            requests,
            pids,
            deadline,
        } => {
            let out = target.out.clone();
            (
                out,
                runtime.block_on(burst(target, requests, pids, deadline)),
            )
        }
        Cmd::Ws {
            url,
            sessions,
            pids,
            settle,
            out,
            label,
            deadline,
        } => (
            out,
            runtime.block_on(ws(url, sessions, pids, settle, label, deadline)),
        ),
        Cmd::Startup {
            runs,
            port,
            out,
            label,
            command,
        } => (out, startup(runs, port, label, command)),
    };
    let text = serde_json::to_string_pretty(&result).expect("json");
    std::fs::write(&out, &text).expect("write result");
    println!("{}", brief(&result));
}

/// The result without its CDF arrays, on one line, for the console.
fn brief(v: &Value) -> String {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| k.as_str() != "cdf" && k.as_str() != "url")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() != 0.0 => json!((f * 10.0).round() / 10.0),
                _ => v.clone(),
            },
            other => other.clone(),
        }
    }
    strip(v).to_string()
}

// ---------------------------------------------------------------------------------------
// Statistics

const CDF_POINTS: &[f64] = &[
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 97.5,
    99.0, 99.5, 99.9, 99.99, 100.0,
];

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Nanoseconds in, a summary in microseconds out.
fn summarize(mut samples: Vec<u64>) -> Value {
    samples.sort_unstable();
    let n = samples.len();
    let mean = if n == 0 {
        0.0
    } else {
        samples.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1000.0
    };
    let cdf: Vec<Value> = CDF_POINTS
        .iter()
        .map(|&p| json!([p, percentile(&samples, p)]))
        .collect();
    json!({
        "count": n,
        "mean": mean,
        "min": percentile(&samples, 0.0),
        "p50": percentile(&samples, 50.0),
        "p90": percentile(&samples, 90.0),
        "p99": percentile(&samples, 99.0),
        "p999": percentile(&samples, 99.9),
        "max": percentile(&samples, 100.0),
        "cdf": cdf,
    })
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn read_status_kib(pid: u32, key: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| read_status_kib(p, "VmRSS:")).sum()
}

fn hwm_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| read_status_kib(p, "VmHWM:")).sum()
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 client on raw hyper connections (one request at a time per connection)

struct Req {
    addr: SocketAddr,
    method: Method,
    uri: Uri,
    host: HeaderValue,
    body: Bytes,
}

impl Req {
    fn new(target: &Target) -> Req {
        let url: Uri = target.url.parse().expect("--url");
        let authority = url.authority().expect("--url needs host:port").clone();
        let addr: SocketAddr = authority
            .as_str()
            .parse()
            .expect("--url must name an IP:port");
        let uri: Uri = url
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .unwrap();
        Req {
            addr,
            method: if target.body.is_some() {
                Method::POST
            } else {
                Method::GET
            },
            uri,
            host: HeaderValue::from_str(authority.as_str()).unwrap(),
            body: Bytes::from(target.body.clone().unwrap_or_default()),
        }
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(header::HOST, self.host.clone());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-bench-0000000000000000"),
        );
        if self.method == Method::POST {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        req
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one request gave.
struct Outcome {
    ok: bool,
    bytes: u64,
}

async fn send(sender: &mut SendRequest<Full<Bytes>>, req: &Req) -> Outcome {
    let failed = Outcome {
        ok: false,
        bytes: 0,
    };
    if sender.ready().await.is_err() {
        return failed;
    }
    let Ok(response) = sender.send_request(req.build()).await else {
        return failed;
    };
    let ok = response.status().is_success();
    let mut body = response.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(d) = frame.data_ref() {
                    bytes += d.len() as u64;
                }
            }
            Err(_) => return failed,
        }
    }
    Outcome { ok, bytes }
}

// ---------------------------------------------------------------------------------------
// closed loop

async fn closed(target: Target, concurrency: usize, duration: f64, warmup: f64) -> Value {
    let req = Arc::new(Req::new(&target));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let req = req.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut errors, mut bytes) = (0u64, 0u64);
            let mut sender = None;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                if sender.is_none() {
                    sender = connect(req.addr).await.ok();
                    if sender.is_none() {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let t0 = Instant::now();
                let outcome = send(sender.as_mut().unwrap(), &req).await;
                let t1 = Instant::now();
                if t0 >= measure_from && t1 <= end {
                    if outcome.ok {
                        lat.push((t1 - t0).as_nanos() as u64);
                        bytes += outcome.bytes;
                    } else {
                        errors += 1;
                    }
                }
                if !outcome.ok {
                    sender = None;
                }
            }
            (lat, errors, bytes)
        }));
    }
    let mut lat = Vec::new();
    let (mut errors, mut bytes) = (0u64, 0u64);
    for w in workers {
        let (l, e, b) = w.await.unwrap();
        lat.extend(l);
        errors += e;
        bytes += b;
    }
    let n = lat.len();
    json!({
        "mode": "closed",
        "label": target.label,
        "url": target.url,
        "concurrency": concurrency,
        "duration_s": duration,
        "requests": n,
        "errors": errors,
        "rps": n as f64 / duration,
        "mean_bytes": if n > 0 { bytes as f64 / n as f64 } else { 0.0 },
        "latency_us": summarize(lat),
    })
}

// ---------------------------------------------------------------------------------------
// open loop

async fn open(
    target: Target,
    rate: f64,
    duration: f64,
    warmup: f64,
    max_in_flight: usize,
) -> Value {
    let req = Arc::new(Req::new(&target));
    let pool: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>> = Arc::new(Mutex::new(Vec::new()));
    // Pre-open a few connections so the first requests do not pay for the handshake.
    for _ in 0..8 {
        if let Ok(s) = connect(req.addr).await {
            pool.lock().unwrap().push(s);
        }
    }
    let total = ((warmup + duration) * rate).ceil() as u64;
    let warm_count = (warmup * rate).ceil() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);

    // A plain thread paces the requests: tokio's timer has a 1 ms granularity, which would
    // send them in bursts; nanosleep keeps them ~evenly spread.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send((i, due)).is_err() {
                return;
            }
        }
    });

    let in_flight = Arc::new(AtomicU64::new(0));
    // (latencies, scheduling lags, errors, bytes)
    type Results = (Vec<u64>, Vec<u64>, u64, u64);
    let results: Arc<Mutex<Results>> = Arc::new(Mutex::new((Vec::new(), Vec::new(), 0, 0)));
    let dropped = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    while let Some((i, due)) = rx.recv().await {
        if in_flight.load(Ordering::Relaxed) as usize >= max_in_flight {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (req, pool, results, in_flight) = (
            req.clone(),
            pool.clone(),
            results.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let lag = t0.saturating_duration_since(due);
            let sender = pool.lock().unwrap().pop();
            let sender = match sender {
                Some(s) if !s.is_closed() => Some(s),
                _ => connect(req.addr).await.ok(),
            };
            let (ok, bytes, sender) = match sender {
                Some(mut s) => {
                    let o = send(&mut s, &req).await;
                    (o.ok, o.bytes, o.ok.then_some(s))
                }
                None => (false, 0, None),
            };
            let t1 = Instant::now();
            if let Some(s) = sender {
                pool.lock().unwrap().push(s);
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if i >= warm_count {
                let mut r = results.lock().unwrap();
                if ok {
                    r.0.push((t1 - t0).as_nanos() as u64);
                    r.1.push(lag.as_nanos() as u64);
                    r.3 += bytes;
                } else {
                    r.2 += 1;
                }
            }
        }));
        if tasks.len() > 4096 {
            tasks.retain(|t| !t.is_finished());
        }
    }
    let _ = pacer.join();
    let wall = started.elapsed().as_secs_f64() - warmup;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let (lat, lag, errors, bytes) = std::mem::take(&mut *results.lock().unwrap());
    let n = lat.len();
    json!({
        "mode": "open",
        "label": target.label,
        "url": target.url,
        "offered_rps": rate,
        "duration_s": duration,
        "requests": n,
        "achieved_rps": n as f64 / wall.max(1e-9),
        "errors": errors,
        "dropped": dropped.load(Ordering::Relaxed),
        "mean_bytes": if n > 0 { bytes as f64 / n as f64 } else { 0.0 },
        "latency_us": summarize(lat),
        "dispatch_lag_us": summarize(lag),
    })
}

// ---------------------------------------------------------------------------------------
// paced streams

fn stamps(frame: &[u8], out: &mut Vec<u128>) {
    const KEY: &[u8] = b"\"x_ts\":";
    let mut i = 0;
    while i + KEY.len() <= frame.len() {
        if &frame[i..i + KEY.len()] == KEY {
            let mut j = i + KEY.len();
            let mut v: u128 = 0;
            while j < frame.len() && frame[j].is_ascii_digit() {
                v = v * 10 + u128::from(frame[j] - b'0');
                j += 1;
            }
            out.push(v);
            i = j;
        } else {
            i += 1;
        }
    }
}

#[derive(Default)]
struct StreamResult {
    ok: bool,
    ttft_ns: Option<u64>,
    first_delta_ns: Option<u64>,
    max_gap_ns: u64,
    delays_ns: Vec<u64>,
    gaps_ns: Vec<u64>,
    events: u64,
}

async fn one_stream(req: &Req, deadline: Instant) -> StreamResult {
    let mut r = StreamResult::default();
    let Ok(Ok(mut sender)) = tokio::time::timeout_at(deadline.into(), connect(req.addr)).await
    else {
        return r;
    };
    let t0 = Instant::now();
    let work = async {
        let response = sender.send_request(req.build()).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let mut body = response.into_body();
        let mut last: Option<Instant> = None;
        let mut stamp_buf = Vec::new();
        let mut tail = Vec::<u8>::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.ok()?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let now = Instant::now();
            let wall = now_nanos();
            if r.ttft_ns.is_none() {
                r.ttft_ns = Some((now - t0).as_nanos() as u64);
            }
            if let Some(prev) = last {
                let gap = (now - prev).as_nanos() as u64;
                r.gaps_ns.push(gap);
                r.max_gap_ns = r.max_gap_ns.max(gap);
            }
            last = Some(now);
            stamp_buf.clear();
            stamps(data, &mut stamp_buf);
            if !stamp_buf.is_empty() && r.first_delta_ns.is_none() {
                r.first_delta_ns = Some((now - t0).as_nanos() as u64);
            }
            for &ts in &stamp_buf {
                r.delays_ns.push(wall.saturating_sub(ts) as u64);
                r.events += 1;
            }
            tail.extend_from_slice(&data[data.len().saturating_sub(32)..]);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
        let text = String::from_utf8_lossy(&tail);
        Some(text.contains("[DONE]") || text.contains("response.completed"))
    };
    r.ok = matches!(
        tokio::time::timeout_at(deadline.into(), work).await,
        Ok(Some(true))
    );
    r
}

async fn get_json(url: &str) -> Option<Value> {
    let target = Target {
        url: url.to_string(),
        body: None,
        out: String::new(),
        label: String::new(),
    };
    let req = Req::new(&target);
    let mut sender = connect(req.addr).await.ok()?;
    let response = sender.send_request(req.build()).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

async fn stream(
    target: Target,
    streams: usize,
    ramp_ms: u64,
    stall_ms: u64,
    mock: Option<String>,
    deadline_s: f64,
) -> Value {
    let req = Arc::new(Req::new(&target));
    if let Some(mock) = &mock {
        let _ = get_json(&format!("{mock}/stats?reset=1")).await;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(deadline_s);
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let due = start + Duration::from_millis(ramp_ms).mul_f64(i as f64 / streams as f64);
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            one_stream(&req, deadline).await
        }));
    }
    let (mut ttft, mut first_delta, mut delays, mut gaps, mut max_gaps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ok, mut failed, mut stalled, mut events) = (0u64, 0u64, 0u64, 0u64);
    let stall = stall_ms * 1_000_000;
    for t in tasks {
        let r = t.await.unwrap_or_default();
        if r.ok {
            ok += 1;
        } else {
            failed += 1;
        }
        if r.max_gap_ns > stall {
            stalled += 1;
        }
        ttft.extend(r.ttft_ns);
        first_delta.extend(r.first_delta_ns);
        delays.extend(r.delays_ns);
        gaps.extend(r.gaps_ns);
        max_gaps.push(r.max_gap_ns);
        events += r.events;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mock_stats = match &mock {
        Some(mock) => get_json(&format!("{mock}/stats")).await,
        None => None,
    };
    json!({
        "mode": "stream",
        "label": target.label,
        "url": target.url,
        "streams": streams,
        "ramp_ms": ramp_ms,
        "stall_ms": stall_ms,
        "completed": ok,
        "failed": failed,
        "stalled": stalled,
        "events": events,
        "elapsed_s": elapsed,
        "mock_peak_concurrent": mock_stats.as_ref().and_then(|s| s.get("peak").cloned()),
        "ttft_us": summarize(ttft),
        "first_delta_us": summarize(first_delta),
        "event_delay_us": summarize(delays),
        "frame_gap_us": summarize(gaps),
        "max_gap_per_stream_us": summarize(max_gaps),
    })
}

// ---------------------------------------------------------------------------------------
// burst with RSS sampling

async fn burst(target: Target, requests: usize, pids: Vec<u32>, deadline_s: f64) -> Value {
    let req = Arc::new(Req::new(&target));
    let deadline = Instant::now() + Duration::from_secs_f64(deadline_s);
    let rss_before = rss_kib(&pids);
    let hwm_before = hwm_kib(&pids);
    // Open every connection first, so that the requests really are concurrent.
    let mut senders = Vec::with_capacity(requests);
    for chunk in (0..requests).collect::<Vec<_>>().chunks(100) {
        let opened = futures_util::future::join_all(chunk.iter().map(|_| connect(req.addr))).await;
        senders.extend(opened.into_iter().flatten());
    }
    let connected = senders.len();
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (sampling, peak, pids) = (sampling.clone(), peak.clone(), pids.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(&pids), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let t0 = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut s| {
            let req = req.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let o = tokio::time::timeout_at(deadline.into(), send(&mut s, &req)).await;
                let lat = t.elapsed().as_nanos() as u64;
                match o {
                    Ok(o) => (o.ok, o.bytes, lat),
                    Err(_) => (false, 0, lat),
                }
            })
        })
        .collect();
    let (mut ok, mut bytes, mut lat) = (0u64, 0u64, Vec::new());
    for t in tasks {
        if let Ok((good, b, l)) = t.await {
            if good {
                ok += 1;
                bytes += b;
                lat.push(l);
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let rss_after = rss_kib(&pids);
    json!({
        "mode": "burst",
        "label": target.label,
        "url": target.url,
        "requests": requests,
        "connected": connected,
        "completed": ok,
        "elapsed_s": elapsed,
        "response_bytes_total": bytes,
        "response_bytes_mean": if ok > 0 { bytes as f64 / ok as f64 } else { 0.0 },
        "rss_before_kib": rss_before,
        "rss_peak_sampled_kib": peak.load(Ordering::Relaxed),
        "hwm_before_kib": hwm_before,
        "hwm_after_kib": hwm_kib(&pids),
        "rss_after_kib": rss_after,
        "latency_us": summarize(lat),
    })
}

// ---------------------------------------------------------------------------------------
// idle WebSocket sessions

async fn ws(
    url: String,
    sessions: usize,
    pids: Vec<u32>,
    settle: f64,
    label: String,
    deadline_s: f64,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs_f64(deadline_s);
    let uri: Uri = url.parse().expect("--url");
    let addr: SocketAddr = uri
        .authority()
        .expect("--url needs host:port")
        .as_str()
        .parse()
        .expect("--url must name an IP:port");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(&pids);
    let t0 = Instant::now();
    let mut open = Vec::with_capacity(sessions);
    let mut failed = 0usize;
    let mut echo_lat = Vec::new();
    let indices: Vec<usize> = (0..sessions).collect();
    for chunk in indices.chunks(200) {
        if Instant::now() > deadline {
            failed += chunk.len();
            continue;
        }
        let opened = futures_util::future::join_all(chunk.iter().map(|_| {
            let url = url.clone();
            async move {
                let tcp = TcpStream::connect(addr).await.ok()?;
                let _ = tcp.set_nodelay(true);
                let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
                    .await
                    .ok()?;
                let t = Instant::now();
                ws.send(Message::text("ping from bench")).await.ok()?;
                let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                match echo {
                    Ok(Some(Ok(Message::Text(_)))) => Some((ws, t.elapsed().as_nanos() as u64)),
                    _ => None,
                }
            }
        }))
        .await;
        for o in opened {
            match o {
                Some((ws, lat)) => {
                    open.push(ws);
                    echo_lat.push(lat);
                }
                None => failed += 1,
            }
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let rss_open = rss_kib(&pids);
    let n = open.len();
    // Close them all, politely, in parallel.
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(open.into_iter().map(|mut ws| async move {
            let _ = ws.close(None).await;
        })),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_closed = rss_kib(&pids);
    let per_session = if n > 0 {
        (rss_open.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64
    } else {
        0.0
    };
    json!({
        "mode": "ws",
        "label": label,
        "url": url,
        "sessions": sessions,
        "open": n,
        "failed": failed,
        "open_s": open_s,
        "rss_before_kib": rss_before,
        "rss_open_kib": rss_open,
        "rss_after_close_kib": rss_closed,
        "rss_per_session_bytes": per_session,
        "echo_latency_us": summarize(echo_lat),
    })
}

// ---------------------------------------------------------------------------------------
// start-up to listening

fn startup(runs: usize, port: u16, label: String, command: Vec<String>) -> Value {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut times = Vec::new();
    let mut failures = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let child = std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            failures += 1;
            continue;
        };
        let limit = t0 + Duration::from_secs(5);
        let mut up = false;
        while Instant::now() < limit {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                up = true;
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let dt = t0.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        if up {
            times.push(dt.as_nanos() as u64);
        } else {
            failures += 1;
        }
        // Let the port and the process's resources go before the next start.
        std::thread::sleep(Duration::from_millis(100));
    }
    json!({
        "mode": "startup",
        "label": label,
        "command": command,
        "runs": runs,
        "failures": failures,
        "startup_us": summarize(times),
    })
}
