//! A customer app's TwiML, made ready for Twilio when voxgate sits in front of the app (gateway
//! mode): voxgate's `<Start><Stream track="both_tracks">` goes first, so the call's audio forks to
//! voxgate while the app's verbs run as written; `<Start><Transcription>` and
//! `<Stop><Transcription>` are taken out (voxgate transcribes and calls the app back itself, as
//! Twilio's real-time transcription would); relative URLs are made absolute against the URL the
//! TwiML came from, so Twilio's later requests go to the app, not to voxgate.
//!
//! Twilio's limits are kept: at most four unidirectional tracks are streamed per call, so when the
//! app's own `<Start><Stream>`s leave room for one track only, voxgate forks the caller's; when
//! they leave none, voxgate does not fork and says so. The document is read into a small tree and
//! written out again (entities and attributes re-escaped), so what Twilio receives is well-formed.

use quick_xml::events::Event as Xml;

/// Tracks Twilio streams per call at most (unidirectional streams).
pub const MAX_TRACKS: u32 = 4;

/// Largest TwiML document Twilio accepts (its error 11750).
pub const MAX_TWIML_BYTES: usize = 64 * 1024;

/// Why the app's answer is not TwiML Twilio would run (Twilio's error codes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwimlError {
    /// Twilio's 12100: not well-formed.
    #[error("12100: the document is not well-formed XML: {0}")]
    NotXml(String),
    /// Twilio's 12102: the root is not `<Response>`.
    #[error("12102: the root element must be <Response>, found <{0}>")]
    NotResponse(String),
    /// Twilio's 11750: over 64 kB.
    #[error("11750: the document is {0} bytes, more than Twilio's 64 kB")]
    TooLarge(usize),
}

impl TwimlError {
    /// Twilio's error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::NotXml(_) => 12100,
            Self::NotResponse(_) => 12102,
            Self::TooLarge(_) => 11750,
        }
    }
}

/// What to put in front of the app's verbs.
#[derive(Debug, Clone)]
pub struct Fork<'a> {
    /// voxgate's Media Streams URL for this call (`wss://…/api/voice/twilio/stream/CA…`).
    pub stream_url: &'a str,
    /// `<Parameter>`s of the stream.
    pub parameters: &'a [(&'a str, &'a str)],
    /// The URL the TwiML was fetched from (after redirects): relative URLs resolve against it.
    pub base_url: &'a str,
}

/// An app's `<Start><Transcription>`: what it asked for, in Twilio's attribute names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TranscriptionRequest {
    /// The element's attributes, as written.
    pub attributes: Vec<(String, String)>,
}

impl TranscriptionRequest {
    /// An attribute's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The rewritten TwiML and what was found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// What Twilio receives.
    pub twiml: String,
    /// The tracks voxgate forks: `both_tracks`, `inbound_track`, or `None` (no room).
    pub fork: Option<&'static str>,
    /// Tracks the app's own `<Start><Stream>`s take.
    pub app_tracks: u32,
    /// The app runs a bidirectional `<Connect><Stream>` (a voice bot) too.
    pub connect_stream: bool,
    /// `<Start><Transcription>`s taken out, in document order.
    pub transcriptions: Vec<TranscriptionRequest>,
    /// `<Stop><Transcription name=…>`s taken out.
    pub transcription_stops: Vec<String>,
    /// Relative URLs made absolute.
    pub absolutized: u32,
    /// Things Twilio would warn about (code, what): unknown verbs (12200), no room to fork.
    pub warnings: Vec<(u32, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Element { name: String, attrs: Vec<(String, String)>, children: Vec<Node> },
    Text(String),
}

/// TwiML's verbs and nouns (anything else is an unknown verb, Twilio's warning 12200).
const KNOWN: &[&str] = &[
    "Response",
    "Say",
    "Play",
    "Gather",
    "Dial",
    "Record",
    "Redirect",
    "Reject",
    "Hangup",
    "Pause",
    "Enqueue",
    "Leave",
    "Connect",
    "Start",
    "Stop",
    "Pay",
    "Prompt",
    "Refer",
    "Sms",
    "Message",
    "Echo",
    "Queue",
    "Number",
    "Client",
    "Conference",
    "Sip",
    "Sim",
    "Stream",
    "Siprec",
    "Transcription",
    "Parameter",
    "Config",
    "VirtualAgent",
    "Autopilot",
    "Room",
    "Application",
    "Identity",
    "ConversationRelay",
    "Language",
    "Assistant",
    "AiSession",
    "Lang",
    "Prosody",
    "Break",
    "Emphasis",
    "P",
    "S",
    "Phoneme",
    "Sub",
    "W",
    "Amazon-effect",
    "Amazon-domain",
    "Say-as",
    "Voice",
    "ReferSip",
    "Task",
    "Body",
    "Media",
    "ApplicationSid",
    "Conversation",
];

/// Attributes that hold a URL Twilio requests (resolved against the document's URL).
fn is_url_attribute(name: &str) -> bool {
    matches!(name, "action" | "url") || name.ends_with("Callback") || name.ends_with("Url")
}

/// Parses, checks and rewrites an app's TwiML.
pub fn rewrite(xml: &str, fork: &Fork<'_>) -> Result<Rewritten, TwimlError> {
    if xml.len() > MAX_TWIML_BYTES {
        return Err(TwimlError::TooLarge(xml.len()));
    }
    let root = parse(xml)?;
    let Node::Element { name, attrs, children } = root else {
        return Err(TwimlError::NotXml("no root element".into()));
    };
    if name != "Response" {
        return Err(TwimlError::NotResponse(name));
    }
    let mut out = Rewritten {
        twiml: String::new(),
        fork: None,
        app_tracks: 0,
        connect_stream: false,
        transcriptions: Vec::new(),
        transcription_stops: Vec::new(),
        absolutized: 0,
        warnings: Vec::new(),
    };
    // What the app streams itself.
    for verb in &children {
        let Node::Element { name, children: inner, .. } = verb else { continue };
        for noun in inner {
            let Node::Element { name: n, attrs: a, .. } = noun else { continue };
            if n == "Stream" && name == "Start" {
                out.app_tracks += match attr(a, "track") {
                    Some("both_tracks") => 2,
                    _ => 1,
                };
            }
            if n == "Stream" && name == "Connect" {
                out.connect_stream = true;
            }
        }
    }
    let room = MAX_TRACKS.saturating_sub(out.app_tracks);
    out.fork = match room {
        0 => None,
        1 => Some("inbound_track"),
        _ => Some("both_tracks"),
    };
    match out.fork {
        None => out.warnings.push((
            31941,
            format!(
                "the app streams {} tracks itself (Twilio allows {MAX_TRACKS}): voxgate cannot fork the call",
                out.app_tracks
            ),
        )),
        Some("inbound_track") => out.warnings.push((
            31941,
            format!("the app streams {} tracks itself: voxgate forks the caller's track only", out.app_tracks),
        )),
        _ => {}
    }
    let mut kept = Vec::with_capacity(children.len() + 1);
    if let Some(track) = out.fork {
        let mut params: Vec<Node> =
            fork.parameters.iter().map(|(n, v)| element("Parameter", &[("name", n), ("value", v)], vec![])).collect();
        params.shrink_to_fit();
        let stream = element("Stream", &[("url", fork.stream_url), ("track", track)], params);
        kept.push(element("Start", &[], vec![stream]));
    }
    for verb in children {
        match verb {
            Node::Element { name, attrs, children } if name == "Start" || name == "Stop" => {
                let mut rest = Vec::new();
                for noun in children {
                    match noun {
                        Node::Element { name: n, attrs: a, .. } if n == "Transcription" && name == "Start" => {
                            out.transcriptions.push(TranscriptionRequest { attributes: a });
                        }
                        Node::Element { name: n, attrs: a, .. } if n == "Transcription" && name == "Stop" => {
                            out.transcription_stops.push(attr(&a, "name").unwrap_or_default().to_owned());
                        }
                        other => rest.push(other),
                    }
                }
                // A <Start> or <Stop> left with nothing in it goes too.
                if rest.iter().any(|n| matches!(n, Node::Element { .. })) {
                    kept.push(Node::Element { name, attrs, children: rest });
                }
            }
            other => kept.push(other),
        }
    }
    let mut body = Node::Element { name: "Response".into(), attrs, children: kept };
    absolutize(&mut body, fork.base_url, &mut out.absolutized, &mut out.warnings, 0);
    out.twiml = String::with_capacity(xml.len() + 256);
    out.twiml.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    write(&body, &mut out.twiml);
    Ok(out)
}

fn element(name: &str, attrs: &[(&str, &str)], children: Vec<Node>) -> Node {
    Node::Element {
        name: name.to_owned(),
        attrs: attrs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        children,
    }
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Resolves relative URLs (attributes Twilio requests, `<Redirect>` and `<Play>` bodies) and
/// notes unknown verbs.
fn absolutize(node: &mut Node, base: &str, count: &mut u32, warnings: &mut Vec<(u32, String)>, depth: usize) {
    let Node::Element { name, attrs, children } = node else { return };
    if !KNOWN.contains(&name.as_str()) && !warnings.iter().any(|(c, w)| *c == 12200 && w.contains(name.as_str())) {
        warnings.push((12200, format!("unknown TwiML element <{name}>")));
    }
    let is_stream = name == "Stream";
    for (k, v) in attrs.iter_mut() {
        // A stream's URL is wss and Twilio's to resolve; everything else Twilio fetches over HTTP.
        if is_url_attribute(k) && !is_stream {
            if let Some(abs) = resolve(base, v) {
                *v = abs;
                *count += 1;
            }
        }
    }
    let body_is_url = name == "Redirect" || name == "Play";
    for c in children.iter_mut() {
        match c {
            Node::Text(t) if body_is_url => {
                let trimmed = t.trim();
                if let Some(abs) = resolve(base, trimmed) {
                    *t = abs;
                    *count += 1;
                }
            }
            Node::Element { .. } if depth < 32 => absolutize(c, base, count, warnings, depth + 1),
            _ => {}
        }
    }
}

/// `value` resolved against `base` when it is a relative URL; `None` when it is absolute (or
/// empty, or not a URL at all).
pub fn resolve(base: &str, value: &str) -> Option<String> {
    let v = value.trim();
    if v.is_empty() || v.contains("://") || v.starts_with("data:") || v.starts_with("tel:") || v.starts_with("sip:") {
        return None;
    }
    let base = url::Url::parse(base).ok()?;
    base.join(v).ok().map(|u| u.to_string())
}

/// Reads the document into a tree (comments, declarations and processing instructions dropped).
fn parse(xml: &str) -> Result<Node, TwimlError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(false);
    let bad = |e: &dyn std::fmt::Display| TwimlError::NotXml(e.to_string());
    // The stack of open elements; the root ends up alone in `done`.
    let mut stack: Vec<Node> = Vec::new();
    let mut done: Option<Node> = None;
    let push_text = |stack: &mut Vec<Node>, s: &str| {
        if let Some(Node::Element { children, .. }) = stack.last_mut() {
            if let Some(Node::Text(t)) = children.last_mut() {
                t.push_str(s);
            } else {
                children.push(Node::Text(s.to_owned()));
            }
        }
    };
    loop {
        let ev = reader.read_event().map_err(|e| bad(&e))?;
        match ev {
            Xml::Start(e) | Xml::Empty(e) if done.is_some() => {
                return Err(TwimlError::NotXml(format!(
                    "a second root element <{}>",
                    String::from_utf8_lossy(e.name().as_ref())
                )));
            }
            Xml::Start(e) => {
                stack.push(start_node(&e)?);
                if stack.len() > 64 {
                    return Err(TwimlError::NotXml("elements nested deeper than 64".into()));
                }
            }
            Xml::Empty(e) => {
                let node = start_node(&e)?;
                match stack.last_mut() {
                    Some(Node::Element { children, .. }) => children.push(node),
                    _ => done = Some(node),
                }
            }
            Xml::End(_) => {
                let node = stack.pop().ok_or_else(|| TwimlError::NotXml("an end tag without a start".into()))?;
                match stack.last_mut() {
                    Some(Node::Element { children, .. }) => children.push(node),
                    _ => done = Some(node),
                }
            }
            Xml::Text(t) => {
                let s = t.decode().map_err(|e| bad(&e))?;
                if stack.is_empty() {
                    if !s.trim().is_empty() {
                        return Err(TwimlError::NotXml("text outside the root element".into()));
                    }
                } else {
                    push_text(&mut stack, &s);
                }
            }
            Xml::CData(c) => {
                let s = c.decode().map_err(|e| bad(&e))?;
                push_text(&mut stack, &s);
            }
            Xml::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| bad(&e))? {
                    Some(c) => c.to_string(),
                    None => match r.decode().map_err(|e| bad(&e))?.as_ref() {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "quot" => "\"".into(),
                        "apos" => "'".into(),
                        other => return Err(TwimlError::NotXml(format!("unknown entity &{other};"))),
                    },
                };
                push_text(&mut stack, &resolved);
            }
            Xml::Comment(_) | Xml::Decl(_) | Xml::PI(_) | Xml::DocType(_) => {}
            Xml::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(TwimlError::NotXml("the document ends inside an element".into()));
    }
    done.ok_or_else(|| TwimlError::NotXml("no root element".into()))
}

fn start_node(e: &quick_xml::events::BytesStart<'_>) -> Result<Node, TwimlError> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| TwimlError::NotXml(e.to_string()))?;
        let v = a.unescape_value().map_err(|e| TwimlError::NotXml(e.to_string()))?;
        attrs.push((String::from_utf8_lossy(a.key.as_ref()).into_owned(), v.into_owned()));
    }
    Ok(Node::Element { name, attrs, children: Vec::new() })
}

fn write(node: &Node, out: &mut String) {
    match node {
        Node::Text(t) => escape(t, false, out),
        Node::Element { name, attrs, children } => {
            out.push('<');
            out.push_str(name);
            for (k, v) in attrs {
                out.push(' ');
                out.push_str(k);
                out.push_str("=\"");
                escape(v, true, out);
                out.push('"');
            }
            if children.is_empty() {
                out.push_str(" />");
                return;
            }
            out.push('>');
            for c in children {
                write(c, out);
            }
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
    }
}

fn escape(s: &str, attribute: bool, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://app.example.com/ivr/voice?lang=en";

    fn fork() -> Fork<'static> {
        Fork {
            stream_url: "wss://voxgate.example.com/api/voice/twilio/stream/CA1",
            parameters: &[("tenant", "AC1"), ("call_sid", "CA1")],
            base_url: BASE,
        }
    }

    #[test]
    fn the_fork_goes_first_and_the_apps_verbs_run_as_written() {
        let app = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response>
  <Say voice="alice">Welcome &amp; thanks for calling.</Say>
  <Gather action="/ivr/menu" numDigits="1" input="dtmf speech"><Say>Press 1 for sales.</Say></Gather>
  <Redirect method="POST">next?step=2&amp;x=1</Redirect>
</Response>"#;
        let r = rewrite(app, &fork()).unwrap();
        assert_eq!(r.fork, Some("both_tracks"));
        assert!(r.twiml.starts_with(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Start><Stream url=\"wss://voxgate.example.com/api/voice/twilio/stream/CA1\" track=\"both_tracks\"><Parameter name=\"tenant\" value=\"AC1\" /><Parameter name=\"call_sid\" value=\"CA1\" /></Stream></Start>"
        ), "{}", r.twiml);
        assert!(r.twiml.contains("<Say voice=\"alice\">Welcome &amp; thanks for calling.</Say>"), "{}", r.twiml);
        // Relative URLs now point at the app, not at voxgate (where Twilio would resolve them).
        assert!(r.twiml.contains("action=\"https://app.example.com/ivr/menu\""), "{}", r.twiml);
        assert!(r.twiml.contains(">https://app.example.com/ivr/next?step=2&amp;x=1</Redirect>"), "{}", r.twiml);
        assert_eq!(r.absolutized, 2);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // What we wrote parses again, to the same.
        let again = rewrite(&r.twiml, &Fork { parameters: &[], ..fork() }).unwrap();
        assert_eq!(again.app_tracks, 2, "our own fork counts as the app's the second time");
    }

    #[test]
    fn transcriptions_are_taken_out_and_reported() {
        let app = r#"<Response><Start><Transcription statusCallbackUrl="/rt" track="both_tracks" partialResults="true" name="t1"><Config name="x" value="y"/></Transcription></Start><Start><Stream url="wss://app.example.com/bot" /><Transcription name="t2"/></Start><Dial>+14155550100</Dial><Stop><Transcription name="t1"/></Stop></Response>"#;
        let r = rewrite(app, &fork()).unwrap();
        assert_eq!(r.transcriptions.len(), 2);
        assert_eq!(r.transcriptions[0].get("partialResults"), Some("true"));
        assert_eq!(r.transcriptions[0].get("name"), Some("t1"));
        assert_eq!(r.transcription_stops, vec!["t1"]);
        assert!(!r.twiml.contains("Transcription"), "{}", r.twiml);
        // The app's own stream stays (one track of four), and its <Start> with it.
        assert_eq!(r.app_tracks, 1);
        assert_eq!(r.fork, Some("both_tracks"));
        assert!(r.twiml.contains("<Start><Stream url=\"wss://app.example.com/bot\" /></Start>"), "{}", r.twiml);
        assert!(!r.twiml.contains("<Stop"), "an emptied <Stop> goes: {}", r.twiml);
        // The transcription's callback URL is the app's to keep (voxgate calls it).
        assert_eq!(r.transcriptions[0].get("statusCallbackUrl"), Some("/rt"));
    }

    #[test]
    fn twilios_track_limit_is_kept() {
        let three = r#"<Response><Start><Stream url="wss://a/1" track="both_tracks"/><Stream url="wss://a/2"/></Start><Say>hi</Say></Response>"#;
        let r = rewrite(three, &fork()).unwrap();
        assert_eq!((r.app_tracks, r.fork), (3, Some("inbound_track")));
        assert!(r.twiml.contains("track=\"inbound_track\""));
        assert_eq!(r.warnings[0].0, 31941);
        let four = r#"<Response><Start><Stream url="wss://a/1" track="both_tracks"/><Stream url="wss://a/2" track="both_tracks"/></Start></Response>"#;
        let r = rewrite(four, &fork()).unwrap();
        assert_eq!(r.fork, None);
        assert!(!r.twiml.contains("voxgate.example.com"));
        // A voice bot's bidirectional stream is noted; the fork goes beside it.
        let bot = r#"<Response><Connect><Stream url="wss://bot.example.com/s"/></Connect></Response>"#;
        let r = rewrite(bot, &fork()).unwrap();
        assert!(r.connect_stream);
        assert_eq!(r.fork, Some("both_tracks"));
    }

    #[test]
    fn what_is_not_twiml_is_refused_with_twilios_codes() {
        assert_eq!(rewrite("hello", &fork()).unwrap_err().code(), 12100);
        assert_eq!(rewrite("<Response><Say>", &fork()).unwrap_err().code(), 12100);
        assert_eq!(rewrite("<Response></Say></Response>", &fork()).unwrap_err().code(), 12100);
        assert_eq!(rewrite("<Responses/>", &fork()).unwrap_err().code(), 12102);
        assert_eq!(rewrite("<Response/><Response/>", &fork()).unwrap_err().code(), 12100);
        assert_eq!(rewrite(&"x".repeat(70_000), &fork()).unwrap_err().code(), 11750);
        // Unknown verbs pass, with Twilio's warning.
        let r = rewrite("<Response><Sayy>hi</Sayy></Response>", &fork()).unwrap();
        assert_eq!(r.warnings, vec![(12200, "unknown TwiML element <Sayy>".to_owned())]);
        // An empty answer is a valid (empty) response.
        let r = rewrite("<Response/>", &fork()).unwrap();
        assert!(r.twiml.ends_with("</Start></Response>"), "{}", r.twiml);
    }

    #[test]
    fn urls_resolve_like_a_browser() {
        assert_eq!(resolve(BASE, "/x").as_deref(), Some("https://app.example.com/x"));
        assert_eq!(resolve(BASE, "x").as_deref(), Some("https://app.example.com/ivr/x"));
        assert_eq!(resolve(BASE, "?a=1").as_deref(), Some("https://app.example.com/ivr/voice?a=1"));
        assert_eq!(resolve(BASE, "https://other/x"), None);
        assert_eq!(resolve(BASE, ""), None);
    }
}
