//! Log lines written while a test runs, captured in-process. The test must run on a
//! current-thread runtime, so that the proxy's tasks log on the thread whose capture
//! records them.
//!
//! One process-wide subscriber routes each event to the capture installed on the thread that
//! logs it, and drops it on any other thread. A scoped subscriber per test (`set_default`)
//! would race with callsites that other tests' threads register meanwhile: a callsite whose
//! interest was computed without the scoped subscriber stays disabled for it, and its lines
//! are never captured (seen under load: the access line of one test went missing).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Once};

use tokio::sync::Notify;

use super::WAIT;

#[derive(Clone, Default)]
pub struct LogCapture {
    text: Arc<Mutex<Vec<u8>>>,
    written: Arc<Notify>,
}

thread_local! {
    /// The capture of the test running on this thread, if it installed one.
    static CURRENT: RefCell<Option<LogCapture>> = const { RefCell::new(None) };
}

/// Writes to this thread's capture, or nowhere.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CURRENT.with(|current| {
            if let Some(capture) = current.borrow().as_ref() {
                capture.text.lock().unwrap().extend_from_slice(buf);
                capture.written.notify_waiters();
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stops capturing on this thread when dropped.
pub struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

impl LogCapture {
    /// Records this thread's INFO-and-above events until the guard is dropped.
    pub fn install(&self) -> CaptureGuard {
        static GLOBAL: Once = Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadCapture)
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in a test process that captures logs");
        });
        CURRENT.with(|current| *current.borrow_mut() = Some(self.clone()));
        CaptureGuard(())
    }

    /// Waits (bounded) until a captured line contains every needle; returns that line.
    pub async fn line_with(&self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.written.notified();
            let text = self.all();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("no log line with {needles:?} in:\n{text}");
            }
        }
    }

    /// Everything captured so far.
    pub fn all(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }
}
