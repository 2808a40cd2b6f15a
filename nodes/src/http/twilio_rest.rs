//! Twilio's REST API, as far as voxgate calls it: updating a live call
//! (`POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`) to complete it, or to give it fresh TwiML
//! that attaches a new Media Stream after the old one dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use voxgate_actors::call::{CallControl, ControlError};
use voxgate_protocol::{AccountSid, CallSid};

use crate::stages::tenancy::Tenancy;

/// Attempts per request (with exponential backoff from 200 ms).
const ATTEMPTS: u32 = 3;

/// A client of Twilio's REST API (config `twilio_api_url`; a fake Twilio in tests).
#[derive(Clone)]
pub struct TwilioRest {
    base: String,
    http: reqwest::Client,
}

impl TwilioRest {
    /// `base` is e.g. `https://api.twilio.com`.
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Self { base: base.trim_end_matches('/').to_owned(), http }
    }

    /// Ends the call: `Status=completed`. A 404 (the call is already over) counts as done.
    pub async fn complete_call(
        &self,
        tenancy: &Tenancy,
        tenant: AccountSid,
        call: CallSid,
    ) -> Result<u16, ControlError> {
        self.update_call(tenancy, tenant, call, &[("Status", "completed")], "ending", true).await
    }

    /// Gives the live call new instructions: `Twiml=…` (a fresh `<Connect><Stream>`). A request
    /// that timed out is not sent again: Twilio may have applied it, and a second redirect would
    /// tear down the stream the first one attached.
    pub async fn redirect_call(
        &self,
        tenancy: &Tenancy,
        tenant: AccountSid,
        call: CallSid,
        twiml: &str,
    ) -> Result<u16, ControlError> {
        self.update_call(tenancy, tenant, call, &[("Twiml", twiml)], "updating", false).await
    }

    /// `POST …/Calls/{CA}.json` with `form`, as the tenant, retried on 5xx, 429 and transport
    /// errors (timeouts too only if `idempotent`). Returns the final HTTP status.
    async fn update_call(
        &self,
        tenancy: &Tenancy,
        tenant: AccountSid,
        call: CallSid,
        form: &[(&str, &str)],
        what: &str,
        idempotent: bool,
    ) -> Result<u16, ControlError> {
        let token = tenancy.token(tenant).ok_or_else(|| ControlError::NotSent(format!("unknown tenant {tenant}")))?;
        let url = format!("{}/2010-04-01/Accounts/{tenant}/Calls/{call}.json", self.base);
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let r = self
                .http
                .post(&url)
                .basic_auth(tenant.to_string(), Some(token.expose()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.clone())
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() || resp.status().as_u16() == 404 => {
                    metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "ok").increment(1);
                    return Ok(resp.status().as_u16());
                }
                Ok(resp) if resp.status().is_client_error() && resp.status().as_u16() != 429 => {
                    metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "refused").increment(1);
                    return Err(ControlError::Refused(resp.status().as_u16()));
                }
                Ok(resp) => last = format!("HTTP {}", resp.status()),
                Err(e) if e.is_timeout() && !idempotent => {
                    metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "failed").increment(1);
                    return Err(ControlError::Unanswered(format!("{what} {call} timed out; not sent again: {e}")));
                }
                Err(e) => last = e.to_string(),
            }
            metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "retry").increment(1);
            tracing::warn!(stage = "twilio", call_sid = %call, tenant = %tenant, attempt, error = %last, "{what} the call at Twilio failed; retrying");
            if attempt < ATTEMPTS {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
        metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "failed").increment(1);
        Err(ControlError::Unanswered(format!("{what} {call} failed after {ATTEMPTS} attempts: {last}")))
    }
}

/// What call actors ask of Twilio on this node: a dropped stream re-attached with the same
/// `<Connect><Stream>` answer the call's webhook got.
pub struct Control {
    pub twilio: TwilioRest,
    pub tenancy: Arc<Tenancy>,
    /// The node's public URL (config `public_url`), for the stream's `wss://` address.
    pub public_url: String,
}

impl CallControl for Control {
    fn reattach_stream(
        &self,
        tenant: AccountSid,
        call: CallSid,
    ) -> Pin<Box<dyn Future<Output = Result<u16, ControlError>> + Send>> {
        let twiml = crate::http::stream::answer(&self.public_url, tenant, call);
        let (twilio, tenancy) = (self.twilio.clone(), self.tenancy.clone());
        Box::pin(async move {
            let twiml = twiml.map_err(|e| ControlError::NotSent(e.to_string()))?;
            twilio.redirect_call(&tenancy, tenant, call, &twiml).await
        })
    }
}
