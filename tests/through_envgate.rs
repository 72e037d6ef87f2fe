//! End to end: a real Enterprise Gateway (from PyPI) with real ipykernel kernels, envgate in front,
//! real HTTP and WebSocket clients. What reaches a kernel is read from inside the kernel.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::http::{request, Response};
use support::kernel::{run_code, Protocol};

/// Prints the kernel's whole environment as one JSON object.
const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";

/// A secret that lives only in EG's own process environment.
const EG_SECRET: (&str, &str) = ("EG_ONLY_SECRET", "eg-process-secret");

/// EG configured the way envgate's README says: it forwards whatever it is sent (`EG_CLIENT_ENVS=*`),
/// so that envgate alone decides; it also holds a secret of its own.
fn eg(version: &'static str, base_url: Option<&str>) -> Eg {
    Eg::start(EgOptions {
        version,
        base_url: base_url.map(str::to_string),
        client_envs: vec!["*".into()],
        // EG_LIST_KERNELS: EG answers GET /api/kernels with 403 unless told to list kernels.
        extra_env: vec![(EG_SECRET.0.into(), EG_SECRET.1.into()), ("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    })
}

async fn post(addr: &str, path: &str, body: &Value) -> Response {
    let body = serde_json::to_vec(body).unwrap();
    request(addr, "POST", path, &[("Content-Type", "application/json")], &body).await.unwrap()
}

async fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, b"").await.unwrap()
}

/// Starts a kernel through `addr`, returns its id.
async fn start_kernel(addr: &str, base: &str, body: &Value) -> String {
    let r = post(addr, &format!("{base}/api/kernels"), body).await;
    assert_eq!(r.status, 201, "kernel start: {}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// The kernel's environment, read over the channels WebSocket through `ws_base` (`ws://addr{base}`).
async fn kernel_env(ws_base: &str, id: &str, protocol: Protocol) -> BTreeMap<String, String> {
    let url = format!("{ws_base}/api/kernels/{id}/channels");
    let out = run_code(&url, &[], protocol, PRINT_ENV).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed no JSON ({e}): {out}"))
}

async fn delete_kernel(addr: &str, base: &str, id: &str) {
    let r = request(addr, "DELETE", &format!("{base}/api/kernels/{id}"), &[], b"").await.unwrap();
    assert_eq!(r.status, 204, "delete: {}", r.text());
}

/// Names a client sends in the tests: one of each kind the policy knows.
fn client_env() -> Value {
    json!({
        "GLOBAL_OK": "g",          // envgate --client-envs
        "SPEC_OK": "s",            // [kernelspecs.python3_meta] client_envs via flag
        "META_VAR": "m",           // python3_meta's own spec.metadata.client_envs
        "KERNEL_CUSTOM": "k",      // KERNEL_ prefix
        "KERNEL_USERNAME": "alice",
        "NOT_ALLOWED": "x",        // nothing allows it
        "LD_PRELOAD": "/tmp/evil.so", // default deny_envs
        "PATH": "/tmp/evil",       // default deny_envs
        "KERNEL_DENIED": "d",      // --deny-envs wins over the prefix
    })
}

const POLICY_ARGS: &[&str] = &["--client-envs", "GLOBAL_OK", "--kernelspec-client-envs", "python3_meta=SPEC_OK"];

fn deny_args() -> Vec<String> {
    let mut deny: Vec<String> = envgate::policy::DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect();
    deny.push("KERNEL_DENIED".into());
    vec!["--deny-envs".into(), deny.join(",")]
}

fn args(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = POLICY_ARGS.iter().map(|s| s.to_string()).collect();
    a.extend(deny_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn start_envgate(upstream: &str, extra: &[&str]) -> Envgate {
    let a = args(extra);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    Envgate::start(upstream, &refs)
}

/// An audit record's `kept` or `rejected` list as name -> `field` (source or reason).
fn by_name(list: &Value, field: &str) -> BTreeMap<String, String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap().into(), k[field].as_str().unwrap().into()))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> BTreeMap<String, String> {
    p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kernelspecs_carry_client_envs_with_their_own_etag() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &[]);

    let list = get(&gate.addr, "/api/kernelspecs", &[]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let v = list.json();
    assert_eq!(v["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK"]));
    assert_eq!(
        v["kernelspecs"]["python3_meta"]["spec"]["metadata"]["client_envs"],
        json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"])
    );
    // Everything else is what EG serves.
    let direct = get(&eg.addr, "/api/kernelspecs", &[]).await.json();
    let mut expected = direct.clone();
    expected["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"] = json!(["GLOBAL_OK"]);
    expected["kernelspecs"]["python3_meta"]["spec"]["metadata"]["client_envs"] =
        json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"]);
    assert_eq!(v, expected);
    assert_eq!(list.header("content-length").unwrap(), list.body.len().to_string());

    // The single-spec route, and the ETag / If-None-Match round trip.
    let one = get(&gate.addr, "/api/kernelspecs/python3_meta", &[]).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"]));
    let etag = list.header("etag").unwrap().to_string();
    let eg_etag = get(&eg.addr, "/api/kernelspecs", &[]).await.header("etag").unwrap().to_string();
    assert_ne!(etag, eg_etag, "a changed body needs its own ETag");
    let again = get(&gate.addr, "/api/kernelspecs", &[("If-None-Match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    // EG's own ETag describes other bytes: never a 304 for it.
    let stale = get(&gate.addr, "/api/kernelspecs", &[("If-None-Match", &eg_etag)]).await;
    assert_eq!(stale.status, 200);
    // A different policy gives a different body and ETag: never a stale 304.
    let other = start_envgate(&eg.url, &["--client-envs", "SOMETHING_ELSE"]);
    let r = get(&other.addr, "/api/kernelspecs", &[("If-None-Match", &etag)]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("etag").unwrap(), etag);
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_mode_only_allowed_names_reach_the_kernel_over_both_websocket_protocols() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &[]);
    let ws = format!("ws://{}", gate.addr);

    let id = start_kernel(&gate.addr, "", &json!({"name": "python3_meta", "env": client_env()})).await;
    for protocol in [Protocol::Legacy, Protocol::V1] {
        let env = kernel_env(&ws, &id, protocol).await;
        for (k, v) in [
            ("GLOBAL_OK", "g"),
            ("SPEC_OK", "s"),
            ("META_VAR", "m"),
            ("KERNEL_CUSTOM", "k"),
            ("KERNEL_USERNAME", "alice"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k} should reach the kernel ({protocol:?})");
        }
        for k in ["NOT_ALLOWED", "LD_PRELOAD", "KERNEL_DENIED", EG_SECRET.0] {
            assert!(!env.contains_key(k), "{k} must not reach the kernel ({protocol:?})");
        }
        assert_ne!(env.get("PATH").map(String::as_str), Some("/tmp/evil"));
    }

    let recs = gate.audit(1);
    let rec = recs.iter().find(|r| r["kernel_id"] == id).expect("an audit record for the kernel");
    assert_eq!(rec["event"], "kernel_start");
    assert_eq!(rec["mode"], "drop");
    assert_eq!(rec["outcome"], "forwarded");
    assert_eq!(rec["status"], 201);
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["kernelspec"], "python3_meta");
    assert_eq!(
        by_name(&rec["kept"], "source"),
        pairs(&[
            ("GLOBAL_OK", "config"),
            ("SPEC_OK", "kernelspec_config"),
            ("META_VAR", "kernelspec_metadata"),
            ("KERNEL_CUSTOM", "prefix:KERNEL_"),
            ("KERNEL_USERNAME", "prefix:KERNEL_"),
        ])
    );
    assert_eq!(
        by_name(&rec["rejected"], "reason"),
        pairs(&[
            ("NOT_ALLOWED", "not_allowed"),
            ("LD_PRELOAD", "denied"),
            ("PATH", "denied"),
            ("KERNEL_DENIED", "denied")
        ])
    );
    // Never a value in the audit log (the claimed user is the one the format asks for).
    let text = gate.audit_text();
    for v in ["/tmp/evil", "eg-process-secret", "\"g\"", "\"m\""] {
        assert!(!text.contains(v), "audit log holds a value: {v}");
    }
    delete_kernel(&gate.addr, "", &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_without_env_never_gets_the_gateways_environment() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &[]);

    // The hole, shown straight against EG: no `env` key, and the kernel inherits EG's environment.
    let direct_id = start_kernel(&eg.addr, "", &json!({"name": "python3"})).await;
    let direct = kernel_env(&format!("ws://{}", eg.addr), &direct_id, Protocol::Legacy).await;
    assert_eq!(direct.get(EG_SECRET.0).map(String::as_str), Some(EG_SECRET.1), "control: EG leaks without env");
    delete_kernel(&eg.addr, "", &direct_id).await;

    // Through envgate: every body without an `env` object gets `"env": {}`.
    for body in [json!({"name": "python3"}), json!({}), json!({"name": null, "Env": {"X": "1"}})] {
        let id = start_kernel(&gate.addr, "", &body).await;
        let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::Legacy).await;
        assert!(!env.contains_key(EG_SECRET.0), "{body}: EG's environment reached the kernel");
        assert!(!env.contains_key("X"), "{body}");
        delete_kernel(&gate.addr, "", &id).await;
    }
    // Bodies that are not one JSON object are refused, never forwarded.
    for body in [&b""[..], b"null", b"[]", b"{\"env\":null}", b"{\"env\":{},\"env\":{\"X\":\"1\"}}", b"name=python3"] {
        let r = request(&gate.addr, "POST", "/api/kernels", &[], body).await.unwrap();
        assert_eq!(r.status, 400, "{}: {}", String::from_utf8_lossy(body), r.text());
        let v = r.json();
        assert_eq!(v["reason"], "Bad Request");
        assert!(v["message"].as_str().unwrap().len() > 10);
    }
    let kernels = get(&eg.addr, "/api/kernels", &[]).await.json();
    assert_eq!(kernels.as_array().unwrap().len(), 0, "a refused body started a kernel: {kernels}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reject_mode_refuses_and_forwards_nothing() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &["--mode", "reject"]);

    let r = post(&gate.addr, "/api/kernels", &json!({"name": "python3_meta", "env": client_env()})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let v = r.json();
    assert_eq!(v["reason"], "Forbidden");
    let mut rejected = names(&v["rejected"]);
    rejected.sort();
    assert_eq!(rejected, ["KERNEL_DENIED", "LD_PRELOAD", "NOT_ALLOWED", "PATH"]);
    assert!(!r.text().contains("/tmp/evil"), "the error echoes a value");
    let kernels = get(&eg.addr, "/api/kernels", &[]).await.json();
    assert_eq!(kernels.as_array().unwrap().len(), 0);

    // A clean request passes.
    let id = start_kernel(&gate.addr, "", &json!({"name": "python3_meta", "env": {"GLOBAL_OK": "g", "KERNEL_X": "1"}}))
        .await;
    let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::V1).await;
    assert_eq!(env.get("GLOBAL_OK").map(String::as_str), Some("g"));

    let recs = gate.audit(2);
    assert_eq!(recs[0]["outcome"], "refused");
    assert_eq!(recs[0]["status"], 403);
    assert_eq!(recs[0]["mode"], "reject");
    assert_eq!(recs[1]["outcome"], "forwarded");
    assert_eq!(recs[1]["kernel_id"], id.as_str());
    delete_kernel(&gate.addr, "", &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn report_mode_forwards_everything_and_audits_what_drop_would_do() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &["--mode", "report"]);

    let id = start_kernel(&gate.addr, "", &json!({"name": "python3_meta", "env": client_env()})).await;
    let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::Legacy).await;
    assert_eq!(env.get("NOT_ALLOWED").map(String::as_str), Some("x"));
    assert_eq!(env.get("KERNEL_DENIED").map(String::as_str), Some("d"));
    let rec = &gate.audit(1)[0];
    assert_eq!(rec["mode"], "report");
    assert_eq!(rec["outcome"], "forwarded");
    let mut rejected = names(&rec["rejected"]);
    rejected.sort();
    assert_eq!(rejected, ["KERNEL_DENIED", "LD_PRELOAD", "NOT_ALLOWED", "PATH"]);
    delete_kernel(&gate.addr, "", &id).await;

    // Even in report mode, a start without env gets an empty one.
    let id = start_kernel(&gate.addr, "", &json!({"name": "python3"})).await;
    let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::Legacy).await;
    assert!(!env.contains_key(EG_SECRET.0));
    delete_kernel(&gate.addr, "", &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_refused_unless_allowed() {
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &[]);
    let body = json!({"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}});
    let r = post(&gate.addr, "/api/sessions", &body).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["reason"], "Forbidden");
    assert_eq!(get(&eg.addr, "/api/kernels", &[]).await.json().as_array().unwrap().len(), 0);
    let rec = &gate.audit(1)[0];
    assert_eq!((rec["event"].as_str(), rec["outcome"].as_str()), (Some("session_start"), Some("refused")));

    let open = start_envgate(&eg.url, &["--sessions", "allow"]);
    let r = post(&open.addr, "/api/sessions", &body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rec = &open.audit(1)[0];
    assert_eq!(
        (rec["event"].as_str(), rec["outcome"].as_str(), rec["status"].as_u64()),
        (Some("session_start"), Some("forwarded"), Some(201))
    );
    // Everything else on /api/sessions passes through.
    let list = get(&open.addr, "/api/sessions", &[]).await;
    assert_eq!(list.status, 200);
    let kid = r.json()["kernel"]["id"].as_str().unwrap().to_string();
    delete_kernel(&open.addr, "", &kid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_live_under_the_base_url() {
    let eg = eg("3.3.0", Some("/gw"));
    let gate = start_envgate(&eg.url, &[]);
    let specs = get(&gate.addr, "/gw/api/kernelspecs", &[]).await;
    assert_eq!(specs.status, 200, "{}", specs.text());
    assert_eq!(specs.json()["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK"]));
    let id =
        start_kernel(&gate.addr, "/gw", &json!({"name": "python3", "env": {"NOT_ALLOWED": "x", "GLOBAL_OK": "g"}}))
            .await;
    let env = kernel_env(&format!("ws://{}/gw", gate.addr), &id, Protocol::V1).await;
    assert!(!env.contains_key("NOT_ALLOWED"));
    assert_eq!(env.get("GLOBAL_OK").map(String::as_str), Some("g"));
    assert_eq!(gate.audit(1)[0]["kernel_id"], id.as_str());
    delete_kernel(&gate.addr, "/gw", &id).await;
    // A kernel start outside the base URL could be a misconfigured base: refused, never passed on.
    let r = post(&gate.addr, "/api/kernels", &json!({"env": {}})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Other requests outside the base URL are not claimed: EG answers 404 as it would.
    let r = get(&gate.addr, "/api/kernelspecs", &[]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_eg_3_2_3_is_protected_the_same_way() {
    let eg = eg("3.2.3", None);
    let gate = start_envgate(&eg.url, &[]);
    let v = get(&gate.addr, "/api/kernelspecs", &[]).await.json();
    assert_eq!(v["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK"]));
    let id = start_kernel(&gate.addr, "", &json!({"name": "python3_meta", "env": client_env()})).await;
    let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::Legacy).await;
    assert_eq!(env.get("META_VAR").map(String::as_str), Some("m"));
    for k in ["NOT_ALLOWED", "LD_PRELOAD", "KERNEL_DENIED", EG_SECRET.0] {
        assert!(!env.contains_key(k), "{k}");
    }
    delete_kernel(&gate.addr, "", &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_origin_pass_through_and_bad_credentials_are_the_gateways_answer() {
    let eg = Eg::start(EgOptions {
        client_envs: vec!["*".into()],
        auth_token: Some("egtok".into()),
        extra_env: vec![("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    });
    let gate = start_envgate(&eg.url, &[]);
    // Without a token, the kernelspec fetch fails the way EG says.
    let r = post(&gate.addr, "/api/kernels", &json!({"env": {}})).await;
    assert!(r.status == 401 || r.status == 403, "{} {}", r.status, r.text());
    assert_eq!(gate.audit(1)[0]["outcome"], "refused");

    let auth = [("Authorization", "token egtok"), ("Content-Type", "application/json")];
    let body = serde_json::to_vec(&json!({"name": "python3", "env": {"GLOBAL_OK": "g", "NOT_ALLOWED": "x"}})).unwrap();
    let r = request(&gate.addr, "POST", "/api/kernels", &auth, &body).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    // ?token= works for the kernel start too (envgate passes the query to its kernelspec fetch).
    let r = request(&gate.addr, "POST", "/api/kernels?token=egtok", &[], br#"{"env":{}}"#).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id2 = r.json()["id"].as_str().unwrap().to_string();

    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    let out = run_code(&url, &[("Authorization", "token egtok")], Protocol::V1, PRINT_ENV).await.unwrap();
    let env: BTreeMap<String, String> = serde_json::from_str(out.trim()).unwrap();
    assert!(!env.contains_key("NOT_ALLOWED"));
    // Without the token the upgrade is refused by EG, and that answer comes back as a normal response.
    let err = run_code(&url, &[], Protocol::Legacy, "1").await.unwrap_err();
    assert!(err.contains("401") || err.contains("403"), "{err}");

    // Host and Origin go through as the client sent them: a matching pair passes EG's origin check...
    let hdrs =
        [("Authorization", "token egtok"), ("Host", "gateway.example:8889"), ("Origin", "http://gateway.example:8889")];
    assert_eq!(get(&gate.addr, "/api/kernels", &hdrs).await.status, 200);
    // ...and a cross-origin one is refused by EG, as it would be without envgate.
    let hdrs = [("Authorization", "token egtok"), ("Origin", "http://evil.example")];
    assert_ne!(get(&gate.addr, "/api/kernels", &hdrs).await.status, 200);

    for k in [id, id2] {
        let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{k}"), &[("Authorization", "token egtok")], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 204);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_a_json_502() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gate = start_envgate(&format!("http://127.0.0.1:{port}"), &[]);
    for (m, p, body) in
        [("GET", "/api/kernels", &b""[..]), ("GET", "/api/kernelspecs", b""), ("POST", "/api/kernels", b"{}")]
    {
        let r = request(&gate.addr, m, p, &[], body).await.unwrap();
        assert_eq!(r.status, 502, "{m} {p}: {}", r.text());
        let v = r.json();
        assert_eq!(v["reason"], "Bad Gateway");
        assert!(v["message"].as_str().unwrap().contains("upstream"));
    }
    let rec = &gate.audit(1)[0];
    assert_eq!(rec["outcome"], "refused");
    assert_eq!(rec["status"], 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_and_hop_by_hop_handling() {
    // EG echoes nothing useful about headers, so this uses EG's own 404 route to check framing only,
    // and a real kernel start to check the body EG parsed.
    let eg = eg("3.3.0", None);
    let gate = start_envgate(&eg.url, &[]);
    // A chunked kernel start is read whole, rewritten and sent with a Content-Length.
    let body = br#"{"name":"python3","env":{"GLOBAL_OK":"g","NOT_ALLOWED":"x"}}"#;
    let mut chunked = Vec::new();
    for part in body.chunks(7) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = request(
        &gate.addr,
        "POST",
        "/api/kernels",
        &[
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("X-Forwarded-For", "10.1.2.3"),
        ],
        &chunked,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let env = kernel_env(&format!("ws://{}", gate.addr), &id, Protocol::Legacy).await;
    assert!(!env.contains_key("NOT_ALLOWED"));
    assert_eq!(env.get("GLOBAL_OK").map(String::as_str), Some("g"));
    let rec = &gate.audit(1)[0];
    assert_eq!(rec["x_forwarded_for"], "10.1.2.3");
    assert!(rec["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    delete_kernel(&gate.addr, "", &id).await;
    // Oversized bodies are refused before anything reaches EG.
    let small = start_envgate(&eg.url, &["--max-body-bytes", "64"]);
    let big = serde_json::to_vec(&json!({"env": {"KERNEL_X": "y".repeat(100)}})).unwrap();
    let r = request(&small.addr, "POST", "/api/kernels", &[], &big).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let r = request(&small.addr, "POST", "/api/kernels", &[("Content-Encoding", "gzip")], b"x").await.unwrap();
    assert_eq!(r.status, 415, "{}", r.text());
}
