//! Call quotas per tenant: concurrent calls and new calls per second, judged on event time.
//!
//! Each tenant (a parent and each of its subaccounts alike) has its own counters: a parent's
//! quota is never shared with its subaccounts. A warning is raised once when concurrency reaches
//! the warning share (70 %, Twilio's 53121 pattern) and re-armed when it falls back below.

use std::collections::{HashMap, HashSet};

use voxgate_protocol::event::RejectReason;
use voxgate_protocol::{AccountSid, CallSid, Timestamp};

use super::directory::Quota;

/// Share of the concurrency quota at which the warning fires (per cent).
pub const WARN_PERCENT: u32 = 70;

/// The quota's answer to a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Take the call; `warn` carries (active, limit) when this call crossed the warning share.
    Accept {
        warn: Option<(u32, u32)>,
    },
    Refuse(RejectReason),
}

#[derive(Debug, Default)]
struct TenantUse {
    active: HashSet<CallSid>,
    /// Token bucket for new calls: tokens ×1e6 (micro-tokens), last refill time.
    micro_tokens: u64,
    refilled_at: Option<Timestamp>,
    warned: bool,
}

/// Concurrency and rate state of every tenant.
#[derive(Debug, Default)]
pub struct CallQuotas {
    tenants: HashMap<AccountSid, TenantUse>,
}

impl CallQuotas {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `tenant` has in progress.
    pub fn active(&self, tenant: AccountSid) -> u32 {
        self.tenants.get(&tenant).map_or(0, |t| t.active.len() as u32)
    }

    /// The calls `tenant` has in progress.
    pub fn active_calls(&self, tenant: AccountSid) -> Vec<CallSid> {
        self.tenants.get(&tenant).map(|t| t.active.iter().copied().collect()).unwrap_or_default()
    }

    /// Decides a new call at event time `now`; on acceptance the call counts as active until
    /// [`CallQuotas::release`]. A call already admitted (a webhook retry) is accepted again
    /// without counting twice.
    pub fn admit(&mut self, tenant: AccountSid, call: CallSid, quota: Quota, now: Timestamp) -> Admission {
        let u = self.tenants.entry(tenant).or_default();
        if u.active.contains(&call) {
            return Admission::Accept { warn: None };
        }
        let active = u.active.len() as u32;
        if active >= quota.max_concurrent_calls {
            return Admission::Refuse(RejectReason::ConcurrencyQuota { active, limit: quota.max_concurrent_calls });
        }
        // Token bucket: capacity = one second's worth, refilled continuously.
        let cap = u64::from(quota.calls_per_second) * 1_000_000;
        match u.refilled_at {
            None => u.micro_tokens = cap,
            Some(last) => {
                let dt = now.0.saturating_sub(last.0).max(0) as u64;
                u.micro_tokens = (u.micro_tokens + dt.saturating_mul(u64::from(quota.calls_per_second))).min(cap);
            }
        }
        u.refilled_at = Some(match u.refilled_at {
            Some(last) if last.0 > now.0 => last,
            _ => now,
        });
        if u.micro_tokens < 1_000_000 {
            return Admission::Refuse(RejectReason::RateQuota { limit_per_sec: quota.calls_per_second });
        }
        u.micro_tokens -= 1_000_000;
        u.active.insert(call);
        let active = active + 1;
        let warn_at = warn_threshold(quota.max_concurrent_calls);
        let warn = if !u.warned && active >= warn_at {
            u.warned = true;
            Some((active, quota.max_concurrent_calls))
        } else {
            None
        };
        Admission::Accept { warn }
    }

    /// A call admitted before (by an earlier run of the node) counts as active again.
    pub fn resume(&mut self, tenant: AccountSid, call: CallSid) {
        self.tenants.entry(tenant).or_default().active.insert(call);
    }

    /// The call ended: it no longer counts. Unknown calls are ignored.
    pub fn release(&mut self, tenant: AccountSid, call: CallSid, quota: Quota) {
        if let Some(u) = self.tenants.get_mut(&tenant) {
            u.active.remove(&call);
            if (u.active.len() as u32) < warn_threshold(quota.max_concurrent_calls) {
                u.warned = false;
            }
        }
    }
}

/// Active calls at which the warning fires: 70 % of the limit, rounded up, at least 1.
pub fn warn_threshold(limit: u32) -> u32 {
    (u64::from(limit) * u64::from(WARN_PERCENT)).div_ceil(100).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AccountSid = AccountSid::from_u128(1);
    const SUB: AccountSid = AccountSid::from_u128(2);

    fn call(n: u128) -> CallSid {
        CallSid::from_u128(n)
    }

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms * 1000)
    }

    #[test]
    fn concurrency_warns_at_70_percent_and_refuses_at_100() {
        let q = Quota { max_concurrent_calls: 10, calls_per_second: 1000 };
        let mut c = CallQuotas::new();
        let mut warnings = Vec::new();
        for i in 0..10 {
            match c.admit(A, call(i), q, t(0)) {
                Admission::Accept { warn } => warnings.extend(warn),
                other => panic!("call {i}: {other:?}"),
            }
        }
        assert_eq!(warnings, vec![(7, 10)], "one warning, at the 7th of 10");
        assert_eq!(
            c.admit(A, call(10), q, t(0)),
            Admission::Refuse(RejectReason::ConcurrencyQuota { active: 10, limit: 10 })
        );
        // A retry of an admitted call is not a new call.
        assert_eq!(c.admit(A, call(3), q, t(0)), Admission::Accept { warn: None });
        // The subaccount has its own counters.
        assert!(matches!(c.admit(SUB, call(100), q, t(0)), Admission::Accept { .. }));
        // Room again once calls end; the warning re-arms below 70 %.
        for i in 0..4 {
            c.release(A, call(i), q);
        }
        assert_eq!(c.active(A), 6);
        assert!(matches!(c.admit(A, call(11), q, t(0)), Admission::Accept { warn: Some((7, 10)) }));
    }

    #[test]
    fn rate_is_a_token_bucket_on_event_time() {
        let q = Quota { max_concurrent_calls: 1000, calls_per_second: 10 };
        let mut c = CallQuotas::new();
        let accepted = |c: &mut CallQuotas, from: u128, n: u128, at: i64| {
            (from..from + n).filter(|&i| matches!(c.admit(A, call(i), q, t(at)), Admission::Accept { .. })).count()
        };
        assert_eq!(accepted(&mut c, 0, 15, 0), 10, "a burst of one second's worth");
        assert_eq!(accepted(&mut c, 100, 5, 100), 1, "100 ms later: one more");
        assert_eq!(accepted(&mut c, 200, 20, 1100), 10, "a second later: full again, no more");
        assert_eq!(c.admit(A, call(999), q, t(1100)), Admission::Refuse(RejectReason::RateQuota { limit_per_sec: 10 }));
        // A clock that steps back does not mint tokens.
        assert_eq!(accepted(&mut c, 300, 5, 500), 0);
    }

    #[test]
    fn thresholds() {
        assert_eq!(warn_threshold(100), 70);
        assert_eq!(warn_threshold(10), 7);
        assert_eq!(warn_threshold(1), 1);
        assert_eq!(warn_threshold(0), 1);
    }
}
