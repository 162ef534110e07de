//! Bytes read back from the store (possibly damaged): decoding never panics.
#![no_main]

use edgecoder::coordinator::model::*;
use edgecoder::store::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<TaskRecord>("tasks", data);
    let _ = decode::<TaskResult>("results", data);
    let _ = decode::<TaskEvent>("task_events", data);
    let _ = decode::<AgentRecord>("agents", data);
});
