//! `envgate audit summarize`: an admin's view of the audit log.
//!
//! Reads audit records (JSON lines, see the README's "Audit log") and counts, per kernelspec and per user,
//! which names were rejected (and why) and which were kept (and by which source). Running envgate in
//! `report` mode and reading this summary is how an admin learns what clients really send before turning
//! enforcement on. The counting and rendering are pure ([`Summary::from_lines`], [`Summary::to_text`],
//! [`Summary::to_json`]); [`run`] is the thin command-line shell around them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead};
use std::path::PathBuf;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// `envgate audit ...`
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Per kernelspec and per user: which names were rejected (how often, why) and kept (how often).
    Summarize(SummarizeArgs),
}

#[derive(Debug, clap::Args)]
pub struct SummarizeArgs {
    /// The audit log (JSON lines), or `-` for standard input.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Output: `text` for people, `json` for machines.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The fields of an audit record the summary needs; anything else in the line is ignored, so older and
/// newer envgate versions' logs both read.
#[derive(Debug, Deserialize)]
struct Line {
    event: String,
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
            *self.rejected.entry((r.name.clone(), r.reason.clone())).or_default() += 1;
        }
        for k in &line.kept {
            *self.kept.entry((k.name.clone(), k.source.clone())).or_default() += 1;
        }
    }
}

/// Everything the summary reports. `None` keys are records without a kernelspec or a user.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Records read, by `event` (`kernel_start`, `session_start`).
    pub events: BTreeMap<String, u64>,
    /// Records read, by `mode` (`drop`, `reject`, `report`).
    pub modes: BTreeMap<String, u64>,
    pub by_kernelspec: BTreeMap<Option<String>, Tally>,
    pub by_user: BTreeMap<Option<String>, Tally>,
    /// 1-based numbers of lines that were not audit records (a truncated last line, a stray message).
    pub invalid_lines: Vec<u64>,
}

impl Summary {
    /// Counts every line of an audit log; blank lines are ignored, other unreadable ones are listed in
    /// `invalid_lines` rather than failing the whole summary.
    pub fn from_lines<I, L>(lines: I) -> Summary
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[u8]>,
    {
        let mut s = Summary::default();
        for (i, line) in lines.into_iter().enumerate() {
            let line = line.as_ref();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(line) {
                Ok(rec) => s.add(&rec),
                Err(_) => s.invalid_lines.push(i as u64 + 1),
            }
        }
        s
    }

    fn add(&mut self, line: &Line) {
        *self.events.entry(line.event.clone()).or_default() += 1;
        if let Some(mode) = &line.mode {
            *self.modes.entry(mode.clone()).or_default() += 1;
        }
        self.by_kernelspec.entry(line.kernelspec.clone()).or_default().add(line);
        self.by_user.entry(line.user.clone()).or_default().add(line);
    }

    /// Records read.
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
        serde_json::json!({
            "records": self.records(),
            "events": self.events,
            "modes": self.modes,
            "invalid_lines": self.invalid_lines,
            "by_kernelspec": groups(&self.by_kernelspec, "kernelspec"),
            "by_user": groups(&self.by_user, "user"),
        })
    }

    /// The human-readable form: one block per kernelspec and per user, rejected names first.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let list = |m: &BTreeMap<String, u64>| m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
        let _ = write!(out, "{}", count_records(self.records()));
        if !self.events.is_empty() {
            let _ = write!(out, " ({}); modes: {}", list(&self.events), list(&self.modes));
        }
        out.push('\n');
        if self.modes.contains_key("report") {
            let _ = writeln!(out, "report mode: \"rejected\" is what drop mode would have removed");
        }
        if !self.invalid_lines.is_empty() {
            let _ = writeln!(out, "skipped {} lines that are not audit records", self.invalid_lines.len());
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

/// `envgate audit summarize PATH [--format text|json]`: exit 0, or 1 when the log cannot be read.
/// Needs no configuration: it reads a log, wherever it was copied to.
pub fn run(cmd: &AuditCommand) -> ExitCode {
    let AuditCommand::Summarize(args) = cmd;
    let lines: io::Result<Vec<Vec<u8>>> = if args.path.as_os_str() == "-" {
        io::stdin().lock().split(b'\n').collect()
    } else {
        std::fs::File::open(&args.path).and_then(|f| io::BufReader::new(f).split(b'\n').collect())
    };
    let lines = match lines {
        Ok(l) => l,
        Err(e) => {
            eprintln!("envgate: cannot read {}: {e}", args.path.display());
            return ExitCode::FAILURE;
        }
    };
    let summary = Summary::from_lines(&lines);
    if let Some(first) = summary.invalid_lines.first() {
        eprintln!(
            "envgate: skipped {} lines that are not audit records (first: line {first})",
            summary.invalid_lines.len()
        );
    }
    match args.format {
        Format::Text => print!("{}", summary.to_text()),
        Format::Json => println!("{}", serde_json::to_string_pretty(&summary.to_json()).expect("serializable")),
    }
    ExitCode::SUCCESS
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

    #[test]
    fn empty_log() {
        let s = Summary::from_lines(Vec::<String>::new());
        assert_eq!(s.records(), 0);
        assert_eq!(s.to_text(), "0 records\n");
        assert_eq!(s.to_json()["by_user"], json!([]));
    }
}
