//! `envgate explain`: for each variable name, kept or rejected for a kernelspec (and an identity),
//! and the source or rule that decided (for a denied name, whose `deny_envs`); which blocks apply,
//! whether the identity may start the kernelspec, and which `set_envs` apply, each checked against
//! the value rules. It runs [`View::verdict`] over a [`SpecIndex`], exactly as the proxy does.
//!
//! Given values or a whole body, [`dry_run`] runs [`decide::kernel_start`], the function the proxy
//! runs for every kernel start, and says what envgate would forward, refuse and audit. Only where
//! the kernelspecs come from differs (a file, or one fetch).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use http::StatusCode;
use serde::Serialize;

use crate::audit::{Event, Outcome, Record};
use crate::config::{Config, IdentityFrom};
use crate::decide::{self, Binding, UserSource};
use crate::identity::{self, IdentitySource, Who};
use crate::json::write_str;
use crate::jwt::JwtError;
use crate::policy::{Policy, Verdict, View};
use crate::rewrite::kernelspecs::{self, SpecIndex};
use crate::rewrite::start::ParseError;
use crate::routes::Routes;
use crate::upstream::{SpecCache, Upstream};
use crate::wire;

/// The verdict on one name.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    /// `kept` or `rejected`.
    pub verdict: &'static str,
    /// The source that kept it, or the reason it was rejected.
    pub by: String,
    /// For a name rejected as `denied`: whose `deny_envs` holds it (`global` or a block's label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<String>,
}

/// The verdicts on every name for one kernelspec.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub kernelspec: Option<String>,
    /// Whether the upstream serves that kernelspec (if not, only config sources apply).
    pub served: bool,
    /// The identity decided for, if any.
    pub user: Option<String>,
    pub groups: Vec<String>,
    /// The `[users.NAME]` / `[groups.NAME]` blocks that apply, in precedence order.
    pub blocks: Vec<String>,
    /// Whether the identity may start the kernelspec; `Some(block)`: the block that forbids it.
    pub refused_by: Option<String>,
    /// What the policy would inject as `spec.metadata.client_envs` for it.
    pub client_envs: Vec<String>,
    /// The values envgate would set, and the scope each comes from.
    pub set_envs: Vec<SetLine>,
    pub names: Vec<Line>,
}

/// One `set_envs` value.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SetLine {
    pub name: String,
    /// The rendered value, or why it cannot be rendered.
    pub value: Result<String, String>,
    pub scope: String,
    /// The value rule the rendered value breaks (the proxy then refuses every start that sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaks: Option<String>,
}

/// The identity to explain for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asking<'a> {
    pub user: Option<&'a str>,
    pub groups: &'a [String],
}

/// Explains `names` for `kernelspec` (or the upstream's default), without identity.
pub fn explain(policy: &Policy, index: &SpecIndex, kernelspec: Option<&str>, names: &[String]) -> Explanation {
    explain_for(policy, index, kernelspec, Asking::default(), names)
}

/// Explains `names` for `kernelspec` (or the upstream's default) and the identity `who`.
pub fn explain_for(
    policy: &Policy,
    index: &SpecIndex,
    kernelspec: Option<&str>,
    who: Asking<'_>,
    names: &[String],
) -> Explanation {
    let (k, facts) = index.resolve(kernelspec);
    let view: View<'_> = policy.view(who.user, who.groups);
    let lines = names
        .iter()
        .map(|n| match view.verdict(k.as_deref(), facts, n) {
            Verdict::Keep(s) => Line { name: n.clone(), verdict: "kept", by: s.as_str().to_string(), denied_by: None },
            Verdict::Reject(r) => Line {
                name: n.clone(),
                verdict: "rejected",
                by: r.as_str().to_string(),
                denied_by: view.denied_by(n).map(str::to_string),
            },
        })
        .collect();
    let lower = k.as_deref().map(str::to_ascii_lowercase);
    let cx = crate::identity::Context { user: who.user, kernelspec: lower.as_deref() };
    let set_envs = view
        .set_envs(k.as_deref())
        .into_iter()
        .map(|s| {
            let value = s.template.render(cx).map_err(str::to_string);
            let breaks = value.as_ref().ok().and_then(|v| view.check_value(&s.name, v)).map(|v| v.to_string());
            SetLine { name: s.name.clone(), value, scope: s.scope.to_string(), breaks }
        })
        .collect();
    Explanation {
        client_envs: view.allowed_names(k.as_deref(), facts),
        served: facts.is_some(),
        user: who.user.map(str::to_string),
        groups: who.groups.to_vec(),
        blocks: view.blocks.iter().map(|b| b.label.to_string()).collect(),
        refused_by: view.may_start(k.as_deref()).err().map(str::to_string),
        set_envs,
        kernelspec: k,
        names: lines,
    }
}

impl Explanation {
    /// Takes the dry run's verdicts on the names it decided: where the proxy kept a name it wrote
    /// itself (the bound `KERNEL_USERNAME`), the source is the identity's, not a name rule's.
    pub fn adopt(&mut self, dry: &DryRun) {
        let kept = dry.audit["kept"].as_array().map(Vec::as_slice).unwrap_or_default();
        let set = dry.audit["set_envs"].as_array().map(Vec::as_slice).unwrap_or_default();
        let source = |list: &[serde_json::Value], name: &str| {
            list.iter().find(|k| k["name"] == name).and_then(|k| k["source"].as_str()).map(str::to_string)
        };
        for l in &mut self.names {
            // A name set_envs sets is envgate's value, whatever the rules say of the client's.
            if let Some(scope) = source(set, &l.name) {
                l.verdict = "set";
                l.by = format!("set_envs of {scope}");
                l.denied_by = None;
            } else if let Some(by) = source(kept, &l.name) {
                l.verdict = "kept";
                l.by = by;
                l.denied_by = None;
            }
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = match &self.kernelspec {
            Some(k) if self.served => format!("kernelspec {k:?}\n"),
            Some(k) => format!("kernelspec {k:?} (not served by the upstream: config sources only)\n"),
            None => "no kernelspec (no name given and no upstream default): config sources only\n".to_string(),
        };
        if self.user.is_some() || !self.groups.is_empty() {
            out.push_str(&format!(
                "identity: user {:?}, groups {:?}\n",
                self.user.as_deref().unwrap_or(""),
                self.groups
            ));
            match self.blocks.as_slice() {
                [] => out.push_str("blocks that apply: none\n"),
                b => out.push_str(&format!("blocks that apply, in order: {}\n", b.join(", "))),
            }
        }
        if let Some(b) = &self.refused_by {
            out.push_str(&format!("may start this kernelspec: no ({b} does not list it)\n"));
        }
        out.push_str(&format!("client_envs = {:?}\n", self.client_envs));
        for s in &self.set_envs {
            match &s.value {
                Ok(v) => match &s.breaks {
                    None => out.push_str(&format!("set {} = {v:?}  ({})\n", s.name, s.scope)),
                    Some(b) => out.push_str(&format!(
                        "set {} = {v:?}  ({}) breaks a value rule: {b}; every start it applies to is refused\n",
                        s.name, s.scope
                    )),
                },
                Err(why) => out.push_str(&format!("set {}: cannot be rendered ({why})  ({})\n", s.name, s.scope)),
            }
        }
        let w = self.names.iter().map(|l| l.name.len()).max().unwrap_or(0);
        for l in &self.names {
            match &l.denied_by {
                Some(d) => out.push_str(&format!("{:<w$}  {:<8}  {} (deny_envs of {d})\n", l.name, l.verdict, l.by)),
                None => out.push_str(&format!("{:<w$}  {:<8}  {}\n", l.name, l.verdict, l.by)),
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// A whole kernel start, dry-run through the proxy's own steps.

/// The audit record's placeholders: what only a real request has.
pub const PLACEHOLDER_ID: &str = "00000000-00000000";
pub const PLACEHOLDER_TIME: &str = "1970-01-01T00:00:00.000Z";
pub const PLACEHOLDER_CLIENT: &str = "0.0.0.0:0";

/// Why a dry run stops short of the upstream: what the proxy answers instead.
#[derive(Debug)]
pub enum Stop {
    /// The body did not pass the strict parse (400).
    Parse(ParseError),
    /// Identity binding or the policy refused.
    Decided(decide::Refusal),
    /// Refused before the body is decided on: no identity, a body over `max_body_bytes`.
    Early { status: StatusCode, message: String, why: String },
}

impl From<ParseError> for Stop {
    fn from(e: ParseError) -> Stop {
        Stop::Parse(e)
    }
}

impl From<decide::Refusal> for Stop {
    fn from(r: decide::Refusal) -> Stop {
        Stop::Decided(r)
    }
}

impl Stop {
    /// The status and the JSON error body the client would get, and the audit record's `error`:
    /// as the proxy answers the same refusal.
    fn answer(&self) -> (StatusCode, Vec<u8>, String) {
        match self {
            Stop::Parse(e) => (
                StatusCode::BAD_REQUEST,
                wire::error_body::<()>(StatusCode::BAD_REQUEST, &e.to_string(), None),
                e.to_string(),
            ),
            Stop::Decided(r) => {
                let extra = r.extra.as_object().filter(|o| !o.is_empty()).cloned();
                (r.status, wire::error_body(r.status, &r.message, extra), r.why.to_string())
            }
            Stop::Early { status, message, why } => {
                (*status, wire::error_body::<()>(*status, message, None), why.clone())
            }
        }
    }
}

/// What envgate would do with one kernel start.
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// `forwarded` or `refused`.
    pub outcome: &'static str,
    /// The body envgate would send upstream, byte for byte (when forwarded).
    pub forwarded_body: Option<String>,
    /// envgate's own status (when refused).
    pub status: Option<u16>,
    /// The JSON error the client would get (when refused).
    pub error_body: Option<serde_json::Value>,
    /// The audit record, with placeholders for what only a real request has (id, time, client)
    /// and no upstream status.
    pub audit: serde_json::Value,
}

/// The body of a kernel start holding `pairs` (`NAME=VALUE`) as its `env`, in their order, and
/// `kernelspec` as its `name`: what a client would send.
pub fn body_of(kernelspec: Option<&str>, pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = b"{".to_vec();
    if let Some(k) = kernelspec {
        out.extend_from_slice(b"\"name\":");
        write_str(&mut out, k);
        out.push(b',');
    }
    out.extend_from_slice(b"\"env\":{");
    for (i, (n, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, n);
        out.push(b':');
        write_str(&mut out, v);
    }
    out.extend_from_slice(b"}}");
    out
}

/// Whom the proxy would take a request for: the identity configured, read from `user` (which
/// plays the trusted user header, or the token's user claim) and `groups`; without identity
/// configured, nobody (the proxy applies no per-identity block). `Err`: the proxy's refusal of
/// a request without a user.
pub fn sender(config: &Config, user: Option<&str>, groups: &[String]) -> Result<Option<Who>, Stop> {
    let Some(identity) = &config.identity else { return Ok(None) };
    let source = match identity.from {
        IdentityFrom::Headers { .. } => IdentitySource::Header,
        IdentityFrom::Jwt(_) => IdentitySource::Jwt,
    };
    match (user.map(str::trim).filter(|u| !u.is_empty()), &identity.from) {
        (Some(u), from) => Ok(Some(Who {
            user: u.to_string(),
            // Without a groups header configured, the proxy sees no groups.
            groups: match from {
                IdentityFrom::Headers { groups: None, .. } => Vec::new(),
                _ => identity::groups_from_header(groups.iter().map(String::as_str)),
            },
            source,
        })),
        (None, IdentityFrom::Headers { user, .. }) => {
            Err(decide::trusted_user(user.as_str(), None).unwrap_err().into())
        }
        (None, IdentityFrom::Jwt(_)) => {
            let e = JwtError::Missing;
            Err(Stop::Early {
                status: StatusCode::UNAUTHORIZED,
                message: e.message(),
                why: format!("token {}", e.as_str()),
            })
        }
    }
}

/// Runs one kernel start's body through [`decide::kernel_start`], the function the proxy runs,
/// with `index` as the upstream's kernelspecs, for `who` (see [`sender`]).
pub fn dry_run(config: &Config, index: Arc<SpecIndex>, bytes: &[u8], who: Result<Option<Who>, Stop>) -> DryRun {
    let client: SocketAddr = PLACEHOLDER_CLIENT.parse().expect("a socket address");
    let hash = config.policy_hash();
    let mut rec = Record::new(PLACEHOLDER_ID, Event::KernelStart, config.policy.mode, client, None);
    rec.policy_hash = &hash;
    let mut body = None;
    let mut steps = decide::Steps::default();
    let who = match who {
        Ok(w) => w,
        Err(stop) => return finish(rec, Err(stop)),
    };
    if let Some(w) = &who {
        rec.user = Some(&w.user);
        rec.user_source = Some(match w.source {
            IdentitySource::Header => UserSource::TrustedHeader,
            IdentitySource::Jwt => UserSource::Jwt,
        });
        rec.groups = w.audit_groups().collect();
        rec.identity_source = Some(w.source);
    }
    if bytes.len() > config.max_body_bytes {
        let stop = Stop::Early {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the kernel start body is larger than the limit of {} bytes", config.max_body_bytes),
            why: "Payload Too Large".into(),
        };
        return finish(rec, Err(stop));
    }
    let asker = who.as_ref().map(|w| decide::Asker {
        who: w,
        binding: config.identity.as_ref().map(|i| Binding { header: i.named_by(), on_mismatch: i.on_mismatch }),
    });
    let run = decide::kernel_start::<Stop, _>(
        &config.policy,
        config.set_envs_mismatch,
        asker,
        bytes,
        &mut body,
        || std::future::ready(Ok(index)),
        &mut steps,
    );
    // Nothing in it waits: the kernelspecs are at hand.
    let result = match std::pin::pin!(run).poll(&mut Context::from_waker(&Waker::from(Arc::new(Noop)))) {
        Poll::Ready(r) => r,
        Poll::Pending => unreachable!("a dry run never waits"),
    };
    steps.write_to(&mut rec, who.is_some());
    finish(rec, result)
}

/// A waker for a future that never waits.
struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Ends the record as the proxy's one exit does, and puts in the placeholders.
fn finish(mut rec: Record<'_>, result: Result<Vec<u8>, Stop>) -> DryRun {
    let (outcome, forwarded_body, status, error_body, why) = match result {
        Ok(bytes) => (Outcome::Forwarded, Some(String::from_utf8_lossy(&bytes).into_owned()), None, None, None),
        Err(stop) => {
            let (status, body, why) = stop.answer();
            (Outcome::Refused, None, Some(status.as_u16()), serde_json::from_slice(&body).ok(), Some(why))
        }
    };
    rec.outcome = outcome;
    rec.status = status;
    let mut line = Vec::new();
    rec.write_json(&mut line);
    let mut audit: serde_json::Value = serde_json::from_slice(&line).expect("an audit record is JSON");
    if let Some(o) = audit.as_object_mut() {
        // The record's `error` (the record borrows its strings from a request this run has not).
        if let (Some(v), Some(why)) = (o.get_mut("error"), why) {
            *v = why.into();
        }
        if let Some(v) = o.get_mut("timestamp") {
            *v = PLACEHOLDER_TIME.into();
        }
    }
    DryRun { outcome: outcome.as_str(), forwarded_body, status, error_body, audit }
}

impl DryRun {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match (&self.forwarded_body, self.status) {
            (Some(b), _) => out.push_str(&format!("forwarded: envgate would send this body upstream:\n{b}\n")),
            (None, status) => {
                let status = status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::FORBIDDEN);
                out.push_str(&format!("refused: envgate would answer {status} with:\n"));
                let body = self.error_body.as_ref().map(|b| b.to_string()).unwrap_or_default();
                out.push_str(&format!("{body}\n"));
            }
        }
        out.push_str(&format!(
            "audit record (id {PLACEHOLDER_ID:?}, timestamp and client are placeholders; a forwarded start's status is the \
             upstream's):\n{}\n",
            self.audit
        ));
        out
    }
}

/// The kernelspecs from a file holding a `GET /api/kernelspecs` body.
pub fn index_from_file(path: &std::path::Path) -> Result<SpecIndex, String> {
    let body = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    kernelspecs::index(&body).map_err(|e| format!("{}: not a kernelspecs list: {e}", path.display()))
}

/// The kernelspecs fetched once from the configured upstream, the way the proxy fetches them.
pub async fn index_from_upstream(config: &Config, token: Option<&str>) -> Result<Arc<SpecIndex>, String> {
    let upstream = Upstream::new(config)?;
    let routes = Routes::new(&config.upstream.url.base);
    let mut headers = HeaderMap::new();
    if let Some(t) = token {
        let v = HeaderValue::from_str(&format!("token {t}")).map_err(|_| "the token is not a valid header value")?;
        headers.insert(AUTHORIZATION, v);
    }
    SpecCache::new(Duration::ZERO)
        .get(&upstream, routes.kernelspecs_path(), None, || headers)
        .await
        .map_err(|e| format!("cannot fetch kernelspecs from {}: {}", config.upstream.url, e.describe()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{NameSet, SpecFacts};
    use std::collections::HashMap;

    fn index() -> SpecIndex {
        SpecIndex {
            default: Some("py".into()),
            specs: HashMap::from([(
                "py".to_string(),
                SpecFacts { metadata_client_envs: NameSet::from(["META"]), ..SpecFacts::default() },
            )]),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn explains_each_name_with_its_source_or_reason() {
        let p = Policy { client_envs: NameSet::from(["FOO"]), ..Policy::default() };
        let e = explain(&p, &index(), None, &names(&["FOO", "META", "KERNEL_X", "PATH", "NOPE"]));
        assert_eq!(e.kernelspec.as_deref(), Some("py"));
        assert!(e.served);
        assert_eq!(e.client_envs, ["FOO", "META"]);
        let got: Vec<(&str, &str, &str)> =
            e.names.iter().map(|l| (l.name.as_str(), l.verdict, l.by.as_str())).collect();
        assert_eq!(
            got,
            [
                ("FOO", "kept", "config"),
                ("META", "kept", "kernelspec_metadata"),
                ("KERNEL_X", "kept", "prefix:KERNEL_"),
                ("PATH", "rejected", "denied"),
                ("NOPE", "rejected", "not_allowed"),
            ]
        );
        let text = e.to_text();
        assert!(text.contains("META      kept      kernelspec_metadata"), "{text}");
        let other = explain(&p, &index(), Some("r"), &names(&["META"]));
        assert!(!other.served);
        assert_eq!(other.names[0].verdict, "rejected");
        assert!(other.to_text().contains("not served"));
    }
}
