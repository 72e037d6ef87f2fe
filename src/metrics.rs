//! Prometheus metrics, served on the admin listener as `/metrics` (text format).
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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("envgate");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "Requests answered, by route class and status", requests.clone());
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~47 s (50 µs × 2.5^15)
            Histogram::new(exponential_buckets(0.00005, 2.5, 16))
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
        let reloads = ReloadMetrics::register(&mut registry);
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
        Metrics {
            registry,
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
        }
    }
}

impl Metrics {
    /// Marks `hash` as the active policy (and only it).
    pub fn set_policy(&self, hash: &str) {
        self.policy.clear();
        self.policy.get_or_create(&PolicyLabel { hash: hash.to_string() }).set(1);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
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
}
