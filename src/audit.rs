//! The audit log: one JSON object per line for every decision on a kernel start or a session
//! start. Names and reasons only, never a value (the claimed user is the one exception the
//! format asks for, and it is an identity, not a secret).
//!
//! Records are serialized and written by the request's own thread, whole lines per `write`
//! (see [`AuditLog`]).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::config::AuditTarget;
use crate::decide::{PathAction, UserSource};
use crate::identity::IdentitySource;
use crate::json::{write_opt_str, write_str};
use crate::policy::{Decision, Mode};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum Event {
    KernelStart,
    SessionStart,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::KernelStart => "kernel_start",
            Event::SessionStart => "session_start",
        }
    }
}

/// Whether envgate sent the request on to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum Outcome {
    /// Sent upstream; the record's `status` is the upstream's (or envgate's 502/504 when the
    /// upstream gave no answer).
    Forwarded,
    /// Answered by envgate; the upstream never saw the request.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Refused => "refused",
        }
    }
}

/// The version of the record's format, its `schema` field: 2 added `schema`, `version`,
/// `request_id`, `policy_hash`, `request_path` and `duration_ms`, and renamed `time` to
/// `timestamp`. `docs/audit.schema.json` describes it.
pub const SCHEMA: u32 = 2;

/// The longest `request_path` recorded, in bytes; a longer path is cut (on a character boundary).
pub const MAX_REQUEST_PATH: usize = 512;

/// The longest client `X-Request-Id` taken as the record's `request_id`, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// One audit record. See the README, "Audit log", for the format. [`Record::write_json`] writes
/// it; in tests, serde's derived serialization is the reference it is held to.
#[derive(Debug)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct Record<'a> {
    /// When the request arrived: RFC 3339, UTC, milliseconds; the diagnostics' JSON lines have
    /// the same field, in the same format ([`Rfc3339Millis`]).
    pub timestamp: String,
    /// [`SCHEMA`].
    pub schema: u32,
    /// envgate's version.
    pub version: &'static str,
    /// The decision id, also sent to the client as `X-Envgate-Decision`.
    pub id: &'a str,
    /// The client's `X-Request-Id`, or the trace id of its `traceparent`, or the decision id
    /// ([`request_id`]); sent back to the client as `X-Request-Id`.
    pub request_id: Cow<'a, str>,
    pub event: Event,
    pub mode: Mode,
    /// The hash of the policy in force, as the `envgate_policy_info` metric has it.
    pub policy_hash: &'a str,
    /// The peer address of the connection.
    pub client: SocketAddr,
    pub x_forwarded_for: Option<&'a str>,
    /// The `KERNEL_USERNAME` forwarded: a claim from the body, or the trusted header's user.
    pub user: Option<&'a str>,
    /// Where `user` came from: `body` (a claim, not verified), `trusted_header` or `jwt`.
    pub user_source: Option<UserSource>,
    /// The identity's groups as resolved (at most 32, each cut to 128 bytes).
    pub groups: Vec<&'a str>,
    /// Where the identity came from: `header` or `jwt`; `null` without identity.
    pub identity_source: Option<IdentitySource>,
    pub kernelspec: Option<&'a str>,
    pub kept: Vec<KeptName<'a>>,
    pub rejected: Vec<RejectedName<'a>>,
    /// The `set_envs` values envgate wrote: the variable and the scope that set it, never the value.
    pub set_envs: Vec<SetName<'a>>,
    /// Forwarded (or, in `report` mode, would-be forwarded) values that broke a value rule:
    /// the variable's name and the rule, never the value.
    pub violations: Vec<ViolationName<'a>>,
    /// What the `kernel_path` rule did to the body's `path`: `refused` or `stripped` (in
    /// `report` mode: what it would have done); `null` when it let the path through.
    pub path: Option<PathAction>,
    /// The request's path, for an ambiguous-path refusal (at most [`MAX_REQUEST_PATH`] bytes);
    /// `null` otherwise.
    pub request_path: Option<&'a str>,
    pub outcome: Outcome,
    /// The upstream's status when forwarded; envgate's own status when refused.
    pub status: Option<u16>,
    /// Milliseconds from the request's arrival to the decision (a refusal) or the upstream's
    /// response head (forwarded), with microsecond resolution.
    pub duration_ms: f64,
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
pub struct SetName<'a> {
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
    pub fn new(id: &'a str, event: Event, mode: Mode, client: SocketAddr, xff: Option<&'a str>) -> Self {
        Record {
            timestamp: now_rfc3339(),
            schema: SCHEMA,
            version: env!("CARGO_PKG_VERSION"),
            id,
            request_id: Cow::Borrowed(id),
            event,
            mode,
            policy_hash: "",
            client,
            x_forwarded_for: xff,
            user: None,
            user_source: None,
            groups: Vec::new(),
            identity_source: None,
            kernelspec: None,
            kept: Vec::new(),
            rejected: Vec::new(),
            set_envs: Vec::new(),
            violations: Vec::new(),
            path: None,
            request_path: None,
            outcome: Outcome::Refused,
            status: None,
            duration_ms: 0.0,
            kernel_id: None,
            error: None,
        }
    }

    /// Names what the policy kept and rejected.
    pub fn set_decision(&mut self, d: &'a Decision<'_>) {
        self.kept = d.kept.iter().map(|k| KeptName { name: k.name, source: k.source.as_str() }).collect();
        self.rejected = d.rejected.iter().map(|r| RejectedName { name: r.name, reason: r.reason.as_str() }).collect();
    }

    /// Sets `duration_ms`, to the microsecond.
    pub fn set_duration(&mut self, d: std::time::Duration) {
        self.duration_ms = d.as_micros().min(u128::from(u64::MAX)) as f64 / 1000.0;
    }
}

/// The record's `request_id`: the client's `X-Request-Id` when it is sane (1 to
/// [`MAX_REQUEST_ID`] bytes of printable ASCII, spaces trimmed), else the trace id of a valid W3C
/// `traceparent`, else `None` (the decision id stands in).
pub fn request_id<'h>(x_request_id: Option<&'h [u8]>, traceparent: Option<&'h [u8]>) -> Option<&'h str> {
    let given = x_request_id
        .filter(|v| v.len() <= MAX_REQUEST_ID && v.iter().all(|b| (0x20..0x7f).contains(b)))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    given.or_else(|| traceparent.and_then(trace_id))
}

/// The trace id of a W3C `traceparent` (`VERSION-TRACEID-PARENTID-FLAGS`, lowercase hex), when
/// it is valid: version `ff` and all-zero ids are not; a later version may append fields.
fn trace_id(v: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(v).ok()?.trim();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let (head, rest) = (v.get(..55)?, &v[55..]);
    let mut parts = head.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0')
        && (rest.is_empty() || (version != "00" && rest.starts_with('-')));
    valid.then_some(trace)
}

/// A request path as the record's `request_path` holds it: at most [`MAX_REQUEST_PATH`] bytes.
pub fn bounded_path(path: &str) -> &str {
    if path.len() <= MAX_REQUEST_PATH {
        return path;
    }
    let mut end = MAX_REQUEST_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

impl Record<'_> {
    /// Appends the record as one JSON object, without a newline: the fields in their declared
    /// order, byte for byte what serde_json writes for the derived serialization.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // String members, `None` written as null.
        fn strings(out: &mut Vec<u8>, members: &[(&str, Option<&str>)]) {
            for (k, v) in members {
                key(out, k);
                write_opt_str(out, *v);
            }
        }
        out.extend_from_slice(b"{\"timestamp\":");
        write_str(out, &self.timestamp);
        key(out, "schema");
        let _ = write!(out, "{}", self.schema);
        strings(
            out,
            &[
                ("version", Some(self.version)),
                ("id", Some(self.id)),
                ("request_id", Some(self.request_id.as_ref())),
                ("event", Some(self.event.as_str())),
                ("mode", Some(self.mode.as_str())),
                ("policy_hash", Some(self.policy_hash)),
            ],
        );
        key(out, "client");
        // A socket address is digits, dots, colons, brackets, hex and a numeric scope id.
        let _ = write!(out, "\"{}\"", self.client);
        strings(
            out,
            &[
                ("x_forwarded_for", self.x_forwarded_for),
                ("user", self.user),
                ("user_source", self.user_source.map(UserSource::as_str)),
            ],
        );
        key(out, "groups");
        out.push(b'[');
        for (i, g) in self.groups.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, g);
        }
        out.push(b']');
        strings(
            out,
            &[("identity_source", self.identity_source.map(IdentitySource::as_str)), ("kernelspec", self.kernelspec)],
        );
        key(out, "kept");
        list(out, &self.kept, ["name", "source"], |k| [k.name, k.source]);
        key(out, "rejected");
        list(out, &self.rejected, ["name", "reason"], |r| [r.name, r.reason]);
        key(out, "set_envs");
        list(out, &self.set_envs, ["name", "source"], |s| [s.name, s.source]);
        key(out, "violations");
        list(out, &self.violations, ["name", "rule"], |v| [v.name, v.rule]);
        strings(
            out,
            &[
                ("path", self.path.map(PathAction::as_str)),
                ("request_path", self.request_path),
                ("outcome", Some(self.outcome.as_str())),
            ],
        );
        key(out, "status");
        match self.status {
            Some(s) => {
                let _ = write!(out, "{s}");
            }
            None => out.extend_from_slice(b"null"),
        }
        key(out, "duration_ms");
        // As serde_json writes an f64 (a duration is finite and never negative).
        out.extend_from_slice(ryu::Buffer::new().format_finite(self.duration_ms).as_bytes());
        strings(out, &[("kernel_id", self.kernel_id), ("error", self.error)]);
        out.push(b'}');
    }
}

/// Appends `"key":`. Keys are envgate's own literals, which need no escaping.
fn literal_key(out: &mut Vec<u8>, key: &str) {
    debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends `,"key":` (a member after the first).
fn key(out: &mut Vec<u8>, key: &str) {
    out.push(b',');
    literal_key(out, key);
}

/// Appends `items` as a JSON array of objects with the two string members `keys`, valued by
/// `values`.
fn list<T>(out: &mut Vec<u8>, items: &[T], keys: [&str; 2], values: impl Fn(&T) -> [&str; 2]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let [v1, v2] = values(item);
        out.push(b'{');
        literal_key(out, keys[0]);
        write_str(out, v1);
        key(out, keys[1]);
        write_str(out, v2);
        out.push(b'}');
    }
    out.push(b']');
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The diagnostics' time, as the audit record's `timestamp`: RFC 3339, UTC, milliseconds; so that
/// one log shipper rule reads both.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rfc3339Millis;

impl tracing_subscriber::fmt::time::FormatTime for Rfc3339Millis {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        std::fmt::Write::write_fmt(w, format_args!("{}", humantime::format_rfc3339_millis(SystemTime::now())))
    }
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

/// The audit log; cheap to clone. A record is written before its response is sent, by the
/// worker thread that decided it, and never queued for another thread: a stuck disk slows
/// requests down rather than losing records.
///
/// On a worker ([`AuditLog::log`]), the records that are decided in one turn of the worker's
/// event loop are written together, in one `write` of whole lines (group commit): under load a
/// `write` per record was about 6 % of a kernel start's CPU time. Each request waits until its
/// own record is written. Elsewhere ([`AuditLog::write`]), a record is one `write` of its own.
/// Writes are under one lock and the file is opened with `O_APPEND`, so lines never interleave.
#[derive(Debug, Clone)]
pub struct AuditLog {
    out: Arc<Mutex<Out>>,
    /// One batch per worker thread.
    batches: Arc<[Batch]>,
    /// Records that could not be written (`envgate_audit_write_errors_total`).
    write_errors: prometheus_client::metrics::counter::Counter,
    /// `write` calls made, for tests of the batching.
    #[cfg(test)]
    writes: Arc<AtomicU64>,
}

/// The records one worker has decided and not yet written.
#[derive(Debug)]
struct Batch {
    pending: Mutex<Pending>,
    /// How many of this batch's records (counted from the start) are written.
    written: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whole lines, not yet written.
    lines: Vec<u8>,
    /// Records appended so far, counted from the start.
    appended: u64,
    /// A flush task is on its way.
    flushing: bool,
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
    /// Opens the target (a file is created and appended to), with one batch for each of
    /// `workers` worker threads.
    pub fn open(target: &AuditTarget, workers: usize) -> io::Result<AuditLog> {
        let batches = (0..workers)
            .map(|_| Batch { pending: Mutex::default(), written: tokio::sync::watch::Sender::new(0) })
            .collect();
        Ok(AuditLog {
            out: Arc::new(Mutex::new(open_target(target)?)),
            batches,
            write_errors: Default::default(),
            #[cfg(test)]
            writes: Arc::default(),
        })
    }

    /// Counts the records that cannot be written in `counter` from now on.
    pub fn count_write_errors_in(mut self, counter: prometheus_client::metrics::counter::Counter) -> AuditLog {
        self.write_errors = counter;
        self
    }

    /// Reopens the log at `target` (SIGHUP): a rotated file is created anew. On failure the old
    /// target stays.
    pub fn reopen(&self, target: &AuditTarget) -> io::Result<()> {
        *lock(&self.out) = open_target(target)?;
        Ok(())
    }

    /// Writes one record on its own.
    pub fn write(&self, record: &Record<'_>) {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            record.write_json(&mut line);
            line.push(b'\n');
            self.write_lines(&line, 1);
            // A burst of very large records must not pin memory in every thread for good.
            if line.capacity() > 1 << 20 {
                *line = Vec::new();
            }
        });
    }

    /// Writes one record, from worker `worker`'s event loop, together with the other records
    /// decided in the same turn of that loop; returns once it is written. Off the workers
    /// (`None`, or no such worker), the same as [`AuditLog::write`].
    pub async fn log(&self, record: &Record<'_>, worker: Option<usize>) {
        let Some(i) = worker.filter(|&i| i < self.batches.len()) else { return self.write(record) };
        let batch = &self.batches[i];
        let mut written = batch.written.subscribe();
        let mine = {
            let mut p = lock(&batch.pending);
            record.write_json(&mut p.lines);
            p.lines.push(b'\n');
            p.appended += 1;
            if !p.flushing {
                p.flushing = true;
                // Queued behind the tasks this turn of the event loop has already woken: those
                // that decide a record add it to this batch first.
                let log = self.clone();
                tokio::spawn(async move { log.flush_now(i) });
            }
            p.appended
        };
        // The flush task sends before it can be dropped; only a runtime shutting down drops it.
        let _ = written.wait_for(|&w| w >= mine).await;
    }

    /// Writes worker `i`'s pending records, in one `write`. The flush task [`AuditLog::log`]
    /// spawns calls this, and so does a worker whose event loop has ended: a flush task still
    /// queued then (shutdown's grace period over) never runs.
    pub fn flush_now(&self, i: usize) {
        let Some(batch) = self.batches.get(i) else { return };
        let mut lines = Vec::new();
        loop {
            let (count, upto) = {
                let mut p = lock(&batch.pending);
                if p.lines.is_empty() {
                    p.flushing = false;
                    return;
                }
                std::mem::swap(&mut p.lines, &mut lines);
                (p.appended - *batch.written.borrow(), p.appended)
            };
            self.write_lines(&lines, count);
            batch.written.send_replace(upto);
            lines.clear();
            if lines.capacity() > 1 << 20 {
                lines = Vec::new();
            }
        }
    }

    /// Writes `count` whole lines in one `write`.
    fn write_lines(&self, lines: &[u8], count: u64) {
        #[cfg(test)]
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut out = lock(&self.out);
        let written = match &mut *out {
            Out::Stdout => {
                let mut s = io::stdout().lock();
                s.write_all(lines).and_then(|_| s.flush())
            }
            Out::File(f) => f.write_all(lines),
        };
        if let Err(e) = written {
            self.write_errors.inc_by(count);
            tracing::error!(error = %e, records = count, "cannot write the audit log");
        }
    }
}

/// A lock that a panic elsewhere does not poison for good (nothing envgate writes under these
/// locks can be left half-done by one).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
            Record::new("id-1", Event::KernelStart, Mode::Drop, "127.0.0.1:5000".parse().unwrap(), Some("10.0.0.1"));
        r.set_decision(&d);
        r.user = Some("alice");
        r.kernelspec = Some("python3");
        r.outcome = Outcome::Forwarded;
        r.status = Some(201);
        r.kernel_id = Some("k1");
        r.policy_hash = "0123456789abcdef";
        r.set_duration(std::time::Duration::from_micros(1_234));
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "timestamp": v["timestamp"], "schema": 2, "version": env!("CARGO_PKG_VERSION"), "id": "id-1",
                "request_id": "id-1", "event": "kernel_start", "mode": "drop", "policy_hash": "0123456789abcdef",
                "client": "127.0.0.1:5000", "x_forwarded_for": "10.0.0.1", "user": "alice", "user_source": null,
                "groups": [], "identity_source": null, "kernelspec": "python3",
                "kept": [{"name": "KERNEL_A", "source": "prefix:KERNEL_"}],
                "rejected": [{"name": "PATH", "reason": "denied"}], "set_envs": [], "violations": [], "path": null,
                "request_path": null, "outcome": "forwarded", "status": 201, "duration_ms": 1.234, "kernel_id": "k1",
                "error": null
            })
        );
        let t = v["timestamp"].as_str().unwrap();
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
        let bare = Record::new("id-0", Event::SessionStart, Mode::Report, v6, None);
        let mut full =
            Record::new("id-1", Event::KernelStart, Mode::Drop, "127.0.0.1:5000".parse().unwrap(), Some("a, b"));
        full.set_decision(&d);
        full.user = Some("al\u{e9}ice\t");
        full.user_source = Some(UserSource::Body);
        full.groups = vec!["data-eng", "g\"q"];
        full.identity_source = Some(IdentitySource::Header);
        full.set_envs = vec![SetName { name: "KERNEL_NAMESPACE", source: "group:data-eng" }];
        full.kernelspec = Some("python3");
        full.violations = vec![ViolationName { name: "B", rule: "forbidden" }];
        full.path = Some(PathAction::Stripped);
        full.outcome = Outcome::Forwarded;
        full.status = Some(201);
        full.kernel_id = Some("k1");
        full.error = Some("upstream \"timeout\"");
        full.request_id = Cow::Owned("req \\ \"7\"".into());
        full.policy_hash = "0123456789abcdef";
        full.request_path = Some("/api//kernels\u{7f}\"");
        full.set_duration(std::time::Duration::from_micros(6_300));
        // The other value of each enum field.
        let mut other = Record::new("id-2", Event::KernelStart, Mode::Reject, "127.0.0.1:1".parse().unwrap(), None);
        other.user = Some("bob");
        other.user_source = Some(UserSource::TrustedHeader);
        other.identity_source = Some(IdentitySource::Jwt);
        other.groups = vec!["one"];
        other.path = Some(PathAction::Refused);
        let mut jwt = Record::new("id-3", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        jwt.user_source = Some(UserSource::Jwt);
        other.status = Some(400);
        other.set_duration(std::time::Duration::from_secs(3));
        jwt.set_duration(std::time::Duration::from_nanos(999));
        for r in [&bare, &full, &other, &jwt] {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(r).unwrap());
        }
    }

    /// A validator of `docs/audit.schema.json`, itself checked against draft 2020-12.
    fn schema() -> jsonschema::Validator {
        let schema: serde_json::Value = serde_json::from_str(include_str!("../docs/audit.schema.json")).unwrap();
        jsonschema::meta::validate(&schema).expect("the schema is a valid JSON Schema");
        jsonschema::draft202012::new(&schema).unwrap()
    }

    fn check(v: &jsonschema::Validator, r: &Record<'_>) -> Vec<String> {
        let mut line = Vec::new();
        r.write_json(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        v.iter_errors(&value).map(|e| format!("{e} at {}", e.instance_path)).collect()
    }

    #[test]
    fn every_variant_of_every_field_fits_the_schema() {
        let v = schema();
        let d = Decision {
            kept: vec![
                Kept { name: "KERNEL_A", source: Source::Prefix("prefix:KERNEL_".into()) },
                Kept { name: "B", source: Source::Config },
            ],
            rejected: vec![
                Rejected { name: "PATH", reason: Reason::Denied },
                Rejected { name: "A=B", reason: Reason::InvalidName },
                Rejected { name: "C", reason: Reason::NotAllowed },
            ],
        };
        let events = [Event::KernelStart, Event::SessionStart];
        let modes = [Mode::Drop, Mode::Reject, Mode::Report];
        let outcomes = [(Outcome::Forwarded, 201, None), (Outcome::Refused, 403, Some("policy"))];
        let users = [None, Some(UserSource::Body), Some(UserSource::TrustedHeader), Some(UserSource::Jwt)];
        let identities = [None, Some(IdentitySource::Header), Some(IdentitySource::Jwt)];
        let paths = [None, Some(PathAction::Refused), Some(PathAction::Stripped)];
        let rules = [crate::values::Rule::MaxLength, crate::values::Rule::Forbidden, crate::values::Rule::Pattern];
        let mut n = 0;
        for (i, event) in events.into_iter().enumerate() {
            for (j, mode) in modes.into_iter().enumerate() {
                for (k, (outcome, status, error)) in outcomes.into_iter().enumerate() {
                    let (client, xff) = if k == 0 {
                        ("127.0.0.1:5000".parse().unwrap(), Some("10.0.0.1, 10.0.0.2"))
                    } else {
                        ("[fe80::1%2]:8888".parse().unwrap(), None)
                    };
                    let mut r = Record::new("0a1b2c3d-00000001", event, mode, client, xff);
                    r.policy_hash = "0123456789abcdef";
                    r.outcome = outcome;
                    r.status = Some(status);
                    r.error = error;
                    r.user_source = users[(i + j + k) % users.len()];
                    r.user = r.user_source.map(|_| "al\u{e9}ice");
                    r.identity_source = identities[(i + j + k) % identities.len()];
                    r.path = paths[(j + k) % paths.len()];
                    if (i + j) % 2 == 0 {
                        r.set_decision(&d);
                        r.groups = vec!["data-eng", "g\"q"];
                        r.kernelspec = Some("python3");
                        r.set_envs = vec![SetName { name: "KERNEL_NAMESPACE", source: "group:data-eng" }];
                        r.violations =
                            rules.iter().map(|rule| ViolationName { name: "B", rule: rule.as_str() }).collect();
                        r.request_id = Cow::Owned("4bf92f3577b34da6a3ce929d0e0e4736".into());
                        r.kernel_id = (outcome == Outcome::Forwarded).then_some("ef326d61-e017-4f88-a97f-5975eab735e5");
                    } else {
                        r.request_path = Some(bounded_path("/api//kernels"));
                        r.error = Some("ambiguous path");
                    }
                    r.set_duration(std::time::Duration::from_micros((n * 977) as u64));
                    assert_eq!(check(&v, &r), Vec::<String>::new(), "{r:?}");
                    n += 1;
                }
            }
        }
        // The schema is not a rubber stamp.
        let mut bad = Record::new("not-an-id", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        bad.policy_hash = "0123456789abcdef";
        assert!(!check(&v, &bad).is_empty());
        let mut no_hash =
            Record::new("0a1b2c3d-00000001", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        no_hash.policy_hash = "";
        assert!(!check(&v, &no_hash).is_empty());
    }

    #[test]
    fn request_id_is_the_clients_then_the_trace_id() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(request_id(Some(b" req-7 "), Some(tp)), Some("req-7"));
        assert_eq!(request_id(None, Some(tp)), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // Not sane: too long, control characters, not ASCII, empty: the trace id instead.
        let long = [b'a'; MAX_REQUEST_ID + 1];
        for bad in [&long[..], b"a\x1bb", "caf\u{e9}".as_bytes(), b"   ", b""] {
            assert_eq!(request_id(Some(bad), Some(tp)), Some("4bf92f3577b34da6a3ce929d0e0e4736"), "{bad:?}");
            assert_eq!(request_id(Some(bad), None), None, "{bad:?}");
        }
        assert_eq!(request_id(Some(&long[..MAX_REQUEST_ID]), None).map(str::len), Some(MAX_REQUEST_ID));
        // Invalid traceparents.
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "garbage",
            "",
        ] {
            assert_eq!(request_id(None, Some(bad.as_bytes())), None, "{bad}");
        }
        // A later version may append fields.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(request_id(None, Some(later)), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn a_long_request_path_is_cut_on_a_character_boundary() {
        assert_eq!(bounded_path("/api//kernels"), "/api//kernels");
        let long = format!("/{}", "\u{e9}".repeat(MAX_REQUEST_PATH));
        let cut = bounded_path(&long);
        assert!(cut.len() <= MAX_REQUEST_PATH && cut.len() >= MAX_REQUEST_PATH - 1 && long.starts_with(cut));
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
        let log = AuditLog::open(&AuditTarget::File(path.clone()), 0).unwrap();
        let rec = |id| Record::new(id, Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        log.write(&rec("a"));
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.reopen(&AuditTarget::File(path.clone())).unwrap();
        log.write(&rec("b"));
        // A path that cannot be opened is an error, and the records keep going to the open file.
        assert!(log.reopen(&AuditTarget::File(dir.path().join("no/such/dir/audit.jsonl"))).is_err());
        log.write(&rec("c"));
        drop(log);
        assert!(std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap().contains("\"a\""));
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.contains("\"b\"") && now.contains("\"c\"") && !now.contains("\"a\""), "{now}");
    }

    /// The ids of the records in an audit file, in order.
    fn ids_in(path: &std::path::Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().into())
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn records_decided_in_one_turn_are_written_together_each_before_its_request_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditTarget::File(path.clone()), 2).unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (log, path) = (log.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let id = format!("r{i}");
                let rec = Record::new(&id, Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
                log.log(&rec, Some(0)).await;
                // Written before log returns, i.e. before the response would be sent.
                assert!(ids_in(&path).contains(&id), "{id} not written yet");
                // A second record from the same request, in a later turn: its own write.
                let later = format!("s{i}");
                log.log(
                    &Record::new(&later, Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None),
                    Some(0),
                )
                .await;
                assert!(ids_in(&path).contains(&later), "{later} not written yet");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let ids = ids_in(&path);
        let mut want: Vec<String> = (0..40).flat_map(|i| [format!("r{i}"), format!("s{i}")]).collect();
        let mut got = ids.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "every record once, every line whole");
        // The 40 tasks ran in one turn: their first records took one write, not 40.
        let writes = log.writes.load(Ordering::Relaxed);
        assert!(writes < 10, "{writes} writes for 80 records");
        // Off the workers, or on a worker the log has no batch for: a write per record.
        let before = log.writes.load(Ordering::Relaxed);
        log.log(&Record::new("x", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None), None).await;
        log.log(&Record::new("y", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None), Some(2)).await;
        assert_eq!(log.writes.load(Ordering::Relaxed), before + 2);
        assert_eq!(ids_in(&path)[80..], ["x".to_string(), "y".to_string()]);
    }

    #[test]
    fn a_worker_whose_loop_has_ended_writes_what_its_flush_task_never_did() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditTarget::File(path.clone()), 1).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let rec = Record::new("late", Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
            let mut logging = std::pin::pin!(log.log(&rec, Some(0)));
            // One poll: the record is in the batch and its flush task is queued, not yet run.
            assert!(futures_util::poll!(logging.as_mut()).is_pending());
        });
        // The event loop ends with the flush task still queued: dropping it never runs it.
        drop(rt);
        assert!(ids_in(&path).is_empty());
        log.flush_now(0);
        assert_eq!(ids_in(&path), ["late"]);
    }

    /// /dev/full takes the open and fails every write (ENOSPC), as a full disk does.
    #[cfg(target_os = "linux")]
    #[test]
    fn records_that_cannot_be_written_are_counted() {
        let counter = prometheus_client::metrics::counter::Counter::default();
        let log =
            AuditLog::open(&AuditTarget::File("/dev/full".into()), 1).unwrap().count_write_errors_in(counter.clone());
        let rec = |id| Record::new(id, Event::KernelStart, Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        log.write(&rec("a"));
        assert_eq!(counter.get(), 1);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (b, c) = (rec("b"), rec("c"));
            tokio::join!(log.log(&b, Some(0)), log.log(&c, Some(0)));
        });
        assert_eq!(counter.get(), 3, "a failed batch counts each of its records");
    }

    #[test]
    fn file_log_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let log = AuditLog::open(&AuditTarget::File(path.clone()), 0).unwrap();
        // Four threads at once: every line whole.
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in (t * 25)..(t * 25 + 25) {
                        let id = format!("{i}");
                        log.write(&Record::new(
                            &id,
                            Event::KernelStart,
                            Mode::Drop,
                            "127.0.0.1:1".parse().unwrap(),
                            None,
                        ));
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
