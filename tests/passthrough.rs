//! Passthrough: every request reaches the upstream as if the proxy were not there, and
//! bodies stream both ways as bytes arrive.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn any_method_path_and_query_reach_the_upstream_unchanged() {
    let upstream = MockUpstream::start(|r| {
        response(
            201,
            &[
                ("x-seen-method", r.method.as_str()),
                ("content-type", "text/plain"),
            ],
            full(r.body.clone()),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/v1/files/abc%20def?limit=2&order=desc"))
            .header("authorization", "Bearer sk-test")
            .header("openai-organization", "org-1")
            .header("openai-beta", "assistants=v2")
            .header("x-custom", "kept")
            .body(Full::new(Bytes::from_static(b"\x00binary\xffbody")))
            .unwrap();
        let (parts, body) = send(req).await;
        assert_eq!(parts.status, 201);
        assert_eq!(parts.headers["x-seen-method"], method);
        assert_eq!(&body[..], b"\x00binary\xffbody");
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 6);
    for r in &requests {
        assert_eq!(
            r.uri.path_and_query().unwrap().as_str(),
            "/v1/files/abc%20def?limit=2&order=desc"
        );
        assert_eq!(r.headers["authorization"], "Bearer sk-test");
        assert_eq!(r.headers["openai-organization"], "org-1");
        assert_eq!(r.headers["openai-beta"], "assistants=v2");
        assert_eq!(r.headers["x-custom"], "kept");
        assert_eq!(r.headers["host"], upstream.addr.to_string());
        assert_eq!(&r.body[..], b"\x00binary\xffbody");
    }
}

#[tokio::test]
async fn conversion_paths_with_stream_true_are_passed_through_byte_for_byte() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            full("data: [DONE]\n\n"),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let body = "{ \"model\" : \"m\", \"stream\": true,\n \"n\": 1e-7 }";
    let (parts, got) = send(post_json(&proxy.url("/v1/chat/completions"), body)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&got[..], b"data: [DONE]\n\n");
    assert_eq!(&upstream.single_request().body[..], body.as_bytes());
}

#[tokio::test]
async fn upstream_path_prefix_is_kept_and_slashes_never_double() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&format!("{}/openai/", upstream.url()), options()).await;
    let (parts, _) = send(
        Request::get(proxy.url("/v1/models?x=1"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        upstream
            .single_request()
            .uri
            .path_and_query()
            .unwrap()
            .as_str(),
        "/openai/v1/models?x=1"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_repeated_headers_kept() {
    let upstream = MockUpstream::start(|_| {
        let mut r = response(
            200,
            &[
                ("connection", "x-remove-me"),
                ("x-remove-me", "1"),
                ("keep-alive", "timeout=5"),
                ("x-keep", "1"),
            ],
            full("body"),
        );
        r.headers_mut().append("set-cookie", "a=1".parse().unwrap());
        r.headers_mut().append("set-cookie", "b=2".parse().unwrap());
        r
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let request = b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nConnection: x-client-hop, keep-alive\r\nConnection: x-second\r\n\
x-client-hop: 1\r\nx-second: 1\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nProxy-Authorization: Basic abc\r\n\
X-Forward-Me: yes\r\nAccept: a\r\nAccept: b\r\n\r\n";
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\nbody") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.contains("x-keep: 1"));
    assert!(!head.contains("x-remove-me"));
    assert!(!head.contains("keep-alive: timeout"));
    assert_eq!(head.matches("set-cookie:").count(), 2);

    let r = upstream.single_request();
    for hop in [
        "x-client-hop",
        "x-second",
        "proxy-connection",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(r.headers.get(hop).is_none(), "{hop} was forwarded");
    }
    assert_eq!(r.headers["x-forward-me"], "yes");
    assert_eq!(r.headers.get_all("accept").iter().count(), 2);
}

#[tokio::test]
async fn framing_is_kept_bodiless_get_and_known_length() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    send(Request::get(proxy.url("/a")).body(Full::default()).unwrap()).await;
    send(post_json(&proxy.url("/b"), "{\"a\":1}")).await;
    let requests = upstream.requests();
    let get = requests.iter().find(|r| r.uri.path() == "/a").unwrap();
    assert!(
        get.headers.get("content-length").is_none()
            && get.headers.get("transfer-encoding").is_none()
    );
    assert!(get.headers.get("content-type").is_none() && get.headers.get("user-agent").is_none());
    let post = requests.iter().find(|r| r.uri.path() == "/b").unwrap();
    assert_eq!(post.headers["content-length"], "7");
    assert!(post.headers.get("transfer-encoding").is_none());
}

#[tokio::test]
async fn gzip_bodies_pass_byte_for_byte() {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(b"{\"data\":[1,2,3]}").unwrap();
    let gz = Bytes::from(encoder.finish().unwrap());
    let sent = gz.clone();
    let upstream = MockUpstream::start(move |_| {
        response(
            200,
            &[
                ("content-encoding", "gzip"),
                ("content-type", "application/json"),
            ],
            full(sent.clone()),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let req = Request::get(proxy.url("/v1/models"))
        .header("accept-encoding", "gzip")
        .body(Full::default())
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.headers["content-encoding"], "gzip");
    assert_eq!(parts.headers["content-length"], gz.len().to_string());
    assert_eq!(body, gz);
    assert_eq!(upstream.single_request().headers["accept-encoding"], "gzip");
}

#[tokio::test]
async fn sse_events_reach_the_client_while_the_upstream_is_still_open() {
    let (tx, body) = channel_body();
    let body = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = body.lock().unwrap().take().expect("one request");
        response(200, &[("content-type", "text/event-stream")], body)
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let req = post_json(
        &proxy.url("/v1/chat/completions"),
        "{\"model\":\"m\",\"stream\":true}",
    );
    let response = tokio::time::timeout(WAIT, client().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    tx.send(Ok(Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event was buffered")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: {\"n\":1}\n\n")
    );

    tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    let second = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second.into_data().unwrap(),
        Bytes::from_static(b"data: [DONE]\n\n")
    );
    drop(tx);
    assert!(tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn request_bodies_stream_upstream_before_the_client_finishes() {
    let (got_first_tx, got_first_rx) = tokio::sync::oneshot::channel::<Bytes>();
    let got_first_tx = Arc::new(std::sync::Mutex::new(Some(got_first_tx)));
    let upstream =
        MockUpstream::with_handler(Arc::new(move |req: Request<hyper::body::Incoming>| {
            let tx = got_first_tx.clone();
            Box::pin(async move {
                let mut body = req.into_body();
                let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(first);
                }
                let rest = body.collect().await.unwrap().to_bytes();
                response(200, &[], full(rest))
            })
        }))
        .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, got_first_rx)
        .await
        .expect("first chunk was held back")
        .unwrap();
    assert_eq!(&first[..], b"first");
    stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut stream, b"last").await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_the_upstream_named() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = start_proxy(&format!("http://127.0.0.1:{port}"), options()).await;
    let (parts, body) = send(
        Request::get(proxy.url("/v1/models"))
            .header("authorization", "Bearer sk-secret")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 502);
    assert_eq!(parts.headers["content-type"], "application/json");
    let (ty, message) = envelope(&body);
    assert_eq!(ty, "upstream_error");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert!(!message.contains("sk-secret"));
}

/// An upstream that reads a request head and then says nothing, reading nothing more.
async fn silent_upstream() -> RawUpstream {
    RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(WAIT).await;
        drop(stream);
    })
    .await
}

#[tokio::test]
async fn silent_upstream_is_504_after_timeout_seconds() {
    let upstream = silent_upstream().await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let started = std::time::Instant::now();
    let (parts, body) = send(
        Request::get(proxy.url("/v1/models"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 504);
    assert_eq!(envelope(&body).0, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// An upstream that reads a chunked request body to its end, as slowly as it comes, then
/// answers with the body's length on the wire, or never answers when `answer` is false.
async fn upload_reader(answer: bool) -> RawUpstream {
    RawUpstream::start(move |mut stream| async move {
        let _ = read_head(&mut stream).await;
        let mut body = Vec::new();
        let mut buf = [0u8; 4096];
        // The tests' bodies are a few dozen bytes.
        while !body.ends_with(b"0\r\n\r\n") && body.len() < 1 << 16 {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        if answer {
            let text = format!("got {}", body.len());
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", text.len());
            let _ = stream.write_all((head + &text).as_bytes()).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    })
    .await
}

/// Uploads `pieces` chunks `gap` apart; returns the stream and when the last byte went.
async fn slow_upload(
    addr: std::net::SocketAddr,
    pieces: usize,
    gap: Duration,
) -> (TcpStream, std::time::Instant) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for i in 0..pieces {
        tokio::time::sleep(gap).await;
        let data = format!("piece {i}");
        let framed = format!("{:x}\r\n{data}\r\n", data.len());
        stream.write_all(framed.as_bytes()).await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    (stream, std::time::Instant::now())
}

/// Reads a response with a `content-length` body from a raw stream: (head, body).
async fn read_sized_response(stream: &mut TcpStream) -> (String, String) {
    let head = read_head(stream).await;
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    tokio::time::timeout(WAIT, stream.read_exact(&mut body))
        .await
        .expect("body timed out")
        .unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_upload_longer_than_the_timeout_is_not_cut_and_silence_counts_from_its_end() {
    // Timeout 1 s; the client uploads 4 chunks 400 ms apart (1.6 s in all). The upstream
    // is waiting for the body all that time, not silent.
    let upstream = upload_reader(true).await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts.clone()).await;
    let (mut stream, _) = slow_upload(proxy.addr, 4, Duration::from_millis(400)).await;
    let (head, body) = read_sized_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let wire = 4 * "7\r\npiece 0\r\n".len() + "0\r\n\r\n".len();
    assert_eq!(body, format!("got {wire}"));

    // An upstream that then says nothing gets the whole timeout after the last byte.
    let upstream = upload_reader(false).await;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (mut stream, last_byte) = slow_upload(proxy.addr, 4, Duration::from_millis(400)).await;
    let (head, body) = read_sized_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert_eq!(envelope(body.as_bytes()).0, "upstream_timeout");
    assert!(
        last_byte.elapsed() >= Duration::from_secs(1),
        "504 {:?} after the last byte",
        last_byte.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_stops_uploading_gets_408_in_every_mode() {
    let upstream = upload_reader(true).await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    // Passthrough (streamed upstream as it comes) and a conversion candidate (read whole
    // first): 10 of 100 declared bytes, then nothing.
    for path in ["/v1/files", "/v1/chat/completions"] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"{\"model\":1").await.unwrap();
        let started = std::time::Instant::now();
        let (head, body) = read_sized_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 408"), "{path}: {head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["error"]["type"], "invalid_request_error",
            "{path}: {body}"
        );
        assert_eq!(v["error"]["code"], "request_timeout", "{path}: {body}");
        assert!(started.elapsed() >= Duration::from_secs(1), "{path}");
    }
    // The proxy serves on.
    let (mut stream, _) = slow_upload(proxy.addr, 1, Duration::ZERO).await;
    let (head, _) = read_sized_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_504() {
    // The upstream takes the head and then reads nothing: once the socket buffers are
    // full the body cannot move, which is the upstream's silence, not the client's.
    let upstream = silent_upstream().await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const TOTAL: usize = 256 << 20;
    let upload = tokio::spawn(async move {
        let head = format!("POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-length: {TOTAL}\r\n\r\n");
        writer.write_all(head.as_bytes()).await?;
        let block = vec![b'u'; 1 << 20];
        for _ in 0..TOTAL >> 20 {
            writer.write_all(&block).await?;
        }
        std::io::Result::Ok(())
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&answer).contains("}}") {
        assert!(
            std::time::Instant::now() < deadline,
            "no whole answer in {WAIT:?}"
        );
        match tokio::time::timeout(WAIT, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!(
                "no answer: {other:?} after {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream_timeout"), "{answer}");
    upload.abort();
}

#[tokio::test]
async fn a_live_stream_longer_than_the_timeout_is_never_cut() {
    // Timeout 1 s; the upstream sends 5 chunks 400 ms apart (2 s in all).
    let upstream = RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n").await;
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let event = format!("data: {i}\n\n");
            let _ = stream.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let _ = stream.shutdown().await;
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (parts, body) = send(
        Request::get(proxy.url("/stream"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        &body[..],
        b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
}

#[tokio::test]
async fn upstream_silence_mid_body_aborts_the_client_connection() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await;
        tokio::time::sleep(WAIT).await;
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let response = client()
        .request(Request::get(proxy.url("/s")).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("not aborted");
    assert!(
        result.is_err(),
        "a body cut by the idle timeout must not end cleanly"
    );
}

#[tokio::test]
async fn truncated_upstream_bodies_never_look_complete() {
    // Declared 100 bytes, sends 5, closes.
    let short = RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
            .await;
    })
    .await;
    // Chunked, reset mid-stream.
    let reset = RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await;
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
    })
    .await;
    for upstream in [short.url(), reset.url()] {
        let proxy = start_proxy(&upstream, options()).await;
        let response = client()
            .request(Request::get(proxy.url("/f")).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let result = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("hung");
        assert!(
            result.is_err(),
            "truncated body from {upstream} ended cleanly"
        );
    }
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let upstream = RawUpstream::start(move |mut stream| {
        let closed_tx = closed_tx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n").await;
            // Wait for the proxy to close the connection.
            let mut buf = [0u8; 64];
            loop {
                match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        if let Some(tx) = closed_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        return;
                    }
                    Ok(Ok(_)) => continue,
                    Err(_) => return,
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    tokio::time::timeout(Duration::from_secs(1), closed_rx)
        .await
        .expect("upstream connection still open a second after the client left")
        .unwrap();
}

#[tokio::test]
async fn client_disconnect_while_waiting_for_headers_cancels_the_upstream_request() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let upstream = RawUpstream::start(move |mut stream| {
        let closed_tx = closed_tx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let mut buf = [0u8; 64];
            if let Ok(Ok(0)) = tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                if let Some(tx) = closed_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Give the proxy the request, then leave.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::timeout(Duration::from_secs(2), closed_rx)
        .await
        .expect("upstream connection still open after the client left")
        .unwrap();
}

/// A GET that carries a chunked body reaches the upstream with it (hyper would send a GET
/// of unknown length without one); a GET without a body gets no framing added.
#[tokio::test]
async fn a_chunked_get_body_is_relayed() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let out = raw_exchange(
        proxy.addr,
        b"GET /v1/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let recorded = upstream.single_request();
    assert_eq!(&recorded.body[..], b"hello");
    assert_eq!(recorded.headers["transfer-encoding"], "chunked");

    let (parts, _) = send(
        Request::get(proxy.url("/v1/models"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let plain = &upstream.requests()[1];
    assert!(plain.body.is_empty());
    assert!(plain.headers.get("transfer-encoding").is_none());
    assert!(plain.headers.get("content-length").is_none());
}

/// The HTTP/2 side of the same: a GET whose HEADERS leave the stream open and whose DATA
/// has no declared length reaches the HTTP/1 upstream with its body.
#[tokio::test]
async fn an_http2_get_with_data_is_relayed_with_its_body() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    // A stream body: no exact size, so no content-length is sent.
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
        http_body::Frame::data(Bytes::from_static(b"hello")),
    )]);
    let request = Request::get(proxy.url("/v1/search"))
        .body(http_body_util::StreamBody::new(frames))
        .unwrap();
    let response = tokio::time::timeout(WAIT, h2.send_request(request))
        .await
        .expect("no answer in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = upstream.single_request();
    assert_eq!(&recorded.body[..], b"hello");
    assert!(recorded.headers.get("content-length").is_none());
    connection.abort();
}

#[tokio::test]
async fn absolute_form_targets_are_refused_with_400() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let out = raw_exchange(proxy.addr, b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("absolute-form"));
    assert!(upstream.requests().is_empty());
}

/// W22: a 304 carries the length of the representation it stands for, and no body. The
/// client gets the 304 with its validators and no body byte, so the next request on the
/// same connection is answered by its own response.
#[tokio::test]
async fn a_304_with_a_content_length_has_no_body_and_the_connection_goes_on() {
    let upstream = RawUpstream::start(|mut stream| async move {
        for _ in 0..4 {
            let head = read_head(&mut stream).await;
            if head.is_empty() {
                return;
            }
            let answer: &[u8] = if head.starts_with("GET /first") {
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1234\r\netag: \"v1\"\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"
            };
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /first HTTP/1.1\r\nhost: x\r\nif-none-match: \"v1\"\r\n\r\n")
        .await
        .unwrap();
    let head = String::from_utf8(read_until(&mut client, b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 304"), "{head}");
    assert!(head.to_ascii_lowercase().contains("etag: \"v1\""), "{head}");
    client
        .write_all(b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let next = String::from_utf8(read_until(&mut client, b"second").await).unwrap();
    assert!(
        next.starts_with("HTTP/1.1 200"),
        "a body followed the 304: {next:?}"
    );
}

#[tokio::test]
async fn head_and_204_responses_have_no_body() {
    let upstream = MockUpstream::start(|r| {
        if r.method == http::Method::HEAD {
            let mut resp = response(200, &[("content-length", "42")], full(Bytes::new()));
            resp.headers_mut().insert("x-head", "1".parse().unwrap());
            resp
        } else {
            response(204, &[], full(Bytes::new()))
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, body) = send(
        Request::head(proxy.url("/h"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-length"], "42");
    assert!(body.is_empty());
    let (parts, body) = send(
        Request::delete(proxy.url("/d"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 204);
    assert!(body.is_empty());

    // No body to read, yet the upstream connection is kept: one serves them all.
    for _ in 0..3 {
        for request in [
            Request::head(proxy.url("/h")),
            Request::delete(proxy.url("/d")),
        ] {
            let (parts, _) = send(request.body(Full::default()).unwrap()).await;
            assert!(parts.status.is_success());
        }
    }
    assert_eq!(upstream.requests().len(), 8);
    assert_eq!(upstream.connections_used(), 1);
}

#[tokio::test]
async fn redirects_are_relayed_not_followed() {
    let upstream = MockUpstream::start(|_| {
        response(
            302,
            &[("location", "http://127.0.0.1:1/elsewhere")],
            full(""),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, _) = send(Request::get(proxy.url("/r")).body(Full::default()).unwrap()).await;
    assert_eq!(parts.status, 302);
    assert_eq!(parts.headers["location"], "http://127.0.0.1:1/elsewhere");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served_on_the_same_port() {
    let upstream =
        MockUpstream::start(|r| response(200, &[], full(format!("{} {}", r.method, r.uri.path()))))
            .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // Cookies in fields of their own, as HTTP/2 allows (RFC 9113 §8.2.3).
    let req = Request::post(proxy.url("/v1/embeddings"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = tokio::time::timeout(WAIT, h2.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST /v1/embeddings");
    let r = upstream.single_request();
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.headers["host"], upstream.addr.to_string());
    // One line for the HTTP/1.1 upstream.
    let cookies: Vec<_> = r.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let upstream = MockUpstream::start(|_| response(200, &[], full("ok"))).await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for _ in 0..5 {
        send(Request::get(proxy.url("/p")).body(Full::default()).unwrap()).await;
    }
    assert_eq!(upstream.requests().len(), 5);
    let used = upstream.connections_used();
    assert_eq!(
        used, 1,
        "sequential requests opened {used} upstream connections"
    );
}

/// A chunked event stream relayed to its end leaves its upstream connection ready for the
/// next request (the relaying task drives that connection itself).
#[tokio::test]
async fn upstream_connections_are_reused_after_chunked_event_streams() {
    const EVENTS: [&str; 3] = [
        "data: {\"n\":1}\n\n",
        "data: {\"n\":2}\n\n",
        "data: [DONE]\n\n",
    ];
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            chunked(&EVENTS),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for _ in 0..5 {
        let (parts, body) = send(post_json(
            &proxy.url("/v1/chat/completions"),
            r#"{"model":"m","stream":true}"#,
        ))
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["transfer-encoding"], "chunked");
        assert_eq!(&body[..], EVENTS.concat().as_bytes());
    }
    assert_eq!(upstream.requests().len(), 5);
    let used = upstream.connections_used();
    assert_eq!(used, 1, "5 streams opened {used} upstream connections");
}

/// The upstream closes a pooled connection while it sits idle, after the proxy took it
/// back: the next request, which finds it closed only once it tries it, is sent again on a
/// fresh connection instead of failing.
#[tokio::test]
async fn a_request_on_a_pooled_connection_closed_while_idle_is_sent_again_on_a_fresh_one() {
    let close = Arc::new(tokio::sync::Notify::new());
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel::<usize>(4);
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = RawUpstream::start({
        let close = close.clone();
        let accepted = accepted.clone();
        move |mut stream| {
            let close = close.clone();
            let closed_tx = closed_tx.clone();
            let n = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                for _ in 0..8 {
                    let head = read_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{n}");
                    let _ = stream.write_all(answer.as_bytes()).await;
                    if n == 1 {
                        // Kept alive until the test has the answer, then closed while idle.
                        let _ = tokio::time::timeout(WAIT, close.notified()).await;
                        let _ = stream.shutdown().await;
                        drop(stream);
                        let _ = closed_tx.send(n).await;
                        return;
                    }
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let get = || {
        Request::get(proxy.url("/idle"))
            .body(Full::default())
            .unwrap()
    };
    let (parts, body) = send(get()).await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"1"[..]));
    close.notify_one();
    let closed = tokio::time::timeout(WAIT, closed_rx.recv()).await;
    assert_eq!(closed.ok().flatten(), Some(1), "the upstream never closed");
    // The FIN has been sent; let it reach the proxy's socket before the next request.
    tokio::task::yield_now().await;
    let (parts, body) = send(get()).await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"2"[..]));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_kept_alive_connection_the_upstream_closed_is_not_reused() {
    // Each connection answers one request without `connection: close`, then closes:
    // the proxy must notice (or retry on a fresh connection), never fail the next request.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel::<()>(4);
    let upstream = RawUpstream::start(move |mut stream| {
        let closed_tx = closed_tx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = stream.shutdown().await;
            drop(stream);
            let _ = closed_tx.send(()).await;
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for _ in 0..3 {
        let (parts, body) = send(
            Request::get(proxy.url("/again"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
        tokio::time::timeout(WAIT, closed_rx.recv())
            .await
            .expect("upstream never closed")
            .unwrap();
    }
}

/// The rule's injected headers reach the upstream even when the client names them in
/// `Connection`, which makes the hop-by-hop strip remove them: they are set after it, on
/// passthrough and on converted requests alike.
#[tokio::test]
async fn injected_headers_survive_a_connection_header_that_names_them() {
    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"},",
        "\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let upstream = MockUpstream::start(|r| {
        if r.uri.path().ends_with("/chat/completions") {
            response(200, &[("content-type", "text/event-stream")], full(STREAM))
        } else {
            response(200, &[], full("ok"))
        }
    })
    .await;
    let mut opts = options();
    opts.headers = vec![
        (
            http::HeaderName::from_static("authorization"),
            http::HeaderValue::from_static("Bearer operator-key"),
        ),
        (
            http::HeaderName::from_static("x-org"),
            http::HeaderValue::from_static("team-1"),
        ),
    ];
    let proxy = start_proxy(&upstream.url(), opts).await;

    let passthrough = Request::get(proxy.url("/v1/models"))
        .header("connection", "x-org, authorization")
        .header("x-org", "client-org")
        .body(Full::default())
        .unwrap();
    let (parts, _) = send(passthrough).await;
    assert_eq!(parts.status, 200);
    let mut converted = post_json(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
    );
    converted.headers_mut().insert(
        "connection",
        http::HeaderValue::from_static("keep-alive, Authorization"),
    );
    let (parts, body) = send(converted).await;
    assert_eq!(parts.status, 200, "{body:?}");

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        let path = request.uri.path();
        let values = |name: &str| -> Vec<&[u8]> {
            request
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        };
        assert_eq!(
            values("authorization"),
            [&b"Bearer operator-key"[..]],
            "{path}"
        );
        assert_eq!(values("x-org"), [&b"team-1"[..]], "{path}");
    }
}
