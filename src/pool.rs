//! Kept-alive HTTP/1.1 connections to plain-`http` upstreams, driven by hyper's low-level
//! client connection.
//!
//! Measured with callgrind on a 20-event streaming request, the general pooled client
//! (hyper-util's, which the TLS, HTTP/2 and proxy paths keep using) spends a large share of
//! each request on its generic pool (hashing pool keys, connector futures, boxed request
//! futures). A local upstream over plain HTTP, the case where the proxy's own cost shows,
//! needs none of that: a list of idle connections per authority is enough.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{BoxError, UpstreamBody};

/// Connections idle longer than this are not reused (servers commonly close at 60–120 s).
const IDLE_LIMIT: Duration = Duration::from_secs(90);

/// Idle connections kept per authority, at most.
const MAX_IDLE_PER_AUTHORITY: usize = 1024;

/// The pool; cheap to clone.
#[derive(Clone, Default)]
pub struct Http1Pool {
    idle: Arc<Mutex<Vec<Idle>>>,
}

/// One authority's idle connections and its `host` header value, made once. Entries are
/// never removed, so an entry's index stays valid for the pool's life.
struct Idle {
    authority: Authority,
    host: HeaderValue,
    queue: VecDeque<Pooled>,
}

/// The index of `authority`'s entry. The authorities are the configured upstreams, a
/// handful, so a scan beats hashing: `Authority` hashes and compares one lowercased byte at
/// a time. A request's authority is normally a clone of its rule's, sharing its bytes, so
/// the first pass compares addresses only.
fn find(entries: &[Idle], authority: &Authority) -> Option<usize> {
    let text = authority.as_str();
    entries
        .iter()
        .position(|e| std::ptr::eq(e.authority.as_str(), text))
        .or_else(|| entries.iter().position(|e| e.authority == *authority))
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Http1Pool")
    }
}

struct Pooled {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

impl Http1Pool {
    /// Sends `request` (an absolute `http` URI) on an idle connection to its authority, or
    /// on a new one. A request that a stale connection refused before sending anything is
    /// retried once on a fresh connection.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let (mut parts, body) = request.into_parts();
        let authority = parts
            .uri
            .authority()
            .cloned()
            .ok_or("upstream URI without authority")?;
        let needs_host = !parts.headers.contains_key(header::HOST);
        // HTTP/1.1 to an origin server: origin-form request target.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
        let (index, host, mut idle) = self.checkout(&authority)?;
        if needs_host {
            parts.headers.insert(header::HOST, host);
        }
        let mut request = Request::from_parts(parts, body);

        let mut fresh = false;
        loop {
            let mut sender = match idle.take() {
                Some(sender) => sender,
                None => {
                    fresh = true;
                    // Boxed: connecting is rare (once per pooled connection) and its future
                    // (DNS, TCP, handshake) is large; inline, it would grow every request's
                    // future, which hyper boxes and moves.
                    Box::pin(connect(&authority)).await?
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin(index, sender);
                    return Ok(response);
                }
                Err(mut failed) => match failed.take_message() {
                    // Never sent: the idle connection had been closed by the server.
                    Some(unsent) if !fresh => {
                        request = unsent;
                        idle = self.checkout(&authority)?.2;
                    }
                    _ => return Err(failed.into_error().into()),
                },
            }
        }
    }

    /// The authority's entry index and `host` value, and an idle connection that can take a
    /// request now; closed and expired ones are dropped.
    #[allow(clippy::type_complexity)]
    fn checkout(
        &self,
        authority: &Authority,
    ) -> Result<(usize, HeaderValue, Option<http1::SendRequest<UpstreamBody>>), BoxError> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let index = match find(&idle, authority) {
            Some(index) => index,
            None => {
                idle.push(Idle {
                    authority: authority.clone(),
                    host: HeaderValue::from_str(authority.as_str())?,
                    queue: VecDeque::new(),
                });
                idle.len() - 1
            }
        };
        let entry = &mut idle[index];
        let host = entry.host.clone();
        let queue = &mut entry.queue;
        // Each entry is looked at once: busy connections (a response body still streaming)
        // go to the back and stay pooled until their response is done.
        for _ in 0..queue.len() {
            let Some(pooled) = queue.pop_front() else {
                break;
            };
            if pooled.sender.is_closed() || pooled.since.elapsed() > IDLE_LIMIT {
                continue;
            }
            if pooled.sender.is_ready() {
                return Ok((index, host, Some(pooled.sender)));
            }
            queue.push_back(pooled);
        }
        Ok((index, host, None))
    }

    /// Returns a connection to entry `index` right after its response head: it becomes
    /// ready for the next request once that response's body has been read to the end.
    fn checkin(&self, index: usize, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The entry exists: `send` checked out (and so created it) first.
        let Some(entry) = idle.get_mut(index) else {
            return;
        };
        let queue = &mut entry.queue;
        if queue.len() < MAX_IDLE_PER_AUTHORITY {
            queue.push_back(Pooled {
                sender,
                since: Instant::now(),
            });
        }
    }
}

async fn connect(authority: &Authority) -> Result<http1::SendRequest<UpstreamBody>, BoxError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("tcp connect error: {e}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
