//! Value rules: what a forwarded env value, and the body's `path`, may hold.
//!
//! EG 3.2.x and older copy every `KERNEL_*` value into launch templates, pod manifests and
//! shells (CVE-2026-44180, -44181, -44182, and `$(...)` on the SSH launcher). EG 3.3.0 refuses
//! values longer than 4096 characters or holding `$`, a backtick, CR, LF or NUL. envgate applies
//! the same checks (plus template openers `{{` and `{%`) to every value it forwards, so that an
//! unpatched EG behind it sees only what a patched one would accept, and adds per-name patterns
//! for the names EG's launchers consume (`KERNEL_UID`, `KERNEL_POD_NAME`, ...).
//!
//! Pure and compiled once from the configuration. A violation names the variable and the rule,
//! never the value.

use std::collections::BTreeMap;
use std::fmt;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;

/// EG 3.3.0's limit on a value's length, in characters.
pub const DEFAULT_MAX_LENGTH: usize = 4096;

/// What no forwarded value may contain: EG 3.3.0's list, plus template openers.
pub const DEFAULT_FORBIDDEN: &[&str] = &["$", "`", "\r", "\n", "\0", "{{", "{%"];

const UID: &str = "[1-9][0-9]{0,9}";
const DNS_LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";

/// The built-in per-name patterns: the names EG's launchers put into commands, templates and
/// manifests. Each must match the whole value. Config can replace or remove any of them.
pub const DEFAULT_PATTERNS: &[(&str, &str)] = &[
    // A decimal uid/gid, not 0 (root) and without leading zeros ("00" is root too).
    ("KERNEL_UID", UID),
    ("KERNEL_GID", UID),
    // The canonical (lower-case, hyphenated) uuid EG expects.
    ("KERNEL_ID", "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    ("KERNEL_POD_NAME", DNS_LABEL),
    ("KERNEL_NAMESPACE", DNS_LABEL),
    ("KERNEL_SERVICE_ACCOUNT_NAME", DNS_LABEL),
    // Seconds, as EG's float() reads them.
    ("KERNEL_LAUNCH_TIMEOUT", "[0-9]{1,7}(\\.[0-9]{1,6})?"),
    // A user name as JupyterHub and Unix systems make them (e-mail style allowed).
    ("KERNEL_USERNAME", "[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,63}"),
    // The kernel's image, and the Spark executors' image (EG's Spark-on-Kubernetes kernelspecs),
    // both rendered into pod specs.
    ("KERNEL_IMAGE", IMAGE),
    ("KERNEL_EXECUTOR_IMAGE", IMAGE),
];

/// An OCI image reference: [registry[:port]/]path[:tag][@digest].
const IMAGE: &str =
    "([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]{1,5})?/)?\
                     [a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*\
                     (:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?";

/// A per-name pattern, compiled; compared by its text.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// As written (in the built-in table or the config), without the anchors envgate adds.
    pub text: String,
    re: Regex,
}

impl Pattern {
    /// Compiles `text` so that it must match a whole value.
    pub fn new(text: &str) -> Result<Pattern, String> {
        let re = regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| e.to_string().lines().last().unwrap_or("invalid regular expression").trim().to_string())?;
        Ok(Pattern { text: text.to_string(), re })
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.re.is_match(value)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

/// Which rule a value broke. A bounded set: used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Longer than `value_max_length` characters.
    MaxLength,
    /// Holds one of `value_forbidden`.
    Forbidden,
    /// Does not match the name's pattern.
    Pattern,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::MaxLength => "max_length",
            Rule::Forbidden => "forbidden",
            Rule::Pattern => "pattern",
        }
    }
}

/// One value that broke a rule: the variable's name, the rule, and a description of the rule
/// (from the configuration, never from the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub name: String,
    pub rule: Rule,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.detail)
    }
}

/// The compiled value rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRules {
    /// Longest value, in characters.
    pub max_length: usize,
    /// Substrings no value may contain.
    pub forbidden: Forbidden,
    /// Per-name patterns: the built-in ones, replaced or removed by config.
    pub patterns: BTreeMap<String, Pattern>,
}

impl Default for ValueRules {
    fn default() -> Self {
        ValueRules {
            max_length: DEFAULT_MAX_LENGTH,
            forbidden: Forbidden::new(DEFAULT_FORBIDDEN.iter().map(|s| s.to_string()).collect()),
            patterns: DEFAULT_PATTERNS
                .iter()
                .map(|(n, p)| (n.to_string(), Pattern::new(p).expect("built-in patterns compile")))
                .collect(),
        }
    }
}

/// The substrings no value may contain, compiled once (at config load) into one Aho-Corasick
/// automaton, so that a value is scanned once for all of them instead of searched once per
/// substring. Compared and shown by its texts.
#[derive(Clone)]
pub struct Forbidden {
    texts: Vec<String>,
    /// Whether a value holds any text. Leftmost-first, only for its prefilter: whether there is a
    /// match does not depend on the match kind, and a standard automaton scans at a third of the
    /// speed. `None` only if the automaton cannot be built (texts far beyond any real
    /// configuration): then every value is searched text by text, with the same results.
    any: Option<AhoCorasick>,
}

impl Forbidden {
    pub fn new(texts: Vec<String>) -> Forbidden {
        let any = AhoCorasick::builder().match_kind(MatchKind::LeftmostFirst).build(&texts).ok();
        Forbidden { texts, any }
    }

    /// The texts, in their configured order.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// The first text, in configured order, that `value` holds.
    pub fn find(&self, value: &str) -> Option<&str> {
        if self.any.as_ref().is_some_and(|ac| !ac.is_match(value)) {
            return None;
        }
        // The value holds one and is refused. Which one comes first in configured order (not in
        // the value, and texts may overlap) is a search per text, paid only by refused values.
        self.texts.iter().find(|t| value.contains(t.as_str())).map(String::as_str)
    }
}

impl PartialEq for Forbidden {
    fn eq(&self, other: &Self) -> bool {
        self.texts == other.texts
    }
}

impl Eq for Forbidden {}

impl fmt::Debug for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forbidden").field("texts", &self.texts).finish_non_exhaustive()
    }
}

/// A forbidden substring as a message shows it: control characters escaped.
pub fn show(s: &str) -> String {
    s.escape_debug().to_string()
}

impl ValueRules {
    /// The first rule `value` breaks as the value of `name`, if any.
    pub fn check(&self, name: &str, value: &str) -> Option<Violation> {
        let v = |rule, detail: String| Some(Violation { name: name.to_string(), rule, detail });
        // Cheap test first: a byte length within the limit is a char length within it too.
        if value.len() > self.max_length && value.chars().count() > self.max_length {
            return v(Rule::MaxLength, format!("longer than {} characters", self.max_length));
        }
        if let Some(f) = self.forbidden.find(value) {
            return v(Rule::Forbidden, format!("contains the forbidden \"{}\"", show(f)));
        }
        match self.patterns.get(name) {
            Some(p) if !p.is_match(value) => v(Rule::Pattern, format!("does not match the pattern {:?}", p.text)),
            _ => None,
        }
    }

    /// Every violation among `pairs`, in order.
    pub fn check_all<'a>(&self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Violation> {
        pairs.into_iter().filter_map(|(n, v)| self.check(n, v)).collect()
    }
}

/// What envgate does with the kernel-start body's `path` (the kernel's working directory,
/// relative to EG's root), which EG follows out of its root through `..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRule {
    /// Forward it as sent.
    Keep,
    /// Refuse (400) an absolute path, a `..` segment, a backslash, NUL, or a non-string.
    RefuseEscape,
    /// Remove such a `path` from the forwarded body (EG then uses its root).
    Strip,
}

impl PathRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PathRule::Keep => "keep",
            PathRule::RefuseEscape => "refuse_escape",
            PathRule::Strip => "strip",
        }
    }

    pub fn parse(s: &str) -> Option<PathRule> {
        match s {
            "keep" => Some(PathRule::Keep),
            "refuse_escape" => Some(PathRule::RefuseEscape),
            "strip" => Some(PathRule::Strip),
            _ => None,
        }
    }
}

/// Whether a body's `path` (`None`: not a string) could take the kernel out of EG's root:
/// absolute, a drive letter, any `..` segment, a backslash (a separator on Windows, and never
/// needed), NUL, or not a string at all.
pub fn path_escapes(path: Option<&str>) -> bool {
    let Some(p) = path else { return true };
    p.starts_with('/')
        || p.starts_with('~')
        || p.contains(['\\', '\0'])
        || p.as_bytes().get(1) == Some(&b':')
        || p.split('/').any(|seg| seg == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ValueRules {
        ValueRules::default()
    }

    fn rule_of(name: &str, value: &str) -> Option<Rule> {
        rules().check(name, value).map(|v| v.rule)
    }

    #[test]
    fn eg_330_rules_apply_to_every_name() {
        for bad in ["$(id)", "a`id`", "a\nb", "a\rb", "a\0b", "${HOME}", "$"] {
            assert_eq!(rule_of("ANY", bad), Some(Rule::Forbidden), "{bad:?}");
            assert_eq!(rule_of("KERNEL_X", bad), Some(Rule::Forbidden), "{bad:?}");
        }
        assert_eq!(rule_of("ANY", &"x".repeat(4096)), None);
        assert_eq!(rule_of("ANY", &"x".repeat(4097)), Some(Rule::MaxLength));
        // characters, not bytes, as in EG (Python's len)
        assert_eq!(rule_of("ANY", &"é".repeat(4096)), None);
        assert_eq!(rule_of("ANY", &"é".repeat(4097)), Some(Rule::MaxLength));
        assert_eq!(rule_of("ANY", ""), None);
        assert_eq!(rule_of("ANY", "plain value, with spaces & symbols: #!%^*()[]"), None);
    }

    #[test]
    fn template_openers_are_refused() {
        for bad in ["{{ 7*7 }}", "a{%raw%}", "x{{"] {
            assert_eq!(rule_of("KERNEL_ANY", bad), Some(Rule::Forbidden), "{bad:?}");
        }
        assert_eq!(rule_of("KERNEL_ANY", "{\"a\": {\"b\": 1}}"), None);
    }

    #[test]
    fn uid_and_gid_are_decimal_and_not_root() {
        for n in ["KERNEL_UID", "KERNEL_GID"] {
            for ok in ["1", "1000", "65534", "4294967295"] {
                assert_eq!(rule_of(n, ok), None, "{n}={ok}");
            }
            // CVE-2026-44180: "0 " passed EG's own root check
            for bad in ["0", "0 ", " 0", "00", "01000", "-1", "1e3", "0x10", "1000 ", "", "١٠٠٠", "12345678901"] {
                assert_eq!(rule_of(n, bad), Some(Rule::Pattern), "{n}={bad:?}");
            }
        }
    }

    #[test]
    fn kernel_id_is_a_canonical_uuid() {
        assert_eq!(rule_of("KERNEL_ID", "3336c9d8-2546-41c2-82ce-dc5ea9745e9c"), None);
        for bad in [
            "3336C9D8-2546-41C2-82CE-DC5EA9745E9C",
            "3336c9d8254641c282cedc5ea9745e9c",
            "{3336c9d8-2546-41c2-82ce-dc5ea9745e9c}",
            "3336c9d8-2546-41c2-82ce-dc5ea9745e9c\u{a0}",
            "../../etc",
        ] {
            assert_eq!(rule_of("KERNEL_ID", bad), Some(Rule::Pattern), "{bad:?}");
        }
    }

    #[test]
    fn kubernetes_names_are_dns_labels() {
        for n in ["KERNEL_POD_NAME", "KERNEL_NAMESPACE", "KERNEL_SERVICE_ACCOUNT_NAME"] {
            for ok in ["a", "alice-python3", "ns1", &"a".repeat(63)] {
                assert_eq!(rule_of(n, ok), None, "{n}={ok}");
            }
            for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"a".repeat(64), "a\u{2028}b", "kube-system\""] {
                assert_eq!(rule_of(n, bad), Some(Rule::Pattern), "{n}={bad:?}");
            }
        }
    }

    #[test]
    fn launch_timeout_username_and_image() {
        for ok in ["40", "40.0", "600", "0.5"] {
            assert_eq!(rule_of("KERNEL_LAUNCH_TIMEOUT", ok), None, "{ok}");
        }
        for bad in ["", "forty", "1e9", "-1", "40s", "nan", "inf"] {
            assert_eq!(rule_of("KERNEL_LAUNCH_TIMEOUT", bad), Some(Rule::Pattern), "{bad:?}");
        }
        for ok in ["alice", "bob.smith", "carol@example.org", "jovyan", "u_1", "a+b"] {
            assert_eq!(rule_of("KERNEL_USERNAME", ok), None, "{ok}");
        }
        for bad in ["", "-rf", ".", "..", "../root", "a b", "a;id", "a/b", "a'b", &"a".repeat(65)] {
            assert_eq!(rule_of("KERNEL_USERNAME", bad), Some(Rule::Pattern), "{bad:?}");
        }
        for ok in [
            "python",
            "elyra/kernel-py:3.3.0",
            "docker.io/elyra/kernel-py",
            "registry.example.org:5000/team/img:v1.2_3",
            "ghcr.io/org/img@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            for name in ["KERNEL_IMAGE", "KERNEL_EXECUTOR_IMAGE"] {
                assert_eq!(rule_of(name, ok), None, "{name} {ok}");
            }
        }
        for bad in ["", "Elyra/Kernel", "img:tag:tag", "img\"- name: x", "img --privileged", "a//b", "/img"] {
            for name in ["KERNEL_IMAGE", "KERNEL_EXECUTOR_IMAGE"] {
                assert_eq!(rule_of(name, bad), Some(Rule::Pattern), "{name} {bad:?}");
            }
        }
    }

    #[test]
    fn violations_name_the_rule_never_the_value() {
        let secret = "s3cr3t$(curl evil)";
        let v = rules().check("KERNEL_X", secret).unwrap();
        assert_eq!(v.name, "KERNEL_X");
        assert!(!v.to_string().contains("s3cr3t"), "{v}");
        assert!(v.to_string().contains("\"$\""), "{v}");
        let v = rules().check("KERNEL_UID", "0 ").unwrap();
        assert!(v.to_string().contains("[1-9]"), "{v}");
        let v = rules().check("A", "a\nb").unwrap();
        assert!(v.to_string().contains("\\n"), "{v}");
    }

    #[test]
    fn patterns_match_the_whole_value_and_can_be_replaced() {
        let mut r = rules();
        r.patterns.insert("KERNEL_UID".into(), Pattern::new("[0-9]+").unwrap());
        assert_eq!(r.check("KERNEL_UID", "0"), None);
        assert!(r.check("KERNEL_UID", "0 ").is_some());
        // alternation is anchored as a whole
        r.patterns.insert("X".into(), Pattern::new("a|b").unwrap());
        assert_eq!(r.check("X", "a"), None);
        assert!(r.check("X", "ab").is_some());
        assert!(r.check("X", "xa").is_some());
        r.patterns.remove("KERNEL_UID");
        assert_eq!(r.check("KERNEL_UID", "0"), None);
        // the default rules still apply to a name with its own pattern
        r.patterns.insert("Y".into(), Pattern::new(".*").unwrap());
        assert_eq!(r.check("Y", "$x").map(|v| v.rule), Some(Rule::Forbidden));
        assert!(Pattern::new("(").is_err());
    }

    #[test]
    fn the_one_pass_scan_agrees_with_a_search_per_token() {
        let mut texts = rules().forbidden.texts().to_vec();
        texts.extend(["ab".to_string(), "é".to_string()]);
        let f = Forbidden::new(texts.clone());
        for v in ["", "x", "a", "ab", "xab", "aab", "{", "{x{{", "{%", "$", "é", "e\u{301}", "\0", "a\r", "`", "b{%"] {
            let want = texts.iter().find(|t| v.contains(t.as_str())).map(String::as_str);
            assert_eq!(f.find(v), want, "{v:?}");
        }
        texts.push(String::new());
        assert!(Forbidden::new(texts).find("anything").is_some(), "an empty token is in every value");
    }

    /// Texts and values over a small alphabet, so that texts overlap, share prefixes and occur
    /// in values often: multi-byte characters, the control characters EG refuses, template openers.
    fn small_text(max: usize) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        const ALPHABET: &[char] = &['a', 'b', '$', '{', '%', 'é', '日', '\0', '\r', '\n'];
        proptest::collection::vec(proptest::sample::select(ALPHABET), 0..=max).prop_map(String::from_iter)
    }

    proptest::proptest! {
        #[test]
        fn the_scan_finds_the_first_text_in_configured_order(
            texts in proptest::collection::vec(small_text(3), 0..8),
            values in proptest::collection::vec(small_text(12), 1..8),
        ) {
            let f = Forbidden::new(texts.clone());
            proptest::prop_assert_eq!(f.texts(), &texts[..]);
            for v in &values {
                let want = texts.iter().find(|t| v.contains(t.as_str())).map(String::as_str);
                proptest::prop_assert_eq!(f.find(v), want, "{:?} in {:?}", v, texts);
            }
        }
    }

    #[test]
    fn check_all_keeps_order() {
        let v = rules().check_all([("A", "ok"), ("KERNEL_UID", "0"), ("B", "`x`")]);
        let got: Vec<(&str, Rule)> = v.iter().map(|v| (v.name.as_str(), v.rule)).collect();
        assert_eq!(got, [("KERNEL_UID", Rule::Pattern), ("B", Rule::Forbidden)]);
    }

    #[test]
    fn paths_that_leave_the_root() {
        for ok in ["", "nb", "work/nb.ipynb", "a/./b", "a..b", "..a/b", "dir/"] {
            assert!(!path_escapes(Some(ok)), "{ok:?}");
        }
        for bad in ["/tmp", "..", "../x", "a/../../x", "a/..", "a\\..\\b", "C:/x", "~root", "a\0b"] {
            assert!(path_escapes(Some(bad)), "{bad:?}");
        }
        assert!(path_escapes(None));
        for r in [PathRule::Keep, PathRule::RefuseEscape, PathRule::Strip] {
            assert_eq!(PathRule::parse(r.as_str()), Some(r));
        }
        assert_eq!(PathRule::parse("yes"), None);
    }
}
