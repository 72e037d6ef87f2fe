//! Starts a real Jupyter Kernel Gateway (KG, from PyPI, pinned in `eg/requirements-kg-3.0.x.txt` and
//! `eg/requirements-kg-2.5.x.txt`) for a test.
//!
//! The same machinery as [`super::eg`], shared in [`super::gateway`]: a cached venv built by `scripts/py-venv`,
//! a free loopback port (retried when another test grabs it first), the repo's `eg/kernels/` kernelspecs plus a
//! test's own, EG-style readiness (KG's "is available at" line, then `GET /api/kernelspecs` answering 200), the
//! log in a file, and [`super::eg::stop_tree`] to stop KG and its kernels on drop. Start is blocking (std only).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;

use super::eg::{py_venv, repo_path};
use super::gateway::{auth_headers, command, prepare_dir, start_with_retries, Launch, Running};

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
    gw: Running,
}

impl Kg {
    /// Starts KG and waits until `GET /api/kernelspecs` answers 200. Panics with KG's log on failure.
    pub fn start(opts: KgOptions) -> Kg {
        let venv = venv(opts.version);
        let dir = prepare_dir("kg", &opts.kernelspecs);
        let gw = start_with_retries(
            dir,
            Launch {
                name: "KG",
                version: opts.version,
                spawn: |root: &Path, port, log_path: &Path| spawn(&venv, &opts, root, port, log_path),
                // With port_retries=0, KG's "available at ...:PORT" line proves it holds this very port.
                ready_line: &|port| format!("is available at http://127.0.0.1:{port}"),
                port_taken_line: "no available port could be found",
                probe_path: Some("/api/kernelspecs".into()),
                auth_token: opts.auth_token.as_deref(),
            },
        );
        Kg {
            port: gw.port,
            addr: gw.addr.clone(),
            url: format!("http://127.0.0.1:{}", gw.port),
            auth_token: opts.auth_token.clone(),
            gw,
        }
    }

    /// Everything KG printed so far.
    pub fn log(&self) -> String {
        self.gw.log()
    }

    /// `(Authorization, token X)` when KG has a token.
    pub fn auth_headers(&self) -> Vec<(&'static str, String)> {
        auth_headers(self.auth_token.as_deref())
    }
}

fn spawn(venv: &Path, opts: &KgOptions, dir: &Path, port: u16, log_path: &Path) -> Child {
    // The test's own kernelspecs first, then the repo's (python3, python3_meta).
    let jupyter_path = std::env::join_paths([dir.join("jupyter"), repo_path("eg")]).unwrap();
    let mut cmd = command(venv.join("bin/python"), dir, jupyter_path, log_path);
    cmd.args([
        "-m",
        "kernel_gateway",
        "--KernelGatewayApp.ip=127.0.0.1",
        &format!("--KernelGatewayApp.port={port}"),
        "--KernelGatewayApp.port_retries=0",
    ]);
    if !opts.env_whitelist.is_empty() {
        cmd.env("KG_ENV_WHITELIST", opts.env_whitelist.join(","));
    }
    if let Some(token) = &opts.auth_token {
        cmd.env("KG_AUTH_TOKEN", token);
    }
    cmd.envs(opts.extra_env.iter().map(|(k, v)| (k, v)));
    cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn KG from {venv:?}: {e}"))
}
