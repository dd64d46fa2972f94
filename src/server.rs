//! Listeners, accept loops and graceful shutdown. Knows nothing of OpenAI: it serves one
//! [`ProxyService`] per bound address, HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on
//! the same port.
//!
//! Every listener is bound before any is served, so a port in use fails the whole start with
//! nothing left listening. On shutdown the accept loops stop, every connection is told to
//! finish its in-flight requests (HTTP/1 closes after the current response, HTTP/2 sends
//! GOAWAY), and the server waits for them up to the drain limit.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::config::Config;
use crate::service::ProxyService;
use crate::upstream::UpstreamClient;

/// How long the default drain waits for in-flight requests (D24).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} (rules[{rule}], port {port}): {source}")]
    Bind {
        addr: SocketAddr,
        rule: usize,
        port: u16,
        source: std::io::Error,
    },
}

/// Bound listeners, ready to serve.
pub struct Server {
    listeners: Vec<(TcpListener, ProxyService)>,
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
            let service =
                ProxyService::new(rule.upstream.clone(), rule.options.clone(), client.clone())
                    .with_port_label(rule.listen.port());
            listeners.push((listener, service));
        }
        Ok(Server { listeners })
    }

    /// Serves already-bound listeners (tests and embedders bind `127.0.0.1:0` themselves).
    pub fn from_listeners(listeners: Vec<(TcpListener, ProxyService)>) -> Server {
        Server { listeners }
    }

    /// The addresses actually bound, in rule order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` resolves, then drains for at most `drain`.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        builder.http2().timer(TokioTimer::new());

        {
            let accept_loops = self.listeners.into_iter().map(|(listener, service)| {
                accept_loop(listener, service, &builder, &graceful, stop_rx.clone())
            });
            let serving = futures_util::future::join_all(accept_loops);
            tokio::pin!(serving);
            tokio::select! {
                _ = &mut serving => {}
                _ = shutdown => {
                    tracing::info!("shutting down: no new connections, draining in-flight requests for up to {} s", drain.as_secs());
                    let _ = stop_tx.send(true);
                    serving.await;
                }
            }
        }
        match tokio::time::timeout(drain, graceful.shutdown()).await {
            Ok(()) => tracing::info!("all connections drained"),
            Err(_) => tracing::warn!(
                "drain limit of {} s reached; closing remaining connections",
                drain.as_secs()
            ),
        }
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted proxy must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    service: ProxyService,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
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
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
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
