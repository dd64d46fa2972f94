//! Repeatable instruction counts for aggregation: runs the real `SseParser` + `Accumulator`
//! (or a serde_json pass over the same events, for the floor) over the benchmark mock's
//! 20-event stream, `N` times. Wall-clock figures live in `benches/aggregate.rs`; this is for
//! callgrind, whose counts do not move with the machine's load. The cost of one aggregation is
//! the difference between two runs divided by the difference in `N` (start-up cancels out):
//!
//! ```sh
//! cargo build --profile profiling --example aggregate_cost
//! for n in 100 1100; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/profiling/examples/aggregate_cost chat $n 2>&1 | grep Collected
//! done
//! ```
//!
//! Modes: `chat`, `responses` (aggregate the stream), `chat-floor`, `responses-floor` (parse
//! each event's data into `serde::de::IgnoredAny`, the least any aggregator has to do).

#[path = "../bench/aggregation.rs"]
mod aggregation;
#[path = "../bench/sse_gen.rs"]
mod sse_gen;

use std::hint::black_box;
use std::process::ExitCode;

use aggregation::{aggregate, payloads};
use openai_stream_proxy::convert::request::Api;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let runs = args.next().and_then(|n| n.parse::<usize>().ok());
    let (api, floor) = match mode.as_str() {
        "chat" => (Api::ChatCompletions, false),
        "chat-floor" => (Api::ChatCompletions, true),
        "responses" => (Api::Responses, false),
        "responses-floor" => (Api::Responses, true),
        _ => {
            eprintln!("usage: aggregate_cost chat|responses|chat-floor|responses-floor RUNS");
            return ExitCode::from(2);
        }
    };
    let Some(runs) = runs else {
        eprintln!("RUNS must be a number");
        return ExitCode::from(2);
    };
    let generated = match api {
        Api::ChatCompletions => sse_gen::Api::Chat,
        Api::Responses => sse_gen::Api::Responses,
    };
    let stream = sse_gen::full_stream(generated, 20, 0);
    let payloads = payloads(&stream);

    let mut checksum = 0usize;
    for _ in 0..runs {
        checksum += if floor {
            parse_each(black_box(&payloads))
        } else {
            match aggregate(api, black_box(&stream)) {
                Ok(len) => len,
                Err(e) => {
                    eprintln!("aggregation failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
    }
    println!(
        "{mode}: {runs} runs over {} bytes, {} events (checksum {checksum})",
        stream.len(),
        payloads.len()
    );
    ExitCode::SUCCESS
}

/// The floor: each event's data parsed once and thrown away; returns how many parsed.
fn parse_each(payloads: &[Vec<u8>]) -> usize {
    payloads
        .iter()
        .filter(|data| serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok())
        .count()
}
