//! Auth tokens at rest: sealed with ChaCha20-Poly1305 under the node's secrets key, bound to the
//! tenant they belong to (the AccountSid is the associated data, so a sealed token moved to
//! another tenant's event does not open).

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::Deserialize;
use voxgate_protocol::AccountSid;

/// A secret string (auth token, admin token): never printed by `Debug`, compared in constant time.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality with a presented value (the length is not secret).
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// Equality that takes the same time wherever the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Why a sealed token does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("sealed secret is {0} bytes, shorter than a nonce and a tag")]
    Short(usize),
    #[error("sealed secret does not open with this node's secrets key (wrong key, or tampered with)")]
    Open,
    #[error("sealed secret is not UTF-8")]
    Utf8,
}

const NONCE: usize = 12;
const TAG: usize = 16;

/// Seals and opens auth tokens with one 256-bit key.
#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(Key::from_slice(key)) }
    }

    /// `nonce ‖ ciphertext ‖ tag`; the nonce must be fresh for every seal (random, from the caller).
    pub fn seal(&self, tenant: AccountSid, token: &str, nonce: [u8; NONCE]) -> Bytes {
        let aad = tenant.as_u128().to_be_bytes();
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: token.as_bytes(), aad: &aad })
            .unwrap_or_default(); // encryption of a short message cannot fail
        let mut out = Vec::with_capacity(NONCE + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Bytes::from(out)
    }

    pub fn open(&self, tenant: AccountSid, sealed: &[u8]) -> Result<Secret, SecretError> {
        if sealed.len() < NONCE + TAG {
            return Err(SecretError::Short(sealed.len()));
        }
        let (nonce, ct) = sealed.split_at(NONCE);
        let aad = tenant.as_u128().to_be_bytes();
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(pt).map(Secret).map_err(|_| SecretError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let s = Sealer::new(&[7; 32]);
        let a = AccountSid::from_u128(1);
        let sealed = s.seal(a, "token-abc", [1; 12]);
        assert!(!sealed.windows(9).any(|w| w == b"token-abc"), "never in the clear");
        assert_eq!(s.open(a, &sealed).map(|t| t.expose().to_owned()), Ok("token-abc".into()));
        // Another tenant, another key, a flipped bit, a short buffer: all refused.
        assert_eq!(s.open(AccountSid::from_u128(2), &sealed).err(), Some(SecretError::Open));
        assert_eq!(Sealer::new(&[8; 32]).open(a, &sealed).err(), Some(SecretError::Open));
        let mut bad = sealed.to_vec();
        bad[14] ^= 1;
        assert_eq!(s.open(a, &bad).err(), Some(SecretError::Open));
        assert_eq!(s.open(a, &sealed[..20]).err(), Some(SecretError::Short(20)));
    }

    #[test]
    fn secrets_compare_and_hide() {
        let t = Secret::new("admin-0123456789abcdefghij");
        assert!(t.matches("admin-0123456789abcdefghij"));
        assert!(!t.matches("admin-0123456789abcdefghiJ"));
        assert!(!t.matches("admin"));
        assert_eq!(format!("{t:?}"), "\"[redacted]\"");
    }
}
