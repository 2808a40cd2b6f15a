//! Appends that ingress makes: on sled they are plain appends that fail at once on a write
//! failure; on a JetStream node with a spool, an append that cannot reach JetStream is written to
//! the local `__spool` tree (fsynced) and forwarded in order when NATS is back. While anything is
//! spooled, later appends queue behind it, so per-key order holds.

use std::time::Instant;

use super::{partition_for, Log, Position, StorageError};
use crate::jetstream::Appended;

impl Log {
    /// Appends like [`Log::append`], except that on a JetStream node with a spool an append that
    /// cannot reach JetStream is kept on local disk and forwarded in order later (ingress uses
    /// this: Twilio gets its answer once the event is durable somewhere). On sled it is
    /// [`Log::append`].
    pub async fn append_or_spool(&self, topic: &str, key: u64, payload: &[u8]) -> Result<Appended, StorageError> {
        let Some(c) = &self.inner.cluster else {
            // Ingress answers Twilio now: a write failure is an error at once, not a wait.
            let started = Instant::now();
            let (ti, t) = self.topic(topic)?;
            let partition = partition_for(key, t.spec.partitions);
            let offset = self.append_local(ti, partition, payload).await?;
            metrics::histogram!("voxgate_log_append_seconds", "topic" => t.spec.name.clone())
                .record(started.elapsed().as_secs_f64());
            return Ok(Appended::Logged(Position { partition, offset }));
        };
        let (ti, t) = self.topic(topic)?;
        let partition = partition_for(key, t.spec.partitions);
        let value = self.stamp(payload);
        if c.spool_if_active(topic, partition, &value)? {
            self.sync_local().await?;
            return Ok(Appended::Spooled);
        }
        match c.publish(topic, partition, value.clone()).await {
            Ok(offset) => {
                let at = Position { partition, offset };
                // A failing cursor flush must not turn a logged event into an error here.
                if let Err(e) = self.after_publish(c, ti, &[at]).await {
                    tracing::warn!(error = %e, "cursor flush after append failed; retried on the next sync");
                }
                Ok(Appended::Logged(at))
            }
            Err(StorageError::JetStream(reason)) if c.spool_enabled() => {
                tracing::warn!(topic, %reason, "JetStream unreachable; spooling to the local log");
                c.spool(topic, partition, &value)?;
                self.sync_local().await?;
                Ok(Appended::Spooled)
            }
            Err(e) => Err(e),
        }
    }

    /// [`Log::append_many`] with the spool of [`Log::append_or_spool`]: when JetStream cannot
    /// take the batch, all of it is spooled (records JetStream did take are de-duplicated by
    /// event id when the spool is forwarded).
    pub async fn append_many_or_spool<'a, I>(&self, topic: &str, items: I) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        if self.inner.cluster.is_none() {
            // As in `append_or_spool`: a write failure is an error at once.
            let started = Instant::now();
            let (ti, t) = self.topic(topic)?;
            // Inserted before any wait, so nothing of `items` is held across it.
            if let Some(rx) = self.insert_many(ti, t.spec.partitions, items.into_iter(), None)? {
                Self::await_durable(rx).await?;
            }
            metrics::histogram!("voxgate_log_append_seconds", "topic" => t.spec.name.clone())
                .record(started.elapsed().as_secs_f64());
            return Ok(());
        }
        let Some(c) = self.inner.cluster.as_ref().filter(|c| c.spool_enabled()) else {
            return self.append_many(topic, items).await.map(|_| ());
        };
        let (ti, t) = self.topic(topic)?;
        let parts = t.spec.partitions;
        let stamped: Vec<(u32, bytes::Bytes)> =
            items.into_iter().map(|(key, payload)| (partition_for(key, parts), self.stamp(payload))).collect();
        if !c.spooling() {
            match c.publish_many(topic, stamped.clone()).await {
                Ok(at) => {
                    if let Err(e) = self.after_publish(c, ti, &at).await {
                        tracing::warn!(error = %e, "cursor flush after append failed; retried on the next sync");
                    }
                    return Ok(());
                }
                Err(StorageError::JetStream(reason)) => {
                    tracing::warn!(topic, %reason, "JetStream unreachable; spooling to the local log");
                }
                Err(e) => return Err(e),
            }
        }
        for (partition, value) in &stamped {
            c.spool(topic, *partition, value)?;
        }
        self.sync_local().await
    }
}
