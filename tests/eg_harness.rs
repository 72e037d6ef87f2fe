//! Self-test of the real-EG harness (tests/support), against EG directly, without the proxy.
//! Also pins down the EG behaviour envgate relies on or guards against.

mod support;

use serde_json::{json, Value};
use support::eg::{Eg, EgOptions};
use support::http;
use support::kernel::{run_code, Protocol};

/// Prints the kernel's environment variable names as one JSON list.
const PRINT_ENV_NAMES: &str = "import os, json; print(json.dumps(sorted(os.environ)))";

/// Starts a kernel with `body`; returns its id.
async fn start_kernel(eg: &Eg, body: &Value) -> String {
    let auth = eg.auth_headers();
    let mut headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    headers.push(("Content-Type", "application/json"));
    let path = format!("{}/api/kernels", eg.base_url);
    let resp = http::request(&eg.addr, "POST", &path, &headers, body.to_string().as_bytes()).await.unwrap();
    assert_eq!(resp.status, 201, "POST {path}: {}\n--- EG log ---\n{}", resp.text(), eg.log());
    resp.json()["id"].as_str().unwrap().to_string()
}

async fn delete_kernel(eg: &Eg, id: &str) {
    let auth = eg.auth_headers();
    let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let path = format!("{}/api/kernels/{id}", eg.base_url);
    let resp = http::request(&eg.addr, "DELETE", &path, &headers, b"").await.unwrap();
    assert_eq!(resp.status, 204, "DELETE {path}: {}", resp.text());
}

/// Runs PRINT_ENV_NAMES in kernel `id` over `protocol`; returns the names.
async fn kernel_env_names(eg: &Eg, id: &str, protocol: Protocol) -> Vec<String> {
    let auth = eg.auth_headers();
    let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let out = run_code(&eg.channels_url(id), &headers, protocol, PRINT_ENV_NAMES)
        .await
        .unwrap_or_else(|e| panic!("{protocol:?}: {e}\n--- EG log ---\n{}", eg.log()));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed {out:?}: {e}"))
}

fn has(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == name)
}

#[tokio::test]
async fn eg_330_filters_request_env_over_both_ws_protocols() {
    let eg = Eg::start(EgOptions {
        client_envs: vec!["META_VAR".into()],
        extra_env: vec![("ENVGATE_TEST_SECRET".into(), "hunter2".into())],
        ..Default::default()
    });
    let body = json!({"name": "python3", "env": {"KERNEL_FOO": "1", "NOT_ALLOWED": "x", "META_VAR": "m"}});
    let id = start_kernel(&eg, &body).await;
    for protocol in [Protocol::Legacy, Protocol::V1] {
        let names = kernel_env_names(&eg, &id, protocol).await;
        assert!(has(&names, "KERNEL_FOO"), "{protocol:?}: {names:?}");
        assert!(has(&names, "META_VAR"), "client_envs name dropped: {names:?}");
        assert!(!has(&names, "NOT_ALLOWED"), "{protocol:?}: {names:?}");
        // With an `env` key EG gives the kernel nothing of its own environment: no secret, no PATH.
        assert!(!has(&names, "ENVGATE_TEST_SECRET") && !has(&names, "PATH"), "{names:?}");
    }
    delete_kernel(&eg, &id).await;
}

/// The hole envgate must close: a body without `env` gets EG's whole process environment.
#[tokio::test]
async fn eg_330_body_without_env_leaks_eg_environment() {
    let eg = Eg::start(EgOptions {
        extra_env: vec![("ENVGATE_TEST_SECRET".into(), "hunter2".into())],
        ..Default::default()
    });
    let id = start_kernel(&eg, &json!({"name": "python3"})).await;
    let names = kernel_env_names(&eg, &id, Protocol::Legacy).await;
    assert!(has(&names, "ENVGATE_TEST_SECRET") && has(&names, "PATH"), "{names:?}");
    delete_kernel(&eg, &id).await;
}

#[tokio::test]
async fn eg_330_kernelspecs_from_repo() {
    let eg = Eg::start(EgOptions::default());
    let resp = http::request(&eg.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(resp.status, 200);
    let specs = resp.json();
    assert_eq!(specs["kernelspecs"]["python3"]["spec"]["language"], "python");
    let meta = &specs["kernelspecs"]["python3_meta"]["spec"];
    assert_eq!(meta["metadata"]["client_envs"], json!(["META_VAR"]));
    assert_eq!(meta["env"], json!({"SPEC_DEFAULT": "x"}));
}

/// EG 3.2.3 (no value checks on env) behind a base URL and a token, running a kernel over both protocols.
#[tokio::test]
async fn eg_323_starts_with_base_url_and_token() {
    let eg = Eg::start(EgOptions {
        version: "3.2.3",
        base_url: Some("/gw/".into()),
        auth_token: Some("t0ken".into()),
        ..Default::default()
    });
    assert!(eg.url.ends_with("/gw"), "{}", eg.url);
    let path = "/gw/api/kernelspecs";
    let denied = http::request(&eg.addr, "GET", path, &[], b"").await.unwrap();
    assert_eq!(denied.status, 401, "{}", denied.text());
    let resp = http::request(&eg.addr, "GET", path, &[("Authorization", "token t0ken")], b"").await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.json()["kernelspecs"]["python3_meta"].is_object(), "{}", resp.text());

    let id = start_kernel(&eg, &json!({"name": "python3", "env": {"KERNEL_FOO": "1", "NOT_ALLOWED": "x"}})).await;
    for protocol in [Protocol::Legacy, Protocol::V1] {
        let names = kernel_env_names(&eg, &id, protocol).await;
        assert!(has(&names, "KERNEL_FOO") && !has(&names, "NOT_ALLOWED"), "{protocol:?}: {names:?}");
    }
    delete_kernel(&eg, &id).await;
}
