//! Prometheus metrics, served on the admin listener as `/metrics` (OpenMetrics text, or the
//! classic text format for a scraper that does not ask for OpenMetrics).
//!
//! Every label has a small, fixed set of values (route classes, status codes, modes, reasons,
//! error kinds): never an env name from a client, a kernel id or a user.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// `kernel_start` or `session_start`.
    pub event: &'static str,
    pub outcome: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub hash: String,
}

/// How many finite buckets `envgate_request_duration_seconds` has (see [`Metrics::default`]).
pub const LATENCY_BUCKETS: u16 = 19;

/// Every series envgate exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub latency: Family<RouteLabel, Histogram>,
    pub decisions: Family<DecisionLabel, Counter>,
    pub rejected: Family<ReasonLabel, Counter>,
    pub value_violations: Family<RuleLabel, Counter>,
    pub websockets: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub framing_refused: Family<KindLabel, Counter>,
    pub reloads: ReloadMetrics,
    pub kernelspec_passthrough: Counter<u64, AtomicU64>,
    pub token_refused: Family<ReasonLabel, Counter>,
    pub policy: Family<PolicyLabel, Gauge>,
    /// Build, process and audit-log series: see [`Ops`].
    pub ops: Ops,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("envgate");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "Requests answered, by route class and status", requests.clone());
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~12 min (50 µs × 2.5^18): past `response_timeout`'s default (2 min) and past
            // the minutes a kernel start can take on Kubernetes, which is what `kernel_start` times.
            Histogram::new(exponential_buckets(0.00005, 2.5, LATENCY_BUCKETS))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route class",
            latency.clone(),
        );
        let decisions = Family::<DecisionLabel, Counter>::default();
        registry.register("decisions", "Kernel and session start decisions, by outcome and mode", decisions.clone());
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register("rejected_variables", "Variables rejected by the policy, by reason", rejected.clone());
        let value_violations = Family::<RuleLabel, Counter>::default();
        registry.register(
            "value_violations",
            "Values (and body paths) that broke a value rule, by rule",
            value_violations.clone(),
        );
        let websockets = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register("open_websockets", "Spliced (upgraded) connections open now", websockets.clone());
        let upstream_errors = Family::<KindLabel, Counter>::default();
        registry.register("upstream_errors", "Upstream failures, by kind", upstream_errors.clone());
        let framing_refused = Family::<KindLabel, Counter>::default();
        registry.register(
            "framing_refused",
            "Requests refused for body framing a front proxy could read differently, by kind",
            framing_refused.clone(),
        );
        let reloads = ReloadMetrics::register(registry);
        let kernelspec_passthrough = Counter::<u64, AtomicU64>::default();
        registry.register(
            "kernelspec_passthrough",
            "Kernelspec responses passed on without client_envs (not parseable, compressed or too large)",
            kernelspec_passthrough.clone(),
        );
        let token_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "token_refused",
            "Requests refused for a missing or invalid token (jwt_keys), by the check that failed",
            token_refused.clone(),
        );
        let policy = Family::<PolicyLabel, Gauge>::default();
        registry.register("policy_info", "The active policy's hash (value is always 1)", policy.clone());
        let ops = Ops::register(&mut root);
        Metrics {
            registry: root,
            requests,
            latency,
            decisions,
            rejected,
            value_violations,
            websockets,
            upstream_errors,
            framing_refused,
            reloads,
            kernelspec_passthrough,
            token_refused,
            policy,
            ops,
        }
    }
}

impl Metrics {
    /// Marks `hash` as the active policy (and only it).
    pub fn set_policy(&self, hash: &str) {
        self.policy.clear();
        self.policy.get_or_create(&PolicyLabel { hash: hash.to_string() }).set(1);
    }

    /// The OpenMetrics text format (what prometheus-client writes), ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// `/metrics`' body and content type for a scraper that sent `accept`: see [`Exposition`].
    pub fn expose(&self, accept: Option<&str>) -> (String, &'static str) {
        let fmt = Exposition::for_accept(accept);
        let text = self.encode();
        match fmt {
            Exposition::OpenMetrics => (text, fmt.content_type()),
            Exposition::Classic => (to_classic(&text), fmt.content_type()),
        }
    }
}

// ---- Build, process and audit-log series, and the exposition formats ---------------------------
// Kept apart from the proxy's series above.

/// Build, process and audit-log series.
pub struct Ops {
    /// Records the audit log could not write (the [`crate::audit::AuditLog`] holds a clone).
    pub audit_write_errors: Counter<u64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

impl Ops {
    /// Registers `envgate_build_info` and `envgate_audit_write_errors_total` under the `envgate`
    /// prefix, and the `process_*` series (read from /proc at each scrape, on Linux only) without it.
    fn register(root: &mut Registry) -> Ops {
        let envgate = root.sub_registry_with_prefix("envgate");
        let build = Family::<BuildLabel, Gauge>::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        envgate.register("build_info", "envgate's version (value is always 1)", build);
        let audit_write_errors = Counter::<u64, AtomicU64>::default();
        envgate.register(
            "audit_write_errors",
            "Audit records that could not be written (disk full, file removed, ...)",
            audit_write_errors.clone(),
        );
        root.register_collector(Box::new(crate::procfs::ProcessCollector));
        Ops { audit_write_errors }
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0.0, as prometheus-client writes it; Prometheus asks for it.
    OpenMetrics,
    /// Prometheus' classic text format 0.0.4, made from the OpenMetrics text by [`to_classic`],
    /// for scrapers that do not ask for OpenMetrics (and for a `curl` without `Accept`).
    Classic,
}

impl Exposition {
    /// OpenMetrics when `accept` names `application/openmetrics-text` (with a q above 0), else
    /// the classic format.
    pub fn for_accept(accept: Option<&str>) -> Exposition {
        let wants = accept.unwrap_or("").split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                })
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants {
            Exposition::OpenMetrics
        } else {
            Exposition::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Prometheus' classic text format from prometheus-client's OpenMetrics text. They differ, for
/// what envgate exports, in three things: a counter family's `# HELP`/`# TYPE` name carries the
/// `_total` of its samples in the classic format (else the classic parser takes the samples for
/// an untyped metric of another name); there is no `# UNIT` line; and no `# EOF`. Samples,
/// labels, gauges and histograms are written the same in both.
pub fn to_classic(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name);
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) { "_total" } else { "" };
                out.push_str(p);
                out.push_str(name);
                out.push_str(total);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

// ---- Configuration reloads: every trigger, one function (`server::Reloader`). ----

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    /// `signal` (SIGHUP), `file` (the config watch) or `http` (`POST /-/reload`).
    pub trigger: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The reload series: a counter by trigger and result, and whether the last one worked and when
/// one last did (as Prometheus itself exports them for its own configuration).
pub struct ReloadMetrics {
    pub total: Family<ReloadLabel, Counter>,
    pub last_successful: Gauge,
    pub last_success_timestamp: Gauge<f64, AtomicU64>,
}

impl ReloadMetrics {
    fn register(registry: &mut Registry) -> ReloadMetrics {
        let m = ReloadMetrics {
            total: Family::default(),
            last_successful: Gauge::default(),
            last_success_timestamp: Gauge::default(),
        };
        registry.register("config_reloads", "Configuration reloads, by trigger and result", m.total.clone());
        registry.register(
            "config_last_reload_successful",
            "Whether the last configuration load (start-up or reload) succeeded (1) or failed (0)",
            m.last_successful.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start-up or reload), Unix time",
            m.last_success_timestamp.clone(),
        );
        m
    }

    /// The configuration loaded at start-up, at `now` (Unix seconds).
    pub fn loaded(&self, now: f64) {
        self.last_successful.set(1);
        self.last_success_timestamp.set(now);
    }

    /// A reload by `trigger`, which succeeded or not, at `now` (Unix seconds).
    pub fn record(&self, trigger: &'static str, ok: bool, now: f64) {
        let result = if ok { "ok" } else { "error" };
        self.total.get_or_create(&ReloadLabel { trigger, result }).inc();
        if ok {
            self.loaded(now);
        } else {
            self.last_successful.set(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported() {
        let m = Metrics::default();
        m.requests.get_or_create(&RouteStatus { route: "other", status: 200 }).inc();
        m.latency.get_or_create(&RouteLabel { route: "other" }).observe(0.001);
        m.decisions.get_or_create(&DecisionLabel { event: "kernel_start", outcome: "forwarded", mode: "drop" }).inc();
        m.rejected.get_or_create(&ReasonLabel { reason: "denied" }).inc();
        m.value_violations.get_or_create(&RuleLabel { rule: "pattern" }).inc();
        m.websockets.inc();
        m.upstream_errors.get_or_create(&KindLabel { kind: "connect" }).inc();
        m.framing_refused.get_or_create(&KindLabel { kind: "transfer_encoding" }).inc();
        m.reloads.record("signal", true, 1_700_000_000.5);
        m.reloads.record("http", false, 1_700_000_001.0);
        m.set_policy("abc");
        m.set_policy("def");
        let text = m.encode();
        for want in [
            "envgate_requests_total{route=\"other\",status=\"200\"} 1",
            "envgate_request_duration_seconds_bucket",
            "envgate_decisions_total{event=\"kernel_start\",outcome=\"forwarded\",mode=\"drop\"} 1",
            "envgate_rejected_variables_total{reason=\"denied\"} 1",
            "envgate_value_violations_total{rule=\"pattern\"} 1",
            "envgate_open_websockets 1",
            "envgate_upstream_errors_total{kind=\"connect\"} 1",
            "envgate_framing_refused_total{kind=\"transfer_encoding\"} 1",
            "envgate_config_reloads_total{trigger=\"signal\",result=\"ok\"} 1",
            "envgate_config_reloads_total{trigger=\"http\",result=\"error\"} 1",
            "envgate_config_last_reload_successful 0",
            "envgate_config_last_reload_success_timestamp_seconds 1700000000.5",
            "envgate_kernelspec_passthrough_total 0",
            "envgate_policy_info{hash=\"def\"} 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("hash=\"abc\""));
    }

    #[test]
    fn build_audit_and_process_series() {
        let m = Metrics::default();
        m.ops.audit_write_errors.inc();
        let text = m.encode();
        let version = format!("envgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.contains(&version), "{text}");
        assert!(text.contains("envgate_audit_write_errors_total 1"), "{text}");
        if cfg!(target_os = "linux") {
            for want in [
                "# TYPE process_cpu_seconds counter",
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_open_fds ",
                "process_max_fds ",
                "process_start_time_seconds ",
            ] {
                assert!(text.contains(want), "missing {want} in\n{text}");
            }
            assert!(!text.contains("envgate_process"), "{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn latency_buckets_reach_past_ten_minutes() {
        let m = Metrics::default();
        m.latency.get_or_create(&RouteLabel { route: "kernel_start" }).observe(300.0);
        let text = m.encode();
        let les: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("envgate_request_duration_seconds_bucket"))
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
            .filter(|le: &f64| le.is_finite())
            .collect();
        assert_eq!(les.len(), usize::from(LATENCY_BUCKETS), "{text}");
        assert!(les.windows(2).all(|w| w[0] < w[1]));
        assert!(les[0] <= 0.0001 && *les.last().unwrap() >= 600.0, "{les:?}");
        // Five minutes falls in a finite bucket, not only in +Inf.
        assert!(text.contains("le=\"727.5957"), "{text}");
    }

    #[test]
    fn openmetrics_only_when_the_scraper_asks_for_it() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::for_accept(Some(prometheus)), Exposition::OpenMetrics);
        assert_eq!(Exposition::for_accept(Some("Application/OpenMetrics-Text")), Exposition::OpenMetrics);
        for classic in [None, Some(""), Some("*/*"), Some("text/plain"), Some("application/openmetrics-text;q=0")] {
            assert_eq!(Exposition::for_accept(classic), Exposition::Classic, "{classic:?}");
        }
        assert!(Exposition::OpenMetrics.content_type().starts_with("application/openmetrics-text; version=1.0.0"));
        assert!(Exposition::Classic.content_type().starts_with("text/plain; version=0.0.4"));
    }

    #[test]
    fn the_classic_format_names_counters_with_total_and_has_no_unit_or_eof() {
        let om = "# HELP envgate_requests Requests.\n# TYPE envgate_requests counter\n\
                  envgate_requests_total{route=\"other\",status=\"200\"} 1\n\
                  # HELP process_cpu_seconds CPU.\n# TYPE process_cpu_seconds counter\n# UNIT process_cpu_seconds seconds\n\
                  process_cpu_seconds_total 0.5\n\
                  # HELP envgate_open_websockets Open.\n# TYPE envgate_open_websockets gauge\nenvgate_open_websockets 0\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP envgate_requests_total Requests.\n# TYPE envgate_requests_total counter\n\
             envgate_requests_total{route=\"other\",status=\"200\"} 1\n\
             # HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total 0.5\n\
             # HELP envgate_open_websockets Open.\n# TYPE envgate_open_websockets gauge\nenvgate_open_websockets 0\n"
        );
        let m = Metrics::default();
        let (body, ctype) = m.expose(Some("text/plain"));
        assert!(ctype.starts_with("text/plain"));
        assert!(!body.contains("# EOF") && !body.contains("# UNIT"), "{body}");
        let (body, ctype) = m.expose(Some("application/openmetrics-text; version=1.0.0"));
        assert!(ctype.starts_with("application/openmetrics-text"));
        assert!(body.ends_with("# EOF\n"));
    }
}
