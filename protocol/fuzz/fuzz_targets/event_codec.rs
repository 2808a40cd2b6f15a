//! Any bytes as a stored event: decoded or refused, never a panic; what decodes encodes and
//! decodes back to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxgate_protocol::{decode, encode, peek_event_id};

fuzz_target!(|data: &[u8]| {
    let peeked = peek_event_id(data);
    if let Ok(env) = decode(data) {
        let again = decode(&encode(&env)).expect("what we encode decodes");
        assert_eq!(again.event_id, env.event_id);
        assert_eq!(encode(&again), encode(&env), "encoding is stable");
        if let Some(id) = peeked {
            assert_eq!(id, env.event_id);
        }
    }
});
