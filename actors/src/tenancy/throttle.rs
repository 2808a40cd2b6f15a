//! REST throttles per tenant and endpoint: a baseline rate with bursts up to a multiple of it,
//! judged on the average over a sliding window (the Twilio Proxy rule: 30 requests/s, bursts to
//! 5×, averaged over 5 s). A request is admitted while the window holds fewer than
//! `rate × window` requests, so a tenant may spend a whole window's allowance in one burst of up
//! to `burst × rate` per second and then waits for the window to slide. The window is kept in
//! 100 ms slots, so memory per (tenant, endpoint) is fixed.

use std::collections::HashMap;

use voxgate_protocol::{AccountSid, Timestamp};

/// Slot width.
const SLOT_US: i64 = 100_000;

/// The throttle's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Baseline requests per second, averaged over the window.
    pub requests_per_second: u32,
    /// Highest rate within one second, as a multiple of the baseline.
    pub burst_multiplier: u32,
    /// Averaging window in seconds.
    pub window_secs: u32,
    /// Failed sign-ins per account name or client address within `auth_window_secs` before
    /// further attempts are refused with 429 (see [`crate::tenancy::lockout`]).
    pub auth_failures: u32,
    pub auth_window_secs: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self { requests_per_second: 30, burst_multiplier: 5, window_secs: 5, auth_failures: 10, auth_window_secs: 300 }
    }
}

impl ThrottleConfig {
    pub fn validate(&self) -> Result<(), crate::InvalidSetting> {
        if self.requests_per_second == 0 || self.requests_per_second > 1_000_000 {
            return Err(crate::InvalidSetting::new("requests_per_second", "must be between 1 and 1000000"));
        }
        if self.burst_multiplier == 0 || self.burst_multiplier > 100 {
            return Err(crate::InvalidSetting::new("burst_multiplier", "must be between 1 and 100"));
        }
        if self.window_secs == 0 || self.window_secs > 60 {
            return Err(crate::InvalidSetting::new("window_secs", "must be between 1 and 60"));
        }
        if self.auth_failures == 0 || self.auth_failures > 10_000 {
            return Err(crate::InvalidSetting::new("auth_failures", "must be between 1 and 10000"));
        }
        if self.auth_window_secs == 0 || self.auth_window_secs > 86_400 {
            return Err(crate::InvalidSetting::new("auth_window_secs", "must be between 1 and 86400"));
        }
        Ok(())
    }

    /// The sign-in lockout these settings ask for.
    pub fn lockout(&self) -> crate::tenancy::lockout::LockoutConfig {
        crate::tenancy::lockout::LockoutConfig {
            max_failures: self.auth_failures,
            window_secs: self.auth_window_secs,
            ..Default::default()
        }
    }

    fn window_limit(&self) -> u64 {
        u64::from(self.requests_per_second) * u64::from(self.window_secs)
    }

    fn second_limit(&self) -> u64 {
        u64::from(self.requests_per_second) * u64::from(self.burst_multiplier)
    }
}

/// One (tenant, endpoint)'s recent requests, in slots.
#[derive(Debug, Clone)]
struct Window {
    /// Requests per slot; `slots[i]` counts slot number `first + i`.
    slots: Vec<u32>,
    /// Slot number of `slots[0]`'s position in the ring.
    head_slot: i64,
}

impl Window {
    fn new(len: usize, now_slot: i64) -> Self {
        Self { slots: vec![0; len], head_slot: now_slot - len as i64 + 1 }
    }

    /// Moves the window so it ends at `now_slot`, clearing slots that fell out.
    fn advance(&mut self, now_slot: i64) {
        let len = self.slots.len() as i64;
        let end = self.head_slot + len - 1;
        if now_slot <= end {
            return;
        }
        let shift = now_slot - end;
        if shift >= len {
            self.slots.iter_mut().for_each(|s| *s = 0);
        } else {
            for s in end + 1..=now_slot {
                self.slots[s.rem_euclid(len) as usize] = 0;
            }
        }
        self.head_slot = now_slot - len + 1;
    }

    fn slot(&self, n: i64) -> u32 {
        self.slots[n.rem_euclid(self.slots.len() as i64) as usize]
    }
}

/// Why a request was throttled, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Whole seconds until a retry can succeed (at least 1).
    pub retry_after_secs: u32,
    /// Requests in the window when it was refused.
    pub in_window: u64,
}

/// Every tenant's windows. Only authenticated tenants reach it, so the map is bounded by the
/// number of tenants times the number of endpoints.
#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    windows: HashMap<(AccountSid, &'static str), Window>,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self { config, windows: HashMap::new() }
    }

    pub fn config(&self) -> ThrottleConfig {
        self.config
    }

    /// Admits (and counts) a request at `now`, or says when to retry. A clock that steps back is
    /// treated as standing still.
    pub fn check(&mut self, tenant: AccountSid, endpoint: &'static str, now: Timestamp) -> Result<(), Throttled> {
        let c = self.config;
        let len = (i64::from(c.window_secs) * 1_000_000 / SLOT_US) as usize;
        let per_sec = (1_000_000 / SLOT_US) as usize;
        let w = self.windows.entry((tenant, endpoint)).or_insert_with(|| Window::new(len, now.0.div_euclid(SLOT_US)));
        let now_slot = now.0.div_euclid(SLOT_US).max(w.head_slot + len as i64 - 1);
        w.advance(now_slot);
        let in_window: u64 = w.slots.iter().map(|&s| u64::from(s)).sum();
        let in_second: u64 = (0..per_sec as i64).map(|k| u64::from(w.slot(now_slot - k))).sum();
        if in_window < c.window_limit() && in_second < c.second_limit() {
            let i = now_slot.rem_euclid(len as i64) as usize;
            w.slots[i] = w.slots[i].saturating_add(1);
            return Ok(());
        }
        // When will both limits have room? Walk the slots oldest first.
        let mut window_wait = 0i64;
        if in_window >= c.window_limit() {
            let mut left = in_window;
            for k in 0..len as i64 {
                let s = w.head_slot + k;
                left -= u64::from(w.slot(s));
                if left < c.window_limit() {
                    // Slot `s` leaves the window when the window's end passes s + len.
                    window_wait = (s + len as i64 - now_slot) * SLOT_US;
                    break;
                }
            }
        }
        let mut second_wait = 0i64;
        if in_second >= c.second_limit() {
            let mut left = in_second;
            for k in (0..per_sec as i64).rev() {
                let s = now_slot - k;
                left -= u64::from(w.slot(s));
                if left < c.second_limit() {
                    second_wait = (s + per_sec as i64 - now_slot) * SLOT_US;
                    break;
                }
            }
        }
        let wait_us = window_wait.max(second_wait).max(1);
        let retry_after_secs = (wait_us as u64).div_ceil(1_000_000).max(1) as u32;
        Err(Throttled { retry_after_secs, in_window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AccountSid = AccountSid::from_u128(1);
    const B: AccountSid = AccountSid::from_u128(2);

    fn ms(v: i64) -> Timestamp {
        Timestamp(v * 1000)
    }

    fn admitted(t: &mut Throttle, who: AccountSid, ep: &'static str, n: usize, at: Timestamp) -> usize {
        (0..n).filter(|_| t.check(who, ep, at).is_ok()).count()
    }

    #[test]
    fn burst_to_five_times_then_the_average_rules() {
        let mut t = Throttle::new(ThrottleConfig::default());
        // 150 at once (5 × 30/s) pass; the 151st is refused, with a Retry-After of the window.
        assert_eq!(admitted(&mut t, A, "calls", 200, ms(0)), 150);
        let e = t.check(A, "calls", ms(0)).unwrap_err();
        assert_eq!(e.retry_after_secs, 5);
        assert_eq!(e.in_window, 150);
        // Still full 4.9 s later; the whole burst leaves the window at 5 s.
        assert_eq!(admitted(&mut t, A, "calls", 10, ms(4_900)), 0);
        assert_eq!(admitted(&mut t, A, "calls", 200, ms(5_000)), 150);
    }

    #[test]
    fn steady_baseline_is_never_throttled() {
        let mut t = Throttle::new(ThrottleConfig::default());
        // Just under 30/s for a minute (one request every 34 ms; at exactly 30/s a 5 s window
        // holds 151 requests, over the average).
        for i in 0..1800 {
            assert!(t.check(A, "calls", Timestamp(i * 34_000)).is_ok(), "request {i}");
        }
    }

    #[test]
    fn tenants_and_endpoints_are_separate() {
        let mut t = Throttle::new(ThrottleConfig::default());
        assert_eq!(admitted(&mut t, A, "calls", 300, ms(0)), 150);
        assert_eq!(admitted(&mut t, B, "calls", 10, ms(0)), 10);
        assert_eq!(admitted(&mut t, A, "numbers", 10, ms(0)), 10);
    }

    #[test]
    fn per_second_cap_applies_when_it_is_the_tighter_limit() {
        let cfg = ThrottleConfig { requests_per_second: 10, burst_multiplier: 2, window_secs: 5, ..Default::default() };
        let mut t = Throttle::new(cfg);
        assert_eq!(admitted(&mut t, A, "x", 100, ms(0)), 20, "2 × 10/s within a second");
        assert_eq!(t.check(A, "x", ms(500)).map_err(|e| e.retry_after_secs), Err(1));
        assert_eq!(admitted(&mut t, A, "x", 100, ms(1_000)), 20);
        assert_eq!(admitted(&mut t, A, "x", 100, ms(2_000)), 10, "then the 5 s average (50) binds");
        assert_eq!(admitted(&mut t, A, "x", 100, ms(4_999)), 0);
        assert_eq!(admitted(&mut t, A, "x", 100, ms(5_000)), 20);
    }

    #[test]
    fn clock_stepping_back_does_not_reset() {
        let mut t = Throttle::new(ThrottleConfig::default());
        assert_eq!(admitted(&mut t, A, "calls", 150, ms(10_000)), 150);
        assert_eq!(admitted(&mut t, A, "calls", 10, ms(0)), 0);
    }
}
