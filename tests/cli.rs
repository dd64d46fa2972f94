//! The real binary: command line, config validation at start-up, start-up and request
//! logs, log levels, and graceful shutdown on SIGINT/SIGTERM.
//!
//! Every test runs `openai-stream-proxy` as a child process with a config written to a
//! fresh temp dir; the harness (readiness from log lines, bounded waits, ports, killing the
//! child on drop) is `support::daemon`.

mod support;

use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::daemon::*;
use support::*;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn help_exits_zero_and_documents_the_config_flag_and_the_environment() {
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
        for variable in [
            "RUST_LOG",
            "TOKIO_WORKER_THREADS",
            "HTTPS_PROXY",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "SIGHUP",
        ] {
            assert!(out.contains(variable), "{flag} lists {variable}: {out}");
        }
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

/// A three-chunk chat stream, as the mock upstream answers every request.
const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// Each worker count the runtime can be given serves a conversion and a streaming
/// passthrough, and stops on SIGTERM; the start-up line says which scheduler runs.
#[tokio::test]
async fn tokio_worker_threads_chooses_the_scheduler_and_both_serve() {
    let upstream = MockUpstream::start(|_| {
        response(
            200,
            &[("content-type", "text/event-stream")],
            full(CHAT_STREAM),
        )
    })
    .await;
    for (threads, scheduler) in [("1", "\"current-thread\""), ("2", "\"multi-thread\"")] {
        let dir = TempDir::new("workers");
        let port = free_port();
        let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
        let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
        cmd.env("TOKIO_WORKER_THREADS", threads);
        let mut daemon = start_command(cmd, 1).await;
        let line = daemon
            .wait_for("the runtime line", |l| l.contains("async runtime"))
            .await;
        assert!(has_field(&line, "threads", threads), "{line}");
        assert!(has_field(&line, "scheduler", scheduler), "{line}");
        assert!(
            has_field(&line, "source", "\"TOKIO_WORKER_THREADS\""),
            "{line}"
        );

        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let (parts, body) = send(post_json(&url, r#"{"model":"m","messages":[]}"#)).await;
        assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["object"], "chat.completion", "{answer}");
        assert_eq!(answer["choices"][0]["message"]["content"], "Hi", "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");

        let (parts, body) = send(post_json(
            &url,
            r#"{"model":"m","messages":[],"stream":true}"#,
        ))
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], CHAT_STREAM.as_bytes());
        daemon.stop().await;
    }
}

/// A worker count that is not a positive whole number is refused by name before any port
/// is bound, instead of tokio's panic, and by `--check` as well.
#[tokio::test]
async fn a_bad_tokio_worker_threads_is_refused() {
    for bad in ["0", "two"] {
        let dir = TempDir::new("bad-workers");
        let port = free_port();
        let path = dir.write("config.json", &config(&[rule(port, "http://127.0.0.1:9")]));
        let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap()]);
        cmd.env("TOKIO_WORKER_THREADS", bad);
        let mut daemon = Daemon::spawn(cmd);
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(1), "{}", daemon.dump());
        let expected = format!(
            "TOKIO_WORKER_THREADS must be a whole number of threads, 1 or more; got \"{bad}\""
        );
        assert!(
            daemon.seen.iter().any(|l| l.contains(&expected)),
            "{}",
            daemon.dump()
        );
        assert!(
            !daemon.seen.iter().any(|l| l.contains("proxy rule")),
            "nothing may be served: {}",
            daemon.dump()
        );
        // `--check` refuses it too: a check that passes means the daemon starts.
        let mut cmd = proxy_command(dir.path(), &["-c", path.to_str().unwrap(), "--check"]);
        cmd.env("TOKIO_WORKER_THREADS", bad);
        let mut check = Daemon::spawn(cmd);
        let status = check.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(1), "{}", check.dump());
        assert!(
            check.seen.iter().any(|l| l.contains(&expected)),
            "{}",
            check.dump()
        );
    }
}

/// A proxy variable naming a proxy the client cannot speak to (SOCKS, TLS to the proxy) is
/// refused at start-up, `--check` included, rather than sent cleartext HTTP at run time.
#[tokio::test]
async fn a_proxy_the_client_cannot_speak_to_is_refused() {
    let dir = TempDir::new("socks-proxy");
    let path = dir.write(
        "config.json",
        &config(&[rule(free_port(), "https://api.example.test")]),
    );
    for extra in [&[][..], &["--check"][..]] {
        let mut args = vec!["-c", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut cmd = proxy_command(dir.path(), &args);
        cmd.env("ALL_PROXY", "socks5h://127.0.0.1:1080");
        let mut daemon = Daemon::spawn(cmd);
        let status = daemon.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(1), "{extra:?}: {}", daemon.dump());
        assert!(
            daemon.seen.iter().any(|l| l.contains(
                "ALL_PROXY names a socks5h:// proxy; only http:// proxies are supported"
            )),
            "{extra:?}: {}",
            daemon.dump()
        );
        assert!(
            !daemon.seen.iter().any(|l| l.contains("proxy rule")),
            "nothing may be served: {}",
            daemon.dump()
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
    assert!(
        wait_refused(port).await,
        "new connections still accepted after SIGTERM\n{}",
        daemon.dump()
    );
    assert!(
        daemon.is_running(),
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

/// The first SIGTERM drains; a second signal during the drain (an impatient Ctrl-C) exits at
/// once, with a failure status, instead of being ignored until the drain limit (30 s). One
/// within a second of the first only repeats it.
#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let (feed_tx, mut feed_rx) = mpsc::unbounded_channel();
    let upstream = MockUpstream::start(move |_| {
        let (tx, body) = channel_body();
        let _ = feed_tx.send(tx);
        response(200, &[("content-type", "text/plain")], body)
    })
    .await;
    let dir = TempDir::new("second-signal");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
    let mut daemon = start(&dir, &path, 1).await;

    let url = format!("http://127.0.0.1:{port}/v1/held");
    let in_flight = tokio::spawn(async move {
        let response = client()
            .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("the held request failed");
        let mut body = response.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    });
    // Held open by the test until the end: the drain has a response to wait for.
    let _feed = tokio::time::timeout(WAIT, feed_rx.recv())
        .await
        .expect("the request never reached the upstream")
        .unwrap();

    daemon.signal("TERM");
    let first = Instant::now();
    daemon
        .wait_for("the shutdown line", |l| l.contains("shutting down"))
        .await;
    // A signal right behind the first (a Ctrl-C to the whole process group, forwarded by a
    // process manager as well) repeats it: the drain goes on.
    daemon.signal("INT");
    let mark = daemon.mark();
    // Past the second in which signals repeat the first; the drain still holds the request.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(first.elapsed())).await;
    assert!(daemon.is_running(), "{}", daemon.dump());
    assert!(
        !daemon
            .since(mark)
            .iter()
            .any(|l| l.contains("second shutdown signal")),
        "{}",
        daemon.dump()
    );
    daemon.signal("INT");
    let status = daemon.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.dump());
    assert!(
        daemon.stderr().contains("second shutdown signal"),
        "{}",
        daemon.dump()
    );
    let _ = tokio::time::timeout(WAIT, in_flight).await;
}

/// A reload stuck reading its file (here a FIFO nobody writes, as a hung network file system
/// would be) does not hold the exit: the drain ends and the process exits 0 soon after.
#[cfg(unix)]
#[tokio::test]
async fn a_reload_stuck_reading_the_config_does_not_hold_the_exit() {
    let upstream = echo_upstream("ok").await;
    let dir = TempDir::new("stuck-reload");
    let port = free_port();
    let path = dir.write("config.json", &config(&[rule(port, &upstream.url())]));
    let mut daemon = start(&dir, &path, 1).await;

    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    daemon.signal("HUP");
    // Wait until one of the proxy's threads is blocked opening the FIFO (x86-64 `openat`
    // is system call 257, aarch64's 56): the reload is then stuck for good.
    let tasks = format!("/proc/{}/task", daemon.pid());
    let blocked_in_open = || {
        std::fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("syscall")).is_ok_and(|call| {
                    let number = call.split(' ').next().unwrap_or("");
                    number
                        == if cfg!(target_arch = "aarch64") {
                            "56"
                        } else {
                            "257"
                        }
                })
            })
    };
    let deadline = Instant::now() + WAIT;
    while !blocked_in_open() {
        assert!(
            Instant::now() < deadline,
            "the reload never opened the FIFO"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (parts, _) = get(port, "/v1/models").await;
    assert_eq!(parts.status, 200);

    let stopping = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.dump());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        stopping.elapsed()
    );
}
