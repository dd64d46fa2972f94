//! Metrics after real traffic, and the health endpoint across start, serve and drain.
//! Metrics are process-wide; each test's series are told apart by its ephemeral port.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use openai_stream_proxy::metrics::Metrics;
use openai_stream_proxy::{admin, ProxyService, Server, UpstreamUrl};
use support::*;
use tokio::net::TcpListener;

const STREAM: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18,\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
    "data: [DONE]\n\n",
);

/// The value of the series whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn counters_follow_real_traffic_of_each_mode() {
    let upstream = MockUpstream::start(|r| {
        if r.uri.path().ends_with("/chat/completions") {
            response(200, &[("content-type", "text/event-stream")], full(STREAM))
        } else {
            response(404, &[], full("nope!"))
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let port = proxy.label;
    for _ in 0..2 {
        let (parts, _) = send(post_json(
            &proxy.url("/v1/chat/completions"),
            "{\"model\":\"m\"}",
        ))
        .await;
        assert_eq!(parts.status, 200);
    }
    let (parts, _) = send(
        Request::get(proxy.url("/v1/missing"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 404);

    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = start_proxy(&format!("http://127.0.0.1:{dead_port}"), options()).await;
    let (parts, _) = send(Request::get(dead.url("/x")).body(Full::default()).unwrap()).await;
    assert_eq!(parts.status, 502);

    // The log (and with it the metrics, upstream errors included) is written when the body
    // has been sent; wait until the series appear, bounded.
    let p = format!("port=\"{port}\"");
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = Metrics::global().encode();
        let done = value(&text, &format!("openai_stream_proxy_requests_total{{{p},mode=\"passthrough\",status_class=\"4xx\"}}")) == Some(1.0)
            && value(&text, &errors_series(dead.label, "connect")) == Some(1.0);
        if done || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let get =
        |series: String| value(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        get(format!(
            "openai_stream_proxy_requests_total{{{p},mode=\"convert\",status_class=\"2xx\"}}"
        )),
        2.0
    );
    assert_eq!(
        get(format!(
            "openai_stream_proxy_requests_total{{{p},mode=\"passthrough\",status_class=\"4xx\"}}"
        )),
        1.0
    );
    for (token_type, n) in [
        ("input", 22.0),
        ("output", 14.0),
        ("total", 36.0),
        ("cached", 6.0),
        ("reasoning", 4.0),
    ] {
        assert_eq!(
            get(format!(
                "openai_stream_proxy_converted_tokens_total{{{p},token_type=\"{token_type}\"}}"
            )),
            n,
            "{token_type}"
        );
    }
    assert_eq!(
        get(format!(
            "openai_stream_proxy_converted_terminal_total{{{p},terminal=\"done\"}}"
        )),
        2.0
    );
    assert_eq!(get(format!("openai_stream_proxy_body_bytes_total{{{p},mode=\"passthrough\",direction=\"to_client\"}}")), 5.0);
    assert_eq!(
        get(format!("openai_stream_proxy_requests_in_flight{{{p}}}")),
        0.0
    );
    assert!(
        get(format!(
            "openai_stream_proxy_upstream_time_to_headers_seconds_count{{{p}}}"
        )) >= 3.0
    );
    assert_eq!(
        get(format!(
            "openai_stream_proxy_request_duration_seconds_count{{{p},mode=\"convert\"}}"
        )),
        2.0
    );
    let dead_label = format!("port=\"{}\"", dead.label);
    assert_eq!(
        get(format!(
            "openai_stream_proxy_upstream_errors_total{{{dead_label},kind=\"connect\"}}"
        )),
        1.0
    );
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (parts, body) = send(
        Request::get(format!("http://{addr}{path}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    (
        parts.status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn healthz_is_503_before_serving_200_while_serving_and_503_while_draining() {
    let (hold_tx, hold_body) = channel_body();
    let hold_body = std::sync::Mutex::new(Some(hold_body));
    let upstream = MockUpstream::start(move |_| {
        let body = hold_body.lock().unwrap().take().unwrap_or_else(|| full(""));
        response(200, &[], body)
    })
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = direct_client();
    let service = ProxyService::new(
        UpstreamUrl::parse(&upstream.url()).unwrap(),
        options(),
        client,
    );
    let server = Server::from_listeners(vec![(listener, service)]);
    let health = server.health();

    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        admin_listener,
        health.clone(),
        std::future::pending(),
    ));
    assert_eq!(
        admin_get(admin_addr, "/healthz").await,
        (503, "starting\n".to_owned())
    );
    let (status, metrics) = admin_get(admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    assert_eq!(admin_get(admin_addr, "/nope").await.0, 404);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(
        async {
            let _ = stop_rx.await;
        },
        WAIT,
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !health.is_ready() {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::task::yield_now().await;
    }
    assert_eq!(
        admin_get(admin_addr, "/healthz").await,
        (200, "ok\n".to_owned())
    );

    // A request in flight keeps the drain going while healthz reports it.
    let response = client_request(addr).await;
    stop_tx.send(()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !health.is_draining() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never started draining"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        admin_get(admin_addr, "/healthz").await,
        (503, "draining\n".to_owned())
    );
    hold_tx.send(Ok(Bytes::from_static(b"done"))).await.unwrap();
    drop(hold_tx);
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"done");
    tokio::time::timeout(WAIT, running).await.unwrap().unwrap();
}

async fn client_request(addr: std::net::SocketAddr) -> http::Response<hyper::body::Incoming> {
    let req = Request::get(format!("http://{addr}/held"))
        .body(Full::<Bytes>::default())
        .unwrap();
    tokio::time::timeout(WAIT, client().request(req))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn websocket_sessions_are_counted_while_open_with_their_bytes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            ws.send(message).await.unwrap();
        }
    });
    let proxy = start_proxy(&format!("http://{upstream_addr}"), options()).await;
    let p = format!("port=\"{}\"", proxy.label);
    let open = format!("openai_stream_proxy_websocket_sessions_open{{{p}}}");

    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/v1/realtime", proxy.addr), stream)
            .await
            .unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    assert_eq!(value(&Metrics::global().encode(), &open), Some(1.0));

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = Metrics::global().encode();
        if value(&text, &open) == Some(0.0) {
            let up = format!("openai_stream_proxy_body_bytes_total{{{p},mode=\"websocket\",direction=\"to_upstream\"}}");
            let down = format!("openai_stream_proxy_body_bytes_total{{{p},mode=\"websocket\",direction=\"to_client\"}}");
            assert_eq!(value(&text, &up), Some(5.0), "{text}");
            assert_eq!(value(&text, &down), Some(5.0), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session still counted as open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Upstream errors by kind, on every path that meets them, and upload bytes as read.
// ---------------------------------------------------------------------------------------

const KINDS: [&str; 5] = [
    "connect",
    "timeout",
    "incomplete_stream",
    "in_stream_error",
    "stream_fallback",
];

fn errors_series(port: u16, kind: &str) -> String {
    format!("openai_stream_proxy_upstream_errors_total{{port=\"{port}\",kind=\"{kind}\"}}")
}

/// Waits, bounded, until the proxy on `port` has counted `n` upstream errors of `kind`
/// (counted when the request's log line is written, once its response has ended), then
/// checks that no other kind was counted for it.
async fn expect_errors(port: u16, kind: &str, n: f64) {
    let series = errors_series(port, kind);
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = Metrics::global().encode();
        if value(&text, &series) == Some(n) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {:?}, expected {n}:\n{text}",
            value(&text, &series)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for other in KINDS.iter().filter(|k| **k != kind) {
        let got = value(&text, &errors_series(port, other)).unwrap_or(0.0);
        assert_eq!(got, 0.0, "port {port}: {other} counted besides {kind}");
    }
}

fn short_timeout() -> openai_stream_proxy::RuleOptions {
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    opts
}

/// Sends `req` and reads the whole response; `Err` when the connection broke off (a body
/// that must not look complete).
async fn fetch(req: Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
    let response = tokio::time::timeout(WAIT, client().request(req))
        .await
        .map_err(|_| "no response head in time".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .map_err(|_| "body not finished in time".to_owned())?
        .map_err(|e| format!("body: {e}"))?;
    Ok((status, body.to_bytes()))
}

/// An upstream that reads the request head, writes `answer`, then holds the connection
/// until the proxy closes it (bounded); with `release`, it instead waits for that signal
/// (at once when it was given beforehand), then writes `rest` and closes.
async fn scripted_upstream(
    answer: &'static [u8],
    release: Option<(std::sync::Arc<tokio::sync::Notify>, &'static [u8])>,
) -> RawUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    RawUpstream::start(move |mut stream| {
        let release = release.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream.write_all(answer).await;
            let _ = stream.flush().await;
            match release {
                Some((signal, rest)) => {
                    let _ = tokio::time::timeout(WAIT, signal.notified()).await;
                    let _ = stream.write_all(rest).await;
                    let _ = stream.shutdown().await;
                }
                None => {
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
                }
            }
        }
    })
    .await
}

const CHAT_PATH: &str = "/v1/chat/completions";
const CHAT_BODY: &str = "{\"model\":\"m\",\"messages\":[]}";
const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
/// `SSE_HEAD` and one chunk holding an event without a `finish_reason`: the stream is open.
const SSE_OPEN: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
63\r\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h\"}}]}\n\n\r\n";

#[test]
fn the_scripted_stream_chunk_is_framed_right() {
    let text = std::str::from_utf8(SSE_OPEN).unwrap();
    let chunk = text.split_once("\r\n\r\n").unwrap().1;
    let (size, rest) = chunk.split_once("\r\n").unwrap();
    let data = rest.strip_suffix("\r\n").unwrap();
    assert_eq!(usize::from_str_radix(size, 16).unwrap(), data.len());
    assert!(SSE_OPEN.starts_with(SSE_HEAD));
}

#[tokio::test]
async fn timeouts_are_counted_before_the_head_while_aggregating_and_mid_body() {
    // Passthrough: no response head within timeoutSeconds.
    let silent = scripted_upstream(b"", None).await;
    let proxy = start_proxy(&silent.url(), short_timeout()).await;
    let got = fetch(Request::get(proxy.url("/x")).body(Full::default()).unwrap()).await;
    assert_eq!(got.map(|(s, _)| s), Ok(504));
    expect_errors(proxy.label, "timeout", 1.0).await;

    // Conversion: the stream falls silent before its terminal event.
    let stalled = scripted_upstream(SSE_OPEN, None).await;
    let proxy = start_proxy(&stalled.url(), short_timeout()).await;
    let got = fetch(post_json(&proxy.url(CHAT_PATH), CHAT_BODY)).await;
    assert_eq!(got.map(|(s, _)| s), Ok(504));
    expect_errors(proxy.label, "timeout", 1.0).await;

    // Passthrough: the body falls silent after its head was relayed; the client's body
    // breaks off.
    let half = scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", None).await;
    let proxy = start_proxy(&half.url(), short_timeout()).await;
    let got = fetch(Request::get(proxy.url("/x")).body(Full::default()).unwrap()).await;
    assert!(
        got.is_err(),
        "a body cut by the idle timeout looked complete: {got:?}"
    );
    expect_errors(proxy.label, "timeout", 1.0).await;
}

#[tokio::test]
async fn truncated_upstream_answers_are_counted_as_incomplete_streams_in_every_mode() {
    // Conversion: the stream ends cleanly before its terminal event.
    let at_once = std::sync::Arc::new(tokio::sync::Notify::new());
    at_once.notify_one();
    let truncated = scripted_upstream(SSE_OPEN, Some((at_once, b"0\r\n\r\n".as_slice()))).await;
    let proxy = start_proxy(&truncated.url(), options()).await;
    let got = fetch(post_json(&proxy.url(CHAT_PATH), CHAT_BODY)).await;
    assert_eq!(got.map(|(s, _)| s), Ok(502));
    expect_errors(proxy.label, "incomplete_stream", 1.0).await;

    // Passthrough: fewer bytes than the declared content-length, then FIN.
    let at_once = std::sync::Arc::new(tokio::sync::Notify::new());
    at_once.notify_one();
    let short = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcde",
        Some((at_once, b"".as_slice())),
    )
    .await;
    let proxy = start_proxy(&short.url(), options()).await;
    let got = fetch(Request::get(proxy.url("/x")).body(Full::default()).unwrap()).await;
    assert!(
        got.is_err(),
        "a truncated passthrough body looked complete: {got:?}"
    );
    expect_errors(proxy.label, "incomplete_stream", 1.0).await;

    // Keep-alive conversion: 200 committed first, then the stream ends before its terminal
    // event; the error can only go into the committed body, and is still counted.
    let signal = std::sync::Arc::new(tokio::sync::Notify::new());
    let late = scripted_upstream(SSE_OPEN, Some((signal.clone(), b"0\r\n\r\n".as_slice()))).await;
    let mut opts = options();
    opts.keep_alive = Some(Duration::from_millis(50));
    let proxy = start_proxy(&late.url(), opts).await;
    let response = tokio::time::timeout(
        WAIT,
        client().request(post_json(&proxy.url(CHAT_PATH), CHAT_BODY)),
    )
    .await
    .expect("no response head in time")
    .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the keep-alive 200 was not committed"
    );
    // Only now, with the 200 on the wire, does the upstream end its stream.
    signal.notify_one();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body not finished in time")
        .unwrap()
        .to_bytes();
    let (error_type, _) = envelope(body.trim_ascii_start());
    assert_eq!(error_type, "upstream_error");
    expect_errors(proxy.label, "incomplete_stream", 1.0).await;
}

#[tokio::test]
async fn errors_reported_inside_a_stream_are_counted() {
    let reported = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            full("data: {\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\",\"code\":\"rate_limit_exceeded\"}}\n\n"),
        )
    })
    .await;
    let proxy = start_proxy(&reported.url(), options()).await;
    let (status, body) = fetch(post_json(&proxy.url(CHAT_PATH), CHAT_BODY))
        .await
        .unwrap();
    assert_eq!(status, 429);
    assert_eq!(envelope(&body).1, "slow down");
    expect_errors(proxy.label, "in_stream_error", 1.0).await;

    let failed = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            full("event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"r\",\"object\":\"response\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n"),
        )
    })
    .await;
    let proxy = start_proxy(&failed.url(), options()).await;
    let (status, body) = fetch(post_json(
        &proxy.url("/v1/responses"),
        "{\"model\":\"m\",\"input\":\"hi\"}",
    ))
    .await
    .unwrap();
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert_eq!(envelope(&body).1, "boom");
    expect_errors(proxy.label, "in_stream_error", 1.0).await;
}

#[tokio::test]
async fn each_request_that_falls_back_from_streaming_is_counted_once() {
    // Refuses `stream` itself: the client's own (non-streaming) body is sent and relayed.
    let plain = MockUpstream::start(|r| {
        if String::from_utf8_lossy(&r.body).contains("\"stream\"") {
            response(
                400,
                &[("content-type", "application/json")],
                full("{\"error\":{\"message\":\"'stream' is not supported for this model\",\"type\":\"invalid_request_error\",\"param\":\"stream\",\"code\":null}}"),
            )
        } else {
            response(
                200,
                &[("content-type", "application/json")],
                full("{\"id\":\"plain\"}"),
            )
        }
    })
    .await;
    let proxy = start_proxy(&plain.url(), options()).await;
    let (status, body) = fetch(post_json(&proxy.url(CHAT_PATH), CHAT_BODY))
        .await
        .unwrap();
    assert_eq!((status, &body[..]), (200, &b"{\"id\":\"plain\"}"[..]));
    assert_eq!(plain.requests().len(), 2);
    expect_errors(proxy.label, "stream_fallback", 1.0).await;

    // Refuses `stream_options`, then streams without it: aggregated, counted once.
    let options_refused = MockUpstream::start(|r| {
        if String::from_utf8_lossy(&r.body).contains("stream_options") {
            response(
                400,
                &[("content-type", "application/json")],
                full("{\"error\":{\"message\":\"Unrecognized request argument supplied: stream_options\",\"type\":\"invalid_request_error\",\"param\":\"stream_options\",\"code\":null}}"),
            )
        } else {
            response(200, &[("content-type", "text/event-stream")], full(STREAM))
        }
    })
    .await;
    let proxy = start_proxy(&options_refused.url(), options()).await;
    let (status, body) = fetch(post_json(&proxy.url(CHAT_PATH), CHAT_BODY))
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(options_refused.requests().len(), 2);
    expect_errors(proxy.label, "stream_fallback", 1.0).await;
}

#[tokio::test]
async fn upload_bytes_are_counted_as_read_whatever_the_framing() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let port = proxy.label;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<MockBody>();

    // Chunked: no content-length is declared.
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let feeding = tokio::spawn(async move {
        for size in [1000usize, 1, 11_344] {
            tx.send(Ok(Bytes::from(vec![b'u'; size]))).await.unwrap();
        }
    });
    let response = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("no response in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    feeding.await.unwrap();
    // Known length, for comparison.
    let (parts, _) = send(
        Request::post(proxy.url("/v1/files"))
            .body(Full::new(Bytes::from(vec![b'k'; 100])))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].headers["transfer-encoding"], "chunked");
    assert_eq!(recorded[0].body.len(), 12_345);
    let up = format!(
        "openai_stream_proxy_body_bytes_total{{port=\"{port}\",mode=\"passthrough\",direction=\"to_upstream\"}}"
    );
    let requests = format!(
        "openai_stream_proxy_requests_total{{port=\"{port}\",mode=\"passthrough\",status_class=\"2xx\"}}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = Metrics::global().encode();
        if value(&text, &requests) == Some(2.0) {
            assert_eq!(value(&text, &up), Some(12_445.0), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the requests were not logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
