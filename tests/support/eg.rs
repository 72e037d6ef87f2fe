//! Starts a real Jupyter Enterprise Gateway (from PyPI, pinned in `eg/requirements-*.txt`) for a test.
//!
//! Each [`Eg`] is its own EG process on its own loopback port with its own temp dir, so tests can run in
//! parallel. EG runs through `scripts/eg-start` (the same command line as the quick-start demo) from the
//! venv that `scripts/eg-venv` prepares; the repo's `eg/kernels/` kernelspecs are available. Dropping the
//! [`Eg`] stops EG and every kernel it started.
//!
//! Start is blocking (std only): call it before or inside an async test, it does not need a runtime.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::gateway::{auth_headers, command, prepare_dir, start_with_retries, Launch, Running};

#[derive(Debug, Clone)]
pub struct EgOptions {
    /// EG release with a pinned requirements file (`eg/requirements-VERSION.txt`): "3.3.0", "3.2.3",
    /// "3.1.0", "3.0.0" or "2.6.0".
    pub version: &'static str,
    /// EG's `base_url`, e.g. `Some("/gw".into())`; `None` serves at `/`.
    pub base_url: Option<String>,
    /// Names EG lets through from a request's `env` besides `KERNEL_*`, passed in the variable this
    /// version reads ([`client_envs_var`]: `EG_CLIENT_ENVS=a,b`, or `EG_ENV_WHITELIST=a,b` for EG 2.x).
    pub client_envs: Vec<String>,
    /// EG's `auth_token` (`EG_AUTH_TOKEN`): requests then need `Authorization: token X`.
    pub auth_token: Option<String>,
    /// Extra variables in EG's own process environment, set last (so they override the harness's), e.g.
    /// a secret that must never reach a kernel, or `EG_UNAUTHORIZED_USERS=root` to restore EG's default.
    pub extra_env: Vec<(String, String)>,
    /// Extra kernelspecs: (name, kernel.json contents). Use `"python"` as `argv[0]`: jupyter_client swaps
    /// it for EG's own interpreter. Names already in `eg/kernels/` take precedence over these.
    pub kernelspecs: Vec<(String, serde_json::Value)>,
}

impl Default for EgOptions {
    fn default() -> Self {
        EgOptions {
            version: "3.3.0",
            base_url: None,
            client_envs: Vec::new(),
            auth_token: None,
            extra_env: Vec::new(),
            kernelspecs: Vec::new(),
        }
    }
}

/// A running EG. Dropping it stops EG and its kernels.
pub struct Eg {
    pub port: u16,
    /// `127.0.0.1:PORT`, for `support::http::request`.
    pub addr: String,
    /// Normalised base URL: `""` or `"/gw"` (leading slash, no trailing slash).
    pub base_url: String,
    /// `http://127.0.0.1:PORT{base_url}`, no trailing slash.
    pub url: String,
    pub auth_token: Option<String>,
    /// Serving HTTPS (`EG_CERTFILE` and `EG_KEYFILE` in `extra_env`).
    pub tls: bool,
    gw: Running,
}

impl Eg {
    /// Starts EG and waits until `GET {url}/api/kernelspecs` answers 200. Panics with EG's log on failure.
    pub fn start(opts: EgOptions) -> Eg {
        // Build the venv first if needed (~25 s, once per machine), so it does not eat into the start timeout;
        // eg-start then finds it ready.
        venv(opts.version);
        let dir = prepare_dir("eg", &opts.kernelspecs);
        let base_url = normalize_base_url(opts.base_url.as_deref());
        let tls = opts.extra_env.iter().any(|(k, _)| k == "EG_CERTFILE");
        let gw = start_with_retries(
            dir,
            Launch {
                name: "EG",
                version: opts.version,
                spawn: |root: &Path, port, log_path: &Path| spawn(&opts, root, port, &base_url, log_path),
                // EG's own "available at ...:PORT" line.
                ready_line: &|port| format!("is available at http{}://127.0.0.1:{port}", if tls { "s" } else { "" }),
                port_taken_line: "could not be started because no available port",
                // Served over TLS (EG_CERTFILE): the plain-HTTP probe cannot talk to it.
                probe_path: (!tls).then(|| format!("{base_url}/api/kernelspecs")),
                auth_token: opts.auth_token.as_deref(),
            },
        );
        Eg {
            port: gw.port,
            addr: gw.addr.clone(),
            url: format!("http://127.0.0.1:{}{base_url}", gw.port),
            base_url,
            auth_token: opts.auth_token.clone(),
            tls,
            gw,
        }
    }

    /// Everything EG printed so far (stdout and stderr, including eg-start's command line).
    pub fn log(&self) -> String {
        self.gw.log()
    }

    /// `ws://127.0.0.1:PORT{base_url}/api/kernels/{id}/channels`
    pub fn channels_url(&self, kernel_id: &str) -> String {
        format!("ws://{}{}/api/kernels/{kernel_id}/channels", self.addr, self.base_url)
    }

    /// `(Authorization, token X)` when EG has a token, for `http::request` and `kernel::run_code`.
    pub fn auth_headers(&self) -> Vec<(&'static str, String)> {
        auth_headers(self.auth_token.as_deref())
    }
}

/// Stops a gateway process started in its own process group, and every kernel below it: SIGTERM lets the
/// gateway shut its kernels down (it takes ~10 ms); if it is still there after a grace period, SIGKILL
/// goes to its process group. Kernels run in sessions of their own (jupyter_client uses
/// start_new_session), so last every process that was below it and is still alive gets SIGKILL too.
/// Shared by [`Eg`] and `kg::Kg`.
pub fn stop_tree(mut child: Child) {
    let pid = child.id();
    let descendants = descendants_of(pid);
    signal("-TERM", &[pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().ok().flatten().is_none() {
        // Not reaped yet, so the group id cannot have been reused.
        signal("-KILL", &[format!("-{pid}")]);
    }
    let _ = child.kill();
    let _ = child.wait();
    let survivors: Vec<String> = descendants
        .into_iter()
        .filter(|&(p, started)| proc_stat(p).is_some_and(|(_, s)| s == started))
        .map(|(p, _)| p.to_string())
        .collect();
    if !survivors.is_empty() {
        signal("-KILL", &survivors);
    }
}

/// Path of the ready venv for `version` (runs `scripts/eg-venv`, which builds it on first use).
pub fn venv(version: &str) -> PathBuf {
    let script = repo_path("scripts/eg-venv");
    let out = Command::new(&script)
        .arg(version)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script:?}: {e}"));
    assert!(out.status.success(), "{script:?} {version} failed ({})", out.status);
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(Path::new(&path).join("bin/python").exists(), "eg-venv printed {path:?}, which has no bin/python");
    PathBuf::from(path)
}

fn spawn(opts: &EgOptions, dir: &Path, port: u16, base_url: &str, log_path: &Path) -> Child {
    let mut cmd = command(repo_path("scripts/eg-start"), dir, dir.join("jupyter"), log_path);
    cmd.args(["--version", opts.version, "--port", &port.to_string()]);
    if !base_url.is_empty() {
        cmd.args(["--base-url", base_url]);
    }
    if !opts.client_envs.is_empty() {
        cmd.env(client_envs_var(opts.version), opts.client_envs.join(","));
    }
    if let Some(token) = &opts.auth_token {
        cmd.env("EG_AUTH_TOKEN", token);
    }
    cmd.envs(opts.extra_env.iter().map(|(k, v)| (k, v)));
    cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn scripts/eg-start: {e}"))
}

/// The variable EG `version` reads its `client_envs` list from: `EG_CLIENT_ENVS` in 3.x (which falls back to
/// `EG_ENV_WHITELIST`); EG 2.x knows only `env_whitelist`, `EG_ENV_WHITELIST` (falling back to
/// `KG_ENV_WHITELIST`), and ignores `EG_CLIENT_ENVS`.
pub fn client_envs_var(version: &str) -> &'static str {
    if version.starts_with("2.") {
        "EG_ENV_WHITELIST"
    } else {
        "EG_CLIENT_ENVS"
    }
}

/// Path of a ready venv holding exactly the pins of `requirements` (relative to the repository), named
/// `name` in the cache: runs `scripts/py-venv`, which builds it on first use and checks it with `check`
/// (Python code, e.g. an import).
pub fn py_venv(name: &str, requirements: &str, check: &str) -> PathBuf {
    let script = repo_path("scripts/py-venv");
    let out = Command::new(&script)
        .arg(name)
        .arg(repo_path(requirements))
        .args(["--check", check])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script:?}: {e}"));
    assert!(out.status.success(), "py-venv {name} failed ({})", out.status);
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.join("bin/python").exists(), "py-venv printed {path:?}");
    path
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn normalize_base_url(base: Option<&str>) -> String {
    let trimmed = base.unwrap_or("").trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

/// A port that was free a moment ago (the OS does not hand it out again right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Status code of a plain `GET`, std only (start must not need a tokio runtime).
pub fn get_status(addr: &str, path: &str, token: Option<&str>) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token.map(|t| format!("Authorization: token {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line"))
}

/// Live descendants of `pid` as (pid, start time), from /proc (Linux). The start time lets `stop` make
/// sure a pid still names the same process before killing it.
fn descendants_of(pid: u32) -> Vec<(u32, u64)> {
    let procs: Vec<(u32, u32, u64)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| proc_stat(p).map(|(ppid, started)| (p, ppid, started)))
        .collect();
    let mut found = vec![(pid, 0)];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].0;
        found.extend(procs.iter().filter(|(_, pp, _)| *pp == parent).map(|&(p, _, s)| (p, s)));
        i += 1;
    }
    found.remove(0);
    found
}

/// (parent pid, start time in clock ticks) of a live process, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ... starttime(22nd) ...": comm may hold spaces or parens, so split after the
    // last ')'; what follows starts at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// `kill SIG targets...` (no libc in the dev-dependencies). Errors for already-gone targets are expected.
pub fn signal(sig: &str, targets: &[String]) {
    let _ = Command::new("kill").arg(sig).arg("--").args(targets).stdout(Stdio::null()).stderr(Stdio::null()).status();
}
