//! Starts a real Jupyter Kernel Gateway (KG, from PyPI, pinned in `eg/requirements-kg-3.0.x.txt` and
//! `eg/requirements-kg-2.5.x.txt`) for a test.
//!
//! The same machinery as [`super::eg`]: a cached venv built by `scripts/py-venv`, a free loopback port (retried
//! when another test grabs it first), the repo's `eg/kernels/` kernelspecs plus a test's own, EG-style readiness
//! (KG's "is available at" line, then `GET /api/kernelspecs` answering 200), the log in a file, and
//! [`super::eg::stop_tree`] to stop KG and its kernels on drop. Start is blocking (std only).

#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::eg::{free_port, get_status, py_venv, repo_path, stop_tree};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;

#[derive(Debug, Clone)]
pub struct KgOptions {
    /// KG release line with a pinned requirements file: "3.0.x" (3.0.1) or "2.5.x" (2.5.2, on notebook 6.5).
    pub version: &'static str,
    /// `KG_ENV_WHITELIST=a,b`: names KG takes from a request's `env` besides `KERNEL_*`.
    pub env_whitelist: Vec<String>,
    /// `KG_AUTH_TOKEN`: requests then need `Authorization: token X` (or `?token=X`).
    pub auth_token: Option<String>,
    /// Extra variables in KG's own environment (a secret that must not reach a kernel, `KG_LIST_KERNELS`, ...).
    pub extra_env: Vec<(String, String)>,
    /// Extra kernelspecs: (name, kernel.json). Use `"python"` as `argv[0]` (jupyter_client swaps in KG's own
    /// interpreter).
    pub kernelspecs: Vec<(String, serde_json::Value)>,
}

impl Default for KgOptions {
    fn default() -> Self {
        KgOptions {
            version: "3.0.x",
            env_whitelist: Vec::new(),
            auth_token: None,
            extra_env: Vec::new(),
            kernelspecs: Vec::new(),
        }
    }
}

/// The venv holding KG `version` (built on first use, ~30 s).
pub fn venv(version: &str) -> PathBuf {
    py_venv(&format!("kg-{version}"), &format!("eg/requirements-kg-{version}.txt"), "import kernel_gateway, ipykernel")
}

/// A running KG. Dropping it stops KG and its kernels.
pub struct Kg {
    pub port: u16,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub auth_token: Option<String>,
    child: Option<Child>,
    log_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Kg {
    /// Starts KG and waits until `GET /api/kernelspecs` answers 200. Panics with KG's log on failure.
    pub fn start(opts: KgOptions) -> Kg {
        let venv = venv(opts.version);
        let dir = tempfile::Builder::new().prefix("envgate-kg-").tempdir().expect("temp dir");
        for sub in ["jupyter/kernels", "data", "runtime", "config", "work"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        for (name, spec) in &opts.kernelspecs {
            let spec_dir = dir.path().join("jupyter/kernels").join(name);
            fs::create_dir_all(&spec_dir).unwrap();
            fs::write(spec_dir.join("kernel.json"), serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        }
        let mut dir = Some(dir);
        let mut last_log = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let root = dir.as_ref().unwrap().path();
            let log_path = root.join(format!("kg-{attempt}.log"));
            let child = spawn(&venv, &opts, root, port, &log_path);
            let mut kg = Kg {
                port,
                addr: format!("127.0.0.1:{port}"),
                url: format!("http://127.0.0.1:{port}"),
                auth_token: opts.auth_token.clone(),
                child: Some(child),
                log_path,
                dir: None,
            };
            match kg.wait_ready() {
                Ok(()) => {
                    kg.dir = dir.take();
                    return kg;
                }
                Err(None) => last_log = kg.log(),
                Err(Some(why)) => {
                    let log = kg.log();
                    drop(kg);
                    panic!("KG {} did not start: {why}\n--- KG log ---\n{log}", opts.version);
                }
            }
        }
        panic!("KG found no free port in {PORT_ATTEMPTS} tries\n--- last KG log ---\n{last_log}");
    }

    /// Everything KG printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<cannot read {:?}: {e}>", self.log_path))
    }

    /// `(Authorization, token X)` when KG has a token.
    pub fn auth_headers(&self) -> Vec<(&'static str, String)> {
        match &self.auth_token {
            Some(t) => vec![("Authorization", format!("token {t}"))],
            None => Vec::new(),
        }
    }

    /// `Err(None)`: the port was taken, try another; `Err(Some(why))`: give up.
    fn wait_ready(&mut self) -> Result<(), Option<String>> {
        // With port_retries=0, KG's "available at ...:PORT" line proves it holds this very port.
        let bound = format!("is available at http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                if self.log().contains("no available port could be found") {
                    return Err(None);
                }
                return Err(Some(format!("KG exited with {status}")));
            }
            if self.log().contains(&bound) {
                match get_status(&self.addr, "/api/kernelspecs", self.auth_token.as_deref()) {
                    Ok(200) => return Ok(()),
                    Ok(code) => return Err(Some(format!("GET /api/kernelspecs answered {code}"))),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(Some(format!("no 200 from GET /api/kernelspecs within {START_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Kg {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_tree(child);
        }
    }
}

fn spawn(venv: &Path, opts: &KgOptions, dir: &Path, port: u16, log_path: &Path) -> Child {
    let log = fs::File::create(log_path).unwrap();
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.args([
        "-m",
        "kernel_gateway",
        "--KernelGatewayApp.ip=127.0.0.1",
        &format!("--KernelGatewayApp.port={port}"),
        "--KernelGatewayApp.port_retries=0",
    ]);
    // KG inherits the test's environment (what a careless KG leaks), minus gateway and Jupyter settings.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("EG_") || n.starts_with("KG_") || n.starts_with("JUPYTER") {
            cmd.env_remove(&name);
        }
    }
    // The test's own kernelspecs first, then the repo's (python3, python3_meta).
    let jupyter_path = std::env::join_paths([dir.join("jupyter"), repo_path("eg")]).unwrap();
    cmd.env("JUPYTER_PATH", jupyter_path)
        .env("JUPYTER_DATA_DIR", dir.join("data"))
        .env("JUPYTER_RUNTIME_DIR", dir.join("runtime"))
        .env("JUPYTER_CONFIG_DIR", dir.join("config"));
    if !opts.env_whitelist.is_empty() {
        cmd.env("KG_ENV_WHITELIST", opts.env_whitelist.join(","));
    }
    if let Some(token) = &opts.auth_token {
        cmd.env("KG_AUTH_TOKEN", token);
    }
    cmd.envs(opts.extra_env.iter().map(|(k, v)| (k, v)));
    cmd.current_dir(dir.join("work"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0);
    cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn KG from {venv:?}: {e}"))
}
