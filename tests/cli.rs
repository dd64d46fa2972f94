//! The real binary: command line, config validation at start-up, start-up and request
//! logs, log levels, and graceful shutdown on SIGINT/SIGTERM.
//!
//! Every test runs `openai-stream-proxy` as a child process with a config written to a
//! fresh temp dir. Readiness is read from the child's stderr (the "proxy rule" start-up
//! lines), never guessed with sleeps; every wait is bounded by `support::WAIT` and the
//! child is killed by [`Daemon`]'s `Drop` if a test fails half-way.
//!
//! Ports: the binary needs a concrete `listenPort`, so [`free_port`] binds `127.0.0.1:0`,
//! reads the port and releases it. Another process could take the port in the tiny window
//! before the proxy binds it; on a loaded machine that would show up as a start-up failure
//! naming the port, not as a wrong result.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_openai-stream-proxy");

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "openai-stream-proxy-cli-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` (relative to the dir, parents created) and returns the
    /// absolute path.
    fn write(&self, name: &str, contents: &str) -> PathBuf {
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

/// A port that was free a moment ago (see the module docs for the race).
fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A listener the test holds, so the port is certainly in use.
fn held_port() -> (StdListener, u16) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One rule object on 127.0.0.1.
fn rule(port: u16, upstream: &str) -> String {
    format!(
        r#"{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "{upstream}"}}"#
    )
}

/// A config with the given rules.
fn config(rules: &[String]) -> String {
    format!("{{\"rules\": [\n  {}\n]}}\n", rules.join(",\n  "))
}

/// Removes ANSI escape sequences (the log formatter colours its output even into a pipe).
fn strip_ansi(line: &str) -> String {
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
fn proxy_command(cwd: &Path, args: &[&str]) -> Command {
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
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running (or exited) proxy process. Its stderr is read line by line on a thread; its
/// stdout is collected whole. Dropping it kills the process if it has not exited.
struct Daemon {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line received so far, ANSI stripped.
    seen: Vec<String>,
    eof: bool,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn spawn(mut cmd: Command) -> Daemon {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    fn stderr(&self) -> String {
        self.seen.join("\n")
    }

    fn dump(&self) -> String {
        format!(
            "--- proxy stderr ---\n{}\n--------------------",
            self.stderr()
        )
    }

    /// The next stderr line, or `None` at EOF or when `deadline` passes.
    async fn next_line(&mut self, deadline: Instant) -> Option<String> {
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
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| pred(l)) {
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

    /// Waits for the `n` "proxy rule" start-up lines; after the last one every listener is
    /// bound and served.
    async fn wait_ready(&mut self, n: usize) -> Vec<String> {
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
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
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

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// SIGTERM, then a bounded wait for exit status 0.
    async fn stop(&mut self) {
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

/// Starts the binary with `-c <config>` in `dir` and waits until `rules` rules are served.
async fn start(dir: &TempDir, config_path: &Path, rules: usize) -> Daemon {
    let cmd = proxy_command(dir.path(), &["-c", config_path.to_str().unwrap()]);
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_ready(rules).await;
    daemon
}

/// Runs the binary on `contents` and expects exit status 1 with exactly one stderr line that
/// names the file and contains every `expected` fragment. Returns that line.
async fn expect_config_error(
    dir: &TempDir,
    name: &str,
    contents: &str,
    expected: &[&str],
) -> String {
    let path = dir.write(name, contents);
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &["-c", path.to_str().unwrap()]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(
        status.code(),
        Some(1),
        "config {contents:?} should be refused\n{}",
        daemon.dump()
    );
    let lines: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "config {contents:?}: expected one stderr line\n{}",
        daemon.dump()
    );
    let line = lines[0].clone();
    assert!(
        line.contains(path.to_str().unwrap()),
        "the message must name the file {}: {line}",
        path.display()
    );
    for fragment in expected {
        assert!(
            line.contains(fragment),
            "config {contents:?}: message lacks {fragment:?}: {line}"
        );
    }
    assert!(
        daemon.stdout().is_empty(),
        "nothing belongs on stdout: {}",
        daemon.stdout()
    );
    line
}

/// A field `key=value` as the log formatter writes it, delimited by spaces.
fn has_field(line: &str, key: &str, value: &str) -> bool {
    let wanted = format!("{key}={value}");
    line.split(' ').any(|word| word == wanted)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|word| word.strip_prefix(prefix.as_str()))
}

fn is_access_line(line: &str) -> bool {
    line.contains("openai_stream_proxy::access") && line.contains(" request ")
}

/// A mock upstream answering 200 with `body` to everything.
async fn echo_upstream(body: &'static str) -> MockUpstream {
    MockUpstream::start(move |_| response(200, &[("content-type", "text/plain")], full(body))).await
}

async fn get(port: u16, path: &str) -> (http::response::Parts, Bytes) {
    send(
        Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

async fn connect_refused(port: u16) -> bool {
    match tokio::net::TcpStream::connect(local(port)).await {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// Only for runs whose log level hides the "proxy rule" line, so stderr cannot tell when the
/// listener is up: connects until it is accepted, bounded in attempts and by `WAIT`.
async fn wait_listening(daemon: &mut Daemon, port: u16) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(local(port)).await.is_ok() {
            return;
        }
        if let Some(status) = daemon.child.try_wait().unwrap() {
            daemon.status = Some(status);
            panic!("the proxy exited with {status}\n{}", daemon.dump());
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

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn help_exits_zero_and_documents_the_config_flag() {
    let dir = TempDir::new("help");
    for flag in ["--help", "-h"] {
        let mut daemon = Daemon::spawn(proxy_command(dir.path(), &[flag]));
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{flag}\n{}", daemon.dump());
        let out = daemon.stdout();
        assert!(out.contains("--config-file"), "{flag}: {out}");
        assert!(out.contains("-c"), "{flag}: {out}");
        assert!(
            out.contains("config.json"),
            "{flag} shows the default: {out}"
        );
    }
}

#[tokio::test]
async fn version_exits_zero_and_prints_the_version() {
    let dir = TempDir::new("version");
    for flag in ["--version", "-V"] {
        let mut daemon = Daemon::spawn(proxy_command(dir.path(), &[flag]));
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{flag}\n{}", daemon.dump());
        let out = daemon.stdout();
        assert!(
            out.contains(env!("CARGO_PKG_VERSION")),
            "{flag} prints the version: {out}"
        );
        assert!(out.contains("openai-stream-proxy"), "{flag}: {out}");
    }
}

#[tokio::test]
async fn an_unknown_argument_is_refused() {
    let dir = TempDir::new("badarg");
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &["--no-such-flag"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_ne!(status.code(), Some(0), "{}", daemon.dump());
    assert!(
        daemon.stderr().contains("--no-such-flag"),
        "{}",
        daemon.dump()
    );
}

#[tokio::test]
async fn default_config_json_in_the_working_directory_is_used() {
    let upstream = echo_upstream("from-default-config").await;
    let dir = TempDir::new("default");
    let port = free_port();
    dir.write("config.json", &config(&[rule(port, &upstream.url())]));

    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &[]));
    let rules = daemon.wait_ready(1).await;
    assert!(
        rules[0].contains(&format!("listen=127.0.0.1:{port}")),
        "{rules:?}"
    );
    let loaded = daemon
        .wait_for("the loaded line", |l| l.contains("loaded 1 rule(s) from"))
        .await;
    assert!(loaded.contains("config.json"), "{loaded}");

    let (parts, body) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"from-default-config");
    daemon.stop().await;
}

#[tokio::test]
async fn missing_default_config_json_is_named() {
    let dir = TempDir::new("nodefault");
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &[]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let lines: Vec<&String> = daemon.seen.iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", daemon.dump());
    assert!(lines[0].contains("config.json"), "{}", lines[0]);
    assert!(lines[0].contains("cannot read"), "{}", lines[0]);
}

#[tokio::test]
async fn relative_config_paths_resolve_from_the_working_directory() {
    let upstream = echo_upstream("from-relative-config").await;
    let dir = TempDir::new("relative");
    for flag in ["-c", "--config-file"] {
        let port = free_port();
        dir.write("conf/proxy.json", &config(&[rule(port, &upstream.url())]));
        let mut daemon = Daemon::spawn(proxy_command(dir.path(), &[flag, "conf/proxy.json"]));
        daemon.wait_ready(1).await;
        let (parts, body) = get(port, "/v1/models").await;
        assert_eq!(parts.status, 200, "{flag}");
        assert_eq!(&body[..], b"from-relative-config", "{flag}");
        daemon.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Config validation: exit 1, one line naming the file and the problem, nothing bound
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_config_file_is_refused() {
    let dir = TempDir::new("missing");
    let path = dir.path().join("does-not-exist.json");
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &["-c", path.to_str().unwrap()]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let lines: Vec<&String> = daemon.seen.iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", daemon.dump());
    assert!(lines[0].contains(path.to_str().unwrap()), "{}", lines[0]);
    assert!(lines[0].contains("cannot read config file"), "{}", lines[0]);
    assert!(lines[0].contains("No such file"), "{}", lines[0]);
}

#[tokio::test]
async fn unreadable_config_file_is_refused() {
    // A directory cannot be read as a file, even by root (tests may run as root, where
    // permission bits would not stop the read).
    let dir = TempDir::new("unreadable");
    let path = dir.path().join("config.json");
    std::fs::create_dir(&path).unwrap();
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &["-c", path.to_str().unwrap()]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let lines: Vec<&String> = daemon.seen.iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", daemon.dump());
    assert!(lines[0].contains(path.to_str().unwrap()), "{}", lines[0]);
    assert!(lines[0].contains("cannot read config file"), "{}", lines[0]);
}

#[tokio::test]
async fn invalid_json_is_refused_with_line_and_column() {
    let dir = TempDir::new("json");
    // The missing comma is on line 3; serde reports the column of the unexpected `"` (25).
    let text = "{\n  \"rules\": [\n    {\"listenPort\": 8080 \"upstreamUrl\": \"http://127.0.0.1:1\"}\n  ]\n}\n";
    expect_config_error(
        &dir,
        "syntax.json",
        text,
        &["invalid JSON", "line 3 column 25"],
    )
    .await;
    expect_config_error(
        &dir,
        "truncated.json",
        "{\"rules\": [",
        &["invalid JSON", "line 1"],
    )
    .await;
    expect_config_error(&dir, "empty.json", "", &["invalid JSON", "line 1 column 0"]).await;
    expect_config_error(
        &dir,
        "array.json",
        "[]",
        &["top level must be a JSON object"],
    )
    .await;
}

#[tokio::test]
async fn missing_or_empty_rules_are_refused() {
    let dir = TempDir::new("rules");
    expect_config_error(&dir, "none.json", "{}", &["`rules` is missing"]).await;
    expect_config_error(
        &dir,
        "misspelt.json",
        r#"{"rule": [{"listenPort": 8080, "upstreamUrl": "http://127.0.0.1:1"}]}"#,
        &["`rules` is missing"],
    )
    .await;
    expect_config_error(
        &dir,
        "empty.json",
        r#"{"rules": []}"#,
        &["`rules` is empty"],
    )
    .await;
    expect_config_error(
        &dir,
        "object.json",
        r#"{"rules": {}}"#,
        &["`rules` must be an array"],
    )
    .await;
}

#[tokio::test]
async fn duplicate_listen_port_is_refused_before_binding() {
    let dir = TempDir::new("dup");
    // rules[0]'s port is held by the test: had the proxy bound anything before validating
    // the whole file, it would report the port in use instead of the duplicate.
    let (_held, port) = held_port();
    let text = config(&[
        rule(port, "http://127.0.0.1:1"),
        rule(port, "http://127.0.0.1:2"),
    ]);
    let line = expect_config_error(
        &dir,
        "dup.json",
        &text,
        &[&format!(
            "rules[1].listenPort: {port} is already used by rules[0]"
        )],
    )
    .await;
    assert!(!line.contains("cannot listen"), "{line}");

    // Without listenAddress both rules mean 0.0.0.0.
    let port = free_port();
    let text = format!(
        r#"{{"rules": [{{"listenPort": {port}, "upstreamUrl": "http://a"}}, {{"listenPort": {port}, "upstreamUrl": "http://b"}}]}}"#
    );
    expect_config_error(
        &dir,
        "dup-any.json",
        &text,
        &["rules[1].listenPort", "already used"],
    )
    .await;
}

#[tokio::test]
async fn listen_port_outside_the_range_is_refused_before_binding() {
    let dir = TempDir::new("range");
    let (_held, port) = held_port();
    for (i, bad) in ["0", "65536", "70000", "-1", "8080.5"].iter().enumerate() {
        let text = format!(
            r#"{{"rules": [{}, {{"listenPort": {bad}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://127.0.0.1:1"}}]}}"#,
            rule(port, "http://127.0.0.1:1")
        );
        expect_config_error(
            &dir,
            &format!("range-{i}.json"),
            &text,
            &["rules[1].listenPort", "outside 1-65535"],
        )
        .await;
    }
    let text = config(&[r#"{"listenPort": "8080", "upstreamUrl": "http://a"}"#.to_string()]);
    expect_config_error(
        &dir,
        "string.json",
        &text,
        &["rules[0].listenPort must be a number"],
    )
    .await;
    let text = config(&[r#"{"upstreamUrl": "http://a"}"#.to_string()]);
    expect_config_error(
        &dir,
        "absent.json",
        &text,
        &["rules[0].listenPort is missing"],
    )
    .await;
}

#[tokio::test]
async fn upstream_url_must_be_an_absolute_http_url() {
    let dir = TempDir::new("upstream");
    let (_held, port) = held_port();
    let bad_urls = [
        "/v1",
        "api.openai.com",
        "ftp://example.com",
        "ws://example.com",
        "http://",
        "",
        "not a url",
    ];
    for (i, bad) in bad_urls.iter().enumerate() {
        let text = config(&[rule(port, "http://127.0.0.1:1"), rule(free_port(), bad)]);
        expect_config_error(
            &dir,
            &format!("url-{i}.json"),
            &text,
            &[
                "rules[1].upstreamUrl",
                "is not an absolute http or https URL",
            ],
        )
        .await;
    }
    let text = config(&[r#"{"listenPort": 8080, "upstreamUrl": 5}"#.to_string()]);
    expect_config_error(
        &dir,
        "number.json",
        &text,
        &["rules[0].upstreamUrl must be a string"],
    )
    .await;
    let text = config(&[r#"{"listenPort": 8080}"#.to_string()]);
    expect_config_error(
        &dir,
        "absent.json",
        &text,
        &["rules[0].upstreamUrl is missing"],
    )
    .await;
}

#[tokio::test]
async fn timeout_seconds_must_be_a_positive_integer() {
    let dir = TempDir::new("timeout");
    let (_held, port) = held_port();
    for (i, bad) in ["0", "-5", "1.5", "\"30\"", "null", "true"]
        .iter()
        .enumerate()
    {
        // As a top-level default.
        let text = format!(
            r#"{{"timeoutSeconds": {bad}, "rules": [{}]}}"#,
            rule(port, "http://127.0.0.1:1")
        );
        expect_config_error(
            &dir,
            &format!("top-{i}.json"),
            &text,
            &["timeoutSeconds must be a positive integer"],
        )
        .await;
        // As a per-rule override, after a valid rule on a port the test holds.
        let text = format!(
            r#"{{"rules": [{}, {{"listenPort": {}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://127.0.0.1:1", "timeoutSeconds": {bad}}}]}}"#,
            rule(port, "http://127.0.0.1:1"),
            free_port()
        );
        expect_config_error(
            &dir,
            &format!("rule-{i}.json"),
            &text,
            &["rules[1].timeoutSeconds must be a positive integer"],
        )
        .await;
    }
}

#[tokio::test]
async fn unknown_keys_are_warned_about_and_the_proxy_serves() {
    let upstream = echo_upstream("served-despite-unknown-keys").await;
    let dir = TempDir::new("unknown");
    let port = free_port();
    let text = format!(
        r#"{{"futureOption": {{"a": 1}}, "rules": [{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "{}", "laterSetting": true}}]}}"#,
        upstream.url()
    );
    let path = dir.write("config.json", &text);
    let mut daemon = start(&dir, &path, 1).await;

    for key in ["futureOption", "rules[0].laterSetting"] {
        let line = daemon
            .wait_for(&format!("a warning for {key}"), |l| {
                l.contains("unknown config key") && has_field(l, "key", key)
            })
            .await;
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains(path.to_str().unwrap()),
            "names the file: {line}"
        );
    }
    let (parts, body) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"served-despite-unknown-keys");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Binding
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_port_in_use_exits_1_naming_it_and_leaves_nothing_listening() {
    let dir = TempDir::new("inuse");
    let first = free_port();
    let (held, busy) = held_port();
    let path = dir.write(
        "config.json",
        &config(&[
            rule(first, "http://127.0.0.1:1"),
            rule(busy, "http://127.0.0.1:2"),
        ]),
    );
    let mut daemon = Daemon::spawn(proxy_command(dir.path(), &["-c", path.to_str().unwrap()]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());

    let stderr = daemon.stderr();
    let errors: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", daemon.dump());
    let line = errors[0];
    assert!(
        line.contains(&format!("port {busy}")),
        "names the port: {line}"
    );
    assert!(line.contains("rules[1]"), "names the rule: {line}");
    assert!(
        line.contains(path.to_str().unwrap()),
        "names the file: {line}"
    );
    assert!(!stderr.contains("proxy rule"), "{stderr}");

    // The first rule's listener went with the process: nothing answers on it, and the
    // port can be bound again.
    assert!(connect_refused(first).await, "port {first} still accepts");
    drop(StdListener::bind(local(first)).expect("the first port must be free again"));
    // The test's own listener is untouched.
    assert_eq!(held.local_addr().unwrap().port(), busy);
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn startup_logs_list_each_port_and_upstream() {
    let a = echo_upstream("a").await;
    let b = echo_upstream("b").await;
    let dir = TempDir::new("startup");
    let (pa, pb) = (free_port(), free_port());
    let path = dir.write(
        "config.json",
        &config(&[
            rule(pa, &a.url()),
            rule(pb, &format!("{}/openai/", b.url())),
        ]),
    );
    let mut daemon = start(&dir, &path, 2).await;
    let rules = daemon.wait_ready(2).await;
    assert!(
        has_field(&rules[0], "listen", &format!("127.0.0.1:{pa}")),
        "{rules:?}"
    );
    assert!(has_field(&rules[0], "upstream", &a.url()), "{rules:?}");
    assert!(
        has_field(&rules[1], "listen", &format!("127.0.0.1:{pb}")),
        "{rules:?}"
    );
    assert!(
        has_field(&rules[1], "upstream", &format!("{}/openai", b.url())),
        "{rules:?}"
    );
    assert!(rules.iter().all(|l| l.contains("INFO")), "{rules:?}");
    let loaded = daemon
        .wait_for("the loaded line", |l| l.contains("loaded 2 rule(s)"))
        .await;
    assert!(loaded.contains(path.to_str().unwrap()), "{loaded}");

    // Each port reaches its own upstream.
    assert_eq!(&get(pa, "/x").await.1[..], b"a");
    assert_eq!(&get(pb, "/x").await.1[..], b"b");
    daemon.stop().await;
}

#[tokio::test]
async fn one_request_line_per_request_without_secrets() {
    const UPSTREAM_BODY: &str = "UPSTREAM-BODY-MARKER-77";
    let upstream = echo_upstream(UPSTREAM_BODY).await;
    let dir = TempDir::new("access");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
    let mut daemon = start(&dir, &path, 1).await;

    let req = Request::post(format!(
        "http://127.0.0.1:{port}/v1/embeddings?api_key=QUERY-SECRET-9"
    ))
    .header("authorization", "Bearer sk-SECRET-123")
    .header("content-type", "application/json")
    .body(Full::new(Bytes::from_static(
        br#"{"model":"m","input":"BODY-MARKER-42"}"#,
    )))
    .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], UPSTREAM_BODY.as_bytes());
    let seen = upstream.single_request();
    assert_eq!(seen.headers["authorization"], "Bearer sk-SECRET-123");

    let line = daemon.wait_for("the request line", is_access_line).await;
    assert!(line.contains("INFO"), "{line}");
    for (key, value) in [
        ("port", port.to_string()),
        ("method", "POST".into()),
        ("path", "/v1/embeddings".into()),
        ("mode", "passthrough".into()),
        ("status", "200".into()),
        ("bytes", UPSTREAM_BODY.len().to_string()),
    ] {
        assert!(
            has_field(&line, key, &value),
            "{key}={value} missing: {line}"
        );
    }
    let duration: f64 = field(&line, "duration_ms")
        .unwrap_or_else(|| panic!("no duration: {line}"))
        .parse()
        .unwrap_or_else(|e| panic!("duration not a number ({e}): {line}"));
    assert!((0.0..10_000.0).contains(&duration), "{line}");

    // A second request on another path: a second line, with its own status.
    let (parts, _) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);
    daemon
        .wait_for("the second request line", |l| {
            is_access_line(l) && has_field(l, "method", "GET") && has_field(l, "path", "/v1/models")
        })
        .await;

    // Exit flushes everything the process will ever write.
    daemon.stop().await;
    let access: Vec<&String> = daemon.seen.iter().filter(|l| is_access_line(l)).collect();
    assert_eq!(access.len(), 2, "one line per request\n{}", daemon.dump());
    let stderr = daemon.stderr();
    for secret in [
        "sk-SECRET-123",
        "Bearer",
        "BODY-MARKER-42",
        "QUERY-SECRET-9",
        UPSTREAM_BODY,
    ] {
        assert!(
            !stderr.contains(secret),
            "{secret} leaked into the log\n{stderr}"
        );
    }
}

#[tokio::test]
async fn log_level_warn_suppresses_info_lines() {
    let upstream = echo_upstream("quiet").await;
    let dir = TempDir::new("loglevel");
    let port = free_port();
    // The unknown key gives a warn line to prove the logger is on at all.
    let text = format!(
        r#"{{"unusedKey": 1, "rules": [{}]}}"#,
        rule(port, &upstream.url())
    );
    let path = dir.write("config.json", &text);
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    cmd.env("LOG_LEVEL", "warn");
    let mut daemon = Daemon::spawn(cmd);
    daemon
        .wait_for("the unknown-key warning", |l| {
            l.contains("unknown config key")
        })
        .await;
    // "proxy rule" is info, so readiness has to be probed on the port.
    wait_listening(&mut daemon, port).await;
    let (parts, body) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"quiet");
    daemon.stop().await;
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("INFO"),
        "no info line at LOG_LEVEL=warn\n{stderr}"
    );
    assert!(!daemon.seen.iter().any(|l| is_access_line(l)), "{stderr}");
    assert!(!stderr.contains("proxy rule"), "{stderr}");

    // Upper case, as the reference implementation documents it.
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    cmd.env("LOG_LEVEL", "ERROR");
    let mut daemon = Daemon::spawn(cmd);
    wait_listening(&mut daemon, port).await;
    daemon.stop().await;
    assert!(
        daemon.seen.iter().all(|l| l.trim().is_empty()),
        "nothing below error at LOG_LEVEL=ERROR\n{}",
        daemon.dump()
    );
}

#[tokio::test]
async fn rust_log_sets_the_level_and_wins_over_log_level() {
    let upstream = echo_upstream("loud").await;
    let dir = TempDir::new("rustlog");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));

    // RUST_LOG=info beats LOG_LEVEL=error: the request line is there.
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", "info").env("LOG_LEVEL", "error");
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_ready(1).await;
    get(port, "/v1/models").await;
    daemon.wait_for("the request line", is_access_line).await;
    daemon.stop().await;

    // RUST_LOG=warn beats LOG_LEVEL=info: no info at all.
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", "warn").env("LOG_LEVEL", "info");
    let mut daemon = Daemon::spawn(cmd);
    wait_listening(&mut daemon, port).await;
    get(port, "/v1/models").await;
    daemon.stop().await;
    assert!(!daemon.stderr().contains("INFO"), "{}", daemon.dump());

    // RUST_LOG takes directives: only the access log at info.
    let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", "warn,openai_stream_proxy::access=info");
    let mut daemon = Daemon::spawn(cmd);
    wait_listening(&mut daemon, port).await;
    get(port, "/v1/models").await;
    daemon.wait_for("the request line", is_access_line).await;
    daemon.stop().await;
    assert!(!daemon.stderr().contains("proxy rule"), "{}", daemon.dump());
}

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sigint_without_traffic_exits_zero_promptly() {
    let dir = TempDir::new("sigint");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, "http://127.0.0.1:1")]));
    let mut daemon = start(&dir, &path, 1).await;
    let sent = Instant::now();
    daemon.signal("INT");
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.dump());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        sent.elapsed()
    );
    assert!(
        daemon.stderr().contains("shutting down"),
        "{}",
        daemon.dump()
    );
    assert!(connect_refused(port).await);
}

/// A supervisor may stop the proxy the moment it reports its listeners. Repeated, with a
/// few proxies starting at once, because the window this guards is a few scheduling
/// quanta wide.
#[tokio::test]
async fn signals_right_after_readiness_exit_zero() {
    let dir = TempDir::new("early-signal");
    for attempt in 0..10 {
        let mut daemons = Vec::new();
        for i in 0..4 {
            let port = free_port();
            let path = dir.write(
                &format!("config-{i}.json"),
                &config(&[rule(port, "http://127.0.0.1:1")]),
            );
            let cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
            daemons.push(Daemon::spawn(cmd));
        }
        for (i, daemon) in daemons.iter_mut().enumerate() {
            daemon.wait_ready(1).await;
            daemon.signal(if i % 2 == 0 { "TERM" } else { "INT" });
        }
        for (i, daemon) in daemons.iter_mut().enumerate() {
            let status = daemon.wait_exit(WAIT).await;
            assert_eq!(
                status.code(),
                Some(0),
                "attempt {attempt}, proxy {i}: signal right after readiness: {status}\n{}",
                daemon.dump()
            );
        }
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_and_drains_in_flight_requests() {
    // The upstream answers headers at once and then holds the body open until the test
    // feeds it.
    let (feed_tx, mut feed_rx) = mpsc::unbounded_channel();
    let upstream = MockUpstream::start(move |_| {
        let (tx, body) = channel_body();
        let _ = feed_tx.send(tx);
        response(200, &[("content-type", "text/plain")], body)
    })
    .await;
    let dir = TempDir::new("sigterm");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
    let mut daemon = start(&dir, &path, 1).await;

    let (chunk_tx, mut chunk_rx) = mpsc::unbounded_channel::<Bytes>();
    let url = format!("http://127.0.0.1:{port}/v1/slow");
    let in_flight = tokio::spawn(async move {
        let response = client()
            .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("the in-flight request failed");
        let status = response.status();
        let mut body = response.into_body();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the in-flight body failed");
            if let Some(data) = frame.data_ref() {
                all.extend_from_slice(data);
                let _ = chunk_tx.send(data.clone());
            }
        }
        (status, all)
    });

    let feed = tokio::time::timeout(WAIT, feed_rx.recv())
        .await
        .expect("the request never reached the upstream")
        .unwrap();
    feed.send(Ok(Bytes::from_static(b"first-half;")))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, chunk_rx.recv())
        .await
        .expect("the first chunk never reached the client")
        .unwrap();
    assert_eq!(&first[..], b"first-half;");

    // The request is mid-body. SIGTERM: stop accepting, keep draining.
    daemon.signal("TERM");
    daemon
        .wait_for("the shutdown line", |l| l.contains("shutting down"))
        .await;
    // The accept loops stop right after the line; allow them a bounded moment.
    let deadline = Instant::now() + WAIT;
    let mut refused = false;
    for _ in 0..500 {
        if connect_refused(port).await {
            refused = true;
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "new connections still accepted after SIGTERM\n{}",
        daemon.dump()
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the proxy exited with a request in flight\n{}",
        daemon.dump()
    );

    // Finish the upstream body: the client gets all of it, then the process exits 0.
    feed.send(Ok(Bytes::from_static(b"second-half")))
        .await
        .unwrap();
    drop(feed);
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the in-flight request did not finish")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"first-half;second-half");

    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.dump());
    let line = daemon
        .seen
        .iter()
        .find(|l| is_access_line(l) && has_field(l, "path", "/v1/slow"))
        .unwrap_or_else(|| panic!("no request line\n{}", daemon.dump()))
        .clone();
    assert!(has_field(&line, "status", "200"), "{line}");
    assert!(has_field(&line, "bytes", "22"), "{line}");
    assert!(has_field(&line, "outcome", "complete"), "{line}");
    assert!(
        daemon.stderr().contains("all connections drained"),
        "{}",
        daemon.dump()
    );
}
