//! voxgate-scenarios: a Twilio traffic simulator and the harness for end-to-end, failure and load
//! scenarios against the real `voxgate` binary.
//!
//! Owns: [`twilio`] (signed webhooks, Media Streams client, status callbacks), [`speech`] (real
//! speech from espeak-ng/flite as 8 kHz µ-law), [`node`] (start a `voxgate serve` on free ports
//! with a temp data dir, and stop it), [`recorder`] (an HTTP endpoint outside voxgate — a fake
//! Twilio REST API, a customer's callback URL — that records what it is sent), [`load`] (open-loop
//! traffic at a fixed offered rate, and its report), [`browser`] (Chromium through ChromeDriver, for the
//! console). Must not: reach into voxgate's internals — everything goes
//! through HTTP, WebSocket and the CLI, as a user's would.

pub mod app;
pub mod bench;
pub mod browser;
pub mod corpus;
pub mod fixture;
pub mod load;
pub mod nats;
pub mod node;
pub mod recorder;
pub mod slow;
pub mod speech;
pub mod twilio;
pub mod wer;
