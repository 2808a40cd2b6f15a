//! The node's side of billing: the books are built with the config's prices, numbers and budgets,
//! and what billing does to the world is done here ([`Effects`]): budget stops go into the webhook
//! gate and end the account's calls, trigger callbacks are signed as Twilio signs them and sent
//! to the tenants' (public) URLs, and a call's end gives back the quota place an ingress node held
//! for it. The stage itself is `voxgate_actors::billing::stage`.

use std::sync::Arc;
use std::time::Duration;

use voxgate_actors::billing::stage::{BillingEffects, Sending};
use voxgate_actors::billing::{TriggerBook, UsageBook};
use voxgate_protocol::event::UsageTriggerFired;
use voxgate_protocol::twilio::signature::{self, Algorithm};
use voxgate_protocol::{AccountSid, CallSid, Clock, Timestamp};
use voxgate_storage::Log;

pub use voxgate_actors::billing::stage::{Billing, BillingCommandError, BillingFollower, Books};

use crate::config::Config;
use crate::stages::calls::Calls;
use crate::stages::hangup::{end_call, TwilioRest};
use crate::stages::tenancy::Tenancy;

/// Empty books with the configured prices and budgets (config-file numbers are held from now),
/// acting through this node.
pub fn open(
    cfg: &Config,
    log: Log,
    clock: Arc<dyn Clock>,
    tenancy: Arc<Tenancy>,
    twilio: TwilioRest,
    calls: Calls,
) -> anyhow::Result<Billing> {
    let since = clock.now();
    let mut usage = UsageBook::new(cfg.billing.prices.clone()).map_err(|e| anyhow::anyhow!("billing prices: {e}"))?;
    for t in &cfg.tenants {
        for n in &t.numbers {
            usage.hold_number(t.account_sid, n, since);
        }
    }
    let triggers =
        TriggerBook::with_budgets(&cfg.billing.budgets).map_err(|e| anyhow::anyhow!("billing budgets: {e}"))?;
    let policy = cfg.billing.callbacks;
    // Callback URLs are the tenants': public addresses only, unless the operator allows more.
    let http = crate::http::outbound::client(Duration::from_millis(policy.timeout_ms), cfg.allow_private_callbacks)
        .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
    let effects = Arc::new(Effects { tenancy, twilio, calls, http, allow_private: cfg.allow_private_callbacks });
    Ok(Billing::new(usage, triggers, policy, log, clock, effects)?)
}

/// What billing does through this node.
struct Effects {
    tenancy: Arc<Tenancy>,
    twilio: TwilioRest,
    /// Where the calls a spent budget ends run.
    calls: Calls,
    http: reqwest::Client,
    /// `allow_private_callbacks`: callbacks may go to non-public addresses.
    allow_private: bool,
}

impl BillingEffects for Effects {
    fn stop_account(&self, account: AccountSid, until: Timestamp, budget_micros: u64) {
        for (tenant, call) in self.tenancy.stop_for_budget(account, until, budget_micros) {
            let (tenancy, twilio, calls) = (self.tenancy.clone(), self.twilio.clone(), self.calls.clone());
            crate::stages::hangup::count_requested("billing");
            tokio::spawn(async move {
                end_call(call, tenant, "billing", "monthly budget spent", &calls, &tenancy, &twilio).await;
            });
        }
    }

    fn call_ended(&self, call: CallSid) {
        self.calls.ended(call);
    }

    fn tenants(&self) -> Vec<AccountSid> {
        self.tenancy.read(|d| d.tenants().map(|t| t.sid).collect())
    }

    fn label(&self, tenant: AccountSid) -> String {
        self.tenancy.labels.label(tenant)
    }

    /// One callback request, signed as Twilio signs it (HMAC-SHA1 of the URL and the sorted
    /// parameters with the account's auth token).
    fn send_callback(&self, tenant: AccountSid, f: &UsageTriggerFired) -> Sending {
        let Some(token) = self.tenancy.token(tenant) else {
            return Box::pin(async { (None, Some("the account is gone".into())) });
        };
        if let Err(e) = crate::http::outbound::check_at_delivery(&f.callback_url, self.allow_private) {
            metrics::counter!("voxgate_outbound_refused_total", "reason" => "not_public").increment(1);
            return Box::pin(async move { (None, Some(format!("CallbackUrl refused: {e}"))) });
        }
        let key = token.expose().as_bytes();
        let req = if f.callback_method.eq_ignore_ascii_case("GET") {
            let query = form(&f.params);
            let sep = if f.callback_url.contains('?') { '&' } else { '?' };
            let url = format!("{}{sep}{query}", f.callback_url);
            let sig = signature::compute(Algorithm::Sha1, key, &url, &[]);
            self.http.get(url).header("X-Twilio-Signature", sig)
        } else {
            let sig = signature::compute(Algorithm::Sha1, key, &f.callback_url, &f.params);
            self.http
                .post(&f.callback_url)
                .header("X-Twilio-Signature", sig)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&f.params))
        };
        let req = req.header("I-Twilio-Idempotency-Token", &f.idempotency_token);
        Box::pin(async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                Ok(r) => (Some(r.status().as_u16()), Some(format!("HTTP {}", r.status()))),
                Err(e) => (None, Some(e.to_string())),
            }
        })
    }
}

fn form(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}
