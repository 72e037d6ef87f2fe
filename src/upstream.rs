//! The upstream side: HTTP/1.1 keep-alive connections (pooled by [`crate::pool`]), requests
//! bounded by the configured timeouts (connect, response headers, then an idle timeout on the
//! response body), failures turned into EG-style 502/504 answers, and the kernelspecs envgate
//! fetches for itself (cached for `kernelspec_cache_ttl`).
//!
//! envgate has one upstream, so it drives hyper's connection API directly rather than a generic
//! client: no per-host pool key to hash, no URI rewriting per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::body::{ProxyBody, StreamError, Streamed};
use crate::config::{Config, UpstreamUrl};
use crate::pool::{Pool, Sender};
use crate::rewrite::kernelspecs::{self, SpecIndex};
use crate::tls;
use crate::wire;

/// An error from below (hyper, the connector, a body), kept as it is.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the upstream gave no usable answer. Each keeps the error that caused it; messages show
/// it with its causes ([`source_chain`]).
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made within `connect_timeout` (TLS handshake included).
    ConnectTimeout(Duration),
    /// No connection could be made (refused, unreachable, a failed handshake).
    Connect(BoxError),
    /// No response headers within `response_timeout`.
    Timeout,
    /// The connection failed after it was made (reset, garbage, closed early), or the response
    /// body did.
    Failed(BoxError),
    /// The client's request body, streamed upstream, stalled for `body_idle_timeout` or broke
    /// (the client went away): not the upstream's fault. hyper's error for the request, which
    /// has the body's [`StreamError`] among its causes.
    ClientBody(hyper::Error),
}

impl UpstreamError {
    /// The answer envgate gives its client.
    pub fn response(&self) -> Response<ProxyBody> {
        let (status, message) = match self {
            UpstreamError::ConnectTimeout(_) | UpstreamError::Connect(_) => {
                (StatusCode::BAD_GATEWAY, format!("cannot connect to the upstream gateway: {}", self.cause()))
            }
            UpstreamError::Timeout => {
                (StatusCode::GATEWAY_TIMEOUT, "the upstream gateway did not answer in time".to_string())
            }
            UpstreamError::Failed(_) => {
                (StatusCode::BAD_GATEWAY, format!("the upstream gateway failed: {}", self.cause()))
            }
            UpstreamError::ClientBody(_) if self.client_body_idle() => {
                (StatusCode::REQUEST_TIMEOUT, format!("the request body stalled: {}", self.cause()))
            }
            UpstreamError::ClientBody(_) => {
                (StatusCode::BAD_REQUEST, format!("the request body could not be read: {}", self.cause()))
            }
        };
        wire::json_error(status, &message)
    }

    /// A short, bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::ConnectTimeout(_) | UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Failed(_) => "failed",
            UpstreamError::ClientBody(_) => "client_body",
        }
    }

    /// Whether the client's body stalled (rather than broke).
    fn client_body_idle(&self) -> bool {
        match self {
            UpstreamError::ClientBody(e) => matches!(client_body_error(e), Some(StreamError::Idle(_))),
            _ => false,
        }
    }

    /// What went wrong underneath, on one line.
    fn cause(&self) -> String {
        match self {
            UpstreamError::ConnectTimeout(d) => format!("not connected within {d:?}"),
            UpstreamError::Connect(e) | UpstreamError::Failed(e) => source_chain(&**e),
            UpstreamError::Timeout => "timeout".to_string(),
            // The body's own error: hyper's message for the request adds nothing.
            UpstreamError::ClientBody(e) => client_body_error(e).map_or_else(|| source_chain(e), |b| b.to_string()),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::ConnectTimeout(_) | UpstreamError::Connect(_) => write!(f, "connect: {}", self.cause()),
            UpstreamError::Timeout => write!(f, "timeout"),
            UpstreamError::Failed(_) => write!(f, "failed: {}", self.cause()),
            UpstreamError::ClientBody(_) => write!(f, "client body: {}", self.cause()),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// Idle connections kept per pool, and how long one may sit idle.
const MAX_IDLE: usize = 256;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the upstream is, how to connect to it, and the connections kept open to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    pool: Pool,
    /// `scheme://authority/`, what the connector is asked to reach.
    base: Uri,
    /// The `Host` sent when the client sent none (an HTTP/1.0 client, or envgate's own requests).
    host: HeaderValue,
    connect_timeout: Duration,
    pub response_timeout: Duration,
    /// How long a streamed body, either way, may yield nothing (never applied to WebSockets).
    pub body_idle_timeout: Duration,
    /// `Authorization: token ...` for every upstream request, when envgate holds EG's token.
    pub auth: Option<HeaderValue>,
}

impl Upstream {
    /// Builds the client; fails only when the upstream TLS files cannot be loaded.
    pub fn new(cfg: &Config) -> Result<Upstream, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(cfg.upstream.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(&cfg.upstream.tls)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let base = Uri::builder()
            .scheme(cfg.upstream.url.scheme.clone())
            .authority(cfg.upstream.url.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("bad upstream URL: {e}"))?;
        let auth = cfg.upstream.token.as_ref().map(|t| {
            let mut v = HeaderValue::from_str(&format!("token {}", t.0)).expect("validated in config");
            v.set_sensitive(true);
            v
        });
        Ok(Upstream {
            connector,
            pool: Pool::new(MAX_IDLE, IDLE_TIMEOUT),
            host: host_header(&cfg.upstream.url),
            connect_timeout: cfg.upstream.connect_timeout,
            base,
            response_timeout: cfg.upstream.response_timeout,
            body_idle_timeout: cfg.upstream.body_idle_timeout,
            auth,
        })
    }

    /// The request target for a client's raw path and query, which are kept byte for byte
    /// (origin form: the connection already says which host it is).
    pub fn uri(path_and_query: Option<http::uri::PathAndQuery>) -> Uri {
        path_and_query.map_or_else(|| Uri::from_static("/"), Uri::from)
    }

    /// Sends one request, bounded by the response timeout; the response body is bounded by the
    /// body idle timeout.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Streamed>, UpstreamError> {
        match tokio::time::timeout(self.response_timeout, self.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(r) => r.map(|r| r.map(|b| Streamed::new(b, self.body_idle_timeout))),
        }
    }

    /// Sends one request on an idle connection, or on a new one. A request an idle connection
    /// could not even start (the upstream had just closed it) is sent again on another: it never
    /// reached the upstream, so that is safe for any method.
    async fn request(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        // EG compares Host with Origin: the client's own Host is kept.
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        // tornado ends the connection after answering an HTTP/1.0 request but says so only to
        // HTTP/1.1 ones: without this, the closing connection would be pooled.
        if req.version() == http::Version::HTTP_10 {
            req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        loop {
            let (mut tx, reused) = match self.pool.take() {
                Some(tx) => (tx, true),
                None => self.fresh_or_idle().await?,
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    // A 101 hands the connection over to the upgrade.
                    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                        self.pool.give_back(tx);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    // A new connection that closed before it could take the request.
                    Some(_) => return Err(UpstreamError::Connect(e.into_error().into())),
                    None => return Err(send_error(e.into_error())),
                },
            }
        }
    }

    /// A new connection, or an idle one if a request in flight gives one back first. A burst
    /// of requests then shares the connections that are freed meanwhile, and a connect that
    /// stalls (a dropped SYN waits a second for its retransmit) fails nothing; the connect it
    /// raced goes on in the background and its connection joins the pool.
    async fn fresh_or_idle(&self) -> Result<(Sender, bool), UpstreamError> {
        let mut connect = Box::pin(self.connect());
        tokio::select! {
            biased;
            c = &mut connect => c.map(|tx| (tx, false)),
            tx = self.pool.next_idle() => {
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    if let Ok(tx) = connect.await {
                        pool.give_back(tx);
                    }
                });
                Ok((tx, true))
            }
        }
    }

    /// A new connection (TLS included, for an https upstream, all within `connect_timeout`),
    /// driven by its own task.
    fn connect(&self) -> impl std::future::Future<Output = Result<Sender, UpstreamError>> + Send + 'static {
        let mut connector = self.connector.clone();
        let base = self.base.clone();
        let limit = self.connect_timeout;
        async move {
            let io = tokio::time::timeout(limit, tower_service::Service::call(&mut connector, base))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout(limit))?
                .map_err(UpstreamError::Connect)?;
            let (tx, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| UpstreamError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %source_chain(&e), "upstream connection ended with an error");
                }
            });
            Ok(tx)
        }
    }
}

/// `Host` for requests that carry none: the upstream's host, and its port unless the default.
fn host_header(url: &UpstreamUrl) -> HeaderValue {
    let a = &url.authority;
    let default = if url.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 };
    let v = match a.port_u16() {
        Some(p) if p != default => format!("{}:{p}", a.host()),
        _ => a.host().to_string(),
    };
    HeaderValue::from_str(&v).expect("an authority is a valid header value")
}

/// What a failed send means: the client's body broke, or the upstream did.
fn send_error(e: hyper::Error) -> UpstreamError {
    match client_body_error(&e) {
        Some(_) => UpstreamError::ClientBody(e),
        None => UpstreamError::Failed(e.into()),
    }
}

impl Upstream {
    /// Whether the upstream answers `GET path` with a status below 500 within two seconds.
    pub async fn probe(&self, path: &str) -> Result<(), String> {
        let mut req = Request::new(ProxyBody::empty());
        *req.uri_mut() = Self::uri(Some(path.parse().map_err(|_| "bad probe path".to_string())?));
        let resp = tokio::time::timeout(Duration::from_secs(2), self.request(req))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        if resp.status().is_server_error() {
            return Err(format!("status {}", resp.status().as_u16()));
        }
        Ok(())
    }
}

/// The request body's own error, when that is what failed the request.
fn client_body_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e StreamError> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(b) = c.downcast_ref::<StreamError>() {
            return Some(b);
        }
        cur = c.source();
    }
    None
}

/// An error and its causes on one line (hyper's top-level messages alone are vague).
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why envgate could not learn the kernelspecs.
#[derive(Debug)]
pub enum SpecsError {
    /// The upstream answered, but not 200 (401 and 403 are passed on as they are).
    Status(StatusCode, HeaderMap, Bytes),
    Upstream(UpstreamError),
    /// The body was not a kernelspecs list.
    Body(String),
}

impl SpecsError {
    /// One line for logs and the command line.
    pub fn describe(&self) -> String {
        match self {
            SpecsError::Status(s, _, _) => format!("the upstream answered {}", s.as_u16()),
            SpecsError::Upstream(e) => e.to_string(),
            SpecsError::Body(e) => e.clone(),
        }
    }

    /// The answer to the kernel start that needed the kernelspecs.
    pub fn response(self) -> Response<ProxyBody> {
        match self {
            SpecsError::Status(s, headers, body) if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
                let mut r = Response::new(ProxyBody::full(body));
                *r.status_mut() = s;
                if let Some(ct) = headers.get(header::CONTENT_TYPE) {
                    r.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
                }
                r
            }
            SpecsError::Status(s, _, _) => wire::json_error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "cannot learn the kernelspecs from the upstream gateway (status {}); refusing to start a kernel",
                    s.as_u16()
                ),
            ),
            SpecsError::Upstream(e) => wire::json_error(
                e.response().status(),
                &format!("cannot learn the kernelspecs from the upstream gateway ({e}); refusing to start a kernel"),
            ),
            SpecsError::Body(e) => wire::json_error(
                StatusCode::BAD_GATEWAY,
                &format!("the upstream gateway's kernelspecs cannot be read ({e}); refusing to start a kernel"),
            ),
        }
    }
}

struct Cached {
    at: Instant,
    index: Arc<SpecIndex>,
}

/// The kernelspecs the policy needs, fetched from the upstream at most once per TTL.
pub struct SpecCache {
    current: ArcSwapOption<Cached>,
    refresh: tokio::sync::Mutex<()>,
    ttl: Duration,
}

impl SpecCache {
    pub fn new(ttl: Duration) -> SpecCache {
        SpecCache { current: ArcSwapOption::empty(), refresh: tokio::sync::Mutex::new(()), ttl }
    }

    fn fresh(&self) -> Option<Arc<SpecIndex>> {
        let cur = self.current.load();
        cur.as_ref().filter(|c| c.at.elapsed() < self.ttl).map(|c| c.index.clone())
    }

    /// The kernelspecs, fetched with the client's own credentials (`headers()`, and `token`, the
    /// `token=...` pair of its query, if any) when the cache is stale. One fetch at a time. The
    /// rest of the client's query is never sent: `?user=` would filter the list for everyone.
    pub async fn get(
        &self,
        upstream: &Upstream,
        kernelspecs_path: &str,
        token: Option<&str>,
        headers: impl FnOnce() -> HeaderMap,
    ) -> Result<Arc<SpecIndex>, SpecsError> {
        if let Some(i) = self.fresh() {
            return Ok(i);
        }
        let _one = self.refresh.lock().await;
        if let Some(i) = self.fresh() {
            return Ok(i);
        }
        let pq = match token {
            Some(t) => format!("{kernelspecs_path}?{t}"),
            None => kernelspecs_path.to_string(),
        };
        let pq = pq.parse().map_err(|_| SpecsError::Body("bad kernelspecs path".into()))?;
        let mut req = Request::new(ProxyBody::empty());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = Upstream::uri(Some(pq));
        *req.headers_mut() = headers();
        for h in [header::CONTENT_LENGTH, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::EXPECT] {
            req.headers_mut().remove(h);
        }
        wire::ask_for_kernelspecs(req.headers_mut());
        if let Some(auth) = &upstream.auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        let resp = upstream.send(req).await.map_err(SpecsError::Upstream)?;
        let (parts, body) = resp.into_parts();
        // Bounded in size and in time: the refresh lock is held meanwhile.
        let collect = http_body_util::Limited::new(body, kernelspecs::MAX_BODY).collect();
        let body = tokio::time::timeout(upstream.response_timeout, collect)
            .await
            .map_err(|_| SpecsError::Upstream(UpstreamError::Timeout))?
            .map_err(|e| SpecsError::Upstream(UpstreamError::Failed(e)))?
            .to_bytes();
        if parts.status != StatusCode::OK {
            return Err(SpecsError::Status(parts.status, parts.headers, body));
        }
        if parts.headers.get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity") {
            return Err(SpecsError::Body("compressed although identity was asked for".into()));
        }
        let index = Arc::new(kernelspecs::index(&body).map_err(|e| SpecsError::Body(e.to_string()))?);
        self.current.store(Some(Arc::new(Cached { at: Instant::now(), index: index.clone() })));
        Ok(index)
    }
}
