//! Running as one node of a cluster: which roles this node plays (`--roles`), how it joins the
//! JetStream log (`--nats`, `[cluster]`), and how a stage runs on the share of work this node
//! has claimed, starting again on a new share when nodes join, leave or die.
//!
//! Work sharing: call nodes claim the calls log's partitions (a call's actor runs on the node
//! that owns its partition; see `calls`); transcode and stt claim their input topic's partitions
//! (per-call order holds, as a call's records live in one partition); fraud and billing's actions
//! claim tenant shards (`tenant_shards`, each tenant's state on one node at a time), so the
//! tenants spread over the nodes of the role, with failover (their rules look across a tenant's
//! calls).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use voxgate_storage::Log;

/// What a node can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Twilio's webhooks, Media Streams and the REST API (with the spool).
    Ingress,
    /// Call actors, for the calls in this node's share of the calls log's partitions; ingress
    /// nodes reach them over NATS.
    Call,
    Transcode,
    Stt,
    Fraud,
    Billing,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Ingress, Role::Call, Role::Transcode, Role::Stt, Role::Fraud, Role::Billing];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingress => "ingress",
            Role::Call => "call",
            Role::Transcode => "transcode",
            Role::Stt => "stt",
            Role::Fraud => "fraud",
            Role::Billing => "billing",
        }
    }
}

/// The set of roles a node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles(BTreeSet<Role>);

impl Roles {
    pub fn all() -> Self {
        Self(Role::ALL.into_iter().collect())
    }

    pub fn has(&self, r: Role) -> bool {
        self.0.contains(&r)
    }

    /// `all`, or a comma-separated list (`ingress`, `call,transcode,stt`, `fraud,billing`).
    pub fn parse(s: &str) -> Result<Self, ClusterConfigError> {
        if s.trim() == "all" {
            return Ok(Self::all());
        }
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let r = Role::ALL
                .into_iter()
                .find(|r| r.as_str() == part)
                .ok_or_else(|| ClusterConfigError::UnknownRole(part.to_owned()))?;
            set.insert(r);
        }
        if set.is_empty() {
            return Err(ClusterConfigError::NoRoles);
        }
        Ok(Self(set))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|r| r.as_str()).collect()
    }
}

/// `[cluster]`: join a JetStream cluster instead of the embedded sled log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// `nats://host:port` of a JetStream-enabled NATS server (or `--nats`).
    pub nats_url: String,
    /// Roles this node runs (or `--roles`); default all.
    #[serde(default)]
    pub roles: Option<String>,
    /// Streams, subjects and buckets are named `{prefix}_…` / `{prefix}.log.…`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This node's name in work claims (default `{hostname}-{pid}`).
    #[serde(default)]
    pub node: Option<String>,
    /// Seconds before a dead node's work moves to the others.
    #[serde(default = "default_lease")]
    pub lease_ttl_secs: u64,
    /// How many shards the tenants are split into for fraud and billing, which spread the shards
    /// over their nodes. The same on every node (like the topics' partitions).
    #[serde(default = "default_tenant_shards")]
    pub tenant_shards: u32,
    /// Credentials and TLS for the NATS server (`[cluster.auth]`).
    #[serde(default)]
    pub auth: voxgate_storage::NatsAuth,
}

fn default_prefix() -> String {
    "voxgate".into()
}

fn default_lease() -> u64 {
    6
}

/// Tenant shards of fraud and billing in a cluster unless `tenant_shards` says otherwise.
pub const DEFAULT_TENANT_SHARDS: u32 = 8;

fn default_tenant_shards() -> u32 {
    DEFAULT_TENANT_SHARDS
}

/// The cluster settings in force.
#[derive(Clone)]
pub struct ClusterConfig {
    pub nats_url: String,
    pub prefix: String,
    pub node: String,
    pub lease_ttl: Duration,
    pub tenant_shards: u32,
    pub auth: voxgate_storage::NatsAuth,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("nats_url", &voxgate_storage::redact_url(&self.nats_url))
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .field("lease_ttl", &self.lease_ttl)
            .field("tenant_shards", &self.tenant_shards)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Why `--roles` or `[cluster]` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("unknown role {0:?} (roles: all, ingress, call, transcode, stt, fraud, billing)")]
    UnknownRole(String),
    #[error("no roles given")]
    NoRoles,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: String) -> ClusterConfigError {
    ClusterConfigError::Invalid { field, reason }
}

impl ClusterConfig {
    pub fn from_file(f: &ClusterFile) -> Result<Self, ClusterConfigError> {
        if !f.nats_url.starts_with("nats://") && !f.nats_url.starts_with("tls://") {
            return Err(invalid(
                "nats_url",
                format!("must be a nats:// or tls:// URL, got {:?}", voxgate_storage::redact_url(&f.nats_url)),
            ));
        }
        if f.prefix.is_empty() || !f.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(invalid("prefix", format!("{:?} must be letters, digits, '_' or '-'", f.prefix)));
        }
        if !(1..=300).contains(&f.lease_ttl_secs) {
            return Err(invalid("lease_ttl_secs", format!("must be 1..=300, got {}", f.lease_ttl_secs)));
        }
        if !(1..=256).contains(&f.tenant_shards) {
            return Err(invalid("tenant_shards", format!("must be 1..=256, got {}", f.tenant_shards)));
        }
        let node = match &f.node {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {
                n.clone()
            }
            Some(n) => return Err(invalid("node", format!("{n:?} must be letters, digits, '_' or '-'"))),
            None => {
                let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                let host: String =
                    host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
                format!("{}-{}", if host.is_empty() { "node" } else { &host }, std::process::id())
            }
        };
        f.auth.validate().map_err(|e| invalid("auth", e.to_string()))?;
        Ok(Self {
            nats_url: f.nats_url.clone(),
            prefix: f.prefix.clone(),
            node,
            lease_ttl: Duration::from_secs(f.lease_ttl_secs),
            tenant_shards: f.tenant_shards,
            auth: f.auth.clone(),
        })
    }
}

/// Stops what a [`Start`] started.
pub type Stop = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;
/// Starts a stage on the given units (partitions).
pub type Start = Box<dyn FnMut(Vec<u32>) -> Pin<Box<dyn Future<Output = anyhow::Result<Stop>> + Send>> + Send>;

/// The [`Stop`] of a stage that is one actor: stop it and wait until it has finished.
pub fn stop_actor(actor: ractor::ActorCell, done: tokio::task::JoinHandle<()>) -> Stop {
    Box::new(move || {
        Box::pin(async move {
            actor.stop(None);
            let _ = done.await;
        })
    })
}

/// The units (partitions) a claimed stage holds at the moment.
pub type Share = Arc<std::sync::Mutex<Vec<u32>>>;

/// A stage run on this node's claimed share of its work.
pub struct Claimed {
    alive: Arc<AtomicBool>,
    /// The units the stage runs on now (health shows them).
    share: Share,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How a claimed stage takes a changed share.
pub enum Mode {
    /// Stopped on the old share, started on the new one whole.
    Whole(Start),
    /// Each unit on its own (the start is given one unit at a time): a change starts the units
    /// gained and stops the units lost, and the units kept run on (a tenant shard's state is
    /// warmed up from the logs once).
    EachUnit(Start),
}

impl Claimed {
    /// Claims a share of `units` units of `group` and runs the stage on it (`mode` says how it
    /// starts); when the share changes, stops what no longer fits it, reloads the cursors and
    /// state named in `refresh` (another node may have moved them on) and starts what the new
    /// share adds. On the sled log the node holds every unit at once, so the stage starts before
    /// this returns.
    pub async fn run(
        log: &Log,
        group: &str,
        units: u32,
        node: &str,
        refresh: &'static [&'static str],
        mut mode: Mode,
    ) -> anyhow::Result<Self> {
        let mut claims = log.claim(group, units, node);
        let group = group.to_owned();
        let share: Share = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        // What runs, by the units it runs on (one entry for a whole share).
        let mut running: Vec<(Vec<u32>, Stop)> = Vec::new();
        let first = claims.borrow_and_update().clone();
        // The first share: no cursor to reload (nothing ran here), and an error is the caller's.
        for units in mode.plan(&running, &first) {
            let stop = mode.start()(units.clone()).await?;
            running.push((units, stop));
        }
        *share.lock().unwrap_or_else(|e| e.into_inner()) = first;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (log, a, sh) = (log.clone(), alive.clone(), share.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = claims.changed() => if r.is_err() { break },
                    _ = stopped.changed() => break,
                }
                let owned = claims.borrow_and_update().clone();
                // What no longer fits the share stops first (whole: everything).
                let mut kept = Vec::new();
                for (units, stop) in running.drain(..) {
                    if mode.keeps(&units, &owned) {
                        kept.push((units, stop));
                    } else {
                        stop().await;
                    }
                }
                running = kept;
                // Health shows a share only once a stage runs on it.
                *sh.lock().unwrap_or_else(|e| e.into_inner()) = held(&running);
                let plan = mode.plan(&running, &owned);
                if plan.is_empty() {
                    continue;
                }
                for name in refresh {
                    while let Err(e) = log.refresh(name).await {
                        tracing::warn!(stage = %group, error = %e, "reloading cursors before taking over; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                let mut ok = true;
                for units in plan {
                    match mode.start()(units.clone()).await {
                        Ok(s) => {
                            tracing::info!(stage = %group, units = ?units, "stage running on its claimed share");
                            running.push((units, s));
                        }
                        Err(e) => {
                            tracing::error!(stage = %group, units = ?units, error = %e, "stage did not start on its claimed share");
                            ok = false;
                        }
                    }
                }
                *sh.lock().unwrap_or_else(|e| e.into_inner()) = held(&running);
                a.store(ok, Ordering::Release);
            }
            for (_, s) in running {
                s().await;
            }
        });
        Ok(Self { alive, share, stop, task })
    }

    /// False when the stage failed to start on its share.
    pub fn alive(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }

    /// The units this node holds now.
    pub fn share(&self) -> Share {
        self.share.clone()
    }

    /// Stops the stage and gives its claims back.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The units what runs runs on, in order.
fn held(running: &[(Vec<u32>, Stop)]) -> Vec<u32> {
    let mut units: Vec<u32> = running.iter().flat_map(|(u, _)| u.iter().copied()).collect();
    units.sort_unstable();
    units
}

impl Mode {
    fn start(&mut self) -> &mut Start {
        match self {
            Mode::Whole(s) | Mode::EachUnit(s) => s,
        }
    }

    /// Whether what runs on `units` goes on in share `owned`.
    fn keeps(&self, units: &[u32], owned: &[u32]) -> bool {
        match self {
            Mode::Whole(_) => false,
            Mode::EachUnit(_) => units.iter().all(|u| owned.contains(u)),
        }
    }

    /// What to start for share `owned`, given what runs.
    fn plan(&self, running: &[(Vec<u32>, Stop)], owned: &[u32]) -> Vec<Vec<u32>> {
        match self {
            Mode::Whole(_) if owned.is_empty() => Vec::new(),
            Mode::Whole(_) => vec![owned.to_vec()],
            Mode::EachUnit(_) => {
                owned.iter().filter(|u| !running.iter().any(|(r, _)| r.contains(u))).map(|u| vec![*u]).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> Start {
        Box::new(|_| Box::pin(async { anyhow::bail!("not started in this test") }))
    }

    fn running(units: &[&[u32]]) -> Vec<(Vec<u32>, Stop)> {
        let stop = || -> Stop { Box::new(|| Box::pin(async {})) };
        units.iter().map(|u| (u.to_vec(), stop())).collect()
    }

    #[test]
    fn a_whole_stage_restarts_on_any_change_and_a_unit_stage_only_where_it_changed() {
        let whole = Mode::Whole(never());
        assert!(!whole.keeps(&[1, 2], &[1, 2, 3]));
        assert_eq!(whole.plan(&[], &[1, 2, 3]), vec![vec![1, 2, 3]]);
        assert!(whole.plan(&[], &[]).is_empty());

        let each = Mode::EachUnit(never());
        // Share [1, 2, 5] becomes [2, 5, 6, 7]: 1 stops, 2 and 5 run on, 6 and 7 start.
        assert!(!each.keeps(&[1], &[2, 5, 6, 7]));
        assert!(each.keeps(&[2], &[2, 5, 6, 7]) && each.keeps(&[5], &[2, 5, 6, 7]));
        assert_eq!(each.plan(&running(&[&[2], &[5]]), &[2, 5, 6, 7]), vec![vec![6], vec![7]]);
        assert!(each.plan(&running(&[&[2]]), &[2]).is_empty());
    }

    #[test]
    fn roles_parse() {
        assert_eq!(Roles::parse("all").unwrap(), Roles::all());
        let r = Roles::parse("transcode, stt").unwrap();
        assert!(r.has(Role::Stt) && r.has(Role::Transcode) && !r.has(Role::Ingress));
        let r = Roles::parse("ingress").unwrap();
        assert!(r.has(Role::Ingress) && !r.has(Role::Call));
        assert!(Roles::parse("fraud,bogus").unwrap_err().to_string().contains("bogus"));
        assert!(Roles::parse("").is_err());
    }
}
