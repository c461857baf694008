//! Wires the proxy from a validated configuration and runs its listeners.
//!
//! [`App::build`] makes each component once (callers, token caches,
//! admission, the limits shared through Redis, the upstream client, the
//! ledger) and hands each layer of the request stack, the admin listener
//! and the background tasks what they need. [`run`] takes already-bound
//! listeners and a shutdown future, so the binary binds the configured
//! addresses while tests bind `127.0.0.1:0` and own the shutdown; [`spawn`]
//! does the latter in one call.
//!
//! Background tasks (token refreshers, the admission timer, Redis
//! maintenance, the ledger saver, the usage sync) run on one
//! [`TaskTracker`] and stop together with the listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneSyncService;

use crate::admin::Admin;
use crate::admission::Admission;
use crate::admission::shared::{SharedError, SharedLimits};
use crate::auth::Callers;
use crate::config::{Backend, Config};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::body::BodyBudget;
use crate::proxy::{self, Components};
use crate::server::{self, ConnectionLimits};
use crate::token::TokenCaches;
use crate::upstream::{Upstream, UpstreamError};
use crate::usage_sync::{ReportedUsage, UsageSync};

/// The sockets the proxy serves on.
pub struct Listeners {
    /// Integrations call here.
    pub proxy: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`, `/usage`.
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
    #[error("cannot set up the upstream client")]
    Upstream(#[from] UpstreamError),
    #[error("cannot set up the shared limits")]
    Shared(#[from] SharedError),
    #[error("cannot bind a listener")]
    Bind(#[from] std::io::Error),
}

/// The proxy's components, built once from the configuration.
pub struct App {
    config: Config,
    components: Components,
    reported: Arc<ReportedUsage>,
    ledger: Option<Arc<Ledger>>,
}

impl App {
    /// Builds every component. Fails on what can never work (a TLS client
    /// that cannot be built, an unusable Redis URL); nothing is contacted.
    pub fn build(config: Config, metrics: Metrics) -> Result<Self, StartError> {
        let upstream = Upstream::new(&config.marketo)?;
        let limits = match (&config.state.backend, &config.state.redis) {
            (Backend::Redis, Some(redis)) => Some(SharedLimits::new(&config, redis, metrics.clone())?),
            _ => None,
        };
        let admission = Admission::new(&config, metrics.clone());
        if let Some(limits) = &limits {
            // Until Redis has answered, this replica keeps to its share.
            admission.set_share(limits.fallback_replicas());
        }
        let ledger = config
            .state
            .file
            .as_ref()
            .map(|path| Arc::new(Ledger::new(path, config.counted_names(), Arc::clone(&admission))));
        let components = Components {
            callers: Arc::new(Callers::new(&config)),
            tokens: Arc::new(TokenCaches::new(&config, &upstream, &metrics)),
            admission,
            limits,
            upstream,
            metrics,
            body_budget: BodyBudget::new(config.server.max_buffered_body_bytes.get()),
        };
        Ok(Self {
            config,
            components,
            reported: Arc::default(),
            ledger,
        })
    }

    /// Serves until `shutdown` completes, then answers what is queued,
    /// drains open connections and stops the background tasks.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Self {
            config,
            components,
            reported,
            ledger,
        } = self;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let spawn = |task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            tasks.spawn(stop.clone().run_until_cancelled_owned(task));
        };

        for cache in components.tokens.all() {
            spawn(Box::pin(cache.refresher()));
        }
        spawn(Box::pin(components.admission.timer()));
        if let Some(limits) = &components.limits {
            limits.connect(&components.admission).await;
            spawn(Box::pin(limits.maintenance(Arc::clone(&components.admission))));
        }
        if let Some(ledger) = &ledger {
            if let Err(error) = ledger.restore() {
                tracing::warn!(error = %error, "starting without the saved usage");
            }
            spawn(Box::pin(ledger.saver()));
        }
        if !config.state.usage_sync_interval.is_zero() {
            let sync = UsageSync::new(
                BoxCloneSyncService::new(proxy::forward(&components)),
                components.callers.internal(),
                config.limits.max_queue_wait,
                Arc::clone(&components.admission),
                components.limits.clone(),
                Arc::clone(&reported),
                config.limits.quota_probe_interval,
            );
            spawn(Box::pin(sync.run(config.state.usage_sync_interval)));
        }

        // When shutdown starts, waiting requests are answered at once (they
        // could wait longer than the grace period) and nothing new is
        // admitted.
        let shutdown = {
            let admission = Arc::clone(&components.admission);
            async move {
                shutdown.await;
                admission.close();
            }
        }
        .shared();
        let admin = Admin {
            admission: Arc::clone(&components.admission),
            tokens: Arc::clone(&components.tokens),
            reported,
            metrics: components.metrics.clone(),
        };
        let admin = tower::service_fn(move |request| std::future::ready(admin.handle(&request)));
        tokio::join!(
            server::serve(
                listeners.proxy,
                proxy::stack(&components),
                ConnectionLimits::proxy(&config.server),
                shutdown.clone(),
            ),
            server::serve(
                listeners.admin,
                admin,
                ConnectionLimits::admin(&config.server),
                shutdown,
            ),
        );

        stop.cancel();
        tasks.close();
        tasks.wait().await;
        if let Some(ledger) = ledger {
            if let Err(error) = ledger.save() {
                tracing::error!(error = %error, "cannot save the usage ledger at shutdown");
            }
        }
    }
}

/// Builds the proxy and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    App::build(config, metrics)?.run(listeners, shutdown).await;
    Ok(())
}

/// A proxy running in the background on ephemeral ports, for tests, the
/// demo and benchmarks. Dropping it stops the proxy.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
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
        let _ = (&mut self.task).await;
        Ok(())
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
    let metrics = Metrics::new();
    // Fails here, not inside the task, when a component cannot be built.
    let app = App::build(config, metrics.clone())?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listeners, async move {
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
