//! Stage wiring: `serve` (which stages a node runs, by role, and how they are started and
//! stopped), and the node's side of each stage — the tasks that follow a log and act outside the
//! pure cores in voxgate-actors (ending calls at Twilio, delivering callbacks, publishing events).
//!
//! - `serve`: the node; `roster`: its two tables, which role runs which stage (how much work it
//!   claims and how it starts) and which role follows which log whole (tenancy, the usage books,
//!   fraud's actions, analytics, the console's index); `cluster`: roles, leases and partitions
//!   across nodes.
//! - `transcription`: transcode and STT stages and Twilio's real-time transcription callbacks.
//! - `calls`: where call actors run (here, or on the cluster's `call` nodes over NATS).
//! - `fraud`, `billing`: their stages' effects (blocks, hang-ups, usage-trigger callbacks);
//!   `hangup`: ending a call; `recovery`: calls a crash left open.
//! - `tenancy`: the node's tenant directory (auth, quotas) and its follower of the tenants log;
//!   `analytics`: the redacted event stream for outside consumers.

pub mod analytics;
pub mod billing;
pub mod calls;
pub mod cluster;
pub mod fraud;
pub mod hangup;
pub mod recovery;
pub mod roster;
pub mod serve;
pub mod tenancy;
pub mod transcription;
