//! Everything envgate decides about one kernel start, from a parsed body: pure.
//!
//! The proxy reads and parses the body, learns the kernelspec from the upstream, then hands both
//! here and gets back either the exact bytes to forward or a refusal, plus what the audit record
//! needs. Keeping this out of the I/O shell is what lets the tests and the fuzzers check the
//! promise directly: whatever a client sends, what is forwarded re-parses, holds only names the
//! policy allows, and only values the value rules accept.
//!
//! Identity binding is decided here too, from the trusted header's value as the proxy read it:
//! [`trusted_user`] (before the body is read), then [`bind_user`] and [`user_of`] on the parsed
//! body, so that the same checks cover who the kernel runs as.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};

use crate::audit::{Record, SetName, ViolationName};
use crate::identity::{IdentitySource, Who};
use crate::policy::{Decision, Kept, Mode, Policy, SetValue, Source, SpecFacts, View};
use crate::rewrite::kernelspecs::SpecIndex;
use crate::rewrite::start::{self, ParseError, StartBody};
use crate::values::{self, PathRule, Violation};

/// The variable EG takes as the kernel's user.
pub const USERNAME: &str = "KERNEL_USERNAME";

/// A refusal: the status, the message and extra members of the JSON error, and a short reason
/// for the audit record. Names only, never a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// Extra members of the error body, e.g. `{"rejected": [...]}`.
    pub extra: Value,
    pub why: &'static str,
}

/// Forward these bytes (the whole new body), or refuse.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Forward(Vec<u8>),
    Refuse(Refusal),
}

/// What the `kernel_path` rule did to the body's `path` (in `report` mode: would have done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum PathAction {
    Refused,
    Stripped,
}

impl PathAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PathAction::Refused => "refused",
            PathAction::Stripped => "stripped",
        }
    }
}

/// Where the kernel's user (its `KERNEL_USERNAME`) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum UserSource {
    /// The client's own claim, not verified.
    Body,
    /// The header a trusted authenticating proxy set (identity binding).
    TrustedHeader,
    /// A verified token's user claim (identity binding).
    Jwt,
}

impl UserSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UserSource::Body => "body",
            UserSource::TrustedHeader => "trusted_header",
            UserSource::Jwt => "jwt",
        }
    }
}

/// The kernel's user, as the audit record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User<'a> {
    pub name: &'a str,
    pub source: UserSource,
}

/// What to do when a body's `KERNEL_USERNAME` differs from the trusted user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Refuse,
    Overwrite,
}

impl Mismatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Mismatch::Refuse => "refuse",
            Mismatch::Overwrite => "overwrite",
        }
    }
}

/// Identity binding's settings, as the decision needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    /// What names the user, for messages: the trusted header's name, or "the token".
    pub header: &'a str,
    /// What to do when the body's `KERNEL_USERNAME` names someone else.
    pub on_mismatch: Mismatch,
}

/// The user a trusted authenticating proxy named in the header `header`, from its value as
/// received (`None`: absent, or not text), surrounding whitespace trimmed. Without one, a
/// refusal (403): with identity binding on, no request goes on unnamed.
pub fn trusted_user<'v>(header: &str, value: Option<&'v str>) -> Result<&'v str, Refusal> {
    match value.map(str::trim) {
        Some(u) if !u.is_empty() => Ok(u),
        _ => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!("envgate requires the {header} header from the authenticating proxy"),
            extra: json!({}),
            why: "missing trusted user header",
        }),
    }
}

/// Makes `user` (the trusted header's) the body's `KERNEL_USERNAME`, whatever the body says: kept
/// when the body names the same user, added when it names none, and, when it names someone else,
/// overwritten or refused (403) as `binding.on_mismatch` says.
pub fn bind_user(body: &mut StartBody<'_>, user: &str, binding: Binding<'_>) -> Result<(), Refusal> {
    match body.env.iter_mut().find(|(k, _)| k == USERNAME) {
        Some((_, claimed)) if claimed == user => Ok(()),
        Some(_) if binding.on_mismatch == Mismatch::Refuse => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!("{USERNAME} in the request differs from the user named by {}", binding.header),
            extra: json!({}),
            why: "KERNEL_USERNAME differs from the trusted user",
        }),
        Some((_, claimed)) => {
            *claimed = Cow::Owned(user.to_string());
            Ok(())
        }
        None => {
            body.env.push((USERNAME.into(), Cow::Owned(user.to_string())));
            Ok(())
        }
    }
}

/// The user a kernel start names: the trusted header's (`trusted`) when identity binding is on,
/// else the body's `KERNEL_USERNAME` claim, if any.
pub fn user_of<'a>(body: &'a StartBody<'_>, trusted: Option<&'a str>) -> Option<User<'a>> {
    user_from(body, trusted.map(|t| (t, UserSource::TrustedHeader)))
}

/// [`user_of`], for a user bound from either identity source.
pub fn user_from<'a>(body: &'a StartBody<'_>, bound: Option<(&'a str, UserSource)>) -> Option<User<'a>> {
    match bound {
        Some((name, source)) => Some(User { name, source }),
        None => body.env.iter().find(|(k, _)| k == USERNAME).map(|(_, v)| User { name: v, source: UserSource::Body }),
    }
}

/// Refuses (403) a kernel start of a kernelspec the identity may not start.
pub fn may_start(view: &View<'_>, kernelspec: Option<&str>) -> Result<(), Refusal> {
    view.may_start(kernelspec).map_err(|block| Refusal {
        status: StatusCode::FORBIDDEN,
        message: match kernelspec {
            Some(k) => format!("envgate refused the kernel start: kernelspec {k:?} is not allowed for you ({block})"),
            None => format!(
                "envgate refused the kernel start: no kernelspec named and the gateway has no default; {block} \
                 allows only some kernelspecs"
            ),
        },
        extra: json!({"kernelspec": kernelspec}),
        why: "kernelspec not allowed",
    })
}

/// A `set_envs` value as an audit record names it: the variable and the scope that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied<'p> {
    pub name: &'p str,
    pub scope: &'p str,
}

/// Writes the `set_envs` values into the body: added where the body has none, kept where it
/// holds the same value, and, where it holds another, overwritten or refused (403) as
/// `on_mismatch` says. A refusal names the variables, never a value.
pub fn apply_set_envs<'p>(
    body: &mut StartBody<'_>,
    values: &[SetValue<'p>],
    on_mismatch: Mismatch,
) -> Result<Vec<Applied<'p>>, Refusal> {
    let differing: Vec<&str> = values
        .iter()
        .filter(|s| body.env.iter().any(|(k, v)| k == s.name && *v != s.value.as_str()))
        .map(|s| s.name)
        .collect();
    if !differing.is_empty() && on_mismatch == Mismatch::Refuse {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "envgate refused the kernel start: envgate sets {} from your identity (set_envs), and the request \
                 holds another value",
                differing.join(", ")
            ),
            extra: json!({"set_envs": differing}),
            why: "set_envs value differs",
        });
    }
    for s in values {
        match body.env.iter_mut().find(|(k, _)| k == s.name) {
            Some((_, v)) => {
                if *v != s.value.as_str() {
                    *v = Cow::Owned(s.value.clone());
                }
            }
            None => body.env.push((Cow::Owned(s.name.to_string()), Cow::Owned(s.value.clone()))),
        }
    }
    Ok(values.iter().map(|s| Applied { name: s.name, scope: s.scope }).collect())
}

/// The `set_envs` values for a kernel start, or a refusal (400) when a template needs what the
/// request does not tell (a kernelspec, when no name is given and the gateway has no default).
///
/// A rendered value must pass the value rules that apply to its name, in every mode (`report`
/// included): it is envgate's own value, and a template must never hand EG a value it would
/// mis-handle (a user name holding `$(...)`, say). The refusal names the variable and the rule,
/// never the value.
pub fn set_values<'p>(
    view: &View<'p>,
    kernelspec: Option<&str>,
    user: Option<&str>,
) -> Result<Vec<SetValue<'p>>, Refusal> {
    let values = view.set_values(kernelspec, user).map_err(|(name, missing)| Refusal {
        status: StatusCode::BAD_REQUEST,
        message: format!("envgate cannot set {name} (set_envs) for this kernel start: {missing}"),
        extra: json!({}),
        why: "set_envs cannot be rendered",
    })?;
    let violations: Vec<Violation> = values.iter().filter_map(|s| view.check_value(s.name, &s.value)).collect();
    if violations.is_empty() {
        return Ok(values);
    }
    let list: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    Err(Refusal {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "envgate refused the kernel start: values it sets from your identity (set_envs) break the value rules: {}",
            list.join(", ")
        ),
        extra: json!({
            "violations": violations.iter().map(|v| json!({"name": v.name, "rule": v.rule.as_str(), "detail": v.detail}))
                .collect::<Vec<_>>()
        }),
        why: "set_envs value breaks the value rules",
    })
}

/// What envgate itself wrote into the body before the decision, which the name rules do not
/// judge (its values still pass the value rules).
#[derive(Debug, Clone, Copy, Default)]
pub struct Written<'a> {
    /// `KERNEL_USERNAME` was bound from the identity, and from which source.
    pub user: Option<UserSource>,
    /// The `set_envs` values.
    pub set: &'a [SetValue<'a>],
}

/// The outcome of one kernel start.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'a> {
    /// The verdict on every name (borrowing the body's names).
    pub decision: Decision<'a>,
    /// Kept values (in `report` mode: values `drop` would forward) that broke a value rule.
    pub violations: Vec<Violation>,
    /// What the `kernel_path` rule did to the body's `path`; `None` when it let the path through.
    pub path: Option<PathAction>,
    pub verdict: Verdict,
}

/// Decides one kernel start. `trusted_user`: the body's `KERNEL_USERNAME` was set from a
/// trusted header (identity binding), so it is kept whatever the name rules say (its value still
/// passes the value rules).
pub fn decide<'b>(
    policy: &Policy,
    kernelspec: Option<&str>,
    facts: Option<&SpecFacts>,
    body: &'b StartBody<'_>,
    trusted_user: bool,
) -> Plan<'b> {
    let written = Written { user: trusted_user.then_some(UserSource::TrustedHeader), set: &[] };
    decide_for(&policy.anonymous(), kernelspec, facts, body, written)
}

/// Decides one kernel start for one identity's view of the policy. What envgate wrote itself
/// (`written`: the bound `KERNEL_USERNAME`, the `set_envs` values) is kept whatever the name
/// rules say; its values still pass the value rules.
pub fn decide_for<'b>(
    view: &View<'_>,
    kernelspec: Option<&str>,
    facts: Option<&SpecFacts>,
    body: &'b StartBody<'_>,
    written: Written<'_>,
) -> Plan<'b> {
    let policy = view.policy;
    let trusted = |k: &str| (written.user.is_some() && k == USERNAME) || written.set.iter().any(|s| s.name == k);
    let names = body.env.iter().map(|(k, _)| &**k).filter(|k| !trusted(k));
    // Whether each of body.env is kept, by position (names are unique; a lookup by name per
    // name would be quadratic).
    let mut verdicts = Vec::with_capacity(body.env.len());
    let mut decision = view.decide_each(kernelspec, facts, names, |k| verdicts.push(k));
    let mut verdicts = verdicts.into_iter();
    let keep: Vec<bool> = body.env.iter().map(|(k, _)| trusted(k) || verdicts.next().unwrap_or(false)).collect();
    match written.user {
        Some(UserSource::Jwt) => decision.kept.push(Kept { name: USERNAME, source: Source::Jwt }),
        Some(_) => decision.kept.push(Kept { name: USERNAME, source: Source::TrustedHeader }),
        None => {}
    }
    let violations = view.check_all(body.env.iter().zip(&keep).filter(|(_, k)| **k).map(|((n, v), _)| (&**n, &**v)));
    let path_escapes =
        policy.kernel_path != PathRule::Keep && body.path().is_some_and(|p| values::path_escapes(p.as_deref()));
    let path = path_escapes.then_some(if policy.kernel_path == PathRule::Strip {
        PathAction::Stripped
    } else {
        PathAction::Refused
    });

    let refusal = if policy.mode == Mode::Report {
        None
    } else if policy.mode == Mode::Reject && !decision.rejected.is_empty() {
        let names: Vec<String> =
            decision.rejected.iter().map(|r| format!("{} ({})", r.name, r.reason.as_str())).collect();
        Some(Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "envgate refused the kernel start: environment variables not allowed: {}",
                names.join(", ")
            ),
            extra: json!({
                "rejected": decision.rejected.iter().map(|r| json!({"name": r.name, "reason": r.reason.as_str()}))
                    .collect::<Vec<_>>()
            }),
            why: "policy",
        })
    } else if !violations.is_empty() {
        let list: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
        Some(Refusal {
            status: StatusCode::BAD_REQUEST,
            message: format!("envgate refused the kernel start: values break the value rules: {}", list.join(", ")),
            extra: json!({
                "violations": violations.iter().map(|v| json!({"name": v.name, "rule": v.rule.as_str(), "detail": v.detail}))
                    .collect::<Vec<_>>()
            }),
            why: "value rules",
        })
    } else if path == Some(PathAction::Refused) {
        Some(Refusal {
            status: StatusCode::BAD_REQUEST,
            message: "envgate refused the kernel start: \"path\" must be a relative path inside the gateway's root \
                      (no leading / or ~, no .. segment, no backslash)"
                .to_string(),
            extra: json!({}),
            why: "path escapes the root",
        })
    } else {
        None
    };
    let verdict = match (refusal, policy.mode) {
        (Some(r), _) => Verdict::Refuse(r),
        (None, Mode::Report) => Verdict::Forward(body.render(|_| true)),
        (None, _) => Verdict::Forward(body.render_kept(&keep, path_escapes)),
    };
    Plan { decision, violations, path, verdict }
}

/// Who a kernel start is for, as the proxy learnt it: the identity (when identity is configured)
/// and how its user is bound into the body.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub who: &'a Who,
    /// Identity binding's settings; `None`: the body's `KERNEL_USERNAME` is left as sent.
    pub binding: Option<Binding<'a>>,
}

/// What one kernel start's steps leave behind for its audit record, filled in as far as the
/// steps got (a refusal stops them): see [`kernel_start`].
#[derive(Debug, Default)]
pub struct Steps<'a> {
    /// The body's `KERNEL_USERNAME` claim, without identity (set once the body parsed).
    pub claimed: Option<String>,
    /// The kernelspec decided for (set once the kernelspecs are known).
    pub kernelspec: Option<String>,
    /// The `set_envs` values written (set once they are written).
    pub set_envs: Vec<Applied<'a>>,
    /// The verdict on every name (set once the decision is made).
    pub decision: Option<Decision<'a>>,
    pub violations: Vec<Violation>,
    pub path: Option<PathAction>,
}

impl<'a> Steps<'a> {
    /// Writes what the steps decided into the kernel start's audit record. `identified`: the
    /// record already names the identity's user (else it names the body's claim, if any).
    pub fn write_to(&'a self, rec: &mut Record<'a>, identified: bool) {
        if !identified {
            rec.user = self.claimed.as_deref();
            rec.user_source = self.claimed.as_ref().map(|_| UserSource::Body);
        }
        rec.kernelspec = self.kernelspec.as_deref();
        rec.set_envs = self.set_envs.iter().map(|a| SetName { name: a.name, source: a.scope }).collect();
        if let Some(d) = &self.decision {
            rec.set_decision(d);
        }
        rec.violations =
            self.violations.iter().map(|v| ViolationName { name: &v.name, rule: v.rule.as_str() }).collect();
        rec.path = self.path;
    }
}

/// One kernel start, from the body's bytes to the bytes to forward, in the proxy's order:
/// parse, bind the identity's user, learn the kernelspecs (`specs`, the one step that may do
/// I/O, and only after binding: a refused binding never reaches the upstream), whether the
/// identity may start the kernelspec, render and write the `set_envs` values, then the
/// decision on names, values and `path`. The proxy and `envgate explain` both run this, so
/// that explain shows exactly what the proxy does. `steps` says what was decided, for the audit
/// record, even when the start is refused.
#[allow(clippy::too_many_arguments)]
pub async fn kernel_start<'a, E, Fut>(
    policy: &'a Policy,
    set_envs_mismatch: Mismatch,
    asker: Option<Asker<'a>>,
    bytes: &'a [u8],
    body: &'a mut Option<StartBody<'a>>,
    specs: impl FnOnce() -> Fut,
    steps: &mut Steps<'a>,
) -> Result<Vec<u8>, E>
where
    E: From<Refusal> + From<ParseError>,
    Fut: Future<Output = Result<Arc<SpecIndex>, E>>,
{
    let parsed = body.insert(start::parse(bytes)?);
    match asker {
        None => steps.claimed = user_of(parsed, None).map(|u| u.name.to_string()),
        // Identity binding: the identity's user is the kernel's KERNEL_USERNAME, whatever the body says.
        Some(Asker { who, binding: Some(binding) }) => bind_user(parsed, &who.user, binding)?,
        Some(_) => {}
    }
    let index = specs().await?;
    let (name, facts) = index.resolve(parsed.name.as_deref());
    steps.kernelspec = name;
    let kernelspec = steps.kernelspec.as_deref();
    let view = match asker {
        Some(a) => policy.view(Some(&a.who.user), &a.who.groups),
        None => policy.anonymous(),
    };
    may_start(&view, kernelspec)?;
    let set = set_values(&view, kernelspec, asker.map(|a| a.who.user.as_str()))?;
    steps.set_envs = apply_set_envs(parsed, &set, set_envs_mismatch)?;
    let parsed: &'a StartBody<'a> = parsed;
    let user = asker.map(|a| match a.who.source {
        IdentitySource::Header => UserSource::TrustedHeader,
        IdentitySource::Jwt => UserSource::Jwt,
    });
    let plan = decide_for(&view, kernelspec, facts, parsed, Written { user, set: &set });
    steps.decision = Some(plan.decision);
    steps.violations = plan.violations;
    steps.path = plan.path;
    match plan.verdict {
        Verdict::Forward(bytes) => Ok(bytes),
        Verdict::Refuse(r) => Err(r.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::start::parse;
    use crate::values::Rule;

    fn policy(mode: Mode) -> Policy {
        Policy { mode, client_envs: ["FOO".to_string()].into(), ..Policy::default() }
    }

    /// Decides `body`; the test's bodies live for the whole test run.
    fn run(p: &Policy, body: &str) -> Plan<'static> {
        let body: &'static str = Box::leak(body.to_string().into_boxed_str());
        decide(p, Some("python3"), None, Box::leak(Box::new(parse(body.as_bytes()).unwrap())), false)
    }

    fn forwarded(plan: &Plan) -> Value {
        match &plan.verdict {
            Verdict::Forward(b) => serde_json::from_slice(b).expect("forwarded body re-parses"),
            Verdict::Refuse(r) => panic!("refused: {r:?}"),
        }
    }

    fn refusal<'p>(plan: &'p Plan<'_>) -> &'p Refusal {
        match &plan.verdict {
            Verdict::Refuse(r) => r,
            Verdict::Forward(b) => panic!("forwarded {}", String::from_utf8_lossy(b)),
        }
    }

    const BODY: &str = r#"{"name":"python3","env":{"FOO":"1","BAR":"2","KERNEL_X":"3","PATH":"/x"},"path":"nb"}"#;

    #[test]
    fn drop_forwards_only_kept_names() {
        let plan = run(&policy(Mode::Drop), BODY);
        assert_eq!(forwarded(&plan), json!({"name":"python3","env":{"FOO":"1","KERNEL_X":"3"},"path":"nb"}));
        assert_eq!(plan.decision.rejected.len(), 2);
        assert!(plan.violations.is_empty() && plan.path.is_none());
    }

    #[test]
    fn reject_refuses_with_the_names_and_reasons() {
        let r = refusal(&run(&policy(Mode::Reject), BODY)).clone();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(
            r.extra,
            json!({"rejected":[{"name":"BAR","reason":"not_allowed"},{"name":"PATH","reason":"denied"}]})
        );
        assert!(r.message.contains("BAR (not_allowed)"), "{}", r.message);
        // nothing to reject: forwarded
        let plan = run(&policy(Mode::Reject), r#"{"env":{"FOO":"1"}}"#);
        assert_eq!(forwarded(&plan), json!({"env":{"FOO":"1"}}));
    }

    #[test]
    fn report_forwards_as_sent_and_says_what_drop_would_do() {
        let body = r#"{"env":{"FOO":"$(id)","BAR":"2"},"path":"../x"}"#;
        let plan = run(&policy(Mode::Report), body);
        assert_eq!(forwarded(&plan), json!({"env":{"FOO":"$(id)","BAR":"2"},"path":"../x"}));
        assert_eq!(plan.violations.len(), 1);
        assert_eq!(plan.path, Some(PathAction::Refused));
        assert_eq!(plan.decision.rejected.len(), 1);
    }

    #[test]
    fn value_rules_refuse_kept_values_only() {
        let plan = run(&policy(Mode::Drop), r#"{"env":{"FOO":"a`b`","BAR":"$(id)"}}"#);
        let r = refusal(&plan);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.extra["violations"][0]["name"], "FOO");
        assert_eq!(r.extra["violations"][0]["rule"], "forbidden");
        assert!(!r.message.contains("a`b`"), "{}", r.message);
        assert_eq!(plan.violations.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::Forbidden]);
        // BAR is dropped, so its value does not matter
        let plan = run(&policy(Mode::Drop), r#"{"env":{"FOO":"ok","BAR":"$(id)"}}"#);
        assert_eq!(forwarded(&plan), json!({"env":{"FOO":"ok"}}));
    }

    #[test]
    fn reject_mode_reports_names_before_values() {
        let plan = run(&policy(Mode::Reject), r#"{"env":{"FOO":"$x","BAR":"1"}}"#);
        assert_eq!(refusal(&plan).status, StatusCode::FORBIDDEN);
        let plan = run(&policy(Mode::Reject), r#"{"env":{"FOO":"$x"}}"#);
        assert_eq!(refusal(&plan).status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn path_rules() {
        let mut p = policy(Mode::Drop);
        let body = r#"{"name":"python3","path":"../../tmp","env":{}}"#;
        let plan = run(&p, body);
        assert_eq!(refusal(&plan).status, StatusCode::BAD_REQUEST);
        assert_eq!(plan.path, Some(PathAction::Refused));
        p.kernel_path = PathRule::Strip;
        let plan = run(&p, body);
        assert_eq!(forwarded(&plan), json!({"name":"python3","env":{}}));
        assert_eq!(plan.path, Some(PathAction::Stripped));
        p.kernel_path = PathRule::Keep;
        let plan = run(&p, body);
        assert_eq!(forwarded(&plan)["path"], "../../tmp");
        assert_eq!(plan.path, None);
        // a path inside the root, and no path at all, pass under every rule
        for rule in [PathRule::RefuseEscape, PathRule::Strip] {
            p.kernel_path = rule;
            assert_eq!(forwarded(&run(&p, r#"{"path":"a/b","env":{}}"#))["path"], "a/b");
            assert_eq!(run(&p, r#"{"path":null}"#).path, None);
            assert_eq!(
                run(&p, r#"{"path":{"a":1}}"#).path,
                Some(if rule == PathRule::Strip { PathAction::Stripped } else { PathAction::Refused })
            );
        }
    }

    #[test]
    fn a_trusted_user_is_kept_but_its_value_still_checked() {
        let mut p = policy(Mode::Reject);
        p.prefixes.clear(); // KERNEL_USERNAME would be rejected by name
        let b = parse(br#"{"env":{"KERNEL_USERNAME":"alice"}}"#).unwrap();
        let plan = decide(&p, None, None, &b, true);
        assert_eq!(forwarded(&plan), json!({"env":{"KERNEL_USERNAME":"alice"}}));
        assert_eq!(plan.decision.kept[0].source, Source::TrustedHeader);
        let b = parse(br#"{"env":{"KERNEL_USERNAME":"a;id"}}"#).unwrap();
        assert_eq!(refusal(&decide(&p, None, None, &b, true)).status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_trusted_header_must_name_someone() {
        assert_eq!(trusted_user("x-user", Some(" alice\t")), Ok("alice"));
        for v in [None, Some(""), Some("  ")] {
            let r = trusted_user("x-user", v).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            assert_eq!(r.message, "envgate requires the x-user header from the authenticating proxy");
            assert_eq!(r.why, "missing trusted user header");
        }
    }

    #[test]
    fn the_trusted_user_is_the_kernels_user() {
        let binding = |on_mismatch| Binding { header: "x-user", on_mismatch };
        let env = |b: &StartBody<'_>| b.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        for m in [Mismatch::Refuse, Mismatch::Overwrite] {
            // the same user: kept as sent
            let mut b = parse(br#"{"env":{"KERNEL_USERNAME":"alice","A":"1"}}"#).unwrap();
            assert_eq!(bind_user(&mut b, "alice", binding(m)), Ok(()));
            assert_eq!(env(&b), ["KERNEL_USERNAME=alice", "A=1"]);
            // none: added last
            let mut b = parse(br#"{"env":{"A":"1"}}"#).unwrap();
            assert_eq!(bind_user(&mut b, "alice", binding(m)), Ok(()));
            assert_eq!(env(&b), ["A=1", "KERNEL_USERNAME=alice"]);
        }
        // someone else: refused, or overwritten in its place
        let mut b = parse(br#"{"env":{"KERNEL_USERNAME":"bob","A":"1"}}"#).unwrap();
        let r = bind_user(&mut b, "alice", binding(Mismatch::Refuse)).unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.message, "KERNEL_USERNAME in the request differs from the user named by x-user");
        assert_eq!(r.why, "KERNEL_USERNAME differs from the trusted user");
        assert_eq!(bind_user(&mut b, "alice", binding(Mismatch::Overwrite)), Ok(()));
        assert_eq!(env(&b), ["KERNEL_USERNAME=alice", "A=1"]);
        // who the record names
        assert_eq!(user_of(&b, Some("alice")), Some(User { name: "alice", source: UserSource::TrustedHeader }));
        let b = parse(br#"{"env":{"KERNEL_USERNAME":"bob"}}"#).unwrap();
        assert_eq!(user_of(&b, None), Some(User { name: "bob", source: UserSource::Body }));
        assert_eq!(user_of(&parse(b"{}").unwrap(), None), None);
    }

    #[test]
    fn no_env_gets_an_empty_env() {
        assert_eq!(forwarded(&run(&policy(Mode::Drop), r#"{"name":"python3"}"#)), json!({"name":"python3","env":{}}));
    }

    fn set_value<'p>(name: &'p str, value: &str) -> SetValue<'p> {
        SetValue { name, value: value.to_string(), scope: "global" }
    }

    #[test]
    fn set_envs_are_added_kept_overwritten_or_refused() {
        let env = |b: &StartBody<'_>| b.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        let sets = [set_value("KERNEL_NAMESPACE", "ns-a"), set_value("KERNEL_IMAGE", "img")];
        let mut b = parse(br#"{"env":{"KERNEL_IMAGE":"img","A":"1"}}"#).unwrap();
        let applied = apply_set_envs(&mut b, &sets, Mismatch::Refuse).unwrap();
        assert_eq!(env(&b), ["KERNEL_IMAGE=img", "A=1", "KERNEL_NAMESPACE=ns-a"]);
        assert_eq!(
            applied,
            [Applied { name: "KERNEL_NAMESPACE", scope: "global" }, Applied { name: "KERNEL_IMAGE", scope: "global" }]
        );
        let mut b = parse(br#"{"env":{"KERNEL_IMAGE":"evil/img","KERNEL_NAMESPACE":"kube-system"}}"#).unwrap();
        let r = apply_set_envs(&mut b, &sets, Mismatch::Refuse).unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.extra, json!({"set_envs": ["KERNEL_NAMESPACE", "KERNEL_IMAGE"]}));
        assert!(
            !r.message.contains("evil") && !r.message.contains("kube-system") && !r.message.contains("ns-a"),
            "{}",
            r.message
        );
        assert_eq!(env(&b), ["KERNEL_IMAGE=evil/img", "KERNEL_NAMESPACE=kube-system"], "a refusal changes nothing");
        apply_set_envs(&mut b, &sets, Mismatch::Overwrite).unwrap();
        assert_eq!(env(&b), ["KERNEL_IMAGE=img", "KERNEL_NAMESPACE=ns-a"]);
    }

    #[test]
    fn set_values_are_kept_whatever_the_name_rules_say_but_pass_the_value_rules() {
        let mut p = policy(Mode::Reject);
        p.prefixes.clear();
        let sets = [set_value("KERNEL_NAMESPACE", "ns-a")];
        let b = parse(br#"{"env":{"KERNEL_NAMESPACE":"ns-a","FOO":"1"}}"#).unwrap();
        let plan = decide_for(&p.anonymous(), None, None, &b, Written { user: None, set: &sets });
        assert_eq!(forwarded(&plan), json!({"env":{"KERNEL_NAMESPACE":"ns-a","FOO":"1"}}));
        assert!(plan.decision.kept.iter().all(|k| k.name != "KERNEL_NAMESPACE"), "set names are not the client's");
        let sets = [set_value("KERNEL_NAMESPACE", "Not_A_Label")];
        let b = parse(br#"{"env":{"KERNEL_NAMESPACE":"Not_A_Label"}}"#).unwrap();
        let plan = decide_for(&p.anonymous(), None, None, &b, Written { user: None, set: &sets });
        let r = refusal(&plan);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.extra["violations"][0]["name"], "KERNEL_NAMESPACE");
        assert!(!r.message.contains("Not_A_Label"), "{}", r.message);
        // A user bound from a token is kept with that source.
        let b = parse(br#"{"env":{"KERNEL_USERNAME":"alice"}}"#).unwrap();
        let plan = decide_for(&p.anonymous(), None, None, &b, Written { user: Some(UserSource::Jwt), set: &[] });
        assert_eq!(plan.decision.kept[0].source, Source::Jwt);
    }

    #[test]
    fn a_kernelspec_the_identity_may_not_start_is_refused() {
        let mut p = policy(Mode::Drop);
        let mut b = crate::policy::Block::new("group:eng");
        b.kernelspecs = Some(["python3".to_string()].into());
        p.groups.insert("eng".into(), b);
        let view = p.view(Some("u"), &["eng".to_string()]);
        assert_eq!(may_start(&view, Some("python3")), Ok(()));
        let r = may_start(&view, Some("r")).unwrap_err();
        assert_eq!((r.status, r.why), (StatusCode::FORBIDDEN, "kernelspec not allowed"));
        assert_eq!(r.message, "envgate refused the kernel start: kernelspec \"r\" is not allowed for you (group:eng)");
        assert_eq!(may_start(&view, None).unwrap_err().status, StatusCode::FORBIDDEN);
        assert_eq!(may_start(&p.anonymous(), Some("r")), Ok(()));
        let r = set_values(&p.anonymous(), None, None);
        assert_eq!(r, Ok(vec![]));
    }

    #[test]
    fn a_set_value_that_breaks_the_value_rules_is_refused_in_every_mode() {
        for mode in [Mode::Drop, Mode::Reject, Mode::Report] {
            let mut p = policy(mode);
            let t = crate::identity::Template::parse("jupyter-{user}").unwrap();
            p.set_envs =
                vec![crate::identity::SetEnv { name: "KERNEL_NAMESPACE".into(), template: t, scope: "global".into() }];
            let r = set_values(&p.anonymous(), None, Some("bob$(id)")).unwrap_err();
            assert_eq!((r.status, r.why), (StatusCode::BAD_REQUEST, "set_envs value breaks the value rules"));
            assert_eq!(r.extra["violations"][0]["name"], "KERNEL_NAMESPACE");
            assert!(!r.message.contains("bob"), "{}", r.message);
            assert_eq!(set_values(&p.anonymous(), None, Some("bob")).unwrap()[0].value, "jupyter-bob");
        }
    }

    /// Runs [`kernel_start`] to its end (nothing in it waits when `specs` does not).
    fn start_now<'a>(
        policy: &'a Policy,
        asker: Option<Asker<'a>>,
        bytes: &'a [u8],
        body: &'a mut Option<StartBody<'a>>,
        fetched: &std::cell::Cell<u32>,
        steps: &mut Steps<'a>,
    ) -> Result<Vec<u8>, String> {
        #[derive(Debug)]
        struct E(String);
        impl From<Refusal> for E {
            fn from(r: Refusal) -> E {
                E(r.why.to_string())
            }
        }
        impl From<ParseError> for E {
            fn from(e: ParseError) -> E {
                E(format!("parse: {e}"))
            }
        }
        let index = Arc::new(SpecIndex { default: Some("python3".into()), specs: Default::default() });
        let specs = || {
            fetched.set(fetched.get() + 1);
            std::future::ready(Ok::<_, E>(index))
        };
        let run = kernel_start(policy, Mismatch::Refuse, asker, bytes, body, specs, steps);
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = std::task::Waker::from(Arc::new(Noop));
        match std::pin::pin!(run).poll(&mut std::task::Context::from_waker(&waker)) {
            std::task::Poll::Ready(r) => r.map_err(|e| e.0),
            std::task::Poll::Pending => panic!("nothing waits"),
        }
    }

    #[test]
    fn kernel_start_runs_the_steps_in_the_proxys_order() {
        let p = policy(Mode::Drop);
        let fetched = std::cell::Cell::new(0);
        // No identity: the claim is noted, the default kernelspec resolved, names decided.
        let (mut body, mut steps) = (None, Steps::default());
        let bytes = br#"{"env":{"FOO":"1","BAR":"2","KERNEL_USERNAME":"eve"}}"#;
        let sent = start_now(&p, None, bytes, &mut body, &fetched, &mut steps).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&sent).unwrap(), json!({"env":{"FOO":"1","KERNEL_USERNAME":"eve"}}));
        assert_eq!((steps.claimed.as_deref(), steps.kernelspec.as_deref()), (Some("eve"), Some("python3")));
        assert_eq!(steps.decision.as_ref().unwrap().rejected.len(), 1);
        assert_eq!(fetched.get(), 1);

        // A binding refused before the kernelspecs are fetched: nothing reaches the upstream.
        let who = Who { user: "bob".into(), groups: vec![], source: IdentitySource::Header };
        let binding = Some(Binding { header: "x-user", on_mismatch: Mismatch::Refuse });
        let (mut body, mut steps) = (None, Steps::default());
        let r = start_now(&p, Some(Asker { who: &who, binding }), bytes, &mut body, &fetched, &mut steps);
        assert_eq!(r, Err("KERNEL_USERNAME differs from the trusted user".to_string()));
        assert_eq!(fetched.get(), 1, "no fetch after a refused binding");
        assert!(steps.kernelspec.is_none() && steps.decision.is_none() && steps.claimed.is_none());

        // Bound: the identity's user is written and kept as the header's; a parse error stops first.
        let (mut body, mut steps) = (None, Steps::default());
        let empty = br#"{"env":{}}"#;
        let sent = start_now(&p, Some(Asker { who: &who, binding }), empty, &mut body, &fetched, &mut steps);
        assert_eq!(serde_json::from_slice::<Value>(&sent.unwrap()).unwrap(), json!({"env":{"KERNEL_USERNAME":"bob"}}));
        assert_eq!(steps.decision.as_ref().unwrap().kept[0].source, Source::TrustedHeader);
        let (mut body, mut steps) = (None, Steps::default());
        let r = start_now(&p, None, b"[]", &mut body, &fetched, &mut steps);
        assert!(r.unwrap_err().starts_with("parse: "));
        assert_eq!(fetched.get(), 2);
    }
}
