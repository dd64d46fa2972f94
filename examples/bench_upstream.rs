//! A fast mock OpenAI upstream for the benchmark suite (`bench/run.sh`).
//!
//! ```sh
//! cargo build --release --example bench_upstream
//! target/release/examples/bench_upstream --listen 127.0.0.1:9100
//! ```
//!
//! - `POST …/chat/completions`, `POST …/responses` with `"stream": true`: a realistic SSE
//!   stream (see `bench/sse_gen.rs`). Without `stream: true`, Chat Completions answers the
//!   equivalent JSON body. The query string shapes the stream:
//!   - `events=N`  content deltas (default 20);
//!   - `delta=B`   bytes of text per delta (default 0: one natural word);
//!   - `pace_ms=M` send the head at once, then `burst` deltas every M ms, then the tail
//!     (default 0: the whole stream in one write);
//!   - `burst=K`   deltas per tick when paced (default 1);
//!   - `ts=1`      stamp every delta with `"x_ts":<unix nanos>` taken just before it is
//!     written, for one-way delay measurements;
//!   - `frames=event` unpaced, but one body frame (HTTP chunk) per event.
//! - `GET` with `Upgrade: websocket`: an echo server (text and binary echoed, pings answered).
//! - `GET /stats`: `{"active":…,"peak":…,"streams":…,"ws_active":…,"ws_peak":…}`;
//!   `POST /stats/reset` zeroes the peaks and counters.
//! - Anything else: `200 ok`.
//!
//! Unpaced streams are built once per shape and then served from memory, so the mock costs
//! as little CPU per request as possible.

#[path = "../bench/sse_gen.rs"]
mod sse_gen;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sse_gen::Api;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Parser)]
#[command(about = "Mock OpenAI upstream for benchmarks: SSE streams and a WebSocket echo")]
struct Args {
    /// Address to listen on (loopback only in the suite).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Tokio worker threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Stats {
    active: AtomicUsize,
    peak: AtomicUsize,
    streams: AtomicUsize,
    ws_active: AtomicUsize,
    ws_peak: AtomicUsize,
}

struct Guard {
    stats: Arc<Stats>,
    ws: bool,
}

impl Guard {
    fn new(stats: &Arc<Stats>, ws: bool) -> Guard {
        let (active, peak) = if ws {
            (&stats.ws_active, &stats.ws_peak)
        } else {
            stats.streams.fetch_add(1, Ordering::Relaxed);
            (&stats.active, &stats.peak)
        };
        let now = active.fetch_add(1, Ordering::Relaxed) + 1;
        peak.fetch_max(now, Ordering::Relaxed);
        Guard {
            stats: stats.clone(),
            ws,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let active = if self.ws {
            &self.stats.ws_active
        } else {
            &self.stats.active
        };
        active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    api: Api,
    events: usize,
    delta: usize,
    pace_ms: u64,
    burst: usize,
    ts: bool,
    per_event: bool,
}

struct State {
    stats: Arc<Stats>,
    cache: Mutex<HashMap<(Shape, bool), Bytes>>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    eprintln!("bench_upstream listening on {}", listener.local_addr()?);
    let state = Arc::new(State {
        stats: Arc::new(Stats::default()),
        cache: Mutex::new(HashMap::new()),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).boxed()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn num<T: std::str::FromStr>(query: &str, key: &str, default: T) -> T {
    query_param(query, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `"stream"` followed by `:` and `true`, without parsing the whole body.
fn wants_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let mut i = 0;
    while i + key.len() <= body.len() {
        if &body[i..i + key.len()] == key {
            let rest = body[i + key.len()..]
                .iter()
                .skip_while(|b| b.is_ascii_whitespace())
                .copied()
                .collect::<Vec<u8>>();
            if let Some(rest) = rest.strip_prefix(b":") {
                let rest: Vec<u8> = rest
                    .iter()
                    .skip_while(|b| b.is_ascii_whitespace())
                    .copied()
                    .collect();
                return rest.starts_with(b"true");
            }
        }
        i += 1;
    }
    false
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();

    if req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return websocket(state, req);
    }
    if path == "/stats" {
        let s = &state.stats;
        if req.method() == Method::POST || query_param(&query, "reset").is_some() {
            s.peak
                .store(s.active.load(Ordering::Relaxed), Ordering::Relaxed);
            s.ws_peak
                .store(s.ws_active.load(Ordering::Relaxed), Ordering::Relaxed);
            s.streams.store(0, Ordering::Relaxed);
        }
        let body = format!(
            "{{\"active\":{},\"peak\":{},\"streams\":{},\"ws_active\":{},\"ws_peak\":{}}}",
            s.active.load(Ordering::Relaxed),
            s.peak.load(Ordering::Relaxed),
            s.streams.load(Ordering::Relaxed),
            s.ws_active.load(Ordering::Relaxed),
            s.ws_peak.load(Ordering::Relaxed)
        );
        return json_response(StatusCode::OK, body);
    }

    let api = if path.ends_with("/chat/completions") {
        Api::Chat
    } else if path.ends_with("/responses") {
        Api::Responses
    } else {
        let _ = req.into_body().collect().await;
        return Response::new(full(Bytes::from_static(b"ok")));
    };
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return json_response(StatusCode::BAD_REQUEST, "{}".into()),
    };
    let shape = Shape {
        api,
        events: num(&query, "events", 20usize).min(1_000_000),
        delta: num(&query, "delta", 0usize).min(1 << 20),
        pace_ms: num(&query, "pace_ms", 0u64),
        burst: num(&query, "burst", 1usize).max(1),
        ts: num(&query, "ts", 0u8) == 1,
        per_event: query_param(&query, "frames") == Some("event"),
    };

    if !wants_stream(&body) {
        if api == Api::Responses {
            return json_response(
                StatusCode::BAD_REQUEST,
                "{\"error\":{\"message\":\"the mock only streams /responses\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}".into(),
            );
        }
        let json = cached(&state, shape, true, || {
            sse_gen::chat_completion_json(shape.events, shape.delta)
        });
        let mut response = Response::new(full(json));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return response;
    }

    let guard = Guard::new(&state.stats, false);
    let body: Body = if shape.pace_ms == 0 && !shape.ts && !shape.per_event {
        let stream = cached(&state, shape, false, || {
            sse_gen::full_stream(shape.api, shape.events, shape.delta)
        });
        // One chunk, no content-length: framed as chunked, as real upstreams do.
        let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(stream))]);
        let body = StreamBody::new(frames.map(move |f| {
            let _ = &guard;
            f
        }));
        BodyExt::boxed(body)
    } else {
        event_stream(shape, guard)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-request-id", HeaderValue::from_static("req_bench"));
    response
}

fn cached(state: &State, shape: Shape, json: bool, build: impl FnOnce() -> Vec<u8>) -> Bytes {
    let mut cache = state.cache.lock().unwrap();
    cache
        .entry((shape, json))
        .or_insert_with(|| Bytes::from(build()))
        .clone()
}

/// A stream written event by event: paced by `pace_ms` (deadlines from the start, so the
/// pacing does not drift), or as fast as the client reads when unpaced.
fn event_stream(shape: Shape, guard: Guard) -> Body {
    struct St {
        shape: Shape,
        next: usize,
        phase: u8,
        text: String,
        start: tokio::time::Instant,
        _guard: Guard,
    }
    let st = St {
        shape,
        next: 0,
        phase: 0,
        text: String::new(),
        start: tokio::time::Instant::now(),
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        let shape = st.shape;
        let data = match st.phase {
            0 => {
                st.phase = 1;
                sse_gen::head(shape.api)
            }
            1 if st.next < shape.events => {
                let mut out = Vec::new();
                if shape.pace_ms > 0 {
                    let tick = (st.next / shape.burst + 1) as u64;
                    tokio::time::sleep_until(
                        st.start + Duration::from_millis(shape.pace_ms * tick),
                    )
                    .await;
                }
                // Paced: `burst` deltas per tick; unpaced: one delta per frame.
                let end = if shape.pace_ms == 0 {
                    st.next + 1
                } else {
                    (st.next + shape.burst).min(shape.events)
                };
                for i in st.next..end {
                    let text = sse_gen::delta_text(i, shape.delta);
                    let ts = shape.ts.then(now_nanos);
                    out.extend_from_slice(&sse_gen::delta(shape.api, i, &text, ts));
                    if shape.api == Api::Responses {
                        st.text.push_str(&text);
                    }
                }
                st.next = end;
                out
            }
            1 => {
                st.phase = 2;
                let text = if shape.api == Api::Responses {
                    std::mem::take(&mut st.text)
                } else {
                    String::new()
                };
                sse_gen::tail(shape.api, shape.events, &text)
            }
            _ => return None,
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), st))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn websocket(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json_response(StatusCode::BAD_REQUEST, "{}".into());
    };
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let _guard = Guard::new(&state.stats, true);
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Text(_) | Message::Binary(_)) => {
                    let Ok(message) = message else { break };
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = ws.close(None).await;
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    response
}
