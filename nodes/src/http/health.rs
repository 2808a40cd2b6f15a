//! `GET /api/voice/health`: each stage's state and lag, the log backend, active calls.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ractor::{ActorCell, ActorStatus};
use serde_json::json;
use voxgate_actors::progress::Progress;
use voxgate_storage::Log;

use crate::http::AppState;

/// What runs a stage: an actor, or a log-following task (billing) that flags its own end.
#[derive(Clone)]
pub enum Runner {
    Actor(ActorCell),
    Task(Arc<AtomicBool>),
}

impl Runner {
    pub fn running(&self) -> bool {
        match self {
            Self::Actor(a) => matches!(a.get_status(), ActorStatus::Running | ActorStatus::Upgrading),
            Self::Task(alive) => alive.load(Ordering::Acquire),
        }
    }
}

/// A stage as health sees it: what runs it and the cursor/topic it consumes.
pub struct StageEntry {
    pub name: &'static str,
    pub input: &'static str,
    pub runner: Runner,
    pub progress: Arc<Progress>,
    /// In a cluster, the units of the stage's work this node holds now.
    pub share: Option<crate::stages::cluster::Share>,
    /// What those units are: `partitions` of its input, or `tenant_shards`.
    pub units: &'static str,
}

/// What the health endpoint reports on.
#[derive(Default)]
pub struct Health {
    pub stages: Vec<StageEntry>,
    /// The Whisper model directory, when this node runs STT.
    pub stt_model: Option<String>,
    /// The analytics NATS server and whether it is reachable, when configured.
    pub nats: Option<(String, Arc<AtomicBool>)>,
    /// The roles this node runs.
    pub roles: Vec<&'static str>,
    /// On a call node of a cluster, the calls log's partitions whose calls it runs now.
    pub call_partitions: Option<crate::stages::cluster::Share>,
}

/// Durable events in `topic` that a stage has not processed yet.
pub fn lag(log: &Log, progress: &Progress, topic: &str) -> Option<u64> {
    let pos = progress.snapshot();
    let mut total = 0;
    for (p, c) in pos.iter().enumerate() {
        let head = log.durable_head(topic, p as u32).ok()?;
        total += head.saturating_sub(*c);
    }
    Some(total)
}

pub async fn health(State(state): State<AppState>) -> Response {
    let mut ok = true;
    let mut stages = serde_json::Map::new();
    for s in &state.health.stages {
        let running = s.runner.running();
        ok &= running;
        let lag = lag(&state.log, &s.progress, s.input);
        let mut entry =
            json!({ "state": if running { "running" } else { "stopped" }, "input": s.input, "lag_events": lag });
        if let Some(share) = &s.share {
            entry[s.units] = json!(*share.lock().unwrap_or_else(|e| e.into_inner()));
        }
        stages.insert(s.name.to_owned(), entry);
    }
    let active = ractor::call!(state.supervisor, voxgate_actors::call::SupervisorMsg::Active).ok();
    ok &= active.is_some();
    // A JetStream outage is reported, not failed on: ingress keeps answering from its spool.
    let (backend, cluster) = state.log.backend();
    // A log that cannot write (the data disk is full) refuses calls until it reopens.
    let write_failure = state.log.write_failure();
    ok &= write_failure.is_none();
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "roles": state.health.roles,
        "log": {
            "backend": backend,
            "jetstream": cluster.map(|(url, connected)| json!({ "url": url, "connected": connected, "spooled": state.log.spooled() })),
            "data_dir": state.cfg.data_dir.display().to_string(),
            "size_bytes": state.log.size_on_disk().ok(),
            "free_bytes": state.log.free_bytes(),
            "writable": write_failure.is_none(),
            "write_failure": write_failure,
        },
        "stages": stages,
        "stt_model": state.health.stt_model,
        // Analytics only: NATS being away delays publishing (nothing is lost), it is not a failure.
        "nats": state.health.nats.as_ref().map(|(url, up)| json!({ "url": url, "connected": up.load(Ordering::Acquire) })),
        "active_calls": active,
        "call_partitions": state.health.call_partitions.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
    });
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}
