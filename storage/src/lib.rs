//! voxgate-storage: the event log every stage reads and writes.
//!
//! Owns: topics split into partitions by key, durable appends with group commit, reads from an
//! offset, durable named cursors, and retention per topic. Two backends behind one API: sled on
//! one machine (one tree per topic; layout in [`log`]) and NATS JetStream for a cluster (a stream
//! per partition, mirrored locally for reads; layout in [`jetstream`]).
//!
//! Must not: interpret event payloads (they are opaque bytes here, except that the JetStream
//! backend reads an envelope's event id for de-duplication; the codec lives in voxgate-protocol),
//! make decisions from the wall clock (the clock is injected), or acknowledge an append before it
//! is on disk (sled) or acknowledged by JetStream.

pub mod jetstream;
pub mod log;
pub mod nats;
pub mod topics;
mod values;

pub use jetstream::{Appended, ClusterOptions};
pub use log::{Log, Position, Record, RetentionReport, StorageError, TopicSpec};
pub use nats::{redact_url, NatsAuth};
pub use topics::Retention;
