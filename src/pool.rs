//! Kept-alive HTTP/1.1 connections to plain-`http` upstreams, driven by hyper's low-level
//! client connection in the task that reads their response.
//!
//! Measured with callgrind on a 20-event streaming request, the general pooled client
//! (hyper-util's, which the TLS, HTTP/2 and proxy paths keep using) spends a large share of
//! each request on its generic pool (hashing pool keys, connector futures, boxed request
//! futures). A local upstream over plain HTTP, the case where the proxy's own cost shows,
//! needs none of that: a list of idle connections per authority is enough.
//!
//! No connection has a task of its own. A spawned connection task decodes each chunk and
//! hands it to the response body through a one-slot channel, so every SSE event woke two
//! tasks in turn. Here the [`UpstreamIncoming`] body polls its connection itself before it
//! waits: the chunks already read are decoded and relayed in one poll of the task that
//! serves the client, and the end of the body is seen in the same poll as its last data.
//! Idle connections are polled by no one: a request's first poll finds one the upstream
//! has closed (and retries on a fresh connection), and a periodic sweep drops the others.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{BoxError, UpstreamBody};

/// Connections idle longer than this are not reused (servers commonly close at 60–120 s).
const IDLE_LIMIT: Duration = Duration::from_secs(90);

/// Idle connections kept per authority, at most.
const MAX_IDLE_PER_AUTHORITY: usize = 1024;

/// How long [`UpstreamIncoming::drain_for_reuse`] waits for the end of a body, and how many
/// bytes it reads, before it gives the connection up.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: usize = 16 * 1024;

/// Connection passes per poll of a request waiting for its response head, before it
/// yields to other tasks (as [`drive`]'s budget does for a body).
const HEAD_PASSES: usize = 32;

/// How often idle connections are checked for a close by the upstream, so that sockets the
/// upstream has closed do not linger until the next request.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

type Connection = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// The pool; cheap to clone.
#[derive(Clone, Default)]
pub struct Http1Pool {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    idle: Mutex<Vec<Idle>>,
    /// Set once the sweeping task runs.
    sweeping: AtomicBool,
    /// The longest a new connection's TCP handshake may take (`None`: the OS's limit).
    connect_timeout: Option<Duration>,
}

/// One authority's idle connections and its `host` header value, made once. Entries are
/// never removed, so an entry's index stays valid for the pool's life.
struct Idle {
    authority: Authority,
    host: HeaderValue,
    /// Most recently used at the back, where reuse takes from; the sweep drops expired ones.
    queue: VecDeque<Box<Pooled>>,
}

/// The `host` header for `authority`: without credentials (a library caller may pass a URI
/// with some) and without the scheme's default port, as hyper-util's client (which the TLS
/// and proxy paths use) writes it.
fn host_value(authority: &Authority) -> &str {
    match authority.port_u16() {
        Some(80) => authority.host(),
        _ => authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, host)| host),
    }
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

/// A connection with its request handle. Boxed wherever it goes, so that moving a lease
/// through futures and bodies moves a pointer, not hyper's connection state.
struct Pooled {
    sender: http1::SendRequest<UpstreamBody>,
    connection: Connection,
    /// When it was last returned to the pool.
    since: Instant,
    /// The waker the connection is always polled with, and what it records.
    signal: Arc<Signal>,
    waker: Waker,
}

/// Records that the connection was woken, so that a body poll drives the connection only
/// when it may have progressed: driving it costs a pass over hyper's whole client state
/// machine, and a server polls a body several times per frame.
///
/// A wake while the body is being polled (the body taking a frame wakes the connection,
/// which now has room for the next) only sets the flag: the poll looks at it before it
/// returns. Other wakes (the socket is readable) also wake the task.
#[derive(Default)]
struct Signal {
    woken: AtomicBool,
    polling: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl Pooled {
    /// Ready for a request and not idle for too long; closed or not, as last polled.
    fn can_take_a_request(&self) -> bool {
        self.sender.is_ready() && self.since.elapsed() <= IDLE_LIMIT
    }

    /// Polls an idle connection once, without waiting: `false` once the upstream has
    /// closed it (or sent bytes no request asked for) or it cannot take a request.
    fn reusable(&mut self) -> bool {
        self.still_open() && self.can_take_a_request()
    }

    /// Polls the connection once, without waiting: `false` once it has ended (closed by
    /// the upstream, failed, or done with an upgrade).
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.connection).poll(&mut cx).is_pending()
    }
}

impl Http1Pool {
    /// A pool whose new connections give up on a connect that takes longer than
    /// `connect_timeout`, as the client's other connectors do with the same option. The
    /// limit covers the whole connect: the name lookup and every address tried (hyper-util's
    /// connector gives each address its own share).
    pub fn with_connect_timeout(connect_timeout: Option<Duration>) -> Self {
        Http1Pool {
            shared: Arc::new(Shared {
                connect_timeout,
                ..Shared::default()
            }),
        }
    }

    /// Sends `request` (an absolute `http` URI) on an idle connection to its authority, or
    /// on a new one. A request that a stale connection refused before sending anything is
    /// retried once on a fresh connection.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamIncoming>, BoxError> {
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
        // These connections speak HTTP/1.x; hyper panics on any other version.
        if !matches!(parts.version, Version::HTTP_10 | Version::HTTP_11) {
            parts.version = Version::HTTP_11;
        }
        let (index, host, mut idle) = self.checkout(&authority)?;
        if needs_host {
            parts.headers.insert(header::HOST, host);
        }
        let mut request = Request::from_parts(parts, body);

        let mut fresh = false;
        loop {
            let mut pooled = match idle.take() {
                Some(pooled) => pooled,
                None => {
                    fresh = true;
                    // Boxed: connecting is rare (once per pooled connection) and its future
                    // (DNS, TCP, handshake) is large; inline, it would grow every request's
                    // future, which hyper boxes and moves.
                    Box::pin(connect(&authority, self.shared.connect_timeout)).await?
                }
            };
            let mut head = std::pin::pin!(pooled.sender.try_send_request(request));
            let mut lease = Some(pooled);
            // The connection writes the request and reads the head only while polled.
            let outcome = poll_fn(|cx| {
                let Some(pooled) = lease.as_mut() else {
                    return head.as_mut().poll(cx);
                };
                let signal = &*pooled.signal;
                signal.task.register(cx.waker());
                for _ in 0..HEAD_PASSES {
                    signal.woken.store(false, Ordering::SeqCst);
                    // Only the connection answers `head`, while polled here: the wakes of
                    // this pass (the answer among them) need not schedule the task again.
                    signal.polling.store(true, Ordering::SeqCst);
                    let mut own = Context::from_waker(&pooled.waker);
                    if Pin::new(&mut pooled.connection).poll(&mut own).is_ready() {
                        signal.polling.store(false, Ordering::SeqCst);
                        // Ended (closed or failed): dropping it answers a request it still
                        // holds, so `head` cannot wait forever.
                        lease = None;
                        return head.as_mut().poll(cx);
                    }
                    let polled = head.as_mut().poll(&mut own);
                    signal.polling.store(false, Ordering::SeqCst);
                    // A wake during the pass did not schedule the task: the connection has
                    // more to do now, so it gets another pass.
                    if polled.is_ready() || !signal.woken.load(Ordering::SeqCst) {
                        return polled;
                    }
                }
                // Still progressing without a head: let other tasks run, then go on.
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await;
            match outcome {
                // Nothing to read (HEAD, 204, 304, `content-length: 0`): servers drop such a
                // body unpolled, so a lease would end unreleased and close a connection
                // that is idle already. It goes back now, once a poll has let it go idle.
                Ok(response) if response.body().is_end_stream() => {
                    if let Some(mut pooled) = lease {
                        // Not `reusable`: its idle-age test counts from the last check-in,
                        // and this connection has just served. `checkin` keeps it only if
                        // it can take a request.
                        if pooled.still_open() {
                            self.checkin(index, pooled);
                        }
                    }
                    return Ok(response.map(UpstreamIncoming::from));
                }
                Ok(response) => {
                    if let Some(pooled) = &lease {
                        // The first body poll drives the connection: the body may be
                        // waiting in its buffer already.
                        pooled.signal.woken.store(true, Ordering::SeqCst);
                    }
                    let lease = lease.map(|pooled| Lease {
                        pooled,
                        pool: self.clone(),
                        index,
                    });
                    return Ok(response.map(|body| UpstreamIncoming {
                        lease,
                        ..UpstreamIncoming::from(body)
                    }));
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
    ) -> Result<(usize, HeaderValue, Option<Box<Pooled>>), BoxError> {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner());
        let index = match find(&idle, authority) {
            Some(index) => index,
            None => {
                idle.push(Idle {
                    authority: authority.clone(),
                    host: HeaderValue::from_str(host_value(authority))?,
                    queue: VecDeque::new(),
                });
                idle.len() - 1
            }
        };
        let entry = &mut idle[index];
        let host = entry.host.clone();
        // Bounded: each connection is looked at once, and expired ones are dropped. Not
        // polled here: `send`'s first poll reads an upstream's close before it writes, and
        // hands the unsent request back for a fresh connection; a poll here would cost each
        // request a pass over hyper's client state machine to spare that rare retry.
        while let Some(pooled) = entry.queue.pop_back() {
            if pooled.can_take_a_request() {
                return Ok((index, host, Some(pooled)));
            }
        }
        Ok((index, host, None))
    }

    /// Returns a connection whose response was read to its end.
    fn checkin(&self, index: usize, mut pooled: Box<Pooled>) {
        // The last reader's task waker would keep that finished task's memory alive.
        drop(pooled.signal.task.take());
        if !pooled.sender.is_ready() {
            return;
        }
        pooled.since = Instant::now();
        let mut idle = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The entry exists: `send` checked out (and so created it) first. Expired
        // connections are left to the sweep and to `checkout`, which never hands one out:
        // trimming them here too would cost every request a clock read to save at most
        // `SWEEP_EVERY` of an idle socket's life.
        let Some(entry) = idle.get_mut(index) else {
            return;
        };
        // Full: the oldest makes room (it is the likeliest to have expired).
        if entry.queue.len() >= MAX_IDLE_PER_AUTHORITY {
            entry.queue.pop_front();
        }
        entry.queue.push_back(pooled);
        drop(idle);
        self.sweep_from_now_on();
    }

    /// Starts the task that drops idle connections the upstream has closed or that expired
    /// (once per pool, inside a tokio runtime; it ends with the pool).
    fn sweep_from_now_on(&self) {
        if self.shared.sweeping.load(Ordering::Relaxed)
            || self.shared.sweeping.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.sweeping.store(false, Ordering::Relaxed);
            return;
        };
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut idle = shared.idle.lock().unwrap_or_else(|p| p.into_inner());
                for entry in idle.iter_mut() {
                    entry.queue.retain_mut(|pooled| pooled.reusable());
                }
            }
        });
    }
}

/// A connection lent to one response: it goes back to the pool when the body has been read
/// to its end, and is closed with the body otherwise.
struct Lease {
    pooled: Box<Pooled>,
    pool: Http1Pool,
    index: usize,
}

/// An upstream response body. On the pool's own connections it also drives the connection
/// that carries it (see the module doc); on others it is hyper's body as it is.
#[derive(Debug)]
pub struct UpstreamIncoming {
    body: Incoming,
    lease: Option<Lease>,
    /// An error held back for one poll (see `poll_frame`).
    failed: Option<hyper::Error>,
    /// Set by [`UpstreamIncoming::relayed`] on the pool's own connections: small frames that
    /// follow a wait are detached.
    relayed: bool,
    /// The last poll returned `Pending`.
    waited: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl From<Incoming> for UpstreamIncoming {
    /// A body whose connection runs elsewhere (hyper-util's client, a WebSocket handshake).
    fn from(body: Incoming) -> Self {
        UpstreamIncoming {
            body,
            lease: None,
            failed: None,
            relayed: false,
            waited: false,
        }
    }
}

impl UpstreamIncoming {
    /// Marks the body as relayed to a client frame by frame (passthrough): each frame then
    /// waits in the server's write queue while the connection reads again, the case
    /// [`detached`] is for. Readers that consume each frame before the next poll (the
    /// conversions) gain nothing from a copy, nor do bodies whose connection runs in a task
    /// of its own, which reserves its next read before the frame reaches the relay.
    pub fn relayed(mut self) -> Self {
        self.relayed = self.lease.is_some();
        self
    }

    /// For a reader that stops at a terminal event (`[DONE]`, `response.completed`) one
    /// chunk before the body's end: reads the rest, so that the connection can serve again
    /// rather than be closed with the body. What has already arrived is read at once;
    /// otherwise a task waits a little for the end, reading no more than a few KiB.
    pub fn drain_for_reuse(mut self) {
        if self.lease.is_none() {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // A few frames at most: a well-formed stream has nothing but its terminator left.
        for _ in 0..4 {
            match Pin::new(&mut self).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(None) | Poll::Ready(Some(Err(_))) => return,
                Poll::Pending if self.lease.is_none() => return,
                Poll::Pending => break,
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut left = DRAIN_LIMIT;
            let drained = async {
                while let Some(Ok(frame)) = self.frame().await {
                    let len = frame.data_ref().map_or(0, Bytes::len);
                    match left.checked_sub(len) {
                        Some(rest) => left = rest,
                        None => return,
                    }
                }
            };
            // Dropped unfinished on timeout: the connection is closed, as before.
            let _ = tokio::time::timeout(DRAIN_WAIT, drained).await;
        });
    }

    /// Returns the connection to the pool, if there is one and it can serve again.
    fn release(&mut self) {
        if let Some(Lease {
            pooled,
            pool,
            index,
        }) = self.lease.take()
        {
            pool.checkin(index, pooled);
        }
    }
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(failed) = this.failed.take() {
            return Poll::Ready(Some(Err(failed)));
        }
        let polled = match this.lease.as_mut() {
            None => Pin::new(&mut this.body).poll_frame(cx),
            Some(lease) => {
                let (polled, ended) = drive(&mut this.body, &mut lease.pooled, cx);
                if ended {
                    this.lease = None;
                }
                polled
            }
        };
        match polled {
            Poll::Ready(None) => this.release(),
            // Trailers end a chunked body, though `is_end_stream` does not say so yet, and a
            // server stops polling a body once it has them.
            Poll::Ready(Some(Ok(ref frame)))
                if frame.is_trailers() || this.body.is_end_stream() =>
            {
                this.release()
            }
            // The frames decoded before the error in this same poll are still in the
            // server's write buffer (or an HTTP/2 stream's send queue, which a reset
            // discards). Failing after a yield lets them reach the client first, as they
            // did when the error came from another task.
            Poll::Ready(Some(Err(e))) => {
                this.lease = None;
                this.failed = Some(e);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            _ => {}
        }
        match polled {
            Poll::Pending => {
                this.waited = true;
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) if this.relayed && std::mem::take(&mut this.waited) => {
                Poll::Ready(Some(Ok(detached(frame))))
            }
            polled => {
                this.waited = false;
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Data frames up to this size are copied out of the connection's read buffer: an SSE event
/// is a few hundred bytes, and glibc serves requests up to about 1 KiB from its per-thread
/// cache, the cheap path that makes the copy pay.
const DETACH_UP_TO: usize = 1024;

/// A small data frame in its own allocation instead of a view into the pooled connection's
/// read buffer, for a relayed frame that follows a wait (one event of a paced stream).
///
/// The frame is still queued in the server's write buffer when the connection reads again,
/// and hyper reserves its next read space then: a view keeps the read buffer shared, so that
/// reserve allocates a fresh 8 KiB buffer, and the old one is freed once the frame is
/// written, a malloc/free pair on glibc's slow path for every relayed SSE event. A copy of
/// an event comes from the allocator's per-thread cache, and the read buffer, unshared, is
/// reused in place. Frames decoded from one read without a wait in between share that
/// read's buffer with one another anyway: copying each would cost more than the one
/// allocation it could save, so only the first is copied.
fn detached(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) if data.len() <= DETACH_UP_TO => Frame::data(Bytes::copy_from_slice(data)),
        _ => frame,
    }
}

/// What a body poll returns.
type PolledFrame = Poll<Option<Result<Frame<Bytes>, hyper::Error>>>;

/// Polls `body`, driving its connection whenever that was woken, until a frame is ready or
/// nothing more can happen now. `true` with the result once the connection has ended.
fn drive(body: &mut Incoming, pooled: &mut Pooled, cx: &mut Context<'_>) -> (PolledFrame, bool) {
    /// Connection passes per body poll before yielding to other tasks.
    const BUDGET: usize = 32;
    let signal = &*pooled.signal;
    signal.task.register(cx.waker());
    signal.polling.store(true, Ordering::SeqCst);
    // The body is polled with the connection's waker too: only the connection fills it,
    // during these polls, so a frame arriving must not schedule the task once more.
    let mut own = Context::from_waker(&pooled.waker);
    let mut ended = false;
    let mut passes = 0;
    let polled = loop {
        let polled = Pin::new(&mut *body).poll_frame(&mut own);
        if polled.is_ready() || ended {
            break polled;
        }
        if signal.woken.swap(false, Ordering::SeqCst) {
            if passes == BUDGET {
                // Still progressing without a frame: let other tasks run, then go on.
                signal.woken.store(true, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                break polled;
            }
            passes += 1;
            ended = Pin::new(&mut pooled.connection).poll(&mut own).is_ready();
            continue;
        }
        signal.polling.store(false, Ordering::SeqCst);
        // A wake between the check above and clearing `polling` did not wake the task.
        if signal.woken.load(Ordering::SeqCst) {
            signal.polling.store(true, Ordering::SeqCst);
            continue;
        }
        break polled;
    };
    signal.polling.store(false, Ordering::SeqCst);
    (polled, ended)
}

async fn connect(authority: &Authority, limit: Option<Duration>) -> Result<Box<Pooled>, BoxError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let connecting = async {
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        connect_any(interleaved(addresses)).await
    };
    // The kind survives (`TimedOut` above all): the proxy answers a connect that timed out
    // with 504, as it does a head that did not come, and a refused one with 502 (D13).
    let connected = match limit {
        Some(limit) => tokio::time::timeout(limit, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {limit:?}"),
                ))
            }),
        None => connecting.await,
    };
    let stream =
        connected.map_err(|e| std::io::Error::new(e.kind(), format!("tcp connect error: {e}")))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    let signal = Arc::new(Signal::default());
    Ok(Box::new(Pooled {
        sender,
        connection,
        since: Instant::now(),
        waker: Waker::from(signal.clone()),
        signal,
    }))
}

/// How long an attempt to connect to one address has before the next address is tried
/// beside it (RFC 8305's recommended 250 ms).
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// Connects to the first of `addresses` that answers, starting one attempt at a time and
/// the next one when the last fails or has had [`NEXT_ADDRESS_AFTER`] without an answer,
/// the earlier ones still running (RFC 8305). Tried strictly in turn, an address that drops
/// handshakes (an AAAA record behind a firewall, say) would hold every new connection for
/// the OS's connect timeout, minutes, before a working one was tried.
async fn connect_any(addresses: Vec<SocketAddr>) -> std::io::Result<TcpStream> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut left = addresses.into_iter().peekable();
    let mut attempts = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        if attempts.is_empty() {
            match left.next() {
                Some(address) => attempts.push(TcpStream::connect(address)),
                None => {
                    return Err(last_error.unwrap_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the name resolved to no address",
                        )
                    }))
                }
            }
        }
        let more = left.peek().is_some();
        tokio::select! {
            Some(result) = attempts.next() => match result {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    last_error = Some(e);
                    // A failed address hands over at once, whatever else is still trying.
                    if let Some(address) = left.next() {
                        attempts.push(TcpStream::connect(address));
                    }
                }
            },
            () = tokio::time::sleep(NEXT_ADDRESS_AFTER), if more => {
                if let Some(address) = left.next() {
                    attempts.push(TcpStream::connect(address));
                }
            }
        }
    }
}

/// `addresses` with the two families alternating, starting with the resolver's first
/// choice, so that a family that does not work costs one attempt's head start, not one per
/// address of it.
fn interleaved(addresses: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addresses.first() else {
        return addresses;
    };
    let first_is_v4 = first.is_ipv4();
    let (preferred, other): (Vec<SocketAddr>, Vec<SocketAddr>) = addresses
        .into_iter()
        .partition(|a| a.is_ipv4() == first_is_v4);
    let mut out = Vec::with_capacity(preferred.len() + other.len());
    let mut other = other.into_iter();
    for address in preferred {
        out.push(address);
        out.extend(other.next());
    }
    out.extend(other);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(10);

    /// A listener whose accept queue is full drops further handshakes, so a connect to it
    /// hangs: the pool gives up at its connect timeout, not at the OS's (minutes).
    #[tokio::test]
    async fn a_connect_that_gets_no_answer_ends_at_the_connect_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the queue (nothing accepts); later handshakes go unanswered.
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                held.push(stream);
            }
        }
        let pool = Http1Pool::with_connect_timeout(Some(Duration::from_millis(300)));
        let request = Request::get(format!("http://{addr}/"))
            .body(UpstreamBody::full(Bytes::new()))
            .unwrap();
        let failed = tokio::time::timeout(WAIT, pool.send(request))
            .await
            .expect("the connect outlived its timeout");
        let error = failed.expect_err("a request to a full accept queue succeeded");
        assert!(error.to_string().contains("no answer within"), "{error}");
        drop(held);
    }

    /// The first address drops handshakes (a full accept queue, nothing accepting): the
    /// second, tried beside it after a head start, connects, long before any connect
    /// timeout. Tried in turn, the first would have held the connect for minutes.
    #[tokio::test]
    async fn an_address_that_drops_handshakes_does_not_hold_the_next_one() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = socket.listen(0).unwrap();
        let dropping = full.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(dropping)).await
            {
                held.push(stream);
            }
        }
        let working = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let working_addr = working.local_addr().unwrap();
        let connected = tokio::time::timeout(WAIT, connect_any(vec![dropping, working_addr]))
            .await
            .expect("the working address was not tried while the first hung")
            .unwrap();
        assert_eq!(connected.peer_addr().unwrap(), working_addr);
        // A refused address is left at once for the next, even while an earlier attempt
        // still hangs: behind the hanging one and three refused ones, the working address
        // starts with the second head start (~250 ms), not the fourth (~1 s).
        drop(working);
        let refused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused_addr = refused.local_addr().unwrap();
        let working = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let working_addr = working.local_addr().unwrap();
        drop(refused);
        let started = std::time::Instant::now();
        let connected = connect_any(vec![
            dropping,
            refused_addr,
            refused_addr,
            refused_addr,
            working_addr,
        ])
        .await
        .unwrap();
        assert_eq!(connected.peer_addr().unwrap(), working_addr);
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "took {:?}",
            started.elapsed()
        );
        let error = connect_any(vec![refused_addr]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(connect_any(Vec::new()).await.is_err());
        drop((held, full));
    }

    #[test]
    fn address_families_alternate_from_the_resolvers_first_choice() {
        let parse = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        assert_eq!(
            interleaved(parse(&["[::1]:1", "[::2]:1", "[::3]:1", "10.0.0.1:1"])),
            parse(&["[::1]:1", "10.0.0.1:1", "[::2]:1", "[::3]:1"])
        );
        assert_eq!(
            interleaved(parse(&[
                "10.0.0.1:1",
                "10.0.0.2:1",
                "[::1]:1",
                "[::2]:1",
                "[::3]:1"
            ])),
            parse(&["10.0.0.1:1", "[::1]:1", "10.0.0.2:1", "[::2]:1", "[::3]:1"])
        );
        assert!(interleaved(Vec::new()).is_empty());
    }

    #[test]
    fn the_host_header_leaves_out_credentials_and_the_default_port_only() {
        for (authority, host) in [
            ("api.example:80", "api.example"),
            ("api.example:8080", "api.example:8080"),
            ("api.example", "api.example"),
            ("[::1]:80", "[::1]"),
            ("127.0.0.1:9100", "127.0.0.1:9100"),
            ("user:pw@api.example:8080", "api.example:8080"),
            ("user:pw@api.example", "api.example"),
            ("user:pw@api.example:80", "api.example"),
        ] {
            let authority: Authority = authority.parse().unwrap();
            assert_eq!(host_value(&authority), host);
        }
    }

    /// An upstream that answers one request with a chunked body in steps: each step's chunks
    /// go out in one write, only once the test says so, so the proxy side waits before each.
    async fn stepped_upstream(
        steps: Vec<Vec<Vec<u8>>>,
    ) -> (
        std::net::SocketAddr,
        mpsc::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (next, mut told) = mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request head did not arrive");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for step in steps {
                if told.recv().await.is_none() {
                    return;
                }
                let mut out = Vec::new();
                for chunk in step {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(&chunk);
                    out.extend_from_slice(b"\r\n");
                }
                stream.write_all(&out).await.unwrap();
            }
            let _ = told.recv().await;
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        });
        (addr, next, task)
    }

    async fn body_from(pool: &Http1Pool, addr: std::net::SocketAddr) -> UpstreamIncoming {
        let request = Request::get(format!("http://{addr}/v1/stream"))
            .body(UpstreamBody::empty())
            .unwrap();
        let response = tokio::time::timeout(WAIT, pool.send(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.into_body()
    }

    async fn next_data(body: &mut UpstreamIncoming) -> Bytes {
        let frame = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        frame.unwrap().unwrap().into_data().unwrap()
    }

    async fn expect_end(body: &mut UpstreamIncoming) {
        let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        assert!(end.is_none(), "the body must end after the last chunk");
    }

    fn event(n: u8) -> Vec<u8> {
        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{n}\"}}}}]}}\n\n").into_bytes()
    }

    #[tokio::test]
    async fn a_relayed_small_frame_after_a_wait_owns_its_bytes() {
        let large = vec![b'x'; 4096];
        let steps = vec![
            vec![event(1)],
            vec![event(2), event(3), event(4)],
            vec![large.clone()],
        ];
        let (addr, next, upstream) = stepped_upstream(steps).await;
        let pool = Http1Pool::default();
        let mut body = body_from(&pool, addr).await.relayed();

        // One event after a wait: a view would share the read buffer with the connection.
        next.send(()).await.unwrap();
        let alone = next_data(&mut body).await;
        assert_eq!(&alone[..], &event(1)[..]);
        assert!(
            alone.is_unique(),
            "a small frame after a wait must own its bytes"
        );

        // Three events from one read: the first follows the wait and is copied; the others
        // stay views into the read buffer they share.
        next.send(()).await.unwrap();
        let burst = [
            next_data(&mut body).await,
            next_data(&mut body).await,
            next_data(&mut body).await,
        ];
        for (data, n) in burst.iter().zip(2..) {
            assert_eq!(&data[..], &event(n)[..]);
        }
        assert!(
            burst[0].is_unique(),
            "the first frame after a wait is copied"
        );
        assert!(
            !burst[1].is_unique() && !burst[2].is_unique(),
            "frames decoded from the same read are not copied"
        );
        drop(burst);

        // Large frames are relayed without a copy.
        next.send(()).await.unwrap();
        let mut got = Vec::new();
        let mut frames = Vec::new();
        for _ in 0..8 {
            if got.len() >= large.len() {
                break;
            }
            let data = next_data(&mut body).await;
            got.extend_from_slice(&data);
            frames.push(data);
        }
        assert_eq!(got, large);
        assert!(
            frames
                .iter()
                .any(|data| data.len() > DETACH_UP_TO && !data.is_unique()),
            "a large frame should stay a view into the read buffer"
        );
        drop(frames);

        next.send(()).await.unwrap();
        expect_end(&mut body).await;
        tokio::time::timeout(WAIT, upstream).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_body_that_is_not_relayed_is_never_copied() {
        let (addr, next, upstream) = stepped_upstream(vec![vec![event(1)]]).await;
        let pool = Http1Pool::default();
        let mut body = body_from(&pool, addr).await;
        next.send(()).await.unwrap();
        let data = next_data(&mut body).await;
        assert_eq!(&data[..], &event(1)[..]);
        assert!(!data.is_unique(), "a conversion reads the view itself");
        drop(data);
        next.send(()).await.unwrap();
        expect_end(&mut body).await;
        tokio::time::timeout(WAIT, upstream).await.unwrap().unwrap();
    }
}
