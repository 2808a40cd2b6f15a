//! Fraud screening, the pure core: rules over the calls log that say when a call or a number looks
//! like toll fraud, and what to do about it.
//!
//! - [`prefixes`]: the destination table (country and termination cost per E.164 prefix, premium
//!   ranges), shipped as data and overridable.
//! - [`rules`]: the rules, their settings ([`FraudConfig`], with per-tenant overrides) and the
//!   explainable [`RuleHit`](voxgate_protocol::event::RuleHit)s they produce.
//! - [`engine`]: [`FraudEngine`], which folds call events into bounded per-tenant state and returns
//!   a [`FraudVerdict`](voxgate_protocol::event::FraudVerdict) when a rule fires.
//!
//! Everything here is a pure function of the events fed in: time is each event's `occurred_at`,
//! maps use a fixed hasher, so replaying the same events in the same order gives the same verdicts.
//! The actor around it (reading the logs, appending verdicts, hang-ups, alerts and blocks) lives
//! elsewhere.

pub mod engine;
pub mod prefixes;
pub mod rules;
pub mod stage;

pub use engine::{FraudEngine, StateSize};
pub use prefixes::{PrefixEntry, PrefixError, PrefixTable};
pub use rules::{BusinessHours, FraudConfig, FraudConfigError, Rule, TenantFraudConfig};

use std::hash::{BuildHasherDefault, Hasher};

/// A hasher with no random state, so map iteration (and therefore pruning and eviction) is the
/// same in every process: replay must not depend on `RandomState`.
#[derive(Default, Clone, Copy)]
pub(crate) struct FixedHasher(u64);

impl Hasher for FixedHasher {
    fn finish(&self) -> u64 {
        mix(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = mix(self.0 ^ x);
    }
    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
}

pub(crate) type FixedState = BuildHasherDefault<FixedHasher>;
pub(crate) type FixedMap<K, V> = std::collections::HashMap<K, V, FixedState>;

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit key for a phone number (FNV-1a, then mixed). Windows are keyed by it so the
/// hot path never allocates; two numbers colliding (about 1 in 2^64 per pair) would share a window.
pub(crate) fn number_key(number: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in number.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// Micro-dollars as `$1.2345` (to a hundredth of a cent).
pub(crate) fn usd(micros: u64) -> String {
    format!("${}.{:04}", micros / 1_000_000, (micros % 1_000_000) / 100)
}

/// A phone number stored without a heap allocation when it fits (every E.164 number does).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Num {
    Inline { len: u8, buf: [u8; 22] },
    Heap(Box<str>),
}

impl Num {
    pub(crate) fn new(s: &str) -> Self {
        if s.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            Self::Inline { len: s.len() as u8, buf }
        } else {
            Self::Heap(s.into())
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `&str`, so always valid UTF-8.
            Self::Inline { len, buf } => std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or(""),
            Self::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_round_trips_short_and_long() {
        assert_eq!(Num::new("+14155550100").as_str(), "+14155550100");
        assert_eq!(Num::new("").as_str(), "");
        let long = "sip:someone@very-long-domain.example.com";
        assert!(matches!(Num::new(long), Num::Heap(_)));
        assert_eq!(Num::new(long).as_str(), long);
    }

    #[test]
    fn number_key_is_stable() {
        assert_eq!(number_key("+14155550100"), number_key("+14155550100"));
        assert_ne!(number_key("+14155550100"), number_key("+14155550101"));
    }

    #[test]
    fn usd_formats_micros() {
        assert_eq!(usd(8_500), "$0.0085");
        assert_eq!(usd(1_000_000), "$1.0000");
        assert_eq!(usd(50_123_456), "$50.1234");
    }
}
