//! What differs between the two backends of the log, behind one trait.
//!
//! Both keep a local sled database (the [`super::engine`]) that readers read from, with the same
//! topics, durable heads, commit queue and clock; what a backend decides is how a write becomes
//! durable and where the log of record is:
//! - [`SledBackend`]: the local database is the log. An append inserts under its partition's lock
//!   and waits for the group commit; cursors and state are sled trees; a write failure makes the
//!   log reopen itself.
//! - [`JetStreamBackend`]: JetStream is the log of record and the local trees mirror it. An append
//!   is published (de-duplicated by event id) and acknowledged by JetStream; cursors and state
//!   go to key-value buckets; ingress may spool; work units are claimed with leases.
//!
//! [`Log`] holds one [`AnyBackend`] and forwards to it: static dispatch, so an append allocates
//! nothing for the dispatch (no boxed future).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::jetstream_backend::JetStreamBackend;
use super::sled_backend::SledBackend;
use super::{Inner, Log, Position, StorageError};
use crate::jetstream::Appended;
use crate::values::Values;

/// One backend of the log. Every method is handed the log it serves (`log`), whose topics are
/// indexed by `ti`; a backend keeps only what is its own.
pub(crate) trait Backend {
    /// Which backend this is: `("sled", None)` or `("jetstream", Some((url, connected)))`.
    fn describe(&self) -> (&'static str, Option<(String, bool)>);

    /// The value files holding bulk topics' payloads, if this backend keeps them.
    fn values(&self) -> Option<&Values>;

    /// Appends one record to `partition` of topic `ti`; its offset once durable. A stage's
    /// append: on sled it waits out a write failure (the log reopens) and goes again.
    async fn append(&self, log: &Log, ti: usize, partition: u32, payload: &[u8]) -> Result<u64, StorageError>;

    /// Appends each item to its key's partition of topic `ti`, durable together; their
    /// positions, in order. Waits out a write failure like [`Backend::append`].
    async fn append_many<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<Vec<Position>, StorageError>;

    /// Ingress's append ([`Log::append_or_spool`]): an error at once on a write failure, or
    /// spooled when JetStream cannot take it (on a node with a spool).
    async fn append_or_spool(
        &self,
        log: &Log,
        ti: usize,
        partition: u32,
        payload: &[u8],
    ) -> Result<Appended, StorageError>;

    /// Ingress's batch append ([`Log::append_many_or_spool`]).
    async fn append_many_or_spool<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StorageError>;

    /// Makes everything written so far durable: records, cursors and state ([`Log::sync`]).
    async fn sync(&self, log: &Log) -> Result<(), StorageError>;

    /// Records cursor `name`'s next offset on `topic`/`partition`, durable at the next sync.
    fn store_cursor(&self, log: &Log, name: &str, topic: &str, partition: u32, offset: u64)
        -> Result<(), StorageError>;

    /// Writes (`Some`) or deletes (`None`) a piece of stage state, durable at the next sync.
    fn store_state(&self, log: &Log, stage: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError>;

    /// Reloads cursor `name` and stage `name`'s state from the store they are shared in.
    async fn refresh(&self, log: &Log, name: &str) -> Result<(), StorageError>;

    /// Keeps `tx` holding this node's share of `units` work units of `group` ([`Log::claim`]).
    fn claim(&self, group: &str, units: u32, node: &str, tx: watch::Sender<Vec<u32>>);

    /// Records waiting in the ingress spool.
    fn spooled(&self) -> usize;

    /// Waits, for at most `within`, until this node reads everything the log of record holds of
    /// `partition` of topic `ti` (this node's spool forwarded first) ([`Log::caught_up`]).
    async fn caught_up(&self, log: &Log, ti: usize, partition: u32, within: Duration) -> Result<bool, StorageError>;

    /// Retention removed the oldest records of `partition` of `topic` from the local `tree`
    /// (whose durable head is `head`): the log of record lets go of them too.
    fn trimmed(&self, topic: &str, partition: u32, tree: &sled::Tree, head: u64) -> Result<(), StorageError>;

    /// A local write failed (`reason`; the data disk is full, or failed).
    fn write_failed(&self, inner: &Arc<Inner>, reason: String);
}

/// The backend a [`Log`] was opened with.
pub(crate) enum AnyBackend {
    Sled(SledBackend),
    JetStream(JetStreamBackend),
}

/// Calls the same method on whichever backend this is.
macro_rules! forward {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            AnyBackend::Sled($b) => $call,
            AnyBackend::JetStream($b) => $call,
        }
    };
}

impl Backend for AnyBackend {
    fn describe(&self) -> (&'static str, Option<(String, bool)>) {
        forward!(self, b => b.describe())
    }

    fn values(&self) -> Option<&Values> {
        forward!(self, b => b.values())
    }

    async fn append(&self, log: &Log, ti: usize, partition: u32, payload: &[u8]) -> Result<u64, StorageError> {
        forward!(self, b => b.append(log, ti, partition, payload).await)
    }

    async fn append_many<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<Vec<Position>, StorageError> {
        forward!(self, b => b.append_many(log, ti, items).await)
    }

    async fn append_or_spool(
        &self,
        log: &Log,
        ti: usize,
        partition: u32,
        payload: &[u8],
    ) -> Result<Appended, StorageError> {
        forward!(self, b => b.append_or_spool(log, ti, partition, payload).await)
    }

    async fn append_many_or_spool<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StorageError> {
        forward!(self, b => b.append_many_or_spool(log, ti, items).await)
    }

    async fn sync(&self, log: &Log) -> Result<(), StorageError> {
        forward!(self, b => b.sync(log).await)
    }

    fn store_cursor(
        &self,
        log: &Log,
        name: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StorageError> {
        forward!(self, b => b.store_cursor(log, name, topic, partition, offset))
    }

    fn store_state(&self, log: &Log, stage: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        forward!(self, b => b.store_state(log, stage, key, value))
    }

    async fn refresh(&self, log: &Log, name: &str) -> Result<(), StorageError> {
        forward!(self, b => b.refresh(log, name).await)
    }

    fn claim(&self, group: &str, units: u32, node: &str, tx: watch::Sender<Vec<u32>>) {
        forward!(self, b => b.claim(group, units, node, tx))
    }

    fn spooled(&self) -> usize {
        forward!(self, b => b.spooled())
    }

    async fn caught_up(&self, log: &Log, ti: usize, partition: u32, within: Duration) -> Result<bool, StorageError> {
        forward!(self, b => b.caught_up(log, ti, partition, within).await)
    }

    fn trimmed(&self, topic: &str, partition: u32, tree: &sled::Tree, head: u64) -> Result<(), StorageError> {
        forward!(self, b => b.trimmed(topic, partition, tree, head))
    }

    fn write_failed(&self, inner: &Arc<Inner>, reason: String) {
        forward!(self, b => b.write_failed(inner, reason))
    }
}
