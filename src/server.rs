//! The listener: accepts connections, serves each with hyper (HTTP/1.1, keep-alive, upgrades),
//! and stops on SIGTERM or SIGINT.

use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::proxy::{self, State};

/// Runs envgate until SIGTERM or SIGINT.
pub async fn run(config: Config) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let (audit, audit_task) = AuditLog::open(&config.audit_log).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %config.upstream,
        mode = config.policy.mode.as_str(),
        "envgate is listening"
    );
    let state = Arc::new(State::new(config, audit));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| proxy::handle(req, peer, st.clone()));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    drop(state);
    // Connections still running hold the audit log; give the writer a moment to drain.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), audit_task).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
