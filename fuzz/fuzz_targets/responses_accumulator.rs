//! Bytes → SSE parser → Responses accumulator. Properties: no panic; an `Ok` body is valid
//! JSON; cutting the bytes into other chunks gives the identical result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openai_stream_proxy::convert::request::Api;

fuzz_target!(|data: &[u8]| {
    openai_stream_proxy_fuzz::check_accumulator(Api::Responses, data);
});
