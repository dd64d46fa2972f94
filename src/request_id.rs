//! Request ids: the client's `x-request-id` when it sent one, else a fresh id that also
//! goes upstream, so one id follows a request through the client, this proxy's log and the
//! upstream's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`: the request's id on the way upstream, and the upstream's own id on its
/// response (OpenAI sets it), which the access log records next to ours.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A per-process prefix, so ids from two proxy processes (or a restart) do not collide.
fn prefix() -> u32 {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    *PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        nanos ^ std::process::id().rotate_left(16)
    })
}

/// Longest client id taken as the request's id.
const MAX_ID_LEN: usize = 200;

/// Whether an id is fit for the log line: short, and only characters that ids are made of
/// (UUIDs, `req_…`, base64). Anything else (spaces, quotes, `=` pairs a log reader would take
/// for fields, kilobytes of text) would let a client or upstream write into the log line.
pub fn is_loggable(id: &HeaderValue) -> bool {
    id.len() <= MAX_ID_LEN
        && id
            .as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// The request's id: the client's when it is [loggable](is_loggable), else a fresh one. A
/// fresh id is also inserted into `headers` (and so goes upstream) when the client sent
/// none; an unfit id of the client's goes upstream untouched, and the log has the fresh one.
pub fn ensure(headers: &mut HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(existing) if is_loggable(existing) => return existing.clone(),
        Some(_) => return fresh(),
        None => {}
    }
    let id = fresh();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// `osp-{prefix:08x}{n:012x}`: unique within the process, and across processes by the prefix.
fn fresh() -> HeaderValue {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n >> 48 == 0 {
        // `osp-{prefix:08x}{n:012x}`, written without the formatting machinery (this runs
        // on every request without an id).
        let mut text = *b"osp-00000000000000000000";
        hex_into(&mut text[4..12], u64::from(prefix()));
        hex_into(&mut text[12..], n);
        HeaderValue::from_bytes(&text)
    } else {
        HeaderValue::from_str(&format!("osp-{:08x}{n:012x}", prefix()))
    }
    .unwrap_or_else(|_| HeaderValue::from_static("osp"))
}

/// Writes the low `4 * out.len()` bits of `value` into `out` as lowercase hex digits.
fn hex_into(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_clients_id_and_makes_unique_ones_otherwise() {
        let mut given = HeaderMap::new();
        given.insert(X_REQUEST_ID, HeaderValue::from_static("client-1"));
        assert_eq!(ensure(&mut given), "client-1");
        let (mut a, mut b) = (HeaderMap::new(), HeaderMap::new());
        let (id_a, id_b) = (ensure(&mut a), ensure(&mut b));
        assert_ne!(id_a, id_b);
        assert_eq!(a.get(X_REQUEST_ID), Some(&id_a));
        assert!(id_a.to_str().unwrap().starts_with("osp-"));
        assert_eq!(id_a.len(), 24);
        let prefix = format!("osp-{:08x}", prefix());
        assert!(id_b.to_str().unwrap().starts_with(&prefix), "{id_b:?}");
        assert!(id_b.to_str().unwrap()[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn an_id_unfit_for_the_log_stays_on_the_request_and_a_fresh_one_is_logged() {
        for kept in [
            "req_abc-123",
            "6f1c0c5e-2b9e-4c47-9d0a-1f2e3d4c5b6a",
            "YWJj+/==",
            "a:b@c.d",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(X_REQUEST_ID, HeaderValue::from_static(kept));
            assert_eq!(ensure(&mut headers), kept);
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        for unfit in [
            "a status=200 outcome=complete",
            "\"quoted\"",
            "{id}",
            long.as_str(),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(X_REQUEST_ID, HeaderValue::from_str(unfit).unwrap());
            let id = ensure(&mut headers);
            assert!(id.to_str().unwrap().starts_with("osp-"), "{unfit}: {id:?}");
            assert_eq!(headers.get(X_REQUEST_ID).unwrap(), unfit);
            assert_eq!(headers.len(), 1);
        }
    }
}
