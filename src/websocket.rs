//! WebSocket proxying: the upstream handshake first, then frames both ways with
//! backpressure, and close codes carried across faithfully. Knows no conversion.
//!
//! The upstream is connected before the client is upgraded (D19), so a refusal (401 bad key,
//! 404, 429 …) reaches the client as that HTTP response and a browser can tell why. The
//! client's `Sec-WebSocket-Protocol` offer is forwarded and the 101 names exactly what the
//! upstream selected (D20): browsers authenticate to the Realtime API through subprotocols.
//!
//! Each direction is its own loop that reads one message and waits until the other side has
//! accepted it before reading on, so a slow reader throttles the fast side. While a send is
//! pending the loop reads at most one message ahead, only to notice a sender that closes or
//! vanishes meanwhile: a session holds at most two messages per direction. Running the two
//! directions concurrently (rather than in one select loop) avoids the proxy deadlock where
//! both peers block writing to each other while the proxy waits on one of them.
//!
//! Backpressure must not hold a session for ever, though: a peer that takes no byte of a
//! message for `timeoutSeconds` has stopped reading, and ends the session (the other side
//! is told why). Writes to each leg are clocked ([`WriteClock`]), so a slow reader that
//! keeps taking bytes is never mistaken for a stalled one. An idle session, where nobody
//! sends, has no deadline (D13).
//!
//! Sessions run in their own tasks once upgraded, outside the HTTP server's connection
//! drain, so each service keeps a [`Sessions`] register: shutdown tells every open session
//! to close with 1001 on both legs and waits for them within the drain limit.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{error::ProtocolError, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::headers::{
    has_token, inject, strip_hop_by_hop, strip_response_hop_by_hop, WEBSOCKET_HANDSHAKE,
};
use crate::metrics::{BytesLabels, Metrics, ModeLabel, PortLabels};
use crate::progress::{ProgressClock, WriteClock};
use crate::service::{error_chain, upstream_failed, RuleContext};
use crate::upstream::UpstreamBody;

/// How long a close handshake may take once one side has closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a client the proxy closed for cause may take to hang up.
const LINGER: Duration = Duration::from_secs(2);

/// The close reason a client sees when the upstream vanished without a close frame.
pub const ABNORMAL_UPSTREAM_REASON: &str = "upstream websocket disconnected abnormally";

/// The close reason a client sees when the upstream took none of a message for
/// `timeoutSeconds`.
pub const STALLED_UPSTREAM_REASON: &str = "upstream stopped reading";

/// The close reason the upstream sees when the client took none of a message for
/// `timeoutSeconds`.
pub const STALLED_CLIENT_REASON: &str = "client stopped reading";

/// Whether `key` is the base64 of 16 bytes: 22 base64 characters and `==`. Anything else
/// is refused before an upstream session is opened for it.
fn is_handshake_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Handles an upgrade request: handshake upstream, then answer 101 and pump in the
/// background, or relay the upstream's refusal.
pub async fn handle(
    rule: &Arc<RuleContext>,
    sessions: &Sessions,
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
    if !is_handshake_key(client_key.as_bytes()) {
        return Err(ProxyError::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 §4.2.1)".into(),
        ));
    }
    if parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        // RFC 6455 §4.4: 426 naming the version spoken; the body is the error envelope every
        // other refusal of the proxy's own carries.
        let body = crate::error::envelope_bytes(
            "WebSocket upgrade without Sec-WebSocket-Version 13, the only version this proxy \
             speaks (RFC 6455 §4.4)",
            "invalid_request_error",
            serde_json::Value::Null,
            serde_json::Value::from("unsupported_websocket_version"),
        );
        let mut response = crate::error::json_response(StatusCode::UPGRADE_REQUIRED, body);
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
    let offers = subprotocol_offers(&parts.headers);
    let key = generate_key();
    let request = upstream_handshake(
        &connect_uri,
        &parts.headers,
        &rule.options.headers,
        &offers,
        &key,
    )?;
    // Named in errors and logs without the query, which may carry a credential.
    let target = format!("{}{}", rule.upstream.websocket_base(), parts.uri.path());
    let config = websocket_config(rule.options.max_websocket_message_bytes);
    let failed = |reason: String| ProxyError::UpstreamUnreachable {
        upstream: target.clone(),
        reason,
    };

    // The whole opening handshake (connect, TLS, request, 101, hand-over of the connection)
    // gets `timeoutSeconds`; the session after it has no deadline (D13).
    let handshake = async {
        let io = rule
            .client
            .connect_websocket(connect_uri.clone())
            .await
            .map_err(|e| upstream_failed(target.clone(), &*e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io.into_inner())
            .await
            .map_err(|e| failed(format!("WebSocket handshake failed: {}", error_chain(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream WebSocket handshake connection failed");
            }
        });
        let mut response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(format!("WebSocket handshake failed: {}", error_chain(&e))))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Handshake::Refused(response));
        }
        verify_upgrade(response.headers(), &key, &offers)
            .map_err(|reason| failed(format!("WebSocket handshake failed: {reason}")))?;
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| failed(format!("WebSocket handshake failed: {}", error_chain(&e))))?;
        Ok(Handshake::Upgraded(
            response.into_parts().0.headers,
            upgraded,
        ))
    };
    let (upstream_headers, upgraded) =
        match tokio::time::timeout(rule.options.timeout, handshake).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: target,
                    seconds: rule.options.timeout.as_secs(),
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Handshake::Refused(response))) => {
                return Ok(relay_refusal(response, rule.options.timeout));
            }
            Ok(Ok(Handshake::Upgraded(headers, upgraded))) => (headers, upgraded),
        };
    // Writes to either leg are clocked, so a side that stops reading is noticed (and one
    // that reads slowly is not mistaken for it).
    let stall = StallWatch {
        client: Arc::new(ProgressClock::new()),
        upstream: Arc::new(ProgressClock::new()),
        limit: rule.options.timeout,
    };
    let upstream = WebSocketStream::from_raw_socket(
        WriteClock::new(TokioIo::new(upgraded), stall.upstream.clone()),
        Role::Client,
        Some(config),
    )
    .await;

    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    // The upstream's own 101 headers (its subprotocol choice, cookies, request ids) travel
    // on, minus the per-connection handshake ones, which this leg answers itself.
    let mut upstream_headers = upstream_headers;
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

    let mut session = Session::open(rule.port, parts.uri.path().to_owned(), target, sessions);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = WebSocketStream::from_raw_socket(
                    WriteClock::new(TokioIo::new(upgraded), stall.client.clone()),
                    Role::Server,
                    Some(config),
                )
                .await;
                let report =
                    pump_until(&mut client, upstream, session.going_away(), Some(stall)).await;
                // A client that answered the proxy's close has sent everything it will send,
                // so only one that did not needs the linger.
                if report.proxy_close.is_some() && report.client_close.is_none() {
                    linger(client.get_mut()).await;
                }
                session.log(&report);
            }
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed; closing the upstream session");
                let mut upstream = upstream;
                let frame = close_frame(CloseCode::Away, "client upgrade failed");
                let _ = tokio::time::timeout(CLOSE_GRACE, upstream.close(Some(frame))).await;
            }
        }
    });
    Ok(response)
}

/// How the upstream answered the opening handshake.
enum Handshake {
    /// Any status but 101: relayed to the client as it is.
    Refused(Response<Incoming>),
    /// A valid 101: its headers and the connection, now speaking WebSocket.
    Upgraded(HeaderMap, Upgraded),
}

/// The client's subprotocol offers, in order; they may come on several header lines.
fn subprotocol_offers(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The upstream handshake request: the client's headers (credentials, `openai-beta`,
/// cookies, `origin`, subprotocol offer) minus hop-by-hop and per-connection handshake
/// headers, then the rule's injected headers, plus this leg's own handshake. The target is
/// in origin form (`/path?query`): the connection already goes to the upstream (or through
/// a CONNECT tunnel to it).
fn upstream_handshake(
    uri: &Uri,
    client_headers: &HeaderMap,
    injected: &[(HeaderName, HeaderValue)],
    offers: &[String],
    key: &str,
) -> Result<http::Request<Empty<Bytes>>, ProxyError> {
    let mut headers = client_headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in &WEBSOCKET_HANDSHAKE {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    // A GET upgrade has no body; framing headers from the client would describe none.
    headers.remove(header::CONTENT_LENGTH);
    inject(&mut headers, injected);
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
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut request = http::Request::builder()
        .method(http::Method::GET)
        .uri(target)
        .body(Empty::new())
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
        HeaderValue::from_str(key).map_err(|_| ProxyError::BadRequest("invalid key".into()))?,
    );
    Ok(request)
}

/// RFC 6455 §4.1: the checks a client makes on a 101 before speaking WebSocket. A 101
/// without a subprotocol although some were offered is accepted and relayed as it is:
/// whether that is acceptable is the client's decision (browsers refuse it, others don't).
fn verify_upgrade(headers: &HeaderMap, key: &str, offers: &[String]) -> Result<(), String> {
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("the upstream's 101 lacks `Upgrade: websocket`".into());
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the upstream's 101 lacks `Connection: upgrade`".into());
    }
    let expected = derive_accept_key(key.as_bytes());
    if headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return Err("the upstream's Sec-WebSocket-Accept does not match the key".into());
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err("the upstream selected an extension although none was offered".into());
    }
    let mut chosen = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    if let Some(protocol) = chosen.next() {
        let offered = protocol
            .to_str()
            .is_ok_and(|p| offers.iter().any(|o| o == p.trim()));
        if !offered || chosen.next().is_some() {
            return Err(format!(
                "the upstream selected subprotocol {protocol:?}, which the client did not offer"
            ));
        }
    }
    Ok(())
}

/// The upstream refused the upgrade with an HTTP response: the client gets that status,
/// headers and body instead of an upgrade (D19), so its own fallback logic can run. The
/// body streams through under the idle timeout, whatever its framing upstream.
fn relay_refusal(refusal: Response<Incoming>, idle: Duration) -> Response<ProxyBody> {
    let (mut parts, body) = refusal.into_parts();
    // The response strip: it also drops a Content-Length that Transfer-Encoding makes
    // stale, which would misframe the relayed body (RFC 9112 §6.3).
    strip_response_hop_by_hop(&mut parts.headers);
    for name in &WEBSOCKET_HANDSHAKE {
        parts.headers.remove(name);
    }
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::upstream(body.into(), idle))
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
    /// Messages forwarded (pings included, pongs not: each hop answers its own).
    pub frames: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
}

/// How a session ended, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// What the client sent that reached the upstream.
    pub to_upstream: Traffic,
    /// What the upstream sent that reached the client.
    pub to_client: Traffic,
    /// Close code the client sent, if it sent one.
    pub client_close: Option<u16>,
    /// Close code the upstream sent, if it sent one.
    pub upstream_close: Option<u16>,
    /// Close code the proxy itself sent the client (1011 for an abnormal upstream end,
    /// 1009 for an oversized message, 1002 for a protocol error).
    pub proxy_close: Option<u16>,
    /// The side that stopped reading (`client` or `upstream`), when that ended the session.
    pub stalled: Option<&'static str>,
}

/// Why a direction stopped.
enum Ending {
    Closed(Option<CloseFrame>),
    ReadFailed(WsError),
    Eof,
    WriteFailed,
    /// The other side took no bytes of a message for the stall limit.
    WriteStalled,
}

/// How a direction ended, and whether a message to the other side was still being sent
/// (that side is not reading, so a close frame could not get past the queued data).
struct Stop {
    ending: Ending,
    send_pending: bool,
}

/// One read from a leg: a message to forward, or the end of the direction.
enum Read {
    Forward(Message),
    End(Ending),
}

/// Reads the next message worth forwarding. Cancel-safe: a partly received message stays
/// in the library's buffer.
async fn read<R>(rx: &mut R) -> Read
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        return match rx.next().await {
            None => Read::End(Ending::Eof),
            Some(Err(e)) => Read::End(Ending::ReadFailed(e)),
            Some(Ok(Message::Close(frame))) => Read::End(Ending::Closed(frame)),
            Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => continue,
            Some(Ok(message)) => Read::Forward(message),
        };
    }
}

/// Forwards messages from `rx` to `tx` until a close, an error or the end. Pings are
/// forwarded, so the far peer sees its sender's keepalive, but the library answers every
/// ping on the hop it arrived on (it has no way to leave that to us), and the far peer's
/// pong is dropped (the sender would get two). So a ping proves only that the proxy is
/// alive: a peer that vanished without closing is noticed by the stall limit once a message
/// to it goes untaken, as in the reference (B105), not by the other side's pings.
///
/// While a send waits for a slow reader, `rx` is read at most one message ahead: that
/// bounds what the session holds, and still notices a sender that closes or vanishes while
/// the other side is stalled (otherwise nothing would read `rx` and the session would hang
/// for as long as the reader stalls). A close read ahead is returned once the pending
/// message has been sent whole, so the order on the wire stays the sender's and no message
/// is cut short (a reader that takes none of it for the stall limit ends the direction
/// instead); a sender that broke off is returned at once.
///
/// With `stall`, a message the other side takes no bytes of for the limit ends the
/// direction (`WriteStalled`): progress on `tx`'s connection, however slow, keeps it alive.
async fn forward<R, T>(
    rx: &mut R,
    tx: &mut T,
    traffic: &mut Traffic,
    stall: Option<(&ProgressClock, Duration)>,
) -> Stop
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    T: Sink<Message, Error = WsError> + Unpin,
{
    let mut ahead: Option<Message> = None;
    loop {
        let message = match ahead.take() {
            Some(message) => message,
            None => match read(rx).await {
                Read::Forward(message) => message,
                Read::End(ending) => {
                    return Stop {
                        ending,
                        send_pending: false,
                    }
                }
            },
        };
        traffic.frames += 1;
        traffic.bytes += message.len() as u64;
        let mut frames = futures_util::stream::iter(Fragments::of(message).map(Ok));
        let send = tx.send_all(&mut frames);
        tokio::pin!(send);
        // The first poll hands the message to the sink, before anything is read ahead, so
        // a close read ahead can never overtake it.
        match std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(_)) => {
                return Stop {
                    ending: Ending::WriteFailed,
                    send_pending: false,
                }
            }
            Poll::Pending => {}
        }
        // Watched only for a message whose send has to wait: most are taken at once, and a
        // timer per message would cost a timer-wheel entry each.
        let stalled = async {
            match stall {
                Some((clock, limit)) => clock.still_for(limit, tokio::time::Instant::now()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stalled);
        // The sender's close, read ahead: the message in flight is finished first (a large
        // one is still partly in `frames`), so the other side gets it whole before the
        // close. Only a receiver that stalls meanwhile loses it.
        let mut ended: Option<Ending> = None;
        loop {
            tokio::select! {
                biased;
                sent = &mut send => {
                    if sent.is_err() {
                        return Stop { ending: Ending::WriteFailed, send_pending: false };
                    }
                    match ended.take() {
                        Some(ending) => return Stop { ending, send_pending: false },
                        None => break,
                    }
                }
                next = read(rx), if ahead.is_none() && ended.is_none() => match next {
                    Read::Forward(message) => ahead = Some(message),
                    Read::End(ending @ Ending::Closed(_)) => ended = Some(ending),
                    // A sender that broke off gets no goodbye to honour: the receiver may
                    // be stalled, and dropping is the prompt way out.
                    Read::End(ending) => return Stop { ending, send_pending: true },
                },
                () = &mut stalled => {
                    return Stop { ending: Ending::WriteStalled, send_pending: true };
                }
            }
        }
    }
}

/// Data messages above this size go out as frames of this size. tungstenite hands over
/// whole messages, so a message its sender split into many frames would otherwise leave as
/// one frame as large as the message, which a receiver with a frame limit below its message
/// limit (tungstenite's own defaults: 16 MiB and 64 MiB) refuses, though it takes the same
/// message fragmented (D20).
const FRAGMENT_BYTES: usize = 1 << 20;

/// The frames one message is sent as: itself, or above [`FRAGMENT_BYTES`] a first frame of
/// its type and continuation frames, the last one final. Text is split at any byte: UTF-8
/// is checked over the whole message, not per frame (RFC 6455 §5.6).
enum Fragments {
    Whole(Option<Message>),
    Split { rest: Bytes, opcode: OpCode },
}

impl Fragments {
    fn of(message: Message) -> Fragments {
        let opcode = match &message {
            Message::Text(_) => OpCode::Data(OpData::Text),
            Message::Binary(_) => OpCode::Data(OpData::Binary),
            _ => return Fragments::Whole(Some(message)),
        };
        if message.len() <= FRAGMENT_BYTES {
            return Fragments::Whole(Some(message));
        }
        Fragments::Split {
            rest: message.into_data(),
            opcode,
        }
    }
}

impl Iterator for Fragments {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        match self {
            Fragments::Whole(message) => message.take(),
            Fragments::Split { rest, opcode } => {
                if rest.is_empty() {
                    return None;
                }
                let piece = rest.split_to(rest.len().min(FRAGMENT_BYTES));
                let frame = Frame::message(piece, *opcode, rest.is_empty());
                *opcode = OpCode::Data(OpData::Continue);
                Some(Message::Frame(frame))
            }
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
    pump_until(client, upstream, std::future::pending(), None).await
}

/// How a session notices a side that stopped reading: each leg's [`WriteClock`], and the
/// longest a message to a leg may wait while that leg's connection takes no byte.
#[derive(Debug, Clone)]
pub struct StallWatch {
    /// Touched by writes to the client's connection.
    pub client: Arc<ProgressClock>,
    /// Touched by writes to the upstream's connection.
    pub upstream: Arc<ProgressClock>,
    /// The rule's `timeoutSeconds`.
    pub limit: Duration,
}

/// As [`pump`], but when `going_away` resolves (the proxy is shutting down) both legs are
/// closed with 1001 and the session ends once both answered, or after `CLOSE_GRACE` (5 s).
///
/// With `stall`, a side that takes no bytes of a message for its limit ends the session:
/// it is dropped (a close frame cannot get past the queued data), and the other side is
/// told why, the client with 1011 for a stalled upstream, the upstream with 1001 for a
/// stalled client. Without it, backpressure holds the session for as long as the stall.
pub async fn pump_until<C, U>(
    client: C,
    upstream: U,
    going_away: impl std::future::Future<Output = ()>,
    stall: Option<StallWatch>,
) -> SessionReport
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let mut report = SessionReport::default();
    let (mut up, mut down) = (Traffic::default(), Traffic::default());

    let ended = {
        let to_upstream = forward(
            &mut client_rx,
            &mut upstream_tx,
            &mut up,
            stall.as_ref().map(|s| (&*s.upstream, s.limit)),
        );
        let to_client = forward(
            &mut upstream_rx,
            &mut client_tx,
            &mut down,
            stall.as_ref().map(|s| (&*s.client, s.limit)),
        );
        tokio::pin!(to_upstream, to_client, going_away);
        tokio::select! {
            stop = &mut to_upstream => Side::Client(stop),
            stop = &mut to_client => Side::Upstream(stop),
            () = &mut going_away => Side::Shutdown,
        }
    };
    report.to_upstream = up;
    report.to_client = down;
    // A close frame waits behind any message still being written to its leg: it gets there
    // as long as that leg keeps taking bytes (see `send_close`).
    let client_progress = stall.as_ref().map(|s| &*s.client);
    let upstream_progress = stall.as_ref().map(|s| &*s.upstream);

    match ended {
        Side::Shutdown => {
            let away = close_frame(CloseCode::Away, GOING_AWAY_REASON);
            report.proxy_close = Some(u16::from(CloseCode::Away));
            // Both legs at once: each gets the close grace, not the sum of both.
            let (client_close, upstream_close) = tokio::join!(
                async {
                    if send_close(&mut client_tx, away.clone(), client_progress).await {
                        await_close(&mut client_rx).await
                    } else {
                        None
                    }
                },
                async {
                    if send_close(&mut upstream_tx, away.clone(), upstream_progress).await {
                        await_close(&mut upstream_rx).await
                    } else {
                        None
                    }
                },
            );
            report.client_close = client_close;
            report.upstream_close = upstream_close;
        }
        // A client close (code and reason) goes upstream as it is (D21); the upstream's
        // answer completes both handshakes. A close without a status goes on as 1000
        // without a reason, as an upstream one does towards the client, so each leg sees
        // an explicit normal close. The library has already turned codes that must not be
        // on the wire (1005, 1006, 1015, reserved ranges) into 1002 when it read them.
        Side::Client(Stop {
            ending: Ending::Closed(frame),
            ..
        }) => {
            report.client_close = frame.as_ref().map(|f| u16::from(f.code));
            let frame = frame.unwrap_or_else(|| close_frame(CloseCode::Normal, ""));
            if send_close(&mut upstream_tx, frame, upstream_progress).await {
                report.upstream_close = await_close(&mut upstream_rx).await;
            }
            let _ = tokio::time::timeout(CLOSE_GRACE, client_tx.close()).await;
        }
        Side::Client(Stop {
            ending: Ending::ReadFailed(error),
            send_pending,
        }) => {
            if let Some(code) = client_error_close(&error) {
                report.proxy_close = Some(u16::from(code));
                let reason = client_error_reason(&error);
                let _ =
                    send_close(&mut client_tx, close_frame(code, &reason), client_progress).await;
            }
            // A stalled upstream reads nothing: dropping the connection is the only way
            // to end its session promptly.
            if !send_pending {
                let away = close_frame(CloseCode::Away, "client connection ended");
                if send_close(&mut upstream_tx, away, upstream_progress).await {
                    report.upstream_close = await_close(&mut upstream_rx).await;
                }
            }
        }
        Side::Client(Stop {
            ending: Ending::Eof,
            send_pending,
        }) => {
            if !send_pending {
                let away = close_frame(CloseCode::Away, "client went away");
                if send_close(&mut upstream_tx, away, upstream_progress).await {
                    report.upstream_close = await_close(&mut upstream_rx).await;
                }
            }
        }
        // The client stopped reading: the upstream is told, the client dropped.
        Side::Upstream(Stop {
            ending: Ending::WriteStalled,
            ..
        }) => {
            let away = close_frame(CloseCode::Away, STALLED_CLIENT_REASON);
            report.stalled = Some("client");
            if send_close(&mut upstream_tx, away, upstream_progress).await {
                report.upstream_close = await_close(&mut upstream_rx).await;
            }
        }
        // The upstream stopped reading: the client is told, the upstream dropped.
        Side::Client(Stop {
            ending: Ending::WriteStalled,
            ..
        }) => {
            report.proxy_close = Some(1011);
            report.stalled = Some("upstream");
            let stalled = close_frame(CloseCode::Error, STALLED_UPSTREAM_REASON);
            if send_close(&mut client_tx, stalled, client_progress).await {
                report.client_close = await_close(&mut client_rx).await;
            }
        }
        Side::Upstream(Stop {
            ending: Ending::WriteFailed,
            ..
        }) => {
            let away = close_frame(CloseCode::Away, "client went away");
            if send_close(&mut upstream_tx, away, upstream_progress).await {
                report.upstream_close = await_close(&mut upstream_rx).await;
            }
        }
        // The upstream's close goes to the client with its code and reason; no status
        // becomes 1000 without a reason (the library turned unsendable codes into 1002).
        Side::Upstream(Stop {
            ending: Ending::Closed(frame),
            ..
        }) => {
            report.upstream_close = frame.as_ref().map(|f| u16::from(f.code));
            let frame = frame.unwrap_or_else(|| close_frame(CloseCode::Normal, ""));
            let _ = send_close(&mut client_tx, frame, client_progress).await;
            let _ = tokio::time::timeout(CLOSE_GRACE, upstream_tx.close()).await;
            report.client_close = await_close(&mut client_rx).await;
        }
        // An upstream that broke the protocol or the size cap is told why (best effort).
        // An oversized message closes the client with 1009 too (D20), the reason saying it
        // was the upstream's; anything else is an abnormal end for the client (1011).
        Side::Upstream(Stop {
            ending: Ending::ReadFailed(error),
            ..
        }) if client_error_close(&error).is_some() => {
            let code = client_error_close(&error).unwrap_or(CloseCode::Error);
            let reason = short_reason(format!("upstream {error}"));
            let _ = send_close(
                &mut upstream_tx,
                close_frame(code, &reason),
                upstream_progress,
            )
            .await;
            let to_client = if code == CloseCode::Size {
                close_frame(CloseCode::Size, &reason)
            } else {
                close_frame(CloseCode::Error, ABNORMAL_UPSTREAM_REASON)
            };
            report.proxy_close = Some(u16::from(to_client.code));
            if send_close(&mut client_tx, to_client, client_progress).await {
                report.client_close = await_close(&mut client_rx).await;
            }
        }
        Side::Upstream(Stop {
            ending: Ending::ReadFailed(_) | Ending::Eof,
            ..
        })
        | Side::Client(Stop {
            ending: Ending::WriteFailed,
            ..
        }) => {
            report.proxy_close = Some(1011);
            let abnormal = close_frame(CloseCode::Error, ABNORMAL_UPSTREAM_REASON);
            if send_close(&mut client_tx, abnormal, client_progress).await {
                report.client_close = await_close(&mut client_rx).await;
            }
        }
    }
    report
}

enum Side {
    Client(Stop),
    Upstream(Stop),
    Shutdown,
}

/// The close reason both legs see when the proxy shuts down.
pub const GOING_AWAY_REASON: &str = "proxy shutting down";

/// Sends a close frame, giving up once the peer has taken no byte for [`CLOSE_GRACE`]: a
/// peer that reads nothing must not hold the session (and a shutdown) open. The frame may
/// wait behind the rest of a large message read before it; with the leg's `progress`
/// clock, a slow peer that keeps reading gets that message and the close whole, however
/// long it takes (without one, the grace counts from the start).
/// Returns whether it went out (only then is an answer worth waiting for).
async fn send_close<T>(tx: &mut T, frame: CloseFrame, progress: Option<&ProgressClock>) -> bool
where
    T: Sink<Message, Error = WsError> + Unpin,
{
    let send = tx.send(Message::Close(Some(frame)));
    match progress {
        Some(clock) => tokio::select! {
            biased;
            sent = send => sent.is_ok(),
            () = clock.still_for(CLOSE_GRACE, tokio::time::Instant::now()) => false,
        },
        None => matches!(tokio::time::timeout(CLOSE_GRACE, send).await, Ok(Ok(()))),
    }
}

/// After the proxy closed a client for cause (oversized or malformed input, upstream gone),
/// the client may still be sending. Closing the socket with unread data would make the
/// kernel answer with a reset that can destroy the close frame before the client reads it,
/// so half-close and discard input until the client hangs up (bounded), as HTTP servers do.
async fn linger<S>(io: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 8192];
        while let Ok(1..) = io.read(&mut sink).await {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
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
        // TCP closed without a close frame: there is nobody left to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        _ => None,
    }
}

fn client_error_reason(error: &WsError) -> String {
    short_reason(error.to_string())
}

/// A close reason must fit in a control frame (125 bytes with the code).
fn short_reason(mut reason: String) -> String {
    while reason.len() > 120 {
        reason.pop();
    }
    reason
}

/// The open WebSocket sessions of one service. Sessions outlive the HTTP connection they
/// were upgraded from, so the server's connection drain does not see them; this register
/// lets shutdown ask each of them to close (1001 to both legs) and wait until they have.
/// A reload leaves them alone: a session keeps the rule it was opened with.
///
/// Cheap to clone; clones share the register. Each session holds a receiver of the
/// going-away flag, so the number of receivers is the number of open sessions.
#[derive(Debug, Clone)]
pub struct Sessions {
    going_away: Arc<watch::Sender<bool>>,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            going_away: Arc::new(watch::channel(false).0),
        }
    }
}

impl Sessions {
    /// Sessions currently open (from the upstream's 101 until the session task ends).
    pub fn open(&self) -> usize {
        self.going_away.receiver_count()
    }

    /// Asks every open session, and any opened from now on, to close with 1001.
    pub fn close_all(&self) {
        self.going_away.send_replace(true);
    }

    /// Resolves once no session is open.
    pub async fn all_closed(&self) {
        self.going_away.closed().await
    }
}

/// An open session: counted in the open-sessions gauge and in its service's [`Sessions`]
/// from the upgrade until it is dropped (however the session task ends), and logged with
/// its traffic.
struct Session {
    port: u16,
    path: String,
    upstream: String,
    started: Instant,
    going_away: watch::Receiver<bool>,
}

impl Session {
    fn open(port: u16, path: String, upstream: String, sessions: &Sessions) -> Session {
        Metrics::global()
            .websocket_sessions
            .get_or_create(&PortLabels { port })
            .inc();
        Session {
            port,
            path,
            upstream,
            started: Instant::now(),
            going_away: sessions.going_away.subscribe(),
        }
    }

    /// Resolves when the proxy shuts down (at once if it already is).
    async fn going_away(&mut self) {
        // An error means the register is gone, i.e. no one can ask any more.
        if self.going_away.wait_for(|away| *away).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The per-session log line and its byte counters.
    fn log(&self, report: &SessionReport) {
        let metrics = Metrics::global();
        let traffic = [
            ("to_upstream", report.to_upstream.bytes),
            ("to_client", report.to_client.bytes),
        ];
        for (direction, bytes) in traffic {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    port: self.port,
                    mode: ModeLabel::websocket,
                    direction,
                })
                .inc_by(bytes);
        }
        tracing::info!(
            target: "openai_stream_proxy::access",
            port = self.port,
            path = %self.path,
            upstream = %self.upstream,
            duration_ms = format_args!("{:.2}", self.started.elapsed().as_secs_f64() * 1000.0),
            frames_to_upstream = report.to_upstream.frames,
            bytes_to_upstream = report.to_upstream.bytes,
            frames_to_client = report.to_client.frames,
            bytes_to_client = report.to_client.bytes,
            client_close = report.client_close,
            upstream_close = report.upstream_close,
            proxy_close = report.proxy_close,
            stalled = report.stalled,
            "websocket session"
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        Metrics::global()
            .websocket_sessions
            .get_or_create(&PortLabels { port: self.port })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_101(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
        );
        h
    }

    #[test]
    fn a_valid_101_passes_with_or_without_a_subprotocol() {
        let key = generate_key();
        let offers = vec!["realtime".to_owned(), "openai-beta.realtime-v1".to_owned()];
        assert_eq!(verify_upgrade(&upgrade_101(&key), &key, &offers), Ok(()));
        let mut chosen = upgrade_101(&key);
        chosen.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
        assert_eq!(verify_upgrade(&chosen, &key, &offers), Ok(()));
    }

    #[test]
    fn a_101_that_breaks_rfc_6455_is_refused() {
        let key = generate_key();
        let offers = vec!["realtime".to_owned()];

        let wrong_key = upgrade_101(&generate_key());
        assert!(verify_upgrade(&wrong_key, &key, &offers).is_err());

        let mut no_upgrade = upgrade_101(&key);
        no_upgrade.remove(header::UPGRADE);
        assert!(verify_upgrade(&no_upgrade, &key, &offers).is_err());

        let mut not_offered = upgrade_101(&key);
        not_offered.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.sk-x"),
        );
        assert!(verify_upgrade(&not_offered, &key, &offers).is_err());

        let mut extension = upgrade_101(&key);
        extension.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        assert!(verify_upgrade(&extension, &key, &offers).is_err());
    }

    #[test]
    fn the_upstream_handshake_is_origin_form_with_its_own_key_and_host() {
        let uri: Uri = "http://example.com:8080/base/v1/realtime?model=m"
            .parse()
            .unwrap();
        let mut client = HeaderMap::new();
        client.insert(header::HOST, HeaderValue::from_static("proxy:1"));
        client.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("client-key"),
        );
        client.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
        client.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-beta.realtime-v1"),
        );
        let offers = subprotocol_offers(&client);
        let request = upstream_handshake(&uri, &client, &[], &offers, "own-key").unwrap();
        assert_eq!(request.uri(), "/base/v1/realtime?model=m");
        let h = request.headers();
        assert_eq!(h[header::HOST], "example.com:8080");
        assert_eq!(h[header::SEC_WEBSOCKET_KEY], "own-key");
        assert_eq!(
            h[header::SEC_WEBSOCKET_PROTOCOL],
            "realtime, openai-beta.realtime-v1"
        );

        let default_port: Uri = "https://api.example.com:443/v1/realtime".parse().unwrap();
        let request = upstream_handshake(&default_port, &client, &[], &offers, "k").unwrap();
        assert_eq!(request.headers()[header::HOST], "api.example.com");
    }

    /// The upstream sends a message larger than the client's link moves in the close grace,
    /// then closes: the client, reading slowly but steadily, gets the whole message and then
    /// the upstream's close, not a cut-off frame after 5 s.
    #[tokio::test(start_paused = true)]
    async fn a_close_after_a_large_message_waits_for_a_slow_client_that_keeps_reading() {
        use tokio::io::AsyncReadExt;
        const MESSAGE: usize = 1 << 20;
        const READ: usize = 16 * 1024;
        let config = websocket_config(16 << 20);
        let (proxy_client_io, mut client_io) = tokio::io::duplex(READ);
        let (proxy_upstream_io, upstream_io) = tokio::io::duplex(64 * 1024);
        let stall = StallWatch {
            client: Arc::new(ProgressClock::new()),
            upstream: Arc::new(ProgressClock::new()),
            limit: Duration::from_secs(60),
        };
        let client_leg = WebSocketStream::from_raw_socket(
            WriteClock::new(proxy_client_io, stall.client.clone()),
            Role::Server,
            Some(config),
        )
        .await;
        let upstream_leg = WebSocketStream::from_raw_socket(
            WriteClock::new(proxy_upstream_io, stall.upstream.clone()),
            Role::Client,
            Some(config),
        )
        .await;
        let mut upstream =
            WebSocketStream::from_raw_socket(upstream_io, Role::Server, Some(config)).await;
        let upstream_task = tokio::spawn(async move {
            upstream
                .send(Message::binary(vec![7u8; MESSAGE]))
                .await
                .unwrap();
            let done = close_frame(CloseCode::Normal, "done");
            upstream.send(Message::Close(Some(done))).await.unwrap();
            while let Some(Ok(_)) = upstream.next().await {}
        });
        let session = tokio::spawn(pump_until(
            client_leg,
            upstream_leg,
            std::future::pending(),
            Some(stall),
        ));

        // 16 KiB a second: the message takes about 64 s to get through.
        let started = tokio::time::Instant::now();
        let mut received = Vec::new();
        let mut buffer = vec![0u8; READ];
        for _ in 0..1000 {
            match client_io.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            started.elapsed() > Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let mut replay = WebSocketStream::from_raw_socket(
            std::io::Cursor::new(received),
            Role::Client,
            Some(config),
        )
        .await;
        match replay.next().await {
            Some(Ok(Message::Binary(data))) => assert_eq!(data.len(), MESSAGE),
            other => panic!("expected the whole message, got {other:?}"),
        }
        match replay.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1000);
                assert_eq!(frame.reason.as_str(), "done");
            }
            other => panic!("expected the upstream's close, got {other:?}"),
        }
        let report = session.await.unwrap();
        assert_eq!(report.upstream_close, Some(1000));
        upstream_task.await.unwrap();
    }

    #[test]
    fn close_reasons_fit_in_a_control_frame() {
        let reason = short_reason("é".repeat(200));
        assert!(reason.len() <= 120);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
