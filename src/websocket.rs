//! WebSocket proxying: the upstream handshake first, then frames both ways with
//! backpressure, and close codes carried across faithfully. Knows no conversion.
//!
//! The upstream is connected before the client is upgraded (D19), so a refusal (401 bad key,
//! 404, 429 …) reaches the client as that HTTP response and a browser can tell why. The
//! client's `Sec-WebSocket-Protocol` offer is forwarded and the 101 names exactly what the
//! upstream selected (D20): browsers authenticate to the Realtime API through subprotocols.
//!
//! Each direction is its own loop that reads one message and waits until the other side has
//! accepted it before reading the next, so a slow reader throttles the fast side and a
//! session never holds more than one message per direction. Running the two directions
//! concurrently (rather than in one select loop) avoids the proxy deadlock where both peers
//! block writing to each other while the proxy waits on one of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::headers::{strip_hop_by_hop, WEBSOCKET_HANDSHAKE};
use crate::service::{error_chain, RuleContext};
use crate::upstream::UpstreamBody;

/// How long a close handshake may take once one side has closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The close reason a client sees when the upstream vanished without a close frame.
pub const ABNORMAL_UPSTREAM_REASON: &str = "upstream websocket disconnected abnormally";

/// Handles an upgrade request: handshake upstream, then answer 101 and pump in the
/// background, or relay the upstream's refusal.
pub async fn handle(
    rule: &Arc<RuleContext>,
    mut parts: Parts,
    _body: UpstreamBody,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_key = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| {
            ProxyError::BadRequest("WebSocket upgrade without Sec-WebSocket-Key".into())
        })?;
    if parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Ok(response);
    }
    let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
        ProxyError::BadRequest("this connection cannot be upgraded to a WebSocket".into())
    })?;

    let connect_uri = rule
        .upstream
        .request_uri(parts.uri.path_and_query())
        .map_err(|e| {
            ProxyError::BadRequest(format!(
                "request path cannot be appended to the upstream URL: {e}"
            ))
        })?;
    let request = upstream_handshake(&connect_uri, &parts.headers)?;
    let target = format!(
        "{}{}",
        rule.upstream.websocket_base(),
        parts.uri.path_and_query().map_or("/", |pq| pq.as_str())
    );
    let config = websocket_config(rule.options.max_websocket_message_bytes);

    let handshake = async {
        let stream = rule
            .client
            .connect_websocket(connect_uri.clone())
            .await
            .map_err(|e| ProxyError::UpstreamUnreachable {
                upstream: target.clone(),
                reason: error_chain(&*e),
            })?;
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .map_err(|e| match e {
                WsError::Http(response) => HandshakeFailure::Refused(response),
                other => HandshakeFailure::Proxy(ProxyError::UpstreamUnreachable {
                    upstream: target.clone(),
                    reason: format!("WebSocket handshake failed: {other}"),
                }),
            })
    };
    let (upstream, upstream_response) =
        match tokio::time::timeout(rule.options.timeout, handshake).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: target,
                    seconds: rule.options.timeout.as_secs(),
                });
            }
            Ok(Err(HandshakeFailure::Proxy(e))) => return Err(e),
            Ok(Err(HandshakeFailure::Refused(response))) => return Ok(relay_refusal(*response)),
            Ok(Ok(connected)) => connected,
        };

    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    // The upstream's own 101 headers (cookies, request ids) travel on, minus the
    // per-connection handshake ones, which this leg answers itself.
    let mut upstream_headers = upstream_response.headers().clone();
    strip_hop_by_hop(&mut upstream_headers);
    for name in &WEBSOCKET_HANDSHAKE {
        upstream_headers.remove(name);
    }
    headers.extend(upstream_headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(client_key.as_bytes()))
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?,
    );

    let session = Session {
        port: rule.port,
        path: parts.uri.path().to_owned(),
        upstream: target,
        started: Instant::now(),
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let client = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                let report = pump(client, upstream).await;
                session.log(&report);
            }
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed; closing the upstream session");
                let mut upstream = upstream;
                let _ = upstream
                    .close(Some(close_frame(CloseCode::Away, "client upgrade failed")))
                    .await;
            }
        }
    });
    Ok(response)
}

enum HandshakeFailure {
    Refused(Box<http::Response<Option<Vec<u8>>>>),
    Proxy(ProxyError),
}

impl From<ProxyError> for HandshakeFailure {
    fn from(e: ProxyError) -> Self {
        HandshakeFailure::Proxy(e)
    }
}

/// The upstream handshake request: the client's headers (credentials, `openai-beta`,
/// cookies, `origin`, subprotocol offer) minus hop-by-hop and per-connection handshake
/// headers, plus this leg's own handshake.
fn upstream_handshake(
    uri: &Uri,
    client_headers: &HeaderMap,
) -> Result<http::Request<()>, ProxyError> {
    let mut headers = client_headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in &WEBSOCKET_HANDSHAKE {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    // Offers may come on several lines; the handshake library reads one.
    let offers: Vec<&str> = client_headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !offers.is_empty() {
        let joined = HeaderValue::from_str(&offers.join(", "))
            .map_err(|_| ProxyError::BadRequest("invalid Sec-WebSocket-Protocol".into()))?;
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, joined);
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let host = match uri.port_u16() {
        Some(port) if port != default_port => authority.to_owned(),
        _ => uri.host().unwrap_or_default().to_owned(),
    };
    let bad = |e: http::Error| {
        ProxyError::BadRequest(format!("cannot build the upstream handshake: {e}"))
    };
    let mut request = http::Request::builder()
        .method(http::Method::GET)
        .uri(uri.clone())
        .body(())
        .map_err(bad)?;
    *request.headers_mut() = headers;
    let h = request.headers_mut();
    h.insert(
        header::HOST,
        HeaderValue::from_str(&host)
            .map_err(|_| ProxyError::BadRequest("invalid upstream host".into()))?,
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    h.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&generate_key())
            .map_err(|_| ProxyError::BadRequest("invalid key".into()))?,
    );
    Ok(request)
}

/// The upstream refused the upgrade with an HTTP response: the client gets that status,
/// headers and body instead of an upgrade (D19), so its own fallback logic can run.
fn relay_refusal(refusal: http::Response<Option<Vec<u8>>>) -> Response<ProxyBody> {
    let (mut parts, body) = refusal.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for name in &WEBSOCKET_HANDSHAKE {
        parts.headers.remove(name);
    }
    let body = body.unwrap_or_default();
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::full(body))
}

/// Buffers sized for many idle sessions: small read buffers that grow on demand, no write
/// batching (a proxy must not hold frames back), and the per-message cap on both legs.
pub fn websocket_config(max_message_bytes: u64) -> WebSocketConfig {
    let max = usize::try_from(max_message_bytes).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_add(64 * 1024))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// What one direction of a session saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub frames: u64,
    pub bytes: u64,
}

/// How a session ended, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionReport {
    pub to_upstream: Traffic,
    pub to_client: Traffic,
    /// Close code the client sent, if it sent one.
    pub client_close: Option<u16>,
    /// Close code the upstream sent, if it sent one.
    pub upstream_close: Option<u16>,
    /// Close code the proxy itself sent the client (1011 for an abnormal upstream end,
    /// 1009 for an oversized message, 1002 for a protocol error).
    pub proxy_close: Option<u16>,
}

/// Why a direction stopped.
enum Ending {
    Closed(Option<CloseFrame>),
    ReadFailed(WsError),
    Eof,
    WriteFailed,
}

/// Forwards messages from `rx` to `tx` until a close, an error or the end. Pings are
/// forwarded so liveness stays end to end; pongs are answered per hop by the library and
/// not forwarded (the sender would get two).
async fn forward<R, T>(rx: &mut R, tx: &mut T, traffic: &mut Traffic) -> Ending
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    T: Sink<Message, Error = WsError> + Unpin,
{
    loop {
        let message = match rx.next().await {
            None => return Ending::Eof,
            Some(Err(e)) => return Ending::ReadFailed(e),
            Some(Ok(Message::Close(frame))) => return Ending::Closed(frame),
            Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => continue,
            Some(Ok(message)) => message,
        };
        traffic.frames += 1;
        traffic.bytes += message.len() as u64;
        if tx.send(message).await.is_err() {
            return Ending::WriteFailed;
        }
    }
}

/// Runs a session until either side ends it, carrying the close across. Generic over the
/// two legs so tests can drive it with any `Stream + Sink`.
pub async fn pump<C, U>(client: C, upstream: U) -> SessionReport
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let mut report = SessionReport::default();
    let (mut up, mut down) = (Traffic::default(), Traffic::default());

    let ended = {
        let to_upstream = forward(&mut client_rx, &mut upstream_tx, &mut up);
        let to_client = forward(&mut upstream_rx, &mut client_tx, &mut down);
        tokio::pin!(to_upstream, to_client);
        tokio::select! {
            ending = &mut to_upstream => Side::Client(ending),
            ending = &mut to_client => Side::Upstream(ending),
        }
    };
    report.to_upstream = up;
    report.to_client = down;

    match ended {
        // A client close (code and reason) goes upstream as it is (D21); the upstream's
        // answer completes both handshakes.
        Side::Client(Ending::Closed(frame)) => {
            report.client_close = frame.as_ref().map(|f| u16::from(f.code));
            let _ = upstream_tx.send(Message::Close(frame.map(wire_safe))).await;
            report.upstream_close = await_close(&mut upstream_rx).await;
            let _ = client_tx.close().await;
        }
        Side::Client(Ending::ReadFailed(error)) => {
            if let Some(code) = client_error_close(&error) {
                report.proxy_close = Some(u16::from(code));
                let _ = client_tx
                    .send(Message::Close(Some(close_frame(
                        code,
                        &client_error_reason(&error),
                    ))))
                    .await;
            }
            let _ = upstream_tx
                .send(Message::Close(Some(close_frame(
                    CloseCode::Away,
                    "client connection ended",
                ))))
                .await;
            report.upstream_close = await_close(&mut upstream_rx).await;
        }
        Side::Client(Ending::Eof) | Side::Upstream(Ending::WriteFailed) => {
            let _ = upstream_tx
                .send(Message::Close(Some(close_frame(
                    CloseCode::Away,
                    "client went away",
                ))))
                .await;
            report.upstream_close = await_close(&mut upstream_rx).await;
        }
        // The upstream's close goes to the client with its code and reason; codes that must
        // not appear on the wire are mapped (no status → 1000, abnormal → 1011).
        Side::Upstream(Ending::Closed(frame)) => {
            report.upstream_close = frame.as_ref().map(|f| u16::from(f.code));
            let mapped = match frame {
                None => close_frame(CloseCode::Normal, ""),
                Some(frame) => wire_safe(frame),
            };
            let _ = client_tx.send(Message::Close(Some(mapped))).await;
            let _ = upstream_tx.close().await;
            report.client_close = await_close(&mut client_rx).await;
        }
        Side::Upstream(Ending::ReadFailed(_))
        | Side::Upstream(Ending::Eof)
        | Side::Client(Ending::WriteFailed) => {
            report.proxy_close = Some(1011);
            let _ = client_tx
                .send(Message::Close(Some(close_frame(
                    CloseCode::Error,
                    ABNORMAL_UPSTREAM_REASON,
                ))))
                .await;
            report.client_close = await_close(&mut client_rx).await;
        }
    }
    report
}

enum Side {
    Client(Ending),
    Upstream(Ending),
}

/// Waits (bounded) for the peer's close frame after we sent ours, discarding data.
async fn await_close<R>(rx: &mut R) -> Option<u16>
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let wait = async {
        while let Some(Ok(message)) = rx.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    };
    tokio::time::timeout(CLOSE_GRACE, wait).await.ok().flatten()
}

/// 1005, 1006 and 1015 describe a connection, never travel in a frame.
fn wire_safe(frame: CloseFrame) -> CloseFrame {
    match u16::from(frame.code) {
        1005 => close_frame(CloseCode::Normal, ""),
        1006 | 1015 => close_frame(CloseCode::Error, ABNORMAL_UPSTREAM_REASON),
        _ => frame,
    }
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }
}

/// The close code for a client that broke the protocol or the size limit; `None` when the
/// connection itself failed (nothing can be sent).
fn client_error_close(error: &WsError) -> Option<CloseCode> {
    match error {
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        _ => None,
    }
}

fn client_error_reason(error: &WsError) -> String {
    let mut reason = error.to_string();
    // A close reason must fit in a control frame (123 bytes).
    while reason.len() > 120 {
        reason.pop();
    }
    reason
}

/// The per-session log line.
struct Session {
    port: u16,
    path: String,
    upstream: String,
    started: Instant,
}

impl Session {
    fn log(&self, report: &SessionReport) {
        tracing::info!(
            target: "openai_stream_proxy::access",
            port = self.port,
            path = %self.path,
            upstream = %self.upstream.split('?').next().unwrap_or_default(),
            duration_ms = format_args!("{:.2}", self.started.elapsed().as_secs_f64() * 1000.0),
            frames_to_upstream = report.to_upstream.frames,
            bytes_to_upstream = report.to_upstream.bytes,
            frames_to_client = report.to_client.frames,
            bytes_to_client = report.to_client.bytes,
            client_close = report.client_close,
            upstream_close = report.upstream_close,
            proxy_close = report.proxy_close,
            "websocket session"
        );
    }
}
