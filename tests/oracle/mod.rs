//! The promises the pure modules keep, as checks shared by `tests/properties.rs` (proptest) and
//! the cargo-fuzz targets in `fuzz/` (which include this file by path). Each check panics, with
//! the input, when a promise is broken.
//!
//! Where it can, a check compares against a model written here from the README's rules rather
//! than calling the code under test again: the names a policy allows, the value rules, the `path`
//! rule, what a kernelspec document must look like, and which paths normalize to a kernel route.

#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::BTreeSet;

use envgate::config::Mismatch;
use envgate::decide::{self, Binding, PathAction, Plan, User, UserSource, Verdict, USERNAME};
use envgate::policy::{self, Mode, NameSet, Policy, SpecFacts};
use envgate::rewrite::kernelspecs;
use envgate::rewrite::start::{self, ParseError, StartBody};
use envgate::routes::{Route, Routes};
use envgate::values::{self, PathRule};
use http::Method;
use serde_json::{Map, Value};

/// The marker that distinctive values carry: a refusal must never hold one (unless the same text
/// is also a name, which refusals do show).
pub const MARKER: &str = "s3cr3t";

fn show(input: &[u8]) -> String {
    let s = String::from_utf8_lossy(&input[..input.len().min(2000)]).into_owned();
    format!("{s:?}")
}

// ---------------------------------------------------------------------------------------------
// The policy, modelled.

/// Whether the policy lets a client send `name` for `kernelspec`: the README's rules, in order.
pub fn model_allows(p: &Policy, kernelspec: Option<&str>, facts: Option<&SpecFacts>, name: &str) -> bool {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return false;
    }
    if p.deny_envs.contains(name) {
        return false;
    }
    model_union(p, kernelspec, facts).contains(name)
        || p.eg_config.as_ref().is_some_and(|e| e.all)
        || p.prefixes.iter().any(|r| name.starts_with(r.prefix.as_str()))
}

/// Every name some enabled list source holds for `kernelspec`.
fn model_union(p: &Policy, kernelspec: Option<&str>, facts: Option<&SpecFacts>) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = (*p.client_envs).clone();
    if let Some(k) = kernelspec {
        if let Some(l) = p.kernelspecs.get(k).or_else(|| p.kernelspecs.get(&k.to_ascii_lowercase())) {
            all.extend(l.iter().cloned());
        }
    }
    if let Some(f) = facts {
        if p.kernelspec_metadata {
            all.extend(f.metadata_client_envs.iter().cloned());
        }
        if p.kernelspec_env {
            all.extend(f.env_keys.iter().cloned());
        }
        if p.process_proxy_envs {
            all.extend(f.process_proxy_envs.iter().cloned());
        }
    }
    if let Some(e) = &p.eg_config {
        all.extend(e.names.iter().cloned());
    }
    all
}

/// What envgate should inject as `client_envs`: the sorted union of the list sources, minus
/// denied and impossible names, `*` first when EG's setting is `*`; no name twice.
pub fn model_allowed_names(p: &Policy, kernelspec: Option<&str>, facts: Option<&SpecFacts>) -> Vec<String> {
    let all = p.eg_config.as_ref().is_some_and(|e| e.all);
    let mut names: Vec<String> = model_union(p, kernelspec, facts)
        .into_iter()
        .filter(|n| !n.is_empty() && !n.contains('=') && !n.contains('\0') && !p.deny_envs.contains(n))
        .filter(|n| !(all && n == "*"))
        .collect();
    if all {
        names.insert(0, "*".to_string());
    }
    names
}

/// Whether a value passes the value rules (the model: length in characters, forbidden
/// substrings, the name's whole-value pattern).
pub fn model_value_ok(p: &Policy, name: &str, value: &str) -> bool {
    value.chars().count() <= p.values.max_length
        && !p.values.forbidden.texts().iter().any(|f| value.contains(f.as_str()))
        && match p.values.patterns.get(name) {
            Some(pat) => pat.is_match(value),
            None => true,
        }
}

/// What EG 3.3.0 refuses in any value (and so what no forwarded value may ever hold, whatever
/// the configuration adds).
pub fn eg_330_value_ok(value: &str) -> bool {
    !["$", "`", "\r", "\n", "\0", "{{", "{%"].iter().any(|f| value.contains(f))
}

/// Whether the body's `path` (`None`: absent or null; `Some(None)`: not a string) could take the
/// kernel out of EG's root.
pub fn model_path_escapes(path: &Option<Option<String>>) -> bool {
    match path {
        None => false,
        Some(None) => true,
        Some(Some(p)) => {
            p.starts_with('/')
                || p.starts_with('~')
                || p.contains('\\')
                || p.contains('\0')
                || p.as_bytes().get(1) == Some(&b':')
                || p.split('/').any(|s| s == "..")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel starts.

/// The top-level members of an object, in order.
fn members(v: &Value) -> Vec<(String, Value)> {
    v.as_object().expect("an object").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Parses `input` strictly and checks what the parse promises: a body it accepts is JSON that a
/// lenient parser (EG's) reads the same way: same `name`, same `env` in the same order.
pub fn check_parse(input: &[u8]) -> Result<StartBody<'_>, ParseError> {
    let body = start::parse(input)?;
    let v: Value = serde_json::from_slice(input)
        .unwrap_or_else(|e| panic!("strict parse accepted what serde_json refuses ({e}): {}", show(input)));
    let obj = v.as_object().unwrap_or_else(|| panic!("strict parse accepted a non-object: {}", show(input)));
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => panic!("accepted a non-string name {other}: {}", show(input)),
    };
    assert_eq!(body.name, name, "name differs from a lenient parse: {}", show(input));
    match obj.get("env") {
        None => assert!(body.env.is_empty() && !body.has_env(), "{}", show(input)),
        Some(Value::Object(m)) => {
            assert!(body.has_env());
            let lenient: Vec<(Cow<str>, Cow<str>)> = m
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().unwrap_or_else(|| panic!("non-string {k}")).into()))
                .collect();
            assert_eq!(body.env, lenient, "env differs from a lenient parse: {}", show(input));
        }
        Some(other) => panic!("accepted a non-object env {other}: {}", show(input)),
    }
    Ok(body)
}

/// The marker-carrying substrings of `s` (`s3cr3t` and the alphanumerics after it).
pub fn markers_in(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(MARKER) {
        let tail = &rest[i..];
        let end = MARKER.len()
            + tail[MARKER.len()..].find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(tail.len() - MARKER.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Checks that `text` (a refusal's message or extra members) holds none of `values`' markers,
/// except one that is also part of a name (`names`), which a refusal may show.
pub fn assert_no_value_in<'a>(text: &str, values: impl IntoIterator<Item = &'a str>, names: &[&str], input: &[u8]) {
    for v in values {
        for m in markers_in(v) {
            if names.iter().any(|n| n.contains(&m)) {
                continue;
            }
            assert!(!text.contains(&m), "a refusal holds the value marker {m:?}: {text}\ninput: {}", show(input));
        }
    }
}

/// Decides one kernel start and checks every promise on the plan; returns the plan.
pub fn check_start<'b>(
    p: &Policy,
    kernelspec: Option<&str>,
    facts: Option<&SpecFacts>,
    input: &[u8],
    body: &'b StartBody<'_>,
    trusted_user: bool,
) -> Plan<'b> {
    let plan = decide::decide(p, kernelspec, facts, body, trusted_user);
    let ctx =
        || format!("mode {:?}, path rule {:?}, trusted {trusted_user}, input {}", p.mode, p.kernel_path, show(input));
    let allowed = |n: &str| (trusted_user && n == USERNAME) || model_allows(p, kernelspec, facts, n);
    let sent: Value = serde_json::from_slice(input).expect("checked by check_parse");
    let path_escapes = model_path_escapes(&body.path());
    assert_eq!(path_escapes, body.path().is_some_and(|x| values::path_escapes(x.as_deref())), "{}", ctx());
    let enforced = p.mode != Mode::Report;

    // What the model says should happen.
    let any_rejected = body.env.iter().any(|(n, _)| !allowed(n));
    let any_bad_value = body.env.iter().any(|(n, v)| allowed(n) && !model_value_ok(p, n, v));
    let want_refusal = if !enforced {
        None
    } else if p.mode == Mode::Reject && any_rejected {
        Some(http::StatusCode::FORBIDDEN)
    } else if any_bad_value || (p.kernel_path == PathRule::RefuseEscape && path_escapes) {
        Some(http::StatusCode::BAD_REQUEST)
    } else {
        None
    };

    // The plan's bookkeeping agrees with the model.
    for k in &plan.decision.kept {
        assert!(allowed(k.name), "{} kept: {}", k.name, ctx());
    }
    for r in &plan.decision.rejected {
        assert!(!allowed(r.name), "{} rejected: {}", r.name, ctx());
    }
    let want_path = (p.kernel_path != PathRule::Keep && path_escapes).then_some(if p.kernel_path == PathRule::Strip {
        PathAction::Stripped
    } else {
        PathAction::Refused
    });
    assert_eq!(plan.path, want_path, "{}", ctx());

    match &plan.verdict {
        Verdict::Refuse(r) => {
            assert_eq!(Some(r.status), want_refusal, "refused ({}) {}", r.message, ctx());
            // It names exactly what the model says is wrong: the rejected names, else the kept
            // names whose values break a rule, else the path.
            let listed = |key: &str| -> Vec<String> {
                r.extra[key]
                    .as_array()
                    .map_or(vec![], |a| a.iter().map(|x| x["name"].as_str().unwrap().into()).collect())
            };
            let names_where = |f: &dyn Fn(&str, &str) -> bool| -> Vec<String> {
                body.env.iter().filter(|(n, v)| f(n, v)).map(|(n, _)| n.to_string()).collect()
            };
            if r.status == http::StatusCode::FORBIDDEN {
                assert_eq!(listed("rejected"), names_where(&|n, _| !allowed(n)), "{}", ctx());
            } else if any_bad_value {
                let want = names_where(&|n, v| allowed(n) && !model_value_ok(p, n, v));
                assert_eq!(listed("violations"), want, "{}", ctx());
            } else {
                assert_eq!(r.why, "path escapes the root", "{}", ctx());
            }
            let names: Vec<&str> = body
                .env
                .iter()
                .map(|(n, _)| &**n)
                .chain(sent.as_object().unwrap().keys().map(String::as_str))
                .collect();
            let mut vals: Vec<&str> = body.env.iter().map(|(_, v)| &**v).collect();
            let path = body.path().flatten();
            vals.extend(path.as_deref());
            let text = format!("{} {} {}", r.message, r.extra, r.why);
            assert_no_value_in(&text, vals, &names, input);
        }
        Verdict::Forward(out) => {
            assert_eq!(want_refusal, None, "forwarded {}: {}", show(out), ctx());
            let fwd = start::parse(out)
                .unwrap_or_else(|e| panic!("the forwarded body {} does not re-parse: {e}; {}", show(out), ctx()));
            let fv: Value = serde_json::from_slice(out).expect("re-parses leniently too");
            assert!(fwd.has_env() && fv["env"].is_object(), "forwarded without an env object: {}", ctx());
            assert_eq!(fwd.name, body.name, "{}", ctx());
            // Every other member is forwarded as sent (the `path` member may be stripped).
            let strip = enforced && p.kernel_path == PathRule::Strip && path_escapes;
            let want: Vec<(String, Value)> =
                members(&sent).into_iter().filter(|(k, _)| k != "env" && !(strip && k == "path")).collect();
            let got: Vec<(String, Value)> = members(&fv).into_iter().filter(|(k, _)| k != "env").collect();
            assert_eq!(got, want, "members changed: {}", ctx());
            if !enforced {
                assert_eq!(fwd.env, body.env, "report mode must forward env as sent: {}", ctx());
                return plan;
            }
            let want_env: Vec<(Cow<str>, Cow<str>)> = body.env.iter().filter(|(n, _)| allowed(n)).cloned().collect();
            assert_eq!(fwd.env, want_env, "forwarded env: {}", ctx());
            if p.mode == Mode::Reject {
                assert_eq!(fwd.env, body.env, "reject mode forwards all or nothing: {}", ctx());
            }
            for (n, v) in &fwd.env {
                if !(trusted_user && n == USERNAME) {
                    assert!(
                        matches!(p.verdict(kernelspec, facts, n), policy::Verdict::Keep(_)),
                        "forwarded {n}, which the policy rejects: {}",
                        ctx()
                    );
                }
                assert!(p.values.check(n, v).is_none(), "forwarded {n} with a value that breaks a rule: {}", ctx());
                assert!(model_value_ok(p, n, v) && eg_330_value_ok(v), "forwarded {n}={v:?}: {}", ctx());
            }
            if p.kernel_path != PathRule::Keep {
                assert!(!model_path_escapes(&fwd.path()), "forwarded an escaping path: {}", ctx());
            }
        }
    }
    plan
}

/// Parses `input` and, when it is a kernel-start body, decides it under `policies` (kernelspec:
/// the body's `name`, else `default_spec`) and checks every promise. Parse errors must not hold
/// a marker that is not part of a key of the input.
pub fn check_start_input(policies: &[(Policy, Option<SpecFacts>)], default_spec: Option<&str>, input: &[u8]) {
    let body = match check_parse(input) {
        Ok(b) => b,
        Err(e) => {
            let msg = e.to_string();
            if !markers_in(&msg).is_empty() {
                let keys = keyish_strings(input);
                for m in markers_in(&msg) {
                    assert!(keys.iter().any(|k| k.contains(&m)), "parse error {msg:?} holds a value: {}", show(input));
                }
            }
            return;
        }
    };
    let kernelspec = body.name.as_deref().or(default_spec);
    // Without identity binding, the user is the body's claim, if any.
    let claimed = body.env.iter().find(|(k, _)| k == USERNAME).map(|(_, v)| v.to_string());
    let want = claimed.as_deref().map(|name| User { name, source: UserSource::Body });
    assert_eq!(decide::user_of(&body, None), want, "{}", show(input));
    // With it, a header that names no one refuses the request before any of the body matters.
    if let Some((p, _)) = policies.first() {
        for value in [None, Some(""), Some(" \t ")] {
            check_identity(p, kernelspec, None, input, value, Mismatch::Refuse);
        }
    }
    // A user named by the header: the body's own claim (as sent, and padded), someone else.
    let padded = claimed.as_ref().map(|c| format!(" {c}\t"));
    let values = [claimed.as_deref(), padded.as_deref(), Some(" alice "), Some("s3cr3tuser")];
    for (p, facts) in policies {
        check_start(p, kernelspec, facts.as_ref(), input, &body, false);
        for value in values.iter().flatten() {
            for on_mismatch in [Mismatch::Refuse, Mismatch::Overwrite] {
                check_identity(p, kernelspec, facts.as_ref(), input, Some(value), on_mismatch);
            }
        }
    }
}

/// The trusted header's name in the identity checks.
pub const TRUSTED_HEADER: &str = "x-auth-request-user";

/// Decides one kernel start under identity binding, the trusted header holding `value` (`None`:
/// absent), and checks: a header that names no one is a 403 naming the header; a body whose
/// `KERNEL_USERNAME` names someone else is a 403 under `refuse`; otherwise the body's env is
/// the one sent with `KERNEL_USERNAME` set to the trusted user (in its place, or added last),
/// the record names that user from the trusted header, and what is decided then keeps every
/// promise of [`check_start`], a forwarded body holding that user exactly once. No refusal
/// holds a value or the header's value. `input` must have passed [`check_parse`].
pub fn check_identity(
    p: &Policy,
    kernelspec: Option<&str>,
    facts: Option<&SpecFacts>,
    input: &[u8],
    value: Option<&str>,
    on_mismatch: Mismatch,
) {
    let ctx = || format!("header {value:?}, {on_mismatch:?}, mode {:?}, input {}", p.mode, show(input));
    let mut body = start::parse(input).expect("checked by check_parse");
    let values: Vec<String> = body.env.iter().map(|(_, v)| v.to_string()).chain(value.map(str::to_string)).collect();
    let names: Vec<String> = body.env.iter().map(|(n, _)| n.to_string()).collect();
    let no_value = |r: &decide::Refusal| {
        assert_eq!(r.status, http::StatusCode::FORBIDDEN, "{}", ctx());
        assert!(r.message.contains(TRUSTED_HEADER), "{}: {}", r.message, ctx());
        let text = format!("{} {} {}", r.message, r.extra, r.why);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_no_value_in(&text, values.iter().map(String::as_str), &names, input);
    };
    let want_user = value.map(str::trim).filter(|u| !u.is_empty());
    let user = match decide::trusted_user(TRUSTED_HEADER, value) {
        Ok(u) => u,
        Err(r) => {
            assert_eq!(want_user, None, "refused a header naming a user: {}", ctx());
            assert_eq!(r.why, "missing trusted user header", "{}", ctx());
            return no_value(&r);
        }
    };
    assert_eq!(Some(user), want_user, "{}", ctx());
    let sent: Vec<(String, String)> = body.env.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let claimed = sent.iter().find(|(n, _)| n == USERNAME).map(|(_, v)| v.clone());
    let bound = decide::bind_user(&mut body, user, Binding { header: TRUSTED_HEADER, on_mismatch });
    assert_eq!(decide::user_of(&body, Some(user)), Some(User { name: user, source: UserSource::TrustedHeader }));
    let mismatch = claimed.as_deref().is_some_and(|c| c != user);
    if let Err(r) = bound {
        assert!(mismatch && on_mismatch == Mismatch::Refuse, "refused ({}): {}", r.message, ctx());
        assert_eq!(r.why, "KERNEL_USERNAME differs from the trusted user", "{}", ctx());
        return no_value(&r);
    }
    assert!(!(mismatch && on_mismatch == Mismatch::Refuse), "a mismatch under refuse went on: {}", ctx());
    let mut want = sent.clone();
    match want.iter_mut().find(|(n, _)| n == USERNAME) {
        Some((_, v)) => *v = user.to_string(),
        None => want.push((USERNAME.to_string(), user.to_string())),
    }
    let got: Vec<(String, String)> = body.env.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    assert_eq!(got, want, "the bound env: {}", ctx());
    let plan = check_start(p, kernelspec, facts, input, &body, true);
    if let Verdict::Forward(out) = &plan.verdict {
        let fwd = start::parse(out).expect("checked by check_start");
        let users: Vec<&str> = fwd.env.iter().filter(|(n, _)| n == USERNAME).map(|(_, v)| &**v).collect();
        assert_eq!(users, [user], "forwarded {}: {}", show(out), ctx());
    }
}

/// Every JSON string literal in `input` that is followed by `:` (a key, if the input is JSON),
/// decoded where it decodes.
fn keyish_strings(input: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < input.len() && input[i] != b'"' {
            i += if input[i] == b'\\' { 2 } else { 1 };
        }
        let end = (i + 1).min(input.len());
        let lit = &input[start..end];
        let mut j = end;
        while j < input.len() && matches!(input[j], b' ' | b'\t' | b'\n' | b'\r') {
            j += 1;
        }
        if input.get(j) == Some(&b':') {
            out.push(
                serde_json::from_slice::<String>(lit).unwrap_or_else(|_| String::from_utf8_lossy(lit).into_owned()),
            );
        }
        i = end;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Kernelspec documents.

/// The facts of one kernelspec entry, read here from the entry as the upstream sent it.
pub fn model_facts(entry: &Value) -> SpecFacts {
    let strings = |ptr: &str| -> BTreeSet<String> {
        match entry.pointer(ptr) {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            _ => BTreeSet::new(),
        }
    };
    let mut pp = strings("/spec/metadata/process_proxy/config/forwarded_envs");
    pp.extend(strings("/spec/metadata/process_proxy/config/forward_env"));
    SpecFacts {
        metadata_client_envs: strings("/spec/metadata/client_envs").into(),
        env_keys: match entry.pointer("/spec/env") {
            Some(Value::Object(m)) => m.keys().cloned().collect(),
            _ => NameSet::new(),
        },
        process_proxy_envs: pp.into(),
    }
}

/// The entry as envgate should serve it: `spec.metadata` made an object if absent or null, and
/// `client_envs` set in it; `Err` when the entry does not have the shape.
fn model_inject(p: &Policy, name: &str, entry: &Value) -> Result<Value, ()> {
    let facts = model_facts(entry);
    assert_eq!(kernelspecs::facts_of(entry), facts, "facts_of({entry})");
    let allowed = model_allowed_names(p, Some(name), Some(&facts));
    assert_eq!(
        p.allowed_names(Some(name), Some(&facts)),
        allowed,
        "allowed_names for {name:?} disagrees with the README's rule; policy {p:?}, facts {facts:?}"
    );
    let mut e = entry.clone();
    let spec = e.get_mut("spec").and_then(Value::as_object_mut).ok_or(())?;
    match spec.get("metadata") {
        None | Some(Value::Null) => {
            spec.insert("metadata".into(), Value::Object(Map::new()));
        }
        Some(Value::Object(_)) => {}
        Some(_) => return Err(()),
    }
    spec["metadata"].as_object_mut().unwrap().insert("client_envs".into(), Value::from(allowed));
    Ok(e)
}

/// Checks `rewrite_list` on `input`: never a panic; `Ok` exactly when the input has the shape;
/// the output is JSON, the input with each entry's `client_envs` set to what the policy allows
/// for it, every other member and its order kept.
pub fn check_kernelspec_list(p: &Policy, input: &[u8]) {
    let got = kernelspecs::rewrite_list(p, input);
    let want: Result<Value, ()> = (|| {
        let mut v: Value = serde_json::from_slice(input).map_err(|_| ())?;
        let specs = v.get_mut("kernelspecs").and_then(Value::as_object_mut).ok_or(())?;
        for (name, entry) in specs.iter_mut() {
            *entry = model_inject(p, name, entry)?;
        }
        Ok(v)
    })();
    compare_rewrite(p, input, got, want);
}

/// Checks `rewrite_one` on `input`, as [`check_kernelspec_list`] does for a list.
pub fn check_kernelspec_one(p: &Policy, input: &[u8]) {
    let got = kernelspecs::rewrite_one(p, input);
    let want: Result<Value, ()> = (|| {
        let v: Value = serde_json::from_slice(input).map_err(|_| ())?;
        let name = v.get("name").and_then(Value::as_str).ok_or(())?.to_string();
        model_inject(p, &name, &v)
    })();
    compare_rewrite(p, input, got, want);
}

fn compare_rewrite(p: &Policy, input: &[u8], got: Result<Vec<u8>, kernelspecs::ShapeError>, want: Result<Value, ()>) {
    match (got, want) {
        (Ok(out), Ok(want)) => {
            serde_json::from_slice::<Value>(&out)
                .unwrap_or_else(|e| panic!("rewritten kernelspecs are not JSON ({e}): {}", show(&out)));
            // Byte for byte: same members, same order, same values.
            assert_eq!(
                String::from_utf8_lossy(&out),
                serde_json::to_string(&want).unwrap(),
                "policy {p:?}\ninput {}",
                show(input)
            );
        }
        (Err(_), Err(())) => {}
        (Ok(out), Err(())) => panic!("rewrote a body without the kernelspec shape: {} -> {}", show(input), show(&out)),
        (Err(e), Ok(_)) => panic!("refused ({e}) a kernelspec body with the shape: {}", show(input)),
    }
}

// ---------------------------------------------------------------------------------------------
// Routes.

/// The segments of a path after one family of normalizations: each `;params` dropped, case
/// folded, empty and `.` segments removed, `..` applied. `decode`: percent-decode to a fixpoint
/// first (at most `rounds` rounds); otherwise the raw text.
pub fn model_segments(path: &str, decode: Option<usize>) -> Vec<String> {
    let mut bytes = path.as_bytes().to_vec();
    if let Some(rounds) = decode {
        for _ in 0..rounds {
            let d = model_percent_decode(&bytes);
            if d == bytes {
                break;
            }
            bytes = d;
        }
    }
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let mut segs: Vec<String> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s.to_string()),
        }
    }
    segs
}

pub fn model_percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            let h = (input[i + 1] as char).to_digit(16);
            let l = (input[i + 2] as char).to_digit(16);
            if let (Some(h), Some(l)) = (h, l) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

/// How many rounds of percent-decoding `path` needs to reach its fixpoint.
pub fn decode_depth(path: &str) -> usize {
    let mut bytes = path.as_bytes().to_vec();
    let mut n = 0;
    loop {
        let d = model_percent_decode(&bytes);
        if d == bytes {
            return n;
        }
        bytes = d;
        n += 1;
    }
}

/// Whether `segs` ends in `api`, `tail` (a route under any base).
fn ends_in(segs: &[String], tail: &str) -> bool {
    matches!(segs, [.., a, t] if a == "api" && t == tail)
}

/// The kernel-starting route (`kernels` or `sessions`) a `POST` path reaches after the
/// normalizations (parameters, case, dot segments, slashes) applied to the raw path or after any
/// of the first `rounds` rounds of percent-decoding, if any.
pub fn model_post_tail(path: &str, rounds: usize) -> Option<&'static str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let mut bytes = path.as_bytes().to_vec();
    for round in 0..=rounds {
        if round > 0 {
            let d = model_percent_decode(&bytes);
            if d == bytes {
                break;
            }
            bytes = d;
        }
        let segs = model_segments(&String::from_utf8_lossy(&bytes), None);
        for tail in ["kernels", "sessions"] {
            if ends_in(&segs, tail) {
                return Some(tail);
            }
        }
    }
    None
}

/// Classifies `(method, path)` under `base` and checks: exact routes are claimed exactly; a
/// `POST` that normalizes to a kernel-starting route (raw, or after any of the first `rounds`
/// rounds of percent-decoding) is ambiguous, never `Other`; only `POST` starts kernels; only `GET` is a
/// kernelspec route.
pub fn check_route(base: &str, method: &Method, path_and_query: &str, rounds: usize) -> Route {
    let routes = Routes::new(base);
    let route = routes.classify(method, path_and_query);
    let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
    let b = routes.base();
    let ctx = || format!("{method} {path_and_query:?} under {base:?}");
    let exact_kernels = path == format!("{b}api/kernels");
    let exact_sessions = path == format!("{b}api/sessions");
    if *method == Method::POST {
        let want = if exact_kernels {
            Some(Route::KernelStart)
        } else if exact_sessions {
            Some(Route::SessionStart)
        } else {
            match model_post_tail(path, rounds) {
                Some("kernels") => Some(Route::AmbiguousKernelStart),
                Some(_) => Some(Route::AmbiguousSessionStart),
                None => None,
            }
        };
        match want {
            // The safety property is "refused": a path that can be read as either route under
            // different normalizations may be labelled as either.
            Some(Route::AmbiguousKernelStart | Route::AmbiguousSessionStart) => assert!(
                matches!(route, Route::AmbiguousKernelStart | Route::AmbiguousSessionStart),
                "{}: {route:?}",
                ctx()
            ),
            Some(want) => assert_eq!(route, want, "{}", ctx()),
            None => {}
        }
        assert!(!matches!(route, Route::KernelspecList | Route::KernelspecOne), "{}", ctx());
        if matches!(route, Route::KernelStart | Route::SessionStart) {
            assert!(exact_kernels || exact_sessions, "{}", ctx());
        }
    } else {
        assert!(!route.starts_kernel(), "{route:?}: {}", ctx());
        if matches!(route, Route::KernelspecList | Route::KernelspecOne) {
            assert_eq!(*method, Method::GET, "{}", ctx());
            assert!(path.starts_with(&format!("{b}api/kernelspecs")), "{}", ctx());
        }
        if *method == Method::GET && path == format!("{b}api/kernelspecs") {
            assert_eq!(route, Route::KernelspecList, "{}", ctx());
        }
    }
    route
}
