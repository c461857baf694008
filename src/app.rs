//! Wires the proxy from a validated configuration and runs its listeners.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so the
//! binary binds the configured addresses while tests bind `127.0.0.1:0`
//! and own the shutdown. [`spawn`] does the latter in one call.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::BuildError;
use crate::proxy::Proxy;
use crate::usage_sync;

/// The sockets the proxy serves on.
pub struct Listeners {
    /// Integrations call here.
    pub proxy: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            proxy: TcpListener::bind(config.listen).await?,
            admin: TcpListener::bind(config.admin_listen).await?,
        })
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the proxy")]
    Build(#[from] BuildError),
    #[error("cannot bind a listener")]
    Bind(#[from] std::io::Error),
}

/// Serves until `shutdown` completes, then drains open connections.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let proxy = Proxy::new(&config, metrics)?;
    let mut background = proxy.spawn_token_refreshers();
    background.push(proxy.admission().spawn_timer());
    if let Some(limits) = proxy.shared_limits() {
        limits.connect(proxy.admission()).await;
        background.push(limits.spawn_maintenance(Arc::clone(proxy.admission())));
    }
    let ledger = config.state.file.as_ref().map(|path| {
        Arc::new(Ledger::new(
            path,
            proxy.service_names(),
            Arc::clone(proxy.admission()),
        ))
    });
    if let Some(ledger) = &ledger {
        if let Err(error) = ledger.restore() {
            tracing::warn!(error = %error, "starting without the saved usage");
        }
        background.push(ledger.spawn_saver());
    }
    if !config.state.usage_sync_interval.is_zero() {
        background.push(usage_sync::spawn(proxy.clone(), config.state.usage_sync_interval));
    }
    // When shutdown starts, waiting requests are answered at once (they
    // could wait longer than the grace period) and nothing new is admitted.
    let shutdown = {
        let admission = Arc::clone(proxy.admission());
        async move {
            shutdown.await;
            admission.close();
        }
    }
    .shared();

    let forwarding = {
        let proxy = proxy.clone();
        crate::server::serve(
            listeners.proxy,
            move |peer: SocketAddr| {
                let proxy = proxy.clone();
                hyper::service::service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
                })
            },
            shutdown.clone(),
        )
    };
    let admin = {
        let proxy = proxy.clone();
        crate::server::serve(
            listeners.admin,
            move |_peer: SocketAddr| {
                let proxy = proxy.clone();
                hyper::service::service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { crate::admin::handle(&proxy, request).await }
                })
            },
            shutdown,
        )
    };
    tokio::join!(forwarding, admin);
    for task in background {
        task.abort();
    }
    if let Some(ledger) = ledger {
        if let Err(error) = ledger.save() {
            tracing::error!(error = %error, "cannot save the usage ledger at shutdown");
        }
    }
    Ok(())
}

/// A proxy running in the background on ephemeral ports, for tests, the
/// demo and benchmarks. Dropping it stops the proxy.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartError>>,
}

impl RunningProxy {
    /// `http://127.0.0.1:PORT`, the base URL integrations use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Stops serving and waits for open connections to finish.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds both listeners on `127.0.0.1:0` and runs the proxy in a task.
pub async fn spawn(config: Config) -> Result<RunningProxy, StartError> {
    let listeners = Listeners {
        proxy: TcpListener::bind("127.0.0.1:0").await?,
        admin: TcpListener::bind("127.0.0.1:0").await?,
    };
    spawn_on(config, listeners).await
}

/// Runs the proxy in a task on the given listeners.
pub async fn spawn_on(config: Config, listeners: Listeners) -> Result<RunningProxy, StartError> {
    let addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    // Fail here, not inside the task, when the client cannot be built.
    drop(Proxy::new(&config, Metrics::new())?);
    let metrics = Metrics::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(config, listeners, metrics.clone(), async move {
        let _ = stopped.await;
    }));
    Ok(RunningProxy {
        addr,
        admin_addr,
        metrics,
        stop: Some(stop),
        task,
    })
}
