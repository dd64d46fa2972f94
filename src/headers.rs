//! The one hop-by-hop header list, used by every mode in both directions (D16).
//!
//! RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field before a
//! message is forwarded and, for each connection-option in this field, remove any header or
//! trailer field(s) from the message with the same name as the connection-option, and then
//! remove the Connection header field itself (or replace it with the intermediary's own
//! control options for the forwarded message)." The fixed names below are the ones the RFC
//! and common practice treat as per-connection even when `Connection` does not list them,
//! plus `proxy-connection`, which old clients still send.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never the message.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Headers of a WebSocket handshake that belong to one connection's handshake only;
/// the proxy runs its own handshake on each leg.
pub const WEBSOCKET_HANDSHAKE: [HeaderName; 4] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_ACCEPT,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
];

/// Removes every hop-by-hop header: the fixed list and every name listed in any
/// `Connection` header line (all lines are read, W12).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, false);
}

/// [`strip_hop_by_hop`] for a response about to be relayed, which also drops a
/// `Content-Length` sent together with `Transfer-Encoding`: RFC 9112 §6.3, with both
/// framings Transfer-Encoding decides and Content-Length is stale; relaying it would make
/// the client stop early at a length that looks complete.
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, true);
}

fn strip(headers: &mut HeaderMap, stale_length: bool) {
    // One pass over the keys (standard names compare without hashing) notes which fixed
    // names are present; only those are removed, each removal being a hashed lookup. Most
    // requests carry none, most chunked responses only `transfer-encoding`.
    let mut present = 0u16;
    let mut content_length = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        } else if name == header::CONTENT_LENGTH {
            content_length = true;
        }
    }
    let has = |name: &HeaderName| {
        HOP_BY_HOP
            .iter()
            .position(|hop| hop == name)
            .is_some_and(|i| present & (1 << i) != 0)
    };
    if stale_length && content_length && has(&header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    } else if content_length {
        // A request's list (`5, 5`) hyper's server refuses; its repeated lines show as more
        // values than names, which costs nothing to see. A response's length is looked at.
        if stale_length || headers.len() != headers.keys_len() {
            single_content_length(headers);
        }
    }
    if has(&header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Rewrites a `Content-Length` sent as a list (`5, 5`) or on several lines as one value.
/// hyper accepts such a length when every value is the same, and would relay it as it came;
/// RFC 9110 §8.6 asks a proxy to forward one value, and strict parsers (Node's, Go's) refuse
/// the list, so the message would fail at the next hop.
fn single_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else { return };
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    // hyper refuses differing lengths, except on answers that have no body (HEAD, 204,
    // 304), whose length it does not read: those keep what they came with.
    let mut lengths = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
    let Some(Some(length)) = lengths.next() else {
        return;
    };
    if lengths.all(|other| other == Some(length)) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
}

/// Whether a comma-separated header (`Connection`, `Upgrade`) lists `token`, on any of its
/// lines, ignoring case and surrounding spaces.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `transfer-encoding` names `chunked` and nothing else: the one coding hyper
/// undoes. Any other is refused, on requests and on responses alike, since the hop-by-hop
/// strip would drop the only header saying that the bytes are still coded.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = transfer_codings(headers);
    codings
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Whether `transfer-encoding` names a coding that changes the bytes (`gzip`, `deflate`,
/// …): anything but `chunked`, which hyper undoes, and the obsolete no-op `identity`.
pub fn has_transfer_content_coding(headers: &HeaderMap) -> bool {
    transfer_codings(headers)
        .any(|t| !t.eq_ignore_ascii_case(b"chunked") && !t.eq_ignore_ascii_case(b"identity"))
}

/// The codings `transfer-encoding` names, over all its lines, in order.
fn transfer_codings(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Joins the `cookie` fields of an HTTP/2 request into one, as RFC 9113 §8.2.3 requires
/// before an HTTP/1.1 hop: HTTP/2 clients may send each cookie in a field of its own, and an
/// HTTP/1.1 server expects one line.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    if fields.next().is_none() || fields.next().is_none() {
        return;
    }
    let parts: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    // Valid field values joined with "; " are a valid field value.
    if let Ok(joined) = HeaderValue::from_bytes(&parts.join(&b"; "[..])) {
        headers.insert(header::COOKIE, joined);
    }
}

/// Sets the rule's injected headers (e.g. the upstream's credentials), replacing the
/// client's own. Called on the upstream request after the hop-by-hop strip: before it, a
/// client could delete them by naming them in `Connection`.
pub fn inject(headers: &mut HeaderMap, injected: &[(HeaderName, HeaderValue)]) {
    for (name, value) in injected {
        headers.insert(name.clone(), value.clone());
    }
}

/// Prepares client request headers for the upstream: hop-by-hop removed, and `host`
/// removed so the upstream connection sets its own authority.
pub fn upstream_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_length_list_becomes_one_value_only_when_every_value_agrees() {
        let lengths = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(header::CONTENT_LENGTH, HeaderValue::from_str(line).unwrap());
            }
            strip_response_hop_by_hop(&mut headers);
            headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(lengths(&["5"]), ["5"]);
        assert_eq!(lengths(&["5, 5"]), ["5"]);
        assert_eq!(lengths(&["5", " 5 "]), ["5"]);
        // A bodiless answer's lengths hyper did not check stay as they came.
        assert_eq!(lengths(&["5, 7"]), ["5, 7"]);
        assert_eq!(lengths(&["5", "x"]), ["5", "x"]);
    }

    #[test]
    fn removes_fixed_and_connection_listed_names_from_every_connection_line() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Remove-Me, close"),
        );
        headers.append(header::CONNECTION, HeaderValue::from_static("x-second"));
        headers.insert("x-remove-me", HeaderValue::from_static("1"));
        headers.insert("x-second", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep", "set-cookie"]);
        assert_eq!(headers.get_all(header::SET_COOKIE).iter().count(), 2);
    }

    #[test]
    fn response_variant_drops_a_stale_content_length_only_with_transfer_encoding() {
        let mut chunked = HeaderMap::new();
        chunked.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        chunked.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        chunked.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_response_hop_by_hop(&mut chunked);
        let names: Vec<&str> = chunked.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-type"]);

        let mut sized = HeaderMap::new();
        sized.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        sized.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        strip_response_hop_by_hop(&mut sized);
        let names: Vec<&str> = sized.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-length"]);

        let mut request = HeaderMap::new();
        request.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        request.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut request);
        assert!(request.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn upstream_request_drops_host_but_keeps_credentials() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-test"),
        );
        headers.insert("openai-beta", HeaderValue::from_static("assistants=v2"));
        upstream_request_headers(&mut headers);
        assert!(headers.get(header::HOST).is_none());
        assert_eq!(headers.len(), 2);
    }
}
