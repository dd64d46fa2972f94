//! Fault injection (issue "Reliability and security", upstream part and client
//! disconnects): scriptable raw-socket upstreams that break in every way an HTTP peer can,
//! and the real binary's memory while gigabytes stream through it.
//!
//! Cases already covered elsewhere are not repeated: refused connections, silent upstreams,
//! passthrough bodies cut short (content-length or chunked reset) and client disconnects
//! while waiting or downloading are in `tests/passthrough.rs`; truncated and corrupt
//! conversion streams, `maxResponseBytes` on a finite stream and upstream silence are in
//! `tests/convert.rs`.

// The `/proc` readers and the tests using them are Linux-only; elsewhere some helpers are
// unused.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

// ---------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------

const CHAT: &str = "/v1/chat/completions";
const CHAT_BODY: &str = "{\"model\":\"m\",\"messages\":[]}";

/// One complete Chat Completions stream.
const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// Resets the connection (RST instead of FIN) when dropped.
fn reset_on_drop(stream: &TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// A chunk in HTTP/1.1 chunked framing.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// What a client got: the status and whether the body ended cleanly, with its bytes.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Result<Bytes, String>,
}

async fn get_or_post(url: &str, convert: bool) -> Got {
    let request = if convert {
        post_json(url, CHAT_BODY)
    } else {
        Request::get(url).body(Full::default()).unwrap()
    };
    let response = tokio::time::timeout(WAIT, client().request(request))
        .await
        .expect("no response head")
        .expect("client error before the response head");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body hung")
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Got {
        status,
        headers,
        body,
    }
}

/// The error envelope's type, asserting the response is a complete 502 or 504 envelope.
fn gateway_error(got: &Got, what: &str) -> String {
    assert!(
        got.status == 502 || got.status == 504,
        "{what}: status {} body {:?}",
        got.status,
        got.body
    );
    let body = got.body.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
    envelope(body).0
}

/// What upstream scripts saw, shared with the test: connections opened, response heads sent,
/// connections the proxy closed, request-body bytes read; `changed` wakes waiters.
#[derive(Default)]
struct Watch {
    connections: AtomicUsize,
    /// Response heads an upstream script has sent.
    answered: AtomicUsize,
    closed: AtomicUsize,
    body_bytes: AtomicU64,
    changed: Notify,
}

impl Watch {
    fn event(&self) {
        self.changed.notify_waiters();
    }

    /// Waits until `pred` holds, bounded by `limit`.
    async fn until(&self, limit: Duration, what: &str, pred: impl Fn(&Watch) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(self) {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                panic!(
                    "{what} within {limit:?} (connections {}, closed {}, body bytes {})",
                    self.connections.load(Ordering::SeqCst),
                    self.closed.load(Ordering::SeqCst),
                    self.body_bytes.load(Ordering::SeqCst)
                );
            }
        }
    }
}

/// Reads from `stream` until EOF or error, then counts a close.
async fn until_closed(stream: &mut TcpStream, watch: &Watch, limit: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                watch.closed.fetch_add(1, Ordering::SeqCst);
                watch.event();
                return;
            }
            Ok(Ok(n)) => {
                watch.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
                watch.event();
            }
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The upstream breaks before or while sending its head.
// ---------------------------------------------------------------------------------------

/// Half a response head and then a reset or a close: a 502, at once, in both modes.
#[tokio::test]
async fn an_upstream_that_breaks_off_mid_head_is_502() {
    for (name, reset) in [("reset", true), ("close", false)] {
        let upstream = RawUpstream::start(move |mut stream| async move {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-partial: ab")
                .await;
            let _ = stream.flush().await;
            if reset {
                reset_on_drop(&stream);
            }
        })
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        for convert in [false, true] {
            let started = Instant::now();
            let got = get_or_post(&proxy.url(CHAT), convert).await;
            let what = format!("{name}, convert={convert}");
            assert_eq!(got.status, 502, "{what}: {got:?}");
            assert_eq!(gateway_error(&got, &what), "upstream_error");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{what}: waited for a timeout"
            );
        }
    }
}

/// A connect that gets no answer (a SYN dropped by a firewall; here a full accept queue)
/// is a timeout, so 504 like a head that does not come (D13), whichever limit ran out:
/// the client's connect timeout here, the OS's (about two minutes) in the daemon. It was
/// 502 `upstream_error` before, so the same fault gave 502 or 504 by `timeoutSeconds`.
/// Every path that connects: the plain-HTTP pool (passthrough and conversion), the HTTPS
/// client, a WebSocket handshake, and a tunnel through an `HTTPS_PROXY` that does not answer.
#[tokio::test]
async fn a_connect_that_times_out_is_504_in_every_mode() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let addr = full.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            held.push(stream);
        }
    }
    let client = |proxy: Option<&str>| {
        let proxy = proxy.map(|url| {
            Arc::new(
                hyper_util::client::proxy::matcher::Matcher::builder()
                    .https(url.to_owned())
                    .build(),
            )
        });
        openai_stream_proxy::UpstreamClient::new(openai_stream_proxy::ClientOptions {
            proxy,
            roots: Arc::new(rustls::RootCertStore::empty()),
            connect_timeout: Some(Duration::from_millis(300)),
        })
        .unwrap()
    };
    let proxy_url = format!("http://{addr}");
    let cases = [
        ("http, passthrough", format!("http://{addr}"), None, "get"),
        (
            "http, conversion",
            format!("http://{addr}"),
            None,
            "convert",
        ),
        ("https", format!("https://{addr}"), None, "get"),
        ("websocket", format!("http://{addr}"), None, "upgrade"),
        (
            "https through a proxy",
            "https://upstream.test".to_owned(),
            Some(proxy_url.as_str()),
            "get",
        ),
    ];
    let proxy_used = |case: &str| case.contains("proxy");
    for (case, upstream, proxy, kind) in cases {
        let proxy =
            start_proxy_with_client(&upstream, options(), client(proxy), Duration::from_secs(5))
                .await;
        let got = match kind {
            "upgrade" => {
                let request = Request::get(proxy.url("/v1/realtime"))
                    .header("connection", "Upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .body(Full::default())
                    .unwrap();
                let (parts, body) = send(request).await;
                Got {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: Ok(body),
                }
            }
            kind => get_or_post(&proxy.url(CHAT), kind == "convert").await,
        };
        assert_eq!(got.status, 504, "{case}: {:?}", got.body);
        assert_eq!(gateway_error(&got, case), "upstream_timeout", "{case}");
        let body = got.body.unwrap();
        let message = String::from_utf8_lossy(&body);
        // The cause, from the error's chain: the connect's own limit, or the tunnel's.
        let cause = if proxy_used(case) {
            "tunnel through proxy"
        } else {
            "connect"
        };
        assert!(message.contains(cause), "{case}: {message}");
    }
    drop(held);
}

/// Anything that is not an HTTP/1.1 response head is a 502 as soon as it arrives: the
/// upstream keeps the connection open, so the answer cannot be the close or a timeout.
#[tokio::test]
async fn an_upstream_answering_garbage_is_502_at_once() {
    let answers: [(&str, &[u8]); 7] = [
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
        (
            "binary bytes",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff\r\n\r\n",
        ),
        ("a non-numeric status", b"HTTP/1.1 abc OK\r\n\r\n"),
        (
            "a header line without a colon",
            b"HTTP/1.1 200 OK\r\nnot a header\r\n\r\n",
        ),
        (
            "an unknown version",
            b"HTTP/3.7 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        ("an HTTP/0.9 body", b"{\"choices\":[]}\n\n\n\n"),
        (
            "an invalid content-length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 12ab\r\n\r\n",
        ),
    ];
    for (name, answer) in answers {
        let upstream = RawUpstream::start(move |mut stream| async move {
            let _ = read_head(&mut stream).await;
            let _ = stream.write_all(answer).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        })
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        for convert in [false, true] {
            let started = Instant::now();
            let got = get_or_post(&proxy.url(CHAT), convert).await;
            let what = format!("{name}, convert={convert}");
            assert_eq!(got.status, 502, "{what}: {got:?}");
            assert_eq!(gateway_error(&got, &what), "upstream_error");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{what}: waited for a timeout"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Truncated bodies, in every mode.
// ---------------------------------------------------------------------------------------

/// How an upstream body is cut.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// `content-length` larger than what is sent, then FIN.
    ShortLength,
    /// Chunked, then FIN without the last chunk.
    ChunkedClose,
    /// Chunked, then RST.
    ChunkedReset,
}

/// An upstream that answers every request with `status`, `content_type` (none when empty),
/// the framing of `cut` and the first half of `body`, then cuts it.
async fn cutting_upstream(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    cut: Cut,
) -> RawUpstream {
    let body = Arc::new(body);
    RawUpstream::start(move |mut stream| {
        let body = body.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let half = &body[..body.len() / 2];
            let head = if content_type.is_empty() {
                format!("HTTP/1.1 {status} X\r\n")
            } else {
                format!("HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n")
            };
            let out = match cut {
                Cut::ShortLength => {
                    let mut out =
                        format!("{head}content-length: {}\r\n\r\n", body.len()).into_bytes();
                    out.extend_from_slice(half);
                    out
                }
                Cut::ChunkedClose | Cut::ChunkedReset => {
                    let mut out = format!("{head}transfer-encoding: chunked\r\n\r\n").into_bytes();
                    out.extend(chunk(half));
                    out
                }
            };
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
            if matches!(cut, Cut::ChunkedReset) {
                reset_on_drop(&stream);
            }
        }
    })
    .await
}

/// A truncated upstream body never reaches the client as a clean, complete response: a
/// relayed body is aborted (HTTP/1.1: no last chunk or fewer bytes than declared; HTTP/2:
/// RST_STREAM), a body the proxy reads first becomes a 502.
#[tokio::test]
async fn truncated_upstream_bodies_never_look_complete_in_any_mode() {
    let json =
        br#"{"id":"x","object":"list","data":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}"#.to_vec();
    let refusal = br#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":"stream_options","code":null}}"#.to_vec();
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for cut in [Cut::ShortLength, Cut::ChunkedClose, Cut::ChunkedReset] {
        // Passthrough over HTTP/2 downstream: the stream is reset, never ended.
        let upstream = cutting_upstream(200, "application/json", json.clone(), cut).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let response = tokio::time::timeout(
            WAIT,
            h2.request(
                Request::get(proxy.url("/v1/models"))
                    .body(Full::default())
                    .unwrap(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .unwrap();
        assert!(
            body.is_err(),
            "{cut:?}, HTTP/2 passthrough: the cut body ended cleanly"
        );
        // HTTP/1.1 passthrough, cut by a close without the last chunk (the content-length
        // and reset cuts are in tests/passthrough.rs).
        if matches!(cut, Cut::ChunkedClose) {
            let got = get_or_post(&proxy.url("/v1/models"), false).await;
            assert_eq!(got.status, 200);
            assert!(
                got.body.is_err(),
                "HTTP/1.1 passthrough: the cut body ended cleanly"
            );
        }

        // Conversion, event stream cut mid-event: 502.
        let upstream = cutting_upstream(
            200,
            "text/event-stream",
            CHAT_STREAM.as_bytes().to_vec(),
            cut,
        )
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let got = get_or_post(&proxy.url(CHAT), true).await;
        assert_eq!(got.status, 502, "{cut:?}, converted stream: {got:?}");
        assert_eq!(gateway_error(&got, "converted stream"), "upstream_error");

        // Conversion, the upstream answers JSON instead of a stream (relayed as it comes).
        let upstream = cutting_upstream(200, "application/json", json.clone(), cut).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let got = get_or_post(&proxy.url(CHAT), true).await;
        assert!(
            got.body.is_err() || got.status == 502,
            "{cut:?}, relayed JSON ended cleanly: {got:?}"
        );

        // Conversion, an event stream without content-type (sniffed) cut before the
        // proxy could tell: 502 or an aborted body.
        let upstream = cutting_upstream(200, "", json.clone(), cut).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let got = get_or_post(&proxy.url(CHAT), true).await;
        assert!(
            got.body.is_err() || got.status == 502,
            "{cut:?}, sniffed body ended cleanly: {got:?}"
        );

        // Conversion, a 400 read whole to look for a refusal of the streaming form.
        let upstream = cutting_upstream(400, "application/json", refusal.clone(), cut).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let got = get_or_post(&proxy.url(CHAT), true).await;
        assert_eq!(got.status, 502, "{cut:?}, upstream 400 cut: {got:?}");
        assert_eq!(gateway_error(&got, "upstream 400"), "upstream_error");

        // Conversion with keep-alive committed (200 already sent): the cut JSON becomes an
        // error envelope in the body, never the partial JSON. The framing of the cut does
        // not matter here, so it is tried once with a close and once with a reset.
        if matches!(cut, Cut::ChunkedClose) {
            continue;
        }
        let upstream = RawUpstream::start(move |mut stream| async move {
            let _ = read_head(&mut stream).await;
            // Past the keep-alive interval, so the 200 is committed first.
            tokio::time::sleep(Duration::from_millis(800)).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":\"x\",")
                .await;
            if matches!(cut, Cut::ChunkedReset) {
                reset_on_drop(&stream);
            }
        })
        .await;
        let mut opts = options();
        opts.keep_alive = Some(Duration::from_millis(300));
        let proxy = start_proxy(&upstream.url(), opts).await;
        let got = get_or_post(&proxy.url(CHAT), true).await;
        assert_eq!(got.status, 200, "{cut:?}, keep-alive: not committed");
        let body = got.body.expect("keep-alive body aborted");
        assert!(
            body.starts_with(b" "),
            "{cut:?}, keep-alive: no space before the answer"
        );
        let (ty, _) = envelope(body.trim_ascii());
        assert_eq!(ty, "upstream_error", "{cut:?}, keep-alive");
    }
}

/// A compressed event stream cut inside the compressed data (the HTTP framing itself ends
/// cleanly): the decoder's unexpected end is a 502, not a shorter answer.
#[tokio::test]
async fn a_compressed_stream_cut_mid_member_is_502() {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(CHAT_STREAM.as_bytes()).unwrap();
    let gz = encoder.finish().unwrap();
    let cut = Arc::new(gz[..gz.len() - 12].to_vec());
    let upstream = RawUpstream::start(move |mut stream| {
        let cut = cut.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let mut out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                cut.len()
            )
            .into_bytes();
            out.extend_from_slice(&cut);
            let _ = stream.write_all(&out).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let got = get_or_post(&proxy.url(CHAT), true).await;
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(gateway_error(&got, "cut gzip"), "upstream_error");
}

// ---------------------------------------------------------------------------------------
// Duplicate, conflicting and oversized response headers.
// ---------------------------------------------------------------------------------------

/// An upstream answering every request on a connection with `answer`.
async fn answering(answer: &'static [u8]) -> RawUpstream {
    RawUpstream::start(move |mut stream| async move {
        for _ in 0..8 {
            let head = read_head(&mut stream).await;
            if head.is_empty() || stream.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn conflicting_and_oversized_response_heads_are_502() {
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many: &'static str =
        Box::leak(format!("HTTP/1.1 200 OK\r\n{many}content-length: 2\r\n\r\nok").into_boxed_str());
    let huge: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(1024 * 1024)
        )
        .into_boxed_str(),
    );
    let cases: [(&str, &'static [u8]); 4] = [
        (
            "two different content-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nokxyz",
        ),
        (
            "a list of two different content-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 5\r\n\r\nokxyz",
        ),
        ("200 header lines", many.as_bytes()),
        ("a 1 MiB header line", huge.as_bytes()),
    ];
    for (name, answer) in cases {
        let upstream = answering(answer).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        for convert in [false, true] {
            let got = get_or_post(&proxy.url(CHAT), convert).await;
            let what = format!("{name}, convert={convert}");
            assert_eq!(got.status, 502, "{what}: {got:?}");
            assert_eq!(gateway_error(&got, &what), "upstream_error");
        }
    }
    // Identical duplicates are one length (RFC 9110 §8.6), and the client gets one.
    let upstream =
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let got = get_or_post(&proxy.url("/v1/models"), false).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.as_deref().ok(), Some(&b"ok"[..]));
    let lengths: Vec<_> = got.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, ["2"]);
}

/// The same on the path that relays a large error answer to a converted request (read in
/// part to look inside it, then relayed with the rest).
#[tokio::test]
async fn a_content_length_list_on_a_large_error_to_a_conversion_is_one_value() {
    const SIZE: usize = 300_000;
    let answer: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {SIZE}, {SIZE}\r\n\r\n{}",
            "x".repeat(SIZE)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let upstream = answering(answer).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let got = get_or_post(&proxy.url(CHAT), true).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.body.as_ref().map(|b| b.len()).ok(), Some(SIZE));
    let lengths: Vec<_> = got.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, [SIZE.to_string().as_str()]);
}

/// A length sent as a list of equal values (`2, 2`) or on several lines is accepted, and
/// forwarded as one value, both ways (RFC 9110 §8.6): Node's and Go's parsers refuse the list, so relaying it
/// as it came would fail the message at the next hop.
#[tokio::test]
async fn a_content_length_list_is_forwarded_as_one_value_both_ways() {
    let upstream = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok").await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let got = raw_exchange(
        proxy.addr,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("\r\ncontent-length: 2\r\n"), "{text}");
    assert_eq!(text.matches("content-length").count(), 1, "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");

    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let upstream = RawUpstream::start(move |mut stream| {
        let heads_tx = heads_tx.clone();
        async move {
            let head = read_head(&mut stream).await;
            let mut body = [0u8; 5];
            let read = stream.read_exact(&mut body).await.is_ok();
            let _ = heads_tx.send(head);
            if read {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    // hyper's server refuses a request's length list outright (400); two equal lines it takes.
    let refused = raw_exchange(
        proxy.addr,
        b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 5\r\n\r\nhello",
    )
    .await;
    assert!(
        refused.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&refused)
    );
    for length in ["5\r\ncontent-length: 5", "5\r\nContent-Length:5"] {
        let request = format!(
            "POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\nconnection: close\r\n\r\nhello"
        );
        let got = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{length:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        let head = tokio::time::timeout(WAIT, heads.recv())
            .await
            .unwrap()
            .unwrap()
            .to_ascii_lowercase();
        assert!(
            head.contains("\r\ncontent-length: 5\r\n"),
            "{length:?}: {head}"
        );
        assert_eq!(
            head.matches("content-length").count(),
            1,
            "{length:?}: {head}"
        );
    }
}

/// RFC 9112 §6.3: with both Transfer-Encoding and Content-Length, Transfer-Encoding wins,
/// and "an intermediary that chooses to forward the message MUST first remove the received
/// Content-Length field". The proxy's HTTP client decodes the chunked body, but the relay
/// keeps the upstream's `content-length`: the client is told 3 bytes, gets "012" as a clean,
/// complete body, and the rest is silently dropped.
#[tokio::test]
async fn a_response_with_both_framings_is_relayed_by_its_transfer_encoding() {
    let upstream = answering(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let got = get_or_post(&proxy.url("/v1/models"), false).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body.as_deref().ok(),
        Some(&b"0123456789"[..]),
        "headers {:?}",
        got.headers
    );
    assert!(got.headers.get("content-length").is_none_or(|v| v == "10"));
}

/// Response-queue poisoning: an upstream that sends an unsolicited second response after
/// the first must not have it delivered as the answer to the next request that reuses the
/// pooled connection.
#[tokio::test]
async fn an_unsolicited_extra_response_never_answers_the_next_request() {
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let upstream = RawUpstream::start(move |mut stream| {
        let poisoner = counter.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
        for n in 1..=8 {
            let head = read_head(&mut stream).await;
            if head.is_empty() {
                return;
            }
            let answer = if poisoner && n == 1 {
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned".to_owned()
            } else {
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\ngenuine".to_owned()
            };
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let first = get_or_post(&proxy.url("/1"), false).await;
    assert_eq!(first.body.as_deref().ok(), Some(&b"first"[..]));
    for i in 2..=4 {
        let got = get_or_post(&proxy.url(&format!("/{i}")), false).await;
        assert_ne!(
            got.body.as_deref().ok(),
            Some(&b"poisoned"[..]),
            "request {i} got the unsolicited response"
        );
        assert_eq!(got.status, 200, "request {i}: {got:?}");
        assert_eq!(
            got.body.as_deref().ok(),
            Some(&b"genuine"[..]),
            "request {i}"
        );
    }
    // The poisoned connection was dropped, not reused.
    assert!(connections.load(Ordering::SeqCst) >= 2);
}

// ---------------------------------------------------------------------------------------
// Corrupt events during aggregation.
// ---------------------------------------------------------------------------------------

/// A Chat Completions chunk whose `content` is `text` (raw bytes, not escaped).
fn chat_event(content: &[u8], finish: Option<&str>) -> Vec<u8> {
    let mut out = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
    out.extend_from_slice(content);
    out.extend_from_slice(b"\"},\"finish_reason\":");
    out.extend_from_slice(
        finish
            .map_or("null".to_owned(), |f| format!("\"{f}\""))
            .as_bytes(),
    );
    out.extend_from_slice(b"}]}\n\n");
    out
}

/// An upstream sending `pieces` as separate chunks (each flushed), then the last chunk.
async fn chunked_upstream(pieces: Vec<Vec<u8>>) -> RawUpstream {
    let pieces = Arc::new(pieces);
    RawUpstream::start(move |mut stream| {
        let pieces = pieces.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            for piece in pieces.iter() {
                let _ = stream.write_all(&chunk(piece)).await;
                let _ = stream.flush().await;
                tokio::task::yield_now().await;
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        }
    })
    .await
}

#[tokio::test]
async fn invalid_utf8_or_json_inside_an_aggregated_event_is_502() {
    let done = b"data: [DONE]\n\n".to_vec();
    let responses_created = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n".to_vec();
    let cases: Vec<(&str, &str, Vec<Vec<u8>>)> = vec![
        (
            "chat: invalid UTF-8 inside content",
            CHAT,
            vec![chat_event(b"ok \xff\xfe bytes", None), chat_event(b"", Some("stop")), done.clone()],
        ),
        (
            "chat: an overlong UTF-8 encoding",
            CHAT,
            vec![chat_event(b"\xc0\xaf", Some("stop")), done.clone()],
        ),
        (
            "chat: a lone UTF-16 surrogate encoded as UTF-8",
            CHAT,
            vec![chat_event(b"\xed\xa0\x80", Some("stop")), done.clone()],
        ),
        (
            "chat: a JSON object cut in the middle",
            CHAT,
            vec![b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"\n\n".to_vec(), done.clone()],
        ),
        (
            "chat: a JSON array where an object belongs",
            CHAT,
            vec![b"data: [1,2,3]\n\n".to_vec(), done.clone()],
        ),
        (
            "responses: invalid UTF-8 inside a delta",
            "/v1/responses",
            vec![
                responses_created.clone(),
                b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"output_index\":0,\"content_index\":0,\"delta\":\"\xff\"}\n\n".to_vec(),
            ],
        ),
        (
            "responses: invalid UTF-8 in a member that is skipped",
            "/v1/responses",
            vec![
                responses_created.clone(),
                b"event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"x\":\"\xff\"}\n\n".to_vec(),
                b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"object\":\"response\",\"status\":\"completed\",\"output\":[]}}\n\n".to_vec(),
            ],
        ),
        (
            "chat: invalid UTF-8 in a member that is skipped",
            CHAT,
            vec![
                b"data: {\"id\":\"c1\",\"x\":\"\xff\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"}]}\n\n".to_vec(),
                done.clone(),
            ],
        ),
        (
            "responses: invalid JSON in the terminal event",
            "/v1/responses",
            vec![
                responses_created.clone(),
                b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\n\n".to_vec(),
            ],
        ),
    ];
    for (name, path, pieces) in cases {
        let upstream = chunked_upstream(pieces).await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        let got = send(post_json(&proxy.url(path), CHAT_BODY)).await;
        assert_eq!(got.0.status, 502, "{name}: {:?}", got.1);
        // The envelope itself is valid JSON (and so valid UTF-8), whatever the upstream sent.
        let (ty, _) = envelope(&got.1);
        assert_eq!(ty, "upstream_error", "{name}");
    }
}

/// The control for the case above: a multi-byte character split across two TCP chunks,
/// and across two events, is not invalid UTF-8.
#[tokio::test]
async fn a_character_split_across_chunks_is_reassembled() {
    let mut event = chat_event("naïve €".as_bytes(), None);
    let split = event.iter().position(|b| *b == 0xe2).unwrap() + 1; // inside '€'
    let tail = event.split_off(split);
    let upstream = chunked_upstream(vec![
        event,
        tail,
        chat_event("😀".as_bytes(), Some("stop")),
        b"data: [DONE]\n\n".to_vec(),
    ])
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, body) = send(post_json(&proxy.url(CHAT), CHAT_BODY)).await;
    assert_eq!(parts.status, 200, "{body:?}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "naïve €😀");
}

// ---------------------------------------------------------------------------------------
// Endless streams.
// ---------------------------------------------------------------------------------------

/// An upstream that streams `block` again and again (or once, for a gzip member) until
/// the proxy hangs up, recording the close.
async fn endless(block: Vec<u8>, gzip: bool, watch: Arc<Watch>) -> RawUpstream {
    let framed = Arc::new(chunk(&block));
    RawUpstream::start(move |mut stream| {
        let (watch, framed) = (watch.clone(), framed.clone());
        async move {
            watch.connections.fetch_add(1, Ordering::SeqCst);
            let _ = read_head(&mut stream).await;
            let encoding = if gzip { "content-encoding: gzip\r\n" } else { "" };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{encoding}transfer-encoding: chunked\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let (mut read_half, mut write_half) = stream.into_split();
            let writer = async {
                // Bounded: at most 4 GiB, far beyond any limit under test. A gzip member
                // cannot be repeated verbatim, so it is sent once.
                let rounds = if gzip { 1 } else { (4u64 << 30) / framed.len() as u64 };
                for _ in 0..rounds {
                    if write_half.write_all(&framed).await.is_err() {
                        break;
                    }
                }
                // Then hold the connection open, never ending the stream.
                tokio::time::sleep(WAIT).await;
            };
            let reader = async {
                let mut buf = [0u8; 1024];
                while let Ok(n) = read_half.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = writer => {}
                _ = reader => {
                    watch.closed.fetch_add(1, Ordering::SeqCst);
                    watch.event();
                }
            }
        }
    })
    .await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// `maxResponseBytes` stops an endless stream, however it is endless, and the upstream
/// connection is released (closed) rather than drained.
#[tokio::test]
async fn endless_streams_are_cut_at_max_response_bytes_and_the_upstream_released() {
    let event: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\n";
    let comment: &[u8] = b": keep-alive\n";
    let line: &[u8] = b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let cases: [(&str, Vec<u8>, bool); 4] = [
        ("endless events", event.repeat(400), false),
        ("endless comments", comment.repeat(4000), false),
        (
            "one endless data line",
            [line, &b"x".repeat(64 * 1024)].concat(),
            false,
        ),
        // 4 MiB of comments in a few kilobytes: the limit counts decoded bytes.
        ("a gzip bomb", gzip(&comment.repeat((4 << 20) / 13)), true),
    ];
    for (name, block, gzip) in cases {
        let watch = Arc::new(Watch::default());
        let upstream = endless(block, gzip, watch.clone()).await;
        let mut opts = options();
        opts.max_response_bytes = 1024 * 1024;
        let proxy = start_proxy(&upstream.url(), opts).await;
        let started = Instant::now();
        let (parts, body) = send(post_json(&proxy.url(CHAT), CHAT_BODY)).await;
        assert_eq!(
            parts.status,
            502,
            "{name}: {:?}",
            String::from_utf8_lossy(&body)
        );
        let (ty, message) = envelope(&body);
        assert_eq!(ty, "upstream_error", "{name}");
        assert!(message.contains("maxResponseBytes"), "{name}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: took {:?}",
            started.elapsed()
        );
        watch
            .until(
                Duration::from_secs(3),
                &format!("{name}: upstream connection not closed"),
                |w| w.closed.load(Ordering::SeqCst) == 1,
            )
            .await;
    }
}

// ---------------------------------------------------------------------------------------
// Client disconnects mid-upload.
// ---------------------------------------------------------------------------------------

/// An upstream that reads requests and their bodies (content-length or chunked, counted
/// but not kept) and records how each connection ended; it never answers.
async fn swallowing_upstream(watch: Arc<Watch>, complete: Arc<AtomicUsize>) -> RawUpstream {
    RawUpstream::start(move |mut stream| {
        let (watch, complete) = (watch.clone(), complete.clone());
        async move {
            watch.connections.fetch_add(1, Ordering::SeqCst);
            watch.event();
            let head = read_head(&mut stream).await.to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            let chunked = head.contains("transfer-encoding: chunked");
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            let mut tail = Vec::new();
            loop {
                match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        total += n as u64;
                        watch.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
                        if chunked {
                            tail.extend_from_slice(&buf[..n]);
                            let keep = tail.len().saturating_sub(5);
                            tail.drain(..keep);
                        }
                        let done = match length {
                            Some(length) => total >= length,
                            None => chunked && tail.ends_with(b"0\r\n\r\n"),
                        };
                        if done {
                            complete.fetch_add(1, Ordering::SeqCst);
                        }
                        watch.event();
                    }
                    Ok(_) => {
                        watch.closed.fetch_add(1, Ordering::SeqCst);
                        watch.event();
                        return;
                    }
                    Err(_) => return,
                }
            }
        }
    })
    .await
}

/// A client that leaves in the middle of its upload: the upstream request is aborted (its
/// connection closed before the body is complete), never completed with what arrived; on a
/// conversion path, where the proxy reads the body first, nothing is sent at all.
#[tokio::test]
async fn a_client_leaving_mid_upload_aborts_the_upstream_request() {
    let watch = Arc::new(Watch::default());
    let complete = Arc::new(AtomicUsize::new(0));
    let upstream = swallowing_upstream(watch.clone(), complete.clone()).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let megabyte = vec![b'u'; 1 << 20];
    let heads = [
        "POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 104857600\r\n\r\n".to_owned(),
        "POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
    ];
    for (i, head) in heads.iter().enumerate() {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let body = if head.contains("chunked") {
            chunk(&megabyte)
        } else {
            megabyte.clone()
        };
        stream.write_all(&body).await.unwrap();
        // The upstream is receiving the body: leave.
        watch
            .until(WAIT, "upload never reached the upstream", |w| {
                w.connections.load(Ordering::SeqCst) == i + 1
                    && w.body_bytes.load(Ordering::SeqCst) > 0
            })
            .await;
        drop(stream);
        watch
            .until(
                Duration::from_secs(3),
                "upstream connection still open after the client left",
                |w| w.closed.load(Ordering::SeqCst) == i + 1,
            )
            .await;
    }
    assert_eq!(
        complete.load(Ordering::SeqCst),
        0,
        "an aborted upload was completed upstream"
    );

    // A conversion candidate is read whole first: a client leaving half-way costs nothing
    // upstream.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":\"m\",\"messages\":[")
        .await
        .unwrap();
    drop(stream);
    // The proxy still serves, and that upload never produced an upstream connection.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /alive HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    watch
        .until(WAIT, "the next request did not arrive", |w| {
            w.connections.load(Ordering::SeqCst) == 3
        })
        .await;
    assert_eq!(watch.connections.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------
// The real binary: memory while gigabytes stream through, and everything freed after
// disconnects. Linux only: memory and descriptors are read from `/proc`.
// ---------------------------------------------------------------------------------------

#[cfg(target_os = "linux")]
/// `VmRSS` and `VmHWM` (peak RSS) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(target_os = "linux")]
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[cfg(target_os = "linux")]
const MIB: u64 = 1 << 20;
#[cfg(target_os = "linux")]
const GIB: u64 = 1 << 30;
#[cfg(target_os = "linux")]
/// The peak RSS the proxy may reach while 1 GiB bodies or a 256 MiB stream pass through.
const PEAK_LIMIT: u64 = 64 * MIB;

#[cfg(target_os = "linux")]
/// Writes `n` bytes of the block pattern: every byte of the i-th MiB is `i % 251`, so a
/// reader can check its position without keeping anything. One reused 1 MiB buffer.
async fn write_pattern(stream: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..n / MIB {
        buf.fill((i % 251) as u8);
        stream.write_all(&buf).await?;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
/// A response or request body read from a raw socket, de-chunked when it is chunked.
struct BodyReader {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    chunked: bool,
    /// Bytes left in the current chunk.
    remaining: usize,
}

#[cfg(target_os = "linux")]
impl BodyReader {
    fn new(stream: TcpStream, chunked: bool) -> BodyReader {
        BodyReader {
            stream,
            buf: Vec::with_capacity(256 * 1024),
            pos: 0,
            chunked,
            remaining: 0,
        }
    }

    /// Reads more from the socket into the buffer; false at EOF.
    async fn fill(&mut self) -> bool {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.reserve(128 * 1024);
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("stalled")
            .expect("read failed");
        n > 0
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return line;
            }
            assert!(self.fill().await, "closed inside a chunk size line");
        }
    }

    /// Up to `out.len()` body bytes; 0 at the end of the body.
    async fn read(&mut self, out: &mut [u8]) -> usize {
        if self.chunked && self.remaining == 0 {
            let size = self.line().await;
            self.remaining = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            if self.remaining == 0 {
                return 0;
            }
        }
        if self.pos == self.buf.len() && !self.fill().await {
            return 0;
        }
        let mut n = out.len().min(self.buf.len() - self.pos);
        if self.chunked {
            n = n.min(self.remaining);
        }
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.chunked {
            self.remaining -= n;
            if self.remaining == 0 {
                assert_eq!(self.line().await, "", "chunk data not followed by CRLF");
            }
        }
        n
    }
}

#[cfg(target_os = "linux")]
/// Reads the block pattern from offset `from` up to offset `to`, checking the first byte
/// of each read (and of each block a read crosses into) against its offset. Returns the
/// number of bytes read.
async fn read_pattern(body: &mut BodyReader, from: u64, to: u64) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = from;
    while total < to {
        let want = buf.len().min((to - total) as usize);
        let got = body.read(&mut buf[..want]).await;
        assert!(got > 0, "body ended at offset {total} of {to}");
        assert_eq!(
            buf[0],
            ((total / MIB) % 251) as u8,
            "wrong byte at offset {total}"
        );
        // Reads must not straddle a block boundary unchecked: split them at the boundary.
        let next_block = (total / MIB + 1) * MIB;
        if total + (got as u64) > next_block {
            let off = (next_block - total) as usize;
            assert_eq!(
                buf[off],
                ((next_block / MIB) % 251) as u8,
                "wrong byte at offset {next_block}"
            );
        }
        total += got as u64;
    }
    total - from
}

#[cfg(target_os = "linux")]
async fn daemon_for(upstream: &str, extra: &str) -> (daemon::Daemon, u16, daemon::TempDir) {
    let dir = daemon::TempDir::new("faults");
    let port = daemon::free_port();
    let config = format!(
        "{{\"timeoutSeconds\": 30{extra}, \"rules\": [{}]}}",
        daemon::rule(port, upstream)
    );
    let path = dir.write("config.json", &config);
    let proxy = daemon::start(&dir, &path, 1).await;
    (proxy, port, dir)
}

#[cfg(target_os = "linux")]
/// 1 GiB up and 1 GiB down through passthrough, generated and checked on the fly: the
/// proxy's peak RSS stays under 64 MiB.
#[tokio::test]
async fn gigabyte_bodies_stream_through_with_flat_memory() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let head = read_head(&mut stream).await;
        let mut stream = if head.starts_with("POST") {
            let mut body = BodyReader::new(stream, false);
            let received = read_pattern(&mut body, 0, GIB).await;
            let answer = format!("received {received}");
            let mut stream = body.stream;
            let _ = stream
                .write_all(format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{answer}", answer.len()).as_bytes())
                .await;
            stream
        } else {
            let _ = stream
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {GIB}\r\n\r\n").as_bytes())
                .await;
            if write_pattern(&mut stream, GIB).await.is_err() {
                return;
            }
            stream
        };
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    })
    .await;
    let (mut proxy, port, _dir) = daemon_for(&upstream.url(), "").await;
    let pid = proxy.pid();
    let (start_rss, _) = memory(pid);
    let started = Instant::now();

    // Upload.
    let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
    stream
        .write_all(format!("POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {GIB}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    write_pattern(&mut stream, GIB).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut answer = vec![0u8; format!("received {GIB}").len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), format!("received {GIB}"));
    let (_, peak_up) = memory(pid);
    let upload_time = started.elapsed();

    // Download.
    let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
    stream
        .write_all(b"GET /v1/files/big/content HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {GIB}")),
        "{head}"
    );
    let mut body = BodyReader::new(stream, false);
    assert_eq!(read_pattern(&mut body, 0, GIB).await, GIB);
    let (_, peak) = memory(pid);
    eprintln!(
        "1 GiB up in {upload_time:?}, down in {:?}; RSS at start {} MiB, peak after upload {} MiB, after download {} MiB",
        started.elapsed() - upload_time,
        start_rss / MIB,
        peak_up / MIB,
        peak / MIB
    );
    assert!(
        peak_up < PEAK_LIMIT,
        "peak RSS {} MiB during a 1 GiB upload",
        peak_up / MIB
    );
    assert!(
        peak < PEAK_LIMIT,
        "peak RSS {} MiB during a 1 GiB download",
        peak / MIB
    );
    proxy.stop().await;
}

#[cfg(target_os = "linux")]
/// A fast upstream streaming 256 MiB of SSE to a client that reads slowly: the proxy holds
/// back (the upstream cannot run far ahead of the reader) and its memory stays flat.
#[tokio::test]
async fn a_slow_reader_of_a_fast_event_stream_keeps_memory_flat() {
    const TOTAL: u64 = 256 * MIB;
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let upstream = RawUpstream::start(move |mut stream| {
        let written = counter.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            // 1 MiB chunks of the pattern, counted as they are written.
            let mut buf = chunk(&vec![0u8; MIB as usize]);
            let data = buf.len() - 2 - MIB as usize..buf.len() - 2;
            for i in 0..TOTAL / MIB {
                buf[data.clone()].fill((i % 251) as u8);
                if stream.write_all(&buf).await.is_err() {
                    return;
                }
                written.fetch_add(MIB, Ordering::SeqCst);
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        }
    })
    .await;
    let (mut proxy, port, _dir) = daemon_for(&upstream.url(), "").await;
    let pid = proxy.pid();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small, fixed receive buffer (no autotuning): the client side holds little.
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(daemon::local(port)).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n{\"model\":\"m\",\"stream\":true}")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head:?}\n{}",
        proxy.dump()
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut body = BodyReader::new(stream, true);
    let started = Instant::now();
    // Read 1 MiB, then stall 700 ms every 48 MiB: each time, the upstream may only have
    // run ahead by what the sockets' kernel buffers hold (loopback autotuning lets those
    // reach tens of MiB), never by the whole stream.
    let mut read = read_pattern(&mut body, 0, MIB).await;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        gaps.push(written.load(Ordering::SeqCst).saturating_sub(read));
        read += read_pattern(&mut body, read, read + 48 * MIB).await;
    }
    read += read_pattern(&mut body, read, TOTAL).await;
    let mut end = [0u8; 1];
    assert_eq!(body.read(&mut end).await, 0, "more than {TOTAL} bytes");
    assert_eq!(read, TOTAL);
    let (_, peak) = memory(pid);
    eprintln!(
        "256 MiB SSE to a slow reader in {:?}; upstream ahead by {:?} MiB at the pauses; peak RSS {} MiB",
        started.elapsed(),
        gaps.iter().map(|g| g / MIB).collect::<Vec<_>>(),
        peak / MIB
    );
    assert!(
        gaps.iter().all(|g| *g < 64 * MIB),
        "the upstream ran ahead of the reader: {gaps:?}"
    );
    assert!(peak < PEAK_LIMIT, "peak RSS {} MiB", peak / MIB);
    proxy.stop().await;
}

#[cfg(target_os = "linux")]
/// The upstream for the disconnect test: a sink for uploads, an endless download, and an
/// event stream that never ends. Each connection counts once in `closed` when the proxy
/// closes it, whenever that happens (even before the request head arrived).
async fn bottomless_upstream(watch: Arc<Watch>) -> RawUpstream {
    RawUpstream::start(move |mut stream| {
        let watch = watch.clone();
        async move {
            watch.connections.fetch_add(1, Ordering::SeqCst);
            watch.event();
            let head = read_head(&mut stream).await;
            let limit = Duration::from_secs(15);
            let closed = if head.is_empty() {
                true
            } else if head.starts_with("GET") {
                let _ = stream
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {GIB}\r\n\r\n").as_bytes())
                    .await;
                // Written until the proxy hangs up (bounded by the size and the limit).
                matches!(
                    tokio::time::timeout(limit, write_pattern(&mut stream, GIB)).await,
                    Ok(Err(_))
                )
            } else if head.contains("/chat/completions") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                watch.answered.fetch_add(1, Ordering::SeqCst);
                watch.event();
                let (mut read_half, mut write_half) = stream.into_split();
                let ticker = async {
                    for _ in 0..150 {
                        if write_half.write_all(&chunk(b": still thinking\n\n")).await.is_err() {
                            return true;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    false
                };
                let mut rest = Vec::new();
                tokio::select! {
                    closed = ticker => closed,
                    _ = read_half.read_to_end(&mut rest) => true,
                }
            } else {
                // Counts the close itself.
                until_closed(&mut stream, &watch, limit).await;
                false
            };
            if closed {
                watch.closed.fetch_add(1, Ordering::SeqCst);
                watch.event();
            }
        }
    })
    .await
}

#[cfg(target_os = "linux")]
/// Clients that leave mid-upload, mid-aggregation and mid-download: every upstream
/// connection is closed (the upstream request cancelled), and the proxy is back to its
/// idle state: no request in flight, no extra file descriptor, no memory kept.
#[tokio::test]
async fn disconnects_mid_upload_mid_aggregation_and_mid_download_free_everything() {
    let watch = Arc::new(Watch::default());
    let upstream = bottomless_upstream(watch.clone()).await;
    let admin = daemon::free_port();
    let (mut proxy, port, _dir) = daemon_for(
        &upstream.url(),
        &format!(", \"adminListen\": \"127.0.0.1:{admin}\""),
    )
    .await;
    let pid = proxy.pid();
    let fds_before = open_fds(pid);
    let (rss_before, _) = memory(pid);
    let rounds = 5;
    let megabyte = vec![b'u'; MIB as usize];
    for round in 0..rounds {
        // Mid-upload.
        let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
        stream
            .write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 104857600\r\n\r\n")
            .await
            .unwrap();
        let before = watch.body_bytes.load(Ordering::SeqCst);
        stream.write_all(&megabyte).await.unwrap();
        watch
            .until(WAIT, "the upload never reached the upstream", |w| {
                w.body_bytes.load(Ordering::SeqCst) > before
            })
            .await;
        drop(stream);

        // Mid-aggregation: the upstream is streaming comments to the proxy.
        let answered = watch.answered.load(Ordering::SeqCst);
        let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
        stream
            .write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT_BODY}", CHAT_BODY.len()).as_bytes())
            .await
            .unwrap();
        watch
            .until(WAIT, "the conversion never reached the upstream", |w| {
                w.answered.load(Ordering::SeqCst) > answered
            })
            .await;
        drop(stream);

        // Mid-download, after 1 MiB.
        let mut stream = TcpStream::connect(daemon::local(port)).await.unwrap();
        stream
            .write_all(b"GET /v1/files/big/content HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        let mut body = BodyReader::new(stream, false);
        read_pattern(&mut body, 0, MIB).await;
        drop(body);
    }

    watch
        .until(
            Duration::from_secs(5),
            "upstream connections left open after the clients left",
            |w| {
                w.connections.load(Ordering::SeqCst) == 3 * rounds
                    && w.closed.load(Ordering::SeqCst) == 3 * rounds
            },
        )
        .await;
    // Nothing announces that the proxy has closed its sockets: look, a bounded number of
    // times, until the descriptors are back to the idle count.
    let mut fds = open_fds(pid);
    for _ in 0..100 {
        if fds <= fds_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        fds = open_fds(pid);
    }
    assert!(
        fds <= fds_before,
        "{fds} descriptors open, {fds_before} before\n{}",
        proxy.dump()
    );
    let (parts, metrics) = daemon::get(admin, "/metrics").await;
    assert_eq!(parts.status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    let in_flight = format!("openai_stream_proxy_requests_in_flight{{port=\"{port}\"}} ");
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(in_flight.as_str()))
        .unwrap_or_else(|| panic!("no {in_flight} in\n{metrics}"));
    assert_eq!(value.trim(), "0", "requests still in flight");
    let (rss_after, peak) = memory(pid);
    eprintln!(
        "after {} disconnects: {fds} fds ({fds_before} before), RSS {} -> {} MiB, peak {} MiB",
        3 * rounds,
        rss_before / MIB,
        rss_after / MIB,
        peak / MIB
    );
    assert!(
        rss_after < rss_before + 16 * MIB,
        "RSS grew from {} to {} MiB",
        rss_before / MIB,
        rss_after / MIB
    );
    proxy.stop().await;
}

/// A client that stops reading a streamed answer stops the server from polling its body, and
/// so every timer the body checks. Its connection notices instead: once its writes have
/// waited `timeoutSeconds`, it is closed, and the upstream connection with it. Without that
/// both legs stayed open for as long as the client did.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_timeout_seconds() {
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<(Instant, usize)>();
    let upstream = RawUpstream::start(move |mut stream| {
        let ended_tx = ended_tx.clone();
        async move {
            read_head(&mut stream).await;
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let event = format!("data: {}\n\n", "x".repeat(64 * 1024));
            let chunk = chunk(event.as_bytes());
            let mut sent = 0;
            // Bounded: the proxy should cut this within a few seconds.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(60), stream.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len(),
                    _ => break,
                }
            }
            let _ = ended_tx.send((Instant::now(), sent));
        }
    })
    .await;
    let mut options = options();
    options.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), options).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = client.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    let stopped_reading = Instant::now();
    // The client now reads nothing more, and keeps its socket open.
    let (at, sent) = tokio::time::timeout(Duration::from_secs(30), ended.recv())
        .await
        .expect("the upstream connection was still open 30 s after the client stopped reading")
        .unwrap();
    assert!(
        at - stopped_reading >= Duration::from_secs(1),
        "closed after {:?}, before timeoutSeconds",
        at - stopped_reading
    );
    assert!(sent > 0);
    // The proxy closed the client's connection too: what it still holds reads to an end.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the client's connection is still open");
    drop(client);
}
