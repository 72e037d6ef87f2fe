//! Starts the real `envgate` binary (the one cargo built for this test run) in front of an upstream.
//!
//! envgate listens on `127.0.0.1:0`; the port it got is read from its JSON start-up log line. The audit
//! log goes to a file in a temp dir, readable with [`Envgate::audit`]. Dropping it kills the process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Envgate {
    /// `127.0.0.1:PORT`
    pub addr: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    audit_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The envgate binary cargo built for the integration tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_envgate")
}

impl Envgate {
    /// Starts envgate with `--upstream upstream` and `args`, and waits until it listens (on a free port,
    /// unless `args` holds its own `--listen`, e.g. to restart envgate where a client already points).
    pub fn start(upstream: &str, args: &[&str]) -> Envgate {
        Self::start_with_env(upstream, args, &[])
    }

    pub fn start_with_env(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Envgate {
        let dir = tempfile::Builder::new().prefix("envgate-test-").tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let mut cmd = Command::new(bin());
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--upstream", upstream, "--log-format", "json"])
            .arg("--audit-log")
            .arg(&audit_path)
            .args(args)
            .env_remove("RUST_LOG")
            .env("RUST_LOG", "envgate=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning envgate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("envgate is listening") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if let Some(addr) = v["fields"]["listen"].as_str() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("envgate did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Envgate { addr, child, stderr, audit_path, _dir: dir }
    }

    /// The envgate process's id (for `/proc/<pid>/...`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// envgate's diagnostics so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Every audit record written so far, parsed, each checked against `docs/audit.schema.json`.
    /// Waits up to 5 s for at least `at_least` records.
    pub fn audit(&self, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
            let recs: Vec<serde_json::Value> = text.lines().map(valid_record).collect();
            if recs.len() >= at_least || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The raw audit log text; every whole line checked against `docs/audit.schema.json`.
    pub fn audit_text(&self) -> String {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        // A line still being written (no newline yet) is not a record yet.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            valid_record(line.trim_end_matches('\n'));
        }
        text
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) without waiting.
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// Waits until envgate's diagnostics contain `needle` (up to 10 s); returns whether they did.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for envgate to exit (up to `limit`) and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        send_signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!("envgate did not exit after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The audit record schema, compiled once per test process.
fn audit_schema() -> &'static jsonschema::Validator {
    static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let text = include_str!("../../docs/audit.schema.json");
        let schema: serde_json::Value = serde_json::from_str(text).expect("docs/audit.schema.json is JSON");
        jsonschema::draft202012::new(&schema).expect("docs/audit.schema.json is a valid schema")
    })
}

/// One audit log line, parsed; panics unless it is JSON that fits the audit record schema.
pub fn valid_record(line: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"));
    let errors: Vec<String> = audit_schema().iter_errors(&v).map(|e| format!("{e} (at {})", e.instance_path)).collect();
    assert!(errors.is_empty(), "audit record does not fit docs/audit.schema.json: {errors:?}\n{line}");
    v
}

/// `kill -SIG pid` without a libc dependency.
fn send_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

impl Drop for Envgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
