//! The env policy: for one variable name and one kernelspec, keep it or reject it, and say why.
//!
//! This is the whole decision envgate makes about a kernel start. It is pure (no I/O, no
//! clock) and is compiled once from the configuration, so that the proxy, `envgate check` and
//! the tests all run the very same code. The order of the rules is part of the contract and is
//! documented in the README:
//!
//! 1. a name that cannot be an environment variable name (empty, `=` or NUL) is rejected;
//! 2. a name in `deny_envs` is rejected (`denied`), even a `KERNEL_*` one;
//! 3. a name in the allowed set of the kernelspec is kept, with the first source that lists it:
//!    the global `client_envs` (`config`), `[kernelspecs.K] client_envs` (`kernelspec_config`),
//!    the kernelspec's `spec.metadata.client_envs` (`kernelspec_metadata`), the keys of its `env`
//!    stanza (`kernelspec_env`, "plan B"), its `metadata.process_proxy.config.forwarded_envs` or
//!    `forward_env` (`process_proxy`, "plan C"), and the gateway's own list: EG's
//!    `EG_CLIENT_ENVS` / `EG_ENV_WHITELIST` (where `*` means every name) or Jupyter Kernel
//!    Gateway's `KG_ENV_WHITELIST` (`eg_config`); each source can be turned off;
//! 4. a name that starts with an allowed prefix is kept: `KERNEL_` when `kernel_prefix` is on
//!    (EG's own rule), and every prefix in `allow_prefixes` (`prefix:P`);
//! 5. anything else is rejected (`not_allowed`).
//!
//! Then every value envgate forwards must pass the value rules ([`crate::values`]), and the
//! body's `path` the [`PathRule`]: those refuse the whole request rather than drop a name.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::identity::{self, SetEnv};
use crate::values::{self, PathRule, Pattern, Rule, ValueRules, Violation};

/// Names that hijack a process when set in its environment. Shipped as the default `deny_envs`.
///
/// Also the `KERNEL_*` names whose value a client must never choose, whatever the value: where
/// a kernel pod runs and with which Kubernetes identity (`KERNEL_NAMESPACE`,
/// `KERNEL_SERVICE_ACCOUNT_NAME`), and what it mounts (`KERNEL_VOLUMES`, `KERNEL_VOLUME_MOUNTS`:
/// pod-spec fragments rendered into the pod template, which no value rule can make safe). A
/// deployment that wants them sets them with `set_envs`, which `deny_envs` does not judge.
pub const DEFAULT_DENY_ENVS: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "KERNEL_NAMESPACE",
    "KERNEL_SERVICE_ACCOUNT_NAME",
    "KERNEL_VOLUMES",
    "KERNEL_VOLUME_MOUNTS",
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

/// Why a name was kept: the first source that allows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The global `client_envs` of envgate's config.
    Config,
    /// `[kernelspecs.K] client_envs` in envgate's config.
    KernelspecConfig,
    /// `spec.metadata.client_envs` of the kernelspec as the upstream serves it.
    KernelspecMetadata,
    /// A key of the kernelspec's `env` stanza ("plan B").
    KernelspecEnv,
    /// `spec.metadata.process_proxy.config.forwarded_envs` / `forward_env` ("plan C").
    ProcessProxy,
    /// EG's own `EG_CLIENT_ENVS` / `EG_ENV_WHITELIST`, inherited by envgate.
    EgConfig,
    /// A prefix rule; holds its label, `prefix:KERNEL_` for the built-in one.
    Prefix(Arc<str>),
    /// `KERNEL_USERNAME` set from the trusted user header (identity binding).
    TrustedHeader,
    /// `KERNEL_USERNAME` set from a verified token's user claim (identity binding).
    Jwt,
    /// A `[users.NAME]` or `[groups.NAME]` block: holds its label, `user:NAME` or `group:NAME`.
    Block(Arc<str>),
}

impl Source {
    pub fn as_str(&self) -> &str {
        match self {
            Source::Config => "config",
            Source::KernelspecConfig => "kernelspec_config",
            Source::KernelspecMetadata => "kernelspec_metadata",
            Source::KernelspecEnv => "kernelspec_env",
            Source::ProcessProxy => "process_proxy",
            Source::EgConfig => "eg_config",
            Source::Prefix(label) => label,
            Source::TrustedHeader => "trusted_header",
            Source::Jwt => "jwt",
            Source::Block(label) => label,
        }
    }
}

/// One prefix rule: names starting with `prefix` are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRule {
    pub prefix: String,
    source: Source,
}

impl PrefixRule {
    pub fn new(prefix: &str) -> PrefixRule {
        PrefixRule { prefix: prefix.to_string(), source: Source::Prefix(format!("prefix:{prefix}").into()) }
    }

    /// A prefix of a `[users.NAME]` / `[groups.NAME]` block: names it keeps are the block's.
    pub fn of_block(prefix: &str, label: &Arc<str>) -> PrefixRule {
        PrefixRule { prefix: prefix.to_string(), source: Source::Block(label.clone()) }
    }
}

/// The names the gateway itself would forward, read from its own settings exactly as it reads them:
/// EG's `EG_CLIENT_ENVS` (or the deprecated `EG_ENV_WHITELIST`), and Jupyter Kernel Gateway's
/// `KG_ENV_WHITELIST` (docs/kernel-gateway.md), whichever are set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgEnvs {
    /// The list was exactly `*`: every name.
    pub all: bool,
    pub names: NameSet,
}

impl EgEnvs {
    /// EG 3.x: `os.getenv("EG_CLIENT_ENVS", os.getenv("EG_ENV_WHITELIST", "")).split(",")`, and
    /// `client_envs == ["*"]` means every name. Items are not trimmed, as in EG. EG 2.x knows only
    /// `EG_ENV_WHITELIST` (same split, same `*`), so a 2.x deployment that sets it alone is read right; 2.x's
    /// last fallback, Kernel Gateway's `KG_ENV_WHITELIST`, is not read.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> EgEnvs {
        let raw = get("EG_CLIENT_ENVS").or_else(|| get("EG_ENV_WHITELIST")).unwrap_or_default();
        let items: Vec<&str> = raw.split(',').collect();
        if items == ["*"] {
            return EgEnvs { all: true, names: NameSet::new() };
        }
        let kg = get("KG_ENV_WHITELIST").unwrap_or_default();
        let names = items.into_iter().filter(|s| !s.is_empty()).chain(kg_env_whitelist(&kg)).map(str::to_string);
        EgEnvs { all: false, names: names.collect() }
    }
}

/// KG 3.0.x: `os.getenv("KG_ENV_WHITELIST", "").split(",")`, items not trimmed. KG has no wildcard: a `*`
/// there is a literal name no client sends, and left out here, where `*` would read as "every name".
fn kg_env_whitelist(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').filter(|s| !s.is_empty() && *s != "*")
}

/// A set of variable names: looked up by hash (every name of every kernel start is looked up
/// in several), and iterated, compared and shown in sorted order, as a `BTreeSet` (which it
/// dereferences to, for reading).
#[derive(Clone, Default)]
pub struct NameSet {
    sorted: BTreeSet<String>,
    /// The same names, for [`NameSet::contains`]. A client's names are only looked up, which
    /// cannot be slowed down on purpose; only the configuration and the upstream's kernelspecs
    /// (which envgate trusts) insert.
    hashed: HashSet<String, foldhash::fast::RandomState>,
}

impl NameSet {
    pub fn new() -> NameSet {
        NameSet::default()
    }

    /// Whether `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.hashed.contains(name)
    }

    /// Adds `name`; whether it was new.
    pub fn insert(&mut self, name: String) -> bool {
        self.hashed.insert(name.clone());
        self.sorted.insert(name)
    }
}

impl std::ops::Deref for NameSet {
    type Target = BTreeSet<String>;
    fn deref(&self) -> &BTreeSet<String> {
        &self.sorted
    }
}

impl fmt::Debug for NameSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.sorted.fmt(f)
    }
}

impl PartialEq for NameSet {
    fn eq(&self, other: &NameSet) -> bool {
        self.sorted == other.sorted
    }
}

impl Eq for NameSet {}

impl PartialEq<BTreeSet<String>> for NameSet {
    fn eq(&self, other: &BTreeSet<String>) -> bool {
        &self.sorted == other
    }
}

impl<S: Into<String>> FromIterator<S> for NameSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> NameSet {
        let mut set = NameSet::new();
        set.extend(iter);
        set
    }
}

impl<S: Into<String>> Extend<S> for NameSet {
    fn extend<I: IntoIterator<Item = S>>(&mut self, iter: I) {
        for s in iter {
            self.insert(s.into());
        }
    }
}

impl From<BTreeSet<String>> for NameSet {
    fn from(sorted: BTreeSet<String>) -> NameSet {
        NameSet { hashed: sorted.iter().cloned().collect(), sorted }
    }
}

impl<S: Into<String>, const N: usize> From<[S; N]> for NameSet {
    fn from(names: [S; N]) -> NameSet {
        names.into_iter().collect()
    }
}

impl IntoIterator for NameSet {
    type Item = String;
    type IntoIter = std::collections::btree_set::IntoIter<String>;
    fn into_iter(self) -> Self::IntoIter {
        self.sorted.into_iter()
    }
}

impl<'a> IntoIterator for &'a NameSet {
    type Item = &'a String;
    type IntoIter = std::collections::btree_set::Iter<'a, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.sorted.iter()
    }
}

impl Serialize for NameSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sorted.serialize(s)
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(Source),
    Reject(Reason),
}

/// What the upstream says about one kernelspec that matters to the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecFacts {
    /// `spec.metadata.client_envs`, string items only.
    pub metadata_client_envs: NameSet,
    /// The keys of `spec.env`.
    pub env_keys: NameSet,
    /// `spec.metadata.process_proxy.config.forwarded_envs` and `.forward_env`, string items only.
    pub process_proxy_envs: NameSet,
}

/// The compiled policy. Built once from the configuration; cheap to share behind an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub sessions: Sessions,
    /// Prefix rules, `KERNEL_` first when `kernel_prefix` is on, then `allow_prefixes`.
    pub prefixes: Vec<PrefixRule>,
    pub client_envs: NameSet,
    pub deny_envs: NameSet,
    /// `[kernelspecs.K] client_envs`, keyed by the lower-cased kernelspec name (EG looks
    /// kernelspecs up case-insensitively).
    pub kernelspecs: HashMap<String, NameSet>,
    /// Use `spec.metadata.client_envs` (on by default).
    pub kernelspec_metadata: bool,
    /// Use the keys of `spec.env` ("plan B"; off by default).
    pub kernelspec_env: bool,
    /// Use `metadata.process_proxy.config.forwarded_envs` / `forward_env` ("plan C"; off by default).
    pub process_proxy_envs: bool,
    /// EG's own settings, when envgate was told to inherit them.
    pub eg_config: Option<EgEnvs>,
    /// What a forwarded value may hold.
    pub values: ValueRules,
    /// What to do with the body's `path`.
    pub kernel_path: PathRule,
    /// The global `set_envs`: values envgate sets on every kernel start.
    pub set_envs: Vec<SetEnv>,
    /// `[kernelspecs.K] set_envs`, keyed by the lower-cased kernelspec name.
    pub kernelspec_set_envs: HashMap<String, Vec<SetEnv>>,
    /// `[users.NAME]` blocks, by user name (exact).
    pub users: HashMap<String, Block>,
    /// `[groups.NAME]` blocks, by group name (exact).
    pub groups: HashMap<String, Block>,
}

/// A `[users.NAME]` or `[groups.NAME]` block: what one identity may do beyond (and within) the
/// global and kernelspec rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// `user:NAME` or `group:NAME`: the source audit records and `explain` name.
    pub label: Arc<str>,
    /// Names it allows.
    pub client_envs: NameSet,
    /// Prefixes it allows.
    pub prefixes: Vec<PrefixRule>,
    /// Names it denies: they are denied for whoever the block applies to, whatever allows them.
    pub deny_envs: NameSet,
    /// Patterns a value must match too, on top of the global value rules.
    pub value_patterns: BTreeMap<String, Pattern>,
    /// The (lower-cased) kernelspecs its identities may start; `None`: every one.
    pub kernelspecs: Option<NameSet>,
    /// Values it sets.
    pub set_envs: Vec<SetEnv>,
    /// Groups only: a higher priority applies first (ties: by name).
    pub priority: i64,
}

impl Block {
    /// An empty block labelled `label`.
    pub fn new(label: &str) -> Block {
        Block {
            label: label.into(),
            client_envs: NameSet::new(),
            prefixes: Vec::new(),
            deny_envs: NameSet::new(),
            value_patterns: BTreeMap::new(),
            kernelspecs: None,
            set_envs: Vec::new(),
            priority: 0,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: Mode::Drop,
            sessions: Sessions::Deny,
            prefixes: vec![PrefixRule::new(KERNEL_PREFIX)],
            client_envs: NameSet::new(),
            deny_envs: DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect(),
            kernelspecs: HashMap::new(),
            kernelspec_metadata: true,
            kernelspec_env: false,
            process_proxy_envs: false,
            eg_config: None,
            values: ValueRules::default(),
            kernel_path: PathRule::RefuseEscape,
            set_envs: Vec::new(),
            kernelspec_set_envs: HashMap::new(),
            users: HashMap::new(),
            groups: HashMap::new(),
        }
    }
}

/// A kept name and the rule that kept it. The name borrows the request's (no copy per name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept<'a> {
    pub name: &'a str,
    pub source: Source,
}

/// A rejected name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected<'a> {
    pub name: &'a str,
    pub reason: Reason,
}

/// The verdicts on every name of one request, in the order the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision<'a> {
    pub kept: Vec<Kept<'a>>,
    pub rejected: Vec<Rejected<'a>>,
}

impl Policy {
    /// The config's own list for kernelspec `kernelspec`, if any.
    fn config_list(&self, kernelspec: Option<&str>) -> Option<&NameSet> {
        let k = kernelspec?;
        self.kernelspecs.get(k).or_else(|| self.kernelspecs.get(&k.to_ascii_lowercase()))
    }

    /// Whether the built-in `KERNEL_` prefix rule is on.
    pub fn kernel_prefix(&self) -> bool {
        self.prefixes.iter().any(|p| p.prefix == KERNEL_PREFIX)
    }

    /// Every enabled list source for `kernelspec`, in the order that decides provenance.
    fn lists<'a>(
        &'a self,
        kernelspec: Option<&str>,
        facts: Option<&'a SpecFacts>,
    ) -> [(Source, Option<&'a NameSet>); 6] {
        let f = |on: bool, get: fn(&SpecFacts) -> &NameSet| facts.filter(|_| on).map(get);
        [
            (Source::Config, Some(&self.client_envs)),
            (Source::KernelspecConfig, self.config_list(kernelspec)),
            (Source::KernelspecMetadata, f(self.kernelspec_metadata, |f| &f.metadata_client_envs)),
            (Source::KernelspecEnv, f(self.kernelspec_env, |f| &f.env_keys)),
            (Source::ProcessProxy, f(self.process_proxy_envs, |f| &f.process_proxy_envs)),
            (Source::EgConfig, self.eg_config.as_ref().map(|e| &e.names)),
        ]
    }

    /// The policy for a request without identity: the global and kernelspec rules alone.
    pub fn anonymous(&self) -> View<'_> {
        View { policy: self, blocks: Vec::new() }
    }

    /// The policy for `user` in `groups`: the `[users.NAME]` block of the user and the
    /// `[groups.NAME]` blocks of its groups, in precedence order (the user's first, then the
    /// groups by priority, higher first, then by name). The order of the groups as sent never
    /// matters.
    pub fn view<'p>(&'p self, user: Option<&str>, groups: &[String]) -> View<'p> {
        let mut blocks: Vec<&Block> = Vec::new();
        if let Some(b) = user.and_then(|u| self.users.get(u)) {
            blocks.push(b);
        }
        let first_group = blocks.len();
        blocks.extend(groups.iter().filter_map(|g| self.groups.get(g.as_str())));
        let groups = &mut blocks[first_group..];
        groups.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.label.cmp(&b.label)));
        blocks.dedup_by(|a, b| std::ptr::eq(*a, *b));
        View { policy: self, blocks }
    }

    /// [`View::verdict`] without identity.
    pub fn verdict(&self, kernelspec: Option<&str>, facts: Option<&SpecFacts>, name: &str) -> Verdict {
        self.anonymous().verdict(kernelspec, facts, name)
    }

    /// [`View::decide`] without identity.
    pub fn decide<'a>(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Decision<'a> {
        self.anonymous().decide(kernelspec, facts, names)
    }

    /// [`View::allowed_names`] without identity.
    pub fn allowed_names(&self, kernelspec: Option<&str>, facts: Option<&SpecFacts>) -> Vec<String> {
        self.anonymous().allowed_names(kernelspec, facts)
    }

    /// The groups with a block, in the order they apply when several do.
    pub fn groups_in_order(&self) -> Vec<(&String, &Block)> {
        let mut groups: Vec<(&String, &Block)> = self.groups.iter().collect();
        groups.sort_by(|a, b| b.1.priority.cmp(&a.1.priority).then_with(|| a.1.label.cmp(&b.1.label)));
        groups
    }
}

/// A `set_envs` value for one kernel start, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetValue<'p> {
    pub name: &'p str,
    pub value: String,
    /// The scope that set it: `user:NAME`, `group:NAME`, `kernelspec:K` or `global`.
    pub scope: &'p str,
}

/// The policy as it applies to one identity: the global and kernelspec rules, and the blocks of
/// the identity in precedence order. Rules:
///
/// - a name is allowed if any source allows it: the global and kernelspec sources, or any
///   block's `client_envs` or `allow_prefixes`;
/// - a name denied by the global `deny_envs` or by any block that applies is denied, whatever
///   allows it;
/// - a value must pass the global value rules and every block's pattern for its name;
/// - a kernelspec may be started only if every block with a `kernelspecs` list names it;
/// - a name set by several `set_envs` takes the value of the first scope in precedence order:
///   the user's block, the groups' blocks in order, the kernelspec's, the global one.
#[derive(Debug, Clone)]
pub struct View<'p> {
    pub policy: &'p Policy,
    /// The blocks that apply, in precedence order.
    pub blocks: Vec<&'p Block>,
}

impl<'p> View<'p> {
    /// The labels of the blocks that apply, in order: equal for identities the policy treats
    /// alike (what a kernelspec response depends on).
    pub fn key(&self) -> Vec<Arc<str>> {
        self.blocks.iter().map(|b| b.label.clone()).collect()
    }

    /// Whether any block denies `name`, or the global list does.
    fn denied(&self, name: &str) -> bool {
        self.policy.deny_envs.contains(name) || self.blocks.iter().any(|b| b.deny_envs.contains(name))
    }

    /// Which list denies `name`: `global` (the top-level `deny_envs`) or the label of the first
    /// block (in precedence order) whose `deny_envs` holds it; `None` when none does. The
    /// verdict's reason is `denied` either way; this says where to look.
    pub fn denied_by(&self, name: &str) -> Option<&str> {
        if self.policy.deny_envs.contains(name) {
            return Some("global");
        }
        self.blocks.iter().find(|b| b.deny_envs.contains(name)).map(|b| &*b.label)
    }

    /// The verdict on one name for one kernelspec (`None`: no kernelspec could be determined;
    /// `facts`: what the upstream serves for it, if anything).
    pub fn verdict(&self, kernelspec: Option<&str>, facts: Option<&SpecFacts>, name: &str) -> Verdict {
        self.verdict_in(&self.policy.lists(kernelspec, facts), name)
    }

    /// The verdict on one name against the list sources of one kernelspec, looked up once.
    fn verdict_in(&self, lists: &[(Source, Option<&NameSet>)], name: &str) -> Verdict {
        let p = self.policy;
        if !valid_name(name) {
            return Verdict::Reject(Reason::InvalidName);
        }
        if self.denied(name) {
            return Verdict::Reject(Reason::Denied);
        }
        for (source, list) in lists {
            if list.is_some_and(|l| l.contains(name)) {
                return Verdict::Keep(source.clone());
            }
        }
        if let Some(b) = self.blocks.iter().find(|b| b.client_envs.contains(name)) {
            return Verdict::Keep(Source::Block(b.label.clone()));
        }
        if p.eg_config.as_ref().is_some_and(|e| e.all) {
            return Verdict::Keep(Source::EgConfig);
        }
        let mut prefixes = p.prefixes.iter().chain(self.blocks.iter().flat_map(|b| &b.prefixes));
        if let Some(rule) = prefixes.find(|r| name.starts_with(r.prefix.as_str())) {
            return Verdict::Keep(rule.source.clone());
        }
        Verdict::Reject(Reason::NotAllowed)
    }

    /// The verdicts on every name of one request.
    pub fn decide<'a>(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Decision<'a> {
        self.decide_each(kernelspec, facts, names, |_| {})
    }

    /// [`View::decide`], also telling `each` whether each name, in order, was kept.
    pub fn decide_each<'a>(
        &self,
        kernelspec: Option<&str>,
        facts: Option<&SpecFacts>,
        names: impl IntoIterator<Item = &'a str>,
        mut each: impl FnMut(bool),
    ) -> Decision<'a> {
        let lists = self.policy.lists(kernelspec, facts);
        let names = names.into_iter();
        // Sized once for the request's names rather than grown name by name (the upper bound:
        // callers filter; 1024 at most, the rest grow as they come).
        let n = names.size_hint().1.unwrap_or(0).min(1024);
        let mut d = Decision { kept: Vec::with_capacity(n), rejected: Vec::with_capacity(n) };
        for name in names {
            match self.verdict_in(&lists, name) {
                Verdict::Keep(source) => {
                    each(true);
                    d.kept.push(Kept { name, source })
                }
                Verdict::Reject(reason) => {
                    each(false);
                    d.rejected.push(Rejected { name, reason })
                }
            }
        }
        d
    }

    /// The first rule `value` breaks as the value of `name`: the global value rules, then the
    /// pattern of every block that has one for `name`.
    pub fn check_value(&self, name: &str, value: &str) -> Option<Violation> {
        if let Some(v) = self.policy.values.check(name, value) {
            return Some(v);
        }
        self.blocks.iter().find_map(|b| match b.value_patterns.get(name) {
            Some(p) if !p.is_match(value) => Some(Violation {
                name: name.to_string(),
                rule: Rule::Pattern,
                detail: format!("does not match the pattern {:?} of {}", p.text, b.label),
            }),
            _ => None,
        })
    }

    /// Every violation among `pairs`, in order.
    pub fn check_all<'a>(&self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Violation> {
        pairs.into_iter().filter_map(|(n, v)| self.check_value(n, v)).collect()
    }

    /// Whether this identity may start `kernelspec`: `Err` holds the label of the first block
    /// whose `kernelspecs` list does not name it. No kernelspec known and a block with a list:
    /// refused, since envgate cannot tell which one EG would start.
    pub fn may_start(&self, kernelspec: Option<&str>) -> Result<(), &'p str> {
        for b in &self.blocks {
            if let Some(list) = &b.kernelspecs {
                match kernelspec {
                    Some(k) if list.contains(k) || list.contains(&k.to_ascii_lowercase()) => {}
                    _ => return Err(&b.label),
                }
            }
        }
        Ok(())
    }

    /// Every `set_envs` entry that applies to a kernel start of `kernelspec`, the first in
    /// precedence order for each name, in that order.
    pub fn set_envs(&self, kernelspec: Option<&str>) -> Vec<&'p SetEnv> {
        let p: &'p Policy = self.policy;
        let per_kernelspec = kernelspec
            .and_then(|k| p.kernelspec_set_envs.get(k).or_else(|| p.kernelspec_set_envs.get(&k.to_ascii_lowercase())));
        let scopes = self.blocks.iter().map(|b| &b.set_envs).chain(per_kernelspec).chain([&p.set_envs]);
        let mut out: Vec<&SetEnv> = Vec::new();
        for s in scopes.flatten() {
            if !out.iter().any(|have| have.name == s.name) {
                out.push(s);
            }
        }
        out
    }

    /// The `set_envs` values for a kernel start of `kernelspec` by `user`; `Err` names the
    /// variable whose template needs what is not known (no user, no kernelspec).
    pub fn set_values(
        &self,
        kernelspec: Option<&str>,
        user: Option<&str>,
    ) -> Result<Vec<SetValue<'p>>, (&'p str, &'static str)> {
        let lower = kernelspec.map(str::to_ascii_lowercase);
        let cx = identity::Context { user, kernelspec: lower.as_deref() };
        self.set_envs(kernelspec)
            .into_iter()
            .map(|s| match s.template.render(cx) {
                Ok(value) => Ok(SetValue { name: &s.name, value, scope: &s.scope }),
                Err(missing) => Err((s.name.as_str(), missing)),
            })
            .collect()
    }

    /// The names a client may send for `kernelspec`, sorted: the union of every enabled list
    /// source and every block's `client_envs`, minus what is denied and what `set_envs` sets,
    /// plus `*` when EG's inherited setting is `*`. This is what envgate injects as
    /// `spec.metadata.client_envs`. Prefix rules (`KERNEL_*`) are rules, not names, and are not
    /// listed.
    pub fn allowed_names(&self, kernelspec: Option<&str>, facts: Option<&SpecFacts>) -> Vec<String> {
        let mut all: BTreeSet<&str> = BTreeSet::new();
        for (_, list) in self.policy.lists(kernelspec, facts) {
            all.extend(list.into_iter().flatten().map(String::as_str));
        }
        for b in &self.blocks {
            all.extend(b.client_envs.iter().map(String::as_str));
        }
        let set = self.set_envs(kernelspec);
        let mut names: Vec<String> = all
            .into_iter()
            .filter(|n| valid_name(n) && !self.denied(n) && !set.iter().any(|s| s.name == *n))
            .map(str::to_string)
            .collect();
        if self.policy.eg_config.as_ref().is_some_and(|e| e.all) {
            // Once, first, even when a list source also names `*`.
            names.retain(|n| n != "*");
            names.insert(0, "*".to_string());
        }
        names
    }
}

/// `s` as the inside of a TOML basic string.
fn toml_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out
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
        // `key = [...]`, one item per line when it would not fit.
        fn array(key: &str, s: &BTreeSet<String>) -> String {
            toml_array(key, s.iter().map(|n| format!("{n:?}")).collect())
        }
        writeln!(f, "mode = {:?}", self.mode.as_str())?;
        writeln!(f, "sessions = {:?}", self.sessions.as_str())?;
        writeln!(f, "kernel_prefix = {}", self.kernel_prefix())?;
        let extra: BTreeSet<String> =
            self.prefixes.iter().filter(|p| p.prefix != KERNEL_PREFIX).map(|p| p.prefix.clone()).collect();
        writeln!(f, "{}", array("allow_prefixes", &extra))?;
        writeln!(f, "{}", array("client_envs", &self.client_envs))?;
        writeln!(f, "{}", array("deny_envs", &self.deny_envs))?;
        writeln!(f, "kernelspec_metadata = {}", self.kernelspec_metadata)?;
        writeln!(f, "kernelspec_env = {}", self.kernelspec_env)?;
        writeln!(f, "process_proxy_envs = {}", self.process_proxy_envs)?;
        writeln!(f, "inherit_eg_env_config = {}", self.eg_config.is_some())?;
        if let Some(e) = &self.eg_config {
            let shown = if e.all { BTreeSet::from(["*".to_string()]) } else { (*e.names).clone() };
            writeln!(f, "# inherited from EG_CLIENT_ENVS / EG_ENV_WHITELIST / KG_ENV_WHITELIST: {}", list(&shown))?;
        }
        writeln!(f, "kernel_path = {:?}", self.kernel_path.as_str())?;
        writeln!(f, "value_max_length = {}", self.values.max_length)?;
        let forbidden: Vec<String> =
            self.values.forbidden.texts().iter().map(|t| format!("\"{}\"", toml_escape(t))).collect();
        writeln!(f, "{}", toml_array("value_forbidden", forbidden))?;
        writeln!(f, "\n[value_patterns]")?;
        for (name, p) in &self.values.patterns {
            writeln!(f, "{name:?} = \"{}\"", toml_escape(&p.text))?;
        }
        for (name, _) in values::DEFAULT_PATTERNS.iter().filter(|(n, _)| !self.values.patterns.contains_key(*n)) {
            writeln!(f, "{name:?} = \"\"  # built-in pattern removed")?;
        }
        fn set_envs(f: &mut fmt::Formatter<'_>, table: &str, sets: &[SetEnv]) -> fmt::Result {
            if !sets.is_empty() {
                writeln!(f, "\n[{table}]")?;
                for s in sets {
                    writeln!(f, "{:?} = \"{}\"", s.name, toml_escape(s.template.text()))?;
                }
            }
            Ok(())
        }
        set_envs(f, "set_envs", &self.set_envs)?;
        let mut names: Vec<&String> = self.kernelspecs.keys().chain(self.kernelspec_set_envs.keys()).collect();
        names.sort();
        names.dedup();
        for k in names {
            writeln!(f, "\n[kernelspecs.{k:?}]")?;
            writeln!(f, "{}", array("client_envs", self.kernelspecs.get(k).map_or(&BTreeSet::new(), |n| n)))?;
            set_envs(f, &format!("kernelspecs.{k:?}.set_envs"), self.kernelspec_set_envs.get(k).map_or(&[], |v| v))?;
        }
        let block = |f: &mut fmt::Formatter<'_>, table: &str, b: &Block, group: bool| -> fmt::Result {
            writeln!(f, "\n[{table}]")?;
            if group {
                writeln!(f, "priority = {}", b.priority)?;
            }
            writeln!(f, "{}", array("client_envs", &b.client_envs))?;
            let prefixes: BTreeSet<String> = b.prefixes.iter().map(|p| p.prefix.clone()).collect();
            writeln!(f, "{}", array("allow_prefixes", &prefixes))?;
            writeln!(f, "{}", array("deny_envs", &b.deny_envs))?;
            match &b.kernelspecs {
                Some(k) => writeln!(f, "{}", array("kernelspecs", k))?,
                None => writeln!(f, "# kernelspecs: every one")?,
            }
            if !b.value_patterns.is_empty() {
                writeln!(f, "\n[{table}.value_patterns]")?;
                for (name, p) in &b.value_patterns {
                    writeln!(f, "{name:?} = \"{}\"", toml_escape(&p.text))?;
                }
            }
            set_envs(f, &format!("{table}.set_envs"), &b.set_envs)
        };
        let mut users: Vec<(&String, &Block)> = self.users.iter().collect();
        users.sort_by_key(|(name, _)| *name);
        for (name, b) in users {
            block(f, &format!("users.{name:?}"), b, false)?;
        }
        let groups = self.groups_in_order();
        if !groups.is_empty() {
            let order: Vec<String> = groups.iter().map(|(n, b)| format!("{n:?} ({})", b.priority)).collect();
            writeln!(
                f,
                "\n# When several groups apply, their blocks apply in this order (priority, higher first; then by \
                 name), after the user's own block: {}",
                order.join(", ")
            )?;
        }
        for (name, b) in groups {
            block(f, &format!("groups.{name:?}"), b, true)?;
        }
        Ok(())
    }
}

/// The widest line `envgate check` writes a list on; a longer list gets a line per item.
const LIST_WIDTH: usize = 100;

/// `key = [a, b]` (items already TOML values), or, when that is wider than [`LIST_WIDTH`], the
/// same array with one item per line (TOML allows the trailing comma).
fn toml_array(key: &str, items: Vec<String>) -> String {
    let one = format!("{key} = [{}]", items.join(", "));
    if one.len() <= LIST_WIDTH {
        return one;
    }
    let mut out = format!("{key} = [\n");
    for i in items {
        out.push_str("    ");
        out.push_str(&i);
        out.push_str(",\n");
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_are_printed_one_item_a_line_and_stay_toml() {
        assert_eq!(toml_array("a", vec!["\"X\"".into(), "\"Y\"".into()]), "a = [\"X\", \"Y\"]");
        assert_eq!(toml_array("a", vec![]), "a = []");
        let p = Policy::default();
        let text = p.to_string();
        assert!(text.contains("deny_envs = [\n    \"BASH_ENV\",\n    \"ENV\",\n"), "{text}");
        assert!(text.lines().filter(|l| l.contains(" = [")).all(|l| l.len() <= LIST_WIDTH), "{text}");
        let table: toml::Table = text.parse().unwrap();
        let deny: Vec<&str> = table["deny_envs"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(deny.len(), DEFAULT_DENY_ENVS.len());
        assert!(DEFAULT_DENY_ENVS.iter().all(|n| deny.contains(n)));
    }

    fn set(v: &[&str]) -> NameSet {
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
        SpecFacts { metadata_client_envs: set(v), ..SpecFacts::default() }
    }

    fn kp() -> Source {
        Source::Prefix("prefix:KERNEL_".into())
    }

    #[test]
    fn a_name_set_looks_up_what_it_lists_in_sorted_order() {
        let mut s: NameSet = ["B", "A", "KERNEL_X"].into_iter().collect();
        assert!(s.insert("C".into()));
        assert!(!s.insert("A".into()));
        for n in ["A", "B", "C", "KERNEL_X"] {
            assert!(s.contains(n), "{n}");
        }
        for n in ["", "a", "AB", "KERNEL_", "KERNEL_XY", "D"] {
            assert!(!s.contains(n), "{n}");
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), ["A", "B", "C", "KERNEL_X"]);
        assert_eq!(format!("{s:?}"), r#"{"A", "B", "C", "KERNEL_X"}"#);
        let from_sorted = NameSet::from(BTreeSet::from(["A", "B", "C", "KERNEL_X"].map(String::from)));
        assert_eq!(s, from_sorted);
        assert!(from_sorted.contains("KERNEL_X") && !from_sorted.contains("KERNEL"));
        assert!(!NameSet::new().contains(""));
    }

    #[test]
    fn default_deny_list_covers_the_required_names() {
        let p = Policy::default();
        for n in ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PATH"] {
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
        assert_eq!(p.verdict(None, None, "LD_PRELOAD"), Verdict::Reject(Reason::Denied));
        // KERNEL_ prefix
        assert_eq!(p.verdict(None, None, "KERNEL_EVIL"), Verdict::Reject(Reason::Denied));
        // kernelspec config
        assert_eq!(p.verdict(Some("spark"), None, "SPARK_OPTS"), Verdict::Reject(Reason::Denied));
        // kernelspec metadata
        assert_eq!(p.verdict(Some("x"), Some(&f), "KERNEL_EVIL"), Verdict::Reject(Reason::Denied));
    }

    #[test]
    fn each_allow_source_is_reported() {
        let p = policy();
        let f = facts(&["META"]);
        assert_eq!(p.verdict(None, None, "FOO"), Verdict::Keep(Source::Config));
        assert_eq!(p.verdict(Some("spark"), None, "SPARK_OPTS"), Verdict::Keep(Source::KernelspecConfig));
        assert_eq!(p.verdict(Some("py"), Some(&f), "META"), Verdict::Keep(Source::KernelspecMetadata));
        assert_eq!(p.verdict(None, None, "KERNEL_X"), Verdict::Keep(kp()));
        assert_eq!(p.verdict(None, None, "BAR"), Verdict::Reject(Reason::NotAllowed));
    }

    #[test]
    fn kernelspec_lists_apply_only_to_their_kernelspec() {
        let p = policy();
        assert_eq!(p.verdict(Some("python3"), None, "SPARK_OPTS"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(p.verdict(None, None, "SPARK_OPTS"), Verdict::Reject(Reason::NotAllowed));
        // EG finds kernelspecs case-insensitively, so does the config lookup.
        assert_eq!(p.verdict(Some("SPARK"), None, "SPARK_OPTS"), Verdict::Keep(Source::KernelspecConfig));
    }

    #[test]
    fn kernel_prefix_is_case_sensitive_and_can_be_turned_off() {
        let mut p = policy();
        assert_eq!(p.verdict(None, None, "kernel_x"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(p.verdict(None, None, "KERNEL_"), Verdict::Keep(kp()));
        p.prefixes.clear();
        assert!(!p.kernel_prefix());
        assert_eq!(p.verdict(None, None, "KERNEL_X"), Verdict::Reject(Reason::NotAllowed));
        p.client_envs.insert("KERNEL_X".into());
        assert_eq!(p.verdict(None, None, "KERNEL_X"), Verdict::Keep(Source::Config));
    }

    #[test]
    fn impossible_names_are_rejected_before_anything_else() {
        let mut p = policy();
        p.client_envs.insert("A=B".into());
        for n in ["", "A=B", "KERNEL_A=B", "KERNEL_\0"] {
            assert_eq!(p.verdict(None, None, n), Verdict::Reject(Reason::InvalidName), "{n:?}");
        }
        assert!(!p.allowed_names(None, None).contains(&"A=B".to_string()));
    }

    #[test]
    fn names_are_exact() {
        let p = policy();
        for n in ["foo", "FOO ", " FOO", "FOO\u{200b}"] {
            assert_eq!(p.verdict(None, None, n), Verdict::Reject(Reason::NotAllowed), "{n:?}");
        }
    }

    #[test]
    fn decide_keeps_client_order_and_sorts_into_kept_and_rejected() {
        let p = policy();
        let d = p.decide(Some("spark"), None, ["PATH", "KERNEL_A", "BAR", "FOO", "SPARK_OPTS"]);
        let kept: Vec<(&str, Source)> = d.kept.iter().map(|k| (k.name, k.source.clone())).collect();
        let rej: Vec<(&str, Reason)> = d.rejected.iter().map(|r| (r.name, r.reason)).collect();
        assert_eq!(kept, [("KERNEL_A", kp()), ("FOO", Source::Config), ("SPARK_OPTS", Source::KernelspecConfig)]);
        assert_eq!(rej, [("PATH", Reason::Denied), ("BAR", Reason::NotAllowed)]);
    }

    #[test]
    fn allowed_names_is_the_sorted_union_minus_deny() {
        let p = policy();
        let f = facts(&["META", "PATH", "FOO"]);
        assert_eq!(p.allowed_names(Some("spark"), Some(&f)), ["FOO", "META", "SPARK_OPTS"]);
        assert_eq!(p.allowed_names(Some("other"), None), ["FOO"]);
        assert_eq!(Policy::default().allowed_names(None, None), Vec::<String>::new());
    }

    #[test]
    fn display_lists_everything() {
        let s = policy().to_string();
        assert!(s.contains("mode = \"drop\""));
        assert!(s.contains("[kernelspecs.\"spark\"]"));
        assert!(s.contains("\"LD_PRELOAD\""));
    }

    fn full_facts() -> SpecFacts {
        SpecFacts {
            metadata_client_envs: set(&["META"]),
            env_keys: set(&["SPEC_ENV", "PATH"]),
            process_proxy_envs: set(&["PP_VAR"]),
        }
    }

    #[test]
    fn plan_b_and_plan_c_sources_are_off_by_default_and_name_their_origin() {
        let mut p = policy();
        let f = full_facts();
        assert_eq!(p.verdict(Some("k"), Some(&f), "SPEC_ENV"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(p.verdict(Some("k"), Some(&f), "PP_VAR"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(p.allowed_names(Some("k"), Some(&f)), ["FOO", "META"]);
        p.kernelspec_env = true;
        p.process_proxy_envs = true;
        assert_eq!(p.verdict(Some("k"), Some(&f), "SPEC_ENV"), Verdict::Keep(Source::KernelspecEnv));
        assert_eq!(p.verdict(Some("k"), Some(&f), "PP_VAR"), Verdict::Keep(Source::ProcessProxy));
        // deny still wins over the env stanza
        assert_eq!(p.verdict(Some("k"), Some(&f), "PATH"), Verdict::Reject(Reason::Denied));
        assert_eq!(p.allowed_names(Some("k"), Some(&f)), ["FOO", "META", "PP_VAR", "SPEC_ENV"]);
        p.kernelspec_metadata = false;
        assert_eq!(p.verdict(Some("k"), Some(&f), "META"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(p.allowed_names(Some("k"), Some(&f)), ["FOO", "PP_VAR", "SPEC_ENV"]);
    }

    #[test]
    fn provenance_is_the_first_source_in_order() {
        let mut p = policy();
        p.kernelspec_env = true;
        p.process_proxy_envs = true;
        p.eg_config = Some(EgEnvs { all: false, names: set(&["FOO", "EGV"]) });
        let f = SpecFacts {
            metadata_client_envs: set(&["FOO", "SPARK_OPTS", "X"]),
            env_keys: set(&["X", "Y"]),
            process_proxy_envs: set(&["Y", "Z"]),
        };
        assert_eq!(p.verdict(Some("spark"), Some(&f), "FOO"), Verdict::Keep(Source::Config));
        assert_eq!(p.verdict(Some("spark"), Some(&f), "SPARK_OPTS"), Verdict::Keep(Source::KernelspecConfig));
        assert_eq!(p.verdict(Some("spark"), Some(&f), "X"), Verdict::Keep(Source::KernelspecMetadata));
        assert_eq!(p.verdict(Some("spark"), Some(&f), "Y"), Verdict::Keep(Source::KernelspecEnv));
        assert_eq!(p.verdict(Some("spark"), Some(&f), "Z"), Verdict::Keep(Source::ProcessProxy));
        assert_eq!(p.verdict(Some("spark"), Some(&f), "EGV"), Verdict::Keep(Source::EgConfig));
    }

    #[test]
    fn eg_settings_are_read_as_eg_reads_them() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(EgEnvs::from_env(env(&[])), EgEnvs::default());
        assert_eq!(EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", "A,B")])).names, set(&["A", "B"]));
        // the deprecated name, only when the new one is unset (even empty counts as set)
        assert_eq!(EgEnvs::from_env(env(&[("EG_ENV_WHITELIST", "W")])).names, set(&["W"]));
        assert_eq!(EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", ""), ("EG_ENV_WHITELIST", "W")])), EgEnvs::default());
        assert!(EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", "*")])).all);
        // `*` among names is a literal name, as in EG; items are not trimmed
        let e = EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", "*,A, B")]));
        assert!(!e.all);
        assert_eq!(e.names, set(&["*", "A", " B"]));
    }

    #[test]
    fn kernel_gateway_settings_are_read_as_kg_reads_them() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(EgEnvs::from_env(env(&[("KG_ENV_WHITELIST", "A,B")])).names, set(&["A", "B"]));
        assert_eq!(EgEnvs::from_env(env(&[("KG_ENV_WHITELIST", "")])), EgEnvs::default());
        // no wildcard in KG: `*` alone or among names allows nothing more
        assert_eq!(EgEnvs::from_env(env(&[("KG_ENV_WHITELIST", "*")])), EgEnvs::default());
        assert_eq!(EgEnvs::from_env(env(&[("KG_ENV_WHITELIST", "*,A, B")])).names, set(&["A", " B"]));
        // both gateways' lists add up; EG's `*` still means every name
        let both = EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", "E"), ("KG_ENV_WHITELIST", "K")]));
        assert_eq!(both.names, set(&["E", "K"]));
        assert!(EgEnvs::from_env(env(&[("EG_CLIENT_ENVS", "*"), ("KG_ENV_WHITELIST", "K")])).all);
    }

    #[test]
    fn eg_2x_setting_alone_is_read_star_included() {
        // EG 2.x knows only `env_whitelist` (`EG_ENV_WHITELIST`): an admin pairing envgate with it sets that
        // variable alone, and `*` there means every name, as in EG 2.6.0's handler.
        let get = |k: &str| (k == "EG_ENV_WHITELIST").then(|| "*".to_string());
        assert_eq!(EgEnvs::from_env(get), EgEnvs { all: true, names: NameSet::new() });
        let get = |k: &str| (k == "EG_ENV_WHITELIST").then(|| "A,B".to_string());
        assert_eq!(EgEnvs::from_env(get).names, set(&["A", "B"]));
    }

    #[test]
    fn eg_star_allows_every_name_but_deny_still_wins() {
        let mut p = policy();
        p.eg_config = Some(EgEnvs { all: true, names: NameSet::new() });
        assert_eq!(p.verdict(None, None, "ANYTHING"), Verdict::Keep(Source::EgConfig));
        assert_eq!(p.verdict(None, None, "PATH"), Verdict::Reject(Reason::Denied));
        assert_eq!(p.verdict(None, None, "A=B"), Verdict::Reject(Reason::InvalidName));
        assert_eq!(p.allowed_names(None, None), ["*", "FOO"]);
    }

    #[test]
    fn extra_prefixes_and_the_builtin_one_off() {
        let mut p = policy();
        p.prefixes = vec![PrefixRule::new("SPARK_")];
        assert_eq!(p.verdict(None, None, "SPARK_HOME"), Verdict::Keep(Source::Prefix("prefix:SPARK_".into())));
        assert_eq!(p.verdict(None, None, "KERNEL_X"), Verdict::Reject(Reason::NotAllowed));
        p.client_envs.insert("KERNEL_USERNAME".into());
        assert_eq!(p.verdict(None, None, "KERNEL_USERNAME"), Verdict::Keep(Source::Config));
        assert_eq!(Source::Prefix("prefix:SPARK_".into()).as_str(), "prefix:SPARK_");
    }

    fn template(name: &str, text: &str, scope: &str) -> SetEnv {
        SetEnv { name: name.into(), template: identity::Template::parse(text).unwrap(), scope: scope.into() }
    }

    /// A policy with a user block and three group blocks.
    fn identities() -> Policy {
        let mut alice = Block::new("user:alice");
        alice.client_envs = set(&["ALICE"]);
        alice.set_envs = vec![template("KERNEL_IMAGE", "alice-image", "user:alice")];
        let mut eng = Block::new("group:eng");
        eng.prefixes = vec![PrefixRule::of_block("SPARK_", &eng.label)];
        eng.deny_envs = set(&["FOO"]);
        eng.kernelspecs = Some(set(&["python3", "spark"]));
        eng.value_patterns = BTreeMap::from([("SPARK_OPTS".to_string(), Pattern::new("[a-z]+").unwrap())]);
        eng.set_envs = vec![template("KERNEL_IMAGE", "eng-image", "group:eng"), template("X", "eng", "group:eng")];
        let mut gpu = Block::new("group:gpu");
        gpu.priority = 10;
        gpu.client_envs = set(&["CUDA"]);
        gpu.kernelspecs = Some(set(&["python3"]));
        gpu.set_envs = vec![template("X", "gpu", "group:gpu")];
        let mut ana = Block::new("group:analysts");
        ana.set_envs = vec![template("X", "analysts", "group:analysts")];
        Policy {
            users: HashMap::from([("alice".to_string(), alice)]),
            groups: HashMap::from([("eng".into(), eng), ("gpu".into(), gpu), ("analysts".into(), ana)]),
            set_envs: vec![template("KERNEL_NAMESPACE", "ns-{user_dns}", "global"), template("X", "global", "global")],
            kernelspec_set_envs: HashMap::from([(
                "spark".to_string(),
                vec![template("KERNEL_IMAGE", "spark-{kernelspec}", "kernelspec:spark")],
            )]),
            ..policy()
        }
    }

    fn groups(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_user_block_applies_first_then_groups_by_priority_then_name_whatever_the_order_sent() {
        let p = identities();
        let labels = |u: Option<&str>, g: &[&str]| -> Vec<String> {
            p.view(u, &groups(g)).blocks.iter().map(|b| b.label.to_string()).collect()
        };
        assert_eq!(
            labels(Some("alice"), &["eng", "gpu", "analysts"]),
            ["user:alice", "group:gpu", "group:analysts", "group:eng"]
        );
        assert_eq!(
            labels(Some("alice"), &["analysts", "eng", "gpu"]),
            labels(Some("alice"), &["eng", "gpu", "analysts"])
        );
        assert_eq!(labels(Some("bob"), &["nope", "eng", "eng"]), ["group:eng"]);
        assert!(labels(None, &[]).is_empty());
        assert_eq!(p.view(Some("bob"), &groups(&["eng"])).key(), p.view(Some("carol"), &groups(&["eng"])).key());
        let order: Vec<&str> = p.groups_in_order().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(order, ["gpu", "analysts", "eng"]);
    }

    #[test]
    fn blocks_widen_names_and_their_denies_win_for_their_members_only() {
        let p = identities();
        let eng = p.view(Some("bob"), &groups(&["eng"]));
        assert_eq!(eng.verdict(None, None, "SPARK_HOME"), Verdict::Keep(Source::Block("group:eng".into())));
        assert_eq!(eng.verdict(None, None, "FOO"), Verdict::Reject(Reason::Denied), "a block's deny beats client_envs");
        assert_eq!(eng.verdict(None, None, "CUDA"), Verdict::Reject(Reason::NotAllowed));
        let anyone = p.anonymous();
        assert_eq!(anyone.verdict(None, None, "SPARK_HOME"), Verdict::Reject(Reason::NotAllowed));
        assert_eq!(anyone.verdict(None, None, "FOO"), Verdict::Keep(Source::Config));
        let both = p.view(Some("alice"), &groups(&["eng", "gpu"]));
        assert_eq!(both.verdict(None, None, "CUDA"), Verdict::Keep(Source::Block("group:gpu".into())));
        assert_eq!(both.verdict(None, None, "ALICE"), Verdict::Keep(Source::Block("user:alice".into())));
        // The global deny still wins over a block's allowance.
        let mut q = identities();
        q.groups.get_mut("gpu").unwrap().client_envs.insert("LD_PRELOAD".into());
        assert_eq!(q.view(None, &groups(&["gpu"])).verdict(None, None, "LD_PRELOAD"), Verdict::Reject(Reason::Denied));
        // Global sources come first in provenance.
        assert_eq!(both.verdict(Some("spark"), None, "SPARK_OPTS"), Verdict::Keep(Source::KernelspecConfig));
        // Whose deny_envs denied a name: the global list's first, then the first block's.
        assert_eq!(eng.denied_by("FOO"), Some("group:eng"));
        assert_eq!(eng.denied_by("LD_PRELOAD"), Some("global"));
        assert_eq!(eng.denied_by("SPARK_HOME"), None);
        assert_eq!(anyone.denied_by("FOO"), None);
    }

    #[test]
    fn a_value_must_pass_every_pattern_that_applies() {
        let p = identities();
        let eng = p.view(None, &groups(&["eng"]));
        assert_eq!(eng.check_value("SPARK_OPTS", "abc"), None);
        let v = eng.check_value("SPARK_OPTS", "ABC").unwrap();
        assert_eq!((v.rule, v.detail.as_str()), (Rule::Pattern, "does not match the pattern \"[a-z]+\" of group:eng"));
        assert_eq!(p.anonymous().check_value("SPARK_OPTS", "ABC"), None);
        assert_eq!(eng.check_value("SPARK_OPTS", "a$b").unwrap().rule, Rule::Forbidden, "global rules first");
    }

    #[test]
    fn a_kernelspec_list_narrows_and_never_widens() {
        let p = identities();
        let eng = p.view(None, &groups(&["eng"]));
        assert_eq!(eng.may_start(Some("spark")), Ok(()));
        assert_eq!(eng.may_start(Some("SPARK")), Ok(()), "case-insensitive, as EG");
        assert_eq!(eng.may_start(Some("r")), Err("group:eng"));
        assert_eq!(eng.may_start(None), Err("group:eng"), "no kernelspec known: refused");
        let both = p.view(None, &groups(&["eng", "gpu"]));
        assert_eq!(both.may_start(Some("python3")), Ok(()));
        assert_eq!(both.may_start(Some("spark")), Err("group:gpu"), "every list must name it");
        assert_eq!(p.view(Some("alice"), &[]).may_start(Some("r")), Ok(()), "no list: every kernelspec");
        assert_eq!(p.anonymous().may_start(None), Ok(()));
    }

    #[test]
    fn set_envs_take_the_first_scope_in_precedence_order() {
        let p = identities();
        let values = |u: Option<&str>, g: &[&str], k: Option<&str>| -> Vec<(String, String, String)> {
            p.view(u, &groups(g))
                .set_values(k, u)
                .unwrap()
                .into_iter()
                .map(|s| (s.name.to_string(), s.value, s.scope.to_string()))
                .collect()
        };
        let t = |n: &str, v: &str, s: &str| (n.to_string(), v.to_string(), s.to_string());
        assert_eq!(
            values(Some("alice"), &["eng"], Some("Spark")),
            [
                t("KERNEL_IMAGE", "alice-image", "user:alice"),
                t("X", "eng", "group:eng"),
                t("KERNEL_NAMESPACE", "ns-alice", "global")
            ]
        );
        assert_eq!(
            values(Some("Bob"), &[], Some("Spark")),
            [
                t("KERNEL_IMAGE", "spark-spark", "kernelspec:spark"),
                t("KERNEL_NAMESPACE", &format!("ns-{}", identity::user_dns("Bob")), "global"),
                t("X", "global", "global")
            ]
        );
        // gpu (priority 10) over analysts and eng (0); analysts over eng by name.
        let x = |v: Vec<(String, String, String)>| v.into_iter().find(|s| s.0 == "X").unwrap();
        assert_eq!(x(values(Some("c"), &["eng", "analysts", "gpu"], None)), t("X", "gpu", "group:gpu"));
        assert_eq!(x(values(Some("c"), &["eng", "analysts"], None)), t("X", "analysts", "group:analysts"));
        let err = p.view(None, &[]).set_values(Some("r"), None).unwrap_err();
        assert_eq!(err, ("KERNEL_NAMESPACE", "no user"));
    }

    #[test]
    fn each_identity_is_shown_its_own_names_without_denied_or_set_ones() {
        let p = identities();
        assert_eq!(p.anonymous().allowed_names(Some("spark"), None), ["FOO", "SPARK_OPTS"]);
        assert_eq!(p.view(None, &groups(&["eng"])).allowed_names(Some("spark"), None), ["SPARK_OPTS"]);
        let mut q = identities();
        q.groups.get_mut("gpu").unwrap().client_envs.insert("X".into());
        assert_eq!(
            q.view(Some("alice"), &groups(&["gpu"])).allowed_names(None, None),
            ["ALICE", "CUDA", "FOO"],
            "X is set, not sent"
        );
    }
}
