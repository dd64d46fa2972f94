//! `Config::parse_with_env` on arbitrary bytes: never panics, and is deterministic.
//!
//! `${NAME}` references resolve through a fake environment the input controls: a name starting
//! with `X` is set, to the rest of the name; any other name is unset.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use openai_stream_proxy::Config;

fn env(name: &str) -> Option<String> {
    name.strip_prefix('X').map(str::to_owned)
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.json");
    let first = Config::parse_with_env(path, data, &env);
    let second = Config::parse_with_env(path, data, &env);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => {
            assert_eq!(a.problems, b.problems);
            assert!(!a.problems.is_empty(), "an error with no problem");
            let _ = a.to_string();
        }
        _ => panic!("parse is not deterministic: {first:?} vs {second:?}"),
    }
    if let Ok(config) = first {
        assert!(
            !config.rules.is_empty(),
            "a config without rules was accepted"
        );
    }
});
