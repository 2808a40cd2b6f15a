//! voxgate-storage: the event log every stage reads and writes.
//!
//! Owns: topics split into partitions by key, durable appends with group commit, reads from an
//! offset, durable named cursors, and retention per topic. The embedded backend is sled (one tree
//! per topic); the layout of keys and values is in [`log`].
//!
//! Must not: interpret event payloads (they are opaque bytes here; the codec lives in
//! voxgate-protocol), make decisions from the wall clock (the clock is injected), or acknowledge an
//! append before it is on disk.

pub mod log;
pub mod topics;

pub use log::{Log, Position, Record, RetentionReport, StorageError, TopicSpec};
pub use topics::Retention;
