//! Every setting, declared once: its config-file key, flag, `ENVGATE_*` variable, type, default
//! and help. The flag struct ([`Opts`]), the keys a file may hold, the merge (file, then the
//! environment, then flags, each value keeping where it came from) and the lines `envgate check`
//! prints are all made from this one table.
//!
//! Adding a setting: a row in the table, its sample in the test that walks the table
//! (`every_setting_from_file_environment_and_flag_in_that_order`), and its row in the docs.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgMatches};

use super::kinds::*;
use super::{ConfigError, LogFormat, Mismatch};
use crate::policy::{Mode, Sessions};
use crate::values::PathRule;

/// One setting's value and where it came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<T> {
    pub value: T,
    pub origin: String,
}

impl<T> Setting<T> {
    pub fn err(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        At { key, origin: &self.origin }.err(msg)
    }
}

/// The field type of a resolved setting: present when it has a default.
macro_rules! slot {
    ($kind:ty) => { Option<Setting<<$kind as Kind>::Value>> };
    ($kind:ty, $default:expr) => { Setting<<$kind as Kind>::Value> };
}

/// A resolved setting: the given value, or the declared default (written as in a config file).
macro_rules! resolve {
    ($given:expr, $kind:ty, $key:expr) => {
        $given
    };
    ($given:expr, $kind:ty, $key:expr, $default:expr) => {
        match $given {
            Some(s) => s,
            None => {
                let at = At { key: $key, origin: "the default" };
                Setting {
                    value: <$kind as Kind>::from_toml(toml::Value::from($default), &at)?,
                    origin: at.origin.into(),
                }
            }
        }
    };
}

/// A resolved setting's value: always there with a default, maybe absent without.
macro_rules! given {
    ($setting:expr) => {
        $setting.as_ref().map(|s| &s.value)
    };
    ($setting:expr, $default:expr) => {
        Some(&$setting.value)
    };
}

macro_rules! default_text {
    () => {
        None
    };
    ($default:expr) => {
        Some(stringify!($default))
    };
}

/// A setting's line in `envgate check`'s output, unless `Policy` prints it (with the built-in
/// values it merges in).
macro_rules! print_line {
    (policy, $out:ident, $given:expr, $kind:ty, $key:expr) => {};
    (, $out:ident, $given:expr, $kind:ty, $key:expr) => {
        if let Some(v) = $given {
            $out.push_str(&<$kind as Render>::line($key, v));
            $out.push('\n');
        }
    };
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident: $kind:ty $(= $default:expr)?, $flag:literal, $env:literal, $value_name:literal $(, $shown:ident)?;
    )*) => {
        /// Every setting as a flag and its `ENVGATE_*` variable, as clap read them; each overrides the
        /// config file's key.
        #[derive(Debug, Default, Clone)]
        pub struct Opts {
            /// The TOML configuration file.
            pub config: Option<PathBuf>,
            $(pub $key: Option<<$kind as Kind>::Flag>,)*
        }

        impl clap::Args for Opts {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                cmd.arg(
                    Arg::new("config")
                        .long("config")
                        .env("ENVGATE_CONFIG")
                        .value_name("FILE")
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("TOML configuration file"),
                )
                $(.arg(<$kind as Kind>::arg(
                    Arg::new(stringify!($key))
                        .long($flag)
                        .env($env)
                        .value_name($value_name)
                        .help(help(&[$($doc),+], default_text!($($default)?))),
                )))*
            }

            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }

        impl clap::FromArgMatches for Opts {
            fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
                Ok(Opts {
                    config: m.try_get_one::<PathBuf>("config").ok().flatten().cloned(),
                    $($key: <$kind as Kind>::flag(m, stringify!($key)),)*
                })
            }

            fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
                *self = Self::from_arg_matches(m)?;
                Ok(())
            }
        }

        /// The keys a config file may hold.
        pub const FILE_KEYS: &[&str] = &[$(stringify!($key)),*];

        /// The settings given so far: the file's, then the environment's and the flags' on top.
        #[derive(Debug, Default)]
        pub struct Raw {
            $($key: Option<Setting<<$kind as Kind>::Value>>,)*
        }

        impl Raw {
            fn from_table(mut table: toml::Table, origin: &str) -> Result<Raw, ConfigError> {
                if let Some(k) = table.keys().find(|k| !FILE_KEYS.contains(&k.as_str())) {
                    return Err(unknown_key("", k, origin, FILE_KEYS));
                }
                let mut raw = Raw::default();
                $(if let Some(v) = table.remove(stringify!($key)) {
                    let at = At { key: stringify!($key), origin };
                    raw.$key = Some(Setting { value: <$kind as Kind>::from_toml(v, &at)?, origin: origin.into() });
                })*
                Ok(raw)
            }

            /// Puts the flags (and the environment, which clap read for them) over what is there.
            pub fn overlay(&mut self, opts: &Opts) -> Result<(), ConfigError> {
                $(if let Some(f) = &opts.$key {
                    let at = At { key: stringify!($key), origin: concat!("--", $flag, " or ", $env) };
                    self.$key = Some(Setting { value: <$kind as Kind>::from_flag(f.clone(), &at)?, origin: at.origin.into() });
                })*
                Ok(())
            }

            /// Fills in the defaults.
            pub fn resolve(self) -> Result<Settings, ConfigError> {
                Ok(Settings { $($key: resolve!(self.$key, $kind, stringify!($key) $(, $default)?),)* })
            }
        }

        /// Every setting in force, with where it came from (a default, the file, a flag or variable).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Settings {
            $(pub $key: slot!($kind $(, $default)?),)*
        }

        impl Settings {
            /// The settings that `Policy` does not print, as lines of a config file.
            pub fn effective(&self) -> String {
                let mut out = String::new();
                $(print_line!($($shown)?, out, given!(self.$key $(, $default)?), $kind, stringify!($key));)*
                out
            }
        }
    };
}

settings! {
    /// Address to listen on.
    listen: Addr = "127.0.0.1:8889", "listen", "ENVGATE_LISTEN", "ADDR";
    /// The Enterprise Gateway to protect, with its base_url as path.
    upstream: Url = "http://127.0.0.1:8888", "upstream", "ENVGATE_UPSTREAM", "URL";
    /// What to do with a kernel start whose env breaks the policy.
    mode: Choice<Mode> = "drop", "mode", "ENVGATE_MODE", "MODE", policy;
    /// Names every kernelspec accepts, comma-separated [default: none].
    client_envs: Names, "client-envs", "ENVGATE_CLIENT_ENVS", "NAMES", policy;
    /// Names always refused, comma-separated; replaces the built-in list [default: see README].
    deny_envs: Names, "deny-envs", "ENVGATE_DENY_ENVS", "NAMES", policy;
    /// More names always refused, comma-separated; added to deny_envs (or to the built-in list)
    /// [default: none].
    extra_deny_envs: Names, "extra-deny-envs", "ENVGATE_EXTRA_DENY_ENVS", "NAMES", policy;
    /// Keep every KERNEL_* name, as EG does.
    kernel_prefix: Bool = true, "kernel-prefix", "ENVGATE_KERNEL_PREFIX", "BOOL", policy;
    /// More prefixes whose names are kept, comma-separated (e.g. SPARK_) [default: none].
    allow_prefixes: Prefixes, "allow-prefixes", "ENVGATE_ALLOW_PREFIXES", "PREFIXES", policy;
    /// Allow the names in a kernelspec's spec.metadata.client_envs.
    kernelspec_metadata: Bool = true, "kernelspec-metadata", "ENVGATE_KERNELSPEC_METADATA", "BOOL", policy;
    /// Allow the keys of a kernelspec's env stanza ("plan B").
    kernelspec_env: Bool = false, "kernelspec-env", "ENVGATE_KERNELSPEC_ENV", "BOOL", policy;
    /// Allow a kernelspec's process_proxy.config.forwarded_envs / forward_env ("plan C").
    process_proxy_envs: Bool = false, "process-proxy-envs", "ENVGATE_PROCESS_PROXY_ENVS", "BOOL", policy;
    /// Also allow what the gateway's own EG_CLIENT_ENVS / EG_ENV_WHITELIST / KG_ENV_WHITELIST
    /// (in envgate's environment) allow.
    inherit_eg_env_config: Switch = false,
        "inherit-eg-env-config", "ENVGATE_INHERIT_EG_ENV_CONFIG", "BOOL", policy;
    /// Per-kernelspec names, NAME=A,B; repeat the flag or separate with ';'.
    kernelspecs: Kernelspecs,
        "kernelspec-client-envs", "ENVGATE_KERNELSPEC_CLIENT_ENVS", "NAME=NAMES", policy;
    /// POST /api/sessions.
    sessions: Choice<Sessions> = "deny", "sessions", "ENVGATE_SESSIONS", "SESSIONS", policy;
    /// How long kernelspecs fetched from the upstream are trusted.
    kernelspec_cache_ttl: Span = "10s", "kernelspec-cache-ttl", "ENVGATE_KERNELSPEC_CACHE_TTL", "DURATION";
    /// Longest env value forwarded, in characters [default: 4096].
    value_max_length: Int<1, 16777216>, "value-max-length", "ENVGATE_VALUE_MAX_LENGTH", "CHARS", policy;
    /// Substrings no forwarded env value may hold, comma-separated; replaces the built-in list
    /// [default: $ ` CR LF NUL {{ {%].
    value_forbidden: Texts, "value-forbidden", "ENVGATE_VALUE_FORBIDDEN", "TEXTS", policy;
    /// A pattern a variable's whole value must match, NAME=REGEX (replaces a built-in one; NAME= removes
    /// it); repeat the flag, or separate with newlines in the environment variable.
    value_patterns: Patterns, "value-pattern", "ENVGATE_VALUE_PATTERNS", "NAME=REGEX", policy;
    /// The body's `path`.
    kernel_path: Choice<PathRule> = "refuse_escape", "kernel-path", "ENVGATE_KERNEL_PATH", "RULE", policy;
    /// Largest kernel-start body accepted, in bytes.
    max_body_bytes: Int<1, 1073741824> = 1048576, "max-body-bytes", "ENVGATE_MAX_BODY_BYTES", "BYTES";
    /// Upstream connect timeout, TLS handshake included.
    connect_timeout: Timeout = "5s", "connect-timeout", "ENVGATE_CONNECT_TIMEOUT", "DURATION";
    /// Upstream response-header timeout.
    response_timeout: Timeout = "120s", "response-timeout", "ENVGATE_RESPONSE_TIMEOUT", "DURATION";
    /// How long a streamed body (either way) may send nothing before its connection is aborted;
    /// never applies to WebSockets.
    body_idle_timeout: Timeout = "60s", "body-idle-timeout", "ENVGATE_BODY_IDLE_TIMEOUT", "DURATION";
    /// Audit log: - for stdout, or a file path (appended to).
    audit_log: AuditLog = "-", "audit-log", "ENVGATE_AUDIT_LOG", "PATH";
    /// Diagnostics format on stderr.
    log_format: Choice<LogFormat> = "text", "log-format", "ENVGATE_LOG_FORMAT", "FORMAT";
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    tls_cert: FilePath, "tls-cert", "ENVGATE_TLS_CERT", "PEM";
    /// The private key (PEM) for --tls-cert.
    tls_key: FilePath, "tls-key", "ENVGATE_TLS_KEY", "PEM";
    /// Verify an https upstream against these CA certificates (PEM) instead of the system roots.
    upstream_ca: FilePath, "upstream-ca", "ENVGATE_UPSTREAM_CA", "PEM";
    /// Client certificate (PEM) for mutual TLS with the upstream; needs --upstream-client-key.
    upstream_client_cert: FilePath, "upstream-client-cert", "ENVGATE_UPSTREAM_CLIENT_CERT", "PEM";
    /// The private key (PEM) for --upstream-client-cert.
    upstream_client_key: FilePath, "upstream-client-key", "ENVGATE_UPSTREAM_CLIENT_KEY", "PEM";
    /// Do not verify the upstream's certificate (development only).
    upstream_insecure: Switch = false, "upstream-insecure", "ENVGATE_UPSTREAM_INSECURE", "BOOL";
    /// EG's auth token, added upstream as `Authorization: token ...` (clients never see it).
    upstream_token: Token, "upstream-token", "ENVGATE_UPSTREAM_TOKEN", "TOKEN";
    /// A file holding EG's auth token (read at start-up and on reload).
    upstream_token_file: FilePath, "upstream-token-file", "ENVGATE_UPSTREAM_TOKEN_FILE", "PATH";
    /// A header set by a trusted authenticating proxy that names the user (e.g. X-Forwarded-User).
    trusted_user_header: Header, "trusted-user-header", "ENVGATE_TRUSTED_USER_HEADER", "HEADER";
    /// When the body's KERNEL_USERNAME differs from the trusted user.
    user_mismatch: Choice<Mismatch> = "refuse", "user-mismatch", "ENVGATE_USER_MISMATCH", "ACTION";
    /// A header set by the trusted authenticating proxy that lists the user's groups, comma-separated
    /// (e.g. X-Forwarded-Groups); needs --trusted-user-header.
    trusted_groups_header: Header, "trusted-groups-header", "ENVGATE_TRUSTED_GROUPS_HEADER", "HEADER";
    /// Verify a JWT on every request with these public keys: a JWKS file, or PEM public keys
    /// (re-read on reload) [default: off].
    jwt_keys: FilePath, "jwt-keys", "ENVGATE_JWT_KEYS", "PATH";
    /// The header holding the token: `Bearer <token>` (another header than Authorization may also
    /// hold the bare token).
    jwt_header: Header = "Authorization", "jwt-header", "ENVGATE_JWT_HEADER", "HEADER";
    /// The `iss` every token must have; needed with --jwt-keys.
    jwt_issuer: Text, "jwt-issuer", "ENVGATE_JWT_ISSUER", "ISSUER";
    /// The `aud` every token must have (or hold); needed with --jwt-keys.
    jwt_audience: Text, "jwt-audience", "ENVGATE_JWT_AUDIENCE", "AUDIENCE";
    /// How far a token's exp and nbf may be off the clock.
    jwt_leeway: Span = "30s", "jwt-leeway", "ENVGATE_JWT_LEEWAY", "DURATION";
    /// The token claim that names the user (a dotted path reaches into nested claims).
    user_claim: Text = "sub", "user-claim", "ENVGATE_USER_CLAIM", "CLAIM";
    /// The token claim that lists the user's groups (a dotted path reaches into nested claims).
    groups_claim: Text = "groups", "groups-claim", "ENVGATE_GROUPS_CLAIM", "CLAIM";
    /// Values envgate sets on every kernel start, NAME=TEMPLATE with {user}, {user_dns} and
    /// {kernelspec}; repeat the flag, or separate with newlines in the variable [default: none].
    set_envs: SetEnvs, "set-env", "ENVGATE_SET_ENVS", "NAME=TEMPLATE", policy;
    /// When a client sends another value for a name that set_envs sets.
    set_envs_mismatch: Choice<Mismatch> = "refuse", "set-envs-mismatch", "ENVGATE_SET_ENVS_MISMATCH", "ACTION";
    /// Per-user policy blocks, NAME={ client_envs = [...], kernelspecs = [...], ... } (inline TOML);
    /// repeat the flag, or separate with newlines in the variable [default: none].
    users: Users, "user-policy", "ENVGATE_USERS", "NAME={...}", policy;
    /// Per-group policy blocks, as --user-policy plus `priority` [default: none].
    groups: Groups, "group-policy", "ENVGATE_GROUPS", "NAME={...}", policy;
    /// Admin listener with /healthz, /readyz, /metrics, POST /-/reload and GET /-/policy [default: off].
    admin_listen: AdminAddr, "admin-listen", "ENVGATE_ADMIN_LISTEN", "ADDR";
    /// How often the config file and the files it names are checked for changes, which then reload
    /// the configuration; 0s turns the watch off.
    config_watch_interval: Span = "2s", "config-watch-interval", "ENVGATE_CONFIG_WATCH_INTERVAL", "DURATION";
    /// On SIGTERM, how long requests in flight and WebSockets may go on.
    shutdown_grace: Span = "30s", "shutdown-grace", "ENVGATE_SHUTDOWN_GRACE", "DURATION";
    /// Worker threads serving connections, each with its own event loop and upstream pool; 0 for
    /// one per core (read at start-up only).
    workers: Int<0, 256> = 0, "workers", "ENVGATE_WORKERS", "N";
}

/// A flag's help: its doc lines (without the final full stop, as clap's derive has it), and the
/// declared default.
fn help(doc: &[&str], default: Option<&str>) -> String {
    let mut help = doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    if help.ends_with('.') {
        help.pop();
    }
    if let Some(d) = default {
        help.push_str(&format!(" [default: {}]", d.trim_matches('"')));
    }
    help
}

impl Raw {
    /// Reads a config file's text; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Raw, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = match e.span() {
                Some(span) => format!(" at line {}", text[..span.start.min(text.len())].matches('\n').count() + 1),
                None => String::new(),
            };
            ConfigError(format!(
                "{}: TOML syntax error{line}: {}",
                path.display(),
                e.message().trim().replace('\n', "; ")
            ))
        })?;
        Raw::from_table(table, &path.display().to_string())
    }
}

/// An unknown key `within` a table (`""` or `kernelspecs.NAME.`), with the nearest known key
/// when one is near enough to be a typo.
pub fn unknown_key(within: &str, key: &str, origin: &str, known: &[&str]) -> ConfigError {
    let nearest = known
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    ConfigError(match nearest {
        Some((_, k)) => format!("unknown key `{within}{key}` in {origin}; did you mean `{within}{k}`?"),
        None => format!("unknown key `{within}{key}` in {origin} (known keys: {})", known.join(", ")),
    })
}
