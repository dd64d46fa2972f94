//! Log lines written while a test runs, captured in-process. The test must run on a
//! current-thread runtime, so that the proxy's tasks log on the thread whose subscriber
//! records them.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::WAIT;

#[derive(Clone, Default)]
pub struct LogCapture {
    text: Arc<Mutex<Vec<u8>>>,
    written: Arc<Notify>,
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.lock().unwrap().extend_from_slice(buf);
        self.written.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Records this thread's INFO-and-above events until the guard is dropped.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
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
