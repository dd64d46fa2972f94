//! The proxy's one error type and the only place that turns an error into an HTTP status
//! and an OpenAI-style error envelope.
//!
//! Clients of this proxy are OpenAI SDKs: they parse `{"error": {...}}` bodies and surface
//! `message` to their users, so every error the proxy itself produces uses that envelope,
//! with a message that says what happened and which upstream was involved, never a
//! credential or a request body.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::Value;

use crate::convert::outcome::UpstreamStreamError;

/// Response extension on every error response caused by the upstream: the failure kind
/// from [`ProxyError::upstream_kind`], which the service counts in the
/// `upstream_errors` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure(pub &'static str);

/// Everything that can stop the proxy from relaying an upstream answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached or refused the request before answering:
    /// DNS, connection refused, TLS failure, a reset before the response head.
    #[error("cannot reach upstream {upstream}: {reason}")]
    UpstreamUnreachable {
        /// The upstream base URL.
        upstream: String,
        /// What failed, with the error's chain of causes.
        reason: String,
    },
    /// No response head (or no byte of an aggregated stream) within `timeoutSeconds`.
    #[error("upstream {upstream} sent nothing for {seconds} s")]
    UpstreamTimeout {
        /// The upstream base URL.
        upstream: String,
        /// The timeout that ran out, in seconds.
        seconds: u64,
    },
    /// An operation on the upstream timed out before a response head came: above all a
    /// connect that got no answer (the OS's connect timeout, minutes, or a client's own),
    /// also a connection the OS gave up on mid-request. A timeout, so 504 like a head that
    /// did not come in `timeoutSeconds` (D13), whichever limit ran out first.
    #[error("upstream {upstream} timed out: {reason}")]
    UpstreamIoTimeout {
        /// The upstream base URL.
        upstream: String,
        /// What timed out, with the error's chain of causes.
        reason: String,
    },
    /// The upstream's stream could not be turned into a response (truncated, corrupt,
    /// over the size limit).
    #[error("upstream {upstream} returned an unusable stream: {reason}")]
    UpstreamStream {
        /// The upstream base URL.
        upstream: String,
        /// What was wrong with the stream.
        reason: String,
    },
    /// The upstream reported an error inside its stream; relayed with its own fields.
    #[error("upstream reported an error: {}", .0.message)]
    UpstreamReported(Box<UpstreamStreamError>),
    /// The request itself is unusable (absolute-form target, CONNECT, …).
    #[error("{0}")]
    BadRequest(String),
    /// A request the proxy understands but does not support (a transfer coding other than
    /// `chunked`).
    #[error("{0}")]
    NotImplemented(String),
    /// A request body over the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    RequestTooLarge {
        /// The rule's `maxRequestBodyBytes`.
        limit: u64,
    },
    /// The client's request body failed while the proxy was reading it.
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    /// The client stopped sending its request body part-way.
    #[error("the request body stalled: no bytes arrived for {seconds} s")]
    RequestBodyTimeout {
        /// The rule's `timeoutSeconds`.
        seconds: u64,
    },
}

impl ProxyError {
    /// Status, `type` and `code` for the envelope; the single mapping from error to status.
    fn classify(&self) -> (StatusCode, &str, Value) {
        match self {
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamStream { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Value::from("upstream_error"),
            ),
            ProxyError::UpstreamTimeout { .. } | ProxyError::UpstreamIoTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                Value::from("upstream_timeout"),
            ),
            ProxyError::UpstreamReported(e) => (
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY),
                e.error_type.as_str(),
                e.code.clone(),
            ),
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Value::from("invalid_request"),
            ),
            ProxyError::NotImplemented(_) => (
                StatusCode::NOT_IMPLEMENTED,
                "invalid_request_error",
                Value::from("not_implemented"),
            ),
            ProxyError::RequestTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Value::from("request_too_large"),
            ),
            ProxyError::RequestBodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Value::from("request_timeout"),
            ),
        }
    }

    /// The upstream failure class for metrics; `None` for the client's own mistakes.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::UpstreamUnreachable { .. } => Some("connect"),
            ProxyError::UpstreamTimeout { .. } | ProxyError::UpstreamIoTimeout { .. } => {
                Some("timeout")
            }
            ProxyError::UpstreamStream { .. } => Some("incomplete_stream"),
            ProxyError::UpstreamReported(_) => Some("in_stream_error"),
            ProxyError::BadRequest(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::RequestTooLarge { .. }
            | ProxyError::RequestBody(_)
            | ProxyError::RequestBodyTimeout { .. } => None,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The envelope body `{"error":{"message","type","param","code"}}`.
    pub fn envelope(&self) -> Bytes {
        let (_, error_type, code) = self.classify();
        let (message, param) = match self {
            ProxyError::UpstreamReported(e) => (e.message.clone(), e.param.clone()),
            other => (other.to_string(), Value::Null),
        };
        envelope_bytes(&message, error_type, param, code)
    }

    /// A complete response for this error, with `content-type` and exact `content-length`;
    /// an upstream failure also carries its [`UpstreamFailure`] kind as an extension.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut response = json_response(self.status(), self.envelope());
        let headers = response.headers_mut();
        match self.upstream_kind() {
            Some(kind) => {
                response.extensions_mut().insert(UpstreamFailure(kind));
            }
            // After a malformed or oversized request the rest of the connection's bytes
            // cannot be trusted to start a new request: close it.
            None => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        response
    }
}

/// A response with a JSON `body`, its `content-type` and exact `content-length`.
pub fn json_response<B: From<Bytes>>(status: StatusCode, body: Bytes) -> Response<B> {
    let length = body.len();
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// Serialises an OpenAI error envelope; key order follows OpenAI's own bodies.
pub fn envelope_bytes(message: &str, error_type: &str, param: Value, code: Value) -> Bytes {
    let mut error = serde_json::Map::with_capacity(4);
    error.insert("message".into(), Value::from(message));
    error.insert("type".into(), Value::from(error_type));
    error.insert("param".into(), param);
    error.insert("code".into(), code);
    let mut root = serde_json::Map::with_capacity(1);
    root.insert("error".into(), Value::Object(error));
    // Serialising a map of strings and plain values cannot fail.
    Bytes::from(serde_json::to_vec(&Value::Object(root)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_openai_shape_with_null_param() {
        let err = ProxyError::UpstreamTimeout {
            upstream: "http://127.0.0.1:1".into(),
            seconds: 3,
        };
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        let v: Value = serde_json::from_slice(&err.envelope()).unwrap();
        assert_eq!(v["error"]["type"], "upstream_timeout");
        assert_eq!(v["error"]["code"], "upstream_timeout");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("3 s"));
    }

    #[test]
    fn reported_errors_keep_the_upstream_fields() {
        let err = ProxyError::UpstreamReported(Box::new(UpstreamStreamError {
            status: 429,
            message: "slow down".into(),
            error_type: "rate_limit_error".into(),
            code: Value::from("rate_limit_exceeded"),
            param: Value::from("model"),
        }));
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        let v: Value = serde_json::from_slice(&err.envelope()).unwrap();
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
}
