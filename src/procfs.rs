//! The standard `process_*` series, read from /proc at each scrape (Linux only; elsewhere they are
//! absent). The parsing is pure and unit-tested; [`ProcessCollector`] does the reading.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Clock ticks per second in /proc's times (`USER_HZ`): 100 on x86, ARM, RISC-V, POWER and
/// s390x Linux, whatever the kernel's own `HZ`. Reading `sysconf(_SC_CLK_TCK)` would need
/// `unsafe` code or another crate for a constant.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self/stat` tells about the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User and system CPU time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Start time, in clock ticks after boot.
    pub starttime: u64,
}

/// Parses `/proc/PID/stat`. The second field (the command in parentheses) may hold spaces and
/// parentheses itself, so the fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    // Fields 3 (state) onwards; utime is field 14, stime 15, starttime 22 (proc(5)).
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
}

/// The boot time, in seconds since the epoch: `btime` in `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The resident set size in bytes: `VmRSS` (in kB) in `/proc/PID/status`.
pub fn parse_rss_bytes(text: &str) -> Option<u64> {
    let v = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim();
    let kb: u64 = v.strip_suffix("kB")?.trim().parse().ok()?;
    kb.checked_mul(1024)
}

/// The process's numbers, each absent when its file cannot be read or parsed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Reads this process's [`Sample`] from /proc (all absent where there is no /proc).
pub fn sample() -> Sample {
    if !cfg!(target_os = "linux") {
        return Sample::default();
    }
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let stat = read("/proc/self/stat").as_deref().and_then(parse_stat);
    let btime = read("/proc/stat").as_deref().and_then(parse_btime);
    Sample {
        cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / TICKS_PER_SECOND),
        resident_bytes: read("/proc/self/status").as_deref().and_then(parse_rss_bytes),
        open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
        max_fds: rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft),
        start_time_seconds: stat.zip(btime).map(|(s, b)| b as f64 + s.starttime as f64 / TICKS_PER_SECOND),
    }
}

/// Writes the `process_*` series at each scrape, as the Prometheus client libraries name them.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = sample();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            ("process_resident_memory", "Resident memory size in bytes", Some(Unit::Bytes), s.resident_bytes),
            ("process_open_fds", "Number of open file descriptors", None, s.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", None, s.max_fds),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                // An i64 gauge: no count here comes near 2^63.
                let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
            }
        }
        if let Some(v) = s.start_time_seconds {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(
                "process_start_time",
                "Start time of the process since unix epoch in seconds",
                Some(&Unit::Seconds),
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A command with spaces and parentheses of its own, as a process may name itself.
        let text = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 \
                    123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat(text), Some(Stat { utime: 250, stime: 75, starttime: 123456 }));
    }

    #[test]
    fn a_truncated_or_garbled_stat_is_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("1 (x"), None);
        assert_eq!(parse_stat("1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("1 (x) S 1 1 1 0 -1 0 0 0 0 0 ten 75 0 0 20 0 9 0 5 1 1"), None);
    }

    #[test]
    fn btime_and_rss() {
        assert_eq!(parse_btime("cpu  1 2 3\nintr 5\nbtime 1765000000\nprocesses 9\n"), Some(1765000000));
        assert_eq!(parse_btime("cpu 1\n"), None);
        let status = "Name:\tenvgate\nVmPeak:\t  20000 kB\nVmRSS:\t    8704 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_bytes(status), Some(8704 * 1024));
        assert_eq!(parse_rss_bytes("VmRSS:\t 12 MB\n"), None);
        assert_eq!(parse_rss_bytes("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_sampled_on_linux() {
        let s = sample();
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0), "{s:?}");
        assert!(s.resident_bytes.is_some_and(|r| r > 1024 * 1024), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        assert!(s.max_fds.is_some_and(|n| n >= s.open_fds.unwrap()), "{s:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(s.start_time_seconds.is_some_and(|t| t > now - 86400.0 * 365.0 && t <= now + 1.0), "{s:?}");
    }
}
