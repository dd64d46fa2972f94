//! Shared test harness: mock upstreams on `127.0.0.1:0`, the proxy in-process or as the
//! real binary, and small clients. Every wait is bounded.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openai_stream_proxy::{
    ClientOptions, ProxyService, RuleOptions, Server, UpstreamClient, UpstreamUrl,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type MockBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
type HandlerFuture = Pin<Box<dyn Future<Output = Response<MockBody>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// What the mock upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The proxy's end of the upstream connection (tells connection reuse).
    pub peer: SocketAddr,
}

/// Request extension carrying the peer address of the mock's connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A hyper-based upstream whose handler the test supplies; requests are recorded
/// (the handler may consume the body itself, in which case `body` is empty).
pub struct MockUpstream {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    arrived: Arc<Notify>,
    _stop: oneshot::Sender<()>,
}

impl MockUpstream {
    /// Starts a mock that buffers each request body, records it, and answers with
    /// `respond(recorded)`.
    pub async fn start<F>(respond: F) -> MockUpstream
    where
        F: Fn(&Recorded) -> Response<MockBody> + Send + Sync + 'static,
    {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let respond = Arc::new(respond);
        let (rec, arr) = (recorded.clone(), arrived.clone());
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let (rec, arr, respond) = (rec.clone(), arr.clone(), respond.clone());
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let peer = parts
                    .extensions
                    .get::<PeerAddr>()
                    .map(|p| p.0)
                    .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let r = Recorded {
                    method: parts.method,
                    uri: parts.uri,
                    version: parts.version,
                    headers: parts.headers,
                    body,
                    peer,
                };
                let response = respond(&r);
                rec.lock().unwrap().push(r);
                arr.notify_waiters();
                response
            })
        });
        Self::with_handler_inner(handler, recorded, arrived).await
    }

    /// Starts a mock with full control over the request (streaming bodies).
    pub async fn with_handler(handler: Handler) -> MockUpstream {
        Self::with_handler_inner(handler, Arc::default(), Arc::default()).await
    }

    async fn with_handler_inner(
        handler: Handler,
        recorded: Arc<Mutex<Vec<Recorded>>>,
        arrived: Arc<Notify>,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(PeerAddr(peer));
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            recorded,
            arrived,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request recorded so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    /// How many upstream connections the recorded requests came on.
    pub fn connections_used(&self) -> usize {
        let peers: std::collections::HashSet<_> = self.requests().iter().map(|r| r.peer).collect();
        peers.len()
    }

    /// The only request recorded; panics when there is not exactly one.
    pub fn single_request(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one upstream request, got {}",
            all.len()
        );
        all.into_iter().next().unwrap()
    }
}

/// A raw-TCP upstream: each accepted connection is handed to `script`.
pub struct RawUpstream {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(script: F) -> RawUpstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let script = Arc::new(script);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                tokio::spawn(script(stream));
            }
        });
        RawUpstream {
            addr,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads one HTTP/1.1 request head (up to the blank line) from a raw stream.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
        assert!(head.len() < 64 * 1024, "request head too large");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A full body for mock responses.
pub fn full(data: impl Into<Bytes>) -> MockBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of several frames and no declared length, so that it goes out chunked, as real
/// event streams do.
pub fn chunked(parts: &[&'static str]) -> MockBody {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

/// A body the test feeds chunk by chunk; dropping the sender ends it cleanly, sending
/// `Err` aborts it.
pub fn channel_body() -> (mpsc::Sender<Result<Bytes, BoxError>>, MockBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody { rx }.boxed_unsync())
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Builds a response with a status, headers and body.
pub fn response(status: u16, headers: &[(&str, &str)], body: MockBody) -> Response<MockBody> {
    let mut builder = Response::builder().status(StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body).unwrap()
}

/// The proxy running in-process on `127.0.0.1:0`.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    /// The `port` label of this proxy's log lines and metric series: unique within the test
    /// process, unlike `addr.port()`, which the kernel may hand out again once an earlier
    /// proxy has closed, so that one test would read another's process-wide counters.
    pub label: u16,
    /// The WebSocket sessions open through the proxy.
    pub sessions: openai_stream_proxy::websocket::Sessions,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown and waits until the server has drained.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(WAIT * 4, done)
                .await
                .expect("server did not stop")
                .unwrap();
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Default options with a short timeout so failure tests stay fast.
pub fn options() -> RuleOptions {
    RuleOptions {
        timeout: Duration::from_secs(5),
        ..RuleOptions::default()
    }
}

/// A port label no other of the first 1023 proxies of this test process had: below 1024,
/// where no ephemeral port (and so no label of a proxy started from a config file) can
/// fall. Only property tests start more proxies than that, and they read no metrics.
fn next_port_label() -> u16 {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (n % 1023) as u16 + 1
}

/// An upstream client with direct connections (no HTTP proxy) and no trust roots.
pub fn direct_client() -> UpstreamClient {
    UpstreamClient::new(ClientOptions {
        proxy: None,
        roots: Arc::new(rustls::RootCertStore::empty()),
        connect_timeout: None,
    })
    .unwrap()
}

/// Starts the proxy in front of `upstream` with direct connections.
pub async fn start_proxy(upstream: &str, options: RuleOptions) -> ProxyHandle {
    start_proxy_with_client(upstream, options, direct_client(), Duration::from_secs(5)).await
}

pub async fn start_proxy_with_client(
    upstream: &str,
    options: RuleOptions,
    client: UpstreamClient,
    drain: Duration,
) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let label = next_port_label();
    let service = ProxyService::new(UpstreamUrl::parse(upstream).unwrap(), options, client)
        .with_port_label(label);
    let sessions = service.sessions().clone();
    let server = Server::from_listeners(vec![(listener, service)]);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        server
            .run(
                async {
                    let _ = stop_rx.await;
                },
                drain,
            )
            .await
    });
    ProxyHandle {
        addr,
        label,
        sessions,
        stop: Some(stop_tx),
        done: Some(done),
    }
}

/// A plain HTTP/1.1 client for tests (its own pool, no proxy, no redirects).
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and collects the whole response.
pub async fn send(req: Request<Full<Bytes>>) -> (http::response::Parts, Bytes) {
    let response = tokio::time::timeout(WAIT, client().request(req))
        .await
        .expect("response timed out")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (parts, body)
}

/// `POST url` with a JSON body.
pub fn post_json(url: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// Parses an OpenAI error envelope and returns (type, message).
pub fn envelope(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let error = &v["error"];
    assert!(error.is_object(), "not an error envelope: {v}");
    assert!(error.get("param").is_some(), "envelope lacks param: {v}");
    (
        error["type"].as_str().unwrap_or_default().to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Path of the shared third-party fixtures, or `None` (with the skip message printed).
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)");
        None
    }
}

/// Raw HTTP/1.1 exchange: writes `request` bytes, reads until EOF or `WAIT`.
/// Reads `stream` until what arrived ends with `end`, and returns it all. Panics if the
/// peer closes first or a read waits longer than [`WAIT`]; bounded by that wait per read.
pub async fn read_until(stream: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("nothing arrived within the wait")
            .unwrap();
        assert!(
            n > 0,
            "closed before {:?} arrived: {:?}",
            String::from_utf8_lossy(end),
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    out
}
pub mod daemon;
#[cfg(target_os = "linux")]
pub mod limits;
pub mod log_capture;
