//! Open streams of one HTTP/2 connection, so that a connection with none can be closed
//! after an idle limit.
//!
//! hyper's HTTP/1 server closes a kept-alive connection that sends no new request head within
//! its header-read timeout, but its HTTP/2 server has no idle limit: a client could open
//! thousands of connections, send the preface and a SETTINGS frame, and hold each one (a
//! descriptor and its buffers) forever. nginx closes such connections after
//! `keepalive_timeout`, HAProxy after `timeout http-keep-alive`. A stream counts as open from
//! the moment the service is called until its response body has been sent or dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::watch;

/// The number of open streams of one connection; every change wakes [`OpenStreams::idle`].
#[derive(Debug, Clone)]
pub(crate) struct OpenStreams(Arc<watch::Sender<usize>>);

impl OpenStreams {
    pub(crate) fn new() -> OpenStreams {
        OpenStreams(Arc::new(watch::Sender::new(0)))
    }

    fn open(&self) -> StreamGuard {
        self.0.send_modify(|n| *n += 1);
        StreamGuard(self.clone())
    }

    /// Resolves once the connection has had no open stream, and no stream opened or closed,
    /// for `limit`.
    pub(crate) async fn idle(&self, limit: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            // The sender lives in `self`, so neither wait can see it closed.
            if changes.wait_for(|open| *open == 0).await.is_err() {
                return std::future::pending().await;
            }
            match tokio::time::timeout(limit, changes.changed()).await {
                Err(_elapsed) => return,
                Ok(Ok(())) => continue,
                Ok(Err(_closed)) => return std::future::pending().await,
            }
        }
    }
}

/// One open stream; closing it is dropping it.
#[derive(Debug)]
struct StreamGuard(OpenStreams);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A service whose calls, and the response bodies they return, count as open streams.
#[derive(Debug, Clone)]
pub(crate) struct Counted<S> {
    inner: S,
    streams: OpenStreams,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, streams: OpenStreams) -> Counted<S> {
        Counted { inner, streams }
    }
}

impl<S, R, B> hyper::service::Service<Request<R>> for Counted<S>
where
    S: hyper::service::Service<Request<R>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<R>) -> Self::Future {
        CountedFuture {
            guard: Some(self.streams.open()),
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The service's future; its guard moves into the response body when it resolves.
    pub(crate) struct CountedFuture<F> {
        guard: Option<StreamGuard>,
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                let guard = this.guard.take();
                Poll::Ready(result.map(|response| {
                    response.map(|inner| CountedBody {
                        inner,
                        _guard: guard,
                    })
                }))
            }
        }
    }
}

pin_project! {
    /// A response body that keeps its stream open until it is finished or dropped.
    pub(crate) struct CountedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<StreamGuard>,
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_stream_then_the_limit() {
        let streams = OpenStreams::new();
        let limit = Duration::from_secs(10);
        let guard = streams.open();
        let idle = streams.idle(limit);
        tokio::pin!(idle);
        // An open stream is never idle, however long it lasts.
        assert!(tokio::time::timeout(limit * 3, idle.as_mut())
            .await
            .is_err());
        drop(guard);
        // Activity within the limit starts it again.
        tokio::time::sleep(limit / 2).await;
        drop(streams.open());
        assert!(tokio::time::timeout(limit * 3 / 4, idle.as_mut())
            .await
            .is_err());
        assert!(tokio::time::timeout(limit / 2, idle.as_mut()).await.is_ok());
    }
}
