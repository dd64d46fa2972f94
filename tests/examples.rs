//! The axum example, exercised: its own route answers, and everything else reaches the
//! upstream through the mounted proxy, conversion included.

mod support;

#[path = "../examples/axum_mount.rs"]
mod axum_mount;

use http::Request;
use http_body_util::Full;
use openai_stream_proxy::UpstreamUrl;
use support::*;

#[tokio::test]
async fn axum_example_serves_its_routes_and_proxies_the_rest() {
    let upstream = MockUpstream::start(|r| {
        if r.uri.path().ends_with("/chat/completions") {
            response(
                200,
                &[("content-type", "text/event-stream")],
                full("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hey\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"),
            )
        } else {
            response(200, &[], full(format!("upstream saw {}", r.uri)))
        }
    })
    .await;
    let app = axum_mount::app(
        UpstreamUrl::parse(&upstream.url()).unwrap(),
        direct_client(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (parts, body) = send(
        Request::get(format!("http://{addr}/app/health"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    let (_, body) = send(
        Request::get(format!("http://{addr}/v1/models?x=1"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(&body[..], b"upstream saw /v1/models?x=1");
    let (parts, body) = send(post_json(
        &format!("http://{addr}/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["choices"][0]["message"]["content"], "hey");
    assert_eq!(json["object"], "chat.completion");
}
