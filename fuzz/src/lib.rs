//! Helpers shared by the fuzz targets: how an input is cut into network chunks, and the full
//! SSE → accumulator loop (the same as `tests/aggregate_fixtures.rs`).
//!
//! The chunk boundaries are derived from the input itself (a hash seeds a small PRNG), so a raw
//! `.sse` file is a valid input as it is, every mutation of it also moves the cuts, and a crash
//! reproduces from its artifact alone.

use std::ops::ControlFlow;

use openai_stream_proxy::convert::outcome::{Aggregate, AggregateError, Flow};
use openai_stream_proxy::convert::request::Api;
use openai_stream_proxy::convert::stream::Accumulator;
use openai_stream_proxy::sse::{SseError, SseEvent, SseParser};

/// xorshift64*, seeded by FNV-1a of the input and a salt.
pub struct Rng(u64);

impl Rng {
    pub fn new(data: &[u8], salt: u64) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The ways one input is cut into chunks; each is a list of chunk lengths summing to the input
/// length. Empty chunks are included on purpose (a `push(&[])` must change nothing).
pub fn splits(data: &[u8], salt: u64) -> Vec<Vec<usize>> {
    let len = data.len();
    let mut out = Vec::new();
    // Every byte alone: every boundary (CR|LF, inside the BOM, inside a field name) at once.
    out.push(vec![1; len]);
    // Random mix of tiny, empty and large chunks.
    let mut rng = Rng::new(data, salt);
    let mut cuts = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match rng.below(8) {
            0 => 0,
            1..=4 => 1 + rng.below(4) as usize,
            5 | 6 => 1 + rng.below(64) as usize,
            _ => 1 + rng.below(left as u64) as usize,
        }
        .min(left);
        cuts.push(n);
        left -= n;
    }
    out.push(cuts);
    out
}

/// One dispatched event, owned.
pub type Event = (Vec<u8>, Vec<u8>);

/// What feeding a whole stream produced: the events, and whether it stopped on the size limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<Event>,
    pub too_large: bool,
}

/// Feeds `data` cut into chunks of `lens` (one chunk when `None`), then `finish`.
pub fn parse(data: &[u8], lens: Option<&[usize]>, limit: usize) -> Parsed {
    let mut parser = SseParser::new(limit);
    let mut events = Vec::new();
    let mut sink = |e: SseEvent<'_>| -> Result<ControlFlow<()>, ()> {
        events.push((e.name.to_vec(), e.data.to_vec()));
        Ok(ControlFlow::Continue(()))
    };
    let whole = [data.len()];
    let lens = lens.unwrap_or(&whole);
    let mut start = 0;
    for &n in lens {
        match parser.push(&data[start..start + n], &mut sink) {
            Ok(ControlFlow::Continue(())) => {}
            Ok(ControlFlow::Break(())) => unreachable!("the sink never breaks"),
            Err(SseError::EventTooLarge { limit: l }) => {
                assert_eq!(l, limit);
                return Parsed {
                    events,
                    too_large: true,
                };
            }
            Err(SseError::Sink(())) => unreachable!("the sink never fails"),
        }
        start += n;
    }
    assert_eq!(start, data.len());
    match parser.finish(&mut sink) {
        Ok(_) => Parsed {
            events,
            too_large: false,
        },
        Err(SseError::EventTooLarge { .. }) => unreachable!("finish checks no limit"),
        Err(SseError::Sink(())) => unreachable!("the sink never fails"),
    }
}

/// What an aggregation ended with, comparable across chunkings: the aggregate itself, or the
/// error's text (the error type has no `PartialEq`).
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Ok(Aggregate),
    Err(String),
}

/// The proxy's loop: chunks → SSE parser → accumulator, stopping at the terminal event.
pub fn aggregate(api: Api, data: &[u8], lens: Option<&[usize]>) -> Outcome {
    match aggregate_inner(api, data, lens) {
        Ok(a) => Outcome::Ok(a),
        Err(e) => Outcome::Err(format!("{e:?}")),
    }
}

fn aggregate_inner(
    api: Api,
    data: &[u8],
    lens: Option<&[usize]>,
) -> Result<Aggregate, AggregateError> {
    let mut parser = SseParser::new(usize::MAX);
    let mut acc = Accumulator::new(api);
    let whole = [data.len()];
    let lens = lens.unwrap_or(&whole);
    let mut start = 0;
    let mut finished = false;
    for &n in lens {
        let mut sink = |event: SseEvent<'_>| {
            acc.push(event.name, event.data).map(|flow| match flow {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Finished => ControlFlow::Break(()),
            })
        };
        match parser.push(&data[start..start + n], &mut sink) {
            Ok(ControlFlow::Break(())) => {
                finished = true;
                break;
            }
            Ok(ControlFlow::Continue(())) => {}
            Err(SseError::Sink(e)) => return Err(e),
            Err(SseError::EventTooLarge { .. }) => unreachable!("no limit"),
        }
        start += n;
    }
    if !finished {
        let mut sink = |event: SseEvent<'_>| {
            acc.push(event.name, event.data).map(|flow| match flow {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Finished => ControlFlow::Break(()),
            })
        };
        match parser.finish(&mut sink) {
            Ok(_) => {}
            Err(SseError::Sink(e)) => return Err(e),
            Err(SseError::EventTooLarge { .. }) => unreachable!("no limit"),
        }
    }
    acc.finish()
}

/// The accumulator targets' property: no panic; an `Ok` body is one JSON value; cutting the
/// bytes differently changes nothing.
pub fn check_accumulator(api: Api, data: &[u8]) {
    let whole = aggregate(api, data, None);
    if let Outcome::Ok(a) = &whole {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&a.body) {
            // `Value` stops at 128 levels of nesting; past that, only the syntax is checked.
            let deep = e.to_string().contains("recursion limit exceeded")
                && serde_json::from_slice::<serde::de::IgnoredAny>(&a.body).is_ok();
            assert!(
                deep,
                "aggregated body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&a.body)
            );
        }
    }
    // Byte-by-byte costs a parser call per byte; the random split alone covers long inputs.
    for (i, lens) in splits(data, 0xacc).iter().enumerate() {
        if i == 0 && data.len() > 4096 {
            continue;
        }
        let cut = aggregate(api, data, Some(lens));
        assert_eq!(
            whole, cut,
            "chunking changed the result (chunk lengths {lens:?})"
        );
    }
}
