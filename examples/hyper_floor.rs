//! The floor a hyper-based relay cannot go under: the least an HTTP/1.1 reverse proxy built
//! on hyper's server and `client::conn::http1` does per request, with nothing of ours in
//! between (no routing, no header policy, no timeouts, no metrics, no logs). The benchmark
//! suite measures it beside the proxy so that the share of each request's cost that is
//! hyper's own is a figure, not a guess.
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
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads (default: one per CPU available).
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
    // Always the multi-thread scheduler, even on one core where the proxy itself runs on the
    // current-thread one: this relay's connection task hands each response to the serving
    // task through a channel, and only the multi-thread scheduler's LIFO slot runs the woken
    // task next. On the current-thread scheduler the serving task waits its turn behind
    // every other ready task, writes a response in pieces (10-13 TCP segments per 20-event
    // request instead of 6) and spends 40 % more CPU per request.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.get());
    }
    runtime.enable_all().build()?.block_on(async move {
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
