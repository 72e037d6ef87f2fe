//! Kernelspec documents (`GET {base}/api/kernelspecs[/{name}]`): read what the policy needs
//! from them, and inject `spec.metadata.client_envs` so that clients can learn the policy.
//!
//! The rewrite keeps every other member and its order (serde_json's `preserve_order`); only
//! the formatting (whitespace) changes. A body that does not have the expected shape is an
//! error, and the proxy then passes the upstream's bytes on unchanged.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::policy::{NameSet, Policy, SpecFacts, View};

/// Largest kernelspec document envgate reads (to rewrite it, or to learn the policy facts).
pub const MAX_BODY: usize = 8 << 20;

/// What envgate learned from a kernelspecs list: the default kernelspec and, per kernelspec,
/// the facts the policy uses. Kernelspec names are stored lower-cased: EG finds them
/// case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecIndex {
    pub default: Option<String>,
    pub specs: HashMap<String, SpecFacts>,
}

impl SpecIndex {
    /// The kernelspec a kernel start asks for (its `name`, else the upstream's default) and
    /// what the upstream serves for it. The proxy and `envgate explain` both decide through this.
    pub fn resolve(&self, name: Option<&str>) -> (Option<String>, Option<&SpecFacts>) {
        let k = name.map(str::to_string).or_else(|| self.default.clone());
        let facts = k.as_deref().and_then(|k| self.get(k));
        (k, facts)
    }

    /// The facts of kernelspec `name`, if the upstream serves it.
    pub fn get(&self, name: &str) -> Option<&SpecFacts> {
        self.specs.get(name).or_else(|| self.specs.get(&name.to_ascii_lowercase()))
    }
}

/// Why a body could not be read as a kernelspec document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub &'static str);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The string items of the array at `pointer`, if there is one.
fn strings_at(entry: &Value, pointer: &str) -> NameSet {
    entry
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// The policy facts of one kernelspec entry (`{"name", "spec": {...}, "resources"}`). Items of
/// the wrong type are ignored: they can only ever allow less.
pub fn facts_of(entry: &Value) -> SpecFacts {
    let mut process_proxy_envs = strings_at(entry, "/spec/metadata/process_proxy/config/forwarded_envs");
    process_proxy_envs.extend(strings_at(entry, "/spec/metadata/process_proxy/config/forward_env"));
    SpecFacts {
        metadata_client_envs: strings_at(entry, "/spec/metadata/client_envs"),
        env_keys: entry
            .pointer("/spec/env")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        process_proxy_envs,
    }
}

/// Reads a kernelspecs list body into a [`SpecIndex`].
pub fn index(body: &[u8]) -> Result<SpecIndex, ShapeError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ShapeError("not JSON"))?;
    let specs = v.get("kernelspecs").and_then(Value::as_object).ok_or(ShapeError("no \"kernelspecs\" object"))?;
    Ok(SpecIndex {
        default: v.get("default").and_then(Value::as_str).map(str::to_string),
        specs: specs.iter().map(|(k, e)| (k.to_ascii_lowercase(), facts_of(e))).collect(),
    })
}

/// Sets `spec.metadata.client_envs` of one entry to the names the policy allows for it,
/// creating `metadata` when absent.
fn inject(view: &View<'_>, name: &str, entry: &mut Value) -> Result<(), ShapeError> {
    let facts = facts_of(entry);
    let allowed = view.allowed_names(Some(name), Some(&facts));
    let spec = entry
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or(ShapeError("a kernelspec without a \"spec\" object"))?;
    let metadata = spec.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if metadata.is_null() {
        *metadata = Value::Object(Map::new());
    }
    let metadata = metadata.as_object_mut().ok_or(ShapeError("\"metadata\" is not an object"))?;
    metadata.insert("client_envs".to_string(), Value::from(allowed));
    Ok(())
}

/// Rewrites a kernelspecs list body (`{"default", "kernelspecs": {name: entry}}`).
pub fn rewrite_list(policy: &Policy, body: &[u8]) -> Result<Vec<u8>, ShapeError> {
    rewrite_list_for(&policy.anonymous(), body)
}

/// Rewrites a kernelspecs list body for one identity: its own `client_envs` in each entry, and
/// without the kernelspecs it may not start (`default` is left as the upstream says).
pub fn rewrite_list_for(view: &View<'_>, body: &[u8]) -> Result<Vec<u8>, ShapeError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|_| ShapeError("not JSON"))?;
    let specs =
        v.get_mut("kernelspecs").and_then(Value::as_object_mut).ok_or(ShapeError("no \"kernelspecs\" object"))?;
    specs.retain(|name, _| view.may_start(Some(name)).is_ok());
    for (name, entry) in specs.iter_mut() {
        inject(view, name, entry)?;
    }
    Ok(serde_json::to_vec(&v).expect("serializing a Value"))
}

/// Rewrites a single kernelspec body (`{"name", "spec", "resources"}`).
pub fn rewrite_one(policy: &Policy, body: &[u8]) -> Result<Vec<u8>, ShapeError> {
    Ok(rewrite_one_for(&policy.anonymous(), body)?.unwrap_or_default())
}

/// Rewrites a single kernelspec body for one identity; `None` when it may not start that
/// kernelspec (the proxy then answers as EG does for one it does not have).
pub fn rewrite_one_for(view: &View<'_>, body: &[u8]) -> Result<Option<Vec<u8>>, ShapeError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|_| ShapeError("not JSON"))?;
    let name = v.get("name").and_then(Value::as_str).ok_or(ShapeError("a kernelspec without a \"name\""))?.to_string();
    if view.may_start(Some(&name)).is_err() {
        return Ok(None);
    }
    inject(view, &name, &mut v)?;
    Ok(Some(serde_json::to_vec(&v).expect("serializing a Value")))
}

/// Rewritten bodies remembered by the upstream's bytes. EG serves the same few kernelspec
/// documents over and over, and a rewrite is a pure function of (policy, identity's view, route,
/// bytes), so one policy's runtime keeps the last few results and answers a repeated body with
/// one comparison instead of a parse and a render. The view is the list of blocks that apply
/// (empty without identity): users the policy treats alike share entries, and the memo holds
/// at most [`MEMO_SLOTS`] entries, and at most [`MEMO_BYTES`] of bodies, however many users
/// there are. Lock-free reads; a miss swaps in a new list.
#[derive(Debug)]
pub struct Memo<T> {
    entries: arc_swap::ArcSwap<Vec<std::sync::Arc<MemoEntry<T>>>>,
}

#[derive(Debug)]
struct MemoEntry<T> {
    list: bool,
    view: Box<[std::sync::Arc<str>]>,
    input: bytes::Bytes,
    output: T,
    /// The bytes it holds: its input and its output.
    cost: usize,
}

/// How many distinct bodies a [`Memo`] keeps (the list, and a few single kernelspecs, for a
/// few identities' views).
const MEMO_SLOTS: usize = 32;

/// How many bytes of bodies (upstream and rewritten) a [`Memo`] holds at most; a body larger than a
/// quarter of it is not remembered (EG's kernelspec documents are a few KiB; the request body limit
/// is far larger).
const MEMO_BYTES: usize = 16 << 20;

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Memo { entries: arc_swap::ArcSwap::from_pointee(Vec::new()) }
    }
}

impl<T: Clone> Memo<T> {
    /// The result remembered for `input` on the list route (`list`) or the single one, for
    /// the view `view`.
    pub fn get(&self, list: bool, view: &[std::sync::Arc<str>], input: &[u8]) -> Option<T> {
        self.entries
            .load()
            .iter()
            .find(|e| e.list == list && *e.view == *view && e.input == input)
            .map(|e| e.output.clone())
    }

    /// Remembers `output` for `input`, `output_bytes` being the size of what `output` holds; the
    /// oldest entries go when the memo is full, by count or by bytes.
    pub fn put(&self, list: bool, view: &[std::sync::Arc<str>], input: bytes::Bytes, output: T, output_bytes: usize) {
        let cost = input.len().saturating_add(output_bytes);
        if cost > MEMO_BYTES / 4 {
            return;
        }
        let entry = std::sync::Arc::new(MemoEntry { list, view: view.into(), input, output, cost });
        self.entries.rcu(|old| {
            let mut v: Vec<_> = old
                .iter()
                .filter(|e| !(e.list == entry.list && e.view == entry.view && e.input == entry.input))
                .cloned()
                .collect();
            let mut held: usize = v.iter().map(|e| e.cost).sum();
            while !v.is_empty() && (v.len() >= MEMO_SLOTS || held + cost > MEMO_BYTES) {
                held -= v.remove(0).cost;
            }
            v.push(entry.clone());
            v
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    const LIST: &str = include_str!("../../tests/fixtures/kernelspecs.json");
    const ONE: &str = include_str!("../../tests/fixtures/kernelspec_python3.json");

    fn policy() -> Policy {
        Policy {
            client_envs: ["FOO", "PATH"].iter().map(|s| s.to_string()).collect(),
            kernelspecs: HashMap::from([("python3".to_string(), NameSet::from(["PY_ONLY"]))]),
            ..Policy::default()
        }
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn list_gets_client_envs_and_keeps_everything_else_in_order() {
        let out: Value = serde_json::from_slice(&rewrite_list(&policy(), LIST.as_bytes()).unwrap()).unwrap();
        let mut expect: Value = serde_json::from_str(LIST).unwrap();
        expect["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"] = json!(["FOO", "PY_ONLY"]);
        assert_eq!(out, expect);
        assert_eq!(keys(&out), ["default", "kernelspecs"]);
        let spec = &out["kernelspecs"]["python3"]["spec"];
        assert_eq!(keys(spec), ["argv", "env", "display_name", "language", "interrupt_mode", "metadata"]);
        assert_eq!(keys(&spec["metadata"]), ["debugger", "client_envs"]);
    }

    #[test]
    fn single_spec_is_rewritten_the_same_way() {
        let out: Value = serde_json::from_slice(&rewrite_one(&policy(), ONE.as_bytes()).unwrap()).unwrap();
        let mut expect: Value = serde_json::from_str(ONE).unwrap();
        expect["spec"]["metadata"]["client_envs"] = json!(["FOO", "PY_ONLY"]);
        assert_eq!(out, expect);
        assert_eq!(keys(&out), ["name", "spec", "resources"]);
    }

    #[test]
    fn upstream_metadata_is_merged_sorted_and_denied_names_removed() {
        let body = json!({"default": "a", "kernelspecs": {
            "a": {"name": "a", "spec": {"metadata": {"client_envs": ["ZED", "LD_PRELOAD", 7, "ALPHA"]}}},
            "b": {"name": "b", "spec": {}},
            "c": {"name": "c", "spec": {"metadata": null}},
        }});
        let out: Value =
            serde_json::from_slice(&rewrite_list(&policy(), &serde_json::to_vec(&body).unwrap()).unwrap()).unwrap();
        assert_eq!(out["kernelspecs"]["a"]["spec"]["metadata"]["client_envs"], json!(["ALPHA", "FOO", "ZED"]));
        assert_eq!(out["kernelspecs"]["b"]["spec"]["metadata"], json!({"client_envs": ["FOO"]}));
        assert_eq!(out["kernelspecs"]["c"]["spec"]["metadata"], json!({"client_envs": ["FOO"]}));
    }

    #[test]
    fn an_empty_list_is_fine() {
        let out = rewrite_list(&policy(), br#"{"default":"x","kernelspecs":{}}"#).unwrap();
        assert_eq!(out, br#"{"default":"x","kernelspecs":{}}"#);
    }

    #[test]
    fn odd_shapes_are_errors_not_corruption() {
        let p = policy();
        for b in [&b"not json"[..], b"[]", b"{}", br#"{"kernelspecs":[]}"#, br#"{"kernelspecs":{"a":{"spec":1}}}"#] {
            assert!(rewrite_list(&p, b).is_err(), "{}", String::from_utf8_lossy(b));
        }
        for b in [&b"{}"[..], br#"{"name":"a"}"#, br#"{"name":"a","spec":{"metadata":[]}}"#, br#"{"name":1,"spec":{}}"#]
        {
            assert!(rewrite_one(&p, b).is_err(), "{}", String::from_utf8_lossy(b));
        }
    }

    /// The facts of one kernelspec entry: its `env` keys, its process proxy's forwarded names, its
    /// `metadata.client_envs`.
    fn assert_facts(entry: Value, env_keys: &[&str], process_proxy_envs: &[&str], metadata_client_envs: &[&str]) {
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        let f = facts_of(&entry);
        assert_eq!(f.env_keys, set(env_keys), "env keys of {entry}");
        assert_eq!(f.process_proxy_envs, set(process_proxy_envs), "process proxy names of {entry}");
        assert_eq!(f.metadata_client_envs, set(metadata_client_envs), "client_envs of {entry}");
    }

    #[test]
    fn index_reads_default_and_facts() {
        let idx = index(
            br#"{"default":"Py","kernelspecs":{"Py":{"spec":{"metadata":{"client_envs":["M"]}}},"r":{"spec":{}}}}"#,
        )
        .unwrap();
        assert_eq!(idx.default.as_deref(), Some("Py"));
        assert_eq!(idx.get("py").unwrap().metadata_client_envs, BTreeSet::from(["M".to_string()]));
        assert_eq!(idx.get("PY"), idx.get("py"));
        assert_eq!(idx.get("r"), Some(&SpecFacts::default()));
        assert_facts(
            json!({"spec": {
                "env": {"A": "1", "B": "2"},
                "metadata": {"process_proxy": {"class_name": "x", "config": {"forwarded_envs": ["P", 3], "forward_env": ["Q"]}}}
            }}),
            &["A", "B"],
            &["P", "Q"],
            &[],
        );
        assert_eq!(idx.get("nope"), None);
        assert!(index(b"[]").is_err());
    }

    #[test]
    fn memo_remembers_by_route_and_bytes_and_forgets_the_oldest() {
        let m: Memo<u32> = Memo::default();
        let none: &[std::sync::Arc<str>] = &[];
        assert_eq!(m.get(true, none, b"a"), None);
        m.put(true, none, bytes::Bytes::from_static(b"a"), 1, 0);
        assert_eq!(m.get(true, none, b"a"), Some(1));
        assert_eq!(m.get(false, none, b"a"), None, "the route is part of the key");
        assert_eq!(m.get(true, &["user:a".into()], b"a"), None, "the view is part of the key");
        assert_eq!(m.get(true, none, b"ab"), None);
        m.put(true, none, bytes::Bytes::from_static(b"a"), 2, 0);
        assert_eq!(m.get(true, none, b"a"), Some(2), "replaced, not duplicated");
        for i in 0..MEMO_SLOTS as u32 {
            m.put(false, &[format!("user:{i}").into()], bytes::Bytes::from(i.to_string()), i, 0);
        }
        assert_eq!(m.get(true, none, b"a"), None, "the oldest went");
        assert_eq!(m.get(false, &["user:0".into()], b"0"), Some(0));
        assert_eq!(m.entries.load().len(), MEMO_SLOTS, "bounded whatever the number of views");
    }

    #[test]
    fn memo_holds_a_bounded_number_of_bytes() {
        let m: Memo<u32> = Memo::default();
        let none: &[std::sync::Arc<str>] = &[];
        let big = |c: u8| bytes::Bytes::from(vec![c; MEMO_BYTES / 8]);
        m.put(true, none, bytes::Bytes::from(vec![0u8; MEMO_BYTES / 4 + 1]), 0, 0);
        assert_eq!(m.entries.load().len(), 0, "too large to remember");
        m.put(true, none, big(1), 1, MEMO_BYTES / 8);
        assert_eq!(m.get(true, none, &big(1)), Some(1));
        for c in 2..=4u8 {
            m.put(true, none, big(c), c as u32, MEMO_BYTES / 8);
        }
        assert_eq!(m.get(true, none, &big(1)), Some(1), "four quarters fit");
        m.put(true, none, big(5), 5, MEMO_BYTES / 8);
        assert_eq!(m.get(true, none, &big(1)), None, "a fifth does not: the oldest went");
        assert_eq!(m.get(true, none, &big(5)), Some(5));
        assert!(m.entries.load().iter().map(|e| e.cost).sum::<usize>() <= MEMO_BYTES);
    }
}
