//! The main listener's connections, with deadlines on everything a client can hold open: the
//! request header (hyper's timer, from the moment the connection is accepted), the request body,
//! an idle keep-alive connection, and the TLS handshake; and a cap on open connections (Media
//! Streams included, until their socket closes). A client that stalls is closed at its deadline;
//! one over the cap is closed at once and counted.
//!
//! HTTP/1.1 only (Twilio's webhooks and Media Streams are HTTP/1.1), plain or TLS (rustls).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// `[http]`: the main listener's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFile {
    /// The whole request header must arrive within this (and the TLS handshake before it).
    pub header_read_timeout_ms: u64,
    /// The whole request body must arrive within this once the header has.
    pub body_timeout_ms: u64,
    /// A keep-alive connection with no request and no traffic for this long is closed.
    pub idle_timeout_secs: u64,
    /// Open connections at most (WebSockets included); more are closed at once.
    pub max_connections: usize,
    /// A Media Stream that sends nothing for this long is closed (Twilio sends a frame every 20 ms).
    pub stream_idle_secs: u64,
}

impl Default for HttpFile {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            idle_timeout_secs: 60,
            max_connections: 10_000,
            stream_idle_secs: 10,
        }
    }
}

impl HttpFile {
    pub fn validate(&self) -> Result<(), voxgate_actors::InvalidSetting> {
        if !(100..=600_000).contains(&self.header_read_timeout_ms) {
            return Err(voxgate_actors::InvalidSetting::new(
                "header_read_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(100..=600_000).contains(&self.body_timeout_ms) {
            return Err(voxgate_actors::InvalidSetting::new("body_timeout_ms", "must be between 100 and 600000"));
        }
        if !(1..=86_400).contains(&self.idle_timeout_secs) {
            return Err(voxgate_actors::InvalidSetting::new("idle_timeout_secs", "must be between 1 and 86400"));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(voxgate_actors::InvalidSetting::new("max_connections", "must be between 1 and 1000000"));
        }
        if !(1..=3600).contains(&self.stream_idle_secs) {
            return Err(voxgate_actors::InvalidSetting::new("stream_idle_secs", "must be between 1 and 3600"));
        }
        Ok(())
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn stream_idle(&self) -> Duration {
        Duration::from_secs(self.stream_idle_secs)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("TLS private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// A rustls server configuration from PEM files.
pub fn tls_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    // One crypto provider for the process (ring); a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ServeError::Certificate { path: cert_file.display().to_string(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(ServeError::Certificate {
            path: cert_file.display().to_string(),
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| ServeError::Key { path: key_file.display().to_string(), reason: e.to_string() })?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Middleware: reads the whole request body within the body timeout (and the size limit) before
/// the handler runs, so no handler waits on a client that trickles its body.
pub async fn read_body(
    axum::extract::State(limits): axum::extract::State<(Duration, usize)>,
    req: Request,
    next: Next,
) -> Response {
    let (timeout, max) = limits;
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) => {
            // axum wraps http-body-util's LengthLimitError ("length limit exceeded").
            let mut too_big = false;
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                too_big |= c.to_string().contains("length limit exceeded");
                cause = c.source();
            }
            if too_big {
                metrics::counter!("voxgate_http_refused_total", "reason" => "body_too_large").increment(1);
                crate::http::twilio_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    20413,
                    format!("request body larger than {max} bytes"),
                )
            } else {
                metrics::counter!("voxgate_http_refused_total", "reason" => "body_error").increment(1);
                crate::http::twilio_error(StatusCode::BAD_REQUEST, 20400, format!("request body unreadable: {e}"))
            }
        }
        Err(_) => {
            metrics::counter!("voxgate_http_refused_total", "reason" => "body_timeout").increment(1);
            let mut r = crate::http::twilio_error(
                StatusCode::REQUEST_TIMEOUT,
                20408,
                format!("request body not received within {} ms", timeout.as_millis()),
            );
            r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            r
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets requests in
/// flight finish (up to `drain`), and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: HttpFile,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let refused = metrics::counter!("voxgate_http_refused_total", "reason" => "max_connections");
    let gauge = metrics::gauge!("voxgate_http_connections");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait a moment.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.increment(1);
            if let Some(suppressed) = CAP_LINES.admit() {
                tracing::warn!(client = %peer, max = limits.max_connections, suppressed, "connection refused: the node holds its maximum of open connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            app: app.clone(),
            peer,
            limits,
            stop: stop_rx.clone(),
            open: open.clone(),
            gauge: gauge.clone(),
        };
        let acceptor = acceptor.clone();
        tokio::spawn(conn.run(stream, acceptor, permit));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let until = Instant::now() + drain;
    while open.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static CAP_LINES: crate::http::perimeter::LineLimit = crate::http::perimeter::LineLimit::per_second();
static TIMEOUT_LINES: crate::http::perimeter::LineLimit = crate::http::perimeter::LineLimit::per_second();

/// One accepted connection.
struct Connection {
    app: Router,
    peer: SocketAddr,
    limits: HttpFile,
    stop: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl Connection {
    async fn run(
        mut self,
        stream: TcpStream,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        permit: OwnedSemaphorePermit,
    ) {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.gauge.increment(1.0);
        let activity = Arc::new(Activity::new());
        // The permit (and the gauge) go with the socket: an upgraded WebSocket keeps its place
        // until it closes.
        let held = Held { _permit: permit, gauge: self.gauge.clone() };
        match acceptor {
            None => self.serve(Tracked { io: stream, activity: activity.clone(), _held: held }, activity).await,
            Some(acc) => match tokio::time::timeout(self.limits.header_read_timeout(), acc.accept(stream)).await {
                Ok(Ok(tls)) => self.serve(Tracked { io: tls, activity: activity.clone(), _held: held }, activity).await,
                Ok(Err(e)) => {
                    metrics::counter!("voxgate_http_refused_total", "reason" => "tls_handshake").increment(1);
                    tracing::debug!(client = %self.peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("voxgate_http_timeouts_total", "phase" => "tls_handshake").increment(1);
                }
            },
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    async fn serve<I>(&mut self, io: Tracked<I>, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = ConnService { app: self.app.clone(), peer: self.peer, activity: activity.clone() };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.limits.header_read_timeout()).keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        let idle = self.limits.idle_timeout();
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut closing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        if e.is_timeout() {
                            metrics::counter!("voxgate_http_timeouts_total", "phase" => "header").increment(1);
                            if let Some(suppressed) = TIMEOUT_LINES.admit() {
                                tracing::info!(client = %self.peer, suppressed, "connection closed: request header not received in time");
                            }
                        }
                    }
                    return;
                }
                _ = self.stop.changed(), if closing_since.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
                _ = tokio::time::sleep(tick) => {
                    if let Some(since) = closing_since {
                        // A client that will not take its last response is dropped.
                        if since.elapsed() > idle {
                            return;
                        }
                        continue;
                    }
                    if activity.idle_for() > idle {
                        let phase = if activity.in_flight() > 0 { "response" } else { "idle" };
                        metrics::counter!("voxgate_http_timeouts_total", "phase" => phase).increment(1);
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// What a connection holds for its whole life, released when its socket is dropped.
struct Held {
    _permit: OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// When the connection last moved bytes, and how many requests are being handled on it.
struct Activity {
    born: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self { born: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since bytes last moved, or zero while a handler works on a request.
    fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The socket, noting each read and write in its connection's [`Activity`].
struct Tracked<I> {
    io: I,
    activity: Arc<Activity>,
    _held: Held,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The router for one connection: adds the peer address and counts the request in flight until
/// its response head is ready.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(self.activity.clone());
        let app = self.app.clone();
        Box::pin(async move {
            let r = app.oneshot(req.map(Body::new)).await;
            drop(guard);
            r.map_err(|e| match e {})
        })
    }
}
