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
    let client = openai_stream_proxy::UpstreamClient::new(openai_stream_proxy::ClientOptions {
        proxy: None,
        roots: std::sync::Arc::new(rustls::RootCertStore::empty()),
        connect_timeout: None,
    })
    .unwrap();
    let proxy =
        start_proxy_with_client(&upstream.url(), options(), client, Duration::from_secs(1)).await;
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
