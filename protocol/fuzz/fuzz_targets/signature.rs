//! Signature validation over any key, URL, form and signature header: a verdict, never a panic;
//! and a signature we compute always validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxgate_protocol::twilio::signature::{compute, validate};
use voxgate_protocol::twilio::{Algorithm, SignedBody};

fuzz_target!(|data: &[u8]| {
    // key \0 url \0 signature \0 form body
    let mut parts = data.splitn(4, |b| *b == 0);
    let (Some(key), Some(url), Some(sig), Some(body)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let url = String::from_utf8_lossy(url);
    let sig = String::from_utf8_lossy(sig);
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let _ = validate(key, &url, SignedBody::Form(&pairs), &sig);
    let _ = validate(key, &url, SignedBody::Json(body), &sig);
    let _ = validate(key, &url, SignedBody::Empty, &sig);
    let ours = compute(Algorithm::Sha1, key, &url, &pairs);
    assert!(validate(key, &url, SignedBody::Form(&pairs), &ours), "our own signature must validate");
});
