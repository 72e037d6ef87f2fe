//! `envgate audit summarize`: an admin's view of the audit log.
//!
//! Reads audit records (JSON lines, see docs/audit.md) and counts, per kernelspec and per user, which
//! names were rejected (and why) and which were kept (and by which source); which values broke a value
//! rule (by name and rule) and what the `path` rule did; refused kernel starts by reason; ambiguous-path
//! refusals; session starts allowed and refused. Running envgate in `report` mode and reading this
//! summary is how an admin learns what clients really send before turning enforcement on.
//!
//! It streams: one line is read at a time (at most [`MAX_LINE`] bytes of it held), and only counts are
//! kept, in maps whose keys (kernelspecs, users, names, reasons) are capped at [`MAX_KEYS`] each, so
//! memory does not grow with the number of records. gzip-compressed logs are read as they are. The
//! counting and rendering are pure ([`Summary::add_line`], [`Summary::to_text`], [`Summary::to_json`]);
//! [`run`] is the thin command-line shell around them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// `envgate audit ...`
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Per kernelspec and per user: which names were rejected (how often, why) and kept (how often);
    /// value violations, refused starts by reason, ambiguous paths, session starts.
    Summarize(SummarizeArgs),
}

#[derive(Debug, clap::Args)]
pub struct SummarizeArgs {
    /// The audit log (JSON lines, plain or gzip-compressed), or `-` for standard input.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Output: `text` for people, `json` for machines.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Only records at or after this time: RFC 3339 (`2026-11-25T13:00:00Z`) or a duration before
    /// now (`1h`, `7d`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records before this time: RFC 3339 or a duration before now.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only records of this user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Only records of this kernelspec.
    #[arg(long, value_name = "NAME")]
    pub kernelspec: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The longest line held; a longer one is skipped (counted as unreadable) without being held.
pub const MAX_LINE: usize = 1 << 20;
/// The most distinct keys (kernelspecs, users, names, reasons) one map counts; the rest are counted
/// under [`OTHER`].
pub const MAX_KEYS: usize = 10_000;
pub const OTHER: &str = "(other)";
/// How many unreadable line numbers the summary lists (it counts them all).
pub const LISTED_INVALID: usize = 100;

/// The fields of an audit record the summary needs; anything else in the line is ignored, so older and
/// newer envgate versions' logs both read.
#[derive(Debug, Deserialize)]
struct Line {
    event: String,
    #[serde(default)]
    time: Option<Time>,
    #[serde(default)]
    ts: Option<Time>,
    #[serde(default)]
    timestamp: Option<Time>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    kernelspec: Option<String>,
    #[serde(default)]
    kept: Vec<Kept>,
    #[serde(default)]
    rejected: Vec<Rejected>,
    #[serde(default)]
    violations: Vec<Violated>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// A record's time: RFC 3339 text, or a number of seconds (or, when that large, milliseconds) since
/// the epoch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Time {
    Text(String),
    Number(f64),
}

impl Time {
    fn at(&self) -> Option<SystemTime> {
        match self {
            Time::Text(t) => humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok(),
            Time::Number(n) if n.is_finite() && *n >= 0.0 => {
                let secs = if *n > 1e11 { n / 1000.0 } else { *n };
                Duration::try_from_secs_f64(secs).ok().and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
            }
            Time::Number(_) => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Kept {
    name: String,
    source: String,
}

#[derive(Debug, Deserialize)]
struct Rejected {
    name: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct Violated {
    name: String,
    rule: String,
}

/// Adds one to `key`'s count, or to [`OTHER`]'s when the map already counts [`MAX_KEYS`] keys.
fn bump<K: Ord + Clone>(map: &mut BTreeMap<K, u64>, key: &K, other: impl FnOnce() -> K) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_KEYS {
        map.insert(key.clone(), 1);
    } else {
        *map.entry(other()).or_default() += 1;
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn other_pair() -> (String, String) {
    pair(OTHER, OTHER)
}

/// Counts for one group of records (one kernelspec, or one user).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// How many records fell into the group: the denominator for "how often".
    pub records: u64,
    /// (name, reason) -> records that rejected it for that reason.
    pub rejected: BTreeMap<(String, String), u64>,
    /// (name, source) -> records that kept it by that source.
    pub kept: BTreeMap<(String, String), u64>,
}

impl Tally {
    fn add(&mut self, line: &Line) {
        self.records += 1;
        for r in &line.rejected {
            bump(&mut self.rejected, &pair(&r.name, &r.reason), other_pair);
        }
        for k in &line.kept {
            bump(&mut self.kept, &pair(&k.name, &k.source), other_pair);
        }
    }
}

/// Which records count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub user: Option<String>,
    pub kernelspec: Option<String>,
}

impl Filter {
    fn windowed(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }
}

/// Everything the summary reports. `None` keys are records without a kernelspec or a user.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Audit records read, whether the filter kept them or not.
    pub read: u64,
    /// Records the filter left out: outside the time window (or without a time while there is one),
    /// or of another user or kernelspec.
    pub filtered_out: u64,
    /// Records counted, by `event` (`kernel_start`, `session_start`).
    pub events: BTreeMap<String, u64>,
    /// Records counted, by `mode` (`drop`, `reject`, `report`).
    pub modes: BTreeMap<String, u64>,
    pub by_kernelspec: BTreeMap<Option<String>, Tally>,
    pub by_user: BTreeMap<Option<String>, Tally>,
    /// (name, rule) -> records where a forwarded (in `report` mode: would-be forwarded) value of that
    /// name broke that rule.
    pub violations: BTreeMap<(String, String), u64>,
    /// What the `kernel_path` rule did (`refused`, `stripped`) -> records.
    pub path: BTreeMap<String, u64>,
    /// Kernel starts by outcome (`forwarded`, `refused`).
    pub kernel_starts: BTreeMap<String, u64>,
    /// Refused kernel starts by the record's `error`.
    pub refused_by_reason: BTreeMap<String, u64>,
    /// Refusals of a path that could normalize into a start, by event.
    pub ambiguous: BTreeMap<String, u64>,
    /// Session starts by outcome (`forwarded`: allowed, `refused`).
    pub session_starts: BTreeMap<String, u64>,
    /// Refused session starts by the record's `error`.
    pub sessions_refused_by_reason: BTreeMap<String, u64>,
    /// Lines that were not audit records (a truncated last line, a stray message, garbage).
    pub invalid: u64,
    /// The first [`LISTED_INVALID`] of their 1-based line numbers.
    pub invalid_lines: Vec<u64>,
}

impl Summary {
    /// Counts every line of an audit log (all of them, unfiltered); blank lines are ignored, other
    /// unreadable ones counted in `invalid` rather than failing the whole summary.
    pub fn from_lines<I, L>(lines: I) -> Summary
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[u8]>,
    {
        let mut s = Summary::default();
        let f = Filter::default();
        for (i, line) in lines.into_iter().enumerate() {
            s.add_line(i as u64 + 1, line.as_ref(), &f);
        }
        s
    }

    /// Counts line number `n` (1-based) if it is an audit record `filter` keeps.
    pub fn add_line(&mut self, n: u64, line: &[u8], filter: &Filter) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(rec) => {
                self.read += 1;
                if self.keeps(filter, &rec) {
                    self.add(&rec);
                } else {
                    self.filtered_out += 1;
                }
            }
            Err(_) => self.invalid_line(n),
        }
    }

    /// Counts line `n` as unreadable.
    pub fn invalid_line(&mut self, n: u64) {
        self.invalid += 1;
        if self.invalid_lines.len() < LISTED_INVALID {
            self.invalid_lines.push(n);
        }
    }

    fn keeps(&self, f: &Filter, rec: &Line) -> bool {
        if f.user.as_ref().is_some_and(|u| rec.user.as_ref() != Some(u)) {
            return false;
        }
        if f.kernelspec.as_ref().is_some_and(|k| rec.kernelspec.as_ref() != Some(k)) {
            return false;
        }
        if !f.windowed() {
            return true;
        }
        let Some(at) = [&rec.time, &rec.ts, &rec.timestamp].into_iter().flatten().find_map(Time::at) else {
            return false;
        };
        !matches!(f.since, Some(s) if at < s) && !matches!(f.until, Some(u) if at >= u)
    }

    fn add(&mut self, line: &Line) {
        let event = line.event.as_str();
        bump(&mut self.events, &line.event, || OTHER.to_string());
        if let Some(mode) = &line.mode {
            bump(&mut self.modes, mode, || OTHER.to_string());
        }
        bump_tally(&mut self.by_kernelspec, &line.kernelspec, line);
        bump_tally(&mut self.by_user, &line.user, line);
        for v in &line.violations {
            bump(&mut self.violations, &pair(&v.name, &v.rule), other_pair);
        }
        if let Some(p) = &line.path {
            bump(&mut self.path, p, || OTHER.to_string());
        }
        let outcome = line.outcome.clone().unwrap_or_else(|| "unknown".to_string());
        let refused = outcome == "refused";
        let why = line.error.clone().unwrap_or_else(|| "(none)".to_string());
        match event {
            "kernel_start" => {
                bump(&mut self.kernel_starts, &outcome, || OTHER.to_string());
                if refused {
                    bump(&mut self.refused_by_reason, &why, || OTHER.to_string());
                }
            }
            "session_start" => {
                bump(&mut self.session_starts, &outcome, || OTHER.to_string());
                if refused {
                    bump(&mut self.sessions_refused_by_reason, &why, || OTHER.to_string());
                }
            }
            _ => {}
        }
        if refused && line.error.as_deref() == Some(AMBIGUOUS) {
            bump(&mut self.ambiguous, &line.event, || OTHER.to_string());
        }
    }

    /// Records counted.
    pub fn records(&self) -> u64 {
        self.events.values().sum()
    }

    /// The machine-readable form (stable field names; lists sorted by count, most frequent first).
    pub fn to_json(&self) -> serde_json::Value {
        let groups = |by: &BTreeMap<Option<String>, Tally>, key: &'static str| -> Vec<serde_json::Value> {
            by.iter()
                .map(|(k, t)| {
                    let mut v = serde_json::to_value(GroupJson::from(t)).expect("serializable");
                    v.as_object_mut().unwrap().insert(key.to_string(), k.clone().into());
                    v
                })
                .collect()
        };
        let violations: Vec<serde_json::Value> = sorted(&self.violations)
            .into_iter()
            .map(|((name, rule), n)| serde_json::json!({"name": name, "rule": rule, "count": n}))
            .collect();
        serde_json::json!({
            "records": self.records(),
            "read": self.read,
            "filtered_out": self.filtered_out,
            "events": self.events,
            "modes": self.modes,
            "invalid_line_count": self.invalid,
            "invalid_lines": self.invalid_lines,
            "kernel_starts": {
                "forwarded": self.kernel_starts.get("forwarded").copied().unwrap_or(0),
                "refused": self.kernel_starts.get("refused").copied().unwrap_or(0),
                "refused_by_reason": self.refused_by_reason,
            },
            "session_starts": {
                "allowed": self.session_starts.get("forwarded").copied().unwrap_or(0),
                "refused": self.session_starts.get("refused").copied().unwrap_or(0),
                "refused_by_reason": self.sessions_refused_by_reason,
            },
            "ambiguous_path_refusals": self.ambiguous,
            "violations": violations,
            "path": self.path,
            "by_kernelspec": groups(&self.by_kernelspec, "kernelspec"),
            "by_user": groups(&self.by_user, "user"),
        })
    }

    /// The human-readable form: the totals, then one block per kernelspec and per user, rejected
    /// names first.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let list = |m: &BTreeMap<String, u64>| m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
        let _ = write!(out, "{}", count_records(self.records()));
        if !self.events.is_empty() {
            let _ = write!(out, " ({}); modes: {}", list(&self.events), list(&self.modes));
        }
        out.push('\n');
        if self.filtered_out > 0 {
            let _ =
                writeln!(out, "left out by --since/--until/--user/--kernelspec: {}", count_records(self.filtered_out));
        }
        if self.modes.contains_key("report") {
            let _ = writeln!(out, "report mode: \"rejected\" is what drop mode would have removed");
        }
        if self.invalid > 0 {
            let _ = writeln!(out, "skipped {} lines that are not audit records", self.invalid);
        }
        if !self.kernel_starts.is_empty() {
            let get = |k: &str| self.kernel_starts.get(k).copied().unwrap_or(0);
            let _ = writeln!(out, "\nkernel starts: {} forwarded, {} refused", get("forwarded"), get("refused"));
            let rows = sorted(&self.refused_by_reason);
            let w = rows.iter().map(|(why, _)| why.len()).max().unwrap_or(0);
            for (why, n) in rows {
                let _ = writeln!(out, "  refused  {why:<w$}  {n}");
            }
        }
        if !self.session_starts.is_empty() {
            let get = |k: &str| self.session_starts.get(k).copied().unwrap_or(0);
            let _ = writeln!(out, "\nsession starts: {} allowed, {} refused", get("forwarded"), get("refused"));
            let rows = sorted(&self.sessions_refused_by_reason);
            let w = rows.iter().map(|(why, _)| why.len()).max().unwrap_or(0);
            for (why, n) in rows {
                let _ = writeln!(out, "  refused  {why:<w$}  {n}");
            }
        }
        if !self.ambiguous.is_empty() {
            let _ = writeln!(out, "\nambiguous-path refusals: {}", list(&self.ambiguous));
        }
        if !self.violations.is_empty() || !self.path.is_empty() {
            let _ = writeln!(out, "\nvalue violations (name, rule, records):");
            let rows = sorted(&self.violations);
            let w = rows.iter().map(|((n, _), _)| n.len()).max().unwrap_or(0).max(4);
            let rw = rows.iter().map(|((_, r), _)| r.len()).max().unwrap_or(0);
            for ((name, rule), n) in rows {
                let _ = writeln!(out, "  {name:<w$}  {rule:<rw$}  {n}");
            }
            for (action, n) in sorted(&self.path) {
                let _ = writeln!(out, "  {:<w$}  {action}  {n}", "path");
            }
        }
        for (title, by) in [("kernelspec", &self.by_kernelspec), ("user", &self.by_user)] {
            for (key, tally) in by {
                let _ =
                    writeln!(out, "\n{title} {}: {}", key.as_deref().unwrap_or("(none)"), count_records(tally.records));
                write_table(&mut out, tally);
            }
        }
        out
    }
}

/// The audit record's `error` for a refused ambiguous path.
const AMBIGUOUS: &str = "ambiguous path";

fn bump_tally(map: &mut BTreeMap<Option<String>, Tally>, key: &Option<String>, line: &Line) {
    let key = if map.contains_key(key) || map.len() < MAX_KEYS { key.clone() } else { Some(OTHER.to_string()) };
    map.entry(key).or_default().add(line);
}

/// A count map's entries, most frequent first, then by key.
fn sorted<K: Ord + Clone>(m: &BTreeMap<K, u64>) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

fn count_records(n: u64) -> String {
    format!("{n} record{}", if n == 1 { "" } else { "s" })
}

/// Rows of one group: rejected then kept, each most frequent first, then by name.
fn write_table(out: &mut String, t: &Tally) {
    let mut rows: Vec<(&str, &str, &str, u64)> = Vec::new();
    for (label, map) in [("rejected", &t.rejected), ("kept", &t.kept)] {
        let mut part: Vec<_> = map.iter().map(|((name, why), n)| (label, name.as_str(), why.as_str(), *n)).collect();
        part.sort_by(|a, b| b.3.cmp(&a.3).then(a.1.cmp(b.1)).then(a.2.cmp(b.2)));
        rows.extend(part);
    }
    if rows.is_empty() {
        out.push_str("  (no names)\n");
        return;
    }
    let name_w = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let why_w = rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
    for (label, name, why, n) in rows {
        let _ = writeln!(out, "  {label:<8}  {name:<name_w$}  {why:<why_w$}  {n}/{}", t.records);
    }
}

#[derive(Serialize)]
struct GroupJson {
    records: u64,
    rejected: Vec<NameCount>,
    kept: Vec<NameCount>,
}

#[derive(Serialize)]
struct NameCount {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    count: u64,
}

impl From<&Tally> for GroupJson {
    fn from(t: &Tally) -> Self {
        let sorted = |map: &BTreeMap<(String, String), u64>, rejected: bool| {
            let mut v: Vec<NameCount> = map
                .iter()
                .map(|((name, why), n)| NameCount {
                    name: name.clone(),
                    reason: rejected.then(|| why.clone()),
                    source: (!rejected).then(|| why.clone()),
                    count: *n,
                })
                .collect();
            v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
            v
        };
        GroupJson { records: t.records, rejected: sorted(&t.rejected, true), kept: sorted(&t.kept, false) }
    }
}

/// A time bound: RFC 3339, or a duration before `now`.
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let t = text.trim();
    if let Ok(at) = humantime::parse_rfc3339_weak(t.trim_end_matches('Z')) {
        return Ok(at);
    }
    match humantime::parse_duration(t) {
        Ok(d) => now.checked_sub(d).ok_or_else(|| format!("{t:?} reaches before the epoch")),
        Err(_) => Err(format!("{t:?} is neither an RFC 3339 time (2026-11-25T13:00:00Z) nor a duration (1h, 7d)")),
    }
}

/// Feeds every line of `input` to `each` (its 1-based number and bytes, without the newline), one at a
/// time through one buffer: a line longer than [`MAX_LINE`] is passed as `None` and not held.
pub fn for_each_line(mut input: impl BufRead, mut each: impl FnMut(u64, Option<&[u8]>)) -> io::Result<()> {
    let mut line = Vec::new();
    let mut n = 0u64;
    let mut too_long = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if !line.is_empty() || too_long {
                n += 1;
                each(n, (!too_long).then_some(&line[..]));
            }
            return Ok(());
        }
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = end.unwrap_or(buf.len());
        input.consume(used);
        if end.is_some() {
            n += 1;
            each(n, (!too_long).then_some(&line[..]));
            line.clear();
            too_long = false;
        }
    }
}

/// `input`, gunzipped when it starts with gzip's magic bytes (every member of a concatenated file).
pub fn decompressed<'r>(mut input: impl BufRead + 'r) -> io::Result<Box<dyn BufRead + 'r>> {
    let gz = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz { Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(input))) } else { Box::new(input) })
}

/// `envgate audit summarize PATH [--since T] [--until T] [--user U] [--kernelspec K] [--format text|json]`.
///
/// Exit codes: 0; 1 when the log cannot be read (cannot open, a read error, a broken gzip stream);
/// 2 on a usage problem or when the input holds no audit record at all; 3 when some lines are not
/// audit records (the summary of the others is still printed). Needs no configuration: it reads a log,
/// wherever it was copied to.
pub fn run(cmd: &AuditCommand) -> ExitCode {
    let AuditCommand::Summarize(args) = cmd;
    let now = SystemTime::now();
    let bound = |t: &Option<String>| t.as_deref().map(|t| parse_time(t, now)).transpose();
    let filter = match (bound(&args.since), bound(&args.until)) {
        (Ok(since), Ok(until)) => Filter { since, until, user: args.user.clone(), kernelspec: args.kernelspec.clone() },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("envgate: --since/--until: {e}");
            return ExitCode::from(2);
        }
    };
    let mut summary = Summary::default();
    let read = |input: Box<dyn Read>| -> io::Result<()> {
        let input = decompressed(BufReader::with_capacity(64 * 1024, input))?;
        for_each_line(input, |n, line| match line {
            Some(l) => summary.add_line(n, l, &filter),
            None => summary.invalid_line(n),
        })
    };
    let input: io::Result<Box<dyn Read>> = if args.path.as_os_str() == "-" {
        Ok(Box::new(io::stdin().lock()))
    } else {
        std::fs::File::open(&args.path).map(|f| Box::new(f) as Box<dyn Read>)
    };
    if let Err(e) = input.and_then(read) {
        eprintln!("envgate: cannot read {}: {e}", args.path.display());
        return ExitCode::FAILURE;
    }
    if summary.read == 0 {
        match summary.invalid_lines.first() {
            Some(first) => eprintln!(
                "envgate: {} holds no audit records: {} lines are not audit records (first: line {first})",
                args.path.display(),
                summary.invalid
            ),
            None => eprintln!("envgate: {} holds no audit records (it is empty)", args.path.display()),
        }
        return ExitCode::from(2);
    }
    if let Some(first) = summary.invalid_lines.first() {
        eprintln!("envgate: skipped {} lines that are not audit records (first: line {first})", summary.invalid);
    }
    match args.format {
        Format::Text => crate::output::emit(summary.to_text()),
        Format::Json => crate::output::emit(format!(
            "{}\n",
            serde_json::to_string_pretty(&summary.to_json()).expect("serializable")
        )),
    }
    if summary.invalid > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(user: Option<&str>, spec: Option<&str>, kept: &[(&str, &str)], rejected: &[(&str, &str)]) -> String {
        json!({
            "time": "2026-11-25T13:05:40.968Z", "id": "x", "event": "kernel_start", "mode": "report",
            "client": "127.0.0.1:1", "x_forwarded_for": null, "user": user, "kernelspec": spec,
            "kept": kept.iter().map(|(n, s)| json!({"name": n, "source": s})).collect::<Vec<_>>(),
            "rejected": rejected.iter().map(|(n, r)| json!({"name": n, "reason": r})).collect::<Vec<_>>(),
            "outcome": "forwarded", "status": 201, "kernel_id": null, "error": null,
        })
        .to_string()
    }

    fn sample() -> Vec<String> {
        vec![
            rec(Some("alice"), Some("python3"), &[("KERNEL_USERNAME", "prefix:KERNEL_")], &[("PATH", "denied")]),
            rec(
                Some("alice"),
                Some("python3"),
                &[("LANG", "config")],
                &[("PATH", "denied"), ("AWS_KEY", "not_allowed")],
            ),
            rec(Some("bob"), Some("spark"), &[("LANG", "config")], &[("AWS_KEY", "not_allowed")]),
            rec(None, None, &[], &[]),
        ]
    }

    fn key(name: &str, why: &str) -> (String, String) {
        (name.to_string(), why.to_string())
    }

    #[test]
    fn counts_per_kernelspec_and_per_user() {
        let s = Summary::from_lines(sample());
        assert_eq!(s.records(), 4);
        assert_eq!(s.modes, BTreeMap::from([("report".to_string(), 4)]));
        let py = &s.by_kernelspec[&Some("python3".to_string())];
        assert_eq!(py.records, 2);
        assert_eq!(py.rejected, BTreeMap::from([(key("PATH", "denied"), 2), (key("AWS_KEY", "not_allowed"), 1)]));
        assert_eq!(
            py.kept,
            BTreeMap::from([(key("KERNEL_USERNAME", "prefix:KERNEL_"), 1), (key("LANG", "config"), 1)])
        );
        let bob = &s.by_user[&Some("bob".to_string())];
        assert_eq!(bob.records, 1);
        assert_eq!(bob.rejected, BTreeMap::from([(key("AWS_KEY", "not_allowed"), 1)]));
        // A record without kernelspec or user still counts, under `None`.
        assert_eq!(s.by_kernelspec[&None].records, 1);
        assert_eq!(s.by_user[&None].records, 1);
    }

    #[test]
    fn a_name_rejected_for_two_reasons_is_counted_per_reason() {
        let s = Summary::from_lines([
            rec(Some("a"), Some("k"), &[], &[("KERNEL_UID", "denied")]),
            rec(Some("a"), Some("k"), &[("KERNEL_UID", "prefix:KERNEL_")], &[]),
        ]);
        let t = &s.by_user[&Some("a".to_string())];
        assert_eq!(t.rejected, BTreeMap::from([(key("KERNEL_UID", "denied"), 1)]));
        assert_eq!(t.kept, BTreeMap::from([(key("KERNEL_UID", "prefix:KERNEL_"), 1)]));
    }

    #[test]
    fn bad_lines_are_skipped_and_numbered() {
        let mut lines = sample();
        lines.insert(1, "not json".into());
        lines.insert(2, String::new()); // blank: ignored, not invalid
        lines.push("{\"time\": \"2026-11-25T13".into()); // a truncated last line
        lines.push("{\"no_event\": 1}".into());
        let s = Summary::from_lines(lines);
        assert_eq!(s.records(), 4);
        assert_eq!(s.invalid_lines, vec![2, 7, 8]);
        assert_eq!(s.invalid, 3);
    }

    #[test]
    fn unknown_fields_and_missing_optional_ones_are_fine() {
        let s = Summary::from_lines([r#"{"event":"session_start","future_field":[1,2]}"#]);
        assert_eq!(s.events, BTreeMap::from([("session_start".to_string(), 1)]));
        assert_eq!(s.by_kernelspec[&None].records, 1);
    }

    #[test]
    fn json_lists_most_frequent_first_with_reason_or_source() {
        let v = Summary::from_lines(sample()).to_json();
        assert_eq!(v["records"], 4);
        assert_eq!(v["events"], json!({"kernel_start": 4}));
        let py = v["by_kernelspec"].as_array().unwrap().iter().find(|g| g["kernelspec"] == "python3").unwrap();
        assert_eq!(
            py["rejected"],
            json!([{"name": "PATH", "reason": "denied", "count": 2}, {"name": "AWS_KEY", "reason": "not_allowed", "count": 1}])
        );
        assert_eq!(py["kept"][0], json!({"name": "KERNEL_USERNAME", "source": "prefix:KERNEL_", "count": 1}));
        assert_eq!(py["records"], 2);
        let none = v["by_user"].as_array().unwrap().iter().find(|g| g["user"].is_null()).unwrap();
        assert_eq!(none["records"], 1);
    }

    #[test]
    fn text_shows_each_group_with_counts_out_of_its_records() {
        let text = Summary::from_lines(sample()).to_text();
        assert!(text.starts_with("4 records (kernel_start 4); modes: report 4\n"), "{text}");
        assert!(text.contains("what drop mode would have removed"), "{text}");
        let block = text.split("\n\n").find(|b| b.starts_with("kernelspec python3:")).unwrap();
        let rows: Vec<&str> = block.lines().collect();
        assert_eq!(rows[0], "kernelspec python3: 2 records");
        // Rejected first, most frequent first; columns aligned.
        assert_eq!(rows[1], "  rejected  PATH             denied          2/2");
        assert_eq!(rows[2], "  rejected  AWS_KEY          not_allowed     1/2");
        assert_eq!(rows[3], "  kept      KERNEL_USERNAME  prefix:KERNEL_  1/2");
        assert!(text.contains("\nuser bob: 1 record\n"), "{text}");
        assert!(text.contains("\nkernelspec (none): 1 record\n  (no names)\n"), "{text}");
    }

    /// A record with the fields the new sections read.
    fn full(
        event: &str,
        time: &str,
        user: &str,
        outcome: &str,
        error: Option<&str>,
        violations: &[(&str, &str)],
    ) -> String {
        json!({
            "time": time, "event": event, "mode": "drop", "user": user, "kernelspec": "py",
            "kept": [], "rejected": [],
            "violations": violations.iter().map(|(n, r)| json!({"name": n, "rule": r})).collect::<Vec<_>>(),
            "path": if error == Some("path escapes the root") { json!("refused") } else { json!(null) },
            "outcome": outcome, "status": 400, "error": error, "schema": 2, "request_id": "r", "duration_ms": 3,
        })
        .to_string()
    }

    fn lines() -> Vec<String> {
        vec![
            full(
                "kernel_start",
                "2026-11-25T10:00:00.000Z",
                "alice",
                "refused",
                Some("value rules"),
                &[("KERNEL_UID", "pattern")],
            ),
            full(
                "kernel_start",
                "2026-11-25T11:00:00.000Z",
                "bob",
                "refused",
                Some("value rules"),
                &[("KERNEL_UID", "pattern"), ("FOO", "forbidden")],
            ),
            full("kernel_start", "2026-11-25T12:00:00.000Z", "bob", "refused", Some("path escapes the root"), &[]),
            full("kernel_start", "2026-11-25T12:30:00.000Z", "bob", "refused", Some("ambiguous path"), &[]),
            full("session_start", "2026-11-25T13:00:00.000Z", "bob", "refused", Some("ambiguous path"), &[]),
            full("session_start", "2026-11-25T14:00:00.000Z", "alice", "refused", Some("sessions denied"), &[]),
            full("session_start", "2026-11-25T15:00:00.000Z", "alice", "forwarded", None, &[]),
            full("kernel_start", "2026-11-25T16:00:00.000Z", "alice", "forwarded", None, &[]),
        ]
    }

    #[test]
    fn counts_violations_refusals_ambiguous_paths_and_sessions() {
        let s = Summary::from_lines(lines());
        assert_eq!(s.violations, BTreeMap::from([(key("KERNEL_UID", "pattern"), 2), (key("FOO", "forbidden"), 1)]));
        assert_eq!(s.path, BTreeMap::from([("refused".to_string(), 1)]));
        assert_eq!(s.kernel_starts, BTreeMap::from([("refused".to_string(), 4), ("forwarded".to_string(), 1)]));
        assert_eq!(
            s.refused_by_reason,
            BTreeMap::from([
                ("value rules".to_string(), 2),
                ("path escapes the root".to_string(), 1),
                ("ambiguous path".to_string(), 1)
            ])
        );
        assert_eq!(s.ambiguous, BTreeMap::from([("kernel_start".to_string(), 1), ("session_start".to_string(), 1)]));
        assert_eq!(s.session_starts, BTreeMap::from([("refused".to_string(), 2), ("forwarded".to_string(), 1)]));
        let v = s.to_json();
        assert_eq!(v["violations"][0], json!({"name": "KERNEL_UID", "rule": "pattern", "count": 2}));
        assert_eq!(v["session_starts"]["allowed"], 1);
        assert_eq!(v["session_starts"]["refused_by_reason"], json!({"ambiguous path": 1, "sessions denied": 1}));
        assert_eq!(v["kernel_starts"]["refused"], 4);
        let text = s.to_text();
        for want in [
            "\nkernel starts: 1 forwarded, 4 refused\n  refused  value rules            2\n",
            "\nsession starts: 1 allowed, 2 refused\n",
            "\nambiguous-path refusals: kernel_start 1, session_start 1\n",
            "\nvalue violations (name, rule, records):\n  KERNEL_UID  pattern    2\n  FOO         forbidden  1\n  path        refused  1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_numeric_time_out_of_range_is_no_time() {
        for n in [1e300, f64::MAX, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(Time::Number(n).at(), None, "{n}");
        }
        assert!(Time::Number(1_764_000_000.0).at().is_some());
        assert!(Time::Number(1_764_000_000_000.0).at().is_some(), "milliseconds");
    }

    #[test]
    fn filters_by_time_user_and_kernelspec() {
        let at = |t: &str| parse_time(t, SystemTime::now()).unwrap();
        let run = |f: Filter| {
            let mut s = Summary::default();
            for (i, l) in lines().iter().enumerate() {
                s.add_line(i as u64 + 1, l.as_bytes(), &f);
            }
            s
        };
        let s = run(Filter {
            since: Some(at("2026-11-25T12:00:00Z")),
            until: Some(at("2026-11-25T15:00:00Z")),
            ..Filter::default()
        });
        assert_eq!((s.records(), s.filtered_out, s.read), (4, 4, 8));
        let s = run(Filter { user: Some("alice".into()), ..Filter::default() });
        assert_eq!(s.records(), 4);
        assert!(s.by_user.keys().all(|u| u.as_deref() == Some("alice")));
        let s = run(Filter { kernelspec: Some("other".into()), ..Filter::default() });
        assert_eq!(s.records(), 0);
        // relative: all of 2026-11-25 is more than an hour ago
        let s = run(Filter { since: Some(at("1h")), ..Filter::default() });
        assert_eq!(s.records(), 0);
        // the time field under another name, or as epoch milliseconds
        let f = Filter { since: Some(at("2026-11-25T00:00:00Z")), ..Filter::default() };
        let mut s = Summary::default();
        s.add_line(1, br#"{"event":"kernel_start","ts":"2026-11-25T10:00:00Z"}"#, &f);
        s.add_line(2, br#"{"event":"kernel_start","timestamp":1795600000000}"#, &f);
        s.add_line(3, br#"{"event":"kernel_start"}"#, &f); // no time: outside any window
        assert_eq!((s.records(), s.filtered_out), (2, 1));
        assert!(parse_time("yesterday", SystemTime::now()).is_err());
    }

    #[test]
    fn lines_are_read_one_at_a_time_and_long_ones_are_not_held() {
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("a\n{long}\nb\nc");
        let mut seen = Vec::new();
        for_each_line(io::BufReader::with_capacity(7, input.as_bytes()), |n, l| {
            seen.push((n, l.map(|l| String::from_utf8_lossy(l).into_owned())))
        })
        .unwrap();
        assert_eq!(seen, [(1, Some("a".into())), (2, None), (3, Some("b".into())), (4, Some("c".into()))]);
    }

    #[test]
    fn gzip_is_detected_by_its_magic_bytes() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"line one\nline two\n").unwrap();
        let bytes = gz.finish().unwrap();
        let mut out = String::new();
        decompressed(bytes.as_slice()).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "line one\nline two\n");
        let mut out = String::new();
        decompressed(&b"plain\n"[..]).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "plain\n");
    }

    #[test]
    fn maps_stop_growing_at_max_keys() {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..MAX_KEYS + 5 {
            bump(&mut m, &i.to_string(), || OTHER.to_string());
        }
        assert_eq!(m.len(), MAX_KEYS + 1);
        assert_eq!(m[OTHER], 5);
    }

    #[test]
    fn empty_log() {
        let s = Summary::from_lines(Vec::<String>::new());
        assert_eq!(s.records(), 0);
        assert_eq!(s.to_text(), "0 records\n");
        assert_eq!(s.to_json()["by_user"], json!([]));
    }
}
