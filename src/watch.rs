//! The config watch: reloads the configuration when the config file, or a file it names (TLS
//! certificate and key, `upstream_ca`, the upstream client certificate and key,
//! `upstream_token_file`, `jwt_keys`), changes content.
//!
//! **Polling, not inotify.** Every `config_watch_interval` (2 s by default) the watch reads each
//! file by its path and hashes its content. That is a handful of small files, read in well under
//! a millisecond, and it is robust where file events are not:
//! - a Kubernetes ConfigMap or Secret mount swaps a `..data -> ..2026_xx` symlink atomically, so a
//!   watch on the file's inode sees nothing (the old inode is only unlinked later) and a watch on
//!   the directory must know about the kubelet's layout; reading by path follows whatever the
//!   symlinks point to now;
//! - an editor that writes a new file and renames it over the old one, or one that truncates and
//!   writes in place, is the same case: the content is what counts;
//! - no inotify watch limit (`fs.inotify.max_user_watches`, shared by every container on a node),
//!   no event queue overflow, and it works on network and overlay file systems where events are
//!   missing;
//! - a `touch` (or a ConfigMap re-synced with the same data) changes no hash, so it reloads nothing.
//!
//! The price is latency: a change applies one to two intervals after it is written. The
//! kubelet's own ConfigMap sync takes up to a minute or more, which dwarfs it.
//!
//! **Debounce.** A changed content is applied once the watch has seen the same content again
//! [`QUIET`] or more later (at the next poll, with the default interval): a file written in
//! several steps, or a certificate and its key replaced one after the other, loads once, whole.
//!
//! The decisions ([`Debounce`]) are pure; reading the files ([`read`]) is the only I/O.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{watched_files, Opts};

/// How long a new content must stay the same before it is applied.
pub const QUIET: Duration = Duration::from_millis(1000);

/// Files larger than this are hashed on their first bytes only (configuration files, keys and
/// certificates are far smaller; this only keeps a wrong path such as `/dev/zero` harmless).
const MAX_READ: u64 = 16 << 20;

/// A file's content, as a hash; `None`: it cannot be read (missing, no permission).
pub type Fingerprint = Option<u64>;

/// Every watched file and its fingerprint, in the order the configuration names them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot(pub Vec<(PathBuf, Fingerprint)>);

/// The fingerprint of a content: equal contents, equal fingerprints (in one process).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// What the watch does after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed since the last load.
    Unchanged,
    /// Something changed, and may still be changing: look again at the next poll.
    Settling,
    /// A change has stayed the same for [`QUIET`]: reload now.
    Reload,
}

/// The debounce: what was last loaded, and the change seen since (and when first seen).
#[derive(Debug)]
pub struct Debounce {
    loaded: Snapshot,
    pending: Option<(Snapshot, Instant)>,
    quiet: Duration,
}

impl Debounce {
    /// `loaded`: the files as the running configuration was loaded from.
    pub fn new(loaded: Snapshot, quiet: Duration) -> Debounce {
        Debounce { loaded, pending: None, quiet }
    }

    /// One poll: the files as they are `now`, at `at`.
    pub fn observe(&mut self, now: Snapshot, at: Instant) -> Step {
        if now == self.loaded {
            self.pending = None;
            return Step::Unchanged;
        }
        match &self.pending {
            Some((seen, since)) if *seen == now => {
                if at.saturating_duration_since(*since) >= self.quiet {
                    Step::Reload
                } else {
                    Step::Settling
                }
            }
            _ => {
                self.pending = Some((now, at));
                if self.quiet.is_zero() {
                    Step::Reload
                } else {
                    Step::Settling
                }
            }
        }
    }

    /// A reload was done from `snapshot` (whether it succeeded or not: a failed one is not
    /// retried until the files change again).
    pub fn loaded(&mut self, snapshot: Snapshot) {
        self.loaded = snapshot;
        self.pending = None;
    }

    /// The last reload read `snapshot`: when another trigger did it, the change pending here may
    /// be loaded already (then the next poll finds it unchanged).
    pub fn loaded_by_another(&mut self, snapshot: Snapshot) {
        if snapshot != self.loaded {
            self.loaded(snapshot);
        }
    }
}

/// Reads and hashes the config file (named in `opts`) and the files it names; `previous` is the
/// list to use when the config file is no valid config file at all (it is still watched).
pub fn read(opts: &Opts, previous: &[PathBuf]) -> (Snapshot, Vec<PathBuf>) {
    let text = opts.config.as_deref().and_then(|p| read_limited(p).ok());
    let text = text.as_deref().map(String::from_utf8_lossy);
    let paths = watched_files(opts, text.as_deref()).unwrap_or_else(|_| previous.to_vec());
    let snapshot = paths.iter().map(|p| (p.clone(), read_limited(p).ok().map(|b| fingerprint(&b)))).collect();
    (Snapshot(snapshot), paths)
}

fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(MAX_READ).read_to_end(&mut out)?;
    Ok(out)
}

/// How long the watch sleeps while it is off, before it looks at the setting again (a reload by
/// signal or `POST /-/reload` may turn it on).
const OFF_RECHECK: Duration = Duration::from_secs(2);

/// Runs the watch until the task is dropped: polls every `interval()` (read each time, so a
/// reload may change it; zero: off) and calls `reload` when a change has settled. `loaded()` is
/// the snapshot the last reload (by any trigger) read, and the files it named: a change a SIGHUP
/// or `POST /-/reload` already loaded is not loaded a second time.
pub async fn run<I, L, R, F>(opts: Opts, interval: I, loaded: L, mut reload: R)
where
    I: Fn() -> Duration,
    L: Fn() -> (Snapshot, Vec<PathBuf>),
    R: FnMut() -> F,
    F: Future<Output = ()>,
{
    let poll = |opts: Opts, paths: Vec<PathBuf>| async move {
        tokio::task::spawn_blocking(move || read(&opts, &paths)).await.unwrap_or_default()
    };
    let (first, _) = loaded();
    let mut debounce = Debounce::new(first, QUIET);
    loop {
        let every = interval();
        if every.is_zero() {
            tokio::time::sleep(OFF_RECHECK).await;
            continue;
        }
        tokio::time::sleep(every).await;
        let (last, paths) = loaded();
        debounce.loaded_by_another(last);
        let (now, _) = poll(opts.clone(), paths).await;
        match debounce.observe(now.clone(), Instant::now()) {
            Step::Unchanged | Step::Settling => {}
            Step::Reload => {
                let changed: Vec<String> = changed_files(&debounce.loaded, &now);
                tracing::info!(files = ?changed, "watched files changed");
                reload().await;
                debounce.loaded(loaded().0);
            }
        }
    }
}

/// The files whose fingerprint differs between `before` and `after` (or that appear in only one).
pub fn changed_files(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (p, f) in &after.0 {
        if !before.0.iter().any(|(q, g)| q == p && g == f) {
            out.push(p.display().to_string());
        }
    }
    for (p, _) in &before.0 {
        if !after.0.iter().any(|(q, _)| q == p) {
            out.push(p.display().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(files: &[(&str, Option<&[u8]>)]) -> Snapshot {
        Snapshot(files.iter().map(|(p, c)| (PathBuf::from(p), c.map(fingerprint))).collect())
    }

    #[test]
    fn a_change_reloads_once_it_has_settled() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let old = snap(&[("/c.toml", Some(b"a = 1"))]);
        let half = snap(&[("/c.toml", Some(b"a ="))]);
        let new = snap(&[("/c.toml", Some(b"a = 2"))]);
        let mut d = Debounce::new(old.clone(), QUIET);
        assert_eq!(d.observe(old.clone(), s(0)), Step::Unchanged);
        // Half written, then complete: the quiet period starts again with each new content.
        assert_eq!(d.observe(half.clone(), s(100)), Step::Settling);
        assert_eq!(d.observe(new.clone(), s(600)), Step::Settling);
        assert_eq!(d.observe(new.clone(), s(1200)), Step::Settling);
        assert_eq!(d.observe(new.clone(), s(1600)), Step::Reload);
        d.loaded(new.clone());
        assert_eq!(d.observe(new.clone(), s(3600)), Step::Unchanged);
        // Changed and changed back before settling: nothing to do.
        assert_eq!(d.observe(half, s(4000)), Step::Settling);
        assert_eq!(d.observe(new.clone(), s(6000)), Step::Unchanged);
        assert_eq!(d.observe(new, s(8000)), Step::Unchanged);
    }

    #[test]
    fn a_change_another_trigger_loaded_is_not_loaded_again() {
        let t0 = Instant::now();
        let old = snap(&[("/c.toml", Some(b"a = 1"))]);
        let new = snap(&[("/c.toml", Some(b"a = 2"))]);
        let mut d = Debounce::new(old.clone(), QUIET);
        assert_eq!(d.observe(new.clone(), t0), Step::Settling);
        // SIGHUP or POST /-/reload loaded it meanwhile.
        d.loaded_by_another(new.clone());
        assert_eq!(d.observe(new.clone(), t0 + QUIET * 2), Step::Unchanged);
        // The same snapshot again changes nothing pending.
        assert_eq!(d.observe(old.clone(), t0 + QUIET * 3), Step::Settling);
        d.loaded_by_another(new);
        assert_eq!(d.observe(old, t0 + QUIET * 5), Step::Reload);
    }

    #[test]
    fn a_failed_reload_is_not_retried_until_the_files_change_again() {
        let t0 = Instant::now();
        let ok = snap(&[("/c.toml", Some(b"mode = \"drop\""))]);
        let broken = snap(&[("/c.toml", Some(b"mode = \"x\""))]);
        let mut d = Debounce::new(ok.clone(), Duration::ZERO);
        assert_eq!(d.observe(broken.clone(), t0), Step::Reload);
        d.loaded(broken.clone());
        assert_eq!(d.observe(broken, t0), Step::Unchanged);
        assert_eq!(d.observe(ok, t0), Step::Reload);
    }

    #[test]
    fn a_file_that_appears_disappears_or_is_newly_named_is_a_change() {
        let t0 = Instant::now();
        let base = snap(&[("/c.toml", Some(b"x")), ("/cert.pem", None)]);
        let mut d = Debounce::new(base.clone(), Duration::ZERO);
        let appeared = snap(&[("/c.toml", Some(b"x")), ("/cert.pem", Some(b"PEM"))]);
        assert_eq!(d.observe(appeared.clone(), t0), Step::Reload);
        assert_eq!(changed_files(&base, &appeared), vec!["/cert.pem"]);
        let named = snap(&[("/c.toml", Some(b"x")), ("/cert.pem", None), ("/key.pem", Some(b"K"))]);
        assert_eq!(changed_files(&base, &named), vec!["/key.pem"]);
        assert_eq!(changed_files(&named, &base), vec!["/key.pem"]);
    }

    /// The kubelet's layout: `envgate.toml -> ..data/envgate.toml`, `..data -> ..2026_01`; an
    /// update writes `..2026_02`, points a new symlink at it and renames it over `..data`. A touch
    /// changes nothing.
    #[test]
    fn a_configmap_symlink_swap_is_seen_and_a_touch_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_01")).unwrap();
        std::fs::write(d.join("..2026_01/envgate.toml"), "client_envs = [\"A\"]\n").unwrap();
        std::os::unix::fs::symlink("..2026_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/envgate.toml", d.join("envgate.toml")).unwrap();
        let opts = Opts { config: Some(d.join("envgate.toml")), ..Opts::default() };
        let (before, paths) = read(&opts, &[]);
        assert_eq!(paths, vec![d.join("envgate.toml")]);
        assert!(before.0[0].1.is_some());

        let now = std::time::SystemTime::now();
        std::fs::File::options().write(true).open(d.join("envgate.toml")).unwrap().set_modified(now).unwrap();
        assert_eq!(read(&opts, &paths).0, before, "a touch is no change");

        std::fs::create_dir(d.join("..2026_02")).unwrap();
        std::fs::write(d.join("..2026_02/envgate.toml"), "client_envs = [\"B\"]\n").unwrap();
        std::os::unix::fs::symlink("..2026_02", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..2026_01")).unwrap();
        let (after, _) = read(&opts, &paths);
        assert_ne!(after, before);
        assert_eq!(changed_files(&before, &after), vec![d.join("envgate.toml").display().to_string()]);

        // A broken config file keeps the files named before on the list.
        std::fs::write(d.join("..2026_02/envgate.toml"), "tls_cert = ").unwrap();
        let named = vec![d.join("envgate.toml"), d.join("cert.pem")];
        let (_, kept) = read(&opts, &named);
        assert_eq!(kept, named);
    }
}
