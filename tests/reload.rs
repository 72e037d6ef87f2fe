//! Reload without a signal, against a real EG 3.3.0 with real kernels: the config file laid out
//! as a Kubernetes ConfigMap mount (`envgate.toml -> ..data/envgate.toml`, `..data -> ..2026_NN`,
//! swapped by renaming a new `..data` symlink over the old one) is watched; `POST /-/reload` and
//! `GET /-/policy` on the admin listener.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::eg::{free_port, Eg, EgOptions};
use support::envgate::Envgate;
use support::http::{request, Response};
use support::kernel::{KernelWs, Protocol};

const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";
const EG_TOKEN: &str = "eg-secret-token-4b1d";

/// Writes `text` as a new ConfigMap generation `..{generation}` and swaps `..data` to it, as the
/// kubelet does: a fresh directory, a new symlink, one `rename` over the old one.
fn publish(dir: &Path, generation: &str, text: &str) {
    let data = dir.join(format!("..{generation}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("envgate.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn config(client_envs: &str) -> String {
    format!("upstream_token = \"{EG_TOKEN}\"\nclient_envs = [\"{client_envs}\"]\n")
}

async fn start_kernel(addr: &str, env: Value) -> Response {
    let body = serde_json::to_vec(&json!({"name": "python3", "env": env})).unwrap();
    request(addr, "POST", "/api/kernels", &[], &body).await.unwrap()
}

fn id_of(r: &Response) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

async fn open(addr: &str, id: &str) -> KernelWs {
    let url = format!("ws://{addr}/api/kernels/{id}/channels");
    let mut ws = KernelWs::connect(&url, &[], Protocol::Legacy).await.unwrap();
    ws.wait_ready().await.unwrap();
    ws
}

/// The names of the test's variables that reached the kernel.
async fn test_vars(ws: &mut KernelWs) -> Vec<String> {
    let out = ws.execute(PRINT_ENV).await.unwrap();
    let env: BTreeMap<String, String> = serde_json::from_str(out.trim()).unwrap();
    env.into_keys().filter(|k| ["FIRST", "SECOND", "THIRD"].contains(&k.as_str())).collect()
}

async fn metrics(admin: &str) -> String {
    request(admin, "GET", "/metrics", &[], b"").await.unwrap().text()
}

/// Waits (up to 15 s) until `/metrics` has the line `line`.
async fn wait_metric(admin: &str, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = metrics(admin).await;
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{line}` in:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit record of the decision `r` answers.
fn record_of(gate: &Envgate, r: &Response) -> Value {
    let id = r.header("x-envgate-decision").unwrap_or_else(|| panic!("no decision id: {}", r.text())).to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(rec) = gate.audit(0).into_iter().find(|rec| rec["id"] == id.as_str()) {
            return rec;
        }
        assert!(Instant::now() < deadline, "no audit record {id}:\n{}", gate.audit_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn policy(admin: &str) -> Value {
    let r = request(admin, "GET", "/-/policy", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains(EG_TOKEN), "the token in /-/policy: {}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_swap_reloads_without_a_signal_and_the_admin_listener_reloads_and_shows_the_policy() {
    let eg = Eg::start(EgOptions {
        client_envs: vec!["*".into()],
        auth_token: Some(EG_TOKEN.into()),
        extra_env: vec![("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    publish(d, "2026_01", &config("FIRST"));
    std::os::unix::fs::symlink("..data/envgate.toml", d.join("envgate.toml")).unwrap();
    let cfg = d.join("envgate.toml");
    let admin = format!("127.0.0.1:{}", free_port());
    let gate = Envgate::start(
        &eg.url,
        &["--config", cfg.to_str().unwrap(), "--admin-listen", &admin, "--config-watch-interval", "200ms"],
    );

    // What envgate check prints, as JSON, without the token.
    let first = policy(&admin).await;
    assert_eq!(first["settings"]["client_envs"], json!(["FIRST"]));
    assert_eq!(first["settings"]["upstream_token"], "<set>");
    assert_eq!(first["settings"]["mode"], "drop");
    assert_eq!(first["settings"]["config_watch_interval"], "200ms");
    assert!(first["settings"]["deny_envs"].as_array().unwrap().contains(&json!("LD_PRELOAD")));
    let h1 = first["policy_hash"].as_str().unwrap().to_string();
    for (method, path) in [("GET", "/-/reload"), ("POST", "/-/policy")] {
        let r = request(&admin, method, path, &[], b"").await.unwrap();
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
    }
    let m = metrics(&admin).await;
    assert!(m.lines().any(|l| l == "envgate_config_last_reload_successful 1"), "{m}");

    let id1 = id_of(&start_kernel(&gate.addr, json!({"FIRST": "1", "SECOND": "2"})).await);
    let mut ws1 = open(&gate.addr, &id1).await;
    assert_eq!(test_vars(&mut ws1).await, ["FIRST"]);

    // The ConfigMap is updated: no signal, the watch reloads.
    publish(d, "2026_02", &config("SECOND"));
    std::fs::remove_dir_all(d.join("..2026_01")).unwrap();
    wait_metric(&admin, "envgate_config_reloads_total{trigger=\"file\",result=\"ok\"} 1").await;
    assert!(gate.log().contains("\"trigger\":\"file\""), "{}", gate.log());
    let second = policy(&admin).await;
    assert_eq!(second["settings"]["client_envs"], json!(["SECOND"]));
    let h2 = second["policy_hash"].as_str().unwrap().to_string();
    assert_ne!(h1, h2);
    assert!(gate.log().contains(&h2), "the reload's log line names the new policy");
    // The open WebSocket still runs code; a new start obeys the new policy.
    assert_eq!(ws1.execute("print(6 * 7)").await.unwrap().trim(), "42");
    let r2 = start_kernel(&gate.addr, json!({"FIRST": "1", "SECOND": "2"})).await;
    let id2 = id_of(&r2);
    let mut ws2 = open(&gate.addr, &id2).await;
    assert_eq!(test_vars(&mut ws2).await, ["SECOND"]);
    let rec = record_of(&gate, &r2);
    let names = |list: &Value| -> Vec<String> {
        list.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!((names(&rec["kept"]), names(&rec["rejected"])), (vec!["SECOND".into()], vec!["FIRST".into()]), "{rec}");

    // A broken configuration: POST /-/reload names the error; the old policy stays in force.
    publish(d, "2026_03", &format!("{}mode = \"sometimes\"\n", config("THIRD")));
    let r = request(&admin, "POST", "/-/reload", &[], b"").await.unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("`mode`"), "{}", r.text());
    assert!(r.json()["reason"].is_string());
    assert!(!r.text().contains(EG_TOKEN));
    assert_eq!(policy(&admin).await["policy_hash"], h2.as_str());
    let m = metrics(&admin).await;
    assert!(m.lines().any(|l| l == "envgate_config_last_reload_successful 0"), "{m}");
    assert!(m.lines().any(|l| l == "envgate_config_reloads_total{trigger=\"http\",result=\"error\"} 1"), "{m}");
    assert!(gate.log().contains("reload failed"), "{}", gate.log());
    let id3 = id_of(&start_kernel(&gate.addr, json!({"SECOND": "2", "THIRD": "3"})).await);
    let mut ws3 = open(&gate.addr, &id3).await;
    assert_eq!(test_vars(&mut ws3).await, ["SECOND"]);

    // Fixed: POST /-/reload loads it and answers the new policy's hash.
    publish(d, "2026_04", &config("THIRD"));
    let r = request(&admin, "POST", "/-/reload", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let h4 = r.json()["policy_hash"].as_str().unwrap().to_string();
    assert_eq!(policy(&admin).await["policy_hash"], h4.as_str());
    assert_eq!(policy(&admin).await["settings"]["client_envs"], json!(["THIRD"]));
    let m = metrics(&admin).await;
    assert!(m.lines().any(|l| l == "envgate_config_last_reload_successful 1"), "{m}");
    assert!(m.lines().any(|l| l == "envgate_config_reloads_total{trigger=\"http\",result=\"ok\"} 1"), "{m}");
    assert!(m.contains("envgate_config_last_reload_success_timestamp_seconds "), "{m}");
    // What SIGHUP or POST /-/reload loaded, the watch does not load again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = metrics(&admin).await;
    assert!(m.lines().any(|l| l == "envgate_config_reloads_total{trigger=\"file\",result=\"ok\"} 1"), "{m}");
    assert!(!m.contains("trigger=\"file\",result=\"error\""), "{m}");
    assert_eq!(ws1.execute("print('still here')").await.unwrap().trim(), "still here");
    assert!(!gate.log().contains(EG_TOKEN), "the token in the log");

    for ws in [ws1, ws2, ws3] {
        ws.close().await;
    }
    for id in [id1, id2, id3] {
        let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
    }
}

/// A file the configuration names (here the upstream token file, given as a flag, with no config
/// file at all) is watched too: a new content reloads, a touch does not. `/-/policy` shows its
/// path, never its content. Concurrent `POST /-/reload`s all succeed, one after the other. No EG
/// needed: nothing here goes upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_named_file_is_watched_a_touch_is_not_a_change_and_concurrent_reloads_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token-0a9\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let gate = Envgate::start(
        &upstream,
        &[
            "--upstream-token-file",
            token.to_str().unwrap(),
            "--admin-listen",
            &admin,
            "--config-watch-interval",
            "100ms",
        ],
    );
    let p = policy(&admin).await;
    assert_eq!(p["settings"]["upstream_token_file"], token.to_str().unwrap());
    assert!(!p.to_string().contains("first-token"), "{p}");

    std::fs::write(&token, "second-token-7c2\n").unwrap();
    wait_metric(&admin, "envgate_config_reloads_total{trigger=\"file\",result=\"ok\"} 1").await;
    let p = policy(&admin).await;
    assert!(!p.to_string().contains("second-token"), "{p}");

    // Same content, new modification time: no reload.
    let f = std::fs::File::options().write(true).open(&token).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = metrics(&admin).await;
    assert!(m.lines().any(|l| l == "envgate_config_reloads_total{trigger=\"file\",result=\"ok\"} 1"), "{m}");

    let answers = futures_util::future::join_all(
        (0..8).map(|_| async { request(&admin, "POST", "/-/reload", &[], b"").await.unwrap() }),
    )
    .await;
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["policy_hash"], p["policy_hash"]);
    }
    wait_metric(&admin, "envgate_config_reloads_total{trigger=\"http\",result=\"ok\"} 8").await;
    let log = gate.log();
    assert!(!log.contains("first-token") && !log.contains("second-token"), "a token in the log");
}
