//! Request bodies from the network: decoding never panics.
#![no_main]

use edgecoder::coordinator::model::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgecoder::http::parse_json::<SubmitTask>(data);
    let _ = edgecoder::http::parse_json::<RegisterAgent>(data);
    let _ = edgecoder::http::parse_json::<Heartbeat>(data);
    let _ = edgecoder::http::parse_json::<Claim>(data);
    let _ = edgecoder::http::parse_json::<PostEvents>(data);
    let _ = edgecoder::http::parse_json::<PostResult>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<edgecoder::clock::Ulid>();
        let _ = edgecoder::identity::KeyId::parse(s);
    }
});
