//! # openai-stream-proxy
//!
//! A transparent proxy for OpenAI-compatible APIs. Non-streaming Chat Completions and
//! Responses calls are sent upstream as streams and answered with the one JSON body the
//! upstream would have returned; everything else (streaming calls, other paths, WebSocket
//! sessions) is forwarded unchanged as bytes arrive.
//!
//! Modules, in the order a request meets them:
//! - [`config`]: the validated configuration file.
//! - [`server`]: listeners, accept loops, graceful shutdown.
//! - [`service`]: [`ProxyService`], the hyper/tower service for one upstream.
//! - [`route`]: what to do with a request, from its head alone.
//! - [`passthrough`]: forwarding unchanged, streaming both ways.
//! - [`convert`]: non-streaming → streaming conversion and aggregation.
//! - [`sse`]: the Server-Sent Events parser.
//! - [`websocket`]: WebSocket sessions, upstream handshake first.
//! - [`upload`]: a streamed request body's progress, from which upstream silence counts.
//! - [`progress`]: when a transfer last moved, for stall limits.
//! - [`pool`]: kept-alive HTTP/1.1 connections to plain-`http` upstreams.
//! - [`upstream`]: the upstream URL and the pooled client (TLS, proxies, HTTP/2).
//! - [`headers`]: the hop-by-hop header rules.
//! - [`body`]: the response body type, idle timeouts.
//! - [`error`]: the one mapping from failure to status and OpenAI error envelope.
//! - [`access_log`]: one log line per request.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the `/metrics` and `/healthz` endpoints.
//! - [`request_id`]: the id that follows a request through every log.
//!
//! # What the service does
//!
//! [`ProxyService`] proxies every request to one upstream and picks a mode from the request:
//!
//! - **Convert.** A non-streaming `POST …/chat/completions` or `POST …/responses` with a
//!   JSON body is sent upstream with `"stream": true`; the event stream is aggregated in
//!   memory and the client gets the one JSON body the upstream would have returned. This
//!   exists for upstreams that only stream, and for gateways that cut non-streaming calls
//!   that stay silent for minutes while a model thinks.
//! - **Passthrough.** Everything else (streaming calls, other paths and methods, bodies
//!   that are not convertible) is forwarded unchanged, streaming both ways as bytes arrive.
//! - **WebSocket.** The upstream is connected before the client is upgraded, so a refusal
//!   (401, 429, …) reaches the client as that HTTP response; then messages are relayed both
//!   ways with backpressure.
//!
//! # Errors
//!
//! The service never fails: every failure becomes a response. Failures the proxy itself
//! detects (upstream unreachable or silent, an unusable stream, an unacceptable request)
//! are answered with the status from [`ProxyError`] and an OpenAI error envelope,
//! `{"error": {"message", "type", "param", "code"}}`, because the clients are OpenAI SDKs
//! that parse it and show its `message`. An error the upstream reports inside a converted
//! stream is relayed with the upstream's own message, type, code and param. HTTP error
//! responses from the upstream are relayed, not rewritten. With
//! [`RuleOptions::keep_alive`], a conversion that fails after its `200` was committed can
//! only deliver the envelope inside that `200` body.
//!
//! # Embedding
//!
//! [`ProxyService`] is a `hyper::service::Service`, so a hyper server serves it as it is.
//! Enable upgrades, or WebSocket sessions cannot be proxied:
//!
//! ```no_run
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::server::conn::auto;
//! use openai_stream_proxy::{ClientOptions, ProxyService, RuleOptions, UpstreamClient, UpstreamUrl};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // System trust store and HTTPS_PROXY/NO_PROXY; services built from clones of one
//!     // client share its connection pool.
//!     let client = UpstreamClient::new(ClientOptions::from_env()?)?;
//!     let proxy = ProxyService::new(
//!         UpstreamUrl::parse("https://api.openai.com")?,
//!         RuleOptions::default(),
//!         client,
//!     );
//!
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     loop {
//!         let (stream, _) = listener.accept().await?;
//!         let proxy = proxy.clone(); // cheap: clones share the rule and the pool
//!         tokio::spawn(async move {
//!             let builder = auto::Builder::new(TokioExecutor::new());
//!             let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), proxy);
//!             if let Err(e) = connection.await {
//!                 eprintln!("connection error: {e}");
//!             }
//!         });
//!     }
//! }
//! ```
//!
//! It also implements `tower_service::Service` for any request body, so it mounts in axum
//! and other tower stacks, e.g. `Router::new().fallback_service(proxy)`. The runnable
//! versions are `examples/hyper_server.rs` and `examples/axum_mount.rs`. To serve several
//! ports from a config file, with reload and graceful drain, use [`Server`].

#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
pub mod convert;
pub mod error;
pub mod headers;
pub mod metrics;
mod open_streams;
pub mod passthrough;
pub mod pool;
pub mod progress;
pub mod request_id;
pub mod route;
pub mod runtime;
pub mod server;
pub mod service;
pub mod sse;
pub mod upload;
pub mod upstream;
pub mod websocket;

pub use body::ProxyBody;
pub use config::{Config, ConfigError, Rule, RuleOptions};
pub use error::ProxyError;
pub use server::Server;
pub use service::ProxyService;
pub use upstream::{ClientOptions, UpstreamBody, UpstreamClient, UpstreamUrl};
