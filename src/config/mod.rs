//! Configuration: a TOML file, `ENVGATE_*` environment variables and flags, merged into one
//! validated [`Config`] (flags win over the environment, the environment over the file).
//!
//! Every setting is declared once, in [`settings`]; its type ([`kinds`]) checks what the value
//! may be. What is left here are the rules between settings, and the [`Config`] they make.
//! Every problem names the key and where its value came from, so that `envgate check` and
//! start-up can print it and exit with code 2: one line for a config file's values and for
//! values clap takes as text; clap's own message (with the possible values) for a bad enum or
//! bool from a flag or variable.

mod files;
mod kinds;
mod settings;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;

pub use files::watched_files;
pub use settings::{Opts, FILE_KEYS};
use settings::{Raw, Setting, Settings};

use crate::identity::SetEnv;
use crate::policy::{self, Block, EgEnvs, NameSet, Policy, PrefixRule};
use crate::values::{Forbidden, ValueRules};

/// A configuration problem, as one line naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

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

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
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

/// Everything the connections to the upstream are made with: a reload that changes none of it
/// keeps the connection pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub url: UpstreamUrl,
    pub tls: UpstreamTls,
    /// EG's token, added upstream as `Authorization: token ...`.
    pub token: Option<Secret>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_idle_timeout: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// Serve TLS: (certificate chain, private key) PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub upstream: UpstreamSettings,
    pub identity: Option<Identity>,
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// Worker threads (0 in the settings: one per core, resolved here).
    pub workers: usize,
    pub policy: Policy,
    pub kernelspec_cache_ttl: Duration,
    pub max_body_bytes: usize,
    pub audit_log: AuditTarget,
    pub log_format: LogFormat,
    /// `set_envs_mismatch`: when a client's value differs from the one `set_envs` sets.
    pub set_envs_mismatch: Mismatch,
    /// `config_watch_interval`: how often the watched files are read; zero: not watched.
    pub config_watch_interval: Duration,
    /// Every setting as given, for [`Config::effective`].
    settings: Settings,
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

/// `user_mismatch`: the pure decision owns the type; configuration only reads it.
pub use crate::decide::Mismatch;

/// Identity: who is asking, from a trusted proxy's headers or a verified token. The user is
/// the kernel's `KERNEL_USERNAME`, and picks the `[users.NAME]` and `[groups.NAME]` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub from: IdentityFrom,
    /// `user_mismatch`: when the body's `KERNEL_USERNAME` names someone else.
    pub on_mismatch: Mismatch,
}

/// Where identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityFrom {
    /// `trusted_user_header` and, optionally, `trusted_groups_header`.
    Headers { user: http::HeaderName, groups: Option<http::HeaderName> },
    /// A token in `jwt_header`, verified with `jwt_keys`.
    Jwt(Jwt),
}

impl Identity {
    /// The headers a response for this identity varies by.
    pub fn headers(&self) -> Vec<&http::HeaderName> {
        match &self.from {
            IdentityFrom::Headers { user, groups } => std::iter::once(user).chain(groups).collect(),
            IdentityFrom::Jwt(j) => vec![&j.header],
        }
    }

    /// What names the user, for messages: the header, or the token.
    pub fn named_by(&self) -> &str {
        match &self.from {
            IdentityFrom::Headers { user, .. } => user.as_str(),
            IdentityFrom::Jwt(_) => "the token",
        }
    }
}

/// Token verification: the header and the keys, read from `jwt_keys` when the configuration
/// was loaded (so a reload reads rotated keys).
#[derive(Debug, Clone)]
pub struct Jwt {
    pub header: http::HeaderName,
    pub settings: crate::jwt::JwtSettings,
    pub verifier: std::sync::Arc<crate::jwt::Verifier>,
}

/// Two token settings are equal when they say the same; the keys are whatever the file held
/// when each was loaded.
impl PartialEq for Jwt {
    fn eq(&self, other: &Jwt) -> bool {
        self.header == other.header && self.settings == other.settings
    }
}

impl Eq for Jwt {}

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

    /// What is valid but weakens envgate, one sentence each: logged as warnings at start-up (and
    /// on reload) and printed by `envgate check`.
    pub fn warnings(&self) -> Vec<Cow<'static, str>> {
        let mut out: Vec<Cow<'static, str>> = Vec::new();
        if self.upstream.tls.insecure {
            out.push(
                "upstream_insecure is on: the upstream's certificate is NOT verified; use this for development only"
                    .into(),
            );
        }
        if self.upstream.token.is_some() && self.identity.is_none() {
            out.push(
                "envgate holds the upstream token and no trusted_user_header is set: anyone who reaches envgate reaches EG"
                .into(),
            );
        }
        if self.policy.mode == policy::Mode::Report {
            out.push(
                "mode = \"report\": nothing is enforced; kernel starts are forwarded with every name and value, and only \
                 audited"
                    .into(),
            );
        }
        if self.policy.sessions == policy::Sessions::Allow {
            out.push(
                "sessions = \"allow\": a session start gives its kernel the gateway's whole environment, outside the env \
                 policy"
                .into(),
            );
        }
        if self.policy.eg_config.as_ref().is_some_and(|e| e.all) {
            out.push(
                "inherit_eg_env_config with EG_CLIENT_ENVS=*: every name is allowed (deny_envs still applies)".into(),
            );
        }
        if self.settings.deny_envs.is_some() {
            let missing: Vec<&str> =
                policy::DEFAULT_DENY_ENVS.iter().copied().filter(|n| !self.policy.deny_envs.contains(n)).collect();
            if !missing.is_empty() {
                out.push(
                    format!(
                        "deny_envs replaces the built-in list and leaves out {}: clients may send them; use \
                         extra_deny_envs to add names to the built-in list instead",
                        missing.join(", ")
                    )
                    .into(),
                );
            }
        }
        out
    }

    /// Every setting in force, as a valid config file (secrets shown as set, never their value).
    pub fn effective(&self) -> String {
        let keys = match self.identity.as_ref().map(|i| &i.from) {
            Some(IdentityFrom::Jwt(j)) => format!("# jwt_keys holds {}\n", j.verifier.describe()),
            _ => String::new(),
        };
        format!("{}{keys}{}", self.settings.effective(), self.policy)
    }
}

/// Both files of a pair (certificate and key), or neither.
fn pair(
    a: &Option<Setting<PathBuf>>,
    ka: &str,
    b: &Option<Setting<PathBuf>>,
    kb: &str,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (a, b) {
        (None, None) => Ok(None),
        (Some(x), Some(y)) => Ok(Some((x.value.clone(), y.value.clone()))),
        (Some(x), None) => Err(x.err(ka, format!("needs `{kb}` too"))),
        (None, Some(y)) => Err(y.err(kb, format!("needs `{ka}` too"))),
    }
}

impl Raw {
    /// The rules between settings; `env` reads envgate's own environment (for
    /// `inherit_eg_env_config`).
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let s = self.resolve()?;
        let tls = pair(&s.tls_cert, "tls_cert", &s.tls_key, "tls_key")?;
        let upstream_tls = UpstreamTls {
            ca: s.upstream_ca.as_ref().map(|c| c.value.clone()),
            client_cert: pair(
                &s.upstream_client_cert,
                "upstream_client_cert",
                &s.upstream_client_key,
                "upstream_client_key",
            )?,
            insecure: s.upstream_insecure.value,
        };
        let tls_files = [("upstream_ca", &s.upstream_ca), ("upstream_client_cert", &s.upstream_client_cert)];
        if let Some((key, Some(t))) = tls_files.into_iter().find(|(_, t)| t.is_some()) {
            if s.upstream.value.scheme != Scheme::HTTPS {
                return Err(t.err(key, "upstream TLS settings need an https:// upstream"));
            }
        }
        let token = match (&s.upstream_token, &s.upstream_token_file) {
            (Some(t), Some(_)) => {
                return Err(t.err("upstream_token", "set either it or `upstream_token_file`, not both"))
            }
            (Some(t), None) => Some((t.value.clone(), t.origin.as_str())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(&f.value)
                    .map_err(|e| f.err("upstream_token_file", format!("cannot read {:?}: {e}", f.value)))?;
                Some((Secret(text.trim().to_string()), f.origin.as_str()))
            }
            (None, None) => None,
        };
        if let Some((t, from)) = &token {
            if t.0.is_empty() || http::HeaderValue::from_str(&format!("token {}", t.0)).is_err() {
                let at = kinds::At { key: "upstream_token", origin: from };
                return Err(at.err("the token is empty or not a valid header value"));
            }
        }
        let mut prefixes = Vec::new();
        if s.kernel_prefix.value {
            prefixes.push(PrefixRule::new(policy::KERNEL_PREFIX));
        }
        for p in s.allow_prefixes.iter().flat_map(|p| &p.value) {
            if !prefixes.iter().any(|r| &r.prefix == p) {
                prefixes.push(PrefixRule::new(p));
            }
        }
        let names = |n: &Option<Setting<Vec<String>>>| n.as_ref().map(|n| n.value.iter().cloned().collect());
        let mut kernelspecs = HashMap::new();
        let mut kernelspec_set_envs: HashMap<String, Vec<SetEnv>> = HashMap::new();
        for (name, spec) in s.kernelspecs.iter().flat_map(|k| &k.value) {
            let k = name.to_ascii_lowercase();
            kernelspecs.entry(k.clone()).or_insert_with(NameSet::new).extend(spec.client_envs.iter().cloned());
            if !spec.set_envs.is_empty() {
                let scope: std::sync::Arc<str> = format!("kernelspec:{k}").into();
                kernelspec_set_envs.entry(k).or_default().extend(set_envs(&spec.set_envs, &scope));
            }
        }
        let identity = identity(&s)?;
        let users = blocks(&s.users, "user");
        let groups = blocks(&s.groups, "group");
        if identity.is_none() {
            let needs = [("users", !users.is_empty()), ("groups", !groups.is_empty())];
            if let Some((key, _)) = needs.iter().find(|(_, n)| *n) {
                let at = if *key == "users" { s.users.as_ref() } else { s.groups.as_ref() };
                return Err(at.map_or_else(
                    || ConfigError(format!("`{key}` needs identity")),
                    |b| b.err(key, "needs identity: set `trusted_user_header` or `jwt_keys`"),
                ));
            }
        }
        let groups_known = match identity.as_ref().map(|i| &i.from) {
            Some(IdentityFrom::Headers { groups, .. }) => groups.is_some(),
            Some(IdentityFrom::Jwt(_)) => true,
            None => false,
        };
        if !groups.is_empty() && !groups_known {
            return Err(s.groups.as_ref().map_or_else(
                || ConfigError("`groups` needs a source of groups".into()),
                |g| g.err("groups", "needs the groups: set `trusted_groups_header` (or use `jwt_keys`)"),
            ));
        }
        let global_set = set_envs(s.set_envs.as_ref().map_or(&[][..], |v| v.value.as_slice()), &"global".into());
        if identity.is_none() {
            let all_sets = global_set.iter().chain(kernelspec_set_envs.values().flatten());
            if let Some(t) = all_sets.into_iter().find(|t| t.template.needs_user()) {
                return Err(ConfigError(format!(
                    "invalid `set_envs` ({}): {} uses {{user}} or {{user_dns}}, which needs identity: set \
                     `trusted_user_header` or `jwt_keys`",
                    t.scope, t.name
                )));
            }
        }
        // A session start carries no env and names its kernelspec where envgate does not look: the
        // values `set_envs` promises and a block's `kernelspecs` list could not hold for it.
        if s.sessions.value == crate::policy::Sessions::Allow {
            let blocks = || users.values().chain(groups.values());
            let set =
                !global_set.is_empty() || !kernelspec_set_envs.is_empty() || blocks().any(|b| !b.set_envs.is_empty());
            let narrowed = blocks().find(|b| b.kernelspecs.is_some());
            let what = match (set, narrowed) {
                (true, _) => Some("`set_envs`".to_string()),
                (false, Some(b)) => Some(format!("the `kernelspecs` list of {}", b.label)),
                (false, None) => None,
            };
            if let Some(what) = what {
                return Err(s.sessions.err(
                    "sessions",
                    format!(
                        "\"allow\" cannot be combined with {what}: a session start carries no env and its \
                         kernelspec is not checked, so neither could be enforced for it; keep sessions = \"deny\""
                    ),
                ));
            }
        }
        let mut values = ValueRules::default();
        if let Some(n) = &s.value_max_length {
            values.max_length = n.value as usize;
        }
        if let Some(f) = &s.value_forbidden {
            values.forbidden = Forbidden::new(f.value.clone());
        }
        for (name, p) in s.value_patterns.iter().flat_map(|p| &p.value) {
            match p {
                Some(p) => values.patterns.insert(name.clone(), p.clone()),
                None => values.patterns.remove(name),
            };
        }
        let workers = match s.workers.value {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        // `deny_envs` replaces the built-in list; `extra_deny_envs` adds to whichever is in force.
        let mut deny_envs: BTreeSet<String> =
            names(&s.deny_envs).unwrap_or_else(|| policy::DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect());
        deny_envs.extend(names(&s.extra_deny_envs).unwrap_or_default());
        Ok(Config {
            listen: s.listen.value,
            tls,
            upstream: UpstreamSettings {
                url: s.upstream.value.clone(),
                tls: upstream_tls,
                token: token.map(|(t, _)| t),
                connect_timeout: s.connect_timeout.value,
                response_timeout: s.response_timeout.value,
                body_idle_timeout: s.body_idle_timeout.value,
            },
            identity,
            admin_listen: s.admin_listen.as_ref().map(|a| a.value),
            shutdown_grace: s.shutdown_grace.value,
            workers,
            policy: Policy {
                mode: s.mode.value,
                sessions: s.sessions.value,
                prefixes,
                client_envs: names(&s.client_envs).unwrap_or_default().into(),
                deny_envs: deny_envs.into(),
                kernelspecs,
                kernelspec_metadata: s.kernelspec_metadata.value,
                kernelspec_env: s.kernelspec_env.value,
                process_proxy_envs: s.process_proxy_envs.value,
                eg_config: s.inherit_eg_env_config.value.then(|| EgEnvs::from_env(env)),
                values,
                kernel_path: s.kernel_path.value,
                set_envs: global_set,
                kernelspec_set_envs,
                users,
                groups,
            },
            kernelspec_cache_ttl: s.kernelspec_cache_ttl.value,
            max_body_bytes: s.max_body_bytes.value as usize,
            audit_log: s.audit_log.value.clone(),
            log_format: s.log_format.value,
            set_envs_mismatch: s.set_envs_mismatch.value,
            config_watch_interval: s.config_watch_interval.value,
            settings: s,
        })
    }
}

impl Config {
    /// The policy's hash, as the metrics, the logs and the audit records show it: 16 hex digits
    /// of a fixed-key SipHash of the policy as `envgate check` prints it.
    pub fn policy_hash(&self) -> String {
        use std::hash::{Hash, Hasher};
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        self.policy.to_string().hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

/// `set_envs` entries of one scope.
fn set_envs(entries: &[(String, crate::identity::Template)], scope: &std::sync::Arc<str>) -> Vec<SetEnv> {
    entries.iter().map(|(name, t)| SetEnv { name: name.clone(), template: t.clone(), scope: scope.clone() }).collect()
}

/// `[users.NAME]` or `[groups.NAME]` blocks, compiled; `kind`: `user` or `group`.
fn blocks(given: &Option<Setting<Vec<(String, kinds::BlockSpec)>>>, kind: &str) -> HashMap<String, Block> {
    let mut out: HashMap<String, Block> = HashMap::new();
    for (name, spec) in given.iter().flat_map(|g| &g.value) {
        let b = out.entry(name.clone()).or_insert_with(|| Block::new(&format!("{kind}:{name}")));
        let label = b.label.clone();
        b.client_envs.extend(spec.client_envs.iter().cloned());
        for p in &spec.allow_prefixes {
            if !b.prefixes.iter().any(|r| &r.prefix == p) {
                b.prefixes.push(PrefixRule::of_block(p, &label));
            }
        }
        b.deny_envs.extend(spec.deny_envs.iter().cloned());
        b.value_patterns.extend(spec.value_patterns.iter().cloned());
        if let Some(k) = &spec.kernelspecs {
            b.kernelspecs.get_or_insert_with(NameSet::new).extend(k.iter().map(|k| k.to_ascii_lowercase()));
        }
        b.set_envs.extend(set_envs(&spec.set_envs, &label));
        b.priority = spec.priority;
    }
    out
}

/// Identity from the settings: headers, or a token (the keys read now), or none.
fn identity(s: &Settings) -> Result<Option<Identity>, ConfigError> {
    let on_mismatch = s.user_mismatch.value;
    if let (Some(g), None) = (&s.trusted_groups_header, &s.trusted_user_header) {
        return Err(g.err("trusted_groups_header", "needs `trusted_user_header` too"));
    }
    let Some(keys) = &s.jwt_keys else {
        for (key, given) in [("jwt_issuer", &s.jwt_issuer), ("jwt_audience", &s.jwt_audience)] {
            if let Some(g) = given {
                return Err(g.err(key, "needs `jwt_keys`"));
            }
        }
        return Ok(s.trusted_user_header.as_ref().map(|h| Identity {
            from: IdentityFrom::Headers {
                user: h.value.clone(),
                groups: s.trusted_groups_header.as_ref().map(|g| g.value.clone()),
            },
            on_mismatch,
        }));
    };
    if let Some(h) = &s.trusted_user_header {
        return Err(h.err(
            "trusted_user_header",
            "set either it (identity from a trusted proxy's headers) or `jwt_keys` (from a verified token), not both",
        ));
    }
    let required = |key: &str, given: &Option<Setting<String>>| {
        given.as_ref().map(|g| g.value.clone()).ok_or_else(|| keys.err("jwt_keys", format!("needs `{key}` too")))
    };
    // Slack for clocks that disagree, not a way to accept expired tokens.
    if s.jwt_leeway.value > std::time::Duration::from_secs(300) {
        return Err(s.jwt_leeway.err("jwt_leeway", "at most 5m: it is slack for clock skew"));
    }
    let settings = crate::jwt::JwtSettings {
        keys_file: keys.value.clone(),
        issuer: required("jwt_issuer", &s.jwt_issuer)?,
        audience: required("jwt_audience", &s.jwt_audience)?,
        leeway: s.jwt_leeway.value,
        user_claim: s.user_claim.value.clone(),
        groups_claim: s.groups_claim.value.clone(),
    };
    let verifier = crate::jwt::Verifier::load(&settings).map_err(|e| keys.err("jwt_keys", e))?;
    Ok(Some(Identity {
        from: IdentityFrom::Jwt(Jwt {
            header: s.jwt_header.value.clone(),
            settings,
            verifier: std::sync::Arc::new(verifier),
        }),
        on_mismatch,
    }))
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
    use crate::policy::{Mode, Sessions};
    use crate::values::PathRule;

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
        assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:8888/");
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.kernelspec_cache_ttl, Duration::from_secs(10));
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(120));
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(60));
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
        assert_eq!(c.upstream.url.base, "/gw/");
        assert_eq!(c.upstream.url.authority.as_str(), "eg:8888");
        assert_eq!(c.policy.mode, Mode::Reject);
        assert_eq!(c.policy.client_envs, BTreeSet::from(["FOO".into(), "BAR".into()]));
        assert_eq!(c.policy.deny_envs, BTreeSet::from(["EVIL".into()]));
        assert!(!c.policy.kernel_prefix());
        assert_eq!(c.policy.sessions, Sessions::Allow);
        assert_eq!(c.policy.kernelspecs["spark"], BTreeSet::from(["SPARK_OPTS".into()]));
        assert!(c.policy.kernelspecs["r"].is_empty());
        assert_eq!(c.kernelspec_cache_ttl, Duration::from_secs(2));
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(180));
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(90));
        assert_eq!(c.audit_log, AuditTarget::File("/var/log/envgate.jsonl".into()));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn extra_deny_envs_adds_to_the_list_in_force() {
        let defaults: BTreeSet<String> = policy::DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect();
        let deny =
            |toml: &str| -> BTreeSet<String> { load_toml(toml).unwrap().policy.deny_envs.iter().cloned().collect() };
        assert_eq!(deny(""), defaults);
        for n in ["KERNEL_VOLUMES", "KERNEL_VOLUME_MOUNTS", "KERNEL_NAMESPACE", "KERNEL_SERVICE_ACCOUNT_NAME", "PATH"] {
            assert!(defaults.contains(n), "{n} is denied by default");
        }
        let mut want = defaults.clone();
        want.extend(["KERNEL_IMAGE".to_string(), "KERNEL_UID".to_string()]);
        assert_eq!(deny("extra_deny_envs = [\"KERNEL_IMAGE\", \"KERNEL_UID\"]"), want);
        // deny_envs replaces the built-in list; extra_deny_envs adds to it either way.
        assert_eq!(deny("deny_envs = [\"A\"]\nextra_deny_envs = [\"B\"]"), BTreeSet::from(["A".into(), "B".into()]));
        assert_eq!(deny("deny_envs = []\nextra_deny_envs = []"), BTreeSet::new());
        // check prints the merged list, as deny_envs: a file that says the same.
        let c = load_toml("extra_deny_envs = [\"KERNEL_IMAGE\"]").unwrap();
        let printed: toml::Table = c.effective().parse().unwrap();
        let listed: BTreeSet<String> =
            printed["deny_envs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert!(listed.contains("KERNEL_IMAGE") && listed.is_superset(&defaults));
        assert!(!printed.contains_key("extra_deny_envs"));
    }

    #[test]
    fn warnings_name_what_weakens_envgate() {
        assert!(load_toml("").unwrap().warnings().is_empty());
        let w = load_toml("mode = \"report\"\nsessions = \"allow\"\nupstream_token = \"t\"").unwrap().warnings();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("trusted_user_header") && w[1].contains("report") && w[2].contains("sessions"), "{w:?}");
        let w = load_toml("upstream = \"https://eg:1\"\nupstream_insecure = true").unwrap().warnings();
        assert!(w.len() == 1 && w[0].contains("upstream_insecure"), "{w:?}");
        // With identity, the token is not a warning.
        let w = load_toml("upstream_token = \"t\"\ntrusted_user_header = \"X-User\"").unwrap().warnings();
        assert!(w.is_empty(), "{w:?}");
        // A deny_envs that drops built-in names says which; one that keeps them all, or extra_deny_envs, does not.
        let w = load_toml("deny_envs = [\"PATH\", \"A\"]").unwrap().warnings();
        assert!(
            w.len() == 1 && w[0].contains("leaves out BASH_ENV, ENV, KERNEL_NAMESPACE") && !w[0].contains(", PATH,"),
            "{w:?}"
        );
        let all = policy::DEFAULT_DENY_ENVS.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
        assert!(load_toml(&format!("deny_envs = [{all}, \"A\"]")).unwrap().warnings().is_empty());
        assert!(load_toml("extra_deny_envs = [\"A\"]").unwrap().warnings().is_empty());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envgate.toml");
        std::fs::write(&path, "mode = \"reject\"\nclient_envs = [\"A\"]\n[kernelspecs.x]\nclient_envs=[\"X\"]\n")
            .unwrap();
        let o = Opts {
            config: Some(path),
            mode: Some(Mode::Report),
            client_envs: Some(vec!["FOO".into(), " BAR ".into(), "".into()]),
            kernel_prefix: Some(false),
            kernelspecs: Some(vec!["py=P1,P2".into(), "r=".into()]),
            max_body_bytes: Some("10".into()),
            body_idle_timeout: Some("2s".into()),
            ..Opts::default()
        };
        let c = Config::load(&o).unwrap();
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(2));
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
            kernel_path: Some(PathRule::Keep),
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
        assert!(e.contains("`value_patterns` (--value-pattern or ENVGATE_VALUE_PATTERNS)"), "{e}");
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
            ("upstream_client_cert = \"c.pem\"\nupstream_client_key = \"k.pem\"", "`upstream_client_cert`"),
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

    /// A value a choice does not have: the error says the values as a sentence does.
    #[test]
    fn choice_errors_say_the_values() {
        for (text, want) in [
            ("mode = \"dorp\"", "invalid `mode` (config): expected drop, reject or report, got \"dorp\""),
            ("sessions = 1", "invalid `sessions` (config): expected deny or allow"),
            (
                "kernel_path = \"jail\"",
                "invalid `kernel_path` (config): expected refuse_escape, strip or keep, got \"jail\"",
            ),
        ] {
            assert_eq!(load_toml(text).unwrap_err().to_string(), want, "{text}");
        }
    }

    /// A bad address: the error's example is that listener's own default port.
    #[test]
    fn address_errors_show_the_listeners_own_example() {
        for (text, want) in [
            ("listen = \"nope\"", "invalid `listen` (config): expected an address like 127.0.0.1:8889, got \"nope\""),
            (
                "admin_listen = \"nope\"",
                "invalid `admin_listen` (config): expected an address like 127.0.0.1:9464, got \"nope\"",
            ),
            ("admin_listen = 1", "invalid `admin_listen` (config): expected a string like \"127.0.0.1:9464\""),
        ] {
            assert_eq!(load_toml(text).unwrap_err().to_string(), want, "{text}");
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
        let o = Opts { inherit_eg_env_config: Some(true), allow_prefixes: Some(vec!["X_".into()]), ..Opts::default() };
        let mut raw = Raw::default();
        raw.overlay(&o).unwrap();
        let c = raw.validate(&|k| (k == "EG_ENV_WHITELIST").then(|| "*".to_string())).unwrap();
        assert!(c.policy.eg_config.unwrap().all);
        assert_eq!(c.policy.prefixes.len(), 2);
    }

    /// A bad `--mode` is clap's error now: tests/cli.rs checks that it names the key, the flag and
    /// the variable.
    #[test]
    fn flag_errors_name_the_flag() {
        let o = Opts { kernelspecs: Some(vec!["nope".into()]), ..Opts::default() };
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
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(90));
        let text = c.effective();
        assert!(text.contains("body_idle_timeout = \"1m 30s\""), "{text}");
        assert_eq!(load_toml(&text).unwrap().upstream.body_idle_timeout, Duration::from_secs(90));
    }

    #[test]
    fn unknown_keys_name_the_nearest_known_one() {
        let e = Raw::from_toml("modee = \"drop\"", Path::new("f.toml")).unwrap_err().to_string();
        assert_eq!(e, "unknown key `modee` in f.toml; did you mean `mode`?");
        let e = load_toml("[kernelspecs.py]\nclient_env = []").unwrap_err().to_string();
        assert!(e.ends_with("did you mean `kernelspecs.py.client_envs`?"), "{e}");
        let e = load_toml("colour = 1").unwrap_err().to_string();
        assert!(e.contains("`colour`") && e.contains("known keys: listen, upstream, mode"), "{e}");
    }

    /// Each setting from the file, from its variable and from its flag: each alone sets it, the
    /// variable wins over the file, and the flag over both. One sample per setting, in the table's
    /// order: a file value (TOML), a variable's and a flag's, all different.
    #[test]
    fn user_and_group_blocks_and_set_envs_are_read_and_compiled() {
        let c = load_toml(
            r#"
            trusted_user_header = "X-Forwarded-User"
            trusted_groups_header = "X-Forwarded-Groups"
            set_envs_mismatch = "overwrite"
            [set_envs]
            KERNEL_NAMESPACE = "jupyter-{user_dns}"
            [kernelspecs.Spark]
            client_envs = ["SPARK_OPTS"]
            set_envs = { KERNEL_IMAGE = "reg/{kernelspec}:1" }
            [users.alice]
            client_envs = ["A"]
            kernelspecs = ["Python3"]
            [groups.data-eng]
            priority = 5
            allow_prefixes = ["SPARK_"]
            deny_envs = ["FOO"]
            value_patterns = { SPARK_OPTS = "[a-z]*" }
            set_envs = { KERNEL_IMAGE = "reg/eng:1" }
            "#,
        )
        .unwrap();
        let p = &c.policy;
        assert_eq!(c.set_envs_mismatch, Mismatch::Overwrite);
        assert_eq!(p.set_envs[0].name, "KERNEL_NAMESPACE");
        assert_eq!(&*p.set_envs[0].scope, "global");
        assert_eq!(&*p.kernelspec_set_envs["spark"][0].scope, "kernelspec:spark");
        let alice = &p.users["alice"];
        assert_eq!(&*alice.label, "user:alice");
        assert_eq!(alice.kernelspecs.as_ref().unwrap(), &BTreeSet::from(["python3".to_string()]));
        let eng = &p.groups["data-eng"];
        assert_eq!((eng.priority, eng.prefixes[0].prefix.as_str()), (5, "SPARK_"));
        assert!(eng.deny_envs.contains("FOO") && eng.value_patterns.contains_key("SPARK_OPTS"));
        assert_eq!(&*eng.set_envs[0].scope, "group:data-eng");
        let Some(Identity { from: IdentityFrom::Headers { user, groups: Some(g) }, .. }) = &c.identity else {
            panic!("header identity: {:?}", c.identity)
        };
        assert_eq!((user.as_str(), g.as_str()), ("x-forwarded-user", "x-forwarded-groups"));
        // What `envgate check` prints reads back as the same policy.
        let again = load_toml(&c.effective()).unwrap();
        assert_eq!(again.policy, c.policy);
        assert_eq!(again.identity, c.identity);
    }

    #[test]
    fn blocks_come_from_flags_as_inline_tables() {
        let o = Opts {
            trusted_user_header: Some("X-User".into()),
            users: Some(vec!["bob={ client_envs = [\"B\"], kernelspecs = [\"r\"] }".into()]),
            set_envs: Some(vec!["KERNEL_NAMESPACE=ns-{user}".into()]),
            ..opts()
        };
        let c = Config::load(&o).unwrap();
        assert!(c.policy.users["bob"].client_envs.contains("B"));
        assert_eq!(c.policy.set_envs[0].template.text(), "ns-{user}");
        let bad = Opts { users: Some(vec!["bob=[1]".into()]), ..o.clone() };
        assert!(Config::load(&bad).unwrap_err().0.contains("`users.bob`"), "{:?}", Config::load(&bad));
    }

    #[test]
    fn identity_settings_that_cannot_work_are_refused() {
        let cases = [
            ("[users.a]\nclient_envs = [\"A\"]", "needs identity"),
            ("trusted_user_header = \"X-U\"\n[groups.g]\nclient_envs = [\"A\"]", "trusted_groups_header"),
            ("trusted_groups_header = \"X-G\"", "needs `trusted_user_header` too"),
            ("jwt_issuer = \"i\"", "needs `jwt_keys`"),
            ("jwt_keys = \"/k\"\njwt_audience = \"a\"", "needs `jwt_issuer` too"),
            ("jwt_keys = \"/k\"\ntrusted_user_header = \"X-U\"", "not both"),
            ("jwt_keys = \"/k\"\njwt_issuer = \"i\"\njwt_audience = \"a\"\njwt_leeway = \"6m\"", "at most 5m"),
            ("[set_envs]\nKERNEL_NAMESPACE = \"ns-{user_dns}\"", "needs identity"),
            ("[set_envs]\nKERNEL_USERNAME = \"x\"", "user_mismatch"),
            ("[set_envs]\nA = \"{usr}\"", "unknown placeholder `{usr}`"),
            ("trusted_user_header = \"X-U\"\n[users.a]\nkernelspec = [\"x\"]", "did you mean `users.a.kernelspecs`?"),
            ("trusted_user_header = \"X-U\"\n[users.a]\npriority = 1", "unknown key `users.a.priority`"),
            ("trusted_user_header = \"X-U\"\n[users.a.value_patterns]\nA = \"\"", "an empty pattern"),
            ("trusted_user_header = \"X-U\"\n[users.a.value_patterns]\nA = \"(\"", "not a valid regular expression"),
            ("[kernelspecs.k.set_envs]\nA = \"{user}\"", "needs identity"),
            ("sessions = \"allow\"\n[set_envs]\nKERNEL_IMAGE = \"i\"", "cannot be combined with `set_envs`"),
            (
                "sessions = \"allow\"\ntrusted_user_header = \"X-U\"\n[users.a]\nkernelspecs = [\"k\"]",
                "cannot be combined with the `kernelspecs` list of user:a",
            ),
            (
                "sessions = \"allow\"\ntrusted_user_header = \"X-U\"\n[users.a.set_envs]\nA = \"{user}\"",
                "cannot be combined with `set_envs`",
            ),
        ];
        for (text, expected) in cases {
            let e = load_toml(text).unwrap_err().0;
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        // A set value without the user needs no identity.
        assert!(load_toml("[set_envs]\nKERNEL_IMAGE = \"img-{kernelspec}\"").is_ok());
        // Sessions with identity but nothing a session start could not keep.
        assert!(
            load_toml("sessions = \"allow\"\ntrusted_user_header = \"X-U\"\n[users.a]\nclient_envs = [\"A\"]").is_ok()
        );
    }

    #[test]
    fn every_setting_from_file_environment_and_flag_in_that_order() {
        use clap::{Args, FromArgMatches};
        let samples: &[(&str, &str, &str, &str)] = &[
            ("listen", "\"127.0.0.1:1\"", "127.0.0.1:2", "127.0.0.1:3"),
            ("upstream", "\"http://a:1\"", "http://b:1", "http://c:1/gw"),
            ("mode", "\"reject\"", "report", "drop"),
            ("client_envs", "[\"A\"]", "B", "C,D"),
            ("deny_envs", "[\"A\"]", "B", "C"),
            ("extra_deny_envs", "[\"A\"]", "B", "C,D"),
            ("kernel_prefix", "false", "on", "no"),
            ("allow_prefixes", "[\"A_\"]", "B_", "C_"),
            ("kernelspec_metadata", "false", "yes", "0"),
            ("kernelspec_env", "true", "off", "1"),
            ("process_proxy_envs", "true", "false", "true"),
            ("inherit_eg_env_config", "true", "false", "true"),
            ("kernelspecs", "{ a = { client_envs = [\"A\"] } }", "b=B", "c=C;d="),
            ("sessions", "\"allow\"", "deny", "allow"),
            ("kernelspec_cache_ttl", "\"1s\"", "2s", "0s"),
            ("value_max_length", "1", "2", "3"),
            ("value_forbidden", "[\"a\"]", "b", " c "),
            ("value_patterns", "{ A = \"a\" }", "B=b", "KERNEL_UID="),
            ("kernel_path", "\"strip\"", "keep", "refuse_escape"),
            ("max_body_bytes", "1", "2", "3"),
            ("connect_timeout", "\"1s\"", "2s", "3s"),
            ("response_timeout", "\"1s\"", "2s", "3s"),
            ("body_idle_timeout", "\"1s\"", "2s", "3s"),
            ("audit_log", "\"/a\"", "/b", "-"),
            ("log_format", "\"json\"", "text", "json"),
            ("tls_cert", "\"/a\"", "/b", "/c"),
            ("tls_key", "\"/a\"", "/b", "/c"),
            ("upstream_ca", "\"/a\"", "/b", "/c"),
            ("upstream_client_cert", "\"/a\"", "/b", "/c"),
            ("upstream_client_key", "\"/a\"", "/b", "/c"),
            ("upstream_insecure", "true", "false", "yes"),
            ("upstream_token", "\"a\"", "b", "c"),
            ("upstream_token_file", "\"/a\"", "/b", "/c"),
            ("trusted_user_header", "\"X-A\"", "X-B", "X-C"),
            ("user_mismatch", "\"overwrite\"", "refuse", "overwrite"),
            ("trusted_groups_header", "\"X-A\"", "X-B", "X-C"),
            ("jwt_keys", "\"/a\"", "/b", "/c"),
            ("jwt_header", "\"X-A\"", "X-B", "X-C"),
            ("jwt_issuer", "\"a\"", "b", "c"),
            ("jwt_audience", "\"a\"", "b", "c"),
            ("jwt_leeway", "\"1s\"", "2s", "3s"),
            ("user_claim", "\"a\"", "b", "c"),
            ("groups_claim", "\"a\"", "b", "c"),
            ("set_envs", "{ A = \"a\" }", "B=b-{user}", "C={kernelspec}"),
            ("set_envs_mismatch", "\"overwrite\"", "refuse", "overwrite"),
            ("users", "{ a = { client_envs = [\"A\"] } }", "b={ kernelspecs = [\"k\"] }", "c={}"),
            ("groups", "{ a = { priority = 1 } }", "b={ deny_envs = [\"B\"] }", "c={ set_envs = { C = \"c\" } }"),
            ("admin_listen", "\"127.0.0.1:1\"", "127.0.0.1:2", "127.0.0.1:3"),
            ("config_watch_interval", "\"1s\"", "3s", "0s"),
            ("shutdown_grace", "\"1s\"", "2s", "3s"),
            ("workers", "1", "2", "3"),
        ];
        assert_eq!(samples.iter().map(|s| s.0).collect::<Vec<_>>(), FILE_KEYS, "one sample per setting");
        // clap reads a flag's variable when the flag is declared: a new command for each parse.
        let cmd = || Opts::augment_args(clap::Command::new("envgate"));
        let parse = |args: &[&str]| {
            let m = cmd().try_get_matches_from(std::iter::once("envgate").chain(args.iter().copied()));
            Opts::from_arg_matches(&m.unwrap()).unwrap()
        };
        let settings = |file: &str, opts: &Opts| {
            let mut raw = Raw::from_toml(file, Path::new("f")).unwrap();
            raw.overlay(opts).unwrap();
            raw.resolve().unwrap()
        };
        // No other test reads ENVGATE_* variables (only clap does, and only here).
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ENVGATE_")) {
            std::env::remove_var(k);
        }
        let none = settings("", &Opts::default());
        for (key, file, env, flag) in samples {
            let c = cmd();
            let arg = c.get_arguments().find(|a| a.get_id() == key).unwrap();
            let long = format!("--{}", arg.get_long().unwrap());
            let var = arg.get_env().unwrap().to_str().unwrap().to_string();
            let file = format!("{key} = {file}");
            assert_ne!(settings(&file, &Opts::default()), none, "{key} from a file");
            std::env::set_var(&var, env);
            let from_env = settings("", &parse(&[]));
            let file_and_env = settings(&file, &parse(&[]));
            let all_three = settings(&file, &parse(&[&long, flag]));
            std::env::remove_var(&var);
            let from_flag = settings("", &parse(&[&long, flag]));
            assert_ne!(from_env, none, "{key} from {var}");
            assert_eq!(file_and_env, from_env, "{var} wins over the file");
            assert_ne!(from_flag, from_env, "{long} {flag} and {var}={env} differ");
            assert_eq!(all_three, from_flag, "{long} wins over {var} and the file");
        }
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
