//! The response body the proxy hands to its server: an in-memory body, or an upstream body
//! relayed frame by frame under an idle timeout, both feeding the request's access log.
//!
//! An upstream failure mid-body is returned as a body error, never as a clean end: hyper then
//! aborts the downstream connection (no final chunk, or fewer bytes than `content-length`), so
//! a truncated body can never look complete to the client.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::access_log::AccessLog;
use crate::upstream::{BoxError, UpstreamIncoming};

/// The upstream was silent longer than `timeoutSeconds` in the middle of a body.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent no data for {} s in the middle of the body", .0.as_secs())]
pub struct IdleTimeout(pub Duration);

/// The task producing a [`ProxyBody::channel_until`] body went away before it finished.
#[derive(Debug, thiserror::Error)]
#[error("the response's producer ended before the body was complete")]
pub struct ProducerGone;

pin_project! {
    /// Body of every response the proxy sends downstream.
    ///
    /// Kept small (the access log and the timer are boxed): hyper and the response type move
    /// the body several times per request, and each move copies all of it.
    pub struct ProxyBody {
        #[pin]
        kind: Kind,
        log: Option<Box<AccessLog>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Full { data: Option<Bytes> },
        Upstream {
            prefix: Option<Bytes>,
            #[pin]
            body: UpstreamIncoming,
            idle: Pin<Box<IdleTimer>>,
        },
        Channel {
            rx: mpsc::Receiver<Result<Bytes, BoxError>>,
            // The channel's close ends the body only once this is set.
            finished: Arc<AtomicBool>,
        },
    }
}

impl Kind {
    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Full { data } => data.is_none(),
            Kind::Upstream { prefix, body, .. } => prefix.is_none() && body.is_end_stream(),
            Kind::Channel { .. } => false,
        }
    }
}

impl ProxyBody {
    /// A complete body held in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        ProxyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            log: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full { data: None },
            log: None,
        }
    }

    /// Relays an upstream body; `idle` bounds the silence between two frames (D13).
    pub fn upstream(body: UpstreamIncoming, idle: Duration) -> Self {
        ProxyBody::upstream_after(Bytes::new(), body, idle)
    }

    /// Relays an upstream body of which `prefix` was already read (to look inside it), so
    /// the client gets the prefix followed by the rest, unchanged.
    pub fn upstream_after(prefix: Bytes, body: UpstreamIncoming, idle: Duration) -> Self {
        ProxyBody {
            kind: Kind::Upstream {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body: body.relayed(),
                idle: Box::pin(IdleTimer::new(idle)),
            },
            log: None,
        }
    }

    /// A body produced by a task. The channel is bounded by its creator; an `Err` item
    /// aborts the response, and the channel's close ends it.
    pub fn channel(rx: mpsc::Receiver<Result<Bytes, BoxError>>) -> Self {
        ProxyBody::channel_until(rx, Arc::new(AtomicBool::new(true)))
    }

    /// As [`ProxyBody::channel`], but the channel's close ends the body only once the
    /// producer has set `finished`: one that goes away without (a panic, an abort) aborts
    /// the response, so that a body cut short never looks complete (the conversion's
    /// keep-alive spaces, say, with no answer after them).
    pub fn channel_until(
        rx: mpsc::Receiver<Result<Bytes, BoxError>>,
        finished: Arc<AtomicBool>,
    ) -> Self {
        ProxyBody {
            kind: Kind::Channel { rx, finished },
            log: None,
        }
    }

    /// Attaches the request's access log, written when the body ends or is dropped.
    pub fn with_log(mut self, mut log: Box<AccessLog>) -> Self {
        // A body already at its end (HEAD, 204, 304, `content-length: 0`, a 101) is never
        // polled: servers send the head alone and drop it. Its end is noted now, or the
        // line would call every such response `client_closed`.
        if self.kind.is_end_stream() {
            log.body_complete();
        }
        self.log = Some(log);
        self
    }
}

impl From<Bytes> for ProxyBody {
    fn from(data: Bytes) -> Self {
        ProxyBody::full(data)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut kind = this.kind;
        let polled = match kind.as_mut().project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Upstream { prefix, .. } if prefix.is_some() => {
                Poll::Ready(prefix.take().map(|p| Ok(Frame::data(p))))
            }
            KindProj::Upstream { body, idle, .. } => match body.poll_frame(cx) {
                Poll::Ready(frame) => {
                    idle.as_mut().touch();
                    Poll::Ready(frame.map(|r| r.map_err(BoxError::from)))
                }
                Poll::Pending => match idle.as_mut().poll_expired(cx) {
                    Poll::Ready(timeout) => Poll::Ready(Some(Err(IdleTimeout(timeout).into()))),
                    Poll::Pending => Poll::Pending,
                },
            },
            KindProj::Channel { rx, finished } => match rx.poll_recv(cx) {
                Poll::Ready(None) if !finished.load(Ordering::Acquire) => {
                    Poll::Ready(Some(Err(ProducerGone.into())))
                }
                polled => polled.map(|item| item.map(|r| r.map(Frame::data))),
            },
        };
        if let (Some(log), Poll::Ready(ready)) = (this.log.as_mut(), &polled) {
            match ready {
                Some(Ok(frame)) => {
                    log.add_bytes(frame.data_ref().map_or(0, |d| d.len() as u64));
                    // Servers stop polling a body whose length is known once it is all
                    // written, or once they have its trailers, so the end is noted here
                    // rather than at `None`.
                    if frame.is_trailers() || kind.as_ref().get_ref().is_end_stream() {
                        log.body_complete();
                    }
                }
                Some(Err(e)) => {
                    // A relayed body that breaks off is a truncated upstream answer, unless
                    // it broke off because the upstream fell silent.
                    log.set_upstream_error(if e.is::<IdleTimeout>() {
                        "timeout"
                    } else {
                        "incomplete_stream"
                    });
                    log.body_failed(e.to_string());
                }
                None => log.body_complete(),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Upstream { prefix, body, .. } => {
                let before = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(before));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(before));
                }
                hint
            }
            Kind::Channel { .. } => SizeHint::default(),
        }
    }
}

pin_project! {
    /// Detects silence without re-arming a timer on every frame: a frame only records the
    /// time, and the sleep is pushed back lazily when it fires early.
    ///
    /// Nor is the sleep polled on every wait: once it has the task's waker, it wakes the
    /// task when it fires, so a wait with the same waker only checks whether it has fired.
    /// A relay waits twice per frame, and each poll of a `Sleep` costs about 115
    /// instructions (callgrind).
    pub struct IdleTimer {
        limit: Duration,
        last_activity: Instant,
        #[pin]
        sleep: Sleep,
        armed_for: Option<Waker>,
    }
}

impl IdleTimer {
    /// A timer that expires once `limit` passes without [`Self::touch`]; the clock starts
    /// now.
    pub fn new(limit: Duration) -> Self {
        let now = Instant::now();
        IdleTimer {
            limit,
            last_activity: now,
            // A limit too large for a deadline (an embedder's `Duration::MAX`): `sleep`
            // caps it where `now + limit` would overflow.
            sleep: match now.checked_add(limit) {
                Some(deadline) => tokio::time::sleep_until(deadline),
                None => tokio::time::sleep(limit),
            },
            armed_for: None,
        }
    }

    /// Records activity.
    pub fn touch(self: Pin<&mut Self>) {
        *self.project().last_activity = Instant::now();
    }

    /// Records activity seen at `at` (no earlier than what is recorded already).
    pub fn touch_at(self: Pin<&mut Self>, at: Instant) {
        let last = self.project().last_activity;
        *last = (*last).max(at);
    }

    /// Ready with the limit once there has been no activity for that long.
    pub fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Duration> {
        let mut this = self.project();
        let armed = this
            .armed_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if armed && !this.sleep.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            // Unconstrained, as the server's stop wait: a poll refused for the task's
            // cooperative budget would return before the sleep has the waker (before it even
            // has a timer, the first time), and the timer would count as armed.
            match Pin::new(&mut tokio::task::unconstrained(this.sleep.as_mut())).poll(cx) {
                Poll::Pending => {
                    if !armed {
                        *this.armed_for = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(()) => {
                    // No deadline at all for a limit past the clock's range: never expires.
                    let Some(deadline) = this.last_activity.checked_add(*this.limit) else {
                        *this.armed_for = None;
                        return Poll::Pending;
                    };
                    if Instant::now() >= deadline {
                        return Poll::Ready(*this.limit);
                    }
                    this.sleep.as_mut().reset(deadline);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::pin::pin;

    use super::*;

    /// A producer that goes away without finishing (a panic, an abort) aborts the body; one
    /// that finished ends it cleanly.
    #[tokio::test]
    async fn a_channel_body_ends_cleanly_only_once_its_producer_finished() {
        use http_body_util::BodyExt;
        for finish in [false, true] {
            let (tx, rx) = mpsc::channel(2);
            let finished = Arc::new(AtomicBool::new(false));
            let mut body = ProxyBody::channel_until(rx, finished.clone());
            tx.send(Ok(Bytes::from_static(b" "))).await.unwrap();
            if finish {
                finished.store(true, Ordering::Release);
                tx.send(Ok(Bytes::from_static(b"{}"))).await.unwrap();
            }
            drop(tx);
            let first = body.frame().await.unwrap().unwrap();
            assert_eq!(first.into_data().unwrap(), " ");
            if finish {
                let last = body.frame().await.unwrap().unwrap();
                assert_eq!(last.into_data().unwrap(), "{}");
                assert!(body.frame().await.is_none());
            } else {
                let error = body.frame().await.unwrap().unwrap_err();
                assert!(error.is::<ProducerGone>(), "{error}");
            }
        }
    }

    /// A limit past the clock's range (a library user's `Duration::MAX`) means no limit, not
    /// an overflow panic on the first response.
    #[tokio::test(start_paused = true)]
    async fn a_limit_past_the_clock_never_expires() {
        let mut timer = pin!(IdleTimer::new(Duration::MAX));
        let pending = poll_fn(|cx| Poll::Ready(timer.as_mut().poll_expired(cx).is_pending())).await;
        assert!(pending);
        tokio::time::advance(Duration::from_secs(3600)).await;
        timer.as_mut().touch();
        let pending = poll_fn(|cx| Poll::Ready(timer.as_mut().poll_expired(cx).is_pending())).await;
        assert!(pending);
    }

    /// The timer is polled once and then only checked, yet it still fires, and counts from
    /// the last touch.
    #[tokio::test(start_paused = true)]
    async fn silence_expires_at_the_limit_counted_from_the_last_touch() {
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let mut timer = pin!(IdleTimer::new(limit));
        let armed = poll_fn(|cx| Poll::Ready(timer.as_mut().poll_expired(cx).is_pending())).await;
        assert!(armed);
        tokio::time::advance(Duration::from_secs(6)).await;
        timer.as_mut().touch();
        let waited = poll_fn(|cx| timer.as_mut().poll_expired(cx));
        let expired = tokio::time::timeout(Duration::from_secs(60), waited).await;
        assert_eq!(expired.ok(), Some(limit));
        assert_eq!(start.elapsed(), Duration::from_secs(16));
    }

    /// A first poll made once the task's cooperative budget is spent still arms the timer.
    #[tokio::test(start_paused = true)]
    async fn a_poll_refused_for_budget_does_not_count_as_armed() {
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let mut timer = pin!(IdleTimer::new(limit));
        let refused = poll_fn(|cx| {
            // Bounded: the budget is 128 units.
            for _ in 0..1000 {
                if pin!(tokio::task::consume_budget()).poll(cx).is_pending() {
                    break;
                }
            }
            let spent = !tokio::task::coop::has_budget_remaining();
            Poll::Ready(spent && timer.as_mut().poll_expired(cx).is_pending())
        })
        .await;
        assert!(refused);
        let waited = poll_fn(|cx| timer.as_mut().poll_expired(cx));
        let expired = tokio::time::timeout(Duration::from_secs(60), waited).await;
        assert_eq!(expired.ok(), Some(limit));
        assert_eq!(start.elapsed(), limit);
    }
}
