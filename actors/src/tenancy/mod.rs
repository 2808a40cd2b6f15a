//! Tenants (Twilio accounts and subaccounts), their phone numbers, quotas and throttles.
//!
//! Everything here is a pure core: the [`directory::Directory`] is a projection of the `tenants`
//! log (config-file tenants seeded first, then every event applied in order), the
//! [`gate::Gate`] decides a webhook from the directory, the caller history and an event time, and
//! [`throttle::Throttle`] judges REST request rates on a sliding window of event time. The node
//! owns the I/O: it appends the events these cores produce and serves their answers.

pub mod callers;
pub mod directory;
pub mod gate;
pub mod lockout;
pub mod quota;
pub mod secret;
pub mod throttle;

pub use directory::{Directory, NumberRecord, Quota, TenancyError, TenantRecord};
pub use secret::{Sealer, Secret, SecretError};

/// `+` then 2 to 15 digits, the first not zero (ITU-T E.164 as Twilio writes it).
pub fn is_e164(s: &str) -> bool {
    let Some(d) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
}

/// Longest values of user-provided fields, as Twilio's API documents them.
pub mod limits {
    pub const FRIENDLY_NAME: usize = 255;
    pub const UNIQUE_NAME: usize = 191;
    pub const URL: usize = 4000;
    /// Vocabulary hints (a tenant's, and a call's: `call::MAX_HINTS_CHARS`).
    pub const HINTS: usize = 1000;
}
