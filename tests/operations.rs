//! Operating the real binary: `--check`, SIGHUP reload, per-rule injected headers with
//! `${ENV}` values, `--log-format json` and request ids.
//!
//! Every test runs `openai-stream-proxy` as a child process through `support::daemon`:
//! configs in a fresh temp dir, ports from `free_port` (bind `127.0.0.1:0`, read, release;
//! see that module for the tiny race), traffic to 127.0.0.1 only, every wait bounded by
//! `WAIT` and driven by the child's log lines ("proxy rule", "config reloaded", "config
//! reload rejected", the request line), and the child killed on drop.

mod support;

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::daemon::*;
use support::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SECRET: &str = "sk-osp-test-SECRET-5f3a";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The proxy on `config_path`, with `OSP_TEST_KEY` set to [`SECRET`] and
/// `OSP_TEST_UNSET` certainly unset.
fn command(dir: &TempDir, config_path: &Path, extra: &[&str]) -> std::process::Command {
    let mut args = vec!["-c", config_path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut cmd = proxy_command(dir.path(), &args);
    cmd.env("OSP_TEST_KEY", SECRET).env_remove("OSP_TEST_UNSET");
    cmd
}

/// Nothing listens on `port` and the test can bind it itself.
async fn assert_unbound(port: u16) {
    assert!(connect_refused(port).await, "something accepts on {port}");
    drop(StdListener::bind(local(port)).unwrap_or_else(|e| panic!("port {port} is bound: {e}")));
}

/// Rewrites the config, sends SIGHUP and waits for the "config reloaded" line of this
/// reload, which is logged once every change is in effect.
async fn reload(daemon: &mut Daemon, dir: &TempDir, name: &str, contents: &str) -> String {
    reload_ends(daemon, dir, name, contents, "config reloaded").await
}

/// As [`reload`], for a reload that must be rejected: the "config reload rejected" line.
async fn rejected_reload(daemon: &mut Daemon, dir: &TempDir, contents: &str) -> String {
    reload_ends(
        daemon,
        dir,
        "config.json",
        contents,
        "config reload rejected",
    )
    .await
}

async fn reload_ends(
    daemon: &mut Daemon,
    dir: &TempDir,
    name: &str,
    contents: &str,
    expected: &str,
) -> String {
    dir.write(name, contents);
    let mark = daemon.mark();
    daemon.signal("HUP");
    let line = daemon
        .wait_for_since(mark, "the reload's outcome", |l| {
            l.contains("config reloaded") || l.contains("config reload rejected")
        })
        .await;
    assert!(
        line.contains(expected),
        "not {expected:?}: {line}\n{}",
        daemon.dump()
    );
    line
}

/// An upstream that answers 200 at once and holds the body open: each request hands the
/// test the sender that feeds its body (dropping it ends the body).
async fn holding_upstream() -> (
    MockUpstream,
    mpsc::UnboundedReceiver<mpsc::Sender<Result<Bytes, BoxError>>>,
) {
    let (feed_tx, feed_rx) = mpsc::unbounded_channel();
    let upstream = MockUpstream::start(move |_| {
        let (tx, body) = channel_body();
        let _ = feed_tx.send(tx);
        response(200, &[("content-type", "text/plain")], body)
    })
    .await;
    (upstream, feed_rx)
}

/// A GET whose body chunks are reported as they arrive; the task returns status and body.
fn streaming_get(
    url: String,
) -> (
    JoinHandle<(StatusCode, Vec<u8>)>,
    mpsc::UnboundedReceiver<Bytes>,
) {
    let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
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
    (task, chunk_rx)
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("{what}: channel closed"))
}

/// One HTTP/1.1 client connection (no pool): requests on it share one TCP connection, or
/// fail if the proxy closed it.
async fn one_connection(port: u16) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    port: u16,
    path: &str,
) -> (StatusCode, Bytes) {
    tokio::time::timeout(WAIT, async {
        sender.ready().await.expect("the connection was closed");
        let request = Request::get(path)
            .header("host", format!("127.0.0.1:{port}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.expect("request failed");
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    })
    .await
    .expect("no response on the open connection")
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

// ---------------------------------------------------------------------------------------
// --check
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn check_prints_the_resolved_rules_without_header_values_and_binds_nothing() {
    let dir = TempDir::new("check-ok");
    let (pa, pb, admin) = (free_port(), free_port(), free_port());
    let text = format!(
        r#"{{
  "adminListen": "127.0.0.1:{admin}",
  "timeoutSeconds": 7,
  "rules": [
    {{"listenPort": {pa}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://127.0.0.1:9/base/",
      "headers": {{"authorization": "Bearer ${{OSP_TEST_KEY}}", "x-org": "team-1"}}}},
    {{"listenPort": {pb}, "listenAddress": "127.0.0.1", "upstreamUrl": "https://api.example.com",
      "convert": false, "keepAliveSeconds": 20, "maxRequestBodyBytes": 1234}}
  ]
}}"#
    );
    let path = dir.write("config.json", &text);
    let mut daemon = Daemon::spawn(command(&dir, &path, &["--check"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.dump());

    let out = daemon.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("{}: valid, 2 rule(s)", path.display()),
        "{out}"
    );
    assert!(
        out.contains(&format!("admin endpoints on 127.0.0.1:{admin}")),
        "{out}"
    );
    let first = lines
        .iter()
        .find(|l| l.contains(&format!("127.0.0.1:{pa} -> ")))
        .unwrap_or_else(|| panic!("no line for rules[0]: {out}"));
    for fragment in [
        "-> http://127.0.0.1:9/base ",
        "convert: on",
        "timeout: 7 s",
        "keep-alive: off",
        "injected headers: authorization, x-org",
    ] {
        assert!(first.contains(fragment), "{fragment:?} missing: {first}");
    }
    let second = lines
        .iter()
        .find(|l| l.contains(&format!("127.0.0.1:{pb} -> ")))
        .unwrap_or_else(|| panic!("no line for rules[1]: {out}"));
    for fragment in [
        "-> https://api.example.com ",
        "convert: off",
        "timeout: 7 s",
        "keep-alive: 20 s",
        "max request body: 1234 B",
        "injected headers: none",
    ] {
        assert!(second.contains(fragment), "{fragment:?} missing: {second}");
    }
    // Header names, never their values, on either stream.
    let everything = format!("{out}\n{}", daemon.stderr());
    for value in [SECRET, "Bearer", "team-1"] {
        assert!(
            !everything.contains(value),
            "{value} printed:\n{everything}"
        );
    }
    assert!(
        daemon.seen.iter().all(|l| l.trim().is_empty()),
        "a valid loopback config warns about nothing\n{}",
        daemon.dump()
    );
    // No rule port and no admin port was bound: nothing accepts, the test can bind them.
    for port in [pa, pb, admin] {
        assert_unbound(port).await;
    }
}

#[tokio::test]
async fn check_lists_every_problem_one_line_each() {
    let dir = TempDir::new("check-bad");
    let port = free_port();
    let text = format!(
        r#"{{
  "timeoutSeconds": 0,
  "rules": [
    {{"listenPort": 0, "upstreamUrl": "ftp://example.com"}},
    {{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://127.0.0.1:1",
      "convert": "yes", "headers": {{"authorization": "Bearer ${{OSP_TEST_UNSET}}"}}}}
  ]
}}"#
    );
    let path = dir.write("bad.json", &text);
    let mut daemon = Daemon::spawn(command(&dir, &path, &["--check"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    assert!(daemon.stdout().is_empty(), "stdout: {}", daemon.stdout());

    let lines: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let expected = [
        "timeoutSeconds must be a positive integer",
        "rules[0].listenPort: 0 is outside 1-65535",
        "rules[0].upstreamUrl:",
        "rules[1].convert must be true or false",
        "rules[1].headers.authorization: environment variable OSP_TEST_UNSET is not set",
    ];
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per problem\n{}",
        daemon.dump()
    );
    let prefix = format!("error: {}: ", path.display());
    for line in &lines {
        assert!(line.starts_with(&prefix), "names the file: {line}");
    }
    for problem in expected {
        let matching = lines.iter().filter(|l| l.contains(problem)).count();
        assert_eq!(matching, 1, "{problem:?}\n{}", daemon.dump());
    }
    assert_unbound(port).await;

    // A syntax error: the file, and the line and column of the mistake.
    let text = "{\n  \"rules\": [\n    {\"listenPort\": 8080 \"upstreamUrl\": \"http://127.0.0.1:1\"}\n  ]\n}\n";
    let path = dir.write("syntax.json", text);
    let mut daemon = Daemon::spawn(command(&dir, &path, &["--check"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let lines: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{}", daemon.dump());
    assert!(
        lines[0].starts_with(&format!("error: {}: ", path.display())),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("invalid JSON at line 3 column 25"),
        "{}",
        lines[0]
    );
    assert!(daemon.stdout().is_empty(), "stdout: {}", daemon.stdout());
}

// ---------------------------------------------------------------------------------------
// SIGHUP reload
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn reload_adds_a_rule_and_its_port_starts_serving() {
    let a = echo_upstream("from-a").await;
    let b = echo_upstream("from-b").await;
    let dir = TempDir::new("reload-add");
    let (pa, pb) = (free_port(), free_port());
    let path = dir.write("config.json", &config(&[rule(pa, &a.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;
    assert!(connect_refused(pb).await, "{pb} served before the reload");

    let mark = daemon.mark();
    let line = reload(
        &mut daemon,
        &dir,
        "config.json",
        &config(&[rule(pa, &a.url()), rule(pb, &b.url())]),
    )
    .await;
    for (key, value) in [
        ("rules", "2"),
        ("added", "1"),
        ("removed", "0"),
        ("updated", "0"),
    ] {
        assert!(has_field(&line, key, value), "{key}={value}: {line}");
    }
    assert!(line.contains(path.to_str().unwrap()), "{line}");
    // The new rule's "proxy rule" line precedes "config reloaded": the port is served.
    let added = daemon
        .wait_for_since(mark, "the new rule's line", |l| {
            l.contains("proxy rule") && has_field(l, "listen", &format!("127.0.0.1:{pb}"))
        })
        .await;
    assert!(has_field(&added, "upstream", &b.url()), "{added}");

    let (parts, body) = get(pb, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"from-b");
    let (parts, body) = get(pa, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"from-a");
    daemon.stop().await;
}

#[tokio::test]
async fn reload_removing_a_rule_closes_its_port_and_finishes_the_request_in_flight() {
    let (slow, mut feeds) = holding_upstream().await;
    let other = echo_upstream("still-here").await;
    let dir = TempDir::new("reload-remove");
    let (pa, pb) = (free_port(), free_port());
    let path = dir.write(
        "config.json",
        &config(&[rule(pa, &slow.url()), rule(pb, &other.url())]),
    );
    let mut daemon = start_command(command(&dir, &path, &[]), 2).await;

    // A request on the rule about to go, mid-body.
    let (in_flight, mut chunks) = streaming_get(format!("http://127.0.0.1:{pa}/v1/slow"));
    let feed = recv(&mut feeds, "the request reached the upstream").await;
    feed.send(Ok(Bytes::from_static(b"first-half;")))
        .await
        .unwrap();
    let first = recv(&mut chunks, "the first chunk reached the client").await;
    assert_eq!(&first[..], b"first-half;");

    let mark = daemon.mark();
    let line = reload(
        &mut daemon,
        &dir,
        "config.json",
        &config(&[rule(pb, &other.url())]),
    )
    .await;
    for (key, value) in [
        ("rules", "1"),
        ("added", "0"),
        ("removed", "1"),
        ("updated", "0"),
    ] {
        assert!(has_field(&line, key, value), "{key}={value}: {line}");
    }
    daemon
        .wait_for_since(mark, "the rule removed line", |l| {
            l.contains("rule removed") && has_field(l, "listen", &format!("127.0.0.1:{pa}"))
        })
        .await;
    // The listening socket is closed before the reload is reported.
    assert!(
        connect_refused(pa).await,
        "{pa} still accepts new connections after the reload\n{}",
        daemon.dump()
    );
    // The kept rule serves on.
    let (parts, body) = get(pb, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"still-here");

    // The request in flight completes with its whole body.
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
    let access = daemon
        .wait_for("the in-flight request line", |l| {
            is_access_line(l) && has_field(l, "path", "/v1/slow")
        })
        .await;
    assert!(has_field(&access, "outcome", "complete"), "{access}");
    assert!(has_field(&access, "bytes", "22"), "{access}");
    daemon
        .wait_for("the removed rule's drain", |l| {
            l.contains("all connections drained") && l.contains(&format!("127.0.0.1:{pa}"))
        })
        .await;
    assert!(daemon.is_running(), "{}", daemon.dump());
    daemon.stop().await;
}

/// `LOG_LEVEL` takes the reference's level names in any case, and a value that is not a
/// level is said and ignored; neither silences the log.
#[tokio::test]
async fn log_level_names_set_the_level_and_an_unknown_one_is_reported() {
    let dir = TempDir::new("log-level");
    let path = dir.write(
        "config.json",
        &format!(
            "{{\"surprise\": 1, \"rules\": [{}]}}",
            rule(free_port(), "http://127.0.0.1:9")
        ),
    );
    // `--check` logs the unknown key at warn, then exits.
    let warned = "unknown config key ignored";
    for (level, shown, complaint) in [
        ("WARNING", true, false),
        ("ALL", true, false),
        ("warn", true, false),
        ("ERROR", false, false),
        ("Off", false, false),
        ("loud", true, true),
    ] {
        let mut cmd = command(&dir, &path, &["--check"]);
        cmd.env("LOG_LEVEL", level);
        let mut daemon = Daemon::spawn(cmd);
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{level}: {}", daemon.dump());
        let log = daemon.stderr();
        assert_eq!(log.contains(warned), shown, "{level}: {log}");
        assert_eq!(
            log.contains("LOG_LEVEL=\"loud\" is not a level"),
            complaint,
            "{level}: {log}"
        );
    }
}

/// A new rule whose address another process holds rejects the whole reload before any
/// rule changes: the removed rule keeps serving, the other new rule is not bound.
#[tokio::test]
async fn a_reload_with_an_unbindable_new_rule_is_rejected_and_changes_nothing() {
    let old = echo_upstream("old").await;
    let new = echo_upstream("new").await;
    let dir = TempDir::new("reload-unbindable");
    let held = StdListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let (pa, pb) = (free_port(), free_port());
    let path = dir.write("config.json", &config(&[rule(pa, &old.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;

    let line = rejected_reload(
        &mut daemon,
        &dir,
        &config(&[rule(pb, &new.url()), rule(taken, &new.url())]),
    )
    .await;
    assert!(line.contains("cannot listen for a rule"), "{line}");
    assert!(line.contains(&format!("127.0.0.1:{taken}")), "{line}");
    let (parts, body) = get(pa, "/v1/models").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"old"[..]));
    assert_unbound(pb).await;
    // Once the address is free, the same file applies.
    drop(held);
    let line = reload(
        &mut daemon,
        &dir,
        "config.json",
        &config(&[rule(pb, &new.url()), rule(taken, &new.url())]),
    )
    .await;
    assert!(has_field(&line, "removed", "1"), "{line}");
    let (parts, body) = get(taken, "/v1/models").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"new"[..]));
    assert!(connect_refused(pa).await, "{pa} still accepts");
    daemon.stop().await;
}

/// A rule that takes over a removed rule's port and still cannot bind it is not served,
/// and `/healthz` says so until a reload serves every rule.
#[tokio::test]
async fn a_rule_that_cannot_take_a_freed_port_turns_healthz_to_503() {
    let upstream = echo_upstream("served").await;
    let dir = TempDir::new("reload-unserved");
    let (pa, admin) = (free_port(), free_port());
    // Another process holds the same port on another loopback address.
    let Ok(held) = StdListener::bind(("127.0.0.2", pa)) else {
        eprintln!("skipped: 127.0.0.2 cannot be bound here");
        return;
    };
    let with_admin = |rules: &[String]| {
        format!(
            "{{\"adminListen\": \"127.0.0.1:{admin}\", \"rules\": [{}]}}",
            rules.join(", ")
        )
    };
    let moved = format!(
        r#"{{"listenPort": {pa}, "listenAddress": "127.0.0.2", "upstreamUrl": "{}"}}"#,
        upstream.url()
    );
    let path = dir.write("config.json", &with_admin(&[rule(pa, &upstream.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;
    let admin_get = |path: &'static str| async move {
        let (parts, body) = get(admin, path).await;
        (
            parts.status.as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    };
    let healthz = || admin_get("/healthz");
    // The rules are logged just before the server reports ready: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    while healthz().await.0 != 200 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(healthz().await, (200, "ok\n".to_owned()));

    let line = reload(&mut daemon, &dir, "config.json", &with_admin(&[moved])).await;
    assert!(has_field(&line, "unserved", "1"), "{line}");
    assert_eq!(healthz().await, (503, "a rule is not served\n".to_owned()));
    // Liveness is not readiness: the process is fine, a restart would cut other streams.
    assert_eq!(admin_get("/livez").await, (200, "alive\n".to_owned()));

    drop(held);
    let line = reload(
        &mut daemon,
        &dir,
        "config.json",
        &with_admin(&[rule(pa, &upstream.url())]),
    )
    .await;
    assert!(has_field(&line, "unserved", "0"), "{line}");
    assert_eq!(healthz().await, (200, "ok\n".to_owned()));
    let (parts, body) = get(pa, "/v1/models").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"served"[..]));
    daemon.stop().await;
}

/// `headerReadTimeoutSeconds` changed by a reload applies to connections accepted after it.
#[tokio::test]
async fn a_reload_changes_the_header_read_timeout_of_new_connections() {
    use tokio::io::AsyncReadExt;
    let upstream = echo_upstream("x").await;
    let dir = TempDir::new("reload-header-timeout");
    let pa = free_port();
    let path = dir.write("config.json", &config(&[rule(pa, &upstream.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;
    let line = reload(
        &mut daemon,
        &dir,
        "config.json",
        &format!(
            "{{\"headerReadTimeoutSeconds\": 1, \"rules\": [{}]}}",
            rule(pa, &upstream.url())
        ),
    )
    .await;
    assert!(has_field(&line, "updated", "0"), "{line}");
    // A silent client is closed after 1 s, not the 30 s of the first config.
    let mut silent = tokio::net::TcpStream::connect(local(pa)).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open after 5 s: {read:?}\n{}",
        daemon.dump()
    );
    daemon.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_is_rejected_with_one_error_line_and_the_old_config_serves() {
    let upstream = echo_upstream("old-config").await;
    let dir = TempDir::new("reload-invalid");
    let (pa, pb) = (free_port(), free_port());
    let good = config(&[rule(pa, &upstream.url())]);
    let path = dir.write("config.json", &good);
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;

    // Two problems, still one line.
    let missing_env = format!(
        r#"{{"timeoutSeconds": 0, "rules": [{}, {{"listenPort": {pb}, "listenAddress": "127.0.0.1", "upstreamUrl": "{}",
            "headers": {{"authorization": "Bearer ${{OSP_TEST_UNSET}}"}}}}]}}"#,
        rule(pa, "http://127.0.0.1:1"),
        upstream.url()
    );
    let cases = [
        (
            "bad JSON",
            "{\"rules\": [\n".to_owned(),
            vec!["invalid JSON at line 2"],
        ),
        (
            "a missing ${ENV} variable",
            missing_env,
            vec![
                "rules[1].headers.authorization",
                "environment variable OSP_TEST_UNSET is not set",
                "timeoutSeconds must be a positive integer",
            ],
        ),
    ];
    for (what, text, fragments) in cases {
        dir.write("config.json", &text);
        let mark = daemon.mark();
        daemon.signal("HUP");
        let line = daemon
            .wait_for_since(mark, "the rejection", |l| {
                l.contains("config reload rejected") || l.contains("config reloaded")
            })
            .await;
        assert!(
            line.contains("config reload rejected"),
            "{what}: {line}\n{}",
            daemon.dump()
        );
        assert!(line.contains("ERROR"), "{what}: {line}");
        assert!(line.contains(path.to_str().unwrap()), "{what}: {line}");
        for fragment in fragments {
            assert!(line.contains(fragment), "{what}: {fragment:?}: {line}");
        }

        // The running config keeps serving: same upstream, nothing new bound.
        let (parts, body) = get(pa, "/v1/models").await;
        assert_eq!(parts.status, 200, "{what}");
        assert_eq!(&body[..], b"old-config", "{what}");
        assert!(connect_refused(pb).await, "{what}: {pb} was bound");
        daemon
            .wait_for_since(mark, "the request line", is_access_line)
            .await;
        let errors: Vec<&String> = daemon
            .since(mark)
            .iter()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert_eq!(errors.len(), 1, "{what}: one error line\n{}", daemon.dump());
        assert!(
            !daemon.since(mark).iter().any(|l| l.contains("proxy rule")),
            "{what}\n{}",
            daemon.dump()
        );
    }

    // Fixing the file makes the next SIGHUP apply it.
    reload(&mut daemon, &dir, "config.json", &good).await;
    assert!(daemon.is_running(), "{}", daemon.dump());
    daemon.stop().await;
}

#[tokio::test]
async fn a_changed_upstream_applies_to_the_next_request_on_an_open_connection() {
    let one = echo_upstream("from-one").await;
    let two = echo_upstream("from-two").await;
    let dir = TempDir::new("reload-update");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &one.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;

    let mut connection = one_connection(port).await;
    let (status, body) = send_on(&mut connection, port, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"from-one");

    // Same port, new upstream and a new injected header.
    let changed = format!(
        r#"{{"rules": [{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "{}",
            "headers": {{"x-org": "team-2"}}}}]}}"#,
        two.url()
    );
    let mark = daemon.mark();
    let line = reload(&mut daemon, &dir, "config.json", &changed).await;
    for (key, value) in [
        ("rules", "1"),
        ("added", "0"),
        ("removed", "0"),
        ("updated", "1"),
    ] {
        assert!(has_field(&line, key, value), "{key}={value}: {line}");
    }
    daemon
        .wait_for_since(mark, "the rule updated line", |l| {
            l.contains("rule updated") && has_field(l, "upstream", &two.url())
        })
        .await;

    // The connection opened before the reload: its next request goes to the new upstream.
    let (status, body) = send_on(&mut connection, port, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"from-two");
    assert_eq!(one.requests().len(), 1);
    let seen = two.single_request();
    assert_eq!(seen.headers["x-org"], "team-2");
    // And so does a new connection.
    let (_, body) = get(port, "/v1/models").await;
    assert_eq!(&body[..], b"from-two");
    assert_eq!(one.requests().len(), 1);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Injected headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn injected_headers_replace_the_clients_and_their_values_are_never_logged() {
    let upstream = echo_upstream("injected").await;
    let dir = TempDir::new("headers");
    // At the default level and at the most verbose one (hyper, h2 and our debug lines).
    for (run, level) in ["info", "trace"].into_iter().enumerate() {
        let port = free_port();
        let text = format!(
            r#"{{"rules": [{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "{}",
                "headers": {{"authorization": "Bearer ${{OSP_TEST_KEY}}", "x-org": "team-1"}}}}]}}"#,
            upstream.url()
        );
        let path = dir.write("config.json", &text);
        let mut cmd = command(&dir, &path, &[]);
        cmd.env("RUST_LOG", level);
        let mut daemon = start_command(cmd, 1).await;

        let request = Request::post(format!("http://127.0.0.1:{port}/v1/embeddings"))
            .header("authorization", "Bearer client-own-key-XYZ")
            .header("x-org", "client-org")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"m","input":"x"}"#,
            )))
            .unwrap();
        let (parts, body) = send(request).await;
        assert_eq!(parts.status, 200, "{level}");
        assert_eq!(&body[..], b"injected", "{level}");

        let requests = upstream.requests();
        assert_eq!(requests.len(), run + 1, "{level}");
        let seen = &requests[run];
        let authorization: Vec<_> = seen.headers.get_all("authorization").iter().collect();
        assert_eq!(
            authorization,
            [format!("Bearer {SECRET}").as_str()],
            "{level}: the client's own key is replaced"
        );
        let org: Vec<_> = seen.headers.get_all("x-org").iter().collect();
        assert_eq!(org, ["team-1"], "{level}");

        daemon.wait_for("the request line", is_access_line).await;
        daemon.stop().await;
        let stderr = daemon.stderr();
        for value in [SECRET, "team-1", "client-own-key-XYZ", "Bearer"] {
            assert!(!stderr.contains(value), "{level}: {value} logged\n{stderr}");
        }
        assert!(
            !stderr.contains("non-loopback"),
            "{level}: a loopback rule is not warned about\n{stderr}"
        );
    }
}

#[tokio::test]
async fn a_missing_environment_variable_refuses_to_start() {
    let dir = TempDir::new("headers-missing");
    let port = free_port();
    let text = format!(
        r#"{{"rules": [{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://127.0.0.1:1",
            "headers": {{"authorization": "Bearer ${{OSP_TEST_UNSET}}"}}}}]}}"#
    );
    let path = dir.write("config.json", &text);
    let mut daemon = Daemon::spawn(command(&dir, &path, &[]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let lines: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{}", daemon.dump());
    for fragment in [
        path.to_str().unwrap(),
        "rules[0].headers.authorization",
        "OSP_TEST_UNSET",
    ] {
        assert!(lines[0].contains(fragment), "{fragment:?}: {}", lines[0]);
    }
    assert_unbound(port).await;
}

#[tokio::test]
async fn credentials_on_a_non_loopback_address_are_warned_about() {
    let upstream = echo_upstream("wide-open").await;
    let dir = TempDir::new("headers-wide");
    let port = free_port();
    // Bound on every interface; the test's own traffic still goes to 127.0.0.1.
    let text = format!(
        r#"{{"rules": [{{"listenPort": {port}, "listenAddress": "0.0.0.0", "upstreamUrl": "{}",
            "headers": {{"authorization": "Bearer ${{OSP_TEST_KEY}}"}}}}]}}"#,
        upstream.url()
    );
    let path = dir.write("config.json", &text);
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;
    let warning = daemon
        .wait_for("the credentials warning", |l| {
            l.contains("non-loopback") && has_field(l, "listen", &format!("0.0.0.0:{port}"))
        })
        .await;
    assert!(warning.contains("WARN"), "{warning}");
    assert!(!warning.contains(SECRET), "{warning}");

    let (parts, body) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"wide-open");
    assert_eq!(
        upstream.single_request().headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    daemon.stop().await;
    assert!(!daemon.stderr().contains(SECRET), "{}", daemon.dump());
}

// ---------------------------------------------------------------------------------------
// --log-format json and request ids
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn json_log_format_writes_one_json_object_per_line() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[
                ("content-type", "text/plain"),
                ("x-request-id", "up-json-1"),
            ],
            full("json-logs"),
        )
    })
    .await;
    let dir = TempDir::new("json-logs");
    let port = free_port();
    // The unknown key adds a warning line to the start-up lines.
    let text = format!(
        r#"{{"someFutureKey": true, "rules": [{}]}}"#,
        rule(port, &upstream.url())
    );
    let path = dir.write("config.json", &text);
    let mut daemon = start_command(command(&dir, &path, &["--log-format", "json"]), 1).await;

    let request = Request::get(format!("http://127.0.0.1:{port}/v1/models?x=1"))
        .header("x-request-id", "client-json-7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, body) = send(request).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"json-logs");
    let line = daemon
        .wait_for("the request line", |l| {
            l.contains("openai_stream_proxy::access")
        })
        .await;
    let access = json(&line);
    assert_eq!(access["target"], "openai_stream_proxy::access", "{line}");
    assert_eq!(access["level"], "INFO", "{line}");
    assert_eq!(access["message"], "request", "{line}");
    assert_eq!(access["port"], port, "{line}");
    assert_eq!(access["method"], "GET", "{line}");
    assert_eq!(access["path"], "/v1/models", "{line}");
    assert_eq!(access["mode"], "passthrough", "{line}");
    assert_eq!(access["status"], 200, "{line}");
    assert_eq!(access["request_id"], "client-json-7", "{line}");
    assert_eq!(access["upstream_request_id"], "up-json-1", "{line}");

    daemon.stop().await;
    let lines: Vec<&String> = daemon.seen.iter().collect();
    assert!(lines.len() >= 5, "{}", daemon.dump());
    for line in lines {
        let value = json(line);
        assert!(value.is_object(), "{line}");
        assert!(value["level"].is_string(), "{line}");
        assert!(value["message"].is_string(), "{line}");
    }
    let messages: Vec<String> = daemon
        .seen
        .iter()
        .map(|l| json(l)["message"].as_str().unwrap().to_owned())
        .collect();
    for expected in ["unknown config key ignored", "proxy rule", "request"] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected:?} missing\n{}",
            daemon.dump()
        );
    }
    assert!(
        messages.iter().any(|m| m.starts_with("shutting down")),
        "{}",
        daemon.dump()
    );
}

#[tokio::test]
async fn json_log_format_reports_start_up_errors_as_json() {
    let dir = TempDir::new("json-errors");
    let text = format!(
        r#"{{"timeoutSeconds": 0, "rules": [{}]}}"#,
        rule(free_port(), "ftp://example.com")
    );
    let path = dir.write("config.json", &text);
    let mut daemon = Daemon::spawn(command(&dir, &path, &["--log-format", "json"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    assert_eq!(
        daemon.seen.len(),
        2,
        "one line per problem\n{}",
        daemon.dump()
    );
    for line in &daemon.seen {
        let value = json(line);
        assert_eq!(value["level"], "ERROR", "{line}");
        let message = value["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(&format!("{}: ", path.display())),
            "names the file: {line}"
        );
    }
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("timeoutSeconds must be a positive integer"),
        "{stderr}"
    );
    assert!(stderr.contains("rules[0].upstreamUrl"), "{stderr}");

    // A port in use, found only when binding.
    let (_held, busy) = held_port();
    let path = dir.write("busy.json", &config(&[rule(busy, "http://127.0.0.1:1")]));
    let mut daemon = Daemon::spawn(command(&dir, &path, &["--log-format", "json"]));
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    let errors: Vec<Value> = daemon.seen.iter().map(|l| json(l)).collect();
    assert!(
        errors.iter().any(|e| e["level"] == "ERROR"
            && e["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("port {busy}"))),
        "{}",
        daemon.dump()
    );
}

#[tokio::test]
async fn request_ids_are_generated_kept_and_logged_with_the_upstreams() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[
                ("content-type", "text/plain"),
                ("x-request-id", "up-req-42"),
            ],
            full("ids"),
        )
    })
    .await;
    let dir = TempDir::new("request-ids");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
    let mut daemon = start_command(command(&dir, &path, &[]), 1).await;

    // Without an id: one is generated, sent upstream and logged.
    let (parts, _) = get(port, "/v1/first").await;
    assert_eq!(parts.status, 200);
    let generated = upstream.requests()[0].headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(generated.starts_with("osp-"), "{generated}");
    let line = daemon
        .wait_for("the first request line", |l| {
            is_access_line(l) && has_field(l, "path", "/v1/first")
        })
        .await;
    assert!(has_field(&line, "request_id", &generated), "{line}");
    assert!(
        has_field(&line, "upstream_request_id", "up-req-42"),
        "{line}"
    );

    // A client's id is kept as it is.
    let request = Request::get(format!("http://127.0.0.1:{port}/v1/second"))
        .header("x-request-id", "client-id-abc-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, _) = send(request).await;
    assert_eq!(parts.status, 200);
    let ids: Vec<_> = upstream.requests()[1]
        .headers
        .get_all("x-request-id")
        .iter()
        .cloned()
        .collect();
    assert_eq!(ids, ["client-id-abc-123"]);
    let line = daemon
        .wait_for("the second request line", |l| {
            is_access_line(l) && has_field(l, "path", "/v1/second")
        })
        .await;
    assert!(
        has_field(&line, "request_id", "client-id-abc-123"),
        "{line}"
    );
    assert!(
        has_field(&line, "upstream_request_id", "up-req-42"),
        "{line}"
    );

    // Generated ids differ from request to request.
    get(port, "/v1/third").await;
    let third = upstream.requests()[2].headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(third.starts_with("osp-"), "{third}");
    assert_ne!(third, generated);
    daemon.stop().await;
}
