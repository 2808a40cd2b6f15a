//! voxgate-actors: the stages of a call's life, each a thin actor around a pure core.
//!
//! Owns: the stage harness ([`stage`]: the one actor every log-to-log stage runs on, reading
//! from a durable cursor, appending what the stage decides, committing, reporting lag), the
//! follower harness ([`follow`]: the one actor every log follower runs on, folding whole logs
//! into memory and acting on what arrives), the call
//! actor and its supervisor ([`call`]: state machine, stream queue, maximum
//! duration), the transcoder ([`transcode`]: µ-law → PCM16, 8 → 16 kHz, voice activity, and the
//! stage that turns the media log into the speech log), speech-to-text ([`stt`]), tenancy
//! ([`tenancy`]: the tenant directory, call quotas, caller protection, REST throttles), and fraud
//! screening's pure core ([`fraud`]: the destination table, the rules and their settings, the
//! engine that turns call events into verdicts), and billing's pure core ([`billing`]: prices and
//! volume tiers, the usage book behind Twilio-shaped usage records and invoices, usage triggers and
//! budgets).
//!
//! Must not: talk to another stage except through the event log, read the wall clock in a decision
//! (time comes from events or an injected clock), or touch HTTP/WebSocket details (that is nodes/).

pub mod billing;
pub mod call;
pub mod follow;
pub mod fraud;
pub mod progress;
pub mod stage;
pub mod stt;
pub mod tenancy;
pub mod transcode;

/// A setting outside what it may be: the field and why (the node prefixes its config section).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidSetting {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}
