//! Graceful shutdown in-process: in-flight requests finish within the drain limit, and a
//! request still running when the limit is reached is cut, never left hanging.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

#[tokio::test]
async fn connections_still_open_at_the_drain_limit_are_cut() {
    let (tx, body) = channel_body();
    let body = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        response(
            200,
            &[],
            body.lock().unwrap().take().unwrap_or_else(|| full("")),
        )
    })
    .await;
    let proxy = start_proxy_with_client(
        &upstream.url(),
        options(),
        direct_client(),
        Duration::from_secs(1),
    )
    .await;
    let response = client_request(&proxy.url("/stuck")).await;
    tx.send(Ok(Bytes::from_static(b"partial"))).await.unwrap();

    let started = Instant::now();
    proxy.shutdown().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "returned before the drain limit: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "drain limit not enforced: {elapsed:?}"
    );
    let result = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body still hanging");
    assert!(result.is_err(), "a cut response must not end cleanly");
    drop(tx);
}

async fn client_request(url: &str) -> http::Response<hyper::body::Incoming> {
    let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
    tokio::time::timeout(WAIT, client().request(req))
        .await
        .unwrap()
        .unwrap()
}

/// At shutdown an idle keep-alive connection is closed at once, while a response still in
/// flight on another connection runs to its end; the server then stops without waiting for
/// the drain limit.
#[tokio::test]
async fn idle_connections_close_at_once_and_in_flight_responses_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (tx, body) = channel_body();
    let body = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |req| {
        if req.uri.path() == "/slow" {
            response(
                200,
                &[],
                body.lock().unwrap().take().unwrap_or_else(|| full("")),
            )
        } else {
            response(200, &[("content-length", "2")], full("ok"))
        }
    })
    .await;
    let drain = Duration::from_secs(20);
    let proxy = start_proxy_with_client(&upstream.url(), options(), direct_client(), drain).await;

    // An idle keep-alive connection, after one complete exchange.
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /quick HTTP/1.1\r\nHost: proxy.local\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut idle, b"\r\n\r\nok").await;
    // A response in flight on another connection.
    let slow = client_request(&proxy.url("/slow")).await;
    tx.send(Ok(Bytes::from_static(b"first "))).await.unwrap();

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("the idle connection was left open at shutdown")
        .unwrap();
    assert_eq!(n, 0, "unexpected bytes on the idle connection");
    tx.send(Ok(Bytes::from_static(b"last"))).await.unwrap();
    drop(tx);
    let got = tokio::time::timeout(WAIT, slow.into_body().collect())
        .await
        .expect("in-flight body hanging")
        .expect("the in-flight response was cut")
        .to_bytes();
    assert_eq!(&got[..], b"first last");
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("server still draining after its last response")
        .unwrap();
    assert!(started.elapsed() < drain / 2, "waited for the drain limit");
}

/// A client that connected and sent nothing has no request to finish: a stop closes its
/// connection at once, instead of the shutdown waiting for the header read timeout (30 s).
#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_the_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream =
        MockUpstream::start(|_| response(200, &[("content-length", "2")], full("ok"))).await;
    let drain = Duration::from_secs(20);
    let proxy = start_proxy_with_client(&upstream.url(), options(), direct_client(), drain).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Accepted in order: once a later connection is answered, the silent one is served.
    let mut other = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    other
        .write_all(b"GET /quick HTTP/1.1\r\nHost: proxy.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut other, b"\r\n\r\nok").await;

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the silent connection was left open at shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes on the silent connection");
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the shutdown waited on a connection that sent nothing")
        .unwrap();
    assert!(started.elapsed() < drain / 2, "waited for the drain limit");
}
