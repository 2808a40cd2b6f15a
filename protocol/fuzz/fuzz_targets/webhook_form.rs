//! Any body posted to the voice and status webhooks: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxgate_protocol::twilio::{StatusCallback, VoiceWebhook};

fuzz_target!(|body: &[u8]| {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    if let Ok(w) = VoiceWebhook::from_form(&pairs) {
        // What was accepted names its call and tenant in their canonical form.
        let _ = (w.call_sid.to_string(), w.account_sid.to_string());
    }
    let _ = StatusCallback::from_form(&pairs);
});
