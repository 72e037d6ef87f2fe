//! The pure core's cost per kernel start, without any I/O: `cargo bench --bench core`.
//!
//! It runs the benchmark's own kernel-start body (bench/wrk/post.lua: 40 variables, 20 allowed)
//! through the steps the proxy takes (strict parse, policy decision and rewrite, audit record
//! serialization) and prints nanoseconds per step. Use it to see what a change to `rewrite`,
//! `decide`, `policy` or `audit` costs before running the end-to-end benchmark (bench/run).
//!
//! The `serde_json` rows write the same bytes as envgate's hand-written JSON writer (`json`):
//! the forwarded `env` object and the audit record. They are the baseline that says whether
//! that writer is worth its code.

use std::hint::black_box;
use std::time::{Duration, Instant};

use envgate::audit::{Event, Outcome, Record, ViolationName};
use envgate::config::Config;
use envgate::rewrite::{kernelspecs, start};
use envgate::{decide, json};
use serde::ser::{Serialize, Serializer};

/// The names of one of post.lua's tables (`local allowed = {...}` or `local other = {...}`).
fn names(table: &str) -> Vec<&'static str> {
    let lua = include_str!("../bench/wrk/post.lua");
    let opening = format!("local {table} = {{");
    let start = lua.find(&opening).expect("post.lua has the table") + opening.len();
    let list = &lua[start..start + lua[start..].find('}').expect("the table ends")];
    list.split('"').skip(1).step_by(2).collect()
}

/// The body bench/wrk/post.lua sends, built the way it builds it.
fn body(allowed: &[&str], other: &[&str]) -> Vec<u8> {
    let mut parts = Vec::new();
    for (i, n) in allowed.iter().enumerate() {
        parts.push(format!("\"{n}\": \"value-of-{}-{:02}/some/typical/length\"", n.to_lowercase(), i + 1));
    }
    for (i, n) in other.iter().enumerate() {
        parts.push(format!("\"{n}\": \"/usr/local/bin:/usr/bin:/bin:/opt/{}/{:02}\"", n.to_lowercase(), i + 1));
    }
    format!(r#"{{"name": "python3", "path": "work/notebook.ipynb", "env": {{{}}}}}"#, parts.join(", ")).into_bytes()
}

/// Runs `f` in 25 batches of about 20 ms and returns the fastest batch's time per call, in ns
/// (the least disturbed by other load on the machine).
fn time(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(100) {
        f();
        n += 1;
    }
    let batch = (n / 5).max(1);
    let mut per: Vec<f64> = (0..25)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    per.sort_by(|a, b| a.total_cmp(b));
    per[0]
}

fn main() {
    let (allowed, other) = (names("allowed"), names("other"));
    assert_eq!((allowed.len(), other.len()), (20, 20), "post.lua's tables");
    let config = Config::from_toml(&format!("upstream = \"http://127.0.0.1:1\"\nclient_envs = {allowed:?}\n"))
        .expect("the bench config is valid");
    let policy = &config.policy;
    let specs = kernelspecs::index(include_bytes!("../bench/samples/kernelspecs.json")).expect("sample kernelspecs");
    let body = body(&allowed, &other);
    let client = "127.0.0.1:40000".parse().unwrap();

    let parse = time(|| {
        black_box(start::parse(black_box(&body)).unwrap());
    });
    let parsed = start::parse(&body).unwrap();
    let (kernelspec, facts) = specs.resolve(parsed.name.as_deref());
    let plan = decide::decide(policy, kernelspec.as_deref(), facts, &parsed, false);
    assert_eq!(plan.decision.kept.len(), 20);
    let decide = time(|| {
        black_box(decide::decide(policy, kernelspec.as_deref(), facts, black_box(&parsed), false));
    });
    let names: Vec<&str> = parsed.env.iter().map(|(k, _)| &**k).collect();
    let lookup = time(|| {
        black_box(policy.decide(kernelspec.as_deref(), facts, black_box(&names).iter().copied()));
    });
    let keep: Vec<bool> = names.iter().map(|n| plan.decision.kept.iter().any(|k| k.name == *n)).collect();
    let values = time(|| {
        black_box(
            policy.values.check_all(parsed.env.iter().zip(&keep).filter(|(_, k)| **k).map(|((n, v), _)| (&**n, &**v))),
        );
    });
    let forbidden = time(|| {
        for (_, v) in black_box(&parsed.env) {
            black_box(policy.values.forbidden.find(v));
        }
    });
    let render = time(|| {
        black_box(parsed.render_kept(black_box(&keep), false));
    });
    println!("  (names {lookup:.0}, values {values:.0}, render {render:.0})");
    println!("  (forbidden-substring scan of all 40 values {forbidden:.0})");
    let mut line = Vec::new();
    let audit = time(|| {
        let mut rec = Record::new("0000abcd-00000001", Event::KernelStart, policy.mode, client, None);
        rec.kernelspec = kernelspec.as_deref();
        rec.set_decision(&plan.decision);
        rec.violations =
            plan.violations.iter().map(|v| ViolationName { name: &v.name, rule: v.rule.as_str() }).collect();
        rec.outcome = Outcome::Forwarded;
        rec.status = Some(201);
        rec.policy_hash = "0123456789abcdef";
        rec.set_duration(std::time::Duration::from_micros(6_312));
        line.clear();
        rec.write_json(&mut line);
        black_box(&line);
    });
    let mut rec = Record::new("0000abcd-00000001", Event::KernelStart, policy.mode, client, None);
    rec.kernelspec = kernelspec.as_deref();
    rec.set_decision(&plan.decision);
    rec.policy_hash = "0123456789abcdef";
    rec.set_duration(std::time::Duration::from_micros(6_312));
    let write = time(|| {
        line.clear();
        rec.write_json(&mut line);
        black_box(&line);
    });
    println!("  (audit write_json alone {write:.0})");
    let (env_ours, env_serde) = env_object_rows(&parsed.env, &keep);
    let (rec_ours, rec_serde) = record_rows(&rec);
    println!("json writer vs serde_json, same bytes:");
    println!("  env object (20 kept)  json {env_ours:>6.0} ns   serde_json {env_serde:>6.0} ns");
    println!("  audit record          json {rec_ours:>6.0} ns   serde_json {rec_serde:>6.0} ns");
    println!("kernel start, {} bytes, 40 variables (20 allowed):", body.len());
    println!("  parse            {parse:>8.0} ns");
    println!("  decide + render  {decide:>8.0} ns");
    println!("  audit record     {audit:>8.0} ns");
    println!("  total            {:>8.0} ns", parse + decide + audit);
}

/// The forwarded `env` object of the kept names, written as `StartBody::render_kept` writes it
/// (`json::write_str`) and by `serde_json::to_writer`: (ours, serde_json) in ns.
fn env_object_rows(env: &[(std::borrow::Cow<str>, std::borrow::Cow<str>)], keep: &[bool]) -> (f64, f64) {
    let kept: Vec<(&str, &str)> = env.iter().zip(keep).filter(|(_, k)| **k).map(|((n, v), _)| (&**n, &**v)).collect();
    struct EnvObject<'a>(&'a [(&'a str, &'a str)]);
    impl Serialize for EnvObject<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(n, v)| (n, v)))
        }
    }
    let ours = |out: &mut Vec<u8>| {
        out.push(b'{');
        for (i, (n, v)) in kept.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::write_str(out, n);
            out.push(b':');
            json::write_str(out, v);
        }
        out.push(b'}');
    };
    let serde = |out: &mut Vec<u8>| serde_json::to_writer(out, &EnvObject(&kept)).expect("writing into memory");
    same_bytes_timed(ours, serde)
}

/// The audit record written by `Record::write_json` and by serde_json from a struct of the same
/// shape (the one `Record`'s derived serialization, its reference in the tests, has): (ours,
/// serde_json) in ns.
fn record_rows(rec: &Record<'_>) -> (f64, f64) {
    #[derive(serde::Serialize)]
    struct Shape<'a> {
        timestamp: &'a str,
        schema: u32,
        version: &'a str,
        id: &'a str,
        request_id: &'a str,
        event: &'a str,
        mode: &'a str,
        policy_hash: &'a str,
        client: std::net::SocketAddr,
        x_forwarded_for: Option<&'a str>,
        user: Option<&'a str>,
        user_source: Option<&'a str>,
        groups: &'a [&'a str],
        identity_source: Option<&'a str>,
        kernelspec: Option<&'a str>,
        kept: Vec<Kept<'a>>,
        rejected: Vec<Rejected<'a>>,
        set_envs: Vec<Kept<'a>>,
        violations: Vec<Violation<'a>>,
        path: Option<&'a str>,
        request_path: Option<&'a str>,
        outcome: &'a str,
        status: Option<u16>,
        duration_ms: f64,
        kernel_id: Option<&'a str>,
        error: Option<&'a str>,
    }
    #[derive(serde::Serialize)]
    struct Kept<'a> {
        name: &'a str,
        source: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Rejected<'a> {
        name: &'a str,
        reason: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Violation<'a> {
        name: &'a str,
        rule: &'a str,
    }
    let shape = Shape {
        timestamp: &rec.timestamp,
        schema: rec.schema,
        version: rec.version,
        id: rec.id,
        request_id: &rec.request_id,
        event: rec.event.as_str(),
        mode: rec.mode.as_str(),
        policy_hash: rec.policy_hash,
        client: rec.client,
        x_forwarded_for: rec.x_forwarded_for,
        user: rec.user,
        user_source: rec.user_source.map(|u| u.as_str()),
        groups: &rec.groups,
        identity_source: rec.identity_source.map(|i| i.as_str()),
        kernelspec: rec.kernelspec,
        kept: rec.kept.iter().map(|k| Kept { name: k.name, source: k.source }).collect(),
        rejected: rec.rejected.iter().map(|r| Rejected { name: r.name, reason: r.reason }).collect(),
        set_envs: rec.set_envs.iter().map(|k| Kept { name: k.name, source: k.source }).collect(),
        violations: rec.violations.iter().map(|v| Violation { name: v.name, rule: v.rule }).collect(),
        path: rec.path.map(|p| p.as_str()),
        request_path: rec.request_path,
        outcome: rec.outcome.as_str(),
        status: rec.status,
        duration_ms: rec.duration_ms,
        kernel_id: rec.kernel_id,
        error: rec.error,
    };
    let serde = |out: &mut Vec<u8>| serde_json::to_writer(out, &shape).expect("writing into memory");
    same_bytes_timed(|out| rec.write_json(out), serde)
}

/// Checks that `ours` and `theirs` append the same bytes, then times each into a cleared buffer.
fn same_bytes_timed(ours: impl Fn(&mut Vec<u8>), theirs: impl Fn(&mut Vec<u8>)) -> (f64, f64) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    ours(&mut a);
    theirs(&mut b);
    assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b), "the two writers disagree");
    let mut out = Vec::with_capacity(a.len());
    let mut run = |f: &dyn Fn(&mut Vec<u8>)| {
        time(|| {
            out.clear();
            f(&mut out);
            black_box(&out);
        })
    };
    (run(&ours), run(&theirs))
}
