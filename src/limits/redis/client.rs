//! The connection to Redis: made on first use and again after a failure,
//! every operation a script within [`TIMEOUT`], every error sorted into an
//! unreachable Redis or a bug.

use redis::aio::ConnectionManager;

use super::SharedError;
use super::scripts::Args;
use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// How long one operation may take before Redis counts as unreachable.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// One Redis, as the shared state's backend.
pub struct RedisClient {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    metrics: Metrics,
}

impl RedisClient {
    /// A client for `redis.url` (over TLS for `rediss://`, trusting the
    /// bundled webpki roots or `redis.ca_file`); connects on first use.
    /// Fails only on a URL that can never work, and never says the URL,
    /// which may hold a password.
    pub fn open(redis: &RedisConfig, metrics: Metrics) -> Result<Self, SharedError> {
        Ok(Self::new(Self::client(redis)?, metrics))
    }

    pub fn new(client: redis::Client, metrics: Metrics) -> Self {
        Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            metrics,
        }
    }

    fn client(redis: &RedisConfig) -> Result<redis::Client, SharedError> {
        let url = redis.url.expose();
        let unusable = |error: redis::RedisError| SharedError::Url(format!("{:?}", error.kind()));
        if !url.starts_with("rediss://") {
            return redis::Client::open(url).map_err(unusable);
        }
        // The redis crate builds its TLS settings with the process's
        // default provider; ring is the one this build carries.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Some(path) = &redis.ca_file else {
            return redis::Client::open(url).map_err(unusable);
        };
        let root_cert = std::fs::read(path).map_err(|error| SharedError::Url(format!("ca_file: {error}")))?;
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        )
        .map_err(unusable)
    }

    /// A live connection, made on first use and after a failure.
    async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connected = tokio::time::timeout(TIMEOUT, ConnectionManager::new(self.client.clone()))
            .await
            .map_err(|_| SharedError::Timeout(TIMEOUT))?
            .map_err(SharedError::Unreachable)?;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Runs one script. A script that fails is logged and counted as the
    /// bug it is.
    pub async fn run<A: Args>(&self, keys: &[&str], args: &A) -> Result<A::Reply, SharedError> {
        let script = A::script();
        let invocation = script.invocation(keys, args);
        let mut connection = self.connection().await?;
        let error = match tokio::time::timeout(TIMEOUT, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(error)) => SharedError::of_script(script.name, error),
            Err(_) => SharedError::Timeout(TIMEOUT),
        };
        if !error.is_unreachable() {
            self.metrics
                .backend_script_errors
                .with_label_values(&[script.name])
                .inc();
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            tracing::error!(%error, cause, "a Redis script failed: this is a bug");
        }
        Err(error)
    }

    /// A new connection, not the one that failed, and an answer to PING.
    pub async fn ping(&self) -> Result<(), SharedError> {
        *self.connection.lock().await = None;
        let mut connection = self.connection().await?;
        let ping = redis::cmd("PING");
        match tokio::time::timeout(TIMEOUT, ping.query_async::<String>(&mut connection)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(SharedError::Unreachable(error)),
            Err(_) => Err(SharedError::Timeout(TIMEOUT)),
        }
    }
}
