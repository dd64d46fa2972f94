//! Forwarding a request unchanged, both bodies streamed as bytes arrive.
//!
//! Nothing here looks inside a body: no JSON, no SSE. The client's framing is kept (D17): a
//! `content-length` stays, a bodiless GET stays bodiless, nothing is invented. Only
//! hop-by-hop headers are dropped and `host` becomes the upstream's authority.

use http::request::Parts;
use http::{Request, Response, Version};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::headers::{strip_hop_by_hop, upstream_request_headers};
use crate::service::RuleContext;
use crate::upstream::UpstreamBody;

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
    let uri = rule.upstream_uri(&parts.uri)?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = parts.headers;
    upstream_request_headers(request.headers_mut());
    Ok(request)
}

/// The upstream response with hop-by-hop headers removed and its body relayed under the
/// idle timeout. Status, every other header (repeated ones kept) and `content-encoding`
/// pass unchanged: a gzip body stays gzip, byte for byte.
pub fn relay_response(
    response: Response<hyper::body::Incoming>,
    idle: std::time::Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    // RFC 9112 §6.3: with both framings, Transfer-Encoding decides and Content-Length is
    // stale; relaying it would make the client stop early at a length that looks complete.
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::upstream(body, idle))
}
