//! The audit log: one JSON object per line for every decision on a kernel start or a session
//! start. Names and reasons only, never a value (the claimed user is the one exception the
//! format asks for, and it is an identity, not a secret).
//!
//! Records are serialized and written by the request's own thread, one whole line per `write`
//! (see [`AuditLog`]).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::config::AuditTarget;
use crate::json::{write_opt_str, write_str};
use crate::policy::{Decision, Mode};

/// One audit record. See the README, "Audit log", for the format. [`Record::write_json`] writes
/// it; in tests, serde's derived serialization is the reference it is held to.
#[derive(Debug)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The decision id, also sent to the client as `X-Envgate-Decision`.
    pub id: &'a str,
    /// `kernel_start` or `session_start`.
    pub event: &'static str,
    pub mode: &'static str,
    /// The peer address of the connection.
    pub client: SocketAddr,
    pub x_forwarded_for: Option<&'a str>,
    /// The `KERNEL_USERNAME` forwarded: a claim from the body, or the trusted header's user.
    pub user: Option<&'a str>,
    /// Where `user` came from: `body` (a claim, not verified) or `trusted_header`.
    pub user_source: Option<&'static str>,
    pub kernelspec: Option<&'a str>,
    pub kept: Vec<KeptName<'a>>,
    pub rejected: Vec<RejectedName<'a>>,
    /// Forwarded (or, in `report` mode, would-be forwarded) values that broke a value rule:
    /// the variable's name and the rule, never the value.
    pub violations: Vec<ViolationName<'a>>,
    /// What the `kernel_path` rule did to the body's `path`: `refused` or `stripped` (in
    /// `report` mode: what it would have done); `null` when it let the path through.
    pub path: Option<&'static str>,
    /// `forwarded` or `refused`.
    pub outcome: &'static str,
    /// The upstream's status when forwarded; envgate's own status when refused.
    pub status: Option<u16>,
    pub kernel_id: Option<&'a str>,
    /// Why envgate refused or the upstream failed; never holds a value.
    pub error: Option<&'a str>,
}

#[derive(Debug)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct KeptName<'a> {
    pub name: &'a str,
    pub source: &'a str,
}

#[derive(Debug)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ViolationName<'a> {
    pub name: &'a str,
    pub rule: &'static str,
}

#[derive(Debug)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RejectedName<'a> {
    pub name: &'a str,
    pub reason: &'static str,
}

impl<'a> Record<'a> {
    /// A record with the request's identity filled in and everything else empty.
    pub fn new(id: &'a str, event: &'static str, mode: Mode, client: SocketAddr, xff: Option<&'a str>) -> Self {
        Record {
            time: now_rfc3339(),
            id,
            event,
            mode: mode.as_str(),
            client,
            x_forwarded_for: xff,
            user: None,
            user_source: None,
            kernelspec: None,
            kept: Vec::new(),
            rejected: Vec::new(),
            violations: Vec::new(),
            path: None,
            outcome: "refused",
            status: None,
            kernel_id: None,
            error: None,
        }
    }

    pub fn with_decision(mut self, d: &'a Decision<'_>) -> Self {
        self.kept = d.kept.iter().map(|k| KeptName { name: k.name, source: k.source.as_str() }).collect();
        self.rejected = d.rejected.iter().map(|r| RejectedName { name: r.name, reason: r.reason.as_str() }).collect();
        self
    }
}

impl Record<'_> {
    /// Appends the record as one JSON object, without a newline: the fields in their declared
    /// order, byte for byte what serde_json writes for the derived serialization.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        fn key(out: &mut Vec<u8>, key: &str) {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
        }
        // String members, `None` written as null.
        fn strings(out: &mut Vec<u8>, members: &[(&str, Option<&str>)]) {
            for (k, v) in members {
                key(out, k);
                write_opt_str(out, *v);
            }
        }
        out.extend_from_slice(b"{\"time\":");
        write_str(out, &self.time);
        strings(out, &[("id", Some(self.id)), ("event", Some(self.event)), ("mode", Some(self.mode))]);
        key(out, "client");
        // A socket address is digits, dots, colons, brackets, hex and a numeric scope id.
        let _ = write!(out, "\"{}\"", self.client);
        strings(
            out,
            &[
                ("x_forwarded_for", self.x_forwarded_for),
                ("user", self.user),
                ("user_source", self.user_source),
                ("kernelspec", self.kernelspec),
            ],
        );
        key(out, "kept");
        list(out, &self.kept, ["name", "source"], |k| [k.name, k.source]);
        key(out, "rejected");
        list(out, &self.rejected, ["name", "reason"], |r| [r.name, r.reason]);
        key(out, "violations");
        list(out, &self.violations, ["name", "rule"], |v| [v.name, v.rule]);
        strings(out, &[("path", self.path), ("outcome", Some(self.outcome))]);
        key(out, "status");
        match self.status {
            Some(s) => {
                let _ = write!(out, "{s}");
            }
            None => out.extend_from_slice(b"null"),
        }
        strings(out, &[("kernel_id", self.kernel_id), ("error", self.error)]);
        out.push(b'}');
    }
}

/// Appends `items` as a JSON array of objects with the two string members `keys` (literal
/// keys, written as they are: they need no escaping) valued by `values`.
fn list<T>(out: &mut Vec<u8>, items: &[T], keys: [&str; 2], values: impl Fn(&T) -> [&str; 2]) {
    debug_assert!(keys.iter().all(|k| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')));
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let [v1, v2] = values(item);
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(keys[0].as_bytes());
        out.extend_from_slice(b"\":");
        write_str(out, v1);
        out.extend_from_slice(b",\"");
        out.extend_from_slice(keys[1].as_bytes());
        out.extend_from_slice(b"\":");
        write_str(out, v2);
        out.push(b'}');
    }
    out.push(b']');
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Decision ids: unique within a process (a counter) and across restarts (a random prefix).
#[derive(Debug)]
pub struct Ids {
    prefix: u32,
    next: AtomicU64,
}

impl Default for Ids {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        Ids { prefix: h.finish() as u32, next: AtomicU64::new(1) }
    }
}

impl Ids {
    pub fn next(&self) -> String {
        format!("{:08x}-{:08x}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where records go. A file is opened with `O_APPEND`: the kernel appends each `write` whole,
/// so records from different threads never interleave.
#[derive(Debug)]
enum Out {
    Stdout,
    File(std::fs::File),
}

/// The audit log; cheap to clone. A record is written by the thread that decided it, in one
/// `write` of one whole line, under a lock (nginx writes its access log the same way): no queue
/// that could lose records, no hop to another thread, and a stuck disk slows requests down
/// rather than losing records.
#[derive(Debug, Clone)]
pub struct AuditLog {
    out: Arc<Mutex<Out>>,
}

fn open_target(target: &AuditTarget) -> io::Result<Out> {
    Ok(match target {
        AuditTarget::Stdout => Out::Stdout,
        AuditTarget::File(p) => Out::File(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
    })
}

thread_local! {
    /// Each thread's serialization buffer, reused from record to record.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AuditLog {
    /// Opens the target (a file is created and appended to).
    pub fn open(target: &AuditTarget) -> io::Result<AuditLog> {
        Ok(AuditLog { out: Arc::new(Mutex::new(open_target(target)?)) })
    }

    /// Reopens the log at `target` (SIGHUP): a rotated file is created anew. On failure the old
    /// target stays.
    pub fn reopen(&self, target: &AuditTarget) {
        match open_target(target) {
            Ok(o) => *self.out.lock().unwrap_or_else(|p| p.into_inner()) = o,
            Err(e) => tracing::error!(error = %e, "cannot reopen the audit log; keeping the old one"),
        }
    }

    /// Writes one record.
    pub fn write(&self, record: &Record<'_>) {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            record.write_json(&mut line);
            line.push(b'\n');
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            let written = match &mut *out {
                Out::Stdout => {
                    let mut s = io::stdout().lock();
                    s.write_all(&line).and_then(|_| s.flush())
                }
                Out::File(f) => f.write_all(&line),
            };
            if let Err(e) = written {
                tracing::error!(error = %e, id = record.id, "cannot write the audit log");
            }
            // A burst of very large records must not pin memory in every thread for good.
            if line.capacity() > 1 << 20 {
                *line = Vec::new();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Kept, Reason, Rejected, Source};

    #[test]
    fn record_format() {
        let d = Decision {
            kept: vec![Kept { name: "KERNEL_A", source: Source::Prefix("prefix:KERNEL_".into()) }],
            rejected: vec![Rejected { name: "PATH", reason: Reason::Denied }],
        };
        let mut r =
            Record::new("id-1", "kernel_start", Mode::Drop, "127.0.0.1:5000".parse().unwrap(), Some("10.0.0.1"))
                .with_decision(&d);
        r.user = Some("alice");
        r.kernelspec = Some("python3");
        r.outcome = "forwarded";
        r.status = Some(201);
        r.kernel_id = Some("k1");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "time": v["time"], "id": "id-1", "event": "kernel_start", "mode": "drop",
                "client": "127.0.0.1:5000", "x_forwarded_for": "10.0.0.1", "user": "alice", "user_source": null,
                "kernelspec": "python3",
                "kept": [{"name": "KERNEL_A", "source": "prefix:KERNEL_"}],
                "rejected": [{"name": "PATH", "reason": "denied"}], "violations": [], "path": null,
                "outcome": "forwarded", "status": 201, "kernel_id": "k1", "error": null
            })
        );
        let t = v["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(t).is_ok(), "{t}");
    }

    #[test]
    fn write_json_is_what_serde_writes() {
        let d = Decision {
            kept: vec![
                Kept { name: "KERNEL_A", source: Source::Prefix("prefix:KERNEL_".into()) },
                Kept { name: "B", source: Source::Config },
            ],
            rejected: vec![
                Rejected { name: "PATH", reason: Reason::Denied },
                Rejected { name: "we\"ird\\\n", reason: Reason::InvalidName },
            ],
        };
        let v6 = "[fe80::1%2]:8888".parse().unwrap();
        let bare = Record::new("id-0", "session_start", Mode::Report, v6, None);
        let mut full = Record::new("id-1", "kernel_start", Mode::Drop, "127.0.0.1:5000".parse().unwrap(), Some("a, b"))
            .with_decision(&d);
        full.user = Some("al\u{e9}ice\t");
        full.user_source = Some("body");
        full.kernelspec = Some("python3");
        full.violations = vec![ViolationName { name: "B", rule: "forbidden" }];
        full.path = Some("stripped");
        full.outcome = "forwarded";
        full.status = Some(201);
        full.kernel_id = Some("k1");
        full.error = Some("upstream \"timeout\"");
        for r in [&bare, &full] {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(r).unwrap());
        }
    }

    #[test]
    fn ids_are_unique() {
        let ids = Ids::default();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        let rec = |id| Record::new(id, "kernel_start", Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        log.write(&rec("a"));
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.reopen(&AuditTarget::File(path.clone()));
        log.write(&rec("b"));
        drop(log);
        assert!(std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap().contains("\"a\""));
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.contains("\"b\"") && !now.contains("\"a\""), "{now}");
    }

    #[test]
    fn file_log_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        // Four threads at once: every line whole.
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in (t * 25)..(t * 25 + 25) {
                        let id = format!("{i}");
                        log.write(&Record::new(&id, "kernel_start", Mode::Drop, "127.0.0.1:1".parse().unwrap(), None));
                    }
                });
            }
        });
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 101);
        assert_eq!(lines[0], "old");
        let mut ids: Vec<u32> = lines[1..]
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().parse().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, (0..100).collect::<Vec<u32>>());
    }
}
