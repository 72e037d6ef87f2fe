//! `envgate explain` through the real binary: names, NAME=VALUE pairs and whole bodies (from a file
//! and from standard input), for an identity; and that what explain says it would forward is what a
//! running envgate forwards for the same body.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use support::envgate::Envgate;
use support::fake_upstream::{any_port, listen, read_head, SPECS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KERNELSPECS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kernelspecs.json");

/// Runs `envgate explain ARGS` with no ENVGATE_* from the developer's shell, feeding `stdin`.
fn explain(args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(support::envgate::bin());
    cmd.arg("explain").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("ENVGATE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("running envgate");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// `explain` against the kernelspecs fixture, with `config` (TOML) as its configuration.
fn explain_with(config: &str, args: &[&str], stdin: &[u8]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envgate.toml");
    std::fs::write(&path, format!("upstream = \"http://127.0.0.1:9\"\n{config}")).unwrap();
    let mut all = vec!["--config", path.to_str().unwrap(), "--kernelspecs-file", KERNELSPECS];
    all.extend_from_slice(args);
    explain(&all, stdin)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// explain's JSON output; the audit record it holds, if any, checked against the record's schema.
fn json_out(o: &Output) -> Value {
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out(o)));
    if let Some(audit) = v.get("request").and_then(|r| r.get("audit")) {
        support::envgate::valid_record(&audit.to_string());
    }
    v
}

const IDENTITY: &str = r#"
trusted_user_header = "X-Forwarded-User"
trusted_groups_header = "X-Forwarded-Groups"
client_envs = ["DEMO"]

[set_envs]
KERNEL_NAMESPACE = "jupyter-{user_dns}"

[users.alice]
client_envs = ["ALICE_VAR"]
deny_envs = ["DEMO"]

[users.mallory.set_envs]
KERNEL_UID = "0"

[groups.data-eng]
client_envs = ["SPARK_OPTS"]
[groups.data-eng.set_envs]
TEAM = "data-eng"

[groups.gpu]
priority = 10
kernelspecs = ["cuda"]
[groups.gpu.set_envs]
TEAM = "gpu"
"#;

#[test]
fn name_value_pairs_are_decided_as_a_kernel_start_with_the_value_rules() {
    // KERNEL_UID=0 breaks the built-in pattern: refused, 400, exit 1, the value never printed.
    let o = explain_with("", &["KERNEL_UID=0", "KERNEL_X=ok"], b"");
    assert_eq!(o.status.code(), Some(1), "{}{}", out(&o), err(&o));
    let text = out(&o);
    assert!(text.contains("refused: envgate would answer 400 Bad Request with:\n"), "{text}");
    assert!(text.contains(r#""violations":[{"name":"KERNEL_UID","rule":"pattern","detail":"#), "{text}");
    assert!(text.contains(r#""error":"value rules"}"#), "{text}");

    // A forbidden substring, in JSON: the error body and the audit record as the proxy writes them.
    let o =
        explain_with("client_envs = [\"FOO\"]\n", &["--format", "json", "FOO=a$(id)", "--kernelspec", "python3"], b"");
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let v = json_out(&o);
    let r = &v["request"];
    assert_eq!(r["outcome"], "refused");
    assert_eq!(r["status"], 400);
    assert_eq!(r["error_body"]["reason"], "Bad Request");
    assert_eq!(r["error_body"]["violations"][0]["rule"], "forbidden");
    assert!(!r["error_body"]["message"].as_str().unwrap().contains("$(id)"), "{r}");
    let a = &r["audit"];
    assert_eq!(
        (&a["id"], &a["timestamp"], &a["client"], &a["kernelspec"], &a["outcome"], &a["status"], &a["error"]),
        (
            &json!("00000000-00000000"),
            &json!("1970-01-01T00:00:00.000Z"),
            &json!("0.0.0.0:0"),
            &json!("python3"),
            &json!("refused"),
            &json!(400),
            &json!("value rules")
        )
    );
    assert_eq!(a["violations"], json!([{"name": "FOO", "rule": "forbidden"}]));
    assert_eq!(v["explanation"]["names"][0]["verdict"], "kept");

    // Accepted values: forwarded, exit 0, the body exactly; names the policy drops are gone.
    let o = explain_with("", &["KERNEL_UID=1000", "PATH=/x", "--kernelspec", "python3"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("forwarded: envgate would send this body upstream:\n{\"name\":\"python3\",\"env\":{\"KERNEL_UID\":\"1000\"}}\n"), "{}", out(&o));
    assert!(out(&o).contains("PATH        rejected  denied (deny_envs of global)"), "{}", out(&o));

    // Names and pairs do not mix; neither do pairs and --body.
    assert_eq!(explain_with("", &["A=1", "B"], b"").status.code(), Some(2));
    assert_eq!(explain_with("", &["--body", "-", "A=1"], b"{}").status.code(), Some(2));
}

#[test]
fn a_body_from_a_file_or_stdin() {
    let body = r#"{"name":"python3","env":{"KERNEL_X":"1","NOPE":"2"},"path":"../etc"}"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, body).unwrap();
    let from_file = explain_with("", &["--body", file.to_str().unwrap()], b"");
    let from_stdin = explain_with("", &["--body", "-"], body.as_bytes());
    for o in [&from_file, &from_stdin] {
        // drop mode: NOPE would be dropped, but the escaping path is refused (kernel_path = "refuse_escape")
        assert_eq!(o.status.code(), Some(1), "{}", err(o));
        let text = out(o);
        assert!(text.contains("KERNEL_X  kept      prefix:KERNEL_\nNOPE      rejected  not_allowed\n"), "{text}");
        assert!(text.contains("\"rejected\":[{\"name\":\"NOPE\",\"reason\":\"not_allowed\"}]"), "{text}");
        assert!(
            text.contains("\"path\":\"refused\",\"request_path\":null,\"outcome\":\"refused\",\"status\":400"),
            "{text}"
        );
        assert!(text.contains("\"error\":\"path escapes the root\"}"), "{text}");
    }
    assert_eq!(out(&from_file), out(&from_stdin));
    // With the path stripped instead: forwarded without it.
    let o = explain_with("kernel_path = \"strip\"\n", &["--body", "-"], body.as_bytes());
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("upstream:\n{\"name\":\"python3\",\"env\":{\"KERNEL_X\":\"1\"}}\n"), "{}", out(&o));
    // reject mode refuses the same body with 403 and the names.
    let o = explain_with("mode = \"reject\"\n", &["--body", "-", "--format", "json"], body.as_bytes());
    assert_eq!(o.status.code(), Some(1));
    let v = json_out(&o);
    assert_eq!(v["request"]["status"], 403);
    assert_eq!(v["request"]["error_body"]["rejected"], json!([{"name": "NOPE", "reason": "not_allowed"}]));
    // Not a kernel start body: refused as the proxy refuses it.
    let o = explain_with("", &["--body", "-"], b"[1]");
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("refused: envgate would answer 400 Bad Request"), "{}", out(&o));
    // A body file that is not there: exit 2.
    let o = explain_with("", &["--body", "/nonexistent/body.json"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).starts_with("envgate: cannot read /nonexistent/body.json"), "{}", err(&o));
}

#[test]
fn names_for_an_identity_show_its_blocks_in_order_denials_and_set_envs() {
    let o = explain_with(
        IDENTITY,
        &["--user", "alice", "--groups", "data-eng,gpu", "--kernelspec", "python3", "DEMO", "SPARK_OPTS", "ALICE_VAR"],
        b"",
    );
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    for want in [
        "identity: user \"alice\", groups [\"data-eng\", \"gpu\"]\n",
        // the user's block, then the groups by priority (gpu: 10) before name
        "blocks that apply, in order: user:alice, group:gpu, group:data-eng\n",
        "may start this kernelspec: no (group:gpu does not list it)\n",
        "set TEAM = \"gpu\"  (group:gpu)\n",
        "set KERNEL_NAMESPACE = \"jupyter-alice\"  (global)\n",
        "DEMO        rejected  denied (deny_envs of user:alice)\n",
        "SPARK_OPTS  kept      group:data-eng\n",
        "ALICE_VAR   kept      user:alice\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let v = json_out(&explain_with(IDENTITY, &["--user", "alice", "--format", "json", "DEMO"], b""));
    assert_eq!(v["names"][0]["denied_by"], "user:alice");
    assert_eq!(v["blocks"], json!(["user:alice"]));

    // A set value that breaks a value rule is flagged here, and refuses every start below.
    let text = out(&explain_with(IDENTITY, &["--user", "mallory", "KERNEL_X"], b""));
    assert!(text.contains("set KERNEL_UID = \"0\"  (user:mallory) breaks a value rule: KERNEL_UID"), "{text}");
}

#[test]
fn bodies_for_an_identity_run_binding_kernelspecs_and_set_envs() {
    let body = br#"{"name":"python3","env":{"SPARK_OPTS":"-x","DEMO":"1"}}"#;
    // data-eng: forwarded with the bound user and the set values; the audit record names them.
    let o = explain_with(IDENTITY, &["--user", "bob", "--groups", "data-eng", "--body", "-", "--format", "json"], body);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let v = json_out(&o);
    let sent: Value = serde_json::from_str(v["request"]["forwarded_body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent["env"],
        json!({"SPARK_OPTS": "-x", "DEMO": "1", "KERNEL_USERNAME": "bob", "KERNEL_NAMESPACE": "jupyter-bob", "TEAM": "data-eng"})
    );
    let a = &v["request"]["audit"];
    assert_eq!(
        (&a["user"], &a["user_source"], &a["identity_source"]),
        (&json!("bob"), &json!("trusted_header"), &json!("header"))
    );
    assert_eq!(a["groups"], json!(["data-eng"]));
    // A name set_envs sets is shown as set, not judged by the name rules (KERNEL_NAMESPACE is denied by default).
    let text = out(&explain_with(
        IDENTITY,
        &["--user", "bob", "--kernelspec", "python3", "KERNEL_NAMESPACE=jupyter-bob"],
        b"",
    ));
    assert!(text.contains("KERNEL_NAMESPACE  set       set_envs of global"), "{text}");
    assert_eq!(
        a["set_envs"],
        json!([{"name": "TEAM", "source": "group:data-eng"}, {"name": "KERNEL_NAMESPACE", "source": "global"}])
    );
    // gpu may start only cuda: 403, as the proxy answers.
    let o = explain_with(IDENTITY, &["--user", "bob", "--groups", "gpu", "--body", "-", "--format", "json"], body);
    assert_eq!(o.status.code(), Some(1));
    let v = json_out(&o);
    assert_eq!(v["request"]["status"], 403);
    assert_eq!(v["request"]["audit"]["error"], "kernelspec not allowed");
    assert_eq!(v["request"]["error_body"]["kernelspec"], "python3");
    // mallory's set KERNEL_UID breaks the pattern: refused whatever the body holds.
    let o = explain_with(IDENTITY, &["--user", "mallory", "--body", "-", "--format", "json"], body);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json_out(&o)["request"]["audit"]["error"], "set_envs value breaks the value rules");
    // No user: the proxy's 403 for a missing trusted header.
    let o = explain_with(IDENTITY, &["--body", "-"], body);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("envgate requires the x-forwarded-user header"), "{}", out(&o));
    // A body naming another KERNEL_USERNAME: refused (user_mismatch = "refuse").
    let o = explain_with(IDENTITY, &["--user", "bob", "KERNEL_USERNAME=eve"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("\"error\":\"KERNEL_USERNAME differs from the trusted user\""), "{}", out(&o));
}

/// What `envgate explain --body` prints as forwarded is, byte for byte, what a running envgate
/// sends upstream for the same body, with the kernelspecs fetched from the same upstream.
#[tokio::test(flavor = "multi_thread")]
async fn explain_forwards_what_envgate_forwards() {
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = got.clone();
    let upstream = listen(any_port(), move |mut r| {
        let seen = seen.clone();
        async move {
            while let Some(head) = read_head(&mut r).await {
                let mut body = vec![0u8; head.length];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = if head.method == "POST" {
                    seen.lock().unwrap().push(body);
                    "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nLocation: /api/kernels/k1\r\nContent-Length: 13\r\n\r\n{\"id\":\"k1\"}\r\n".to_string()
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{SPECS}", SPECS.len())
                };
                if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let url = format!("http://{upstream}");
    let args = ["--client-envs", "LANG,FOO", "--mode", "drop"];
    let eg = Envgate::start(&url, &args);
    let body = r#"{"name":"python3","env":{"LANG":"C.UTF-8","KERNEL_X":"1","SECRET":"s","FOO":"b\u00e4r","PATH":"/x"},"path":"nb/one","kernel_id":null}"#;
    let resp = support::http::request(
        &eg.addr,
        "POST",
        "/api/kernels",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 201, "{}", resp.text());
    let proxied = got.lock().unwrap().pop().expect("the upstream saw the start");

    let o = tokio::task::spawn_blocking(move || {
        let mut all = vec!["--upstream", url.as_str(), "--body", "-", "--format", "json"];
        all.extend_from_slice(&args);
        explain(&all, body.as_bytes())
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let v = json_out(&o);
    assert_eq!(v["request"]["forwarded_body"].as_str().unwrap().as_bytes(), &proxied[..]);
    // And the audit record matches the proxy's, but for what only a request has.
    let real = eg.audit(1).pop().unwrap();
    let dry = &v["request"]["audit"];
    for k in ["event", "mode", "kernelspec", "kept", "rejected", "set_envs", "violations", "path", "outcome"] {
        assert_eq!(dry[k], real[k], "{k}");
    }
}
