//! Process resource limits, through the `rlimit` crate (envgate itself has no unsafe code).

use rlimit::Resource;

/// Raises the soft limit on open files to the hard limit, as nginx (`worker_rlimit_nofile`), HAProxy
/// and Go programs do: each client connection holds a descriptor, and so does each upstream
/// connection (a WebSocket holds two for its whole life), so the common soft default of 1024 would
/// cap envgate at a few hundred WebSockets. Returns `(old, new)` when it changed the limit, `None`
/// when the soft limit was already the hard one.
pub fn raise_fd_limit() -> Result<Option<(u64, u64)>, String> {
    let (soft, hard) = Resource::NOFILE.get().map_err(|e| e.to_string())?;
    if soft >= hard {
        return Ok(None);
    }
    Resource::NOFILE.set(hard, hard).map_err(|e| e.to_string())?;
    Ok(Some((soft, hard)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let first = raise_fd_limit().unwrap();
        if let Some((old, new)) = first {
            assert!(old < new);
        }
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        assert_eq!(soft, hard);
        assert_eq!(raise_fd_limit(), Ok(None), "already raised");
    }
}
