//! Listeners, accept loops and graceful shutdown. Knows nothing of OpenAI: it serves one
//! [`ProxyService`] per bound address, HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on
//! the same port.
//!
//! Every listener is bound before any is served, so a port in use fails the whole start with
//! nothing left listening. On shutdown the accept loops stop, every connection is told to
//! finish its in-flight requests (HTTP/1 closes after the current response, HTTP/2 sends
//! GOAWAY), and the server waits for them up to the drain limit. WebSocket sessions, which
//! leave their HTTP connection at the upgrade, are told to close with 1001 on both legs and
//! waited for within the same limit. A reload drains the connections of the rules it
//! removes, while the others keep serving; open WebSocket sessions are left running.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Poll, Waker};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{Config, Rule, DEFAULT_HEADER_READ_TIMEOUT_SECONDS};
use crate::open_streams::{Counted, OpenStreams};
use crate::progress::{BlockWatch, WriteBlock};
use crate::service::ProxyService;
use crate::upstream::UpstreamClient;

/// How long the default drain waits for in-flight requests (D24).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A rule's address could not be bound; listeners bound before it are closed again.
    #[error("cannot listen on {addr} (rules[{rule}], port {port}): {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The rule's index in the config's `rules`.
        rule: usize,
        /// The rule's port.
        port: u16,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Whether the server is serving: ready once every listener is bound and accepting, and
/// draining from the moment shutdown begins. Cheap to clone; read by the health endpoint.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<HealthState>);

#[derive(Debug, Default)]
struct HealthState {
    ready: AtomicBool,
    draining: AtomicBool,
    /// Rules of the running config that no listener serves: a reload could not bind one
    /// after a removed rule let its port go.
    unserved: AtomicUsize,
}

impl Health {
    /// Every listener is accepting, every rule has one, and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire) && !self.is_draining() && self.unserved() == 0
    }

    /// How many rules of the running config have no listener (see [`Control::Reload`]).
    pub fn unserved(&self) -> usize {
        self.0.unserved.load(Ordering::Acquire)
    }

    /// Shutdown has begun: `/healthz` answers 503 `draining` so load balancers stop sending
    /// new traffic while in-flight requests finish.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }
}

/// Instructions to a running server.
#[derive(Debug)]
pub enum Control {
    /// Apply a new configuration: new rules start listening, removed rules stop accepting
    /// and drain, kept rules take their new upstream and options for new requests, and
    /// connections accepted from then on get the new header read timeout.
    ///
    /// New addresses are bound before anything changes, and one that cannot be bound
    /// rejects the reload: the running config serves on. Only an address whose port a
    /// removed rule holds is bound after that rule lets it go; if that fails, the rule is
    /// not served and the health endpoint answers 503 until a reload serves every rule.
    Reload(Config),
}

/// Bound listeners, ready to serve.
pub struct Server {
    listeners: Vec<Bound>,
    client: Option<UpstreamClient>,
    health: Health,
    header_read_timeout: Duration,
}

struct Bound {
    /// The configured address (the key a reload matches rules by).
    key: SocketAddr,
    listener: TcpListener,
    service: ProxyService,
}

/// A listener being served.
struct Serving {
    service: ProxyService,
    stop: watch::Sender<bool>,
    /// Resolves once the listening socket is closed (new connections refused).
    closed: oneshot::Receiver<()>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds one listener per rule, all or nothing.
    pub async fn bind(config: &Config, client: &UpstreamClient) -> Result<Server, ServeError> {
        let mut listeners = Vec::with_capacity(config.rules.len());
        for (i, rule) in config.rules.iter().enumerate() {
            let listener = listen(rule.listen).map_err(|source| ServeError::Bind {
                addr: rule.listen,
                rule: i,
                port: rule.listen.port(),
                source,
            })?;
            let service = service_for(rule, client);
            listeners.push(Bound {
                key: rule.listen,
                listener,
                service,
            });
        }
        Ok(Server {
            listeners,
            client: Some(client.clone()),
            health: Health::default(),
            header_read_timeout: config.header_read_timeout,
        })
    }

    /// Serves already-bound listeners (tests and embedders bind `127.0.0.1:0` themselves).
    /// Such a server cannot bind new rules on reload.
    pub fn from_listeners(listeners: Vec<(TcpListener, ProxyService)>) -> Server {
        let listeners = listeners
            .into_iter()
            .filter_map(|(listener, service)| {
                let key = listener.local_addr().ok()?;
                Some(Bound {
                    key,
                    listener,
                    service,
                })
            })
            .collect();
        Server {
            listeners,
            client: None,
            health: Health::default(),
            header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECONDS),
        }
    }

    /// Sets how long a client may take to send a request head.
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Server {
        self.header_read_timeout = timeout;
        self
    }

    /// The addresses actually bound, in rule order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|b| b.listener.local_addr().ok())
            .collect()
    }

    /// The server's health, for an admin endpoint.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves until `shutdown` resolves, then drains for at most `drain`.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let (_keep, control) = mpsc::channel(1);
        self.run_with_control(shutdown, control, drain).await
    }

    /// Serves, applying [`Control`] messages, until `shutdown` resolves; then every
    /// listener stops accepting and its connections drain for at most `drain`.
    pub async fn run_with_control(
        self,
        shutdown: impl Future<Output = ()>,
        mut control: mpsc::Receiver<Control>,
        drain: Duration,
    ) {
        let setup: SharedSetup = Arc::new(RwLock::new(Arc::new(ConnectionSetup::new(
            self.header_read_timeout,
        ))));
        let mut serving: HashMap<SocketAddr, Serving> = HashMap::new();
        let mut retired: Vec<JoinHandle<()>> = Vec::new();
        // Services of removed rules whose WebSocket sessions may still be open.
        let mut retired_services: Vec<ProxyService> = Vec::new();
        for bound in self.listeners {
            let started = serve(bound.listener, bound.service, setup.clone(), drain);
            serving.insert(bound.key, started);
        }
        self.health.0.ready.store(true, Ordering::Release);

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                message = control.recv() => match message {
                    Some(Control::Reload(config)) => {
                        let client = self.client.as_ref();
                        // A removed rule's service is dropped once no session is open and no
                        // connection holds it (a handshake in flight would open one).
                        retired_services.retain(|s| s.sessions().open() > 0 || s.in_use());
                        let before: Vec<ProxyService> =
                            serving.values().map(|s| s.service.clone()).collect();
                        let running = Running {
                            client,
                            setup: &setup,
                            health: &self.health,
                            drain,
                        };
                        reload(config, &running, &mut serving, &mut retired).await;
                        // Kept even with no session open: a handshake may still be on its way
                        // on the retired listener's draining connections.
                        retired_services.extend(
                            before
                                .into_iter()
                                .filter(|old| !serving.values().any(|s| s.service.same_as(old))),
                        );
                    }
                    None => {
                        // No one can send reloads any more; serve until shutdown.
                        (&mut shutdown).await;
                        break;
                    }
                },
            }
        }

        self.health.0.draining.store(true, Ordering::Release);
        tracing::info!(
            "shutting down: no new connections, draining in-flight requests for up to {} s",
            drain.as_secs()
        );
        for serving in serving.values() {
            let _ = serving.stop.send(true);
        }
        let services: Vec<ProxyService> = serving
            .values()
            .map(|s| s.service.clone())
            .chain(retired_services)
            .collect();
        let deadline = tokio::time::Instant::now().checked_add(drain);
        // Every session, open now or opened by a handshake still in flight on a draining
        // connection, closes with 1001 from here on.
        let open: usize = services.iter().map(|s| s.sessions().open()).sum();
        if open > 0 {
            tracing::info!(
                sessions = open,
                "closing open WebSocket sessions (1001 going away)"
            );
        }
        for service in &services {
            service.sessions().close_all();
        }
        let tasks = serving.into_values().map(|s| s.task).chain(retired);
        futures_util::future::join_all(tasks).await;
        // The connections have ended, and with them every handshake: the sessions open
        // now are all there will be.
        wait_sessions_closed(&services, deadline).await;
    }
}

/// Waits, until `deadline`, for every WebSocket session (already told to close with 1001;
/// each close handshake is itself bounded) to end. Sessions still open after that end with
/// the process.
async fn wait_sessions_closed(services: &[ProxyService], deadline: Option<tokio::time::Instant>) {
    let all = futures_util::future::join_all(services.iter().map(|s| s.sessions().all_closed()));
    // No deadline: a drain limit past the clock's range.
    let Some(deadline) = deadline else {
        all.await;
        return;
    };
    if tokio::time::timeout_at(deadline, all).await.is_err() {
        let left: usize = services.iter().map(|s| s.sessions().open()).sum();
        tracing::warn!(
            sessions = left,
            "drain limit reached with WebSocket sessions open"
        );
    }
}

fn service_for(rule: &Rule, client: &UpstreamClient) -> ProxyService {
    ProxyService::for_port(
        rule.upstream.clone(),
        rule.options.clone(),
        client.clone(),
        rule.listen.port(),
    )
}

/// What a reload needs of the running server.
struct Running<'a> {
    client: Option<&'a UpstreamClient>,
    setup: &'a SharedSetup,
    health: &'a Health,
    drain: Duration,
}

/// Applies a reloaded config to the running listeners (see [`Control::Reload`] for what is
/// all or nothing).
async fn reload(
    config: Config,
    running: &Running<'_>,
    serving: &mut HashMap<SocketAddr, Serving>,
    retired: &mut Vec<JoinHandle<()>>,
) {
    let wanted: HashMap<SocketAddr, &Rule> = config.rules.iter().map(|r| (r.listen, r)).collect();
    let removed: Vec<SocketAddr> = serving
        .keys()
        .filter(|key| !wanted.contains_key(key))
        .copied()
        .collect();
    let new_rules: Vec<&Rule> = config
        .rules
        .iter()
        .filter(|rule| !serving.contains_key(&rule.listen))
        .collect();
    let client = match (running.client, new_rules.is_empty()) {
        (Some(client), _) => Some(client),
        (None, true) => None,
        (None, false) => {
            tracing::error!(file = %config.source.display(), "config reload rejected: a server built from listeners cannot add a rule; the running config keeps serving");
            return;
        }
    };

    // Bind first: a new address that cannot be bound (another process holds it, the
    // address is not this machine's) rejects the reload before any rule has changed. An
    // address whose port a removed rule holds (the same port on another address counts:
    // wildcards overlap) can only be bound once that rule has let it go, below.
    let freed_ports: HashSet<u16> = removed.iter().map(SocketAddr::port).collect();
    let (mut bound, mut after_removal) = (Vec::new(), Vec::new());
    for rule in new_rules {
        if freed_ports.contains(&rule.listen.port()) {
            after_removal.push(rule);
            continue;
        }
        // Bound only: nothing can connect before the reload is sure to go ahead.
        match bind(rule.listen) {
            Ok(socket) => bound.push((rule, socket)),
            Err(e) => {
                tracing::error!(file = %config.source.display(), listen = %rule.listen, error = %e, "config reload rejected: cannot listen for a rule that is not served yet; the running config keeps serving");
                return;
            }
        }
    }

    let mut updated = 0;
    for rule in &config.rules {
        if let Some(existing) = serving.get(&rule.listen) {
            let current = existing.service.rule();
            if current.upstream != rule.upstream || current.options != rule.options {
                existing
                    .service
                    .update(rule.upstream.clone(), rule.options.clone());
                updated += 1;
                tracing::info!(listen = %rule.listen, upstream = %rule.upstream, "rule updated for new requests");
            }
        }
    }
    let timeout_changed = {
        let current = running.setup.read().unwrap_or_else(|p| p.into_inner());
        current.header_read_timeout != config.header_read_timeout
    };
    if timeout_changed {
        *running.setup.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(ConnectionSetup::new(config.header_read_timeout));
        tracing::info!(
            seconds = config.header_read_timeout.as_secs(),
            "header read timeout changed for new connections"
        );
    }

    retired.retain(|task| !task.is_finished());
    let mut closing = Vec::with_capacity(removed.len());
    for key in &removed {
        if let Some(old) = serving.remove(key) {
            let _ = old.stop.send(true);
            closing.push(old.closed);
            retired.push(old.task);
            tracing::info!(listen = %key, "rule removed: no longer accepting, draining its connections");
        }
    }
    // All removed sockets close concurrently; a new rule may then take one of their ports.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(closing),
    )
    .await;

    let mut unserved = 0;
    for rule in after_removal {
        match bind(rule.listen) {
            Ok(socket) => bound.push((rule, socket)),
            Err(e) => {
                unserved += 1;
                tracing::error!(listen = %rule.listen, error = %e, "cannot listen for a reloaded rule after the rule it replaces let its port go; it is not served");
            }
        }
    }
    let mut added = 0;
    if let Some(client) = client {
        for (rule, socket) in bound {
            let listener = match socket.listen(LISTEN_BACKLOG) {
                Ok(listener) => listener,
                Err(e) => {
                    unserved += 1;
                    tracing::error!(listen = %rule.listen, error = %e, "cannot listen for a reloaded rule; it is not served");
                    continue;
                }
            };
            added += 1;
            let service = service_for(rule, client);
            let started = serve(listener, service, running.setup.clone(), running.drain);
            serving.insert(rule.listen, started);
            tracing::info!(listen = %rule.listen, upstream = %rule.upstream, convert = rule.options.convert, "proxy rule");
        }
    }
    running.health.0.unserved.store(unserved, Ordering::Release);
    tracing::info!(
        file = %config.source.display(),
        rules = serving.len(),
        added,
        removed = removed.len(),
        updated,
        unserved,
        "config reloaded"
    );
}

/// The connection settings in force, swapped whole by a reload; each accepted connection
/// takes the current ones.
type SharedSetup = Arc<RwLock<Arc<ConnectionSetup>>>;

/// How accepted connections are served.
///
/// hyper's own HTTP/1 and HTTP/2 connections, not hyper-util's `auto` one: the protocol is
/// already known from a `peek` (see [`first_bytes_arrive`]), and `auto` would read it again
/// and wrap the socket in a rewinding reader that every later read and poll goes through
/// (about 0.6 k instructions per 20-event request and 130 per relayed frame, by callgrind).
struct ConnectionSetup {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl ConnectionSetup {
    fn new(header_read_timeout: Duration) -> ConnectionSetup {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            // A request head larger than this is refused with 431: API requests carry a
            // handful of headers, and every connection may hold this much while its head
            // arrives. The buffer cap alone refuses only heads still incomplete at the cap
            // (one read can carry a head past it); the header-size limit also measures every
            // complete head, to the byte.
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        ConnectionSetup {
            http1,
            http2,
            header_read_timeout,
        }
    }
}

/// Largest HTTP/1 request head accepted (nginx allows 8 KiB lines, HAProxy about 16 KiB).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A served connection that can be asked to finish its in-flight requests and close.
trait GracefulConnection: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

/// A client connection's transport: the socket, its waiting writes noted.
type ClientIo = TokioIo<BlockWatch<TcpStream>>;

impl GracefulConnection for http1::UpgradeableConnection<ClientIo, ProxyService> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl GracefulConnection for http2::Connection<ClientIo, Counted<ProxyService>, TokioExecutor> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new connection turned out to speak, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// Cleartext HTTP/2 with prior knowledge (the whole preface arrived).
    Http2,
}

/// Waits, at most `limit`, until the client has sent enough to tell HTTP/1 from HTTP/2
/// (any byte that is not the start of the HTTP/2 preface, or the whole preface); `None`
/// when it closed or stayed silent.
async fn first_bytes_arrive(stream: &TcpStream, limit: Duration) -> Option<Protocol> {
    let wait = async {
        let mut seen = [0u8; H2_PREFACE.len()];
        // Bounded by the deadline around it; each round waits for the socket or 5 ms.
        loop {
            match stream.peek(&mut seen).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if n == H2_PREFACE.len() && seen[..] == *H2_PREFACE => {
                    return Some(Protocol::Http2)
                }
                Ok(n) if n == H2_PREFACE.len() || !H2_PREFACE.starts_with(&seen[..n]) => {
                    return Some(Protocol::Http1)
                }
                // Part of a preface: peek would return the same bytes at once, so pause
                // before looking again.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or(None)
}

/// Starts serving one listener in its own task; stopping it closes the socket, then drains
/// that listener's connections for at most `drain`.
fn serve(
    listener: TcpListener,
    service: ProxyService,
    setup: SharedSetup,
    drain: Duration,
) -> Serving {
    let (stop, stop_rx) = watch::channel(false);
    let (closed_tx, closed) = oneshot::channel();
    let task_service = service.clone();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        let addr = listener.local_addr().ok();
        accept_loop(&listener, &task_service, &setup, &mut connections, stop_rx).await;
        drop(listener);
        let _ = closed_tx.send(());
        // Every connection task has seen the stop signal and is finishing its requests.
        let drained = async { while connections.join_next().await.is_some() {} };
        match tokio::time::timeout(drain, drained).await {
            Ok(()) => tracing::info!(listen = ?addr, "all connections drained"),
            Err(_) => {
                tracing::warn!(
                    listen = ?addr,
                    remaining = connections.len(),
                    "drain limit of {} s reached; closing remaining connections",
                    drain.as_secs()
                );
                // Graceful shutdown only asks; after the limit the connections are cut.
                connections.shutdown().await;
            }
        }
    });
    Serving {
        service,
        stop,
        closed,
        task,
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind(addr)?.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 1024;

/// A socket bound to `addr`, not yet listening: no client can connect to it yet, so a
/// reload can take the addresses it needs and still back out without refusing anyone.
/// Binding already fails where another socket listens (`SO_REUSEADDR` only lets it reuse
/// an address whose old connections sit in TIME_WAIT, as a restarted proxy must). Not on
/// Windows: there the option lets a socket bind a port another process listens on, and
/// TIME_WAIT does not hold a listening port anyway.
fn bind(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Serves one accepted connection until it ends. On the stop signal it is asked to finish
/// (HTTP/1 closes after the current response, HTTP/2 sends GOAWAY and completes its open
/// streams); an HTTP/2 connection is asked the same once it has had no open stream for the
/// header-read timeout, as an HTTP/1 connection is closed by hyper when it sends no new
/// request head within that time.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: ProxyService,
    setup: Arc<ConnectionSetup>,
    stop: watch::Receiver<bool>,
) {
    // The HTTP/1-or-HTTP/2 sniff has no deadline of its own: a client that connects and
    // sends nothing (or half an HTTP/2 preface) would hold the connection forever. Nor
    // would it see a stop: a connection with no request yet has none to finish, so a stop
    // closes it rather than hold the drain for the header read timeout.
    let mut stopped = stop.clone();
    let sniffed = tokio::select! {
        biased;
        protocol = first_bytes_arrive(&stream, setup.header_read_timeout) => protocol,
        _ = stopped.wait_for(|stop| *stop) => None,
    };
    let Some(protocol) = sniffed else {
        tracing::debug!(%peer, "no request before the header read timeout or a stop; closing");
        return;
    };
    let stall = WriteStall {
        block: Arc::new(WriteBlock::default()),
        limit: service.rule().options.timeout,
    };
    let io = TokioIo::new(BlockWatch::new(stream, stall.block.clone()));
    let result = match protocol {
        Protocol::Http1 => {
            let connection = setup.http1.serve_connection(io, service).with_upgrades();
            until_stopped(connection, stop, None, setup.header_read_timeout, &stall).await
        }
        Protocol::Http2 => {
            let streams = OpenStreams::new();
            let service = Counted::new(service, streams.clone());
            let connection = setup.http2.serve_connection(io, service);
            let idle_limit = setup.header_read_timeout;
            until_stopped(connection, stop, Some(&streams), idle_limit, &stall).await
        }
    };
    match result {
        Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
        Some(Ok(())) => {}
        None => tracing::info!(
            %peer,
            timeout_s = stall.limit.as_secs_f64(),
            "the client took no bytes of its response for timeoutSeconds; closing its connection"
        ),
    }
}

/// How a connection notices a client that stopped reading: its writes' [`WriteBlock`], and
/// the rule's `timeoutSeconds`, the longest a write may wait. Without it such a client would
/// hold its connection, the upstream's and (over HTTP/2 upstreams) a stream slot forever,
/// since the body's own idle timer is only checked when the server polls the body.
struct WriteStall {
    block: Arc<WriteBlock>,
    limit: Duration,
}

/// Drives `connection` to its end, asking it to finish gracefully once `stop` turns true
/// or, for an HTTP/2 connection (`streams`), once it has been idle for `idle_limit`.
///
/// HTTP/2's graceful close waits for the client to acknowledge a PING before the final
/// GOAWAY; a client that never does would keep an idle connection open, so one that stays
/// idle for another `idle_limit` after the GOAWAY is dropped (it has no stream to lose).
///
/// `None` when the connection was dropped because its writes waited longer than `stall`
/// allows: the client stopped reading, so there is nobody to finish gracefully for.
async fn until_stopped<C>(
    connection: C,
    mut stop: watch::Receiver<bool>,
    streams: Option<&OpenStreams>,
    idle_limit: Duration,
    stall: &WriteStall,
) -> Option<C::Output>
where
    C: GracefulConnection,
{
    let idle = || async {
        match streams {
            Some(streams) => streams.idle(idle_limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(connection);
    // Not a `select!`: that would poll the stop signal's wait (a `Notify` check, about 240
    // instructions with the select) on every wake of the connection, that is on every
    // relayed frame. The wait is polled once to register the task's waker, and again only
    // when the signal has changed or the task is polled with another waker.
    let probe = stop.clone();
    // Unconstrained: a wait refused for the task's cooperative budget would return
    // without registering the waker, and then never be polled again.
    let mut stop_wait = std::pin::pin!(tokio::task::unconstrained(stop.wait_for(|stop| *stop)));
    let mut registered: Option<Waker> = None;
    let mut idle_wait = std::pin::pin!(idle());
    // Armed only once a write waits: a connection whose writes go through pays one atomic
    // load per wake, and no timer.
    let mut stall_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let ended = poll_fn(|cx| {
        if let Poll::Ready(output) = connection.as_mut().poll(cx) {
            return Poll::Ready(Ended::Done(output));
        }
        if let Some(deadline) = stall.block.since().and_then(|s| s.checked_add(stall.limit)) {
            let timer =
                stall_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::WriteStalled);
            }
        }
        let waker_known = registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        // A closed channel counts as a change: the wait then ends, as a stop does.
        if !waker_known || probe.has_changed().unwrap_or(true) {
            if stop_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::Stopped);
            }
            registered = Some(cx.waker().clone());
        }
        idle_wait.as_mut().poll(cx).map(|()| Ended::Idle)
    })
    .await;
    let stopped = match ended {
        Ended::Done(output) => return Some(output),
        Ended::WriteStalled => return None,
        Ended::Stopped => true,
        Ended::Idle => {
            tracing::debug!("HTTP/2 connection idle; closing it");
            false
        }
    };
    connection.as_mut().graceful_shutdown();
    if stopped {
        // Bounded by the drain limit.
        return Some(connection.await);
    }
    tokio::select! {
        output = connection.as_mut() => Some(output),
        () = idle() => Some(Ok(())),
    }
}

/// Why [`until_stopped`]'s first phase ended.
enum Ended<T> {
    Done(T),
    Stopped,
    Idle,
    WriteStalled,
}

async fn accept_loop(
    listener: &TcpListener,
    service: &ProxyService,
    setup: &SharedSetup,
    connections: &mut JoinSet<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        // Reap finished connection tasks so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                let setup = setup.read().unwrap_or_else(|p| p.into_inner()).clone();
                let service = service.clone();
                let stop = stop.clone();
                connections.spawn(serve_connection(stream, peer, service, setup, stop));
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning, and
                // keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed; retrying in {} ms", backoff.as_millis());
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
