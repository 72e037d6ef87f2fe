//! The command line: `envgate check`, precedence of flags over `ENVGATE_*` over the file, and
//! one-line errors with exit code 2.

mod support;

use std::process::{Command, Output};

fn envgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(support::envgate::bin());
    cmd.args(args);
    // Start from a clean slate: no ENVGATE_* from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("ENVGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running envgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envgate.toml");
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap().to_string();
    (dir, p)
}

#[test]
fn check_prints_the_effective_policy() {
    let (_d, path) = config(
        "mode = \"reject\"\nclient_envs = [\"FOO\"]\nupstream = \"http://eg:8888/gw\"\n[kernelspecs.spark]\nclient_envs = [\"SPARK_OPTS\"]\n",
    );
    let o = envgate(&["check", "--config", &path], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "mode = \"reject\"",
        "client_envs = [\"FOO\"]",
        "upstream = \"http://eg:8888/gw/\"",
        "[kernelspecs.\"spark\"]",
        "client_envs = [\"SPARK_OPTS\"]",
        "\"LD_PRELOAD\"",
        "kernel_prefix = true",
        "sessions = \"deny\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // What check prints is itself a valid config file.
    let body: String = out.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    let (_d2, again) = config(&body);
    let o = envgate(&["check", "--config", &again], &[]);
    assert!(o.status.success(), "{}\n{body}", stderr(&o));
}

/// Environment variables for one run.
type Env<'a> = Vec<(&'a str, &'a str)>;

/// The names `deny_envs` holds in what `check` printed.
fn denied(out: &str) -> Vec<String> {
    let body: String = out.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    let t: toml::Table = body.parse().unwrap_or_else(|e| panic!("check printed no TOML ({e}):\n{out}"));
    t["deny_envs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

#[test]
fn extra_deny_envs_from_file_environment_or_flag_adds_to_the_defaults() {
    let defaults: Vec<String> = envgate::policy::DEFAULT_DENY_ENVS.iter().map(|s| s.to_string()).collect();
    let o = envgate(&["check"], &[]);
    let d = denied(&stdout(&o));
    assert!(defaults.iter().all(|n| d.contains(n)) && d.len() == defaults.len(), "{d:?}");
    for n in ["KERNEL_VOLUMES", "KERNEL_VOLUME_MOUNTS", "KERNEL_NAMESPACE", "KERNEL_SERVICE_ACCOUNT_NAME"] {
        assert!(d.contains(&n.to_string()), "{n} is not denied by default");
    }
    // A long list is printed one item a line, and stays a config file check accepts.
    let out = stdout(&o);
    assert!(out.contains("deny_envs = [\n    \"BASH_ENV\",\n"), "{out}");
    assert!(out.lines().filter(|l| l.contains(" = [")).all(|l| l.len() <= 100), "{out}");
    let (_d, file) = config("extra_deny_envs = [\"FROM_FILE\"]\n");
    let cases: [(Vec<&str>, Env, &str); 3] = [
        (vec!["check", "--config", &file], vec![], "FROM_FILE"),
        (vec!["check"], vec![("ENVGATE_EXTRA_DENY_ENVS", "FROM_ENV,OTHER_ENV")], "FROM_ENV"),
        (vec!["check", "--extra-deny-envs", "FROM_FLAG"], vec![], "FROM_FLAG"),
    ];
    for (args, env, name) in cases {
        let o = envgate(&args, &env);
        assert!(o.status.success(), "{}", stderr(&o));
        let d = denied(&stdout(&o));
        assert!(d.contains(&name.to_string()), "{name} not in {d:?}");
        assert!(defaults.iter().all(|n| d.contains(n)), "{name}: the defaults are gone: {d:?}");
        // The printed file says the same: checked again, the same merged list.
        let body: String = stdout(&o).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
        let (_d2, again) = config(&body);
        let o2 = envgate(&["check", "--config", &again], &[]);
        assert!(o2.status.success(), "{}\n{body}", stderr(&o2));
        assert_eq!(denied(&stdout(&o2)), d);
    }
    // With deny_envs set, extra_deny_envs adds to it.
    let o = envgate(&["check", "--deny-envs", "A", "--extra-deny-envs", "B"], &[]);
    assert_eq!(denied(&stdout(&o)), ["A", "B"]);
}

#[test]
fn check_warns_on_stderr_about_what_start_up_warns_about() {
    let o = envgate(&["check"], &[]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "", "no warning for the defaults");
    let o = envgate(
        &["check", "--mode", "report", "--upstream", "https://eg:8888", "--upstream-insecure", "--upstream-token", "t"],
        &[],
    );
    assert!(o.status.success(), "warnings do not fail check: {}", stderr(&o));
    let err = stderr(&o);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("envgate: warning: ")).collect();
    assert_eq!(warnings.len(), 3, "{err}");
    for want in ["upstream_insecure", "trusted_user_header", "report"] {
        assert!(err.contains(want), "no warning about {want}:\n{err}");
    }
    assert!(!err.contains("\"t\""), "the token is never shown");
    // stdout stays a config file.
    assert!(stdout(&o).contains("mode = \"report\""));
}

#[test]
fn flags_win_over_environment_which_wins_over_the_file() {
    let (_d, path) = config("mode = \"reject\"\nsessions = \"allow\"\nclient_envs = [\"FILE\"]\n");
    let o =
        envgate(&["check", "--config", &path], &[("ENVGATE_MODE", "report"), ("ENVGATE_CLIENT_ENVS", "ENV_A,ENV_B")]);
    let out = stdout(&o);
    assert!(out.contains("mode = \"report\""), "{out}");
    assert!(out.contains("client_envs = [\"ENV_A\", \"ENV_B\"]"), "{out}");
    assert!(out.contains("sessions = \"allow\""), "{out}");
    let o = envgate(&["check", "--config", &path, "--mode", "drop"], &[("ENVGATE_MODE", "report")]);
    assert!(stdout(&o).contains("mode = \"drop\""), "{}", stdout(&o));
    // The config file itself can come from ENVGATE_CONFIG.
    let o = envgate(&["check"], &[("ENVGATE_CONFIG", &path)]);
    assert!(stdout(&o).contains("mode = \"reject\""));
}

#[test]
fn bad_files_and_flags_give_one_line_naming_the_key_and_exit_2() {
    for (text, key) in [
        ("mode = \"dorp\"\n", "mode"),
        ("client_envs = \"FOO\"\n", "client_envs"),
        ("listen = \"x\"\n", "listen"),
        ("colour = true\n", "colour"),
        ("mode = \n", "line 1"),
    ] {
        let (_d, path) = config(text);
        for sub in [&["check"][..], &[][..]] {
            let mut args = sub.to_vec();
            args.extend(["--config", &path]);
            let o = envgate(&args, &[]);
            assert_eq!(o.status.code(), Some(2), "{text:?} {sub:?}");
            let err = stderr(&o);
            assert_eq!(err.trim_end().lines().count(), 1, "{text:?}: {err}");
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
    for (args, key) in [
        (&["check", "--upstream", "ftp://x"][..], "upstream"),
        (&["check", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"][..], "tls"),
        (&["check", "--upstream", "https://x", "--upstream-ca", "/nonexistent-ca.pem"][..], "upstream"),
        (&["check", "--max-body-bytes", "lots"][..], "max_body_bytes"),
    ] {
        let o = envgate(args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(key), "{args:?}: {err}");
    }
    // What clap refuses, it says in full (see clap_errors_are_printed_whole); still exit 2.
    for (args, key) in
        [(&["check", "--mode", "loud"][..], "mode"), (&["check", "--no-such-flag"][..], "--no-such-flag")]
    {
        let o = envgate(args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert!(err.starts_with("error: ") && err.contains(key), "{args:?}: {err}");
    }
    let o = envgate(&["check", "--config", "/nonexistent/envgate.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let o = envgate(&["check"], &[("ENVGATE_SESSIONS", "sometimes")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ENVGATE_SESSIONS"));
}

fn assert_holds(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// A value clap refuses: its whole message, with the possible values, a near one, and which
/// setting the flag or variable sets (`mode`, --mode, ENVGATE_MODE).
#[test]
fn clap_errors_are_printed_whole() {
    let o = envgate(&["check", "--mode", "x"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert_holds(
        &stderr(&o),
        &[
            "error: invalid value 'x' for '--mode <MODE>'",
            "[possible values: drop, reject, report]",
            "`mode` is set by --mode, ENVGATE_MODE or the config file; this value came from --mode",
            "For more information, try '--help'.",
        ],
    );
    let o = envgate(&["--mode", "dorp"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a similar value exists: 'drop'"), "{}", stderr(&o));
    let o = envgate(&["check"], &[("ENVGATE_MODE", "loud")]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("`mode`") && err.contains("this value came from ENVGATE_MODE"), "{err}");
    let o = envgate(&["check", "--no-such-flag"], &[]);
    assert!(stderr(&o).contains("Usage: envgate check [OPTIONS]"), "{}", stderr(&o));
}

#[test]
fn help_shows_the_possible_values_and_defaults() {
    assert_holds(
        &stdout(&envgate(&["--help"], &[])),
        &[
            "[default: drop] [env: ENVGATE_MODE=] [possible values: drop, reject, report]",
            "[possible values: deny, allow]",
            "[possible values: refuse_escape, strip, keep]",
            "[possible values: text, json]",
            "[possible values: refuse, overwrite]",
            "[default: true] [env: ENVGATE_KERNEL_PREFIX=] [possible values: true, false]",
            // Every flag's help ends as clap's derive ends it, without a full stop.
            "TOML configuration file [env: ENVGATE_CONFIG=]",
        ],
    );
    let o = envgate(&["explain", "--help"], &[]);
    assert!(stdout(&o).contains("--format <FORMAT>") && stdout(&o).contains("--mode <MODE>"), "{}", stdout(&o));
}

#[test]
fn bools_take_what_they_took() {
    for (v, want) in [("yes", false), ("On", false), (" 1 ", false), ("off", true), ("NO", true), ("0", true)] {
        let o = envgate(&["check", "--kernel-prefix", v], &[]);
        assert!(o.status.success(), "{v:?}: {}", stderr(&o));
        assert!(stdout(&o).contains(&format!("kernel_prefix = {}", !want)), "{v:?}");
        let o = envgate(&["check"], &[("ENVGATE_KERNELSPEC_ENV", v)]);
        assert!(stdout(&o).contains(&format!("kernelspec_env = {}", !want)), "{v:?}: {}", stderr(&o));
    }
    let o = envgate(&["check", "--upstream-insecure"], &[]);
    assert!(stdout(&o).contains("upstream_insecure = true"), "{}", stderr(&o));
}

/// `audit` reads a log: it takes no proxy flag, and lists none.
#[test]
fn audit_takes_no_proxy_flags() {
    let top = stdout(&envgate(&["--help"], &[]));
    let proxy_flags: Vec<&str> =
        top.split_whitespace().filter(|w| w.starts_with("--") && !["--help", "--version"].contains(w)).collect();
    assert!(proxy_flags.len() > 30, "{proxy_flags:?}");
    let help = stdout(&envgate(&["audit", "summarize", "--help"], &[]));
    assert!(help.contains("--format"), "{help}");
    for flag in &proxy_flags {
        assert!(!help.contains(flag), "audit summarize --help lists {flag}:\n{help}");
    }
    let o = envgate(&["audit", "summarize", "x", "--mode", "bogus"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("error: unexpected argument '--mode' found"), "{}", stderr(&o));
    assert!(stderr(&o).contains("Usage: envgate audit summarize"), "{}", stderr(&o));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/envgate.toml");
    let o = envgate(&["check", "--config", path], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_issue_command_line_works_as_written() {
    // `envgate --listen 127.0.0.1:8889 --upstream http://127.0.0.1:8888 --client-envs FOO,BAR`
    let o = envgate(
        &["check", "--listen", "127.0.0.1:8889", "--upstream", "http://127.0.0.1:8888", "--client-envs", "FOO,BAR"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("client_envs = [\"BAR\", \"FOO\"]"), "{}", stdout(&o));
    let o = envgate(&["--help"], &[]);
    assert!(o.status.success());
    for flag in ["--listen", "--upstream", "--client-envs", "--mode", "--config", "--audit-log", "--log-format"] {
        assert!(stdout(&o).contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn sigterm_stops_envgate_with_exit_0() {
    let gate = support::envgate::Envgate::start("http://127.0.0.1:9", &[]);
    let status = gate.terminate();
    assert_eq!(status.code(), Some(0));
}

/// A reader that goes away before envgate writes (`envgate check | head -0`) ends the output
/// quietly, with the command's own exit code, not a panic; a write error of another kind is said.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::process::Stdio;
    for args in [&["check"][..], &["completions", "bash"], &["man"]] {
        let mut child = Command::new(support::envgate::bin())
            .args(args)
            .env_remove("ENVGATE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    }
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(support::envgate::bin()).arg("check").stdout(full).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot write the output"));
}
