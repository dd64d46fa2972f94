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
    let port = proxy.addr.port();
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

    // The log (and with it the metrics) is written when the body has been sent; wait until
    // the series appear, bounded.
    let p = format!("port=\"{port}\"");
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = Metrics::global().encode();
        let done = value(&text, &format!("openai_stream_proxy_requests_total{{{p},mode=\"passthrough\",status_class=\"4xx\"}}")) == Some(1.0);
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
    let dead_label = format!("port=\"{}\"", dead.addr.port());
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
    let client = openai_stream_proxy::UpstreamClient::new(openai_stream_proxy::ClientOptions {
        proxy: None,
        roots: std::sync::Arc::new(rustls::RootCertStore::empty()),
        connect_timeout: None,
    })
    .unwrap();
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
    let p = format!("port=\"{}\"", proxy.addr.port());
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
