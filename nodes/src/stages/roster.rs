//! The node's roster: which role runs which stage, how much of its work a node claims, and how
//! the stage starts on a claimed share. `serve` walks [`ROSTER`] for the roles it has.
//!
//! Must not: decide anything a stage decides, or hold the stages' effects (they live in the
//! stage modules: `billing`, `transcription`, the actors in voxgate-actors).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorRef};
use voxgate_actors::fraud::stage::{FraudMsg, FraudSettings, FraudStage};
use voxgate_actors::fraud::{FraudEngine, PrefixTable};
use voxgate_actors::progress::Progress;
use voxgate_actors::stage::{Stage, StageActor, StageArgs, StageMsg};
use voxgate_actors::stt::stage::{SttPool, SttSettings, SttStage};
use voxgate_actors::transcode::stage::TranscodeStage;
use voxgate_storage::{topics, Log};

use crate::config::Config;
use crate::stages::cluster::{Role, Start, Stop};

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
        units: Units::One,
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
        units: Units::One,
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
    pub fn runs(&self, roles: &crate::stages::cluster::Roles, cfg: &Config) -> bool {
        roles.has(self.role) && (self.stage != StageKind::Stt || cfg.stt.enabled)
    }

    /// How many units its claims group has.
    pub fn units(&self, log: &Log) -> anyhow::Result<u32> {
        Ok(match self.units {
            Units::Partitions => log.partitions(self.input)?,
            Units::One => 1,
        })
    }
}

/// The fraud stage running on this node, for rule reloads (SIGHUP).
pub type FraudSlot = Slot<FraudMsg>;

/// Where a running stage's actor can be found (to send it its own messages).
pub type Slot<M> = Arc<Mutex<Option<ActorRef<StageMsg<M>>>>>;

/// What the stages are started with.
pub struct Deps {
    pub cfg: Arc<Config>,
    pub log: Log,
    pub clock: Arc<dyn voxgate_protocol::Clock>,
    pub billing: Arc<crate::stages::billing::Billing>,
    pub transcription: crate::stages::transcription::Deps,
    pub fraud: FraudSlot,
    /// The Whisper workers, when this node runs STT.
    pub stt: Option<Arc<SttPool>>,
}

/// How a row's stage starts on a share of its work, reporting its progress to `progress`.
pub fn starter(row: &Row, deps: &Deps, progress: Arc<Progress>) -> anyhow::Result<Start> {
    let log = deps.log.clone();
    Ok(match row.stage {
        StageKind::Transcode => on_harness::<TranscodeStage>(log, progress, true, deps.cfg.transcode.clone(), None),
        StageKind::Stt => {
            let pool = deps.stt.clone().context("the stt workers are not loaded")?;
            let settings = SttSettings {
                pool,
                max_batch: deps.cfg.stt.max_batch,
                clock: deps.clock.clone(),
                partials: deps.cfg.stt.partials,
            };
            on_harness::<SttStage>(log, progress, true, settings, None)
        }
        StageKind::Fraud => {
            FraudEngine::new(deps.cfg.fraud.clone(), PrefixTable::builtin()).context("fraud rules")?;
            let settings = FraudSettings { config: deps.cfg.fraud.clone(), prefixes: PrefixTable::builtin() };
            // Every partition (its rules look across calls), and its actor where SIGHUP finds it.
            on_harness::<FraudStage>(log, progress, false, settings, Some(deps.fraud.clone()))
        }
        StageKind::Billing => {
            let b = deps.billing.clone();
            Box::new(move |_owned: Vec<u32>| {
                let b = b.clone();
                Box::pin(async move {
                    b.take_over().await;
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
                let deps = deps.clone();
                Box::pin(async move {
                    let task = tokio::spawn(crate::stages::serve::log_failure(
                        "transcription",
                        crate::stages::transcription::follow(deps),
                    ));
                    let stop: Stop = Box::new(move || {
                        Box::pin(async move {
                            task.abort();
                        })
                    });
                    Ok(stop)
                })
            })
        }
    })
}

/// A harness stage on the partitions it is given (`partitioned`), or on all of them; its actor
/// is kept in `slot` (if any) while it runs.
fn on_harness<S: Stage>(
    log: Log,
    progress: Arc<Progress>,
    partitioned: bool,
    args: S::Args,
    slot: Option<Slot<S::Msg>>,
) -> Start
where
    S::Args: Clone,
{
    Box::new(move |owned: Vec<u32>| {
        let args = StageArgs::<S> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: partitioned.then_some(owned),
            stage: args.clone(),
        };
        let slot = slot.clone();
        Box::pin(async move {
            let (actor, done) = Actor::spawn(None, StageActor::<S>::default(), args)
                .await
                .with_context(|| format!("starting the {} stage", S::NAME))?;
            let Some(slot) = slot else {
                return Ok(crate::stages::cluster::stop_actor(actor.get_cell(), done));
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(actor.clone());
            let stop = crate::stages::cluster::stop_actor(actor.get_cell(), done);
            let stop: Stop = Box::new(move || {
                slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                stop()
            });
            Ok(stop)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_is_in_the_roster_once_with_its_claims_group() {
        let names: Vec<&str> = ROSTER.iter().map(|r| r.name).collect();
        assert_eq!(names, ["transcode", "fraud", "billing", "stt", "transcription"]);
        for r in &ROSTER {
            assert_eq!(ROSTER.iter().filter(|o| o.stage == r.stage).count(), 1);
        }
    }
}
