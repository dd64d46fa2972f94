//! The per-request log line, captured in-process: a current-thread runtime keeps the proxy's
//! tasks on the thread whose subscriber records them.

mod support;

use http::Request;
use http_body_util::Full;
use support::log_capture::LogCapture;
use support::*;

const STREAM: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n",
    "data: [DONE]\n\n",
);

#[tokio::test(flavor = "current_thread")]
async fn each_request_logs_one_line_with_mode_status_and_tokens_but_no_secrets() {
    let captured = LogCapture::default();
    let _guard = captured.install();
    // A callsite another thread was registering while the capture's process-wide
    // subscriber was first set may have cached "never"; recompute every cached interest.
    tracing::callsite::rebuild_interest_cache();

    let upstream = MockUpstream::start(|r| {
        if r.uri.path().ends_with("/chat/completions") {
            response(200, &[("content-type", "text/event-stream")], full(STREAM))
        } else if r.method == http::Method::DELETE {
            response(204, &[], full(""))
        } else {
            response(200, &[], full("0123456789"))
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let port = format!("port={}", proxy.label);

    let req = Request::post(proxy.url("/v1/chat/completions?api-key=QUERY-SECRET"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-SECRET-123")
        .body(Full::new(bytes::Bytes::from_static(
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"BODY-MARKER\"}]}",
        )))
        .unwrap();
    let (parts, _) = send(req).await;
    assert_eq!(parts.status, 200);
    let line = captured
        .line_with(&[
            "request",
            &port,
            "mode=convert",
            "status=200",
            "terminal=done",
        ])
        .await;
    assert!(line.contains("input_tokens=11"), "{line}");
    assert!(line.contains("output_tokens=7"), "{line}");
    assert!(line.contains("total_tokens=18"), "{line}");
    assert!(line.contains("path=/v1/chat/completions"), "{line}");
    assert!(line.contains("method=POST"), "{line}");
    assert!(line.contains("duration_ms="), "{line}");

    send(
        Request::get(proxy.url("/v1/models"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let line = captured
        .line_with(&["request", "mode=passthrough", "path=/v1/models"])
        .await;
    assert!(line.contains("bytes=10"), "{line}");
    assert!(line.contains("outcome=complete"), "{line}");

    // Bodiless answers, whose body the server drops without polling it, are complete too,
    // not `client_closed`.
    let (parts, _) = send(
        Request::head(proxy.url("/v1/models"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let line = captured
        .line_with(&["request", "method=HEAD", "path=/v1/models"])
        .await;
    assert!(line.contains("outcome=complete"), "{line}");
    let (parts, _) = send(
        Request::delete(proxy.url("/v1/files/file-1"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 204);
    let line = captured
        .line_with(&["request", "status=204", "path=/v1/files/file-1"])
        .await;
    assert!(line.contains("outcome=complete"), "{line}");
    // So is the proxy's own error answer to a HEAD, whose envelope never goes out.
    let unreachable = start_proxy("http://127.0.0.1:1", options()).await;
    let (parts, _) = send(
        Request::head(unreachable.url("/v1/unreachable"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 502);
    let line = captured
        .line_with(&["request", "status=502", "path=/v1/unreachable"])
        .await;
    assert!(line.contains("outcome=complete"), "{line}");

    let all = captured.all();
    for secret in ["sk-SECRET-123", "BODY-MARKER", "QUERY-SECRET"] {
        assert!(
            !all.contains(secret),
            "{secret} leaked into the log:\n{all}"
        );
    }
}

/// A chunked answer with trailers ends at its trailers frame, after which servers poll the
/// body no more: the line says `complete` (not `client_closed`) and the upstream connection,
/// whose answer was read to its end, serves the next request.
#[tokio::test(flavor = "current_thread")]
async fn an_answer_with_trailers_is_complete_and_its_connection_reused() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    let captured = LogCapture::default();
    let _guard = captured.install();
    tracing::callsite::rebuild_interest_cache();

    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let upstream = RawUpstream::start(move |mut stream| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            for _ in 0..4 {
                if read_head(&mut stream).await.is_empty() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-usage: 5\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for n in 0..2 {
        let path = format!("/v1/trailers/{n}");
        let (parts, body) = send(
            Request::get(proxy.url(&path))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"ok");
        let line = captured
            .line_with(&["request", &format!("path={path}")])
            .await;
        assert!(line.contains("outcome=complete"), "{line}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the connection was not reused"
    );
}
