//! Re-chunking never changes an aggregate, on the project's own streams (issue "Reliability
//! and security", property tests). `tests/aggregate_fixtures.rs` checks the same property on
//! third-party recordings that may be absent; this file needs nothing outside the
//! repository: it uses the accumulator seed corpora in `fuzz/corpus/`, which are the stream
//! literals of `tests/convert.rs`, the event lists of the accumulators' unit tests and the
//! SDK tests' synthetic streams (successes, upstream errors, truncated and corrupt streams).
//!
//! Each stream is aggregated whole once; then proptest cuts it at random places (or into
//! pieces of 1–7 bytes) and the outcome must be identical: the same body bytes, terminal and
//! usage, or the same error.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use openai_stream_proxy::convert::outcome::{Aggregate, AggregateError, Flow};
use openai_stream_proxy::convert::request::Api;
use openai_stream_proxy::convert::stream::Accumulator;
use openai_stream_proxy::sse::{SseError, SseEvent, SseParser};
use proptest::prelude::*;

/// What an aggregation ended with, comparable across chunkings (the error type has no
/// `PartialEq`, so errors compare by their debug text, which includes every field).
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok(Aggregate),
    Err(String),
}

/// One stream of the corpus, with the outcome of aggregating it whole.
struct Stream {
    path: PathBuf,
    api: Api,
    bytes: Vec<u8>,
    whole: Outcome,
}

fn sink<'a>(
    acc: &'a mut Accumulator,
) -> impl FnMut(SseEvent<'_>) -> Result<ControlFlow<()>, AggregateError> + 'a {
    move |event| {
        acc.push(event.name, event.data).map(|flow| match flow {
            Flow::Continue => ControlFlow::Continue(()),
            Flow::Finished => ControlFlow::Break(()),
        })
    }
}

/// The proxy's loop over `bytes` delivered as `pieces`: SSE parser → accumulator, stopping
/// at the terminal event, `finish` at the end of the bytes.
fn aggregate(api: Api, pieces: &[&[u8]]) -> Outcome {
    let mut parser = SseParser::new(usize::MAX);
    let mut acc = Accumulator::new(api);
    let mut finished = false;
    for piece in pieces {
        match parser.push(piece, &mut sink(&mut acc)) {
            Ok(ControlFlow::Break(())) => {
                finished = true;
                break;
            }
            Ok(ControlFlow::Continue(())) => {}
            Err(SseError::Sink(e)) => return Outcome::Err(format!("{e:?}")),
            Err(e @ SseError::EventTooLarge { .. }) => panic!("no limit was set: {e}"),
        }
    }
    if !finished {
        match parser.finish(&mut sink(&mut acc)) {
            Ok(_) => {}
            Err(SseError::Sink(e)) => return Outcome::Err(format!("{e:?}")),
            Err(e @ SseError::EventTooLarge { .. }) => panic!("no limit was set: {e}"),
        }
    }
    match acc.finish() {
        Ok(aggregate) => Outcome::Ok(aggregate),
        Err(e) => Outcome::Err(format!("{e:?}")),
    }
}

fn corpus(dir: &str, api: Api) -> Vec<Stream> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sse"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            let whole = aggregate(api, &[&bytes]);
            Stream {
                path,
                api,
                bytes,
                whole,
            }
        })
        .collect()
}

fn streams() -> &'static [Stream] {
    static STREAMS: OnceLock<Vec<Stream>> = OnceLock::new();
    STREAMS.get_or_init(|| {
        let mut all = corpus("chat_accumulator", Api::ChatCompletions);
        all.extend(corpus("responses_accumulator", Api::Responses));
        all
    })
}

/// Cuts `bytes` at `cuts` (taken modulo its length + 1: empty pieces happen too), or, with
/// `tiny`, into pieces of 1–7 bytes whose sizes cycle through `cuts`.
fn pieces<'a>(bytes: &'a [u8], cuts: &[u32], tiny: bool) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = if tiny {
        let mut at = Vec::new();
        let mut end = 0;
        let mut i = 0;
        while end < bytes.len() {
            let step = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(3) as usize;
            end = (end + 1 + (step + i) % 7).min(bytes.len());
            at.push(end);
            i += 1;
        }
        at
    } else {
        cuts.iter()
            .map(|c| *c as usize % (bytes.len() + 1))
            .collect()
    };
    at.sort_unstable();
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for end in at.into_iter().chain(std::iter::once(bytes.len())) {
        out.push(&bytes[start..end]);
        start = end;
    }
    out
}

/// The corpus is there and covers both outcomes for both APIs, so the property below cannot
/// hold vacuously.
#[test]
fn the_project_streams_cover_successes_and_errors_of_both_apis() {
    let all = streams();
    for api in [Api::ChatCompletions, Api::Responses] {
        let of_api: Vec<&Stream> = all.iter().filter(|s| s.api == api).collect();
        let ok = of_api
            .iter()
            .filter(|s| matches!(s.whole, Outcome::Ok(_)))
            .count();
        let err = of_api.len() - ok;
        assert!(
            ok >= 3 && err >= 2,
            "{api:?}: {ok} streams aggregate, {err} fail; expected at least 3 and 2"
        );
    }
    for s in all {
        if let Outcome::Ok(a) = &s.whole {
            serde_json::from_slice::<serde_json::Value>(&a.body).unwrap_or_else(|e| {
                panic!("{}: aggregated body is not JSON: {e}", s.path.display())
            });
        }
    }
}

/// Byte by byte: every boundary at once (inside CRLF, the BOM, field names, UTF-8).
#[test]
fn one_byte_pieces_give_the_same_outcome() {
    for s in streams() {
        let singles: Vec<&[u8]> = s.bytes.chunks(1).collect();
        assert_eq!(aggregate(s.api, &singles), s.whole, "{}", s.path.display());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Network chunk boundaries are arbitrary; the outcome must not depend on them.
    #[test]
    fn re_chunking_never_changes_the_outcome(
        cuts in proptest::collection::vec(any::<u32>(), 0..48),
        tiny in any::<bool>(),
    ) {
        for s in streams() {
            let cut = pieces(&s.bytes, &cuts, tiny);
            prop_assert_eq!(&aggregate(s.api, &cut), &s.whole, "{} cut as {:?}", s.path.display(),
                cut.iter().map(|p| p.len()).collect::<Vec<_>>());
        }
    }
}
