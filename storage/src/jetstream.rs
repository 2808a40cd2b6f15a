//! The JetStream backend: the same [`Log`](crate::Log) API with NATS JetStream as the log of
//! record, so several voxgate nodes share one log.
//!
//! Layout on the server (names start with the cluster's `prefix`, default `voxgate`):
//! - one stream per topic partition, `{prefix}_{topic}_{partition}` on the subject
//!   `{prefix}.log.{topic}.{partition}`, so a stream sequence is a partition offset plus one and a
//!   partition keeps one order. Retention is the topic's, applied by voxgate's retention pass
//!   (which purges the stream below what every stage has read), never by the server's own
//!   limits. A message is `appended_at (i64 BE µs) ‖ payload`, as in sled, so
//!   event time comes from the injected clock, not the server's.
//! - `Nats-Msg-Id` is the envelope's event id ([`voxgate_protocol::peek_event_id`]): an event
//!   re-sent after a lost ack, a restart or a lease change is stored once (within the stream's
//!   duplicate window, [`ClusterOptions::dedup_window`]).
//! - cursors and stage state in the key-value buckets `{prefix}_cursors` (`{name}.{topic}.{p}`)
//!   and `{prefix}_state` (`{stage}.{hex key}`); `{prefix}_meta` pins each topic's partition count.
//!
//! On the node: the partitions it reads are mirrored into its local sled tree by an ordered
//! consumer per partition (a read cache: readers keep their synchronous, zero-copy reads, and a
//! partition's "durable head" is what has been mirrored, which JetStream acknowledged first).
//! Cursors and state are cached locally and written to the buckets by [`Log::sync`]; `open` and
//! [`Log::refresh`] load them from the buckets. With `spool` on, an append that cannot reach
//! JetStream is kept in a local spool and forwarded in order when NATS is back (the spool lives
//! in `log/spool.rs`; the log's side of this backend in `log/jetstream_backend.rs`).

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures_util::StreamExt;

use crate::log::{record_key, Inner, Spool, StorageError};

/// How a node joins a JetStream cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `nats://host:port` of a JetStream-enabled server.
    pub url: String,
    /// Names of streams, subjects and buckets start with this (`[A-Za-z0-9_-]`).
    pub prefix: String,
    /// Topics this node reads, mirrored locally; `None` mirrors every topic.
    pub replicate: Option<Vec<String>>,
    /// Keep appends in a local spool while JetStream is unreachable (ingress nodes).
    pub spool: bool,
    /// How long an append waits for JetStream's ack before it counts as failed (or spooled).
    pub ack_timeout: Duration,
    /// The streams' de-duplication window for `Nats-Msg-Id`.
    pub dedup_window: Duration,
    /// A work claim ([`Log::claim`](crate::Log::claim)) not renewed for this long is free for
    /// another node: how long a dead node's work waits before the survivors take it.
    pub lease_ttl: Duration,
    /// Credentials and TLS for the server.
    pub auth: crate::nats::NatsAuth,
}

impl ClusterOptions {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: "voxgate".to_owned(),
            replicate: None,
            spool: false,
            ack_timeout: Duration::from_secs(2),
            dedup_window: Duration::from_secs(300),
            lease_ttl: Duration::from_secs(6),
            auth: crate::nats::NatsAuth::default(),
        }
    }
}

/// Where an append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// In the log at this position.
    Logged(crate::Position),
    /// JetStream was unreachable: kept on local disk, forwarded in order when it is back.
    Spooled,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Bucket {
    Cursors,
    State,
}

/// Cursor and state writes not yet in their bucket, by bucket and key (`None` = delete).
type Dirty = HashMap<(Bucket, String), Option<Vec<u8>>>;

pub(crate) struct Cluster {
    pub(crate) url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    cursors: kv::Store,
    state: kv::Store,
    leases: kv::Store,
    lease_ttl: Duration,
    /// Per topic index: mirrored locally.
    pub(crate) replicated: Vec<bool>,
    /// Cursor and state writes not yet in their bucket (`None` = delete).
    dirty: Mutex<Dirty>,
    /// One bucket flush at a time, so a later value never lands before an earlier one.
    flushing: tokio::sync::Mutex<()>,
    pub(crate) ack_timeout: Duration,
    /// The ingress spool, on a node with `spool` on.
    pub(crate) spool: Option<Spool>,
    /// Counts the client's (re)connections: a server that restarted lost the mirrors' ephemeral
    /// consumers, which the client would notice only at its 15 s heartbeat.
    connections: tokio::sync::watch::Receiver<u64>,
}

pub(crate) fn js_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::JetStream(e.to_string())
}

pub(crate) fn stream_name(prefix: &str, topic: &str, partition: u32) -> String {
    format!("{prefix}_{topic}_{partition}")
}

pub(crate) fn subject(prefix: &str, topic: &str, partition: u32) -> String {
    format!("{prefix}.log.{topic}.{partition}")
}

pub(crate) fn cursor_kv_key(name: &str, topic: &str, partition: u32) -> String {
    format!("{name}.{topic}.{partition}")
}

pub(crate) fn state_kv_key(stage: &str, key: &[u8]) -> String {
    let mut s = String::with_capacity(stage.len() + 1 + key.len() * 2);
    s.push_str(stage);
    s.push('.');
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Cluster {
    /// The connection and the subject prefix.
    pub(crate) fn nats(&self) -> (async_nats::Client, String) {
        (self.client.clone(), self.prefix.clone())
    }

    /// Connects, and creates (or checks) the streams and buckets for `specs`.
    pub(crate) async fn connect(
        opts: &ClusterOptions,
        specs: &[crate::TopicSpec],
        local: &sled::Db,
    ) -> Result<Self, StorageError> {
        if !valid_token(&opts.prefix) {
            return Err(StorageError::JetStream(format!(
                "cluster prefix {:?} must be letters, digits, '_' or '-'",
                opts.prefix
            )));
        }
        for s in specs {
            if !valid_token(&s.name) {
                return Err(StorageError::JetStream(format!("topic name {:?} is not a NATS token", s.name)));
            }
        }
        let shown = crate::nats::redact_url(&opts.url);
        let (connected, connections) = tokio::sync::watch::channel(0u64);
        let connect = async_nats::ConnectOptions::new()
            .name("voxgate")
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    connected.send_modify(|n| *n += 1);
                }
                async {}
            });
        let connect = opts
            .auth
            .with_url_credentials(&opts.url)
            .apply(connect)
            .await
            .map_err(|e| StorageError::JetStream(format!("NATS settings for {shown}: {e}")))?;
        let client = connect
            .connect(shown.as_str())
            .await
            .map_err(|e| StorageError::JetStream(format!("connecting to {shown}: {e}")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.ack_timeout.max(Duration::from_secs(1)));
        let bucket = |name: &str, history: i64| kv::Config {
            bucket: format!("{}_{name}", opts.prefix),
            history,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let meta = open_bucket(&js, bucket("meta", 1)).await?;
        let cursors = open_bucket(&js, bucket("cursors", 1)).await?;
        let state = open_bucket(&js, bucket("state", 1)).await?;
        let ttl = opts.lease_ttl.max(Duration::from_secs(1));
        let leases = open_bucket(&js, kv::Config { max_age: ttl, ..bucket("leases", 1) }).await?;
        for spec in specs {
            let key = format!("partitions.{}", spec.name);
            match meta.get(key.as_str()).await.map_err(js_err)? {
                Some(v) => {
                    let on_server =
                        std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u32>().ok()).ok_or_else(|| {
                            StorageError::JetStream(format!("corrupt partition count for topic {:?}", spec.name))
                        })?;
                    if on_server != spec.partitions {
                        return Err(StorageError::PartitionMismatch {
                            topic: spec.name.clone(),
                            on_disk: on_server,
                            configured: spec.partitions,
                        });
                    }
                }
                None => {
                    // `create` fails if another node won the race: then check its value.
                    if meta.create(key.as_str(), spec.partitions.to_string().into()).await.is_err() {
                        let v = meta.get(key.as_str()).await.map_err(js_err)?.unwrap_or_default();
                        if v.as_ref() != spec.partitions.to_string().as_bytes() {
                            return Err(StorageError::PartitionMismatch {
                                topic: spec.name.clone(),
                                on_disk: std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
                                configured: spec.partitions,
                            });
                        }
                    }
                }
            }
            for p in 0..spec.partitions {
                let config = stream::Config {
                    name: stream_name(&opts.prefix, &spec.name, p),
                    subjects: vec![subject(&opts.prefix, &spec.name, p)],
                    storage: stream::StorageType::File,
                    // No server-side age or count limit: retention is voxgate's, which never
                    // removes what a stage has not read yet ([`Cluster::purge_below`]).
                    duplicate_window: opts.dedup_window,
                    ..Default::default()
                };
                js.create_or_update_stream(config).await.map_err(|e| {
                    StorageError::JetStream(format!("stream {}: {e}", stream_name(&opts.prefix, &spec.name, p)))
                })?;
            }
        }
        let replicated =
            specs.iter().map(|s| opts.replicate.as_ref().is_none_or(|r| r.iter().any(|t| t == &s.name))).collect();
        let spool = if opts.spool { Some(Spool::open(local)?) } else { None };
        Ok(Self {
            url: crate::nats::redact_url(&opts.url),
            client,
            js,
            prefix: opts.prefix.clone(),
            cursors,
            state,
            leases,
            lease_ttl: ttl,
            replicated,
            dirty: Mutex::new(HashMap::new()),
            flushing: tokio::sync::Mutex::new(()),
            ack_timeout: opts.ack_timeout,
            spool,
            connections,
        })
    }

    /// Purges the partition's stream below `offset` (stream sequence `offset + 1` is kept), in the
    /// background; a failed purge is retried by the next retention pass.
    pub(crate) fn purge_below(&self, topic: &str, partition: u32, offset: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let js = self.js.clone();
        let name = stream_name(&self.prefix, topic, partition);
        rt.spawn(async move {
            let r = match js.get_stream(name.as_str()).await {
                Ok(s) => s.purge().sequence(offset.saturating_add(1)).await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(stream = %name, error = %e, "retention: purging the stream failed; the next pass retries");
            }
        });
    }

    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes one record (`appended_at ‖ payload`) and waits for JetStream's ack; returns the
    /// offset it has in its partition.
    pub(crate) async fn publish(&self, topic: &str, partition: u32, value: bytes::Bytes) -> Result<u64, StorageError> {
        let id = voxgate_protocol::peek_event_id(value.get(8..).unwrap_or_default());
        let ack = self.publish_ack(topic, partition, id, value).await?;
        tokio::time::timeout(self.ack_timeout, ack)
            .await
            .map_err(|_| StorageError::JetStream(format!("no ack from JetStream within {:?}", self.ack_timeout)))?
            .map(|a| a.sequence.saturating_sub(1))
            .map_err(js_err)
    }

    pub(crate) async fn publish_ack(
        &self,
        topic: &str,
        partition: u32,
        id: Option<voxgate_protocol::EventId>,
        value: bytes::Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, StorageError> {
        let mut p = jetstream::context::Publish::build().payload(value);
        if let Some(id) = id {
            p = p.message_id(id.to_string());
        }
        tokio::time::timeout(self.ack_timeout, self.js.send_publish(subject(&self.prefix, topic, partition), p))
            .await
            .map_err(|_| StorageError::JetStream("NATS did not take the publish in time".into()))?
            .map_err(js_err)
    }

    /// Publishes several records, pipelined, and waits for every ack.
    pub(crate) async fn publish_many(
        &self,
        topic: &str,
        items: Vec<(u32, bytes::Bytes)>,
    ) -> Result<Vec<crate::Position>, StorageError> {
        let mut acks = Vec::with_capacity(items.len());
        for (partition, value) in items {
            let id = voxgate_protocol::peek_event_id(value.get(8..).unwrap_or_default());
            acks.push((partition, self.publish_ack(topic, partition, id, value).await?));
        }
        let mut out = Vec::with_capacity(acks.len());
        for (partition, ack) in acks {
            let a = tokio::time::timeout(self.ack_timeout, ack)
                .await
                .map_err(|_| StorageError::JetStream(format!("no ack from JetStream within {:?}", self.ack_timeout)))?
                .map_err(js_err)?;
            out.push(crate::Position { partition, offset: a.sequence.saturating_sub(1) });
        }
        Ok(out)
    }

    pub(crate) fn mark(&self, bucket: Bucket, key: String, value: Option<Vec<u8>>) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert((bucket, key), value);
        }
    }

    pub(crate) fn has_dirty(&self) -> bool {
        self.dirty.lock().map(|d| !d.is_empty()).unwrap_or(false)
    }

    /// Writes every pending cursor and state change to its bucket.
    pub(crate) async fn flush(&self) -> Result<(), StorageError> {
        let _one = self.flushing.lock().await;
        let pending = match self.dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => return Err(StorageError::Closed),
        };
        let mut failed: Option<StorageError> = None;
        let mut keep = HashMap::new();
        for ((bucket, key), value) in pending {
            if failed.is_some() {
                keep.insert((bucket, key), value);
                continue;
            }
            let store = match bucket {
                Bucket::Cursors => &self.cursors,
                Bucket::State => &self.state,
            };
            let r = match &value {
                Some(v) => tokio::time::timeout(self.ack_timeout, store.put(key.as_str(), v.clone().into()))
                    .await
                    .map(|r| r.map(|_| ()).map_err(js_err)),
                None => {
                    tokio::time::timeout(self.ack_timeout, store.delete(key.as_str())).await.map(|r| r.map_err(js_err))
                }
            };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(StorageError::JetStream("no ack from the key-value bucket in time".into())),
            }
            if failed.is_some() {
                keep.insert((bucket, key), value);
            }
        }
        if let Some(e) = failed {
            // Put back what did not land, unless something newer was written meanwhile.
            if let Ok(mut d) = self.dirty.lock() {
                for (k, v) in keep {
                    d.entry(k).or_insert(v);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Every key of a bucket under `prefix` (all keys when empty) with its value.
    pub(crate) async fn load(&self, bucket: Bucket, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let store = match bucket {
            Bucket::Cursors => &self.cursors,
            Bucket::State => &self.state,
        };
        let names = keys_under(&self.client, store, prefix).await?;
        let mut out = Vec::with_capacity(names.len());
        for k in names {
            if let Some(v) = store.get(k.as_str()).await.map_err(js_err)? {
                out.push((k, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// The first and last sequence JetStream holds for a partition.
    pub(crate) async fn bounds(&self, topic: &str, partition: u32) -> Result<(u64, u64), StorageError> {
        let mut s = self.js.get_stream(stream_name(&self.prefix, topic, partition)).await.map_err(js_err)?;
        let info = s.info().await.map_err(js_err)?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }
}

/// Opens a key-value bucket, creating its stream if needed. The stream is created here with the
/// key-value layout (ADR-8) rather than by `create_key_value`, whose account-info query does not
/// parse the replies of the NATS 2.9 servers Debian ships.
async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, StorageError> {
    let name = config.bucket.clone();
    if let Ok(s) = js.get_key_value(name.as_str()).await {
        return Ok(s);
    }
    let stream = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    // Another node may create it at the same time: then the second create is a no-op or fails,
    // and the bucket is there either way.
    let created = js.create_stream(stream).await.map(|_| ()).map_err(|e| e.to_string());
    js.get_key_value(name.as_str())
        .await
        .map_err(|e| StorageError::JetStream(format!("bucket {name}: {e} ({created:?})")))
}

/// Keeps one partition's local mirror up to date: an ordered consumer from the next offset the
/// mirror lacks. Ends when the log is gone.
pub(crate) async fn mirror(inner: Weak<Inner>, cluster: Weak<Cluster>, ti: usize, partition: u32) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (js, name, from, mut connections) = {
            let Some(strong) = inner.upgrade() else { return };
            let Some(c) = cluster.upgrade() else { return };
            let t = &strong.topics[ti];
            let from = *t.partitions[partition as usize].durable.borrow();
            let mut connections = c.connections.clone();
            connections.mark_unchanged();
            (c.js.clone(), stream_name(&c.prefix, &t.spec.name, partition), from, connections)
        };
        match mirror_from(&inner, &js, &name, ti, partition, from, &mut connections).await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("voxgate_log_mirror_errors_total").increment(1);
                tracing::warn!(stream = %name, error = %e, retry_ms = backoff.as_millis() as u64, "log mirror interrupted");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn mirror_from(
    inner: &Weak<Inner>,
    js: &jetstream::Context,
    name: &str,
    ti: usize,
    partition: u32,
    from: u64,
    connections: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(), StorageError> {
    let stream = js.get_stream(name).await.map_err(js_err)?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from + 1 },
            ..Default::default()
        })
        .await
        .map_err(js_err)?;
    let mut messages = consumer.messages().await.map_err(js_err)?;
    let mut batch = Vec::with_capacity(256);
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            // Made again from the local head at once: the server may have lost the consumer.
            _ = connections.changed() => return Err(StorageError::JetStream("NATS reconnected".into())),
        };
        let first = match next {
            Some(m) => m.map_err(js_err)?,
            None => return Err(StorageError::JetStream("ordered consumer ended".into())),
        };
        batch.push(first);
        while batch.len() < 1024 {
            match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(Some(m)) => batch.push(m.map_err(js_err)?),
                _ => break,
            }
        }
        let Some(strong) = inner.upgrade() else { return Ok(()) };
        let t = &strong.topics[ti];
        let part = &t.partitions[partition as usize];
        let mut writes = sled::Batch::default();
        let mut head = *part.durable.borrow();
        for m in batch.drain(..) {
            let seq = m.info().map_err(js_err)?.stream_sequence;
            if seq == 0 || seq <= head || m.payload.len() < 8 {
                continue;
            }
            writes.insert(&record_key(partition, seq - 1), m.payload.as_ref());
            head = seq;
        }
        strong.engine()?.trees[ti].apply_batch(writes)?;
        if let Ok(mut next) = part.next.lock() {
            *next = (*next).max(head);
        }
        part.durable.send_if_modified(|d| {
            if *d < head {
                *d = head;
                true
            } else {
                false
            }
        });
        t.generation.send_modify(|g| *g += 1);
    }
}

/// Holds this node's share of a group's work units, renewing its claims every third of the lease
/// TTL. Members announce themselves under `m.{group}.{node}`; each takes up to
/// ⌈units / members⌉ units as `l.{group}.{unit}` (a create that fails if another node holds it),
/// gives back any above its share (its stage stops on the unit at once; the lease goes a round
/// later, so the next owner starts after that), and loses a unit whose renewal fails. A node that dies stops
/// renewing: its keys expire with the bucket's `max_age` and the others take its units.
pub(crate) async fn claim(
    cluster: std::sync::Arc<Cluster>,
    group: String,
    units: u32,
    node: String,
    tx: tokio::sync::watch::Sender<Vec<u32>>,
) {
    let leases = &cluster.leases;
    let member = format!("m.{group}.{node}");
    let lease = |u: u32| format!("l.{group}.{u}");
    let mut held: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    // Units given back: their leases are kept one more round, so the stage on them has stopped
    // here before another node can claim them.
    let mut releasing: Vec<u32> = Vec::new();
    // Where this node starts looking, so nodes starting together do not all race for unit 0.
    let start = node.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % units.max(1);
    let every = cluster.lease_ttl / 3;
    loop {
        if tx.is_closed() {
            for u in held.keys().chain(&releasing) {
                let _ = leases.delete(lease(*u)).await;
            }
            let _ = leases.delete(member.as_str()).await;
            return;
        }
        let members = match claim_round(&cluster.client, leases, &member, &group, &node).await {
            Ok(m) => m.max(1),
            Err(e) => {
                tracing::warn!(group = %group, error = %e, "work claims not renewed (NATS unreachable?)");
                held.clear();
                tx.send_if_modified(|v| !std::mem::take(v).is_empty());
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let fair = units.div_ceil(members as u32) as usize;
        for u in std::mem::take(&mut releasing) {
            let _ = leases.delete(lease(u)).await;
        }
        let mut keep = std::collections::BTreeMap::new();
        for (u, rev) in std::mem::take(&mut held) {
            if keep.len() >= fair {
                if leases.update(lease(u), node.clone().into(), rev).await.is_ok() {
                    releasing.push(u);
                }
                continue;
            }
            if let Ok(r) = leases.update(lease(u), node.clone().into(), rev).await {
                keep.insert(u, r);
            }
        }
        held = keep;
        for i in 0..units {
            if held.len() >= fair {
                break;
            }
            let u = (start + i) % units;
            if held.contains_key(&u) {
                continue;
            }
            if let Ok(r) = leases.create(lease(u), node.clone().into()).await {
                held.insert(u, r);
            }
        }
        let now: Vec<u32> = held.keys().copied().collect();
        tx.send_if_modified(|v| {
            if *v != now {
                tracing::info!(group = %group, node = %node, units = ?now, "work claims changed");
                *v = now;
                true
            } else {
                false
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tx.closed() => {}
        }
    }
}

/// Announces this node in `group`; returns how many members the group has.
async fn claim_round(
    client: &async_nats::Client,
    leases: &kv::Store,
    member: &str,
    group: &str,
    node: &str,
) -> Result<usize, StorageError> {
    leases.put(member, node.to_owned().into()).await.map_err(js_err)?;
    Ok(keys_under(client, leases, &format!("m.{group}.")).await?.len())
}

/// The keys of `store` that start with `prefix` (whole dot-separated tokens, ending in `.`; or
/// "" for every key), as of now, deleted keys left out. Not the client's `keys()`: that lists
/// the whole bucket and ends only once an entry comes with nothing pending behind it, which on a
/// bucket other nodes keep writing (leases renewed every second, cursors every round) can take
/// as long as they keep writing.
async fn keys_under(client: &async_nats::Client, store: &kv::Store, prefix: &str) -> Result<Vec<String>, StorageError> {
    let consumer = store
        .stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}{prefix}>", store.prefix),
            headers_only: true,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(js_err)?;
    // The latest entry of each key as it was made: they come first, in stream order; what is
    // written after that is newer than this listing and comes after them.
    let want = consumer.cached_info().num_pending as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut live = std::collections::BTreeSet::new();
    // An ordered consumer delivers each stream sequence once.
    let mut seen = 0;
    let mut messages = consumer.messages().await.map_err(js_err)?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(js_err)?;
        if let Some(key) = m.subject.strip_prefix(store.prefix.as_str()) {
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if deleted {
                live.remove(key);
            } else {
                live.insert(key.to_owned());
            }
        }
        seen += 1;
        if seen >= want {
            break;
        }
    }
    Ok(live.into_iter().collect())
}
