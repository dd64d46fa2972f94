//! Conversion of non-streaming Chat Completions and Responses calls: the phases in order.
//!
//! 1. Read the request body, bounded by `maxRequestBodyBytes` (D5).
//! 2. Decide from the body (`request::decide`); anything not convertible is forwarded with
//!    the client's exact bytes.
//! 3. Send the rewritten body upstream, asking for an event stream in a coding we can decode
//!    (D4).
//! 4. Relay what is not an event stream (errors, JSON from providers that ignore `stream`);
//!    fall back to the plain form when the upstream refuses the streaming one.
//! 5. Aggregate the stream (`stream::aggregate`) and answer with one JSON body.
//!
//! With `keepAliveSeconds`, a slow aggregation commits `200` early and writes a space every
//! interval until the JSON follows (leading whitespace is valid JSON), so edges that cut
//! silent responses after ~100 s do not cost the client its answer. The trade-off: once
//! committed, an error can only be delivered as an error envelope inside that 200 body, a
//! late relayed answer only as its (decoded) JSON body, and no late header reaches the
//! client (`x-request-id`, `x-ratelimit-*`): the 200's head is already on the wire.

pub mod chat;
pub mod outcome;
pub mod request;
pub mod responses;
pub mod stream;
mod template;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use self::outcome::{Aggregate, AggregateError};
use self::request::{decide, Api, BodyDecision};
use self::stream::{aggregate, Accumulator, Coding, StreamError, StreamLimits};
use crate::access_log::{AccessLog, ConvertSummary};
use crate::body::{IdleTimeout, ProxyBody};
use crate::error::ProxyError;
use crate::headers::{strip_hop_by_hop, strip_response_hop_by_hop};
use crate::metrics::Metrics;
use crate::passthrough;
use crate::route::Mode;
use crate::service::RuleContext;
use crate::upstream::{BoxError, UpstreamBody, UpstreamIncoming};

/// How much of an upstream 400 is read to look for a refusal of the streaming form.
const REFUSAL_PEEK_BYTES: u64 = 256 * 1024;

/// Most a compressed upstream 400 may expand to when decoded to look for a refusal; an error
/// envelope is a few hundred bytes, so anything larger is not one.
const REFUSAL_DECODED_BYTES: u64 = 1024 * 1024;

/// Handles a conversion candidate (a POST to a conversion path with a JSON content type).
pub async fn handle(
    rule: &Arc<RuleContext>,
    api: Api,
    parts: Parts,
    body: UpstreamBody,
    log: &mut AccessLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    match read_candidate(rule, api, &parts, body).await? {
        Candidate::Passthrough(original) => {
            passthrough::forward(rule, parts, UpstreamBody::full(original)).await
        }
        Candidate::Convert {
            original,
            converted,
        } => convert(rule, api, parts, original, converted, log).await,
    }
}

/// What phases 1 and 2 decided about a candidate.
#[derive(Debug)]
pub enum Candidate {
    /// Not convertible: forward the client's exact bytes.
    Passthrough(Bytes),
    /// Convertible: the client's bytes and the rewritten streaming request.
    Convert {
        /// The body as the client sent it.
        original: Bytes,
        /// The body asking for a stream.
        converted: Bytes,
    },
}

/// Phases 1 and 2: reads the candidate's body within `maxRequestBodyBytes` and decides
/// whether to convert it. Kept apart from [`convert`] so that a caller can forward the
/// common non-convertible case (`"stream": true`) without the conversion's large state
/// machine.
pub async fn read_candidate(
    rule: &RuleContext,
    api: Api,
    parts: &Parts,
    body: UpstreamBody,
) -> Result<Candidate, ProxyError> {
    let limit = rule.options.max_request_body_bytes;
    let original = read_limited(body, &parts.headers, limit, rule.options.timeout).await?;
    match decide(api, &original) {
        BodyDecision::Convert { body } => Ok(Candidate::Convert {
            original,
            converted: Bytes::from(body),
        }),
        BodyDecision::Passthrough { reason } => {
            tracing::debug!(path = %parts.uri.path(), reason, "not converted");
            Ok(Candidate::Passthrough(original))
        }
    }
}

/// Phases 3 to 5 for a body [`read_candidate`] found convertible.
pub async fn convert(
    rule: &Arc<RuleContext>,
    api: Api,
    parts: Parts,
    original: Bytes,
    converted: Bytes,
    log: &mut AccessLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    log.set_mode(Mode::Convert);
    log.set_request_bytes(converted.len() as u64);

    let conversion = Conversion {
        rule: rule.clone(),
        api,
        parts,
        original,
        converted,
    };
    let Some(interval) = rule.options.keep_alive else {
        let (outcome, fallback) = conversion.run().await;
        let (response, summary) = outcome.into_response(fallback);
        if let Some(summary) = summary {
            log.set_convert(summary);
        }
        return Ok(response);
    };

    let mut running: RunningConversion = Box::pin(conversion.run());
    tokio::select! {
        (outcome, fallback) = &mut running => {
            let (response, summary) = outcome.into_response(fallback);
            if let Some(summary) = summary {
                log.set_convert(summary);
            }
            return Ok(response);
        }
        _ = tokio::time::sleep(interval) => {}
    }

    // Still aggregating: commit 200 and keep the connection busy with spaces. The task owns
    // the conversion; when the client leaves, `tx.closed()` fires and dropping the
    // conversion cancels the upstream request.
    let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(2);
    let summary_slot = Arc::new(OnceLock::new());
    log.set_convert_later(summary_slot.clone());
    let late = LateAnswer {
        upstream: rule.upstream.to_string(),
        max_bytes: rule.options.max_response_bytes,
        port: rule.port,
    };
    // Set before the answer is sent: the body ends cleanly only then, so a task that dies
    // first (a panic) aborts the response instead of ending it after the spaces.
    let finished = Arc::new(AtomicBool::new(false));
    tokio::spawn(keep_alive(
        running,
        tx,
        interval,
        summary_slot,
        late,
        finished.clone(),
    ));
    let mut response = Response::new(ProxyBody::channel_until(rx, finished));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// What turning a late relayed answer into the committed body needs from the rule.
struct LateAnswer {
    /// The upstream, for error messages.
    upstream: String,
    /// `maxResponseBytes`: cap on the relayed body, read and decoded.
    max_bytes: u64,
    /// The rule's port, for the metrics of a failure past the committed 200.
    port: u16,
}

/// A conversion's outcome and the refusal fallback it took, if any.
type RunningConversion =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Outcome, Option<&'static str>)> + Send>>;

/// Feeds `tx` with spaces until the conversion ends, then with its answer; `finished` is set
/// just before the answer, the body's clean end.
async fn keep_alive(
    mut running: RunningConversion,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    interval: Duration,
    summary_slot: Arc<OnceLock<ConvertSummary>>,
    late: LateAnswer,
    finished: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now(), interval);
    loop {
        tokio::select! {
            (outcome, fallback) = &mut running => {
                let (body, summary, failure) = outcome.into_committed_body(&late, fallback).await;
                if let Some(summary) = summary {
                    let _ = summary_slot.set(summary);
                }
                // Past the committed 200 the error response never reaches the service,
                // which counts the others: count it here.
                if let Some(kind) = failure {
                    Metrics::global().upstream_error(late.port, kind);
                }
                finished.store(true, Ordering::Release);
                let _ = tx.send(Ok(body)).await;
                return;
            }
            _ = ticker.tick() => {
                if tx.send(Ok(Bytes::from_static(b" "))).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// Reads a request body whole, refusing more than `limit` bytes with 413 (early, from
/// `content-length`, when the client declared it), and a client that sends nothing for
/// `silence` (before its first byte or part-way) with 408.
async fn read_limited(
    body: UpstreamBody,
    headers: &HeaderMap,
    limit: u64,
    silence: Duration,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::RequestTooLarge { limit });
    }
    let mut body = std::pin::pin!(body);
    // A body in one frame (the usual case: it came with the head) is kept as that frame,
    // without a copy; a second frame starts a buffer.
    let mut single: Option<Bytes> = None;
    let mut collected = BytesMut::new();
    let mut total = 0u64;
    loop {
        // The silence timer is only set up for a frame that has to be waited for.
        let next = match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        {
            Poll::Ready(next) => next,
            Poll::Pending => tokio::time::timeout(silence, body.frame())
                .await
                .map_err(|_| ProxyError::RequestBodyTimeout {
                    seconds: silence.as_secs(),
                })?,
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| ProxyError::RequestBody(crate::service::error_chain(&*e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing to convert
        };
        if data.is_empty() {
            continue;
        }
        total += data.len() as u64;
        if total > limit {
            return Err(ProxyError::RequestTooLarge { limit });
        }
        if single.is_none() && collected.is_empty() {
            single = Some(data);
            continue;
        }
        if let Some(first) = single.take() {
            let expected = declared.unwrap_or(total).clamp(total, limit);
            collected.reserve(usize::try_from(expected).unwrap_or(0));
            collected.extend_from_slice(&first);
        }
        collected.extend_from_slice(&data);
    }
    Ok(single.unwrap_or_else(|| collected.freeze()))
}

/// One conversion, owned so it can outlive the handler when keep-alive commits early.
struct Conversion {
    rule: Arc<RuleContext>,
    api: Api,
    parts: Parts,
    original: Bytes,
    converted: Bytes,
}

/// What a conversion produced. One per request, moved once or twice: its size does not
/// matter, and boxing a variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// Aggregated: the upstream's response headers and the body.
    Aggregated {
        headers: HeaderMap,
        aggregate: Aggregate,
    },
    /// Not an event stream: relayed as the upstream sent it.
    Relay(Response<ProxyBody>),
    /// Failed; `headers` are the upstream's when the upstream itself reported the error.
    Failed {
        error: ProxyError,
        headers: Option<HeaderMap>,
    },
}

impl Conversion {
    /// Runs the conversion; what it relays comes in a coding the client can read. The second
    /// value is the refusal fallback the conversion took, whatever the outcome, for the log.
    async fn run(self) -> (Outcome, Option<&'static str>) {
        let mut fallback = None;
        let outcome = self.exchange(&mut fallback).await;
        (self.readable_for_client(outcome).await, fallback)
    }

    /// A relayed answer whose `content-encoding` the client did not offer (the upstream chose
    /// it from our D4 offer) is decoded whole, within `maxResponseBytes`; one the client can
    /// read, or in a coding we cannot decode (which the upstream was not offered), is relayed
    /// as it is.
    async fn readable_for_client(&self, outcome: Outcome) -> Outcome {
        let Outcome::Relay(response) = outcome else {
            return outcome;
        };
        let coding = match response
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().map(str::trim))
        {
            None => return Outcome::Relay(response),
            Some(Ok(name)) => {
                let client = self.parts.headers.get_all(header::ACCEPT_ENCODING);
                if Coding::client_accepts(client.iter().map(HeaderValue::as_bytes), name) {
                    return Outcome::Relay(response);
                }
                match Coding::from_header(Some(name)) {
                    Some(coding) => coding,
                    None => return Outcome::Relay(response),
                }
            }
            Some(Err(_)) => return Outcome::Relay(response),
        };
        let (mut parts, body) = response.into_parts();
        let plain = match read_decoded(body, coding, self.rule.options.max_response_bytes).await {
            Ok(plain) => plain,
            Err(failure) => {
                let answer = format!("{} answer", parts.status);
                return Outcome::Failed {
                    error: failure.into_error(self.rule.upstream.to_string(), answer),
                    headers: None,
                };
            }
        };
        parts.headers.remove(header::CONTENT_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(plain.len()));
        Outcome::Relay(Response::from_parts(parts, ProxyBody::full(plain)))
    }

    /// Sends the converted request, and again in a fallback form when the upstream refuses
    /// it; `fallback` is the form last sent.
    async fn exchange(&self, fallback: &mut Option<&'static str>) -> Outcome {
        let rule = &*self.rule;
        let upstream_name = rule.upstream.to_string();
        let mut body = self.converted.clone();
        loop {
            let request = match self.upstream_request(body.clone(), *fallback == Some("plain")) {
                Ok(r) => r,
                Err(error) => {
                    return Outcome::Failed {
                        error,
                        headers: None,
                    }
                }
            };
            let response = match rule.send(request).await {
                Ok(r) => r,
                Err(error) => {
                    return Outcome::Failed {
                        error,
                        headers: None,
                    }
                }
            };
            if *fallback == Some("plain") {
                return Outcome::Relay(passthrough::relay_response(response, rule.options.timeout));
            }
            let status = response.status();
            if status == StatusCode::BAD_REQUEST {
                let (parts, incoming) = response.into_parts();
                let peek = match read_prefix(
                    incoming,
                    REFUSAL_PEEK_BYTES,
                    rule.options.timeout,
                    &upstream_name,
                )
                .await
                {
                    Ok(Peek::Whole(peek)) => peek,
                    // Too large for an error envelope, so no refusal: relayed unchanged.
                    Ok(Peek::Partial(prefix, rest)) => {
                        return Outcome::Relay(relay_after(
                            parts,
                            prefix,
                            rest,
                            rule.options.timeout,
                        ))
                    }
                    Err(error) => {
                        return Outcome::Failed {
                            error,
                            headers: None,
                        }
                    }
                };
                let readable = readable_error(&parts.headers, &peek).await;
                match refusal_fallback(self.api, &readable, *fallback, &self.original) {
                    Some((name, next_body)) => {
                        tracing::warn!(upstream = %rule.upstream, fallback = %name, "upstream refused the streaming form; retrying");
                        // Once per request, whatever the retry then brings.
                        if fallback.is_none() {
                            Metrics::global().upstream_error(rule.port, "stream_fallback");
                        }
                        *fallback = Some(name);
                        body = next_body;
                        continue;
                    }
                    None => return Outcome::Relay(full_response(parts, peek)),
                }
            }
            if !status.is_success() {
                return Outcome::Relay(passthrough::relay_response(response, rule.options.timeout));
            }
            return self.aggregate_response(response).await;
        }
    }

    /// The converted request: client headers minus hop-by-hop, asking for an event stream
    /// in every coding we decode (D4); the client's `accept-encoding` does not leak into this
    /// leg. A relayed answer in a coding the client did not offer is decoded on the way back
    /// ([`Conversion::readable_for_client`]).
    fn upstream_request(
        &self,
        body: Bytes,
        plain: bool,
    ) -> Result<http::Request<UpstreamBody>, ProxyError> {
        let body = if plain { self.original.clone() } else { body };
        let length = HeaderValue::from(body.len());
        // Readdressed as any request (hop-by-hop stripped, the rule's headers injected);
        // then this leg's own framing and, for the stream, what it must ask for.
        let mut request = passthrough::upstream_request(
            &self.rule,
            self.parts.clone(),
            UpstreamBody::full(body),
        )?;
        let headers = request.headers_mut();
        headers.insert(header::CONTENT_LENGTH, length);
        if !plain {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(Coding::ACCEPTED),
            );
        }
        Ok(request)
    }

    async fn aggregate_response(&self, response: Response<UpstreamIncoming>) -> Outcome {
        let rule = &*self.rule;
        let upstream_name = rule.upstream.to_string();
        let (parts, mut incoming) = response.into_parts();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let encoding = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok());
        let coding = Coding::from_header(encoding);

        let mut prefix = Bytes::new();
        match (media.as_str(), coding) {
            ("text/event-stream", _) => {}
            // D28: stream-only upstreams have been seen to omit the header, compressed or not
            // (this leg asks for compression).
            ("" | "application/octet-stream", Some(sniffed)) => {
                match sniff(&mut incoming, sniffed, rule.options.timeout, &upstream_name).await {
                    Ok((head, true)) => prefix = head,
                    Ok((head, false)) => {
                        let rest = read_capped(
                            incoming,
                            rule.options.max_response_bytes,
                            rule.options.timeout,
                            &upstream_name,
                        )
                        .await;
                        return match rest {
                            Ok(rest) => {
                                Outcome::Relay(full_response(parts, [head, rest].concat().into()))
                            }
                            Err(error) => Outcome::Failed {
                                error,
                                headers: None,
                            },
                        };
                    }
                    Err(error) => {
                        return Outcome::Failed {
                            error,
                            headers: None,
                        }
                    }
                }
            }
            _ => {
                let response = Response::from_parts(parts, incoming);
                return Outcome::Relay(passthrough::relay_response(response, rule.options.timeout));
            }
        }
        let Some(coding) = coding else {
            return Outcome::Failed {
                error: self.stream_error(format!(
                    "unsupported content-encoding {:?}",
                    encoding.unwrap_or("")
                )),
                headers: None,
            };
        };

        let limits = StreamLimits {
            idle: rule.options.timeout,
            max_bytes: rule.options.max_response_bytes,
        };
        match aggregate(prefix, incoming, coding, Accumulator::new(self.api), limits).await {
            Ok(aggregate) => Outcome::Aggregated {
                headers: parts.headers,
                aggregate,
            },
            Err(StreamError::Aggregate(AggregateError::Upstream(reported))) => Outcome::Failed {
                error: ProxyError::UpstreamReported(reported),
                headers: Some(parts.headers),
            },
            Err(StreamError::Idle(_)) => Outcome::Failed {
                error: ProxyError::UpstreamTimeout {
                    upstream: rule.upstream.to_string(),
                    seconds: rule.options.timeout.as_secs(),
                },
                headers: None,
            },
            Err(other) => Outcome::Failed {
                error: self.stream_error(other.to_string()),
                headers: None,
            },
        }
    }

    fn stream_error(&self, reason: String) -> ProxyError {
        ProxyError::UpstreamStream {
            upstream: self.rule.upstream.to_string(),
            reason,
        }
    }
}

impl Outcome {
    /// The response for an outcome decided before anything was committed, and what the log
    /// line says of the conversion.
    fn into_response(
        self,
        fallback: Option<&'static str>,
    ) -> (Response<ProxyBody>, Option<ConvertSummary>) {
        let fallback_only = fallback.map(ConvertSummary::fallback_only);
        match self {
            Outcome::Aggregated { headers, aggregate } => {
                let summary = summary(&aggregate, fallback);
                let length = aggregate.body.len();
                let mut response = Response::new(ProxyBody::full(aggregate.body));
                *response.headers_mut() = converted_headers(headers);
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                (response, Some(summary))
            }
            Outcome::Relay(response) => (response, fallback_only),
            Outcome::Failed { error, headers } => {
                let mut response: Response<ProxyBody> = error.to_response();
                if let Some(upstream) = headers {
                    let mut merged = converted_headers(upstream);
                    merged.extend(response.headers().clone());
                    *response.headers_mut() = merged;
                }
                (response, fallback_only)
            }
        }
    }

    /// The body to finish an already committed 200 with (always plain JSON, since the
    /// committed response says `application/json` and has no `content-encoding`), and the
    /// upstream failure kind when that body is an error envelope.
    async fn into_committed_body(
        self,
        late: &LateAnswer,
        fallback: Option<&'static str>,
    ) -> (Bytes, Option<ConvertSummary>, Option<&'static str>) {
        let fallback_only = fallback.map(ConvertSummary::fallback_only);
        match self {
            Outcome::Aggregated { aggregate, .. } => {
                let summary = summary(&aggregate, fallback);
                (Bytes::from(aggregate.body), Some(summary), None)
            }
            // The upstream's own body (its error envelope, or JSON it sent without streaming).
            Outcome::Relay(response) => {
                let (body, failure) = committed_relay(response, late).await;
                (body, fallback_only, failure)
            }
            Outcome::Failed { error, .. } => {
                (error.envelope(), fallback_only, error.upstream_kind())
            }
        }
    }
}

/// A relayed answer that arrived after the 200 was committed, as plain JSON for that body.
///
/// The upstream may have compressed it (in a coding the client accepts, but the committed
/// response carries no `content-encoding`), so it is decoded; a body that is still not JSON
/// (an HTML error page from a gateway, say) becomes an `upstream_error` envelope naming the
/// upstream's status, since the client parses the 200 as JSON. The upstream's status and
/// headers cannot be sent any more: the 200 and its headers are already on the wire.
///
/// The second value is the upstream failure kind when the answer could not be read or
/// decoded (a readable non-JSON answer is the upstream's own error, not a broken stream).
async fn committed_relay(
    response: Response<ProxyBody>,
    late: &LateAnswer,
) -> (Bytes, Option<&'static str>) {
    let answer = |error: ProxyError| (error.envelope(), error.upstream_kind());
    let failed = |reason: String| {
        answer(ProxyError::UpstreamStream {
            upstream: late.upstream.clone(),
            reason,
        })
    };
    let (parts, body) = response.into_parts();
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let Some(coding) = Coding::from_header(encoding) else {
        return failed(format!(
            "late {} answer has unsupported content-encoding {:?}",
            parts.status,
            encoding.unwrap_or("")
        ));
    };
    let plain = match read_decoded(body, coding, late.max_bytes).await {
        Ok(plain) => plain,
        Err(failure) => {
            let late_answer = format!("late {} answer", parts.status);
            return answer(failure.into_error(late.upstream.clone(), late_answer));
        }
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&plain).is_err() {
        let shown = String::from_utf8_lossy(&plain[..plain.len().min(200)]).into_owned();
        let (envelope, _) = failed(format!(
            "late {} answer is not JSON: {shown:?}",
            parts.status
        ));
        return (envelope, None);
    }
    (plain, None)
}

/// Why a relayed body could not be read whole and decoded.
enum ReadFailure {
    /// The upstream fell silent for the idle limit: a timeout (504), as everywhere (D13).
    Idle(Duration),
    /// Anything else; completes "… answer" in a message.
    Broken(String),
}

impl ReadFailure {
    /// The error for the client: `answer` names the answer ("502 answer").
    fn into_error(self, upstream: String, answer: impl std::fmt::Display) -> ProxyError {
        match self {
            ReadFailure::Idle(limit) => ProxyError::UpstreamTimeout {
                upstream,
                seconds: limit.as_secs(),
            },
            ReadFailure::Broken(reason) => ProxyError::UpstreamStream {
                upstream,
                reason: format!("{answer} {reason}"),
            },
        }
    }
}

/// A relayed body read whole and decoded from `coding`, at most `max` bytes before and after
/// decoding.
async fn read_decoded(body: ProxyBody, coding: Coding, max: u64) -> Result<Bytes, ReadFailure> {
    let cap = usize::try_from(max).unwrap_or(usize::MAX);
    let raw = http_body_util::Limited::new(body, cap)
        .collect()
        .await
        .map_err(|e| match e.downcast_ref::<IdleTimeout>() {
            Some(IdleTimeout(limit)) => ReadFailure::Idle(*limit),
            None => ReadFailure::Broken(format!("could not be read: {e}")),
        })?
        .to_bytes();
    stream::decode_whole(raw, coding, max)
        .await
        .map_err(|e| ReadFailure::Broken(format!("could not be decoded: {e}")))
}

fn summary(aggregate: &Aggregate, fallback: Option<&'static str>) -> ConvertSummary {
    let usage = aggregate.usage.unwrap_or_default();
    ConvertSummary {
        terminal: Some(aggregate.terminal.as_str()),
        input_tokens: usage.input,
        output_tokens: usage.output,
        total_tokens: usage.total,
        cached_tokens: usage.cached,
        reasoning_tokens: usage.reasoning,
        fallback,
    }
}

/// Upstream headers for a converted body: hop-by-hop, framing, coding and SSE-only headers
/// removed (B84, D18); `content-type`/`content-length` are set by the caller.
fn converted_headers(mut headers: HeaderMap) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CACHE_CONTROL,
    ] {
        headers.remove(name);
    }
    headers.remove("x-accel-buffering");
    headers
}

/// A relayed response whose body had to be read (to look inside it).
fn full_response(mut parts: http::response::Parts, body: Bytes) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::full(body))
}

/// An upstream body read up to a cap: whole, or the bytes read so far and the rest.
enum Peek {
    Whole(Bytes),
    Partial(Bytes, UpstreamIncoming),
}

/// Reads an upstream body whole when it holds at most `cap` bytes; past that, stops and
/// hands back what was read (the last frame included) with the unread rest, so the caller
/// can still relay the body unchanged.
async fn read_prefix(
    mut body: UpstreamIncoming,
    cap: u64,
    idle: Duration,
    upstream: &str,
) -> Result<Peek, ProxyError> {
    let mut collected = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: upstream.to_owned(),
                    seconds: idle.as_secs(),
                })
            }
            Ok(None) => return Ok(Peek::Whole(collected.freeze())),
            Ok(Some(frame)) => frame,
        };
        let frame = frame.map_err(|e| ProxyError::UpstreamStream {
            upstream: upstream.to_owned(),
            reason: crate::service::error_chain(&e),
        })?;
        if let Some(data) = frame.data_ref() {
            collected.extend_from_slice(data);
            if collected.len() as u64 > cap {
                return Ok(Peek::Partial(collected.freeze(), body));
            }
        }
    }
}

/// A relayed response of which `prefix` was already read: framing as
/// `passthrough::relay_response` does it, body the prefix then the rest.
fn relay_after(
    mut parts: http::response::Parts,
    prefix: Bytes,
    rest: UpstreamIncoming,
    idle: Duration,
) -> Response<ProxyBody> {
    // Also drops a Content-Length that Transfer-Encoding makes stale (RFC 9112 §6.3), and
    // sends a length list (`5, 5`) on as one value.
    strip_response_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::upstream_after(prefix, rest, idle))
}

/// Reads an upstream body whole, up to `cap` bytes, under the idle timeout.
async fn read_capped(
    body: UpstreamIncoming,
    cap: u64,
    idle: Duration,
    upstream: &str,
) -> Result<Bytes, ProxyError> {
    match read_prefix(body, cap, idle, upstream).await? {
        Peek::Whole(body) => Ok(body),
        Peek::Partial(..) => Err(ProxyError::UpstreamStream {
            upstream: upstream.to_owned(),
            reason: format!("response is larger than {cap} bytes"),
        }),
    }
}

/// Reads until the first non-whitespace bytes tell whether the body is an event stream
/// (optional BOM and whitespace, then `data:`, `event:`, `id:`, `retry:` or `:`). A body in
/// `coding` is judged by what its first bytes decode to; the bytes read are returned as
/// they came, still coded.
async fn sniff(
    body: &mut UpstreamIncoming,
    coding: Coding,
    idle: Duration,
    upstream: &str,
) -> Result<(Bytes, bool), ProxyError> {
    /// Decoded bytes enough to decide, and coded bytes read at most to get them.
    const DECIDE_WITHIN: usize = 64;
    const CODED_LIMIT: usize = 64 * 1024;
    let mut seen = BytesMut::new();
    loop {
        let decoded;
        let (start, read_enough) = if coding == Coding::Identity {
            (&seen[..], seen.len() >= DECIDE_WITHIN)
        } else {
            decoded = stream::decoded_start(&seen, coding, DECIDE_WITHIN).await;
            (
                &decoded[..],
                decoded.len() >= DECIDE_WITHIN || seen.len() >= CODED_LIMIT,
            )
        };
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        let text = start.strip_prefix(BOM).unwrap_or(start);
        let text = text.trim_ascii_start();
        // A mark whose first bytes came alone is a start still to be read, not a verdict.
        let partial_mark = BOM.starts_with(start);
        let decided = [b"data:".as_slice(), b"event:", b"id:", b"retry:", b":"]
            .iter()
            .map(|p| (text.starts_with(p), p.starts_with(text)))
            .fold((false, partial_mark), |(any, undecided), (yes, maybe)| {
                (any || yes, undecided || maybe)
            });
        match decided {
            (true, _) => return Ok((seen.freeze(), true)),
            (false, true) if !read_enough => {}
            _ => return Ok((seen.freeze(), false)),
        }
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: upstream.to_owned(),
                    seconds: idle.as_secs(),
                })
            }
            Ok(None) => return Ok((seen.freeze(), false)),
            Ok(Some(Err(e))) => {
                return Err(ProxyError::UpstreamStream {
                    upstream: upstream.to_owned(),
                    reason: crate::service::error_chain(&e),
                })
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            seen.extend_from_slice(data);
        }
    }
}

/// The text of an upstream error body read whole, decoded from its `content-encoding` (the
/// converted leg offers compressed codings, so a refusal may well arrive gzipped). An
/// undecodable body, or one that decodes past `REFUSAL_DECODED_BYTES`, reads as empty: it
/// is then no refusal, and is relayed as it came.
async fn readable_error(headers: &HeaderMap, body: &Bytes) -> Bytes {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let Some(coding) = Coding::from_header(encoding) else {
        return Bytes::new();
    };
    match stream::decode_whole(body.clone(), coding, REFUSAL_DECODED_BYTES).await {
        Ok(text) => text,
        Err(e) => {
            tracing::debug!(error = %e, "upstream 400 body not decodable; relayed as is");
            Bytes::new()
        }
    }
}

/// Whether an upstream 400 refuses the streaming form, and what to send instead: without
/// `stream_options` when it names that member, the client's original (non-streaming) bytes
/// when it names `stream`. Each fallback is tried once.
fn refusal_fallback(
    api: Api,
    error_body: &[u8],
    tried: Option<&'static str>,
    original: &Bytes,
) -> Option<(&'static str, Bytes)> {
    let parsed: serde_json::Value = serde_json::from_slice(error_body).ok()?;
    let error = parsed.get("error")?;
    let param = error.get("param").and_then(|p| p.as_str()).unwrap_or("");
    let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("");
    let names = |word: &str| param == word || mentions_word(message, word);
    if api == Api::ChatCompletions && tried.is_none() && names("stream_options") {
        // Every `stream_options` goes, the client's own included: the upstream refuses the
        // member, not a value in it.
        if let Some(body) = request::without_stream_options(original) {
            return Some(("without_stream_options", Bytes::from(body)));
        }
    }
    if tried != Some("plain") && names("stream") {
        return Some(("plain", original.clone()));
    }
    None
}

/// `word` appears in `text` as a whole identifier (so "upstream" does not name "stream",
/// and "stream_options" does not name "stream").
fn mentions_word(text: &str, word: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back().is_none_or(|c| !is_ident(c));
        let after = text[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !is_ident(c));
        before && after
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body::Frame;

    /// A streamed body of these frames, with a wait before each `None` entry.
    fn frames(parts: Vec<Option<Frame<Bytes>>>) -> UpstreamBody {
        let stream = futures_util::stream::iter(parts).then(|part| async move {
            match part {
                Some(frame) => Ok::<_, BoxError>(frame),
                None => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(Frame::data(Bytes::new()))
                }
            }
        });
        UpstreamBody::boxed(http_body_util::StreamBody::new(stream).boxed_unsync())
    }

    fn data(text: &'static str) -> Option<Frame<Bytes>> {
        Some(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_read_whole_within_its_limit_and_its_silence() {
        let none = HeaderMap::new();
        let limit = 64;
        let silence = Duration::from_secs(10);
        // One frame: kept as it is, no copy.
        let only = Bytes::from_static(b"{\"model\":\"m\"}");
        let body = frames(vec![Some(Frame::data(only.clone()))]);
        let read = read_limited(body, &none, limit, silence).await.unwrap();
        assert_eq!(read, only);
        assert_eq!(read.as_ptr(), only.as_ptr());
        // Several frames, an empty one and trailers among them: joined in order.
        let body = frames(vec![
            data("{\"model\""),
            data(""),
            data(":\"m\""),
            Some(Frame::trailers(HeaderMap::new())),
            data("}"),
        ]);
        let read = read_limited(body, &none, limit, silence).await.unwrap();
        assert_eq!(&read[..], b"{\"model\":\"m\"}");
        // Over the limit across frames.
        let body = frames((0..7).map(|_| data("0123456789")).collect());
        let err = read_limited(body, &none, limit, silence).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::RequestTooLarge { limit: 64 }),
            "{err:?}"
        );
        // A wait longer than the silence limit, part-way.
        let body = frames(vec![data("{"), None, data("}")]);
        let err = read_limited(body, &none, limit, silence).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::RequestBodyTimeout { seconds: 10 }),
            "{err:?}"
        );
    }

    #[test]
    fn refusals_are_recognised_by_param_or_whole_word() {
        assert!(mentions_word(
            "Unrecognized request argument supplied: stream_options",
            "stream_options"
        ));
        assert!(!mentions_word("upstream failed", "stream"));
        assert!(!mentions_word("stream_options is not allowed", "stream"));
        assert!(mentions_word(
            "'stream' is not supported for this model",
            "stream"
        ));
    }

    #[test]
    fn fallback_order_is_stream_options_then_plain() {
        let original = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let body = br#"{"error":{"message":"Unknown parameter: 'stream_options'.","param":"stream_options"}}"#;
        let (name, next) = refusal_fallback(Api::ChatCompletions, body, None, &original).unwrap();
        assert_eq!(name, "without_stream_options");
        assert_eq!(&next[..], br#"{"model":"m","messages":[],"stream":true}"#);
        let body = br#"{"error":{"message":"This model does not support 'stream'.","param":null}}"#;
        let (name, next) = refusal_fallback(
            Api::ChatCompletions,
            body,
            Some("without_stream_options"),
            &original,
        )
        .unwrap();
        assert_eq!(name, "plain");
        assert_eq!(next, original);
        assert!(refusal_fallback(Api::ChatCompletions, body, Some("plain"), &original).is_none());
        assert!(refusal_fallback(
            Api::Responses,
            br#"{"error":{"message":"bad model"}}"#,
            None,
            &original
        )
        .is_none());
    }
}
