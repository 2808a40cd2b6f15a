//! A customer's Twilio app, outside voxgate (gateway scenarios): an IVR that `<Say>`s, `<Gather>`s
//! and `<Dial>`s an agent, and asks for Twilio's real-time transcription. It checks
//! `X-Twilio-Signature` on every request exactly as the official helper libraries'
//! `RequestValidator` does (the URL it was reached at, the sorted form parameters, the tenant's
//! auth token) and records what it was sent. Its behaviour can be switched to misbehave: slow,
//! 500, not XML, unknown verbs, a redirect, its own streams.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use voxgate_protocol::twilio::{signature, SignedBody};

/// How the app answers its voice URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// The IVR.
    Ivr,
    /// Waits this long, then answers like the IVR.
    Slow(Duration),
    /// HTTP 500.
    Error,
    /// Text that is not XML.
    NotXml,
    /// TwiML with a verb Twilio does not know.
    UnknownVerb,
    /// 302 to `/ivr/voice` (relative Location).
    Redirect,
    /// Streams three tracks itself (one track left for voxgate).
    OwnStreams,
    /// A voice bot: `<Connect><Stream>`.
    VoiceBot,
    /// The IVR, cacheable for a minute (`Cache-Control: public, max-age=60` and an ETag).
    Cacheable,
    /// The IVR, its `<Transcription>` with these `hints`.
    Hints(String),
}

/// One request the app received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub method: String,
    pub params: Vec<(String, String)>,
    /// Whether `X-Twilio-Signature` validated (against the URL the app was reached at).
    pub signature_valid: bool,
    pub idempotency: Option<String>,
    pub at: Instant,
}

impl Hit {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Inner {
    token: String,
    base: String,
    behaviour: Mutex<Behaviour>,
    hits: Mutex<Vec<Hit>>,
}

/// The app, on a free loopback port.
#[derive(Clone)]
pub struct CustomerApp {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    inner: Arc<Inner>,
}

/// The IVR's first answer: welcome, a menu, and real-time transcription of both parties.
/// The conversation of a call to the IVR, synthesized: the caller (espeak-ng) asks about an
/// order and thanks the agent; the agent (flite) answers in between.
pub fn conversation(work: &std::path::Path) -> anyhow::Result<(crate::speech::Script, crate::speech::Script)> {
    use crate::speech::{script, Voice};
    let caller = script(
        &[
            ("Hello, I would like to check the status of my order.", Voice::Espeak("en-us".into())),
            ("Thank you very much.", Voice::Espeak("en-us".into())),
        ],
        400,
        4500,
        work,
    )?;
    let agent =
        script(&[("Certainly. Your order was shipped yesterday.", Voice::Flite("slt".into()))], 3400, 2500, work)?;
    Ok((caller, agent))
}

pub fn ivr_twiml() -> String {
    r#"<?xml version="1.0" encoding="UTF-8"?>
<Response>
  <Start><Transcription statusCallbackUrl="/realtime" track="both_tracks" partialResults="false" name="live" inboundTrackLabel="caller" outboundTrackLabel="agent"/></Start>
  <Say voice="alice">Thanks for calling Example &amp; Co.</Say>
  <Gather action="/ivr/menu" numDigits="1" input="dtmf speech" timeout="3"><Say>Press 1 for sales, or stay on the line for an agent.</Say></Gather>
  <Dial action="/ivr/after-dial" timeout="20"><Number>+14155550150</Number></Dial>
</Response>"#
        .to_owned()
}

async fn handle(State(app): State<Arc<Inner>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let (params, signed_url) = if method == Method::GET {
        let q = uri.query().unwrap_or("");
        (
            form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect(),
            format!("{}{}", app.base, uri),
        )
    } else {
        (
            form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect::<Vec<_>>(),
            format!("{}{}", app.base, uri),
        )
    };
    let sig = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    let signed = if method == Method::GET { SignedBody::Empty } else { SignedBody::Form(&params) };
    let signature_valid = signature::validate(app.token.as_bytes(), &signed_url, signed, sig);
    app.hits.lock().unwrap_or_else(|e| e.into_inner()).push(Hit {
        path: path.clone(),
        method: method.to_string(),
        params,
        signature_valid,
        idempotency: headers.get("i-twilio-idempotency-token").and_then(|v| v.to_str().ok()).map(str::to_owned),
        at: Instant::now(),
    });
    if !signature_valid {
        return (StatusCode::FORBIDDEN, "invalid signature").into_response();
    }
    if path != "/voice" && path != "/ivr/voice" {
        return StatusCode::NO_CONTENT.into_response();
    }
    // The fallback URL (`/ivr/voice`) always answers with the IVR; misbehaviour is the voice URL's.
    let behaviour =
        if path == "/voice" { app.behaviour.lock().unwrap_or_else(|e| e.into_inner()).clone() } else { Behaviour::Ivr };
    let xml = |body: String| -> Response {
        ([(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("text/xml"))], body).into_response()
    };
    match behaviour {
        Behaviour::Ivr => xml(ivr_twiml()),
        Behaviour::Hints(h) => {
            let h = h.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
            xml(ivr_twiml().replace("name=\"live\"", &format!("name=\"live\" hints=\"{h}\"")))
        }
        Behaviour::Slow(d) => {
            tokio::time::sleep(d).await;
            xml(ivr_twiml())
        }
        Behaviour::Error => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Behaviour::NotXml => ([(axum::http::header::CONTENT_TYPE, "text/plain")], "hello there").into_response(),
        Behaviour::UnknownVerb => xml("<Response><Sayy>hi</Sayy><Say>hello</Say></Response>".into()),
        Behaviour::Redirect => (StatusCode::FOUND, [(axum::http::header::LOCATION, "/ivr/voice")]).into_response(),
        Behaviour::OwnStreams => xml(
            r#"<Response><Start><Stream url="wss://recorder.example.com/a" track="both_tracks"/><Stream url="wss://recorder.example.com/b"/></Start><Say>recorded</Say></Response>"#.into(),
        ),
        Behaviour::VoiceBot => xml(r#"<Response><Connect><Stream url="wss://bot.example.com/s"/></Connect></Response>"#.into()),
        Behaviour::Cacheable => {
            if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"ivr-1\"") {
                return (StatusCode::NOT_MODIFIED, [(axum::http::header::ETAG, "\"ivr-1\"")]).into_response();
            }
            (
                [
                    (axum::http::header::CONTENT_TYPE, "text/xml"),
                    (axum::http::header::CACHE_CONTROL, "public, max-age=60"),
                    (axum::http::header::ETAG, "\"ivr-1\""),
                ],
                ivr_twiml(),
            )
                .into_response()
        }
    }
}

impl CustomerApp {
    /// Starts the app; it validates signatures with `token` (the tenant's auth token).
    pub async fn start(token: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner {
            token: token.to_owned(),
            base: url.clone(),
            behaviour: Mutex::new(Behaviour::Ivr),
            hits: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, inner })
    }

    pub fn set(&self, b: Behaviour) {
        *self.inner.behaviour.lock().unwrap_or_else(|e| e.into_inner()) = b;
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests to `path`.
    pub fn hits_to(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }

    /// Waits (bounded) until `pred` holds of the requests so far.
    pub async fn wait_until(&self, within: Duration, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + within;
        loop {
            let hits = self.hits();
            if pred(&hits) || Instant::now() > deadline {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
