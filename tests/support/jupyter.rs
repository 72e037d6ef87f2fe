//! Starts a real Jupyter server (jupyter_server 2.x, jupyter_server 1.24 or notebook 6.5, pinned in
//! `clients/requirements-*.txt`) as a gateway client: `--gateway-url` points at envgate (or EG), so its
//! kernels run on the gateway, never locally.
//!
//! Each [`Jupyter`] is its own process on its own loopback port, with its own token and temp dirs, so tests
//! can run in parallel. Its environment is exactly [`Jupyter::process_env`] (nothing inherited from the test
//! process), because the legacy clients send their whole environment and the tests assert on every name.
//! Dropping the [`Jupyter`] stops it and everything in its process group.
//!
//! Start is blocking (std only), like [`super::eg::Eg::start`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::eg::{free_port, repo_path, signal};

/// Jupyter starts in 1-3 s on the 2-core machine; a loaded CI box gets a wide margin.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// As for EG: a free port can still be taken by another test before Jupyter binds it.
const PORT_ATTEMPTS: usize = 5;

/// A gateway client release with a pinned requirements file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// jupyter_server 2.21.1: sends `KERNEL_*` + `GatewayClient.allowed_envs`.
    JupyterServer2,
    /// jupyter_server 1.24.0: a session start sends the server's whole environment.
    JupyterServer124,
    /// notebook 6.5.7 (its own `notebook.gateway` client): `KERNEL_*` + `GatewayClient.env_whitelist`.
    Notebook65,
}

impl Client {
    /// `(venv name, requirements file, import check)` for `scripts/py-venv`.
    fn venv_spec(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Client::JupyterServer2 => {
                ("jupyter_server-2", "clients/requirements-jupyter_server-2.txt", "import jupyter_server, setuptools")
            }
            Client::JupyterServer124 => {
                ("jupyter_server-1.24", "clients/requirements-jupyter_server-1.24.txt", "import jupyter_server")
            }
            Client::Notebook65 => ("notebook-6.5", "clients/requirements-notebook-6.5.txt", "import notebook"),
        }
    }

    /// The module to run and the traitlets class that holds ip/port/token settings.
    fn app(self) -> (&'static str, &'static str) {
        match self {
            Client::JupyterServer2 | Client::JupyterServer124 => ("jupyter_server", "ServerApp"),
            Client::Notebook65 => ("notebook", "NotebookApp"),
        }
    }

    /// The `GatewayClient` trait listing extra names to send (renamed to `allowed_envs` in 2.x).
    fn allowed_envs_trait(self) -> &'static str {
        match self {
            Client::JupyterServer2 => "allowed_envs",
            Client::JupyterServer124 | Client::Notebook65 => "env_whitelist",
        }
    }
}

#[derive(Debug, Clone)]
pub struct JupyterOptions {
    pub client: Client,
    /// The gateway (envgate's URL, e.g. `Envgate::url()`), passed as `--gateway-url`.
    pub gateway_url: String,
    /// `GatewayClient.allowed_envs` (2.x) / `env_whitelist` (1.24, notebook), as a command-line trait so that
    /// the setting itself is not one more variable in the environment a legacy client sends.
    pub allowed_envs: Option<Vec<String>>,
    /// `GatewayClient.auth_token`: sent to the gateway as `Authorization: token X`.
    pub auth_token: Option<String>,
    /// `GatewayClient.headers`: extra headers on every gateway request.
    pub headers: Vec<(String, String)>,
    /// Variables in the server's own environment (what a client may send), on top of the base environment.
    pub env: Vec<(String, String)>,
    /// Install `clients/python` (envgate-client) for this server (`pip install --target`, on its PYTHONPATH).
    pub envgate_client: bool,
    /// Any other command-line arguments, e.g. `--GatewayMappingKernelManager.kernel_manager_class=...`.
    pub extra_args: Vec<String>,
}

impl JupyterOptions {
    pub fn new(client: Client, gateway_url: &str) -> Self {
        JupyterOptions {
            client,
            gateway_url: gateway_url.to_string(),
            allowed_envs: None,
            auth_token: None,
            headers: Vec::new(),
            env: Vec::new(),
            envgate_client: false,
            extra_args: Vec::new(),
        }
    }
}

/// A running Jupyter server. Dropping it stops it.
pub struct Jupyter {
    /// `127.0.0.1:PORT`, for `support::http::request`.
    pub addr: String,
    /// The server's own token (not the gateway's).
    pub token: String,
    /// The server's complete process environment.
    pub process_env: BTreeMap<String, String>,
    root_dir: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    // Drops after `Drop::drop` has stopped the process.
    dir: Option<tempfile::TempDir>,
}

impl Jupyter {
    /// Starts the server and waits until `GET /api/contents` answers 200 with its token. Panics with the
    /// server's log on failure.
    pub fn start(opts: JupyterOptions) -> Jupyter {
        let venv = venv(opts.client);
        let dir = tempfile::Builder::new().prefix("envgate-jupyter-").tempdir().expect("temp dir");
        for sub in ["home", "config", "data", "runtime", "notebooks"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let token = new_token();
        let process_env = base_env(&venv, dir.path(), &opts);

        let mut dir = Some(dir);
        let mut last_log = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let root = dir.as_ref().unwrap().path();
            let log_path = root.join(format!("jupyter-{attempt}.log"));
            let child = spawn(&opts, &venv, root, port, &token, &process_env, &log_path);
            let mut j = Jupyter {
                addr: format!("127.0.0.1:{port}"),
                token: token.clone(),
                process_env: process_env.clone(),
                root_dir: root.join("notebooks"),
                child: Some(child),
                log_path,
                dir: None,
            };
            match j.wait_ready(port) {
                Ok(()) => {
                    j.dir = dir.take();
                    return j;
                }
                Err(None) => last_log = j.log(),
                Err(Some(why)) => {
                    let log = j.log();
                    drop(j);
                    panic!("{:?} did not start: {why}\n--- Jupyter log ---\n{log}", opts.client);
                }
            }
        }
        panic!("{:?} found no free port\n--- last log ---\n{last_log}", opts.client);
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<cannot read {:?}: {e}>", self.log_path))
    }

    /// The server's root (notebook) directory: the `KERNEL_WORKING_DIR` of a session at the top level.
    pub fn root_dir(&self) -> &Path {
        &self.root_dir
    }

    /// `(Authorization, token X)` for the server's REST API and WebSockets.
    pub fn auth(&self) -> (&'static str, String) {
        ("Authorization", format!("token {}", self.token))
    }

    /// `ws://127.0.0.1:PORT/api/kernels/{id}/channels`: the server's own channels, which it proxies to
    /// the gateway.
    pub fn channels_url(&self, kernel_id: &str) -> String {
        format!("ws://{}/api/kernels/{kernel_id}/channels", self.addr)
    }

    /// `Err(None)`: the port was taken, try another; `Err(Some(why))`: give up.
    fn wait_ready(&mut self, port: u16) -> Result<(), Option<String>> {
        // Jupyter's own "running at http://127.0.0.1:PORT/" line proves it holds this port, so the 200 below
        // cannot come from another test's server.
        let bound = format!("http://127.0.0.1:{port}/");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = self.log();
                // "The port N is already in use", then "... could not be started because port N is not available."
                if log.contains("already in use") || log.contains("is not available") {
                    return Err(None);
                }
                return Err(Some(format!("exited with {status}")));
            }
            if self.log().contains(&bound) && status_ok(&self.addr, &self.token) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Some(format!("not ready within {START_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (Jupyter shuts its gateway kernels down), then SIGKILL to the process group after a grace
    /// period.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        signal("-TERM", &[pid.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The group outlives its leader only if something was left behind; not reaped yet, so the
        // group id cannot have been reused.
        signal("-KILL", &[format!("-{pid}")]);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Jupyter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Path of the ready venv for `client` (runs `scripts/py-venv`, which builds it on first use).
pub fn venv(client: Client) -> PathBuf {
    let (name, req, check) = client.venv_spec();
    super::eg::py_venv(name, req, check)
}

/// The server's whole environment: nothing from the test process, so what a legacy client sends is known
/// name by name.
fn base_env(venv: &Path, dir: &Path, opts: &JupyterOptions) -> BTreeMap<String, String> {
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut env = BTreeMap::from([
        ("PATH".to_string(), format!("{}:/usr/local/bin:/usr/bin:/bin", s(venv.join("bin")))),
        ("HOME".into(), s(dir.join("home"))),
        ("LANG".into(), "C.UTF-8".into()),
        ("JUPYTER_CONFIG_DIR".into(), s(dir.join("config"))),
        ("JUPYTER_DATA_DIR".into(), s(dir.join("data"))),
        ("JUPYTER_RUNTIME_DIR".into(), s(dir.join("runtime"))),
        // Keep the repo and the venv free of bytecode written by the servers under test.
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
    ]);
    if opts.envgate_client {
        env.insert("PYTHONPATH".into(), s(install_envgate_client(venv, dir)));
    }
    env.extend(opts.env.iter().cloned());
    env
}

/// `pip install --target DIR/site clients/python` from a copy of the sources (setuptools builds in the
/// source tree, which parallel tests must not share), offline: the jupyter_server-2 venv pins setuptools.
/// Returns the site directory.
pub fn install_envgate_client(venv: &Path, dir: &Path) -> PathBuf {
    let src = dir.join("envgate-client-src");
    copy_tree(&repo_path("clients/python"), &src);
    let site = dir.join("site");
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
        ])
        .arg(&site)
        .arg(&src)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running pip");
    assert!(
        out.status.success(),
        "pip install clients/python failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    site
}

/// Copies a source tree, skipping build leftovers from a developer's own `pip install -e`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n == "build" || n == "__pycache__" || n.ends_with(".egg-info") {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn spawn(
    opts: &JupyterOptions,
    venv: &Path,
    dir: &Path,
    port: u16,
    token: &str,
    env: &BTreeMap<String, String>,
    log_path: &Path,
) -> Child {
    let (module, app) = opts.client.app();
    let root_dir_trait = match opts.client {
        Client::Notebook65 => "notebook_dir",
        _ => "root_dir",
    };
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.args(["-m", module])
        .arg(format!("--{app}.ip=127.0.0.1"))
        .arg(format!("--{app}.port={port}"))
        .arg(format!("--{app}.port_retries=0"))
        .arg(format!("--{app}.open_browser=False"))
        .arg(format!("--{app}.allow_root=True"))
        .arg(format!("--{app}.{root_dir_trait}={}", dir.join("notebooks").display()))
        .arg(format!("--gateway-url={}", opts.gateway_url));
    // jupyter_server 2.x moved the token to the IdentityProvider; the old trait still works but warns.
    cmd.arg(match opts.client {
        Client::JupyterServer2 => format!("--IdentityProvider.token={token}"),
        _ => format!("--{app}.token={token}"),
    });
    if let Some(names) = &opts.allowed_envs {
        cmd.arg(format!("--GatewayClient.{}={}", opts.client.allowed_envs_trait(), names.join(",")));
    }
    if let Some(t) = &opts.auth_token {
        cmd.arg(format!("--GatewayClient.auth_token={t}"));
    }
    if !opts.headers.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> =
            opts.headers.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        cmd.arg(format!("--GatewayClient.headers={}", serde_json::Value::Object(map)));
    }
    cmd.args(&opts.extra_args);
    let log = fs::File::create(log_path).unwrap();
    cmd.env_clear()
        .envs(env)
        .current_dir(dir.join("notebooks"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0); // so Drop can signal the server and anything it started at once
    cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {module}: {e}"))
}

/// `GET /api/contents` with the token answers 200 (std only; start needs no runtime). Contents is local:
/// `/api/status` would ask the gateway to list kernels, which EG refuses unless `EG_LIST_KERNELS` is set.
fn status_ok(addr: &str, token: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "GET /api/contents HTTP/1.1\r\nHost: {addr}\r\nAuthorization: token {token}\r\nConnection: close\r\n\r\n"
    );
    let mut head = [0u8; 12];
    s.write_all(req.as_bytes()).is_ok() && s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// A token unique across parallel tests and processes.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("jupyter-{}-{nanos:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}
