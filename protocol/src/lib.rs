//! voxgate-protocol: the words voxgate speaks, with no I/O.
//!
//! Owns: typed Twilio ids ([`ids`]), event time ([`time`]), the events and their envelope
//! ([`event`]) with the versioned postcard log format ([`codec`]), and Twilio's wire formats
//! ([`twilio`]: webhook parameters, `X-Twilio-Signature`, TwiML, Media Streams JSON).
//!
//! Must not: open files or sockets, read the wall clock for decisions, or depend on any other
//! voxgate crate. Everything here is a pure function of its input, so it is tested without a runtime.

pub mod bytes_b64;
pub mod codec;
mod codec_v1;
pub mod event;
pub mod ids;
pub mod time;
pub mod twilio;

pub use codec::{
    decode, encode, encode_into, peek_event_id, peek_header, CodecError, Header, MEDIA_BATCH_VARIANT,
    SPEECH_PROGRESS_VARIANT, SPEECH_SEGMENT_VARIANT,
};
pub use event::{Envelope, Event, EventId};
pub use ids::{AccountSid, CallSid, PhoneNumberSid, SidError, StreamSid};
pub use time::{Clock, SystemClock, Timestamp};
