//! When a transfer last moved. The side that moves the bytes stamps the clock (a WebSocket
//! leg's writes, an upload's frames as the upstream connection takes them); whoever decides
//! that a peer stopped taking them compares the stamp with its limit, so a slow but moving
//! transfer is never taken for a stalled one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The last moment of progress, settable from any thread without a lock.
#[derive(Debug)]
pub struct ProgressClock {
    origin: Instant,
    /// Nanoseconds from `origin` to the last progress.
    last: AtomicU64,
}

impl Default for ProgressClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressClock {
    /// A clock whose last progress is now.
    pub fn new() -> Self {
        ProgressClock {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records progress now.
    pub fn touch(&self) {
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    /// The last progress.
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once the clock has not moved for `limit`, counted from `since` when it last
    /// moved before that. The deadline moves with every touch; a limit too large to be a
    /// deadline never resolves.
    pub async fn still_for(&self, limit: Duration, since: Instant) {
        loop {
            let Some(deadline) = self.last().max(since).checked_add(limit) else {
                return std::future::pending().await;
            };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

pin_project! {
    /// An I/O stream that touches `clock` whenever a write takes bytes.
    #[derive(Debug)]
    pub struct WriteClock<S> {
        #[pin]
        inner: S,
        clock: Arc<ProgressClock>,
    }
}

impl<S> WriteClock<S> {
    /// `inner`, its writes recorded on `clock`.
    pub fn new(inner: S, clock: Arc<ProgressClock>) -> Self {
        WriteClock { inner, clock }
    }

    /// The stream inside.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

fn touched(polled: Poll<io::Result<usize>>, clock: &ProgressClock) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(1..)) = polled {
        clock.touch();
    }
    polled
}

impl<S: AsyncRead> AsyncRead for WriteClock<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for WriteClock<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        touched(this.inner.poll_write(cx, buf), this.clock)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        touched(this.inner.poll_write_vectored(cx, bufs), this.clock)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn writes_that_take_bytes_move_the_clock() {
        let clock = Arc::new(ProgressClock::new());
        let started = clock.last();
        let (near, _far) = tokio::io::duplex(64);
        let mut io = WriteClock::new(near, clock.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        io.write_all(b"hello").await.unwrap();
        assert_eq!(clock.last() - started, Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(io.write(b"").await.unwrap(), 0);
        io.flush().await.unwrap();
        assert_eq!(clock.last() - started, Duration::from_secs(3));
    }
}
