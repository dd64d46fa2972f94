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
//! - [`upstream`]: the upstream URL and the pooled client (TLS, proxies, HTTP/2).
//! - [`headers`]: the hop-by-hop header rules.
//! - [`body`]: the response body type, idle timeouts.
//! - [`error`]: the one mapping from failure to status and OpenAI error envelope.
//! - [`access_log`]: one log line per request.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the `/metrics` and `/healthz` endpoints.
//! - [`request_id`]: the id that follows a request through every log.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
pub mod convert;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod passthrough;
pub mod request_id;
pub mod route;
pub mod server;
pub mod service;
pub mod sse;
pub mod upstream;
pub mod websocket;

pub use body::ProxyBody;
pub use config::{Config, ConfigError, Rule, RuleOptions};
pub use error::ProxyError;
pub use server::Server;
pub use service::ProxyService;
pub use upstream::{ClientOptions, UpstreamBody, UpstreamClient, UpstreamUrl};
