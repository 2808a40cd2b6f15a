//! The node's tenancy service: the tenant directory projected from the `tenants` log (config-file
//! tenants first), the webhook gate, the REST throttle, the secrets key that seals auth tokens, and
//! who a REST request is (admin or tenant).
//!
//! Commands run one at a time: check against the directory, append the event durably, then apply
//! it, so two requests can never both take the same phone number.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::{header, HeaderMap};
use base64::Engine;
use voxgate_actors::tenancy::directory::{SeedTenant, TenancyError};
use voxgate_actors::tenancy::gate::{CallAttempt, Decision, Gate};
use voxgate_actors::tenancy::lockout::{Key, LockedOut, Lockout};
use voxgate_actors::tenancy::throttle::{Throttle, Throttled};
use voxgate_actors::tenancy::{Directory, Sealer, Secret};
use voxgate_protocol::{AccountSid, CallSid, Clock, Envelope, Event, EventId, Timestamp};
use voxgate_storage::{topics, Log};

use crate::config::Config;

/// Who is making a REST request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// The operator (admin token).
    Admin,
    /// A tenant, with its own credentials.
    Tenant(AccountSid),
}

/// Why a REST request is refused before it reaches a resource.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: use HTTP Basic auth with AccountSid:AuthToken")]
    Missing,
    #[error("authentication failed")]
    Invalid,
    #[error("account {0} is not active")]
    Inactive(AccountSid),
}

/// Failure to bring the tenancy service up.
#[derive(Debug, thiserror::Error)]
pub enum TenancyStartError {
    #[error("secrets key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("reading the tenants log: {0}")]
    Log(#[from] voxgate_storage::StorageError),
    #[error("tenants log offset {offset}: {reason}")]
    Event { offset: u64, reason: String },
}

/// Why a command did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rule(#[from] TenancyError),
    #[error("event log unavailable: {0}")]
    Log(#[from] voxgate_storage::StorageError),
}

/// Tenant label values for metrics, bounded: the first `max` tenants seen are labelled with their
/// AccountSid, every later one with `other`, so no number of tenants can blow up the series count
/// (config `metrics_tenant_labels`, default 100).
pub struct TenantLabels {
    max: usize,
    seen: Mutex<std::collections::HashMap<AccountSid, String>>,
}

impl TenantLabels {
    pub fn new(max: usize) -> Self {
        Self { max, seen: Mutex::new(std::collections::HashMap::new()) }
    }

    pub fn label(&self, sid: AccountSid) -> String {
        let mut seen = lock(&self.seen);
        if let Some(l) = seen.get(&sid) {
            return l.clone();
        }
        if seen.len() < self.max {
            let l = sid.to_string();
            seen.insert(sid, l.clone());
            return l;
        }
        "other".to_owned()
    }
}

pub struct Tenancy {
    pub labels: Arc<TenantLabels>,
    gate: Arc<Mutex<Gate>>,
    sealer: Sealer,
    /// Keys the hashes analytics puts in place of redacted values (from the secrets key, so every
    /// node of a cluster hashes alike).
    analytics_key: [u8; 32],
    admin_token: Option<Secret>,
    throttle: Mutex<Throttle>,
    /// Failed sign-ins per account name and client address.
    lockout: Mutex<Lockout>,
    log: Log,
    clock: Arc<dyn Clock>,
    /// One command at a time (each is checked against the one before).
    commands: tokio::sync::Mutex<()>,
    /// The next offset of the `tenants` log to apply: the directory is always a prefix of the log,
    /// whichever node recorded the events. Only the follower ([`TenancyFollower`]) moves it on.
    applied: tokio::sync::watch::Sender<u64>,
    /// The follower stopped: commands fail at once instead of waiting for it.
    unfollowed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy").finish_non_exhaustive()
    }
}

/// Holds a call's place in its tenant's concurrency quota; dropping it (when the call actor ends)
/// frees the place.
pub struct QuotaSlot {
    gate: Arc<Mutex<Gate>>,
    labels: Arc<TenantLabels>,
    tenant: AccountSid,
    call: CallSid,
}

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        let active = {
            let mut g = lock(&self.gate);
            g.release(self.tenant, self.call);
            g.quotas.active(self.tenant)
        };
        metrics::gauge!("voxgate_tenant_active_calls", "tenant" => self.labels.label(self.tenant))
            .set(f64::from(active));
    }
}

/// A key for one purpose, derived from the secrets key (HMAC-SHA256).
fn derive_key(key: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(purpose);
    m.finalize().into_bytes().into()
}

/// The user name of a Basic `Authorization` header (`admin` for a Bearer token), unchecked.
fn presented_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some("admin".into());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    Some(raw.split_once(':').map_or(&*raw, |(u, _)| u).to_owned())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 32 random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source failing is not recoverable for key or token generation.
    if let Err(e) = getrandom::fill(&mut b) {
        panic!("the operating system's random source failed: {e}");
    }
    b
}

/// A fresh random 128-bit value (new SIDs, event ids of commands).
pub fn random_u128() -> u128 {
    u128::from_be_bytes(random_bytes::<16>())
}

/// A fresh auth token: 32 lowercase hex digits, like Twilio's.
pub fn new_auth_token() -> String {
    format!("{:032x}", random_u128())
}

/// Loads the secrets key: `secrets_key` from the config (64 hex digits), else the file
/// `secrets.key` in the data directory, created (mode 0600) with a random key on first start.
pub fn load_secrets_key(cfg: &Config) -> Result<[u8; 32], TenancyStartError> {
    if let Some(hex) = &cfg.secrets_key {
        return parse_key(hex.expose()).map_err(|reason| TenancyStartError::Key { path: "secrets_key".into(), reason });
    }
    let path = cfg.data_dir.join("secrets.key");
    let err = |reason: String| TenancyStartError::Key { path: path.display().to_string(), reason };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_key(text.trim()).map_err(err),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = random_bytes::<32>();
            write_key(&path, &key).map_err(|e| err(e.to_string()))?;
            tracing::info!(path = %path.display(), "created a new secrets key (keep it with the data: auth tokens are sealed with it)");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hex digits (32 bytes)".into());
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(k)
}

fn write_key(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    use std::io::Write;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(hex.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

impl Tenancy {
    /// Seeds the config-file tenants, then replays the `tenants` log.
    pub fn open(cfg: &Config, log: Log, clock: Arc<dyn Clock>) -> Result<Self, TenancyStartError> {
        let key = load_secrets_key(cfg)?;
        let sealer = Sealer::new(&key);
        let analytics_key = derive_key(&key, b"voxgate analytics redaction v1");
        let mut directory = Directory::new(cfg.default_quota);
        let seeds: Vec<SeedTenant> = cfg
            .tenants
            .iter()
            .map(|t| SeedTenant {
                sid: t.account_sid,
                auth_token: t.auth_token.clone(),
                friendly_name: t.friendly_name.clone(),
                numbers: t.routes.clone(),
                quota: t.quota,
                hints: t.hints.clone(),
            })
            .collect();
        directory.seed(&seeds);
        let applied = log.scan(topics::TENANTS, 0, 0, |r| {
            let bad = |reason: String| TenancyStartError::Event { offset: r.offset, reason };
            let env = voxgate_protocol::decode(r.payload()).map_err(|e| bad(e.to_string()))?;
            directory.apply(&env, &sealer).map_err(|e| bad(e.to_string()))
        })?;
        tracing::info!(tenants = directory.len(), events = applied, "tenant directory loaded");
        Ok(Self {
            labels: Arc::new(TenantLabels::new(cfg.metrics_tenant_labels)),
            gate: Arc::new(Mutex::new(Gate::new(directory, cfg.callers.clone()))),
            sealer,
            analytics_key,
            admin_token: cfg.admin_token.clone(),
            throttle: Mutex::new(Throttle::new(cfg.throttle)),
            lockout: Mutex::new(Lockout::new(cfg.throttle.lockout())),
            log,
            clock,
            commands: tokio::sync::Mutex::new(()),
            applied: tokio::sync::watch::Sender::new(applied),
            unfollowed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the follower goes on from: what [`Tenancy::open`] loaded.
    pub fn follow_from(&self) -> Vec<Vec<u64>> {
        vec![vec![*self.applied.borrow()]]
    }

    /// Waits (at most `within`) until the follower has applied the `tenants` log up to `next`.
    async fn applied_to(&self, next: u64, within: std::time::Duration) -> Result<(), CommandError> {
        let gone = || self.unfollowed.load(std::sync::atomic::Ordering::Acquire);
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(within, async { rx.wait_for(|n| *n >= next || gone()).await.is_ok() }).await;
        let why = if gone() {
            "the tenant directory no longer follows the log (the node is stopping)"
        } else if !matches!(reached, Ok(true)) {
            "the tenant directory is behind the log; try again"
        } else {
            return Ok(());
        };
        Err(CommandError::Log(voxgate_storage::StorageError::Engine(why.into())))
    }

    /// Reads the directory.
    pub fn read<R>(&self, f: impl FnOnce(&Directory) -> R) -> R {
        f(&lock(&self.gate).directory)
    }

    /// The auth token of a known tenant.
    pub fn token(&self, sid: AccountSid) -> Option<Secret> {
        self.read(|d| d.tenant(sid).map(|t| t.auth_token.clone()))
    }

    /// Decides a call (tenant known, signature checked).
    pub fn decide(&self, attempt: &CallAttempt<'_>) -> Decision {
        lock(&self.gate).decide(attempt)
    }

    /// The quota place of a call already in progress (restored after a restart): it counts
    /// again, whatever the quota says now.
    pub fn resume(&self, tenant: AccountSid, call: CallSid) -> QuotaSlot {
        lock(&self.gate).quotas.resume(tenant, call);
        self.slot(tenant, call)
    }

    /// The quota place of an accepted call, released when dropped.
    pub fn slot(&self, tenant: AccountSid, call: CallSid) -> QuotaSlot {
        let (active, limit) = {
            let g = lock(&self.gate);
            (g.quotas.active(tenant), g.directory.tenant(tenant).map_or(0, |t| t.quota.max_concurrent_calls))
        };
        let label = self.labels.label(tenant);
        metrics::gauge!("voxgate_tenant_active_calls", "tenant" => label.clone()).set(f64::from(active));
        metrics::gauge!("voxgate_tenant_max_concurrent_calls", "tenant" => label).set(f64::from(limit));
        QuotaSlot { gate: self.gate.clone(), labels: self.labels.clone(), tenant, call }
    }

    /// Adds a block decided outside the tenants log (a fraud verdict).
    pub fn add_block(&self, tenant: AccountSid, number: &str, block: voxgate_actors::tenancy::directory::Block) {
        lock(&self.gate).directory.add_block(tenant, number, block);
    }

    /// Refuses `account`'s calls, and its subaccounts', until `until` (its budget is spent);
    /// returns the calls in progress that the stop covers, to be ended (none if the stop was
    /// already in force: it is learnt both from the judgement and from its recorded event).
    pub fn stop_for_budget(
        &self,
        account: AccountSid,
        until: Timestamp,
        budget_micros: u64,
    ) -> Vec<(AccountSid, CallSid)> {
        let mut g = lock(&self.gate);
        if !g.stop_for_budget(account, until, budget_micros) {
            return Vec::new();
        }
        let covered: Vec<AccountSid> =
            g.directory.tenants().filter(|t| t.sid == account || t.parent == Some(account)).map(|t| t.sid).collect();
        covered.into_iter().flat_map(|t| g.quotas.active_calls(t).into_iter().map(move |c| (t, c))).collect()
    }

    /// Active calls of a tenant as the quota counts them.
    pub fn active_calls(&self, tenant: AccountSid) -> u32 {
        lock(&self.gate).quotas.active(tenant)
    }

    /// The key analytics hashes redacted values with.
    pub fn analytics_key(&self) -> [u8; 32] {
        self.analytics_key
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Checks, appends and applies one command about `tenant`; returns the event applied.
    pub async fn command(
        &self,
        tenant: AccountSid,
        check: impl FnOnce(&Directory) -> Result<Event, TenancyError>,
    ) -> Result<Envelope, CommandError> {
        let mut envs = self.command_many(tenant, |d| check(d).map(|e| vec![e])).await?;
        Ok(envs.remove(0))
    }

    /// [`Tenancy::command`] for a change that is several events (a number and its routing),
    /// appended together: all or none.
    pub async fn command_many(
        &self,
        tenant: AccountSid,
        check: impl FnOnce(&Directory) -> Result<Vec<Event>, TenancyError>,
    ) -> Result<Vec<Envelope>, CommandError> {
        let _one_at_a_time = self.commands.lock().await;
        // Checked against everything recorded so far, on any node.
        let head = self.log.durable_head(topics::TENANTS, 0)?;
        self.applied_to(head, std::time::Duration::from_secs(10)).await?;
        let payloads = check(&lock(&self.gate).directory)?;
        let now = self.clock.now();
        let envs: Vec<Envelope> = payloads
            .into_iter()
            .map(|payload| Envelope { event_id: EventId(random_u128()), tenant, call: None, occurred_at: now, payload })
            .collect();
        let encoded: Vec<Vec<u8>> = envs.iter().map(voxgate_protocol::encode).collect();
        let positions = self.log.append_many(topics::TENANTS, encoded.iter().map(|b| (0u64, b.as_slice()))).await?;
        let Some(at) = positions.last().copied() else {
            return Ok(envs);
        };
        // On a cluster the local mirror may show the event a moment after JetStream acknowledged
        // it; then it is applied in log order with whatever another node recorded just before.
        if !self.log.wait_readable(topics::TENANTS, at, std::time::Duration::from_secs(10)).await? {
            return Err(CommandError::Log(voxgate_storage::StorageError::Engine(
                "the change is recorded but not yet readable here; it applies once it is".into(),
            )));
        }
        self.applied_to(at.offset + 1, std::time::Duration::from_secs(10)).await?;
        // A number claimed through another node at the same moment: the log's first claim holds
        // and this one changed nothing, so it is refused as it would have been a moment later.
        for env in &envs {
            if let Event::NumberAssigned(n) = &env.payload {
                let ours = lock(&self.gate).directory.number(n.sid).is_some_and(|r| r.tenant == tenant);
                if !ours {
                    return Err(CommandError::Rule(TenancyError::NumberTaken { number: n.number.clone() }));
                }
            }
            tracing::info!(tenant = %tenant, kind = env.payload.kind(), "tenancy change recorded");
        }
        Ok(envs)
    }

    /// The keys a sign-in attempt is counted under: the account name it presents (whatever it
    /// is, before anything is checked) and the client's address.
    pub fn attempt_keys(headers: &HeaderMap, client: Option<std::net::IpAddr>) -> Vec<Key> {
        let mut keys = Vec::with_capacity(2);
        if let Some(user) = presented_user(headers) {
            keys.push(Key::account(&user));
        }
        if let Some(ip) = client {
            keys.push(Key::Addr(ip));
        }
        keys
    }

    /// Refuses a sign-in attempt under `keys` while they are locked out.
    pub fn check_lockout(&self, keys: &[Key]) -> Result<(), LockedOut> {
        lock(&self.lockout).check(keys, self.clock.now())
    }

    /// Counts a failed sign-in under `keys`.
    pub fn sign_in_failed(&self, keys: &[Key]) {
        lock(&self.lockout).failed(keys, self.clock.now());
    }

    /// Who sent this request: HTTP Basic `AccountSid:AuthToken` for a tenant; the admin token as
    /// Basic password (any user name) or as a Bearer token for the operator.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(AuthError::Missing)?;
        let (scheme, rest) = value.trim().split_once(' ').ok_or(AuthError::Invalid)?;
        let (user, password) = if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).map_err(|_| AuthError::Invalid)?;
            let raw = String::from_utf8(raw).map_err(|_| AuthError::Invalid)?;
            let (u, p) = raw.split_once(':').ok_or(AuthError::Invalid)?;
            (u.to_owned(), p.to_owned())
        } else if scheme.eq_ignore_ascii_case("bearer") {
            (String::new(), rest.trim().to_owned())
        } else {
            return Err(AuthError::Invalid);
        };
        self.sign_in(&user, &password)
    }

    /// Who these credentials are: the admin token (any user name) or a tenant's
    /// `AccountSid` and auth token (the REST API's Basic auth, the console's sign-in form).
    pub fn sign_in(&self, user: &str, password: &str) -> Result<Principal, AuthError> {
        if let Some(admin) = &self.admin_token {
            if password.starts_with("admin-") {
                return if admin.matches(password) { Ok(Principal::Admin) } else { Err(AuthError::Invalid) };
            }
        }
        let sid = AccountSid::parse(user).map_err(|_| AuthError::Invalid)?;
        let g = lock(&self.gate);
        let t = g.directory.tenant(sid).ok_or(AuthError::Invalid)?;
        if !t.auth_token.matches(password) {
            return Err(AuthError::Invalid);
        }
        if g.directory.effective_status(sid) != Some(voxgate_protocol::event::TenantStatus::Active) {
            return Err(AuthError::Inactive(sid));
        }
        Ok(Principal::Tenant(sid))
    }

    /// Counts a tenant's request against its throttle (the operator is not throttled).
    pub fn throttle(&self, who: Principal, endpoint: &'static str) -> Result<(), Throttled> {
        match who {
            Principal::Admin => Ok(()),
            Principal::Tenant(sid) => lock(&self.throttle).check(sid, endpoint, self.clock.now()),
        }
    }

    /// True when `who` may read or change `target`'s data (itself, its subaccount, or the operator).
    pub fn may_access(&self, who: Principal, target: AccountSid) -> bool {
        match who {
            Principal::Admin => true,
            Principal::Tenant(sid) => self.read(|d| d.may_access(sid, target)),
        }
    }
}

/// The tenants log on the follower harness: a tenant, number, quota or block recorded through any
/// node's REST API (this one's included) reaches this node's gate. It goes on from where
/// [`Tenancy::open`] loaded the log. An event that cannot be applied here (sealed with another
/// secrets key) is reported and skipped, never the end of the follower.
pub struct TenancyFollower(pub Arc<Tenancy>);

impl voxgate_actors::follow::Follower for TenancyFollower {
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "tenancy";
    const TOPICS: &'static [&'static str] = &[topics::TENANTS];
    const LAG: &'static str = topics::TENANTS;

    fn apply(&mut self, _: &'static str, env: Envelope) {
        let t = &self.0;
        if let Err(e) = lock(&t.gate).directory.apply(&env, &t.sealer) {
            metrics::counter!("voxgate_stage_undecodable_total", "stage" => "tenancy").increment(1);
            tracing::error!(stage = "tenancy", event = %env.event_id, reason = %e, "tenants event not applied; skipped");
        }
    }

    fn reached(&mut self, _: &'static str, _: u32, next: u64) {
        self.0.applied.send_replace(next);
    }

    fn stopped(&mut self) {
        self.0.unfollowed.store(true, std::sync::atomic::Ordering::Release);
        // Wakes the commands waiting for it.
        self.0.applied.send_modify(|_| {});
    }

    async fn settle(&mut self, _live: bool) {}
}
