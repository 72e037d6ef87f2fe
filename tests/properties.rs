//! Property tests (proptest) for the pure parts of envgate: the kernel-start parse and decision,
//! the kernelspec rewrite and the route classifier. The checks themselves are in `oracle/`,
//! shared with the cargo-fuzz targets in `fuzz/`.
//!
//! - kernel starts: bodies generated as structured JSON (names that are allowed, denied,
//!   `KERNEL_*`, impossible; escapes, duplicates; values with `$`, backticks, newlines, `{{`, long
//!   ones; numbers, nested values, a `path` with `..`) and as random and mutated bytes, decided under
//!   random policies: never a panic, the forwarded body re-parses, every forwarded name is allowed
//!   and every forwarded value passes the value rules (report mode: the env as sent), and a refusal
//!   never holds a value;
//! - identity binding: trusted header values (absent, blank, padded, the body's own claim, someone
//!   else's) under `refuse` and `overwrite`: a header naming no one is a 403, a mismatch under
//!   `refuse` is a 403, otherwise the kernel's `KERNEL_USERNAME` is the trusted user, once;
//! - kernelspecs: generated and mutated documents: never a panic, the output is the input with
//!   `client_envs` injected as the policy computes it, nothing else changed;
//! - routes: a POST that normalizes to a kernel-starting route is ambiguous, never `Other`;
//! - per-identity policy: for random global, user and group blocks and random identities, the
//!   view keeps exactly the names a model of the documented precedence keeps, applies the blocks
//!   in the documented order whatever the order of the groups sent, narrows kernelspecs, picks
//!   each `set_envs` value from the first scope, and shows each identity its own names.

mod oracle;

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use envgate::config::Mismatch;
use envgate::policy::{EgEnvs, Mode, NameSet, Policy, PrefixRule, SpecFacts, DEFAULT_DENY_ENVS, KERNEL_PREFIX};
use envgate::rewrite::start;
use envgate::routes::{Route, Routes};
use envgate::values::{Forbidden, PathRule, Pattern, ValueRules};
use http::Method;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// JSON, generated as a tree and written with random escapes and whitespace.

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    /// A number literal.
    Num(&'static str),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

/// Numbers serde_json (and EG's `json.loads`) read; `1e400` is out of range for serde_json.
const NUMBERS: &[&str] = &["0", "-0", "1", "-12", "3.5", "1e5", "-2.5E-3", "12345678901234567890", "1.0e+2", "1e400"];

/// A small deterministic generator for the writer's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }
}

fn ws(out: &mut String, r: &mut Rng) {
    if r.one_in(4) {
        out.push_str([" ", "\n", "\t", "\r\n", "  "][(r.next() % 5) as usize]);
    }
}

/// Writes `s` as a JSON string, escaping some characters that need no escape (`\u0046`, `\/`,
/// surrogate pairs).
fn write_str(out: &mut String, s: &str, r: &mut Rng) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' if r.one_in(2) => out.push_str("\\n"),
            '/' if r.one_in(2) => out.push_str("\\/"),
            c if (c as u32) < 0x20 || r.one_in(5) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    if r.one_in(2) {
                        out.push_str(&format!("\\u{u:04x}"));
                    } else {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write(out: &mut String, j: &J, r: &mut Rng) {
    ws(out, r);
    match j {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Num(n) => out.push_str(n),
        J::Str(s) => write_str(out, s, r),
        J::Arr(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, x, r);
            }
            ws(out, r);
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(out, r);
                write_str(out, k, r);
                ws(out, r);
                out.push(':');
                write(out, v, r);
            }
            ws(out, r);
            out.push('}');
        }
    }
    ws(out, r);
}

fn has_bad_number(j: &J) -> bool {
    match j {
        J::Num(n) => *n == "1e400",
        J::Arr(items) => items.iter().any(has_bad_number),
        J::Obj(m) => m.iter().any(|(_, v)| has_bad_number(v)),
        _ => false,
    }
}

fn no_dups<'a>(keys: impl IntoIterator<Item = &'a String>) -> bool {
    let mut seen = BTreeSet::new();
    keys.into_iter().all(|k| seen.insert(k))
}

/// Whether the strict parse must accept a body with these top-level members.
fn acceptable(members: &[(String, J)]) -> bool {
    no_dups(members.iter().map(|(k, _)| k))
        && members.iter().all(|(k, v)| match (k.as_str(), v) {
            ("env", J::Obj(env)) => {
                no_dups(env.iter().map(|(k, _)| k)) && env.iter().all(|(_, v)| matches!(v, J::Str(_)))
            }
            ("env", _) => false,
            ("name", J::Str(_) | J::Null) => true,
            ("name", _) => false,
            (_, v) => !has_bad_number(v),
        })
}

// ---------------------------------------------------------------------------------------------
// What kernel-start bodies hold.

/// Env names: allowed by some policy, `KERNEL_*` with and without value patterns, denied ones,
/// ones that are not names at all, near misses.
const NAMES: &[&str] = &[
    "FOO",
    "BAR",
    "SPARK_HOME",
    "KERNEL_USERNAME",
    "KERNEL_UID",
    "KERNEL_GID",
    "KERNEL_ID",
    "KERNEL_X",
    "KERNEL_POD_NAME",
    "KERNEL_NAMESPACE",
    "KERNEL_IMAGE",
    "KERNEL_LAUNCH_TIMEOUT",
    "KERNEL_",
    "kernel_x",
    "PATH",
    "LD_PRELOAD",
    "PYTHONPATH",
    "BASH_ENV",
    "ENV",
    "",
    "A=B",
    "A\0B",
    "*",
    "FOO ",
    "Foo",
    "KÉRNEL_X",
    "\u{1F600}",
];

const KERNELSPECS: &[&str] = &["python3", "Python3", "PYTHON3", "r", "spark_python", ""];

/// Decorations around a marked value: what the value rules refuse, and what JSON escapes.
const PIECES: &[&str] = &[
    "",
    "",
    "",
    "$",
    "`",
    "\n",
    "\r",
    "\0",
    "{{",
    "{%",
    "$(id)",
    "${HOME}",
    "é",
    "\u{2028}",
    "\"",
    "\\",
    "/",
    "\u{1F600}",
    "{ {",
    "%",
    " ",
    "\t",
    "}}",
    "{",
    "0 ",
];

/// Values that pass the per-name patterns of some names.
const GOOD_VALUES: &[&str] = &[
    "1000",
    "65534",
    "0",
    "0 ",
    "alice",
    "bob.smith",
    "3336c9d8-2546-41c2-82ce-dc5ea9745e9c",
    "python",
    "elyra/kernel-py:3.3.0",
    "ns1",
    "40",
    "40.0",
    "",
];

const PATHS: &[&str] = &[
    "nb",
    "a/b",
    "work/nb.ipynb",
    "",
    "..",
    "../x",
    "a/../../b",
    "/tmp",
    "~root",
    "C:/x",
    "a\\b",
    "a\0b",
    "./x",
    "a..b",
    "..a",
    "dir/",
    "a/..",
    "a//..//b",
];

fn env_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => select(NAMES).prop_map(str::to_string),
        2 => "[A-Z_][A-Z0-9_]{0,6}",
        1 => "\\PC{0,5}",
        1 => ".{0,3}",
    ]
}

/// A value that carries a distinct marker, so that a refusal holding it can be seen.
fn marked() -> impl Strategy<Value = String> {
    let piece = || prop_oneof![2 => Just(""), 1 => select(PIECES)];
    (piece(), "[a-z]{4}", piece()).prop_map(|(a, id, b)| format!("{a}{}{id}{b}", oracle::MARKER))
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9 ._:/@+-]{0,12}",
        2 => select(GOOD_VALUES).prop_map(str::to_string),
        6 => marked(),
        1 => ("[a-z]{4}", 4080usize..4110).prop_map(|(id, n)| format!("{}{id}{}", oracle::MARKER, "x".repeat(n))),
        1 => ("[a-z]{4}", 2040usize..2060).prop_map(|(id, n)| format!("{}{id}{}", oracle::MARKER, "é".repeat(n))),
        1 => "\\PC{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = J> {
    prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        select(NUMBERS).prop_map(J::Num),
        env_value().prop_map(J::Str),
    ]
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = J> {
    leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
            prop::collection::vec(("[a-z]{0,3}", inner), 0..4).prop_map(J::Obj),
        ]
    })
}

fn env_member() -> impl Strategy<Value = J> {
    let entry_value = prop_oneof![
        60 => env_value().prop_map(J::Str),
        1 => select(NUMBERS).prop_map(J::Num),
        1 => Just(J::Null),
        1 => any::<bool>().prop_map(J::Bool),
        1 => marked().prop_map(|m| J::Arr(vec![J::Str(m)])),
        1 => marked().prop_map(|m| J::Obj(vec![("k".into(), J::Str(m))])),
    ];
    prop_oneof![
        40 => prop::collection::vec((env_name(), entry_value), 0..8).prop_map(J::Obj),
        1 => Just(J::Null),
        1 => marked().prop_map(|m| J::Arr(vec![J::Str(m)])),
        1 => marked().prop_map(J::Str),
        1 => select(NUMBERS).prop_map(J::Num),
    ]
}

fn name_member() -> impl Strategy<Value = J> {
    prop_oneof![
        30 => select(KERNELSPECS).prop_map(|s| J::Str(s.into())),
        2 => Just(J::Null),
        1 => marked().prop_map(|m| J::Arr(vec![J::Str(m)])),
        1 => Just(J::Num("3")),
    ]
}

fn path_member() -> impl Strategy<Value = J> {
    prop_oneof![
        6 => select(PATHS).prop_map(|s| J::Str(s.into())),
        2 => (select(&["../", "", "a/", "/"][..]), marked()).prop_map(|(a, m)| J::Str(format!("{a}{m}"))),
        1 => Just(J::Null),
        1 => Just(J::Num("1")),
        1 => marked().prop_map(|m| J::Obj(vec![("a".into(), J::Str(m))])),
    ]
}

/// A kernel-start body's members, in a random order, sometimes with a duplicate.
fn body_members() -> impl Strategy<Value = Vec<(String, J)>> {
    (
        prop::option::weighted(0.8, name_member()),
        prop::option::weighted(0.9, env_member()),
        prop::option::weighted(0.4, path_member()),
        prop::collection::vec((select(&["kernel_id", "other", "x", "\u{65}nv2", "Name", "ENV"][..]), any_json()), 0..3),
        prop::option::weighted(0.05, (any::<prop::sample::Index>(), any_json())),
    )
        .prop_flat_map(|(name, env, path, extras, dup)| {
            let mut m: Vec<(String, J)> = Vec::new();
            m.extend(name.map(|v| ("name".to_string(), v)));
            m.extend(env.map(|v| ("env".to_string(), v)));
            m.extend(path.map(|v| ("path".to_string(), v)));
            m.extend(extras.into_iter().map(|(k, v)| (k.to_string(), v)));
            if let (Some((i, v)), false) = (dup, m.is_empty()) {
                let k = m[i.index(m.len())].0.clone();
                m.push((k, v));
            }
            Just(m).prop_shuffle()
        })
}

fn render(members: &[(String, J)], seed: u64) -> Vec<u8> {
    let mut out = String::new();
    write(&mut out, &J::Obj(members.to_vec()), &mut Rng(seed | 1));
    out.into_bytes()
}

/// Tokens a mutation splices in.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "\"env\":",
    "\"env\":{}",
    "\"name\":",
    "\"path\":\"..\"",
    "\"PATH\":\"/x\"",
    "null",
    "1e999",
    "NaN",
    "\u{feff}",
    "\0",
    "\u{2028}",
    "\\u0046",
    "\"\\u0065nv\":{}",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, &'static str),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<prop::sample::Index>(), select(TOKENS)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let at = |i: &prop::sample::Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match m {
            Mutation::Flip(i, b) if !bytes.is_empty() => {
                let k = i.index(bytes.len());
                bytes[k] = *b;
            }
            Mutation::Flip(..) => {}
            Mutation::Delete(i, n) => {
                let k = at(i, bytes.len()).min(bytes.len());
                let end = (k + n).min(bytes.len());
                bytes.drain(k..end);
            }
            Mutation::Insert(i, t) => {
                let k = at(i, bytes.len());
                bytes.splice(k..k, t.bytes());
            }
            Mutation::Truncate(i) => {
                let k = at(i, bytes.len());
                bytes.truncate(k);
            }
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// Policies.

/// Names the policies' lists are drawn from: the body's names plus some impossible ones.
fn name_set() -> impl Strategy<Value = NameSet> {
    subsequence(NAMES, 0..6).prop_map(|v| v.into_iter().map(str::to_string).collect())
}

/// `Policy::default()`, built once: it compiles the value rules' patterns, slow in debug builds.
fn default_policy() -> Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(Policy::default).clone()
}

fn default_values() -> ValueRules {
    default_policy().values
}

fn value_rules() -> impl Strategy<Value = ValueRules> {
    prop_oneof![
        6 => Just(()).prop_map(|_| default_values()),
        1 => select(&[0usize, 8, 16][..]).prop_map(|n| ValueRules { max_length: n, ..default_values() }),
        1 => select(&["x", "é", ";", " "][..]).prop_map(|f| {
            let mut v = default_values();
            let mut texts = v.forbidden.texts().to_vec();
            texts.push(f.to_string());
            v.forbidden = Forbidden::new(texts);
            v
        }),
        1 => Just(()).prop_map(|_| {
            let mut v = default_values();
            v.patterns.remove("KERNEL_UID");
            v.patterns.insert("FOO".into(), Pattern::new("[a-z0-9]*").unwrap());
            v
        }),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    let deny = prop_oneof![
        3 => Just(DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect::<NameSet>()),
        1 => name_set().prop_map(|mut s| {
            s.extend(DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()));
            s
        }),
        1 => name_set(),
    ];
    const PREFIXES: &[&[&str]] =
        &[&[], &[KERNEL_PREFIX], &[KERNEL_PREFIX], &[KERNEL_PREFIX], &[KERNEL_PREFIX, "SPARK_"], &["SPARK_"], &[""]];
    let prefixes = select(PREFIXES).prop_map(|l| l.iter().map(|p| PrefixRule::new(p)).collect::<Vec<_>>());
    let kernelspecs = prop_oneof![
        Just(HashMap::new()),
        name_set().prop_map(|s| HashMap::from([("python3".to_string(), s)])),
        (name_set(), name_set()).prop_map(|(a, b)| HashMap::from([("python3".to_string(), a), ("r".to_string(), b)])),
    ];
    let eg = prop_oneof![
        3 => Just(None),
        1 => name_set().prop_map(|names| Some(EgEnvs { all: false, names })),
        1 => Just(Some(EgEnvs { all: true, names: NameSet::new() })),
    ];
    let mode = select(&[Mode::Drop, Mode::Reject, Mode::Report][..]);
    let path = select(&[PathRule::Keep, PathRule::RefuseEscape, PathRule::Strip][..]);
    ((mode, name_set(), deny, prefixes, kernelspecs), (any::<[bool; 3]>(), eg, value_rules(), path)).prop_map(
        |((mode, client_envs, deny_envs, prefixes, kernelspecs), ([meta, env, pp], eg_config, values, kernel_path))| {
            Policy {
                mode,
                prefixes,
                client_envs,
                deny_envs,
                kernelspecs,
                kernelspec_metadata: meta,
                kernelspec_env: env,
                process_proxy_envs: pp,
                eg_config,
                values,
                kernel_path,
                ..default_policy()
            }
        },
    )
}

fn facts() -> impl Strategy<Value = Option<SpecFacts>> {
    prop::option::of((name_set(), name_set(), name_set()).prop_map(|(m, e, p)| SpecFacts {
        metadata_client_envs: m,
        env_keys: e,
        process_proxy_envs: p,
    }))
}

fn run_start(p: &Policy, facts: &Option<SpecFacts>, default_spec: Option<&str>, input: &[u8]) {
    oracle::check_start_input(&[(p.clone(), facts.clone())], default_spec, input);
}

/// Cases per property: proptest's default of 256, or `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2 * cases(), ..ProptestConfig::default() })]

    /// Structured bodies: accepted exactly when they are unambiguous, and then every promise holds.
    #[test]
    fn kernel_start_structured(members in body_members(), seed in any::<u64>(), p in policy(), f in facts(),
                               default_spec in prop::option::of(select(KERNELSPECS))) {
        let input = render(&members, seed);
        let parsed = start::parse(&input);
        prop_assert_eq!(parsed.is_ok(), acceptable(&members), "{:?}: {:?}", String::from_utf8_lossy(&input), parsed.err());
        if let Err(e) = parsed {
            // Refusals of the body name keys, never values; no key here carries a marker.
            prop_assert!(oracle::markers_in(&e.to_string()).is_empty(), "{}", e);
        }
        run_start(&p, &f, default_spec, &input);
    }

    /// Mutated structured bodies: whatever the parse says, no panic and every promise holds.
    #[test]
    fn kernel_start_mutated(members in body_members(), seed in any::<u64>(),
                            muts in prop::collection::vec(mutation(), 1..5), p in policy(), f in facts()) {
        let input = mutate(render(&members, seed), &muts);
        run_start(&p, &f, Some("python3"), &input);
    }

    /// Random bytes.
    #[test]
    fn kernel_start_bytes(input in prop::collection::vec(any::<u8>(), 0..64), p in policy()) {
        run_start(&p, &None, None, &input);
    }

    /// Identity binding, with any header value: the body's own claim (as sent or padded with
    /// whitespace), or a generated one (blank, a marked value, any text).
    #[test]
    fn kernel_start_identity(members in body_members(), seed in any::<u64>(), p in policy(), f in facts(),
                             header in prop_oneof![2 => Just(None), 4 => header_value().prop_map(Some)],
                             claim in 0..3u8, overwrite in any::<bool>()) {
        let input = render(&members, seed);
        let Ok(body) = start::parse(&input) else { return Ok(()) };
        let claimed = body.env.iter().find(|(k, _)| k == "KERNEL_USERNAME").map(|(_, v)| v.to_string());
        let value = match (claim, claimed) {
            (0, Some(c)) => Some(c),
            (1, Some(c)) => Some(format!("\t{c} ")),
            _ => header,
        };
        let on_mismatch = if overwrite { Mismatch::Overwrite } else { Mismatch::Refuse };
        oracle::check_identity(&p, body.name.as_deref(), f.as_ref(), &input, value.as_deref(), on_mismatch);
    }
}

/// A trusted header's value: blank, padded, marked, or any text.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => "[ \t]{0,3}",
        2 => "[ \t]{0,2}[a-z0-9._@-]{1,8}[ \t]{0,2}",
        2 => marked(),
        1 => "\\PC{0,8}",
    ]
}

// ---------------------------------------------------------------------------------------------
// Kernelspec documents.

fn string_list() -> impl Strategy<Value = J> {
    prop::collection::vec(
        prop_oneof![4 => env_name().prop_map(J::Str), 1 => select(NUMBERS).prop_map(J::Num), 1 => Just(J::Null)],
        0..5,
    )
    .prop_map(J::Arr)
}

fn metadata() -> impl Strategy<Value = Option<J>> {
    let obj = (
        prop::option::of(prop_oneof![4 => string_list(), 1 => leaf()]),
        prop::option::of((string_list(), string_list())),
        prop::option::of(any::<bool>()),
        prop::collection::vec(("[a-z_]{1,6}", any_json()), 0..2),
    )
        .prop_map(|(client_envs, pp, debugger, extra)| {
            let mut m: Vec<(String, J)> = Vec::new();
            m.extend(debugger.map(|d| ("debugger".to_string(), J::Bool(d))));
            m.extend(client_envs.map(|c| ("client_envs".to_string(), c)));
            m.extend(pp.map(|(a, b)| {
                let config = J::Obj(vec![("forwarded_envs".into(), a), ("forward_env".into(), b)]);
                (
                    "process_proxy".to_string(),
                    J::Obj(vec![("class_name".into(), J::Str("x".into())), ("config".into(), config)]),
                )
            }));
            m.extend(extra);
            J::Obj(m)
        })
        .prop_shuffle_members();
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(J::Null)),
        6 => obj.prop_map(Some),
        1 => prop_oneof![Just(J::Arr(vec![])), Just(J::Num("1")), Just(J::Str("m".into()))].prop_map(Some),
    ]
}

/// Shuffles the members of a generated object (order must be preserved by the rewrite).
trait ShuffleMembers: Strategy<Value = J> + Sized {
    fn prop_shuffle_members(self) -> BoxedStrategy<J>
    where
        Self: 'static,
    {
        self.prop_flat_map(|j| match j {
            J::Obj(m) => Just(m).prop_shuffle().prop_map(J::Obj).boxed(),
            other => Just(other).boxed(),
        })
        .boxed()
    }
}

impl<S: Strategy<Value = J> + Sized> ShuffleMembers for S {}

fn spec() -> impl Strategy<Value = Option<J>> {
    let obj = (
        metadata(),
        prop::option::of(prop::collection::vec((env_name(), env_value().prop_map(J::Str)), 0..4).prop_map(J::Obj)),
        select(&["python", "r", "scala"][..]),
    )
        .prop_map(|(metadata, env, language)| {
            let mut m: Vec<(String, J)> = vec![
                ("argv".into(), J::Arr(vec![J::Str("python".into()), J::Str("{connection_file}".into())])),
                ("display_name".into(), J::Str("Python 3".into())),
                ("language".into(), J::Str(language.into())),
            ];
            m.extend(env.map(|e| ("env".to_string(), e)));
            m.extend(metadata.map(|md| ("metadata".to_string(), md)));
            J::Obj(m)
        })
        .prop_shuffle_members();
    prop_oneof![12 => obj.prop_map(Some), 1 => Just(None), 1 => Just(Some(J::Num("1"))), 1 => Just(Some(J::Null))]
}

fn entry(name: String) -> impl Strategy<Value = J> {
    (spec(), any::<bool>()).prop_map(move |(spec, resources)| {
        let mut m: Vec<(String, J)> = vec![("name".into(), J::Str(name.clone()))];
        m.extend(spec.map(|s| ("spec".to_string(), s)));
        if resources {
            m.push(("resources".into(), J::Obj(vec![("logo-64x64".into(), J::Str("/kernelspecs/x/logo.png".into()))])));
        }
        J::Obj(m)
    })
}

fn spec_names() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(KERNELSPECS).prop_map(str::to_string), 1 => "\\PC{0,6}"]
}

fn kernelspec_list() -> impl Strategy<Value = J> {
    let specs = prop::collection::vec(spec_names().prop_flat_map(|n| (Just(n.clone()), entry(n))), 0..4);
    (prop::option::of(select(KERNELSPECS)), specs, prop::bool::weighted(0.1)).prop_map(|(default, specs, as_array)| {
        let mut m: Vec<(String, J)> = Vec::new();
        m.extend(default.map(|d| ("default".to_string(), J::Str(d.into()))));
        let specs = if as_array { J::Arr(specs.iter().map(|(_, e)| e.clone()).collect()) } else { J::Obj(specs) };
        m.push(("kernelspecs".into(), specs));
        J::Obj(m)
    })
}

fn sample(path: &str) -> Vec<u8> {
    let shared = format!("{}/../shared/samples/{path}", env!("CARGO_MANIFEST_DIR"));
    let fixture = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&shared).or_else(|_| std::fs::read(&fixture)).expect("a kernelspec sample")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn kernelspecs_generated(list in kernelspec_list(), one in spec_names().prop_flat_map(entry),
                             seed in any::<u64>(), p in policy()) {
        let mut out = String::new();
        write(&mut out, &list, &mut Rng(seed | 1));
        oracle::check_kernelspec_list(&p, out.as_bytes());
        oracle::check_kernelspec_one(&p, out.as_bytes());
        let mut out = String::new();
        write(&mut out, &one, &mut Rng(seed | 1));
        oracle::check_kernelspec_one(&p, out.as_bytes());
        oracle::check_kernelspec_list(&p, out.as_bytes());
    }

    #[test]
    fn kernelspecs_mutated(which in any::<bool>(), muts in prop::collection::vec(mutation(), 1..4), p in policy()) {
        let input = mutate(sample(if which { "kernelspecs.json" } else { "kernelspec_python3.json" }), &muts);
        oracle::check_kernelspec_list(&p, &input);
        oracle::check_kernelspec_one(&p, &input);
    }
}

// ---------------------------------------------------------------------------------------------
// Routes.

/// One character of a path as the route sees it (`c`), and how it is written (`rep`).
#[derive(Debug, Clone)]
struct PathChar {
    c: char,
    rep: String,
}

/// A step that some normalization undoes.
#[derive(Debug, Clone)]
enum Step {
    /// Percent-encode some characters of one character's writing (undone by decoding). Encoding
    /// the `%` of an escape nests it one level deeper.
    Encode(prop::sample::Index, u8),
    /// Percent-encode one character `n` times over, nesting: `k`, `%6B`, `%256B`, `%25256B`...
    Nest(prop::sample::Index, usize),
    /// Upper-case one character's writing (undone by case folding).
    Upper(prop::sample::Index),
    /// After a slash: `./` (undone by removing dot segments).
    Dot(prop::sample::Index),
    /// After a slash: `SEG/../` (undone by removing dot segments).
    Up(prop::sample::Index, String),
    /// After a slash: another slash (undone by collapsing slashes).
    Slash(prop::sample::Index),
    /// At the end: `/`, `/.` or `/x/..`.
    Trailing(&'static str),
    /// Before a slash or at the end: `;TEXT` (undone by dropping parameters).
    Param(prop::sample::Index, String),
}

fn encode_step() -> impl Strategy<Value = Step> {
    (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, m)| Step::Encode(i, m))
}

/// Steps undone by percent-decoding and then the other normalizations: the world in which every
/// `%` is one envgate or the generator wrote.
fn decoded_steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        4 => encode_step(),
        1 => (any::<prop::sample::Index>(), 1usize..6).prop_map(|(i, n)| Step::Nest(i, n)),
        2 => any::<prop::sample::Index>().prop_map(Step::Upper),
        1 => any::<prop::sample::Index>().prop_map(Step::Dot),
        1 => (any::<prop::sample::Index>(), "[a-z0-9_-]{1,4}").prop_map(|(i, s)| Step::Up(i, s)),
        1 => any::<prop::sample::Index>().prop_map(Step::Slash),
        1 => select(&["/", "/.", "/x/.."][..]).prop_map(Step::Trailing),
        1 => (any::<prop::sample::Index>(), "[a-z0-9=,]{0,4}").prop_map(|(i, s)| Step::Param(i, s)),
    ];
    prop::collection::vec(step, 0..10)
}

/// Steps undone by the normalizations without any decoding (a proxy that removes dot segments
/// or parameters from the raw path): segments and parameters whose text holds escapes.
fn raw_steps() -> impl Strategy<Value = Vec<Step>> {
    let seg = prop_oneof![
        "[a-z0-9_-]{1,4}",
        select(&["%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "..%2f", "%2f"][..]).prop_map(str::to_string)
    ];
    let param = prop_oneof![
        "[a-z0-9=,]{0,4}",
        select(&["%2f..", "%2F%2e%2e", "x%2f%2e%2e%2f%2e%2e", "%2f", "%00", "%3b"][..]).prop_map(str::to_string)
    ];
    let step = prop_oneof![
        1 => any::<prop::sample::Index>().prop_map(Step::Upper),
        1 => any::<prop::sample::Index>().prop_map(Step::Dot),
        2 => (any::<prop::sample::Index>(), seg).prop_map(|(i, s)| Step::Up(i, s)),
        1 => any::<prop::sample::Index>().prop_map(Step::Slash),
        1 => select(&["/", "/.", "/x/.."][..]).prop_map(Step::Trailing),
        2 => (any::<prop::sample::Index>(), param).prop_map(|(i, s)| Step::Param(i, s)),
    ];
    prop::collection::vec(step, 1..6)
}

fn chars(s: &str) -> Vec<PathChar> {
    s.chars().map(|c| PathChar { c, rep: c.to_string() }).collect()
}

/// One more layer of percent-encoding over a whole path as written: every `%` becomes `%25` (so
/// that one round of decoding gives `path` back exactly) and the characters `mask` picks (never
/// the leading slash) are encoded too.
fn encode_layer(path: &str, mask: u64) -> String {
    path.chars()
        .enumerate()
        .map(|(j, c)| {
            if c == '%' || (j > 0 && c.is_ascii() && mask.rotate_left(j as u32) & 1 != 0) {
                format!("%{:02X}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Applies `steps` to `path`; returns the path as written.
fn apply(path: &str, steps: &[Step]) -> String {
    let mut p = chars(path);
    let slashes = |p: &[PathChar]| -> Vec<usize> { (0..p.len()).filter(|&i| p[i].c == '/').collect() };
    for s in steps {
        match s {
            Step::Encode(i, mask) => {
                let k = 1 + i.index(p.len() - 1);
                let pc = &mut p[k];
                let rep: Vec<char> = pc.rep.chars().collect();
                let any = (0..rep.len()).any(|j| mask & (1 << (j % 8)) != 0);
                pc.rep = rep
                    .iter()
                    .enumerate()
                    .map(|(j, ch)| {
                        if mask & (1 << (j % 8)) != 0 || (!any && j == 0) {
                            if mask & 0x80 != 0 {
                                format!("%{:02x}", *ch as u32)
                            } else {
                                format!("%{:02X}", *ch as u32)
                            }
                        } else {
                            ch.to_string()
                        }
                    })
                    .collect();
            }
            Step::Nest(i, n) => {
                let k = 1 + i.index(p.len() - 1);
                for _ in 0..*n {
                    let rep = &p[k].rep;
                    let first = rep.chars().next().unwrap();
                    p[k].rep = format!("%{:02X}{}", first as u32, &rep[first.len_utf8()..]);
                }
            }
            Step::Upper(i) => {
                let k = i.index(p.len());
                p[k].rep = p[k].rep.to_ascii_uppercase();
            }
            Step::Dot(i) | Step::Slash(i) | Step::Up(i, _) => {
                let at = slashes(&p);
                let k = at[i.index(at.len())] + 1;
                let text = match s {
                    Step::Dot(_) => "./".to_string(),
                    Step::Slash(_) => "/".to_string(),
                    Step::Up(_, seg) => format!("{seg}/../"),
                    _ => unreachable!(),
                };
                p.splice(k..k, chars(&text));
            }
            Step::Trailing(t) => p.extend(chars(t)),
            Step::Param(i, text) => {
                // Before a slash other than the first, or at the end.
                let mut at: Vec<usize> = slashes(&p).into_iter().filter(|&k| k > 0).collect();
                at.push(p.len());
                let k = at[i.index(at.len())];
                p.splice(k..k, chars(&format!(";{text}")));
            }
        }
    }
    p.iter().map(|c| c.rep.as_str()).collect()
}

fn method() -> impl Strategy<Value = Method> {
    select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::HEAD, Method::OPTIONS])
}

const BASES: &[&str] = &["/", "/gw/", "/gw", "", "//gw//", "/a/b/"];

/// How many rounds of percent-decoding the classifier undoes (`normalized_tail` in
/// `src/routes.rs`): a path nested deeper (`/api/%252525256Bernels`) is `Other`.
const ROUNDS: usize = 3;

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Variants of an exact kernel-starting route that decode and normalize back to it.
    #[test]
    fn routes_decoded_variants(base in select(BASES), tail in select(&["kernels", "sessions"][..]),
                               steps in decoded_steps(), query in prop::option::of("[a-z=&/]{0,6}")) {
        let routes = Routes::new(base);
        let exact = format!("{}api/{tail}", routes.base());
        let mut path = apply(&exact, &steps);
        // the generator's own promise: full decoding and normalizing gives the route back
        prop_assert!(oracle::model_segments(&path, Some(usize::MAX)).ends_with(&["api".to_string(), tail.to_string()]), "{}", path);
        // The classifier undoes at most ROUNDS rounds of decoding: deeper nesting is not promised.
        prop_assume!(oracle::decode_depth(&path) <= ROUNDS);
        if let Some(q) = query {
            path = format!("{path}?{q}");
        }
        let route = oracle::check_route(base, &Method::POST, &path, ROUNDS);
        prop_assert!(route.starts_kernel(), "{} {:?}", path, route);
    }

    /// Variants that a hop which drops parameters and dot segments from the raw path maps back
    /// (`/api/%2e%2e/../kernels`, `/api/kernels;x%2f..`), then encoded once, twice or three
    /// times more, which a hop that decodes that many times before normalizing maps back.
    #[test]
    fn routes_raw_variants(base in select(BASES), tail in select(&["kernels", "sessions"][..]), steps in raw_steps(),
                           layers in prop::collection::vec(any::<u64>(), 0..=ROUNDS)) {
        let routes = Routes::new(base);
        let exact = format!("{}api/{tail}", routes.base());
        let mut path = apply(&exact, &steps);
        prop_assert!(oracle::model_segments(&path, None).ends_with(&["api".to_string(), tail.to_string()]), "{}", path);
        for mask in &layers {
            path = encode_layer(&path, *mask);
        }
        let route = oracle::check_route(base, &Method::POST, &path, ROUNDS);
        prop_assert!(route.starts_kernel(), "{} {:?}", path, route);
    }

    /// Any method, any path: no panic, and the route agrees with the model.
    #[test]
    fn routes_any(base in select(BASES), m in method(),
                  path in prop_oneof!["[/a-zA-Z%0-9.;?\\\\]{0,30}", "\\PC{0,30}", ".{0,20}"]) {
        oracle::check_route(base, &m, &path, ROUNDS);
    }

    /// Near misses of the exact routes, any method.
    #[test]
    fn routes_near(base in select(BASES), m in method(), tail in select(&["kernels", "sessions", "kernelspecs", "kernelspecs/python3"][..]),
                   steps in prop_oneof![decoded_steps(), raw_steps()]) {
        let routes = Routes::new(base);
        let path = apply(&format!("{}api/{tail}", routes.base()), &steps);
        oracle::check_route(base, &m, &path, ROUNDS);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed cases: what these properties found, and the samples the fuzz seeds start from.

/// Found by `routes_raw_variants`: the other normalizations were tried only on the fully decoded
/// path, so a hop that drops dot segments or parameters before decoding, or decodes once, could
/// turn these into kernel starts that envgate passed through as `Other`.
#[test]
fn normalizing_before_decoding_is_ambiguous() {
    for (base, path, want) in [
        ("/", "/api/%2e%2e/../kernels", Route::AmbiguousKernelStart),
        ("/", "/api/kernels;x%2f..", Route::AmbiguousKernelStart),
        ("/", "/api/kernels/%252e%252e/%2e%2e", Route::AmbiguousKernelStart),
        ("/", "/api/kernels/%2e%2e/..", Route::AmbiguousKernelStart),
        ("/gw/", "/gw/api/sessions;a%2F%2e%2e", Route::AmbiguousSessionStart),
    ] {
        assert_eq!(Routes::new(base).classify(&Method::POST, path), want, "{path}");
    }
}

/// Found by `kernelspecs_mutated`: with EG's `*` inherited and a list source naming `*` too,
/// `client_envs` held `*` twice.
#[test]
fn star_is_listed_once() {
    let p = Policy {
        client_envs: ["*".to_string(), "FOO".to_string()].into(),
        eg_config: Some(EgEnvs { all: true, names: ["*".to_string()].into() }),
        ..default_policy()
    };
    assert_eq!(p.allowed_names(None, None), ["*", "FOO"]);
}

#[test]
fn samples_pass_the_checks() {
    let p = Policy { client_envs: ["FOO".to_string()].into(), ..default_policy() };
    oracle::check_kernelspec_list(&p, &sample("kernelspecs.json"));
    oracle::check_kernelspec_one(&p, &sample("kernelspec_python3.json"));
    let out: Value =
        serde_json::from_slice(&envgate::rewrite::kernelspecs::rewrite_list(&p, &sample("kernelspecs.json")).unwrap())
            .unwrap();
    assert_eq!(out["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["FOO"]));
    let body =
        br#"{"name":"python3","env":{"FOO":"1","KERNEL_UID":"0 s3cr3tabcd","PATH":"/x"},"path":"../s3cr3tpath"}"#;
    for mode in [Mode::Drop, Mode::Reject, Mode::Report] {
        for kernel_path in [PathRule::Keep, PathRule::RefuseEscape, PathRule::Strip] {
            run_start(&Policy { mode, kernel_path, ..p.clone() }, &None, None, body);
        }
    }
    assert_eq!(Routes::new("/").classify(&Method::POST, "/api/kernels"), Route::KernelStart);
}

// ---------------------------------------------------------------------------------------------
// Per-identity policy: the view of a random policy for a random identity, held to a model of the
// documented precedence written here from the README's rules, not from the code.

mod per_identity {
    use super::*;
    use envgate::identity::{SetEnv, Template};
    use envgate::policy::{Block, Source, Verdict};

    const NAMES: &[&str] = &["A", "B", "BX", "C", "SPARK_X", "KERNEL_Y", "LD_PRELOAD", "X=Y", ""];
    const PREFIXES: &[&str] = &["SPARK_", "KERNEL_", "B"];
    const GROUPS: &[&str] = &["eng", "gpu", "ana", "ops"];
    const SPECS: &[&str] = &["python3", "spark", "r"];
    const SET: &[&str] = &["KERNEL_NAMESPACE", "KERNEL_IMAGE", "A"];

    #[derive(Debug, Clone)]
    struct Given {
        client_envs: Vec<&'static str>,
        prefixes: Vec<&'static str>,
        deny: Vec<&'static str>,
        kernelspecs: Option<Vec<&'static str>>,
        set: Vec<&'static str>,
        priority: i64,
    }

    fn given() -> impl Strategy<Value = Given> {
        (
            subsequence(NAMES, 0..3),
            subsequence(PREFIXES, 0..2),
            subsequence(NAMES, 0..2),
            prop::option::of(subsequence(SPECS, 0..3)),
            subsequence(SET, 0..3),
            -2i64..3,
        )
            .prop_map(|(client_envs, prefixes, deny, kernelspecs, set, priority)| Given {
                client_envs,
                prefixes,
                deny,
                kernelspecs,
                set,
                priority,
            })
    }

    fn block(label: &str, g: &Given) -> Block {
        let mut b = Block::new(label);
        b.client_envs = g.client_envs.iter().copied().collect();
        b.prefixes = g.prefixes.iter().map(|p| PrefixRule::of_block(p, &b.label)).collect();
        b.deny_envs = g.deny.iter().copied().collect();
        b.kernelspecs = g.kernelspecs.as_ref().map(|k| k.iter().copied().collect());
        b.set_envs = g.set.iter().map(|n| set_env(n, label)).collect();
        b.priority = g.priority;
        b
    }

    fn set_env(name: &str, scope: &str) -> SetEnv {
        SetEnv { name: name.into(), template: Template::parse(scope).unwrap(), scope: scope.into() }
    }

    #[derive(Debug, Clone)]
    struct Case {
        global: Given,
        user: Option<Given>,
        groups: Vec<(&'static str, Given)>,
        /// The identity's groups, in the order sent (repeats and groups without a block too).
        asking: Vec<&'static str>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            given(),
            prop::option::of(given()),
            prop::collection::vec((select(GROUPS), given()), 0..4),
            prop::collection::vec(select(GROUPS), 0..5),
        )
            .prop_map(|(global, user, groups, asking)| Case { global, user, groups, asking })
    }

    fn policy_of(c: &Case) -> Policy {
        let mut p = Policy {
            client_envs: c.global.client_envs.iter().copied().collect(),
            deny_envs: c.global.deny.iter().copied().collect(),
            prefixes: c.global.prefixes.iter().map(|p| PrefixRule::new(p)).collect(),
            set_envs: c.global.set.iter().map(|n| set_env(n, "global")).collect(),
            ..Policy::default()
        };
        if let Some(u) = &c.user {
            p.users.insert("alice".into(), block("user:alice", u));
        }
        for (name, g) in &c.groups {
            // A repeated group name: the last block given is the group's (as a map keeps it).
            p.groups.insert(name.to_string(), block(&format!("group:{name}"), g));
        }
        p
    }

    /// The blocks that apply, in the documented order: the user's, then the groups' by priority
    /// (higher first), then by name.
    fn model_blocks(c: &Case) -> Vec<(String, &Given)> {
        let last = |name: &str| c.groups.iter().rev().find(|(n, _)| *n == name).map(|(_, g)| g);
        let mut groups: Vec<&str> = c.asking.clone();
        groups.sort();
        groups.dedup();
        let mut gs: Vec<(String, &Given)> =
            groups.into_iter().filter_map(|n| last(n).map(|g| (format!("group:{n}"), g))).collect();
        gs.sort_by(|a, b| b.1.priority.cmp(&a.1.priority).then_with(|| a.0.cmp(&b.0)));
        c.user.iter().map(|u| ("user:alice".to_string(), u)).chain(gs).collect()
    }

    fn model_keeps(c: &Case, name: &str) -> bool {
        let blocks = model_blocks(c);
        let valid = !name.is_empty() && !name.contains('=');
        let denied = c.global.deny.contains(&name) || blocks.iter().any(|(_, b)| b.deny.contains(&name));
        let listed = c.global.client_envs.contains(&name) || blocks.iter().any(|(_, b)| b.client_envs.contains(&name));
        let prefixed =
            c.global.prefixes.iter().chain(blocks.iter().flat_map(|(_, b)| &b.prefixes)).any(|p| name.starts_with(p));
        valid && !denied && (listed || prefixed)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn the_view_keeps_exactly_what_the_documented_precedence_keeps(c in case(), k in select(SPECS)) {
            let p = policy_of(&c);
            let asking: Vec<String> = c.asking.iter().map(|g| g.to_string()).collect();
            let view = p.view(Some("alice"), &asking);
            let blocks = model_blocks(&c);
            let labels: Vec<String> = view.blocks.iter().map(|b| b.label.to_string()).collect();
            prop_assert_eq!(&labels, &blocks.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>());
            for name in NAMES {
                let keeps = model_keeps(&c, name);
                match view.verdict(Some(k), None, name) {
                    Verdict::Keep(source) => {
                        prop_assert!(keeps, "{name:?} kept by {source:?}, the model rejects it");
                        if let Source::Block(label) = source {
                            let (_, b) = blocks.iter().find(|(l, _)| **l == *label).expect("an applying block");
                            prop_assert!(b.client_envs.contains(name) || b.prefixes.iter().any(|p| name.starts_with(p)));
                        }
                    }
                    Verdict::Reject(_) => prop_assert!(!keeps, "{name:?} rejected, the model keeps it"),
                }
            }
            // A kernelspec list narrows and never widens.
            let may = blocks.iter().all(|(_, b)| b.kernelspecs.as_ref().map_or(true, |l| l.contains(&k)));
            prop_assert_eq!(view.may_start(Some(k)).is_ok(), may);
            // set_envs: the first scope in precedence order for each name, then the global one.
            let mut want: Vec<(String, String)> = Vec::new();
            let scopes = blocks.iter().map(|(l, b)| (l.clone(), &b.set)).chain([("global".to_string(), &c.global.set)]);
            for (scope, names) in scopes {
                for n in names {
                    if !want.iter().any(|(have, _)| have == n) {
                        want.push((n.to_string(), scope.clone()));
                    }
                }
            }
            let got: Vec<(String, String)> =
                view.set_envs(Some(k)).iter().map(|s| (s.name.clone(), s.scope.to_string())).collect();
            prop_assert_eq!(&got, &want);
            // What the identity is shown: listed names it may send, minus what is denied or set.
            let shown = view.allowed_names(Some(k), None);
            for name in NAMES {
                let listed = c.global.client_envs.contains(name) || blocks.iter().any(|(_, b)| b.client_envs.contains(name));
                let expect = listed && model_keeps(&c, name) && !want.iter().any(|(n, _)| n == name);
                prop_assert_eq!(shown.iter().any(|s| s == name), expect, "{:?} in client_envs", name);
            }
        }
    }
}
