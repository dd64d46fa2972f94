//! `SseParser` on arbitrary bytes. Property: however the bytes are cut into chunks, the events
//! (and whether the stream stops on the size limit) are those of one whole-stream `push`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openai_stream_proxy_fuzz::{parse, splits, Rng};

fuzz_target!(|data: &[u8]| {
    // Unlimited, and a limit small enough to trip on some inputs of this size.
    let small = Rng::new(data, 0x1).below(data.len() as u64 + 8) as usize;
    for limit in [usize::MAX, small] {
        let whole = parse(data, None, limit);
        for lens in splits(data, limit as u64) {
            let cut = parse(data, Some(&lens), limit);
            assert_eq!(
                whole, cut,
                "chunking changed the events (limit {limit}, chunk lengths {lens:?})"
            );
        }
    }
});
