//! A Twilio stand-in: signs webhooks exactly as Twilio does, answers TwiML by opening the Media
//! Stream it names, streams µ-law in 20 ms frames, and posts status callbacks.

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voxgate_protocol::twilio::{media, signature, Algorithm};
use voxgate_protocol::{AccountSid, CallSid, StreamSid};

/// One simulated Twilio account pointed at a voxgate.
#[derive(Clone)]
pub struct Simulator {
    /// Where requests go, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// The URL Twilio believes it calls (voxgate's `public_url`); signatures cover this.
    pub public_url: String,
    pub account: AccountSid,
    pub auth_token: String,
    http: reqwest::Client,
    /// The calls it rang: From and To, which Twilio repeats in every status callback.
    rung: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<CallSid, (String, String)>>>,
}

/// voxgate's answer to a voice webhook.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// `<Stream url="…">` when the answer connects a stream.
    pub stream_url: Option<String>,
}

/// How fast to send audio.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// One 20 ms frame every 20 ms, as a phone.
    RealTime,
    /// `n` times faster than real time.
    Faster(u32),
}

/// What happened on the stream.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub frames_sent: u64,
    /// Close frame reason from voxgate, if it closed first.
    pub closed_by_server: Option<String>,
}

impl Simulator {
    pub fn new(target: &str, public_url: &str, account: AccountSid, auth_token: &str) -> Self {
        Self {
            target: target.trim_end_matches('/').to_owned(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            account,
            auth_token: auth_token.to_owned(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client"),
            rung: Default::default(),
        }
    }

    /// The tenant this simulator calls as.
    pub fn account(&self) -> AccountSid {
        self.account
    }

    /// Posts a signed form to `path`; returns status and body.
    pub async fn post_signed(&self, path: &str, params: &[(String, String)]) -> anyhow::Result<(u16, String)> {
        let url = signature::public_url(&self.public_url, path);
        let sig = signature::compute(Algorithm::Sha1, self.auth_token.as_bytes(), &url, params);
        self.post_form(path, params, Some(&sig)).await
    }

    /// Posts a form with the given signature header (or none).
    pub async fn post_form(
        &self,
        path: &str,
        params: &[(String, String)],
        sig: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(params.iter()).finish();
        let mut req = self
            .http
            .post(format!("{}{}", self.target, path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(s) = sig {
            req = req.header("x-twilio-signature", s);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// The parameters of an inbound call webhook.
    pub fn inbound_params(&self, call: CallSid, from: &str, to: &str) -> Vec<(String, String)> {
        [
            ("AccountSid", self.account.to_string()),
            ("ApiVersion", "2010-04-01".into()),
            ("CallSid", call.to_string()),
            ("CallStatus", "ringing".into()),
            ("Direction", "inbound".into()),
            ("From", from.into()),
            ("To", to.into()),
            ("Caller", from.into()),
            ("Called", to.into()),
            ("FromCountry", "US".into()),
            ("ToCountry", "US".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Rings voxgate: the inbound voice webhook, signed.
    pub async fn inbound_call(&self, call: CallSid, from: &str, to: &str) -> anyhow::Result<Answer> {
        self.rung.lock().unwrap_or_else(|e| e.into_inner()).insert(call, (from.to_owned(), to.to_owned()));
        let (status, body) =
            self.post_signed("/api/voice/twilio/inbound", &self.inbound_params(call, from, to)).await?;
        let stream_url = extract_attr(&body, "<Stream ", "url");
        Ok(Answer { status, body, stream_url })
    }

    /// A call status callback, signed.
    pub async fn status_callback(
        &self,
        call: CallSid,
        status: &str,
        sequence: u32,
        duration_secs: Option<u32>,
    ) -> anyhow::Result<u16> {
        let mut p: Vec<(String, String)> = vec![
            ("AccountSid".into(), self.account.to_string()),
            ("CallSid".into(), call.to_string()),
            ("CallStatus".into(), status.into()),
            ("CallbackSource".into(), "call-progress-events".into()),
            ("SequenceNumber".into(), sequence.to_string()),
        ];
        if let Some((from, to)) = self.rung.lock().unwrap_or_else(|e| e.into_inner()).get(&call).cloned() {
            p.push(("From".into(), from));
            p.push(("To".into(), to));
        }
        if let Some(d) = duration_secs {
            p.push(("CallDuration".into(), d.to_string()));
            p.push(("Duration".into(), d.div_ceil(60).to_string()));
        }
        Ok(self.post_signed("/api/voice/twilio/status", &p).await?.0)
    }

    /// Opens the Media Stream named in the TwiML (signed like Twilio's upgrade request).
    pub async fn connect_stream(&self, stream_url: &str) -> anyhow::Result<MediaStream> {
        // Twilio signs the wss:// URL it was given; we connect to the local target instead.
        let path = stream_url.split_once("://").and_then(|(_, r)| r.find('/').map(|i| &r[i..])).unwrap_or("/");
        let signed_url = signature::websocket_url(&self.public_url, path);
        let sig = signature::compute(Algorithm::Sha1, self.auth_token.as_bytes(), &signed_url, &[]);
        let connect_url = signature::websocket_url(&self.target, path);
        let mut req = connect_url.as_str().into_client_request()?;
        req.headers_mut().insert("x-twilio-signature", sig.parse()?);
        let (ws, resp) =
            tokio_tungstenite::connect_async(req).await.with_context(|| format!("connecting {connect_url}"))?;
        if resp.status().as_u16() != 101 {
            bail!("upgrade answered {}", resp.status());
        }
        Ok(MediaStream { ws, sequence: 0 })
    }

    /// The whole call as Twilio would make it: webhook, stream with `audio`, stop, completed.
    pub async fn call(
        &self,
        call: CallSid,
        from: &str,
        to: &str,
        audio: &[u8],
        pace: Pace,
    ) -> anyhow::Result<StreamReport> {
        let answer = self.inbound_call(call, from, to).await?;
        let Some(url) = answer.stream_url else {
            bail!("no <Stream> in the answer ({}): {}", answer.status, answer.body)
        };
        let mut stream = self.connect_stream(&url).await?;
        let stream_sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
        stream.start(stream_sid, self.account, call).await?;
        let report = stream.send_audio(stream_sid, audio, pace).await?;
        stream.stop(stream_sid, self.account, call).await?;
        stream.close().await;
        let secs = (audio.len() / 8000) as u32;
        let code = self.status_callback(call, "completed", 2, Some(secs.max(1))).await?;
        if code / 100 != 2 {
            bail!("status callback answered {code}");
        }
        Ok(report)
    }
}

/// An open Media Stream, from Twilio's side.
pub struct MediaStream {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    sequence: u64,
}

impl MediaStream {
    /// What voxgate sent meanwhile, taken without waiting: `Some(reason)` once it closed the
    /// stream. Twilio stops sending media when voxgate closes; until it reads the close, what it
    /// sent is still on the way (and voxgate reads it).
    fn server_closed(&mut self) -> Option<String> {
        while let Some(m) = self.ws.next().now_or_never() {
            match m {
                Some(Ok(Message::Close(f))) => return Some(f.map(|f| f.reason.to_string()).unwrap_or_default()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e.to_string()),
                None => return Some(String::new()),
            }
        }
        None
    }

    /// Sends any text frame (for malformed-input tests).
    pub async fn send_raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// `connected` then `start`.
    pub async fn start(&mut self, stream_sid: StreamSid, account: AccountSid, call: CallSid) -> anyhow::Result<()> {
        self.send_raw(&media::connected_json()).await?;
        self.sequence = 1;
        self.send_raw(&media::start_json(stream_sid, account, call, &[])).await
    }

    /// Sends `audio` as 20 ms `media` messages.
    pub async fn send_audio(
        &mut self,
        stream_sid: StreamSid,
        audio: &[u8],
        pace: Pace,
    ) -> anyhow::Result<StreamReport> {
        let period = match pace {
            Pace::RealTime => Duration::from_millis(20),
            Pace::Faster(n) => Duration::from_micros(20_000 / u64::from(n.max(1))),
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut report = StreamReport::default();
        for (i, frame) in audio.chunks(160).enumerate() {
            tick.tick().await;
            self.sequence += 1;
            let msg = media::inbound_media_json(stream_sid, self.sequence, i as u64 + 1, i as u64 * 20, frame);
            if let Some(reason) = self.server_closed() {
                report.closed_by_server = Some(reason);
                break;
            }
            if let Err(e) = self.ws.send(Message::Text(msg.into())).await {
                report.closed_by_server = Some(e.to_string());
                break;
            }
            report.frames_sent += 1;
        }
        Ok(report)
    }

    /// `connected` then a `start` announcing both tracks (a `<Start><Stream track="both_tracks">`
    /// fork).
    pub async fn start_both(
        &mut self,
        stream_sid: StreamSid,
        account: AccountSid,
        call: CallSid,
    ) -> anyhow::Result<()> {
        self.send_raw(&media::connected_json()).await?;
        self.sequence = 1;
        self.send_raw(&media::start_json_tracks(stream_sid, account, call, &["inbound", "outbound"], &[])).await
    }

    /// Both tracks as Twilio sends a fork: each 20 ms an `inbound` frame (the caller) and an
    /// `outbound` one (the other party), the shorter side padded with µ-law silence.
    pub async fn send_two_tracks(
        &mut self,
        stream_sid: StreamSid,
        inbound: &[u8],
        outbound: &[u8],
        pace: Pace,
    ) -> anyhow::Result<StreamReport> {
        let period = match pace {
            Pace::RealTime => Duration::from_millis(20),
            Pace::Faster(n) => Duration::from_micros(20_000 / u64::from(n.max(1))),
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut report = StreamReport::default();
        let frames = inbound.len().max(outbound.len()).div_ceil(160);
        let silence = [0xFFu8; 160];
        let frame = |audio: &[u8], i: usize| -> Vec<u8> {
            let mut f = audio.get(i * 160..).map(|r| r[..r.len().min(160)].to_vec()).unwrap_or_default();
            f.extend_from_slice(&silence[..160 - f.len()]);
            f
        };
        for i in 0..frames {
            tick.tick().await;
            if let Some(reason) = self.server_closed() {
                report.closed_by_server = Some(reason);
                return Ok(report);
            }
            for (track, audio) in [("inbound", inbound), ("outbound", outbound)] {
                self.sequence += 1;
                let msg = media::track_media_json(
                    stream_sid,
                    track,
                    self.sequence,
                    i as u64 + 1,
                    i as u64 * 20,
                    &frame(audio, i),
                );
                if let Err(e) = self.ws.send(Message::Text(msg.into())).await {
                    report.closed_by_server = Some(e.to_string());
                    return Ok(report);
                }
                report.frames_sent += 1;
            }
        }
        Ok(report)
    }

    /// One 20 ms `media` message: frame `index` of the stream (timestamp `index × 20` ms).
    pub async fn send_frame(&mut self, stream_sid: StreamSid, index: u64, frame: &[u8]) -> anyhow::Result<()> {
        self.sequence += 1;
        let msg = media::inbound_media_json(stream_sid, self.sequence, index + 1, index * 20, frame);
        self.ws.send(Message::Text(msg.into())).await?;
        Ok(())
    }

    /// `stop`.
    pub async fn stop(&mut self, stream_sid: StreamSid, account: AccountSid, call: CallSid) -> anyhow::Result<()> {
        self.sequence += 1;
        self.send_raw(&media::stop_json(stream_sid, self.sequence, account, call)).await
    }

    /// Waits for voxgate to close the socket (or a timeout); returns the close reason.
    pub async fn closed(&mut self, within: Duration) -> Option<String> {
        let r = tokio::time::timeout(within, async {
            while let Some(m) = self.ws.next().await {
                match m {
                    Ok(Message::Close(f)) => return Some(f.map(|f| f.reason.to_string()).unwrap_or_default()),
                    Ok(_) => {}
                    Err(e) => return Some(e.to_string()),
                }
            }
            Some(String::new())
        })
        .await;
        r.ok().flatten()
    }

    /// Closes our side.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.ws.next().await.is_some() {} }).await;
    }
}

/// `attr="…"` of the first element starting with `tag` (XML-unescaped).
pub fn extract_attr(xml: &str, tag: &str, attr: &str) -> Option<String> {
    let start = xml.find(tag)?;
    let rest = &xml[start..];
    let end = rest.find('>')?;
    let el = &rest[..end];
    let key = format!(" {attr}=\"");
    let i = el.find(&key)? + key.len();
    let j = el[i..].find('"')? + i;
    Some(el[i..j].replace("&amp;", "&").replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">"))
}
