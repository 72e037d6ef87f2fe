//! The clients people actually run, end to end: a real Jupyter server (jupyter_server 2.21.1, jupyter_server
//! 1.24.0, notebook 6.5.7; pinned in `clients/`) as a gateway client pointed at envgate, envgate in front of
//! a real EG 3.3.0 that forwards whatever it gets (`EG_CLIENT_ENVS='*'`), so envgate alone decides.
//!
//! Each test drives the Jupyter server's own REST API and channels WebSocket as a browser would (kernels
//! and sessions are created on the Jupyter server, which starts them on EG), prints the kernel's
//! environment from inside the kernel, and checks it against envgate's audit log. Also runs the unit tests
//! of `clients/python` (envgate-client) and shows it following envgate's policy with no client config.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::http::request;
use support::jupyter::{self, Client, Jupyter, JupyterOptions};
use support::kernel::{run_code, Protocol};

/// Prints the kernel's whole environment as one JSON object.
const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";

/// A secret in EG's own process environment: must never reach a kernel.
const EG_SECRET: (&str, &str) = ("EG_ONLY_SECRET", "eg-process-secret");

/// The line that enables envgate-client (documented in clients/python/README.md).
const ENVGATE_CLIENT_ARG: &str =
    "--GatewayMappingKernelManager.kernel_manager_class=envgate_client.EnvgateKernelManager";

/// EG as the README says to run it behind envgate, with an optional `auth_token`.
fn eg(auth_token: Option<&str>) -> Eg {
    Eg::start(EgOptions {
        client_envs: vec!["*".into()],
        auth_token: auth_token.map(str::to_string),
        // EG_LIST_KERNELS: Jupyter lists the gateway's kernels (GET /api/kernels), which EG refuses by default.
        extra_env: vec![(EG_SECRET.0.into(), EG_SECRET.1.into()), ("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    })
}

/// Variables every test's Jupyter server holds besides its base environment. KERNEL_LAUNCH_TIMEOUT is set
/// up front because the gateway clients otherwise only add it to their environment after their first
/// gateway request, which would make the first kernel start differ from the others.
fn client_env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("KERNEL_USERNAME".to_string(), "alice".to_string()),
        ("KERNEL_LAUNCH_TIMEOUT".into(), "60".into()),
        ("SECRET_TOKEN".into(), "client-secret-value".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "client-aws-value".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// POSTs JSON to the Jupyter server's REST API (with its token), expects 201.
async fn jupyter_post(j: &Jupyter, path: &str, body: Value) -> Value {
    let (h, v) = j.auth();
    let r =
        request(&j.addr, "POST", path, &[(h, &v), ("Content-Type", "application/json")], body.to_string().as_bytes())
            .await
            .unwrap();
    assert_eq!(r.status, 201, "POST {path}: {}\n--- Jupyter log ---\n{}", r.text(), j.log());
    r.json()
}

async fn jupyter_delete(j: &Jupyter, path: &str) {
    let (h, v) = j.auth();
    let r = request(&j.addr, "DELETE", path, &[(h, &v)], b"").await.unwrap();
    assert_eq!(r.status, 204, "DELETE {path}: {}", r.text());
}

/// `POST /api/kernels` on the Jupyter server; returns the kernel id (the same id on EG).
async fn create_kernel(j: &Jupyter, kernelspec: &str) -> String {
    let v = jupyter_post(j, "/api/kernels", json!({ "name": kernelspec })).await;
    v["id"].as_str().unwrap().to_string()
}

/// `POST /api/sessions` on the Jupyter server, as a notebook opening does; returns (session id, kernel id).
async fn create_session(j: &Jupyter, path: &str, kernelspec: &str) -> (String, String) {
    let v = jupyter_post(
        j,
        "/api/sessions",
        json!({ "path": path, "name": path, "type": "notebook", "kernel": { "name": kernelspec } }),
    )
    .await;
    (v["id"].as_str().unwrap().to_string(), v["kernel"]["id"].as_str().unwrap().to_string())
}

/// The kernel's environment, read over the Jupyter server's channels WebSocket (which it relays to EG).
async fn kernel_env(j: &Jupyter, kernel_id: &str, protocol: Protocol) -> BTreeMap<String, String> {
    let (h, v) = j.auth();
    let url = j.channels_url(kernel_id);
    let out = run_code(&url, &[(h, &v)], protocol, PRINT_ENV)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}\n--- Jupyter log ---\n{}", j.log()));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed no JSON ({e}): {out}"))
}

/// Names a kernel has when the client sends no env at all (EG's and ipykernel's own), read from a kernel
/// started straight through envgate with `"env": {}`. What a client's kernel has beyond these came from it.
async fn baseline_names(gate: &Envgate, eg: &Eg) -> BTreeSet<String> {
    let auth = eg.auth_headers();
    let mut headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    headers.push(("Content-Type", "application/json"));
    let r = request(&gate.addr, "POST", "/api/kernels", &headers, br#"{"name":"python3","env":{}}"#).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    let out = run_code(&url, &headers[..headers.len() - 1], Protocol::Legacy, PRINT_ENV).await.unwrap();
    let env: BTreeMap<String, String> = serde_json::from_str(out.trim()).unwrap();
    let r =
        request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &headers[..headers.len() - 1], b"").await.unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    env.into_keys().collect()
}

/// The audit record of the kernel start that created `kernel_id`.
fn record(gate: &Envgate, kernel_id: &str) -> Value {
    let recs = gate.audit(1);
    recs.iter()
        .find(|r| r["kernel_id"] == kernel_id)
        .cloned()
        .unwrap_or_else(|| panic!("no audit record for kernel {kernel_id}:\n{}", gate.audit_text()))
}

/// `kept` of an audit record as name -> source.
fn kept(rec: &Value) -> BTreeMap<String, String> {
    pairs(&rec["kept"], "source")
}

/// `rejected` of an audit record as name -> reason.
fn rejected(rec: &Value) -> BTreeMap<String, String> {
    pairs(&rec["rejected"], "reason")
}

fn pairs(list: &Value, field: &str) -> BTreeMap<String, String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap().to_string(), x[field].as_str().unwrap().to_string()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Checks one kernel: exactly `expect_new` (name -> value), plus the KERNEL_LAUNCH_TIMEOUT every test's
/// server sends, reached it beyond the baseline, and none of `never` did.
fn assert_kernel_env(
    env: &BTreeMap<String, String>,
    baseline: &BTreeSet<String>,
    expect_new: &BTreeMap<String, String>,
    never: &[&str],
    what: &str,
) {
    let new: BTreeMap<String, String> =
        env.iter().filter(|(k, _)| !baseline.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut expect = expect_new.clone();
    expect.insert("KERNEL_LAUNCH_TIMEOUT".into(), "60".into());
    assert_eq!(new, expect, "{what}: names that reached the kernel beyond the baseline");
    for name in never.iter().chain([&EG_SECRET.0]) {
        assert!(!env.contains_key(*name), "{what}: {name} reached the kernel");
    }
    assert_eq!(env.get("KERNEL_USERNAME").map(String::as_str), Some("alice"), "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jupyter_server_2_sends_allowed_envs_with_tokens_and_custom_headers() {
    let eg = eg(Some("eg-token-2x"));
    let gate = Envgate::start(&eg.url, &["--client-envs", "TEAM_SETTING"]);
    let baseline = baseline_names(&gate, &eg).await;
    let mut opts = JupyterOptions::new(Client::JupyterServer2, &gate.url());
    // The admin's hand-kept list: one name envgate allows, one it does not.
    opts.allowed_envs = Some(vec!["TEAM_SETTING".into(), "LOCAL_ONLY".into()]);
    opts.auth_token = Some("eg-token-2x".into());
    // A custom header the audit log shows: as if a front proxy tagged the user's address.
    opts.headers = vec![("X-Forwarded-For".into(), "203.0.113.7".into())];
    opts.env = client_env(&[("TEAM_SETTING", "team"), ("LOCAL_ONLY", "local")]);
    let j = Jupyter::start(opts);

    let kernel = create_kernel(&j, "python3").await;
    let (session, session_kernel) = create_session(&j, "analysis.ipynb", "python3").await;
    // Legacy framing: in gateway mode jupyter_server 2.x does not offer the v1 subprotocol (JupyterLab then
    // falls back to legacy JSON frames too).
    for (id, in_session) in [(&kernel, false), (&session_kernel, true)] {
        let what = format!("jupyter_server 2.x kernel {id}");
        let env = kernel_env(&j, id, Protocol::Legacy).await;
        let mut expect = map(&[("TEAM_SETTING", "team")]);
        if in_session {
            // The notebook's directory, so the kernel starts next to it.
            expect.insert("KERNEL_WORKING_DIR".into(), j.root_dir().display().to_string());
        }
        assert_kernel_env(&env, &baseline, &expect, &["LOCAL_ONLY", "SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY"], &what);

        let rec = record(&gate, id);
        assert_eq!(rec["user"], "alice");
        assert_eq!(rec["x_forwarded_for"], "203.0.113.7", "the custom header reached envgate");
        assert_eq!(rec["status"], 201);
        let mut want_kept = map(&[
            ("TEAM_SETTING", "config"),
            ("KERNEL_USERNAME", "prefix:KERNEL_"),
            ("KERNEL_LAUNCH_TIMEOUT", "prefix:KERNEL_"),
        ]);
        if in_session {
            want_kept.insert("KERNEL_WORKING_DIR".into(), "prefix:KERNEL_".into());
        }
        assert_eq!(kept(&rec), want_kept, "{what}");
        assert_eq!(rejected(&rec), map(&[("LOCAL_ONLY", "not_allowed")]), "{what}");
    }
    jupyter_delete(&j, &format!("/api/sessions/{session}")).await;
    jupyter_delete(&j, &format!("/api/kernels/{kernel}")).await;
    assert!(!gate.audit_text().contains("client-secret-value"));
}

#[tokio::test(flavor = "multi_thread")]
async fn jupyter_server_1_24_sends_its_whole_environment_and_envgate_tames_it() {
    let eg = eg(None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "TEAM_SETTING"]);
    let baseline = baseline_names(&gate, &eg).await;
    let mut opts = JupyterOptions::new(Client::JupyterServer124, &gate.url());
    opts.env = client_env(&[("TEAM_SETTING", "team")]);
    let j = Jupyter::start(opts);

    // Opening a notebook: jupyter_server 1.24 posts {**os.environ, JPY_SESSION_NAME} to the gateway.
    let (session, kernel) = create_session(&j, "report.ipynb", "python3").await;
    let env = kernel_env(&j, &kernel, Protocol::Legacy).await;
    // Everything the server sent that the policy does not allow: its whole environment but for two names.
    let sent_not_allowed: Vec<&str> = j
        .process_env
        .keys()
        .map(String::as_str)
        .chain(["JPY_SESSION_NAME"])
        .filter(|n| *n != "TEAM_SETTING" && !n.starts_with("KERNEL_"))
        .collect();
    let root = j.root_dir().display().to_string();
    assert_kernel_env(
        &env,
        &baseline,
        &map(&[("TEAM_SETTING", "team"), ("KERNEL_WORKING_DIR", &root)]),
        &sent_not_allowed,
        "jupyter_server 1.24 session kernel",
    );
    assert_ne!(env.get("PATH"), j.process_env.get("PATH"), "the server's PATH reached the kernel");

    // The audit log lists every other name the server sent: its whole environment.
    let rec = record(&gate, &kernel);
    assert_eq!(rec["user"], "alice");
    assert_eq!(
        kept(&rec),
        map(&[
            ("TEAM_SETTING", "config"),
            ("KERNEL_USERNAME", "prefix:KERNEL_"),
            ("KERNEL_LAUNCH_TIMEOUT", "prefix:KERNEL_"),
            ("KERNEL_WORKING_DIR", "prefix:KERNEL_"),
        ])
    );
    let want_rejected: BTreeMap<String, String> = sent_not_allowed
        .iter()
        .map(|n| (n.to_string(), if *n == "PATH" { "denied" } else { "not_allowed" }.to_string()))
        .collect();
    assert_eq!(rejected(&rec), want_rejected);
    for secret in ["SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY", "HOME", "PATH"] {
        assert!(want_rejected.contains_key(secret), "{secret}");
    }
    assert!(!gate.audit_text().contains("client-secret-value"), "a value in the audit log");

    // The admin's view of the same log: `envgate audit summarize -` names what the legacy client sends.
    let summary = summarize(&gate.audit_text());
    let alice = summary.split("\n\n").find(|b| b.starts_with("user alice: 1 record\n")).expect(&summary);
    for row in ["rejected  PATH ", "rejected  SECRET_TOKEN ", "rejected  HOME ", "kept      TEAM_SETTING "] {
        let line =
            alice.lines().find(|l| l.starts_with(&format!("  {row}"))).unwrap_or_else(|| panic!("{row}: {alice}"));
        assert!(line.ends_with(" 1/1"), "{line}");
    }
    jupyter_delete(&j, &format!("/api/sessions/{session}")).await;
}

/// `envgate audit summarize -` on `log`, as text.
fn summarize(log: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(support::envgate::bin())
        .args(["audit", "summarize", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(log.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The control for the test above: the same client straight against EG leaks its secrets into kernels.
#[tokio::test(flavor = "multi_thread")]
async fn jupyter_server_1_24_without_envgate_leaks_its_environment() {
    let eg = eg(None);
    let mut opts = JupyterOptions::new(Client::JupyterServer124, &eg.url);
    opts.env = client_env(&[]);
    let j = Jupyter::start(opts);
    let (session, kernel) = create_session(&j, "report.ipynb", "python3").await;
    let env = kernel_env(&j, &kernel, Protocol::Legacy).await;
    assert_eq!(env.get("SECRET_TOKEN").map(String::as_str), Some("client-secret-value"));
    assert_eq!(env.get("PATH"), j.process_env.get("PATH"));
    jupyter_delete(&j, &format!("/api/sessions/{session}")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notebook_6_5_sends_its_env_whitelist() {
    let eg = eg(None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "TEAM_SETTING"]);
    let baseline = baseline_names(&gate, &eg).await;
    let mut opts = JupyterOptions::new(Client::Notebook65, &gate.url());
    opts.allowed_envs = Some(vec!["TEAM_SETTING".into(), "LOCAL_ONLY".into()]);
    opts.env = client_env(&[("TEAM_SETTING", "team"), ("LOCAL_ONLY", "local")]);
    let j = Jupyter::start(opts);

    let kernel = create_kernel(&j, "python3").await;
    let (session, session_kernel) = create_session(&j, "nb.ipynb", "python3").await;
    for (id, cwd) in [(&kernel, false), (&session_kernel, true)] {
        let what = format!("notebook 6.5 kernel {id}");
        let env = kernel_env(&j, id, Protocol::Legacy).await;
        let mut expect = map(&[("TEAM_SETTING", "team")]);
        let mut want_kept = map(&[
            ("TEAM_SETTING", "config"),
            ("KERNEL_USERNAME", "prefix:KERNEL_"),
            ("KERNEL_LAUNCH_TIMEOUT", "prefix:KERNEL_"),
        ]);
        if cwd {
            expect.insert("KERNEL_WORKING_DIR".into(), j.root_dir().display().to_string());
            want_kept.insert("KERNEL_WORKING_DIR".into(), "prefix:KERNEL_".into());
        }
        assert_kernel_env(&env, &baseline, &expect, &["LOCAL_ONLY", "SECRET_TOKEN"], &what);
        let rec = record(&gate, id);
        assert_eq!(kept(&rec), want_kept, "{what}");
        assert_eq!(rejected(&rec), map(&[("LOCAL_ONLY", "not_allowed")]), "{what}");
    }
    jupyter_delete(&j, &format!("/api/sessions/{session}")).await;
    jupyter_delete(&j, &format!("/api/kernels/{kernel}")).await;
}

/// envgate-client, enabled by one config line and with no `allowed_envs`: the client sends what envgate
/// publishes for the kernelspec, so changing envgate's `--client-envs` changes what it sends.
#[tokio::test(flavor = "multi_thread")]
async fn envgate_client_follows_envgate_policy_without_client_config() {
    let eg = eg(Some("eg-token-ec"));
    let gate = Envgate::start(&eg.url, &["--client-envs", "A_SETTING"]);
    let addr = gate.addr.clone();
    let baseline = baseline_names(&gate, &eg).await;
    let mut opts = JupyterOptions::new(Client::JupyterServer2, &gate.url());
    opts.envgate_client = true;
    opts.extra_args = vec![ENVGATE_CLIENT_ARG.into()];
    opts.auth_token = Some("eg-token-ec".into());
    opts.env = client_env(&[("A_SETTING", "a"), ("B_SETTING", "b"), ("META_VAR", "m")]);
    let j = Jupyter::start(opts);
    let never = ["SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY", "HOME", "PYTHONPATH"];
    let kernel_names = [("KERNEL_USERNAME", "prefix:KERNEL_"), ("KERNEL_LAUNCH_TIMEOUT", "prefix:KERNEL_")];

    // Policy 1: A_SETTING everywhere; python3_meta also allows META_VAR (its own metadata.client_envs).
    let k1 = create_kernel(&j, "python3").await;
    let env = kernel_env(&j, &k1, Protocol::Legacy).await;
    assert_kernel_env(&env, &baseline, &map(&[("A_SETTING", "a")]), &[&never[..], &["B_SETTING"]].concat(), "policy 1");
    let rec = record(&gate, &k1);
    assert_eq!(kept(&rec), map(&[&[("A_SETTING", "config")][..], &kernel_names].concat()));
    assert_eq!(rejected(&rec), map(&[]), "the client sent a name the policy does not allow");

    let k2 = create_kernel(&j, "python3_meta").await;
    let rec = record(&gate, &k2);
    assert_eq!(
        kept(&rec),
        map(&[&[("A_SETTING", "config"), ("META_VAR", "kernelspec_metadata")][..], &kernel_names].concat())
    );
    assert_eq!(rejected(&rec), map(&[]));
    jupyter_delete(&j, &format!("/api/kernels/{k1}")).await;
    jupyter_delete(&j, &format!("/api/kernels/{k2}")).await;

    // Policy 2: the admin swaps A_SETTING for B_SETTING and restarts envgate at the same address. The
    // Jupyter server keeps running, untouched. (Another test could grab the port in between; bind(0)
    // hands out recently freed ports rarely enough not to matter.)
    drop(gate);
    let gate = Envgate::start(&eg.url, &["--listen", &addr, "--client-envs", "B_SETTING"]);
    let k3 = create_kernel(&j, "python3").await;
    let env = kernel_env(&j, &k3, Protocol::Legacy).await;
    assert_kernel_env(&env, &baseline, &map(&[("B_SETTING", "b")]), &[&never[..], &["A_SETTING"]].concat(), "policy 2");
    let rec = record(&gate, &k3);
    assert_eq!(kept(&rec), map(&[&[("B_SETTING", "config")][..], &kernel_names].concat()));
    assert_eq!(rejected(&rec), map(&[]));
    jupyter_delete(&j, &format!("/api/kernels/{k3}")).await;
}

/// The package's own unit tests (`python -m unittest`), against the package as pip installs it.
#[test]
fn envgate_client_unit_tests() {
    let venv = jupyter::venv(Client::JupyterServer2);
    let dir = tempfile::Builder::new().prefix("envgate-client-unit-").tempdir().unwrap();
    let site = jupyter::install_envgate_client(&venv, dir.path());
    let tests = support::eg::repo_path("clients/python/tests");
    let out = std::process::Command::new(venv.join("bin/python"))
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python -m unittest failed:\n{log}");
    assert!(!log.contains("skipped"), "tests were skipped:\n{log}");
    let ran: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split_whitespace().next()?.parse().ok())
        .expect("a 'Ran N tests' line");
    assert!(ran >= 10, "only {ran} tests ran:\n{log}");
}
