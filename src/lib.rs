//! envgate: a reverse proxy in front of Jupyter Enterprise Gateway that enforces which
//! environment variables a client may hand to a kernel.
//!
//! Where things are:
//! - [`policy`]: the decision per name (pure);
//! - [`values`]: what a forwarded value and the body's `path` may hold (pure);
//! - [`rewrite`]: kernel-start and kernelspec bodies, bytes to bytes (pure);
//! - [`decide`]: one kernel start, parsed body to forwarded bytes or refusal, and identity
//!   binding's trusted user (pure);
//! - [`routes`]: which route a raw request is (pure);
//! - [`cli`]: the command line and its subcommands;
//! - [`config`]: file + environment + flags -> one validated [`config::Config`], every setting
//!   declared once;
//! - [`wire`]: header hygiene, JSON errors, ETags;
//! - [`json`]: JSON strings written fast, for the forwarded `env` and the audit record;
//! - [`proxy`]: the hyper service, one function per route class; the policy routes' one exit;
//! - [`runtime`]: what the service runs on, built and handed down by the shell: the runtime a
//!   reload replaces, the shared state, the worker serving a request, start-up errors;
//! - [`upstream`]: the pooled client, timeouts, the kernelspec cache;
//! - [`audit`]: the audit log;
//! - [`server`]: listener, workers, connections, signals, the admin listener, the one reload;
//! - [`watch`]: the config watch: when the files the configuration reads change (pure
//!   debounce, file reads);
//! - [`rawhead`]: what hyper's parsed head hides (a `Content-Length` next to chunked), from the
//!   bytes it reads;
//! - [`limits`]: the open-file limit raised at start-up;
//! - [`output`]: what the commands print, a closed pipe ending it quietly;
//! - [`procfs`]: the `process_*` metrics, read from /proc at each scrape;
//! - [`splice`]: upgraded connections copied both ways, no buffer while idle;
//! - [`explain`]: `envgate explain`, the policy's verdicts on names, and a kernel start dry-run
//!   through [`decide::kernel_start`];
//! - [`healthcheck`]: `envgate healthcheck`, a running envgate's `/readyz` for a container;
//! - [`summary`]: `envgate audit summarize`, an audit log counted as a stream.
//!
//! Imports go one way: `main` -> [`server`] -> [`proxy`] -> the pure modules ([`server`] and
//! [`proxy`] -> [`rawhead`] -> [`wire`] too); [`runtime`] is
//! read by both [`server`] and [`proxy`] and imports neither.

#![forbid(unsafe_code)]

pub mod audit;
pub mod body;
pub mod cli;
pub mod config;
pub mod decide;
pub mod explain;
pub mod healthcheck;
pub mod identity;
pub mod json;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod output;
pub mod policy;
pub mod pool;
pub mod procfs;
pub mod proxy;
pub mod rawhead;
pub mod rewrite;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod splice;
pub mod summary;
pub mod tls;
pub mod upstream;
pub mod values;
pub mod watch;
pub mod wire;
