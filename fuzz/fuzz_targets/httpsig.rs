//! Signature headers from the network: parsing and verification must never panic, and nothing
//! random may verify.
#![no_main]

use edgecoder::security::httpsig::{self, ReceivedHeaders, RequestParts, TimePolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let (input, sig, digest, body) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let h = ReceivedHeaders {
        content_digest: Some(digest),
        signature_input: Some(input),
        signature: Some(sig),
    };
    let time = TimePolicy { now: 1_800_000_000, max_window: 60, skew: 30 };
    if let Ok(p) = httpsig::parse(&h, &time) {
        let req = RequestParts { method: "POST", authority: "127.0.0.1:4301", path: "/tasks", query: None };
        assert!(httpsig::verify(&h, &p, &req, body.as_bytes()).is_err(), "random input verified");
    }
});
