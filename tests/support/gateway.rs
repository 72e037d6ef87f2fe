//! What [`super::eg::Eg`] and [`super::kg::Kg`] share: the temp dir layout, the port-retry start loop, the
//! readiness wait and stopping the gateway (with [`super::eg::stop_tree`]) on drop. Each of them keeps only
//! its own command line, environment and log lines.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::eg::{free_port, get_status, stop_tree};

/// How long a gateway gets to answer `GET /api/kernelspecs` (EG takes ~0.5 s on the 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starting on a free port can still lose a race with another test; retry on a new port this often.
const PORT_ATTEMPTS: usize = 5;

/// A temp dir (`envgate-{prefix}-...`) with `jupyter/kernels`, `data`, `runtime`, `config` and `work`, and
/// the extra kernelspecs (name, kernel.json contents) under `jupyter/kernels`.
pub fn prepare_dir(prefix: &str, kernelspecs: &[(String, serde_json::Value)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(&format!("envgate-{prefix}-")).tempdir().expect("temp dir");
    for sub in ["jupyter/kernels", "data", "runtime", "config", "work"] {
        fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    for (name, spec) in kernelspecs {
        let spec_dir = dir.path().join("jupyter/kernels").join(name);
        fs::create_dir_all(&spec_dir).unwrap();
        fs::write(spec_dir.join("kernel.json"), serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    }
    dir
}

/// How [`start_with_retries`] starts a gateway and tells when it is ready.
pub struct Launch<'a, S: FnMut(&Path, u16, &Path) -> Child> {
    /// "EG" or "KG", for messages; its lowercase names the log files (`eg-1.log`, ...).
    pub name: &'a str,
    /// For messages.
    pub version: &'a str,
    /// Starts the gateway in its own process group: (temp dir, port, log file path) -> child.
    pub spawn: S,
    /// The gateway's own line proving it holds the port (with port_retries=0), e.g.
    /// `is available at http://127.0.0.1:PORT`; only then is the port polled, so a 200 cannot come from
    /// some other test's server that grabbed it.
    pub ready_line: &'a dyn Fn(u16) -> String,
    /// The log line of a gateway that exited because its port was taken: try another port.
    pub port_taken_line: &'a str,
    /// Path polled until it answers 200 (`{base_url}/api/kernelspecs`); `None`: the ready line is enough
    /// (TLS, which the plain-HTTP probe cannot talk to).
    pub probe_path: Option<String>,
    pub auth_token: Option<&'a str>,
}

/// A running gateway. Dropping it stops the gateway and its kernels.
pub struct Running {
    pub port: u16,
    /// `127.0.0.1:PORT`
    pub addr: String,
    child: Option<Child>,
    log_path: PathBuf,
    // Fields drop after `Drop::drop` has stopped the processes, so the dir outlives them.
    dir: Option<tempfile::TempDir>,
}

/// Starts the gateway on a free port (a new one, up to [`PORT_ATTEMPTS`] times, while the port turns out to be
/// taken) and waits until it is ready. Panics with the gateway's log on failure. `dir` comes from
/// [`prepare_dir`].
pub fn start_with_retries<S: FnMut(&Path, u16, &Path) -> Child>(
    dir: tempfile::TempDir,
    mut launch: Launch<'_, S>,
) -> Running {
    let (name, version) = (launch.name, launch.version);
    // The temp dir moves into the Running only once the gateway is up; a failed attempt's Running is dropped
    // (stopping its process) while the dir, shared by all attempts, stays here.
    let mut dir = Some(dir);
    let mut last_log = String::new();
    for attempt in 1..=PORT_ATTEMPTS {
        let port = free_port();
        let root = dir.as_ref().unwrap().path();
        let log_path = root.join(format!("{}-{attempt}.log", name.to_lowercase()));
        let child = (launch.spawn)(root, port, &log_path);
        let mut gw = Running { port, addr: format!("127.0.0.1:{port}"), child: Some(child), log_path, dir: None };
        match gw.wait_ready(&launch, &(launch.ready_line)(port)) {
            Ok(()) => {
                gw.dir = dir.take();
                return gw;
            }
            Err(None) => last_log = gw.log(),
            Err(Some(why)) => {
                let log = gw.log();
                drop(gw);
                panic!("{name} {version} did not start: {why}\n--- {name} log ---\n{log}");
            }
        }
    }
    panic!("{name} {version} found no free port in {PORT_ATTEMPTS} tries\n--- last {name} log ---\n{last_log}");
}

impl Running {
    /// Everything the gateway printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<cannot read {:?}: {e}>", self.log_path))
    }

    /// `Err(None)`: the port was taken, try another; `Err(Some(why))`: give up.
    fn wait_ready<S: FnMut(&Path, u16, &Path) -> Child>(
        &mut self,
        launch: &Launch<'_, S>,
        ready_line: &str,
    ) -> Result<(), Option<String>> {
        let deadline = Instant::now() + START_TIMEOUT;
        let what = launch.probe_path.as_deref().unwrap_or("/api/kernelspecs");
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                if self.log().contains(launch.port_taken_line) {
                    return Err(None);
                }
                return Err(Some(format!("{} exited with {status}", launch.name)));
            }
            if self.log().contains(ready_line) {
                let Some(path) = &launch.probe_path else { return Ok(()) };
                match get_status(&self.addr, path, launch.auth_token) {
                    Ok(200) => return Ok(()),
                    Ok(code) => return Err(Some(format!("GET {path} answered {code}"))),
                    Err(_) => {} // not accepting yet
                }
            }
            if Instant::now() > deadline {
                return Err(Some(format!("no 200 from GET {what} within {START_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_tree(child);
        }
    }
}

/// `(Authorization, token X)` when the gateway has a token, for `http::request` and `kernel::run_code`.
pub fn auth_headers(token: Option<&str>) -> Vec<(&'static str, String)> {
    match token {
        Some(t) => vec![("Authorization", format!("token {t}"))],
        None => Vec::new(),
    }
}

/// A gateway command (`program`) with what both gateways get: the test's environment (realistic: that is what
/// a careless gateway leaks) minus any EG/KG/Jupyter settings from the developer's shell, which would make runs
/// differ; the Jupyter dirs in `dir` (kernelspecs from `jupyter_path`); `dir/work` as working dir; stdout and
/// stderr into `log_path`; and a process group of its own, so Drop can signal it (and anything else in its
/// group) at once. The caller adds the arguments and its own variables.
pub fn command(program: impl AsRef<OsStr>, dir: &Path, jupyter_path: impl AsRef<OsStr>, log_path: &Path) -> Command {
    let log = fs::File::create(log_path).unwrap();
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("EG_") || n.starts_with("KG_") || n.starts_with("JUPYTER") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("JUPYTER_PATH", jupyter_path)
        .env("JUPYTER_DATA_DIR", dir.join("data"))
        .env("JUPYTER_RUNTIME_DIR", dir.join("runtime"))
        .env("JUPYTER_CONFIG_DIR", dir.join("config"))
        .current_dir(dir.join("work"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0);
    cmd
}
