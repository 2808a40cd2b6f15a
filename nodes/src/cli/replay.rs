//! `voxgate replay --call CA…`: a call's timeline from the log, for people (`--json` for tools),
//! and with `--stage transcode` the transcoder run again over the recorded audio, compared with
//! what it recorded.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use voxgate_actors::transcode::{Segment, StreamTranscoder, TranscodeConfig};
use voxgate_protocol::event::{Event, Track};
use voxgate_protocol::{CallSid, Envelope, EventId, SystemClock};
use voxgate_storage::{topics, Log, TopicSpec};

/// One event of the call and the topic it came from.
pub struct Entry {
    pub topic: &'static str,
    pub env: Envelope,
    /// When the log made it durable (the node's clock): `occurred_at` is event time.
    pub appended_at: voxgate_protocol::Timestamp,
}

/// Every event of `call` in the calls, media, speech and transcripts logs, in event-time order.
pub fn timeline(log: &Log, call: CallSid) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for topic in [topics::CALLS, topics::MEDIA, topics::SPEECH, topics::TRANSCRIPTS, topics::FRAUD] {
        let p = log.partition_of(topic, call.partition_key())?;
        log.scan(topic, p, log.first_offset(topic, p)?, |r| {
            match voxgate_protocol::decode(r.payload()) {
                Ok(env) if env.call == Some(call) => out.push(Entry { topic, env, appended_at: r.appended_at() }),
                Ok(_) => {}
                Err(e) => eprintln!("warning: {topic}/{p}@{}: {e}", r.offset),
            }
            Ok::<_, voxgate_storage::StorageError>(())
        })?;
    }
    // Stable: within one instant, calls before media before speech.
    out.sort_by_key(|e| e.env.occurred_at);
    Ok(out)
}

/// The JSON line for one event: `kind`, `call_sid`, `occurred_at` and the payload's fields, with
/// audio replaced by its size.
pub fn event_json(e: &Entry) -> serde_json::Value {
    let mut v = match e.env.payload.payload_json() {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    for (field, size) in [("payload", "payload_bytes"), ("pcm16le", "pcm_bytes")] {
        if v.remove(field).is_some() {
            let n = match &e.env.payload {
                Event::MediaBatch(b) => b.payload.len(),
                Event::SpeechSegment(s) => s.pcm16le.len(),
                Event::SpeechProgress(p) => p.pcm16le.len(),
                _ => 0,
            };
            v.insert(size.into(), n.into());
        }
    }
    // Envelope fields last: a payload field can never shadow them.
    let mut m = v;
    m.insert("kind".into(), e.env.payload.kind().into());
    m.insert("call_sid".into(), e.env.call.map(|c| c.to_string()).into());
    m.insert("tenant".into(), e.env.tenant.to_string().into());
    m.insert("occurred_at".into(), e.env.occurred_at.to_string().into());
    m.insert("event_id".into(), e.env.event_id.to_string().into());
    m.insert("log".into(), e.topic.into());
    m.insert("appended_at".into(), e.appended_at.to_string().into());
    m.insert("appended_at_us".into(), e.appended_at.as_micros().into());
    serde_json::Value::Object(m)
}

/// One line saying what an event means, for people (the timeline here and in the console).
pub fn describe(ev: &Event) -> String {
    match ev {
        Event::CallReceived(c) => format!("from {} to {} ({:?}, {})", c.from, c.to, c.direction, c.status),
        Event::CallRejected(c) => {
            format!("from {} to {}: {} (code {}) {:?}", c.from, c.to, c.reason.label(), c.reason.code(), c.reason)
        }
        Event::CallStatusChanged(c) => format!(
            "{} via {:?}{}{}",
            c.status,
            c.source,
            c.sequence.map(|s| format!(", callback #{s}")).unwrap_or_default(),
            c.duration_secs.map(|d| format!(", {d} s")).unwrap_or_default()
        ),
        Event::StreamStarted(s) => format!("{} tracks {:?}", s.stream_sid, s.tracks),
        Event::MediaBatch(b) => format!("{} {} frames from {} ms", b.track.as_str(), b.frames, b.start_ms),
        Event::Dtmf(d) => format!("digit {}", d.digit),
        Event::StreamMark(m) => format!("mark {}", m.name),
        Event::StreamStopped(s) => format!("{:?} after {} frames", s.reason, s.frames),
        Event::StreamFault(f) => format!("{}: {}", f.kind.as_str(), f.detail),
        Event::AudioShed(a) => format!("{} frames ({} ms) shed", a.frames, a.audio_ms),
        Event::CallTimedOut(t) => format!("maximum duration {} s reached", t.max_duration_secs),
        Event::Transcript(t) => match &t.rejected {
            Some(r) => format!("{} segment #{} rejected ({r})", t.track.party(), t.segment_index),
            None => format!(
                "{}: {:?} (segment #{}, {} ms{})",
                t.track.party(),
                t.text,
                t.segment_index,
                t.processing_ms,
                t.doubt.as_ref().map(|d| format!(", doubtful: {d}")).unwrap_or_default()
            ),
        },
        Event::SpeechSegment(s) => format!(
            "{} #{} {:.2}–{:.2} s ({:.2} s of speech)",
            s.track.as_str(),
            s.index,
            s.start_ms as f64 / 1000.0,
            s.end_ms as f64 / 1000.0,
            (s.end_ms - s.start_ms) as f64 / 1000.0
        ),
        Event::TenantCreated(t) => format!(
            "tenant {:?} created{}",
            t.friendly_name,
            t.parent.map(|p| format!(" under {p}")).unwrap_or_default()
        ),
        Event::TenantUpdated(t) => format!("tenant updated: name {:?}, status {:?}", t.friendly_name, t.status),
        Event::NumberAssigned(n) => format!("number {} ({}) assigned", n.number, n.sid),
        Event::NumberReleased(n) => format!("number {} ({}) released", n.number, n.sid),
        Event::QuotaSet(q) => {
            format!("quota: {} concurrent calls, {} new calls/s", q.max_concurrent_calls, q.calls_per_second)
        }
        Event::CallerBlocked(b) => format!("caller {} blocked: {}", b.number, b.reason),
        Event::CallerUnblocked(b) => format!("caller {} unblocked", b.number),
        Event::QuotaWarning(w) => format!("{} of {} concurrent calls in use (code {})", w.active, w.limit, w.code),
        Event::FraudVerdict(v) => {
            let rules: Vec<String> = v.hits.iter().map(|h| format!("{} ({})", h.rule, h.evidence)).collect();
            format!("fraud {}: {}", v.severity.as_str(), rules.join("; "))
        }
        Event::HangupRequested(h) => format!("hang-up requested by {}: {}", h.source, h.reason),
        Event::AlertRaised(a) => format!("alert {} ({}): {}", a.name, a.severity.as_str(), a.message),
        Event::UsageTriggerCreated(t) => format!(
            "usage trigger {} created: {} {} ≥ {} µ, recurring {:?}, callback {} {}",
            t.sid,
            t.usage_category,
            t.trigger_by,
            t.trigger_value_micros,
            t.recurring,
            t.callback_method,
            t.callback_url
        ),
        Event::UsageTriggerUpdated(t) => format!("usage trigger {} updated", t.sid),
        Event::UsageTriggerDeleted(t) => format!("usage trigger {} deleted", t.sid),
        Event::UsageTriggerFired(f) => format!(
            "usage trigger {} fired ({}): {} µ ≥ {} µ",
            f.sid, f.idempotency_token, f.current_value_micros, f.trigger_value_micros
        ),
        Event::TriggerCallbackAttempted(a) => format!(
            "callback {} attempt {}: {:?}{}{}",
            a.idempotency_token,
            a.attempt,
            a.outcome,
            a.status.map(|s| format!(", HTTP {s}")).unwrap_or_default(),
            a.error.as_ref().map(|e| format!(", {e}")).unwrap_or_default()
        ),
        Event::BudgetExceeded(b) => format!(
            "budget of {} µ spent in {} ({} µ): calls refused until {}",
            b.budget_micros, b.month, b.spent_micros, b.until
        ),
        Event::StreamDropped(d) => format!(
            "stream {} dropped (drop {}){}",
            d.stream_sid.map(|s| s.to_string()).unwrap_or_else(|| "before start".into()),
            d.attempt,
            if d.reattach { ", asking Twilio to re-attach" } else { ", no re-attach left" }
        ),
        Event::StreamReattachRequested(r) => format!(
            "re-attach after drop {}: {}",
            r.attempt,
            match (&r.twilio_status, &r.error) {
                (_, Some(e)) => format!("failed, {e}"),
                (Some(s), None) => format!("Twilio answered HTTP {s}"),
                (None, None) => "no answer".into(),
            }
        ),
        Event::StreamResumed(r) => format!(
            "stream {} resumes {} after a {} ms gap",
            r.stream_sid,
            r.previous.map(|s| s.to_string()).unwrap_or_else(|| "a stream dropped before start".into()),
            r.gap_ms
        ),
        Event::CallDurationImplausible(d) => format!(
            "CallDuration {:?} not believed (observed {} s, at most {} s): usage uses the observed duration",
            d.reported, d.observed_secs, d.bound_secs
        ),
        Event::AppExchange(x) => format!(
            "{} {} {} (attempt {}): {}{} in {} ms{}",
            x.purpose.as_str(),
            x.method.as_str(),
            x.url,
            x.attempt,
            x.status.map(|s| format!("HTTP {s}")).unwrap_or_else(|| "no answer".into()),
            x.error_code.map(|c| format!(", error {c}")).unwrap_or_default(),
            x.latency_ms,
            x.cache.as_ref().map(|c| format!(", cache {c}")).unwrap_or_default()
        ),
        Event::GatewayAnswered(g) => format!(
            "answered Twilio with the app's TwiML{}{}{} (+{:.1} ms)",
            g.fork.as_ref().map(|f| format!(", forking {f}")).unwrap_or_else(|| ", no fork".into()),
            if g.transcriptions.is_empty() {
                String::new()
            } else {
                format!(", {} transcription(s) run here", g.transcriptions.len())
            },
            g.warnings.iter().map(|(c, w)| format!("; warning {c}: {w}")).collect::<String>(),
            f64::from(g.added_us) / 1000.0
        ),
        Event::TranscriptionStarted(t) => format!(
            "real-time transcription {} started ({}, {}, partial results {}) → {}",
            t.sid,
            t.source,
            t.track,
            t.partial_results,
            t.status_callback_url.as_deref().unwrap_or("(no callback)")
        ),
        Event::SpeechEnded(e) => {
            format!("{} track of {} ended after {} segments", e.track.as_str(), e.stream_sid, e.segments)
        }
        Event::SpeechProgress(p) => format!(
            "{} #{} open, heard {:.2}–{:.2} s{}",
            p.track.as_str(),
            p.index,
            p.start_ms as f64 / 1000.0,
            p.end_ms as f64 / 1000.0,
            if p.paused { ", paused" } else { "" }
        ),
        Event::PartialTranscript(t) => format!(
            "{} (partial {} of segment #{}{}): {:?}",
            t.track.party(),
            t.sequence,
            t.segment_index,
            if t.stable { ", stable" } else { "" },
            t.text
        ),
        Event::TranscriptionStopped(t) => format!("real-time transcription {} stopped ({})", t.sid, t.reason),
        Event::SpeechHintsSet(h) => format!("vocabulary hints of the account's calls set to {:?}", h.hints),
        Event::SpeechHints(h) => format!(
            "vocabulary hints for {} from here on: {:?}",
            h.track.map_or("the stream's speech", |t| t.party()),
            h.hints
        ),
        Event::AppRequest(r) => format!(
            "{} request to the app: {} {} with {} parameters",
            r.purpose.as_str(),
            r.method.as_str(),
            r.url,
            r.params.len()
        ),
        Event::NumberRouted(n) => format!(
            "{} answered by {} ({}), status callbacks to {}",
            n.number,
            n.routing.voice_url.as_deref().unwrap_or("voxgate"),
            n.routing.voice_method.as_str(),
            n.routing.status_callback.as_deref().unwrap_or("(none)")
        ),
        Event::OperatorStatusSet(o) => format!(
            "operator set status {}{}",
            o.status.as_str(),
            o.friendly_name.as_ref().map(|n| format!(", name {n:?}")).unwrap_or_default()
        ),
    }
}

/// Prints the timeline; consecutive audio batches collapse into one line.
pub fn print_human(call: CallSid, entries: &[Entry], out: &mut impl Write) -> std::io::Result<()> {
    let Some(first) = entries.first() else {
        return writeln!(out, "no events for call {call}");
    };
    writeln!(out, "call {call}  tenant {}  {} events", first.env.tenant, entries.len())?;
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        if let Event::MediaBatch(_) = &e.env.payload {
            // Per track: the caller's and the other party's audio.
            let (mut frames, mut gaps) = ([0u64; 2], 0u64);
            let mut j = i;
            while let Some(Entry { env: Envelope { payload: Event::MediaBatch(n), .. }, .. }) = entries.get(j) {
                frames[usize::from(n.track == Track::Outbound)] += u64::from(n.frames);
                gaps += u64::from(n.gap_frames);
                j += 1;
            }
            let last = &entries[j - 1].env.occurred_at;
            let audio = if frames[1] > 0 {
                format!(
                    "inbound {} frames ({:.1} s), outbound {} frames ({:.1} s)",
                    frames[0],
                    frames[0] as f64 * 0.02,
                    frames[1],
                    frames[1] as f64 * 0.02
                )
            } else {
                format!("{} frames ({:.1} s of audio)", frames[0], frames[0] as f64 * 0.02)
            };
            writeln!(
                out,
                "{}  {:<6} {:<20} {} batches, {audio}{} until {}",
                e.env.occurred_at,
                e.topic,
                "media_batch ×",
                j - i,
                if gaps > 0 { format!(", {gaps} frames missing") } else { String::new() },
                last
            )?;
            i = j;
            continue;
        }
        writeln!(
            out,
            "{}  {:<6} {:<20} {}",
            e.env.occurred_at,
            e.topic,
            e.env.payload.kind(),
            describe(&e.env.payload)
        )?;
        i += 1;
    }
    Ok(())
}

/// Runs the transcoder again over the call's recorded audio, each track on its own; the
/// segments in the order the stage appends them (a stream's tracks, in time).
pub fn retranscode(entries: &[Entry], cfg: &TranscodeConfig) -> Vec<(Track, Segment)> {
    let mut t: [Option<StreamTranscoder>; 2] = [None, None];
    let mut out = Vec::new();
    let mut cut = Vec::new();
    let tracks = [Track::Inbound, Track::Outbound];
    for e in entries {
        match &e.env.payload {
            Event::StreamStarted(st) => {
                let named: Vec<Track> = st.tracks.iter().filter_map(|n| Track::parse(n)).collect();
                for (i, track) in tracks.iter().enumerate() {
                    let on = named.contains(track) || named.is_empty() && *track == Track::Inbound;
                    t[i] = on.then(|| StreamTranscoder::new(cfg));
                }
            }
            Event::MediaBatch(b) => {
                let i = usize::from(b.track == Track::Outbound);
                if let Some(tr) = t[i].as_mut() {
                    tr.push(b.start_ms, &b.payload, &mut cut);
                    out.extend(cut.drain(..).map(|s| (b.track, s)));
                }
            }
            Event::StreamStopped(_) => {
                for (i, track) in tracks.iter().enumerate() {
                    if let Some(mut tr) = t[i].take() {
                        tr.finish(&mut cut);
                        out.extend(cut.drain(..).map(|s| (*track, s)));
                    }
                }
            }
            _ => {}
        }
    }
    for (i, track) in tracks.iter().enumerate() {
        if let Some(mut tr) = t[i].take() {
            tr.finish(&mut cut);
            out.extend(cut.drain(..).map(|s| (*track, s)));
        }
    }
    out
}

/// `voxgate replay`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    data_dir: &Path,
    specs: &[TopicSpec],
    call: CallSid,
    json: bool,
    stage: Option<&str>,
    transcode: &TranscodeConfig,
    // The model directory and decoding settings of `[stt]`.
    stt: Option<(&Path, voxgate_actors::stt::decode::DecodeOptions)>,
    fraud: Option<&voxgate_actors::fraud::FraudConfig>,
) -> anyhow::Result<()> {
    let log = Log::open(&data_dir.join("log"), specs, Arc::new(SystemClock)).with_context(|| {
        format!(
            "opening the event log in {} (a running `voxgate serve` holds it: stop it, or replay a copy)",
            data_dir.display()
        )
    })?;
    let entries = timeline(&log, call)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match stage {
        None => {
            if json {
                for e in &entries {
                    writeln!(out, "{}", event_json(e))?;
                }
            } else {
                print_human(call, &entries, &mut out)?;
            }
        }
        Some("transcode") => {
            let recorded: Vec<_> = entries
                .iter()
                .filter_map(|e| match &e.env.payload {
                    Event::SpeechSegment(s) => Some(s),
                    _ => None,
                })
                .collect();
            let again = retranscode(&entries, transcode);
            let mut differences = 0;
            // Pair segments by track and index (the log orders them by when each was cut).
            let mut keys: Vec<(Track, u32)> =
                recorded.iter().map(|r| (r.track, r.index)).chain(again.iter().map(|(t, a)| (*t, a.index))).collect();
            keys.sort();
            keys.dedup();
            for (track, index) in &keys {
                let r = recorded.iter().find(|r| r.track == *track && r.index == *index).copied();
                let a = again.iter().find(|(t, a)| t == track && a.index == *index).map(|(_, a)| a);
                let same = match (r, a) {
                    (Some(r), Some(a)) => {
                        r.start_ms == a.start_ms
                            && r.end_ms == a.end_ms
                            && r.pcm16le.len() == a.pcm16.len() * 2
                            && r.pcm16le
                                .chunks_exact(2)
                                .zip(&a.pcm16)
                                .all(|(b, s)| i16::from_le_bytes([b[0], b[1]]) == *s)
                    }
                    _ => false,
                };
                if !same {
                    differences += 1;
                }
                let fmt =
                    |s: Option<(u64, u64)>| s.map(|(a, b)| format!("{a}–{b} ms")).unwrap_or_else(|| "(none)".into());
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({
                            "segment": index, "track": track.as_str(), "same": same,
                            "recorded": r.map(|r| [r.start_ms, r.end_ms]),
                            "replayed": a.map(|a| [a.start_ms, a.end_ms]),
                        })
                    )?;
                } else {
                    writeln!(
                        out,
                        "{} segment {index}: recorded {} replayed {} {}",
                        track.as_str(),
                        fmt(r.map(|r| (r.start_ms, r.end_ms))),
                        fmt(a.map(|a| (a.start_ms, a.end_ms))),
                        if same { "same" } else { "DIFFERS" }
                    )?;
                }
            }
            if !json {
                writeln!(out, "{} recorded, {} replayed, {differences} differ", recorded.len(), again.len())?;
            }
        }
        Some("fraud") => {
            let fraud = fraud.context("--stage fraud needs the [fraud] rules of the config")?;
            // Recorded verdicts on this call, by the event they were made on.
            let recorded: Vec<(EventId, &voxgate_protocol::event::FraudVerdict)> = entries
                .iter()
                .filter_map(|e| match &e.env.payload {
                    Event::FraudVerdict(v) => Some((v.cause, v)),
                    _ => None,
                })
                .collect();
            let again = rejudge(&log, fraud, call)?;
            let rules = |v: Option<&voxgate_protocol::event::FraudVerdict>| -> Vec<String> {
                v.map(|v| v.hits.iter().map(|h| format!("{}:{}", h.rule, h.severity.as_str())).collect())
                    .unwrap_or_default()
            };
            let mut causes: Vec<EventId> = recorded.iter().map(|r| r.0).chain(again.iter().map(|a| a.0)).collect();
            causes.sort();
            causes.dedup();
            let mut changed = 0;
            for c in &causes {
                let r = recorded.iter().find(|x| x.0 == *c).map(|x| x.1);
                let a = again.iter().find(|x| x.0 == *c).map(|x| &x.1);
                let (rr, ar) = (rules(r), rules(a));
                let same = rr == ar;
                changed += usize::from(!same);
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "cause": c.to_string(), "same": same, "recorded": rr, "replayed": ar })
                    )?;
                } else {
                    let show = |v: &[String]| if v.is_empty() { "(no verdict)".to_owned() } else { v.join(", ") };
                    writeln!(
                        out,
                        "event {c}: recorded {} | current rules {} {}",
                        show(&rr),
                        show(&ar),
                        if same { "same" } else { "CHANGED" }
                    )?;
                }
            }
            if !json {
                writeln!(
                    out,
                    "{} recorded verdicts, {} with the current rules, {changed} changed",
                    recorded.len(),
                    again.len()
                )?;
            }
        }
        Some("stt") => {
            let (model_dir, options) = stt.context("--stage stt needs the [stt] model_dir of the config")?;
            // The segments, each with its track's hints as the speech log had them before it (in
            // the log's order, as the STT stage read them, not event time).
            let mut track_hints: std::collections::HashMap<(voxgate_protocol::StreamSid, Track), String> =
                std::collections::HashMap::new();
            let mut segments: Vec<(Envelope, String)> = Vec::new();
            let p = log.partition_of(topics::SPEECH, call.partition_key())?;
            log.scan(topics::SPEECH, p, log.first_offset(topics::SPEECH, p)?, |r| {
                let Ok(env) = voxgate_protocol::decode(r.payload()) else { return Ok(()) };
                if env.call != Some(call) {
                    return Ok(());
                }
                match &env.payload {
                    Event::SpeechHints(h) => {
                        if let Some(track) = h.track {
                            track_hints.insert((h.stream_sid, track), h.hints.clone());
                        }
                    }
                    Event::SpeechEnded(e) => {
                        track_hints.remove(&(e.stream_sid, e.track));
                    }
                    Event::SpeechSegment(seg) => {
                        let hints = track_hints.get(&(seg.stream_sid, seg.track)).map(String::as_str).unwrap_or("");
                        let prompt = voxgate_actors::stt::stage::prompt_hints(&options.hints, hints);
                        segments.push((env, prompt));
                    }
                    _ => {}
                }
                Ok::<_, voxgate_storage::StorageError>(())
            })?;
            let recorded: std::collections::HashMap<(Track, u32), &voxgate_protocol::event::Transcript> = entries
                .iter()
                .filter_map(|e| match &e.env.payload {
                    Event::Transcript(t) => Some(((t.track, t.segment_index), t)),
                    _ => None,
                })
                .collect();
            let mut t = voxgate_actors::stt::decode::Transcriber::load(model_dir)
                .map_err(|e| anyhow::anyhow!("{e} (run nodes/deploy/fetch-model.sh)"))?;
            t.set_options(options.clone());
            let mut differences = 0;
            for (env, hints) in &segments {
                let Event::SpeechSegment(seg) = &env.payload else { continue };
                if t.options().hints != *hints {
                    t.set_options(voxgate_actors::stt::decode::DecodeOptions {
                        hints: hints.clone(),
                        ..options.clone()
                    });
                }
                let clip: Vec<f32> = seg
                    .pcm16le
                    .chunks_exact(2)
                    .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                    .collect();
                let again = t.transcribe(&clip).map_err(|e| anyhow::anyhow!("segment {}: {e}", seg.index))?;
                let before = recorded.get(&(seg.track, seg.index)).map(|r| r.text.as_str());
                let same = before == Some(again.text.as_str());
                if !same {
                    differences += 1;
                }
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"segment": seg.index, "track": seg.track.as_str(), "same": same, "recorded": before, "replayed": again.text, "rejected": again.rejected})
                    )?;
                } else {
                    writeln!(
                        out,
                        "{} segment {} {}–{} ms: {}\n  recorded: {}\n  replayed: {}",
                        seg.track.as_str(),
                        seg.index,
                        seg.start_ms,
                        seg.end_ms,
                        if same { "same" } else { "DIFFERS" },
                        before.unwrap_or("(none)"),
                        again.text
                    )?;
                }
            }
            if !json {
                writeln!(
                    out,
                    "{} segments, {} transcripts recorded, {differences} differ",
                    segments.len(),
                    recorded.len()
                )?;
            }
        }
        Some(other) => bail!("stage {other:?} cannot be replayed yet (available: transcode, stt)"),
    }
    log.close().await?;
    Ok(())
}

/// The current fraud rules over the whole recorded calls log (they judge a call against its
/// tenant's history), in the stage's order; returns the verdicts on `call`'s events.
pub fn rejudge(
    log: &Log,
    config: &voxgate_actors::fraud::FraudConfig,
    call: CallSid,
) -> anyhow::Result<Vec<(EventId, voxgate_protocol::event::FraudVerdict)>> {
    use voxgate_actors::fraud::{FraudEngine, PrefixTable};
    let mut all = Vec::new();
    for p in 0..log.partitions(topics::CALLS)? {
        log.scan(topics::CALLS, p, log.first_offset(topics::CALLS, p)?, |r| {
            all.extend(voxgate_protocol::decode(r.payload()).ok());
            Ok::<_, voxgate_storage::StorageError>(())
        })?;
    }
    all.sort_by_key(|e: &Envelope| (e.occurred_at, e.event_id));
    let mut engine = FraudEngine::new(config.clone(), PrefixTable::builtin())?;
    let mut out = Vec::new();
    for env in &all {
        if let Some(v) = engine.apply(env) {
            if env.call == Some(call) {
                out.push((env.event_id, v));
            }
        }
    }
    Ok(out)
}
