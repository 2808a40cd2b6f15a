//! The node's roster: which role runs which stage, how much of its work a node claims, and how
//! the stage starts on a claimed share ([`ROSTER`]); and what a node of some roles follows whole,
//! without claims ([`FOLLOWERS`]). `serve` walks both tables for the roles it has.
//!
//! Must not: decide anything a stage decides, or hold the stages' effects (they live in the
//! stage modules: `billing`, `transcription`, the actors in voxgate-actors).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorRef};
use voxgate_actors::follow::{FollowerActor, FollowerArgs};
use voxgate_actors::fraud::stage::{FraudMsg, FraudSettings, FraudStage};
use voxgate_actors::fraud::{FraudEngine, PrefixTable};
use voxgate_actors::progress::Progress;
use voxgate_actors::stage::{Shard, Stage, StageActor, StageArgs, StageMsg};
use voxgate_actors::stt::stage::{SttPool, SttSettings, SttStage};
use voxgate_actors::transcode::stage::TranscodeStage;
use voxgate_storage::{topics, Log};

use crate::config::Config;
use crate::http::health::Runner;
use crate::stages::cluster::{Role, Roles, Start, Stop};
use crate::stages::transcription::Transcription;

/// The stages a role can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Transcode,
    Fraud,
    /// Billing's actions (usage triggers); every node keeps the usage books.
    Billing,
    Stt,
    /// Twilio's real-time transcription callbacks to the apps.
    Transcription,
}

/// How much work a stage's claims group splits into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Units {
    /// One per partition of its input topic: nodes of the role share them.
    Partitions,
    /// One per tenant shard (`[cluster] tenant_shards`; one on the embedded log): each tenant's
    /// state lives on one node at a time, and the tenants spread over the nodes of the role.
    TenantShards,
    /// One: the stage runs on one node at a time, with failover.
    One,
}

/// One row of the roster.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub stage: StageKind,
    /// Its claims group, and its name in health and metrics.
    pub name: &'static str,
    pub role: Role,
    /// The topic it reads (its lag in health is behind this one).
    pub input: &'static str,
    pub units: Units,
    /// Cursors and state reloaded before it takes over a share (another node may have moved
    /// them on).
    pub refresh: &'static [&'static str],
    /// Shown in health as a stage of its own.
    pub health: bool,
    /// How long a stopping node lets it finish the input the calls left.
    pub drain: Option<Duration>,
}

/// Which role runs which stage. Order matters only for start-up: a row starts after the rows
/// above it.
pub const ROSTER: [Row; 5] = [
    Row {
        stage: StageKind::Transcode,
        name: "transcode",
        role: Role::Transcode,
        input: topics::MEDIA,
        units: Units::Partitions,
        refresh: &["transcode"],
        health: true,
        drain: Some(Duration::from_secs(10)),
    },
    Row {
        stage: StageKind::Fraud,
        name: "fraud",
        role: Role::Fraud,
        input: topics::CALLS,
        units: Units::TenantShards,
        refresh: &["fraud"],
        health: true,
        drain: None,
    },
    // Health shows billing on every node, as the follower of the usage books (see `serve`).
    Row {
        stage: StageKind::Billing,
        name: "billing",
        role: Role::Billing,
        input: topics::CALLS,
        units: Units::TenantShards,
        refresh: &[],
        health: false,
        drain: None,
    },
    Row {
        stage: StageKind::Stt,
        name: "stt",
        role: Role::Stt,
        input: topics::SPEECH,
        units: Units::Partitions,
        refresh: &["stt"],
        health: true,
        drain: Some(Duration::from_secs(30)),
    },
    Row {
        stage: StageKind::Transcription,
        name: "transcription",
        role: Role::Ingress,
        input: topics::TRANSCRIPTS,
        units: Units::One,
        refresh: &[],
        health: false,
        drain: None,
    },
];

impl Row {
    /// Whether a node with these roles and this config runs the row.
    pub fn runs(&self, roles: &Roles, cfg: &Config) -> bool {
        roles.has(self.role) && (self.stage != StageKind::Stt || cfg.stt.enabled)
    }

    /// How many units its claims group has.
    pub fn units(&self, log: &Log, cfg: &Config) -> anyhow::Result<u32> {
        Ok(match self.units {
            Units::Partitions => log.partitions(self.input)?,
            Units::TenantShards => tenant_shards(cfg),
            Units::One => 1,
        })
    }

    /// Its claims group: its name, with the shard count when sharded, so nodes that split the
    /// tenants differently (a rolling change of `tenant_shards`) never hold the same tenants.
    pub fn claims_group(&self, cfg: &Config) -> String {
        match self.units {
            Units::TenantShards if tenant_shards(cfg) > 1 => format!("{}-{}", self.name, tenant_shards(cfg)),
            _ => self.name.to_owned(),
        }
    }

    /// Whether its units start and stop one at a time (a change of share leaves the units kept
    /// running): fraud's tenant shards, each an actor of its own that warms up from the logs.
    /// Billing takes a share over whole (it folds in the billing log for all of it first), and a
    /// partitioned stage is one actor over its share.
    pub fn each_unit(&self) -> bool {
        self.stage == StageKind::Fraud
    }

    /// What health calls its units.
    pub fn units_name(&self) -> &'static str {
        match self.units {
            Units::TenantShards => "tenant_shards",
            Units::Partitions | Units::One => "partitions",
        }
    }

    /// Where its progress through its input is kept (one slot per tenant shard when sharded).
    pub fn progress(&self, log: &Log, cfg: &Config) -> anyhow::Result<Progress> {
        let partitions = log.partitions(self.input)? as usize;
        Ok(match self.units {
            Units::TenantShards if tenant_shards(cfg) > 1 => Progress::sharded(partitions, tenant_shards(cfg)),
            _ => Progress::new(partitions),
        })
    }
}

/// What a node follows whole (every partition, no claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerKind {
    /// The tenants log into this node's tenant directory (auth, quotas, blocks).
    Tenancy,
    /// The usage books (the REST API reads them on every node; the billing nodes act on them
    /// for their tenant shards).
    Books,
    /// Fraud's blocks into this node's webhook gate, hang-ups to the calls it runs.
    FraudActions,
    /// The public logs to the analytics NATS server (`[analytics]`).
    Analytics,
    /// The console's index (`[console]`).
    ConsoleIndex,
}

/// One row of the followers' table.
#[derive(Debug, Clone, Copy)]
pub struct Followed {
    pub kind: FollowerKind,
    /// Its name in health: a follower named like a [`ROSTER`] row shows that row's share.
    pub name: &'static str,
    /// A node with any of these roles follows it; none: every node.
    pub roles: &'static [Role],
    /// The topic its lag in health is behind.
    pub input: &'static str,
}

/// What a node follows, by role. They start in this order, before the [`ROSTER`]'s stages (a
/// billing node taking tenant shards over waits for the books), and stop in the reverse order,
/// after the calls and before the stages.
pub const FOLLOWERS: [Followed; 5] = [
    Followed { kind: FollowerKind::Tenancy, name: "tenancy", roles: &[], input: topics::TENANTS },
    Followed { kind: FollowerKind::Books, name: "billing", roles: &[], input: topics::CALLS },
    Followed {
        kind: FollowerKind::FraudActions,
        name: "fraud_actions",
        roles: &[Role::Ingress, Role::Call],
        input: topics::FRAUD,
    },
    Followed { kind: FollowerKind::Analytics, name: "analytics", roles: &[], input: topics::CALLS },
    Followed { kind: FollowerKind::ConsoleIndex, name: "console_index", roles: &[], input: topics::CALLS },
];

impl Followed {
    /// Whether a node with these roles and this config follows it.
    pub fn runs(&self, roles: &Roles, cfg: &Config) -> bool {
        let by_role = self.roles.is_empty() || self.roles.iter().any(|r| roles.has(*r));
        by_role
            && match self.kind {
                FollowerKind::Analytics => cfg.analytics.is_some(),
                FollowerKind::ConsoleIndex => cfg.console.enabled,
                FollowerKind::Tenancy | FollowerKind::Books | FollowerKind::FraudActions => true,
            }
    }
}

/// The topics a cluster node mirrors into its local log: every topic, except the audio logs
/// (media, speech) where nothing on the node reads them: only a stage of the [`ROSTER`] that
/// takes one as its input (transcode, STT) or the console (its index and audio) does. An ingress
/// node without the console, or a node of decisions alone, no longer writes every call's audio to
/// its disk; what it appends to them (a call node's media) is JetStream's all the same.
pub fn mirrored(roles: &Roles, cfg: &Config) -> Vec<String> {
    let read = |topic: &str| cfg.console.enabled || ROSTER.iter().any(|r| r.input == topic && r.runs(roles, cfg));
    cfg.topics
        .iter()
        .map(|t| t.name.as_str())
        .filter(|name| !matches!(*name, topics::MEDIA | topics::SPEECH) || read(name))
        .map(str::to_owned)
        .collect()
}

/// A follower running on this node.
pub struct Following {
    /// What health shows of it (an actor on the follower harness, and its position).
    pub health: Option<(Runner, Arc<Progress>)>,
    pub stop: Stop,
}

/// Starts a row of [`FOLLOWERS`]; a follower on the harness has folded in what the logs hold
/// when this returns.
pub async fn follow(row: &Followed, deps: &Deps) -> anyhow::Result<Following> {
    let log = &deps.log;
    Ok(match row.kind {
        FollowerKind::Tenancy => {
            let follower = crate::stages::tenancy::TenancyFollower(deps.tenancy.clone());
            let from = Some(deps.tenancy.follow_from());
            on_follower_harness(log, row, follower, Arc::new(Progress::new(log.partitions(row.input)? as usize)), from)
                .await?
        }
        FollowerKind::Books => {
            let follower = voxgate_actors::billing::stage::BillingFollower::new(deps.billing.clone());
            on_follower_harness(log, row, follower, deps.billing.progress(), None).await?
        }
        FollowerKind::FraudActions => {
            let calls = deps.calls.clone();
            let hangs_up: crate::stages::fraud::HangsUp = Arc::new(move |call| calls.runs_here(call));
            let fx = crate::stages::fraud::Effects {
                tenancy: deps.tenancy.clone(),
                twilio: deps.twilio.clone(),
                calls: deps.calls.clone(),
                hangs_up,
            };
            let follower = crate::stages::fraud::FraudActions::new(fx, deps.clock.clone());
            let progress = Arc::new(Progress::new(log.partitions(row.input)? as usize));
            on_follower_harness(log, row, follower, progress, None).await?
        }
        FollowerKind::Analytics => {
            let cfg = deps.cfg.analytics.clone().context("no [analytics] settings")?;
            let client = crate::stages::analytics::connect(&cfg).await?;
            let task = tokio::spawn(crate::stages::analytics::publish(
                log.clone(),
                client,
                cfg,
                deps.tenancy.analytics_key(),
                deps.analytics_up.clone(),
            ));
            Following { health: None, stop: abort(task) }
        }
        FollowerKind::ConsoleIndex => {
            let console = deps.console.as_ref().context("the console is not enabled")?;
            let task = tokio::spawn(crate::stages::serve::log_failure(
                "console index",
                crate::http::console::index::follow(log.clone(), console.index.clone()),
            ));
            Following { health: None, stop: abort(task) }
        }
    })
}

/// A follower on the harness ([`FollowerActor`]).
async fn on_follower_harness<F: voxgate_actors::follow::Follower>(
    log: &Log,
    row: &Followed,
    follower: F,
    progress: Arc<Progress>,
    from: Option<Vec<Vec<u64>>>,
) -> anyhow::Result<Following> {
    let args = FollowerArgs { log: log.clone(), follower, progress: progress.clone(), from };
    let (actor, done) = Actor::spawn(None, FollowerActor::<F>::default(), args)
        .await
        .with_context(|| format!("starting the {} follower", row.name))?;
    Ok(Following {
        health: Some((Runner::Actor(actor.get_cell()), progress)),
        stop: crate::stages::cluster::stop_actor(actor.get_cell(), done),
    })
}

/// The [`Stop`] of a follower that is a task.
fn abort(task: tokio::task::JoinHandle<()>) -> Stop {
    Box::new(move || {
        Box::pin(async move {
            task.abort();
            let _ = task.await;
        })
    })
}

/// How many tenant shards fraud and billing run as: `[cluster] tenant_shards`, one on the embedded
/// log.
pub fn tenant_shards(cfg: &Config) -> u32 {
    cfg.cluster.as_ref().map_or(1, |c| c.tenant_shards.max(1))
}

/// The fraud stage's shards running on this node, and the rules in force, for rule reloads
/// (SIGHUP): a shard started later (the node's share changed) starts with the reloaded rules.
#[derive(Clone, Default)]
pub struct FraudSlot {
    pub actors: Slot<FraudMsg>,
    pub rules: Arc<Mutex<Option<voxgate_actors::fraud::FraudConfig>>>,
}

/// Where a running stage's actors can be found (to send them its own messages).
pub type Slot<M> = Arc<Mutex<Vec<ActorRef<StageMsg<M>>>>>;

/// What a harness stage is built from, as of when it starts.
type ArgsOf<S> = Arc<dyn Fn() -> <S as Stage>::Args + Send + Sync>;

/// How a harness stage spreads over the nodes of its role.
#[derive(Debug, Clone, Copy)]
enum Spread {
    /// On the input partitions it claimed.
    Partitions,
    /// Every partition, one actor per tenant shard it claimed (of this many).
    TenantShards(u32),
}

/// What the stages and followers are started with.
pub struct Deps {
    pub cfg: Arc<Config>,
    pub log: Log,
    pub clock: Arc<dyn voxgate_protocol::Clock>,
    pub tenancy: Arc<crate::stages::tenancy::Tenancy>,
    pub calls: crate::stages::calls::Calls,
    pub twilio: crate::stages::hangup::TwilioRest,
    pub billing: Arc<crate::stages::billing::Billing>,
    /// The console, when it is enabled (its index follows the logs).
    pub console: Option<Arc<crate::http::console::Console>>,
    /// Whether the analytics publishers reach their NATS server (health).
    pub analytics_up: Arc<std::sync::atomic::AtomicBool>,
    pub transcription: crate::stages::transcription::Deps,
    pub fraud: FraudSlot,
    /// The Whisper workers, when this node runs STT.
    pub stt: Option<Arc<SttPool>>,
}

/// How a row's stage starts on a share of its work, reporting its progress to `progress`.
pub fn starter(row: &Row, deps: &Deps, progress: Arc<Progress>) -> anyhow::Result<Start> {
    let log = deps.log.clone();
    Ok(match row.stage {
        StageKind::Transcode => {
            let config = deps.cfg.transcode.clone();
            on_harness::<TranscodeStage>(log, progress, Spread::Partitions, Arc::new(move || config.clone()), None)
        }
        StageKind::Stt => {
            let pool = deps.stt.clone().context("the stt workers are not loaded")?;
            let settings = SttSettings {
                pool,
                max_batch: deps.cfg.stt.max_batch,
                clock: deps.clock.clone(),
                partials: deps.cfg.stt.partials,
            };
            on_harness::<SttStage>(log, progress, Spread::Partitions, Arc::new(move || settings.clone()), None)
        }
        StageKind::Fraud => {
            FraudEngine::new(deps.cfg.fraud.clone(), PrefixTable::builtin()).context("fraud rules")?;
            let (initial, rules) = (deps.cfg.fraud.clone(), deps.fraud.rules.clone());
            let settings: ArgsOf<FraudStage> = Arc::new(move || {
                let config = rules.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| initial.clone());
                FraudSettings { config, prefixes: PrefixTable::builtin() }
            });
            // Its rules look across a tenant's calls: every partition, a shard of the tenants; its
            // actors where SIGHUP finds them.
            let shards = Spread::TenantShards(tenant_shards(&deps.cfg));
            on_harness::<FraudStage>(log, progress, shards, settings, Some(deps.fraud.actors.clone()))
        }
        StageKind::Billing => {
            let b = deps.billing.clone();
            let of = tenant_shards(&deps.cfg);
            Box::new(move |owned: Vec<u32>| {
                let b = b.clone();
                Box::pin(async move {
                    b.take_over(owned, of).await;
                    let stop: Stop = Box::new(move || {
                        Box::pin(async move {
                            b.step_down();
                        })
                    });
                    Ok(stop)
                })
            })
        }
        StageKind::Transcription => {
            let deps = deps.transcription.clone();
            Box::new(move |_owned: Vec<u32>| {
                let args = FollowerArgs {
                    log: deps.log.clone(),
                    follower: Transcription::new(deps.clone()),
                    progress: progress.clone(),
                    from: None,
                };
                Box::pin(async move {
                    let (actor, done) = Actor::spawn(None, FollowerActor::<Transcription>::default(), args)
                        .await
                        .context("starting the transcription follower")?;
                    Ok(crate::stages::cluster::stop_actor(actor.get_cell(), done))
                })
            })
        }
    })
}

/// A harness stage on the units it is given (input partitions, or tenant shards with an actor
/// each); its actors are kept in `slot` (if any) while they run.
fn on_harness<S: Stage>(
    log: Log,
    progress: Arc<Progress>,
    spread: Spread,
    args: ArgsOf<S>,
    slot: Option<Slot<S::Msg>>,
) -> Start {
    Box::new(move |owned: Vec<u32>| {
        let instances: Vec<(Option<Vec<u32>>, Shard)> = match spread {
            Spread::Partitions => vec![(Some(owned), Shard::ALL)],
            Spread::TenantShards(of) => owned.into_iter().map(|index| (None, Shard { index, of })).collect(),
        };
        let (log, progress, args, slot) = (log.clone(), progress.clone(), args.clone(), slot.clone());
        Box::pin(async move {
            let mut stops = Vec::with_capacity(instances.len());
            let mut actors = Vec::with_capacity(instances.len());
            for (partitions, shard) in instances {
                let args =
                    StageArgs::<S> { log: log.clone(), progress: progress.clone(), partitions, shard, stage: args() };
                match Actor::spawn(None, StageActor::<S>::default(), args).await {
                    Ok((actor, done)) => {
                        actors.push(actor.clone());
                        stops.push(crate::stages::cluster::stop_actor(actor.get_cell(), done));
                    }
                    Err(e) => {
                        // None of the share runs: what started stops, and the claim loop says so.
                        for stop in stops {
                            stop().await;
                        }
                        return Err(anyhow::Error::new(e).context(format!("starting the {} stage", S::NAME)));
                    }
                }
            }
            // Beside the actors of the stage's other units (started one at a time).
            let ids: Vec<ractor::ActorId> = actors.iter().map(|a| a.get_id()).collect();
            if let Some(slot) = &slot {
                slot.lock().unwrap_or_else(|e| e.into_inner()).extend(actors);
            }
            let stop: Stop = Box::new(move || {
                if let Some(slot) = &slot {
                    slot.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| !ids.contains(&a.get_id()));
                }
                Box::pin(async move {
                    for stop in stops {
                        stop().await;
                    }
                })
            });
            Ok(stop)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_run_where_their_roles_and_settings_say() {
        let names: Vec<&str> = FOLLOWERS.iter().map(|f| f.name).collect();
        assert_eq!(names, ["tenancy", "billing", "fraud_actions", "analytics", "console_index"]);
        let cfg = Config::load(None, Vec::new(), &crate::config::Overrides::default()).unwrap();
        let fraud_actions = &FOLLOWERS[2];
        assert!(fraud_actions.runs(&Roles::parse("ingress").unwrap(), &cfg));
        assert!(fraud_actions.runs(&Roles::parse("call,stt").unwrap(), &cfg));
        assert!(!fraud_actions.runs(&Roles::parse("fraud,billing").unwrap(), &cfg));
        assert!(FOLLOWERS[0].runs(&Roles::parse("stt").unwrap(), &cfg));
        // Analytics only with its settings.
        assert!(!FOLLOWERS[3].runs(&Roles::all(), &cfg));
    }

    #[test]
    fn the_audio_logs_are_mirrored_only_where_read() {
        let mut cfg = Config::load(None, Vec::new(), &crate::config::Overrides::default()).unwrap();
        let all: Vec<String> = cfg.topics.iter().map(|t| t.name.clone()).collect();
        let without = |dropped: &[&str]| -> Vec<String> {
            all.iter().filter(|t| !dropped.contains(&t.as_str())).cloned().collect()
        };
        // The console (on by default) reads both.
        assert_eq!(mirrored(&Roles::parse("ingress").unwrap(), &cfg), all);
        cfg.console.enabled = false;
        assert_eq!(mirrored(&Roles::parse("ingress").unwrap(), &cfg), without(&[topics::MEDIA, topics::SPEECH]));
        assert_eq!(mirrored(&Roles::parse("fraud,billing").unwrap(), &cfg), without(&[topics::MEDIA, topics::SPEECH]));
        assert_eq!(mirrored(&Roles::parse("call,transcode").unwrap(), &cfg), without(&[topics::SPEECH]));
        assert_eq!(mirrored(&Roles::parse("stt").unwrap(), &cfg), without(&[topics::MEDIA]));
        assert_eq!(mirrored(&Roles::all(), &cfg), all);
        // STT off: nothing reads the speech log.
        cfg.stt.enabled = false;
        assert_eq!(mirrored(&Roles::all(), &cfg), without(&[topics::SPEECH]));
    }

    #[test]
    fn every_stage_is_in_the_roster_once_with_its_claims_group() {
        let names: Vec<&str> = ROSTER.iter().map(|r| r.name).collect();
        assert_eq!(names, ["transcode", "fraud", "billing", "stt", "transcription"]);
        for r in &ROSTER {
            assert_eq!(ROSTER.iter().filter(|o| o.stage == r.stage).count(), 1);
        }
    }
}
