//! marketo-proxy: a reverse proxy that lets many integrations share one
//! Marketo instance without tripping its rate, concurrency and quota limits.
//!
//! The library holds all logic; `src/main.rs` and `src/bin/marketo-sim.rs`
//! are thin command-line wrappers.

pub mod admin;
pub mod admission;
pub mod answer_cache;
pub mod app;
pub mod auth;
pub mod bulk;
pub mod bulk_status;
pub mod config;
pub mod egress;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod logging;
pub mod marketo;
pub mod metrics;
pub mod proxy;
pub mod recent;
pub mod response;
pub mod secret;
pub mod server;
pub mod sim;
pub mod spool;
pub mod status;
pub mod target;
pub mod tasks;
pub mod token;
pub mod trust;
pub mod upstream;
pub mod usage_sync;

/// Resolves on Ctrl-C or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
