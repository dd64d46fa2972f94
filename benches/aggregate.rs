//! Aggregation cost in isolation (issue 5, item 3): MB/s of SSE turned into one body by the
//! real `SseParser` + `Accumulator`, next to `serde_json` parsing the same event payloads
//! once, the floor of work any aggregator has to do.
//!
//! Inputs: the captured streams in `../shared/fixtures/captured/*.sse` (third-party data,
//! read at run time, never copied into the repository; skipped with a message when absent)
//! and synthetic streams generated here (`bench/sse_gen.rs`, the mock upstream's generator).
//!
//! Every benchmark of a group reports throughput in bytes of *SSE input*, so the ratio of
//! two throughputs in one group is the ratio of their costs for the same stream.
//! `BENCH_QUICK=1` shortens the measurement for smoke runs. Sizes of the inputs are
//! written to `target/bench/aggregate_inputs.json` for the report.

#[path = "../bench/aggregation.rs"]
mod aggregation;
#[path = "../bench/sse_gen.rs"]
mod sse_gen;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aggregation::{aggregate, payloads};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openai_stream_proxy::convert::request::Api;

struct Stream {
    bytes: Vec<u8>,
    /// The `data` of every event but `[DONE]`.
    payloads: Vec<Vec<u8>>,
}

struct Input {
    name: String,
    api: Api,
    streams: Vec<Stream>,
}

impl Input {
    fn sse_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes.len() as u64).sum()
    }
    fn events(&self) -> usize {
        self.streams.iter().map(|s| s.payloads.len()).sum()
    }
}

fn stream(bytes: Vec<u8>) -> Stream {
    let payloads = payloads(&bytes);
    Stream { bytes, payloads }
}

fn fixtures_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/captured");
    dir.is_dir().then_some(dir)
}

fn inputs() -> Vec<Input> {
    let mut inputs = Vec::new();
    match fixtures_dir() {
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            for (prefix, api) in [
                ("chat", Api::ChatCompletions),
                ("responses", Api::Responses),
            ] {
                let streams: Vec<Stream> = files
                    .iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "sse"))
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                    })
                    .filter_map(|p| std::fs::read(p).ok())
                    .map(stream)
                    .collect();
                if !streams.is_empty() {
                    inputs.push(Input {
                        name: format!("{prefix}_fixtures"),
                        api,
                        streams,
                    });
                }
            }
        }
        None => eprintln!(
            "skipped: ../shared/fixtures/captured not found (third-party fixtures are not part of \
             this repository); only the synthetic streams are measured"
        ),
    }
    for (name, api, gen_api, events, delta) in [
        (
            "chat_synthetic_2000x1w",
            Api::ChatCompletions,
            sse_gen::Api::Chat,
            2000,
            0,
        ),
        (
            "responses_synthetic_2000x1w",
            Api::Responses,
            sse_gen::Api::Responses,
            2000,
            0,
        ),
        (
            "chat_synthetic_400x256B",
            Api::ChatCompletions,
            sse_gen::Api::Chat,
            400,
            256,
        ),
        (
            "responses_synthetic_400x256B",
            Api::Responses,
            sse_gen::Api::Responses,
            400,
            256,
        ),
    ] {
        inputs.push(Input {
            name: name.into(),
            api,
            streams: vec![stream(sse_gen::full_stream(gen_api, events, delta))],
        });
    }
    inputs
}

fn record_inputs(inputs: &[Input]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let entries: Vec<String> = inputs
        .iter()
        .map(|i| {
            let body: usize = i
                .streams
                .iter()
                .map(|s| aggregate(i.api, &s.bytes).unwrap_or(0))
                .sum();
            format!(
                "\"{}\":{{\"streams\":{},\"sse_bytes\":{},\"events\":{},\"body_bytes\":{}}}",
                i.name,
                i.streams.len(),
                i.sse_bytes(),
                i.events(),
                body
            )
        })
        .collect();
    let _ = std::fs::write(
        dir.join("aggregate_inputs.json"),
        format!("{{{}}}\n", entries.join(",")),
    );
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();
    record_inputs(&inputs);
    for input in &inputs {
        // Sanity: every stream aggregates to a body.
        for s in &input.streams {
            assert!(
                aggregate(input.api, &s.bytes).is_ok_and(|len| len > 0),
                "{} does not aggregate",
                input.name
            );
        }
        let mut group = c.benchmark_group(&input.name);
        group.throughput(Throughput::Bytes(input.sse_bytes()));
        group.bench_function("aggregate", |b| {
            b.iter(|| {
                for s in &input.streams {
                    let _ = black_box(aggregate(input.api, black_box(&s.bytes)));
                }
            })
        });
        group.bench_function("serde_value", |b| {
            b.iter(|| {
                for s in &input.streams {
                    for p in &s.payloads {
                        let v: serde_json::Value = serde_json::from_slice(black_box(p)).unwrap();
                        black_box(v);
                    }
                }
            })
        });
        group.bench_function("serde_ignored", |b| {
            b.iter(|| {
                for s in &input.streams {
                    for p in &s.payloads {
                        let v: serde::de::IgnoredAny =
                            serde_json::from_slice(black_box(p)).unwrap();
                        black_box(v);
                    }
                }
            })
        });
        group.finish();
    }
}

fn config() -> Criterion {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    Criterion::default()
        .sample_size(if quick { 10 } else { 20 })
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 500 } else { 1500 }))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
