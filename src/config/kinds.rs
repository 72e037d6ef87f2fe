//! The types a setting can have. Each says, once, how its value is read from a config file and
//! from a flag or `ENVGATE_*` variable (through clap), what the value must hold, and how it is
//! written back as TOML for `envgate check`.

use std::ffi::OsStr;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, EnumValueParser, PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, ValueEnum};

use super::{parse_upstream, AuditTarget, ConfigError, LogFormat, Mismatch, Secret, UpstreamUrl};
use crate::identity::Template;
use crate::policy::{self, Mode, Sessions};
use crate::values::{PathRule, Pattern};

/// The setting being read and where its value came from, so that every error names both.
pub struct At<'a> {
    pub key: &'a str,
    pub origin: &'a str,
}

impl At<'_> {
    pub fn err(&self, msg: impl fmt::Display) -> ConfigError {
        ConfigError(format!("invalid `{}` ({}): {msg}", self.key, self.origin))
    }

    /// An error about `key.sub`, a key inside this setting's table.
    fn err_in(&self, sub: &str, msg: impl fmt::Display) -> ConfigError {
        At { key: &format!("{}.{sub}", self.key), origin: self.origin }.err(msg)
    }
}

/// A setting's type.
pub trait Kind {
    /// What clap makes of the flag or its `ENVGATE_*` variable.
    type Flag: Clone + fmt::Debug + Send + Sync + 'static;
    /// The value, checked.
    type Value: Clone + fmt::Debug + PartialEq + Eq;
    /// How clap reads the flag: its value parser, and how many values it takes.
    fn arg(a: Arg) -> Arg;
    fn flag(m: &ArgMatches, id: &str) -> Option<Self::Flag> {
        m.try_get_one::<Self::Flag>(id).ok().flatten().cloned()
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<Self::Value, ConfigError>;
    fn from_flag(f: Self::Flag, at: &At) -> Result<Self::Value, ConfigError>;
}

/// How `envgate check` writes a value back as TOML (the policy's settings `Policy` prints itself,
/// with the built-in values it merges in).
pub trait Render: Kind {
    fn render(v: &Self::Value) -> String;
    fn line(key: &str, v: &Self::Value) -> String {
        format!("{key} = {}", Self::render(v))
    }
}

fn quoted(v: impl fmt::Display) -> String {
    format!("{:?}", v.to_string())
}

/// Kinds written as one string, in a file as on the command line; `parse` gets it trimmed.
macro_rules! text_kinds {
    ($($(#[doc = $doc:literal])+ $t:ident: $v:ty, $expected:literal, |$s:ident| $parse:expr, |$r:ident| $render:expr;)*) => {$(
        $(#[doc = $doc])+
        pub struct $t;

        impl Kind for $t {
            type Flag = String;
            type Value = $v;
            fn arg(a: Arg) -> Arg {
                a.value_parser(clap::value_parser!(String))
            }
            fn from_toml(v: toml::Value, at: &At) -> Result<$v, ConfigError> {
                match v {
                    toml::Value::String(s) => Self::from_flag(s, at),
                    _ => Err(at.err(concat!("expected ", $expected))),
                }
            }
            fn from_flag(s: String, at: &At) -> Result<$v, ConfigError> {
                let $s = s.trim();
                let parsed: Result<$v, String> = $parse;
                parsed.map_err(|m| at.err(m))
            }
        }

        impl Render for $t {
            fn render($r: &$v) -> String {
                $render
            }
        }
    )*};
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration like \"10s\", got {s:?} ({e})"))
}

/// A socket address; `example` is the one the error shows.
fn addr(s: &str, example: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("expected an address like {example}, got {s:?}"))
}

text_kinds! {
    /// The proxy's socket address, `127.0.0.1:8889`.
    Addr: SocketAddr, "a string like \"127.0.0.1:8889\"", |s| addr(s, "127.0.0.1:8889"), |v| quoted(v);
    /// The admin listener's socket address, `127.0.0.1:9464`: its errors must not suggest the
    /// proxy's own port, which the admin listener cannot share.
    AdminAddr: SocketAddr, "a string like \"127.0.0.1:9464\"", |s| addr(s, "127.0.0.1:9464"), |v| quoted(v);
    /// The upstream's URL, see [`parse_upstream`].
    Url: UpstreamUrl, "a URL string", |s| parse_upstream(s), |v| quoted(v);
    /// A duration, `10s` or `1m 30s`.
    Span: Duration, "a duration string like \"10s\"", |s| duration(s), |v| quoted(humantime::format_duration(*v));
    /// A duration greater than zero: a timeout of zero would fail every request.
    Timeout: Duration, "a duration string like \"10s\"",
        |s| duration(s).and_then(|d| if d.is_zero() { Err("must be greater than zero".to_string()) } else { Ok(d) }),
        |v| quoted(humantime::format_duration(*v));
    /// A file's path.
    FilePath: PathBuf, "a file path",
        |s| if s.is_empty() { Err("expected a file path".to_string()) } else { Ok(PathBuf::from(s)) },
        |v| quoted(v.display());
    /// `-` for standard output, or a file.
    AuditLog: AuditTarget, "\"-\" or a file path",
        |s| match s {
            "-" => Ok(AuditTarget::Stdout),
            "" => Err("expected \"-\" or a file path".to_string()),
            f => Ok(AuditTarget::File(PathBuf::from(f))),
        },
        |v| match v {
            AuditTarget::Stdout => quoted("-"),
            AuditTarget::File(f) => quoted(f.display()),
        };
    /// An HTTP header name.
    Header: http::HeaderName, "a header name",
        |s| http::HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("{s:?} is not a header name")),
        |v| quoted(v);
    /// A non-empty string (a token's issuer, audience, claim name).
    Text: String, "a string",
        |s| if s.is_empty() { Err("expected a non-empty string".to_string()) } else { Ok(s.to_string()) },
        |v| quoted(v);
}

/// A secret: its variable's value is not shown in `--help`, nor the value by `envgate check`.
pub struct Token;

impl Kind for Token {
    type Flag = String;
    type Value = Secret;
    fn arg(a: Arg) -> Arg {
        a.value_parser(clap::value_parser!(String)).hide_env_values(true)
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<Secret, ConfigError> {
        Ok(Secret(v.as_str().ok_or_else(|| at.err("expected a string"))?.trim().to_string()))
    }
    fn from_flag(s: String, _: &At) -> Result<Secret, ConfigError> {
        Ok(Secret(s.trim().to_string()))
    }
}

impl Render for Token {
    fn render(_: &Secret) -> String {
        String::new()
    }
    /// A comment: what `envgate check` prints is a config file, and must not set a wrong token.
    fn line(key: &str, _: &Secret) -> String {
        format!("# {key}: set (not shown)")
    }
}

/// An integer from `MIN` to `MAX`.
pub struct Int<const MIN: u64, const MAX: u64>;

impl<const MIN: u64, const MAX: u64> Int<MIN, MAX> {
    fn check(v: Option<u64>, at: &At) -> Result<u64, ConfigError> {
        v.filter(|v| (MIN..=MAX).contains(v))
            .ok_or_else(|| at.err(format!("expected an integer between {MIN} and {MAX}")))
    }
}

impl<const MIN: u64, const MAX: u64> Kind for Int<MIN, MAX> {
    type Flag = String;
    type Value = u64;
    fn arg(a: Arg) -> Arg {
        a.value_parser(clap::value_parser!(String))
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<u64, ConfigError> {
        Self::check(v.as_integer().and_then(|i| u64::try_from(i).ok()), at)
    }
    fn from_flag(s: String, at: &At) -> Result<u64, ConfigError> {
        Self::check(s.trim().parse().ok(), at).map_err(|e| ConfigError(format!("{e}, got {s:?}")))
    }
}

impl<const MIN: u64, const MAX: u64> Render for Int<MIN, MAX> {
    fn render(v: &u64) -> String {
        v.to_string()
    }
}

/// true or false; the flag takes what clap's [`BoolishValueParser`] does (true/false, yes/no,
/// on/off, 1/0, ...). `BARE`: the flag alone means true (`--upstream-insecure`).
pub struct Bool<const BARE: bool = false>;

/// A [`Bool`] whose flag alone means true.
pub type Switch = Bool<true>;

impl<const BARE: bool> Kind for Bool<BARE> {
    type Flag = bool;
    type Value = bool;
    fn arg(a: Arg) -> Arg {
        let a = a.value_parser(Tip(BoolishValueParser::new()));
        if BARE {
            a.num_args(0..=1).default_missing_value("true")
        } else {
            a
        }
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<bool, ConfigError> {
        v.as_bool().ok_or_else(|| at.err("expected true or false"))
    }
    fn from_flag(f: bool, _: &At) -> Result<bool, ConfigError> {
        Ok(f)
    }
}

impl<const BARE: bool> Render for Bool<BARE> {
    fn render(v: &bool) -> String {
        v.to_string()
    }
}

/// One of an enum's values, by name; clap lists them in `--help` and its errors.
pub struct Choice<T>(PhantomData<T>);

impl<T: ValueEnum + fmt::Debug + Eq + Send + Sync + 'static> Kind for Choice<T> {
    type Flag = T;
    type Value = T;
    fn arg(a: Arg) -> Arg {
        a.value_parser(Tip(EnumValueParser::<T>::new()))
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<T, ConfigError> {
        let names: Vec<String> =
            T::value_variants().iter().filter_map(|v| Some(v.to_possible_value()?.get_name().to_string())).collect();
        let expected = || format!("expected {}", one_of(&names));
        let s = v.as_str().ok_or_else(|| at.err(expected()))?;
        T::from_str(s.trim(), false).map_err(|_| at.err(format!("{}, got {s:?}", expected())))
    }
    fn from_flag(f: T, _: &At) -> Result<T, ConfigError> {
        Ok(f)
    }
}

impl<T: ValueEnum + fmt::Debug + Eq + Send + Sync + 'static> Render for Choice<T> {
    fn render(v: &T) -> String {
        v.to_possible_value().map_or_else(String::new, |p| format!("{:?}", p.get_name()))
    }
}

/// `a`, `a or b`, `a, b or c`: the values a setting may take, as a sentence says them.
fn one_of(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The names of [`Choice`] settings, as `as_str` spells them in the core.
macro_rules! choices {
    ($($t:ty: $($v:expr),+;)*) => {$(
        impl ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($v),+]
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(PossibleValue::new(self.as_str()))
            }
        }
    )*};
}

choices! {
    Mode: Mode::Drop, Mode::Reject, Mode::Report;
    Sessions: Sessions::Deny, Sessions::Allow;
    PathRule: PathRule::RefuseEscape, PathRule::Strip, PathRule::Keep;
    LogFormat: LogFormat::Text, LogFormat::Json;
    Mismatch: Mismatch::Refuse, Mismatch::Overwrite;
}

/// A list of strings: a TOML array, or the flag repeated or its values separated by commas.
pub trait List {
    /// Whether the flag's items are trimmed and empty ones dropped.
    const TRIM: bool = true;
    fn check(items: &[String]) -> Result<(), String>;
}

/// Named entries: a TOML table `NAME = ...` in a file, `NAME=...` items on the command line
/// (the flag repeated, or items separated by a character); in the order given.
pub trait Entries {
    type Entry: Clone + fmt::Debug + PartialEq + Eq;
    fn entry(name: &str, given: Given, at: &At) -> Result<Self::Entry, ConfigError>;
}

/// An entry's value: the file's TOML, or the text after a flag item's `=`.
pub enum Given<'a> {
    File(&'a toml::Value),
    Flag(&'a str),
}

macro_rules! many_kinds {
    ($($t:ty: $value:ty, $sep:expr, |$v:ident, $at:ident| $from_toml:expr, |$f:ident, $at2:ident| $from_flag:expr;)*) => {$(
        impl Kind for $t {
            type Flag = Vec<String>;
            type Value = $value;
            fn arg(a: Arg) -> Arg {
                a.value_parser(clap::value_parser!(String)).action(ArgAction::Append).value_delimiter($sep)
            }
            fn flag(m: &ArgMatches, id: &str) -> Option<Vec<String>> {
                Some(m.try_get_many::<String>(id).ok()??.cloned().collect())
            }
            fn from_toml($v: toml::Value, $at: &At) -> Result<$value, ConfigError> {
                $from_toml
            }
            fn from_flag($f: Vec<String>, $at2: &At) -> Result<$value, ConfigError> {
                $from_flag
            }
        }
    )*};
}

many_kinds! {
    Names: Vec<String>, ',', |v, at| list::<Self>(v, at), |f, at| list_flag::<Self>(f, at);
    Prefixes: Vec<String>, ',', |v, at| list::<Self>(v, at), |f, at| list_flag::<Self>(f, at);
    Texts: Vec<String>, ',', |v, at| list::<Self>(v, at), |f, at| list_flag::<Self>(f, at);
    Kernelspecs: Vec<(String, KernelspecSpec)>, ';',
        |v, at| entries::<Self>(v, at, "a table of tables"), |f, at| entry_items::<Self>(f, at, "NAME=A,B");
    SetEnvs: Vec<(String, Template)>, '\n',
        |v, at| entries::<Self>(v, at, "a table of NAME = \"TEMPLATE\""),
        |f, at| entry_items::<Self>(f, at, "NAME=TEMPLATE");
    Users: Vec<(String, BlockSpec)>, '\n',
        |v, at| entries::<Self>(v, at, "a table of tables"), |f, at| entry_items::<Self>(f, at, "NAME={ ... }");
    Groups: Vec<(String, BlockSpec)>, '\n',
        |v, at| entries::<Self>(v, at, "a table of tables"), |f, at| entry_items::<Self>(f, at, "NAME={ ... }");
    Patterns: Vec<(String, Option<Pattern>)>, '\n',
        |v, at| entries::<Self>(v, at, Self::EXPECTED), |f, at| entry_items::<Self>(f, at, "NAME=REGEX");
}

fn list<L: List>(v: toml::Value, at: &At) -> Result<Vec<String>, ConfigError> {
    let items: Vec<String> = v.try_into().map_err(|_| at.err("expected an array of strings"))?;
    L::check(&items).map_err(|m| at.err(m))?;
    Ok(items)
}

fn list_flag<L: List>(items: Vec<String>, at: &At) -> Result<Vec<String>, ConfigError> {
    let items: Vec<String> =
        if L::TRIM { items.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect() } else { items };
    L::check(&items).map_err(|m| at.err(m))?;
    Ok(items)
}

fn entries<E: Entries>(v: toml::Value, at: &At, expected: &str) -> Result<Vec<(String, E::Entry)>, ConfigError> {
    let table = v.as_table().ok_or_else(|| at.err(format!("expected {expected}")))?;
    table.iter().map(|(name, v)| Ok((name.clone(), E::entry(name, Given::File(v), at)?))).collect()
}

fn entry_items<E: Entries>(items: Vec<String>, at: &At, form: &str) -> Result<Vec<(String, E::Entry)>, ConfigError> {
    let mut list = Vec::new();
    for item in items.iter().filter(|s| !s.trim().is_empty()) {
        let (name, text) =
            item.split_once('=').ok_or_else(|| at.err(format!("expected {form}, got {:?}", item.trim())))?;
        let name = name.trim();
        list.push((name.to_string(), E::entry(name, Given::Flag(text), at)?));
    }
    Ok(list)
}

fn check_names(names: &[String], what: &str) -> Result<(), String> {
    match names.iter().find(|n| !policy::valid_name(n)) {
        Some(bad) => Err(format!("{bad:?} is not a valid {what}")),
        None => Ok(()),
    }
}

/// Environment variable names.
pub struct Names;

impl List for Names {
    fn check(items: &[String]) -> Result<(), String> {
        check_names(items, "environment variable name")
    }
}

/// Name prefixes (`SPARK_`).
pub struct Prefixes;

impl List for Prefixes {
    fn check(items: &[String]) -> Result<(), String> {
        check_names(items, "name prefix")
    }
}

/// Texts, kept as given: a forbidden text may be (or hold) white space.
pub struct Texts;

impl List for Texts {
    const TRIM: bool = false;
    fn check(items: &[String]) -> Result<(), String> {
        if items.iter().any(String::is_empty) {
            return Err("an empty text would forbid every value".to_string());
        }
        Ok(())
    }
}

/// What `[kernelspecs.NAME]` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelspecSpec {
    pub client_envs: Vec<String>,
    pub set_envs: Vec<(String, Template)>,
}

/// Per-kernelspec names and values: `[kernelspecs.NAME] client_envs = [...]` and
/// `[kernelspecs.NAME.set_envs]` in a file, `NAME=A,B` items (names only) on the command line.
pub struct Kernelspecs;

impl Entries for Kernelspecs {
    type Entry = KernelspecSpec;
    fn entry(name: &str, given: Given, at: &At) -> Result<KernelspecSpec, ConfigError> {
        if name.is_empty() {
            return Err(at.err("a kernelspec name is empty"));
        }
        let key = format!("{name}.client_envs");
        let mut spec = KernelspecSpec::default();
        match given {
            Given::Flag(text) => {
                spec.client_envs = text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            }
            Given::File(v) => {
                let t = v.as_table().ok_or_else(|| at.err_in(name, "expected a table"))?;
                if let Some(k) = t.keys().find(|k| *k != "client_envs" && *k != "set_envs") {
                    let within = format!("{}.{name}.", at.key);
                    return Err(super::settings::unknown_key(&within, k, at.origin, &["client_envs", "set_envs"]));
                }
                if let Some(v) = t.get("client_envs") {
                    spec.client_envs =
                        v.clone().try_into().map_err(|_| at.err_in(&key, "expected an array of strings"))?;
                }
                if let Some(v) = t.get("set_envs") {
                    spec.set_envs =
                        set_envs_table(v, &At { key: &format!("{}.{name}.set_envs", at.key), origin: at.origin })?;
                }
            }
        };
        check_names(&spec.client_envs, "environment variable name").map_err(|m| at.err_in(&key, m))?;
        Ok(spec)
    }
}

/// `set_envs`: `NAME = "TEMPLATE"` entries (see [`Template`]).
pub struct SetEnvs;

impl Entries for SetEnvs {
    type Entry = Template;
    fn entry(name: &str, given: Given, at: &At) -> Result<Template, ConfigError> {
        if !policy::valid_name(name) {
            return Err(at.err_in(name, format!("{name:?} is not a valid environment variable name")));
        }
        if name == crate::decide::USERNAME {
            return Err(at.err_in(
                name,
                "KERNEL_USERNAME is the identity's user already (see `user_mismatch`); it cannot be set here",
            ));
        }
        let text = match given {
            Given::Flag(text) => text,
            Given::File(v) => v.as_str().ok_or_else(|| at.err_in(name, "expected a string"))?,
        };
        Template::parse(text).map_err(|e| at.err_in(name, e))
    }
}

/// A table of `set_envs` entries inside another table.
fn set_envs_table(v: &toml::Value, at: &At) -> Result<Vec<(String, Template)>, ConfigError> {
    entries::<SetEnvs>(v.clone(), at, "a table of NAME = \"TEMPLATE\"")
}

/// What a `[users.NAME]` or `[groups.NAME]` block holds, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSpec {
    pub client_envs: Vec<String>,
    pub allow_prefixes: Vec<String>,
    pub deny_envs: Vec<String>,
    pub value_patterns: Vec<(String, Pattern)>,
    pub kernelspecs: Option<Vec<String>>,
    pub set_envs: Vec<(String, Template)>,
    pub priority: i64,
}

/// `[users.NAME]` blocks: a table per user in a file, `NAME={ inline TOML table }` items on the
/// command line (the flag repeated, or items separated by newlines in the variable).
pub struct Users;

/// `[groups.NAME]` blocks, as [`Users`], plus `priority`.
pub struct Groups;

const USER_KEYS: &[&str] = &["client_envs", "allow_prefixes", "deny_envs", "value_patterns", "kernelspecs", "set_envs"];
const GROUP_KEYS: &[&str] =
    &["client_envs", "allow_prefixes", "deny_envs", "value_patterns", "kernelspecs", "set_envs", "priority"];

impl Entries for Users {
    type Entry = BlockSpec;
    fn entry(name: &str, given: Given, at: &At) -> Result<BlockSpec, ConfigError> {
        block(name, given, at, USER_KEYS)
    }
}

impl Entries for Groups {
    type Entry = BlockSpec;
    fn entry(name: &str, given: Given, at: &At) -> Result<BlockSpec, ConfigError> {
        block(name, given, at, GROUP_KEYS)
    }
}

/// Reads one block; `keys`: the keys it may hold.
fn block(name: &str, given: Given, at: &At, keys: &[&str]) -> Result<BlockSpec, ConfigError> {
    if name.is_empty() {
        return Err(at.err("a block's name is empty"));
    }
    let parsed;
    let v = match given {
        Given::File(v) => v,
        Given::Flag(text) => {
            let doc: toml::Table = format!("v = {text}").parse().map_err(|_| {
                at.err_in(
                    name,
                    format!("expected an inline TOML table like {{ client_envs = [\"A\"] }}, got {:?}", text.trim()),
                )
            })?;
            parsed = doc.get("v").cloned().unwrap_or(toml::Value::Boolean(false));
            &parsed
        }
    };
    let t = v.as_table().ok_or_else(|| at.err_in(name, "expected a table"))?;
    if let Some(k) = t.keys().find(|k| !keys.contains(&k.as_str())) {
        let within = format!("{}.{name}.", at.key);
        return Err(super::settings::unknown_key(&within, k, at.origin, keys));
    }
    let sub = |k: &str| format!("{name}.{k}");
    let strings = |k: &str, what: &str| -> Result<Option<Vec<String>>, ConfigError> {
        let Some(v) = t.get(k) else { return Ok(None) };
        let items: Vec<String> =
            v.clone().try_into().map_err(|_| at.err_in(&sub(k), "expected an array of strings"))?;
        if what != "kernelspec name" {
            check_names(&items, what).map_err(|m| at.err_in(&sub(k), m))?;
        } else if items.iter().any(|i| i.is_empty()) {
            return Err(at.err_in(&sub(k), "a kernelspec name is empty"));
        }
        Ok(Some(items))
    };
    let mut spec = BlockSpec {
        client_envs: strings("client_envs", "environment variable name")?.unwrap_or_default(),
        allow_prefixes: strings("allow_prefixes", "name prefix")?.unwrap_or_default(),
        deny_envs: strings("deny_envs", "environment variable name")?.unwrap_or_default(),
        kernelspecs: strings("kernelspecs", "kernelspec name")?,
        ..BlockSpec::default()
    };
    if let Some(v) = t.get("value_patterns") {
        let at_p = At { key: &format!("{}.{name}.value_patterns", at.key), origin: at.origin };
        for (n, p) in entries::<Patterns>(v.clone(), &at_p, Patterns::EXPECTED)? {
            let p =
                p.ok_or_else(|| at_p.err_in(&n, "an empty pattern; a block's patterns only add to the global ones"))?;
            spec.value_patterns.push((n, p));
        }
    }
    if let Some(v) = t.get("set_envs") {
        spec.set_envs = set_envs_table(v, &At { key: &format!("{}.{name}.set_envs", at.key), origin: at.origin })?;
    }
    if let Some(v) = t.get("priority") {
        spec.priority = v.as_integer().ok_or_else(|| at.err_in(&sub("priority"), "expected an integer"))?;
    }
    Ok(spec)
}

/// Per-name value patterns: `[value_patterns] NAME = "REGEX"` in a file, `NAME=REGEX` items on
/// the command line (separated by newlines in the variable); an empty pattern (`None`) removes a
/// built-in one.
pub struct Patterns;

impl Patterns {
    const EXPECTED: &'static str = "a table of NAME = \"REGEX\"";
}

impl Entries for Patterns {
    type Entry = Option<Pattern>;
    fn entry(name: &str, given: Given, at: &At) -> Result<Option<Pattern>, ConfigError> {
        if !policy::valid_name(name) {
            return Err(at.err_in(name, format!("{name:?} is not a valid environment variable name")));
        }
        let re = match given {
            Given::Flag(text) => text,
            Given::File(v) => v.as_str().ok_or_else(|| at.err(format!("expected {}", Self::EXPECTED)))?,
        };
        if re.is_empty() {
            return Ok(None);
        }
        Pattern::new(re).map(Some).map_err(|e| at.err_in(name, format!("not a valid regular expression: {e}")))
    }
}

/// A clap value parser that trims the value, and whose errors say which setting the flag or
/// variable sets and where the bad value came from: clap names only the flag, even for a value
/// from the environment.
#[derive(Clone)]
struct Tip<P>(P);

impl<P: TypedValueParser> TypedValueParser for Tip<P> {
    type Value = P::Value;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&Arg>, value: &OsStr) -> Result<P::Value, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    fn parse_ref_(
        &self,
        cmd: &clap::Command,
        arg: Option<&Arg>,
        value: &OsStr,
        source: ValueSource,
    ) -> Result<P::Value, clap::Error> {
        let value = value.to_str().map_or(value, |s| OsStr::new(s.trim()));
        self.0.parse_ref_(cmd, arg, value, source).map_err(|mut e| {
            let Some(arg) = arg else { return e };
            let flag = format!("--{}", arg.get_long().unwrap_or_default());
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
            let from = if source == ValueSource::EnvVariable { &env } else { &flag };
            let tip =
                format!("`{}` is set by {flag}, {env} or the config file; this value came from {from}", arg.get_id());
            let mut tips = match e.get(ContextKind::Suggested) {
                Some(ContextValue::StyledStrs(t)) => t.clone(),
                _ => Vec::new(),
            };
            tips.push(tip.into());
            e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
            e
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        self.0.possible_values()
    }
}
