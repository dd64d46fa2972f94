//! Aggregation helpers shared by the Criterion benchmark (`benches/aggregate.rs`) and the
//! instruction-count harness (`examples/aggregate_cost.rs`), included by path in both so the
//! two measure exactly the same work.

use std::ops::ControlFlow;

use openai_stream_proxy::convert::outcome::Flow;
use openai_stream_proxy::convert::request::Api;
use openai_stream_proxy::convert::stream::Accumulator;
use openai_stream_proxy::sse::{SseEvent, SseParser};

/// The data of every event of `stream` but `[DONE]`.
pub fn payloads(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut parser = SseParser::new(usize::MAX);
    let mut out = Vec::new();
    let mut sink = |event: SseEvent<'_>| {
        if event.data != b"[DONE]" {
            out.push(event.data.to_vec());
        }
        Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
    };
    let _ = parser.push(stream, &mut sink);
    let _ = parser.finish(&mut sink);
    out
}

/// Parser and accumulator over one whole stream, as the proxy does for a conversion (there
/// the bytes arrive in frames; here in one piece); returns the body's length.
pub fn aggregate(api: Api, stream: &[u8]) -> Result<usize, String> {
    let mut parser = SseParser::new(usize::MAX);
    let mut accumulator = Accumulator::new(api);
    let mut sink = |event: SseEvent<'_>| {
        accumulator
            .push(event.name, event.data)
            .map(|flow| match flow {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Finished => ControlFlow::Break(()),
            })
    };
    let pushed = parser
        .push(stream, &mut sink)
        .map_err(|e| format!("{e:?}"))?;
    if pushed.is_continue() {
        // The stream ended without its terminal event: a last event without its blank line
        // still counts.
        let _ = parser.finish(&mut sink).map_err(|e| format!("{e:?}"))?;
    }
    accumulator
        .finish()
        .map(|aggregate| aggregate.body.len())
        .map_err(|e| e.to_string())
}
