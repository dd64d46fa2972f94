//! Decides from the request head alone what the proxy does with a request. Pure: no I/O.
//!
//! The order matters: an unusable request target is refused first (nothing may be sent
//! upstream for it), then a WebSocket upgrade is recognised before anything else so that an
//! upgrade on `/v1/responses` is never mistaken for a conversion (D29), then conversion
//! candidates; everything else passes through.

use http::{header, HeaderMap, Method, Uri, Version};

use crate::convert::request::{conversion_candidate, Api};
use crate::error::ProxyError;
use crate::headers::{has_token, only_chunked};

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Proxy a WebSocket session.
    WebSocket,
    /// Read the body and decide whether to convert it.
    ConvertCandidate(Api),
    /// Forward unchanged, streaming both ways.
    Passthrough,
}

/// The mode a request ended up in, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwarded unchanged; also a conversion candidate whose body was not converted, and
    /// a request refused before reaching the upstream.
    Passthrough,
    /// Sent upstream as a stream and answered with the aggregated body.
    Convert,
    /// A WebSocket session.
    WebSocket,
}

impl Mode {
    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::Convert => "convert",
            Mode::WebSocket => "websocket",
        }
    }
}

/// Routes a request head. `convert` is the rule's conversion switch.
pub fn route(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    convert: bool,
) -> Result<Route, ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: this is a reverse proxy for one upstream".into(),
        ));
    }
    // HTTP/2 always carries scheme and authority; in HTTP/1 they only appear in an
    // absolute-form target, which a reverse proxy must not follow to another host (W21).
    if version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(ProxyError::BadRequest(
            "absolute-form request targets are not accepted; send the path only".into(),
        ));
    }
    if version < Version::HTTP_2 {
        check_http1_framing(version, headers)?;
    }
    if is_websocket_upgrade(method, version, headers) {
        return Ok(Route::WebSocket);
    }
    if convert {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        if let Some(api) = conversion_candidate(method, path_and_query, headers) {
            return Ok(Route::ConvertCandidate(api));
        }
    }
    Ok(Route::Passthrough)
}

/// HTTP/1 head checks that keep every hop agreeing on where this request ends.
fn check_http1_framing(version: Version, headers: &HeaderMap) -> Result<(), ProxyError> {
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (version == Version::HTTP_11 && hosts == 0) {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request must carry exactly one Host header (RFC 9112 §3.2)".into(),
        ));
    }
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    // Both framings at once are the classic smuggling vector (RFC 9112 §6.1). hyper lets
    // Transfer-Encoding win and drops Content-Length before we see the request; this is
    // the second line for servers that do not.
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest(
            "Content-Length together with Transfer-Encoding is not accepted".into(),
        ));
    }
    // Only `chunked` alone is understood; dropping another coding (`gzip, chunked`) would
    // forward coded bytes that nothing labels as coded (RFC 9112 §6.1: 501).
    if !only_chunked(headers) {
        return Err(ProxyError::NotImplemented(
            "only the chunked transfer coding is supported".into(),
        ));
    }
    Ok(())
}

/// RFC 6455 §4.1 opening handshake: GET, HTTP/1.1, `Upgrade: websocket` and `Connection`
/// listing `upgrade` (tokens are case-insensitive and may be among others).
pub fn is_websocket_upgrade(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    method == Method::GET
        && version == Version::HTTP_11
        && has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("proxy.local"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h
    }

    #[test]
    fn conversion_paths_need_post_json_and_the_switch() {
        let uri: Uri = "/v1/chat/completions".parse().unwrap();
        let h = json_headers();
        assert_eq!(
            route(&Method::POST, &uri, Version::HTTP_11, &h, true).unwrap(),
            Route::ConvertCandidate(Api::ChatCompletions)
        );
        assert_eq!(
            route(&Method::POST, &uri, Version::HTTP_11, &h, false).unwrap(),
            Route::Passthrough
        );
        assert_eq!(
            route(&Method::GET, &uri, Version::HTTP_11, &h, true).unwrap(),
            Route::Passthrough
        );
    }

    #[test]
    fn websocket_upgrade_wins_over_conversion_paths() {
        let uri: Uri = "/v1/responses".parse().unwrap();
        let mut h = json_headers();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            route(&Method::GET, &uri, Version::HTTP_11, &h, true).unwrap(),
            Route::WebSocket
        );
        assert_eq!(
            route(&Method::POST, &uri, Version::HTTP_11, &h, true).unwrap(),
            Route::ConvertCandidate(Api::Responses)
        );
    }

    #[test]
    fn ambiguous_framing_and_missing_host_are_refused() {
        let uri: Uri = "/v1/files".parse().unwrap();
        let mut h = json_headers();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(route(&Method::POST, &uri, Version::HTTP_11, &h, true).is_err());
        h.remove(header::TRANSFER_ENCODING);
        assert!(route(&Method::POST, &uri, Version::HTTP_11, &h, true).is_ok());
        h.remove(header::HOST);
        assert!(route(&Method::POST, &uri, Version::HTTP_11, &h, true).is_err());
        assert!(route(&Method::POST, &uri, Version::HTTP_10, &h, true).is_ok());
        h.append(header::HOST, HeaderValue::from_static("a"));
        h.append(header::HOST, HeaderValue::from_static("b"));
        assert!(route(&Method::POST, &uri, Version::HTTP_11, &h, true).is_err());
        h.remove(header::HOST);
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.remove(header::CONTENT_LENGTH);
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        let refused = route(&Method::POST, &uri, Version::HTTP_11, &h, true).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::NOT_IMPLEMENTED);
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("Chunked"),
        );
        assert!(route(&Method::POST, &uri, Version::HTTP_11, &h, true).is_ok());
    }

    #[test]
    fn absolute_form_and_connect_are_refused() {
        let h = HeaderMap::new();
        let abs: Uri = "http://evil.example/v1/models".parse().unwrap();
        assert!(route(&Method::GET, &abs, Version::HTTP_11, &h, true).is_err());
        assert_eq!(
            route(&Method::GET, &abs, Version::HTTP_2, &h, true).unwrap(),
            Route::Passthrough
        );
        let authority: Uri = "example.com:443".parse().unwrap();
        assert!(route(&Method::CONNECT, &authority, Version::HTTP_11, &h, true).is_err());
    }
}
