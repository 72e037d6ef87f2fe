//! Kernel-start bodies (`POST {base}/api/kernels`): a strict parse, and a re-serialization that
//! holds exactly what envgate decided.
//!
//! EG parses bodies leniently (`json.loads`: last duplicate key wins, NaN accepted, Content-Type
//! ignored) and filters `env` only when the key is present. So envgate never forwards the
//! client's bytes: it parses strictly, refuses anything ambiguous, and writes a new body in
//! which `env` is always an object. Other top-level members are copied as the client wrote them.
//!
//! Error messages name keys but never echo a value.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::json::write_str;

/// A kernel-start body that passed the strict parse.
#[derive(Debug)]
pub struct StartBody<'a> {
    /// Top-level members other than `env`, in the client's order, as raw JSON text.
    members: Vec<(String, &'a RawValue)>,
    /// Position of `env` among `members` (it is rendered before `members[env_at]`), if sent.
    env_at: Option<usize>,
    /// `name`: the kernelspec the client asked for; `None` when absent or `null`.
    pub name: Option<String>,
    /// The client's `env`, in its order. Names are unique. Names and values borrow the body's
    /// bytes unless they hold a JSON escape (then they are decoded into their own string).
    pub env: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// Why a body was refused. Never holds a value, only names and positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    NotUtf8,
    NotObject,
    Syntax(String),
    DuplicateKey(String),
    DuplicateEnvName(String),
    EnvNotObject,
    NonStringValue(String),
    NameNotString,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "the kernel start body is empty; a JSON object is required"),
            ParseError::NotUtf8 => write!(f, "the kernel start body is not valid UTF-8"),
            ParseError::NotObject => write!(f, "the kernel start body must be a JSON object"),
            ParseError::Syntax(e) => write!(f, "the kernel start body is not valid JSON: {e}"),
            ParseError::DuplicateKey(k) => {
                write!(f, "duplicate key {:?} in the kernel start body", short(k))
            }
            ParseError::DuplicateEnvName(k) => write!(f, "duplicate name {:?} in \"env\"", short(k)),
            ParseError::EnvNotObject => write!(f, "\"env\" must be a JSON object of strings"),
            ParseError::NonStringValue(k) => {
                write!(f, "the value of {:?} in \"env\" must be a string", short(k))
            }
            ParseError::NameNotString => write!(f, "\"name\" must be a string or null"),
        }
    }
}

/// Names in messages are the client's; keep messages one readable line.
fn short(s: &str) -> String {
    if s.chars().count() <= 128 {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(128).collect();
        t.push('…');
        t
    }
}

/// Parses a kernel-start body strictly.
pub fn parse(body: &[u8]) -> Result<StartBody<'_>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotUtf8)?;
    let first = text.trim_start_matches([' ', '\t', '\n', '\r']).as_bytes().first();
    match first {
        None => return Err(ParseError::Empty),
        Some(b'{') => {}
        // Anything else is either not an object or not JSON; say "not an object" only when it is JSON.
        Some(_) => {
            return match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => Err(ParseError::NotObject),
                Err(e) => Err(ParseError::Syntax(syntax_message(&e))),
            }
        }
    }
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = TopSeed { failure: &failure }.deserialize(&mut de).and_then(|b| de.end().map(|_| b));
    match parsed {
        Ok(b) => Ok(b),
        Err(e) => Err(failure.into_inner().unwrap_or_else(|| ParseError::Syntax(syntax_message(&e)))),
    }
}

/// serde_json's syntax messages hold positions and expectations, never input text.
fn syntax_message(e: &serde_json::Error) -> String {
    e.to_string()
}

impl StartBody<'_> {
    /// Whether the client sent an `env` member.
    pub fn has_env(&self) -> bool {
        self.env_at.is_some()
    }

    /// The `path` member (the kernel's working directory): `None` when absent or `null`,
    /// `Some(None)` when it is not a string.
    pub fn path(&self) -> Option<Option<String>> {
        let (_, raw) = self.members.iter().find(|(k, _)| k == "path")?;
        match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::Null) => None,
            Ok(serde_json::Value::String(s)) => Some(Some(s)),
            _ => Some(None),
        }
    }

    /// Writes the body envgate forwards: every member as the client sent it, and an `env`
    /// object (in the client's position, or last) holding the names for which `keep` is true.
    pub fn render(&self, keep: impl Fn(&str) -> bool) -> Vec<u8> {
        self.render_with(keep, false)
    }

    /// [`StartBody::render`], leaving the `path` member out when `strip_path` is set.
    pub fn render_with(&self, keep: impl Fn(&str) -> bool, strip_path: bool) -> Vec<u8> {
        self.render_by(|i| keep(&self.env[i].0), strip_path)
    }

    /// [`StartBody::render_with`], keeping `env[i]` when `keep[i]` is true.
    pub fn render_kept(&self, keep: &[bool], strip_path: bool) -> Vec<u8> {
        self.render_by(|i| keep.get(i).copied().unwrap_or(false), strip_path)
    }

    fn render_by(&self, keep: impl Fn(usize) -> bool, strip_path: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self.members.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>()
                + self.env.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>(),
        );
        out.push(b'{');
        let env_at = self.env_at.unwrap_or(self.members.len());
        let mut first = true;
        let mut sep = |out: &mut Vec<u8>| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
        };
        for (i, (k, v)) in self.members.iter().enumerate() {
            if i == env_at {
                sep(&mut out);
                self.render_env(&mut out, &keep);
            }
            if strip_path && k == "path" {
                continue;
            }
            sep(&mut out);
            write_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        if env_at >= self.members.len() {
            sep(&mut out);
            self.render_env(&mut out, &keep);
        }
        out.push(b'}');
        out
    }

    fn render_env(&self, out: &mut Vec<u8>, keep: &impl Fn(usize) -> bool) {
        out.extend_from_slice(b"\"env\":{");
        let mut first = true;
        for (_, (k, v)) in self.env.iter().enumerate().filter(|(i, _)| keep(*i)) {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            write_str(out, v);
        }
        out.push(b'}');
    }
}

type Failure<'f> = &'f RefCell<Option<ParseError>>;

fn fail<E: de::Error>(failure: Failure<'_>, e: ParseError) -> E {
    *failure.borrow_mut() = Some(e);
    E::custom("refused")
}

struct TopSeed<'f> {
    failure: Failure<'f>,
}

impl<'de, 'f> DeserializeSeed<'de> for TopSeed<'f> {
    type Value = StartBody<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'f> Visitor<'de> for TopSeed<'f> {
    type Value = StartBody<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut body = StartBody { members: Vec::new(), env_at: None, name: None, env: Vec::new() };
        while let Some(key) = map.next_key::<String>()? {
            if key == "env" {
                if body.env_at.is_some() {
                    return Err(fail(self.failure, ParseError::DuplicateKey(key)));
                }
                body.env_at = Some(body.members.len());
                body.env = map.next_value_seed(EnvSeed { failure: self.failure })?;
                continue;
            }
            let raw: &'de RawValue = map.next_value()?;
            // Skipping a raw value checks neither nesting depth nor `\u` escapes; a full parse
            // of these (small) members does, so that nothing forwarded is less strict than `env`.
            if let Err(e) = serde_json::from_str::<serde_json::Value>(raw.get()) {
                return Err(fail(
                    self.failure,
                    ParseError::Syntax(format!("in {:?}: {}", short(&key), syntax_message(&e))),
                ));
            }
            if key == "name" {
                body.name = match serde_json::from_str::<Option<String>>(raw.get()) {
                    Ok(n) => n,
                    Err(_) => return Err(fail(self.failure, ParseError::NameNotString)),
                };
            }
            body.members.push((key, raw));
        }
        if let Some(dup) = first_duplicate(body.members.iter().map(|(k, _)| k.as_str())) {
            return Err(fail(self.failure, ParseError::DuplicateKey(dup.to_string())));
        }
        Ok(body)
    }
}

/// A name that occurs more than once among `names` (the smallest such), if any. Sorting a list
/// of borrowed names costs less than hashing a copy of each, and a hostile body of many names
/// stays O(n log n).
fn first_duplicate<'n>(names: impl Iterator<Item = &'n str>) -> Option<&'n str> {
    let mut sorted: Vec<&str> = names.collect();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

struct EnvSeed<'f> {
    failure: Failure<'f>,
}

impl<'de, 'f> DeserializeSeed<'de> for EnvSeed<'f> {
    type Value = Vec<(Cow<'de, str>, Cow<'de, str>)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'f> Visitor<'de> for EnvSeed<'f> {
    type Value = Vec<(Cow<'de, str>, Cow<'de, str>)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut env = Vec::with_capacity(map.size_hint().unwrap_or(16).min(256));
        while let Some(name) = map.next_key_seed(BorrowedStr)? {
            match map.next_value::<MaybeString<'de>>()?.0 {
                Some(v) => env.push((name, v)),
                None => return Err(fail(self.failure, ParseError::NonStringValue(name.into_owned()))),
            }
        }
        if let Some(dup) = first_duplicate(env.iter().map(|(k, _)| &**k)) {
            return Err(fail(self.failure, ParseError::DuplicateEnvName(dup.to_string())));
        }
        Ok(env)
    }
    // Every other JSON type: refuse without echoing it.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(fail(self.failure, ParseError::EnvNotObject))
    }
}

/// A JSON string, borrowed from the input when it holds no escape.
struct BorrowedStr;

impl<'de> DeserializeSeed<'de> for BorrowedStr {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for BorrowedStr {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// A JSON value that is kept only when it is a string (borrowed when it can be); any other type
/// becomes `None` (and is consumed whole, so the parse can go on to report it by name).
struct MaybeString<'de>(Option<Cow<'de, str>>);

impl<'de> serde::Deserialize<'de> for MaybeString<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeString<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            // Strings as BorrowedStr takes them.
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                BorrowedStr.visit_borrowed_str(v).map(|s| MaybeString(Some(s)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                BorrowedStr.visit_str(v).map(|s| MaybeString(Some(s)))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                BorrowedStr.visit_string(v).map(|s| MaybeString(Some(s)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ok(body: &str) -> StartBody<'_> {
        parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn err(body: &[u8]) -> ParseError {
        parse(body)
            .err()
            .unwrap_or_else(|| panic!("accepted: {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
    }

    fn render_all(b: &StartBody<'_>) -> Value {
        serde_json::from_slice(&b.render(|_| true)).expect("rendered body re-parses")
    }

    #[test]
    fn parses_name_env_and_other_members() {
        let b = ok(r#"{"name": "python3", "env": {"KERNEL_A": "1", "FOO": "x y"}, "path": "nb"}"#);
        assert_eq!(b.name.as_deref(), Some("python3"));
        assert_eq!(b.env, [("KERNEL_A".into(), "1".into()), ("FOO".into(), "x y".into())]);
        assert!(b.has_env());
        assert_eq!(render_all(&b), json!({"name": "python3", "env": {"KERNEL_A": "1", "FOO": "x y"}, "path": "nb"}));
    }

    #[test]
    fn env_borrows_plain_strings_and_decodes_escaped_ones() {
        let b = ok(r#"{"env": {"PLAIN": "v", "A\u0042": "x\ny", "C": "\u00e9"}}"#);
        assert_eq!(b.env, [("PLAIN".into(), "v".into()), ("AB".into(), "x\ny".into()), ("C".into(), "é".into())]);
        assert!(matches!(b.env[0], (Cow::Borrowed(_), Cow::Borrowed(_))));
        assert!(matches!(b.env[1], (Cow::Owned(_), Cow::Owned(_))));
        // a duplicate spelled once plainly and once escaped is still a duplicate
        assert_eq!(err(br#"{"env": {"AB": "1", "A\u0042": "2"}}"#), ParseError::DuplicateEnvName("AB".into()));
    }

    #[test]
    fn render_keeps_member_order_and_raw_text_and_filters_env() {
        let b = ok(r#"{"path":"a/b","env":{"A":"1","B":"2"},"name":"k","extra":{"n":[1,2.50,true,null]}}"#);
        let out = String::from_utf8(b.render(|n| n == "B")).unwrap();
        assert_eq!(out, r#"{"path":"a/b","env":{"B":"2"},"name":"k","extra":{"n":[1,2.50,true,null]}}"#);
    }

    #[test]
    fn render_always_has_an_env_object() {
        for body in ["{}", r#"{"name":"python3"}"#, r#"{"Env":{"A":"1"}}"#, r#"{"name":null}"#] {
            let b = ok(body);
            assert!(!b.has_env());
            let v = render_all(&b);
            assert_eq!(v["env"], json!({}), "{body}");
        }
        let b = ok(r#"{"name":"x","env":{"A":"1"}}"#);
        assert_eq!(render_all(&b)["env"], json!({"A": "1"}));
        assert_eq!(String::from_utf8(b.render(|_| false)).unwrap(), r#"{"name":"x","env":{}}"#);
    }

    #[test]
    fn name_may_be_absent_null_or_string_only() {
        assert_eq!(ok("{}").name, None);
        assert_eq!(ok(r#"{"name":null}"#).name, None);
        assert_eq!(ok(r#"{"name":"\u0070y"}"#).name.as_deref(), Some("py"));
        for b in [r#"{"name":1}"#, r#"{"name":["a"]}"#, r#"{"name":{}}"#, r#"{"name":true}"#] {
            assert_eq!(err(b.as_bytes()), ParseError::NameNotString, "{b}");
        }
    }

    #[test]
    fn escapes_are_decoded_before_deciding_and_reencoded() {
        let b = ok(r#"{"env":{"\u0046OO":"a\"b\\c\u00e9\n"}}"#);
        assert_eq!(b.env, [("FOO".into(), "a\"b\\cé\n".into())]);
        assert_eq!(render_all(&b)["env"]["FOO"], json!("a\"b\\cé\n"));
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_spelled_differently() {
        assert_eq!(err(br#"{"env":{},"env":{"A":"1"}}"#), ParseError::DuplicateKey("env".into()));
        assert_eq!(err(br#"{"env":{},"\u0065nv":{"A":"1"}}"#), ParseError::DuplicateKey("env".into()));
        assert_eq!(err(br#"{"name":"a","name":"b"}"#), ParseError::DuplicateKey("name".into()));
        assert_eq!(err(br#"{"env":{"A":"1","A":"2"}}"#), ParseError::DuplicateEnvName("A".into()));
        assert_eq!(err(br#"{"env":{"FOO":"1","\u0046OO":"2"}}"#), ParseError::DuplicateEnvName("FOO".into()));
    }

    #[test]
    fn env_must_be_an_object_of_strings() {
        for b in [r#"{"env":null}"#, r#"{"env":[]}"#, r#"{"env":"A=1"}"#, r#"{"env":1}"#, r#"{"env":true}"#] {
            assert_eq!(err(b.as_bytes()), ParseError::EnvNotObject, "{b}");
        }
        for b in [
            r#"{"env":{"A":1}}"#,
            r#"{"env":{"A":null}}"#,
            r#"{"env":{"A":["x"]}}"#,
            r#"{"env":{"A":{"x":"y"}}}"#,
            r#"{"env":{"A":false}}"#,
        ] {
            assert_eq!(err(b.as_bytes()), ParseError::NonStringValue("A".into()), "{b}");
        }
    }

    #[test]
    fn not_objects_and_not_json_are_refused() {
        assert_eq!(err(b""), ParseError::Empty);
        assert_eq!(err(b"  \n"), ParseError::Empty);
        assert_eq!(err(b"null"), ParseError::NotObject);
        assert_eq!(err(b"[]"), ParseError::NotObject);
        assert_eq!(err(b"\"{}\""), ParseError::NotObject);
        for b in [
            &b"{"[..],
            b"{\"env\":{}} {}",
            b"{\"env\":{}}x",
            b"\xef\xbb\xbf{}",
            b"\x0b{}",
            b"{\"a\":NaN}",
            b"{\"a\":Infinity}",
            b"{'env':{}}",
            b"{\"env\":{},}",
            b"name=python3&token=x",
        ] {
            assert!(matches!(err(b), ParseError::Syntax(_)), "{}", String::from_utf8_lossy(b));
        }
        assert_eq!(err(b"{\"env\":{\"A\":\"\xff\"}}"), ParseError::NotUtf8);
    }

    #[test]
    fn lone_surrogates_and_deep_nesting_are_refused() {
        assert!(matches!(err(br#"{"env":{"A":"\ud800"}}"#), ParseError::Syntax(_)));
        assert!(matches!(err(br#"{"env":{"\udc00":"x"}}"#), ParseError::Syntax(_)));
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(err(deep.as_bytes()), ParseError::Syntax(_)));
        let deep = format!("{{\"env\":{{\"A\":{}{}}}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(err(deep.as_bytes()), ParseError::NonStringValue("A".into()));
        assert!(matches!(err(br#"{"path":"\udc00"}"#), ParseError::Syntax(_)));
        assert!(matches!(err(br#"{"path":{"a":"\ud800x"}}"#), ParseError::Syntax(_)));
    }

    #[test]
    fn errors_never_echo_values() {
        let secret = "s3cr3t-value";
        for b in [
            format!(r#"{{"env":{{"A":["{secret}"]}}}}"#),
            format!(r#"{{"env":"{secret}"}}"#),
            format!(r#"{{"name":["{secret}"]}}"#),
            format!(r#""{secret}""#),
            format!(r#"{{"env":{{"A":"{secret}"}},"env":1}}"#),
            format!(r#"{{"env":{{"A":"{secret}"}}"#),
            format!(r#"["{secret}"]"#),
        ] {
            let e = err(b.as_bytes()).to_string();
            assert!(!e.contains(secret), "{b} -> {e}");
        }
    }

    #[test]
    fn path_is_read_and_can_be_stripped() {
        assert_eq!(ok(r#"{"name":"k"}"#).path(), None);
        assert_eq!(ok(r#"{"path":null}"#).path(), None);
        assert_eq!(ok(r#"{"path":"a\u002f..\/b"}"#).path(), Some(Some("a/../b".into())));
        assert_eq!(ok(r#"{"path":["x"]}"#).path(), Some(None));
        assert_eq!(ok(r#"{"path":1}"#).path(), Some(None));
        for (body, want) in [
            (r#"{"path":"../x","env":{"A":"1"},"name":"k"}"#, r#"{"env":{"A":"1"},"name":"k"}"#),
            (r#"{"env":{"A":"1"},"path":"../x","name":"k"}"#, r#"{"env":{"A":"1"},"name":"k"}"#),
            (r#"{"name":"k","path":"/"}"#, r#"{"name":"k","env":{}}"#),
            (r#"{"name":"k"}"#, r#"{"name":"k","env":{}}"#),
        ] {
            let b = ok(body);
            assert_eq!(String::from_utf8(b.render_with(|_| true, true)).unwrap(), want, "{body}");
        }
    }

    #[test]
    fn whitespace_around_is_fine() {
        let b = ok(" \r\n\t{\"env\":{}}\n ");
        assert!(b.has_env());
    }
}
