//! Downstream analytics: every public event, as JSON, on NATS subjects
//! `{subject_prefix}.{tenant}.{kind}` (default prefix `voxgate.events`, e.g.
//! `voxgate.events.AC….call_received`), with the event id as `Nats-Msg-Id` (a JetStream stream
//! capturing the subjects drops the duplicates a restart can resend).
//!
//! Public events are those of the calls, transcripts, tenants, fraud, alerts and billing logs;
//! audio (media batches, speech segments) and requests to the apps (`app_request`, Twilio's whole
//! parameter set) are not published. The JSON is `voxgate replay --json`'s
//! line: the payload's fields plus `kind`, `call_sid`, `tenant`, `occurred_at`, `event_id`, `log`,
//! `appended_at`. Each log has its publisher, a stage on the harness reading it from a durable
//! cursor (`analytics`) that moves only after NATS has the batch (a flush), so a NATS outage or a
//! restart loses nothing: it resumes where NATS last confirmed.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::Actor;
use voxgate_actors::progress::Progress;
use voxgate_actors::stage::{Batch, Durability, Outputs, Reading, Shard, Stage, StageActor, StageArgs, StageError};
use voxgate_protocol::Event;
use voxgate_storage::{topics, Log};

use crate::cli::replay::{event_json, Entry};

/// The durable cursor of the publisher.
pub const CURSOR: &str = "analytics";

/// `[analytics]`: where to publish, how to log in, and what to leave out.
#[derive(Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// Credentials and TLS for the server (`[analytics.auth]`).
    #[serde(default)]
    pub auth: voxgate_storage::NatsAuth,
    /// What leaves voxgate (`[analytics.redact]`, per tenant `[analytics.redact.tenants.AC…]`).
    #[serde(default)]
    pub redact: Redact,
}

impl std::fmt::Debug for AnalyticsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsConfig")
            .field("nats_url", &voxgate_storage::redact_url(&self.nats_url))
            .field("subject_prefix", &self.subject_prefix)
            .field("auth", &self.auth)
            .field("redact", &self.redact)
            .finish()
    }
}

/// What happens to one kind of personal data on the analytics subjects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Published as recorded.
    #[default]
    Keep,
    /// Left out (transcript text becomes null; a phone number becomes `"[redacted]"`).
    Drop,
    /// Replaced by a keyed hash (`h:` and 24 hex digits; the key derives from the secrets key), so
    /// consumers can still count and join on equal values without reading them.
    Hash,
}

/// One redaction policy: transcript text and phone numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub transcripts: Treatment,
    pub numbers: Treatment,
}

/// `[analytics.redact]`: the default policy, and per-tenant ones that replace it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Redact {
    pub transcripts: Treatment,
    pub numbers: Treatment,
    pub tenants: std::collections::BTreeMap<String, Policy>,
}

impl Redact {
    /// The policy for `tenant`.
    pub fn policy(&self, tenant: voxgate_protocol::AccountSid) -> Policy {
        self.tenants
            .get(&tenant.to_string())
            .copied()
            .unwrap_or(Policy { transcripts: self.transcripts, numbers: self.numbers })
    }

    /// Checks the tenant keys.
    pub fn validate(&self) -> Result<(), voxgate_actors::InvalidSetting> {
        for k in self.tenants.keys() {
            voxgate_protocol::AccountSid::parse(k)
                .map_err(|e| voxgate_actors::InvalidSetting::new("redact.tenants", format!("{k}: {e}")))?;
        }
        Ok(())
    }
}

/// Makes an event's JSON fit to leave voxgate: sealed auth tokens never go (whatever the policy),
/// transcript text and phone numbers as the tenant's policy says. Numbers are found wherever they
/// appear in a string (`+` and 8 to 15 digits), evidence text included.
pub fn scrub(v: &mut serde_json::Value, policy: Policy, key: &[u8; 32]) {
    let Some(m) = v.as_object_mut() else { return };
    m.remove("sealed_auth_token");
    if m.get("kind").and_then(|k| k.as_str()) == Some("transcript") {
        match policy.transcripts {
            Treatment::Keep => {}
            Treatment::Drop => {
                m.insert("text".into(), serde_json::Value::Null);
            }
            Treatment::Hash => {
                if let Some(t) = m.get("text").and_then(|t| t.as_str()).map(|t| keyed_hash(key, t)) {
                    m.insert("text".into(), t.into());
                }
            }
        }
    }
    if policy.numbers != Treatment::Keep {
        for (_, val) in m.iter_mut() {
            scrub_numbers(val, policy.numbers, key);
        }
    }
}

fn scrub_numbers(v: &mut serde_json::Value, t: Treatment, key: &[u8; 32]) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(r) = replace_numbers(s, t, key) {
                *s = r;
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| scrub_numbers(x, t, key)),
        serde_json::Value::Object(o) => o.iter_mut().for_each(|(_, x)| scrub_numbers(x, t, key)),
        _ => {}
    }
}

/// `s` with every `+` followed by 8 to 15 digits replaced; `None` when there is none.
fn replace_numbers(s: &str, t: Treatment, key: &[u8; 32]) -> Option<String> {
    if !s.contains('+') {
        return None;
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let (mut i, mut last, mut changed) = (0, 0, false);
    while i < b.len() {
        if b[i] == b'+' {
            let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if (8..=15).contains(&digits) {
                let number = &s[i..i + 1 + digits];
                out.push_str(&s[last..i]);
                match t {
                    Treatment::Hash => out.push_str(&keyed_hash(key, number)),
                    _ => out.push_str("[redacted]"),
                }
                i += 1 + digits;
                last = i;
                changed = true;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&s[last..]);
    changed.then_some(out)
}

/// `h:` and the first 24 hex digits of HMAC-SHA256(key, value).
fn keyed_hash(key: &[u8; 32], value: &str) -> String {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(value.as_bytes());
    let d = m.finalize().into_bytes();
    let mut s = String::with_capacity(26);
    s.push_str("h:");
    for b in &d[..12] {
        s.push_str(&format!("{b:02x}"));
    }
    s
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
    // A request to the app carries Twilio's whole parameter set (numbers, names), which the
    // redaction policies do not know field by field: it stays in the log and the console.
    !matches!(e, Event::MediaBatch(_) | Event::SpeechSegment(_) | Event::SpeechProgress(_) | Event::AppRequest(_))
}

/// What every analytics shard publishes with.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    cfg: Arc<AnalyticsConfig>,
    key: [u8; 32],
    connected: Arc<AtomicBool>,
}

/// One topic's publisher: a stage on the harness (its own cursor, `analytics`, on that topic),
/// whose "output" is NATS: a round's events are published and flushed before the cursor moves; a
/// round NATS does not take fails and is tried again from the cursor (the harness backs off).
pub struct Analytics<T> {
    p: Publisher,
    topic: PhantomData<fn() -> T>,
}

/// A topic analytics publishes, as a type (a stage's input is a constant).
pub trait Published: Send + 'static {
    const TOPIC: &'static str;
    /// The stage's label in metrics.
    const LABEL: &'static str;
}

macro_rules! published {
    ($($name:ident => $topic:expr, $label:literal;)*) => {
        $(
            #[doc = concat!("The `", $label, "` publisher's topic.")]
            pub struct $name;
            impl Published for $name {
                const TOPIC: &'static str = $topic;
                const LABEL: &'static str = $label;
            }
        )*
    };
}

published! {
    CallsLog => topics::CALLS, "analytics_calls";
    TranscriptsLog => topics::TRANSCRIPTS, "analytics_transcripts";
    TenantsLog => topics::TENANTS, "analytics_tenants";
    FraudLog => topics::FRAUD, "analytics_fraud";
    AlertsLog => topics::ALERTS, "analytics_alerts";
    BillingLog => topics::BILLING, "analytics_billing";
}

impl<T: Published> Stage for Analytics<T> {
    type Args = Publisher;
    type Msg = std::convert::Infallible;
    const NAME: &'static str = T::LABEL;
    const CURSOR: &'static str = CURSOR;
    const INPUT: &'static str = T::TOPIC;
    const DURABILITY: Durability = Durability::WhenCaughtUp;

    fn reading(_: &Publisher, _: usize) -> Reading {
        Reading::PerPartition { batch: 512 }
    }

    async fn open(p: &Publisher, _: &Log, _: &[u64], _: Shard) -> Result<Self, StageError> {
        Ok(Self { p: p.clone(), topic: PhantomData })
    }

    async fn handle(&mut self, _: &Log, batch: &Batch, _: &mut Outputs) -> Result<(), StageError> {
        let p = &self.p;
        let mut sent = 0u64;
        for (_, r) in batch.records() {
            let Ok(env) = voxgate_protocol::decode(r.payload()) else { continue };
            if !is_public(&env.payload) {
                continue;
            }
            let subject = subject(&p.cfg.subject_prefix, &env);
            let id = env.event_id.to_string();
            let policy = p.cfg.redact.policy(env.tenant);
            let mut json = event_json(&Entry { topic: T::TOPIC, env, appended_at: r.appended_at() });
            scrub(&mut json, policy, &p.key);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            if p.client.publish_with_headers(subject, headers, json.to_string().into()).await.is_err() {
                return Err(self.unreachable());
            }
            sent += 1;
        }
        // The cursor moves only once NATS has the batch.
        if tokio::time::timeout(Duration::from_secs(5), p.client.flush()).await.map_or(true, |r| r.is_err()) {
            return Err(self.unreachable());
        }
        p.connected.store(true, Ordering::Release);
        metrics::counter!("voxgate_analytics_events_published_total").increment(sent);
        Ok(())
    }
}

impl<T> Analytics<T> {
    fn unreachable(&self) -> StageError {
        self.p.connected.store(false, Ordering::Release);
        metrics::counter!("voxgate_analytics_publish_failures_total").increment(1);
        StageError::Unavailable("the analytics NATS server is unreachable; events wait in the log".into())
    }
}

/// The client for the analytics NATS server. Settings that cannot be used (an unreadable
/// credentials file, a malformed URL) are an error here, at start-up; a server that is not up yet
/// is not: the client keeps trying in the background and the publishers wait for it.
pub async fn connect(cfg: &AnalyticsConfig) -> anyhow::Result<async_nats::Client> {
    let shown = voxgate_storage::redact_url(&cfg.nats_url);
    let opts = async_nats::ConnectOptions::new().name("voxgate-analytics").retry_on_initial_connect();
    let opts = cfg
        .auth
        .with_url_credentials(&cfg.nats_url)
        .apply(opts)
        .await
        .with_context(|| format!("[analytics] NATS settings for {shown}"))?;
    opts.connect(shown.as_str()).await.with_context(|| format!("[analytics] connecting to {shown}"))
}

/// Runs a publisher per topic on `client` until dropped; `connected` follows the connection.
pub async fn publish(
    log: Log,
    client: async_nats::Client,
    cfg: AnalyticsConfig,
    key: [u8; 32],
    connected: Arc<AtomicBool>,
) {
    let p = Publisher { client: client.clone(), cfg: Arc::new(cfg), key, connected: connected.clone() };
    let mut running = Vec::new();
    macro_rules! start {
        ($($t:ty),*) => {
            $(
                let progress = Arc::new(Progress::new(log.partitions(<$t>::TOPIC).unwrap_or(1) as usize));
                let args = StageArgs::<Analytics<$t>> {
                    log: log.clone(),
                    progress,
                    partitions: None,
                    shard: Shard::ALL,
                    stage: p.clone(),
                };
                match Actor::spawn(None, StageActor::<Analytics<$t>>::default(), args).await {
                    Ok(a) => running.push(StopOnDrop(a.0.get_cell())),
                    Err(e) => tracing::error!(stage = "analytics", topic = <$t>::TOPIC, error = %e, "publisher did not start"),
                }
            )*
        };
    }
    start!(CallsLog, TranscriptsLog, TenantsLog, FraudLog, AlertsLog, BillingLog);
    // Health follows the connection, events or not.
    loop {
        connected.store(client.connection_state() == async_nats::connection::State::Connected, Ordering::Release);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Stops a publisher when the task that started it ends.
struct StopOnDrop(ractor::ActorCell);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn sealed_tokens_never_leave_and_policies_apply() {
        let mut v = json!({"kind": "tenant_created", "sealed_auth_token": "c2VjcmV0", "friendly_name": "Acme"});
        scrub(&mut v, Policy::default(), &KEY);
        assert!(v.get("sealed_auth_token").is_none(), "{v}");

        let t = json!({"kind": "transcript", "text": "my card is 4111", "tenant": "AC1"});
        let mut dropped = t.clone();
        scrub(&mut dropped, Policy { transcripts: Treatment::Drop, numbers: Treatment::Keep }, &KEY);
        assert_eq!(dropped["text"], serde_json::Value::Null);
        let mut hashed = t.clone();
        scrub(&mut hashed, Policy { transcripts: Treatment::Hash, numbers: Treatment::Keep }, &KEY);
        let h = hashed["text"].as_str().unwrap();
        assert!(h.starts_with("h:") && h.len() == 26 && !h.contains("4111"), "{h}");

        let call = json!({"kind": "call_received", "from": "+14155550123", "to": "+14155550100",
                          "evidence": ["12 calls from +14155550123 in 60 s"], "stream_session": "CA1"});
        let mut d = call.clone();
        scrub(&mut d, Policy { transcripts: Treatment::Keep, numbers: Treatment::Drop }, &KEY);
        assert_eq!((d["from"].as_str(), d["to"].as_str()), (Some("[redacted]"), Some("[redacted]")));
        assert_eq!(d["evidence"][0], "12 calls from [redacted] in 60 s");
        let mut h = call.clone();
        scrub(&mut h, Policy { transcripts: Treatment::Keep, numbers: Treatment::Hash }, &KEY);
        // Equal numbers hash alike (joins still work); the number itself is gone.
        assert!(h["evidence"][0].as_str().unwrap().contains(h["from"].as_str().unwrap()));
        assert!(!h.to_string().contains("4155550123"), "{h}");
        let mut keep = call.clone();
        scrub(&mut keep, Policy::default(), &KEY);
        assert_eq!(keep, call);
    }

    #[test]
    fn per_tenant_policies_replace_the_default() {
        let r: Redact = toml::from_str(
            "numbers = \"hash\"\n[tenants.AC0123456789abcdef0123456789abcdef]\ntranscripts = \"drop\"\n",
        )
        .unwrap();
        r.validate().unwrap();
        let a = voxgate_protocol::AccountSid::parse("AC0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(r.policy(a), Policy { transcripts: Treatment::Drop, numbers: Treatment::Keep });
        let b = voxgate_protocol::AccountSid::from_u128(9);
        assert_eq!(r.policy(b), Policy { transcripts: Treatment::Keep, numbers: Treatment::Hash });
    }
}
