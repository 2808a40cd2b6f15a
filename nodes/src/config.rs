//! Configuration: one TOML file, every key overridable by a `VOXGATE_*` environment variable,
//! then by command-line flags. The file form ([`ConfigFile`]) is checked into a validated
//! [`Config`]; unknown keys are rejected with their names.
//!
//! Environment mapping: `VOXGATE_PUBLIC_URL` sets `public_url`; a double underscore nests, so
//! `VOXGATE_CALLS__MAX_DURATION_SECS=60` sets `[calls] max_duration_secs`. Values are read as TOML
//! when they parse as TOML (numbers, booleans, arrays, inline tables) and as strings otherwise, so
//! `VOXGATE_TENANTS='[{account_sid="AC…", auth_token="…", numbers=["+1…"]}]'` works too.
//! `VOXGATE_CONFIG` (the file's path) and `VOXGATE_LOG` (the log filter) are not config keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use voxgate_actors::billing::BillingConfig;
use voxgate_actors::call::CallConfig;
use voxgate_actors::fraud::FraudConfig;
use voxgate_actors::tenancy::callers::CallerConfig;
use voxgate_actors::tenancy::throttle::ThrottleConfig;
use voxgate_actors::tenancy::{limits, Quota};
use voxgate_actors::transcode::TranscodeConfig;
use voxgate_protocol::event::{HttpMethod, NumberRouting};
use voxgate_protocol::AccountSid;
use voxgate_storage::{topics, Retention, TopicSpec};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

pub use voxgate_actors::tenancy::Secret;

/// A tenant as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFile {
    pub account_sid: String,
    pub auth_token: Secret,
    /// `"+1…"`, or `{ number = "+1…", voice_url = "https://app…", … }` for a number whose calls
    /// the customer's app answers (gateway mode).
    #[serde(default)]
    pub numbers: Vec<NumberFile>,
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// Call quotas for this tenant (default: `[quotas]`).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Vocabulary hints for this tenant's calls (names, products, jargon; comma-separated, as
    /// Twilio's `hints`), given to Whisper after `[stt] hints`. The REST API's `SpeechHints`
    /// changes them.
    #[serde(default)]
    pub hints: String,
}

/// A config-file number: the number alone, or with its routing (IncomingPhoneNumbers' fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NumberFile {
    Plain(String),
    Routed(RoutedNumber),
}

/// A number with Twilio's routing fields, as in the IncomingPhoneNumbers resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedNumber {
    pub number: String,
    pub voice_url: Option<String>,
    pub voice_method: Option<String>,
    pub voice_fallback_url: Option<String>,
    pub voice_fallback_method: Option<String>,
    pub status_callback: Option<String>,
    pub status_callback_method: Option<String>,
}

impl NumberFile {
    fn number(&self) -> &str {
        match self {
            Self::Plain(n) => n,
            Self::Routed(r) => &r.number,
        }
    }

    /// The routing, checked; the error names the field.
    fn routing(&self) -> Result<NumberRouting, String> {
        let Self::Routed(r) = self else { return Ok(NumberRouting::default()) };
        let method = |field: &str, m: &Option<String>| -> Result<HttpMethod, String> {
            match m {
                None => Ok(HttpMethod::Post),
                Some(m) => HttpMethod::parse(m).ok_or_else(|| format!("{field} must be GET or POST, got {m:?}")),
            }
        };
        let routing = NumberRouting {
            voice_url: r.voice_url.clone(),
            voice_method: method("voice_method", &r.voice_method)?,
            voice_fallback_url: r.voice_fallback_url.clone(),
            voice_fallback_method: method("voice_fallback_method", &r.voice_fallback_method)?,
            status_callback: r.status_callback.clone(),
            status_callback_method: method("status_callback_method", &r.status_callback_method)?,
        };
        voxgate_actors::tenancy::directory::check_routing(&routing).map_err(|e| e.to_string())?;
        Ok(routing)
    }
}

/// `[calls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsFile {
    pub max_duration_secs: u64,
    pub batch_ms: u32,
    /// Memory a call's stream queue may hold, KiB (both tracks): a burst of late audio is kept
    /// whole while it fits.
    pub queue_kib: u32,
    /// Audio that waited this long for the log is stale and shed.
    pub stale_audio_secs: u32,
    /// Replaced by `queue_kib` and `stale_audio_secs`; refused with a message saying so.
    pub queue_ms: Option<u32>,
    /// How often a call's dropped Media Stream is re-attached through Twilio's REST API.
    pub reattach_attempts: u32,
}

impl Default for CallsFile {
    fn default() -> Self {
        Self {
            max_duration_secs: 300,
            batch_ms: 100,
            queue_kib: 4096,
            stale_audio_secs: 60,
            queue_ms: None,
            reattach_attempts: 3,
        }
    }
}

/// `[stt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SttFile {
    /// Run the STT stage on this node.
    pub enabled: bool,
    /// Directory with model.bin, config.json and tokenizer.json (nodes/deploy/fetch-model.sh).
    pub model_dir: PathBuf,
    /// Whisper worker threads (each holds the model).
    pub workers: usize,
    /// Most segments transcribed in one batch (across calls).
    pub max_batch: usize,
    /// Partial results: decode segments still open (every `[transcode.vad] progress_ms`) while
    /// no final waits, as `partial_transcript` events and `Final=false` real-time transcription
    /// (needs `[transcode.vad] progress`; off by default: a partial in flight delays finals).
    pub partials: bool,
    /// Beam search width for finals (1: greedy; default 3). Partial results always decode greedily.
    pub beam_size: usize,
    /// Vocabulary hints for every call (Twilio's `hints`: names, products, jargon), given to
    /// Whisper as its initial prompt; at most 1,000 characters.
    pub hints: String,
    /// Write runs of three or more spoken digits as digits (`four seven two nine one` → `47291`).
    pub digit_strings: bool,
    /// Shortest audio window the encoder sees, in ms (Whisper: 30,000). Shorter is faster
    /// (the encoder's cost grows with its length) but gives the decoder less context; see
    /// BENCHMARKS.md "Decoding policies".
    pub min_encoder_ms: u32,
}

impl SttFile {
    /// The decoding settings of `[stt]` (the node's STT stage and `voxgate replay --stage stt`).
    pub fn decode_options(&self) -> voxgate_actors::stt::decode::DecodeOptions {
        voxgate_actors::stt::decode::DecodeOptions {
            beam_size: self.beam_size,
            hints: self.hints.clone(),
            digit_strings: self.digit_strings,
            min_encoder_frames: (self.min_encoder_ms / 10) as usize,
            ..Default::default()
        }
    }
}

impl Default for SttFile {
    fn default() -> Self {
        Self {
            enabled: true,
            model_dir: PathBuf::from("./models/whisper-tiny.en"),
            workers: 1,
            max_batch: 4,
            partials: false,
            beam_size: 3,
            hints: String::new(),
            digit_strings: false,
            min_encoder_ms: 0,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogFile {
    pub partitions: u32,
    /// Per topic: `[log.retention.media] max_age_secs = 604800`.
    pub retention: BTreeMap<String, Retention>,
    pub retention_interval_secs: u64,
    /// sled's page cache, MiB (an upper bound; a log larger than it is read back from disk on
    /// every rebuild).
    pub cache_mb: u64,
    /// Group commit: how long a busy log gathers appends into one fsync, µs (0: flush whenever
    /// appends wait). An append to an idle log is flushed at once.
    pub commit_gather_us: u64,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            partitions: topics::DEFAULT_PARTITIONS,
            retention: BTreeMap::new(),
            retention_interval_secs: 60,
            cache_mb: voxgate_storage::log::DEFAULT_CACHE_BYTES / (1024 * 1024),
            // Twilio's requests and streams are open-loop: gathering for 1 ms costs a webhook
            // 0.76× the CPU (BENCHMARKS.md, group commit).
            commit_gather_us: 1000,
        }
    }
}

/// The file form of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub public_url: String,
    pub listen: String,
    pub metrics_listen: String,
    pub data_dir: PathBuf,
    /// Validate `X-Twilio-Signature` on the Media Streams WebSocket upgrade (turn off for local tools).
    pub validate_stream_signature: bool,
    pub log_format: String,
    pub calls: CallsFile,
    pub transcode: TranscodeConfig,
    pub stt: SttFile,
    pub log: LogFile,
    pub tenants: Vec<TenantFile>,
    /// Operator token for the REST API: `admin-` and at least 20 more characters.
    pub admin_token: Option<Secret>,
    /// 64 hex digits sealing auth tokens at rest (default: `secrets.key` in the data directory).
    pub secrets_key: Option<Secret>,
    /// Default call quotas of every tenant.
    pub quotas: Quota,
    /// REST throttle per tenant and endpoint.
    pub throttle: ThrottleConfig,
    /// Caller protection at webhook time.
    pub callers: CallerConfig,
    /// Networks allowed to reach the Twilio-facing endpoints (webhooks, Media Streams); empty =
    /// anyone. CIDR notation, e.g. `["54.172.60.0/23", "127.0.0.1/32"]`.
    pub twilio_allow_cidrs: Vec<String>,
    /// Proxies in front of voxgate (CIDR notation): only from these is `X-Forwarded-For`
    /// believed, walked from the right to the first address that is not one of them.
    pub trusted_proxies: Vec<String>,
    /// Replaced by `trusted_proxies`; refused with a message saying so.
    pub trust_forwarded_for: Option<bool>,
    /// TLS for the main listener: `[tls] cert_file = …, key_file = …` (PEM).
    pub tls: Option<TlsFile>,
    /// The main listener's deadlines and connection cap.
    pub http: crate::http::server::HttpFile,
    /// Gateway mode: deadlines toward the customers' apps, the TwiML cache, callback retries.
    pub gateway: crate::http::gateway::GatewayFile,
    /// Fraud rules and thresholds (`[fraud]`, per tenant `[fraud.tenants.AC…]`); reloaded on SIGHUP.
    pub fraud: FraudConfig,
    /// Twilio's REST API base URL (ending calls); a fake Twilio in tests.
    pub twilio_api_url: String,
    /// Let tenant-given URLs (usage-trigger callbacks) reach loopback, private and link-local
    /// addresses. Off: they must be public (SSRF protection).
    pub allow_private_callbacks: bool,
    /// Tenants with their own `tenant` label on metrics; the rest are labelled `other`.
    pub metrics_tenant_labels: usize,
    /// Prices, volume tiers and budgets (`[billing.prices]`, `[billing.budgets]`).
    pub billing: BillingConfig,
    /// Publish every public event as JSON to NATS (`[analytics] nats_url = …`).
    pub analytics: Option<crate::stages::analytics::AnalyticsConfig>,
    /// Join a JetStream cluster (`[cluster] nats_url = …, roles = …`) instead of the sled log.
    pub cluster: Option<crate::stages::cluster::ClusterFile>,
    /// The web console at `/console` (`[console] enabled = false` turns it off).
    pub console: crate::http::console::ConsoleFile,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:8080".into(),
            listen: "127.0.0.1:8080".into(),
            metrics_listen: "127.0.0.1:9090".into(),
            data_dir: PathBuf::from("./voxgate-data"),
            validate_stream_signature: true,
            log_format: "text".into(),
            calls: CallsFile::default(),
            transcode: TranscodeConfig::default(),
            stt: SttFile::default(),
            log: LogFile::default(),
            tenants: Vec::new(),
            admin_token: None,
            secrets_key: None,
            quotas: Quota::default(),
            throttle: ThrottleConfig::default(),
            callers: CallerConfig::default(),
            twilio_allow_cidrs: Vec::new(),
            trusted_proxies: Vec::new(),
            trust_forwarded_for: None,
            tls: None,
            http: crate::http::server::HttpFile::default(),
            gateway: crate::http::gateway::GatewayFile::default(),
            fraud: FraudConfig::default(),
            twilio_api_url: "https://api.twilio.com".into(),
            allow_private_callbacks: false,
            metrics_tenant_labels: 100,
            billing: BillingConfig::default(),
            analytics: None,
            cluster: None,
            console: crate::http::console::ConsoleFile::default(),
        }
    }
}

/// A validated tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub account_sid: AccountSid,
    pub auth_token: Secret,
    pub numbers: Vec<String>,
    /// Each number with its routing (the default, voxgate answers, for a plain number).
    pub routes: Vec<(String, NumberRouting)>,
    pub friendly_name: Option<String>,
    pub quota: Option<Quota>,
    pub hints: String,
}

/// Text or JSON log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL Twilio uses to reach us, without a trailing slash.
    pub public_url: String,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub validate_stream_signature: bool,
    pub log_format: LogFormat,
    pub calls: CallConfig,
    pub transcode: TranscodeConfig,
    pub stt: SttFile,
    pub topics: Vec<TopicSpec>,
    pub retention_interval: Duration,
    /// sled's page cache, bytes.
    pub log_cache_bytes: u64,
    /// `[log] commit_gather_us`.
    pub commit_gather: Duration,
    pub tenants: Vec<Tenant>,
    pub admin_token: Option<Secret>,
    pub secrets_key: Option<Secret>,
    pub default_quota: Quota,
    pub throttle: ThrottleConfig,
    pub callers: CallerConfig,
    pub twilio_allow: Vec<ipnet::IpNet>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub tls: Option<TlsFile>,
    pub http: crate::http::server::HttpFile,
    pub gateway: crate::http::gateway::GatewayFile,
    pub fraud: FraudConfig,
    pub twilio_api_url: String,
    pub allow_private_callbacks: bool,
    pub metrics_tenant_labels: usize,
    pub billing: BillingConfig,
    pub analytics: Option<crate::stages::analytics::AnalyticsConfig>,
    /// The JetStream cluster this node joins; `None` runs on the embedded sled log.
    pub cluster: Option<crate::stages::cluster::ClusterConfig>,
    /// The roles this node runs (all unless `--roles`/`[cluster] roles` says otherwise).
    pub roles: crate::stages::cluster::Roles,
    pub console: crate::http::console::ConsoleFile,
}

/// Overrides from command-line flags (applied last).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--nats URL`: join this JetStream server's cluster.
    pub nats: Option<String>,
    /// `--roles a,b`.
    pub roles: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<String>,
}

const NOT_KEYS: &[&str] = &["CONFIG", "LOG"];

/// Shortest tenant auth token accepted on a node reachable beyond loopback (Twilio's are 32).
const MIN_EXPOSED_TOKEN: usize = 32;

/// Logs the node rebuilds its state from at start (billing reads calls, transcripts, tenants and
/// its own log; tenancy the tenants log): no retention on them.
const REBUILT_FROM: &[&str] = &[topics::CALLS, topics::TRANSCRIPTS, topics::TENANTS, topics::BILLING];
/// Logs retention may shorten.
const RETAINABLE: &[&str] = &[topics::MEDIA, topics::SPEECH, topics::FRAUD, topics::ALERTS];

impl Config {
    /// Loads `path` (if any), applies `VOXGATE_*` variables from `env`, then the flags.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("VOXGATE_") else {
                continue;
            };
            if NOT_KEYS.contains(&rest) || rest.starts_with("TEST_") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut table, &path, env_value(&v))
                .map_err(|reason| ConfigError::Invalid { key: k.clone(), reason })?;
        }
        let file: ConfigFile = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_owned()))?;
        Self::from_file(file, flags)
    }

    /// Validates the file form with flag overrides.
    pub fn from_file(mut f: ConfigFile, flags: &Overrides) -> Result<Self, ConfigError> {
        if let Some(d) = &flags.data_dir {
            f.data_dir = d.clone();
        }
        if let Some(l) = &flags.listen {
            f.listen = l.clone();
        }
        if let Some(l) = &flags.metrics_listen {
            f.metrics_listen = l.clone();
        }
        if let Some(l) = &flags.log_format {
            f.log_format = l.clone();
        }
        if let Some(url) = &flags.nats {
            match &mut f.cluster {
                Some(c) => c.nats_url = url.clone(),
                None => {
                    f.cluster = Some(crate::stages::cluster::ClusterFile {
                        nats_url: url.clone(),
                        roles: None,
                        prefix: "voxgate".into(),
                        node: None,
                        lease_ttl_secs: 6,
                        tenant_shards: crate::stages::cluster::DEFAULT_TENANT_SHARDS,
                        auth: Default::default(),
                    })
                }
            }
        }
        if let (Some(r), Some(c)) = (&flags.roles, &mut f.cluster) {
            c.roles = Some(r.clone());
        }
        let invalid = |key: &str, reason: String| ConfigError::Invalid { key: key.into(), reason };
        let public_url = f.public_url.trim_end_matches('/').to_owned();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) || public_url.len() < 10 {
            return Err(invalid("public_url", format!("must be an http:// or https:// URL, got {:?}", f.public_url)));
        }
        if public_url.contains('?') || public_url.contains('#') {
            return Err(invalid("public_url", "must not have a query or fragment".into()));
        }
        let listen = f.listen.parse().map_err(|e| invalid("listen", format!("{:?}: {e}", f.listen)))?;
        let metrics_listen =
            f.metrics_listen.parse().map_err(|e| invalid("metrics_listen", format!("{:?}: {e}", f.metrics_listen)))?;
        let log_format = match f.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log_format", format!("must be text or json, got {other:?}"))),
        };
        if f.log.commit_gather_us > 50_000 {
            return Err(invalid("log.commit_gather_us", "must be at most 50000 (50 ms)".into()));
        }
        if f.calls.max_duration_secs == 0 || f.calls.max_duration_secs > 4 * 3600 {
            return Err(invalid("calls.max_duration_secs", "must be between 1 and 14400".into()));
        }
        if !(20..=1000).contains(&f.calls.batch_ms) || !f.calls.batch_ms.is_multiple_of(20) {
            return Err(invalid("calls.batch_ms", "must be a multiple of 20 between 20 and 1000".into()));
        }
        if f.calls.queue_ms.is_some() {
            return Err(invalid(
                "calls.queue_ms",
                "was replaced by queue_kib (the memory a call's audio queue may hold) and stale_audio_secs (how long audio may wait for the log): audio is no longer shed for arriving fast".into(),
            ));
        }
        if !(16..=1 << 20).contains(&f.calls.queue_kib) {
            return Err(invalid("calls.queue_kib", "must be between 16 and 1048576".into()));
        }
        if !(1..=3600).contains(&f.calls.stale_audio_secs) {
            return Err(invalid("calls.stale_audio_secs", "must be between 1 and 3600".into()));
        }
        if f.calls.reattach_attempts > 100 {
            return Err(invalid("calls.reattach_attempts", "must be between 0 and 100".into()));
        }
        f.transcode.vad.validate().map_err(|e| invalid("transcode.vad", e.to_string()))?;
        if f.stt.workers == 0 || f.stt.workers > 64 {
            return Err(invalid("stt.workers", "must be between 1 and 64".into()));
        }
        if f.stt.max_batch == 0 || f.stt.max_batch > 64 {
            return Err(invalid("stt.max_batch", "must be between 1 and 64".into()));
        }
        if f.stt.beam_size == 0 || f.stt.beam_size > 16 {
            return Err(invalid("stt.beam_size", "must be between 1 (greedy) and 16".into()));
        }
        if f.stt.min_encoder_ms > 30_000 {
            return Err(invalid("stt.min_encoder_ms", "must be at most 30000 (Whisper's window)".into()));
        }
        if f.stt.hints.chars().count() > 1000 || f.stt.hints.chars().any(char::is_control) {
            return Err(invalid("stt.hints", "must be at most 1,000 characters, without control characters".into()));
        }
        if f.log.partitions == 0 || f.log.partitions > 1024 {
            return Err(invalid("log.partitions", "must be between 1 and 1024".into()));
        }
        let mut topics = topics::default_specs();
        for (name, r) in &f.log.retention {
            let spec = topics
                .iter_mut()
                .find(|t| &t.name == name)
                .ok_or_else(|| invalid(&format!("log.retention.{name}"), "no such topic".into()))?;
            // The node rebuilds tenants, usage, triggers and budget stops from these logs at every
            // start; with no snapshot to start from, removing their records would lose that state.
            if REBUILT_FROM.contains(&name.as_str()) && (r.max_age.is_some() || r.max_events_per_partition.is_some()) {
                return Err(invalid(
                    &format!("log.retention.{name}"),
                    format!(
                        "the node rebuilds its state (tenants, usage, triggers, budgets) from the {name} log at every start, so its records are kept; retention applies to {} only",
                        RETAINABLE.join(", ")
                    ),
                ));
            }
            spec.retention = *r;
        }
        for t in topics.iter_mut().filter(|t| t.name != topics::TENANTS) {
            t.partitions = f.log.partitions;
        }
        let loopback_only = {
            let l: SocketAddr = listen;
            l.ip().is_loopback()
        };
        let mut tenants = Vec::with_capacity(f.tenants.len());
        for (i, t) in f.tenants.into_iter().enumerate() {
            let key = |k: &str| format!("tenants[{i}].{k}");
            let account_sid =
                AccountSid::parse(&t.account_sid).map_err(|e| invalid(&key("account_sid"), e.to_string()))?;
            if t.auth_token.expose().len() < 8 || t.auth_token.expose().len() > 256 {
                return Err(invalid(&key("auth_token"), "must be 8 to 256 characters".into()));
            }
            // A short token is guessable; it signs every webhook the tenant gets. Only a node that
            // listens on loopback alone (a laptop demo) may keep one.
            if t.auth_token.expose().len() < MIN_EXPOSED_TOKEN && !loopback_only {
                return Err(invalid(
                    &key("auth_token"),
                    format!(
                        "is shorter than {MIN_EXPOSED_TOKEN} characters while the node listens on {listen} (beyond loopback); use the auth token Twilio issued (32 hex digits)"
                    ),
                ));
            }
            let routes: Vec<(String, NumberRouting)> = t
                .numbers
                .iter()
                .map(|n| n.routing().map(|r| (n.number().to_owned(), r)))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&key("numbers"), e))?;
            let numbers: Vec<String> = routes.iter().map(|(n, _)| n.clone()).collect();
            for (n, r) in &routes {
                for url in [&r.voice_url, &r.voice_fallback_url, &r.status_callback].into_iter().flatten() {
                    crate::http::outbound::check_at_delivery(url, f.allow_private_callbacks)
                        .map_err(|e| invalid(&key("numbers"), format!("{n}: {url}: {e}")))?;
                }
            }
            for n in &numbers {
                if !is_e164(n) {
                    return Err(invalid(
                        &key("numbers"),
                        format!("{n:?} is not an E.164 number (+ and 2 to 15 digits)"),
                    ));
                }
            }
            if tenants.iter().any(|o: &Tenant| o.account_sid == account_sid) {
                return Err(invalid(&key("account_sid"), format!("{account_sid} is listed twice")));
            }
            for n in &numbers {
                if let Some(o) = tenants.iter().find(|o: &&Tenant| o.numbers.contains(n)) {
                    return Err(invalid(&key("numbers"), format!("{n} already belongs to {}", o.account_sid)));
                }
            }
            if let Some(name) = &t.friendly_name {
                if name.chars().count() > limits::FRIENDLY_NAME {
                    return Err(invalid(
                        &key("friendly_name"),
                        format!("at most {} characters", limits::FRIENDLY_NAME),
                    ));
                }
            }
            if let Some(q) = &t.quota {
                q.validate().map_err(|e| invalid(&key("quota"), e.to_string()))?;
            }
            voxgate_actors::tenancy::directory::check_hints(&t.hints)
                .map_err(|e| invalid(&key("hints"), e.to_string()))?;
            tenants.push(Tenant {
                account_sid,
                auth_token: t.auth_token,
                numbers,
                routes,
                friendly_name: t.friendly_name,
                quota: t.quota,
                hints: t.hints.trim().to_owned(),
            });
        }
        if let Some(a) = &f.admin_token {
            let rest = a.expose().strip_prefix("admin-").unwrap_or_default();
            if rest.chars().count() < 20 || !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(invalid(
                    "admin_token",
                    "must be admin- followed by at least 20 random letters, digits, - or _".into(),
                ));
            }
        }
        f.quotas.validate().map_err(|e| invalid("quotas", e.to_string()))?;
        f.http.validate().map_err(|e| invalid("http", e.to_string()))?;
        f.gateway.validate().map_err(|e| invalid("gateway", e.to_string()))?;
        f.console.validate().map_err(|e| invalid("console", e.to_string()))?;
        f.throttle.validate().map_err(|e| invalid("throttle", e.to_string()))?;
        f.callers.validate().map_err(|e| invalid("callers", e.to_string()))?;
        f.billing.validate().map_err(|e| invalid("billing", e.to_string()))?;
        if let Some(a) = &f.analytics {
            if !a.nats_url.starts_with("nats://") && !a.nats_url.starts_with("tls://") {
                return Err(invalid(
                    "analytics.nats_url",
                    format!("must be a nats:// or tls:// URL, got {:?}", voxgate_storage::redact_url(&a.nats_url)),
                ));
            }
            a.auth.validate().map_err(|e| invalid("analytics.auth", e.to_string()))?;
            a.redact.validate().map_err(|e| invalid("analytics", e.to_string()))?;
            if a.subject_prefix.is_empty() || a.subject_prefix.contains([' ', '*', '>']) {
                return Err(invalid("analytics.subject_prefix", "must be a NATS subject without wildcards".into()));
            }
        }
        if flags.roles.as_deref().is_some_and(|r| r != "all") && f.cluster.is_none() {
            return Err(invalid(
                "roles",
                "a node runs a subset of roles only in a cluster: add --nats URL (one sled node runs them all)".into(),
            ));
        }
        let cluster = match &f.cluster {
            Some(c) => Some(
                crate::stages::cluster::ClusterConfig::from_file(c).map_err(|e| invalid("cluster", e.to_string()))?,
            ),
            None => None,
        };
        if cluster.is_some() && f.secrets_key.is_none() {
            return Err(invalid(
                "secrets_key",
                "a cluster needs one secrets key on every node (auth tokens on the shared tenants log are sealed with it): set secrets_key (64 hex digits) or VOXGATE_SECRETS_KEY".into(),
            ));
        }
        let roles = match f.cluster.as_ref().and_then(|c| c.roles.as_deref()) {
            Some(r) => crate::stages::cluster::Roles::parse(r).map_err(|e| invalid("cluster.roles", e.to_string()))?,
            None => crate::stages::cluster::Roles::all(),
        };
        f.fraud.validate().map_err(|e| invalid("fraud", e.to_string()))?;
        if !(f.twilio_api_url.starts_with("http://") || f.twilio_api_url.starts_with("https://")) {
            return Err(invalid("twilio_api_url", format!("must be an http(s) URL, got {:?}", f.twilio_api_url)));
        }
        let twilio_allow = networks("twilio_allow_cidrs", &f.twilio_allow_cidrs)?;
        if f.trust_forwarded_for.is_some() {
            return Err(invalid(
                "trust_forwarded_for",
                "was replaced by trusted_proxies = [\"CIDR\", …]: the proxies whose X-Forwarded-For is believed (the first entry is the client's own say)".into(),
            ));
        }
        let trusted_proxies = networks("trusted_proxies", &f.trusted_proxies)?;
        Ok(Self {
            public_url,
            listen,
            metrics_listen,
            data_dir: f.data_dir,
            validate_stream_signature: f.validate_stream_signature,
            log_format,
            calls: CallConfig {
                max_duration: Duration::from_secs(f.calls.max_duration_secs),
                batch_frames: f.calls.batch_ms / 20,
                queue_bytes: f.calls.queue_kib as usize * 1024,
                stale_audio: Duration::from_secs(u64::from(f.calls.stale_audio_secs)),
                reattach_attempts: f.calls.reattach_attempts,
                ..CallConfig::default()
            },
            // Open segments are for STT alone: without it, their pieces would only cost log
            // writes (measured: +0.5 ms of CPU per talking stream-second).
            transcode: {
                let mut t = f.transcode;
                t.vad.progress &= f.stt.enabled;
                t
            },
            stt: f.stt,
            topics,
            retention_interval: Duration::from_secs(f.log.retention_interval_secs.max(1)),
            log_cache_bytes: f.log.cache_mb.clamp(8, 1 << 20) * 1024 * 1024,
            commit_gather: Duration::from_micros(f.log.commit_gather_us),
            tenants,
            admin_token: f.admin_token,
            secrets_key: f.secrets_key,
            default_quota: f.quotas,
            throttle: f.throttle,
            callers: f.callers,
            twilio_allow,
            trusted_proxies,
            tls: f.tls,
            http: f.http,
            gateway: f.gateway,
            fraud: f.fraud,
            twilio_api_url: f.twilio_api_url,
            allow_private_callbacks: f.allow_private_callbacks,
            metrics_tenant_labels: f.metrics_tenant_labels.min(10_000),
            billing: f.billing,
            analytics: f.analytics,
            cluster,
            roles,
            console: f.console,
        })
    }

    /// The tenant with this AccountSid.
    pub fn tenant(&self, sid: AccountSid) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.account_sid == sid)
    }
}

pub use voxgate_actors::tenancy::is_e164;

/// Addresses or CIDR networks, named by `key` when one does not parse.
fn networks(key: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .map(|c| {
            c.parse::<ipnet::IpNet>().or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)).map_err(|_| {
                ConfigError::Invalid { key: key.into(), reason: format!("{c:?} is not an address or CIDR network") }
            })
        })
        .collect()
}

fn env_value(v: &str) -> toml::Value {
    match format!("v = {v}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(v.to_owned())),
        Err(_) => toml::Value::String(v.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("{first} is not a table")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn issue_example_loads() {
        let f = write(&format!(
            "public_url = \"http://127.0.0.1:8080\"\n[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"+14155550100\"]\n"
        ));
        let c = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap();
        assert_eq!(c.tenants.len(), 1);
        assert_eq!(c.calls.max_duration, Duration::from_secs(300));
        assert!(!format!("{c:?}").contains(TOKEN), "tokens never appear in Debug output");
    }

    #[test]
    fn open_segments_only_with_stt() {
        let tenant = format!(
            "[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"+14155550100\"]\n"
        );
        let on = write(&tenant);
        let c = Config::load(Some(on.path()), vec![], &Overrides::default()).unwrap();
        assert!(c.stt.enabled && c.transcode.vad.progress, "on by default");
        let off = write(&format!("[stt]\nenabled = false\n{tenant}"));
        let c = Config::load(Some(off.path()), vec![], &Overrides::default()).unwrap();
        assert!(!c.transcode.vad.progress, "no pieces for an STT that does not run");
    }

    #[test]
    fn env_overrides_and_nesting() {
        let env = vec![
            ("VOXGATE_PUBLIC_URL".to_owned(), "https://voice.example.com/".to_owned()),
            ("VOXGATE_CALLS__MAX_DURATION_SECS".to_owned(), "60".to_owned()),
            ("VOXGATE_VALIDATE_STREAM_SIGNATURE".to_owned(), "false".to_owned()),
            ("VOXGATE_CONFIG".to_owned(), "/ignored".to_owned()),
            (
                "VOXGATE_TENANTS".to_owned(),
                format!("[{{account_sid=\"AC0123456789abcdef0123456789abcdef\", auth_token=\"{TOKEN}\", numbers=[\"+14155550100\"]}}]"),
            ),
        ];
        let c =
            Config::load(None, env, &Overrides { listen: Some("127.0.0.1:0".into()), ..Default::default() }).unwrap();
        assert_eq!(c.public_url, "https://voice.example.com");
        assert_eq!(c.calls.max_duration, Duration::from_secs(60));
        assert!(!c.validate_stream_signature);
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.tenants[0].numbers, vec!["+14155550100"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::load(None, vec![("VOXGATE_PUBLIK_URL".into(), "x".into())], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("publik_url"), "{e}");
        let f = write("[[tenants]]\naccount_sid = \"AC12\"\nauth_token = \"abcdefghij\"\n");
        let e = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("tenants[0].account_sid"), "{e}");
        let f = write(&format!(
            "[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"4155550100\"]\n"
        ));
        let e = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("E.164"), "{e}");
    }

    #[test]
    fn group_commit_gathers_for_a_millisecond_unless_told() {
        let c = Config::load(None, vec![], &Overrides::default()).unwrap();
        assert_eq!(c.commit_gather, Duration::from_millis(1));
        let c = Config::load(None, vec![("VOXGATE_LOG__COMMIT_GATHER_US".into(), "0".into())], &Overrides::default())
            .unwrap();
        assert_eq!(c.commit_gather, Duration::ZERO);
        let e =
            Config::load(None, vec![("VOXGATE_LOG__COMMIT_GATHER_US".into(), "60000".into())], &Overrides::default())
                .unwrap_err();
        assert!(e.to_string().contains("log.commit_gather_us"), "{e}");
    }

    #[test]
    fn a_cluster_node_needs_the_shared_secrets_key() {
        let flags = Overrides {
            nats: Some("nats://127.0.0.1:4222".into()),
            roles: Some("transcode,stt".into()),
            ..Default::default()
        };
        let e = Config::load(None, vec![], &flags).unwrap_err();
        assert!(e.to_string().contains("secrets_key"), "{e}");
        let key = ("VOXGATE_SECRETS_KEY".to_owned(), "ab".repeat(32));
        let c = Config::load(None, vec![key.clone()], &flags).unwrap();
        assert_eq!(c.roles.names(), vec!["transcode", "stt"]);
        assert_eq!(c.cluster.unwrap().nats_url, "nats://127.0.0.1:4222");
        let e =
            Config::load(None, vec![key], &Overrides { roles: Some("stt".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("--nats"), "{e}");
    }

    #[test]
    fn numbers_take_twilios_routing_fields() {
        let f = write(&format!(
            "allow_private_callbacks = true\n[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"+14155550100\", {{ number = \"+14155550101\", voice_url = \"http://127.0.0.1:9000/voice\", voice_method = \"GET\", status_callback = \"http://127.0.0.1:9000/status\" }}]\n"
        ));
        let c = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap();
        let t = &c.tenants[0];
        assert_eq!(t.numbers, vec!["+14155550100", "+14155550101"]);
        assert_eq!(t.routes[0].1, NumberRouting::default());
        let r = &t.routes[1].1;
        assert_eq!((r.voice_url.as_deref(), r.voice_method), (Some("http://127.0.0.1:9000/voice"), HttpMethod::Get));
        assert_eq!(r.status_callback_method, HttpMethod::Post);
        // Loopback needs the operator's leave; a bad method or scheme is named.
        let text = std::fs::read_to_string(f.path()).unwrap();
        for (bad, named) in [
            (text.replace("allow_private_callbacks = true\n", ""), "tenants[0].numbers"),
            (text.replace("\"GET\"", "\"PUT\""), "voice_method"),
            (text.replace("http://127.0.0.1:9000/voice", "ftp://x/voice"), "VoiceUrl"),
        ] {
            let g = write(&bad);
            let e = Config::load(Some(g.path()), vec![], &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn short_tokens_only_on_loopback() {
        let cfg = |listen: &str| {
            format!(
                "listen = \"{listen}\"\n[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"demo-auth-token-change-me\"\n"
            )
        };
        let f = write(&cfg("127.0.0.1:8080"));
        Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap();
        let f = write(&cfg("0.0.0.0:8080"));
        let e = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("tenants[0].auth_token") && e.to_string().contains("32"), "{e}");
        // The --listen flag counts, not only the file.
        let f = write(&cfg("127.0.0.1:8080"));
        let flags = Overrides { listen: Some("0.0.0.0:0".into()), ..Default::default() };
        assert!(Config::load(Some(f.path()), vec![], &flags).is_err());
    }

    #[test]
    fn retention_on_logs_the_node_rebuilds_from_is_refused() {
        for topic in ["calls", "tenants", "billing", "transcripts"] {
            let f = write(&format!("[log.retention.{topic}]\nmax_age_secs = 86400\n"));
            let e = Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(&format!("log.retention.{topic}")), "{e}");
        }
        let f = write("[log.retention.fraud]\nmax_age_secs = 86400\n");
        Config::load(Some(f.path()), vec![], &Overrides::default()).unwrap();
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/voxgate.example.toml");
        let c = Config::load(Some(&path), vec![], &Overrides::default()).unwrap();
        assert_eq!(c.tenants.len(), 1);
        assert_eq!(c.calls.batch_frames, 5);
        let media = c.topics.iter().find(|t| t.name == "media").unwrap();
        assert_eq!(media.retention.max_age, Some(Duration::from_secs(604_800)));
    }

    #[test]
    fn e164() {
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("+0123"));
        assert!(!is_e164("14155550100"));
        assert!(!is_e164("+1415555010012345"));
        assert!(!is_e164("+1 415"));
    }
}
