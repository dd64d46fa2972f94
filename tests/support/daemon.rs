//! The real binary as a child process: temp dirs for its config, ports, the [`Daemon`]
//! that reads its stderr line by line, and helpers for its log lines.
//!
//! Readiness and every other state change are read from the child's log lines, never
//! guessed with sleeps; every wait is bounded by [`WAIT`] and the child is killed by
//! [`Daemon`]'s `Drop` if a test fails half-way.
//!
//! Ports: the binary needs a concrete `listenPort`, so [`free_port`] binds `127.0.0.1:0`
//! and keeps that socket bound, not listening, for the rest of the test process. With
//! `SO_REUSEADDR` on both sides the proxy's listener can still take the port, while the
//! kernel hands it to no other `bind(0)` or outgoing connection meanwhile. A port released
//! at once was taken by another socket before the proxy bound it, once in four runs of two
//! test suites at the same time on two cores.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::mpsc;

use super::{full, response, send, MockUpstream, WAIT};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_openai-stream-proxy");

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "openai-stream-proxy-test-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` (relative to the dir, parents created) and returns the
    /// absolute path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port for the proxy to listen on, reserved for it (see the module docs).
pub fn free_port() -> u16 {
    static RESERVED: Mutex<Vec<tokio::net::TcpSocket>> = Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(local(0)).unwrap();
    let port = socket.local_addr().unwrap().port();
    RESERVED.lock().unwrap().push(socket);
    port
}

/// A listener the test holds, so the port is certainly in use.
pub fn held_port() -> (StdListener, u16) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One rule object on 127.0.0.1.
pub fn rule(port: u16, upstream: &str) -> String {
    format!(
        r#"{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "{upstream}"}}"#
    )
}

/// A config with the given rules.
pub fn config(rules: &[String]) -> String {
    format!("{{\"rules\": [\n  {}\n]}}\n", rules.join(",\n  "))
}

/// Removes ANSI escape sequences, in case the log formatter colours its output.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The binary with a clean environment for logging and proxies, in `cwd`.
pub fn proxy_command(cwd: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd);
    for var in [
        "RUST_LOG",
        "LOG_LEVEL",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "TOKIO_WORKER_THREADS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running (or exited) proxy process. Its stderr is read line by line on a thread; its
/// stdout is collected whole. Dropping it kills the process if it has not exited.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line received so far, ANSI stripped.
    pub seen: Vec<String>,
    pub eof: bool,
    pub status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start the proxy binary");
        let stderr = child.stderr.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = strip_ansi(line.trim_end_matches(['\r', '\n']));
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let collected = Arc::new(Mutex::new(Vec::new()));
        let sink = collected.clone();
        let stdout_reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = stdout.read_to_end(&mut all);
            sink.lock().unwrap().extend_from_slice(&all);
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
            eof: false,
            status: None,
            stdout: collected,
            stdout_reader: Some(stdout_reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.seen.join("\n")
    }

    pub fn dump(&self) -> String {
        format!(
            "--- proxy stderr ---\n{}\n--------------------",
            self.stderr()
        )
    }

    /// The next stderr line, or `None` at EOF or when `deadline` passes.
    pub async fn next_line(&mut self, deadline: Instant) -> Option<String> {
        if self.eof {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.lines.recv()).await {
            Ok(Some(line)) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Ok(None) => {
                self.eof = true;
                None
            }
            Err(_) => None,
        }
    }

    /// Waits (bounded by `WAIT`) for a stderr line matching `pred`, looking at lines already
    /// seen first.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_since(0, what, pred).await
    }

    /// How many stderr lines have been seen: a mark for [`Daemon::wait_for_since`].
    pub fn mark(&self) -> usize {
        self.seen.len()
    }

    /// As [`Daemon::wait_for`], ignoring the lines seen before `mark`: for an event that
    /// happens more than once (a second reload), wait for the one after the mark.
    pub async fn wait_for_since(
        &mut self,
        mark: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(line) = self.seen.iter().skip(mark).find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        while let Some(line) = self.next_line(deadline).await {
            if pred(&line) {
                return line;
            }
        }
        panic!(
            "no stderr line with {what} within {WAIT:?} (eof: {})\n{}",
            self.eof,
            self.dump()
        );
    }

    /// The lines seen since `mark`.
    pub fn since(&self, mark: usize) -> &[String] {
        &self.seen[mark.min(self.seen.len())..]
    }

    /// Waits for the `n` "proxy rule" start-up lines; after the last one every listener is
    /// bound and served.
    pub async fn wait_ready(&mut self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let rules: Vec<String> = self
                .seen
                .iter()
                .filter(|l| l.contains("proxy rule"))
                .cloned()
                .collect();
            if rules.len() >= n {
                return rules;
            }
            if self.next_line(deadline).await.is_none() {
                panic!(
                    "the proxy did not report {n} rule(s) within {WAIT:?} (eof: {})\n{}",
                    self.eof,
                    self.dump()
                );
            }
        }
    }

    /// Waits (bounded by `limit`) for the process to exit, reading all of its stderr.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + limit;
        while self.next_line(deadline).await.is_some() {}
        // stderr closes when the process exits; reaping follows at once.
        for _ in 0..1000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                if let Some(reader) = self.stdout_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the proxy did not exit within {limit:?}\n{}", self.dump());
    }

    /// Whether the process is still running (records its status when it is not).
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait().unwrap() {
            Some(status) => {
                self.status = Some(status);
                false
            }
            None => true,
        }
    }

    /// Everything written to stdout; complete once [`Daemon::wait_exit`] has returned.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// SIGTERM, then a bounded wait for exit status 0.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{status}\n{}", self.dump());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `cmd` and waits until `rules` rules are served.
pub async fn start_command(cmd: Command, rules: usize) -> Daemon {
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_ready(rules).await;
    daemon
}

/// Starts the binary with `-c <config>` in `dir` and waits until `rules` rules are served.
pub async fn start(dir: &TempDir, config_path: &Path, rules: usize) -> Daemon {
    let cmd = proxy_command(dir.path(), &["-c", config_path.to_str().unwrap()]);
    start_command(cmd, rules).await
}

/// A field `key=value` as the text log formatter writes it, delimited by spaces.
pub fn has_field(line: &str, key: &str, value: &str) -> bool {
    let wanted = format!("{key}={value}");
    line.split(' ').any(|word| word == wanted)
}

pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|word| word.strip_prefix(prefix.as_str()))
}

/// The per-request line of the text log format.
pub fn is_access_line(line: &str) -> bool {
    line.contains("openai_stream_proxy::access") && line.contains(" request ")
}

/// A mock upstream answering 200 with `body` to everything.
pub async fn echo_upstream(body: &'static str) -> MockUpstream {
    MockUpstream::start(move |_| response(200, &[("content-type", "text/plain")], full(body))).await
}

/// `GET http://127.0.0.1:{port}{path}` on a fresh client, the whole response.
pub async fn get(port: u16, path: &str) -> (http::response::Parts, Bytes) {
    send(
        Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub async fn connect_refused(port: u16) -> bool {
    match tokio::net::TcpStream::connect(local(port)).await {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// Connects until the port refuses, bounded in attempts and by `WAIT`: only for a close
/// that no log line announces (the accept loops stop right after "shutting down").
pub async fn wait_refused(port: u16) -> bool {
    let deadline = Instant::now() + WAIT;
    for _ in 0..500 {
        if connect_refused(port).await {
            return true;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Only for runs whose log level hides the "proxy rule" line, so stderr cannot tell when the
/// listener is up: connects until it is accepted, bounded in attempts and by `WAIT`.
pub async fn wait_listening(daemon: &mut Daemon, port: u16) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(local(port)).await.is_ok() {
            return;
        }
        if !daemon.is_running() {
            panic!(
                "the proxy exited with {:?}\n{}",
                daemon.status,
                daemon.dump()
            );
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "port {port} not listening within {WAIT:?}\n{}",
        daemon.dump()
    );
}
