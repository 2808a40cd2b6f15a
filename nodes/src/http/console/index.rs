//! What the console lists without scanning the logs per request: a bounded, in-memory index of
//! recent calls (with their transcripts' text, for search), the webhook exchanges with the apps
//! and fraud verdicts, built by following the calls, media, speech, transcripts and fraud logs
//! from their first record; and a broadcast of each change for the live views. Audio batches are
//! read by their header only (the call, and where it starts in the media log), never decoded.
//!
//! The index is a projection: it is rebuilt from the logs at every start and never written back.
//! Only what a list needs is kept here; a call's page reads its events from the logs, starting at
//! the offsets recorded here (its first event in each log).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast;
use voxgate_protocol::event::{AppExchange, AppPurpose, AppRequest, Event, Track};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId, Timestamp};
use voxgate_storage::{topics, Log, StorageError};

/// The logs the index follows, in the order of [`CallRow::first`].
pub const FOLLOWED: [&str; 5] = [topics::CALLS, topics::MEDIA, topics::SPEECH, topics::TRANSCRIPTS, topics::FRAUD];

/// Transcript text kept per call for search (the rest is on the call's page).
const TEXT_KEPT: usize = 2 * 1024;

/// One call as the lists show it.
#[derive(Debug, Clone)]
pub struct CallRow {
    pub sid: CallSid,
    pub tenant: AccountSid,
    pub from: String,
    pub to: String,
    /// Twilio's status (`ringing`, `in-progress`, `completed`, …) or `rejected`.
    pub status: String,
    /// Why the webhook was refused (code and label).
    pub rejected: Option<String>,
    pub started: Timestamp,
    pub ended: Option<Timestamp>,
    pub tracks: Vec<String>,
    /// When each track (inbound, outbound) was last heard (a transcript or partial of it).
    pub heard: [Option<Timestamp>; 2],
    pub transcripts: u32,
    /// The transcripts' text, in order, cut at [`TEXT_KEPT`] bytes.
    pub text: String,
    /// The most serious fraud verdict's severity.
    pub severity: Option<String>,
    /// The offset of the call's first event in each of [`FOLLOWED`].
    pub first: [Option<u64>; 5],
    /// The requests voxgate sent the app for this call (few: voice, fallback, status callbacks).
    requests: Vec<Arc<AppRequest>>,
}

impl CallRow {
    pub fn live(&self) -> bool {
        self.ended.is_none() && self.rejected.is_none()
    }

    /// Seconds from the first event to the end (or to `now` while live).
    pub fn duration_secs(&self, now: Timestamp) -> i64 {
        self.ended.unwrap_or(now).micros_since(self.started).max(0) / 1_000_000
    }

    pub fn json(&self, now: Timestamp) -> Value {
        json!({
            "sid": self.sid.to_string(),
            "tenant": self.tenant.to_string(),
            "from": self.from,
            "to": self.to,
            "status": self.status,
            "rejected": self.rejected,
            "started": self.started.to_string(),
            "live": self.live(),
            "duration_secs": self.duration_secs(now),
            "tracks": self.tracks,
            "heard_inbound_us": self.heard[0].map(|t| t.as_micros()),
            "heard_outbound_us": self.heard[1].map(|t| t.as_micros()),
            "transcripts": self.transcripts,
            "severity": self.severity,
        })
    }
}

/// One request to a customer's app and what came back.
#[derive(Debug, Clone)]
pub struct ExchangeRow {
    pub id: EventId,
    pub call: CallSid,
    pub tenant: AccountSid,
    pub at: Timestamp,
    pub x: AppExchange,
    /// The request as sent, when it was recorded (voice, fallback, status callbacks).
    pub request: Option<Arc<AppRequest>>,
}

/// One fraud verdict.
#[derive(Debug, Clone)]
pub struct VerdictRow {
    pub call: Option<CallSid>,
    pub tenant: AccountSid,
    pub at: Timestamp,
    pub severity: String,
    pub hits: Vec<(String, String)>,
    pub blocked_number: Option<String>,
}

/// A change the live views may want, already in the JSON the page reads.
#[derive(Debug, Clone)]
pub struct Change {
    pub tenant: AccountSid,
    pub call: CallSid,
    /// `call` (a row changed), `transcript` or `partial`.
    pub kind: &'static str,
    pub json: String,
}

/// Bounds of the index.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub calls: usize,
    pub exchanges: usize,
    pub verdicts: usize,
}

#[derive(Default)]
struct Inner {
    calls: HashMap<CallSid, CallRow>,
    /// Calls in the order they were first seen (oldest first), for eviction and listing.
    order: VecDeque<CallSid>,
    exchanges: VecDeque<ExchangeRow>,
    verdicts: VecDeque<VerdictRow>,
}

/// The index and its live feed.
pub struct Index {
    inner: Mutex<Inner>,
    limits: Limits,
    live: broadcast::Sender<Arc<Change>>,
}

impl Index {
    pub fn new(limits: Limits) -> Self {
        let (live, _) = broadcast::channel(4096);
        Self { inner: Mutex::new(Inner::default()), limits, live }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live feed: every change from now on (a slow reader is told it lagged, then resyncs).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.live.subscribe()
    }

    pub fn call(&self, sid: CallSid) -> Option<CallRow> {
        self.lock().calls.get(&sid).cloned()
    }

    /// Calls (newest first) that `keep` accepts, at most `limit` after skipping `skip`, and how
    /// many were accepted in all.
    pub fn calls(&self, skip: usize, limit: usize, mut keep: impl FnMut(&CallRow) -> bool) -> (Vec<CallRow>, usize) {
        let g = self.lock();
        let mut out = Vec::new();
        let mut total = 0;
        for sid in g.order.iter().rev() {
            let Some(row) = g.calls.get(sid) else { continue };
            if keep(row) {
                if total >= skip && out.len() < limit {
                    out.push(row.clone());
                }
                total += 1;
            }
        }
        (out, total)
    }

    /// Exchanges (newest first) that `keep` accepts, at most `limit`.
    pub fn exchanges(
        &self,
        limit: usize,
        mut keep: impl FnMut(&ExchangeRow, Option<&CallRow>) -> bool,
    ) -> Vec<ExchangeRow> {
        let g = self.lock();
        g.exchanges.iter().rev().filter(|x| keep(x, g.calls.get(&x.call))).take(limit).cloned().collect()
    }

    pub fn exchange(&self, id: EventId) -> Option<ExchangeRow> {
        self.lock().exchanges.iter().find(|x| x.id == id).cloned()
    }

    /// Verdicts (newest first) that `keep` accepts, at most `limit`.
    pub fn verdicts(&self, limit: usize, mut keep: impl FnMut(&VerdictRow) -> bool) -> Vec<VerdictRow> {
        self.lock().verdicts.iter().rev().filter(|v| keep(v)).take(limit).cloned().collect()
    }

    /// Notes an audio batch (read by its header only): where its call starts in the media log.
    pub fn note_audio(&self, topic_ix: usize, offset: u64, h: &voxgate_protocol::Header) {
        let mut g = self.lock();
        if let Some(row) = h.call.and_then(|c| g.calls.get_mut(&c)).filter(|r| r.tenant == h.tenant) {
            row.first[topic_ix].get_or_insert(offset);
        }
    }

    /// Applies one record of `topic` (at `offset`, appended at `appended`).
    pub fn apply(&self, topic_ix: usize, offset: u64, appended: Timestamp, env: &Envelope) {
        let mut changes: Vec<Change> = Vec::new();
        {
            let mut g = self.lock();
            self.apply_locked(&mut g, topic_ix, offset, appended, env, &mut changes);
        }
        for c in changes {
            // No receiver is fine: nobody is watching.
            let _ = self.live.send(Arc::new(c));
        }
    }

    fn apply_locked(
        &self,
        g: &mut Inner,
        topic_ix: usize,
        offset: u64,
        appended: Timestamp,
        env: &Envelope,
        changes: &mut Vec<Change>,
    ) {
        let Some(call) = env.call else {
            if let Event::FraudVerdict(v) = &env.payload {
                self.push_verdict(g, None, env, v);
            }
            return;
        };
        let tenant = env.tenant;
        let at = env.occurred_at;
        // Audio pieces and media say nothing a list shows; they still mark where the call starts.
        let row_changed = {
            let row = match g.calls.get_mut(&call) {
                Some(r) => r,
                None => {
                    // Calls start in the calls log (which the follower reads first); a stage's
                    // output for a call not (or no longer) indexed is on the call's page only.
                    if topic_ix != 0 {
                        if let Event::FraudVerdict(v) = &env.payload {
                            self.push_verdict(g, Some(call), env, v);
                        }
                        return;
                    }
                    g.order.push_back(call);
                    g.calls.insert(
                        call,
                        CallRow {
                            sid: call,
                            tenant,
                            from: String::new(),
                            to: String::new(),
                            status: "queued".into(),
                            rejected: None,
                            started: at,
                            ended: None,
                            tracks: Vec::new(),
                            heard: [None, None],
                            transcripts: 0,
                            text: String::new(),
                            severity: None,
                            first: [None; 5],
                            requests: Vec::new(),
                        },
                    );
                    self.evict(g);
                    match g.calls.get_mut(&call) {
                        Some(r) => r,
                        None => return,
                    }
                }
            };
            if row.tenant != tenant {
                // A call belongs to one tenant; an event naming another is not this call's.
                return;
            }
            row.first[topic_ix].get_or_insert(offset);
            match &env.payload {
                Event::CallReceived(c) => {
                    row.from = c.from.clone();
                    row.to = c.to.clone();
                    row.status = c.status.as_str().to_owned();
                    row.started = row.started.min(at);
                    true
                }
                Event::CallRejected(c) => {
                    row.from = c.from.clone();
                    row.to = c.to.clone();
                    row.status = "rejected".into();
                    row.rejected = Some(format!("{} ({})", c.reason.label(), c.reason.code()));
                    row.ended = Some(at);
                    true
                }
                Event::CallStatusChanged(c) => {
                    row.status = c.status.as_str().to_owned();
                    if c.status.is_terminal() {
                        row.ended.get_or_insert(at);
                    }
                    true
                }
                Event::StreamStarted(s) => {
                    for t in &s.tracks {
                        if !row.tracks.contains(t) {
                            row.tracks.push(t.clone());
                        }
                    }
                    true
                }
                Event::Transcript(t) => {
                    row.transcripts += 1;
                    row.heard[track_ix(t.track)] = Some(at);
                    if t.rejected.is_none() && !t.text.is_empty() && row.text.len() < TEXT_KEPT {
                        if !row.text.is_empty() {
                            row.text.push(' ');
                        }
                        let room = TEXT_KEPT - row.text.len();
                        let cut = floor_char_boundary(&t.text, room);
                        row.text.push_str(&t.text[..cut]);
                    }
                    changes.push(Change {
                        tenant,
                        call,
                        kind: "transcript",
                        json: json!({
                            "call": call.to_string(),
                            "track": t.track.as_str(),
                            "party": t.track.party(),
                            "segment": t.segment_index,
                            "start_ms": t.start_ms,
                            "end_ms": t.end_ms,
                            "text": t.text,
                            "rejected": t.rejected,
                            "doubt": t.doubt,
                            "appended_us": appended.as_micros(),
                        })
                        .to_string(),
                    });
                    true
                }
                Event::PartialTranscript(t) => {
                    row.heard[track_ix(t.track)] = Some(at);
                    changes.push(Change {
                        tenant,
                        call,
                        kind: "partial",
                        json: json!({
                            "call": call.to_string(),
                            "track": t.track.as_str(),
                            "party": t.track.party(),
                            "segment": t.segment_index,
                            "sequence": t.sequence,
                            "stable": t.stable,
                            "text": t.text,
                            "appended_us": appended.as_micros(),
                        })
                        .to_string(),
                    });
                    false
                }
                Event::FraudVerdict(v) => {
                    let s = v.severity.as_str().to_owned();
                    if row.severity.as_deref().is_none_or(|old| rank(old) < rank(&s)) {
                        row.severity = Some(s);
                    }
                    true
                }
                Event::AppRequest(r) => {
                    row.requests.push(Arc::new(r.clone()));
                    false
                }
                _ => false,
            }
        };
        match &env.payload {
            Event::FraudVerdict(v) => self.push_verdict(g, Some(call), env, v),
            Event::AppExchange(x) => {
                let request = g.calls.get(&call).and_then(|row| {
                    row.requests
                        .iter()
                        .rev()
                        .find(|r| {
                            r.purpose == x.purpose
                                && match x.purpose {
                                    AppPurpose::StatusCallback => r.reference == x.reference,
                                    _ => r.url == x.url,
                                }
                        })
                        .cloned()
                });
                g.exchanges.push_back(ExchangeRow { id: env.event_id, call, tenant, at, x: x.clone(), request });
                while g.exchanges.len() > self.limits.exchanges {
                    g.exchanges.pop_front();
                }
            }
            _ => {}
        }
        if row_changed {
            if let Some(row) = g.calls.get(&call) {
                let mut v = row.json(at);
                // What changed it and when that became durable: the page measures its delay.
                v["cause"] = env.payload.kind().into();
                v["appended_us"] = appended.as_micros().into();
                changes.push(Change { tenant, call, kind: "call", json: v.to_string() });
            }
        }
    }

    fn push_verdict(
        &self,
        g: &mut Inner,
        call: Option<CallSid>,
        env: &Envelope,
        v: &voxgate_protocol::event::FraudVerdict,
    ) {
        g.verdicts.push_back(VerdictRow {
            call,
            tenant: env.tenant,
            at: env.occurred_at,
            severity: v.severity.as_str().to_owned(),
            hits: v.hits.iter().map(|h| (h.rule.clone(), h.evidence.clone())).collect(),
            blocked_number: v.blocked_number.clone(),
        });
        while g.verdicts.len() > self.limits.verdicts {
            g.verdicts.pop_front();
        }
    }

    /// Drops calls past the limit: the oldest ended one first, the oldest of all when every
    /// indexed call is live. The order of the rest is kept (the lists read it).
    fn evict(&self, g: &mut Inner) {
        while g.calls.len() > self.limits.calls {
            let ended = g.order.iter().position(|sid| g.calls.get(sid).is_none_or(|r| !r.live()));
            let Some(sid) = g.order.remove(ended.unwrap_or(0)) else { break };
            g.calls.remove(&sid);
        }
    }
}

fn track_ix(t: Track) -> usize {
    match t {
        Track::Inbound => 0,
        Track::Outbound => 1,
    }
}

fn rank(severity: &str) -> u8 {
    match severity {
        "record" => 1,
        "alert" => 2,
        "block" => 3,
        "end_call" => 4,
        _ => 0,
    }
}

/// The largest index ≤ `n` on a character boundary of `s`.
fn floor_char_boundary(s: &str, n: usize) -> usize {
    if n >= s.len() {
        return s.len();
    }
    (0..=n).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// Follows the logs into `index` until the task is dropped: everything from each partition's
/// first record, then each new durable record as it comes.
pub async fn follow(log: Log, index: Arc<Index>) -> Result<(), StorageError> {
    let mut watches = Vec::new();
    let mut next: Vec<Vec<u64>> = Vec::new();
    for topic in FOLLOWED {
        watches.push(log.watch(topic)?);
        let n = log.partitions(topic)?;
        let mut v = Vec::with_capacity(n as usize);
        for p in 0..n {
            v.push(log.first_offset(topic, p)?);
        }
        next.push(v);
    }
    let mut batch = Vec::with_capacity(512);
    loop {
        for w in watches.iter_mut() {
            w.borrow_and_update();
        }
        let mut read_any = false;
        for (ti, topic) in FOLLOWED.iter().enumerate() {
            // The calls log first and to its head: a call's row exists before its stages' output.
            let passes = if ti == 0 { usize::MAX } else { 1 };
            let mut pass = 0;
            let mut more = true;
            while more && pass < passes {
                pass += 1;
                more = false;
                for (p, from) in next[ti].iter_mut().enumerate() {
                    // Most wake-ups are one partition's append: the others have nothing new.
                    if *from >= log.durable_head(topic, p as u32)? {
                        continue;
                    }
                    batch.clear();
                    // What retention removed before `from` is skipped by the read itself (it
                    // ranges over the records still kept).
                    let to = log.read(topic, p as u32, *from, 512, &mut batch)?;
                    for r in &batch {
                        // Audio says nothing the index shows but where a call's records start.
                        if let Some(h) = voxgate_protocol::peek_header(r.payload()) {
                            if h.is_audio() {
                                index.note_audio(ti, r.offset, &h);
                                continue;
                            }
                        }
                        match voxgate_protocol::decode(r.payload()) {
                            Ok(env) => index.apply(ti, r.offset, r.appended_at(), &env),
                            Err(e) => {
                                metrics::counter!("voxgate_console_undecodable_total").increment(1);
                                tracing::warn!(topic, partition = p, offset = r.offset, error = %e, "console index: undecodable record skipped");
                            }
                        }
                    }
                    read_any |= !batch.is_empty();
                    more |= !batch.is_empty();
                    *from = to;
                }
            }
        }
        if read_any {
            tokio::task::yield_now().await;
            continue;
        }
        // Nothing new: wait for any followed log to grow (bounded, so a missed wake costs a second).
        let [a, b, c, d, e] = &mut watches[..] else { return Ok(()) };
        tokio::select! {
            _ = a.changed() => {}
            _ = b.changed() => {}
            _ = c.changed() => {}
            _ = d.changed() => {}
            _ = e.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::event::{CallReceived, CallStatus, CallStatusChanged, Direction, StatusSource};

    fn env(call: CallSid, tenant: AccountSid, at: i64, payload: Event) -> Envelope {
        Envelope { event_id: EventId(at as u128), tenant, call: Some(call), occurred_at: Timestamp(at), payload }
    }

    fn received(from: &str) -> Event {
        Event::CallReceived(CallReceived {
            from: from.into(),
            to: "+15550100".into(),
            direction: Direction::Inbound,
            status: CallStatus::Ringing,
            from_country: None,
            to_country: None,
            stream_session: String::new(),
        })
    }

    fn completed() -> Event {
        Event::CallStatusChanged(CallStatusChanged {
            status: CallStatus::Completed,
            source: StatusSource::Callback,
            sequence: None,
            duration_secs: None,
        })
    }

    #[test]
    fn calls_are_listed_newest_first_and_end() {
        let ix = Index::new(Limits { calls: 10, exchanges: 10, verdicts: 10 });
        let t = AccountSid::from_u128(1);
        let (a, b) = (CallSid::from_u128(1), CallSid::from_u128(2));
        ix.apply(0, 0, Timestamp(1), &env(a, t, 1, received("+15551111")));
        ix.apply(0, 1, Timestamp(2), &env(b, t, 2, received("+15552222")));
        ix.apply(0, 2, Timestamp(3), &env(a, t, 3, completed()));
        let (rows, total) = ix.calls(0, 10, |_| true);
        assert_eq!(total, 2);
        assert_eq!(rows[0].sid, b);
        assert!(rows[0].live());
        assert!(!rows[1].live());
        assert_eq!(rows[1].first[0], Some(0));
    }

    #[test]
    fn eviction_keeps_live_calls() {
        let ix = Index::new(Limits { calls: 2, exchanges: 10, verdicts: 10 });
        let t = AccountSid::from_u128(1);
        for i in 1..=3u128 {
            ix.apply(0, i as u64, Timestamp(i as i64), &env(CallSid::from_u128(i), t, i as i64, received("+15551111")));
        }
        let (rows, total) = ix.calls(0, 10, |_| true);
        assert_eq!(total, 2);
        // All live: the oldest goes, because nothing else can.
        assert_eq!(rows.iter().map(|r| r.sid).collect::<Vec<_>>(), vec![CallSid::from_u128(3), CallSid::from_u128(2)]);
    }

    #[test]
    fn ended_calls_go_before_older_live_ones() {
        let ix = Index::new(Limits { calls: 2, exchanges: 10, verdicts: 10 });
        let t = AccountSid::from_u128(1);
        let (a, b, c) = (CallSid::from_u128(1), CallSid::from_u128(2), CallSid::from_u128(3));
        ix.apply(0, 1, Timestamp(1), &env(a, t, 1, received("+15551111")));
        ix.apply(0, 2, Timestamp(2), &env(b, t, 2, received("+15552222")));
        ix.apply(0, 3, Timestamp(3), &env(b, t, 3, completed()));
        ix.apply(0, 4, Timestamp(4), &env(c, t, 4, received("+15553333")));
        let (rows, _) = ix.calls(0, 10, |_| true);
        assert_eq!(rows.iter().map(|r| r.sid).collect::<Vec<_>>(), vec![c, a]);
    }

    #[test]
    fn an_event_naming_another_tenant_does_not_touch_the_call() {
        let ix = Index::new(Limits { calls: 10, exchanges: 10, verdicts: 10 });
        let (t, other) = (AccountSid::from_u128(1), AccountSid::from_u128(2));
        ix.apply(0, 0, Timestamp(1), &env(CallSid::from_u128(1), t, 1, received("+15551111")));
        ix.apply(0, 1, Timestamp(2), &env(CallSid::from_u128(1), other, 2, received("+15559999")));
        assert_eq!(ix.call(CallSid::from_u128(1)).map(|r| r.from), Some("+15551111".to_owned()));
    }
}
