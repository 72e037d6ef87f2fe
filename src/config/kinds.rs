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
    /// The value as TOML.
    fn render(v: &Self::Value) -> String;
    /// The setting's line in `envgate check`'s output.
    fn line(key: &str, v: &Self::Value) -> String {
        format!("{key} = {}", Self::render(v))
    }
}

/// A setting written as one string, in the file as on the command line.
pub trait Text {
    type Value: Clone + fmt::Debug + PartialEq + Eq;
    /// Shown in the error when a file gives something else than a string.
    const EXPECTED: &'static str;
    /// Parses the trimmed text.
    fn parse(s: &str) -> Result<Self::Value, String>;
    fn render(v: &Self::Value) -> String;
    fn line(key: &str, v: &Self::Value) -> String {
        format!("{key} = {}", Self::render(v))
    }
    fn arg(a: Arg) -> Arg {
        a
    }
}

macro_rules! text_kinds {
    ($($t:ty),*) => {$(
        impl Kind for $t {
            type Flag = String;
            type Value = <$t as Text>::Value;
            fn arg(a: Arg) -> Arg {
                <$t as Text>::arg(a.value_parser(clap::value_parser!(String)))
            }
            fn from_toml(v: toml::Value, at: &At) -> Result<Self::Value, ConfigError> {
                match v {
                    toml::Value::String(s) => Self::from_flag(s, at),
                    _ => Err(at.err(format!("expected {}", <$t as Text>::EXPECTED))),
                }
            }
            fn from_flag(s: String, at: &At) -> Result<Self::Value, ConfigError> {
                <$t as Text>::parse(s.trim()).map_err(|m| at.err(m))
            }
            fn render(v: &Self::Value) -> String {
                <$t as Text>::render(v)
            }
            fn line(key: &str, v: &Self::Value) -> String {
                <$t as Text>::line(key, v)
            }
        }
    )*};
}

text_kinds!(Addr, Url, Duration, NonZeroDuration, FilePath, AuditLog, Token, Header);

/// A socket address, `127.0.0.1:8889`.
pub struct Addr;

impl Text for Addr {
    type Value = SocketAddr;
    const EXPECTED: &'static str = "a string like \"127.0.0.1:8889\"";
    fn parse(s: &str) -> Result<SocketAddr, String> {
        s.parse().map_err(|_| format!("expected an address like 127.0.0.1:8889, got {s:?}"))
    }
    fn render(v: &SocketAddr) -> String {
        format!("{:?}", v.to_string())
    }
}

/// The upstream's URL, see [`parse_upstream`].
pub struct Url;

impl Text for Url {
    type Value = UpstreamUrl;
    const EXPECTED: &'static str = "a URL string";
    fn parse(s: &str) -> Result<UpstreamUrl, String> {
        parse_upstream(s)
    }
    fn render(v: &UpstreamUrl) -> String {
        format!("{:?}", v.to_string())
    }
}

/// A duration, `10s`, `1m 30s` (zero allowed).
impl Text for Duration {
    type Value = Duration;
    const EXPECTED: &'static str = "a duration string like \"10s\"";
    fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s).map_err(|e| format!("expected a duration like \"10s\", got {s:?} ({e})"))
    }
    fn render(v: &Duration) -> String {
        format!("{:?}", humantime::format_duration(*v).to_string())
    }
}

/// A duration greater than zero: a timeout of zero would fail every request.
pub struct NonZeroDuration;

impl Text for NonZeroDuration {
    type Value = Duration;
    const EXPECTED: &'static str = <Duration as Text>::EXPECTED;
    fn parse(s: &str) -> Result<Duration, String> {
        match <Duration as Text>::parse(s)? {
            d if d.is_zero() => Err("must be greater than zero".to_string()),
            d => Ok(d),
        }
    }
    fn render(v: &Duration) -> String {
        <Duration as Text>::render(v)
    }
}

/// A file's path, not empty.
pub struct FilePath;

impl Text for FilePath {
    type Value = PathBuf;
    const EXPECTED: &'static str = "a file path";
    fn parse(s: &str) -> Result<PathBuf, String> {
        if s.is_empty() {
            return Err("expected a file path".to_string());
        }
        Ok(PathBuf::from(s))
    }
    fn render(v: &PathBuf) -> String {
        format!("{:?}", v.display().to_string())
    }
}

/// `-` for standard output, or a file.
pub struct AuditLog;

impl Text for AuditLog {
    type Value = AuditTarget;
    const EXPECTED: &'static str = "\"-\" or a file path";
    fn parse(s: &str) -> Result<AuditTarget, String> {
        match s {
            "-" => Ok(AuditTarget::Stdout),
            "" => Err("expected \"-\" or a file path".to_string()),
            f => Ok(AuditTarget::File(PathBuf::from(f))),
        }
    }
    fn render(v: &AuditTarget) -> String {
        match v {
            AuditTarget::Stdout => "\"-\"".to_string(),
            AuditTarget::File(f) => <FilePath as Text>::render(f),
        }
    }
}

/// A secret: never shown, in `--help` (from the environment) or `envgate check`.
pub struct Token;

impl Text for Token {
    type Value = Secret;
    const EXPECTED: &'static str = "a string";
    fn parse(s: &str) -> Result<Secret, String> {
        Ok(Secret(s.to_string()))
    }
    fn render(_: &Secret) -> String {
        "\"(not shown)\"".to_string()
    }
    /// A comment: the output of `envgate check` is a config file, and must not set a wrong token.
    fn line(key: &str, _: &Secret) -> String {
        format!("# {key}: set (not shown)")
    }
    fn arg(a: Arg) -> Arg {
        a.hide_env_values(true)
    }
}

/// An HTTP header name.
pub struct Header;

impl Text for Header {
    type Value = http::HeaderName;
    const EXPECTED: &'static str = "a header name";
    fn parse(s: &str) -> Result<http::HeaderName, String> {
        http::HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("{s:?} is not a header name"))
    }
    fn render(v: &http::HeaderName) -> String {
        format!("{:?}", v.as_str())
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
    fn render(v: &u64) -> String {
        v.to_string()
    }
}

/// true or false; the flag takes what clap's [`BoolishValueParser`] does (true/false, yes/no,
/// on/off, 1/0, ...).
pub struct Bool;

impl Kind for Bool {
    type Flag = bool;
    type Value = bool;
    fn arg(a: Arg) -> Arg {
        a.value_parser(Tip(BoolishValueParser::new()))
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<bool, ConfigError> {
        v.as_bool().ok_or_else(|| at.err("expected true or false"))
    }
    fn from_flag(f: bool, _: &At) -> Result<bool, ConfigError> {
        Ok(f)
    }
    fn render(v: &bool) -> String {
        v.to_string()
    }
}

/// A [`Bool`] whose flag alone means true (`--upstream-insecure`).
pub struct Switch;

impl Kind for Switch {
    type Flag = bool;
    type Value = bool;
    fn arg(a: Arg) -> Arg {
        Bool::arg(a).num_args(0..=1).default_missing_value("true")
    }
    fn from_toml(v: toml::Value, at: &At) -> Result<bool, ConfigError> {
        Bool::from_toml(v, at)
    }
    fn from_flag(f: bool, at: &At) -> Result<bool, ConfigError> {
        Bool::from_flag(f, at)
    }
    fn render(v: &bool) -> String {
        Bool::render(v)
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
        let expected = || format!("expected {}", names.join(", "));
        let s = v.as_str().ok_or_else(|| at.err(expected()))?;
        T::from_str(s.trim(), false).map_err(|_| at.err(format!("{}, got {s:?}", expected())))
    }
    fn from_flag(f: T, _: &At) -> Result<T, ConfigError> {
        Ok(f)
    }
    fn render(v: &T) -> String {
        v.to_possible_value().map_or_else(String::new, |p| format!("{:?}", p.get_name()))
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

/// A list of strings: a TOML array, or the flag repeated or its values separated by `SEP`.
pub trait List {
    type Value: Clone + fmt::Debug + PartialEq + Eq;
    const SEP: char;
    /// What a file's array holds.
    const EXPECTED: &'static str = "an array of strings";
    /// From the file's items, as written.
    fn check(items: Vec<String>, at: &At) -> Result<Self::Value, ConfigError>;
    /// From the flag's items (trimmed, empty ones dropped, unless said otherwise).
    fn from_items(items: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
        Self::check(items.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(), at)
    }
    /// From a file's value that is not an array of strings (`None`: not accepted).
    fn from_other(_: toml::Value, at: &At) -> Result<Self::Value, ConfigError> {
        Err(at.err(format!("expected {}", Self::EXPECTED)))
    }
    fn render(v: &Self::Value) -> String;
}

macro_rules! list_kinds {
    ($($t:ty),*) => {$(
        impl Kind for $t {
            type Flag = Vec<String>;
            type Value = <$t as List>::Value;
            fn arg(a: Arg) -> Arg {
                a.value_parser(clap::value_parser!(String)).action(ArgAction::Append).value_delimiter(<$t as List>::SEP)
            }
            fn flag(m: &ArgMatches, id: &str) -> Option<Vec<String>> {
                Some(m.try_get_many::<String>(id).ok()??.cloned().collect())
            }
            fn from_toml(v: toml::Value, at: &At) -> Result<Self::Value, ConfigError> {
                match v.clone().try_into::<Vec<String>>() {
                    Ok(items) => <$t as List>::check(items, at),
                    Err(_) => <$t as List>::from_other(v, at),
                }
            }
            fn from_flag(f: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
                <$t as List>::from_items(f, at)
            }
            fn render(v: &Self::Value) -> String {
                <$t as List>::render(v)
            }
        }
    )*};
}

list_kinds!(Names, Prefixes, Texts, Kernelspecs, Patterns);

fn render_strings(v: &[String]) -> String {
    let v: Vec<String> = v.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", v.join(", "))
}

fn check_names(names: &[String]) -> Result<(), String> {
    match names.iter().find(|n| !policy::valid_name(n)) {
        Some(bad) => Err(format!("{bad:?} is not a valid environment variable name")),
        None => Ok(()),
    }
}

/// Environment variable names.
pub struct Names;

impl List for Names {
    type Value = Vec<String>;
    const SEP: char = ',';
    fn check(items: Vec<String>, at: &At) -> Result<Vec<String>, ConfigError> {
        check_names(&items).map_err(|m| at.err(m))?;
        Ok(items)
    }
    fn render(v: &Vec<String>) -> String {
        render_strings(v)
    }
}

/// Name prefixes (`SPARK_`).
pub struct Prefixes;

impl List for Prefixes {
    type Value = Vec<String>;
    const SEP: char = ',';
    fn check(items: Vec<String>, at: &At) -> Result<Vec<String>, ConfigError> {
        match items.iter().find(|p| !policy::valid_name(p)) {
            Some(bad) => Err(at.err(format!("{bad:?} is not a valid name prefix"))),
            None => Ok(items),
        }
    }
    fn render(v: &Vec<String>) -> String {
        render_strings(v)
    }
}

/// Texts, kept as given: a forbidden text may be (or hold) white space.
pub struct Texts;

impl List for Texts {
    type Value = Vec<String>;
    const SEP: char = ',';
    fn check(items: Vec<String>, at: &At) -> Result<Vec<String>, ConfigError> {
        if items.iter().any(String::is_empty) {
            return Err(at.err("an empty text would forbid every value"));
        }
        Ok(items)
    }
    fn from_items(items: Vec<String>, at: &At) -> Result<Vec<String>, ConfigError> {
        Self::check(items, at)
    }
    fn render(v: &Vec<String>) -> String {
        let v: Vec<String> = v.iter().map(|t| format!("\"{}\"", policy::toml_escape(t))).collect();
        format!("[{}]", v.join(", "))
    }
}

/// Per-kernelspec names: `[kernelspecs.NAME] client_envs = [...]` in a file, `NAME=A,B` items
/// on the command line; in the order given.
pub struct Kernelspecs;

impl List for Kernelspecs {
    type Value = Vec<(String, Vec<String>)>;
    const SEP: char = ';';
    fn check(_: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
        Err(at.err("expected a table of tables"))
    }
    fn from_items(items: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
        let mut list = Vec::new();
        for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (name, envs) =
                item.split_once('=').ok_or_else(|| at.err(format!("expected NAME=A,B, got {item:?}")))?;
            let envs = envs.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            list.push((name.trim().to_string(), envs));
        }
        Self::checked(list, at)
    }
    fn from_other(v: toml::Value, at: &At) -> Result<Self::Value, ConfigError> {
        let ks = v.as_table().ok_or_else(|| at.err("expected a table of tables"))?;
        let mut list = Vec::new();
        for (name, t) in ks {
            let t = t.as_table().ok_or_else(|| at.err_in(name, "expected a table"))?;
            if let Some(k) = t.keys().find(|k| *k != "client_envs") {
                let within = format!("{}.{name}.", at.key);
                return Err(super::settings::unknown_key(&within, k, at.origin, &["client_envs"]));
            }
            let envs: Vec<String> = match t.get("client_envs") {
                None => Vec::new(),
                Some(v) => v
                    .clone()
                    .try_into()
                    .map_err(|_| at.err_in(&format!("{name}.client_envs"), "expected an array of strings"))?,
            };
            list.push((name.clone(), envs));
        }
        Self::checked(list, at)
    }
    fn render(v: &Self::Value) -> String {
        let t: Vec<String> =
            v.iter().map(|(n, e)| format!("{n:?} = {{ client_envs = {} }}", render_strings(e))).collect();
        format!("{{ {} }}", t.join(", "))
    }
}

impl Kernelspecs {
    fn checked(list: <Self as List>::Value, at: &At) -> Result<<Self as List>::Value, ConfigError> {
        for (name, envs) in &list {
            if name.is_empty() {
                return Err(at.err("a kernelspec name is empty"));
            }
            check_names(envs).map_err(|m| at.err_in(&format!("{name}.client_envs"), m))?;
        }
        Ok(list)
    }
}

/// Per-name value patterns: `[value_patterns] NAME = "REGEX"` in a file, `NAME=REGEX` items on
/// the command line; an empty pattern (`None`) removes a built-in one.
pub struct Patterns;

impl List for Patterns {
    type Value = Vec<(String, Option<Pattern>)>;
    const SEP: char = '\n';
    const EXPECTED: &'static str = "a table of NAME = \"REGEX\"";
    fn check(_: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
        Err(at.err(format!("expected {}", Self::EXPECTED)))
    }
    fn from_items(items: Vec<String>, at: &At) -> Result<Self::Value, ConfigError> {
        let mut list = Vec::new();
        for item in items.iter().filter(|s| !s.trim().is_empty()) {
            let (name, re) =
                item.split_once('=').ok_or_else(|| at.err(format!("expected NAME=REGEX, got {item:?}")))?;
            list.push((name.trim().to_string(), re.to_string()));
        }
        Self::compiled(list, at)
    }
    fn from_other(v: toml::Value, at: &At) -> Result<Self::Value, ConfigError> {
        let err = || at.err(format!("expected {}", Self::EXPECTED));
        let mut list = Vec::new();
        for (name, re) in v.as_table().ok_or_else(err)? {
            list.push((name.clone(), re.as_str().ok_or_else(err)?.to_string()));
        }
        Self::compiled(list, at)
    }
    fn render(v: &Self::Value) -> String {
        let t: Vec<String> = v
            .iter()
            .map(|(n, p)| format!("{n:?} = \"{}\"", policy::toml_escape(p.as_ref().map_or("", |p| &p.text))))
            .collect();
        format!("{{ {} }}", t.join(", "))
    }
}

impl Patterns {
    fn compiled(list: Vec<(String, String)>, at: &At) -> Result<<Self as List>::Value, ConfigError> {
        let mut out = Vec::new();
        for (name, re) in list {
            if !policy::valid_name(&name) {
                return Err(at.err_in(&name, format!("{name:?} is not a valid environment variable name")));
            }
            let p = if re.is_empty() {
                None
            } else {
                Some(Pattern::new(&re).map_err(|e| at.err_in(&name, format!("not a valid regular expression: {e}")))?)
            };
            out.push((name, p));
        }
        Ok(out)
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
            let tip = format!(
                "`{}` is set by {flag}, {env} or the config file; this value came from {from}",
                arg.get_id()
            );
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
