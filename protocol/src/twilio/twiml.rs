//! The TwiML documents voxgate answers webhooks with, byte-identical to what twilio-python 9.13.0
//! produces (wire doc §3.3): XML declaration, no whitespace, attributes sorted by name, empty
//! elements as `<X />`, ElementTree escaping.

/// The prefix of every document (`str(VoiceResponse())` in twilio-python).
pub const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// A `<Parameter>`'s name and value together must be shorter than this many characters.
pub const MAX_PARAMETER_CHARS: usize = 500;

/// Why a TwiML document could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwimlError {
    /// The `<Stream>` url is empty.
    #[error("stream url is empty")]
    EmptyUrl,
    /// A `<Parameter>`'s name and value together reach [`MAX_PARAMETER_CHARS`].
    #[error("stream parameter {name:?} is too long: name and value have {chars} characters, must be under {max}")]
    ParameterTooLong {
        /// The parameter's name (cut to 40 characters).
        name: String,
        /// Characters in name and value together.
        chars: usize,
        /// [`MAX_PARAMETER_CHARS`].
        max: usize,
    },
    /// A value holds a character XML 1.0 cannot carry (most control characters).
    #[error("{field} contains a character that xml cannot carry")]
    InvalidChar {
        /// Which input: `url`, `name`, `track`, `statusCallback`, `statusCallbackMethod`, or
        /// `parameter`.
        field: &'static str,
    },
}

/// A bidirectional `<Connect><Stream>` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamTwiml<'a> {
    /// `url`: the `wss://` WebSocket URL Twilio connects to (no query string; use parameters).
    pub url: &'a str,
    /// `name`: unique per call.
    pub name: Option<&'a str>,
    /// `track`: `inbound_track` (Twilio's default), `outbound_track` or `both_tracks`.
    pub track: Option<&'a str>,
    /// `statusCallback`: absolute URL for stream start/stop/error callbacks.
    pub status_callback: Option<&'a str>,
    /// `statusCallbackMethod`: `POST` (Twilio's default) or `GET`.
    pub status_callback_method: Option<&'a str>,
    /// `<Parameter name value>` children, in order; delivered as `start.customParameters`.
    pub parameters: &'a [(&'a str, &'a str)],
}

/// `<Response><Connect><Stream …>…</Stream></Connect></Response>` for `s`.
pub fn connect_stream(s: &StreamTwiml<'_>) -> Result<String, TwimlError> {
    if s.url.is_empty() {
        return Err(TwimlError::EmptyUrl);
    }
    let attrs = [
        ("name", s.name),
        ("statusCallback", s.status_callback),
        ("statusCallbackMethod", s.status_callback_method),
        ("track", s.track),
        ("url", Some(s.url)),
    ];
    for (field, value) in attrs {
        if value.is_some_and(|v| !v.chars().all(xml_char)) {
            return Err(TwimlError::InvalidChar { field });
        }
    }
    for (name, value) in s.parameters {
        let chars = name.chars().count().saturating_add(value.chars().count());
        if chars >= MAX_PARAMETER_CHARS {
            return Err(TwimlError::ParameterTooLong {
                name: name.chars().take(40).collect(),
                chars,
                max: MAX_PARAMETER_CHARS,
            });
        }
        if !name.chars().chain(value.chars()).all(xml_char) {
            return Err(TwimlError::InvalidChar { field: "parameter" });
        }
    }

    let mut out = String::with_capacity(256);
    out.push_str(XML_DECLARATION);
    out.push_str("<Response><Connect><Stream");
    // already in attribute-name order
    for (name, value) in attrs {
        if let Some(v) = value {
            push_attr(&mut out, name, v);
        }
    }
    if s.parameters.is_empty() {
        out.push_str(" />");
    } else {
        out.push('>');
        for (name, value) in s.parameters {
            out.push_str("<Parameter");
            push_attr(&mut out, "name", name);
            push_attr(&mut out, "value", value);
            out.push_str(" />");
        }
        out.push_str("</Stream>");
    }
    out.push_str("</Connect></Response>");
    Ok(out)
}

/// `<Response><Reject /></Response>`, or with `reason` (`busy` or `rejected`) as attribute.
/// Characters XML cannot carry are dropped from `reason`.
pub fn reject(reason: Option<&str>) -> String {
    let mut out = String::with_capacity(80);
    out.push_str(XML_DECLARATION);
    out.push_str("<Response><Reject");
    if let Some(r) = reason {
        push_attr(&mut out, "reason", r);
    }
    out.push_str(" /></Response>");
    out
}

/// `<Response><Hangup /></Response>`.
pub fn hangup() -> String {
    let mut out = String::with_capacity(72);
    out.push_str(XML_DECLARATION);
    out.push_str("<Response><Hangup /></Response>");
    out
}

/// Characters allowed in an XML 1.0 document.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// ` name="value"` with ElementTree's attribute escaping (`& < > "` and tab, newline, carriage
/// return as character references); characters XML cannot carry are dropped.
fn push_attr(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#09;"),
            c if xml_char(c) => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text-node escaping as ElementTree does it (`& < >`), to pin §3.3's `<Say>` row.
    fn say(text: &str, attrs: &[(&str, &str)]) -> String {
        let mut out = String::new();
        out.push_str(XML_DECLARATION);
        out.push_str("<Response><Say");
        for (n, v) in attrs {
            push_attr(&mut out, n, v);
        }
        out.push('>');
        for c in text.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                c => out.push(c),
            }
        }
        out.push_str("</Say></Response>");
        out
    }

    #[test]
    fn golden_connect_stream_with_parameter() {
        let got = connect_stream(&StreamTwiml {
            url: "wss://voice.example.com/media",
            parameters: &[("tenant", "AC00000000000000000000000000000001")],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            got,
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://voice.example.com/media"><Parameter name="tenant" value="AC00000000000000000000000000000001" /></Stream></Connect></Response>"#
        );
    }

    #[test]
    fn golden_connect_stream_with_name_and_callback() {
        let got = connect_stream(&StreamTwiml {
            url: "wss://voice.example.com/media",
            name: Some("main"),
            track: None,
            status_callback: Some("https://voice.example.com/stream-status"),
            status_callback_method: Some("POST"),
            parameters: &[("tenant", "acme")],
        })
        .unwrap();
        assert_eq!(
            got,
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream name="main" statusCallback="https://voice.example.com/stream-status" statusCallbackMethod="POST" url="wss://voice.example.com/media"><Parameter name="tenant" value="acme" /></Stream></Connect></Response>"#
        );
    }

    #[test]
    fn connect_stream_without_parameters_and_with_track() {
        // shape of the `<Connect action …><Stream track url />` row of §3.3 (without `action`)
        let got = connect_stream(&StreamTwiml { url: "wss://h/x", track: Some("inbound_track"), ..Default::default() })
            .unwrap();
        assert_eq!(
            got,
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream track="inbound_track" url="wss://h/x" /></Connect></Response>"#
        );
    }

    #[test]
    fn golden_reject_and_hangup() {
        assert_eq!(
            reject(Some("busy")),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy" /></Response>"#
        );
        assert_eq!(reject(None), r#"<?xml version="1.0" encoding="UTF-8"?><Response><Reject /></Response>"#);
        assert_eq!(
            reject(Some("rejected")),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="rejected" /></Response>"#
        );
        assert_eq!(hangup(), r#"<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>"#);
    }

    #[test]
    fn golden_text_escaping() {
        assert_eq!(
            say("Bonjour & <bienvenue>", &[("language", "fr-FR"), ("loop", "2"), ("voice", "alice")]),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Say language="fr-FR" loop="2" voice="alice">Bonjour &amp; &lt;bienvenue&gt;</Say></Response>"#
        );
    }

    #[test]
    fn attribute_escaping_matches_elementtree() {
        // Python 3.11: ET.tostring(Element('a', {'v': 'x"\n\r\t&<>\''})) → v="x&quot;&#10;&#13;&#09;&amp;&lt;&gt;'"
        let got = connect_stream(&StreamTwiml {
            url: "wss://h/x",
            parameters: &[("k", "x\"\n\r\t&<>'")],
            ..Default::default()
        })
        .unwrap();
        assert!(got.contains(r#"<Parameter name="k" value="x&quot;&#10;&#13;&#09;&amp;&lt;&gt;'" />"#), "{got}");
        assert_eq!(
            reject(Some("a\u{1}\"b")),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="a&quot;b" /></Response>"#
        );
    }

    #[test]
    fn parameter_length_limit() {
        let name = "n".repeat(200);
        let ok = "v".repeat(299);
        let too_long = "v".repeat(300);
        let params = [(name.as_str(), ok.as_str())];
        assert!(connect_stream(&StreamTwiml { url: "wss://h/x", parameters: &params, ..Default::default() }).is_ok());
        let params = [("a", "b"), (name.as_str(), too_long.as_str())];
        let e =
            connect_stream(&StreamTwiml { url: "wss://h/x", parameters: &params, ..Default::default() }).unwrap_err();
        assert!(matches!(e, TwimlError::ParameterTooLong { chars: 500, max: 500, .. }), "{e}");
        // characters, not bytes
        let wide = "é".repeat(498);
        let params = [("k", wide.as_str())];
        assert!(connect_stream(&StreamTwiml { url: "wss://h/x", parameters: &params, ..Default::default() }).is_ok());
    }

    #[test]
    fn rejects_unusable_input() {
        assert_eq!(connect_stream(&StreamTwiml::default()), Err(TwimlError::EmptyUrl));
        let e = connect_stream(&StreamTwiml { url: "wss://h/\u{0}", ..Default::default() }).unwrap_err();
        assert_eq!(e, TwimlError::InvalidChar { field: "url" });
        let params = [("k", "\u{FFFE}")];
        let e =
            connect_stream(&StreamTwiml { url: "wss://h/x", parameters: &params, ..Default::default() }).unwrap_err();
        assert_eq!(e, TwimlError::InvalidChar { field: "parameter" });
    }

    proptest! {
        #[test]
        fn never_panics(url in ".{0,20}", name in proptest::option::of(".{0,10}"), k in ".{0,300}", v in ".{0,300}") {
            let params = [(k.as_str(), v.as_str())];
            let _ = connect_stream(&StreamTwiml { url: &url, name: name.as_deref(), parameters: &params, ..Default::default() });
            let _ = reject(name.as_deref());
        }
    }
}
