//! Downstream analytics: every public event, as JSON, on NATS subjects
//! `{subject_prefix}.{tenant}.{kind}` (default prefix `voxgate.events`, e.g.
//! `voxgate.events.AC….call_received`), with the event id as `Nats-Msg-Id` (a JetStream stream
//! capturing the subjects drops the duplicates a restart can resend).
//!
//! Public events are those of the calls, transcripts, tenants, fraud, alerts and billing logs;
//! audio (media batches, speech segments) is not published. The JSON is `voxgate replay --json`'s
//! line: the payload's fields plus `kind`, `call_sid`, `tenant`, `occurred_at`, `event_id`, `log`,
//! `appended_at`. The publisher reads the logs from a durable cursor (`analytics`) and moves it
//! only after NATS has the batch (a flush), so a NATS outage or a restart loses nothing: it
//! resumes where NATS last confirmed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use voxgate_protocol::Event;
use voxgate_storage::{topics, Log, StorageError};

use crate::replay::{event_json, Entry};

/// The durable cursor of the publisher.
pub const CURSOR: &str = "analytics";

const TOPICS: [&str; 6] =
    [topics::CALLS, topics::TRANSCRIPTS, topics::TENANTS, topics::FRAUD, topics::ALERTS, topics::BILLING];

/// `[analytics]`: where to publish.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
}

fn default_prefix() -> String {
    "voxgate.events".into()
}

/// The subject of an event: `{prefix}.{tenant}.{kind}`.
pub fn subject(prefix: &str, env: &voxgate_protocol::Envelope) -> String {
    format!("{prefix}.{}.{}", env.tenant, env.payload.kind())
}

/// Whether an event is published (audio is not).
pub fn is_public(e: &Event) -> bool {
    !matches!(e, Event::MediaBatch(_) | Event::SpeechSegment(_))
}

/// Publishes every public event from the cursor on, then follows the logs until they close.
/// `connected` tells health whether NATS is reachable.
pub async fn publish(log: Log, cfg: AnalyticsConfig, connected: Arc<AtomicBool>) -> Result<(), StorageError> {
    let client = loop {
        match async_nats::ConnectOptions::new()
            .name("voxgate-analytics")
            .retry_on_initial_connect()
            .connect(cfg.nats_url.as_str())
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(stage = "analytics", url = %cfg.nats_url, error = %e, "NATS URL refused; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let mut watches = Vec::new();
    let mut next = Vec::new();
    for topic in TOPICS {
        watches.push(log.watch(topic)?);
        next.push(log.cursor(CURSOR, topic)?);
    }
    let mut recs = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        connected.store(client.connection_state() == async_nats::connection::State::Connected, Ordering::Release);
        let mut sent = 0usize;
        let mut progressed = false;
        let mut failed = false;
        'topics: for (t, topic) in TOPICS.iter().enumerate() {
            for p in 0..next[t].len() {
                // A read below the retention horizon starts at the oldest record kept.
                let from = next[t][p];
                recs.clear();
                let to = log.read(topic, p as u32, from, 512, &mut recs)?;
                if recs.is_empty() {
                    continue;
                }
                for r in &recs {
                    let Ok(env) = voxgate_protocol::decode(r.payload()) else { continue };
                    if !is_public(&env.payload) {
                        continue;
                    }
                    let subject = subject(&cfg.subject_prefix, &env);
                    let id = env.event_id.to_string();
                    let body = event_json(&Entry { topic, env, appended_at: r.appended_at() }).to_string();
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    if client.publish_with_headers(subject, headers, body.into()).await.is_err() {
                        failed = true;
                        break 'topics;
                    }
                    sent += 1;
                }
                // The cursor moves only once NATS has the batch.
                if tokio::time::timeout(Duration::from_secs(5), client.flush()).await.map_or(true, |r| r.is_err()) {
                    failed = true;
                    break 'topics;
                }
                next[t][p] = to;
                progressed = true;
                log.store_cursor(CURSOR, topic, p as u32, to)?;
            }
        }
        connected
            .store(!failed && client.connection_state() == async_nats::connection::State::Connected, Ordering::Release);
        if failed {
            metrics::counter!("voxgate_analytics_publish_failures_total").increment(1);
            tracing::warn!(stage = "analytics", url = %cfg.nats_url, retry_ms = backoff.as_millis() as u64, "NATS unreachable; events wait in the log");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(100);
        metrics::counter!("voxgate_analytics_events_published_total").increment(sent as u64);
        if progressed {
            continue; // more may be waiting
        }
        // Caught up: wait for an append (or look again in a second, to notice NATS coming back).
        let changed = async {
            let [a, b, c, d, e, f] = &mut watches[..] else { return true };
            tokio::select! {
                r = a.changed() => r.is_ok(),
                r = b.changed() => r.is_ok(),
                r = c.changed() => r.is_ok(),
                r = d.changed() => r.is_ok(),
                r = e.changed() => r.is_ok(),
                r = f.changed() => r.is_ok(),
            }
        };
        match tokio::time::timeout(Duration::from_secs(1), changed).await {
            Ok(false) => return Ok(()),
            _ => continue,
        }
    }
}
