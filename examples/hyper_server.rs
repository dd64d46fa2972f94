//! The proxy served by a bare hyper server, one connection task per client, with
//! upgrades enabled so WebSocket sessions work too.
//!
//! ```sh
//! cargo run --example hyper_server -- 127.0.0.1:8080 https://api.openai.com
//! ```

use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use openai_stream_proxy::{ClientOptions, ProxyService, RuleOptions, UpstreamClient, UpstreamUrl};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:8080").parse()?;
    let upstream = UpstreamUrl::parse(args.next().as_deref().unwrap_or("https://api.openai.com"))?;
    let client = UpstreamClient::new(ClientOptions::from_env()?)?;
    let proxy = ProxyService::new(upstream, RuleOptions::default(), client);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            // `ProxyService` is a `hyper::service::Service`, so it is served as it is.
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), proxy);
            if let Err(e) = connection.await {
                eprintln!("connection error: {e}");
            }
        });
    }
}
