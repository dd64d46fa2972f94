//! WebSocket proxying: the upstream handshake comes first (refusals are relayed as HTTP),
//! frames travel both ways unchanged with backpressure, and close codes cross faithfully.
//!
//! The upstream is a tokio-tungstenite server on `127.0.0.1:0` driven by text commands
//! (`close 4001 bye`, `drop last words`, …) so each test states the upstream's behaviour in
//! the message that triggers it; clients are tokio-tungstenite clients over plain TCP.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as HandshakeRequest, Response as HandshakeResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

const ABNORMAL: &str = "upstream websocket disconnected abnormally";

/// Both test ends accept messages well above the proxy's 64 MiB default.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(128 << 20))
        .max_frame_size(Some(128 << 20))
}

// ------------------------------------------------------------------------------------------
// The mock upstream
// ------------------------------------------------------------------------------------------

/// What the upstream saw in an opening handshake.
#[derive(Debug, Clone)]
struct Handshake {
    path_and_query: String,
    headers: HeaderMap,
}

/// What an upstream session reports to its test.
#[derive(Debug)]
enum Event {
    /// The client side closed with this frame (the proxy's forwarded close).
    Closed(Option<CloseFrame>),
    /// The session's read loop ended, with the error if it was not a clean end.
    Ended(Option<String>),
}

/// A WebSocket upstream on `127.0.0.1:0`; each accepted session runs `script`.
struct WsUpstream {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    _stop: oneshot::Sender<()>,
}

impl WsUpstream {
    /// `select`: the subprotocol the upstream picks when the client offers it.
    async fn start<F, Fut>(select: Option<&'static str>, script: F) -> WsUpstream
    where
        F: Fn(Ws) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes: Arc<Mutex<Vec<Handshake>>> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let script = Arc::new(script);
        let recorded = handshakes.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                let (script, recorded) = (script.clone(), recorded.clone());
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // tungstenite's callback type
                    let callback = |req: &HandshakeRequest, mut res: HandshakeResponse| {
                        recorded.lock().unwrap().push(Handshake {
                            path_and_query: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let offered = req
                            .headers()
                            .get_all("sec-websocket-protocol")
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .flat_map(|v| v.split(','))
                            .any(|p| Some(p.trim()) == select);
                        if let (true, Some(p)) = (offered, select) {
                            res.headers_mut()
                                .insert("sec-websocket-protocol", p.parse().unwrap());
                        }
                        res.headers_mut()
                            .insert("x-upstream-session", "s-1".parse().unwrap());
                        Ok(res)
                    };
                    let accepted = tokio_tungstenite::accept_hdr_async_with_config(
                        stream,
                        callback,
                        Some(ws_config()),
                    )
                    .await;
                    if let Ok(ws) = accepted {
                        script(ws).await;
                    }
                });
            }
        });
        WsUpstream {
            addr,
            handshakes,
            _stop: stop_tx,
        }
    }

    /// The scripted echo server (see [`scripted`]), reporting to `events`.
    async fn echo(events: mpsc::Sender<Event>) -> WsUpstream {
        Self::echo_selecting(None, events).await
    }

    async fn echo_selecting(
        select: Option<&'static str>,
        events: mpsc::Sender<Event>,
    ) -> WsUpstream {
        WsUpstream::start(select, move |ws| scripted(ws, Some(events.clone()))).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }
}

fn report(events: &Option<mpsc::Sender<Event>>, event: Event) {
    if let Some(events) = events {
        let _ = events.try_send(event);
    }
}

/// Echoes data messages, except text commands:
/// `close <code> <reason>`, `close-empty`, `drop <text>` (send, then vanish without a close
/// frame), `partial` (half a frame, then vanish), `bad-opcode` (a frame with a reserved
/// opcode), `fragments <n> <text>` (send the text split into `n` frames), `big <bytes>` (send
/// a binary message of that size), `ping <data>`.
async fn scripted(mut ws: Ws, events: Option<mpsc::Sender<Event>>) {
    loop {
        let message = match ws.next().await {
            None => break report(&events, Event::Ended(None)),
            Some(Err(e)) => break report(&events, Event::Ended(Some(e.to_string()))),
            Some(Ok(message)) => message,
        };
        let text = match &message {
            Message::Text(t) => t.as_str().to_owned(),
            Message::Binary(_) => {
                if ws.send(message).await.is_err() {
                    return report(&events, Event::Ended(Some("send failed".into())));
                }
                continue;
            }
            Message::Close(frame) => {
                report(&events, Event::Closed(frame.clone()));
                continue;
            }
            _ => continue,
        };
        let (command, rest) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let sent = match command {
            "close" => {
                let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                let frame = CloseFrame {
                    code: CloseCode::from(code.parse::<u16>().unwrap()),
                    reason: reason.to_owned().into(),
                };
                ws.send(Message::Close(Some(frame))).await
            }
            "close-empty" => ws.send(Message::Close(None)).await,
            "drop" => {
                let _ = ws.send(Message::text(rest)).await;
                // Dropping the stream closes TCP without a close frame.
                return report(&events, Event::Ended(Some("dropped".into())));
            }
            "partial" => {
                // A binary frame header announcing 100 bytes, then 3 of them.
                let _ = ws.get_mut().write_all(&[0x82, 100, 1, 2, 3]).await;
                let _ = ws.get_mut().flush().await;
                return report(&events, Event::Ended(Some("dropped".into())));
            }
            "bad-opcode" => {
                // An unmasked frame with the reserved data opcode 0x3, then carry on reading.
                let _ = ws.get_mut().write_all(&[0x83, 0x00]).await;
                let _ = ws.get_mut().flush().await;
                Ok(())
            }
            "fragments" => {
                let (n, payload) = rest.split_once(' ').unwrap();
                let chunks = split_bytes(payload.as_bytes(), n.parse().unwrap());
                let mut result = Ok(());
                for (i, chunk) in chunks.iter().enumerate() {
                    let opcode = if i == 0 {
                        OpCode::Data(Data::Text)
                    } else {
                        OpCode::Data(Data::Continue)
                    };
                    let frame = Frame::message(chunk.clone(), opcode, i + 1 == chunks.len());
                    result = ws.send(Message::Frame(frame)).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            "big" => {
                let size: usize = rest.parse().unwrap();
                ws.send(Message::binary(pattern(size, 7))).await
            }
            "ping" => ws.send(Message::Ping(Bytes::from(rest.to_owned()))).await,
            _ => ws.send(message).await,
        };
        if let Err(e) = sent {
            return report(&events, Event::Ended(Some(e.to_string())));
        }
    }
}

/// Splits `data` into `n` non-empty pieces of roughly equal size (UTF-8 may be cut).
fn split_bytes(data: &[u8], n: usize) -> Vec<Bytes> {
    let size = data.len().div_ceil(n).max(1);
    data.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// Deterministic, position-dependent bytes, so a reordering or a truncation shows.
fn pattern(size: usize, seed: u8) -> Bytes {
    (0..size)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i >> 12) as u8)
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The next event, or a panic after `WAIT`.
async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no upstream event in time")
        .expect("upstream event channel closed")
}

/// Waits until the upstream session's read loop ended (close frames may come first).
async fn wait_session_end(events: &mut mpsc::Receiver<Event>) {
    while let Event::Closed(_) = next_event(events).await {}
}

// ------------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------------

type HandshakeReply = http::Response<Option<Vec<u8>>>;

/// Opens a WebSocket to the proxy at `addr` with extra request headers.
async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, HandshakeReply), WsError> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())),
    )
    .await
    .expect("handshake timed out")
}

async fn connect(addr: SocketAddr, path: &str) -> Ws {
    try_connect(addr, path, &[]).await.unwrap().0
}

/// The next message, or a panic after `WAIT`; `None` when the stream ended.
async fn recv(ws: &mut Ws) -> Option<Result<Message, WsError>> {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no message in time")
}

async fn recv_message(ws: &mut Ws) -> Message {
    recv(ws).await.expect("stream ended").expect("read failed")
}

/// Reads until the close frame (no data may come first) and then to the end of the stream.
async fn expect_close(ws: &mut Ws) -> Option<CloseFrame> {
    let frame = match recv_message(ws).await {
        Message::Close(frame) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    };
    // The close handshake completes and the proxy ends the connection.
    if let Some(Ok(other)) = recv(ws).await {
        panic!("data after the close frame: {other:?}");
    }
    frame
}

fn assert_close(frame: Option<CloseFrame>, code: u16, reason: &str) {
    let frame = frame.expect("close frame without a status");
    assert_eq!(
        u16::from(frame.code),
        code,
        "close code (reason {:?})",
        frame.reason
    );
    assert_eq!(frame.reason.as_str(), reason);
}

/// An upgrade written by hand (every header line exactly as given, plus the key and version):
/// returns the lower-cased response head and the WebSocket over the same connection.
async fn raw_upgrade(addr: SocketAddr, path: &str, lines: &[&str]) -> (String, Ws) {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for line in lines {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    let ws = WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        Some(ws_config()),
    )
    .await;
    (head, ws)
}

/// An upgrade request sent with a plain HTTP client, to see a refusal exactly.
fn upgrade_request(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

// ------------------------------------------------------------------------------------------
// Handshake
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_goes_to_the_same_path_and_query_under_the_upstream_prefix() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&format!("{}/base/", upstream.url()), options()).await;

    let path = "/v1/realtime?model=gpt-realtime&q=a%20b&x=%2F";
    let mut ws = connect(proxy.addr, path).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("hello"));
    ws.close(None).await.unwrap();

    // Any path, not only the Realtime one.
    let mut ws = connect(proxy.addr, "/anything/else").await;
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("again"));

    let seen: Vec<String> = upstream
        .handshakes()
        .into_iter()
        .map(|h| h.path_and_query)
        .collect();
    assert_eq!(
        seen,
        vec![format!("/base{path}"), "/base/anything/else".to_owned()]
    );
}

/// RFC 6455 §4.2.1: a key that is not 16 bytes in base64 is a bad request. It is refused
/// with the error envelope before any upstream session is opened for it.
#[tokio::test]
async fn a_malformed_key_is_refused_without_an_upstream_session() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for key in [
        "",
        "not-base64",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZQ==x",
        "dGhl*HNhbXBsZSBub25jZQ==",
    ] {
        let mut request = upgrade_request(&proxy.url("/v1/realtime"));
        request
            .headers_mut()
            .insert("sec-websocket-key", key.parse().unwrap());
        let (parts, got) = send(request).await;
        assert_eq!(parts.status, 400, "key {key:?}");
        let error: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "key {key:?}"
        );
    }
    assert!(upstream.handshakes().is_empty());
    // A well-formed key still opens a session.
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("hi"));
}

/// RFC 6455 §4.4: an upgrade for a version other than 13 (or none) gets 426 naming 13,
/// with the error envelope as its body, and opens no upstream session.
#[tokio::test]
async fn an_unsupported_version_is_426_with_an_envelope() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for version in [Some("8"), Some("13, 8"), None] {
        let mut request = upgrade_request(&proxy.url("/v1/realtime"));
        match version {
            Some(version) => {
                request
                    .headers_mut()
                    .insert("sec-websocket-version", version.parse().unwrap());
            }
            None => {
                request.headers_mut().remove("sec-websocket-version");
            }
        }
        let (parts, got) = send(request).await;
        assert_eq!(parts.status, 426, "version {version:?}");
        assert_eq!(parts.headers["sec-websocket-version"], "13");
        let error: serde_json::Value = serde_json::from_slice(&got)
            .unwrap_or_else(|e| panic!("version {version:?}: {e}: {got:?}"));
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(error["error"]["code"], "unsupported_websocket_version");
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Sec-WebSocket-Version 13"));
    }
    assert!(upstream.handshakes().is_empty());
}

#[tokio::test]
async fn handshake_headers_are_forwarded_minus_hop_by_hop_and_per_connection_ones() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;

    let client_key_probe = "x-client-key-probe";
    // Written by hand: client libraries rewrite `Connection` to their own.
    let (head, mut ws) = raw_upgrade(
        proxy.addr,
        "/v1/realtime",
        &[
            "authorization: Bearer sk-test",
            "openai-beta: realtime=v1",
            "cookie: a=1; b=2",
            "origin: https://app.example",
            "user-agent: ws-test/1.0",
            "x-custom: kept",
            "keep-alive: timeout=5",
            "proxy-authorization: Basic c2VjcmV0",
            "te: trailers",
            "x-listed: dropped",
            "connection: keep-alive, Upgrade, x-listed",
            "upgrade: websocket",
            "sec-websocket-extensions: permessage-deflate; client_max_window_bits",
            "x-client-key-probe: 1",
        ],
    )
    .await;
    // The upstream's own 101 headers come back; the handshake itself is this leg's.
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nx-upstream-session: s-1\r\n"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("ok"));

    let seen = upstream.handshakes();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["host"], upstream.addr.to_string());
    for (name, value) in [
        ("authorization", "Bearer sk-test"),
        ("openai-beta", "realtime=v1"),
        ("cookie", "a=1; b=2"),
        ("origin", "https://app.example"),
        ("user-agent", "ws-test/1.0"),
        ("x-custom", "kept"),
        (client_key_probe, "1"),
    ] {
        assert_eq!(
            h.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{name}"
        );
    }
    for name in [
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-listed",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    ] {
        assert!(h.get(name).is_none(), "{name} must not be forwarded");
    }
    // The upstream leg has its own, valid handshake.
    assert_eq!(h["sec-websocket-version"], "13");
    assert!(h.get("sec-websocket-key").is_some());
    assert_eq!(h.get_all("sec-websocket-key").iter().count(), 1);
    assert!(h["upgrade"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("websocket"));
    assert!(h["connection"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("upgrade"));
}

/// The rule's injected headers are on the upstream handshake even when the client names
/// them in `Connection`.
#[tokio::test]
async fn injected_headers_reach_the_upstream_handshake_whatever_connection_names() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let mut opts = options();
    opts.headers = vec![(
        http::HeaderName::from_static("authorization"),
        http::HeaderValue::from_static("Bearer operator-key"),
    )];
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (head, mut ws) = raw_upgrade(
        proxy.addr,
        "/v1/realtime",
        &[
            "authorization: Bearer client-key",
            "connection: Upgrade, Authorization",
            "upgrade: websocket",
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("ok"));
    let seen = upstream.handshakes();
    let values: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(values, ["Bearer operator-key"]);
}

#[tokio::test]
async fn subprotocol_offer_is_forwarded_and_the_101_names_the_upstream_choice() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo_selecting(Some("realtime"), events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;

    let offer = "realtime, openai-insecure-api-key.sk-x, openai-beta.realtime-v1";
    let (mut ws, reply) = try_connect(
        proxy.addr,
        "/v1/realtime?model=m",
        &[("sec-websocket-protocol", offer)],
    )
    .await
    .unwrap();
    let chosen: Vec<_> = reply
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .collect();
    assert_eq!(chosen, vec!["realtime"]);
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("ok"));

    // Offers on several header lines reach the upstream as one list, in order.
    let (_ws2, reply) = try_connect(
        proxy.addr,
        "/v1/realtime",
        &[
            ("sec-websocket-protocol", "realtime"),
            ("sec-websocket-protocol", "openai-insecure-api-key.sk-y"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(reply.headers()["sec-websocket-protocol"], "realtime");

    let seen = upstream.handshakes();
    assert_eq!(seen[0].headers["sec-websocket-protocol"], offer);
    assert_eq!(
        seen[1].headers["sec-websocket-protocol"],
        "realtime, openai-insecure-api-key.sk-y"
    );
}

#[tokio::test]
async fn an_upstream_that_selects_no_subprotocol_is_relayed_as_such() {
    // The upstream accepts without choosing: the client (not the proxy) decides whether that
    // is acceptable, so the 101 carries no subprotocol.
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo_selecting(None, events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (head, mut ws) = raw_upgrade(
        proxy.addr,
        "/v1/realtime",
        &[
            "connection: Upgrade",
            "upgrade: websocket",
            "sec-websocket-protocol: realtime",
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
    ws.send(Message::text("works")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("works"));
}

#[tokio::test]
async fn upstream_refusals_are_relayed_with_status_headers_and_body() {
    let body_401 = r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    for (status, body, extra) in [
        (401, body_401, ("www-authenticate", "Bearer")),
        (
            404,
            r#"{"error":{"message":"not found"}}"#,
            ("x-request-id", "req-404"),
        ),
        (
            429,
            r#"{"error":{"message":"slow down"}}"#,
            ("retry-after", "7"),
        ),
    ] {
        let upstream = MockUpstream::start(move |_| {
            response(
                status,
                &[("content-type", "application/json"), extra],
                full(body),
            )
        })
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;

        let (parts, got) = send(upgrade_request(&proxy.url("/v1/realtime?model=m"))).await;
        assert_eq!(parts.status, status);
        assert_eq!(parts.headers["content-type"], "application/json");
        assert_eq!(parts.headers[extra.0], extra.1);
        assert!(parts.headers.get("upgrade").is_none());
        assert_eq!(&got[..], body.as_bytes());

        // A WebSocket client sees the same refusal, not an upgrade.
        match try_connect(proxy.addr, "/v1/realtime", &[]).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), status);
                assert_eq!(response.body().as_deref(), Some(body.as_bytes()));
            }
            other => panic!("expected an HTTP refusal, got {other:?}"),
        }
        let seen = upstream.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0].uri.path_and_query().unwrap(),
            "/v1/realtime?model=m"
        );
        assert_eq!(seen[0].headers["authorization"], "Bearer sk-test");
    }
}

/// D29: an upgrade on a conversion path (`/v1/responses`, which Codex CLI tries first, or
/// `/v1/chat/completions`) is a WebSocket session, never a conversion: accepted, it carries
/// frames; refused with 404, the refusal reaches the client so it falls back to HTTP.
#[tokio::test]
async fn upgrades_on_conversion_paths_are_websockets_and_their_refusals_relayed() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for path in ["/v1/responses", "/v1/chat/completions"] {
        let mut ws = connect(proxy.addr, path).await;
        let event = r#"{"type":"response.create","model":"m"}"#;
        ws.send(Message::text(event)).await.unwrap();
        assert_eq!(recv_message(&mut ws).await, Message::text(event), "{path}");
    }

    let refusing = MockUpstream::start(|_| {
        response(
            404,
            &[("content-type", "application/json")],
            full(r#"{"error":{"message":"no websocket here"}}"#),
        )
    })
    .await;
    let proxy = start_proxy(&refusing.url(), options()).await;
    for path in ["/v1/responses", "/v1/chat/completions"] {
        let (parts, got) = send(upgrade_request(&proxy.url(path))).await;
        assert_eq!(parts.status, 404, "{path}");
        assert_eq!(&got[..], br#"{"error":{"message":"no websocket here"}}"#);
    }
    let seen = refusing.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.method, http::Method::GET);
        assert_eq!(request.headers["upgrade"], "websocket");
        assert!(request.body.is_empty(), "a conversion's body went upstream");
    }
}

#[tokio::test]
async fn chunked_and_large_refusal_bodies_are_relayed_whole() {
    // A chunked 401 and a 300 KiB 403 whose body follows the head in later writes: the
    // client must get the decoded body, every byte of it.
    let large = "x".repeat(300 * 1024);
    let large_body = format!("{{\"error\":{{\"message\":\"{large}\"}}}}");
    let chunked = RawUpstream::start(|mut stream| async move {
        read_head(&mut stream).await;
        let parts: [&[u8]; 4] = [
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            b"a\r\n{\"error\":{\r\n",
            b"14\r\n\"message\":\"bad key\"}\r\n",
            b"1\r\n}\r\n0\r\n\r\n",
        ];
        for part in parts {
            if stream.write_all(part).await.is_err() {
                return;
            }
            let _ = stream.flush().await;
        }
        let _ = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 1])).await;
    })
    .await;
    let proxy = start_proxy(&chunked.url(), options()).await;
    let (parts, got) = send(upgrade_request(&proxy.url("/v1/realtime"))).await;
    assert_eq!(parts.status, 401);
    assert_eq!(
        std::str::from_utf8(&got).unwrap(),
        r#"{"error":{"message":"bad key"}}"#
    );

    let body = large_body.clone();
    let big = RawUpstream::start(move |mut stream| {
        let body = body.clone();
        async move {
            read_head(&mut stream).await;
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.flush().await;
            for chunk in body.as_bytes().chunks(16 * 1024) {
                if stream.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 1])).await;
        }
    })
    .await;
    let proxy = start_proxy(&big.url(), options()).await;
    let (parts, got) = send(upgrade_request(&proxy.url("/v1/realtime"))).await;
    assert_eq!(parts.status, 403);
    assert_eq!(got.len(), large_body.len());
    assert!(got == large_body.as_bytes());

    // Chunked with a stale `content-length` too (RFC 9112 §6.3: chunked wins): the length
    // must not travel on to frame the relayed body.
    let both = RawUpstream::start(|mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(
                b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                  transfer-encoding: chunked\r\ncontent-length: 1000\r\n\r\n\
                  c\r\n{\"error\":{}}\r\n0\r\n\r\n",
            )
            .await;
        let _ = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 1])).await;
    })
    .await;
    let proxy = start_proxy(&both.url(), options()).await;
    let (parts, got) = send(upgrade_request(&proxy.url("/v1/realtime"))).await;
    assert_eq!(parts.status, 401);
    assert!(
        parts
            .headers
            .get("content-length")
            .is_none_or(|v| v == "12"),
        "{parts:?}"
    );
    assert_eq!(&got[..], br#"{"error":{}}"#);
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_an_error_envelope() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = start_proxy(&format!("http://{addr}"), options()).await;

    let (parts, body) = send(upgrade_request(&proxy.url("/v1/realtime?key=secret"))).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert!(parts.headers.get("upgrade").is_none());
    let (kind, message) = envelope(&body);
    assert_eq!(kind, "upstream_error");
    assert!(message.contains(&format!("ws://{addr}")), "{message}");
    assert!(!message.contains("sk-test"), "{message}");
    assert!(
        !message.contains("secret"),
        "the query may hold a credential: {message}"
    );
}

#[tokio::test]
async fn an_upgrade_not_answered_within_the_timeout_is_504() {
    // Accepts TCP, reads the upgrade request, never answers.
    let silent = RawUpstream::start(|mut stream| async move {
        read_head(&mut stream).await;
        let _ = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 1])).await;
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&silent.url(), opts).await;

    let started = Instant::now();
    let (parts, body) = send(upgrade_request(&proxy.url("/v1/realtime"))).await;
    let elapsed = started.elapsed();
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(envelope(&body).0, "upstream_timeout");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

// ------------------------------------------------------------------------------------------
// Frames
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn text_and_binary_frames_travel_unchanged_both_ways() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    let messages = [
        Message::text("{\"type\":\"session.update\"}"),
        Message::text("héllo wörld ✓ 🚀"),
        Message::text(""),
        Message::binary(Bytes::from_static(b"\x00\x01\xff\xfe binary")),
        Message::binary(Bytes::new()),
        Message::binary(pattern(70_000, 3)),
    ];
    for message in &messages {
        ws.send(message.clone()).await.unwrap();
    }
    for message in &messages {
        assert_eq!(&recv_message(&mut ws).await, message);
    }
    // Upstream-initiated messages reach the client too.
    ws.send(Message::text("big 5")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::binary(pattern(5, 7)));
}

#[tokio::test]
async fn an_upstream_that_speaks_first_is_heard() {
    // The Realtime API sends `session.created` right after its 101, often in the same
    // packet: those bytes must not be lost in the hand-over.
    let upstream = WsUpstream::start(None, |mut ws| async move {
        let _ = ws.send(Message::text("session.created")).await;
        let _ = ws.send(Message::binary(pattern(3000, 9))).await;
        scripted(ws, None).await;
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    assert_eq!(
        recv_message(&mut ws).await,
        Message::text("session.created")
    );
    assert_eq!(
        recv_message(&mut ws).await,
        Message::binary(pattern(3000, 9))
    );
    ws.send(Message::text("then echo")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("then echo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_messages_travel_both_ways() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    let size = 16 << 20;
    let big = pattern(size, 11);
    ws.send(Message::binary(big.clone())).await.unwrap();
    match tokio::time::timeout(WAIT * 3, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(got))) => {
            assert_eq!(got.len(), size);
            assert!(got == big, "16 MiB echo differs");
        }
        other => panic!("expected the 16 MiB echo, got {other:?}"),
    }
    let text = "é".repeat(size / 2);
    ws.send(Message::text(text.clone())).await.unwrap();
    match tokio::time::timeout(WAIT * 3, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(got))) => assert!(got.as_str() == text, "16 MiB text differs"),
        other => panic!("expected the 16 MiB text echo, got {other:?}"),
    }
    // And one the upstream originates.
    ws.send(Message::text(format!("big {size}"))).await.unwrap();
    match tokio::time::timeout(WAIT * 3, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(got))) => assert!(got == pattern(size, 7)),
        other => panic!("expected the upstream's 16 MiB message, got {other:?}"),
    }
}

#[tokio::test]
async fn fragmented_messages_arrive_whole_in_both_directions() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    // Client → upstream: text in 5 raw frames (a multi-byte character is cut), with a ping
    // between fragments as RFC 6455 allows.
    let text = "fragmented ✓ message with ünïcödé, cut anywhere";
    let pieces = split_bytes(text.as_bytes(), 5);
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(piece.clone(), opcode, i + 1 == pieces.len());
        ws.send(Message::Frame(frame)).await.unwrap();
        if i == 2 {
            ws.send(Message::Ping(Bytes::from_static(b"mid")))
                .await
                .unwrap();
        }
    }
    assert_eq!(
        recv_message(&mut ws).await,
        Message::Pong(Bytes::from_static(b"mid"))
    );
    assert_eq!(recv_message(&mut ws).await, Message::text(text));

    // Binary, 3 frames.
    let data = pattern(100_000, 5);
    let pieces = split_bytes(&data, 3);
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(piece.clone(), opcode, i + 1 == pieces.len());
        ws.send(Message::Frame(frame)).await.unwrap();
    }
    assert_eq!(recv_message(&mut ws).await, Message::binary(data));

    // Upstream → client: the mock sends the text in 4 frames.
    let text = "from the upstream, in pieces: ✓✓✓";
    ws.send(Message::text(format!("fragments 4 {text}")))
        .await
        .unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text(text));
}

/// A message above tungstenite's default 16 MiB frame limit (and below its 64 MiB message
/// limit) reaches a client on default settings: the proxy sends it fragmented, as its
/// sender may have, rather than as one frame the size of the message.
#[tokio::test]
async fn a_large_message_reaches_a_client_with_a_smaller_frame_limit() {
    const SIZE: usize = 20 << 20;
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let request = format!("ws://{}/v1/realtime", proxy.addr)
        .into_client_request()
        .unwrap();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .unwrap()
        .unwrap();
    ws.send(Message::text(format!("big {SIZE}"))).await.unwrap();
    assert_eq!(
        recv_message(&mut ws).await,
        Message::binary(pattern(SIZE, 7))
    );
    // And the other way: the client's 20 MiB message comes back, fragmented again.
    ws.send(Message::binary(pattern(SIZE, 3))).await.unwrap();
    assert_eq!(
        recv_message(&mut ws).await,
        Message::binary(pattern(SIZE, 3))
    );
    // Text is split at any byte and still arrives as the same valid text.
    // (The leading byte puts every 1 MiB boundary inside a two-byte character.)
    let text = format!("a{}", "é".repeat((SIZE / 2) + 1));
    ws.send(Message::text(text.clone())).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text(text));
}

#[tokio::test]
async fn client_ping_is_answered_and_the_session_stays_up() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    for i in 0..3 {
        let data = Bytes::from(format!("ping-{i}"));
        ws.send(Message::Ping(data.clone())).await.unwrap();
        assert_eq!(recv_message(&mut ws).await, Message::Pong(data));
        ws.send(Message::text(format!("after {i}"))).await.unwrap();
        assert_eq!(
            recv_message(&mut ws).await,
            Message::text(format!("after {i}"))
        );
    }
    // An upstream ping reaches the client and is answered (by the proxy, on each hop).
    ws.send(Message::text("ping from-upstream")).await.unwrap();
    assert_eq!(
        recv_message(&mut ws).await,
        Message::Ping(Bytes::from_static(b"from-upstream"))
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("still here"));
}

// ------------------------------------------------------------------------------------------
// Closing
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_close_code_and_reason_reach_the_client() {
    for (command, code, reason) in [
        ("close 4001 bye", 4001, "bye"),
        ("close 1000 done", 1000, "done"),
        ("close 1011 server error", 1011, "server error"),
        // No status in the upstream's close frame: the client gets a plain 1000.
        ("close-empty", 1000, ""),
        // Codes that must never be on the wire are a protocol violation when received;
        // the client never sees them.
        ("close 1006 abnormal", 1002, "Protocol violation"),
        ("close 1005 none", 1002, "Protocol violation"),
        ("close 1015 tls", 1002, "Protocol violation"),
    ] {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let mut ws = connect(proxy.addr, "/v1/realtime").await;
        ws.send(Message::text(command)).await.unwrap();
        assert_close(expect_close(&mut ws).await, code, reason);
        // The upstream's close handshake was completed by the proxy.
        match next_event(&mut rx).await {
            Event::Closed(_) => {}
            other => panic!("{command}: upstream saw {other:?} instead of a close reply"),
        }
        match next_event(&mut rx).await {
            Event::Ended(None) => {}
            other => panic!("{command}: upstream session ended with {other:?}"),
        }
    }
}

#[tokio::test]
async fn upstream_vanishing_after_a_frame_gives_the_frame_then_1011() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;

    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("drop last words")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("last words"));
    assert_close(expect_close(&mut ws).await, 1011, ABNORMAL);

    // Half a frame then EOF: nothing of it is forwarded.
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("partial")).await.unwrap();
    assert_close(expect_close(&mut ws).await, 1011, ABNORMAL);
}

#[tokio::test]
async fn an_upstream_protocol_violation_gives_the_client_1011_and_the_upstream_1002() {
    let (events, mut rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("bad-opcode")).await.unwrap();
    assert_close(expect_close(&mut ws).await, 1011, ABNORMAL);
    match next_event(&mut rx).await {
        Event::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1002, "{frame:?}"),
        other => panic!("upstream saw {other:?}"),
    }
}

#[tokio::test]
async fn client_close_code_and_reason_reach_the_upstream() {
    for (code, reason) in [(4000, "client done"), (1000, ""), (1001, "going away")] {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let mut ws = connect(proxy.addr, "/v1/realtime").await;
        ws.send(Message::text("warm-up")).await.unwrap();
        recv_message(&mut ws).await;

        ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
        .await
        .unwrap();
        match next_event(&mut rx).await {
            Event::Closed(frame) => assert_close(frame, code, reason),
            other => panic!("upstream saw {other:?} instead of the client's close"),
        }
        // The client's close is answered and the connection ends.
        assert_close(expect_close(&mut ws).await, code, reason);
        assert!(matches!(next_event(&mut rx).await, Event::Ended(None)));
    }
}

#[tokio::test]
async fn a_client_close_without_status_reaches_the_upstream_as_1000_and_bad_codes_as_1002() {
    // (what the client sends, what the upstream must see)
    let cases: [(Option<CloseFrame>, u16, &str); 3] = [
        (None, 1000, ""),
        (
            Some(CloseFrame {
                code: CloseCode::Abnormal,
                reason: "abnormal".into(),
            }),
            1002,
            "Protocol violation",
        ),
        (
            Some(CloseFrame {
                code: CloseCode::Status,
                reason: "".into(),
            }),
            1002,
            "Protocol violation",
        ),
    ];
    for (sent, code, reason) in cases {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let mut ws = connect(proxy.addr, "/v1/realtime").await;
        ws.send(Message::text("warm-up")).await.unwrap();
        recv_message(&mut ws).await;

        ws.send(Message::Close(sent.clone())).await.unwrap();
        match next_event(&mut rx).await {
            Event::Closed(frame) => assert_close(frame, code, reason),
            other => panic!("{sent:?}: upstream saw {other:?} instead of a close"),
        }
        // The proxy answers the client's close handshake.
        let _ = expect_close(&mut ws).await;
        assert!(matches!(next_event(&mut rx).await, Event::Ended(None)));
    }
}

#[tokio::test]
async fn client_vanishing_closes_the_upstream_promptly() {
    let (events, mut rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("warm-up")).await.unwrap();
    recv_message(&mut ws).await;

    let started = Instant::now();
    drop(ws); // TCP close, no close frame
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match rx.recv().await {
                Some(Event::Ended(_)) | None => return,
                Some(Event::Closed(frame)) => {
                    // The proxy says why it is closing.
                    let frame = frame.expect("close frame without a status");
                    assert_eq!(u16::from(frame.code), 1001);
                }
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "upstream still open {:?} after the client vanished",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_message_over_the_limit_closes_with_1009() {
    let (events, mut rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let mut opts = options();
    opts.max_websocket_message_bytes = 64 * 1024;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    // Exactly the limit passes, in one frame and in fragments.
    let at_limit = pattern(64 * 1024, 1);
    ws.send(Message::binary(at_limit.clone())).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::binary(at_limit));

    // One byte more, as fragments that each fit, is refused: the limit is per message.
    let over = pattern(64 * 1024 + 1, 2);
    let pieces = split_bytes(&over, 4);
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(piece.clone(), opcode, i + 1 == pieces.len());
        // The proxy may close while the last fragments are still on their way.
        if ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    let frame = expect_close(&mut ws).await.expect("close without status");
    assert_eq!(u16::from(frame.code), 1009, "{:?}", frame.reason);

    // The upstream session is closed too.
    wait_session_end(&mut rx).await;
}

#[tokio::test]
async fn a_large_single_frame_over_the_limit_closes_with_1009() {
    let (events, mut rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let mut opts = options();
    opts.max_websocket_message_bytes = 64 * 1024;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    // Far over the limit, so the proxy refuses it while most of it is still unsent.
    let _ = ws.send(Message::binary(pattern(8 << 20, 4))).await;
    let frame = expect_close(&mut ws).await.expect("close without status");
    assert_eq!(u16::from(frame.code), 1009, "{:?}", frame.reason);
    wait_session_end(&mut rx).await;
}

#[tokio::test]
async fn an_upstream_message_over_the_limit_closes_both_sides_with_1009() {
    let (events, mut rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let mut opts = options();
    opts.max_websocket_message_bytes = 64 * 1024;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;

    ws.send(Message::text(format!("big {}", 64 * 1024 + 1)))
        .await
        .unwrap();
    let frame = expect_close(&mut ws).await.expect("close without status");
    assert_eq!(u16::from(frame.code), 1009, "{:?}", frame.reason);
    assert!(frame.reason.starts_with("upstream "), "{:?}", frame.reason);
    match next_event(&mut rx).await {
        Event::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("upstream saw {other:?}"),
    }
}

#[tokio::test]
async fn malformed_client_frames_close_with_1002_and_close_the_upstream() {
    let cases: [(&str, &[u8]); 3] = [
        // An unmasked text frame "hi" from a client.
        ("unmasked", &[0x81, 0x02, b'h', b'i']),
        // A masked frame with reserved opcode 0x3.
        ("reserved opcode", &[0x83, 0x80, 1, 2, 3, 4]),
        // A continuation frame with no message to continue.
        ("stray continuation", &[0x80, 0x80, 1, 2, 3, 4]),
    ];
    for (name, bytes) in cases {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let mut ws = connect(proxy.addr, "/v1/realtime").await;
        ws.send(Message::text("warm-up")).await.unwrap();
        recv_message(&mut ws).await;

        ws.get_mut().write_all(bytes).await.unwrap();
        let frame = expect_close(&mut ws).await.expect("close without status");
        assert_eq!(u16::from(frame.code), 1002, "{name}: {:?}", frame.reason);
        wait_session_end(&mut rx).await;
    }
}

// ------------------------------------------------------------------------------------------
// Flow control and lifetime
// ------------------------------------------------------------------------------------------

/// The most bytes the kernel may buffer on one loopback connection, one direction.
fn socket_buffer_ceiling() -> usize {
    let max_of = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last().and_then(|v| v.parse().ok()))
            .unwrap_or(8 << 20)
    };
    max_of("/proc/sys/net/ipv4/tcp_wmem") + max_of("/proc/sys/net/ipv4/tcp_rmem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_throttles_the_upstream() {
    const MESSAGE: usize = 64 * 1024;
    // Two TCP legs (upstream→proxy, proxy→client), each able to buffer at most
    // `ceiling` bytes, plus a few messages held by the libraries and the proxy.
    let ceiling = socket_buffer_ceiling();
    let bound = 2 * ceiling / MESSAGE + 16;
    // Unthrottled, the upstream would send all of these during the stall.
    let total = (bound * 4).max(1000);

    let (sent_tx, mut sent_rx) = watch::channel(0usize);
    let sent_tx = Arc::new(sent_tx);
    let upstream = WsUpstream::start(None, move |mut ws| {
        let sent = sent_tx.clone();
        async move {
            for i in 0..total {
                let mut data = vec![0u8; MESSAGE];
                data[..8].copy_from_slice(&(i as u64).to_be_bytes());
                if ws.send(Message::binary(data)).await.is_err() {
                    return;
                }
                sent.send_replace(i + 1);
            }
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "done".into(),
                })))
                .await;
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    // The stall is the point here: a stall limit far above it.
    let mut opts = options();
    opts.timeout = WAIT * 6;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/stream").await;

    // Do not read. The upstream is throttled once it has made no progress for a while.
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), sent_rx.changed()).await {
            Err(_) => break, // no progress for 500 ms: stalled
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("upstream session ended while the client was not reading"),
        }
        assert!(started.elapsed() < WAIT * 3, "the upstream never stalled");
        assert!(
            *sent_rx.borrow() < total,
            "the upstream sent everything ({total} messages) to a client that reads nothing"
        );
    }
    let stalled_at = *sent_rx.borrow();
    eprintln!(
        "backpressure: upstream stalled after {stalled_at} of {total} messages ({} MiB; bound {bound}) in {:?}",
        (stalled_at * MESSAGE) >> 20,
        started.elapsed()
    );
    assert!(stalled_at > 0, "nothing was sent at all");
    assert!(
        stalled_at <= bound,
        "the upstream got {stalled_at} messages out to a stalled client (bound {bound})"
    );

    // Now read: every message, in order, then the upstream's close.
    for i in 0..total {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => {
                assert_eq!(data.len(), MESSAGE);
                assert_eq!(u64::from_be_bytes(data[..8].try_into().unwrap()), i as u64);
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
    assert_close(expect_close(&mut ws).await, 1000, "done");
    assert_eq!(*sent_rx.borrow(), total);
}

/// An upstream that completes the handshake and then reads nothing until `resume` fires;
/// from then on it reads every message, reporting how many arrived (in order, checked by the
/// sequence number in their first 8 bytes), and ends when the stream does.
async fn stalled_upstream(
    resume: watch::Receiver<bool>,
    received: mpsc::Sender<Result<usize, String>>,
) -> WsUpstream {
    WsUpstream::start(None, move |mut ws| {
        let (mut resume, received) = (resume.clone(), received.clone());
        async move {
            if resume.wait_for(|go| *go).await.is_err() {
                return;
            }
            let mut count = 0usize;
            let end = loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        let seq = u64::from_be_bytes(data[..8].try_into().unwrap());
                        if seq != count as u64 {
                            break Err(format!("message {count} carried sequence {seq}"));
                        }
                        count += 1;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Ok(count),
                    Some(Ok(_)) => {}
                }
            };
            let _ = received.send(end).await;
        }
    })
    .await
}

fn numbered(i: usize, size: usize) -> Message {
    let mut data = vec![0u8; size];
    data[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Message::binary(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_throttles_the_client() {
    const MESSAGE: usize = 64 * 1024;
    // As in the other direction: two TCP legs of kernel buffers plus a few messages held
    // by the libraries and the proxy (one being sent, one read ahead).
    let ceiling = socket_buffer_ceiling();
    let bound = 2 * ceiling / MESSAGE + 16;
    let total = (bound * 4).max(1000);

    let (resume_tx, resume_rx) = watch::channel(false);
    let (received_tx, mut received_rx) = mpsc::channel(4);
    let upstream = stalled_upstream(resume_rx, received_tx).await;
    // The stall is the point here: a stall limit far above it.
    let mut opts = options();
    opts.timeout = WAIT * 6;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let ws = connect(proxy.addr, "/v1/realtime").await;

    let (sent_tx, mut sent_rx) = watch::channel(0usize);
    let client = tokio::spawn(async move {
        let mut ws = ws;
        for i in 0..total {
            ws.send(numbered(i, MESSAGE)).await.unwrap();
            sent_tx.send_replace(i + 1);
        }
        ws.close(None).await.unwrap();
        // Read to the end of the close handshake.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    });

    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), sent_rx.changed()).await {
            Err(_) => break, // no progress for 500 ms: throttled
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the client sent everything to an upstream that reads nothing"),
        }
        assert!(
            started.elapsed() < WAIT * 3,
            "the client was never throttled"
        );
    }
    let stalled_at = *sent_rx.borrow();
    eprintln!(
        "backpressure: client stalled after {stalled_at} of {total} messages ({} MiB; bound {bound}) in {:?}",
        (stalled_at * MESSAGE) >> 20,
        started.elapsed()
    );
    assert!(stalled_at > 0, "nothing was sent at all");
    assert!(
        stalled_at <= bound,
        "the client got {stalled_at} messages out to a stalled upstream (bound {bound})"
    );

    // The upstream reads again: every message arrives, in order.
    resume_tx.send_replace(true);
    let received = tokio::time::timeout(WAIT * 3, received_rx.recv())
        .await
        .expect("upstream did not finish reading")
        .expect("upstream report channel closed");
    assert_eq!(received, Ok(total));
    tokio::time::timeout(WAIT, client)
        .await
        .expect("client did not finish")
        .unwrap();
}

/// A large message (sent on in fragments) followed at once by the sender's close reaches a
/// slow reader whole, then the close: the close read ahead waits for the message in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_right_after_a_large_message_to_a_slow_reader_waits_for_the_message() {
    // More than the kernel buffers on the way can hold, so the proxy is still sending the
    // message when it reads the close.
    let size = (socket_buffer_ceiling() + (4 << 20)).min(60 << 20);
    let upstream = WsUpstream::start(None, move |mut ws| async move {
        let _ = ws.send(Message::binary(pattern(size, 9))).await;
        let done = CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        };
        let _ = ws.send(Message::Close(Some(done))).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(proxy.addr).await.unwrap();
    let request = format!("ws://{}/v1/realtime", proxy.addr)
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())),
    )
    .await
    .unwrap()
    .unwrap();
    // Slow to start reading: by now the proxy has read the close behind the message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = recv_message(&mut ws).await;
    assert!(
        got == Message::binary(pattern(size, 9)),
        "expected the whole {size}-byte message first, got {} bytes of {:?}",
        got.len(),
        std::mem::discriminant(&got)
    );
    assert_close(expect_close(&mut ws).await, 1000, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_while_the_upstream_is_stalled_ends_the_session() {
    // One message larger than what the kernel buffers toward the upstream can hold, so the
    // proxy is still sending it when the client goes.
    let size = (socket_buffer_ceiling() + (4 << 20)).min(60 << 20);
    let (resume_tx, resume_rx) = watch::channel(false);
    let (received_tx, mut received_rx) = mpsc::channel(4);
    let upstream = stalled_upstream(resume_rx, received_tx).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    assert_eq!(proxy.sessions.open(), 1);

    tokio::time::timeout(WAIT, ws.send(numbered(0, size)))
        .await
        .expect("the proxy did not take the client's message")
        .unwrap();
    let started = Instant::now();
    drop(ws); // TCP close, no close frame, while the proxy's send upstream is blocked

    tokio::time::timeout(Duration::from_secs(3), proxy.sessions.all_closed())
        .await
        .expect("the session is still open although its client is gone");
    eprintln!(
        "session ended {:?} after the client vanished",
        started.elapsed()
    );

    // The upstream connection was dropped: once the upstream reads again it finds the
    // end of the stream, without the whole message.
    resume_tx.send_replace(true);
    let received = tokio::time::timeout(WAIT, received_rx.recv())
        .await
        .expect("the upstream connection is still open")
        .expect("upstream report channel closed");
    assert_eq!(received, Ok(0));
}

/// Sends numbered 64 KiB messages on `tx` until it fails (at most 100 000).
async fn flood<S>(mut tx: S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    for i in 0..100_000 {
        if tx.send(numbered(i, 64 * 1024)).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_ends_the_session_with_1011_after_the_timeout() {
    // The upstream never reads; the client sends until throttled, then waits, reading.
    let (_resume, resume_rx) = watch::channel(false);
    let (received_tx, _received) = mpsc::channel(4);
    let upstream = stalled_upstream(resume_rx, received_tx).await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (tx, mut rx) = connect(proxy.addr, "/v1/realtime").await.split();
    let started = Instant::now();
    let sender = tokio::spawn(flood(tx));
    // The upstream sends nothing: the close is the first message, or close to it.
    let mut close = None;
    for _ in 0..16 {
        match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                close = Some(frame);
                break;
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close from the proxy: {other:?}"),
        }
    }
    let close = close.expect("no close among the first 16 messages");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the 1 s timeout",
        started.elapsed()
    );
    assert_close(close, 1011, "upstream stopped reading");
    tokio::time::timeout(WAIT, proxy.sessions.all_closed())
        .await
        .expect("the session is still open");
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_the_upstream_told_1001_after_the_timeout() {
    // The upstream sends 64 KiB messages while it can and reports the close it gets.
    let (closes_tx, mut closes) = mpsc::channel::<Option<CloseFrame>>(1);
    let upstream = WsUpstream::start(None, move |ws| {
        let closes = closes_tx.clone();
        async move {
            let (tx, mut rx) = ws.split();
            let sender = tokio::spawn(flood(tx));
            while let Some(Ok(message)) = rx.next().await {
                if let Message::Close(frame) = message {
                    let _ = closes.send(frame).await;
                    break;
                }
            }
            sender.abort();
        }
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let _ws = connect(proxy.addr, "/v1/realtime").await; // never read
    let started = Instant::now();
    let close = tokio::time::timeout(WAIT, closes.recv())
        .await
        .expect("the upstream was never told")
        .expect("the upstream session ended without a close");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "told after {:?}, before the 1 s timeout",
        started.elapsed()
    );
    assert_close(close, 1001, "client stopped reading");
    tokio::time::timeout(WAIT, proxy.sessions.all_closed())
        .await
        .expect("the session is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_never_taken_for_a_stalled_one() {
    // One message bigger than the kernel can buffer, read by the upstream at most 4 MiB
    // every 200 ms, with a 1 s timeout: the proxy's send waits longer than the timeout but
    // moves every 200 ms, so it must go through whole.
    let size = (socket_buffer_ceiling() + (4 << 20)).min(60 << 20);
    let (read_tx, mut read_rx) = mpsc::channel::<usize>(1);
    let upstream = WsUpstream::start(None, move |mut ws| {
        let read_tx = read_tx.clone();
        async move {
            let mut total = 0usize;
            let mut buf = vec![0u8; 4 << 20];
            while total < size {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match tokio::time::timeout(WAIT, ws.get_mut().read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => total += n,
                    _ => break,
                }
            }
            let _ = read_tx.send(total).await;
        }
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    let started = Instant::now();
    tokio::time::timeout(WAIT, ws.send(numbered(0, size)))
        .await
        .expect("the proxy did not take the client's message")
        .unwrap();
    let total = tokio::time::timeout(WAIT * 3, read_rx.recv())
        .await
        .expect("the upstream did not finish reading")
        .unwrap();
    eprintln!("{total} of {size} bytes arrived in {:?}", started.elapsed());
    assert!(total >= size, "the upstream got {total} of {size} bytes");
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the send never waited longer than the timeout, so this proved nothing"
    );
}

#[tokio::test]
async fn an_idle_session_outlives_the_timeout() {
    let (events, _rx) = mpsc::channel(64);
    let upstream = WsUpstream::echo(events).await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let mut ws = connect(proxy.addr, "/v1/realtime").await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("before"));

    // The point of this test is elapsed time: idle for 2.5 × timeoutSeconds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(recv_message(&mut ws).await, Message::text("after"));
    ws.send(Message::text("big 100")).await.unwrap();
    assert_eq!(
        recv_message(&mut ws).await,
        Message::binary(pattern(100, 7))
    );
}

// The open-files limit is read and raised through `/proc` and `prlimit`.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions() {
    const SESSIONS: usize = 1000;
    // In-process, each session holds four descriptors: the client's, the proxy's two and
    // the upstream's. Other tests of this binary run at the same time: leave room.
    let needed = (4 * SESSIONS + 512) as u64;
    if !support::limits::require_open_files(needed, "a thousand concurrent sessions") {
        return;
    }
    let sessions = SESSIONS;

    let upstream = WsUpstream::start(None, |ws| scripted(ws, None)).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let addr = proxy.addr;

    let started = Instant::now();
    // Open them all (at most 64 handshakes in flight, so no listen backlog overflows), hold
    // them all open together, then exchange and close.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    let all_open = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let (handshakes, all_open, mut go_rx) =
            (handshakes.clone(), all_open.clone(), go_tx.subscribe());
        tasks.spawn(async move {
            let permit = handshakes.acquire_owned().await.unwrap();
            let mut ws = connect(addr, &format!("/v1/realtime?session={i}")).await;
            drop(permit);
            all_open.wait().await;
            let _ = go_rx.recv().await;
            let text = format!("hello from session {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(recv_message(&mut ws).await, Message::text(text));
            ws.close(None).await.unwrap();
            let frame = expect_close(&mut ws).await;
            assert!(frame.is_none(), "session {i}: {frame:?}");
        });
    }
    tokio::time::timeout(WAIT * 6, all_open.wait())
        .await
        .expect("sessions did not all open in time");
    let opened = started.elapsed();
    assert_eq!(upstream.handshakes().len(), sessions);
    go_tx.send(()).unwrap();
    let finished = tokio::time::timeout(WAIT * 6, async {
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
    })
    .await;
    assert!(finished.is_ok(), "sessions did not finish in time");
    eprintln!(
        "{sessions} concurrent sessions: all open after {opened:?}, all done after {:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------------------------------
// The real binary: the session log line, shutdown and reload with open sessions
// ------------------------------------------------------------------------------------------

mod daemon {
    use super::*;
    use support::daemon::{config, field, has_field, rule, Daemon, TempDir};

    /// The binary serving one rule per upstream URL, each on its own free port.
    async fn start_daemon(tag: &str, upstreams: &[String]) -> (TempDir, Daemon, Vec<u16>) {
        let dir = TempDir::new(tag);
        let ports: Vec<u16> = upstreams
            .iter()
            .map(|_| support::daemon::free_port())
            .collect();
        let rules: Vec<String> = ports
            .iter()
            .zip(upstreams)
            .map(|(port, url)| rule(*port, url))
            .collect();
        let path = dir.write("config.json", &config(&rules));
        let daemon = support::daemon::start(&dir, &path, rules.len()).await;
        (dir, daemon, ports)
    }

    fn proxy_addr(port: u16) -> SocketAddr {
        support::daemon::local(port)
    }

    /// An echo session through the daemon on `port`, warmed up with one round trip.
    async fn open_session(port: u16, path: &str) -> Ws {
        let mut ws = connect(proxy_addr(port), path).await;
        ws.send(Message::text("warm-up")).await.unwrap();
        assert_eq!(recv_message(&mut ws).await, Message::text("warm-up"));
        ws
    }

    fn is_session_line(line: &str) -> bool {
        line.contains("openai_stream_proxy::access") && line.contains("websocket session")
    }

    #[tokio::test]
    async fn each_session_is_logged_with_its_traffic_and_close_codes() {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let (_dir, mut daemon, ports) = start_daemon("ws-log", &[upstream.url()]).await;
        let port = ports[0];

        let mut ws = connect(proxy_addr(port), "/v1/realtime?model=m&key=secret").await;
        ws.send(Message::text("hello")).await.unwrap(); // 5 bytes
        assert_eq!(recv_message(&mut ws).await, Message::text("hello"));
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap(); // 3 bytes
        assert_eq!(
            recv_message(&mut ws).await,
            Message::binary(vec![1u8, 2, 3])
        );
        ws.send(Message::text("big 1000")).await.unwrap(); // 8 bytes up, 1000 down
        assert_eq!(
            recv_message(&mut ws).await,
            Message::binary(pattern(1000, 7))
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "done".into(),
        }))
        .await
        .unwrap();
        assert_close(expect_close(&mut ws).await, 4000, "done");
        wait_session_end(&mut rx).await;

        let line = daemon
            .wait_for("the websocket session line", is_session_line)
            .await;
        let upstream_target = format!("ws://{}/v1/realtime", upstream.addr);
        for (key, value) in [
            ("port", port.to_string().as_str()),
            ("path", "/v1/realtime"),
            ("upstream", upstream_target.as_str()),
            ("frames_to_upstream", "3"),
            ("bytes_to_upstream", "16"),
            ("frames_to_client", "3"),
            ("bytes_to_client", "1008"),
            ("client_close", "4000"),
            ("upstream_close", "4000"),
        ] {
            assert!(has_field(&line, key, value), "{key}={value}: {line}");
        }
        let duration: f64 = field(&line, "duration_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no duration_ms: {line}"));
        assert!(duration > 0.0 && duration < 60_000.0, "{line}");
        // The proxy closed nothing itself, and the query (which may carry a credential)
        // is not logged.
        assert!(field(&line, "proxy_close").is_none(), "{line}");
        assert!(!line.contains("secret"), "{line}");
        daemon.stop().await;
    }

    /// A handshake still on its way upstream when the shutdown begins: its session opens
    /// after the open sessions were told to close, and is closed with 1001 all the same,
    /// before the process exits.
    #[tokio::test]
    async fn a_session_opened_during_the_shutdown_is_closed_with_1001_too() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        let (arrived_tx, arrived) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let (events, mut rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = arrived_tx.send(());
            // The upgrade request waits unanswered until the proxy is draining.
            let _ = released.await;
            let ws = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config()))
                .await
                .unwrap();
            scripted(ws, Some(events)).await;
        });
        let (_dir, mut daemon, ports) = start_daemon("ws-late-session", &[upstream]).await;
        let addr = proxy_addr(ports[0]);
        let connecting = tokio::spawn(async move {
            raw_upgrade(
                addr,
                "/v1/realtime",
                &["connection: Upgrade", "upgrade: websocket"],
            )
            .await
        });
        tokio::time::timeout(WAIT, arrived)
            .await
            .expect("the upgrade never reached the upstream")
            .unwrap();

        daemon.signal("TERM");
        daemon
            .wait_for("the shutdown line", |l| l.contains("shutting down"))
            .await;
        release.send(()).unwrap();
        let (head, mut ws) = connecting.await.unwrap();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert_close(expect_close(&mut ws).await, 1001, "proxy shutting down");
        match next_event(&mut rx).await {
            Event::Closed(frame) => assert_close(frame, 1001, "proxy shutting down"),
            other => panic!("upstream saw {other:?} instead of a 1001 close"),
        }
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.dump());
    }

    #[tokio::test]
    async fn shutdown_closes_open_sessions_with_1001_on_both_legs_and_exits_0() {
        for signal in ["TERM", "INT"] {
            let (events, mut rx) = mpsc::channel(64);
            let upstream = WsUpstream::echo(events).await;
            let (_dir, mut daemon, ports) = start_daemon("ws-shutdown", &[upstream.url()]).await;
            let mut ws = open_session(ports[0], "/v1/realtime").await;

            let started = Instant::now();
            daemon.signal(signal);
            assert_close(expect_close(&mut ws).await, 1001, "proxy shutting down");
            match next_event(&mut rx).await {
                Event::Closed(frame) => assert_close(frame, 1001, "proxy shutting down"),
                other => panic!("SIG{signal}: upstream saw {other:?} instead of a 1001 close"),
            }
            let status = daemon.wait_exit(WAIT).await;
            assert_eq!(
                status.code(),
                Some(0),
                "SIG{signal}: {status}\n{}",
                daemon.dump()
            );
            eprintln!(
                "SIG{signal}: session closed and proxy exited in {:?}",
                started.elapsed()
            );
            // Both close handshakes completed: the session line names both answers.
            let line = daemon
                .wait_for("the websocket session line", is_session_line)
                .await;
            for (key, value) in [
                ("proxy_close", "1001"),
                ("client_close", "1001"),
                ("upstream_close", "1001"),
            ] {
                assert!(
                    has_field(&line, key, value),
                    "SIG{signal}: {key}={value}: {line}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_reload_that_removes_the_rule_leaves_its_open_session_working() {
        let (events, mut rx) = mpsc::channel(64);
        let upstream = WsUpstream::echo(events).await;
        let (other_events, _other_rx) = mpsc::channel(64);
        let other = WsUpstream::echo(other_events).await;
        let (dir, mut daemon, ports) =
            start_daemon("ws-reload", &[upstream.url(), other.url()]).await;
        let (removed, kept) = (ports[0], ports[1]);
        let mut ws = open_session(removed, "/v1/realtime").await;
        // A second session on the removed rule stays open until shutdown.
        let mut lingering = open_session(removed, "/v1/realtime").await;

        // Reload without the session's rule.
        dir.write("config.json", &config(&[rule(kept, &other.url())]));
        let mark = daemon.mark();
        daemon.signal("HUP");
        let line = daemon
            .wait_for_since(mark, "the config reloaded line", |l| {
                l.contains("config reloaded") || l.contains("config reload rejected")
            })
            .await;
        assert!(
            has_field(&line, "removed", "1"),
            "{line}\n{}",
            daemon.dump()
        );
        assert!(
            support::daemon::connect_refused(removed).await,
            "{removed} still accepts new connections after the reload"
        );

        // The session carries on both ways and closes normally.
        ws.send(Message::text("after reload")).await.unwrap();
        assert_eq!(recv_message(&mut ws).await, Message::text("after reload"));
        ws.send(Message::text("big 70000")).await.unwrap();
        assert_eq!(
            recv_message(&mut ws).await,
            Message::binary(pattern(70000, 7))
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        match next_event(&mut rx).await {
            Event::Closed(frame) => assert_close(frame, 1000, "bye"),
            other => panic!("upstream saw {other:?} instead of the client's close"),
        }
        assert_close(expect_close(&mut ws).await, 1000, "bye");

        // At shutdown, the session left on the removed rule and one opened on the kept
        // rule after the reload are both closed with 1001.
        let mut kept_ws = open_session(kept, "/v1/realtime").await;
        lingering.send(Message::text("still here")).await.unwrap();
        assert_eq!(
            recv_message(&mut lingering).await,
            Message::text("still here")
        );
        daemon.signal("TERM");
        assert_close(
            expect_close(&mut kept_ws).await,
            1001,
            "proxy shutting down",
        );
        assert_close(
            expect_close(&mut lingering).await,
            1001,
            "proxy shutting down",
        );
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.dump());
    }
}
