//! The env policy: for one variable name and one kernelspec, keep it or reject it, and say why.
//!
//! This is the whole decision envgate makes about a kernel start. It is pure (no I/O, no
//! clock) and is compiled once from the configuration, so that the proxy, `envgate check` and
//! the tests all run the very same code. The order of the rules is part of the contract and is
//! documented in the README:
//!
//! 1. a name that cannot be an environment variable name (empty, `=` or NUL) is rejected;
//! 2. a name in `deny_envs` is rejected (`denied`), even a `KERNEL_*` one;
//! 3. a name in the allowed set of the kernelspec is kept: the union of the global
//!    `client_envs`, the kernelspec's `[kernelspecs.K] client_envs` in envgate's config and the
//!    kernelspec's own `spec.metadata.client_envs` as the upstream serves it;
//! 4. a name that starts with `KERNEL_` is kept when `kernel_prefix` is on (EG's own rule);
//! 5. anything else is rejected (`not_allowed`).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

/// Names that hijack a process when set in its environment. Shipped as the default `deny_envs`.
pub const DEFAULT_DENY_ENVS: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "PATH",
    "PERL5LIB",
    "PERL5OPT",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONWARNINGS",
];

/// The prefix EG itself always forwards.
pub const KERNEL_PREFIX: &str = "KERNEL_";

/// What envgate does with a kernel start whose env breaks the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Remove rejected names and forward the rest.
    Drop,
    /// Refuse the whole request (403) when any name is rejected.
    Reject,
    /// Forward every name the client sent; audit what `drop` would have done.
    Report,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Drop => "drop",
            Mode::Reject => "reject",
            Mode::Report => "report",
        }
    }
}

/// Whether `POST /api/sessions` (which starts a kernel with EG's whole environment) may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sessions {
    Deny,
    Allow,
}

impl Sessions {
    pub fn as_str(self) -> &'static str {
        match self {
            Sessions::Deny => "deny",
            Sessions::Allow => "allow",
        }
    }
}

/// Why a name was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The global `client_envs` of envgate's config.
    Config,
    /// `[kernelspecs.K] client_envs` in envgate's config.
    KernelspecConfig,
    /// `spec.metadata.client_envs` of the kernelspec as the upstream serves it.
    KernelspecMetadata,
    /// The built-in `KERNEL_` prefix rule.
    KernelPrefix,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::KernelspecConfig => "kernelspec_config",
            Source::KernelspecMetadata => "kernelspec_metadata",
            Source::KernelPrefix => "prefix:KERNEL_",
        }
    }
}

/// Why a name was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The name is in `deny_envs`.
    Denied,
    /// No rule allows the name.
    NotAllowed,
    /// The name cannot be an environment variable name at all.
    InvalidName,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Denied => "denied",
            Reason::NotAllowed => "not_allowed",
            Reason::InvalidName => "invalid_name",
        }
    }
}

/// The verdict on one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep(Source),
    Reject(Reason),
}

/// What the upstream says about one kernelspec that matters to the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecFacts {
    /// `spec.metadata.client_envs`, string items only.
    pub metadata_client_envs: BTreeSet<String>,
}

/// The compiled policy. Built once from the configuration; cheap to share behind an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub sessions: Sessions,
    pub kernel_prefix: bool,
    pub client_envs: BTreeSet<String>,
    pub deny_envs: BTreeSet<String>,
    /// `[kernelspecs.K] client_envs`, keyed by the lower-cased kernelspec name (EG looks
    /// kernelspecs up case-insensitively).
    pub kernelspecs: HashMap<String, BTreeSet<String>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: Mode::Drop,
            sessions: Sessions::Deny,
            kernel_prefix: true,
            client_envs: BTreeSet::new(),
            deny_envs: DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect(),
            kernelspecs: HashMap::new(),
        }
    }
}

/// A kept name and the rule that kept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub name: String,
    pub source: Source,
}

/// A rejected name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: Reason,
}

/// The verdicts on every name of one request, in the order the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub kept: Vec<Kept>,
    pub rejected: Vec<Rejected>,
}

impl Policy {
    /// The config's own list for kernelspec `kernelspec`, if any.
    fn config_list(&self, kernelspec: Option<&str>) -> Option<&BTreeSet<String>> {
        let k = kernelspec?;
        self.kernelspecs
            .get(k)
            .or_else(|| self.kernelspecs.get(&k.to_ascii_lowercase()))
    }

    /// The verdict on one name for one kernelspec (`None`: no kernelspec could be determined).
    pub fn verdict(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
        name: &str,
    ) -> Verdict {
        if !valid_name(name) {
            return Verdict::Reject(Reason::InvalidName);
        }
        if self.deny_envs.contains(name) {
            return Verdict::Reject(Reason::Denied);
        }
        if self.client_envs.contains(name) {
            return Verdict::Keep(Source::Config);
        }
        if self
            .config_list(kernelspec)
            .is_some_and(|l| l.contains(name))
        {
            return Verdict::Keep(Source::KernelspecConfig);
        }
        if facts.is_some_and(|f| f.metadata_client_envs.contains(name)) {
            return Verdict::Keep(Source::KernelspecMetadata);
        }
        if self.kernel_prefix && name.starts_with(KERNEL_PREFIX) {
            return Verdict::Keep(Source::KernelPrefix);
        }
        Verdict::Reject(Reason::NotAllowed)
    }

    /// The verdicts on every name of one request.
    pub fn decide<'a>(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Decision {
        let mut d = Decision::default();
        for name in names {
            match self.verdict(kernelspec, facts, name) {
                Verdict::Keep(source) => d.kept.push(Kept {
                    name: name.to_string(),
                    source,
                }),
                Verdict::Reject(reason) => d.rejected.push(Rejected {
                    name: name.to_string(),
                    reason,
                }),
            }
        }
        d
    }

    /// The names a client may send for `kernelspec`, sorted: the union of every list source,
    /// minus `deny_envs`. This is what envgate injects as `spec.metadata.client_envs`. Prefix
    /// rules (`KERNEL_*`) are rules, not names, and are not listed.
    pub fn allowed_names(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
    ) -> Vec<String> {
        let mut all: BTreeSet<&str> = self.client_envs.iter().map(String::as_str).collect();
        if let Some(l) = self.config_list(kernelspec) {
            all.extend(l.iter().map(String::as_str));
        }
        if let Some(f) = facts {
            all.extend(f.metadata_client_envs.iter().map(String::as_str));
        }
        all.into_iter()
            .filter(|n| valid_name(n) && !self.deny_envs.contains(*n))
            .map(str::to_string)
            .collect()
    }
}

/// Whether `name` can be an environment variable name at all: POSIX `environ` entries are
/// `NAME=value` C strings, so a name may not be empty nor hold `=` or NUL.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.bytes().any(|b| b == b'=' || b == 0)
}

impl fmt::Display for Policy {
    /// The effective policy, as `envgate check` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(s: &BTreeSet<String>) -> String {
            let v: Vec<String> = s.iter().map(|n| format!("{n:?}")).collect();
            format!("[{}]", v.join(", "))
        }
        writeln!(f, "mode = {:?}", self.mode.as_str())?;
        writeln!(f, "sessions = {:?}", self.sessions.as_str())?;
        writeln!(f, "kernel_prefix = {}", self.kernel_prefix)?;
        writeln!(f, "client_envs = {}", list(&self.client_envs))?;
        writeln!(f, "deny_envs = {}", list(&self.deny_envs))?;
        let mut names: Vec<&String> = self.kernelspecs.keys().collect();
        names.sort();
        for k in names {
            writeln!(f, "\n[kernelspecs.{k:?}]")?;
            writeln!(f, "client_envs = {}", list(&self.kernelspecs[k]))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy() -> Policy {
        Policy {
            client_envs: set(&["FOO", "LD_PRELOAD"]),
            kernelspecs: HashMap::from([("spark".to_string(), set(&["SPARK_OPTS"]))]),
            ..Policy::default()
        }
    }

    fn facts(v: &[&str]) -> SpecFacts {
        SpecFacts {
            metadata_client_envs: set(v),
        }
    }

    #[test]
    fn default_deny_list_covers_the_required_names() {
        let p = Policy::default();
        for n in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "PYTHONPATH",
            "PYTHONHOME",
            "PYTHONSTARTUP",
            "PATH",
        ] {
            assert!(p.deny_envs.contains(n), "{n}");
        }
    }

    #[test]
    fn deny_wins_over_every_allow_rule() {
        let mut p = policy();
        p.deny_envs.insert("KERNEL_EVIL".into());
        p.deny_envs.insert("SPARK_OPTS".into());
        let f = facts(&["LD_PRELOAD", "KERNEL_EVIL"]);
        // in client_envs
        assert_eq!(
            p.verdict(None, None, "LD_PRELOAD"),
            Verdict::Reject(Reason::Denied)
        );
        // KERNEL_ prefix
        assert_eq!(
            p.verdict(None, None, "KERNEL_EVIL"),
            Verdict::Reject(Reason::Denied)
        );
        // kernelspec config
        assert_eq!(
            p.verdict(Some("spark"), None, "SPARK_OPTS"),
            Verdict::Reject(Reason::Denied)
        );
        // kernelspec metadata
        assert_eq!(
            p.verdict(Some("x"), Some(&f), "KERNEL_EVIL"),
            Verdict::Reject(Reason::Denied)
        );
    }

    #[test]
    fn each_allow_source_is_reported() {
        let p = policy();
        let f = facts(&["META"]);
        assert_eq!(p.verdict(None, None, "FOO"), Verdict::Keep(Source::Config));
        assert_eq!(
            p.verdict(Some("spark"), None, "SPARK_OPTS"),
            Verdict::Keep(Source::KernelspecConfig)
        );
        assert_eq!(
            p.verdict(Some("py"), Some(&f), "META"),
            Verdict::Keep(Source::KernelspecMetadata)
        );
        assert_eq!(
            p.verdict(None, None, "KERNEL_X"),
            Verdict::Keep(Source::KernelPrefix)
        );
        assert_eq!(
            p.verdict(None, None, "BAR"),
            Verdict::Reject(Reason::NotAllowed)
        );
    }

    #[test]
    fn kernelspec_lists_apply_only_to_their_kernelspec() {
        let p = policy();
        assert_eq!(
            p.verdict(Some("python3"), None, "SPARK_OPTS"),
            Verdict::Reject(Reason::NotAllowed)
        );
        assert_eq!(
            p.verdict(None, None, "SPARK_OPTS"),
            Verdict::Reject(Reason::NotAllowed)
        );
        // EG finds kernelspecs case-insensitively, so does the config lookup.
        assert_eq!(
            p.verdict(Some("SPARK"), None, "SPARK_OPTS"),
            Verdict::Keep(Source::KernelspecConfig)
        );
    }

    #[test]
    fn kernel_prefix_is_case_sensitive_and_can_be_turned_off() {
        let mut p = policy();
        assert_eq!(
            p.verdict(None, None, "kernel_x"),
            Verdict::Reject(Reason::NotAllowed)
        );
        assert_eq!(
            p.verdict(None, None, "KERNEL_"),
            Verdict::Keep(Source::KernelPrefix)
        );
        p.kernel_prefix = false;
        assert_eq!(
            p.verdict(None, None, "KERNEL_X"),
            Verdict::Reject(Reason::NotAllowed)
        );
        p.client_envs.insert("KERNEL_X".into());
        assert_eq!(
            p.verdict(None, None, "KERNEL_X"),
            Verdict::Keep(Source::Config)
        );
    }

    #[test]
    fn impossible_names_are_rejected_before_anything_else() {
        let mut p = policy();
        p.client_envs.insert("A=B".into());
        for n in ["", "A=B", "KERNEL_A=B", "KERNEL_\0"] {
            assert_eq!(
                p.verdict(None, None, n),
                Verdict::Reject(Reason::InvalidName),
                "{n:?}"
            );
        }
        assert!(!p.allowed_names(None, None).contains(&"A=B".to_string()));
    }

    #[test]
    fn names_are_exact() {
        let p = policy();
        for n in ["foo", "FOO ", " FOO", "FOO\u{200b}"] {
            assert_eq!(
                p.verdict(None, None, n),
                Verdict::Reject(Reason::NotAllowed),
                "{n:?}"
            );
        }
    }

    #[test]
    fn decide_keeps_client_order_and_sorts_into_kept_and_rejected() {
        let p = policy();
        let d = p.decide(
            Some("spark"),
            None,
            ["PATH", "KERNEL_A", "BAR", "FOO", "SPARK_OPTS"],
        );
        let kept: Vec<(&str, Source)> =
            d.kept.iter().map(|k| (k.name.as_str(), k.source)).collect();
        let rej: Vec<(&str, Reason)> = d
            .rejected
            .iter()
            .map(|r| (r.name.as_str(), r.reason))
            .collect();
        assert_eq!(
            kept,
            [
                ("KERNEL_A", Source::KernelPrefix),
                ("FOO", Source::Config),
                ("SPARK_OPTS", Source::KernelspecConfig)
            ]
        );
        assert_eq!(rej, [("PATH", Reason::Denied), ("BAR", Reason::NotAllowed)]);
    }

    #[test]
    fn allowed_names_is_the_sorted_union_minus_deny() {
        let p = policy();
        let f = facts(&["META", "PATH", "FOO"]);
        assert_eq!(
            p.allowed_names(Some("spark"), Some(&f)),
            ["FOO", "META", "SPARK_OPTS"]
        );
        assert_eq!(p.allowed_names(Some("other"), None), ["FOO"]);
        assert_eq!(
            Policy::default().allowed_names(None, None),
            Vec::<String>::new()
        );
    }

    #[test]
    fn display_lists_everything() {
        let s = policy().to_string();
        assert!(s.contains("mode = \"drop\""));
        assert!(s.contains("[kernelspecs.\"spark\"]"));
        assert!(s.contains("\"LD_PRELOAD\""));
    }
}
