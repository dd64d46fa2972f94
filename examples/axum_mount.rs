//! The proxy mounted in an axum application: the app's own routes first, everything else
//! proxied (conversion, passthrough and WebSocket alike).
//!
//! ```sh
//! cargo run --example axum_mount -- 127.0.0.1:8080 https://api.openai.com
//! ```

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use openai_stream_proxy::{ClientOptions, ProxyService, RuleOptions, UpstreamClient, UpstreamUrl};

/// The application: `/app/health` is axum's, every other path goes to `upstream`.
pub fn app(upstream: UpstreamUrl, client: UpstreamClient) -> Router {
    let proxy = ProxyService::new(upstream, RuleOptions::default(), client);
    Router::new()
        .route("/app/health", get(|| async { "ok" }))
        .fallback_service(proxy)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:8080").parse()?;
    let upstream = UpstreamUrl::parse(args.next().as_deref().unwrap_or("https://api.openai.com"))?;
    let client = UpstreamClient::new(ClientOptions::from_env()?)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app(upstream, client)).await?;
    Ok(())
}
