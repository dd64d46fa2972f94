//! Upstream TLS and corporate proxies: rustls with the configured trust anchors
//! (`SSL_CERT_FILE` for the daemon), HTTP/2 by ALPN, pooled keep-alive connections,
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, and the 502 envelope when TLS or the proxy fails
//! before a response.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openai_stream_proxy::{ClientOptions, UpstreamClient};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// `user:pass` in base64, as a proxy expects it in `Proxy-Authorization: Basic …`.
const USER_PASS_B64: &str = "dXNlcjpwYXNz";

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A self-signed certificate (its own trust anchor) and its key.
struct TestCert {
    pem: String,
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TestCert {
    /// A certificate whose subject alternative names are `names` (IP literals become IP SANs).
    fn new(names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        TestCert {
            pem: certified.cert.pem(),
            der: certified.cert.der().clone(),
            key: certified.signing_key.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// The in-process proxy client trusting exactly `roots` (PEM).
fn client_trusting(roots: &str) -> UpstreamClient {
    UpstreamClient::new(ClientOptions::with_pem_roots(roots.as_bytes()).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// TLS mock upstream
// ---------------------------------------------------------------------------------------

/// What the TLS mock saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    version: http::Version,
    uri: http::Uri,
    headers: http::HeaderMap,
    /// The proxy's end of the TCP connection (tells connection reuse).
    peer: SocketAddr,
    /// The ALPN protocol negotiated on the connection.
    alpn: Option<Vec<u8>>,
    /// The SNI name the client sent.
    sni: Option<String>,
}

/// An HTTPS upstream on `127.0.0.1:0` serving `cert`, offering `alpn`, answering every
/// request with 200 and a small JSON body. A request for a path under `/hold/` is answered
/// only once [`HELD_TOGETHER`] of them are in flight at once (503 if they never are).
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

/// How many `/hold/` requests the TLS mock waits for before answering any of them.
const HELD_TOGETHER: usize = 3;

impl TlsUpstream {
    async fn start(cert: &TestCert, alpn: &[&str]) -> TlsUpstream {
        let hold = Arc::new(tokio::sync::Barrier::new(HELD_TOGETHER));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], cert.key())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let handshakes: Arc<AtomicUsize> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (seen2, accepted2, handshakes2) = (seen.clone(), accepted.clone(), handshakes.clone());
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen, handshakes, hold) = (
                    acceptor.clone(),
                    seen2.clone(),
                    handshakes2.clone(),
                    hold.clone(),
                );
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(WAIT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        _ => return,
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let (_, conn) = tls.get_ref();
                    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
                    let sni = conn.server_name().map(str::to_owned);
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, alpn, sni, hold) =
                            (seen.clone(), alpn.clone(), sni.clone(), hold.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            let version = format!("{:?}", parts.version);
                            let mut status = 200;
                            if parts.uri.path().starts_with("/hold/")
                                && tokio::time::timeout(Duration::from_secs(2), hold.wait())
                                    .await
                                    .is_err()
                            {
                                status = 503;
                            }
                            seen.lock().unwrap().push(Seen {
                                version: parts.version,
                                uri: parts.uri,
                                headers: parts.headers,
                                peer,
                                alpn,
                                sni,
                            });
                            Ok::<_, Infallible>(response(
                                status,
                                &[
                                    ("content-type", "application/json"),
                                    ("x-upstream-version", &version),
                                ],
                                full(r#"{"object":"list","data":[]}"#),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            seen,
            accepted,
            handshakes,
            _stop: stop_tx,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// TLS WebSocket mock upstream (wss)
// ---------------------------------------------------------------------------------------

/// What the wss mock saw: the handshake and the session.
#[derive(Debug)]
enum WssEvent {
    Handshake {
        path_and_query: String,
        headers: http::HeaderMap,
        alpn: Option<Vec<u8>>,
        sni: Option<String>,
    },
    Closed(Option<u16>, String),
}

/// A WebSocket upstream over TLS on `127.0.0.1:0` serving `cert` (offering `h2` first, so a
/// client that asked for HTTP/2 would get it): echoes every data message and reports the
/// handshake and the close it receives.
async fn wss_upstream(
    cert: &TestCert,
    events: mpsc::Sender<WssEvent>,
) -> (u16, oneshot::Sender<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{
        Request as WsRequest, Response as WsResponse,
    };
    use tokio_tungstenite::tungstenite::Message;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], cert.key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stop_rx => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
            };
            let (acceptor, events) = (acceptor.clone(), events.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(WAIT, acceptor.accept(stream)).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let alpn = conn.alpn_protocol().map(|p| p.to_vec());
                let sni = conn.server_name().map(str::to_owned);
                let seen = events.clone();
                #[allow(clippy::result_large_err)] // tungstenite's callback type
                let callback = move |req: &WsRequest, res: WsResponse| {
                    let _ = seen.try_send(WssEvent::Handshake {
                        path_and_query: req.uri().to_string(),
                        headers: req.headers().clone(),
                        alpn,
                        sni,
                    });
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Close(frame) = &message {
                        let (code, reason) = frame
                            .as_ref()
                            .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                            .unwrap_or((None, String::new()));
                        let _ = events.try_send(WssEvent::Closed(code, reason));
                    } else if (message.is_text() || message.is_binary())
                        && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, stop_tx)
}

async fn next_wss_event(events: &mut mpsc::Receiver<WssEvent>) -> WssEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no upstream event in time")
        .expect("upstream event channel closed")
}

#[tokio::test]
async fn websocket_to_an_https_upstream_goes_over_wss_with_the_headers() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let (events_tx, mut events) = mpsc::channel(16);
    let (port, _stop) = wss_upstream(&cert, events_tx).await;
    let proxy = start_proxy_with_client(
        &format!("https://localhost:{port}/openai"),
        options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    let mut request = format!("ws://{}/v1/realtime?model=gpt-realtime", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer sk-wss".parse().unwrap());
    request
        .headers_mut()
        .insert("openai-beta", "realtime=v1".parse().unwrap());
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, reply) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("handshake timed out")
            .expect("the proxy refused the upgrade");
    assert_eq!(reply.status(), 101);

    match next_wss_event(&mut events).await {
        WssEvent::Handshake {
            path_and_query,
            headers,
            alpn,
            sni,
        } => {
            assert_eq!(path_and_query, "/openai/v1/realtime?model=gpt-realtime");
            assert_eq!(headers["authorization"], "Bearer sk-wss");
            assert_eq!(headers["openai-beta"], "realtime=v1");
            assert_eq!(headers["host"], format!("localhost:{port}").as_str());
            // A WebSocket needs HTTP/1.1 (RFC 6455): the proxy offers no ALPN protocol, so
            // this server, which prefers h2, cannot select it.
            assert_eq!(alpn, None);
            assert_eq!(sni.as_deref(), Some("localhost"));
        }
        other => panic!("expected the handshake, got {other:?}"),
    }

    for message in [
        Message::text("over tls"),
        Message::binary(vec![7u8; 100_000]),
    ] {
        ws.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no echo in time")
            .expect("stream ended")
            .expect("read failed");
        assert_eq!(echoed, message);
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    match next_wss_event(&mut events).await {
        WssEvent::Closed(code, reason) => {
            assert_eq!((code, reason.as_str()), (Some(4001), "done"));
        }
        other => panic!("expected the close, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// CONNECT proxy mock
// ---------------------------------------------------------------------------------------

/// An HTTP proxy that answers CONNECT with `status`; on 200 it tunnels every CONNECT to
/// `target`, whatever host the CONNECT names (so a name that does not resolve works).
struct ConnectProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl ConnectProxy {
    async fn start(target: SocketAddr, status: &'static str) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (heads2, connections2) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                connections2.fetch_add(1, Ordering::SeqCst);
                let heads = heads2.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut client).await;
                    heads.lock().unwrap().push(head.clone());
                    if !head.starts_with("CONNECT ") {
                        let _ = client
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    if status != "200" {
                        let answer =
                            format!("HTTP/1.1 {status} Refused\r\ncontent-length: 0\r\n\r\n");
                        let _ = client.write_all(answer.as_bytes()).await;
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        let _ = client
                            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        ConnectProxy {
            addr,
            heads,
            connections,
            _stop: stop_tx,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

/// A unique scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "openai-stream-proxy-tls-{}-{tag}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Environment variables that would change how the daemon reaches upstreams; removed from
/// every child so the test's own environment never leaks in.
const INHERITED: [&str; 13] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUEST_METHOD",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
    "LOG_LEVEL",
];

/// The daemon as a child process; killed on drop.
struct Daemon {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Daemon {
    /// Starts the binary with one rule in front of `upstream`, the environment cleared of
    /// proxy and trust-store variables and then given `env`; returns once it logged its rule.
    async fn start(upstream: &str, env: &[(&str, &str)], dir: TempDir) -> Daemon {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let config = serde_json::json!({
            "timeoutSeconds": 5,
            "rules": [{
                "listenPort": port,
                "listenAddress": "127.0.0.1",
                "upstreamUrl": upstream,
            }]
        });
        let config_path = dir.write("config.json", &config.to_string());

        let mut command = Command::new(env!("CARGO_BIN_EXE_openai-stream-proxy"));
        command
            .arg("--config-file")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for key in INHERITED {
            command.env_remove(key);
        }
        command.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("cannot start the proxy binary");

        // Drain stderr on a thread for the child's whole life (a full pipe would block its
        // logging), forwarding lines so readiness can be awaited with a deadline.
        let stderr = child.stderr.take().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let log2 = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let daemon = Daemon {
            child,
            port,
            log,
            _dir: dir,
        };

        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) if line.contains("proxy rule") => break,
                Ok(Some(_)) => continue,
                Ok(None) => panic!(
                    "the proxy exited before it was ready; stderr:\n{}",
                    daemon.stderr()
                ),
                Err(_) => panic!(
                    "the proxy was not ready within {WAIT:?}; stderr:\n{}",
                    daemon.stderr()
                ),
            }
        }
        daemon
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `GET /v1/models` through the daemon.
    async fn get_models(&self) -> (http::response::Parts, Bytes) {
        send(get(&self.url("/v1/models"))).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Asserts a 502 `upstream_error` envelope and returns its message.
fn assert_upstream_error(parts: &http::response::Parts, body: &[u8]) -> String {
    assert_eq!(parts.status, 502, "body: {}", body_text(body));
    let (kind, message) = envelope(body);
    assert_eq!(kind, "upstream_error", "message: {message}");
    message
}

// ---------------------------------------------------------------------------------------
// In-process: TLS, ALPN, pooling, TLS failures
// ---------------------------------------------------------------------------------------

/// `upstreamHttp2: true` (off by default, D15).
fn h2_options() -> openai_stream_proxy::RuleOptions {
    let mut opts = options();
    opts.upstream_http2 = true;
    opts
}

#[tokio::test]
async fn https_upstream_is_reached_over_h2_by_alpn_on_one_pooled_connection() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = start_proxy_with_client(
        &format!("https://localhost:{}", upstream.port()),
        h2_options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    for _ in 0..2 {
        let (parts, body) = send(get(&proxy.url("/v1/models?limit=2"))).await;
        assert_eq!(parts.status, 200, "body: {}", body_text(&body));
        assert_eq!(&body[..], br#"{"object":"list","data":[]}"#);
        assert_eq!(parts.headers["x-upstream-version"], "HTTP/2.0");
    }

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_2);
        assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(s.sni.as_deref(), Some("localhost"));
        assert_eq!(
            s.uri.path_and_query().unwrap().as_str(),
            "/v1/models?limit=2"
        );
        assert_eq!(
            s.uri.authority().map(|a| a.as_str()),
            Some(format!("localhost:{}", upstream.port()).as_str())
        );
        assert_eq!(s.headers["authorization"], "Bearer sk-test");
    }
    assert_eq!(
        seen[0].peer, seen[1].peer,
        "second request used a new connection"
    );
    assert_eq!(
        upstream.accepted(),
        1,
        "one pooled HTTP/2 connection expected"
    );
    assert_eq!(upstream.handshakes(), 1);
}

/// `upstreamHttp2: false` (the default, D15): an upstream offering HTTP/2 is spoken to in
/// HTTP/1.1, and concurrent requests get pooled connections of their own instead of sharing
/// one (whose concurrent-stream limit would make the rest wait).
#[tokio::test]
async fn upstream_http2_off_speaks_http1_to_an_upstream_that_offers_h2() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let mut opts = options();
    opts.upstream_http2 = false;
    let proxy = start_proxy_with_client(
        &format!("https://localhost:{}", upstream.port()),
        opts,
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    assert_eq!(parts.headers["x-upstream-version"], "HTTP/1.1");
    let seen = upstream.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_ne!(seen[0].alpn.as_deref(), Some(&b"h2"[..]));
    // Requests in flight together each get a connection (the upstream answers none of them
    // until all are in flight, which one HTTP/1.1 connection could not carry).
    let mut tasks = Vec::new();
    for i in 0..HELD_TOGETHER {
        let url = proxy.url(&format!("/hold/{i}"));
        tasks.push(tokio::spawn(async move { send(get(&url)).await.0.status }));
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap(),
            200,
            "the requests never were in flight together"
        );
    }
    // Three at least; a fourth if the first connection was not back in the pool yet.
    let accepted = upstream.accepted();
    assert!(
        (HELD_TOGETHER..=HELD_TOGETHER + 1).contains(&accepted),
        "{accepted} connections"
    );
    assert!(upstream
        .seen()
        .iter()
        .all(|s| s.version == http::Version::HTTP_11));
}

#[tokio::test]
async fn concurrent_requests_share_the_h2_connection() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = start_proxy_with_client(
        &format!("https://127.0.0.1:{}", upstream.port()),
        h2_options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    // Warm the pool, then send several requests at once: HTTP/2 multiplexes them.
    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let url = proxy.url(&format!("/v1/models/{i}"));
        tasks.push(tokio::spawn(async move { send(get(&url)).await.0.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.peer == seen[0].peer));
    // An IP literal is never sent as SNI.
    assert!(seen[0].sni.is_none());
    assert_eq!(upstream.accepted(), 1);
}

/// With HTTP/2 on, a server that offers only HTTP/1.1 is spoken to in HTTP/1.1, kept alive.
#[tokio::test]
async fn https_upstream_offering_only_http1_is_spoken_to_in_http1_with_keep_alive() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["http/1.1"]).await;
    let proxy = start_proxy_with_client(
        &format!("https://localhost:{}", upstream.port()),
        h2_options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    for _ in 0..2 {
        let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
        assert_eq!(parts.status, 200, "body: {}", body_text(&body));
        assert_eq!(parts.headers["x-upstream-version"], "HTTP/1.1");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_11);
        assert_eq!(s.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(
            s.headers["host"],
            format!("localhost:{}", upstream.port()).as_str()
        );
    }
    assert_eq!(
        seen[0].peer, seen[1].peer,
        "the keep-alive connection was not reused"
    );
}

#[tokio::test]
async fn https_upstream_without_alpn_gets_http1() {
    let cert = TestCert::new(&["localhost"]);
    let upstream = TlsUpstream::start(&cert, &[]).await;
    let proxy = start_proxy_with_client(
        &format!("https://localhost:{}", upstream.port()),
        options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;
    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[0].alpn, None);
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_a_502_naming_the_upstream_and_the_certificate() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let other = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let upstream_url = format!("https://localhost:{}", upstream.port());
    let proxy = start_proxy_with_client(
        &upstream_url,
        options(),
        client_trusting(&other.pem),
        Duration::from_secs(5),
    )
    .await;

    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    let message = assert_upstream_error(&parts, &body);
    assert!(message.contains(&upstream_url), "message: {message}");
    assert!(
        message.to_ascii_lowercase().contains("certificate"),
        "message does not say the certificate is untrusted: {message}"
    );
    assert!(upstream.seen().is_empty());
    assert_eq!(upstream.handshakes(), 0);
}

#[tokio::test]
async fn certificate_for_another_name_is_a_502() {
    // The certificate names `localhost` only; the upstream is addressed by IP.
    let cert = TestCert::new(&["localhost"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let upstream_url = format!("https://127.0.0.1:{}", upstream.port());
    let proxy = start_proxy_with_client(
        &upstream_url,
        options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    let message = assert_upstream_error(&parts, &body);
    assert!(message.contains(&upstream_url), "message: {message}");
    assert!(
        message.to_ascii_lowercase().contains("certificate"),
        "message does not mention the certificate: {message}"
    );
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn tls_to_a_plain_http_upstream_fails_with_a_502_naming_the_upstream() {
    let plain = MockUpstream::start(|_| response(200, &[], full("plain"))).await;
    let upstream_url = format!("https://{}", plain.addr);
    let cert = TestCert::new(&["localhost"]);
    let proxy = start_proxy_with_client(
        &upstream_url,
        options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;

    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    let message = assert_upstream_error(&parts, &body);
    assert!(message.contains(&upstream_url), "message: {message}");
    assert!(plain.requests().is_empty());
}

#[tokio::test]
async fn unreachable_https_upstream_is_a_502_naming_the_upstream_and_the_cause() {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap().port()
    };
    let upstream_url = format!("https://127.0.0.1:{port}");
    let cert = TestCert::new(&["localhost"]);
    let proxy = start_proxy_with_client(
        &upstream_url,
        options(),
        client_trusting(&cert.pem),
        Duration::from_secs(5),
    )
    .await;
    let (parts, body) = send(get(&proxy.url("/v1/models"))).await;
    let message = assert_upstream_error(&parts, &body);
    assert!(message.contains(&upstream_url), "message: {message}");
    assert!(
        message.to_ascii_lowercase().contains("refused"),
        "message does not say why: {message}"
    );
}

// ---------------------------------------------------------------------------------------
// The real binary: SSL_CERT_FILE, HTTPS_PROXY, NO_PROXY, HTTP_PROXY
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn daemon_trusts_the_certificates_in_ssl_cert_file() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let dir = TempDir::new("ssl-cert-file");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        &format!("https://localhost:{}", upstream.port()),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        dir,
    )
    .await;

    for _ in 0..2 {
        let (parts, body) = daemon.get_models().await;
        assert_eq!(
            parts.status,
            200,
            "body: {}\nstderr:\n{}",
            body_text(&body),
            daemon.stderr()
        );
        assert_eq!(&body[..], br#"{"object":"list","data":[]}"#);
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    // HTTP/1.1 by default (D15), over one kept-alive connection.
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_11));
    // An HTTP/1-only client offers no ALPN protocol, so the server cannot pick h2.
    assert!(seen.iter().all(|s| s.alpn.is_none()));
    assert_eq!(seen[0].peer, seen[1].peer);
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn daemon_proxies_a_websocket_over_wss_trusting_ssl_cert_file() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let (events_tx, mut events) = mpsc::channel(16);
    let (port, _stop) = wss_upstream(&cert, events_tx).await;
    let dir = TempDir::new("wss-ssl-cert-file");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        &format!("https://localhost:{port}"),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        dir,
    )
    .await;

    let mut request = daemon.url("/v1/realtime").replace("http://", "ws://");
    request.push_str("?model=m");
    let mut request = request.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer sk-daemon".parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", daemon.port))
        .await
        .unwrap();
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("handshake timed out")
        .unwrap_or_else(|e| panic!("upgrade refused: {e}\n{}", daemon.stderr()));
    match next_wss_event(&mut events).await {
        WssEvent::Handshake { headers, .. } => {
            assert_eq!(headers["authorization"], "Bearer sk-daemon");
        }
        other => panic!("expected the handshake, got {other:?}"),
    }
    ws.send(Message::text("through the daemon")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no echo in time");
    assert_eq!(
        echoed.unwrap().unwrap(),
        Message::text("through the daemon")
    );
    ws.close(None).await.unwrap();
    match next_wss_event(&mut events).await {
        // A status-less client close reaches the upstream as a plain 1000.
        WssEvent::Closed(code, reason) => assert_eq!((code, reason.as_str()), (Some(1000), "")),
        other => panic!("expected the close, got {other:?}"),
    }
}

#[tokio::test]
async fn daemon_rejects_an_upstream_not_signed_by_ssl_cert_file() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let other = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let dir = TempDir::new("ssl-cert-file-other");
    let ca = dir.write("ca.pem", &other.pem);
    let upstream_url = format!("https://localhost:{}", upstream.port());
    let daemon = Daemon::start(
        &upstream_url,
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        dir,
    )
    .await;

    let (parts, body) = daemon.get_models().await;
    let message = assert_upstream_error(&parts, &body);
    assert!(message.contains(&upstream_url), "message: {message}");
    assert!(
        message.to_ascii_lowercase().contains("certificate"),
        "message: {message}"
    );
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn https_proxy_is_used_through_a_connect_tunnel_to_the_upstream_name() {
    let cert = TestCert::new(&["upstream.test"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "200").await;
    let dir = TempDir::new("https-proxy");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        "https://upstream.test:443",
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy.url()),
        ],
        dir,
    )
    .await;

    for _ in 0..2 {
        let (parts, body) = daemon.get_models().await;
        assert_eq!(
            parts.status,
            200,
            "body: {}\nstderr:\n{}",
            body_text(&body),
            daemon.stderr()
        );
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.sni.as_deref(), Some("upstream.test"));
        assert_eq!(s.version, http::Version::HTTP_11);
        assert_eq!(s.uri.path(), "/v1/models");
        assert_eq!(s.headers["authorization"], "Bearer sk-test");
    }
    // One tunnel, reused by the pooled kept-alive connection.
    assert_eq!(proxy.connections(), 1);
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("CONNECT upstream.test:443 HTTP/1.1\r\n"),
        "CONNECT head: {:?}",
        heads[0]
    );
    assert!(
        !heads[0]
            .to_ascii_lowercase()
            .contains("proxy-authorization"),
        "credentials sent although none were configured: {:?}",
        heads[0]
    );
}

#[tokio::test]
async fn https_proxy_credentials_are_sent_as_basic_proxy_authorization() {
    let cert = TestCert::new(&["upstream.test"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "200").await;
    let dir = TempDir::new("https-proxy-auth");
    let ca = dir.write("ca.pem", &cert.pem);
    let proxy_url = format!("http://user:pass@{}", proxy.addr);
    let daemon = Daemon::start(
        "https://upstream.test:443",
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy_url),
        ],
        dir,
    )
    .await;

    let (parts, body) = daemon.get_models().await;
    assert_eq!(
        parts.status,
        200,
        "body: {}\nstderr:\n{}",
        body_text(&body),
        daemon.stderr()
    );
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with("CONNECT upstream.test:443 HTTP/1.1\r\n"));
    let expected = format!(
        "proxy-authorization: basic {}",
        USER_PASS_B64.to_lowercase()
    );
    assert!(
        heads[0].lines().any(|l| l.to_ascii_lowercase() == expected),
        "CONNECT head lacks the credentials: {:?}",
        heads[0]
    );
    // The credentials are the proxy's, never the upstream's.
    assert_eq!(upstream.seen().len(), 1);
    assert!(!upstream.seen()[0]
        .headers
        .contains_key("proxy-authorization"));
}

#[tokio::test]
async fn lowercase_https_proxy_is_honoured() {
    let cert = TestCert::new(&["upstream.test"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "200").await;
    let dir = TempDir::new("https-proxy-lower");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        "https://upstream.test:443",
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("https_proxy", &proxy.url()),
        ],
        dir,
    )
    .await;
    let (parts, body) = daemon.get_models().await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    assert_eq!(proxy.connections(), 1);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn proxy_refusing_the_tunnel_is_a_502_naming_the_upstream_and_the_proxy() {
    let cert = TestCert::new(&["upstream.test"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "407").await;
    let dir = TempDir::new("https-proxy-407");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        "https://upstream.test:443",
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy.url()),
        ],
        dir,
    )
    .await;

    let (parts, body) = daemon.get_models().await;
    let message = assert_upstream_error(&parts, &body);
    assert!(
        message.contains("https://upstream.test:443"),
        "message: {message}"
    );
    let lower = message.to_ascii_lowercase();
    assert!(
        lower.contains("proxy") && lower.contains("auth"),
        "message does not say the proxy wants credentials: {message}"
    );
    assert!(proxy.connections() >= 1);
    assert_eq!(upstream.accepted(), 0);
}

/// A WebSocket to a plain-http upstream without a port tunnels through the proxy to port
/// 80, not to the tunnel's default of 443.
#[tokio::test]
async fn websocket_to_a_plain_upstream_without_a_port_tunnels_to_port_80() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // The proxy refuses the tunnel: only the CONNECT line matters here.
    let proxy = ConnectProxy::start("127.0.0.1:9".parse().unwrap(), "502").await;
    let dir = TempDir::new("ws-http-proxy-port");
    let daemon = Daemon::start("http://ws.test", &[("HTTP_PROXY", &proxy.url())], dir).await;
    let request = daemon
        .url("/v1/realtime")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    let stream = TcpStream::connect(("127.0.0.1", daemon.port))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("handshake timed out");
    assert!(outcome.is_err(), "upgraded through a refused tunnel");
    let heads = proxy.heads();
    assert!(
        heads
            .first()
            .is_some_and(|h| h.starts_with("CONNECT ws.test:80 HTTP/1.1\r\n")),
        "{heads:?}\n{}",
        daemon.stderr()
    );
}

#[tokio::test]
async fn no_proxy_makes_the_daemon_connect_directly() {
    let cert = TestCert::new(&["upstream.test"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "200").await;
    let dir = TempDir::new("no-proxy");
    let ca = dir.write("ca.pem", &cert.pem);
    let daemon = Daemon::start(
        "https://upstream.test:443",
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy.url()),
            ("NO_PROXY", "example.com, upstream.test"),
        ],
        dir,
    )
    .await;

    // Direct: `upstream.test` does not resolve, so the request fails without a tunnel.
    let (parts, body) = daemon.get_models().await;
    let message = assert_upstream_error(&parts, &body);
    assert!(
        message.contains("https://upstream.test:443"),
        "message: {message}"
    );
    assert!(
        !message.to_ascii_lowercase().contains("tunnel"),
        "the proxy was used: {message}"
    );
    assert_eq!(proxy.connections(), 0, "NO_PROXY was ignored");
    assert_eq!(upstream.accepted(), 0);
}

#[tokio::test]
async fn loopback_upstreams_are_never_proxied() {
    let cert = TestCert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &["h2", "http/1.1"]).await;
    let proxy = ConnectProxy::start(upstream.addr, "200").await;
    for host in ["localhost", "127.0.0.1"] {
        let dir = TempDir::new("loopback");
        let ca = dir.write("ca.pem", &cert.pem);
        let daemon = Daemon::start(
            &format!("https://{host}:{}", upstream.port()),
            &[
                ("SSL_CERT_FILE", ca.to_str().unwrap()),
                ("HTTPS_PROXY", &proxy.url()),
                ("ALL_PROXY", &proxy.url()),
            ],
            dir,
        )
        .await;
        let (parts, body) = daemon.get_models().await;
        assert_eq!(
            parts.status,
            200,
            "{host}: body: {}\nstderr:\n{}",
            body_text(&body),
            daemon.stderr()
        );
    }
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(
        proxy.connections(),
        0,
        "a loopback upstream went through the proxy"
    );
}

#[tokio::test]
async fn http_proxy_forwards_plain_http_upstreams_in_absolute_form() {
    let forward = MockUpstream::start(|_| response(200, &[], full("via proxy"))).await;
    let dir = TempDir::new("http-proxy");
    let daemon = Daemon::start(
        "http://upstream.test:8080/base",
        &[("HTTP_PROXY", &forward.url())],
        dir,
    )
    .await;

    let (parts, body) = send(get(&daemon.url("/v1/models?x=1"))).await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    assert_eq!(&body[..], b"via proxy");
    let r = forward.single_request();
    assert_eq!(
        r.uri.to_string(),
        "http://upstream.test:8080/base/v1/models?x=1"
    );
    assert_eq!(r.headers["host"], "upstream.test:8080");
    assert_eq!(r.headers["authorization"], "Bearer sk-test");
}

#[tokio::test]
async fn http_proxy_credentials_are_sent_as_basic_proxy_authorization() {
    let forward = MockUpstream::start(|_| response(200, &[], full("via proxy"))).await;
    let dir = TempDir::new("http-proxy-auth");
    let proxy_url = format!("http://user:pass@{}", forward.addr);
    let daemon = Daemon::start(
        "http://upstream.test:8080",
        &[("HTTP_PROXY", &proxy_url)],
        dir,
    )
    .await;

    let (parts, body) = daemon.get_models().await;
    assert_eq!(parts.status, 200, "body: {}", body_text(&body));
    let r = forward.single_request();
    assert_eq!(r.uri.to_string(), "http://upstream.test:8080/v1/models");
    assert_eq!(
        r.headers
            .get("proxy-authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(format!("Basic {USER_PASS_B64}")),
        "the forwarding proxy got no credentials"
    );
}
