//! The table maker of `bench/run`.
//!
//! `benchtab table RAW.tsv` reads the raw lines the script wrote, one per round, cell and target:
//! `round cell target rate p50_us p99_us cpu_us_per_op rss_kib rss_before_kib` ("-" for none),
//! takes the median of each figure over the rounds, and prints the markdown table and the
//! performance targets (bench/README.md) with met/missed.
//!
//! `benchtab free-port` prints a free loopback TCP port.

use std::collections::BTreeMap;

const CELLS: &[(&str, &str, &str)] = &[
    ("ks_c1", "GET /api/kernelspecs, 1 conn", "req/s"),
    ("ks_c64", "GET /api/kernelspecs, 64 conns", "req/s"),
    ("post_c1", "POST /api/kernels (40 env, 20 allowed, audit on), 1 conn", "req/s"),
    ("post_c64", "POST /api/kernels (40 env, 20 allowed, audit on), 64 conns", "req/s"),
    ("post_jwt_c64", "POST /api/kernels as post_c64, with an RS256 JWT (envgate verifies it), 64 conns", "req/s"),
    ("ws_rtt_c1", "WS round trip 64 B, 1 conn", "msg/s"),
    ("ws_rtt_c64", "WS round trip 64 B, 64 conns", "msg/s"),
    ("ws_tput", "WS echo of 1 MB messages, 1 conn (4 in flight)", "MB/s"),
    ("start", "proxy just started, no connection", ""),
    ("ws_idle", "idle WebSockets held open", "conns"),
];
const TARGETS: &[&str] = &["direct", "envgate", "nginx"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("free-port") => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            println!("{}", l.local_addr().unwrap().port());
        }
        Some("table") if args.len() == 2 => table(&args[1]),
        _ => {
            eprintln!("usage: benchtab table RAW.tsv | benchtab free-port");
            std::process::exit(2);
        }
    }
}

#[derive(Default, Clone)]
struct Runs {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    rss: Vec<f64>,
    rss_before: Vec<f64>,
    foreign: Vec<f64>,
}

#[derive(Clone, Copy)]
struct Med {
    rate: f64,
    p50: f64,
    p99: f64,
    cpu: f64,
    rss: f64,
    rss_before: f64,
    foreign: f64,
    spread: f64,
    n: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or(f64::NAN)
}

fn table(path: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("benchtab: cannot read {path}: {e}");
        std::process::exit(2)
    });
    let mut runs: BTreeMap<(String, String), Runs> = BTreeMap::new();
    let mut rounds = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 9 {
            eprintln!("benchtab: skipping short line: {line}");
            continue;
        }
        if f[0] != "0" {
            rounds.insert(f[0].to_string());
        }
        let r = runs.entry((f[1].to_string(), f[2].to_string())).or_default();
        r.rate.push(num(f[3]));
        r.p50.push(num(f[4]));
        r.p99.push(num(f[5]));
        r.cpu.push(num(f[6]));
        r.rss.push(num(f[7]));
        r.rss_before.push(num(f[8]));
        r.foreign.push(f.get(9).map_or(f64::NAN, |s| num(s)));
    }
    let med: BTreeMap<(String, String), Med> = runs
        .iter()
        .map(|(k, r)| {
            let rate = median(&r.rate);
            let fin: Vec<f64> = r.rate.iter().copied().filter(|x| x.is_finite()).collect();
            let spread = if fin.len() > 1 && rate > 0.0 {
                (fin.iter().cloned().fold(f64::MIN, f64::max) - fin.iter().cloned().fold(f64::MAX, f64::min)) / rate
            } else {
                f64::NAN
            };
            (
                k.clone(),
                Med {
                    rate,
                    p50: median(&r.p50),
                    p99: median(&r.p99),
                    cpu: median(&r.cpu),
                    rss: median(&r.rss),
                    rss_before: median(&r.rss_before),
                    foreign: r.foreign.iter().copied().filter(|x| x.is_finite()).fold(f64::NAN, f64::max),
                    spread,
                    n: r.rate.len(),
                },
            )
        })
        .collect();
    let get = |c: &str, t: &str| med.get(&(c.to_string(), t.to_string())).copied();

    println!(
        "Medians of {} round(s). Ratios are rate / rate of the same cell (idle: KiB per connection / nginx's). CPU is the proxy's user+system time per request, message or MB (/proc/PID/stat); RSS is the proxy's VmRSS at the end of the cell (nginx: master + workers). Spread: (max - min) / median of the rates over the rounds. Other load: the most CPU, in % of the box, that processes outside the benchmark used during any round of the cell (the box is shared; above ~10% the cell is disturbed).\n",
        rounds.len()
    );
    println!("| cell | target | rate | p50 | p99 | × direct | × nginx | proxy CPU µs/op | proxy RSS | spread | other load |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (cell, name, unit) in CELLS {
        for t in TARGETS {
            let Some(m) = get(cell, t) else { continue };
            match *cell {
                "start" => println!(
                    "| {name} | {t} | | | | | | | {} | | |",
                    mib(m.rss)
                ),
                "ws_idle" => {
                    let per = (m.rss - m.rss_before) / m.rate;
                    let per_ng = get(cell, "nginx").map(|n| (n.rss - n.rss_before) / n.rate);
                    println!(
                        "| {name} | {t} | {:.0} {unit} | | | | {} | | {} → {} (**{per:.1} KiB/conn**) | | |",
                        m.rate,
                        ratio(Some(per), per_ng.filter(|_| *t != "nginx")),
                        mib(m.rss_before),
                        mib(m.rss)
                    );
                }
                _ => {
                    let d = get(cell, "direct").map(|x| x.rate);
                    let n = get(cell, "nginx").map(|x| x.rate);
                    let cpu_unit = if *cell == "ws_tput" { "/MB" } else { "" };
                    println!(
                        "| {name} | {t} | {} {unit} | {} | {} | {} | {} | {}{} | {} | {} | {} |",
                        fmt_rate(m.rate),
                        us(m.p50),
                        us(m.p99),
                        ratio(Some(m.rate), d.filter(|_| *t != "direct")),
                        ratio(Some(m.rate), n.filter(|_| *t != "nginx")),
                        if m.cpu.is_finite() { format!("{:.1}", m.cpu) } else { "-".into() },
                        if m.cpu.is_finite() { cpu_unit } else { "" },
                        mib(m.rss),
                        if m.spread.is_finite() { format!("{:.0}%", m.spread * 100.0) } else { "-".into() },
                        if m.foreign.is_finite() { format!("{:.0}%", m.foreign) } else { "-".into() },
                    );
                }
            }
            let _ = m.n;
        }
    }

    // The performance targets, as bench/README.md lists them.
    println!("\nPerformance targets (envgate):\n");
    println!("| target | measured | verdict |");
    println!("|---|---|---|");
    let r = |c: &str, t: &str| get(c, t).map(|m| m.rate);
    let rel = |c: &str, other: &str| match (r(c, "envgate"), r(c, other)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let check = |what: &str, v: Option<f64>, ok: &dyn Fn(f64) -> bool, f: &dyn Fn(f64) -> String| {
        let (m, verdict) = match v {
            Some(x) if x.is_finite() => (f(x), if ok(x) { "met" } else { "**missed**" }),
            _ => ("-".into(), "not measured"),
        };
        println!("| {what} | {m} | {verdict} |");
    };
    let x = |v: f64| format!("{v:.2}×");
    check("kernelspecs, 1 conn: ≥ 0.75 × direct", rel("ks_c1", "direct"), &|v| v >= 0.75, &x);
    check("kernelspecs, 64 conns: ≥ 1.2 × nginx", rel("ks_c64", "nginx"), &|v| v >= 1.2, &x);
    check(
        "kernelspecs, 64 conns: ≤ 15 µs CPU/request",
        get("ks_c64", "envgate").map(|m| m.cpu),
        &|v| v <= 15.0,
        &|v| format!("{v:.1} µs"),
    );
    check("kernel start, 64 conns: ≥ 1.0 × nginx", rel("post_c64", "nginx"), &|v| v >= 1.0, &x);
    check("WS round trip, 1 conn: ≥ 0.95 × direct", rel("ws_rtt_c1", "direct"), &|v| v >= 0.95, &x);
    check("WS round trip, 64 conns: ≥ 1.2 × nginx", rel("ws_rtt_c64", "nginx"), &|v| v >= 1.2, &x);
    check("WS 1 MB: ≥ 2 × nginx", rel("ws_tput", "nginx"), &|v| v >= 2.0, &x);
    check("WS 1 MB: ≥ 0.5 × direct", rel("ws_tput", "direct"), &|v| v >= 0.5, &x);
    check(
        "idle WS: ≤ 5 KiB RSS per connection",
        get("ws_idle", "envgate").map(|m| (m.rss - m.rss_before) / m.rate),
        &|v| v <= 5.0,
        &|v| format!("{v:.1} KiB"),
    );
    check(
        "idle, no connection: < 10 MiB RSS",
        get("start", "envgate").map(|m| m.rss),
        &|v| v < 10.0 * 1024.0,
        &|v| mib(v),
    );
}

fn fmt_rate(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn us(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b != 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn mib(kib: f64) -> String {
    if kib.is_finite() {
        format!("{:.1} MiB", kib / 1024.0)
    } else {
        "-".into()
    }
}
