//! Operating envgate: `/metrics` read by Prometheus' own parsers (prometheus_client from PyPI, pinned
//! in `eg/requirements-prometheus.txt`) in both formats, `envgate healthcheck` against a live envgate
//! and a real EG, the shell completions and man page the binary prints, and the systemd unit checked by
//! `systemd-analyze verify`.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::eg::{free_port, py_venv, repo_path, Eg, EgOptions};
use support::envgate::{bin, Envgate};
use support::http::request;

/// What Prometheus 2.x and 3.x send.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Parses `text` with prometheus_client's OpenMetrics parser (`openmetrics`) or its classic text
/// parser, and returns each family as `{name: {"type": ..., "samples": [[name, labels, value], ...]}}`.
/// The parser raises on anything its format does not allow, which fails the test with its message.
fn parse(text: &str, openmetrics: bool) -> BTreeMap<String, Value> {
    let venv = py_venv("prometheus", "eg/requirements-prometheus.txt", "import prometheus_client");
    let parser = if openmetrics { "prometheus_client.openmetrics.parser" } else { "prometheus_client.parser" };
    let script = format!(
        "import json, sys\nfrom {parser} import text_string_to_metric_families as parse\n\
         out = {{f.name: {{'type': f.type, 'samples': [[s.name, s.labels, s.value] for s in f.samples]}}\n\
                for f in parse(sys.stdin.read())}}\n\
         print(json.dumps(out))\n"
    );
    let mut child = Command::new(venv.join("bin/python"))
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client's {parser} refused /metrics: {}\n--- the text\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("healthcheck").args(args).env_remove("ENVGATE_ADMIN_LISTEN").env_remove("ENVGATE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The samples of family `name` as `(sample name, labels, value)`.
fn samples(families: &BTreeMap<String, Value>, name: &str) -> Vec<(String, Value, f64)> {
    let f = families.get(name).unwrap_or_else(|| panic!("no family {name} in {:?}", families.keys()));
    f["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_str().unwrap().to_string(), s[1].clone(), s[2].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_with_prometheus_parsers_and_healthcheck_follows_readiness() {
    let eg = Eg::start(EgOptions::default());
    let admin = format!("127.0.0.1:{}", free_port());
    let gate = Envgate::start(&eg.url, &["--admin-listen", &admin]);
    // Something in the counters and the histogram: a kernelspec list and a refused session start.
    assert_eq!(request(&gate.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap().status, 200);
    let r = request(&gate.addr, "POST", "/api/sessions", &[], b"{}").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    // Prometheus asks for OpenMetrics and gets it; the strict parser reads it whole.
    let m = request(&admin, "GET", "/metrics", &[("Accept", PROMETHEUS_ACCEPT)], b"").await.unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    let om = parse(&m.text(), true);
    assert_eq!(om["envgate_requests"]["type"], "counter");
    assert!(samples(&om, "envgate_requests").iter().any(|(n, l, v)| n == "envgate_requests_total"
        && l["route"] == "session_start"
        && l["status"] == "403"
        && *v == 1.0));
    assert_eq!(om["envgate_request_duration_seconds"]["type"], "histogram");
    let les: Vec<f64> = samples(&om, "envgate_request_duration_seconds")
        .iter()
        .filter(|(n, l, _)| n.ends_with("_bucket") && l["route"] == "kernelspec_list")
        .map(|(_, l, _)| l["le"].as_str().unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(les.iter().any(|&le| le.is_finite() && le >= 600.0), "buckets stop short of 10 minutes: {les:?}");
    let build = samples(&om, "envgate_build_info");
    assert_eq!(build[0].1["version"], env!("CARGO_PKG_VERSION"), "{build:?}");
    assert_eq!(om["envgate_audit_write_errors"]["type"], "counter");
    assert_eq!(samples(&om, "envgate_audit_write_errors")[0].2, 0.0);
    // The process series, by the names the client libraries give them.
    assert_eq!(om["process_cpu_seconds"]["type"], "counter");
    for g in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"] {
        assert_eq!(om[g]["type"], "gauge", "{g}");
    }
    let rss = samples(&om, "process_resident_memory_bytes")[0].2;
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    let fds = samples(&om, "process_open_fds")[0].2;
    let listed = std::fs::read_dir(format!("/proc/{}/fd", gate.pid())).unwrap().count() as f64;
    assert!((fds - listed).abs() < 20.0, "process_open_fds {fds}, /proc lists {listed}");

    // A scraper that does not ask for OpenMetrics (curl, older agents) gets the classic format, which
    // the classic parser reads with the same types.
    let m = request(&admin, "GET", "/metrics", &[], b"").await.unwrap();
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = m.text();
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    let classic = parse(&text, false);
    for (family, kind) in [
        ("envgate_requests", "counter"),
        ("envgate_request_duration_seconds", "histogram"),
        ("envgate_audit_write_errors", "counter"),
        ("envgate_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        assert_eq!(classic.get(family).map(|f| &f["type"]), Some(&Value::from(kind)), "{family}: {classic:?}");
    }

    // healthcheck: ready through --admin, through ENVGATE_ADMIN_LISTEN and through the config file.
    let url = format!("http://{admin}");
    let o = healthcheck(&["--admin", &url], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("envgate: ready:") && stderr(&o).lines().count() == 1, "{}", stderr(&o));
    let wildcard = admin.replace("127.0.0.1", "0.0.0.0");
    let o = healthcheck(&[], &[("ENVGATE_ADMIN_LISTEN", &wildcard)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envgate.toml");
    std::fs::write(&cfg, format!("admin_listen = \"{admin}\"\n")).unwrap();
    let o = healthcheck(&["--config", cfg.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Not ready: EG gone, so /readyz is 503.
    drop(eg);
    let o = healthcheck(&["--admin", &url], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("envgate: not ready:") && stderr(&o).contains("503"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // Unreachable: envgate gone.
    drop(gate);
    let o = healthcheck(&["--admin", &url, "--timeout", "2s"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}

#[test]
fn healthcheck_without_a_listener_or_with_a_bad_address_fails() {
    // Nothing listens on the default port's neighbour we pick; a bad address is a failure, not a panic.
    let o = healthcheck(&["--admin", &format!("http://127.0.0.1:{}", free_port())], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = healthcheck(&[], &[("ENVGATE_ADMIN_LISTEN", "not an address")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("admin_listen"), "{}", stderr(&o));
    let o = healthcheck(&["--admin", "https://127.0.0.1:9464"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("plain http"), "{}", stderr(&o));
}

fn envgate(args: &[&str]) -> String {
    let o = Command::new(bin()).args(args).output().unwrap();
    assert!(o.status.success(), "envgate {args:?}: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn completions_name_the_subcommands_and_flags() {
    let bash = envgate(&["completions", "bash"]);
    for word in
        ["run", "check", "explain", "audit", "healthcheck", "completions", "man", "--upstream", "--admin-listen"]
    {
        assert!(bash.contains(word), "bash completions lack {word}");
    }
    // bash itself reads the script, defines the function and binds it to envgate.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("envgate.bash");
    std::fs::write(&script, &bash).unwrap();
    let o = Command::new("bash")
        .args(["-c", &format!("source {} && complete -p envgate", script.display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("_envgate"), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(envgate(&["completions", "zsh"]).starts_with("#compdef envgate"));
    assert!(envgate(&["completions", "fish"]).contains("complete -c envgate"));
    let o = Command::new(bin()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "an unknown shell is a usage error");
}

/// The Dockerfile's step that writes the completions and the man page into the image, run here with
/// the test's binary in place of `/out/envgate` and a temp dir in place of `/out` (no engine needed).
#[test]
fn the_dockerfile_installs_completions_and_the_man_page() {
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).unwrap();
    let mut lines = dockerfile.lines().skip_while(|l| !l.starts_with("RUN mkdir -p /out/share"));
    let mut run = String::new();
    for l in lines.by_ref() {
        run.push_str(l.trim_end_matches('\\'));
        run.push(' ');
        if !l.ends_with('\\') {
            break;
        }
    }
    let run = run.strip_prefix("RUN ").expect("the Dockerfile has a `RUN mkdir -p /out/share` step");
    assert!(
        dockerfile.contains("COPY --from=build /out/share/ /usr/local/share/"),
        "the runtime image lacks /out/share"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let script = run.replace("/out/envgate", bin()).replace("/out/", &format!("{out}/"));
    let sh = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(sh.status.success(), "{script}: {}", stderr(&sh));
    for (file, start) in [
        ("share/bash-completion/completions/envgate", "_envgate()"),
        ("share/zsh/site-functions/_envgate", "#compdef envgate"),
        ("share/fish/vendor_completions.d/envgate.fish", ""),
        ("share/man/man1/envgate.1", ""),
    ] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains("healthcheck") && text.trim_start().starts_with(start), "{file}");
    }
    // The pages the main one refers to, each with its own options.
    for (page, option) in [
        ("envgate-explain.1", "body"),
        ("envgate-audit-summarize.1", "since"),
        ("envgate-healthcheck.1", "admin"),
        ("envgate-run.1", "upstream"),
    ] {
        let text = std::fs::read_to_string(dir.path().join("share/man/man1").join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH envgate-") && text.contains(option), "{page} lacks --{option}");
    }
}

#[test]
fn the_man_page_renders() {
    let roff = envgate(&["man"]);
    assert!(roff.contains(".TH envgate 1"), "{}", &roff[..roff.len().min(300)]);
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("envgate.1");
    std::fs::write(&page, &roff).unwrap();
    let man = Command::new("man").args(["-l", "-P", "cat"]).arg(&page).env("MANWIDTH", "100").output();
    match man {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            for want in ["NAME", "SYNOPSIS", "--upstream", "healthcheck", "completions"] {
                assert!(text.contains(want), "the rendered page lacks {want}:\n{text}");
            }
        }
        Ok(o) => panic!("man -l failed: {}", stderr(&o)),
        Err(_) => println!("note: no `man` here; checked the roff header only"),
    }
}

/// `systemd-analyze verify` on the unit, with `ExecStart`'s binary the one cargo built (verify wants
/// it to exist) and the man page it names on a MANPATH. verify exits 0 even when it ignores a line it
/// cannot parse, so anything it prints fails the test; a broken copy shows that it does print.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/envgate.service")).unwrap();
    for want in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "LogsDirectory=envgate",
        "Environment=ENVGATE_AUDIT_LOG=/var/log/envgate/",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(want), "the unit lacks {want:?}");
    }
    let Some(analyze) = which("systemd-analyze") else {
        println!("note: no systemd-analyze here (apt-get install systemd provides it); the unit was not verified");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man/man1");
    std::fs::create_dir_all(&man).unwrap();
    std::fs::write(man.join("envgate.1"), envgate(&["man"])).unwrap();
    let verify = |text: &str| {
        let path = dir.path().join("envgate.service");
        std::fs::write(&path, text.replace("/usr/local/bin/envgate", bin())).unwrap();
        let o =
            Command::new(&analyze).arg("verify").arg(&path).env("MANPATH", dir.path().join("man")).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o)))
    };
    let (ok, said) = verify(&unit);
    assert!(ok && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let (_, said) = verify(&unit.replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe"));
    assert!(said.contains("NoNewPrivileges") || said.contains("boolean"), "a broken unit passed silently: {said}");
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

/// An audit log envgate cannot write to (`/dev/full`: every write fails with ENOSPC) is counted in
/// `envgate_audit_write_errors_total`, through the binary; the kernel start itself still answers.
#[tokio::test(flavor = "multi_thread")]
async fn audit_write_errors_are_counted() {
    use std::io::BufRead;
    let (_eg, eg_addr) = support::fake_upstream::FakeEg::start("127.0.0.1:0".parse().unwrap()).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(bin())
        .args(["--listen", "127.0.0.1:0", "--upstream", &format!("http://{eg_addr}"), "--log-format", "json"])
        .args(["--audit-log", "/dev/full", "--admin-listen", &admin])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("envgate stopped before listening").unwrap();
        if line.contains("envgate is listening") {
            let v: Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["listen"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let body = br#"{"name":"python3","env":{"KERNEL_X":"1"}}"#;
    let r = request(&addr, "POST", "/api/kernels", &[("Content-Type", "application/json")], body).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let m = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    let n: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("envgate_audit_write_errors_total "))
        .unwrap_or_else(|| panic!("no envgate_audit_write_errors_total in:\n{m}"))
        .trim()
        .parse()
        .unwrap();
    assert!(n >= 1.0, "{m}");
    let _ = child.kill();
    let _ = child.wait();
}
