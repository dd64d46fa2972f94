//! Every captured upstream stream, through the real SSE parser and accumulator, gives its
//! expected body; and re-splitting the bytes at any boundaries never changes the result.
//! The recordings are third-party data read from `../shared/fixtures` at run time.

mod support;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use openai_stream_proxy::convert::outcome::{Aggregate, AggregateError, Flow};
use openai_stream_proxy::convert::request::Api;
use openai_stream_proxy::convert::stream::Accumulator;
use openai_stream_proxy::sse::{SseEvent, SseParser};
use proptest::prelude::*;
use serde_json::Value;

fn accumulator_for(path: &Path) -> Accumulator {
    let name = path.file_name().unwrap().to_string_lossy();
    Accumulator::new(if name.starts_with("chat") {
        Api::ChatCompletions
    } else {
        Api::Responses
    })
}

/// Feeds `bytes` cut at `cuts` (sorted offsets) through parser and accumulator.
fn aggregate(path: &Path, bytes: &[u8], cuts: &[usize]) -> Result<Aggregate, AggregateError> {
    let mut parser = SseParser::new(usize::MAX);
    let mut acc = accumulator_for(path);
    let mut start = 0;
    let mut finished = false;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let end = end.clamp(start, bytes.len());
        let mut sink = |event: SseEvent<'_>| {
            acc.push(event.name, event.data).map(|flow| match flow {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Finished => ControlFlow::Break(()),
            })
        };
        match parser.push(&bytes[start..end], &mut sink) {
            Ok(ControlFlow::Break(())) => {
                finished = true;
                break;
            }
            Ok(ControlFlow::Continue(())) => {}
            Err(openai_stream_proxy::sse::SseError::Sink(e)) => return Err(e),
            Err(e) => panic!("{e}"),
        }
        start = end;
    }
    if !finished {
        let mut sink = |event: SseEvent<'_>| {
            acc.push(event.name, event.data).map(|flow| match flow {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Finished => ControlFlow::Break(()),
            })
        };
        if let Err(openai_stream_proxy::sse::SseError::Sink(e)) = parser.finish(&mut sink) {
            return Err(e);
        }
    }
    acc.finish()
}

/// `(stream, expected body)` for every fixture with an expected JSON file.
fn cases() -> Vec<(PathBuf, Value)> {
    let Some(dir) = support::fixtures_dir() else {
        return Vec::new();
    };
    let mut cases = Vec::new();
    for sub in ["captured", "captured/sdk-divergent"] {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.extension().is_some_and(|e| e == "sse") {
                let expected = path.with_extension("json");
                let expected: Value =
                    serde_json::from_slice(&std::fs::read(&expected).unwrap()).unwrap();
                cases.push((path, expected));
            }
        }
    }
    cases
}

#[test]
fn every_captured_stream_gives_its_expected_body() {
    let cases = cases();
    for (path, expected) in &cases {
        let bytes = std::fs::read(path).unwrap();
        let aggregate =
            aggregate(path, &bytes, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got: Value = serde_json::from_slice(&aggregate.body).unwrap();
        assert_eq!(&got, expected, "{}", path.display());
        let raw = String::from_utf8_lossy(&aggregate.body);
        assert!(!raw.contains("\"obfuscation\""), "{}", path.display());
    }
    if support::fixtures_dir().is_some() {
        assert!(
            cases.len() >= 17,
            "expected every captured fixture, found {}",
            cases.len()
        );
    }
}

#[test]
fn reference_streams_give_the_documented_outcomes() {
    let Some(dir) = support::fixtures_dir() else {
        return;
    };
    let dir = dir.join("reference");
    let chat = dir.join("chat_completions_sse.txt");
    let got = aggregate(Path::new("chat"), &std::fs::read(&chat).unwrap(), &[]).unwrap();
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello! How can I help you today?"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(
        body["usage"]["input_tokens"].is_number(),
        "aggregator extras kept: {}",
        body["usage"]
    );

    let failed = std::fs::read(dir.join("responses_failed_sse.txt")).unwrap();
    match aggregate(Path::new("responses"), &failed, &[]) {
        Err(AggregateError::Upstream(e)) => {
            assert_eq!(e.status, 500);
            assert_eq!(e.message, "upstream failed");
        }
        other => panic!("failed response gave {other:?}"),
    }

    let incomplete = std::fs::read(dir.join("responses_incomplete_sse.txt")).unwrap();
    let got = aggregate(Path::new("responses"), &incomplete, &[]).unwrap();
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["status"], "incomplete");
    assert_eq!(
        body["output"][0]["content"][0]["text"],
        "incomplete partial output"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Network chunk boundaries are arbitrary; the answer must not depend on them.
    #[test]
    fn re_splitting_never_changes_the_result(seed_cuts in proptest::collection::vec(any::<u32>(), 0..64), tiny in any::<bool>()) {
        for (path, expected) in cases() {
            let bytes = std::fs::read(&path).unwrap();
            let mut cuts: Vec<usize> = if tiny {
                // Pieces of 1–7 bytes, the size the SDK check used.
                let mut cuts = Vec::new();
                let mut at = 0usize;
                let mut i = 0usize;
                while at < bytes.len() {
                    at += 1 + (seed_cuts.get(i % seed_cuts.len().max(1)).copied().unwrap_or(3) as usize + i) % 7;
                    cuts.push(at.min(bytes.len()));
                    i += 1;
                }
                cuts
            } else {
                seed_cuts.iter().map(|c| *c as usize % (bytes.len() + 1)).collect()
            };
            cuts.sort_unstable();
            let got = aggregate(&path, &bytes, &cuts).unwrap();
            let got: Value = serde_json::from_slice(&got.body).unwrap();
            prop_assert_eq!(&got, &expected, "{}", path.display());
        }
    }
}
