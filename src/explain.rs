//! `envgate explain`: for each variable name, kept or rejected for a kernelspec, and the source
//! or rule that decided. It runs [`Policy::verdict`] over a [`SpecIndex`], exactly as the proxy
//! does for a kernel start; only where the kernelspecs come from differs (a file, or one fetch).

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde::Serialize;

use crate::config::Config;
use crate::policy::{Policy, Verdict};
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
    /// What the policy would inject as `spec.metadata.client_envs` for it.
    pub client_envs: Vec<String>,
    pub names: Vec<Line>,
}

/// Explains `names` for `kernelspec` (or the upstream's default).
pub fn explain(policy: &Policy, index: &SpecIndex, kernelspec: Option<&str>, names: &[String]) -> Explanation {
    let (k, facts) = index.resolve(kernelspec);
    let lines = names
        .iter()
        .map(|n| match policy.verdict(k.as_deref(), facts, n) {
            Verdict::Keep(s) => Line { name: n.clone(), verdict: "kept", by: s.as_str().to_string() },
            Verdict::Reject(r) => Line { name: n.clone(), verdict: "rejected", by: r.as_str().to_string() },
        })
        .collect();
    Explanation {
        client_envs: policy.allowed_names(k.as_deref(), facts),
        served: facts.is_some(),
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
        out.push_str(&format!("client_envs = {:?}\n", self.client_envs));
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
