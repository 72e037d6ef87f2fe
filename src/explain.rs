//! `envgate explain`: for each variable name, kept or rejected for a kernelspec (and an identity),
//! and the source or rule that decided; which blocks apply, whether the identity may start the
//! kernelspec, and which `set_envs` apply. It runs [`View::verdict`] over a [`SpecIndex`],
//! exactly as the proxy does for a kernel start; only where the kernelspecs come from differs
//! (a file, or one fetch).

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde::Serialize;

use crate::config::Config;
use crate::policy::{Policy, Verdict, View};
use crate::rewrite::kernelspecs::{self, SpecIndex};
use crate::routes::Routes;
use crate::upstream::{SpecCache, Upstream};

/// The verdict on one name.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    /// `kept` or `rejected`.
    pub verdict: &'static str,
    /// The source that kept it, or the reason it was rejected.
    pub by: String,
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
            Verdict::Keep(s) => Line { name: n.clone(), verdict: "kept", by: s.as_str().to_string() },
            Verdict::Reject(r) => Line { name: n.clone(), verdict: "rejected", by: r.as_str().to_string() },
        })
        .collect();
    let lower = k.as_deref().map(str::to_ascii_lowercase);
    let cx = crate::identity::Context { user: who.user, kernelspec: lower.as_deref() };
    let set_envs = view
        .set_envs(k.as_deref())
        .into_iter()
        .map(|s| SetLine {
            name: s.name.clone(),
            value: s.template.render(cx).map_err(str::to_string),
            scope: s.scope.to_string(),
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
                Ok(v) => out.push_str(&format!("set {} = {v:?}  ({})\n", s.name, s.scope)),
                Err(why) => out.push_str(&format!("set {}: cannot be rendered ({why})  ({})\n", s.name, s.scope)),
            }
        }
        let w = self.names.iter().map(|l| l.name.len()).max().unwrap_or(0);
        for l in &self.names {
            out.push_str(&format!("{:<w$}  {:<8}  {}\n", l.name, l.verdict, l.by));
        }
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
