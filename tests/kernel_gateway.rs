//! End to end: envgate in front of a real Jupyter Kernel Gateway 3.0.x (from PyPI) with real ipykernel
//! kernels. What reaches a kernel is read from inside the kernel. One KG process serves the whole file's
//! main test, to keep CI time down; what KG itself does is shown next to it as a control (straight to KG).
//! The wire facts behind these tests are in docs/kernel-gateway.md.

mod support;

use serde_json::json;
use support::api::Api;
use support::envgate::Envgate;
use support::http::request;
use support::kernel::{run_code, Protocol};
use support::kg::{Kg, KgOptions};

const TOKEN: &str = "kgtok";
const AUTH: &str = "token kgtok";
/// A secret that lives only in KG's own process environment.
const KG_SECRET: (&str, &str) = ("KG_ONLY_SECRET", "kg-process-secret");

/// KG as docs/kernel-gateway.md says to run it: `KG_ENV_WHITELIST` holds the names envgate allows (KG has no
/// `*`), plus one name envgate does not allow, to show that envgate, not KG, decides.
fn kg(version: &'static str) -> Kg {
    Kg::start(KgOptions {
        version,
        env_whitelist: ["GLOBAL_OK", "META_VAR", "SPEC_OK", "NOT_ALLOWED"].map(String::from).to_vec(),
        auth_token: Some(TOKEN.into()),
        extra_env: vec![(KG_SECRET.0.into(), KG_SECRET.1.into()), ("KG_LIST_KERNELS".into(), "True".into())],
        ..KgOptions::default()
    })
}

const API: Api = Api { auth: Some(AUTH) };

fn start_envgate(kg: &Kg, extra: &[&str], env: &[(&str, &str)]) -> Envgate {
    let mut args = vec!["--client-envs", "GLOBAL_OK", "--kernelspec-client-envs", "python3_meta=SPEC_OK"];
    args.extend_from_slice(extra);
    Envgate::start_with_env(&kg.url, &args, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn envgate_in_front_of_kernel_gateway() {
    let kg = kg("3.0.x");
    let gate = start_envgate(&kg, &[], &[]);

    // Kernelspecs: KG's own shape (as EG's), with client_envs injected; the token goes through.
    let specs = API.get(&gate.addr, "/api/kernelspecs").await;
    assert_eq!(specs.status, 200, "{}", specs.text());
    let v = specs.json();
    assert_eq!(v["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK"]));
    assert_eq!(
        v["kernelspecs"]["python3_meta"]["spec"]["metadata"]["client_envs"],
        json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"])
    );
    let one = API.get(&gate.addr, "/api/kernelspecs/python3_meta").await;
    assert_eq!(one.json()["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK", "META_VAR", "SPEC_OK"]));
    // Without the token KG answers 401 and envgate fails closed on the kernel start.
    let r = request(&gate.addr, "POST", "/api/kernels", &[], br#"{"env":{}}"#).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());

    // A filtered start: only what the policy allows reaches the kernel, over both WebSocket protocols,
    // although KG's own list would have let NOT_ALLOWED through.
    let env = json!({
        "GLOBAL_OK": "g", "SPEC_OK": "s", "META_VAR": "m", "KERNEL_CUSTOM": "k",
        "NOT_ALLOWED": "x", "LD_PRELOAD": "/tmp/evil.so", "PATH": "/tmp/evil",
    });
    let id = API.start_kernel(&gate.addr, &json!({"name": "python3_meta", "env": env})).await;
    for protocol in [Protocol::Legacy, Protocol::V1] {
        let seen = API.kernel_env(&gate.addr, &id, protocol).await;
        for (k, v) in [("GLOBAL_OK", "g"), ("SPEC_OK", "s"), ("META_VAR", "m"), ("KERNEL_CUSTOM", "k")] {
            assert_eq!(seen.get(k).map(String::as_str), Some(v), "{k} should reach the kernel ({protocol:?})");
        }
        for k in ["NOT_ALLOWED", "LD_PRELOAD", KG_SECRET.0] {
            assert!(!seen.contains_key(k), "{k} must not reach the kernel ({protocol:?})");
        }
        assert_ne!(seen.get("PATH").map(String::as_str), Some("/tmp/evil"));
        assert_eq!(seen.get("KERNEL_GATEWAY").map(String::as_str), Some("1"), "KG marks its kernels");
    }
    let rec = gate.audit(1).into_iter().find(|r| r["kernel_id"] == id.as_str()).expect("audit record");
    assert_eq!((rec["outcome"].as_str(), rec["status"].as_u64()), (Some("forwarded"), Some(201)));
    API.delete_kernel(&gate.addr, &id).await;

    // Control: straight to KG, a start without `env` hands the kernel KG's whole environment.
    let direct = API.start_kernel(&kg.addr, &json!({"name": "python3"})).await;
    let seen = API.kernel_env(&kg.addr, &direct, Protocol::Legacy).await;
    assert_eq!(seen.get(KG_SECRET.0).map(String::as_str), Some(KG_SECRET.1), "control: KG leaks without env");
    API.delete_kernel(&kg.addr, &direct).await;
    // Through envgate, the forwarded body always has an `env` object.
    let id = API.start_kernel(&gate.addr, &json!({"name": "python3"})).await;
    let seen = API.kernel_env(&gate.addr, &id, Protocol::V1).await;
    assert!(!seen.contains_key(KG_SECRET.0), "KG's environment reached the kernel through envgate");
    API.delete_kernel(&gate.addr, &id).await;

    // Control: KG checks no value; `$(...)` reaches the kernel as sent.
    let direct =
        API.start_kernel(&kg.addr, &json!({"name": "python3", "env": {"KERNEL_X": "$(id)", "KERNEL_UID": "0 "}})).await;
    let seen = API.kernel_env(&kg.addr, &direct, Protocol::Legacy).await;
    assert_eq!(seen.get("KERNEL_X").map(String::as_str), Some("$(id)"));
    assert_eq!(seen.get("KERNEL_UID").map(String::as_str), Some("0 "));
    API.delete_kernel(&kg.addr, &direct).await;
    // envgate's value rules stop both, and nothing starts.
    let before = API.kernel_count(&kg.addr).await;
    for (name, value, rule) in [("KERNEL_UID", "0 ", "pattern"), ("KERNEL_X", "$(id)", "forbidden")] {
        let r = API.post(&gate.addr, "/api/kernels", &json!({"name": "python3", "env": {name: value}})).await;
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(r.json()["violations"][0]["name"], name);
        assert_eq!(r.json()["violations"][0]["rule"], rule, "{}", r.text());
        assert!(!r.text().contains(value), "the error echoes a value");
    }

    // POST /api/sessions (which KG serves, and which starts a kernel with KG's environment) is refused.
    let body = json!({"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}});
    let r = API.post(&gate.addr, "/api/sessions", &body).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(API.kernel_count(&kg.addr).await, before, "a refused request started a kernel");
    let text = gate.audit_text();
    for v in ["/tmp/evil", "$(id)", KG_SECRET.1] {
        assert!(!text.contains(v), "audit log holds a value: {v}");
    }

    // inherit_eg_env_config also reads KG's own KG_ENV_WHITELIST (no wildcard: `*` is no name for KG).
    let inheriting = start_envgate(
        &kg,
        &["--inherit-eg-env-config"],
        &[("KG_ENV_WHITELIST", "FROM_KG,*"), ("EG_CLIENT_ENVS", "FROM_EG")],
    );
    let v = API.get(&inheriting.addr, "/api/kernelspecs").await.json();
    assert_eq!(
        v["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"],
        json!(["FROM_EG", "FROM_KG", "GLOBAL_OK"])
    );
    let r = API
        .post(&inheriting.addr, "/api/kernels", &json!({"name": "python3", "env": {"FROM_KG": "1", "OTHER": "2"}}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let rec = inheriting.audit(1).into_iter().find(|r| r["kernel_id"] == id.as_str()).expect("audit record");
    assert_eq!(rec["kept"], json!([{"name": "FROM_KG", "source": "eg_config"}]), "{rec}");
    API.delete_kernel(&inheriting.addr, &id).await;
}

/// KG 2.5.x (the last release on notebook 6.5) still installs and runs on Python 3.11: the same filter and
/// the same hole without `env`, but only the legacy JSON WebSocket protocol.
#[tokio::test(flavor = "multi_thread")]
async fn kernel_gateway_2_5_is_covered_the_same_way() {
    let kg = kg("2.5.x");
    let gate = start_envgate(&kg, &[], &[]);
    let v = API.get(&gate.addr, "/api/kernelspecs").await.json();
    assert_eq!(v["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["GLOBAL_OK"]));

    let env = json!({"GLOBAL_OK": "g", "NOT_ALLOWED": "x", "KERNEL_CUSTOM": "k"});
    let id = API.start_kernel(&gate.addr, &json!({"name": "python3", "env": env})).await;
    let seen = API.kernel_env(&gate.addr, &id, Protocol::Legacy).await;
    assert_eq!(seen.get("GLOBAL_OK").map(String::as_str), Some("g"));
    assert_eq!(seen.get("KERNEL_CUSTOM").map(String::as_str), Some("k"));
    assert!(!seen.contains_key("NOT_ALLOWED"), "KG's list allows it, envgate's does not");
    // KG 2.5 does not select the v1 subprotocol; a client offering it gets no subprotocol back.
    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    assert!(run_code(&url, &[("Authorization", AUTH)], Protocol::V1, "1").await.is_err());
    API.delete_kernel(&gate.addr, &id).await;

    let id = API.start_kernel(&gate.addr, &json!({"name": "python3"})).await;
    let seen = API.kernel_env(&gate.addr, &id, Protocol::Legacy).await;
    assert!(!seen.contains_key(KG_SECRET.0), "KG's environment reached the kernel through envgate");
    API.delete_kernel(&gate.addr, &id).await;
    let r = API.post(&gate.addr, "/api/sessions", &json!({"kernel": {"name": "python3"}})).await;
    assert_eq!(r.status, 403, "{}", r.text());
}
