//! `envgate audit summarize`: the command line around `src/summary.rs` (file and stdin, text and json,
//! exit codes, and that it needs no envgate configuration).

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

/// Runs envgate with `args`, feeding `stdin`, with no ENVGATE_* from the developer's shell.
fn envgate(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(support::envgate::bin());
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("ENVGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("running envgate");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An audit line as envgate writes it (see README, "Audit log").
fn rec(mode: &str, user: Option<&str>, spec: &str, kept: &[(&str, &str)], rejected: &[(&str, &str)]) -> String {
    json!({
        "time": "2026-11-25T13:05:40.968Z", "id": "3f39044b-00000001", "event": "kernel_start", "mode": mode,
        "client": "127.0.0.1:47016", "x_forwarded_for": null, "user": user, "kernelspec": spec,
        "kept": kept.iter().map(|(n, s)| json!({"name": n, "source": s})).collect::<Vec<_>>(),
        "rejected": rejected.iter().map(|(n, r)| json!({"name": n, "reason": r})).collect::<Vec<_>>(),
        "outcome": "forwarded", "status": 201, "kernel_id": null, "error": null,
    })
    .to_string()
}

/// A week of report mode, in small: two users, two kernelspecs, a legacy client sending PATH and a secret.
fn log() -> String {
    let k = ("KERNEL_USERNAME", "prefix:KERNEL_");
    [
        rec(
            "report",
            Some("alice"),
            "python3",
            &[k, ("LANG", "config")],
            &[("PATH", "denied"), ("AWS_SECRET", "not_allowed")],
        ),
        rec("report", Some("alice"), "python3", &[k, ("LANG", "config")], &[("PATH", "denied")]),
        rec("report", Some("bob"), "spark", &[k], &[("SPARK_HOME", "not_allowed")]),
        json!({"event": "session_start", "mode": "report", "user": null, "kernelspec": null}).to_string(),
    ]
    .join("\n")
        + "\n"
}

#[test]
fn summarizes_a_file_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, log()).unwrap();
    let o = envgate(&["audit", "summarize", path.to_str().unwrap()], &[], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("4 records (kernel_start 3, session_start 1); modes: report 4\n"), "{out}");
    for want in [
        "\nkernelspec python3: 2 records\n  rejected  PATH             denied          2/2\n  rejected  AWS_SECRET       not_allowed     1/2\n  kept      KERNEL_USERNAME  prefix:KERNEL_  2/2\n  kept      LANG             config          2/2\n",
        "\nkernelspec spark: 1 record\n  rejected  SPARK_HOME       not_allowed     1/1\n",
        "\nuser alice: 2 records\n",
        "\nuser bob: 1 record\n",
        "\nuser (none): 1 record\n  (no names)\n",
        "what drop mode would have removed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(text(&o.stderr), "");
}

#[test]
fn summarizes_stdin_as_json() {
    let o = envgate(&["audit", "summarize", "-", "--format", "json"], &[], log().as_bytes());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON output");
    assert_eq!(v["records"], 4);
    assert_eq!(v["modes"], json!({"report": 4}));
    assert_eq!(v["invalid_lines"], json!([]));
    let alice = v["by_user"].as_array().unwrap().iter().find(|g| g["user"] == "alice").unwrap();
    assert_eq!(alice["records"], 2);
    assert_eq!(
        alice["rejected"],
        json!([{"name": "PATH", "reason": "denied", "count": 2}, {"name": "AWS_SECRET", "reason": "not_allowed", "count": 1}])
    );
    assert_eq!(
        alice["kept"],
        json!([
            {"name": "KERNEL_USERNAME", "source": "prefix:KERNEL_", "count": 2},
            {"name": "LANG", "source": "config", "count": 2},
        ])
    );
    let spark = v["by_kernelspec"].as_array().unwrap().iter().find(|g| g["kernelspec"] == "spark").unwrap();
    assert_eq!(spark["rejected"], json!([{"name": "SPARK_HOME", "reason": "not_allowed", "count": 1}]));
}

#[test]
fn skips_lines_that_are_not_records_and_says_so() {
    let input = format!("{}garbage\n{{\"time\": \"2026-11-25T13", log());
    let o = envgate(&["audit", "summarize", "-", "--format", "json"], &[], input.as_bytes());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], 4);
    assert_eq!(v["invalid_lines"], json!([5, 6]));
    assert_eq!(text(&o.stderr), "envgate: skipped 2 lines that are not audit records (first: line 5)\n");
}

#[test]
fn needs_no_configuration() {
    // A config that would stop `envgate run` and `envgate check` (exit 2) does not matter to a log reader.
    let o = envgate(
        &["audit", "summarize", "-"],
        &[("ENVGATE_CONFIG", "/nonexistent/envgate.toml"), ("ENVGATE_MODE", "bogus")],
        log().as_bytes(),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("4 records"));
}

#[test]
fn errors_are_one_line_with_exit_codes() {
    let o = envgate(&["audit", "summarize", "/nonexistent/audit.jsonl"], &[], b"");
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.starts_with("envgate: cannot read /nonexistent/audit.jsonl: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let o = envgate(&["audit", "summarize", "-", "--format", "yaml"], &[], b"");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = envgate(&["audit", "summarize"], &[], b"");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}
