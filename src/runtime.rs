//! What the service runs on, shared by the I/O shell ([`crate::server`]) and the service
//! ([`crate::proxy`]): the [`Runtime`] a reload replaces, the [`State`] every connection shares,
//! the [`Worker`] a request is served on, and why start-up or a reload failed ([`StartError`]).
//!
//! It lives apart from both so that the shell builds and hands these down and the service only
//! reads them: neither imports the other's internals, and the service never asks which thread
//! it is on.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditLog, Ids};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::rewrite::kernelspecs;
use crate::routes::Routes;
use crate::upstream::{SpecCache, Upstream};

/// The thread a connection is served on: one of the worker threads, which owns an upstream
/// connection pool and an audit batch of its own, or the main thread (the admin listener).
/// Handed by the worker to every connection it serves, and by the connection to each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker(Option<usize>);

impl Worker {
    /// Off the workers: the main thread.
    pub const MAIN: Worker = Worker(None);

    /// Worker thread `i`.
    pub fn new(i: usize) -> Worker {
        Worker(Some(i))
    }

    /// The worker's index; `None` for the main thread.
    pub fn index(self) -> Option<usize> {
        self.0
    }
}

/// Everything that a reload (SIGHUP) replaces: built from one [`Config`].
pub struct Runtime {
    pub config: Config,
    pub routes: Routes,
    /// One pooled upstream client per worker thread, and one for the main thread (last): an
    /// upstream connection is only ever used on the thread whose runtime drives it, so a request
    /// never wakes another core.
    upstreams: Arc<[Upstream]>,
    pub specs: SpecCache,
    /// Kernelspec bodies already rewritten under this policy: (body, its ETag) by the view and
    /// the upstream's bytes; `None`: the view may not start that kernelspec.
    pub rewrites: kernelspecs::Memo<Option<(Bytes, HeaderValue)>>,
    /// Tokens verified with this configuration's keys (a reload starts afresh).
    pub tokens: crate::jwt::TokenCache,
    /// A short hash of the effective policy, for logs and the `envgate_policy_info` metric.
    pub policy_hash: String,
}

/// How many verified tokens a runtime remembers: a few per active user.
const TOKEN_CACHE_ENTRIES: usize = 8192;

impl Runtime {
    /// Builds the runtime with `workers` worker threads; reuses `previous`'s connection pools
    /// when the upstream is unchanged and its TLS reads no files of envgate's. An `upstream_ca`
    /// or client certificate is a file that may have been rotated at the same path, so a reload
    /// builds new pools from the files as they are now (and fails, keeping the old runtime, when
    /// they are broken), as it does for the listener's certificate.
    pub fn new(config: Config, previous: Option<&Runtime>, workers: usize) -> Result<Runtime, StartError> {
        let tls_files = config.upstream.tls.ca.is_some() || config.upstream.tls.client_cert.is_some();
        let upstreams = match previous {
            Some(p) if !tls_files && p.upstreams.len() == workers + 1 && p.config.upstream == config.upstream => {
                p.upstreams.clone()
            }
            _ => (0..=workers)
                .map(|_| Upstream::new(&config))
                .collect::<Result<Vec<_>, _>>()
                .map_err(StartError::UpstreamTls)?
                .into(),
        };
        Ok(Runtime {
            routes: Routes::new(&config.upstream.url.base),
            specs: SpecCache::new(config.kernelspec_cache_ttl),
            rewrites: kernelspecs::Memo::default(),
            tokens: crate::jwt::TokenCache::new(TOKEN_CACHE_ENTRIES),
            policy_hash: config.policy_hash(),
            upstreams,
            config,
        })
    }

    /// The upstream client that `worker` owns.
    pub fn upstream(&self, worker: Worker) -> &Upstream {
        let i = worker.index().unwrap_or(self.upstreams.len() - 1);
        &self.upstreams[i % self.upstreams.len()]
    }
}

/// Everything a request needs, shared by all connections.
pub struct State {
    /// The current runtime; requests take a snapshot, so a reload never changes a request midway.
    pub runtime: ArcSwap<Runtime>,
    pub audit: AuditLog,
    pub ids: Ids,
    pub metrics: Metrics,
    /// Spliced (upgraded) connections, tracked so that shutdown can wait for them, then end them.
    pub splices: TaskTracker,
    pub stop_splices: CancellationToken,
}

impl State {
    pub fn new(runtime: Runtime, audit: AuditLog) -> State {
        let metrics = Metrics::default();
        metrics.set_policy(&runtime.policy_hash);
        let audit = audit.count_write_errors_in(metrics.ops.audit_write_errors.clone());
        State {
            runtime: ArcSwap::from_pointee(runtime),
            audit,
            ids: Ids::default(),
            metrics,
            splices: TaskTracker::new(),
            stop_splices: CancellationToken::new(),
        }
    }
}

/// Why envgate cannot start, or why a reload keeps the previous configuration.
#[derive(Debug)]
pub enum StartError {
    /// `tls_cert` or `tls_key` cannot be loaded (the message names the file).
    ListenerTls(String),
    /// The upstream client cannot be built: its CA or client certificate cannot be loaded.
    UpstreamTls(String),
    /// A listening socket cannot be bound.
    Listen { addr: SocketAddr, admin: bool, source: io::Error },
    /// The audit log cannot be opened.
    AuditLog(io::Error),
    /// A worker thread or its event loop cannot be started.
    Worker { index: usize, source: io::Error },
    /// The system refused something else start-up needs (a signal handler, the listener's address).
    System(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::ListenerTls(e) => write!(f, "invalid `tls_cert`/`tls_key`: {e}"),
            StartError::UpstreamTls(e) => write!(f, "invalid upstream TLS settings: {e}"),
            StartError::Listen { addr, admin: false, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartError::Listen { addr, admin: true, source } => write!(f, "cannot listen on {addr} (admin): {source}"),
            StartError::AuditLog(e) => write!(f, "cannot open the audit log: {e}"),
            StartError::Worker { index, source } => write!(f, "cannot start worker {index}: {source}"),
            StartError::System(e) => write!(f, "{e}"),
        }
    }
}

/// The messages hold their causes, so no `source` (a chain would say them twice).
impl std::error::Error for StartError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools_kept(text: &str) -> bool {
        let config = Config::from_toml(text).unwrap();
        let first = Runtime::new(config.clone(), None, 2).unwrap();
        let second = Runtime::new(config, Some(&first), 2).unwrap();
        Arc::ptr_eq(&first.upstreams, &second.upstreams)
    }

    #[test]
    fn a_reload_keeps_the_pools_unless_the_upstream_changed_or_reads_certificate_files() {
        assert!(pools_kept("upstream = \"http://127.0.0.1:8888\""));
        assert!(pools_kept("upstream = \"https://eg.example:8888\""));
        let first = Runtime::new(Config::from_toml("").unwrap(), None, 2).unwrap();
        let moved = Config::from_toml("connect_timeout = \"1s\"").unwrap();
        assert!(!Arc::ptr_eq(&first.upstreams, &Runtime::new(moved, Some(&first), 2).unwrap().upstreams));

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["eg.example".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let text = format!("upstream = \"https://eg.example:8888\"\nupstream_ca = {:?}", ca.display().to_string());
        assert!(!pools_kept(&text), "a rotated upstream_ca must be read again on reload");
    }
}
