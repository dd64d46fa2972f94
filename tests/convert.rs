//! Conversion through the running proxy: which requests convert, what the upstream receives,
//! what the client gets back, and every failure on the way. Streams here are the project's
//! own synthetic ones.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"x\"}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
    "data: [DONE]\n\n",
);

const RESPONSES_STREAM: &str = concat!(
    "event: response.created\n",
    "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
    "event: response.completed\n",
    "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"id\":\"msg_1\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":4,\"output_tokens\":1,\"total_tokens\":5},\"temperature\":1.0}}\n\n",
);

fn sse(body: &'static str) -> Response {
    response(
        200,
        &[
            ("content-type", "text/event-stream"),
            ("x-request-id", "req_42"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        ],
        full(body),
    )
}

type Response = http::Response<MockBody>;

async fn convert(
    upstream: &MockUpstream,
    path: &str,
    body: &str,
) -> (http::response::Parts, Bytes) {
    let proxy = start_proxy(&upstream.url(), options()).await;
    let req = Request::post(proxy.url(path))
        .header("content-type", "application/json; charset=utf-8")
        .header("authorization", "Bearer sk-test")
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    send(req).await
}

#[tokio::test]
async fn chat_request_is_rewritten_surgically_and_answered_with_one_body() {
    let upstream = MockUpstream::start(|_| sse(CHAT_STREAM)).await;
    let body = "{\"model\": \"m\",\n  \"messages\": [{\"role\":\"user\",\"content\":\"caf\\u00e9\"}], \"seed\": 18446744073709551615, \"top_p\": 1e-7, \"stream\": false, \"stream_options\": {\"include_obfuscation\": false}}";
    let (parts, got) = convert(&upstream, "/v1/chat/completions", body).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(parts.headers["content-length"], got.len().to_string());
    assert_eq!(parts.headers["x-request-id"], "req_42");
    assert!(
        parts.headers.get("cache-control").is_none()
            && parts.headers.get("x-accel-buffering").is_none()
    );
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(
        got,
        json!({"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"m-1",
               "choices":[{"index":0,"message":{"role":"assistant","content":"Hello","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],
               "usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"system_fingerprint":null})
    );

    let seen = upstream.single_request();
    let sent = String::from_utf8(seen.body.to_vec()).unwrap();
    assert_eq!(
        sent,
        "{\"model\": \"m\",\n  \"messages\": [{\"role\":\"user\",\"content\":\"caf\\u00e9\"}], \"seed\": 18446744073709551615, \"top_p\": 1e-7, \"stream\": true, \"stream_options\": {\"include_obfuscation\": false,\"include_usage\":true}}"
    );
    assert_eq!(seen.headers["content-length"], sent.len().to_string());
    assert_eq!(seen.headers["accept"], "text/event-stream");
    // Every coding the proxy decodes, whatever the client sent (D4).
    assert_eq!(seen.headers["accept-encoding"], "gzip, deflate, br, zstd");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test");
    assert_eq!(
        seen.headers["content-type"],
        "application/json; charset=utf-8"
    );
}

/// B19: the converted request keeps the path's query (Azure's `api-version`, say) on its
/// way upstream; B80/B84: the aggregated answer drops the upstream's hop-by-hop headers
/// (`connection`, what it names, `keep-alive`) and keeps the rest, repeated ones included.
#[tokio::test]
async fn a_conversion_keeps_the_query_and_drops_the_answers_hop_by_hop_headers() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[
                ("content-type", "text/event-stream"),
                ("connection", "x-hop, keep-alive"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("x-ratelimit-remaining-requests", "9"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
            ],
            full(CHAT_STREAM),
        )
    })
    .await;
    let (parts, got) = convert(
        &upstream,
        "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%20y",
        "{\"model\":\"m\"}",
    )
    .await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    let seen = upstream.single_request();
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%20y"
    );
    for name in ["connection", "x-hop", "keep-alive"] {
        assert!(parts.headers.get(name).is_none(), "{name} was relayed");
    }
    assert_eq!(parts.headers["x-ratelimit-remaining-requests"], "9");
    let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");
}

#[tokio::test]
async fn responses_request_gets_stream_true_only_and_the_completed_object() {
    let upstream = MockUpstream::start(|_| sse(RESPONSES_STREAM)).await;
    let (parts, got) = convert(
        &upstream,
        "/v1/responses",
        "{\"model\":\"m\",\"input\":\"hi\"}",
    )
    .await;
    assert_eq!(parts.status, 200);
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["id"], "resp_1");
    assert_eq!(got["status"], "completed");
    assert_eq!(got["output"][0]["content"][0]["text"], "Hi");
    assert_eq!(
        &upstream.single_request().body[..],
        b"{\"model\":\"m\",\"input\":\"hi\",\"stream\":true}"
    );
}

/// A conversion stops reading at `[DONE]` / `response.completed`, one chunk before the
/// body's end; the proxy still reads that end, so the upstream connection serves again.
#[tokio::test]
async fn conversions_leave_their_upstream_connection_reusable() {
    let chat: Vec<&'static str> = CHAT_STREAM.split_inclusive("\n\n").collect();
    let responses: Vec<&'static str> = RESPONSES_STREAM.split_inclusive("\n\n").collect();
    let upstream = MockUpstream::start(move |req| {
        let parts = if req.uri.path().ends_with("/responses") {
            &responses
        } else {
            &chat
        };
        response(
            200,
            &[("content-type", "text/event-stream")],
            chunked(parts),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for i in 0..6 {
        let (path, body) = if i % 2 == 0 {
            ("/v1/chat/completions", r#"{"model":"m","messages":[]}"#)
        } else {
            ("/v1/responses", r#"{"model":"m","input":"hi"}"#)
        };
        let (parts, got) = send(post_json(&proxy.url(path), body)).await;
        assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
        let got: Value = serde_json::from_slice(&got).unwrap();
        assert!(got["usage"]["total_tokens"] == 5, "{got}");
    }
    assert_eq!(upstream.requests().len(), 6);
    let used = upstream.connections_used();
    assert_eq!(used, 1, "6 conversions opened {used} upstream connections");
}

#[tokio::test]
async fn not_convertible_bodies_pass_through_with_the_exact_bytes() {
    let upstream = MockUpstream::start(|r| {
        response(
            200,
            &[("content-type", "application/json")],
            full(r.body.clone()),
        )
    })
    .await;
    for body in [
        "{\"model\":\"m\",\"stream\":\"true\"}",
        "{\"model\":\"m\",\"stream\":1}",
        "{\"messages\":[]}",
        "{\"model\":\"m\",",
        "[{\"model\":\"m\"}]",
        "",
    ] {
        let (parts, got) = convert(&upstream, "/v1/chat/completions", body).await;
        assert_eq!(parts.status, 200);
        assert_eq!(&got[..], body.as_bytes());
    }
    let (_, got) = convert(
        &upstream,
        "/v1/responses",
        "{\"model\":\"m\",\"background\":true}",
    )
    .await;
    assert_eq!(&got[..], b"{\"model\":\"m\",\"background\":true}");
    for r in upstream.requests() {
        assert!(
            r.headers.get("accept").is_none(),
            "passthrough must not ask for a stream"
        );
    }
}

#[tokio::test]
async fn convert_false_turns_conversion_off() {
    let upstream = MockUpstream::start(|r| response(200, &[], full(r.body.clone()))).await;
    let mut opts = options();
    opts.convert = false;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (_, got) = send(post_json(
        &proxy.url("/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(&got[..], b"{\"model\":\"m\"}");
}

#[tokio::test]
async fn upstream_errors_and_json_answers_are_relayed_unchanged() {
    let upstream = MockUpstream::start(|r| {
        if r.uri.path().ends_with("/responses") {
            response(200, &[("content-type", "application/json"), ("x-provider", "ignored-stream")], full("{\"id\":\"plain\"}"))
        } else {
            response(429, &[("content-type", "application/json"), ("retry-after", "3")], full("{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}"))
        }
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 429);
    assert_eq!(parts.headers["retry-after"], "3");
    assert_eq!(envelope(&got).1, "slow down");
    let (parts, got) = convert(&upstream, "/v1/responses", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-provider"], "ignored-stream");
    assert_eq!(&got[..], b"{\"id\":\"plain\"}");
}

#[tokio::test]
async fn event_streams_without_content_type_are_still_aggregated() {
    let upstream = MockUpstream::start(|_| response(200, &[], full(CHAT_STREAM))).await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200);
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");
}

/// D28: a 2xx with no `Content-Type`, or `application/octet-stream`, whose body starts like
/// an event stream is aggregated, however it starts (a byte-order mark, a comment, an
/// `event:` or `id:` field) and however the start is split across reads: a mark whose first
/// byte came alone was taken for a body that is not an event stream.
#[tokio::test]
async fn event_streams_labelled_octet_stream_or_unlabelled_are_sniffed_however_they_start() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let head = read_head(&mut stream).await;
        let query = head
            .split_whitespace()
            .nth(1)
            .and_then(|target| target.split_once('?'))
            .map(|(_, q)| q.to_owned())
            .unwrap_or_default();
        let label = if query.contains("octet") {
            "content-type: application/octet-stream\r\n"
        } else {
            ""
        };
        let (first, rest): (&[u8], Vec<u8>) = if query.contains("bom") {
            (b"\xEF", [b"\xBB\xBF".as_slice(), CHAT_STREAM.as_bytes()].concat())
        } else if query.contains("comment") {
            (b": keep", [b"-alive\n\n".as_slice(), CHAT_STREAM.as_bytes()].concat())
        } else if query.contains("event") {
            (b"ev", [b"ent: chunk\n".as_slice(), CHAT_STREAM.as_bytes()].concat())
        } else {
            (b"i", [b"d: 7\n".as_slice(), CHAT_STREAM.as_bytes()].concat())
        };
        let _ = stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\n{label}transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
                    first.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = stream.write_all(first).await;
        let _ = stream.write_all(b"\r\n").await;
        let _ = stream.flush().await;
        // Apart, so the proxy most likely reads the first piece on its own.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut tail = format!("{:x}\r\n", rest.len()).into_bytes();
        tail.extend_from_slice(&rest);
        tail.extend_from_slice(b"\r\n0\r\n\r\n");
        let _ = stream.write_all(&tail).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for label in ["none", "octet"] {
        for start in ["bom", "comment", "event", "id"] {
            let (parts, got) = send(post_json(
                &proxy.url(&format!("/v1/chat/completions?{label}-{start}")),
                "{\"model\":\"m\"}",
            ))
            .await;
            assert_answers_hello(&format!("{label} {start}"), &parts, &got);
        }
    }
}

/// W22: a 204 to a converted request. Labelled `text/event-stream`, it is an event stream
/// with no event: 502, as any stream that ends before its answer (B36). Unlabelled, it is not
/// an event stream and is relayed as the upstream sent it, with no body (D28), never a 200
/// with an invented JSON body.
#[tokio::test]
async fn a_204_to_a_conversion_is_an_empty_stream_or_relayed_by_its_label() {
    let upstream = MockUpstream::start(|r| {
        let labelled = r.uri.query() == Some("labelled");
        let mut headers = vec![("x-request-id", "req_204")];
        if labelled {
            headers.push(("content-type", "text/event-stream"));
        }
        response(204, &headers, full(Bytes::new()))
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = send(post_json(
        &proxy.url("/v1/chat/completions?labelled"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 502, "{}", String::from_utf8_lossy(&got));
    let (kind, message) = envelope(&got);
    assert_eq!(kind, "upstream_error");
    assert!(message.contains("ended before"), "{message}");
    let (parts, got) = send(post_json(
        &proxy.url("/v1/chat/completions?plain"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 204, "{}", String::from_utf8_lossy(&got));
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(parts.headers["x-request-id"], "req_204");
    // Each went upstream once, as a streaming request.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| r.body.windows(13).any(|w| w == b"\"stream\":true")));
}

/// A 200 whose JSON body is the aggregated `CHAT_STREAM` ("Hello"); `case` names the
/// variant in failure messages.
fn assert_answers_hello(case: &str, parts: &http::response::Parts, body: &[u8]) {
    assert_eq!(
        parts.status,
        200,
        "{case}: {}",
        String::from_utf8_lossy(body)
    );
    let got: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello", "{case}");
}

async fn encode(coding: &str, data: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{
        BrotliEncoder, DeflateEncoder, GzipEncoder, ZlibEncoder, ZstdEncoder,
    };
    let mut out = Vec::new();
    match coding {
        "gzip" => GzipEncoder::new(data).read_to_end(&mut out).await.unwrap(),
        "br" => BrotliEncoder::new(data)
            .read_to_end(&mut out)
            .await
            .unwrap(),
        "zstd" => ZstdEncoder::new(data).read_to_end(&mut out).await.unwrap(),
        "deflate" => ZlibEncoder::new(data).read_to_end(&mut out).await.unwrap(),
        "raw-deflate" => DeflateEncoder::new(data)
            .read_to_end(&mut out)
            .await
            .unwrap(),
        _ => unreachable!(),
    };
    out
}

#[tokio::test]
async fn compressed_streams_are_decoded_before_aggregation() {
    for coding in ["gzip", "br", "zstd", "deflate", "raw-deflate"] {
        let encoded = Bytes::from(encode(coding, CHAT_STREAM.as_bytes()).await);
        let header = if coding == "raw-deflate" {
            "deflate"
        } else {
            coding
        };
        let upstream = MockUpstream::start(move |_| {
            response(
                200,
                &[
                    ("content-type", "text/event-stream"),
                    ("content-encoding", header),
                ],
                full(encoded.clone()),
            )
        })
        .await;
        let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
        assert_answers_hello(coding, &parts, &got);
        assert!(parts.headers.get("content-encoding").is_none());
    }
}

/// A compressed stream, like a plain one, is read to its end after `[DONE]` so that its
/// upstream connection serves the next conversion.
#[tokio::test]
async fn compressed_conversions_leave_their_upstream_connection_reusable() {
    for coding in ["gzip", "br", "zstd", "deflate"] {
        let encoded = Bytes::from(encode(coding, CHAT_STREAM.as_bytes()).await);
        let upstream = MockUpstream::start(move |_| {
            // Three frames of no declared length: the end of the body (its last chunk) comes
            // after the frame that completes `[DONE]`.
            let third = encoded.len() / 3;
            let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = [
                encoded.slice(..third),
                encoded.slice(third..2 * third),
                encoded.slice(2 * third..),
            ]
            .into_iter()
            .map(|part| Ok(http_body::Frame::data(part)))
            .collect();
            let body =
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
            response(
                200,
                &[
                    ("content-type", "text/event-stream"),
                    ("content-encoding", coding),
                ],
                body,
            )
        })
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;
        for _ in 0..4 {
            let (parts, got) = send(post_json(
                &proxy.url("/v1/chat/completions"),
                r#"{"model":"m","messages":[]}"#,
            ))
            .await;
            assert_answers_hello(coding, &parts, &got);
        }
        let used = upstream.connections_used();
        assert_eq!(
            used, 1,
            "{coding}: 4 conversions opened {used} upstream connections"
        );
    }
}

#[tokio::test]
async fn in_stream_errors_become_envelopes_with_fitting_status() {
    let upstream = MockUpstream::start(|r| {
        let body: &'static str = if r.uri.path().ends_with("/chat/completions") {
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"error\":{\"message\":\"overloaded now\",\"type\":\"server_error\",\"code\":\"server_is_overloaded\"}}\n\ndata: [DONE]\n\n"
        } else if r.uri.path().ends_with("/failed/responses") {
            "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"r\",\"status\":\"failed\",\"error\":{\"code\":\"rate_limit_exceeded\",\"message\":\"too many\"},\"output\":[]}}\n\n"
        } else {
            "event: error\ndata: {\"type\":\"error\",\"code\":\"invalid_prompt\",\"message\":\"bad prompt\",\"param\":\"input\"}\n\n"
        };
        sse(body)
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 503);
    assert_eq!(envelope(&got).1, "overloaded now");
    assert_eq!(
        parts.headers["x-request-id"], "req_42",
        "upstream headers kept on reported errors"
    );
    let (parts, got) = convert(&upstream, "/v1/failed/responses", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 429);
    assert_eq!(
        envelope(&got),
        ("rate_limit_error".to_owned(), "too many".to_owned())
    );
    let (parts, got) = convert(&upstream, "/v1/responses", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 400);
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["error"]["param"], "input");
    assert_eq!(v["error"]["code"], "invalid_prompt");
}

#[tokio::test]
async fn truncated_or_corrupt_streams_are_502_and_clean_ends_after_finish_reason_are_accepted() {
    let upstream = MockUpstream::start(|r| {
        let body: &'static str = match r.uri.path() {
            "/truncated/v1/chat/completions" => "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"},\"finish_reason\":null}]}\n\n",
            "/corrupt/v1/chat/completions" => "data: {\"id\":\"c\",\"choices\":[]}\n\ndata: {not json\n\ndata: [DONE]\n\n",
            "/truncated/v1/responses" => "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n",
            _ => "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}",
        };
        sse(body)
    })
    .await;
    for path in [
        "/truncated/v1/chat/completions",
        "/corrupt/v1/chat/completions",
        "/truncated/v1/responses",
    ] {
        let (parts, got) = convert(&upstream, path, "{\"model\":\"m\"}").await;
        assert_eq!(parts.status, 502, "{path}");
        assert_eq!(envelope(&got).0, "upstream_error");
    }
    let (parts, got) = convert(&upstream, "/clean/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "ok");
}

#[tokio::test]
async fn events_split_across_tiny_chunks_and_crlf_aggregate_the_same() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let body = CHAT_STREAM.replace("\n", "\r\n");
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n").await;
        for piece in body.as_bytes().chunks(3) {
            let _ = stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await;
            let _ = stream.write_all(piece).await;
            let _ = stream.write_all(b"\r\n").await;
            let _ = stream.flush().await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = send(post_json(
        &proxy.url("/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 200);
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");
    assert_eq!(got["usage"]["total_tokens"], 5);
}

#[tokio::test]
async fn upstream_silence_is_504_before_headers_and_mid_stream() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let head = read_head(&mut stream).await;
        if head.contains("/mid/") {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n").await;
        }
        tokio::time::sleep(WAIT).await;
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    for path in ["/v1/chat/completions", "/mid/v1/chat/completions"] {
        let (parts, got) = send(post_json(&proxy.url(path), "{\"model\":\"m\"}")).await;
        assert_eq!(parts.status, 504, "{path}");
        assert_eq!(envelope(&got).0, "upstream_timeout");
    }
}

#[tokio::test]
async fn client_disconnect_while_aggregating_cancels_the_upstream() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_tx = Arc::new(Mutex::new(Some(closed_tx)));
    let upstream = RawUpstream::start(move |mut stream| {
        let closed_tx = closed_tx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n").await;
            let mut buf = [0u8; 256];
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
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let body = "{\"model\":\"m\"}";
    stream
        .write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    // The upstream has answered its head once it waits for our close; give it the request,
    // then leave.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    tokio::time::timeout(Duration::from_secs(2), closed_rx)
        .await
        .expect("upstream not cancelled")
        .unwrap();
}

#[tokio::test]
async fn body_limits_give_413_and_502() {
    let upstream = MockUpstream::start(|_| sse(CHAT_STREAM)).await;
    let mut opts = options();
    opts.max_request_body_bytes = 64;
    opts.max_response_bytes = 100;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let big = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(100));
    let (parts, got) = send(post_json(&proxy.url("/v1/chat/completions"), &big)).await;
    assert_eq!(parts.status, 413);
    assert!(envelope(&got).1.contains("64 bytes"));
    let (parts, got) = send(post_json(
        &proxy.url("/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 502);
    assert!(envelope(&got).1.contains("maxResponseBytes"));
    // Chunked uploads (no content-length) are cut at the limit too.
    let out = raw_exchange(
        proxy.addr,
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).as_bytes(),
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 413"));
}

/// A client that writes its whole request body before it reads gets the 413 envelope, with
/// either framing. The proxy answers as soon as the limit is passed and closes without
/// reading the rest, so the client's writes fail (httpx, and so the OpenAI Python SDK, then
/// reads the answer anyway, as this test does). The close meets unread bytes and resets the
/// connection; Linux still hands the client the answer that arrived before the reset.
#[tokio::test]
async fn an_oversized_upload_written_whole_before_reading_gets_the_413() {
    let upstream = MockUpstream::start(|_| sse(CHAT_STREAM)).await;
    let mut opts = options();
    opts.max_request_body_bytes = 1024;
    let proxy = start_proxy(&upstream.url(), opts).await;
    const SIZE: usize = 16 << 20;
    for declared in [true, false] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let framing = if declared {
            format!("content-length: {SIZE}")
        } else {
            "transfer-encoding: chunked".to_owned()
        };
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let block = vec![b' '; 64 << 10];
        let mut written = 0;
        let mut write_error = None;
        while written < SIZE {
            let result = if declared {
                tokio::time::timeout(WAIT, stream.write_all(&block)).await
            } else {
                let mut framed = format!("{:x}\r\n", block.len()).into_bytes();
                framed.extend_from_slice(&block);
                framed.extend_from_slice(b"\r\n");
                tokio::time::timeout(WAIT, stream.write_all(&framed)).await
            };
            match result {
                Ok(Ok(())) => written += block.len(),
                Ok(Err(e)) => {
                    write_error = Some(e);
                    break;
                }
                Err(_) => panic!("declared {declared}: the upload stalled after {written} bytes"),
            }
        }
        if !declared && write_error.is_none() {
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
            .await
            .expect("the answer hung");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "declared {declared}: write error {write_error:?}, read {read:?}, answer {answer:?}"
        );
        assert!(answer.contains("invalid_request_error"), "{answer}");
    }
}

#[tokio::test]
async fn keep_alive_commits_early_and_sends_spaces_until_the_json() {
    let upstream = RawUpstream::start(|mut stream| async move {
        let head = read_head(&mut stream).await;
        // One request per connection: the script never reads a second one.
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n").await;
        // 2.5 s of comment lines (so the idle timeout never fires), then the answer.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = stream.write_all(b"3\r\n:\n\n\r\n").await;
        }
        let tail: &str = if head.contains("/fail/") { "data: {\"error\":{\"message\":\"late failure\",\"type\":\"server_error\"}}\n\n" } else { CHAT_STREAM };
        let _ = stream.write_all(format!("{:x}\r\n{tail}\r\n0\r\n\r\n", tail.len()).as_bytes()).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    })
    .await;
    let mut opts = options();
    opts.keep_alive = Some(Duration::from_secs(1));
    let proxy = start_proxy(&upstream.url(), opts).await;
    let response = client()
        .request(post_json(
            &proxy.url("/v1/chat/completions"),
            "{\"model\":\"m\"}",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.starts_with(' '), "no keep-alive space: {text:?}");
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");

    let response = client()
        .request(post_json(
            &proxy.url("/fail/v1/chat/completions"),
            "{\"model\":\"m\"}",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "committed before the failure");
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(envelope(body.trim_ascii()).1, "late failure");
}

#[tokio::test]
async fn refusals_of_the_streaming_form_fall_back_once_each() {
    let upstream = MockUpstream::start(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let refuse = |message: &str, param: &str| {
            response(400, &[("content-type", "application/json")], full(json!({"error":{"message":message,"type":"invalid_request_error","param":param,"code":null}}).to_string()))
        };
        match (body.get("stream_options").is_some(), body.get("stream").is_some()) {
            (true, _) => refuse("Unrecognized request argument supplied: stream_options", "stream_options"),
            (false, true) => refuse("This model does not support 'stream'", "stream"),
            (false, false) => response(200, &[("content-type", "application/json")], full("{\"id\":\"plain-answer\"}")),
        }
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&got[..], b"{\"id\":\"plain-answer\"}");
    let bodies: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        vec![
            "{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
                .to_owned(),
            "{\"model\":\"m\",\"stream\":true}".to_owned(),
            "{\"model\":\"m\"}".to_owned(),
        ]
    );
}

#[tokio::test]
async fn unrelated_400s_are_relayed_without_retrying() {
    let upstream = MockUpstream::start(|_| {
        response(400, &[("content-type", "application/json")], full("{\"error\":{\"message\":\"upstream says: bad model\",\"type\":\"invalid_request_error\",\"param\":\"model\",\"code\":null}}"))
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 400);
    assert_eq!(envelope(&got).1, "upstream says: bad model");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn unreachable_upstream_is_502_for_conversions() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start_proxy(&format!("http://127.0.0.1:{port}"), options()).await;
    let (parts, got) = send(post_json(&proxy.url("/v1/responses"), "{\"model\":\"m\"}")).await;
    assert_eq!(parts.status, 502);
    assert_eq!(envelope(&got).0, "upstream_error");
}

#[tokio::test]
async fn in_stream_http_status_codes_and_rate_limit_types_set_the_status() {
    let upstream = MockUpstream::start(|r| {
        let body: &'static str = match r.uri.path() {
            "/num/v1/chat/completions" => "data: {\"error\":{\"message\":\"numeric\",\"code\":429}}\n\n",
            "/text/v1/chat/completions" => "data: {\"error\":{\"message\":\"text\",\"code\":\"429\"}}\n\n",
            "/typed/v1/chat/completions" => "data: {\"error\":{\"message\":\"typed\",\"type\":\"rate_limit_exceeded\"}}\n\n",
            "/gateway/v1/chat/completions" => "data: {\"error\":{\"message\":\"gateway\",\"code\":503}}\n\n",
            "/typed/v1/responses" => "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"typed\"}}\n\n",
            _ => "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"r\",\"status\":\"failed\",\"error\":{\"code\":429,\"message\":\"numeric\"},\"output\":[]}}\n\n",
        };
        sse(body)
    })
    .await;
    for (path, status, ty) in [
        ("/num/v1/chat/completions", 429, "rate_limit_error"),
        ("/text/v1/chat/completions", 429, "rate_limit_error"),
        ("/typed/v1/chat/completions", 429, "rate_limit_exceeded"),
        ("/gateway/v1/chat/completions", 503, "server_error"),
        ("/typed/v1/responses", 429, "rate_limit_error"),
        ("/failed/v1/responses", 429, "rate_limit_error"),
    ] {
        let (parts, got) = convert(&upstream, path, "{\"model\":\"m\"}").await;
        assert_eq!(
            parts.status,
            status,
            "{path}: {}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(envelope(&got).0, ty, "{path}");
    }
}

#[tokio::test]
async fn stream_options_retry_drops_the_clients_own_stream_options_too() {
    let upstream = MockUpstream::start(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        if body.get("stream_options").is_some() {
            response(400, &[("content-type", "application/json")], full(json!({"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":"stream_options","code":null}}).to_string()))
        } else {
            sse(CHAT_STREAM)
        }
    })
    .await;
    let (parts, got) = convert(
        &upstream,
        "/v1/chat/completions",
        "{\"model\":\"m\",\"stream_options\":{\"include_obfuscation\":false},\"stream\":false,\"n\":1}",
    )
    .await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");
    let bodies: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        vec![
            "{\"model\":\"m\",\"stream_options\":{\"include_obfuscation\":false,\"include_usage\":true},\"stream\":true,\"n\":1}".to_owned(),
            "{\"model\":\"m\",\"stream\":true,\"n\":1}".to_owned(),
        ]
    );
}

/// Sends `body` to `path` with the client's `accept-encoding` (none when `None`).
async fn convert_accepting(
    proxy: &ProxyHandle,
    path: &str,
    accept_encoding: Option<&str>,
) -> (http::response::Parts, Bytes) {
    let mut req = Request::post(proxy.url(path)).header("content-type", "application/json");
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    send(
        req.body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .unwrap(),
    )
    .await
}

/// A mock that, like real servers, compresses with the first coding it is offered.
async fn coding_upstream() -> (MockUpstream, Bytes) {
    const ERROR: &str = "{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}";
    let gzip_error = Bytes::from(encode("gzip", ERROR.as_bytes()).await);
    let br_stream = Bytes::from(encode("br", CHAT_STREAM.as_bytes()).await);
    let gz = gzip_error.clone();
    let upstream = MockUpstream::start(move |r| {
        let offered = r
            .headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let first = offered.split(',').next().unwrap_or("").trim().to_owned();
        if r.uri.path().starts_with("/sse/") {
            assert!(offered.contains("br"), "offer {offered:?}");
            return response(
                200,
                &[
                    ("content-type", "text/event-stream"),
                    ("content-encoding", "br"),
                ],
                full(br_stream.clone()),
            );
        }
        // A 400 is read whole by the proxy (to look for a refusal), a 429 streamed through.
        let status = if r.uri.path().starts_with("/400/") {
            400
        } else {
            429
        };
        match first.as_str() {
            "gzip" => response(
                status,
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                full(gz.clone()),
            ),
            _ => response(status, &[("content-type", "application/json")], full(ERROR)),
        }
    })
    .await;
    (upstream, gzip_error)
}

#[tokio::test]
async fn relayed_answers_are_decoded_unless_the_client_accepts_their_coding() {
    let (upstream, gzip_error) = coding_upstream().await;
    let proxy = start_proxy(&upstream.url(), options()).await;

    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_eq!(parts.status, 429);
    assert!(parts.headers.get("content-encoding").is_none());
    assert_eq!(envelope(&got).1, "slow down");

    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", Some("gzip")).await;
    assert_eq!(parts.status, 429);
    assert_eq!(parts.headers["content-encoding"], "gzip");
    assert_eq!(got, gzip_error, "relayed byte for byte");

    for path in ["/400/v1/chat/completions", "/400/v1/responses"] {
        let (parts, got) = convert_accepting(&proxy, path, None).await;
        assert_eq!(parts.status, 400);
        assert!(parts.headers.get("content-encoding").is_none());
        assert_eq!(envelope(&got).1, "slow down");
        let (parts, got) = convert_accepting(&proxy, path, Some("gzip")).await;
        assert_eq!(parts.status, 400);
        assert_eq!(parts.headers["content-encoding"], "gzip");
        assert_eq!(got, gzip_error, "{path}: relayed byte for byte");
    }

    let (parts, got) =
        convert_accepting(&proxy, "/sse/v1/chat/completions", Some("br, gzip;q=0.5")).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    assert!(parts.headers.get("content-encoding").is_none());
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hello");

    let offers: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| r.headers["accept-encoding"].to_str().unwrap().to_owned())
        .collect();
    assert!(
        offers
            .iter()
            .all(|offer| offer == "gzip, deflate, br, zstd"),
        "{offers:?}"
    );

    // Accepting other codings but not gzip: decoded too.
    let (parts, got) =
        convert_accepting(&proxy, "/v1/chat/completions", Some("br, gzip;q=0")).await;
    assert_eq!(parts.status, 429);
    assert!(parts.headers.get("content-encoding").is_none());
    assert_eq!(parts.headers["content-length"], got.len().to_string());
    assert_eq!(envelope(&got).1, "slow down");
}

#[tokio::test]
async fn compressed_refusals_are_decoded_before_looking_for_stream_options() {
    let refusal = json!({"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":"stream_options","code":null}}).to_string();
    let mut encoded = Vec::new();
    for coding in ["gzip", "br", "zstd", "deflate"] {
        encoded.push((
            coding,
            Bytes::from(encode(coding, refusal.as_bytes()).await),
        ));
    }
    let encoded = Arc::new(encoded);
    let upstream = MockUpstream::start(move |r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        if body.get("stream_options").is_none() {
            return sse(CHAT_STREAM);
        }
        let coding = r.uri.path().split('/').nth(1).unwrap_or("");
        let (name, data) = encoded.iter().find(|(c, _)| *c == coding).unwrap();
        response(
            400,
            &[
                ("content-type", "application/json"),
                ("content-encoding", name),
            ],
            full(data.clone()),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    for coding in ["gzip", "br", "zstd", "deflate"] {
        let (parts, got) =
            convert_accepting(&proxy, &format!("/{coding}/v1/chat/completions"), Some("*")).await;
        assert_answers_hello(coding, &parts, &got);
    }
    let retried = upstream
        .requests()
        .iter()
        .filter(|r| !r.body.windows(14).any(|w| w == b"stream_options"))
        .count();
    assert_eq!(retried, 4, "one retry per coding");
}

#[tokio::test]
async fn large_upstream_400_bodies_are_relayed_unchanged() {
    // Past the 256 KiB the proxy reads to look for a refusal, in small frames so the cap is
    // crossed in the middle of the body.
    let big: Bytes = format!(
        "{{\"error\":{{\"message\":\"{}\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}}}",
        "stream ".repeat(100_000)
    )
    .into();
    let body = big.clone();
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = channel_body();
        let body = body.clone();
        tokio::spawn(async move {
            for piece in body.chunks(16 * 1024) {
                if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                    return;
                }
            }
        });
        response(400, &[("content-type", "application/json")], rx)
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 400);
    assert_eq!(got.len(), big.len());
    assert!(got == big, "body changed");
    assert_eq!(upstream.requests().len(), 1, "a large body is no refusal");
}

#[tokio::test]
async fn late_relayed_answers_become_plain_json_in_the_committed_200() {
    const ERROR: &str = "{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}";
    let gzip_error = Bytes::from(encode("gzip", ERROR.as_bytes()).await);
    let gzip_plain = Bytes::from(encode("gzip", b"{\"id\":\"plain\"}").await);
    // The upstream answers only once the test has seen the committed 200.
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let permits = go.clone();
    let upstream = RawUpstream::start(move |mut stream| {
        let (gzip_error, gzip_plain, permits) =
            (gzip_error.clone(), gzip_plain.clone(), permits.clone());
        async move {
            let head = read_head(&mut stream).await;
            match tokio::time::timeout(WAIT, permits.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => return,
            }
            let (status, ctype, coding, body) = if head.contains("/gz/") {
                ("429 Too Many Requests", "application/json", "gzip", gzip_error)
            } else if head.contains("/json/") {
                ("200 OK", "application/json", "gzip", gzip_plain)
            } else {
                ("502 Bad Gateway", "text/html", "identity", Bytes::from_static(b"<html>bad gateway</html>"))
            };
            let head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: {ctype}\r\ncontent-encoding: {coding}\r\nx-request-id: late\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        }
    })
    .await;
    let mut opts = options();
    opts.keep_alive = Some(Duration::from_millis(300));
    let proxy = start_proxy(&upstream.url(), opts).await;
    for path in [
        "/gz/v1/chat/completions",
        "/json/v1/responses",
        "/html/v1/chat/completions",
    ] {
        let req = Request::post(proxy.url(path))
            .header("content-type", "application/json")
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .unwrap();
        let response = tokio::time::timeout(WAIT, client().request(req))
            .await
            .expect("no committed head")
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().get("content-encoding").is_none());
        assert!(
            response.headers().get("x-request-id").is_none(),
            "a late answer's headers cannot follow the committed head"
        );
        go.add_permits(1);
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        let json = body.trim_ascii();
        match path {
            "/gz/v1/chat/completions" => assert_eq!(json, ERROR.as_bytes()),
            "/json/v1/responses" => assert_eq!(json, b"{\"id\":\"plain\"}"),
            _ => {
                let (ty, message) = envelope(json);
                assert_eq!(ty, "upstream_error");
                assert!(
                    message.contains("502") && message.contains("not JSON"),
                    "{message}"
                );
            }
        }
    }
}

fn responses_sse(events: &[Value]) -> Response {
    let mut body = String::new();
    for event in events {
        body.push_str(&format!(
            "event: {}\ndata: {event}\n\n",
            event["type"].as_str().unwrap()
        ));
    }
    response(
        200,
        &[
            ("content-type", "text/event-stream"),
            ("x-request-id", "req_r"),
        ],
        full(body),
    )
}

#[tokio::test]
async fn incomplete_responses_are_200_with_the_incomplete_object() {
    let upstream = MockUpstream::start(|_| {
        responses_sse(&[
            json!({"type":"response.created","response":{"id":"resp_i","object":"response","status":"in_progress","output":[]}}),
            json!({"type":"response.incomplete","response":{"id":"resp_i","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[{"type":"message","id":"msg_1","role":"assistant","status":"incomplete","content":[{"type":"output_text","text":"Par","annotations":[]}]}],"usage":{"input_tokens":3,"output_tokens":16,"total_tokens":19}}}),
        ])
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/responses", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    assert_eq!(parts.headers["x-request-id"], "req_r");
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["status"], "incomplete");
    assert_eq!(got["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(got["output"][0]["content"][0]["text"], "Par");
    assert_eq!(got["usage"]["output_tokens"], 16);
}

#[tokio::test]
async fn responses_output_is_rebuilt_from_deltas_and_usage_from_an_earlier_event() {
    let upstream = MockUpstream::start(|_| {
        responses_sse(&[
            json!({"type":"response.created","response":{"id":"resp_d","object":"response","status":"in_progress","output":[]}}),
            json!({"type":"response.in_progress","response":{"id":"resp_d","object":"response","status":"in_progress","output":[],"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9}}}),
            json!({"type":"response.output_text.delta","item_id":"msg_d","output_index":0,"content_index":0,"delta":"Hel"}),
            json!({"type":"response.output_text.delta","item_id":"msg_d","output_index":0,"content_index":0,"delta":"lo"}),
            json!({"type":"response.completed","response":{"id":"resp_d","object":"response","status":"completed","output":[],"usage":null}}),
        ])
    })
    .await;
    let (parts, got) = convert(&upstream, "/v1/responses", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["status"], "completed");
    assert_eq!(
        got["output"],
        json!([{"id":"msg_d","type":"message","role":"assistant",
                "content":[{"type":"output_text","annotations":[],"text":"Hello"}]}])
    );
    assert_eq!(
        got["usage"],
        json!({"input_tokens":7,"output_tokens":2,"total_tokens":9})
    );
}

#[tokio::test]
async fn tool_call_fragments_with_reused_index_or_no_index_are_all_kept() {
    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\":1}\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"b\",\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":\"{\\\"y\\\":\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"2}\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"id\":\"p\",\"type\":\"function\",\"function\":{\"name\":\"h\",\"arguments\":\"AB\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"C\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"id\":\"a\",\"function\":{\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let upstream = MockUpstream::start(|_| sse(STREAM)).await;
    let (parts, got) = convert(&upstream, "/v1/chat/completions", "{\"model\":\"m\"}").await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(got["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        got["choices"][0]["message"]["tool_calls"],
        json!([
            {"id":"a","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}},
            {"id":"b","type":"function","function":{"name":"g","arguments":"{\"y\":2}"}},
            {"id":"p","type":"function","function":{"name":"h","arguments":"ABC"}}
        ])
    );
}

#[tokio::test]
async fn get_and_text_plain_posts_on_chat_completions_pass_through_exactly() {
    let upstream = MockUpstream::start(|r| {
        let mut answer = format!("{} ", r.method).into_bytes();
        answer.extend_from_slice(&r.body);
        response(
            200,
            &[("content-type", "application/octet-stream")],
            full(answer),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = send(
        Request::get(proxy.url("/v1/chat/completions?limit=2"))
            .header("accept-encoding", "br")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(&got[..], b"GET ");
    let body = "{\"model\":\"m\", \"stream\": false}";
    let (parts, got) = send(
        Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "text/plain")
            .header("accept-encoding", "br")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(got, format!("POST {body}").as_bytes());
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].uri.query(), Some("limit=2"));
    assert_eq!(&seen[1].body[..], body.as_bytes());
    for r in &seen {
        assert!(r.headers.get("accept").is_none(), "no stream asked for");
        assert_eq!(
            r.headers["accept-encoding"], "br",
            "client's own header kept"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fallbacks_are_logged() {
    let lines = support::log_capture::LogCapture::default();
    let _guard = lines.install();

    let upstream = MockUpstream::start(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let refuse = |message: &str, param: &str| {
            response(400, &[("content-type", "application/json")], full(json!({"error":{"message":message,"type":"invalid_request_error","param":param,"code":null}}).to_string()))
        };
        let plain_only = r.uri.path().starts_with("/plain/");
        match (body.get("stream_options").is_some(), body.get("stream").is_some()) {
            (true, _) => refuse("Unrecognized request argument supplied: stream_options", "stream_options"),
            (false, true) if plain_only => refuse("This model does not support 'stream'", "stream"),
            (false, true) => sse(CHAT_STREAM),
            (false, false) => response(200, &[("content-type", "application/json")], full("{\"id\":\"plain-answer\"}")),
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let port = format!("port={}", proxy.label);
    // A callsite another thread was registering while the capture's process-wide
    // subscriber was first set may have cached "never"; recompute every cached interest.
    tracing::callsite::rebuild_interest_cache();

    let (parts, _) = send(post_json(
        &proxy.url("/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 200);
    lines
        .line_with(&[
            "refused the streaming form",
            "fallback=without_stream_options",
        ])
        .await;
    let line = lines
        .line_with(&[
            "request",
            &port,
            "mode=convert",
            "fallback=without_stream_options",
        ])
        .await;
    assert!(line.contains("terminal=done"), "{line}");
    assert!(line.contains("total_tokens=5"), "{line}");

    let (parts, got) = send(post_json(
        &proxy.url("/plain/v1/chat/completions"),
        "{\"model\":\"m\"}",
    ))
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(&got[..], b"{\"id\":\"plain-answer\"}");
    lines
        .line_with(&["refused the streaming form", "fallback=plain"])
        .await;
    // The plain answer is relayed, not aggregated: the access line names the fallback and
    // no terminal event.
    let line = lines
        .line_with(&[
            "request",
            &port,
            "path=/plain/v1/chat/completions",
            "fallback=plain",
        ])
        .await;
    assert!(line.contains("mode=convert"), "{line}");
    assert!(!line.contains("terminal="), "{line}");
}

/// A gzip body may be several members and a zstd one several frames (a server that
/// compresses each flush on its own): every one is decoded, in an aggregated stream and in
/// a relayed answer, not only the first, which would end the body early.
#[tokio::test]
async fn every_gzip_member_and_zstd_frame_is_decoded() {
    const ERROR: &str = "{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":null}}";
    // The split falls after the "Hel" chunk: the first part alone is a cut stream.
    let split = CHAT_STREAM.find("\"lo\"").unwrap() - 100;
    for coding in ["gzip", "zstd"] {
        let mut stream = encode(coding, &CHAT_STREAM.as_bytes()[..split]).await;
        stream.extend(encode(coding, &CHAT_STREAM.as_bytes()[split..]).await);
        let mut error = encode(coding, &ERROR.as_bytes()[..20]).await;
        error.extend(encode(coding, &ERROR.as_bytes()[20..]).await);
        let (stream, error) = (Bytes::from(stream), Bytes::from(error));
        let upstream = MockUpstream::start(move |r| {
            let (status, kind, body) = if r.uri.path().starts_with("/429/") {
                (429, "application/json", error.clone())
            } else {
                (200, "text/event-stream", stream.clone())
            };
            response(
                status,
                &[("content-type", kind), ("content-encoding", coding)],
                full(body),
            )
        })
        .await;
        let proxy = start_proxy(&upstream.url(), options()).await;

        let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
        assert_answers_hello(coding, &parts, &got);
        let got: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(got["usage"]["total_tokens"], 5, "{coding}");

        let (parts, got) = convert_accepting(&proxy, "/429/v1/chat/completions", None).await;
        assert_eq!(parts.status, 429, "{coding}");
        assert!(parts.headers.get("content-encoding").is_none(), "{coding}");
        assert_eq!(&got[..], ERROR.as_bytes(), "{coding}");
    }
}

/// An empty body in a coding the client did not offer is the upstream's answer as it is,
/// not a body that failed to decode: the client gets the upstream's status, not a 502.
#[tokio::test]
async fn an_empty_compressed_answer_is_relayed_with_its_status() {
    let upstream = MockUpstream::start(|_| {
        response(
            429,
            &[("content-encoding", "br"), ("retry-after", "3")],
            full(""),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", Some("gzip")).await;
    assert_eq!(parts.status, 429, "{}", String::from_utf8_lossy(&got));
    assert_eq!(parts.headers["retry-after"], "3");
    assert!(parts.headers.get("content-encoding").is_none());
    assert!(got.is_empty());
}

/// An upstream that falls silent in the middle of a compressed answer the proxy decodes
/// for the client is a timeout (504), as silence is everywhere else (D13).
#[tokio::test]
async fn silence_in_a_compressed_answer_being_decoded_is_a_timeout() {
    let (tx, body) = channel_body();
    let body = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        response(
            500,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            body.lock().unwrap().take().unwrap_or_else(|| full("")),
        )
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let gzip_start = encode("gzip", b"{\"error\":{\"message\":\"broken\"}}").await;
    tx.send(Ok(Bytes::copy_from_slice(&gzip_start[..10])))
        .await
        .unwrap();
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_eq!(parts.status, 504, "{}", String::from_utf8_lossy(&got));
    assert_eq!(envelope(&got).0, "upstream_timeout");
    drop(tx);
}

/// A body that sends `parts` as frames of their own, `gap` after each.
fn frames(parts: Vec<Bytes>, gap: Duration) -> MockBody {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for part in parts {
            if tx.send(Ok(part)).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    body
}

/// `maxResponseBytes` counts the stream up to its terminal event: blank lines after
/// `[DONE]` in the same read do not push a stream that fits over the limit, however the
/// bytes are cut into reads.
#[tokio::test]
async fn bytes_after_the_terminal_event_do_not_count_against_max_response_bytes() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            full(format!("{CHAT_STREAM}\n\n\n")),
        )
    })
    .await;
    let mut opts = options();
    opts.max_response_bytes = CHAT_STREAM.len() as u64;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_answers_hello("stream exactly at the limit", &parts, &got);

    // One byte less and the terminal event no longer fits.
    let mut opts = options();
    opts.max_response_bytes = CHAT_STREAM.len() as u64 - 1;
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_eq!(parts.status, 502, "{}", String::from_utf8_lossy(&got));
    assert!(envelope(&got).1.contains("maxResponseBytes"));
}

/// Raw deflate (what some servers send as `deflate`) whose first body frame is one byte:
/// the zlib-or-raw check reads its two bytes across frames.
#[tokio::test]
async fn raw_deflate_split_after_its_first_byte_is_decoded() {
    let coded = Bytes::from(encode("raw-deflate", CHAT_STREAM.as_bytes()).await);
    let upstream = MockUpstream::start(move |_| {
        let parts = vec![coded.slice(..1), coded.slice(1..)];
        response(
            200,
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "deflate"),
            ],
            frames(parts, Duration::ZERO),
        )
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_answers_hello("raw deflate, one byte first", &parts, &got);
}

/// D13 on a compressed stream: the timeout is silence between upstream bytes, and bytes
/// that decode to nothing yet (empty flush blocks, as a server flushing its compressor
/// while the model thinks sends them) are not silence.
#[tokio::test]
async fn compressed_bytes_that_decode_to_nothing_keep_the_stream_alive() {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.flush().unwrap();
    let start = encoder.get_ref().len();
    let head = Bytes::copy_from_slice(encoder.get_ref());
    encoder.write_all(CHAT_STREAM.as_bytes()).unwrap();
    let rest = Bytes::from(encoder.finish().unwrap()).slice(start..);
    let upstream = MockUpstream::start(move |_| {
        // 2 s of empty stored blocks every 300 ms, past the 1 s timeout, then the text.
        let mut parts = vec![head.clone()];
        parts.extend((0..7).map(|_| Bytes::from_static(&[0, 0, 0, 0xff, 0xff])));
        parts.push(rest.clone());
        response(
            200,
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "gzip"),
            ],
            frames(parts, Duration::from_millis(300)),
        )
    })
    .await;
    let mut opts = options();
    opts.timeout = Duration::from_secs(1);
    let proxy = start_proxy(&upstream.url(), opts).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_answers_hello("gzip with empty flush blocks", &parts, &got);
}

/// D28 for a compressed body (this leg asks for compression): a 200 without `content-type`
/// whose gzip-coded bytes decode to an event stream is aggregated, and one whose bytes
/// decode to JSON is relayed (decoded for a client that does not take gzip).
#[tokio::test]
async fn compressed_bodies_without_content_type_are_sniffed_after_decoding() {
    let stream = Bytes::from(encode("gzip", CHAT_STREAM.as_bytes()).await);
    let json = Bytes::from(encode("gzip", br#"{"id":"plain"}"#).await);
    let upstream = MockUpstream::start(move |r| {
        let body = if r.uri.path().starts_with("/json/") {
            json.clone()
        } else {
            stream.clone()
        };
        response(200, &[("content-encoding", "gzip")], full(body))
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let (parts, got) = convert_accepting(&proxy, "/v1/chat/completions", None).await;
    assert_answers_hello("gzip stream without content-type", &parts, &got);
    let (parts, got) = convert_accepting(&proxy, "/json/v1/chat/completions", None).await;
    assert_eq!(parts.status, 200);
    assert!(parts.headers.get("content-encoding").is_none());
    assert_eq!(&got[..], br#"{"id":"plain"}"#);
}
