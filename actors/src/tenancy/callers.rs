//! Caller protection at webhook time: how often one number may call a tenant, and which numbers
//! are premium-rate. The history keeps, per (tenant, caller), the times of the calls accepted in
//! the window, at most `limit` of them, so memory grows with distinct recent callers only and
//! [`CallerHistory::prune`] drops the ones whose window has passed.

use std::collections::{HashMap, VecDeque};

use voxgate_protocol::{AccountSid, Timestamp};

/// Caller-protection settings (`[callers]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallerConfig {
    /// Calls one number may make to one tenant per window (0 disables the limit).
    pub max_calls_per_window: u32,
    pub window_secs: u32,
    /// Premium-rate number prefixes (E.164): a call from (inbound) or to (outbound) one of them is
    /// refused.
    pub premium_prefixes: Vec<String>,
    /// Numbers refused for every tenant.
    pub blocked_numbers: Vec<String>,
}

impl Default for CallerConfig {
    fn default() -> Self {
        Self {
            max_calls_per_window: 10,
            window_secs: 3600,
            // NANP 900/976 premium services, UK 09 and 0871/0872/0873, France 089, Germany 0900,
            // Italy 899, Australia 1900.
            premium_prefixes: [
                "+1900", "+1976", "+449", "+44871", "+44872", "+44873", "+3389", "+49900", "+39899", "+611900",
            ]
            .map(String::from)
            .to_vec(),
            blocked_numbers: Vec::new(),
        }
    }
}

impl CallerConfig {
    pub fn validate(&self) -> Result<(), crate::InvalidSetting> {
        if self.window_secs == 0 || self.window_secs > 7 * 24 * 3600 {
            return Err(crate::InvalidSetting::new("window_secs", "must be between 1 and 604800"));
        }
        for p in &self.premium_prefixes {
            let ok = p
                .strip_prefix('+')
                .is_some_and(|d| !d.is_empty() && d.len() <= 15 && d.bytes().all(|b| b.is_ascii_digit()));
            if !ok {
                return Err(crate::InvalidSetting::new(
                    "premium_prefixes",
                    format!("{p:?} is not + followed by 1 to 15 digits"),
                ));
            }
        }
        Ok(())
    }

    /// The premium-rate prefix `number` starts with, if any.
    pub fn premium_prefix(&self, number: &str) -> Option<&str> {
        self.premium_prefixes.iter().find(|p| number.starts_with(p.as_str())).map(String::as_str)
    }

    pub fn is_blocked(&self, number: &str) -> bool {
        self.blocked_numbers.iter().any(|n| n == number)
    }
}

/// Recent accepted calls per (tenant, caller).
#[derive(Debug, Default)]
pub struct CallerHistory {
    calls: HashMap<(AccountSid, String), VecDeque<Timestamp>>,
}

/// A caller over its limit: how many calls it made in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub calls: u32,
}

impl CallerHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks one more call from `caller` at `now` and, if within the limit, records it.
    pub fn admit(
        &mut self,
        cfg: &CallerConfig,
        tenant: AccountSid,
        caller: &str,
        now: Timestamp,
    ) -> Result<(), OverLimit> {
        if cfg.max_calls_per_window == 0 || caller.is_empty() {
            return Ok(());
        }
        let window = i64::from(cfg.window_secs) * 1_000_000;
        let q = self.calls.entry((tenant, caller.to_owned())).or_default();
        while q.front().is_some_and(|t| now.0 - t.0 >= window) {
            q.pop_front();
        }
        if q.len() as u32 >= cfg.max_calls_per_window {
            return Err(OverLimit { calls: q.len() as u32 });
        }
        q.push_back(now);
        Ok(())
    }

    /// Forgets a call that was recorded but then refused further down (so it does not count).
    pub fn forget(&mut self, tenant: AccountSid, caller: &str, at: Timestamp) {
        let key = (tenant, caller.to_owned());
        if let Some(q) = self.calls.get_mut(&key) {
            if q.back() == Some(&at) {
                q.pop_back();
            }
            if q.is_empty() {
                self.calls.remove(&key);
            }
        }
    }

    /// Drops callers whose every call has left the window.
    pub fn prune(&mut self, cfg: &CallerConfig, now: Timestamp) {
        let window = i64::from(cfg.window_secs) * 1_000_000;
        self.calls.retain(|_, q| q.back().is_some_and(|t| now.0 - t.0 < window));
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AccountSid = AccountSid::from_u128(1);
    const B: AccountSid = AccountSid::from_u128(2);

    fn min(m: i64) -> Timestamp {
        Timestamp(m * 60_000_000)
    }

    #[test]
    fn ten_calls_an_hour_per_caller_per_tenant() {
        let cfg = CallerConfig::default();
        let mut h = CallerHistory::new();
        for i in 0..10 {
            assert!(h.admit(&cfg, A, "+15551230000", min(i)).is_ok());
        }
        assert_eq!(h.admit(&cfg, A, "+15551230000", min(30)), Err(OverLimit { calls: 10 }));
        // Another tenant, another caller: unaffected.
        assert!(h.admit(&cfg, B, "+15551230000", min(30)).is_ok());
        assert!(h.admit(&cfg, A, "+15551239999", min(30)).is_ok());
        // The first call leaves the window an hour after it was made.
        assert!(h.admit(&cfg, A, "+15551230000", min(59)).is_err());
        assert!(h.admit(&cfg, A, "+15551230000", min(60)).is_ok());
        h.prune(&cfg, min(200));
        assert!(h.is_empty());
    }

    #[test]
    fn forget_undoes_the_last_record() {
        let cfg = CallerConfig { max_calls_per_window: 1, ..Default::default() };
        let mut h = CallerHistory::new();
        assert!(h.admit(&cfg, A, "+1555", min(0)).is_ok());
        h.forget(A, "+1555", min(0));
        assert!(h.admit(&cfg, A, "+1555", min(0)).is_ok());
    }

    #[test]
    fn premium_prefixes_and_validation() {
        let cfg = CallerConfig::default();
        assert_eq!(cfg.premium_prefix("+19005550100"), Some("+1900"));
        assert_eq!(cfg.premium_prefix("+14155550100"), None);
        assert_eq!(cfg.premium_prefix("+447700900123"), None, "UK mobile, not 09");
        assert_eq!(cfg.premium_prefix("+449098790000"), Some("+449"));
        assert!(cfg.validate().is_ok());
        let bad = CallerConfig { premium_prefixes: vec!["1900".into()], ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
