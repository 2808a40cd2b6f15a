//! The tenant directory: who the tenants are, what they own, their quotas and block lists. A
//! projection of the `tenants` log; commands are checked here and turned into the events the node
//! appends, so the rules hold the same way on a live node and on replay.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use voxgate_protocol::event::{
    CallerBlocked, CallerUnblocked, NumberAssigned, NumberReleased, NumberRouted, NumberRouting, OperatorStatusSet,
    QuotaSet, SpeechHintsSet, TenantCreated, TenantStatus, TenantUpdated,
};
use voxgate_protocol::{AccountSid, Envelope, Event, PhoneNumberSid, Timestamp};

use super::secret::{Sealer, Secret, SecretError};
use super::{is_e164, limits};

/// A tenant's call quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Calls in progress at once (runbook default 100).
    pub max_concurrent_calls: u32,
    /// New calls accepted per second (runbook default 10).
    pub calls_per_second: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Self { max_concurrent_calls: 100, calls_per_second: 10 }
    }
}

impl Quota {
    pub const MAX_CONCURRENT: u32 = 1_000_000;
    pub const MAX_PER_SECOND: u32 = 100_000;

    pub fn validate(&self) -> Result<(), TenancyError> {
        if self.max_concurrent_calls > Self::MAX_CONCURRENT {
            return Err(TenancyError::Invalid {
                field: "MaxConcurrentCalls",
                reason: format!("at most {}", Self::MAX_CONCURRENT),
            });
        }
        if self.calls_per_second > Self::MAX_PER_SECOND {
            return Err(TenancyError::Invalid {
                field: "CallsPerSecond",
                reason: format!("at most {}", Self::MAX_PER_SECOND),
            });
        }
        Ok(())
    }
}

/// One tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    pub sid: AccountSid,
    pub parent: Option<AccountSid>,
    pub friendly_name: String,
    pub status: TenantStatus,
    pub auth_token: Secret,
    pub quota: Quota,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Declared in the config file (not created over the API).
    pub from_config: bool,
    /// The operator suspended or closed it: only the operator reactivates it (not its parent).
    pub operator_hold: bool,
    /// Vocabulary hints for its calls' speech (Whisper's initial prompt); empty: none.
    pub hints: String,
}

/// One phone number and its owner.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberRecord {
    pub sid: PhoneNumberSid,
    pub number: String,
    pub tenant: AccountSid,
    pub friendly_name: String,
    pub created_at: Timestamp,
    /// Where its calls go: the customer's app (gateway mode) or voxgate itself.
    pub routing: NumberRouting,
}

/// A blocked caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub reason: String,
    pub until: Option<Timestamp>,
    pub since: Timestamp,
}

/// Why a command is refused, with Twilio's code for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TenancyError {
    #[error("the requested resource {0} was not found")]
    NotFound(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a subaccount cannot have subaccounts ({0} is a subaccount)")]
    SubaccountParent(AccountSid),
    #[error("account {0} is closed; a closed account cannot change status")]
    Closed(AccountSid),
    #[error("the parent account {0} is not active")]
    ParentInactive(AccountSid),
    #[error("account {0} was suspended by the operator; only the operator can reactivate it")]
    OperatorHold(AccountSid),
    #[error("account {0} already exists")]
    Exists(AccountSid),
    #[error("phone number {number} already belongs to an account")]
    NumberTaken { number: String },
    #[error("account {0} is declared in the config file; change it there")]
    ConfigOwned(AccountSid),
    #[error("sealed auth token of {tenant}: {source}")]
    Sealed { tenant: AccountSid, source: SecretError },
}

impl TenancyError {
    /// Twilio's error code and HTTP status for this refusal.
    pub fn code_and_status(&self) -> (u32, u16) {
        match self {
            Self::NotFound(_) => (20404, 404),
            Self::Invalid { .. } => (20422, 400),
            Self::SubaccountParent(_) => (21101, 400),
            Self::Closed(_) => (21479, 400),
            Self::ParentInactive(_) => (21476, 400),
            Self::OperatorHold(_) => (20403, 403),
            Self::Exists(_) => (20409, 409),
            Self::NumberTaken { .. } => (21422, 409),
            Self::ConfigOwned(_) => (20422, 409),
            Self::Sealed { .. } => (20500, 500),
        }
    }
}

/// Checks a number's routing as Twilio would: URLs are http(s) and at most 4000 characters, and a
/// fallback needs a voice URL (Twilio's 21405). Whether a URL may be reached (public addresses
/// only) is the node's check.
pub fn check_routing(r: &NumberRouting) -> Result<(), TenancyError> {
    for (field, url) in [
        ("VoiceUrl", &r.voice_url),
        ("VoiceFallbackUrl", &r.voice_fallback_url),
        ("StatusCallback", &r.status_callback),
    ] {
        if let Some(u) = url {
            check_len(field, u, limits::URL)?;
            let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/'))
                || u.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(TenancyError::Invalid { field, reason: format!("{:?} is not an http(s) URL", shown(u)) });
            }
        }
    }
    if r.voice_fallback_url.is_some() && r.voice_url.is_none() {
        return Err(TenancyError::Invalid { field: "VoiceFallbackUrl", reason: "needs a VoiceUrl (21405)".into() });
    }
    Ok(())
}

fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks a user-provided string against its length limit; the error names the field.
pub fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), TenancyError> {
    let n = value.chars().count();
    if n > max {
        return Err(TenancyError::Invalid { field, reason: format!("is {n} characters; at most {max} are allowed") });
    }
    Ok(())
}

/// Vocabulary hints are at most [`limits::HINTS`] characters, without control characters.
pub fn check_hints(hints: &str) -> Result<(), TenancyError> {
    check_len("Hints", hints, limits::HINTS)?;
    if hints.chars().any(char::is_control) {
        return Err(TenancyError::Invalid { field: "Hints", reason: "must not hold control characters".into() });
    }
    Ok(())
}

/// A config-file tenant, as the node hands it over.
#[derive(Debug, Clone)]
pub struct SeedTenant {
    pub sid: AccountSid,
    pub auth_token: Secret,
    pub friendly_name: Option<String>,
    /// Each number with its routing (the config file's `numbers`).
    pub numbers: Vec<(String, NumberRouting)>,
    pub quota: Option<Quota>,
    /// Vocabulary hints for its calls' speech (the config file's `hints`).
    pub hints: String,
}

/// The projection.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    tenants: BTreeMap<AccountSid, TenantRecord>,
    numbers: BTreeMap<PhoneNumberSid, NumberRecord>,
    by_number: HashMap<String, PhoneNumberSid>,
    blocks: HashMap<AccountSid, BTreeMap<String, Block>>,
    default_quota: Quota,
}

impl Directory {
    pub fn new(default_quota: Quota) -> Self {
        Self { default_quota, ..Default::default() }
    }

    /// Adds the config-file tenants (before any event is applied). Their numbers get SIDs derived
    /// from the number, so they are stable across restarts.
    pub fn seed(&mut self, seeds: &[SeedTenant]) {
        for s in seeds {
            self.tenants.insert(
                s.sid,
                TenantRecord {
                    sid: s.sid,
                    parent: None,
                    friendly_name: s.friendly_name.clone().unwrap_or_else(|| s.sid.to_string()),
                    status: TenantStatus::Active,
                    auth_token: s.auth_token.clone(),
                    quota: s.quota.unwrap_or(self.default_quota),
                    created_at: Timestamp(0),
                    updated_at: Timestamp(0),
                    from_config: true,
                    operator_hold: false,
                    hints: s.hints.clone(),
                },
            );
            for (n, routing) in &s.numbers {
                let sid = number_sid(n);
                self.by_number.insert(n.clone(), sid);
                self.numbers.insert(
                    sid,
                    NumberRecord {
                        sid,
                        number: n.clone(),
                        tenant: s.sid,
                        friendly_name: n.clone(),
                        created_at: Timestamp(0),
                        routing: routing.clone(),
                    },
                );
            }
        }
    }

    pub fn default_quota(&self) -> Quota {
        self.default_quota
    }

    pub fn tenant(&self, sid: AccountSid) -> Option<&TenantRecord> {
        self.tenants.get(&sid)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantRecord> {
        self.tenants.values()
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The status that applies: a subaccount of a suspended or closed parent is not active either.
    pub fn effective_status(&self, sid: AccountSid) -> Option<TenantStatus> {
        let t = self.tenants.get(&sid)?;
        let parent = t.parent.and_then(|p| self.tenants.get(&p)).map(|p| p.status);
        Some(match (t.status, parent) {
            (TenantStatus::Closed, _) | (_, Some(TenantStatus::Closed)) => TenantStatus::Closed,
            (TenantStatus::Suspended, _) | (_, Some(TenantStatus::Suspended)) => TenantStatus::Suspended,
            _ => TenantStatus::Active,
        })
    }

    /// True when `who` may act on `target`'s data: itself, or its parent.
    pub fn may_access(&self, who: AccountSid, target: AccountSid) -> bool {
        who == target || self.tenants.get(&target).is_some_and(|t| t.parent == Some(who))
    }

    /// The tenant owning `number` (E.164).
    pub fn owner_of(&self, number: &str) -> Option<&NumberRecord> {
        self.by_number.get(number).and_then(|sid| self.numbers.get(sid))
    }

    pub fn number(&self, sid: PhoneNumberSid) -> Option<&NumberRecord> {
        self.numbers.get(&sid)
    }

    pub fn numbers_of(&self, tenant: AccountSid) -> impl Iterator<Item = &NumberRecord> {
        self.numbers.values().filter(move |n| n.tenant == tenant)
    }

    /// The block on `number` for `tenant` that is in force at `now`.
    pub fn block(&self, tenant: AccountSid, number: &str, now: Timestamp) -> Option<&Block> {
        self.blocks.get(&tenant)?.get(number).filter(|b| b.until.is_none_or(|u| now < u))
    }

    /// Adds (or extends) a block that does not come from the tenants log (a fraud verdict).
    pub fn add_block(&mut self, tenant: AccountSid, number: &str, block: Block) {
        let m = self.blocks.entry(tenant).or_default();
        match m.get(number) {
            // A permanent block, or one lasting longer, stays as it is.
            Some(b) if b.until.is_none() || b.until >= block.until => {}
            _ => {
                m.insert(number.to_owned(), block);
            }
        }
    }

    pub fn blocks_of(&self, tenant: AccountSid) -> impl Iterator<Item = (&String, &Block)> {
        self.blocks.get(&tenant).into_iter().flatten()
    }

    // ----- commands: check, then give the event to append (the envelope's tenant is the subject)

    /// A new tenant; `parent` makes it a subaccount.
    pub fn create_tenant(
        &self,
        sid: AccountSid,
        parent: Option<AccountSid>,
        friendly_name: &str,
        sealed_auth_token: Bytes,
    ) -> Result<Event, TenancyError> {
        check_len("FriendlyName", friendly_name, limits::FRIENDLY_NAME)?;
        if self.tenants.contains_key(&sid) {
            return Err(TenancyError::Exists(sid));
        }
        if let Some(p) = parent {
            let pt = self.tenants.get(&p).ok_or_else(|| TenancyError::NotFound(format!("account {p}")))?;
            if pt.parent.is_some() {
                return Err(TenancyError::SubaccountParent(p));
            }
            if pt.status != TenantStatus::Active {
                return Err(TenancyError::ParentInactive(p));
            }
        }
        Ok(Event::TenantCreated(TenantCreated {
            friendly_name: friendly_name.to_owned(),
            parent,
            sealed_auth_token,
            status: TenantStatus::Active,
        }))
    }

    /// A change of name and/or status. Closed is permanent; a subaccount cannot be reactivated
    /// under an inactive parent.
    /// `by_operator`: the operator (admin token) asks; otherwise the tenant or its parent, who
    /// cannot reactivate an account the operator holds.
    pub fn update_tenant(
        &self,
        sid: AccountSid,
        friendly_name: Option<&str>,
        status: Option<TenantStatus>,
        by_operator: bool,
    ) -> Result<Event, TenancyError> {
        let t = self.tenants.get(&sid).ok_or_else(|| TenancyError::NotFound(format!("account {sid}")))?;
        if let Some(n) = friendly_name {
            check_len("FriendlyName", n, limits::FRIENDLY_NAME)?;
        }
        if let Some(s) = status {
            if t.status == TenantStatus::Closed && s != TenantStatus::Closed {
                return Err(TenancyError::Closed(sid));
            }
            if let Some(p) = t.parent.and_then(|p| self.tenants.get(&p)) {
                if s == TenantStatus::Active && p.status != TenantStatus::Active {
                    return Err(TenancyError::ParentInactive(p.sid));
                }
            }
            if by_operator {
                return Ok(Event::OperatorStatusSet(OperatorStatusSet {
                    status: s,
                    friendly_name: friendly_name.map(str::to_owned),
                }));
            }
            if t.operator_hold && s != t.status {
                return Err(TenancyError::OperatorHold(sid));
            }
        }
        Ok(Event::TenantUpdated(TenantUpdated {
            friendly_name: friendly_name.map(str::to_owned),
            status,
            sealed_auth_token: None,
        }))
    }

    /// Gives `number` to `tenant`; a number belongs to exactly one tenant.
    pub fn assign_number(
        &self,
        tenant: AccountSid,
        sid: PhoneNumberSid,
        number: &str,
        friendly_name: Option<&str>,
    ) -> Result<Event, TenancyError> {
        self.tenants.get(&tenant).ok_or_else(|| TenancyError::NotFound(format!("account {tenant}")))?;
        if !is_e164(number) {
            return Err(TenancyError::Invalid {
                field: "PhoneNumber",
                reason: format!("{number:?} is not an E.164 number (+ then 2 to 15 digits, the first not 0)"),
            });
        }
        if let Some(n) = friendly_name {
            check_len("FriendlyName", n, limits::FRIENDLY_NAME)?;
        }
        if self.by_number.contains_key(number) {
            return Err(TenancyError::NumberTaken { number: number.to_owned() });
        }
        Ok(Event::NumberAssigned(NumberAssigned {
            sid,
            number: number.to_owned(),
            friendly_name: friendly_name.unwrap_or(number).to_owned(),
        }))
    }

    /// `tenant` routes its number `sid` (the number may be one this same command assigns:
    /// `assigned` names it then).
    pub fn route_number(
        &self,
        tenant: AccountSid,
        sid: PhoneNumberSid,
        assigned: Option<&str>,
        routing: NumberRouting,
    ) -> Result<Event, TenancyError> {
        let number = match assigned {
            Some(n) => n.to_owned(),
            None => self
                .numbers
                .get(&sid)
                .filter(|n| n.tenant == tenant)
                .ok_or_else(|| TenancyError::NotFound(format!("phone number {sid}")))?
                .number
                .clone(),
        };
        check_routing(&routing)?;
        Ok(Event::NumberRouted(NumberRouted { sid, number, routing }))
    }

    /// `tenant` gives up the number `sid`.
    pub fn release_number(&self, tenant: AccountSid, sid: PhoneNumberSid) -> Result<Event, TenancyError> {
        let n = self
            .numbers
            .get(&sid)
            .filter(|n| n.tenant == tenant)
            .ok_or_else(|| TenancyError::NotFound(format!("phone number {sid}")))?;
        Ok(Event::NumberReleased(NumberReleased { sid, number: n.number.clone() }))
    }

    pub fn set_quota(&self, tenant: AccountSid, quota: Quota) -> Result<Event, TenancyError> {
        self.tenants.get(&tenant).ok_or_else(|| TenancyError::NotFound(format!("account {tenant}")))?;
        quota.validate()?;
        Ok(Event::QuotaSet(QuotaSet {
            max_concurrent_calls: quota.max_concurrent_calls,
            calls_per_second: quota.calls_per_second,
        }))
    }

    /// The vocabulary hints of the tenant's calls: comma-separated words and phrases, at most
    /// [`limits::HINTS`] characters, no control characters; empty clears them.
    pub fn set_hints(&self, tenant: AccountSid, hints: &str) -> Result<Event, TenancyError> {
        self.tenants.get(&tenant).ok_or_else(|| TenancyError::NotFound(format!("account {tenant}")))?;
        let hints = hints.trim();
        check_hints(hints)?;
        Ok(Event::SpeechHintsSet(SpeechHintsSet { hints: hints.to_owned() }))
    }

    pub fn block_caller(
        &self,
        tenant: AccountSid,
        number: &str,
        reason: &str,
        until: Option<Timestamp>,
    ) -> Result<Event, TenancyError> {
        self.tenants.get(&tenant).ok_or_else(|| TenancyError::NotFound(format!("account {tenant}")))?;
        if number.is_empty() {
            return Err(TenancyError::Invalid { field: "PhoneNumber", reason: "is required".into() });
        }
        check_len("PhoneNumber", number, 64)?;
        check_len("Reason", reason, limits::FRIENDLY_NAME)?;
        Ok(Event::CallerBlocked(CallerBlocked { number: number.to_owned(), reason: reason.to_owned(), until }))
    }

    pub fn unblock_caller(&self, tenant: AccountSid, number: &str) -> Result<Event, TenancyError> {
        if !self.blocks.get(&tenant).is_some_and(|b| b.contains_key(number)) {
            return Err(TenancyError::NotFound(format!("blocked number {number}")));
        }
        Ok(Event::CallerUnblocked(CallerUnblocked { number: number.to_owned() }))
    }

    // ----- the projection

    /// Applies one event of the `tenants` log. Events that are not about tenancy are ignored; an
    /// event that contradicts the directory (a replayed duplicate) leaves it unchanged.
    pub fn apply(&mut self, env: &Envelope, sealer: &Sealer) -> Result<(), TenancyError> {
        let sid = env.tenant;
        let at = env.occurred_at;
        match &env.payload {
            Event::TenantCreated(c) => {
                if self.tenants.contains_key(&sid) {
                    return Ok(());
                }
                let auth_token = sealer
                    .open(sid, &c.sealed_auth_token)
                    .map_err(|source| TenancyError::Sealed { tenant: sid, source })?;
                self.tenants.insert(
                    sid,
                    TenantRecord {
                        sid,
                        parent: c.parent,
                        friendly_name: c.friendly_name.clone(),
                        status: c.status,
                        auth_token,
                        quota: self.default_quota,
                        created_at: at,
                        updated_at: at,
                        from_config: false,
                        operator_hold: false,
                        hints: String::new(),
                    },
                );
            }
            Event::TenantUpdated(u) => {
                let token = match &u.sealed_auth_token {
                    Some(s) => {
                        Some(sealer.open(sid, s).map_err(|source| TenancyError::Sealed { tenant: sid, source })?)
                    }
                    None => None,
                };
                if let Some(t) = self.tenants.get_mut(&sid) {
                    if let Some(n) = &u.friendly_name {
                        t.friendly_name.clone_from(n);
                    }
                    if let Some(s) = u.status {
                        t.status = s;
                    }
                    if let Some(tok) = token {
                        t.auth_token = tok;
                    }
                    t.updated_at = at;
                }
            }
            Event::OperatorStatusSet(o) => {
                if let Some(t) = self.tenants.get_mut(&sid) {
                    if t.status != TenantStatus::Closed {
                        t.status = o.status;
                    }
                    t.operator_hold = t.status != TenantStatus::Active;
                    if let Some(n) = &o.friendly_name {
                        t.friendly_name.clone_from(n);
                    }
                    t.updated_at = at;
                }
            }
            Event::NumberAssigned(n) => {
                if self.by_number.contains_key(&n.number) || self.numbers.contains_key(&n.sid) {
                    return Ok(());
                }
                self.by_number.insert(n.number.clone(), n.sid);
                self.numbers.insert(
                    n.sid,
                    NumberRecord {
                        sid: n.sid,
                        number: n.number.clone(),
                        tenant: sid,
                        friendly_name: n.friendly_name.clone(),
                        created_at: at,
                        routing: NumberRouting::default(),
                    },
                );
            }
            Event::NumberRouted(r) => {
                if let Some(n) = self.numbers.get_mut(&r.sid).filter(|n| n.tenant == sid) {
                    n.routing = r.routing.clone();
                }
            }
            Event::NumberReleased(n) if self.numbers.get(&n.sid).is_some_and(|r| r.tenant == sid) => {
                self.numbers.remove(&n.sid);
                self.by_number.remove(&n.number);
            }
            Event::QuotaSet(q) => {
                if let Some(t) = self.tenants.get_mut(&sid) {
                    t.quota =
                        Quota { max_concurrent_calls: q.max_concurrent_calls, calls_per_second: q.calls_per_second };
                    t.updated_at = at;
                }
            }
            Event::SpeechHintsSet(h) => {
                if let Some(t) = self.tenants.get_mut(&sid) {
                    t.hints.clone_from(&h.hints);
                    t.updated_at = at;
                }
            }
            Event::CallerBlocked(b) => {
                self.blocks
                    .entry(sid)
                    .or_default()
                    .insert(b.number.clone(), Block { reason: b.reason.clone(), until: b.until, since: at });
            }
            Event::CallerUnblocked(b) => {
                if let Some(m) = self.blocks.get_mut(&sid) {
                    m.remove(&b.number);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The SID of a config-file number: derived from the number, so stable across restarts.
pub fn number_sid(number: &str) -> PhoneNumberSid {
    let mut parts = [0u128; 2];
    for (i, chunk) in number.as_bytes().chunks(16).take(2).enumerate() {
        let mut b = [0u8; 16];
        b[..chunk.len()].copy_from_slice(chunk);
        parts[i] = u128::from_be_bytes(b);
    }
    PhoneNumberSid::from_u128(voxgate_protocol::EventId::derive(0x504e, &parts).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::EventId;

    const A: AccountSid = AccountSid::from_u128(0xa);
    const B: AccountSid = AccountSid::from_u128(0xb);
    const SUB: AccountSid = AccountSid::from_u128(0xa1);

    fn sealer() -> Sealer {
        Sealer::new(&[3; 32])
    }

    fn env(tenant: AccountSid, n: u128, payload: Event) -> Envelope {
        Envelope { event_id: EventId(n), tenant, call: None, occurred_at: Timestamp(n as i64 * 1000), payload }
    }

    /// Runs a command and applies its event, as the node does.
    fn run(
        d: &mut Directory,
        tenant: AccountSid,
        n: u128,
        command: impl FnOnce(&Directory) -> Result<Event, TenancyError>,
    ) -> Result<(), TenancyError> {
        let e = env(tenant, n, command(d)?);
        d.apply(&e, &sealer())
    }

    fn directory() -> Directory {
        let mut d = Directory::new(Quota::default());
        d.seed(&[SeedTenant {
            sid: A,
            auth_token: Secret::new("token-of-a-123456"),
            friendly_name: Some("A".into()),
            numbers: vec![("+14155550100".into(), Default::default())],
            quota: None,
            hints: String::new(),
        }]);
        let s = sealer();
        run(&mut d, B, 1, |d| d.create_tenant(B, None, "B", s.seal(B, "token-of-b-123456", [1; 12]))).unwrap();
        run(&mut d, SUB, 2, |d| d.create_tenant(SUB, Some(A), "A's sub", s.seal(SUB, "token-of-sub-1234", [2; 12])))
            .unwrap();
        d
    }

    #[test]
    fn tenants_numbers_and_access() {
        let mut d = directory();
        assert_eq!(d.len(), 3);
        assert!(d.tenant(B).is_some_and(|t| t.auth_token.matches("token-of-b-123456")));
        assert_eq!(d.owner_of("+14155550100").map(|n| n.tenant), Some(A));
        // Numbers belong to exactly one tenant; E.164 only.
        let taken = d.assign_number(B, PhoneNumberSid::from_u128(9), "+14155550100", None);
        assert!(matches!(taken, Err(TenancyError::NumberTaken { .. })));
        let bad = d.assign_number(B, PhoneNumberSid::from_u128(9), "4155550100", None);
        assert!(matches!(bad, Err(TenancyError::Invalid { field: "PhoneNumber", .. })));
        run(&mut d, B, 3, |d| d.assign_number(B, PhoneNumberSid::from_u128(9), "+14155550199", Some("main"))).unwrap();
        assert_eq!(d.owner_of("+14155550199").map(|n| n.tenant), Some(B));
        // Only the owner releases it.
        assert!(d.release_number(A, PhoneNumberSid::from_u128(9)).is_err());
        run(&mut d, B, 4, |d| d.release_number(B, PhoneNumberSid::from_u128(9))).unwrap();
        assert!(d.owner_of("+14155550199").is_none());
        // A parent reaches its subaccount; nobody reaches an unrelated tenant.
        assert!(d.may_access(A, SUB) && d.may_access(A, A));
        assert!(!d.may_access(A, B) && !d.may_access(B, A) && !d.may_access(SUB, A));
    }

    #[test]
    fn hints_are_checked_set_and_cleared_per_tenant() {
        let mut d = directory();
        run(&mut d, B, 3, |d| d.set_hints(B, "  Kathryn Smyth, voxgate ")).unwrap();
        assert_eq!(d.tenant(B).map(|t| t.hints.as_str()), Some("Kathryn Smyth, voxgate"));
        assert_eq!(d.tenant(A).map(|t| t.hints.as_str()), Some(""), "another tenant's hints are its own");
        let long = d.set_hints(B, &"x".repeat(limits::HINTS + 1));
        assert!(matches!(long, Err(TenancyError::Invalid { field: "Hints", .. })));
        let control = d.set_hints(B, "a\u{0}b");
        assert!(matches!(control, Err(TenancyError::Invalid { field: "Hints", .. })));
        assert!(matches!(d.set_hints(AccountSid::from_u128(0xee), "x"), Err(TenancyError::NotFound(_))));
        run(&mut d, B, 4, |d| d.set_hints(B, "")).unwrap();
        assert_eq!(d.tenant(B).map(|t| t.hints.as_str()), Some(""));
    }

    #[test]
    fn lifecycle_rules() {
        let mut d = directory();
        // Subaccounts cannot have subaccounts.
        let e = d.create_tenant(AccountSid::from_u128(0xa2), Some(SUB), "x", Bytes::new());
        assert!(matches!(e, Err(TenancyError::SubaccountParent(_))));
        assert!(matches!(d.create_tenant(B, None, "again", Bytes::new()), Err(TenancyError::Exists(_))));
        // Suspending the parent suspends the subaccount; it cannot be reactivated under it.
        run(&mut d, A, 5, |d| d.update_tenant(A, None, Some(TenantStatus::Suspended), false)).unwrap();
        assert_eq!(d.effective_status(SUB), Some(TenantStatus::Suspended));
        assert!(matches!(
            d.update_tenant(SUB, None, Some(TenantStatus::Active), false),
            Err(TenancyError::ParentInactive(_))
        ));
        run(&mut d, A, 6, |d| d.update_tenant(A, None, Some(TenantStatus::Active), false)).unwrap();
        assert_eq!(d.effective_status(SUB), Some(TenantStatus::Active));
        // Closed is permanent.
        run(&mut d, B, 7, |d| d.update_tenant(B, None, Some(TenantStatus::Closed), false)).unwrap();
        assert!(matches!(d.update_tenant(B, None, Some(TenantStatus::Active), false), Err(TenancyError::Closed(_))));
        // The operator's suspension holds against the parent; the operator lifts it.
        run(&mut d, SUB, 11, |d| d.update_tenant(SUB, None, Some(TenantStatus::Suspended), true)).unwrap();
        assert_eq!(d.effective_status(SUB), Some(TenantStatus::Suspended));
        let e = d.update_tenant(SUB, None, Some(TenantStatus::Active), false);
        assert!(matches!(e, Err(TenancyError::OperatorHold(_))), "{e:?}");
        run(&mut d, SUB, 12, |d| d.update_tenant(SUB, Some("renamed"), None, false)).unwrap();
        run(&mut d, SUB, 13, |d| d.update_tenant(SUB, None, Some(TenantStatus::Active), true)).unwrap();
        assert_eq!(d.effective_status(SUB), Some(TenantStatus::Active));
        // A parent's own suspension it can lift.
        run(&mut d, SUB, 14, |d| d.update_tenant(SUB, None, Some(TenantStatus::Suspended), false)).unwrap();
        run(&mut d, SUB, 15, |d| d.update_tenant(SUB, None, Some(TenantStatus::Active), false)).unwrap();
        assert_eq!(d.effective_status(SUB), Some(TenantStatus::Active));
        // Length limits name the field.
        let long = "x".repeat(256);
        let e = d.update_tenant(A, Some(&long), None, false).unwrap_err();
        assert!(e.to_string().starts_with("FriendlyName: is 256 characters"), "{e}");
    }

    #[test]
    fn quotas_and_blocks() {
        let mut d = directory();
        assert_eq!(d.tenant(B).map(|t| t.quota), Some(Quota::default()));
        let q = Quota { max_concurrent_calls: 3, calls_per_second: 1 };
        run(&mut d, B, 8, |d| d.set_quota(B, q)).unwrap();
        assert_eq!(d.tenant(B).map(|t| t.quota), Some(q));
        // A's quota is its own: the subaccount keeps the default.
        assert_eq!(d.tenant(SUB).map(|t| t.quota), Some(Quota::default()));
        run(&mut d, B, 9, |d| d.block_caller(B, "+15550001", "abuse", Some(Timestamp(20_000)))).unwrap();
        assert!(d.block(B, "+15550001", Timestamp(10_000)).is_some());
        assert!(d.block(B, "+15550001", Timestamp(20_000)).is_none(), "expired");
        assert!(d.block(A, "+15550001", Timestamp(10_000)).is_none(), "per tenant");
        run(&mut d, B, 10, |d| d.unblock_caller(B, "+15550001")).unwrap();
        assert!(d.block(B, "+15550001", Timestamp(0)).is_none());
    }

    #[test]
    fn replay_rebuilds_the_same_directory_and_tampering_is_refused() {
        let s = sealer();
        let events = vec![
            env(
                B,
                1,
                Event::TenantCreated(TenantCreated {
                    friendly_name: "B".into(),
                    parent: None,
                    sealed_auth_token: s.seal(B, "token-of-b-123456", [1; 12]),
                    status: TenantStatus::Active,
                }),
            ),
            env(B, 2, Event::QuotaSet(QuotaSet { max_concurrent_calls: 5, calls_per_second: 2 })),
        ];
        let build = || {
            let mut d = Directory::new(Quota::default());
            for e in &events {
                d.apply(e, &s).unwrap();
                d.apply(e, &s).unwrap(); // a duplicate changes nothing
            }
            d
        };
        let (a, b) = (build(), build());
        assert_eq!(a.tenant(B), b.tenant(B));
        assert_eq!(a.tenant(B).map(|t| t.quota.max_concurrent_calls), Some(5));
        // Under another key the token does not open: an error, not a silent tenant without one.
        let mut d = Directory::new(Quota::default());
        assert!(matches!(d.apply(&events[0], &Sealer::new(&[4; 32])), Err(TenancyError::Sealed { .. })));
    }
}
