//! Failed sign-ins, throttled: after `max_failures` failed attempts within `window_secs` for one
//! account name or from one client address, further attempts for that name or from that address
//! are refused (429 with Retry-After) until the window has passed, before any secret is compared.
//! Both keys count: a guesser spreading over many accounts is stopped by its address, a botnet
//! guessing one account by the account's name.
//!
//! Memory is bounded: at most `max_entries` keys are tracked; when full, expired entries go first
//! and then the ones whose window started earliest.

use std::collections::HashMap;
use std::net::IpAddr;

use voxgate_protocol::Timestamp;

/// `[throttle] auth_failures`, `auth_window_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutConfig {
    pub max_failures: u32,
    pub window_secs: u32,
    pub max_entries: usize,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self { max_failures: 10, window_secs: 300, max_entries: 100_000 }
    }
}

/// Who failed: the account name presented (an AccountSid, `admin`, or whatever was sent, cut
/// short), or the client's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Account(String),
    Addr(IpAddr),
}

impl Key {
    /// The account name as presented, bounded in length (it is attacker-chosen).
    pub fn account(name: &str) -> Self {
        Key::Account(name.chars().take(64).collect())
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Timestamp,
    failures: u32,
}

/// Refused: try again after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedOut {
    pub retry_after_secs: u64,
}

/// The failure counts.
#[derive(Debug, Default)]
pub struct Lockout {
    cfg: LockoutConfig,
    entries: HashMap<Key, Entry>,
}

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Self {
        Self { cfg, entries: HashMap::new() }
    }

    fn window_us(&self) -> i64 {
        i64::from(self.cfg.window_secs) * 1_000_000
    }

    /// Whether an attempt under these keys may be checked at all at `now`.
    pub fn check(&self, keys: &[Key], now: Timestamp) -> Result<(), LockedOut> {
        let mut worst: Option<i64> = None;
        for k in keys {
            let Some(e) = self.entries.get(k) else { continue };
            let ends = e.window_start.as_micros().saturating_add(self.window_us());
            if e.failures >= self.cfg.max_failures && now.as_micros() < ends {
                worst = Some(worst.map_or(ends, |w: i64| w.max(ends)));
            }
        }
        match worst {
            None => Ok(()),
            Some(ends) => {
                let us = ends.saturating_sub(now.as_micros()).max(0) as u64;
                Err(LockedOut { retry_after_secs: us.div_ceil(1_000_000).max(1) })
            }
        }
    }

    /// Counts a failed attempt under every key.
    pub fn failed(&mut self, keys: &[Key], now: Timestamp) {
        let window = self.window_us();
        for k in keys {
            if !self.entries.contains_key(k) && self.entries.len() >= self.cfg.max_entries {
                self.make_room(now);
            }
            let e = self.entries.entry(k.clone()).or_insert(Entry { window_start: now, failures: 0 });
            if now.as_micros() >= e.window_start.as_micros().saturating_add(window) {
                *e = Entry { window_start: now, failures: 0 };
            }
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn make_room(&mut self, now: Timestamp) {
        let window = self.window_us();
        self.entries.retain(|_, e| now.as_micros() < e.window_start.as_micros().saturating_add(window));
        if self.entries.len() < self.cfg.max_entries {
            return;
        }
        // Still full of live windows: drop the oldest half (the ones closest to expiring).
        let mut starts: Vec<i64> = self.entries.values().map(|e| e.window_start.as_micros()).collect();
        starts.sort_unstable();
        let cut = starts[starts.len() / 2];
        self.entries.retain(|_, e| e.window_start.as_micros() > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn t(secs: i64) -> Timestamp {
        Timestamp(1_700_000_000 * S + secs * S)
    }

    fn cfg() -> LockoutConfig {
        LockoutConfig { max_failures: 3, window_secs: 60, max_entries: 100 }
    }

    #[test]
    fn locks_after_max_failures_until_the_window_ends() {
        let mut l = Lockout::new(cfg());
        let keys = [Key::account("AC1"), Key::Addr("198.51.100.7".parse().unwrap())];
        for i in 0..3 {
            assert_eq!(l.check(&keys, t(i)), Ok(()));
            l.failed(&keys, t(i));
        }
        assert_eq!(l.check(&keys, t(10)), Err(LockedOut { retry_after_secs: 50 }));
        // The same address guessing another account is refused by its address …
        let other = [Key::account("AC2"), Key::Addr("198.51.100.7".parse().unwrap())];
        assert!(l.check(&other, t(10)).is_err());
        // … and the same account from another address by the account.
        let elsewhere = [Key::account("AC1"), Key::Addr("203.0.113.1".parse().unwrap())];
        assert!(l.check(&elsewhere, t(10)).is_err());
        // A fresh pair is not.
        let fresh = [Key::account("AC3"), Key::Addr("203.0.113.1".parse().unwrap())];
        assert_eq!(l.check(&fresh, t(10)), Ok(()));
        // After the window, a new one starts.
        assert_eq!(l.check(&keys, t(60)), Ok(()));
        l.failed(&keys, t(61));
        assert_eq!(l.check(&keys, t(62)), Ok(()));
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = Lockout::new(LockoutConfig { max_failures: 3, window_secs: 60, max_entries: 10 });
        for i in 0..1000u32 {
            l.failed(&[Key::Addr(IpAddr::from(i.to_be_bytes()))], t(i64::from(i) / 100));
            assert!(l.len() <= 10);
        }
        // Long names are cut.
        assert_eq!(Key::account(&"x".repeat(1000)), Key::Account("x".repeat(64)));
    }
}
