//! Request classification (`conversion_candidate`) and the body rewrite (`decide`).
//!
//! Input: the whole input is a request body, given to `decide` for both APIs. When it also
//! contains a blank line (`\n\n`), what precedes it is read as a request head —
//! `METHOD PATH` on the first line, one `Content-Type` value per further line — and what follows
//! as its body, which is decided for the API the head classifies as.
//!
//! Properties: no panic; the classification matches a plain reading of its rules; whenever the
//! body parses as a JSON value, `decide` converts exactly when the rules say so, and the
//! converted body parses to the input with only `stream` (and Chat's
//! `stream_options.include_usage`) changed; any converted body keeps the input's leading and
//! trailing whitespace and is itself classified "stream is not false".
#![no_main]

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use openai_stream_proxy::convert::request::{conversion_candidate, decide, Api, BodyDecision};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    check_body(Api::ChatCompletions, data);
    check_body(Api::Responses, data);

    let Some(blank) = data.windows(2).position(|w| w == b"\n\n") else {
        return;
    };
    let (head, body) = (&data[..blank], &data[blank + 2..]);
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let (method, path) = match request_line.iter().position(|&b| b == b' ') {
        Some(sp) => (&request_line[..sp], &request_line[sp + 1..]),
        None => (request_line, &b""[..]),
    };
    let (Ok(method), Ok(path)) = (Method::from_bytes(method), std::str::from_utf8(path)) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(CONTENT_TYPE, value);
        }
    }
    let got = conversion_candidate(&method, path, &headers);
    assert_eq!(
        got,
        expected_candidate(&method, path, &headers),
        "{method} {path:?} {headers:?}"
    );
    if let Some(api) = got {
        check_body(api, body);
    }
});

/// B22 steps 1–3, B17, B29, written out plainly.
fn expected_candidate(method: &Method, path_and_query: &str, headers: &HeaderMap) -> Option<Api> {
    if method.as_str() != "POST" {
        return None;
    }
    let path = match path_and_query.find('?') {
        Some(q) => &path_and_query[..q],
        None => path_and_query,
    };
    let path = path.trim_end_matches('/');
    let api = if path.ends_with("/responses") {
        Api::Responses
    } else if path.ends_with("/chat/completions") {
        Api::ChatCompletions
    } else {
        return None;
    };
    let values: Vec<&HeaderValue> = headers.get_all(CONTENT_TYPE).iter().collect();
    let [value] = values[..] else {
        return None;
    };
    let media = value
        .as_bytes()
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    let media = String::from_utf8_lossy(media);
    let media = media.trim_matches(|c| c == ' ' || c == '\t');
    media
        .eq_ignore_ascii_case("application/json")
        .then_some(api)
}

/// D1/D2: convert only an object with `model`, `stream` absent/false/null, and (Responses) no
/// `"background": true`. With duplicate keys the last one counts, as in `serde_json::Value`.
fn expected_convert(api: Api, input: &Value) -> bool {
    let Some(map) = input.as_object() else {
        return false;
    };
    let stream_ok = matches!(
        map.get("stream"),
        None | Some(Value::Null) | Some(Value::Bool(false))
    );
    let background = map.get("background") == Some(&Value::Bool(true));
    map.contains_key("model") && stream_ok && !(api == Api::Responses && background)
}

fn expected_output(api: Api, input: &Value) -> Value {
    let mut expected = input.clone();
    if let Some(map) = expected.as_object_mut() {
        map.insert("stream".to_string(), Value::Bool(true));
        if api == Api::ChatCompletions {
            match map.get_mut("stream_options") {
                Some(Value::Object(options)) => {
                    options.insert("include_usage".to_string(), Value::Bool(true));
                }
                _ => {
                    map.insert("stream_options".to_string(), json!({"include_usage": true}));
                }
            }
        }
    }
    expected
}

fn check_body(api: Api, body: &[u8]) {
    let decision = decide(api, body);
    // serde_json's `Value` refuses some documents `decide` accepts (nesting deeper than 128,
    // lone surrogate escapes in nested strings); for those only the checks below apply.
    let input: Option<Value> = serde_json::from_slice(body).ok();
    let out = match decision {
        BodyDecision::Passthrough { reason } => {
            if let Some(input) = &input {
                assert!(
                    !expected_convert(api, input),
                    "{api:?} passed through ({reason}) a body it should convert: {:?}",
                    String::from_utf8_lossy(body)
                );
            }
            return;
        }
        BodyDecision::Convert { body: out } => out,
    };
    let text = std::str::from_utf8(body).expect("converted a body that is not UTF-8");
    let out = String::from_utf8(out).expect("the rewrite broke UTF-8");
    if let Some(input) = &input {
        assert!(
            expected_convert(api, input),
            "{api:?} converted a body it should pass through: {text:?}"
        );
        let parsed: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("rewritten body does not parse ({e}): {out:?}"));
        assert_eq!(
            parsed,
            expected_output(api, input),
            "{api:?} rewrite changed more than the stream members: {text:?} -> {out:?}"
        );
    }
    let lead = text.len() - text.trim_start().len();
    let trail = text.len() - text.trim_end().len();
    assert_eq!(&out[..lead], &text[..lead], "leading whitespace changed");
    assert_eq!(
        &out[out.len() - trail..],
        &text[text.len() - trail..],
        "trailing whitespace changed"
    );
    assert_eq!(
        decide(api, out.as_bytes()),
        BodyDecision::Passthrough {
            reason: "stream is not false"
        },
        "the rewritten body {out:?} is not a streaming request"
    );
}
