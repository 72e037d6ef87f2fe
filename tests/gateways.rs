//! One matrix: the same representative subset of envgate's end-to-end checks against every older Enterprise
//! Gateway release that installs on Python 3.11 (EG 3.1.0, 3.0.0, 2.6.0, and the cached 3.2.3), each a real
//! EG from its pinned `eg/requirements-VERSION.txt` with real ipykernel kernels, envgate's real binary in front.
//! EG 3.3.0 has the full suite (`tests/through_envgate.rs` and the others); 3.2.3 also has
//! `tests/legacy_exploits.rs`.
//!
//! Each EG runs as envgate's README says (`client_envs = *`, so envgate alone decides), given in the variable
//! its version reads (`EgOptions` picks `EG_ENV_WHITELIST` for 2.x, `EG_CLIENT_ENVS` for 3.x): a name the
//! policy allows reaching the kernel proves EG read it. The subset, per version: kernelspecs with `client_envs`
//! injected (all else as EG serves it); a filtered kernel start read from inside the kernel over both WebSocket
//! framings; a start without `env` (straight to EG the kernel gets EG's environment; through envgate it does
//! not); a value that exploits legacy EG refused before EG; `POST /api/sessions` refused, no kernel started.

mod support;

use serde_json::json;
use support::api::Api;
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::kernel::Protocol;

/// A secret that lives only in EG's own process environment.
const EG_SECRET: (&str, &str) = ("EG_ONLY_SECRET", "eg-process-secret");

const POLICY_ARGS: &[&str] = &["--client-envs", "GLOBAL_OK", "--kernelspec-client-envs", "python3_meta=SPEC_OK"];

/// EG runs without a token here.
const API: Api = Api { auth: None };

async fn subset(version: &'static str) {
    let eg = Eg::start(EgOptions {
        version,
        client_envs: vec!["*".into()],
        // EG_LIST_KERNELS: EG answers GET /api/kernels with 403 unless told to list kernels.
        extra_env: vec![(EG_SECRET.0.into(), EG_SECRET.1.into()), ("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    });
    let api = API.get(&eg.addr, "/api").await.json();
    assert_eq!(api["gateway_version"], version, "the EG under test: {api}");
    let gate = Envgate::start(&eg.url, POLICY_ARGS);

    // Kernelspecs: client_envs injected, everything else as EG serves it.
    let list = API.get(&gate.addr, "/api/kernelspecs").await;
    assert_eq!(list.status, 200, "{version}: {}", list.text());
    let mut expected = API.get(&eg.addr, "/api/kernelspecs").await.json();
    expected["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"] = json!(["GLOBAL_OK"]);
    expected["kernelspecs"]["python3_meta"]["spec"]["metadata"]["client_envs"] =
        json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"]);
    assert_eq!(list.json(), expected, "{version}");
    let one = API.get(&gate.addr, "/api/kernelspecs/python3_meta").await;
    assert_eq!(one.json()["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"]));

    // A filtered start, read from inside the kernel over both WebSocket framings.
    let env = json!({
        "GLOBAL_OK": "g", "SPEC_OK": "s", "META_VAR": "m", "KERNEL_CUSTOM": "k", "KERNEL_USERNAME": "alice",
        "NOT_ALLOWED": "x", "LD_PRELOAD": "/tmp/evil.so", "PATH": "/tmp/evil",
    });
    let id = API.start_kernel(&gate.addr, &json!({"name": "python3_meta", "env": env})).await;
    for protocol in [Protocol::Legacy, Protocol::V1] {
        let got = API.kernel_env(&gate.addr, &id, protocol).await;
        for (k, v) in [
            ("GLOBAL_OK", "g"),
            ("SPEC_OK", "s"),
            ("META_VAR", "m"),
            ("KERNEL_CUSTOM", "k"),
            ("KERNEL_USERNAME", "alice"),
        ] {
            assert_eq!(got.get(k).map(String::as_str), Some(v), "{version} {protocol:?}: {k} should reach the kernel");
        }
        for k in ["NOT_ALLOWED", "LD_PRELOAD", EG_SECRET.0] {
            assert!(!got.contains_key(k), "{version} {protocol:?}: {k} must not reach the kernel");
        }
        // EG 3.1 and older give every kernel EG's own PATH; the client's never arrives.
        assert_ne!(got.get("PATH").map(String::as_str), Some("/tmp/evil"), "{version}");
    }
    let rec = gate.audit(1).into_iter().find(|r| r["kernel_id"] == id.as_str()).expect("an audit record");
    assert_eq!((rec["outcome"].as_str(), rec["status"].as_u64()), (Some("forwarded"), Some(201)), "{version}");
    API.delete_kernel(&gate.addr, &id).await;

    // No `env`: straight to EG the kernel inherits EG's environment; through envgate it gets `"env": {}`.
    let direct = API.start_kernel(&eg.addr, &json!({"name": "python3"})).await;
    let got = API.kernel_env(&eg.addr, &direct, Protocol::Legacy).await;
    assert_eq!(got.get(EG_SECRET.0).map(String::as_str), Some(EG_SECRET.1), "{version}: control, EG leaks");
    API.delete_kernel(&eg.addr, &direct).await;
    let id = API.start_kernel(&gate.addr, &json!({"name": "python3"})).await;
    let got = API.kernel_env(&gate.addr, &id, Protocol::V1).await;
    assert!(!got.contains_key(EG_SECRET.0), "{version}: EG's environment reached the kernel");
    API.delete_kernel(&gate.addr, &id).await;

    // Every one of these releases lacks EG 3.3's value checks; envgate refuses an exploit value before EG.
    let r = API.post(&gate.addr, "/api/kernels", &json!({"name": "python3", "env": {"KERNEL_UID": "0 "}})).await;
    assert_eq!(r.status, 400, "{version}: {}", r.text());
    assert!(r.text().contains("KERNEL_UID"), "{}", r.text());

    // Sessions start kernels with EG's whole environment: refused, nothing started.
    let body = json!({"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}});
    let r = API.post(&gate.addr, "/api/sessions", &body).await;
    assert_eq!(r.status, 403, "{version}: {}", r.text());
    assert_eq!(API.kernel_count(&eg.addr).await, 0, "{version}: a refused request started a kernel");
    let events: Vec<(String, String)> = gate
        .audit(4)
        .iter()
        .map(|r| (r["event"].as_str().unwrap().to_string(), r["outcome"].as_str().unwrap().to_string()))
        .collect();
    assert!(events.contains(&("session_start".into(), "refused".into())), "{version}: {events:?}");
    let text = gate.audit_text();
    for v in ["/tmp/evil", EG_SECRET.1] {
        assert!(!text.contains(v), "{version}: the audit log holds a value");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn eg_3_2_3() {
    subset("3.2.3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eg_3_1_0() {
    subset("3.1.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eg_3_0_0() {
    subset("3.0.0").await;
}

/// EG 2.6.0 knows only `EG_ENV_WHITELIST` (EgOptions gives it that); with `EG_CLIENT_ENVS` alone it would
/// drop GLOBAL_OK and the subset would fail.
#[tokio::test(flavor = "multi_thread")]
async fn eg_2_6_0() {
    subset("2.6.0").await;
}
