//! Configuration: a TOML file, `ENVGATE_*` environment variables and flags, merged into one
//! validated [`Config`] (flags win over the environment, the environment over the file).
//!
//! Every problem is reported as one line that names the key and where it came from, so that
//! `envgate check` and start-up can print it and exit with code 2.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use http::uri::{Authority, Scheme};
use http::Uri;

use crate::policy::{self, EgEnvs, Mode, NameSet, Policy, PrefixRule, Sessions};
use crate::values::{Forbidden, PathRule, Pattern, ValueRules};

/// A configuration problem, as one line naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// envgate: an env-policy proxy in front of Jupyter Enterprise Gateway.
#[derive(Debug, Parser)]
#[command(name = "envgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Opts,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective policy; exit 2 when it is invalid.
    Check,
    /// Say, for each variable name, whether the policy keeps it for a kernelspec and which
    /// source or rule decided. Uses the same engine as the proxy.
    Explain(ExplainArgs),
    /// Read an audit log: `envgate audit summarize PATH` counts, per kernelspec and per user,
    /// which names were rejected (and why) and kept. Needs no configuration.
    #[command(subcommand)]
    Audit(crate::summary::AuditCommand),
}

/// `envgate explain [--kernelspec NAME] [--kernelspecs-file F] NAME...`
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The kernelspec to decide for [default: the upstream's default kernelspec].
    #[arg(long)]
    pub kernelspec: Option<String>,
    /// Read the kernelspecs from this file (the body of GET /api/kernelspecs) instead of
    /// fetching them from the upstream.
    #[arg(long, value_name = "FILE")]
    pub kernelspecs_file: Option<PathBuf>,
    /// EG's auth token, sent as `Authorization: token ...` when fetching kernelspecs.
    #[arg(long, env = "ENVGATE_EXPLAIN_TOKEN", value_name = "TOKEN")]
    pub token: Option<String>,
    /// Output: text | json.
    #[arg(long, default_value = "text")]
    pub format: String,
    /// Variable names to explain.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// Every setting, as a flag and an `ENVGATE_*` variable. Each overrides the config file's key
/// of the same name (dashes for underscores).
#[derive(Debug, Default, Args)]
pub struct Opts {
    /// TOML configuration file.
    #[arg(long, env = "ENVGATE_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8889].
    #[arg(long, env = "ENVGATE_LISTEN", global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The Enterprise Gateway to protect, with its base_url as path [default: http://127.0.0.1:8888].
    #[arg(long, env = "ENVGATE_UPSTREAM", global = true, value_name = "URL")]
    pub upstream: Option<String>,
    /// drop | reject | report [default: drop].
    #[arg(long, env = "ENVGATE_MODE", global = true)]
    pub mode: Option<String>,
    /// Names every kernelspec accepts, comma-separated [default: none].
    #[arg(long, env = "ENVGATE_CLIENT_ENVS", global = true, value_delimiter = ',', value_name = "NAMES")]
    pub client_envs: Option<Vec<String>>,
    /// Names always refused, comma-separated; replaces the built-in list [default: see README].
    #[arg(long, env = "ENVGATE_DENY_ENVS", global = true, value_delimiter = ',', value_name = "NAMES")]
    pub deny_envs: Option<Vec<String>>,
    /// Keep every KERNEL_* name, as EG does: true | false [default: true].
    #[arg(long, env = "ENVGATE_KERNEL_PREFIX", global = true, value_name = "BOOL")]
    pub kernel_prefix: Option<String>,
    /// More prefixes whose names are kept, comma-separated (e.g. SPARK_) [default: none].
    #[arg(long, env = "ENVGATE_ALLOW_PREFIXES", global = true, value_delimiter = ',', value_name = "PREFIXES")]
    pub allow_prefixes: Option<Vec<String>>,
    /// Allow the names in a kernelspec's spec.metadata.client_envs: true | false [default: true].
    #[arg(long, env = "ENVGATE_KERNELSPEC_METADATA", global = true, value_name = "BOOL")]
    pub kernelspec_metadata: Option<String>,
    /// Allow the keys of a kernelspec's env stanza ("plan B"): true | false [default: false].
    #[arg(long, env = "ENVGATE_KERNELSPEC_ENV", global = true, value_name = "BOOL")]
    pub kernelspec_env: Option<String>,
    /// Allow a kernelspec's process_proxy.config.forwarded_envs / forward_env ("plan C") [default: false].
    #[arg(long, env = "ENVGATE_PROCESS_PROXY_ENVS", global = true, value_name = "BOOL")]
    pub process_proxy_envs: Option<String>,
    /// Also allow what EG's own EG_CLIENT_ENVS / EG_ENV_WHITELIST (in envgate's environment) allow [default: false].
    #[arg(
        long,
        env = "ENVGATE_INHERIT_EG_ENV_CONFIG",
        global = true,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub inherit_eg_env_config: Option<String>,
    /// Per-kernelspec names, NAME=A,B; repeat the flag or separate with ';'.
    #[arg(
        long,
        env = "ENVGATE_KERNELSPEC_CLIENT_ENVS",
        global = true,
        value_delimiter = ';',
        value_name = "NAME=NAMES"
    )]
    pub kernelspec_client_envs: Option<Vec<String>>,
    /// POST /api/sessions: deny | allow [default: deny].
    #[arg(long, env = "ENVGATE_SESSIONS", global = true)]
    pub sessions: Option<String>,
    /// How long kernelspecs fetched from the upstream are trusted [default: 10s].
    #[arg(long, env = "ENVGATE_KERNELSPEC_CACHE_TTL", global = true, value_name = "DURATION")]
    pub kernelspec_cache_ttl: Option<String>,
    /// Longest env value forwarded, in characters [default: 4096].
    #[arg(long, env = "ENVGATE_VALUE_MAX_LENGTH", global = true, value_name = "CHARS")]
    pub value_max_length: Option<String>,
    /// Substrings no forwarded env value may hold, comma-separated; replaces the built-in list
    /// [default: $ ` CR LF NUL {{ {%].
    #[arg(long, env = "ENVGATE_VALUE_FORBIDDEN", global = true, value_delimiter = ',', value_name = "TEXTS")]
    pub value_forbidden: Option<Vec<String>>,
    /// A pattern a variable's whole value must match, NAME=REGEX (replaces a built-in one; NAME= removes
    /// it); repeat the flag, or separate with newlines in the environment variable.
    #[arg(
        long = "value-pattern",
        env = "ENVGATE_VALUE_PATTERNS",
        global = true,
        value_delimiter = '\n',
        value_name = "NAME=REGEX"
    )]
    pub value_patterns: Option<Vec<String>>,
    /// The body's `path`: refuse_escape | strip | keep [default: refuse_escape].
    #[arg(long, env = "ENVGATE_KERNEL_PATH", global = true)]
    pub kernel_path: Option<String>,
    /// Largest kernel-start body accepted, in bytes [default: 1048576].
    #[arg(long, env = "ENVGATE_MAX_BODY_BYTES", global = true, value_name = "BYTES")]
    pub max_body_bytes: Option<String>,
    /// Upstream connect timeout, TLS handshake included [default: 5s].
    #[arg(long, env = "ENVGATE_CONNECT_TIMEOUT", global = true, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Upstream response-header timeout [default: 120s].
    #[arg(long, env = "ENVGATE_RESPONSE_TIMEOUT", global = true, value_name = "DURATION")]
    pub response_timeout: Option<String>,
    /// How long a streamed body (either way) may send nothing before its connection is aborted;
    /// never applies to WebSockets [default: 60s].
    #[arg(long, env = "ENVGATE_BODY_IDLE_TIMEOUT", global = true, value_name = "DURATION")]
    pub body_idle_timeout: Option<String>,
    /// Audit log: - for stdout, or a file path (appended to) [default: -].
    #[arg(long, env = "ENVGATE_AUDIT_LOG", global = true, value_name = "PATH")]
    pub audit_log: Option<String>,
    /// Diagnostics format on stderr: text | json [default: text].
    #[arg(long, env = "ENVGATE_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "ENVGATE_TLS_CERT", global = true, value_name = "PEM")]
    pub tls_cert: Option<String>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, env = "ENVGATE_TLS_KEY", global = true, value_name = "PEM")]
    pub tls_key: Option<String>,
    /// Verify an https upstream against these CA certificates (PEM) instead of the system roots.
    #[arg(long, env = "ENVGATE_UPSTREAM_CA", global = true, value_name = "PEM")]
    pub upstream_ca: Option<String>,
    /// Client certificate (PEM) for mutual TLS with the upstream; needs --upstream-client-key.
    #[arg(long, env = "ENVGATE_UPSTREAM_CLIENT_CERT", global = true, value_name = "PEM")]
    pub upstream_client_cert: Option<String>,
    /// The private key (PEM) for --upstream-client-cert.
    #[arg(long, env = "ENVGATE_UPSTREAM_CLIENT_KEY", global = true, value_name = "PEM")]
    pub upstream_client_key: Option<String>,
    /// Do not verify the upstream's certificate (development only) [default: false].
    #[arg(
        long,
        env = "ENVGATE_UPSTREAM_INSECURE",
        global = true,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub upstream_insecure: Option<String>,
    /// EG's auth token, added upstream as `Authorization: token ...` (clients never see it).
    #[arg(long, env = "ENVGATE_UPSTREAM_TOKEN", global = true, value_name = "TOKEN", hide_env_values = true)]
    pub upstream_token: Option<String>,
    /// A file holding EG's auth token (read at start-up and on reload).
    #[arg(long, env = "ENVGATE_UPSTREAM_TOKEN_FILE", global = true, value_name = "PATH")]
    pub upstream_token_file: Option<String>,
    /// A header set by a trusted authenticating proxy that names the user (e.g. X-Forwarded-User).
    #[arg(long, env = "ENVGATE_TRUSTED_USER_HEADER", global = true, value_name = "HEADER")]
    pub trusted_user_header: Option<String>,
    /// When the body's KERNEL_USERNAME differs from the trusted user: refuse | overwrite [default: refuse].
    #[arg(long, env = "ENVGATE_USER_MISMATCH", global = true)]
    pub user_mismatch: Option<String>,
    /// Admin listener with /healthz, /readyz and /metrics [default: off].
    #[arg(long, env = "ENVGATE_ADMIN_LISTEN", global = true, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// On SIGTERM, how long requests in flight and WebSockets may go on [default: 30s].
    #[arg(long, env = "ENVGATE_SHUTDOWN_GRACE", global = true, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Worker threads serving connections, each with its own event loop and upstream pool; 0 for
    /// one per core (read at start-up only) [default: 0].
    #[arg(long, env = "ENVGATE_WORKERS", global = true, value_name = "N")]
    pub workers: Option<String>,
}

/// Where the audit log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The upstream EG: where to connect, and its base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// EG's base_url, always ending in `/` (`/` or `/gw/`).
    pub base: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base)
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// Serve TLS: (certificate chain, private key) PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub upstream_tls: UpstreamTls,
    /// EG's token, added upstream as `Authorization: token ...`.
    pub upstream_token: Option<Secret>,
    pub identity: Option<Identity>,
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// Worker threads (0 in the settings: one per core, resolved here).
    pub workers: usize,
    pub upstream: UpstreamUrl,
    pub policy: Policy,
    pub kernelspec_cache_ttl: Duration,
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub audit_log: AuditTarget,
    pub log_format: LogFormat,
}

/// How envgate checks an https upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA certificates (PEM) to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Skip verification (development only).
    pub insecure: bool,
}

/// A secret that never shows in `Debug` output or `envgate check`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What to do when a body's `KERNEL_USERNAME` differs from the trusted user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Refuse,
    Overwrite,
}

/// Identity binding: the user named by a trusted header is the kernel's `KERNEL_USERNAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub header: http::HeaderName,
    pub on_mismatch: Mismatch,
}

impl Config {
    /// Every setting in force, as a valid config file (secrets shown as set, never their value).
    pub fn effective(&self) -> String {
        use std::fmt::Write;
        let d = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
        let p = |p: &Path| format!("{:?}", p.display().to_string());
        let mut out = String::new();
        let mut line = |l: String| {
            out.push_str(&l);
            out.push('\n');
        };
        line(format!("listen = {:?}", self.listen.to_string()));
        line(format!("upstream = {:?}", self.upstream.to_string()));
        if let Some(a) = self.admin_listen {
            line(format!("admin_listen = {:?}", a.to_string()));
        }
        if let Some((c, k)) = &self.tls {
            line(format!("tls_cert = {}", p(c)));
            line(format!("tls_key = {}", p(k)));
        }
        if let Some(ca) = &self.upstream_tls.ca {
            line(format!("upstream_ca = {}", p(ca)));
        }
        if let Some((c, k)) = &self.upstream_tls.client_cert {
            line(format!("upstream_client_cert = {}", p(c)));
            line(format!("upstream_client_key = {}", p(k)));
        }
        line(format!("upstream_insecure = {}", self.upstream_tls.insecure));
        if self.upstream_token.is_some() {
            line("# upstream_token: set (not shown)".to_string());
        }
        if let Some(i) = &self.identity {
            line(format!("trusted_user_header = {:?}", i.header.as_str()));
            let m = if i.on_mismatch == Mismatch::Refuse { "refuse" } else { "overwrite" };
            line(format!("user_mismatch = {m:?}"));
        }
        line(format!("kernelspec_cache_ttl = {}", d(self.kernelspec_cache_ttl)));
        line(format!("max_body_bytes = {}", self.max_body_bytes));
        line(format!("connect_timeout = {}", d(self.connect_timeout)));
        line(format!("response_timeout = {}", d(self.response_timeout)));
        line(format!("body_idle_timeout = {}", d(self.body_idle_timeout)));
        line(format!("shutdown_grace = {}", d(self.shutdown_grace)));
        line(format!("workers = {}", self.workers));
        let audit = match &self.audit_log {
            AuditTarget::Stdout => "\"-\"".to_string(),
            AuditTarget::File(f) => p(f),
        };
        line(format!("audit_log = {audit}"));
        line(format!("log_format = {:?}", if self.log_format == LogFormat::Json { "json" } else { "text" }));
        let _ = write!(out, "{}", self.policy);
        out
    }
}

/// The keys a config file may hold.
const FILE_KEYS: &[&str] = &[
    "listen",
    "upstream",
    "mode",
    "client_envs",
    "deny_envs",
    "kernel_prefix",
    "allow_prefixes",
    "kernelspec_metadata",
    "kernelspec_env",
    "process_proxy_envs",
    "inherit_eg_env_config",
    "kernelspecs",
    "sessions",
    "kernelspec_cache_ttl",
    "max_body_bytes",
    "value_max_length",
    "value_forbidden",
    "value_patterns",
    "kernel_path",
    "connect_timeout",
    "response_timeout",
    "body_idle_timeout",
    "audit_log",
    "log_format",
    "tls_cert",
    "tls_key",
    "upstream_ca",
    "upstream_client_cert",
    "upstream_client_key",
    "upstream_insecure",
    "upstream_token",
    "upstream_token_file",
    "trusted_user_header",
    "user_mismatch",
    "admin_listen",
    "shutdown_grace",
    "workers",
];

/// One raw setting and where it came from, for error messages.
#[derive(Debug, Clone)]
struct Setting<T> {
    value: T,
    origin: String,
}

impl<T> Setting<T> {
    fn err(&self, key: &str, msg: impl fmt::Display) -> ConfigError {
        ConfigError(format!("invalid `{key}` ({}): {msg}", self.origin))
    }
}

/// `[kernelspecs.NAME] client_envs`, in the order given.
type KernelspecLists = Vec<(String, Vec<String>)>;

/// The settings before validation: file first, then flags and environment on top.
#[derive(Debug, Default)]
struct Raw {
    listen: Option<Setting<String>>,
    upstream: Option<Setting<String>>,
    mode: Option<Setting<String>>,
    client_envs: Option<Setting<Vec<String>>>,
    deny_envs: Option<Setting<Vec<String>>>,
    kernel_prefix: Option<Setting<bool>>,
    allow_prefixes: Option<Setting<Vec<String>>>,
    kernelspec_metadata: Option<Setting<bool>>,
    kernelspec_env: Option<Setting<bool>>,
    process_proxy_envs: Option<Setting<bool>>,
    inherit_eg_env_config: Option<Setting<bool>>,
    kernelspecs: Option<Setting<KernelspecLists>>,
    sessions: Option<Setting<String>>,
    kernelspec_cache_ttl: Option<Setting<String>>,
    max_body_bytes: Option<Setting<u64>>,
    value_max_length: Option<Setting<u64>>,
    value_forbidden: Option<Setting<Vec<String>>>,
    /// `[value_patterns] NAME = "REGEX"`, in the order given; `""` removes a built-in pattern.
    value_patterns: Option<Setting<Vec<(String, String)>>>,
    kernel_path: Option<Setting<String>>,
    connect_timeout: Option<Setting<String>>,
    response_timeout: Option<Setting<String>>,
    body_idle_timeout: Option<Setting<String>>,
    audit_log: Option<Setting<String>>,
    log_format: Option<Setting<String>>,
    tls_cert: Option<Setting<String>>,
    tls_key: Option<Setting<String>>,
    upstream_ca: Option<Setting<String>>,
    upstream_client_cert: Option<Setting<String>>,
    upstream_client_key: Option<Setting<String>>,
    upstream_insecure: Option<Setting<bool>>,
    upstream_token: Option<Setting<String>>,
    upstream_token_file: Option<Setting<String>>,
    trusted_user_header: Option<Setting<String>>,
    user_mismatch: Option<Setting<String>>,
    admin_listen: Option<Setting<String>>,
    shutdown_grace: Option<Setting<String>>,
    workers: Option<Setting<u64>>,
}

impl Config {
    /// Builds the configuration from the config file named in `opts` (if any) and `opts`.
    pub fn load(opts: &Opts) -> Result<Config, ConfigError> {
        let mut raw = Raw::default();
        if let Some(path) = &opts.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
            raw = Raw::from_toml(&text, path)?;
        }
        raw.overlay(opts)?;
        raw.validate(&|k| std::env::var(k).ok())
    }

    /// Builds the configuration from TOML text alone (tests, `explain`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Raw::from_toml(text, Path::new("config"))?.validate(&|_| None)
    }
}

fn toml_line(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!(" at line {}", text[..span.start.min(text.len())].matches('\n').count() + 1),
        None => String::new(),
    }
}

impl Raw {
    fn from_toml(text: &str, path: &Path) -> Result<Raw, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(format!(
                "{}: TOML syntax error{}: {}",
                path.display(),
                toml_line(text, &e),
                e.message().trim().replace('\n', "; ")
            ))
        })?;
        let origin = path.display().to_string();
        if let Some(k) = table.keys().find(|k| !FILE_KEYS.contains(&k.as_str())) {
            return Err(ConfigError(format!("unknown key `{k}` in {origin} (known keys: {})", FILE_KEYS.join(", "))));
        }
        fn take<T: serde::de::DeserializeOwned>(
            table: &mut toml::Table,
            key: &str,
            origin: &str,
            what: &str,
        ) -> Result<Option<Setting<T>>, ConfigError> {
            match table.remove(key) {
                None => Ok(None),
                Some(v) => {
                    let value = v
                        .try_into()
                        .map_err(|_| ConfigError(format!("invalid `{key}` ({origin}): expected {what}")))?;
                    Ok(Some(Setting { value, origin: origin.to_string() }))
                }
            }
        }
        let o = origin.as_str();
        let mut raw = Raw {
            listen: take(&mut table, "listen", o, "a string like \"127.0.0.1:8889\"")?,
            upstream: take(&mut table, "upstream", o, "a URL string")?,
            mode: take(&mut table, "mode", o, "a string")?,
            client_envs: take(&mut table, "client_envs", o, "an array of strings")?,
            deny_envs: take(&mut table, "deny_envs", o, "an array of strings")?,
            kernel_prefix: take(&mut table, "kernel_prefix", o, "true or false")?,
            allow_prefixes: take(&mut table, "allow_prefixes", o, "an array of strings")?,
            kernelspec_metadata: take(&mut table, "kernelspec_metadata", o, "true or false")?,
            kernelspec_env: take(&mut table, "kernelspec_env", o, "true or false")?,
            process_proxy_envs: take(&mut table, "process_proxy_envs", o, "true or false")?,
            inherit_eg_env_config: take(&mut table, "inherit_eg_env_config", o, "true or false")?,
            kernelspecs: None,
            sessions: take(&mut table, "sessions", o, "a string")?,
            kernelspec_cache_ttl: take(&mut table, "kernelspec_cache_ttl", o, "a duration string like \"10s\"")?,
            max_body_bytes: take(&mut table, "max_body_bytes", o, "a positive integer")?,
            value_max_length: take(&mut table, "value_max_length", o, "a positive integer")?,
            value_forbidden: take(&mut table, "value_forbidden", o, "an array of strings")?,
            value_patterns: None,
            kernel_path: take(&mut table, "kernel_path", o, "a string")?,
            connect_timeout: take(&mut table, "connect_timeout", o, "a duration string like \"5s\"")?,
            response_timeout: take(&mut table, "response_timeout", o, "a duration string like \"120s\"")?,
            body_idle_timeout: take(&mut table, "body_idle_timeout", o, "a duration string like \"60s\"")?,
            audit_log: take(&mut table, "audit_log", o, "\"-\" or a file path")?,
            log_format: take(&mut table, "log_format", o, "a string")?,
            tls_cert: take(&mut table, "tls_cert", o, "a file path")?,
            tls_key: take(&mut table, "tls_key", o, "a file path")?,
            upstream_ca: take(&mut table, "upstream_ca", o, "a file path")?,
            upstream_client_cert: take(&mut table, "upstream_client_cert", o, "a file path")?,
            upstream_client_key: take(&mut table, "upstream_client_key", o, "a file path")?,
            upstream_insecure: take(&mut table, "upstream_insecure", o, "true or false")?,
            upstream_token: take(&mut table, "upstream_token", o, "a string")?,
            upstream_token_file: take(&mut table, "upstream_token_file", o, "a file path")?,
            trusted_user_header: take(&mut table, "trusted_user_header", o, "a header name")?,
            user_mismatch: take(&mut table, "user_mismatch", o, "a string")?,
            admin_listen: take(&mut table, "admin_listen", o, "a string like \"127.0.0.1:9464\"")?,
            shutdown_grace: take(&mut table, "shutdown_grace", o, "a duration string like \"30s\"")?,
            workers: take(&mut table, "workers", o, "a non-negative integer")?,
        };
        if let Some(ks) = table.remove("kernelspecs") {
            let ks = ks
                .as_table()
                .ok_or_else(|| ConfigError(format!("invalid `kernelspecs` ({o}): expected a table of tables")))?;
            let mut list = Vec::new();
            for (name, t) in ks {
                let key = format!("kernelspecs.{name}");
                let t = t.as_table().ok_or_else(|| ConfigError(format!("invalid `{key}` ({o}): expected a table")))?;
                if let Some(k) = t.keys().find(|k| *k != "client_envs") {
                    return Err(ConfigError(format!("unknown key `{key}.{k}` in {o} (known keys: client_envs)")));
                }
                let envs: Vec<String> = match t.get("client_envs") {
                    None => Vec::new(),
                    Some(v) => v.clone().try_into().map_err(|_| {
                        ConfigError(format!("invalid `{key}.client_envs` ({o}): expected an array of strings"))
                    })?,
                };
                list.push((name.clone(), envs));
            }
            raw.kernelspecs = Some(Setting { value: list, origin: o.to_string() });
        }
        if let Some(vp) = table.remove("value_patterns") {
            let err = || ConfigError(format!("invalid `value_patterns` ({o}): expected a table of NAME = \"REGEX\""));
            let t = vp.as_table().ok_or_else(err)?;
            let mut list = Vec::new();
            for (name, v) in t {
                list.push((name.clone(), v.as_str().ok_or_else(err)?.to_string()));
            }
            raw.value_patterns = Some(Setting { value: list, origin: o.to_string() });
        }
        Ok(raw)
    }

    fn overlay(&mut self, opts: &Opts) -> Result<(), ConfigError> {
        fn set<T>(slot: &mut Option<Setting<T>>, v: Option<T>, key: &str) {
            if let Some(value) = v {
                let flag = key.replace('_', "-");
                let env = format!("ENVGATE_{}", key.to_ascii_uppercase());
                *slot = Some(Setting { value, origin: format!("--{flag} or {env}") });
            }
        }
        set(&mut self.listen, opts.listen.clone(), "listen");
        set(&mut self.upstream, opts.upstream.clone(), "upstream");
        set(&mut self.mode, opts.mode.clone(), "mode");
        set(&mut self.client_envs, opts.client_envs.clone().map(trim_list), "client_envs");
        set(&mut self.deny_envs, opts.deny_envs.clone().map(trim_list), "deny_envs");
        set(&mut self.sessions, opts.sessions.clone(), "sessions");
        set(&mut self.kernel_path, opts.kernel_path.clone(), "kernel_path");
        // Not trimmed: a forbidden text may be (or hold) white space.
        set(&mut self.value_forbidden, opts.value_forbidden.clone(), "value_forbidden");
        set(&mut self.kernelspec_cache_ttl, opts.kernelspec_cache_ttl.clone(), "kernelspec_cache_ttl");
        set(&mut self.connect_timeout, opts.connect_timeout.clone(), "connect_timeout");
        set(&mut self.response_timeout, opts.response_timeout.clone(), "response_timeout");
        set(&mut self.body_idle_timeout, opts.body_idle_timeout.clone(), "body_idle_timeout");
        set(&mut self.audit_log, opts.audit_log.clone(), "audit_log");
        set(&mut self.log_format, opts.log_format.clone(), "log_format");
        set(&mut self.tls_cert, opts.tls_cert.clone(), "tls_cert");
        set(&mut self.tls_key, opts.tls_key.clone(), "tls_key");
        set(&mut self.upstream_ca, opts.upstream_ca.clone(), "upstream_ca");
        set(&mut self.upstream_client_cert, opts.upstream_client_cert.clone(), "upstream_client_cert");
        set(&mut self.upstream_client_key, opts.upstream_client_key.clone(), "upstream_client_key");
        set(&mut self.upstream_token, opts.upstream_token.clone(), "upstream_token");
        set(&mut self.upstream_token_file, opts.upstream_token_file.clone(), "upstream_token_file");
        set(&mut self.trusted_user_header, opts.trusted_user_header.clone(), "trusted_user_header");
        set(&mut self.user_mismatch, opts.user_mismatch.clone(), "user_mismatch");
        set(&mut self.admin_listen, opts.admin_listen.clone(), "admin_listen");
        set(&mut self.shutdown_grace, opts.shutdown_grace.clone(), "shutdown_grace");
        set(&mut self.allow_prefixes, opts.allow_prefixes.clone().map(trim_list), "allow_prefixes");
        let origin = |k: &str| format!("--{} or ENVGATE_{}", k.replace('_', "-"), k.to_ascii_uppercase());
        for (slot, v, key) in [
            (&mut self.kernel_prefix, &opts.kernel_prefix, "kernel_prefix"),
            (&mut self.kernelspec_metadata, &opts.kernelspec_metadata, "kernelspec_metadata"),
            (&mut self.kernelspec_env, &opts.kernelspec_env, "kernelspec_env"),
            (&mut self.process_proxy_envs, &opts.process_proxy_envs, "process_proxy_envs"),
            (&mut self.inherit_eg_env_config, &opts.inherit_eg_env_config, "inherit_eg_env_config"),
            (&mut self.upstream_insecure, &opts.upstream_insecure, "upstream_insecure"),
        ] {
            if let Some(v) = v {
                let value = parse_bool(v).ok_or_else(|| {
                    ConfigError(format!("invalid `{key}` ({}): expected true or false, got {v:?}", origin(key)))
                })?;
                *slot = Some(Setting { value, origin: origin(key) });
            }
        }
        for (slot, v, key, what) in [
            (&mut self.workers, &opts.workers, "workers", "a non-negative integer"),
            (&mut self.max_body_bytes, &opts.max_body_bytes, "max_body_bytes", "a positive integer"),
            (&mut self.value_max_length, &opts.value_max_length, "value_max_length", "a positive integer"),
        ] {
            if let Some(v) = v {
                let value = v.trim().parse::<u64>().map_err(|_| {
                    ConfigError(format!("invalid `{key}` ({}): expected {what}, got {v:?}", origin(key)))
                })?;
                *slot = Some(Setting { value, origin: origin(key) });
            }
        }
        if let Some(items) = &opts.value_patterns {
            let o = origin("value_patterns");
            let mut list = Vec::new();
            for item in items.iter().filter(|s| !s.trim().is_empty()) {
                let (name, re) = item.split_once('=').ok_or_else(|| {
                    ConfigError(format!("invalid `value_patterns` ({o}): expected NAME=REGEX, got {item:?}"))
                })?;
                list.push((name.trim().to_string(), re.to_string()));
            }
            self.value_patterns = Some(Setting { value: list, origin: o });
        }
        if let Some(items) = &opts.kernelspec_client_envs {
            let o = origin("kernelspec_client_envs");
            let mut list = Vec::new();
            for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
                let (name, envs) = item.split_once('=').ok_or_else(|| {
                    ConfigError(format!("invalid `kernelspecs` ({o}): expected NAME=A,B, got {item:?}"))
                })?;
                list.push((name.trim().to_string(), trim_list(envs.split(',').map(str::to_string).collect())));
            }
            self.kernelspecs = Some(Setting { value: list, origin: o });
        }
        Ok(())
    }

    /// Validates everything; `env` reads envgate's own environment (for `inherit_eg_env_config`).
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let listen =
            match &self.listen {
                None => "127.0.0.1:8889".parse().expect("default listen address"),
                Some(s) => s.value.trim().parse::<SocketAddr>().map_err(|_| {
                    s.err("listen", format!("expected an address like 127.0.0.1:8889, got {:?}", s.value))
                })?,
            };
        let upstream = match &self.upstream {
            None => parse_upstream("http://127.0.0.1:8888").expect("default upstream"),
            Some(s) => parse_upstream(&s.value).map_err(|m| s.err("upstream", m))?,
        };
        let mode = match &self.mode {
            None => Mode::Drop,
            Some(s) => match s.value.trim() {
                "drop" => Mode::Drop,
                "reject" => Mode::Reject,
                "report" => Mode::Report,
                v => return Err(s.err("mode", format!("expected drop, reject or report, got {v:?}"))),
            },
        };
        let sessions = match &self.sessions {
            None => Sessions::Deny,
            Some(s) => match s.value.trim() {
                "deny" => Sessions::Deny,
                "allow" => Sessions::Allow,
                v => return Err(s.err("sessions", format!("expected deny or allow, got {v:?}"))),
            },
        };
        let names = |s: &Option<Setting<Vec<String>>>, key: &str| -> Result<Option<BTreeSet<String>>, ConfigError> {
            let Some(s) = s else { return Ok(None) };
            check_names(&s.value).map_err(|m| s.err(key, m))?;
            Ok(Some(s.value.iter().cloned().collect()))
        };
        let client_envs = names(&self.client_envs, "client_envs")?.unwrap_or_default();
        let deny_envs = names(&self.deny_envs, "deny_envs")?
            .unwrap_or_else(|| policy::DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect());
        let mut kernelspecs = HashMap::new();
        if let Some(s) = &self.kernelspecs {
            for (name, envs) in &s.value {
                if name.is_empty() {
                    return Err(s.err("kernelspecs", "a kernelspec name is empty"));
                }
                check_names(envs).map_err(|m| s.err(&format!("kernelspecs.{name}.client_envs"), m))?;
                kernelspecs.entry(name.to_ascii_lowercase()).or_insert_with(NameSet::new).extend(envs.iter().cloned());
            }
        }
        let duration = |s: &Option<Setting<String>>, key: &str, default: u64| -> Result<Duration, ConfigError> {
            match s {
                None => Ok(Duration::from_secs(default)),
                Some(s) => humantime::parse_duration(s.value.trim())
                    .map_err(|e| s.err(key, format!("expected a duration like \"10s\", got {:?} ({e})", s.value))),
            }
        };
        let kernelspec_cache_ttl = duration(&self.kernelspec_cache_ttl, "kernelspec_cache_ttl", 10)?;
        let connect_timeout = duration(&self.connect_timeout, "connect_timeout", 5)?;
        let response_timeout = duration(&self.response_timeout, "response_timeout", 120)?;
        let body_idle_timeout = duration(&self.body_idle_timeout, "body_idle_timeout", 60)?;
        for (d, s, key) in [
            (connect_timeout, &self.connect_timeout, "connect_timeout"),
            (response_timeout, &self.response_timeout, "response_timeout"),
            (body_idle_timeout, &self.body_idle_timeout, "body_idle_timeout"),
        ] {
            if d.is_zero() {
                return Err(s.as_ref().expect("defaults are not zero").err(key, "must be greater than zero"));
            }
        }
        let max_body_bytes = match &self.max_body_bytes {
            None => 1024 * 1024,
            Some(s) if s.value == 0 || s.value > (1 << 30) => {
                return Err(s.err("max_body_bytes", "expected an integer between 1 and 1073741824"))
            }
            Some(s) => s.value as usize,
        };
        let values = value_rules(&self.value_max_length, &self.value_forbidden, &self.value_patterns)?;
        let kernel_path = match &self.kernel_path {
            None => PathRule::RefuseEscape,
            Some(s) => PathRule::parse(s.value.trim()).ok_or_else(|| {
                s.err("kernel_path", format!("expected refuse_escape, strip or keep, got {:?}", s.value))
            })?,
        };
        let audit_log = match &self.audit_log {
            None => AuditTarget::Stdout,
            Some(s) if s.value.trim() == "-" => AuditTarget::Stdout,
            Some(s) if s.value.trim().is_empty() => return Err(s.err("audit_log", "expected \"-\" or a file path")),
            Some(s) => AuditTarget::File(PathBuf::from(s.value.trim())),
        };
        let mut prefixes = Vec::new();
        if flag(&self.kernel_prefix, true) {
            prefixes.push(PrefixRule::new(policy::KERNEL_PREFIX));
        }
        if let Some(s) = &self.allow_prefixes {
            if let Some(bad) = s.value.iter().find(|p| p.is_empty() || !policy::valid_name(p)) {
                return Err(s.err("allow_prefixes", format!("{bad:?} is not a valid name prefix")));
            }
            for p in &s.value {
                if !prefixes.iter().any(|r| &r.prefix == p) {
                    prefixes.push(PrefixRule::new(p));
                }
            }
        }
        let log_format = match &self.log_format {
            None => LogFormat::Text,
            Some(s) => match s.value.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                v => return Err(s.err("log_format", format!("expected text or json, got {v:?}"))),
            },
        };
        let path = |s: &Option<Setting<String>>, key: &str| -> Result<Option<PathBuf>, ConfigError> {
            match s {
                None => Ok(None),
                Some(s) if s.value.trim().is_empty() => Err(s.err(key, "expected a file path")),
                Some(s) => Ok(Some(PathBuf::from(s.value.trim()))),
            }
        };
        let pair = |a: &Option<Setting<String>>, ka: &str, b: &Option<Setting<String>>, kb: &str| match (
            path(a, ka)?,
            path(b, kb)?,
        ) {
            (None, None) => Ok(None),
            (Some(x), Some(y)) => Ok(Some((x, y))),
            (Some(_), None) => Err(a.as_ref().expect("set").err(ka, format!("needs `{kb}` too"))),
            (None, Some(_)) => Err(b.as_ref().expect("set").err(kb, format!("needs `{ka}` too"))),
        };
        let tls = pair(&self.tls_cert, "tls_cert", &self.tls_key, "tls_key")?;
        let upstream_tls = UpstreamTls {
            ca: path(&self.upstream_ca, "upstream_ca")?,
            client_cert: pair(
                &self.upstream_client_cert,
                "upstream_client_cert",
                &self.upstream_client_key,
                "upstream_client_key",
            )?,
            insecure: flag(&self.upstream_insecure, false),
        };
        let upstream_token = match (&self.upstream_token, &self.upstream_token_file) {
            (Some(t), Some(_)) => {
                return Err(t.err("upstream_token", "set either it or `upstream_token_file`, not both"))
            }
            (Some(t), None) => Some(Secret(t.value.trim().to_string())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f.value.trim())
                    .map_err(|e| f.err("upstream_token_file", format!("cannot read {:?}: {e}", f.value)))?;
                Some(Secret(text.trim().to_string()))
            }
            (None, None) => None,
        };
        if let Some(t) = &upstream_token {
            if t.0.is_empty() || http::HeaderValue::from_str(&format!("token {}", t.0)).is_err() {
                let s = self.upstream_token.as_ref().or(self.upstream_token_file.as_ref()).expect("set");
                return Err(s.err("upstream_token", "the token is empty or not a valid header value"));
            }
        }
        let on_mismatch = match &self.user_mismatch {
            None => Mismatch::Refuse,
            Some(s) => match s.value.trim() {
                "refuse" => Mismatch::Refuse,
                "overwrite" => Mismatch::Overwrite,
                v => return Err(s.err("user_mismatch", format!("expected refuse or overwrite, got {v:?}"))),
            },
        };
        let identity = match &self.trusted_user_header {
            None => None,
            Some(s) => Some(Identity {
                header: http::HeaderName::from_bytes(s.value.trim().as_bytes())
                    .map_err(|_| s.err("trusted_user_header", format!("{:?} is not a header name", s.value)))?,
                on_mismatch,
            }),
        };
        let admin_listen = match &self.admin_listen {
            None => None,
            Some(s) => Some(s.value.trim().parse::<SocketAddr>().map_err(|_| {
                s.err("admin_listen", format!("expected an address like 127.0.0.1:9464, got {:?}", s.value))
            })?),
        };
        let shutdown_grace = duration(&self.shutdown_grace, "shutdown_grace", 30)?;
        let workers = match &self.workers {
            Some(s) if s.value > 256 => return Err(s.err("workers", "expected an integer between 0 and 256")),
            Some(s) if s.value > 0 => s.value as usize,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if upstream.scheme != Scheme::HTTPS && (upstream_tls.ca.is_some() || upstream_tls.client_cert.is_some()) {
            let s = self.upstream_ca.as_ref().or(self.upstream_client_cert.as_ref()).expect("set");
            return Err(s.err("upstream_ca", "upstream TLS settings need an https:// upstream"));
        }
        Ok(Config {
            listen,
            tls,
            upstream_tls,
            upstream_token,
            identity,
            admin_listen,
            shutdown_grace,
            workers,
            upstream,
            policy: Policy {
                mode,
                sessions,
                prefixes,
                client_envs: client_envs.into(),
                deny_envs: deny_envs.into(),
                kernelspecs,
                kernelspec_metadata: flag(&self.kernelspec_metadata, true),
                kernelspec_env: flag(&self.kernelspec_env, false),
                process_proxy_envs: flag(&self.process_proxy_envs, false),
                eg_config: flag(&self.inherit_eg_env_config, false).then(|| EgEnvs::from_env(env)),
                values,
                kernel_path,
            },
            kernelspec_cache_ttl,
            max_body_bytes,
            connect_timeout,
            response_timeout,
            body_idle_timeout,
            audit_log,
            log_format,
        })
    }
}

/// The value rules: built-in defaults, with the configured length, forbidden texts and patterns on top.
fn value_rules(
    max_length: &Option<Setting<u64>>,
    forbidden: &Option<Setting<Vec<String>>>,
    patterns: &Option<Setting<Vec<(String, String)>>>,
) -> Result<ValueRules, ConfigError> {
    let mut rules = ValueRules::default();
    if let Some(s) = max_length {
        if s.value == 0 || s.value > (1 << 24) {
            return Err(s.err("value_max_length", "expected an integer between 1 and 16777216"));
        }
        rules.max_length = s.value as usize;
    }
    if let Some(s) = forbidden {
        if s.value.iter().any(String::is_empty) {
            return Err(s.err("value_forbidden", "an empty text would forbid every value"));
        }
        rules.forbidden = Forbidden::new(s.value.clone());
    }
    if let Some(s) = patterns {
        for (name, re) in &s.value {
            let key = format!("value_patterns.{name}");
            if !policy::valid_name(name) {
                return Err(s.err(&key, format!("{name:?} is not a valid environment variable name")));
            }
            if re.is_empty() {
                rules.patterns.remove(name);
                continue;
            }
            let p = Pattern::new(re).map_err(|e| s.err(&key, format!("not a valid regular expression: {e}")))?;
            rules.patterns.insert(name.clone(), p);
        }
    }
    Ok(rules)
}

fn flag(s: &Option<Setting<bool>>, default: bool) -> bool {
    s.as_ref().map_or(default, |s| s.value)
}

fn trim_list(v: Vec<String>) -> Vec<String> {
    v.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn check_names(names: &[String]) -> Result<(), String> {
    match names.iter().find(|n| !policy::valid_name(n)) {
        Some(bad) => Err(format!("{bad:?} is not a valid environment variable name")),
        None => Ok(()),
    }
}

/// Parses the upstream URL: `http://host:port[/base_url]`, no query or fragment.
pub fn parse_upstream(s: &str) -> Result<UpstreamUrl, String> {
    let uri: Uri =
        s.trim().parse().map_err(|e| format!("expected a URL like http://127.0.0.1:8888, got {s:?} ({e})"))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| format!("{s:?} has no scheme (http://)"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!("scheme {scheme} is not supported (use http:// or https://)"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("{s:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }
    if uri.query().is_some() {
        return Err(format!("{s:?} has a query string; only a base path is allowed"));
    }
    let path = uri.path();
    // EG joins base_url into its route regexes unescaped: a metacharacter would make EG match
    // paths envgate cannot know about.
    if let Some(c) = path.chars().find(|c| "^$*+?()[]{}|\\".contains(*c)) {
        return Err(format!("the base path {path:?} holds {c:?}, which EG would read as a regular expression"));
    }
    let base = if path.ends_with('/') { path.to_string() } else { format!("{path}/") };
    Ok(UpstreamUrl { scheme, authority, base })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Opts {
        Opts::default()
    }

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text)
    }

    #[test]
    fn defaults() {
        let c = Config::load(&opts()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8889".parse().unwrap());
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:8888/");
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.kernelspec_cache_ttl, Duration::from_secs(10));
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.response_timeout, Duration::from_secs(120));
        assert_eq!(c.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.audit_log, AuditTarget::Stdout);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn every_key_from_a_file() {
        let c = load_toml(
            r#"
            listen = "0.0.0.0:9000"
            upstream = "http://eg:8888/gw"
            mode = "reject"
            client_envs = ["FOO", "BAR"]
            deny_envs = ["EVIL"]
            kernel_prefix = false
            sessions = "allow"
            kernelspec_cache_ttl = "2s"
            max_body_bytes = 4096
            connect_timeout = "1s"
            response_timeout = "3m"
            body_idle_timeout = "90s"
            audit_log = "/var/log/envgate.jsonl"
            log_format = "json"
            [kernelspecs.Spark]
            client_envs = ["SPARK_OPTS"]
            [kernelspecs.r]
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.upstream.base, "/gw/");
        assert_eq!(c.upstream.authority.as_str(), "eg:8888");
        assert_eq!(c.policy.mode, Mode::Reject);
        assert_eq!(c.policy.client_envs, BTreeSet::from(["FOO".into(), "BAR".into()]));
        assert_eq!(c.policy.deny_envs, BTreeSet::from(["EVIL".into()]));
        assert!(!c.policy.kernel_prefix());
        assert_eq!(c.policy.sessions, Sessions::Allow);
        assert_eq!(c.policy.kernelspecs["spark"], BTreeSet::from(["SPARK_OPTS".into()]));
        assert!(c.policy.kernelspecs["r"].is_empty());
        assert_eq!(c.kernelspec_cache_ttl, Duration::from_secs(2));
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.response_timeout, Duration::from_secs(180));
        assert_eq!(c.body_idle_timeout, Duration::from_secs(90));
        assert_eq!(c.audit_log, AuditTarget::File("/var/log/envgate.jsonl".into()));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envgate.toml");
        std::fs::write(&path, "mode = \"reject\"\nclient_envs = [\"A\"]\n[kernelspecs.x]\nclient_envs=[\"X\"]\n")
            .unwrap();
        let o = Opts {
            config: Some(path),
            mode: Some("report".into()),
            client_envs: Some(vec!["FOO".into(), " BAR ".into(), "".into()]),
            kernel_prefix: Some("false".into()),
            kernelspec_client_envs: Some(vec!["py=P1,P2".into(), "r=".into()]),
            max_body_bytes: Some("10".into()),
            body_idle_timeout: Some("2s".into()),
            ..Opts::default()
        };
        let c = Config::load(&o).unwrap();
        assert_eq!(c.body_idle_timeout, Duration::from_secs(2));
        assert_eq!(c.policy.mode, Mode::Report);
        assert_eq!(c.policy.client_envs, BTreeSet::from(["FOO".into(), "BAR".into()]));
        assert!(!c.policy.kernel_prefix());
        assert!(!c.policy.kernelspecs.contains_key("x"));
        assert_eq!(c.policy.kernelspecs["py"], BTreeSet::from(["P1".into(), "P2".into()]));
        assert_eq!(c.max_body_bytes, 10);
    }

    #[test]
    fn value_rules_and_kernel_path_from_file_and_flags() {
        let d = load_toml("").unwrap();
        assert_eq!(d.policy.values, ValueRules::default());
        assert_eq!(d.policy.kernel_path, PathRule::RefuseEscape);
        let c = load_toml(
            r#"
            value_max_length = 100
            value_forbidden = ["$", "\u0000", ";"]
            kernel_path = "strip"
            [value_patterns]
            KERNEL_UID = "[0-9]+"
            KERNEL_IMAGE = ""
            MY_VAR = "a|b"
            "#,
        )
        .unwrap();
        let v = &c.policy.values;
        assert_eq!(v.max_length, 100);
        assert_eq!(v.forbidden.texts(), ["$", "\0", ";"]);
        assert_eq!(c.policy.kernel_path, PathRule::Strip);
        assert!(v.check("KERNEL_UID", "0").is_none(), "replaced");
        assert!(v.check("KERNEL_IMAGE", "Anything Goes").is_none(), "removed");
        assert!(v.check("MY_VAR", "ab").is_some(), "added, anchored");
        assert!(v.check("KERNEL_GID", "0").is_some(), "built-in kept");
        // the effective policy is itself a valid config with the same rules
        let again = load_toml(&c.effective()).unwrap();
        assert_eq!(again.policy.values, c.policy.values);
        assert_eq!(again.policy.kernel_path, PathRule::Strip);

        let o = Opts {
            value_max_length: Some("7".into()),
            value_forbidden: Some(vec!["x".into()]),
            value_patterns: Some(vec!["KERNEL_UID=[0-9]+".into(), "KERNEL_GID=".into()]),
            kernel_path: Some("keep".into()),
            ..opts()
        };
        let mut raw = Raw::default();
        raw.overlay(&o).unwrap();
        let c = raw.validate(&|_| None).unwrap();
        assert_eq!(c.policy.values.max_length, 7);
        assert_eq!(c.policy.values.forbidden.texts(), ["x"]);
        assert!(c.policy.values.check("KERNEL_UID", "0").is_none());
        assert!(!c.policy.values.patterns.contains_key("KERNEL_GID"));
        assert_eq!(c.policy.kernel_path, PathRule::Keep);
        let bad = Opts { value_patterns: Some(vec!["NOEQUALS".into()]), ..opts() };
        let e = Raw::default().overlay(&bad).unwrap_err().to_string();
        assert!(e.contains("--value-patterns") || e.contains("value_patterns"), "{e}");
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        for (text, key) in [
            ("mode = \"dorp\"", "`mode`"),
            ("mode = 3", "`mode`"),
            ("listen = \"nowhere\"", "`listen`"),
            ("upstream = \"ftp://x\"", "`upstream`"),
            ("upstream = \"http://x/?a=1\"", "`upstream`"),
            ("upstream = \"https://x\"\nupstream_client_cert = \"c.pem\"", "`upstream_client_key`"),
            ("upstream_ca = \"ca.pem\"", "`upstream_ca`"),
            ("tls_cert = \"c.pem\"", "`tls_key`"),
            ("user_mismatch = \"ignore\"", "`user_mismatch`"),
            ("trusted_user_header = \"X User\"", "`trusted_user_header`"),
            ("admin_listen = \"nope\"", "`admin_listen`"),
            ("shutdown_grace = \"a while\"", "`shutdown_grace`"),
            ("workers = -1", "`workers`"),
            ("workers = 1000", "`workers`"),
            ("upstream_token = \"a\"\nupstream_token_file = \"f\"", "`upstream_token`"),
            ("upstream_token_file = \"/nonexistent/token\"", "`upstream_token_file`"),
            ("client_envs = \"FOO\"", "`client_envs`"),
            ("client_envs = [\"A=B\"]", "`client_envs`"),
            ("deny_envs = [1]", "`deny_envs`"),
            ("kernel_prefix = \"yes\"", "`kernel_prefix`"),
            ("sessions = \"maybe\"", "`sessions`"),
            ("kernelspec_cache_ttl = \"soon\"", "`kernelspec_cache_ttl`"),
            ("max_body_bytes = 0", "`max_body_bytes`"),
            ("max_body_bytes = -5", "`max_body_bytes`"),
            ("connect_timeout = \"0s\"", "`connect_timeout`"),
            ("body_idle_timeout = \"0s\"", "`body_idle_timeout`"),
            ("body_idle_timeout = \"idle\"", "`body_idle_timeout`"),
            ("body_idle_timeout = 60", "`body_idle_timeout`"),
            ("log_format = \"xml\"", "`log_format`"),
            ("audit_log = \"\"", "`audit_log`"),
            ("colour = 1", "`colour`"),
            ("[kernelspecs.py]\nclient_env = []", "`kernelspecs.py.client_env`"),
            ("[kernelspecs.py]\nclient_envs = \"A\"", "`kernelspecs.py.client_envs`"),
            ("kernelspecs = 1", "`kernelspecs`"),
            ("value_max_length = 0", "`value_max_length`"),
            ("value_forbidden = [\"\"]", "`value_forbidden`"),
            ("value_forbidden = \"$\"", "`value_forbidden`"),
            ("kernel_path = \"jail\"", "`kernel_path`"),
            ("value_patterns = 1", "`value_patterns`"),
            ("[value_patterns]\nKERNEL_UID = 0", "`value_patterns`"),
            ("[value_patterns]\nKERNEL_UID = \"(\"", "`value_patterns.KERNEL_UID`"),
            ("[value_patterns]\n\"A=B\" = \"x\"", "`value_patterns.A=B`"),
            ("mode = ", "line 1"),
            ("\n\nmode = \"drop\"\nmode = \"drop\"", "line 4"),
        ] {
            let e = load_toml(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?} -> {e}");
            assert!(!e.contains('\n'), "{text:?} -> {e}");
        }
    }

    #[test]
    fn policy_sources_from_file_and_flags() {
        let c = load_toml(
            "kernelspec_metadata = false\nkernelspec_env = true\nprocess_proxy_envs = true\n\
             allow_prefixes = [\"SPARK_\", \"KERNEL_\"]\nkernel_prefix = false\n",
        )
        .unwrap();
        assert!(!c.policy.kernelspec_metadata && c.policy.kernelspec_env && c.policy.process_proxy_envs);
        let p: Vec<&str> = c.policy.prefixes.iter().map(|p| p.prefix.as_str()).collect();
        assert_eq!(p, ["SPARK_", "KERNEL_"]);
        assert!(c.policy.eg_config.is_none());
        let d = Config::from_toml("").unwrap();
        assert!(d.policy.kernelspec_metadata && !d.policy.kernelspec_env && !d.policy.process_proxy_envs);
        assert!(load_toml("allow_prefixes = [\"\"]").unwrap_err().to_string().contains("`allow_prefixes`"));
        assert!(load_toml("kernelspec_env = 1").unwrap_err().to_string().contains("`kernelspec_env`"));
        let raw = Raw::from_toml("inherit_eg_env_config = true", Path::new("f")).unwrap();
        let c = raw.validate(&|k| (k == "EG_CLIENT_ENVS").then(|| "A,B".to_string())).unwrap();
        assert_eq!(c.policy.eg_config.unwrap().names, BTreeSet::from(["A".into(), "B".into()]));
        let o = Opts {
            inherit_eg_env_config: Some("true".into()),
            allow_prefixes: Some(vec!["X_".into()]),
            ..Opts::default()
        };
        let mut raw = Raw::default();
        raw.overlay(&o).unwrap();
        let c = raw.validate(&|k| (k == "EG_ENV_WHITELIST").then(|| "*".to_string())).unwrap();
        assert!(c.policy.eg_config.unwrap().all);
        assert_eq!(c.policy.prefixes.len(), 2);
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let o = Opts { mode: Some("x".into()), ..Opts::default() };
        let e = Config::load(&o).unwrap_err().to_string();
        assert!(e.contains("`mode`") && e.contains("--mode") && e.contains("ENVGATE_MODE"), "{e}");
        let o = Opts { kernelspec_client_envs: Some(vec!["nope".into()]), ..Opts::default() };
        assert!(Config::load(&o).unwrap_err().to_string().contains("NAME=A,B"));
        let o = Opts { body_idle_timeout: Some("0s".into()), ..Opts::default() };
        let e = Config::load(&o).unwrap_err().to_string();
        assert!(
            e.contains("`body_idle_timeout`")
                && e.contains("--body-idle-timeout")
                && e.contains("ENVGATE_BODY_IDLE_TIMEOUT"),
            "{e}"
        );
    }

    #[test]
    fn body_idle_timeout_is_in_the_effective_config() {
        let c = load_toml("body_idle_timeout = \"1m 30s\"").unwrap();
        assert_eq!(c.body_idle_timeout, Duration::from_secs(90));
        let text = c.effective();
        assert!(text.contains("body_idle_timeout = \"1m 30s\""), "{text}");
        assert_eq!(load_toml(&text).unwrap().body_idle_timeout, Duration::from_secs(90));
    }

    #[test]
    fn upstream_base_paths() {
        assert_eq!(parse_upstream("http://h:1").unwrap().base, "/");
        assert_eq!(parse_upstream("http://h:1/").unwrap().base, "/");
        assert_eq!(parse_upstream("http://h:1/gw").unwrap().base, "/gw/");
        assert_eq!(parse_upstream("http://h:1/a/b/").unwrap().base, "/a/b/");
        assert!(parse_upstream("h:1").is_err());
        assert!(parse_upstream("http://u:p@h:1").is_err());
        assert!(parse_upstream("http://h:1/g(w)").is_err());
        assert!(parse_upstream("http://h:1/g*").is_err());
        assert!(parse_upstream("http://h:1/g.w").is_ok());
    }
}
