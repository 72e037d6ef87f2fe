//! Every source of allowed names, each shown changing what envgate injects as
//! `spec.metadata.client_envs` and what reaches a real kernel on a real EG; and `envgate explain`
//! giving the same verdicts as the proxy.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{json, Value};
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::http::request;
use support::kernel::{run_code, Protocol};

/// A kernelspec with a process-proxy config holding both proposed spellings of "plan C".
fn plan_c_spec() -> Value {
    json!({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "plan C",
        "language": "python",
        "env": {},
        "metadata": {"process_proxy": {
            "class_name": "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy",
            "config": {"forwarded_envs": ["PP_VAR"], "forward_env": ["PP_OLD"]}
        }}
    })
}

fn eg() -> Eg {
    eg_with(&["*"])
}

fn eg_with(client_envs: &[&str]) -> Eg {
    Eg::start(EgOptions {
        client_envs: client_envs.iter().map(|s| s.to_string()).collect(),
        kernelspecs: vec![("plan_c".into(), plan_c_spec())],
        ..EgOptions::default()
    })
}

async fn injected(gate: &Envgate) -> BTreeMap<String, Value> {
    let r = request(&gate.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    v["kernelspecs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, e)| (k.clone(), e["spec"]["metadata"]["client_envs"].clone()))
        .collect()
}

/// Starts `kernelspec` through envgate with `env`, returns the kernel's environment and the audit
/// record's `kept` sources by name.
async fn start(gate: &Envgate, kernelspec: &str, env: Value) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let body = serde_json::to_vec(&json!({"name": kernelspec, "env": env})).unwrap();
    let r = request(&gate.addr, "POST", "/api/kernels", &[], &body).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    let out =
        run_code(&url, &[], Protocol::Legacy, "import os, json; print(json.dumps(dict(os.environ)))").await.unwrap();
    let kernel_env: BTreeMap<String, String> = serde_json::from_str(out.trim()).unwrap();
    let rec =
        gate.audit(1).into_iter().find(|r| r["kernel_id"] == id.as_str()).expect("an audit record for the kernel");
    let kept = rec["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap().to_string(), k["source"].as_str().unwrap().to_string()))
        .collect();
    let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
    assert_eq!(r.status, 204);
    (kernel_env, kept)
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    m.get(k).map(String::as_str)
}

#[tokio::test(flavor = "multi_thread")]
async fn defaults_use_config_and_kernelspec_metadata_only() {
    let eg = eg();
    let gate = Envgate::start(&eg.url, &["--client-envs", "GLOBAL"]);
    let inj = injected(&gate).await;
    assert_eq!(inj["python3_meta"], json!(["GLOBAL", "META_VAR"]));
    assert_eq!(inj["plan_c"], json!(["GLOBAL"]));
    let (env, kept) = start(&gate, "python3_meta", json!({"META_VAR": "m", "SPEC_DEFAULT": "client"})).await;
    assert_eq!(get(&env, "META_VAR"), Some("m"));
    // The client may not override the spec's own default: EG's stanza value stays.
    assert_eq!(get(&env, "SPEC_DEFAULT"), Some("x"));
    assert_eq!(get(&kept, "META_VAR"), Some("kernelspec_metadata"));
    let (env, _) = start(&gate, "plan_c", json!({"PP_VAR": "p"})).await;
    assert_eq!(get(&env, "PP_VAR"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_b_and_plan_c_when_turned_on_and_metadata_when_turned_off() {
    // EG applies a client's value over the kernelspec's env stanza only for names listed in its own
    // client_envs (its `user_overrides`; `*` does not count), so plan B needs the names listed in EG.
    let eg = eg_with(&["SPEC_DEFAULT", "META_VAR", "PP_VAR", "PP_OLD", "OTHER"]);
    let gate = Envgate::start(
        &eg.url,
        &["--kernelspec-metadata", "false", "--kernelspec-env", "true", "--process-proxy-envs", "true"],
    );
    let inj = injected(&gate).await;
    assert_eq!(inj["python3_meta"], json!(["SPEC_DEFAULT"]));
    assert_eq!(inj["plan_c"], json!(["PP_OLD", "PP_VAR"]));
    assert_eq!(inj["python3"], json!([]));

    let (env, kept) = start(&gate, "python3_meta", json!({"META_VAR": "m", "SPEC_DEFAULT": "client"})).await;
    assert_eq!(get(&env, "SPEC_DEFAULT"), Some("client"), "plan B: the client overrides the stanza's default");
    assert_eq!(get(&env, "META_VAR"), None, "metadata source is off");
    assert_eq!(get(&kept, "SPEC_DEFAULT"), Some("kernelspec_env"));

    let (env, kept) = start(&gate, "plan_c", json!({"PP_VAR": "p", "PP_OLD": "o", "OTHER": "x"})).await;
    assert_eq!((get(&env, "PP_VAR"), get(&env, "PP_OLD"), get(&env, "OTHER")), (Some("p"), Some("o"), None));
    assert_eq!(get(&kept, "PP_VAR"), Some("process_proxy"));
    assert_eq!(get(&kept, "PP_OLD"), Some("process_proxy"));
}

#[tokio::test(flavor = "multi_thread")]
async fn egs_own_settings_are_inherited_when_asked() {
    let eg = eg();
    let gate = Envgate::start_with_env(
        &eg.url,
        &["--inherit-eg-env-config"],
        &[("EG_CLIENT_ENVS", "INHERITED"), ("EG_ENV_WHITELIST", "IGNORED_OLD_NAME")],
    );
    assert_eq!(injected(&gate).await["python3"], json!(["INHERITED"]));
    let (env, kept) = start(&gate, "python3", json!({"INHERITED": "i", "IGNORED_OLD_NAME": "n"})).await;
    assert_eq!((get(&env, "INHERITED"), get(&env, "IGNORED_OLD_NAME")), (Some("i"), None));
    assert_eq!(get(&kept, "INHERITED"), Some("eg_config"));

    // The deprecated name when the new one is unset; and "*" means every name, deny_envs still wins.
    let old = Envgate::start_with_env(&eg.url, &["--inherit-eg-env-config"], &[("EG_ENV_WHITELIST", "*")]);
    assert_eq!(injected(&old).await["python3"], json!(["*"]));
    let (env, kept) = start(&old, "python3", json!({"ANY_NAME": "a", "LD_PRELOAD": "/tmp/x.so"})).await;
    assert_eq!((get(&env, "ANY_NAME"), get(&env, "LD_PRELOAD")), (Some("a"), None));
    assert_eq!(get(&kept, "ANY_NAME"), Some("eg_config"));

    // Without the switch, EG's variables in envgate's environment mean nothing.
    let off = Envgate::start_with_env(&eg.url, &[], &[("EG_CLIENT_ENVS", "INHERITED")]);
    assert_eq!(injected(&off).await["python3"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn extra_prefixes_and_the_builtin_one_turned_off() {
    let eg = eg();
    let gate = Envgate::start(
        &eg.url,
        &["--allow-prefixes", "SPARK_", "--kernel-prefix", "false", "--client-envs", "KERNEL_USERNAME"],
    );
    let (env, kept) =
        start(&gate, "python3", json!({"SPARK_HOME": "/opt/spark", "KERNEL_FOO": "f", "KERNEL_USERNAME": "alice"}))
            .await;
    assert_eq!(get(&env, "SPARK_HOME"), Some("/opt/spark"));
    assert_eq!(get(&env, "KERNEL_FOO"), None, "only listed KERNEL_* names pass");
    assert_eq!(get(&env, "KERNEL_USERNAME"), Some("alice"));
    assert_eq!(get(&kept, "SPARK_HOME"), Some("prefix:SPARK_"));
    assert_eq!(get(&kept, "KERNEL_USERNAME"), Some("config"));
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_gives_the_proxys_verdicts() {
    let eg = eg();
    let out = Command::new(support::envgate::bin())
        .args(["explain", "--upstream", &eg.url, "--client-envs", "GLOBAL", "--process-proxy-envs", "true"])
        .args(["--kernelspec", "plan_c", "--format", "json", "GLOBAL", "PP_VAR", "KERNEL_X", "PATH", "NOPE"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kernelspec"], "plan_c");
    assert_eq!(v["served"], true);
    assert_eq!(v["client_envs"], json!(["GLOBAL", "PP_OLD", "PP_VAR"]));
    let got: Vec<(String, String, String)> = v["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().into(),
                l["verdict"].as_str().unwrap().into(),
                l["by"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("GLOBAL", "kept", "config"),
        ("PP_VAR", "kept", "process_proxy"),
        ("KERNEL_X", "kept", "prefix:KERNEL_"),
        ("PATH", "rejected", "denied"),
        ("NOPE", "rejected", "not_allowed"),
    ];
    assert_eq!(got, want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())));

    // The proxy, configured the same way, audits the same verdicts.
    let gate = Envgate::start(&eg.url, &["--client-envs", "GLOBAL", "--process-proxy-envs", "true"]);
    let (_, kept) = start(&gate, "plan_c", json!({"GLOBAL": "g", "PP_VAR": "p", "KERNEL_X": "k", "NOPE": "n"})).await;
    for (name, verdict, by) in want {
        assert_eq!(get(&kept, name), (verdict == "kept").then_some(by), "{name}");
    }

    // The default kernelspec and the text format; a kernelspecs file instead of the upstream.
    let out =
        Command::new(support::envgate::bin()).args(["explain", "--upstream", &eg.url, "META_VAR"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernelspec \"python3\""), "{text}");
    assert!(text.contains("META_VAR  rejected  not_allowed"), "{text}");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kernelspecs.json");
    let out = Command::new(support::envgate::bin())
        .args(["explain", "--kernelspecs-file", file, "--upstream", "http://127.0.0.1:9", "KERNEL_A"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("KERNEL_A  kept      prefix:KERNEL_"));
}
