//! Where requests go: the validated upstream base URL, and the pooled client that reaches it.
//!
//! The client is hyper-util's pooled client over our own connector, chosen over reqwest
//! because reqwest's per-request URL parsing and redirect policy roughly double the
//! instructions spent per proxied request, and a proxy must relay redirects, not follow
//! them (D14). The connector adds what reqwest would have given us: rustls with the
//! system trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), HTTP/2 by ALPN, and
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`. Connections are pooled per upstream authority and
//! shared by every listener and thread; the pool grows with demand (D15).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::pool::Http1Pool;
pub use crate::pool::UpstreamIncoming;
use crate::upload::UploadProgress;

/// Errors crossing body and connector boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream base URL: `http(s)://authority[/prefix]`, without a trailing slash, query or
/// fragment, so that appending a request's path and query can never produce `//` or a URL
/// with two query strings (W17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without trailing slash; empty when none.
    prefix: String,
}

impl UpstreamUrl {
    /// Validates an `upstreamUrl` from the config.
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        let bad = || format!("{text:?} is not an absolute http or https URL");
        let uri: Uri = text.trim().parse().map_err(|_| bad())?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(bad()),
        };
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        if authority.host().is_empty() {
            return Err(bad());
        }
        if authority.as_str().contains('@') {
            return Err(format!(
                "{text:?} must not carry credentials; send them as request headers"
            ));
        }
        // `Uri` takes any text after the colon as a port (and `port_u16` then answers
        // `None`), so an unchecked `:70000` or `:84a3` would connect to the scheme's default
        // port instead.
        let host_end = authority.as_str().rfind(']').map_or(0, |i| i + 1);
        if let Some(colon) = authority.as_str()[host_end..].rfind(':') {
            let port = &authority.as_str()[host_end + colon + 1..];
            if !matches!(port.parse::<u16>(), Ok(p) if p > 0)
                || !port.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(format!(
                    "{text:?} has port {port:?}; a port is a number from 1 to 65535"
                ));
            }
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(format!(
                "{text:?} must not have a query or fragment; the request's own query is appended"
            ));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            scheme,
            authority,
            prefix,
        })
    }

    /// `true` for https.
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The upstream URI for a request: base + the request's path and query, untouched.
    pub fn request_uri(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let path_and_query = match (self.prefix.is_empty(), path_and_query) {
            // No prefix: reuse the request's already-parsed path, no re-parse.
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let tail = pq.map_or("", |pq| pq.as_str());
                let mut joined = String::with_capacity(self.prefix.len() + tail.len());
                joined.push_str(&self.prefix);
                joined.push_str(tail);
                PathAndQuery::try_from(joined)?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// The same target with `ws`/`wss` in place of `http`/`https` (B92).
    pub fn websocket_base(&self) -> String {
        let scheme = if self.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority, self.prefix)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

pin_project! {
    /// A request body on its way upstream. The hot path (a body straight from the hyper
    /// server) is not boxed; bodies from embedding applications are.
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        /// `body` straight from the hyper server, streamed as it arrives; `sent`, when set
        /// with [`UpstreamBody::track_upload`], records its progress.
        // pin_project_lite accepts no attributes on enum fields, so they are described in
        // their variant's doc instead.
        #[allow(missing_docs)]
        Incoming { #[pin] body: Incoming, sent: Option<Arc<UploadProgress>> },
        /// A complete body in memory; `data` is `None` for an empty body and once sent.
        #[allow(missing_docs)]
        Full { data: Option<Bytes> },
        /// Any other `body`, boxed (tower / axum callers); `sent` as for `Incoming`.
        #[allow(missing_docs)]
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, BoxError>, sent: Option<Arc<UploadProgress>> },
    }
}

impl UpstreamBody {
    /// A complete in-memory body (rewritten conversion requests).
    pub fn full(data: Bytes) -> Self {
        UpstreamBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// No body at all.
    pub fn empty() -> Self {
        UpstreamBody::Full { data: None }
    }

    /// A body straight from the hyper server.
    pub fn incoming(body: Incoming) -> Self {
        UpstreamBody::Incoming { body, sent: None }
    }

    /// Any other body, boxed.
    pub fn boxed(body: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        UpstreamBody::Boxed { body, sent: None }
    }

    /// Records this streamed body's progress in `progress` as it is read: the bytes
    /// actually relayed whatever the framing (a chunked upload declares no length), and
    /// when it last moved, from which the upstream's silence is counted. In-memory bodies
    /// are not tracked: their length is known and they are handed over at once.
    pub fn track_upload(&mut self, progress: Arc<UploadProgress>) {
        match self {
            UpstreamBody::Incoming { sent, .. } | UpstreamBody::Boxed { sent, .. } => {
                *sent = Some(progress);
            }
            UpstreamBody::Full { .. } => {}
        }
    }

    /// The progress set with [`UpstreamBody::track_upload`].
    pub fn upload(&self) -> Option<&Arc<UploadProgress>> {
        match self {
            UpstreamBody::Incoming { sent, .. } | UpstreamBody::Boxed { sent, .. } => sent.as_ref(),
            UpstreamBody::Full { .. } => None,
        }
    }
}

/// Records a poll of a tracked body (`sent`) in its progress.
fn observed(
    polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    sent: &Option<Arc<UploadProgress>>,
    body: &impl Body,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if let Some(progress) = sent {
        progress.observe(&polled, body.is_end_stream());
    }
    polled
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamBodyProj::Incoming { mut body, sent } => {
                let polled = body.as_mut().poll_frame(cx).map_err(Into::into);
                observed(polled, sent, &*body)
            }
            UpstreamBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBodyProj::Boxed { mut body, sent } => {
                let polled = body.as_mut().poll_frame(cx);
                observed(polled, sent, &*body)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming { body, .. } => body.is_end_stream(),
            UpstreamBody::Full { data } => data.is_none(),
            UpstreamBody::Boxed { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming { body, .. } => body.size_hint(),
            UpstreamBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Boxed { body, .. } => body.size_hint(),
        }
    }
}

/// How the upstream client reaches upstreams.
#[derive(Clone)]
pub struct ClientOptions {
    /// Which destinations go through an HTTP proxy; `None` connects directly.
    pub proxy: Option<Arc<Matcher>>,
    /// Trust anchors for upstream TLS.
    pub roots: Arc<rustls::RootCertStore>,
    /// Upper bound on a TCP connect (the response-header timeout still applies on top).
    pub connect_timeout: Option<Duration>,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("proxy", &self.proxy.is_some())
            .field("roots", &self.roots.len())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Upstream client setup problems.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The given PEM data held no certificate, so no upstream TLS could be verified.
    #[error("no usable TLS trust anchors: {0}")]
    NoTrustAnchors(String),
    /// PEM certificate data could not be parsed.
    #[error("cannot read certificate file {path}: {reason}")]
    CertificateFile {
        /// Where the data came from (`<pem>` for in-memory data).
        path: String,
        /// The parser's error.
        reason: String,
    },
    /// rustls refused a certificate or the TLS configuration.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A proxy variable names a proxy the client cannot speak to.
    #[error(
        "{var} names a {scheme}:// proxy; only http:// proxies are supported (https upstreams \
         are reached through them with CONNECT)"
    )]
    UnsupportedProxy {
        /// The environment variable.
        var: String,
        /// The proxy URL's scheme.
        scheme: String,
    },
    /// A proxy variable is not a URL (its value is not shown: it may hold credentials).
    #[error("{var} is not a proxy URL such as http://proxy.example:3128 (check for stray spaces or newlines)")]
    InvalidProxy {
        /// The environment variable.
        var: String,
    },
}

impl ClientOptions {
    /// What a daemon wants: the system trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` win when
    /// set) and proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY`.
    pub fn from_env() -> Result<ClientOptions, ClientError> {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            let reasons: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
            tracing::warn!(errors = ?reasons, "no system TLS trust anchors found; https upstreams will fail");
        }
        let proxy = proxy_from(&|name| std::env::var(name).ok())?.map(Arc::new);
        Ok(ClientOptions {
            proxy,
            roots: Arc::new(roots),
            connect_timeout: None,
        })
    }

    /// Direct connections trusting only the given PEM certificates (tests, pinned setups).
    pub fn with_pem_roots(pem: &[u8]) -> Result<ClientOptions, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut reader = pem;
        for cert in rustls_pemfile_certs(&mut reader)? {
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ClientError::NoTrustAnchors(
                "no certificate in the PEM data".into(),
            ));
        }
        Ok(ClientOptions {
            proxy: None,
            roots: Arc::new(roots),
            connect_timeout: None,
        })
    }
}

/// Checks the proxy variables of the environment (see [`ClientOptions::from_env`]) without
/// building a client: what `--check` needs to promise that the daemon starts.
pub fn check_proxy_env() -> Result<(), ClientError> {
    proxy_from(&|name| std::env::var(name).ok()).map(|_| ())
}

/// The proxies that `var` (the environment) configures, read as hyper-util's matcher
/// reads them (the upper-case name wins when set), or `None` when no request is proxied.
///
/// Checked first, because the matcher accepts what the connector cannot do: a `socks5://`
/// or `https://` proxy would be sent cleartext HTTP (every request through it would fail),
/// so such a variable is an error at start-up. And `NO_PROXY=*` turns proxying off for
/// every host, as in curl; the matcher applies `*` to names only, not to IP addresses.
fn proxy_from(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Matcher>, ClientError> {
    let first = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|name| var(name).map(|value| (name, value)))
    };
    let all = first(["ALL_PROXY", "all_proxy"]);
    let http = first(["HTTP_PROXY", "http_proxy"]);
    let https = first(["HTTPS_PROXY", "https_proxy"]);
    let no = first(["NO_PROXY", "no_proxy"]).map_or_else(String::new, |(_, v)| v);
    // A CGI environment's HTTP_PROXY may come from a request header (httpoxy): the matcher
    // ignores every proxy variable there, and so do we.
    if var("REQUEST_METHOD").is_some() || no.split(',').any(|entry| entry.trim() == "*") {
        return Ok(None);
    }
    let set = |v: &Option<(&'static str, String)>| {
        v.as_ref()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (*name, value.clone()))
    };
    // ALL_PROXY stands in only for a scheme whose own variable is unset or empty: a SOCKS
    // ALL_PROXY beside http:// HTTP_PROXY and HTTPS_PROXY (as proxy tools export them) is
    // never used, so never refused.
    let all_used = set(&http).is_none() || set(&https).is_none();
    let used = [set(&http), set(&https), set(&all).filter(|_| all_used)];
    if used.iter().all(Option::is_none) {
        return Ok(None);
    }
    for (name, value) in used.into_iter().flatten() {
        check_proxy_url(name, &value)?;
    }
    let value = |v: Option<(&str, String)>| v.map_or_else(String::new, |(_, v)| v);
    Ok(Some(
        Matcher::builder()
            .all(value(all))
            .http(value(http))
            .https(value(https))
            .no(no)
            .build(),
    ))
}

/// A proxy variable's value as the matcher will read it: a URL (or `host:port`) of an
/// `http` proxy. A value it cannot parse would silently mean no proxy at all.
fn check_proxy_url(var: &str, value: &str) -> Result<(), ClientError> {
    let invalid = || ClientError::InvalidProxy {
        var: var.to_owned(),
    };
    let uri: Uri = value.parse().map_err(|_| invalid())?;
    uri.authority().ok_or_else(invalid)?;
    match uri.scheme_str() {
        None => Ok(()),
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => Ok(()),
        Some(scheme) => Err(ClientError::UnsupportedProxy {
            var: var.to_owned(),
            scheme: scheme.to_owned(),
        }),
    }
}

fn rustls_pemfile_certs(
    reader: &mut &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::CertificateFile {
            path: "<pem>".into(),
            reason: e.to_string(),
        })
}

type Connector = hyper_rustls::HttpsConnector<ProxyConnector>;

/// A response head on its way.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<UpstreamIncoming>, BoxError>> + Send>>;

/// The transport under an upstream WebSocket session.
pub type WebSocketTransport = hyper_rustls::MaybeHttpsStream<ProxiedStream>;

/// The pooled upstream HTTP client shared by every rule.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, UpstreamBody>,
    /// The same, offering only HTTP/1.1 to HTTPS upstreams (`upstreamHttp2: false`).
    client_http1: Client<Connector, UpstreamBody>,
    /// The same proxy rules the connector applies, for forwarding-proxy credentials.
    proxy: ProxyConnector,
    /// HTTP/1.1-only connections for WebSocket handshakes (ALPN must not pick h2).
    websocket: Connector,
    /// Kept-alive connections to plain-`http` upstreams reached without a proxy.
    http1: Http1Pool,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamClient")
    }
}

impl UpstreamClient {
    /// Builds the client. Connections are made lazily, on the first request to each
    /// upstream, and kept in the pool until idle for 90 s.
    pub fn new(options: ClientOptions) -> Result<UpstreamClient, ClientError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(options.connect_timeout);
        let connector = ProxyConnector {
            http,
            proxy: options.proxy,
            tunnel_always: false,
        };
        let proxy = connector.clone();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(options.roots)
            .with_no_client_auth();
        let websocket = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(ProxyConnector {
                tunnel_always: true,
                ..connector.clone()
            });
        let https_http1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector.clone());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);

        let pooled = |connector: Connector| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector)
        };
        Ok(UpstreamClient {
            client: pooled(https),
            client_http1: pooled(https_http1),
            proxy,
            websocket,
            http1: Http1Pool::with_connect_timeout(options.connect_timeout),
        })
    }

    /// Opens a fresh connection (TLS and proxies as for HTTP) for a WebSocket handshake to
    /// `uri` (an `http`/`https` URI). The TLS handshake offers no ALPN protocol (the
    /// HTTP/1-only connector sends none), so the server cannot choose `h2`: RFC 6455 needs
    /// HTTP/1.1.
    pub async fn connect_websocket(
        &self,
        uri: Uri,
    ) -> Result<TokioIo<WebSocketTransport>, BoxError> {
        let mut connector = self.websocket.clone();
        let stream = connector.call(uri).await?;
        Ok(TokioIo::new(stream))
    }

    /// Sends a request; the future resolves at the response head. HTTPS upstreams are
    /// spoken to in HTTP/1.1, as by [`send`](Self::send).
    pub fn request(&self, request: Request<UpstreamBody>) -> ResponseFuture {
        let client = self.clone();
        Box::pin(async move { client.send(request).await })
    }

    /// Sends a request and waits for the response head, without boxing the future (the
    /// proxy's own hot path). HTTPS upstreams are spoken to in HTTP/1.1, the proxy's default
    /// (D15); [`send_over`](Self::send_over) chooses.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<http::Response<UpstreamIncoming>, BoxError> {
        self.send_over(request, false).await
    }

    /// As [`send`](Self::send); `http2: false` speaks HTTP/1.1 to HTTPS upstreams even when
    /// they offer HTTP/2 (each request then has a connection of its own, where HTTP/2 puts
    /// every request on one connection, up to the server's concurrent-stream limit).
    pub async fn send_over(
        &self,
        mut request: Request<UpstreamBody>,
        http2: bool,
    ) -> Result<http::Response<UpstreamIncoming>, BoxError> {
        if request.uri().scheme() == Some(&Scheme::HTTP) {
            match self.proxy.intercept(request.uri()) {
                // Plain HTTP, no proxy: our own kept-alive HTTP/1.1 connections.
                None => return self.http1.send(request).await,
                // A forwarding proxy (plain-http upstream behind HTTP_PROXY) sees every
                // request, so its credentials travel as a request header; tunnels carry
                // them in CONNECT instead.
                Some(intercept) => {
                    if let Some(auth) = intercept.basic_auth() {
                        request
                            .headers_mut()
                            .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
                    }
                }
            }
        }
        let client = if http2 {
            &self.client
        } else {
            &self.client_http1
        };
        let response = client.request(request).await?;
        Ok(response.map(UpstreamIncoming::from))
    }
}

/// Connects directly, through an HTTP CONNECT tunnel (https upstreams behind `HTTPS_PROXY`),
/// or to a forwarding proxy (http upstreams behind `HTTP_PROXY`, absolute-form requests).
/// Loopback destinations are never proxied: a local upstream behind a corporate proxy is
/// never what the user meant.
#[derive(Clone)]
pub struct ProxyConnector {
    http: HttpConnector,
    proxy: Option<Arc<Matcher>>,
    /// WebSocket connections tunnel through every proxy: an upgrade cannot travel as an
    /// absolute-form request through a forwarding proxy.
    tunnel_always: bool,
}

impl ProxyConnector {
    fn intercept(&self, dst: &Uri) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        let matcher = self.proxy.as_ref()?;
        let host = dst.host()?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return None;
        }
        matcher.intercept(dst)
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<ProxiedStream, BoxError>> + Send>>;

impl Service<Uri> for ProxyConnector {
    type Response = ProxiedStream;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        match self.intercept(&dst) {
            None => Box::pin(async move {
                let io = http.call(dst).await?;
                Ok(ProxiedStream {
                    io,
                    forwarding_proxy: false,
                })
            }),
            Some(intercept) if self.tunnel_always || dst.scheme() == Some(&Scheme::HTTPS) => {
                // The tunnel takes a destination without a port for 443: a plain `http`
                // upstream (a WebSocket to `ws://`) must name its 80.
                let dst = with_default_port(dst);
                let proxy_uri = intercept.uri().clone();
                let mut tunnel = Tunnel::new(proxy_uri.clone(), http);
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move {
                    // The causes (a refusal, a timeout) follow from the source chain.
                    let io = tunnel.call(dst).await.map_err(|e| TunnelFailed {
                        message: format!("tunnel through proxy {} failed", redact(&proxy_uri)),
                        source: Box::new(e),
                    })?;
                    Ok(ProxiedStream {
                        io,
                        forwarding_proxy: false,
                    })
                })
            }
            Some(intercept) => {
                let proxy_uri = intercept.uri().clone();
                Box::pin(async move {
                    let io = http.call(proxy_uri).await?;
                    Ok(ProxiedStream {
                        io,
                        forwarding_proxy: true,
                    })
                })
            }
        }
    }
}

/// A tunnel through a proxy that could not be opened, named with the proxy and keeping the
/// tunnel's error as its source, so a connect that timed out is still told from a refusal
/// (504, not 502).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct TunnelFailed {
    message: String,
    #[source]
    source: BoxError,
}

/// `dst` with its scheme's default port written out when it has none.
fn with_default_port(dst: Uri) -> Uri {
    let (Some(host), None) = (dst.host(), dst.port_u16()) else {
        return dst;
    };
    let port = if dst.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let mut parts = dst.clone().into_parts();
    match format!("{host}:{port}").parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
    }
}

/// A proxy URI without its credentials, for messages.
fn redact(uri: &Uri) -> String {
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// A TCP stream that knows whether it leads to a forwarding proxy, so the client writes
/// absolute-form request targets on it.
pub struct ProxiedStream {
    io: TokioIo<TcpStream>,
    forwarding_proxy: bool,
}

impl Connection for ProxiedStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarding_proxy)
    }
}

impl Read for ProxiedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for ProxiedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(vars: &[(&str, &str)]) -> Result<Option<Matcher>, ClientError> {
        proxy_from(&|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn proxied(vars: &[(&str, &str)], url: &str) -> Option<String> {
        let matcher = proxies(vars).unwrap()?;
        let uri: Uri = url.parse().unwrap();
        matcher.intercept(&uri).map(|i| i.uri().to_string())
    }

    #[test]
    fn only_http_proxies_are_accepted() {
        for (var, url, scheme) in [
            ("ALL_PROXY", "socks5h://127.0.0.1:1080", "socks5h"),
            ("all_proxy", "socks5://proxy", "socks5"),
            ("HTTPS_PROXY", "https://proxy:443", "https"),
            ("http_proxy", "SOCKS4://proxy", "SOCKS4"),
        ] {
            match proxies(&[(var, url)]) {
                Err(ClientError::UnsupportedProxy { var: v, scheme: s }) => {
                    assert_eq!((v.as_str(), s.as_str()), (var, scheme));
                }
                other => panic!("{var}={url}: {:?}", other.map(|m| m.is_some())),
            }
        }
        let message = proxies(&[("ALL_PROXY", "socks5h://p:1080")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.starts_with("ALL_PROXY names a socks5h:// proxy"),
            "{message}"
        );
        for url in ["http://proxy:3128", "HTTP://proxy:3128", "proxy:3128"] {
            assert!(proxies(&[("HTTPS_PROXY", url)]).unwrap().is_some(), "{url}");
        }
        // The upper-case name wins, as in the matcher: a lower-case socks URL under it is
        // not used, so not refused.
        let vars = [("ALL_PROXY", "http://p:3128"), ("all_proxy", "socks5://q")];
        assert!(proxies(&vars).unwrap().is_some());
        assert!(proxies(&[("HTTP_PROXY", "")]).unwrap().is_none());
        assert!(proxies(&[]).unwrap().is_none());
        // A scheme-less value is an http proxy, as the matcher reads it.
        assert_eq!(
            proxied(
                &[("HTTPS_PROXY", "proxy.test:3128")],
                "https://api.example.test/"
            ),
            Some("http://proxy.test:3128/".to_owned())
        );
        // A value the matcher could not parse would mean no proxy at all: refused, without
        // showing it (it may hold credentials).
        for bad in ["http://user:secret@proxy:3128\n", " ", "http://"] {
            match proxies(&[("HTTPS_PROXY", bad)]) {
                Err(e @ ClientError::InvalidProxy { .. }) => {
                    assert!(e.to_string().starts_with("HTTPS_PROXY is not a proxy URL"));
                    assert!(!e.to_string().contains("secret"));
                }
                other => panic!("{bad:?}: {:?}", other.map(|m| m.is_some())),
            }
        }
    }

    /// ALL_PROXY is only used for a scheme whose own variable is unset, so a SOCKS one
    /// beside http:// HTTP_PROXY and HTTPS_PROXY (as proxy tools export them) is fine.
    #[test]
    fn an_all_proxy_that_is_never_used_is_not_refused() {
        let vars = [
            ("http_proxy", "http://127.0.0.1:7890"),
            ("https_proxy", "http://127.0.0.1:7890"),
            ("all_proxy", "socks5://127.0.0.1:7890"),
        ];
        assert_eq!(
            proxied(&vars, "https://api.example.test/"),
            Some("http://127.0.0.1:7890/".to_owned())
        );
        // Used for https when HTTPS_PROXY is missing: refused.
        assert!(matches!(
            proxies(
                &vars[..1]
                    .iter()
                    .chain(&vars[2..])
                    .copied()
                    .collect::<Vec<_>>()
            ),
            Err(ClientError::UnsupportedProxy { .. })
        ));
        // Nothing is proxied under NO_PROXY=*, so nothing is refused.
        let none = [("ALL_PROXY", "socks5://p:1080"), ("NO_PROXY", "*")];
        assert!(proxies(&none).unwrap().is_none());
    }

    #[test]
    fn no_proxy_star_turns_proxying_off_for_addresses_too() {
        let proxy = ("HTTP_PROXY", "http://proxy.test:3128");
        assert!(proxied(&[proxy], "http://10.0.0.5:8000/").is_some());
        for no in ["*", " * ", "internal.test, *"] {
            assert!(
                proxies(&[proxy, ("NO_PROXY", no)]).unwrap().is_none(),
                "{no}"
            );
        }
        // Other entries keep their meaning.
        let vars = [proxy, ("no_proxy", "10.0.0.0/8, .internal.test")];
        assert_eq!(proxied(&vars, "http://10.0.0.5:8000/"), None);
        assert_eq!(proxied(&vars, "http://a.internal.test/"), None);
        assert!(proxied(&vars, "http://api.example.test/").is_some());
        // A CGI environment's proxy variables are never used (httpoxy).
        assert!(proxies(&[proxy, ("REQUEST_METHOD", "GET")])
            .unwrap()
            .is_none());
    }

    #[test]
    fn tunnel_destinations_name_their_port() {
        for (given, expected) in [
            (
                "http://llm.test/v1/realtime?x=1",
                "http://llm.test:80/v1/realtime?x=1",
            ),
            (
                "https://llm.test/v1/realtime",
                "https://llm.test:443/v1/realtime",
            ),
            ("http://llm.test:8000/v1", "http://llm.test:8000/v1"),
            ("http://[fd00::5]/v1", "http://[fd00::5]:80/v1"),
        ] {
            let uri: Uri = given.parse().unwrap();
            assert_eq!(with_default_port(uri).to_string(), expected);
        }
    }

    #[test]
    fn prefix_and_trailing_slash_never_double() {
        let base = UpstreamUrl::parse("https://example.com/openai/").unwrap();
        let pq = PathAndQuery::from_static("/v1/models?limit=2");
        assert_eq!(
            base.request_uri(Some(&pq)).unwrap().to_string(),
            "https://example.com/openai/v1/models?limit=2"
        );
        let bare = UpstreamUrl::parse("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            bare.request_uri(Some(&pq)).unwrap().to_string(),
            "http://127.0.0.1:9000/v1/models?limit=2"
        );
        assert_eq!(bare.to_string(), "http://127.0.0.1:9000");
        assert_eq!(base.websocket_base(), "wss://example.com/openai");
    }

    #[test]
    fn rejects_what_cannot_be_a_base() {
        for bad in [
            "ftp://x",
            "/v1",
            "example.com",
            "http://",
            "http://u:p@x",
            "http://x/?a=1",
            "http://x/#f",
            "http://127.0.0.1:70000",
            "https://llm.internal:84a3/v1",
            "http://x:0",
            "http://x:+80",
            "http://[::1]:65536",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad} accepted");
        }
        for good in [
            "http://x:1",
            "https://[::1]:65535/v1",
            "http://[::1]",
            "http://x",
        ] {
            assert!(UpstreamUrl::parse(good).is_ok(), "{good} refused");
        }
    }
}
