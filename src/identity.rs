//! Who is asking, and what envgate derives from it: pure.
//!
//! An identity is a user and the groups it belongs to, read either from headers that a trusted
//! authenticating proxy sets (`trusted_user_header`, `trusted_groups_header`) or from a verified
//! token ([`crate::jwt`]). The policy ([`crate::policy::View`]) picks the `[users.NAME]` and
//! `[groups.NAME]` blocks that apply to it; `set_envs` templates ([`Template`]) turn it into
//! values such as `KERNEL_NAMESPACE = "jupyter-{user_dns}"`.

use std::fmt;
use std::sync::Arc;

/// Where the identity of a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum IdentitySource {
    /// `trusted_user_header` (and `trusted_groups_header`), set by an authenticating proxy.
    Header,
    /// A token verified with `jwt_keys`.
    Jwt,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Header => "header",
            IdentitySource::Jwt => "jwt",
        }
    }
}

/// One request's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub user: String,
    /// As resolved: trimmed, without empty items or repeats, in the order sent.
    pub groups: Vec<String>,
    pub source: IdentitySource,
}

/// How many groups, and how many bytes of each, an audit record names: a user in hundreds of
/// directory groups must not make every record kilobytes long. The policy sees every group.
pub const AUDIT_GROUPS: usize = 32;
pub const AUDIT_GROUP_BYTES: usize = 128;

impl Who {
    /// The groups an audit record names: at most [`AUDIT_GROUPS`], each cut to
    /// [`AUDIT_GROUP_BYTES`] (at a character boundary).
    pub fn audit_groups(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().take(AUDIT_GROUPS).map(|g| {
            let mut end = g.len().min(AUDIT_GROUP_BYTES);
            while !g.is_char_boundary(end) {
                end -= 1;
            }
            &g[..end]
        })
    }
}

/// The groups in a `trusted_groups_header` value: comma-separated, each trimmed; empty items
/// and repeats dropped, the first occurrence's place kept. Every line of a repeated header counts.
pub fn groups_from_header<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for g in values.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|g| !g.is_empty()) {
        if !groups.iter().any(|have| have == g) {
            groups.push(g.to_string());
        }
    }
    groups
}

/// The longest DNS-1123 label (a Kubernetes namespace or pod name).
const DNS_LABEL_MAX: usize = 63;
/// Characters of the hash suffix: 16 base32 characters are 80 bits of SHA-256.
const HASH_CHARS: usize = 16;

/// `user` as a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters), for
/// templates such as `jupyter-{user_dns}`. The rule, which the README documents:
///
/// 1. a name that already is such a label, and does not end in `-` followed by 16 characters
///    of `[a-z2-7]`, is used as it is (`alice`, `bob-smith`);
/// 2. any other name is lower-cased, every run of characters other than `a-z0-9` becomes one
///    `-`, leading and trailing `-` go, the rest is cut to 46 characters, and `-` plus 16
///    characters of the name's SHA-256 (base32, lower case) are appended:
///    `Alice.Smith@corp` becomes `alice-smith-corp-` + hash.
///
/// Names of the first kind never end like those of the second, and two names of the second
/// kind meet only if their SHA-256 share 80 bits: distinct users get distinct labels unless
/// someone finds such a collision on purpose.
pub fn user_dns(user: &str) -> String {
    if is_dns_label(user) && !has_hash_suffix(user) {
        return user.to_string();
    }
    let mut base = String::with_capacity(user.len());
    for c in user.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            base.push(c);
        } else if !base.ends_with('-') {
            base.push('-');
        }
    }
    let base = base.trim_matches('-');
    let keep = DNS_LABEL_MAX - HASH_CHARS - 1;
    let base = base[..base.len().min(keep)].trim_end_matches('-');
    let hash = base32_lower(ring::digest::digest(&ring::digest::SHA256, user.as_bytes()).as_ref());
    let hash = &hash[..HASH_CHARS];
    if base.is_empty() {
        hash.to_string()
    } else {
        format!("{base}-{hash}")
    }
}

/// Whether `s` is a DNS-1123 label.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !b.is_empty() && b.len() <= DNS_LABEL_MAX && b.iter().all(inner) && b[0] != b'-' && b[b.len() - 1] != b'-'
}

/// Whether a label ends like rule 2's output: `-` and 16 characters of `[a-z2-7]`.
fn has_hash_suffix(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > HASH_CHARS
        && b[b.len() - HASH_CHARS - 1] == b'-'
        && b[b.len() - HASH_CHARS..].iter().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(c))
}

/// RFC 4648 base32, lower case, no padding.
fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    User,
    UserDns,
    Kernelspec,
}

/// A `set_envs` value: text with `{user}`, `{user_dns}` and `{kernelspec}` in it, parsed once at
/// configuration load. `{{` and `}}` stand for `{` and `}`; any other `{` is an error there, so
/// that a typo never reaches a kernel as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    pieces: Vec<Piece>,
}

/// What a template needs to be rendered.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The identity's user, when identity is configured.
    pub user: Option<&'a str>,
    /// The kernelspec the kernel start resolved to, lower-cased.
    pub kernelspec: Option<&'a str>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(t) = tail.strip_prefix("{{") {
                lit.push('{');
                rest = t;
            } else if let Some(t) = tail.strip_prefix("}}") {
                lit.push('}');
                rest = t;
            } else if tail.starts_with('}') {
                return Err("a lone `}` (write `}}` for the character)".to_string());
            } else {
                let end = tail.find('}').ok_or("an unclosed `{`")?;
                let piece = match &tail[1..end] {
                    "user" => Piece::User,
                    "user_dns" => Piece::UserDns,
                    "kernelspec" => Piece::Kernelspec,
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}` (known: {{user}}, {{user_dns}}, {{kernelspec}}; \
                             write `{{{{` for the character)"
                        ))
                    }
                };
                if !lit.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut lit)));
                }
                pieces.push(piece);
                rest = &tail[end + 1..];
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        Ok(Template { text: text.to_string(), pieces })
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether it names the user (and so needs identity configured).
    pub fn needs_user(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::User | Piece::UserDns))
    }

    /// The value for `cx`; `Err` names what is missing (a user, a kernelspec).
    pub fn render(&self, cx: Context<'_>) -> Result<String, &'static str> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::User => out.push_str(cx.user.ok_or("no user")?),
                Piece::UserDns => out.push_str(&user_dns(cx.user.ok_or("no user")?)),
                Piece::Kernelspec => out.push_str(cx.kernelspec.ok_or("no kernelspec")?),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One `set_envs` entry: the variable, its template, and the scope that sets it (`global`,
/// `kernelspec:K`, `user:NAME`, `group:NAME`), which audit records name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetEnv {
    pub name: String,
    pub template: Template,
    pub scope: Arc<str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_trimmed_deduplicated_and_in_order() {
        assert_eq!(groups_from_header([" b, a ,,b", "c,a"]), ["b", "a", "c"]);
        assert!(groups_from_header([" , "]).is_empty());
        assert!(groups_from_header([]).is_empty());
    }

    #[test]
    fn audit_groups_are_bounded() {
        let who = Who {
            user: "u".into(),
            groups: (0..100).map(|i| format!("{i}{}", "é".repeat(100))).collect(),
            source: IdentitySource::Header,
        };
        let g: Vec<&str> = who.audit_groups().collect();
        assert_eq!(g.len(), AUDIT_GROUPS);
        assert!(g.iter().all(|g| g.len() <= AUDIT_GROUP_BYTES && g.starts_with(char::is_numeric)));
    }

    #[test]
    fn a_valid_label_is_kept_and_anything_else_gets_a_hash() {
        for ok in ["alice", "bob-smith", "a", "x1", &"a".repeat(63)] {
            assert_eq!(user_dns(ok), ok);
        }
        let out = user_dns("Alice.Smith@corp");
        assert!(out.starts_with("alice-smith-corp-"), "{out}");
        assert_eq!(out.len(), "alice-smith-corp-".len() + HASH_CHARS);
        // Distinct names that lower-case or punctuate alike stay apart.
        assert_ne!(user_dns("Alice"), user_dns("alice"));
        assert_ne!(user_dns("a.b"), user_dns("a_b"));
        assert_ne!(user_dns("a.b"), user_dns("a-b"));
        // A valid name shaped like a hashed one is hashed too, so it cannot take another's label.
        let taken = user_dns("Alice.Smith@corp");
        assert_ne!(user_dns(&taken), taken);
        // Deterministic, and always a label.
        assert_eq!(user_dns("Alice.Smith@corp"), out);
        for u in ["", "-", "@@@", "ÄÖÜ", &"X".repeat(300), "-a-", "a--b", "1", "日本"] {
            let l = user_dns(u);
            assert!(is_dns_label(&l), "{u:?} -> {l:?}");
        }
    }

    #[test]
    fn base32_matches_rfc_4648() {
        assert_eq!(base32_lower(b""), "");
        assert_eq!(base32_lower(b"f"), "my");
        assert_eq!(base32_lower(b"foobar"), "mzxw6ytboi");
    }

    #[test]
    fn templates_render_their_placeholders() {
        let t = Template::parse("jupyter-{user_dns}/{kernelspec}:{user}{{x}}").unwrap();
        let cx = Context { user: Some("Bob"), kernelspec: Some("spark") };
        assert_eq!(t.render(cx).unwrap(), format!("jupyter-{}/spark:Bob{{x}}", user_dns("Bob")));
        assert!(t.needs_user());
        assert!(!Template::parse("plain").unwrap().needs_user());
        assert_eq!(t.render(Context { user: None, kernelspec: Some("k") }), Err("no user"));
        let k = Template::parse("{kernelspec}").unwrap();
        assert_eq!(k.render(Context { user: None, kernelspec: None }), Err("no kernelspec"));
        for bad in ["{usr}", "{user", "a}b", "{}", "{ user }"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Template::parse("").unwrap().render(cx).unwrap(), "");
    }
}
