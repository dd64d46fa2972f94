//! Passthrough as a property (issue "Reliability and security", property tests): for random
//! request and response bodies (empty and binary included), random cuts of both bodies into
//! network writes, either framing (`content-length` or chunked), and random sets of
//! end-to-end headers (repeated names included), the upstream receives exactly the body
//! and headers the client sent, and the client receives exactly the status, body and
//! headers the upstream sent.
//!
//! One mock upstream and one in-process proxy serve every case, on a runtime shared by the
//! cases; a case is told apart by its `x-case-id` header.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proptest::prelude::*;
use support::*;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Prefix of every generated header name, so the comparison ignores the headers the
/// proxy and hyper add on their own (`host`, `date`, `x-request-id`, framing).
const PREFIX: &str = "x-p-";
const CASE_ID: &str = "x-case-id";

/// What the upstream answers one case with.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<Bytes>,
    content_length: bool,
}

/// What the upstream received in one case.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

struct Env {
    runtime: Runtime,
    proxy: ProxyHandle,
    client: Client<HttpConnector, MockBody>,
    answers: Arc<Mutex<HashMap<u64, Answer>>>,
    received: Arc<Mutex<HashMap<u64, Received>>>,
    next_case: AtomicU64,
    // Kept alive for the whole test binary.
    _upstream: MockUpstream,
}

/// Sends `chunks` one frame at a time, yielding in between so each is its own write.
fn chunked_body(chunks: Vec<Bytes>) -> MockBody {
    let (tx, body) = channel_body();
    tokio::spawn(feed(tx, chunks));
    body
}

async fn feed(tx: mpsc::Sender<Result<Bytes, BoxError>>, chunks: Vec<Bytes>) {
    for chunk in chunks {
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

fn case_id(headers: &HeaderMap) -> u64 {
    headers
        .get(CASE_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let answers: Arc<Mutex<HashMap<u64, Answer>>> = Arc::default();
        let received: Arc<Mutex<HashMap<u64, Received>>> = Arc::default();
        let (upstream, proxy) = runtime.block_on(async {
            let (answers, received) = (answers.clone(), received.clone());
            let handler: Handler = Arc::new(move |req: Request<hyper::body::Incoming>| {
                let (answers, received) = (answers.clone(), received.clone());
                Box::pin(async move {
                    let (parts, body) = req.into_parts();
                    let id = case_id(&parts.headers);
                    let body = match body.collect().await {
                        Ok(collected) => collected.to_bytes(),
                        Err(e) => return response(599, &[], full(format!("body error: {e}"))),
                    };
                    received.lock().unwrap().insert(
                        id,
                        Received {
                            headers: parts.headers,
                            body,
                        },
                    );
                    let Some(answer) = answers.lock().unwrap().remove(&id) else {
                        return response(598, &[], full("unknown case"));
                    };
                    let total: usize = answer.chunks.iter().map(Bytes::len).sum();
                    let length = total.to_string();
                    let mut headers: Vec<(&str, &str)> = answer
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    if answer.content_length {
                        headers.push(("content-length", length.as_str()));
                    }
                    response(answer.status, &headers, chunked_body(answer.chunks))
                })
            });
            let upstream = MockUpstream::with_handler(handler).await;
            let proxy = start_proxy(&upstream.url(), options()).await;
            (upstream, proxy)
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        Env {
            runtime,
            proxy,
            client,
            answers,
            received,
            next_case: AtomicU64::new(0),
            _upstream: upstream,
        }
    })
}

/// Cuts `data` at `cuts` (taken modulo its length + 1, so empty pieces happen too).
fn cut(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for end in at.into_iter().chain(std::iter::once(data.len())) {
        pieces.push(Bytes::copy_from_slice(&data[start..end]));
        start = end;
    }
    pieces
}

/// `(name, value)` pairs in order, names from a small pool so that names repeat.
fn header_set() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        "[a-z0-9][a-z0-9-]{0,10}",
    ];
    // Visible ASCII, inner spaces allowed; no leading or trailing space (HTTP drops those).
    let value = prop_oneof![Just(String::new()), "[!-~]", "[!-~][ -~]{0,30}[!-~]",];
    proptest::collection::vec((name, value), 0..12).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, v)| (format!("{PREFIX}{n}"), v))
            .collect()
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => proptest::collection::vec(any::<u8>(), 1..16 * 1024),
    ]
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..24)
}

/// The generated headers of `headers`, in order per name, as `(name, values)` sorted by
/// name.
fn generated(headers: &HeaderMap) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut names: Vec<&HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with(PREFIX))
        .collect();
    names.sort_by_key(|n| n.as_str());
    names
        .into_iter()
        .map(|n| {
            let values = headers
                .get_all(n)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            (n.as_str().to_owned(), values)
        })
        .collect()
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

#[derive(Debug, Clone)]
struct Case {
    request_headers: Vec<(String, String)>,
    request_body: Vec<u8>,
    request_cuts: Vec<usize>,
    request_length: bool,
    answer_status: u16,
    answer_headers: Vec<(String, String)>,
    answer_body: Vec<u8>,
    answer_cuts: Vec<usize>,
    answer_length: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (header_set(), body(), cuts(), any::<bool>()),
        (
            prop_oneof![Just(200u16), Just(201), Just(404), Just(500)],
            header_set(),
            body(),
            cuts(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (request_headers, request_body, request_cuts, request_length),
                (answer_status, answer_headers, answer_body, answer_cuts, answer_length),
            )| Case {
                request_headers,
                request_body,
                request_cuts,
                request_length,
                answer_status,
                answer_headers,
                answer_body,
                answer_cuts,
                answer_length,
            },
        )
}

/// Runs one case through the proxy; `Err` describes the first difference.
async fn run(env: &Env, case: &Case) -> Result<(), String> {
    let id = env.next_case.fetch_add(1, Ordering::Relaxed);
    env.answers.lock().unwrap().insert(
        id,
        Answer {
            status: case.answer_status,
            headers: case.answer_headers.clone(),
            chunks: cut(&case.answer_body, &case.answer_cuts),
            content_length: case.answer_length,
        },
    );
    let mut builder = Request::post(env.proxy.url(&format!("/v1/files/{id}")))
        .header(CASE_ID, id.to_string())
        .header("content-type", "application/octet-stream");
    for (k, v) in &case.request_headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    if case.request_length {
        builder = builder.header("content-length", case.request_body.len());
    }
    let request = builder
        .body(chunked_body(cut(&case.request_body, &case.request_cuts)))
        .map_err(|e| format!("request: {e}"))?;
    let response = tokio::time::timeout(WAIT, env.client.request(request))
        .await
        .map_err(|_| "no response in time".to_owned())?
        .map_err(|e| format!("request failed: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .map_err(|_| "response body not complete in time".to_owned())?
        .map_err(|e| format!("response body failed: {e}"))?
        .to_bytes();

    let received = env
        .received
        .lock()
        .unwrap()
        .remove(&id)
        .ok_or("the upstream never saw the request")?;
    if received.body[..] != case.request_body[..] {
        return Err(format!(
            "upstream got {} body bytes, {} were sent (first difference at {:?})",
            received.body.len(),
            case.request_body.len(),
            received
                .body
                .iter()
                .zip(&case.request_body)
                .position(|(a, b)| a != b)
        ));
    }
    let sent = generated(&header_map(&case.request_headers));
    let got = generated(&received.headers);
    if sent != got {
        return Err(format!(
            "request headers differ:\n sent {sent:?}\n  got {got:?}"
        ));
    }
    if parts.status.as_u16() != case.answer_status {
        return Err(format!(
            "status {} for the upstream's {}: {:?}",
            parts.status,
            case.answer_status,
            String::from_utf8_lossy(&body)
        ));
    }
    if body[..] != case.answer_body[..] {
        return Err(format!(
            "client got {} body bytes, the upstream sent {}",
            body.len(),
            case.answer_body.len()
        ));
    }
    let sent = generated(&header_map(&case.answer_headers));
    let got = generated(&parts.headers);
    if sent != got {
        return Err(format!(
            "response headers differ:\n sent {sent:?}\n  got {got:?}"
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn passthrough_delivers_exactly_the_bytes_and_headers_sent(case in case()) {
        let env = env();
        if let Err(difference) = env.runtime.block_on(run(env, &case)) {
            prop_assert!(false, "{}", difference);
        }
    }
}

/// The generators reach the corners the property is about, so it cannot hold vacuously.
#[test]
fn the_cutter_keeps_every_byte_and_makes_empty_pieces() {
    let data = b"0123456789";
    let pieces = cut(data, &[3, 3, 25, 0]);
    assert_eq!(pieces.concat(), data);
    assert!(pieces.iter().any(Bytes::is_empty));
    assert_eq!(pieces.len(), 5);
    assert_eq!(cut(b"", &[7, 1]).concat(), b"");
}
