//! `espalier serve`: opens the daemon, binds the listener, serves the API on a small tokio
//! runtime (two async workers; disk, database and wasm work on a bounded blocking pool; runs on
//! their own runner threads), and shuts down in order on SIGTERM or SIGINT: stop accepting,
//! end event streams, cancel or finish running runs, close.

use std::time::Duration;

use tokio::sync::watch;

use crate::api::{ApiState, router};
use crate::config::ServeConfig;
use crate::daemon::Daemon;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state folder, store or core could not be opened.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// The listener or the async runtime failed.
    #[error("{0}")]
    Io(String),
}

/// Runs the daemon until SIGTERM or SIGINT. `ready` is called with the bound address once the
/// API answers (the CLI prints it; with port 0 the system picks one).
pub fn serve(
    config: ServeConfig,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    if !config.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {}, which is not loopback: anyone who can reach it can read runs; set a token for changes",
            config.listen
        );
    }
    let daemon = Daemon::open(config)?;
    let background = daemon.start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("espalier-http")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Io(format!("cannot start the async runtime: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = ApiState {
        daemon: daemon.clone(),
        stopping: stop_rx,
    };
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(daemon.config.listen)
            .await
            .map_err(|e| {
                ServeError::Io(format!(
                    "cannot listen on {}: {e} (is another daemon running? pick another with --listen)",
                    daemon.config.listen
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError::Io(e.to_string()))?;
        ready(addr);
        let app = router(state);
        let d = daemon.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                wait_for_signal().await;
                tracing::info!("stopping: no new runs; ending event streams");
                // New runs are refused from here on, while open requests finish.
                d.stop_accepting();
                let _ = stop_tx.send(true);
            })
            .await
            .map_err(|e| ServeError::Io(format!("the server failed: {e}")))
    });
    // Runs stop (or finish) on their own threads; the HTTP side is already closed.
    let d = daemon.clone();
    let joined = std::thread::spawn(move || d.shutdown(background));
    let _ = joined.join();
    runtime.shutdown_timeout(Duration::from_secs(5));
    served
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the daemon runs until killed.
            std::future::pending::<()>().await;
        }
    }
}
