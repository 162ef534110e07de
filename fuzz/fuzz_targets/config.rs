//! Configuration text (operator input): loading never panics, it reports problems.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = edgecoder::config::Config::from_toml(s);
    }
});
