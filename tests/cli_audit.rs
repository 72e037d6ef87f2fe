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
    // The summary of the others is printed; exit 3 says some lines were not records.
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], 4);
    assert_eq!(v["invalid_lines"], json!([5, 6]));
    assert_eq!(v["invalid_line_count"], 2);
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

/// A record with the fields the other sections read, and fields a newer envgate may add.
fn full(
    event: &str,
    time: &str,
    user: &str,
    spec: &str,
    outcome: &str,
    error: Option<&str>,
    violations: &[(&str, &str)],
) -> String {
    json!({
        "timestamp": time, "id": "x", "event": event, "mode": "drop", "client": "127.0.0.1:1", "user": user,
        "kernelspec": spec, "kept": [], "rejected": [],
        "violations": violations.iter().map(|(n, r)| json!({"name": n, "rule": r})).collect::<Vec<_>>(),
        "path": null, "outcome": outcome, "status": 400, "kernel_id": null, "error": error,
        "schema": 2, "version": "9.9.9", "request_id": "r-1", "duration_ms": 1.5, "something_new": {"a": [1]},
    })
    .to_string()
}

fn mixed() -> String {
    [
        full(
            "kernel_start",
            "2026-11-25T10:00:00.000Z",
            "alice",
            "python3",
            "refused",
            Some("value rules"),
            &[("KERNEL_UID", "pattern")],
        ),
        full(
            "kernel_start",
            "2026-11-25T11:00:00.000Z",
            "bob",
            "python3",
            "refused",
            Some("value rules"),
            &[("KERNEL_UID", "pattern"), ("FOO", "forbidden")],
        ),
        full(
            "kernel_start",
            "2026-11-25T12:00:00.000Z",
            "bob",
            "spark",
            "refused",
            Some("kernelspec not allowed"),
            &[],
        ),
        full("kernel_start", "2026-11-25T12:30:00.000Z", "bob", "spark", "refused", Some("ambiguous path"), &[]),
        full("session_start", "2026-11-25T13:00:00.000Z", "alice", "python3", "refused", Some("sessions denied"), &[]),
        full("session_start", "2026-11-25T14:00:00.000Z", "alice", "python3", "forwarded", None, &[]),
        full("kernel_start", "2026-11-25T15:00:00.000Z", "alice", "python3", "forwarded", None, &[]),
    ]
    .join("\n")
        + "\n"
}

#[test]
fn every_section_in_text_and_json() {
    let o = envgate(&["audit", "summarize", "-"], &[], mixed().as_bytes());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for want in [
        "7 records (kernel_start 5, session_start 2); modes: drop 7\n",
        "\nkernel starts: 1 forwarded, 4 refused\n  refused  value rules             2\n  refused  ambiguous path          1\n  refused  kernelspec not allowed  1\n",
        "\nsession starts: 1 allowed, 1 refused\n  refused  sessions denied  1\n",
        "\nambiguous-path refusals: kernel_start 1\n",
        "\nvalue violations (name, rule, records):\n  KERNEL_UID  pattern    2\n  FOO         forbidden  1\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let o = envgate(&["audit", "summarize", "-", "--format", "json"], &[], mixed().as_bytes());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["kernel_starts"]["refused_by_reason"],
        json!({"ambiguous path": 1, "kernelspec not allowed": 1, "value rules": 2})
    );
    assert_eq!(v["session_starts"], json!({"allowed": 1, "refused": 1, "refused_by_reason": {"sessions denied": 1}}));
    assert_eq!(v["ambiguous_path_refusals"], json!({"kernel_start": 1}));
    assert_eq!(v["violations"][1], json!({"name": "FOO", "rule": "forbidden", "count": 1}));
}

#[test]
fn time_windows_and_filters() {
    let count = |args: &[&str]| -> (Value, String) {
        let mut all = vec!["audit", "summarize", "-", "--format", "json"];
        all.extend_from_slice(args);
        let o = envgate(&all, &[], mixed().as_bytes());
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        (serde_json::from_slice(&o.stdout).unwrap(), text(&o.stderr))
    };
    let (v, _) = count(&["--since", "2026-11-25T12:00:00Z", "--until", "2026-11-25T14:00:00Z"]);
    assert_eq!((v["records"].as_u64(), v["filtered_out"].as_u64()), (Some(3), Some(4)));
    // A window that ends before the first record: nothing counted, still exit 0.
    let (v, _) = count(&["--until", "2026-11-25T09:00:00Z"]);
    assert_eq!(v["records"], 0);
    // Relative: every record is more than a day old.
    let (v, _) = count(&["--since", "1d"]);
    assert_eq!(v["records"], 0);
    let (v, _) = count(&["--since", "100000d"]);
    assert_eq!(v["records"], 7);
    let (v, _) = count(&["--user", "bob"]);
    assert_eq!(v["records"], 3);
    assert_eq!(v["by_user"].as_array().unwrap().len(), 1);
    let (v, _) = count(&["--kernelspec", "spark", "--user", "bob"]);
    assert_eq!(v["records"], 2);
    let o = envgate(&["audit", "summarize", "-", "--since", "last tuesday"], &[], mixed().as_bytes());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("envgate: --since/--until: "), "{}", text(&o.stderr));
}

#[test]
fn gzip_compressed_logs_are_read_as_they_are() {
    use flate2::{write::GzEncoder, Compression};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl.1.gz");
    // Two gzip members, as `cat a.gz b.gz` makes.
    let mut bytes = Vec::new();
    for part in [log(), mixed()] {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(part.as_bytes()).unwrap();
        bytes.extend(gz.finish().unwrap());
    }
    std::fs::write(&path, &bytes).unwrap();
    let o = envgate(&["audit", "summarize", path.to_str().unwrap(), "--format", "json"], &[], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], 11);
    // From stdin too.
    let o = envgate(&["audit", "summarize", "-"], &[], &bytes);
    assert!(text(&o.stdout).starts_with("11 records"), "{}", text(&o.stdout));
    // A cut gzip stream is a read error: exit 1.
    let o = envgate(&["audit", "summarize", "-"], &[], &bytes[..bytes.len() / 3]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
}

#[test]
fn no_records_is_exit_2_and_says_why() {
    let o = envgate(&["audit", "summarize", "-"], &[], b"");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(text(&o.stderr), "envgate: - holds no audit records (it is empty)\n");
    assert_eq!(text(&o.stdout), "");
    let garbage = "\n\nnot a record\n\u{1}\u{2}binary\n{\"half\":\n[1,2]\n";
    let o = envgate(&["audit", "summarize", "-"], &[], garbage.as_bytes());
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(text(&o.stderr), "envgate: - holds no audit records: 4 lines are not audit records (first: line 3)\n");
}

/// A large log is read in constant memory: the peak RSS stays far below the file's size.
#[test]
fn a_large_log_is_streamed() {
    if !std::path::Path::new("/usr/bin/time").exists() {
        eprintln!("skipped: no /usr/bin/time to measure the peak RSS with");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    const N: usize = 200_000;
    for i in 0..N {
        let user = format!("user{}", i % 50);
        let spec = format!("spec{}", i % 5);
        let name = format!("NAME_{}", i % 20);
        let line = rec(
            "report",
            Some(&user),
            &spec,
            &[("LANG", "config"), ("KERNEL_USERNAME", "prefix:KERNEL_")],
            &[(&name, "not_allowed"), ("PATH", "denied")],
        );
        writeln!(f, "{line}").unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let o = Command::new("/usr/bin/time")
        .args(["-f", "maxrss_kb=%M", support::envgate::bin(), "audit", "summarize", "--format", "json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], N as u64);
    let user0 = v["by_user"].as_array().unwrap().iter().find(|g| g["user"] == "user0").unwrap();
    assert_eq!(user0["records"], (N / 50) as u64);
    let err = text(&o.stderr);
    let kb: u64 =
        err.lines().find_map(|l| l.strip_prefix("maxrss_kb=")).and_then(|n| n.trim().parse().ok()).expect(&err);
    eprintln!("{N} lines, {size} bytes: peak RSS {kb} KiB");
    assert!(size > 40 << 20, "the log is {size} bytes");
    assert!(kb * 1024 < size / 4 && kb < 32 * 1024, "peak RSS {kb} KiB for a {size}-byte log");
}
