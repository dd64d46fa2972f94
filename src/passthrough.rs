//! Forwarding a request unchanged, both bodies streamed as bytes arrive.
//!
//! Nothing here looks inside a body: no JSON, no SSE. The client's framing is kept (D17): a
//! `content-length` stays, a bodiless GET stays bodiless, nothing is invented. Only
//! hop-by-hop headers are dropped and `host` becomes the upstream's authority.

use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, Version};
use http_body::Body;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::headers::{inject, join_cookies, strip_response_hop_by_hop, upstream_request_headers};
use crate::service::RuleContext;
use crate::upstream::{UpstreamBody, UpstreamIncoming};

/// Sends the request upstream and relays the response head; the body follows as it arrives.
pub async fn forward(
    rule: &RuleContext,
    parts: Parts,
    body: UpstreamBody,
) -> Result<Response<ProxyBody>, ProxyError> {
    let request = upstream_request(rule, parts, body)?;
    let response = rule.send(request).await?;
    Ok(relay_response(response, rule.options.timeout))
}

/// The client's request, readdressed to the upstream.
pub fn upstream_request(
    rule: &RuleContext,
    parts: Parts,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let mut parts = parts;
    parts.uri = rule.upstream_uri(&parts.uri)?;
    // A body of unknown length that the client framed: chunked (HTTP/1), or DATA still to
    // come (HTTP/2, whose HEADERS did not end the stream), without a content-length.
    let framed_body = !parts.headers.contains_key(header::CONTENT_LENGTH)
        && match parts.version {
            Version::HTTP_2 => !body.is_end_stream() && body.size_hint().exact().is_none(),
            _ => parts.headers.contains_key(header::TRANSFER_ENCODING),
        };
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    parts.version = Version::HTTP_11;
    // The server's per-request extensions (upgrade handles and the like) stay here.
    parts.extensions.clear();
    upstream_request_headers(&mut parts.headers);
    inject(&mut parts.headers, &rule.options.headers);
    // hyper sends a GET or HEAD whose length it does not know without a body (it assumes
    // there is none); a client that framed one keeps it, as every request keeps its framing
    // (D17). A GET that framed none gets none.
    if framed_body && matches!(parts.method, Method::GET | Method::HEAD) {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    Ok(Request::from_parts(parts, body))
}

/// The upstream response with hop-by-hop headers removed and its body relayed under the
/// idle timeout. Status, every other header (repeated ones kept) and `content-encoding`
/// pass unchanged: a gzip body stays gzip, byte for byte.
pub fn relay_response(
    response: Response<UpstreamIncoming>,
    idle: std::time::Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    // Also drops a Content-Length that Transfer-Encoding makes stale (RFC 9112 §6.3).
    strip_response_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::upstream(body, idle))
}
