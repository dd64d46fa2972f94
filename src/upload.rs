//! A streamed request body's progress, and the wait for the upstream's response head that
//! it moves.
//!
//! `timeoutSeconds` bounds the upstream's silence (D13). While a client is still uploading
//! (a large file at a slow link), the upstream is not silent: it is waiting for us. So the
//! wait for the response head is counted from the last body frame handed to the upstream
//! connection, not from the start of the request; a 20-minute upload to a proxy with the
//! 600 s default goes through. (That frame may still sit in socket buffers for a moment: a
//! `timeoutSeconds` shorter than the time a slow upstream link needs to drain them would
//! count that time as silence.) A body that makes no progress for `timeoutSeconds` still
//! ends the wait, and the progress says whose fault it was: a client that stopped sending
//! gets 408, an upstream that stopped reading (or never answers) 504.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::Instant;

use crate::progress::ProgressClock;

/// The body's last poll: what it is waiting for.
const HANDED_ON: u8 = 0;
const AWAITING_CLIENT: u8 = 1;
const FINISHED: u8 = 2;

/// Shared by the body (which records), the access log (bytes) and the head wait.
#[derive(Debug)]
pub struct UploadProgress {
    bytes: AtomicU64,
    /// When a frame was last handed on (or the tracking began).
    moved: ProgressClock,
    state: AtomicU8,
}

/// Which side a body that made no progress was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The client sent nothing more.
    Client,
    /// The upstream took nothing more (or the body is complete and no head came).
    Upstream,
}

impl Default for UploadProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl UploadProgress {
    /// Progress starting now, with nothing sent.
    pub fn new() -> Self {
        UploadProgress {
            bytes: AtomicU64::new(0),
            moved: ProgressClock::new(),
            state: AtomicU8::new(HANDED_ON),
        }
    }

    /// Data bytes handed upstream so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records one poll of the client's body; `ended` is whether the body has nothing
    /// more after this poll.
    pub fn observe<E>(&self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>, ended: bool) {
        let state = match polled {
            Poll::Pending => AWAITING_CLIENT,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                self.moved.touch();
                if ended {
                    FINISHED
                } else {
                    HANDED_ON
                }
            }
            // An error fails the request on its own; the head wait sees it through hyper.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => FINISHED,
        };
        self.state.store(state, Ordering::Relaxed);
    }

    fn stalled(&self) -> Stalled {
        match self.state.load(Ordering::Relaxed) {
            AWAITING_CLIENT => Stalled::Client,
            _ => Stalled::Upstream,
        }
    }
}

/// Waits for `head` until the body in `upload` has made no progress for `limit`: the
/// deadline moves with every frame handed upstream, and is `limit` after the last one once
/// the body is complete.
pub async fn head_within<F: Future>(
    head: F,
    limit: Duration,
    upload: &UploadProgress,
) -> Result<F::Output, Stalled> {
    tokio::select! {
        biased;
        output = head => Ok(output),
        () = upload.moved.still_for(limit, Instant::now()) => Err(upload.stalled()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Poll<Option<Result<Frame<Bytes>, ()>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }

    #[test]
    fn counts_data_and_names_the_side_it_waits_for() {
        let progress = UploadProgress::new();
        progress.observe(&data(3), false);
        assert_eq!(progress.bytes(), 3);
        assert_eq!(progress.stalled(), Stalled::Upstream);
        progress.observe::<()>(&Poll::Pending, false);
        assert_eq!(progress.stalled(), Stalled::Client);
        progress.observe(&data(4), true);
        assert_eq!(progress.bytes(), 7);
        assert_eq!(progress.stalled(), Stalled::Upstream);
        progress.observe::<()>(&Poll::Ready(None), true);
        assert_eq!(progress.stalled(), Stalled::Upstream);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_moves_with_each_frame() {
        let progress = std::sync::Arc::new(UploadProgress::new());
        let limit = Duration::from_secs(10);
        // A frame every 6 s for 30 s: never 10 s of silence, so the head (at 31 s) is
        // waited for; 40 s without one would not be.
        let feeder = {
            let progress = progress.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    progress.observe(&data(1), false);
                }
            })
        };
        let head = async {
            tokio::time::sleep(Duration::from_secs(31)).await;
            "head"
        };
        let got = head_within(head, limit, &progress).await;
        assert_eq!(got, Ok("head"));
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_too_large_for_a_deadline_means_none() {
        // tokio's sleep caps `Duration::MAX` at about 30 years; the head comes at 40.
        let progress = UploadProgress::new();
        let head = async {
            tokio::time::sleep(Duration::from_secs(40 * 365 * 86_400)).await;
            "head"
        };
        assert_eq!(
            head_within(head, Duration::MAX, &progress).await,
            Ok("head")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_the_last_frame_ends_the_wait_and_names_the_side() {
        let limit = Duration::from_secs(10);
        let progress = UploadProgress::new();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(7)).await;
        progress.observe(&data(1), true);
        let got = head_within(std::future::pending::<()>(), limit, &progress).await;
        assert_eq!(got, Err(Stalled::Upstream));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(17) && waited < Duration::from_millis(17_100),
            "{waited:?}"
        );

        let progress = UploadProgress::new();
        progress.observe::<()>(&Poll::Pending, false);
        let got = head_within(std::future::pending::<()>(), limit, &progress).await;
        assert_eq!(got, Err(Stalled::Client));
    }
}
