//! The audit record and the diagnostics, through the real binary: the request id (the client's
//! `X-Request-Id`, a `traceparent`'s trace id, or the decision id) in the record and the response,
//! the ambiguous path, the policy hash the metrics show, the duration; one time field, named and
//! formatted alike, in the audit and the JSON diagnostics; no colour codes off a terminal. Every
//! record read here is also checked against `docs/audit.schema.json` by the test support.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::eg::{free_port, Eg, EgOptions};
use support::envgate::{bin, Envgate};
use support::http::request;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, as both logs write their `timestamp`.
fn is_rfc3339_millis(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

/// Refusals need no upstream: envgate answers them before any request goes out.
#[tokio::test]
async fn refusals_carry_the_request_id_the_path_and_the_time_as_the_diagnostics_do() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let gate = Envgate::start(&closed, &["--admin-listen", "127.0.0.1:0"]);
    let post = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let addr = gate.addr.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(&addr, "POST", path, &h, b"{}").await.unwrap()
        }
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    // The client's X-Request-Id wins over a traceparent.
    let r1 = post("/api//kernels", vec![("X-Request-Id", "req-42".into()), ("traceparent", traceparent.clone())]).await;
    assert_eq!(r1.status, 400, "{}", r1.text());
    assert_eq!(r1.header("x-request-id"), Some("req-42"));
    // A session start with a traceparent only: its trace id.
    let r2 = post("/api/sessions", vec![("traceparent", traceparent.clone())]).await;
    assert_eq!(r2.status, 403, "{}", r2.text());
    assert_eq!(r2.header("x-request-id"), Some(trace));
    // An insane X-Request-Id (too long) and a broken traceparent: the decision id.
    let r3 = post("/api/sessions", vec![("X-Request-Id", "x".repeat(300)), ("traceparent", "00-zz".into())]).await;
    let decision = r3.header("x-envgate-decision").unwrap().to_string();
    assert_eq!(r3.header("x-request-id"), Some(decision.as_str()));

    let recs = gate.audit(3);
    assert_eq!(recs.len(), 3, "{recs:?}");
    let (a, s, d) = (&recs[0], &recs[1], &recs[2]);
    assert_eq!(a["request_id"], "req-42");
    assert_eq!(a["error"], "ambiguous path");
    assert_eq!(a["request_path"], "/api//kernels");
    assert_eq!(s["request_id"], trace);
    assert_eq!(s["request_path"], Value::Null);
    assert_eq!(d["request_id"], json!(decision));
    assert_eq!(d["id"], json!(decision));
    for r in &recs {
        assert_eq!(r["schema"], 2);
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
        assert!(r["duration_ms"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(is_rfc3339_millis(r["timestamp"].as_str().unwrap()), "{r}");
        assert!(r.get("time").is_none(), "{r}");
    }
    // The policy hash is the one the metrics show.
    let admin = gate.wait_log("admin listener");
    assert!(admin);
    let log = gate.log();
    let admin_addr = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["fields"]["admin"].as_str().map(str::to_string))
        .expect("the admin listener's address");
    let metrics = request(&admin_addr, "GET", "/metrics", &[], b"").await.unwrap().text();
    let hash = a["policy_hash"].as_str().unwrap();
    assert!(metrics.contains(&format!("envgate_policy_info{{hash=\"{hash}\"}} 1")), "{hash} not in\n{metrics}");

    // The diagnostics (JSON lines on stderr): the same `timestamp` field, in the same format;
    // no colour codes in a pipe; the ambiguous path's warning is there.
    assert!(!log.contains("\x1b["), "colour codes in a pipe:\n{log}");
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 2);
    for l in &lines {
        let t = l["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {l}"));
        assert!(is_rfc3339_millis(t), "{l}");
    }
    assert!(lines.iter().any(|l| l["fields"]["path"] == "/api//kernels"), "{log}");
}

/// Text diagnostics in a pipe: no colour codes, whatever NO_COLOR says; the same time format.
#[test]
fn text_diagnostics_in_a_pipe_have_no_colour_codes() {
    for no_color in [None, Some("1")] {
        let mut cmd = Command::new(bin());
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "text", "--audit-log", "/dev/null"])
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("envgate is listening") {
                    let _ = tx.send(line.clone());
                    return;
                }
                line.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        let line = line.expect("envgate is listening");
        assert!(!line.contains('\x1b'), "{line:?}");
        assert!(is_rfc3339_millis(line.split_whitespace().next().unwrap()), "{line:?}");
    }
}

/// A forwarded kernel start against a real EG: the upstream's 201, the client's request id back,
/// a duration that covers the upstream's answer; the default deny list and `--extra-deny-envs`
/// both in force.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_start_is_recorded_with_its_request_id_and_duration() {
    let eg = Eg::start(EgOptions { client_envs: vec!["*".into()], ..EgOptions::default() });
    let gate = Envgate::start(&eg.url, &["--extra-deny-envs", "KERNEL_IMAGE"]);
    let env = json!({
        "KERNEL_USERNAME": "alice", "KERNEL_VOLUMES": "[{name: root, hostPath: {path: /}}]",
        "KERNEL_NAMESPACE": "kube-system", "KERNEL_IMAGE": "python:3", "PATH": "/evil"
    });
    let body = serde_json::to_vec(&json!({"name": "python3", "env": env})).unwrap();
    let h = [("Content-Type", "application/json"), ("X-Request-Id", "start-1")];
    let r = request(&gate.addr, "POST", "/api/kernels", &h, &body).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("start-1"));
    let rec = gate.audit(1).remove(0);
    assert_eq!(rec["request_id"], "start-1");
    assert_eq!(rec["outcome"], "forwarded");
    assert_eq!(rec["kernel_id"], r.json()["id"]);
    let denied: Vec<&str> = rec["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "denied")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(denied, ["KERNEL_VOLUMES", "KERNEL_NAMESPACE", "KERNEL_IMAGE", "PATH"], "{rec}");
    assert_eq!(rec["kept"], json!([{"name": "KERNEL_USERNAME", "source": "prefix:KERNEL_"}]));
    // A kernel start takes EG milliseconds; envgate's record covers them.
    let ms = rec["duration_ms"].as_f64().unwrap();
    assert!(ms > 0.5 && ms < 30_000.0, "{ms}");
    let id = r.json()["id"].as_str().unwrap().to_string();
    let _ = request(&eg.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await;
}
