//! Voice webhook and call status-callback parameters (wire doc §1), parsed from URL-decoded form
//! pairs. Unknown parameters are ignored: Twilio adds new ones without notice.

use crate::event::{CallStatus, Direction};
use crate::ids::{AccountSid, CallSid};
use crate::time::Timestamp;

/// Longest value (or name) accepted for any parameter, in bytes.
pub const MAX_VALUE_BYTES: usize = 4000;
/// Longest value accepted for the short text fields (`From`, `To`, `CallerName`, `FromCountry`,
/// `ToCountry`, `ApiVersion`), in bytes.
pub const MAX_SHORT_VALUE_BYTES: usize = 255;

/// The field reported for an oversize parameter whose name is not a documented Twilio parameter.
pub const OTHER_FIELD: &str = "(other parameter)";

/// Why webhook parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A required parameter is absent (Twilio's parameter name).
    #[error("missing parameter {0}")]
    Missing(&'static str),
    /// A parameter is present but unusable.
    #[error("invalid parameter {field}: {reason}")]
    Invalid {
        /// Twilio's parameter name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A parameter is longer than allowed.
    #[error("parameter {field} is longer than {max} bytes")]
    TooLong {
        /// Twilio's parameter name, or [`OTHER_FIELD`].
        field: &'static str,
        /// The limit, in bytes.
        max: usize,
    },
}

impl WebhookError {
    /// The Twilio parameter name the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Missing(f) => f,
            Self::Invalid { field, .. } | Self::TooLong { field, .. } => field,
        }
    }
}

/// The parameters of a voice webhook (the request for TwiML when a call arrives or is placed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoiceWebhook {
    /// `AccountSid`: the (sub)account owning the number, i.e. the tenant.
    pub account_sid: AccountSid,
    /// `CallSid`.
    pub call_sid: CallSid,
    /// `From`: opaque caller string (E.164, `client:…`, `sip:…`, `anonymous`, may be empty).
    pub from: String,
    /// `To`: the called party, never empty.
    pub to: String,
    /// `CallStatus`.
    pub call_status: CallStatus,
    /// `Direction`.
    pub direction: Direction,
    /// `FromCountry`, when present and not empty.
    pub from_country: Option<String>,
    /// `ToCountry`, when present and not empty.
    pub to_country: Option<String>,
    /// `CallerName` (CNAM lookup), when present and not empty.
    pub caller_name: Option<String>,
    /// `ApiVersion`, when present and not empty.
    pub api_version: Option<String>,
}

/// The parameters of a call status callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCallback {
    /// `AccountSid`.
    pub account_sid: AccountSid,
    /// `CallSid`.
    pub call_sid: CallSid,
    /// `CallStatus`.
    pub call_status: CallStatus,
    /// `CallDuration` in seconds (terminal events only).
    pub call_duration: Option<u32>,
    /// `CallDuration` as sent when it is not a whole number of seconds that fits (negative, a
    /// fraction, text, huge): kept to be recorded as such, never billed (cut to 32 characters).
    pub call_duration_invalid: Option<String>,
    /// `SequenceNumber` (starts at 0; callbacks may arrive out of order).
    pub sequence_number: Option<u32>,
    /// `Timestamp` (RFC 2822 event time).
    pub timestamp: Option<Timestamp>,
    /// `From`, as sent.
    pub from: Option<String>,
    /// `To`, as sent.
    pub to: Option<String>,
}

/// Documented Twilio voice parameters: an oversize one is reported under its own name.
const KNOWN: &[&str] = &[
    "AccountSid",
    "ApiVersion",
    "CallSid",
    "CallStatus",
    "Direction",
    "From",
    "To",
    "Caller",
    "Called",
    "ForwardedFrom",
    "CallerName",
    "ParentCallSid",
    "CallToken",
    "FromCity",
    "FromState",
    "FromZip",
    "FromCountry",
    "ToCity",
    "ToState",
    "ToZip",
    "ToCountry",
    "CalledCity",
    "CalledState",
    "CalledZip",
    "CalledCountry",
    "CallerCity",
    "CallerState",
    "CallerZip",
    "CallerCountry",
    "StirVerstat",
    "CallDuration",
    "Duration",
    "Timestamp",
    "CallbackSource",
    "SequenceNumber",
    "SipResponseCode",
    "StirStatus",
    "RecordingUrl",
    "RecordingSid",
    "RecordingDuration",
];

const SHORT: &[&str] = &["From", "To", "CallerName", "FromCountry", "ToCountry", "ApiVersion"];

fn static_name(name: &str) -> &'static str {
    KNOWN.iter().copied().find(|k| *k == name).unwrap_or(OTHER_FIELD)
}

/// One pass over the pairs: enforces the size limits on every pair and picks the values of the
/// `wanted` names (each at most once).
fn collect<'a, const N: usize>(
    pairs: &'a [(String, String)],
    wanted: &[&'static str; N],
) -> Result<[Option<&'a str>; N], WebhookError> {
    let mut slots: [Option<&'a str>; N] = [None; N];
    for (name, value) in pairs {
        if name.len() > MAX_VALUE_BYTES {
            return Err(WebhookError::TooLong { field: OTHER_FIELD, max: MAX_VALUE_BYTES });
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(WebhookError::TooLong { field: static_name(name), max: MAX_VALUE_BYTES });
        }
        let Some((field, slot)) = wanted.iter().zip(slots.iter_mut()).find(|(w, _)| **w == name.as_str()) else {
            continue;
        };
        if SHORT.contains(field) && value.len() > MAX_SHORT_VALUE_BYTES {
            return Err(WebhookError::TooLong { field, max: MAX_SHORT_VALUE_BYTES });
        }
        if slot.is_some() {
            return Err(WebhookError::Invalid { field, reason: "repeated".to_owned() });
        }
        *slot = Some(value.as_str());
    }
    Ok(slots)
}

/// A short, escaped rendering of a bad value for error messages.
fn shown(value: &str) -> String {
    const MAX_CHARS: usize = 40;
    let mut s: String = value.chars().take(MAX_CHARS).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}

fn required<'a>(v: Option<&'a str>, field: &'static str) -> Result<&'a str, WebhookError> {
    v.ok_or(WebhookError::Missing(field))
}

fn account_sid(v: Option<&str>) -> Result<AccountSid, WebhookError> {
    AccountSid::parse(required(v, "AccountSid")?)
        .map_err(|e| WebhookError::Invalid { field: "AccountSid", reason: e.to_string() })
}

fn call_sid(v: Option<&str>) -> Result<CallSid, WebhookError> {
    CallSid::parse(required(v, "CallSid")?)
        .map_err(|e| WebhookError::Invalid { field: "CallSid", reason: e.to_string() })
}

fn call_status(v: Option<&str>) -> Result<CallStatus, WebhookError> {
    let s = required(v, "CallStatus")?;
    CallStatus::parse(s).ok_or_else(|| WebhookError::Invalid {
        field: "CallStatus",
        reason: format!("unknown call status {}", shown(s)),
    })
}

fn non_empty(v: Option<&str>) -> Option<String> {
    v.filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Decimal digits only (no sign, no spaces); empty means absent.
fn opt_u32(v: Option<&str>, field: &'static str) -> Result<Option<u32>, WebhookError> {
    let Some(s) = v.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WebhookError::Invalid { field, reason: format!("not a whole number: {}", shown(s)) });
    }
    s.parse::<u32>().map(Some).map_err(|_| WebhookError::Invalid { field, reason: "number out of range".to_owned() })
}

/// RFC 2822 time; empty means absent.
fn opt_timestamp(v: Option<&str>) -> Result<Option<Timestamp>, WebhookError> {
    let Some(s) = v.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    // `Timestamp::parse_rfc2822` slices by byte and multiplies without overflow checks, so only
    // short ASCII input with small numbers is handed to it.
    let digit_runs_short = s.split(|c: char| !c.is_ascii_digit()).all(|run| run.len() <= 4);
    let bad = || WebhookError::Invalid { field: "Timestamp", reason: format!("not an rfc 2822 time: {}", shown(s)) };
    if !s.is_ascii() || s.len() > 64 || !digit_runs_short {
        return Err(bad());
    }
    Timestamp::parse_rfc2822(s).map(Some).ok_or_else(bad)
}

impl VoiceWebhook {
    /// Parses the webhook's decoded form pairs (POST body, or query string of a GET).
    pub fn from_form(pairs: &[(String, String)]) -> Result<Self, WebhookError> {
        let [account, call, from, to, status, direction, from_country, to_country, caller_name, api_version] = collect(
            pairs,
            &[
                "AccountSid",
                "CallSid",
                "From",
                "To",
                "CallStatus",
                "Direction",
                "FromCountry",
                "ToCountry",
                "CallerName",
                "ApiVersion",
            ],
        )?;
        let account_sid = account_sid(account)?;
        let call_sid = call_sid(call)?;
        let from = required(from, "From")?.to_owned();
        let to = required(to, "To")?;
        if to.is_empty() {
            return Err(WebhookError::Invalid { field: "To", reason: "empty".to_owned() });
        }
        let call_status = call_status(status)?;
        let direction = Direction::parse(required(direction, "Direction")?);
        Ok(Self {
            account_sid,
            call_sid,
            from,
            to: to.to_owned(),
            call_status,
            direction,
            from_country: non_empty(from_country),
            to_country: non_empty(to_country),
            caller_name: non_empty(caller_name),
            api_version: non_empty(api_version),
        })
    }
}

impl StatusCallback {
    /// Parses a status callback's decoded form pairs.
    pub fn from_form(pairs: &[(String, String)]) -> Result<Self, WebhookError> {
        let [account, call, status, duration, sequence, timestamp, from, to] = collect(
            pairs,
            &["AccountSid", "CallSid", "CallStatus", "CallDuration", "SequenceNumber", "Timestamp", "From", "To"],
        )?;
        Ok(Self {
            account_sid: account_sid(account)?,
            call_sid: call_sid(call)?,
            call_status: call_status(status)?,
            call_duration: opt_u32(duration, "CallDuration").ok().flatten(),
            call_duration_invalid: opt_u32(duration, "CallDuration")
                .is_err()
                .then(|| duration.unwrap_or_default().chars().take(32).collect()),
            sequence_number: opt_u32(sequence, "SequenceNumber")?,
            timestamp: opt_timestamp(timestamp)?,
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AC: &str = "AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a";
    const CA: &str = "CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b";

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    fn inbound() -> Vec<(String, String)> {
        pairs(&[
            ("AccountSid", AC),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", CA),
            ("CallStatus", "ringing"),
            ("Direction", "inbound"),
            ("From", "+14155550100"),
            ("To", "+14155550199"),
            ("Caller", "+14155550100"),
            ("Called", "+14155550199"),
            ("FromCity", "OAKLAND"),
            ("FromState", "CA"),
            ("FromZip", "94612"),
            ("FromCountry", "US"),
            ("ToCity", "SAN FRANCISCO"),
            ("ToState", "CA"),
            ("ToZip", "94105"),
            ("ToCountry", "US"),
            ("SomethingNew", "x"),
        ])
    }

    fn with(base: Vec<(String, String)>, name: &str, value: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> = base.into_iter().filter(|(n, _)| n != name).collect();
        v.push((name.to_owned(), value.to_owned()));
        v
    }

    fn without(base: Vec<(String, String)>, name: &str) -> Vec<(String, String)> {
        base.into_iter().filter(|(n, _)| n != name).collect()
    }

    #[test]
    fn parses_inbound_webhook() {
        let w = VoiceWebhook::from_form(&inbound()).unwrap();
        assert_eq!(w.account_sid.to_string(), AC);
        assert_eq!(w.call_sid.to_string(), CA);
        assert_eq!(w.from, "+14155550100");
        assert_eq!(w.to, "+14155550199");
        assert_eq!(w.call_status, CallStatus::Ringing);
        assert_eq!(w.direction, Direction::Inbound);
        assert_eq!(w.from_country.as_deref(), Some("US"));
        assert_eq!(w.to_country.as_deref(), Some("US"));
        assert_eq!(w.caller_name, None);
        assert_eq!(w.api_version.as_deref(), Some("2010-04-01"));
    }

    #[test]
    fn opaque_from_and_optional_fields() {
        let w = VoiceWebhook::from_form(&with(inbound(), "From", "anonymous")).unwrap();
        assert_eq!(w.from, "anonymous");
        let w = VoiceWebhook::from_form(&with(inbound(), "From", "")).unwrap();
        assert_eq!(w.from, "");
        let w = VoiceWebhook::from_form(&with(inbound(), "CallerName", "")).unwrap();
        assert_eq!(w.caller_name, None);
        let w = VoiceWebhook::from_form(&with(inbound(), "CallerName", "Zoë Ünïcødé 東京")).unwrap();
        assert_eq!(w.caller_name.as_deref(), Some("Zoë Ünïcødé 東京"));
        let w = VoiceWebhook::from_form(&with(inbound(), "Direction", "trunking-originating")).unwrap();
        assert_eq!(w.direction, Direction::Other);
        let w = VoiceWebhook::from_form(&without(without(inbound(), "FromCountry"), "ApiVersion")).unwrap();
        assert_eq!((w.from_country, w.api_version), (None, None));
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        for name in ["AccountSid", "CallSid", "From", "To", "CallStatus", "Direction"] {
            let e = VoiceWebhook::from_form(&without(inbound(), name)).unwrap_err();
            assert_eq!(e, WebhookError::Missing(name));
            assert_eq!(e.field(), name);
            assert_eq!(e.to_string(), format!("missing parameter {name}"));
        }
        let e = VoiceWebhook::from_form(&with(inbound(), "To", "")).unwrap_err();
        assert_eq!(e.field(), "To");
        let e = VoiceWebhook::from_form(&with(inbound(), "AccountSid", "AC123")).unwrap_err();
        assert!(matches!(e, WebhookError::Invalid { field: "AccountSid", .. }), "{e}");
        let e = VoiceWebhook::from_form(&with(inbound(), "CallSid", AC)).unwrap_err();
        assert!(matches!(e, WebhookError::Invalid { field: "CallSid", .. }), "{e}");
        let e = VoiceWebhook::from_form(&with(inbound(), "CallStatus", "ringing\n")).unwrap_err();
        assert_eq!(e.field(), "CallStatus");
        assert!(e.to_string().starts_with("invalid parameter CallStatus: "), "{e}");
        let mut dup = inbound();
        dup.push(("CallSid".to_owned(), CA.to_owned()));
        let e = VoiceWebhook::from_form(&dup).unwrap_err();
        assert_eq!(e, WebhookError::Invalid { field: "CallSid", reason: "repeated".to_owned() });
    }

    #[test]
    fn length_limits() {
        let long = "x".repeat(256);
        for name in ["From", "To", "CallerName"] {
            let e = VoiceWebhook::from_form(&with(inbound(), name, &long)).unwrap_err();
            assert_eq!(e, WebhookError::TooLong { field: name, max: 255 });
            assert_eq!(e.to_string(), format!("parameter {name} is longer than 255 bytes"));
        }
        assert!(VoiceWebhook::from_form(&with(inbound(), "From", &"x".repeat(255))).is_ok());
        let huge = "x".repeat(4001);
        let e = VoiceWebhook::from_form(&with(inbound(), "FromCity", &huge)).unwrap_err();
        assert_eq!(e, WebhookError::TooLong { field: "FromCity", max: 4000 });
        let e = VoiceWebhook::from_form(&with(inbound(), "Unheard", &huge)).unwrap_err();
        assert_eq!(e, WebhookError::TooLong { field: OTHER_FIELD, max: 4000 });
        assert!(VoiceWebhook::from_form(&with(inbound(), "Unheard", &"x".repeat(4000))).is_ok());
        let e = StatusCallback::from_form(&with(status(), "To", &long)).unwrap_err();
        assert_eq!(e, WebhookError::TooLong { field: "To", max: 255 });
    }

    fn status() -> Vec<(String, String)> {
        pairs(&[
            ("AccountSid", AC),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", CA),
            ("CallStatus", "completed"),
            ("CallDuration", "37"),
            ("Duration", "1"),
            ("Direction", "inbound"),
            ("From", "+14155550100"),
            ("To", "+14155550199"),
            ("Timestamp", "Tue, 07 Jan 2025 18:02:11 +0000"),
            ("CallbackSource", "call-progress-events"),
            ("SequenceNumber", "3"),
            ("SipResponseCode", "200"),
        ])
    }

    #[test]
    fn parses_status_callback() {
        let s = StatusCallback::from_form(&status()).unwrap();
        assert_eq!(s.call_status, CallStatus::Completed);
        assert_eq!(s.call_duration, Some(37));
        assert_eq!(s.sequence_number, Some(3));
        assert_eq!(s.timestamp.map(|t| t.to_string()).as_deref(), Some("2025-01-07T18:02:11.000Z"));
        assert_eq!(s.from.as_deref(), Some("+14155550100"));
        assert_eq!(s.to.as_deref(), Some("+14155550199"));

        let minimal = pairs(&[("AccountSid", AC), ("CallSid", CA), ("CallStatus", "ringing"), ("SequenceNumber", "0")]);
        let s = StatusCallback::from_form(&minimal).unwrap();
        assert_eq!((s.call_duration, s.sequence_number, s.timestamp, s.from), (None, Some(0), None, None));
    }

    #[test]
    fn status_callback_bad_numbers_and_times() {
        // A duration that is no duration is kept as sent (to be recorded, never billed); the
        // callback itself still counts.
        for value in ["-1", "+1", "1.5", "99999999999", "NaN"] {
            let s = StatusCallback::from_form(&with(status(), "CallDuration", value)).unwrap();
            assert_eq!((s.call_duration, s.call_duration_invalid.as_deref()), (None, Some(value)));
        }
        for (name, value) in [
            ("SequenceNumber", "x"),
            ("Timestamp", "yesterday"),
            ("Timestamp", "Tue, 07 Jan 99999999999999 18:02:11 +0000"),
            ("Timestamp", "Tue, 07 Jan 2025 18:02:11 +1é2"),
            ("Timestamp", "Tue, 07 Jan 2025 18:02:11 +0é0"),
        ] {
            let e = StatusCallback::from_form(&with(status(), name, value)).unwrap_err();
            assert_eq!(e.field(), name, "{value}");
        }
        let s = StatusCallback::from_form(&with(status(), "CallDuration", "")).unwrap();
        assert_eq!(s.call_duration, None);
        let e = StatusCallback::from_form(&without(status(), "CallStatus")).unwrap_err();
        assert_eq!(e, WebhookError::Missing("CallStatus"));
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("AccountSid".to_owned()),
            Just("CallSid".to_owned()),
            Just("From".to_owned()),
            Just("To".to_owned()),
            Just("CallStatus".to_owned()),
            Just("Direction".to_owned()),
            Just("CallDuration".to_owned()),
            Just("SequenceNumber".to_owned()),
            Just("Timestamp".to_owned()),
            ".{0,12}",
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "(AC|CA)[0-9a-fA-F]{30,34}",
            "[A-Za-z]{3}, [0-9]{1,20} [A-Za-z]{3} [0-9]{1,20} [0-9:]{0,12} [+-]?.{0,5}",
            "[0-9]{0,12}",
            Just("x".repeat(4001)),
        ]
    }

    proptest! {
        #[test]
        fn from_form_never_panics(form in proptest::collection::vec((name_strategy(), value_strategy()), 0..14)) {
            let _ = VoiceWebhook::from_form(&form);
            let _ = StatusCallback::from_form(&form);
        }

        #[test]
        fn valid_base_survives_extra_params(extra in proptest::collection::vec(("X[a-z]{0,8}", ".{0,20}"), 0..5)) {
            let mut form = inbound();
            form.extend(extra);
            prop_assert!(VoiceWebhook::from_form(&form).is_ok());
        }
    }
}
