//! The pure core's cost per kernel start, without any I/O: `cargo bench --bench core`.
//!
//! It runs the benchmark's own kernel-start body (bench/wrk/post.lua: 40 variables, 20 allowed)
//! through the steps the proxy takes (strict parse, policy decision and rewrite, audit record
//! serialization) and prints nanoseconds per step. Use it to see what a change to `rewrite`,
//! `decide`, `policy` or `audit` costs before running the end-to-end benchmark (bench/run).

use std::hint::black_box;
use std::time::{Duration, Instant};

use envgate::audit::{Event, Outcome, Record, ViolationName};
use envgate::config::Config;
use envgate::decide;
use envgate::rewrite::{kernelspecs, start};

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
    let render = time(|| {
        black_box(parsed.render_kept(black_box(&keep), false));
    });
    println!("  (names {lookup:.0}, values {values:.0}, render {render:.0})");
    let mut line = Vec::new();
    let audit = time(|| {
        let mut rec = Record::new("0000abcd-00000001", Event::KernelStart, policy.mode, client, None);
        rec.kernelspec = kernelspec.as_deref();
        let mut rec = rec.with_decision(&plan.decision);
        rec.violations =
            plan.violations.iter().map(|v| ViolationName { name: &v.name, rule: v.rule.as_str() }).collect();
        rec.outcome = Outcome::Forwarded;
        rec.status = Some(201);
        line.clear();
        rec.write_json(&mut line);
        black_box(&line);
    });
    let mut rec = Record::new("0000abcd-00000001", Event::KernelStart, policy.mode, client, None);
    rec.kernelspec = kernelspec.as_deref();
    let rec = rec.with_decision(&plan.decision);
    let write = time(|| {
        line.clear();
        rec.write_json(&mut line);
        black_box(&line);
    });
    println!("  (audit write_json alone {write:.0})");
    println!("kernel start, {} bytes, 40 variables (20 allowed):", body.len());
    println!("  parse            {parse:>8.0} ns");
    println!("  decide + render  {decide:>8.0} ns");
    println!("  audit record     {audit:>8.0} ns");
    println!("  total            {:>8.0} ns", parse + decide + audit);
}
