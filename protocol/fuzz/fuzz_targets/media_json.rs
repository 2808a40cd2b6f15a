//! Any Media Streams WebSocket text frame: parsed or refused with a reason, never a panic; an
//! accepted media payload decodes or is refused too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxgate_protocol::twilio::{decode_payload_into, parse_inbound, Inbound};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_inbound(text) {
        Ok(Inbound::Media(m)) => {
            let mut out = Vec::new();
            if decode_payload_into(&m.payload_b64, &mut out).is_ok() {
                assert!(out.len() <= m.payload_b64.len(), "base64 never grows when decoded");
            }
        }
        Ok(Inbound::Start(s)) => {
            let _ = s.check_format();
        }
        Ok(_) => {}
        Err(e) => {
            let _ = (e.kind_str(), e.to_string());
        }
    }
});
