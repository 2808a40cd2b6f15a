//! The webhook decision: may this call in? A pure function of the directory, the quota and caller
//! state, and the event time. The node checks the signature with the tenant's token first, then
//! asks the gate; the answer is either "accept" (perhaps with a quota warning to record) or a
//! refusal whose reason becomes the `call_rejected` event.

use std::collections::HashMap;

use voxgate_protocol::event::{Direction, RejectReason, TenantStatus};
use voxgate_protocol::{AccountSid, CallSid, Timestamp};

use super::callers::{CallerConfig, CallerHistory};
use super::directory::Directory;
use super::quota::{Admission, CallQuotas};

/// A call as the webhook presents it.
#[derive(Debug, Clone, Copy)]
pub struct CallAttempt<'a> {
    pub tenant: AccountSid,
    pub call: CallSid,
    pub from: &'a str,
    pub to: &'a str,
    pub direction: Direction,
    pub at: Timestamp,
}

impl CallAttempt<'_> {
    /// The tenant's own number: `To` on an inbound call, `From` on an outbound one.
    pub fn own_number(&self) -> &str {
        match self.direction {
            Direction::Inbound | Direction::Other => self.to,
            Direction::OutboundApi | Direction::OutboundDial => self.from,
        }
    }

    /// The other party: the caller on an inbound call, the callee on an outbound one.
    pub fn remote_number(&self) -> &str {
        match self.direction {
            Direction::Inbound | Direction::Other => self.from,
            Direction::OutboundApi | Direction::OutboundDial => self.to,
        }
    }
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take the call; `warn` = (active, limit) when it crossed the quota's warning share.
    Accept {
        warn: Option<(u32, u32)>,
    },
    Refuse(RejectReason),
}

/// Directory, quotas and caller history behind one lock on the node.
#[derive(Debug)]
pub struct Gate {
    pub directory: Directory,
    pub quotas: CallQuotas,
    pub callers: CallerHistory,
    pub caller_config: CallerConfig,
    decisions: u64,
    /// Accounts whose monthly budget is spent: until when, and the budget.
    budget_stops: HashMap<AccountSid, (Timestamp, u64)>,
}

impl Gate {
    pub fn new(directory: Directory, caller_config: CallerConfig) -> Self {
        Self {
            directory,
            quotas: CallQuotas::new(),
            callers: CallerHistory::new(),
            caller_config,
            decisions: 0,
            budget_stops: HashMap::new(),
        }
    }

    /// Decides a call whose tenant is known and whose signature checked out.
    pub fn decide(&mut self, a: &CallAttempt<'_>) -> Decision {
        self.decisions += 1;
        if self.decisions.is_multiple_of(4096) {
            self.callers.prune(&self.caller_config, a.at);
        }
        let Some(tenant) = self.directory.tenant(a.tenant) else {
            return Decision::Refuse(RejectReason::UnknownTenant);
        };
        let (quota, parent) = (tenant.quota, tenant.parent);
        let status = self.directory.effective_status(a.tenant).unwrap_or(TenantStatus::Closed);
        if status != TenantStatus::Active {
            return Decision::Refuse(RejectReason::TenantInactive { status });
        }
        for account in std::iter::once(a.tenant).chain(parent) {
            if let Some(&(until, budget_micros)) = self.budget_stops.get(&account) {
                if a.at < until {
                    return Decision::Refuse(RejectReason::BudgetExceeded { account, budget_micros });
                }
            }
        }
        if self.directory.owner_of(a.own_number()).is_none_or(|n| n.tenant != a.tenant) {
            return Decision::Refuse(RejectReason::UnknownNumber);
        }
        let remote = a.remote_number();
        if self.caller_config.is_blocked(remote) || self.directory.block(a.tenant, remote, a.at).is_some() {
            return Decision::Refuse(RejectReason::BlockedCaller { number: remote.to_owned() });
        }
        if let Some(p) = self.caller_config.premium_prefix(remote) {
            return Decision::Refuse(RejectReason::PremiumRate { prefix: p.to_owned() });
        }
        if let Err(over) = self.callers.admit(&self.caller_config, a.tenant, remote, a.at) {
            return Decision::Refuse(RejectReason::CallerRate {
                calls: over.calls,
                limit: self.caller_config.max_calls_per_window,
                window_secs: self.caller_config.window_secs,
            });
        }
        match self.quotas.admit(a.tenant, a.call, quota, a.at) {
            Admission::Accept { warn } => Decision::Accept { warn },
            Admission::Refuse(r) => {
                self.callers.forget(a.tenant, remote, a.at);
                Decision::Refuse(r)
            }
        }
    }

    /// Refuses `account`'s calls, and its subaccounts', until `until` (its budget is spent).
    /// Returns whether this is news (no stop as long was in force), so a stop learnt twice (from
    /// the judgement and from its recorded event) acts once.
    pub fn stop_for_budget(&mut self, account: AccountSid, until: Timestamp, budget_micros: u64) -> bool {
        match self.budget_stops.get_mut(&account) {
            Some(e) if e.0 >= until => false,
            Some(e) => {
                *e = (until, budget_micros);
                true
            }
            None => {
                self.budget_stops.insert(account, (until, budget_micros));
                true
            }
        }
    }

    /// The call ended: its concurrency slot is free again.
    pub fn release(&mut self, tenant: AccountSid, call: CallSid) {
        let quota = self.directory.tenant(tenant).map(|t| t.quota).unwrap_or_else(|| self.directory.default_quota());
        self.quotas.release(tenant, call, quota);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::directory::{Quota, SeedTenant};
    use crate::tenancy::{Sealer, Secret};
    use voxgate_protocol::{Envelope, EventId};

    const A: AccountSid = AccountSid::from_u128(0xa);
    const B: AccountSid = AccountSid::from_u128(0xb);

    fn gate() -> Gate {
        let mut d = Directory::new(Quota { max_concurrent_calls: 2, calls_per_second: 100 });
        let seed = |sid, n: &str| SeedTenant {
            sid,
            auth_token: Secret::new("0123456789abcdef"),
            friendly_name: None,
            numbers: vec![(n.into(), Default::default())],
            quota: None,
            hints: String::new(),
        };
        d.seed(&[seed(A, "+14155550100"), seed(B, "+14155550200")]);
        Gate::new(d, CallerConfig { max_calls_per_window: 3, ..Default::default() })
    }

    fn attempt<'a>(tenant: AccountSid, call: u128, from: &'a str, to: &'a str) -> CallAttempt<'a> {
        CallAttempt {
            tenant,
            call: CallSid::from_u128(call),
            from,
            to,
            direction: Direction::Inbound,
            at: Timestamp(call as i64),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let mut g = gate();
        // Tenant A cannot take a call to B's number.
        assert_eq!(
            g.decide(&attempt(A, 1, "+15550001", "+14155550200")),
            Decision::Refuse(RejectReason::UnknownNumber)
        );
        // Premium-rate caller.
        assert_eq!(
            g.decide(&attempt(A, 2, "+19005550000", "+14155550100")),
            Decision::Refuse(RejectReason::PremiumRate { prefix: "+1900".into() })
        );
        // Blocked caller (platform-wide list).
        g.caller_config.blocked_numbers.push("+15550666".into());
        assert_eq!(
            g.decide(&attempt(A, 3, "+15550666", "+14155550100")),
            Decision::Refuse(RejectReason::BlockedCaller { number: "+15550666".into() })
        );
        // Concurrency: 2 allowed, warning at the 2nd (70 % of 2 rounds up to 2), refusal at the 3rd.
        assert_eq!(g.decide(&attempt(A, 10, "+15550001", "+14155550100")), Decision::Accept { warn: None });
        assert_eq!(g.decide(&attempt(A, 11, "+15550002", "+14155550100")), Decision::Accept { warn: Some((2, 2)) });
        assert_eq!(
            g.decide(&attempt(A, 12, "+15550003", "+14155550100")),
            Decision::Refuse(RejectReason::ConcurrencyQuota { active: 2, limit: 2 })
        );
        // B is not affected by A's full quota.
        assert_eq!(g.decide(&attempt(B, 20, "+15550003", "+14155550200")), Decision::Accept { warn: None });
        // A quota refusal does not count against the caller: +15550003 still has 3 calls to A.
        g.release(A, CallSid::from_u128(10));
        g.release(A, CallSid::from_u128(11));
        for i in 0..2 {
            assert!(matches!(g.decide(&attempt(A, 30 + i, "+15550003", "+14155550100")), Decision::Accept { .. }));
            g.release(A, CallSid::from_u128(30 + i));
        }
        assert!(matches!(g.decide(&attempt(A, 40, "+15550003", "+14155550100")), Decision::Accept { .. }));
        assert_eq!(
            g.decide(&attempt(A, 41, "+15550003", "+14155550100")),
            Decision::Refuse(RejectReason::CallerRate { calls: 3, limit: 3, window_secs: 3600 })
        );
    }

    #[test]
    fn suspended_tenants_are_refused() {
        let mut g = gate();
        let ev = g.directory.update_tenant(A, None, Some(TenantStatus::Suspended), false).unwrap();
        let env = Envelope { event_id: EventId(1), tenant: A, call: None, occurred_at: Timestamp(0), payload: ev };
        g.directory.apply(&env, &Sealer::new(&[0; 32])).unwrap();
        assert_eq!(
            g.decide(&attempt(A, 1, "+15550001", "+14155550100")),
            Decision::Refuse(RejectReason::TenantInactive { status: TenantStatus::Suspended })
        );
    }
}
