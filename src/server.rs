//! The I/O shell: listeners (plain or TLS), one hyper HTTP/1.1 connection per client (keep-alive,
//! upgrades), the admin listener, and signals: SIGHUP reloads the configuration and certificates
//! (as do `POST /-/reload` and the config watch, through the one [`Reloader`]), SIGTERM/SIGINT
//! drain and exit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::body::ProxyBody;
use crate::config::{Config, ConfigError, Opts};
use crate::proxy;
use crate::rawhead::Watched;
use crate::runtime::{Runtime, StartError, State, Worker};
use crate::{tls, wire};

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the accept loop shares with the workers.
struct Shared {
    state: Arc<State>,
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    /// Shutdown has begun: connections finish their current request and close.
    stop: CancellationToken,
    conns: TaskTracker,
    /// Shutdown has drained (or given up): the workers' event loops may end.
    finished: CancellationToken,
}

type Accepted = (std::net::TcpStream, SocketAddr);

/// The worker threads: where to hand connections, and the threads to join at the end.
struct Workers {
    senders: Vec<mpsc::UnboundedSender<Accepted>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Starts `n` worker threads, each with its own single-threaded event loop, like nginx's worker
/// processes: a connection, its upstream connections and its spliced WebSocket all live on one
/// thread, so serving a request never wakes another core. The accept loop hands each new
/// connection to the next worker, and each connection its [`Worker`]: which upstream pool and
/// audit batch its requests use.
fn start_workers(n: usize, shared: &Arc<Shared>) -> Result<Workers, StartError> {
    let mut senders = Vec::with_capacity(n);
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, mut rx) = mpsc::unbounded_channel::<Accepted>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StartError::Worker { index: i, source })?;
        let sh = shared.clone();
        let audit = shared.state.audit.clone();
        let thread = std::thread::Builder::new()
            .name(format!("envgate-worker-{i}"))
            .spawn(move || {
                let worker = Worker::new(i);
                rt.block_on(async move {
                    tokio::spawn(timer_anchor());
                    while let Some((stream, peer)) = rx.recv().await {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => {
                                sh.conns.spawn(connection(stream, peer, worker, sh.clone()));
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot register a connection"),
                        }
                    }
                    // No more connections: keep driving this worker's until shutdown is over.
                    sh.finished.cancelled().await;
                });
                audit.flush_now(i);
            })
            .map_err(|source| StartError::Worker { index: i, source })?;
        senders.push(tx);
        threads.push(thread);
    }
    Ok(Workers { senders, threads })
}

/// How often [`timer_anchor`] wakes its worker.
const ANCHOR_TICK: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`ANCHOR_TICK`] on the worker at all times. Every request arms
/// timers (header read, response, body idle), and tokio wakes its own event loop with an eventfd
/// write whenever a timer is armed that is due before the loop's next planned wake-up: with no
/// earlier timer, that was one `write` and one extra `epoll_wait` per request, about a quarter
/// of the system calls of a proxied request. With this anchor, only timers shorter than a second
/// do that; the price is one wake-up per second per worker.
async fn timer_anchor() {
    loop {
        tokio::time::sleep(ANCHOR_TICK).await;
    }
}

/// One client connection, on `worker`: the TLS handshake if any, then HTTP.
async fn connection(stream: tokio::net::TcpStream, peer: SocketAddr, worker: Worker, sh: Arc<Shared>) {
    let st = sh.state.clone();
    let stop = sh.stop.clone();
    match sh.tls.load_full() {
        None => serve_conn(stream, peer, "http", worker, st, stop).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(s)) => serve_conn(s, peer, "https", worker, st, stop).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

fn acceptor(config: &Config) -> Result<Option<TlsAcceptor>, StartError> {
    match &config.tls {
        None => Ok(None),
        Some((cert, key)) => {
            Ok(Some(TlsAcceptor::from(tls::server_config(cert, key).map_err(StartError::ListenerTls)?)))
        }
    }
}

/// Loads every file the configuration names (listener certificate and key, upstream CA and
/// client certificate), as start-up and reload do; `envgate check` runs it too.
pub fn preflight(config: &Config) -> Result<(), StartError> {
    acceptor(config)?;
    crate::upstream::Upstream::new(config).map_err(StartError::UpstreamTls)?;
    Ok(())
}

/// Runs envgate until SIGTERM or SIGINT. `opts` are kept to reload the configuration on SIGHUP.
pub async fn run(opts: Opts, config: Config) -> Result<(), StartError> {
    let bind = |addr: SocketAddr, admin: bool| async move {
        TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, admin, source })
    };
    let listener = bind(config.listen, false).await?;
    let admin = match config.admin_listen {
        Some(a) => Some(bind(a, true).await?),
        None => None,
    };
    let tls = Arc::new(ArcSwapOption::from(acceptor(&config)?.map(Arc::new)));
    let audit = AuditLog::open(&config.audit_log, config.workers).map_err(StartError::AuditLog)?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    // The signal handlers go in before "envgate is listening" is logged: a supervisor (or a test)
    // that sends SIGTERM as soon as it reads that line must get a graceful stop, not the default
    // action of a signal nobody handles yet, which kills the process.
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::System)?;
    let mut term = signal(SignalKind::terminate()).map_err(StartError::System)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::System)?;
    let grace = config.shutdown_grace;
    let addr = listener.local_addr().map_err(StartError::System)?;
    let workers = config.workers;
    let state = Arc::new(State::new(Runtime::new(config, None, workers)?, audit));
    state.metrics.reloads.loaded(unix_now());
    {
        let rt = state.runtime.load();
        tracing::info!(
            listen = %addr,
            tls = rt.config.tls.is_some(),
            upstream = %rt.config.upstream.url,
            mode = rt.config.policy.mode.as_str(),
            policy = %rt.policy_hash,
            workers,
            "envgate is listening"
        );
    }
    let shared = Arc::new(Shared {
        state: state.clone(),
        tls: tls.clone(),
        stop: CancellationToken::new(),
        conns: TaskTracker::new(),
        finished: CancellationToken::new(),
    });
    let Workers { senders, threads } = start_workers(workers, &shared)?;
    let stop = shared.stop.clone();
    let files = std::sync::Mutex::new(crate::watch::read(&opts, &[]));
    let reloader = Arc::new(Reloader {
        opts: opts.clone(),
        state: state.clone(),
        tls,
        workers,
        one: tokio::sync::Mutex::new(()),
        files,
    });
    if let Some(admin) = admin {
        tracing::info!(
            admin = %admin.local_addr().map_err(StartError::System)?,
            "admin listener (/healthz, /readyz, /metrics, /-/reload, /-/policy)"
        );
        tokio::spawn(serve_admin(admin, reloader.clone(), stop.clone()));
    }
    let watch = tokio::spawn(watch_files(reloader.clone()));

    let mut next = 0usize;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = hup.recv() => {
                // Off the accept loop: a reload queued behind another must not hold up accepting.
                let r = reloader.clone();
                tokio::spawn(async move { r.reload(Trigger::Signal).await });
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(s) => {
                let _ = senders[next % senders.len()].send((s, peer));
                next = next.wrapping_add(1);
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to a worker"),
        }
    }

    // Drain: stop accepting, let requests in flight finish and WebSockets run for the grace
    // period, then close whatever is left.
    drop(listener);
    drop(senders);
    watch.abort();
    tracing::info!(grace = ?grace, "shutting down: no new connections");
    stop.cancel();
    let conns = &shared.conns;
    conns.close();
    state.splices.close();
    let drained = tokio::time::timeout(grace, async {
        conns.wait().await;
        state.splices.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::info!("grace period over: closing remaining connections");
        state.stop_splices.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), state.splices.wait()).await;
    }
    shared.finished.cancel();
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    drop(state);
    tracing::info!("stopped");
    Ok(())
}

/// Serves one client connection until it closes, or until shutdown asks it to finish its
/// current request and close.
async fn serve_conn<S>(
    io: S,
    peer: SocketAddr,
    proto: &'static str,
    worker: Worker,
    st: Arc<State>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let forwarded_for = crate::wire::forwarded_for(peer.ip());
    let (io, watch) = Watched::new(io);
    // Read in hyper's call of the service, once per request, right after it parsed the head.
    let svc = service_fn(move |req| {
        let raw = watch.next_head();
        proxy::handle(req, raw, watch.clone(), peer, forwarded_for.clone(), proto, worker, st.clone())
    });
    let mut builder = http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // With its causes: "error from user's Body stream: no body data for 60s".
        let error = crate::upstream::source_chain(&e);
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// What set a reload off, for its log line and the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The config watch saw a watched file change.
    File,
    /// `POST /-/reload` on the admin listener.
    Http,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::File => "file",
            Trigger::Http => "http",
        }
    }
}

/// Why a reload kept the previous configuration.
#[derive(Debug)]
pub enum ReloadError {
    /// The configuration does not load (the file, a setting, a file a setting names).
    Config(ConfigError),
    /// A certificate or key does not load.
    Files(StartError),
    /// The audit log cannot be (re)opened; records keep going where they went.
    Audit(std::io::Error),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Config(e) => write!(f, "{e}"),
            ReloadError::Files(e) => write!(f, "{e}"),
            ReloadError::Audit(e) => write!(f, "cannot open the audit log: {e}; records keep going to the old one"),
        }
    }
}

/// The one way to reload, whatever the trigger (SIGHUP, the config watch, `POST /-/reload`):
/// re-read the configuration (the file, with the flags and `ENVGATE_*` variables read at start-up
/// on top) and certificates, and reopen the audit log. A configuration that fails keeps the old
/// one running. Requests in flight keep the runtime they started with; open WebSockets are not
/// touched. One reload at a time: a trigger that comes during another waits for it, then loads
/// the files as they are then.
pub struct Reloader {
    opts: Opts,
    state: Arc<State>,
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    workers: usize,
    one: tokio::sync::Mutex<()>,
    /// The watched files as the last load read them, and their list (for the config watch).
    files: std::sync::Mutex<(crate::watch::Snapshot, Vec<std::path::PathBuf>)>,
}

impl Reloader {
    /// Reloads; logs and counts the result. `Ok`: the new policy's hash.
    pub async fn reload(&self, trigger: Trigger) -> Result<String, ReloadError> {
        let _one = self.one.lock().await;
        // Before the load: should a file change while it reads them, the watch sees a change
        // still to load, and loads again (never the other way round).
        let previous = self.files().1;
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = crate::watch::read(&self.opts, &previous);
        let result = self.load();
        let metrics = &self.state.metrics.reloads;
        match &result {
            Ok(hash) => {
                let rt = self.state.runtime.load();
                tracing::info!(
                    trigger = trigger.as_str(),
                    result = "ok",
                    policy = %hash,
                    mode = rt.config.policy.mode.as_str(),
                    "configuration reloaded"
                );
                metrics.record(trigger.as_str(), true, unix_now());
            }
            Err(e) => {
                tracing::error!(
                    trigger = trigger.as_str(),
                    result = "error",
                    error = %e,
                    "reload failed; the previous configuration stays in force"
                );
                metrics.record(trigger.as_str(), false, unix_now());
            }
        }
        result
    }

    /// What the last load read of the watched files, and their list.
    fn files(&self) -> (crate::watch::Snapshot, Vec<std::path::PathBuf>) {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn load(&self) -> Result<String, ReloadError> {
        let state = &self.state;
        let old = state.runtime.load_full();
        let config = Config::load(&self.opts).map_err(ReloadError::Config)?;
        if config.listen != old.config.listen || config.admin_listen != old.config.admin_listen {
            tracing::warn!("listen and admin_listen cannot change on reload; restart envgate to move them");
        }
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        let acceptor = acceptor(&config).map_err(ReloadError::Files)?;
        let runtime = Runtime::new(config, Some(&old), self.workers).map_err(ReloadError::Files)?;
        if old.config.tls.is_some() != acceptor.is_some() {
            tracing::warn!("TLS was turned on or off by the reload; it applies to new connections");
        }
        // The audit log first: if it cannot be opened, nothing of the new configuration applies.
        state.audit.reopen(&runtime.config.audit_log).map_err(ReloadError::Audit)?;
        self.tls.store(acceptor.map(Arc::new));
        state.metrics.set_policy(&runtime.policy_hash);
        let hash = runtime.policy_hash.clone();
        state.runtime.store(Arc::new(runtime));
        Ok(hash)
    }
}

/// Seconds since the Unix epoch, for the reload timestamp gauge.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The config watch ([`crate::watch`]), reloading through `reloader`; its interval is the running
/// configuration's `config_watch_interval`.
async fn watch_files(reloader: Arc<Reloader>) {
    let state = reloader.state.clone();
    let interval = move || state.runtime.load().config.config_watch_interval;
    let r = reloader.clone();
    let files = reloader.clone();
    crate::watch::run(
        reloader.opts.clone(),
        interval,
        move || files.files(),
        move || {
            let r = r.clone();
            async move {
                let _ = r.reload(Trigger::File).await;
            }
        },
    )
    .await;
}

/// The admin listener: `/healthz`, `/readyz`, `/metrics`.
async fn serve_admin(listener: TcpListener, reloader: Arc<Reloader>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let r = reloader.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| admin(req, r.clone()));
            let mut builder = http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn admin(req: Request<Incoming>, reloader: Arc<Reloader>) -> Result<Response<ProxyBody>, Infallible> {
    let st = reloader.state.clone();
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(ProxyBody::full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
        r
    };
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let rt = st.runtime.load_full();
            match rt.upstream(Worker::MAIN).probe(&rt.routes.api_path()).await {
                Ok(()) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("upstream not ready: {e}\n"), "text/plain"),
            }
        }
        "/metrics" => {
            let accept = req.headers().get(http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let (body, ctype) = st.metrics.expose(accept);
            text(StatusCode::OK, body, ctype)
        }
        "/-/reload" => admin_reload(req.method(), &reloader).await,
        "/-/policy" => admin_policy(req.method(), &st),
        _ => wire::json_error(StatusCode::NOT_FOUND, "admin routes: /healthz, /readyz, /metrics, /-/reload, /-/policy"),
    })
}

/// An admin route's answer as JSON.
fn admin_json(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// 405, with the one method the route takes.
fn admin_method_not_allowed(allow: &'static str) -> Response<ProxyBody> {
    let mut r = wire::json_error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allow}"));
    r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

/// `POST /-/reload`: 200 `{"status":"ok","policy_hash":...}`, or 422 with the reason the
/// configuration does not load (the previous one stays in force).
async fn admin_reload(method: &http::Method, reloader: &Reloader) -> Response<ProxyBody> {
    if method != http::Method::POST {
        return admin_method_not_allowed("POST");
    }
    match reloader.reload(Trigger::Http).await {
        Ok(hash) => admin_json(StatusCode::OK, &serde_json::json!({"status": "ok", "policy_hash": hash})),
        Err(e) => wire::json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("reload failed; the previous configuration stays in force: {e}"),
        ),
    }
}

/// `GET /-/policy`: the policy hash and the effective settings as `envgate check` prints them
/// (secrets as `"<set>"`, files as their paths).
fn admin_policy(method: &http::Method, st: &State) -> Response<ProxyBody> {
    if method != http::Method::GET && method != http::Method::HEAD {
        return admin_method_not_allowed("GET");
    }
    let rt = st.runtime.load_full();
    admin_json(
        StatusCode::OK,
        &serde_json::json!({"policy_hash": rt.policy_hash, "settings": rt.config.effective_json()}),
    )
}
