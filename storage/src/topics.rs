//! The topics voxgate writes, and how long each keeps its data.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::log::TopicSpec;

/// How long a topic keeps records. Both limits apply when both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Records appended longer ago than this are removed.
    #[serde(with = "secs_opt", rename = "max_age_secs")]
    pub max_age: Option<Duration>,
    /// At most this many records are kept per partition (the oldest go first).
    pub max_events_per_partition: Option<u64>,
}

mod secs_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// Call lifecycle: webhooks, status changes, stream start/stop, faults.
pub const CALLS: &str = "calls";
/// Audio: about 100 ms of µ-law per record.
pub const MEDIA: &str = "media";
/// Speech segments cut by the transcoder (16 kHz PCM).
pub const SPEECH: &str = "speech";

/// What the STT stage heard: one transcript per speech segment.
pub const TRANSCRIPTS: &str = "transcripts";

/// Fraud verdicts and hang-up requests, keyed by call.
pub const FRAUD: &str = "fraud";

/// Alerts for operators (fraud, usage triggers), keyed by tenant.
pub const ALERTS: &str = "alerts";

/// Tenants, their numbers, quotas and block lists. One partition: the directory's rules (a number
/// belongs to one tenant) need one order.
pub const TENANTS: &str = "tenants";

/// Usage triggers (definitions, firings, callback attempts) and budget stops. One partition: a
/// trigger's creation, firings and deletion need one order.
pub const BILLING: &str = "billing";

/// Default partitions per topic on one machine.
pub const DEFAULT_PARTITIONS: u32 = 4;

/// The topics of a node with their default retention (calls forever; audio a week). Audio and
/// speech are bulk: their payloads live in the value files.
pub fn default_specs() -> Vec<TopicSpec> {
    let week = Some(Duration::from_secs(7 * 24 * 3600));
    vec![
        TopicSpec::new(CALLS, DEFAULT_PARTITIONS, Retention::default()),
        TopicSpec::new(MEDIA, DEFAULT_PARTITIONS, Retention { max_age: week, max_events_per_partition: None }).bulk(),
        TopicSpec::new(SPEECH, DEFAULT_PARTITIONS, Retention { max_age: week, max_events_per_partition: None }).bulk(),
        TopicSpec::new(TRANSCRIPTS, DEFAULT_PARTITIONS, Retention::default()),
        TopicSpec::new(TENANTS, 1, Retention::default()),
        TopicSpec::new(FRAUD, DEFAULT_PARTITIONS, Retention::default()),
        TopicSpec::new(ALERTS, DEFAULT_PARTITIONS, Retention::default()),
        TopicSpec::new(BILLING, 1, Retention::default()),
    ]
}
