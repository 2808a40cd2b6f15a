//! Twilio's wire formats (see shared/reference/twilio-wire.md).
//!
//! * [`signature`]: `X-Twilio-Signature` (twilio-python 9.13.0 `RequestValidator` semantics).
//! * [`webhook`]: voice webhook and call status-callback parameters.
//! * [`twiml`]: the TwiML voxgate answers with, byte-identical to twilio-python.
//! * [`media`]: Media Streams WebSocket messages, both directions.

#![warn(missing_docs)]

pub mod gateway;
pub mod media;
pub mod signature;
pub mod twiml;
pub mod webhook;

pub use media::{decode_payload_into, parse_inbound, Inbound, Media, MediaError, Start, MAX_FRAME_BYTES};
pub use signature::{Algorithm, SignedBody};
pub use twiml::{StreamTwiml, TwimlError};
pub use webhook::{StatusCallback, VoiceWebhook, WebhookError};
