//! Calls in progress when the node last stopped without closing them (a crash, a kill): found on
//! the calls log at start and given their actors back, so Twilio's later callbacks find them,
//! their quota places count again, and the maximum duration closes out any call Twilio never
//! reports on. Embedded nodes only: in a cluster another ingress node may hold the call.

use std::collections::HashMap;

use voxgate_protocol::event::{CallStatus, Event};
use voxgate_protocol::{AccountSid, CallSid, Timestamp};
use voxgate_storage::{topics, Log, StorageError};

use crate::http::AppState;

/// A call with a `call_received` and no terminal status on the log.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenCall {
    pub tenant: AccountSid,
    pub received_at: Timestamp,
    /// The furthest status it reached.
    pub status: CallStatus,
    /// The customer's app answered it (gateway mode): its call flow is the app's.
    pub gateway: bool,
}

/// Every open call on the calls log, in no particular order.
pub fn open_calls(log: &Log) -> Result<Vec<(CallSid, OpenCall)>, StorageError> {
    let mut open = Vec::new();
    for p in 0..log.partitions(topics::CALLS)? {
        open.extend(open_calls_in(log, p, None)?);
    }
    Ok(open)
}

/// The open calls of one partition of the calls log (only `only`, if given).
pub fn open_calls_in(
    log: &Log,
    partition: u32,
    only: Option<CallSid>,
) -> Result<Vec<(CallSid, OpenCall)>, StorageError> {
    let mut open: HashMap<CallSid, OpenCall> = HashMap::new();
    let from = log.first_offset(topics::CALLS, partition)?;
    log.scan(topics::CALLS, partition, from, |r| {
        let Ok(env) = voxgate_protocol::decode(r.payload()) else {
            return Ok::<(), StorageError>(());
        };
        let Some(call) = env.call else { return Ok(()) };
        if only.is_some_and(|o| o != call) {
            return Ok(());
        }
        match env.payload {
            Event::CallReceived(c) => {
                open.entry(call).or_insert(OpenCall {
                    tenant: env.tenant,
                    received_at: env.occurred_at,
                    status: c.status,
                    gateway: false,
                });
            }
            Event::GatewayAnswered(_) => {
                if let Some(o) = open.get_mut(&call) {
                    o.gateway = true;
                }
            }
            Event::CallStatusChanged(c) if c.status.is_terminal() => {
                open.remove(&call);
            }
            Event::CallStatusChanged(c) => {
                if let Some(o) = open.get_mut(&call) {
                    // Callbacks arrive out of order; a call never steps back from in-progress.
                    if o.status != CallStatus::InProgress {
                        o.status = c.status;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(open.into_iter().collect())
}

/// Starts an actor for every open call (see the module doc); returns how many there were.
pub async fn restore(state: &AppState) -> anyhow::Result<usize> {
    let open = open_calls(&state.log)?;
    for (call, o) in &open {
        let slot = state.tenancy.resume(o.tenant, *call);
        let started = state.calls.start(o.tenant, *call, o.status, o.received_at, slot).await;
        // One call that cannot come back must not keep the node from serving the others.
        if let Err(e) = started {
            tracing::error!(call_sid = %call, tenant = %o.tenant, error = %e, "call not restored");
        }
    }
    if !open.is_empty() {
        metrics::counter!("voxgate_calls_restored_total").increment(open.len() as u64);
        tracing::warn!(calls = open.len(), "calls the last run left open are back in progress; Twilio's callbacks or their maximum duration close them");
    }
    Ok(open.len())
}
