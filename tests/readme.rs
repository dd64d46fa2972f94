//! The README's curl examples, run as written (only the proxy's address is replaced by the
//! test proxy's ephemeral one) against a mock upstream.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi there\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);
const RESPONSES_STREAM: &str = concat!(
    "event: response.completed\n",
    "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}]}}\n\n",
);

/// The shell blocks of the README that run curl.
fn curl_examples() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                if block.contains("curl ") {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test]
async fn readme_curl_examples_work_as_written() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let upstream = MockUpstream::start(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        match (r.uri.path(), body.get("stream")) {
            ("/v1/chat/completions", _) => response(
                200,
                &[("content-type", "text/event-stream")],
                full(CHAT_STREAM),
            ),
            ("/v1/responses", _) => response(
                200,
                &[("content-type", "text/event-stream")],
                full(RESPONSES_STREAM),
            ),
            _ => response(
                200,
                &[("content-type", "application/json")],
                full("{\"object\":\"list\",\"data\":[]}"),
            ),
        }
    })
    .await;
    let proxy = start_proxy(&upstream.url(), options()).await;
    let examples = curl_examples();
    assert_eq!(
        examples.len(),
        4,
        "expected the README's four curl examples"
    );

    for example in &examples {
        assert!(example.contains("http://127.0.0.1:8080"), "{example}");
        let script = example.replace("http://127.0.0.1:8080", &format!("http://{}", proxy.addr));
        let output = tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .env("OPENAI_API_KEY", "sk-test")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "{example}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if example.contains("\"stream\": true") {
            assert_eq!(
                stdout, CHAT_STREAM,
                "streaming output must be the upstream's bytes"
            );
        } else if example.contains("/v1/models") {
            assert!(stdout.contains("\"object\":\"list\""), "{stdout}");
        } else {
            let body: Value =
                serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
            let text = body["choices"][0]["message"]["content"]
                .as_str()
                .or_else(|| body["output"][0]["content"][0]["text"].as_str());
            assert_eq!(text, Some("Hi there"), "{stdout}");
        }
    }
    for request in upstream.requests() {
        assert_eq!(request.headers["authorization"], "Bearer sk-test");
    }
}
