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

/// Since when writes to a stream have been waiting for the peer to take bytes, if they are.
/// A client that stops reading a response stops hyper from polling its body, and with it
/// every timer the body checks; this is how its connection still notices.
#[derive(Debug)]
pub struct WriteBlock {
    origin: Instant,
    /// Nanoseconds from `origin` to the first write that had to wait, plus one; zero while
    /// writes go through.
    since: AtomicU64,
}

impl Default for WriteBlock {
    fn default() -> Self {
        WriteBlock {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        }
    }
}

impl WriteBlock {
    /// The moment the current wait began, `None` while writes go through.
    pub fn since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.origin + Duration::from_nanos(n - 1)),
        }
    }

    fn note(&self, polled: &Poll<io::Result<usize>>) {
        let waiting = self.since.load(Ordering::Relaxed) != 0;
        match polled {
            Poll::Pending if !waiting => {
                let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
                self.since.store(since + 1, Ordering::Relaxed);
            }
            Poll::Ready(_) if waiting => self.since.store(0, Ordering::Relaxed),
            _ => {}
        }
    }
}

pin_project! {
    /// An I/O stream whose writes record on `block` when they start and stop waiting.
    #[derive(Debug)]
    pub struct BlockWatch<S> {
        #[pin]
        inner: S,
        block: Arc<WriteBlock>,
    }
}

impl<S> BlockWatch<S> {
    /// `inner`, its waiting writes recorded on `block`.
    pub fn new(inner: S, block: Arc<WriteBlock>) -> Self {
        BlockWatch { inner, block }
    }
}

impl<S: AsyncRead> AsyncRead for BlockWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for BlockWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        this.block.note(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        this.block.note(&polled);
        polled
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

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_is_noted_until_one_goes_through() {
        use tokio::io::AsyncReadExt;
        let block = Arc::new(WriteBlock::default());
        let (near, mut far) = tokio::io::duplex(4);
        let mut io = BlockWatch::new(near, block.clone());
        io.write_all(b"1234").await.unwrap();
        assert_eq!(block.since(), None);
        let waiting_from = Instant::now();
        let write = tokio::spawn(async move { io.write_all(b"5678").await.map(|()| io) });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(block.since(), Some(waiting_from));
        let mut got = [0u8; 8];
        far.read_exact(&mut got).await.unwrap();
        write.await.unwrap().unwrap();
        assert_eq!(block.since(), None);
    }
}
