//! The floor a hyper-based relay cannot go under: the least an HTTP/1.1 reverse proxy built
//! on hyper's server and `client::conn::http1` does per request, with nothing of ours in
//! between (no routing, no header policy, no timeouts, no metrics, no logs). The benchmark
//! suite measures it beside the proxy so that the share of each request's cost that is
//! hyper's own is a figure, not a guess. Its runtime is chosen as the proxy's is.
//!
//! ```sh
//! cargo build --profile profiling --example hyper_floor
//! target/profiling/examples/hyper_floor --listen 127.0.0.1:0 --upstream 127.0.0.1:9100
//! ```
//!
//! Prints `listening on ADDR` once bound. Not a proxy to run: no error envelope, no limits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use openai_stream_proxy::runtime::Workers;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads (default: as the proxy chooses them, from `TOKIO_WORKER_THREADS` or
    /// the CPUs available).
    #[arg(long)]
    threads: Option<NonZeroUsize>,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Idle upstream senders; one whose connection is busy or gone is skipped at checkout.
#[derive(Default)]
struct Pool(Mutex<Vec<SendRequest<Body>>>);

impl Pool {
    fn take(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.0.lock().ok()?;
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<Body>) {
        if let Ok(mut idle) = self.0.lock() {
            idle.push(sender);
        }
    }
}

async fn connect(upstream: SocketAddr) -> std::io::Result<SendRequest<Body>> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn relay(
    pool: Arc<Pool>,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let failed = |message: String| {
        let mut response = Response::new(
            Full::new(Bytes::from(message))
                .map_err(|e| match e {})
                .boxed(),
        );
        *response.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        response
    };
    let mut sender = match pool.take() {
        Some(sender) => sender,
        None => match connect(upstream).await {
            Ok(sender) => sender,
            Err(e) => return Ok(failed(format!("connect: {e}"))),
        },
    };
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, body.boxed());
    let answer = sender.send_request(request).await;
    pool.put(sender);
    match answer {
        Ok(response) => Ok(response.map(|body| body.boxed())),
        Err(e) => Ok(failed(format!("upstream: {e}"))),
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // The proxy's own runtime choice (one CPU: the current-thread scheduler), so that the
    // floor and the proxy are compared on the same scheduler.
    let workers = match args.threads {
        Some(threads) => Workers {
            threads,
            from_env: false,
        },
        None => Workers::from_env().map_err(std::io::Error::other)?,
    };
    workers.build()?.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let pool = Arc::new(Pool::default());
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let pool = pool.clone();
            let upstream = args.upstream;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    relay(pool.clone(), upstream, request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
