//! An HTTP endpoint outside voxgate that records every request it is sent: a fake Twilio REST API
//! (voxgate ends calls through it) or a customer's usage-trigger callback URL. It can be told to
//! fail the first requests, to exercise retries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Router;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub signature: Option<String>,
    /// The `Authorization` header (the REST API's basic auth).
    pub authorization: Option<String>,
    pub body: String,
    pub at: Instant,
}

impl Request {
    /// The form body (or, for GET, the query) as pairs.
    pub fn params(&self) -> Vec<(String, String)> {
        let raw = if self.method == "GET" { self.uri.split_once('?').map_or("", |(_, q)| q) } else { &self.body };
        form_urlencoded::parse(raw.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }

    pub fn param(&self, name: &str) -> Option<String> {
        self.params().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

#[derive(Default)]
struct Inner {
    seen: Mutex<Vec<Request>>,
    /// Requests still to answer with 500.
    fail_next: AtomicU32,
}

/// A recording HTTP server on a free loopback port.
#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    inner: Arc<Inner>,
}

async fn record(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let req = Request {
        method: method.to_string(),
        uri: uri.to_string(),
        signature: headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).map(str::to_owned),
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    inner.seen.lock().unwrap_or_else(|e| e.into_inner()).push(req);
    let failing = inner.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    if failing {
        (StatusCode::INTERNAL_SERVER_ERROR, "{\"message\":\"try again\"}")
    } else {
        (StatusCode::OK, "{}")
    }
}

impl Recorder {
    /// Starts the server; the first `fail_first` requests are answered 500.
    pub async fn start(fail_first: u32) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner { seen: Mutex::default(), fail_next: AtomicU32::new(fail_first) });
        let app = Router::new().fallback(record).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url: format!("http://{addr}"), inner })
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `n` requests matched `pred`; returns them (or what there was after `within`).
    pub async fn wait_for(&self, n: usize, within: Duration, pred: impl Fn(&Request) -> bool) -> Vec<Request> {
        let deadline = Instant::now() + within;
        loop {
            let got: Vec<Request> = self.requests().into_iter().filter(|r| pred(r)).collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
