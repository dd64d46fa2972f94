//! [`ProxyService`]: the proxy for one upstream as a hyper / tower service, which the
//! daemon mounts on each rule's port and other programs can embed.
//!
//! A request's life, in order: route on the head (refusals first) → the mode's handler
//! (passthrough, conversion, WebSocket) → on failure, the one error-to-response mapping in
//! `error.rs` → the access log line, written when the response body ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;

use crate::access_log::AccessLog;
use crate::body::ProxyBody;
use crate::config::RuleOptions;
use crate::convert::Candidate;
use crate::error::{ProxyError, UpstreamFailure};
use crate::headers::has_transfer_content_coding;
use crate::metrics::PortMetrics;
use crate::route::{route, Mode, Route};
use crate::upload::{head_within, Stalled, UploadProgress};
use crate::upstream::{BoxError, UpstreamBody, UpstreamClient, UpstreamIncoming, UpstreamUrl};
use crate::{convert, passthrough, request_id, websocket};

/// Everything a handler needs to know about the rule a request arrived on.
#[derive(Debug)]
pub struct RuleContext {
    /// Where requests go.
    pub upstream: UpstreamUrl,
    /// The rule's options.
    pub options: RuleOptions,
    /// The shared upstream client.
    pub client: UpstreamClient,
    /// The listening port, for logs and metric labels; `0` unless set with
    /// [`ProxyService::with_port_label`].
    pub port: u16,
    /// This port's metric handles.
    pub metrics: PortMetrics,
}

impl RuleContext {
    /// The upstream URI for a request: the base URL plus the request's path and query.
    pub fn upstream_uri(&self, uri: &http::Uri) -> Result<http::Uri, ProxyError> {
        self.upstream
            .request_uri(uri.path_and_query())
            .map_err(|e| {
                ProxyError::BadRequest(format!(
                    "request path cannot be appended to the upstream URL: {e}"
                ))
            })
    }

    /// Sends a request upstream and waits for the response head for at most
    /// `timeoutSeconds` (D13), counted from the last request body byte handed upstream;
    /// connection failures are 502, silence is 504, a client that stops uploading 408.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamIncoming>, ProxyError> {
        let sent = Instant::now();
        let limit = self.options.timeout;
        let upload = request.body().upload().cloned();
        // Boxed: the client's future (pool checkout, hyper's request future) is about
        // 1.9 KiB, and inline it would be copied with every enclosing future (the one
        // hyper boxes among them); callgrind: ~700 fewer instructions per request.
        let send = Box::pin(self.client.send_over(request, self.options.upstream_http2));
        let head = match upload {
            None => tokio::time::timeout(limit, send)
                .await
                .map_err(|_| Stalled::Upstream),
            Some(upload) => head_within(send, limit, &upload).await,
        };
        match head {
            // A transfer coding other than chunked (`gzip, chunked`): hyper undoes only the
            // chunking, and the hop-by-hop strip would drop the one header that says the
            // rest is still coded, so the client would take coded bytes for the body.
            Ok(Ok(response))
                if has_transfer_content_coding(response.headers())
                    && !response.body().is_end_stream() =>
            {
                Err(ProxyError::UpstreamStream {
                    upstream: self.upstream.to_string(),
                    reason: "the response uses a transfer coding other than chunked, which the \
                             proxy does not decode"
                        .to_owned(),
                })
            }
            Ok(Ok(response)) => {
                self.metrics.upstream_headers(sent.elapsed().as_secs_f64());
                Ok(response)
            }
            // The request body we were streaming from the client broke (invalid chunk,
            // client gone): the client's fault, not the upstream's.
            Ok(Err(e)) if is_request_body_error(&*e) => {
                Err(ProxyError::RequestBody(error_chain(&*e)))
            }
            Ok(Err(e)) => Err(upstream_failed(self.upstream.to_string(), &*e)),
            Err(Stalled::Upstream) => Err(ProxyError::UpstreamTimeout {
                upstream: self.upstream.to_string(),
                seconds: limit.as_secs(),
            }),
            Err(Stalled::Client) => Err(ProxyError::RequestBodyTimeout {
                seconds: limit.as_secs(),
            }),
        }
    }
}

/// The proxy for one upstream. Cheap to clone; clones share the rule, the client pool, and
/// rule updates made through [`ProxyService::update`] (config reload), which apply to the
/// next request, including on connections already open.
#[derive(Debug, Clone)]
pub struct ProxyService {
    slot: Arc<RwLock<Arc<RuleContext>>>,
    /// WebSocket sessions opened through this service; they outlive their connection.
    sessions: websocket::Sessions,
}

impl ProxyService {
    /// A proxy that forwards every request to `upstream` with `options`, through `client`
    /// (share one client between services so they share its connection pool).
    pub fn new(upstream: UpstreamUrl, options: RuleOptions, client: UpstreamClient) -> Self {
        Self::for_port(upstream, options, client, 0)
    }

    /// As [`ProxyService::new`], naming `port` in log lines and metric labels.
    pub fn for_port(
        upstream: UpstreamUrl,
        options: RuleOptions,
        client: UpstreamClient,
        port: u16,
    ) -> Self {
        let rule = RuleContext {
            upstream,
            options,
            client,
            port,
            metrics: PortMetrics::for_port(port),
        };
        ProxyService {
            slot: Arc::new(RwLock::new(Arc::new(rule))),
            sessions: websocket::Sessions::default(),
        }
    }

    /// Names the local port in log lines and metric labels.
    pub fn with_port_label(self, port: u16) -> Self {
        let rule = self.rule();
        Self::for_port(
            rule.upstream.clone(),
            rule.options.clone(),
            rule.client.clone(),
            port,
        )
    }

    /// The WebSocket sessions opened through this service (and its clones), which run on
    /// after their connection was handed over: a server shutting down closes them here.
    pub fn sessions(&self) -> &websocket::Sessions {
        &self.sessions
    }

    /// Whether a clone of this service is held elsewhere: by a listener, or by a connection
    /// (whose request may be a WebSocket handshake still in flight).
    pub(crate) fn in_use(&self) -> bool {
        Arc::strong_count(&self.slot) > 1
    }

    /// Whether `other` is a clone of this service (shares its rule and sessions).
    pub fn same_as(&self, other: &ProxyService) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }

    /// The rule requests are served with right now.
    pub fn rule(&self) -> Arc<RuleContext> {
        self.slot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the upstream and options for every later request; requests already running
    /// keep the rule they started with.
    pub fn update(&self, upstream: UpstreamUrl, options: RuleOptions) {
        let current = self.rule();
        let next = Arc::new(RuleContext {
            upstream,
            options,
            client: current.client.clone(),
            port: current.port,
            metrics: current.metrics.clone(),
        });
        *self
            .slot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
    }

    /// Handles one request; every failure becomes an error response, never an `Err`.
    pub async fn handle(&self, request: Request<UpstreamBody>) -> Response<ProxyBody> {
        let started = Instant::now();
        let rule = self.rule();
        let (mut parts, mut body) = request.into_parts();
        // HTTP/1 only: hyper's HTTP/2 server sends (and so polls) a HEAD answer's body.
        let head_request =
            parts.method == http::Method::HEAD && parts.version != http::Version::HTTP_2;
        let request_id = request_id::ensure(&mut parts.headers);
        // Boxed: it travels with the response body, which is moved several times.
        let mut log = Box::new(AccessLog::new(
            rule.port,
            rule.metrics.clone(),
            parts.method.clone(),
            parts.uri.path(),
            Mode::Passthrough,
            started,
        ));
        log.set_request_id(request_id);
        let routed = route(
            &parts.method,
            &parts.uri,
            parts.version,
            &parts.headers,
            rule.options.convert,
        );
        let result = match routed {
            Err(e) => Err(e),
            Ok(Route::Passthrough) => {
                // A streamed upload: its bytes counted as read, not as declared (a chunked
                // upload declares no length), and its progress moving the head deadline.
                if !body.is_end_stream() {
                    let progress = Arc::new(UploadProgress::new());
                    body.track_upload(progress.clone());
                    log.count_request_bytes(progress);
                }
                passthrough::forward(&rule, parts, body).await
            }
            Ok(Route::ConvertCandidate(api)) => {
                match convert::read_candidate(&rule, api, &parts, body).await {
                    Err(e) => Err(e),
                    // Not convertible (`"stream": true`, the common case): forwarded from
                    // here, without building the conversion's state machine.
                    Ok(Candidate::Passthrough(original)) => {
                        log.set_request_bytes(original.len() as u64);
                        passthrough::forward(&rule, parts, UpstreamBody::full(original)).await
                    }
                    // Boxed: the conversion's state machine is large, and keeping it out of
                    // this future keeps every passthrough request's future small.
                    Ok(Candidate::Convert {
                        original,
                        converted,
                    }) => {
                        Box::pin(convert::convert(
                            &rule, api, parts, original, converted, &mut log,
                        ))
                        .await
                    }
                }
            }
            Ok(Route::WebSocket) => {
                log.set_mode(Mode::WebSocket);
                Box::pin(websocket::handle(&rule, &self.sessions, parts, body)).await
            }
        };
        let response = result.unwrap_or_else(|e| {
            tracing::warn!(port = rule.port, upstream = %rule.upstream, error = %e, "request failed");
            e.to_response()
        });
        // Every upstream failure answered with an error response carries its kind, whether
        // the handler returned the error or built the response itself (conversion).
        if let Some(failure) = response.extensions().get::<UpstreamFailure>() {
            log.set_upstream_error(failure.0);
        }
        log.set_status(response.status().as_u16());
        if let Some(upstream_id) = response
            .headers()
            .get(request_id::X_REQUEST_ID)
            .filter(|id| request_id::is_loggable(id))
        {
            log.set_upstream_request_id(upstream_id.clone());
        }
        // The answer to an HTTP/1 HEAD has no body on the wire whatever the proxy built (an
        // error envelope, say): the server drops it unpolled, so it is complete now.
        if head_request {
            log.body_complete();
        }
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.with_log(log))
    }
}

type HandleFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<hyper::body::Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn call(&self, request: Request<hyper::body::Incoming>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            let request = request.map(UpstreamBody::incoming);
            Ok(service.handle(request).await)
        })
    }
}

/// For tower stacks and frameworks (axum, …): any request body is accepted and boxed.
impl<B> tower_service::Service<Request<B>> for ProxyService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            let request =
                request.map(|body| UpstreamBody::boxed(body.map_err(Into::into).boxed_unsync()));
            Ok(service.handle(request).await)
        })
    }
}

/// An error and its sources, outermost first.
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |cause| cause.source())
}

/// Whether a client error was caused by the request body we were sending (hyper reports
/// failures of the body it was given as "user" errors): the outermost hyper error decides.
fn is_request_body_error(error: &(dyn std::error::Error + 'static)) -> bool {
    causes(error)
        .find_map(|cause| cause.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_user)
}

/// Whether an upstream failure is a timeout somewhere in its chain (a connect that got no
/// answer: `ETIMEDOUT` from the OS, or a connector's own limit).
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    causes(error).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// The error for an upstream that failed before its response head: 504 when a timeout
/// caused it (D13), else 502, both naming `upstream` and the cause.
pub(crate) fn upstream_failed(
    upstream: String,
    error: &(dyn std::error::Error + 'static),
) -> ProxyError {
    let reason = error_chain(error);
    if is_timeout(error) {
        ProxyError::UpstreamIoTimeout { upstream, reason }
    } else {
        ProxyError::UpstreamUnreachable { upstream, reason }
    }
}

/// An error and its sources, joined with ": ", so a log or envelope names the root cause
/// ("client error (Connect): tcp connect error: Connection refused (os error 111)").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    for cause in causes(error).skip(1) {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
    }
    text
}
