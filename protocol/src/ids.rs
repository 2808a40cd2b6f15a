//! Twilio-style identifiers: a two-letter prefix and 32 hex digits (a 128-bit value).
//!
//! Parsing accepts either hex case and emits lowercase (Twilio's own form). In human-readable
//! formats (JSON, TOML) an id serialises as its string; in postcard as a `u128`, so events stay
//! small on the hot path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid SID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SidError {
    #[error("{kind} must be {prefix} followed by 32 hex digits (34 characters), got {len} characters")]
    Length { kind: &'static str, prefix: &'static str, len: usize },
    #[error("{kind} must start with {prefix}")]
    Prefix { kind: &'static str, prefix: &'static str },
    #[error("{kind} has a non-hex character after its {prefix} prefix")]
    Hex { kind: &'static str, prefix: &'static str },
}

macro_rules! sid {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u128);

        impl $name {
            /// The two-letter prefix of this kind of SID.
            pub const PREFIX: &'static str = $prefix;

            /// Builds the SID from its 128-bit value.
            pub const fn from_u128(v: u128) -> Self {
                Self(v)
            }

            /// The 128-bit value behind the hex digits.
            pub const fn as_u128(self) -> u128 {
                self.0
            }

            /// Parses `XX` + 32 hex digits, either case.
            pub fn parse(s: &str) -> Result<Self, SidError> {
                parse_sid(s, stringify!($name), $prefix).map(Self)
            }

            /// A stable 64-bit key for partitioning (not cryptographic).
            pub fn partition_key(self) -> u64 {
                (self.0 as u64) ^ ((self.0 >> 64) as u64)
            }
        }

        impl FromStr for $name {
            type Err = SidError;
            fn from_str(s: &str) -> Result<Self, SidError> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{:032x}", $prefix, self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_u128(self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    Self::parse(&s).map_err(serde::de::Error::custom)
                } else {
                    u128::deserialize(d).map(Self)
                }
            }
        }
    };
}

fn parse_sid(s: &str, kind: &'static str, prefix: &'static str) -> Result<u128, SidError> {
    if s.len() != 34 {
        return Err(SidError::Length { kind, prefix, len: s.chars().count() });
    }
    if !s.starts_with(prefix) {
        return Err(SidError::Prefix { kind, prefix });
    }
    let hex = &s.as_bytes()[2..];
    let mut v: u128 = 0;
    for &b in hex {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(SidError::Hex { kind, prefix }),
        };
        v = (v << 4) | u128::from(d);
    }
    Ok(v)
}

sid!(
    /// A Twilio account or subaccount (`AC…`): the tenant key.
    AccountSid, "AC"
);
sid!(
    /// One call leg (`CA…`).
    CallSid, "CA"
);
sid!(
    /// One Media Stream (`MZ…`).
    StreamSid, "MZ"
);
sid!(
    /// A phone number a tenant owns (`PN…`, Twilio's IncomingPhoneNumber).
    PhoneNumberSid, "PN"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_lowercase() {
        let s = CallSid::parse("CA7E6D5C4B7e6d5c4b7e6d5c4b7e6d5c4b").unwrap();
        assert_eq!(s.to_string(), "CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b");
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(CallSid::parse("CA123"), Err(SidError::Length { .. })));
        assert!(matches!(CallSid::parse("AC7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b"), Err(SidError::Prefix { .. })));
        assert!(matches!(AccountSid::parse("AC7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4g"), Err(SidError::Hex { .. })));
        assert!(StreamSid::parse("MZ+e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b").is_err());
        // multi-byte characters must not panic on slicing
        assert!(StreamSid::parse("MZé6d5c4b7e6d5c4b7e6d5c4b7e6d5c4").is_err());
    }

    #[test]
    fn json_is_string_postcard_is_compact() {
        let s = AccountSid::from_u128(0xabc);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"AC00000000000000000000000000000abc\"");
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert!(bytes.len() <= 19);
        assert_eq!(postcard::from_bytes::<AccountSid>(&bytes).unwrap(), s);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = CallSid::parse(&s);
        }

        #[test]
        fn display_parse_roundtrip(v in any::<u128>()) {
            let s = StreamSid::from_u128(v);
            prop_assert_eq!(StreamSid::parse(&s.to_string()).unwrap(), s);
        }
    }
}
