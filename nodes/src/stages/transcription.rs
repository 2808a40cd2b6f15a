//! Twilio's real-time transcription, served locally. An app that asks for it (`<Start>
//! <Transcription statusCallbackUrl=…>` in its TwiML, or `POST …/Calls/{CA}/Transcriptions.json`)
//! gets Twilio's transcription callbacks from voxgate: `transcription-started`, one
//! `transcription-content` per final transcript of the tracks it asked for (`TranscriptionData`
//! with `transcript` and `confidence`, `Final=true`; with `partialResults`, the interim ones as
//! they come, `Final=false`), and `transcription-stopped` when it is
//! stopped or the call ends — after the last transcript of the call's speech is in (the STT
//! stage's `speech_ended` says so). Each session's callbacks go in order, signed with the tenant's
//! token, retried; every attempt is an `app_exchange` event with the session and `SequenceId` as
//! its reference.
//!
//! [`Sessions`] is the pure core: a fold of the calls and transcripts logs into the callbacks to
//! send. [`Transcription`] runs it on the follower harness: at start it folds the logs from the
//! beginning, skipping what an earlier run delivered (its `app_exchange` records), then follows
//! them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use voxgate_actors::follow::Follower;
use voxgate_protocol::event::{AppPurpose, HttpMethod, Track, TranscriptionStarted};
use voxgate_protocol::{AccountSid, CallSid, Envelope, Event, EventId, Timestamp};
use voxgate_storage::{topics, Log};

/// One callback to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub tenant: AccountSid,
    pub call: CallSid,
    pub session: String,
    pub seq: u32,
    pub url: String,
    pub method: HttpMethod,
    pub params: Vec<(String, String)>,
}

impl Delivery {
    /// `GT…#SequenceId`: the reference its `app_exchange` records carry.
    pub fn reference(&self) -> String {
        format!("{}#{}", self.session, self.seq)
    }
}

#[derive(Debug, Clone)]
struct Session {
    start: TranscriptionStarted,
    tenant: AccountSid,
    call: CallSid,
    started_at: Timestamp,
    next_seq: u32,
    stopped: bool,
    delivered: BTreeSet<u32>,
}

impl Session {
    fn wants(&self, track: Track) -> bool {
        match self.start.track.as_str() {
            "inbound_track" => track == Track::Inbound,
            "outbound_track" => track == Track::Outbound,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct CallState {
    sessions: Vec<String>,
    /// Tracks whose speech is forked to voxgate (from the gateway's answer; the caller's by
    /// default: a call voxgate answers itself streams its inbound track).
    tracks: Option<Vec<Track>>,
    ended: bool,
    speech_ended: BTreeSet<Track>,
}

/// Every live session, folded from the logs.
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: HashMap<String, Session>,
    calls: HashMap<CallSid, CallState>,
}

fn track_name(t: Track) -> &'static str {
    match t {
        Track::Inbound => "inbound_track",
        Track::Outbound => "outbound_track",
    }
}

/// Whisper's mean token log-probability as a confidence between 0 and 1.
pub fn confidence(avg_logprob: f32) -> f64 {
    f64::from(avg_logprob).exp().clamp(0.0, 1.0)
}

impl Sessions {
    /// Sessions still running.
    pub fn active(&self) -> usize {
        self.sessions.values().filter(|s| !s.stopped).count()
    }

    /// Folds one event in; returns the callbacks it calls for (already delivered ones left out).
    pub fn apply(&mut self, env: &Envelope) -> Vec<Delivery> {
        let Some(call) = env.call else { return Vec::new() };
        let mut out = Vec::new();
        match &env.payload {
            Event::TranscriptionStarted(t) => {
                if self.sessions.contains_key(&t.sid) {
                    return out;
                }
                let c = self.calls.entry(call).or_default();
                c.sessions.push(t.sid.clone());
                let mut s = Session {
                    start: t.clone(),
                    tenant: env.tenant,
                    call,
                    started_at: env.occurred_at,
                    next_seq: 1,
                    stopped: false,
                    delivered: BTreeSet::new(),
                };
                let mut p = common(&s, env.occurred_at, "transcription-started");
                p.push(("TranscriptionEngine".into(), "voxgate-whisper".into()));
                p.push(("ProviderConfiguration".into(), "{}".into()));
                p.push(("Track".into(), t.track.clone()));
                p.push(("PartialResults".into(), t.partial_results.to_string()));
                p.push(("LanguageCode".into(), t.language_code.clone()));
                for (k, v) in [
                    ("Name", &t.name),
                    ("InboundTrackLabel", &t.inbound_track_label),
                    ("OutboundTrackLabel", &t.outbound_track_label),
                ] {
                    if let Some(v) = v {
                        p.push((k.into(), v.clone()));
                    }
                }
                out.extend(deliver(&mut s, p));
                self.sessions.insert(t.sid.clone(), s);
            }
            Event::TranscriptionStopped(t) => {
                let sids = self.calls.get(&call).map(|c| c.sessions.clone()).unwrap_or_default();
                for sid in sids {
                    let Some(s) = self.sessions.get_mut(&sid) else { continue };
                    // Stopped by its sid, or by the name it was started with.
                    if sid == t.sid || s.start.name.as_deref() == Some(t.sid.as_str()) {
                        out.extend(stop(s, env.occurred_at));
                    }
                }
            }
            Event::GatewayAnswered(g) => {
                let c = self.calls.entry(call).or_default();
                c.tracks = Some(match g.fork.as_deref() {
                    Some("both_tracks") => vec![Track::Inbound, Track::Outbound],
                    Some(_) => vec![Track::Inbound],
                    None => Vec::new(),
                });
            }
            Event::CallStatusChanged(st) if st.status.is_terminal() => {
                if let Some(c) = self.calls.get_mut(&call) {
                    c.ended = true;
                }
                out.extend(self.maybe_end(call, env.occurred_at));
            }
            Event::SpeechEnded(e) => {
                if let Some(c) = self.calls.get_mut(&call) {
                    c.speech_ended.insert(e.track);
                }
                out.extend(self.maybe_end(call, env.occurred_at));
            }
            Event::Transcript(t) => {
                if t.rejected.is_some() || t.text.trim().is_empty() {
                    return out;
                }
                let sids = self.calls.get(&call).map(|c| c.sessions.clone()).unwrap_or_default();
                for sid in sids {
                    let Some(s) = self.sessions.get_mut(&sid) else { continue };
                    if s.stopped || !s.wants(t.track) || env.occurred_at < s.started_at {
                        continue;
                    }
                    let mut p = common(s, env.occurred_at, "transcription-content");
                    p.push(("LanguageCode".into(), s.start.language_code.clone()));
                    p.push(("Track".into(), track_name(t.track).into()));
                    let data =
                        serde_json::json!({ "transcript": t.text.trim(), "confidence": confidence(t.avg_logprob) });
                    p.push(("TranscriptionData".into(), data.to_string()));
                    p.push(("Final".into(), "true".into()));
                    out.extend(deliver(s, p));
                }
            }
            Event::PartialTranscript(t) => {
                if t.text.trim().is_empty() {
                    return out;
                }
                let sids = self.calls.get(&call).map(|c| c.sessions.clone()).unwrap_or_default();
                for sid in sids {
                    let Some(s) = self.sessions.get_mut(&sid) else { continue };
                    if s.stopped || !s.start.partial_results || !s.wants(t.track) || env.occurred_at < s.started_at {
                        continue;
                    }
                    let mut p = common(s, env.occurred_at, "transcription-content");
                    p.push(("LanguageCode".into(), s.start.language_code.clone()));
                    p.push(("Track".into(), track_name(t.track).into()));
                    let data = serde_json::json!({ "transcript": t.text.trim() });
                    p.push(("TranscriptionData".into(), data.to_string()));
                    p.push(("Final".into(), "false".into()));
                    out.extend(deliver(s, p));
                }
            }
            Event::AppExchange(x) if x.purpose == AppPurpose::Transcription && x.error_code.is_none() => {
                // An earlier run delivered it.
                if let Some((sid, seq)) = x.reference.as_deref().and_then(|r| r.split_once('#')) {
                    if let (Some(s), Ok(seq)) = (self.sessions.get_mut(sid), seq.parse::<u32>()) {
                        s.delivered.insert(seq);
                    }
                }
            }
            _ => {}
        }
        out.retain(|d| self.sessions.get(&d.session).is_none_or(|s| !s.delivered.contains(&d.seq)));
        self.forget_finished(call);
        out
    }

    /// The call's sessions stop once it has ended and the last transcript of every forked track
    /// is in.
    fn maybe_end(&mut self, call: CallSid, at: Timestamp) -> Vec<Delivery> {
        let Some(c) = self.calls.get(&call) else { return Vec::new() };
        let tracks = c.tracks.as_deref().unwrap_or(&[Track::Inbound]);
        if !c.ended || !tracks.iter().all(|t| c.speech_ended.contains(t)) {
            return Vec::new();
        }
        let sids = c.sessions.clone();
        let mut out = Vec::new();
        for sid in sids {
            if let Some(s) = self.sessions.get_mut(&sid) {
                out.extend(stop(s, at));
            }
        }
        out
    }

    /// Ends every session of calls that ended `before` (a safety net should a track's end never
    /// come: a stream that never started, say).
    pub fn expire(&mut self, now: Timestamp, grace: Duration) -> Vec<Delivery> {
        let mut out = Vec::new();
        let grace_us = i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
        let ended: Vec<CallSid> = self.calls.iter().filter(|(_, c)| c.ended).map(|(k, _)| *k).collect();
        for call in ended {
            let sids = self.calls.get(&call).map(|c| c.sessions.clone()).unwrap_or_default();
            for sid in sids {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if !s.stopped && now.micros_since(s.started_at) > grace_us {
                        out.extend(stop(s, now));
                    }
                }
            }
            self.forget_finished(call);
        }
        out
    }

    fn forget_finished(&mut self, call: CallSid) {
        let Some(c) = self.calls.get(&call) else { return };
        if c.ended
            && c.sessions.iter().all(|s| self.sessions.get(s).is_none_or(|s| s.stopped))
            && !c.sessions.is_empty()
        {
            // Keep the sessions a while (their delivered set matters while callbacks are sent);
            // the call's own state goes.
            for sid in &c.sessions {
                self.sessions.remove(sid);
            }
            self.calls.remove(&call);
        }
    }
}

fn common(s: &Session, at: Timestamp, event: &str) -> Vec<(String, String)> {
    vec![
        ("AccountSid".into(), s.tenant.to_string()),
        ("CallSid".into(), s.call.to_string()),
        ("TranscriptionSid".into(), s.start.sid.clone()),
        ("Timestamp".into(), at.rfc3339()),
        ("SequenceId".into(), s.next_seq.to_string()),
        ("TranscriptionEvent".into(), event.into()),
    ]
}

fn deliver(s: &mut Session, params: Vec<(String, String)>) -> Option<Delivery> {
    let seq = s.next_seq;
    s.next_seq += 1;
    let url = s.start.status_callback_url.clone()?;
    Some(Delivery {
        tenant: s.tenant,
        call: s.call,
        session: s.start.sid.clone(),
        seq,
        url,
        method: s.start.status_callback_method,
        params,
    })
}

fn stop(s: &mut Session, at: Timestamp) -> Option<Delivery> {
    if s.stopped {
        return None;
    }
    s.stopped = true;
    let p = common(s, at, "transcription-stopped");
    deliver(s, p)
}

// ---------------------------------------------------------------------------------------------
// The follower

const TOPICS: [&str; 2] = [topics::CALLS, topics::TRANSCRIPTS];

/// What the follower needs.
#[derive(Clone)]
pub struct Deps {
    pub log: Log,
    pub tenancy: Arc<crate::stages::tenancy::Tenancy>,
    pub app: Arc<crate::http::gateway::App>,
    pub clock: Arc<dyn voxgate_protocol::Clock>,
}

/// Twilio's transcription callbacks on the follower harness: folds both logs from the start
/// (sending what no earlier run delivered), then follows them, sending each session's callbacks in
/// order.
pub struct Transcription {
    sessions: Sessions,
    senders: Arc<Senders>,
    clock: Arc<dyn voxgate_protocol::Clock>,
    /// The round's relevant events: (event time, topic, arrival, event).
    round: Vec<(Timestamp, usize, usize, Envelope)>,
}

impl Transcription {
    pub fn new(deps: Deps) -> Self {
        let clock = deps.clock.clone();
        Self { sessions: Sessions::default(), senders: Senders::new(deps), clock, round: Vec::new() }
    }
}

impl Follower for Transcription {
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "transcription";
    const TOPICS: &'static [&'static str] = &TOPICS;
    const LAG: &'static str = topics::TRANSCRIPTS;
    /// Sessions whose call ended long ago are stopped (a track's end that never came).
    const TICK: Option<Duration> = Some(Duration::from_secs(5));

    fn apply(&mut self, topic: &'static str, env: Envelope) {
        let relevant = matches!(
            env.payload,
            Event::TranscriptionStarted(_)
                | Event::TranscriptionStopped(_)
                | Event::GatewayAnswered(_)
                | Event::CallStatusChanged(_)
                | Event::SpeechEnded(_)
                | Event::Transcript(_)
                | Event::PartialTranscript(_)
                | Event::AppExchange(_)
        );
        if relevant {
            let t = TOPICS.iter().position(|x| *x == topic).unwrap_or(0);
            self.round.push((env.occurred_at, t, self.round.len(), env));
        }
    }

    /// The round in event-time order; what it calls for is sent, less what an earlier run
    /// delivered (recorded after it was called for).
    async fn settle(&mut self, _live: bool) {
        let mut round = std::mem::take(&mut self.round);
        round.sort_by_key(|(at, t, n, _)| (*at, *t, *n));
        let mut out = Vec::new();
        let mut done = std::collections::HashSet::new();
        for (_, _, _, env) in &round {
            if let Event::AppExchange(x) = &env.payload {
                if x.purpose == AppPurpose::Transcription && x.error_code.is_none() {
                    done.extend(x.reference.clone());
                }
            }
            out.extend(self.sessions.apply(env));
        }
        for d in out.into_iter().filter(|d| !done.contains(&d.reference())) {
            self.senders.send(d);
        }
        metrics::gauge!("voxgate_transcription_sessions").set(self.sessions.active() as f64);
    }

    async fn tick(&mut self) {
        for d in self.sessions.expire(self.clock.now(), Duration::from_secs(300)) {
            self.senders.send(d);
        }
    }
}

/// One queue per session, so a session's callbacks go in order and a slow app holds up only its
/// own sessions.
struct Senders {
    deps: Deps,
    queues: std::sync::Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Delivery>>>,
}

impl Senders {
    fn new(deps: Deps) -> Arc<Self> {
        Arc::new(Self { deps, queues: std::sync::Mutex::new(HashMap::new()) })
    }

    fn send(self: &Arc<Self>, d: Delivery) {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = q.get(&d.session) {
            if tx.send(d.clone()).is_ok() {
                return;
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
        let session = d.session.clone();
        let _ = tx.send(d);
        q.insert(session.clone(), tx);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let last = d.params.iter().any(|(k, v)| k == "TranscriptionEvent" && v == "transcription-stopped");
                me.deliver(d).await;
                if last {
                    break;
                }
            }
            me.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&session);
        });
    }

    async fn deliver(&self, d: Delivery) {
        let Some(token) = self.deps.tenancy.token(d.tenant) else { return };
        let reference = d.reference();
        let mut exchanges = Vec::new();
        let ok = self
            .deps
            .app
            .callback(AppPurpose::Transcription, token.expose(), d.method, &d.url, &d.params, &reference, |x| {
                exchanges.push(x)
            })
            .await;
        metrics::counter!("voxgate_transcription_callbacks_total", "outcome" => if ok { "delivered" } else { "gave_up" })
            .increment(1);
        let now = self.deps.clock.now();
        let encoded: Vec<Vec<u8>> = exchanges
            .into_iter()
            .map(|x| {
                let id = EventId::derive(
                    crate::http::gateway::id_kind::APP_EXCHANGE,
                    &[d.call.as_u128(), 2, hash(&reference), u128::from(x.attempt)],
                );
                voxgate_protocol::encode(&Envelope {
                    event_id: id,
                    tenant: d.tenant,
                    call: Some(d.call),
                    occurred_at: now,
                    payload: Event::AppExchange(x),
                })
            })
            .collect();
        let key = d.call.partition_key();
        if let Err(e) =
            self.deps.log.append_many_or_spool(topics::CALLS, encoded.iter().map(|b| (key, b.as_slice()))).await
        {
            tracing::warn!(stage = "transcription", call_sid = %d.call, error = %e, "transcription callback attempts not recorded");
        }
    }
}

/// A stable 128-bit hash of a string (for event ids).
fn hash(s: &str) -> u128 {
    let mut parts = [0u128; 4];
    for (i, chunk) in s.as_bytes().chunks(16).take(4).enumerate() {
        let mut b = [0u8; 16];
        b[..chunk.len()].copy_from_slice(chunk);
        parts[i] = u128::from_be_bytes(b);
    }
    EventId::derive(0x7ea5, &parts).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::event::{
        AppExchange, CallStatus, CallStatusChanged, GatewayAnswered, SpeechEnded, StatusSource, Transcript,
        TranscriptionStopped,
    };
    use voxgate_protocol::StreamSid;

    const A: AccountSid = AccountSid::from_u128(0xa);
    const C: CallSid = CallSid::from_u128(0xc);

    fn env(t: i64, payload: Event) -> Envelope {
        Envelope {
            event_id: EventId(t as u128),
            tenant: A,
            call: Some(C),
            occurred_at: Timestamp(t * 1_000_000),
            payload,
        }
    }

    fn started(track: &str) -> Event {
        Event::TranscriptionStarted(TranscriptionStarted {
            sid: "GT1".into(),
            name: Some("live".into()),
            status_callback_url: Some("https://app.example.com/rt".into()),
            status_callback_method: HttpMethod::Post,
            track: track.into(),
            partial_results: false,
            language_code: "en-US".into(),
            inbound_track_label: None,
            outbound_track_label: None,
            source: "twiml".into(),
        })
    }

    fn transcript(track: Track, text: &str) -> Event {
        Event::Transcript(Transcript {
            stream_sid: StreamSid::from_u128(1),
            segment_index: 0,
            segment_event: EventId(1),
            start_ms: 0,
            end_ms: 1000,
            text: text.into(),
            model: "m".into(),
            processing_ms: 1,
            avg_logprob: -0.1,
            no_speech_prob: 0.0,
            rejected: None,
            track,
            doubt: None,
        })
    }

    fn event_of(d: &Delivery) -> &str {
        &d.params.iter().find(|(k, _)| k == "TranscriptionEvent").unwrap().1
    }

    fn param<'a>(d: &'a Delivery, k: &str) -> Option<&'a str> {
        d.params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn answered(fork: &str) -> Event {
        Event::GatewayAnswered(GatewayAnswered {
            fork: Some(fork.into()),
            app_tracks: 0,
            transcriptions: vec!["GT1".into()],
            absolutized: 0,
            warnings: vec![],
            added_us: 1,
            twiml: String::new(),
        })
    }

    #[test]
    fn a_session_calls_back_in_order_and_stops_after_the_last_transcript() {
        let mut s = Sessions::default();
        let mut out = Vec::new();
        out.extend(s.apply(&env(1, started("both_tracks"))));
        out.extend(s.apply(&env(1, answered("both_tracks"))));
        out.extend(s.apply(&env(2, transcript(Track::Inbound, "hello"))));
        out.extend(s.apply(&env(3, transcript(Track::Outbound, "hi there"))));
        // The call ends; the agent's last words are still being transcribed.
        out.extend(s.apply(&env(
            4,
            Event::CallStatusChanged(CallStatusChanged {
                status: CallStatus::Completed,
                source: StatusSource::Callback,
                sequence: None,
                duration_secs: None,
            }),
        )));
        let ended = |t| Event::SpeechEnded(SpeechEnded { stream_sid: StreamSid::from_u128(1), track: t, segments: 1 });
        out.extend(s.apply(&env(5, ended(Track::Inbound))));
        assert_eq!(out.len(), 3, "not stopped before the outbound track's end");
        out.extend(s.apply(&env(5, transcript(Track::Outbound, "bye"))));
        out.extend(s.apply(&env(6, ended(Track::Outbound))));
        let events: Vec<&str> = out.iter().map(event_of).collect();
        assert_eq!(
            events,
            [
                "transcription-started",
                "transcription-content",
                "transcription-content",
                "transcription-content",
                "transcription-stopped"
            ]
        );
        let seqs: Vec<u32> = out.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(param(&out[1], "Track"), Some("inbound_track"));
        assert_eq!(param(&out[2], "Track"), Some("outbound_track"));
        let data: serde_json::Value = serde_json::from_str(param(&out[1], "TranscriptionData").unwrap()).unwrap();
        assert_eq!(data["transcript"], "hello");
        assert!((data["confidence"].as_f64().unwrap() - (-0.1f64).exp()).abs() < 1e-6);
        assert_eq!(param(&out[1], "Final"), Some("true"));
        assert!(param(&out[0], "Timestamp").unwrap().ends_with('Z'));
        assert_eq!(s.active(), 0);
    }

    #[test]
    fn partial_results_go_only_to_sessions_that_asked_for_them() {
        let partial = |text: &str| {
            Event::PartialTranscript(voxgate_protocol::event::PartialTranscript {
                stream_sid: StreamSid::from_u128(1),
                track: Track::Inbound,
                segment_index: 0,
                start_ms: 0,
                end_ms: 500,
                text: text.into(),
                stable: true,
                sequence: 1,
            })
        };
        for wanted in [false, true] {
            let mut s = Sessions::default();
            let Event::TranscriptionStarted(mut st) = started("inbound_track") else { unreachable!() };
            st.partial_results = wanted;
            let mut out = s.apply(&env(1, Event::TranscriptionStarted(st)));
            out.extend(s.apply(&env(2, partial("hello"))));
            out.extend(s.apply(&env(3, partial(" "))));
            out.extend(s.apply(&env(3, transcript(Track::Inbound, "hello there"))));
            let finals: Vec<Option<&str>> = out[1..].iter().map(|d| param(d, "Final")).collect();
            if wanted {
                assert_eq!(finals, [Some("false"), Some("true")]);
                let data: serde_json::Value =
                    serde_json::from_str(param(&out[1], "TranscriptionData").unwrap()).unwrap();
                assert_eq!(data["transcript"], "hello");
                assert_eq!(out.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2, 3]);
            } else {
                assert_eq!(finals, [Some("true")]);
            }
        }
    }

    #[test]
    fn a_call_voxgate_answers_itself_stops_after_the_callers_last_transcript() {
        // No gateway answer: the call streams the caller's track only.
        let mut s = Sessions::default();
        let mut out = s.apply(&env(1, started("both_tracks")));
        out.extend(s.apply(&env(
            2,
            Event::CallStatusChanged(CallStatusChanged {
                status: CallStatus::Completed,
                source: StatusSource::Callback,
                sequence: None,
                duration_secs: None,
            }),
        )));
        assert_eq!(out.len(), 1, "not stopped before the caller's speech has ended");
        out.extend(s.apply(&env(3, transcript(Track::Inbound, "last words"))));
        let ended =
            Event::SpeechEnded(SpeechEnded { stream_sid: StreamSid::from_u128(1), track: Track::Inbound, segments: 1 });
        out.extend(s.apply(&env(4, ended)));
        let events: Vec<&str> = out.iter().map(event_of).collect();
        assert_eq!(events, ["transcription-started", "transcription-content", "transcription-stopped"]);
    }

    #[test]
    fn tracks_names_stops_and_what_was_delivered_are_honoured() {
        let mut s = Sessions::default();
        let mut out = s.apply(&env(1, started("inbound_track")));
        out.extend(s.apply(&env(2, transcript(Track::Outbound, "agent"))));
        out.extend(s.apply(&env(2, transcript(Track::Inbound, ""))));
        assert_eq!(out.len(), 1, "only the caller's track, and no empty transcript");
        // A restart: the started callback was delivered already.
        let mut again = Sessions::default();
        let mut owed = again.apply(&env(1, started("inbound_track")));
        owed.extend(again.apply(&env(
            1,
            Event::AppExchange(AppExchange {
                purpose: AppPurpose::Transcription,
                method: HttpMethod::Post,
                url: "https://app.example.com/rt".into(),
                attempt: 1,
                status: Some(200),
                latency_ms: 3,
                error_code: None,
                error: None,
                cache: None,
                answer: None,
                twilio_signature_valid: true,
                signed_for_app: true,
                reference: Some("GT1#1".into()),
            }),
        )));
        owed.retain(|d| !again.sessions.get(&d.session).is_some_and(|x| x.delivered.contains(&d.seq)));
        assert!(owed.is_empty(), "{owed:?}");
        // Stopped by its name.
        let out = s.apply(&env(
            3,
            Event::TranscriptionStopped(TranscriptionStopped { sid: "live".into(), reason: "twiml".into() }),
        ));
        assert_eq!(out.iter().map(event_of).collect::<Vec<_>>(), ["transcription-stopped"]);
        assert!(s.apply(&env(4, transcript(Track::Inbound, "late"))).is_empty());
    }
}
