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
//! maintenance, the ledger saver, the usage sync, and every task a
//! component spawns) run on one [`Tasks`] and stop together with the
//! listeners.
//!
//! Nothing is served before today's usage is known: the ledger is read
//! first, and when it was there but could not be used, the first
//! reconciliation with Marketo's usage report is awaited (for at most
//! `marketo.request_timeout`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::util::BoxCloneSyncService;

use crate::admin::Admin;
use crate::admission::Admission;
use crate::admission::shared::{SharedError, SharedLimits};
use crate::auth::Callers;
use crate::bulk::BulkJobs;
use crate::bulk_status::StatusPoller;
use crate::config::{Backend, Config};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::body::{BodyBudget, UnknownBodies};
use crate::proxy::coalesce::CoalesceLayer;
use crate::proxy::{self, Components};
use crate::recent::LastHour;
use crate::server::{self, ConnectionLimits};
use crate::spool::Spooler;
use crate::status::StatusPage;
use crate::tasks::Tasks;
use crate::token::TokenCaches;
use crate::upstream::{Upstream, UpstreamError};
use crate::usage_sync::{ReportedUsage, UsageSync};

/// The sockets the proxy serves on.
pub struct Listeners {
    /// Integrations call here.
    pub proxy: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`, `/usage`, the status page.
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
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        metrics.start_series(&config.counted_names());
        for script in crate::limits::redis::scripts::NAMES {
            metrics.backend_script_errors.with_label_values(&[script]);
        }
        let upstream = Upstream::new(&config.marketo)?;
        let tasks = Tasks::new();
        let admission = Admission::new(&config, metrics.clone());
        // One Marketo day for the quota, bulk export bytes and Redis's day keys.
        let marketo_day = admission.marketo_day().clone();
        let limits = match (&config.state.backend, &config.state.redis) {
            (Backend::Redis, Some(redis)) => Some(SharedLimits::new(
                &config,
                redis,
                metrics.clone(),
                marketo_day.clone(),
                tasks.clone(),
            )?),
            _ => None,
        };
        if let Some(limits) = &limits {
            // Until Redis has answered, this replica keeps to its share.
            admission.set_fallback_split(limits.fallback_replicas());
        }
        let bulk = BulkJobs::new(
            &config,
            metrics.clone(),
            limits.clone(),
            marketo_day,
            tasks.clone(),
        );
        let ledger = config.state.file.as_ref().map(|path| {
            Arc::new(
                Ledger::new(path, config.counted_names(), Arc::clone(&admission))
                    .with_bulk(Arc::clone(&bulk)),
            )
        });
        let tokens = Arc::new(TokenCaches::new(&config, &upstream, &metrics));
        let (unknown_body_bytes, body_bytes) = config.server.body_budgets();
        let spooler = Spooler::new(
            &config.server,
            upstream.request_timeout(),
            &metrics,
            tasks.clone(),
        );
        let components = Components {
            callers: Arc::new(Callers::new(&config, &metrics)),
            coalesce: CoalesceLayer::new(&config, tokens.users(), Arc::clone(&admission)),
            tokens,
            admission,
            bulk,
            limits,
            upstream,
            metrics,
            body_budget: BodyBudget::new(body_bytes),
            unknown_bodies: Arc::new(UnknownBodies::new(
                unknown_body_bytes,
                config.server.unauthenticated_bodies_per_address.get(),
            )),
            spooler,
            last_hour: Arc::new(LastHour::new(config.counted_names().len())),
            ratelimit_headers: config.limits.ratelimit_headers,
            tasks,
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
        let tasks = components.tasks.clone();
        let spawn = |task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| tasks.until_stopped(task);

        for cache in components.tokens.all() {
            spawn(Box::pin(cache.refresher()));
        }
        spawn(Box::pin(components.admission.timer()));
        if let Some(limits) = &components.limits {
            limits.connect(&components.admission).await;
            spawn(Box::pin(limits.maintenance(Arc::clone(&components.admission))));
        }
        let mut ledger_lost = false;
        if let Some(ledger) = &ledger {
            if let Err(error) = ledger.restore() {
                tracing::warn!(error = %error, "starting without the saved usage");
                ledger_lost = true;
            }
            spawn(Box::pin(ledger.saver()));
        }
        // After the ledger: Redis's counts, when it has them, are the
        // instance's.
        components.bulk.connect().await;
        spawn(Box::pin(components.bulk.sharing()));
        let first_sync = (!config.state.usage_sync_interval.is_zero()).then(|| {
            let sync = UsageSync::new(
                BoxCloneSyncService::new(proxy::forward(&components)),
                components.callers.internal(),
                config.limits.max_queue_wait,
                Arc::clone(&components.admission),
                components.limits.clone(),
                Arc::clone(&reported),
                config.limits.quota_probe_interval,
            );
            let (reconciled, first_sync) = oneshot::channel();
            spawn(Box::pin(sync.run(config.state.usage_sync_interval, reconciled)));
            first_sync
        });
        spawn(Box::pin(
            StatusPoller {
                jobs: Arc::clone(&components.bulk),
                forward: BoxCloneSyncService::new(proxy::forward(&components)),
                callers: Arc::clone(&components.callers),
                max_wait: config.limits.max_queue_wait,
            }
            .run(),
        ));
        if ledger_lost {
            wait_for_usage_report(first_sync, config.marketo.request_timeout).await;
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
            status: Arc::new(StatusPage::new(&config, Arc::clone(&components.last_hour))),
            bulk: Arc::clone(&components.bulk),
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

        tasks.stop().await;
        if let Some(ledger) = ledger {
            if let Err(error) = ledger.save() {
                tracing::error!(error = %error, "cannot save the usage ledger at shutdown");
            }
        }
    }
}

/// With the saved usage lost, counting today's quota from zero could admit
/// calls the day no longer has room for: waits, at most `timeout`, for
/// the first reconciliation with Marketo's usage report. One that comes
/// later is applied when it comes.
async fn wait_for_usage_report(first_sync: Option<oneshot::Receiver<bool>>, timeout: Duration) {
    let Some(first_sync) = first_sync else {
        tracing::warn!("usage sync is off (state.usage_sync_interval: 0s): today's quota counts from zero");
        return;
    };
    tracing::info!("waiting for Marketo's usage report before serving");
    match tokio::time::timeout(timeout, first_sync).await {
        Ok(Ok(true)) => tracing::info!("today's usage taken from Marketo's usage report"),
        Ok(_) => tracing::warn!(
            "serving without Marketo's usage report: today's quota counts from zero until a reconciliation succeeds"
        ),
        Err(_) => tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "serving before Marketo's usage report came: today's quota counts from zero until it does"
        ),
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
