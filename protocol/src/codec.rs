//! The log's byte format: one version byte, then the postcard encoding of an [`Envelope`].
//!
//! Golden bytes below pin the format: a change that breaks them breaks every stored log. Every
//! version ever written is read: version 1 (before audio and transcripts carried their track) is
//! decoded by the frozen reader in [`crate::codec_v1`] and upgraded on the way in.

use crate::event::Envelope;

/// The envelope format written today.
pub const VERSION: u8 = 2;

/// The oldest format still read.
pub const OLDEST: u8 = 1;

/// Why bytes from a log could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty event record")]
    Empty,
    #[error("unsupported event envelope version {0} (this build reads versions {OLDEST} to {VERSION})")]
    Version(u8),
    #[error("corrupt event record: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Appends the encoding of `env` to `out` (reuse `out` across calls on hot paths).
pub fn encode_into(env: &Envelope, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(VERSION);
    postcard::to_io(env, &mut *out)?;
    Ok(())
}

/// Encodes `env` into a fresh buffer.
pub fn encode(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Serialising our own types into a Vec cannot fail.
    encode_into(env, &mut out).expect("postcard into Vec is infallible for Envelope");
    out
}

/// Decodes one record.
pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
    let (&v, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match v {
        VERSION => Ok(postcard::from_bytes(rest)?),
        1 => Ok(postcard::from_bytes::<crate::codec_v1::EnvelopeV1>(rest)?.into()),
        _ => Err(CodecError::Version(v)),
    }
}

/// The event id of an encoded envelope, read without decoding the rest (the id is the first
/// field). `None` for bytes that are not a current envelope. The JetStream log uses it as
/// `Nats-Msg-Id`, so a re-sent event is stored once.
pub fn peek_event_id(bytes: &[u8]) -> Option<crate::event::EventId> {
    let (&v, rest) = bytes.split_first()?;
    if !(OLDEST..=VERSION).contains(&v) {
        return None;
    }
    postcard::take_from_bytes::<u128>(rest).ok().map(|(id, _)| crate::event::EventId(id))
}

/// An envelope's fields before its payload, and the payload's variant index in [`Event`]
/// (postcard writes an enum's variant first), read without decoding the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub event_id: crate::event::EventId,
    pub tenant: crate::ids::AccountSid,
    pub call: Option<crate::ids::CallSid>,
    pub occurred_at: crate::time::Timestamp,
    pub variant: u32,
}

/// [`Event::MediaBatch`](crate::event::Event::MediaBatch)'s variant index: readers that skip
/// audio compare [`Header::variant`] with it (a test pins it to the enum).
pub const MEDIA_BATCH_VARIANT: u32 = 4;

/// [`Event::SpeechSegment`](crate::event::Event::SpeechSegment)'s variant index (pinned by a test).
pub const SPEECH_SEGMENT_VARIANT: u32 = 11;

/// [`Event::SpeechProgress`](crate::event::Event::SpeechProgress)'s variant index (pinned by a test).
pub const SPEECH_PROGRESS_VARIANT: u32 = 41;

impl Header {
    /// The record carries audio (a media batch, a speech segment or a piece of one): a reader
    /// that wants only where a call's records are can skip decoding it.
    pub fn is_audio(&self) -> bool {
        matches!(self.variant, MEDIA_BATCH_VARIANT | SPEECH_SEGMENT_VARIANT | SPEECH_PROGRESS_VARIANT)
    }
}

/// The header of a current-version record; `None` for other versions and for bytes that are
/// not an envelope (decode those whole).
pub fn peek_header(bytes: &[u8]) -> Option<Header> {
    let (&v, rest) = bytes.split_first()?;
    if v != VERSION {
        return None;
    }
    type Head = (u128, crate::ids::AccountSid, Option<crate::ids::CallSid>, crate::time::Timestamp);
    let ((id, tenant, call, occurred_at), rest) = postcard::take_from_bytes::<Head>(rest).ok()?;
    let (variant, _) = postcard::take_from_bytes::<u32>(rest).ok()?;
    Some(Header { event_id: crate::event::EventId(id), tenant, call, occurred_at, variant })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::ids::*;
    use crate::time::Timestamp;
    use bytes::Bytes;
    use proptest::prelude::*;

    #[test]
    fn peek_reads_the_event_id_alone() {
        let env = sample();
        assert_eq!(peek_event_id(&encode(&env)), Some(env.event_id));
        assert_eq!(peek_event_id(b""), None);
        assert_eq!(peek_event_id(b"hello"), None);
    }

    fn sample() -> Envelope {
        Envelope {
            event_id: EventId(7),
            tenant: AccountSid::from_u128(1),
            call: Some(CallSid::from_u128(2)),
            occurred_at: Timestamp(1_736_272_931_000_000),
            payload: Event::CallStatusChanged(CallStatusChanged {
                status: CallStatus::Completed,
                source: StatusSource::Callback,
                sequence: Some(3),
                duration_secs: Some(37),
            }),
        }
    }

    #[test]
    fn the_header_reads_without_the_payload() {
        let env = sample();
        let h = peek_header(&encode(&env)).unwrap();
        assert_eq!(
            (h.event_id, h.tenant, h.call, h.occurred_at),
            (env.event_id, env.tenant, env.call, env.occurred_at)
        );
        assert_eq!(h.variant, 2);
        let media = Event::MediaBatch(MediaBatch {
            stream_sid: StreamSid::from_u128(3),
            track: Track::Inbound,
            first_sequence: 1,
            frames: 1,
            start_ms: 0,
            payload: Bytes::from_static(&[0xff; 160]),
            gap_frames: 0,
        });
        let segment = Event::SpeechSegment(SpeechSegment {
            stream_sid: StreamSid::from_u128(3),
            index: 0,
            start_ms: 0,
            end_ms: 20,
            sample_rate: 16_000,
            pcm16le: Bytes::from_static(&[0; 640]),
            track: Track::Inbound,
        });
        let piece = Event::SpeechProgress(SpeechProgress {
            stream_sid: StreamSid::from_u128(3),
            track: Track::Inbound,
            index: 0,
            start_ms: 0,
            from_ms: 0,
            end_ms: 20,
            paused: false,
            pcm16le: Bytes::from_static(&[0; 640]),
        });
        for (payload, variant) in
            [(media, MEDIA_BATCH_VARIANT), (segment, SPEECH_SEGMENT_VARIANT), (piece, SPEECH_PROGRESS_VARIANT)]
        {
            let h = peek_header(&encode(&Envelope { payload, ..sample() })).expect("a header");
            assert_eq!(h.variant, variant);
            assert!(h.is_audio());
        }
        assert!(!peek_header(&encode(&sample())).expect("a header").is_audio());
        assert_eq!(peek_header(b"\x01abc"), None);
        assert_eq!(peek_header(b""), None);
    }

    #[test]
    fn golden_bytes() {
        let b = encode(&sample());
        assert_eq!(
            b,
            // version, event id, tenant, call (Some, varint), time (zigzag varint), payload
            vec![2, 7, 1, 1, 2, 128, 187, 200, 180, 177, 200, 149, 6, 2, 4, 0, 1, 3, 1, 37]
        );
        assert_eq!(decode(&b).unwrap(), sample());
        // Version 1 of the same event still reads.
        let v1 = vec![1, 7, 1, 1, 2, 128, 187, 200, 180, 177, 200, 149, 6, 2, 4, 0, 1, 3, 1, 37];
        assert_eq!(decode(&v1).unwrap(), sample());
        assert_eq!(peek_event_id(&v1), Some(EventId(7)));
    }

    #[test]
    fn version_1_audio_and_transcripts_read_as_the_callers() {
        // A version-1 record is a version-2 one without the trailing track byte.
        let batch = Envelope {
            event_id: EventId(9),
            tenant: AccountSid::from_u128(1),
            call: Some(CallSid::from_u128(2)),
            occurred_at: Timestamp(0),
            payload: Event::MediaBatch(MediaBatch {
                stream_sid: StreamSid::from_u128(3),
                first_sequence: 1,
                start_ms: 20,
                frames: 1,
                gap_frames: 0,
                payload: Bytes::from_static(&[0xff; 4]),
                track: Track::Outbound,
            }),
        };
        let mut b = encode(&batch);
        assert_eq!(b.pop(), Some(1), "the track is the last byte (outbound = 1)");
        b[0] = 1;
        let read = decode(&b).unwrap();
        let Event::MediaBatch(m) = read.payload else { panic!("{read:?}") };
        assert_eq!((m.track, m.frames, m.payload.len()), (Track::Inbound, 1, 4));
    }

    #[test]
    fn every_payload_has_a_json_view() {
        let env = sample();
        let v = env.payload.payload_json();
        assert_eq!(v["status"], "completed");
        let id = serde_json::to_string(&EventId(u128::MAX)).unwrap();
        assert_eq!(id, format!("\"EV{}\"", "f".repeat(32)));
        assert_eq!(serde_json::from_str::<EventId>(&id).unwrap(), EventId(u128::MAX));
        let t = Event::Transcript(Transcript {
            stream_sid: StreamSid::from_u128(1),
            segment_index: 0,
            segment_event: EventId(u128::MAX),
            start_ms: 0,
            end_ms: 10,
            text: "hi".into(),
            model: "m".into(),
            processing_ms: 1,
            avg_logprob: -0.5,
            no_speech_prob: 0.1,
            rejected: None,
            track: Track::Outbound,
            doubt: Some("low_logprob".into()),
        });
        assert_eq!(t.payload_json()["text"], "hi");
        assert_eq!(t.payload_json()["track"], "outbound");
    }

    #[test]
    fn rejects_other_versions_and_garbage() {
        let mut b = encode(&sample());
        b[0] = 9;
        assert!(matches!(decode(&b), Err(CodecError::Version(9))));
        assert!(matches!(decode(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode(&[1, 200, 200]), Err(CodecError::Corrupt(_))));
        assert!(matches!(decode(&[2, 200, 200]), Err(CodecError::Corrupt(_))));
        b[0] = 0;
        assert!(matches!(decode(&b), Err(CodecError::Version(0))));
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (".{0,20}", ".{0,20}", "[a-z]{0,8}").prop_map(|(from, to, s)| {
                Event::CallReceived(CallReceived {
                    from,
                    to,
                    direction: Direction::Inbound,
                    status: CallStatus::Ringing,
                    from_country: Some("US".into()),
                    to_country: None,
                    stream_session: s,
                })
            }),
            (any::<u128>(), any::<u64>(), any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..900))
                .prop_map(|(s, q, ms, g, p)| Event::MediaBatch(MediaBatch {
                    stream_sid: StreamSid::from_u128(s),
                    first_sequence: q,
                    start_ms: ms,
                    frames: (p.len() / 160) as u32,
                    gap_frames: g,
                    payload: Bytes::from(p),
                    track: if g % 2 == 0 { Track::Inbound } else { Track::Outbound },
                })),
            (any::<u128>(), any::<u32>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..400)).prop_map(
                |(s, i, ms, p)| Event::SpeechSegment(SpeechSegment {
                    stream_sid: StreamSid::from_u128(s),
                    index: i,
                    start_ms: ms,
                    end_ms: ms.saturating_add(20),
                    sample_rate: 16_000,
                    pcm16le: Bytes::from(p),
                    track: if i % 2 == 0 { Track::Inbound } else { Track::Outbound },
                })
            ),
            (any::<u8>(), ".{0,30}").prop_map(|(k, d)| Event::StreamFault(StreamFault {
                stream_sid: None,
                kind: [FaultKind::MalformedJson, FaultKind::BadBase64, FaultKind::OversizeFrame][k as usize % 3],
                detail: d,
            })),
            (
                any::<u8>(),
                ".{0,30}",
                proptest::option::of(any::<u128>()),
                proptest::collection::vec(any::<u8>(), 0..60)
            )
                .prop_map(|(k, name, parent, sealed)| {
                    let status = [TenantStatus::Active, TenantStatus::Suspended, TenantStatus::Closed][k as usize % 3];
                    match k % 4 {
                        0 => Event::TenantCreated(TenantCreated {
                            friendly_name: name,
                            parent: parent.map(AccountSid::from_u128),
                            sealed_auth_token: Bytes::from(sealed),
                            status,
                        }),
                        1 => Event::TenantUpdated(TenantUpdated {
                            friendly_name: parent.is_some().then_some(name),
                            status: Some(status),
                            sealed_auth_token: (k % 8 == 1).then(|| Bytes::from(sealed)),
                        }),
                        2 => Event::NumberAssigned(NumberAssigned {
                            sid: crate::PhoneNumberSid::from_u128(parent.unwrap_or(7)),
                            number: "+14155550100".into(),
                            friendly_name: name,
                        }),
                        _ => Event::CallRejected(CallRejected {
                            from: name,
                            to: "+14155550100".into(),
                            reason: RejectReason::ConcurrencyQuota { active: u32::from(k), limit: 100 },
                        }),
                    }
                }),
            (any::<u32>(), any::<u32>(), ".{0,20}", proptest::option::of(any::<i64>())).prop_map(|(a, b, n, until)| {
                match a % 4 {
                    0 => Event::QuotaSet(QuotaSet { max_concurrent_calls: a, calls_per_second: b }),
                    1 => Event::CallerBlocked(CallerBlocked {
                        number: n,
                        reason: "abuse".into(),
                        until: until.map(Timestamp),
                    }),
                    2 => Event::CallerUnblocked(CallerUnblocked { number: n }),
                    _ => Event::QuotaWarning(QuotaWarning { active: a, limit: b, code: 53121 }),
                }
            }),
            (any::<u32>(), proptest::option::of(any::<u128>()), any::<u64>(), proptest::option::of(".{0,30}"))
                .prop_map(|(a, prev, gap, err)| match a % 3 {
                    0 => Event::StreamDropped(StreamDropped {
                        stream_sid: prev.map(StreamSid::from_u128),
                        attempt: a,
                        reattach: a % 2 == 0,
                    }),
                    1 => Event::StreamReattachRequested(StreamReattachRequested {
                        attempt: a,
                        twilio_status: err.is_none().then_some(200),
                        error: err,
                    }),
                    _ => Event::StreamResumed(StreamResumed {
                        previous: prev.map(StreamSid::from_u128),
                        stream_sid: StreamSid::from_u128(gap.into()),
                        attempt: a,
                        gap_ms: gap,
                    }),
                }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(id in any::<u128>(), t in any::<u128>(), c in proptest::option::of(any::<u128>()),
                     at in any::<i64>(), payload in arb_event()) {
            let env = Envelope {
                event_id: EventId(id),
                tenant: AccountSid::from_u128(t),
                call: c.map(CallSid::from_u128),
                occurred_at: Timestamp(at),
                payload,
            };
            let b = encode(&env);
            prop_assert_eq!(decode(&b).unwrap(), env);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
        }
    }
}
