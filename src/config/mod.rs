//! The proxy's configuration: one YAML file, read once at start.
//!
//! [`Config::load`] reads the file; [`Config::from_yaml`] fills `${VAR}`
//! placeholders from the environment (see `interpolate`), parses the text
//! into the struct tree below and hands it to [`Config::validate`], which
//! checks the rules that span fields. After that the rest of the proxy
//! takes every value as given.
//!
//! Unknown keys are errors, so a typo fails with its key and line instead
//! of silently leaving a default in place. Errors never contain a secret
//! or any value read from the environment.

mod base_url;
mod interpolate;
mod summary;
mod validate;

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::marketo::limits;
use crate::secret::Secret;

pub use base_url::{BaseUrl, BaseUrlError};

/// The service name the proxy's own calls to Marketo (the usage report it
/// reconciles with) are counted under. No configured service may take it.
pub const INTERNAL_SERVICE: &str = "marketo-proxy";

/// The service label of requests whose caller is not known.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Names the proxy labels things with itself; no service may take one.
pub const RESERVED_NAMES: [&str; 3] = [INTERNAL_SERVICE, UNAUTHENTICATED, "unknown"];

/// The configuration `marketo-proxy demo` runs with; the demo replaces
/// `marketo.base_url` with the address of its bundled simulator.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// Why a configuration was refused. Messages are one line, name the key or
/// the line at fault, and never carry a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `${VAR}` placeholder names a variable that is not set.
    #[error(
        "line {line}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
    )]
    MissingVar { name: String, line: usize },
    /// A `$` placeholder is malformed, or its value cannot be placed there.
    #[error("line {line}: {reason}")]
    Interpolation { line: usize, reason: String },
    /// The text is not valid YAML or does not fit the config's shape. The
    /// message is already redacted and ends with the line and column.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or contradicts another one.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy listens on for integrations.
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`, `/usage`.
    pub admin_listen: SocketAddr,
    /// The Marketo instance and the API user the proxy calls it as.
    pub marketo: MarketoConfig,
    /// Limits of the whole instance, shared by every service.
    pub limits: LimitsConfig,
    /// The integrations allowed to call through the proxy; at least one.
    pub services: Vec<ServiceConfig>,
    /// Where the proxy keeps its counters.
    pub state: StateConfig,
    /// Client connections: caps and timeouts.
    pub server: ServerConfig,
    /// How the proxy's own tokens are made.
    pub auth: AuthConfig,
    /// While a read is queued or in flight, identical reads (same upstream
    /// API user, method, path, query and body) wait for its answer instead
    /// of spending calls of their own.
    pub coalesce_reads: bool,
    /// Reads whose answers are kept and served again for a while, by path
    /// pattern; none unless listed.
    pub cache: Vec<CacheRule>,
    /// Bytes the kept answers may take at most, keys included; the least
    /// recently used go first.
    pub cache_max_bytes: NonZeroUsize,
    /// Admission to Marketo's bulk extract and import queues.
    pub bulk: BulkConfig,
}

/// Marketo's bulk queues, shared by every service. The defaults are
/// Marketo's documented limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkConfig {
    /// Export jobs in the extract queue at once, processing ones included.
    pub extract_queue: NonZeroU32,
    /// Import jobs in the import queue at once, processing ones included.
    pub import_queue: NonZeroU32,
    /// Export file bytes (their `fileSize`) allowed a day.
    pub export_daily_bytes: NonZeroU64,
    /// A job in a queue not heard about for this long gets a status call
    /// from the proxy: no job is polled more often (Marketo updates a
    /// job's status once a minute at most).
    #[serde(with = "humantime_serde")]
    pub poll_after: Duration,
    /// At most one status or list call of the proxy's own per this, for
    /// all jobs together.
    #[serde(with = "humantime_serde")]
    pub poll_pace: Duration,
    /// After Marketo says a queue is full (jobs the proxy did not see),
    /// nothing more is enqueued there for this long, unless a job leaves.
    #[serde(with = "humantime_serde")]
    pub pause: Duration,
}

impl Default for BulkConfig {
    fn default() -> Self {
        Self {
            extract_queue: const { NonZeroU32::new(limits::BULK_QUEUE).expect("not zero") },
            import_queue: const { NonZeroU32::new(limits::BULK_QUEUE).expect("not zero") },
            export_daily_bytes: const { NonZeroU64::new(limits::EXPORT_DAILY_BYTES).expect("not zero") },
            poll_after: Duration::from_secs(60),
            poll_pace: Duration::from_secs(10),
            pause: Duration::from_secs(10),
        }
    }
}

/// The tokens the proxy issues at its `/identity/oauth/token`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A secret shared by the replicas (at least 32 characters, e.g.
    /// `openssl rand -hex 32`): tokens are derived from it, so any replica
    /// accepts any replica's. Unset: random tokens this process alone knows.
    pub token_key: Option<Secret>,
}

/// Reads of matching paths are answered from the cache for `ttl` after a
/// successful answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// A path under `/rest/` or `/bulk/`; `*` stands for any characters
    /// within one path segment (`/rest/asset/v1/folder/*.json`).
    pub path: String,
    /// How long an answer is served from the cache.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            marketo: MarketoConfig::default(),
            limits: LimitsConfig::default(),
            services: Vec::new(),
            state: StateConfig::default(),
            server: ServerConfig::default(),
            auth: AuthConfig::default(),
            coalesce_reads: true,
            cache: Vec::new(),
            cache_max_bytes: const { NonZeroUsize::new(64 * 1024 * 1024).expect("not zero") },
            bulk: BulkConfig::default(),
        }
    }
}

/// How client connections are held: no client, however it behaves, may
/// take the proxy's descriptors or memory from the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Open client connections on `listen`; past it, new connections wait
    /// in the kernel's accept queue until one closes.
    pub max_connections: NonZeroUsize,
    /// Open connections on `admin_listen`, kept apart so probes and
    /// scrapes always get through.
    pub admin_max_connections: NonZeroUsize,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/1.1 keep-alive and HTTP/2 alike); on HTTP/1.1 the next
    /// request's headers must be complete within it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// From accept to the first request's complete headers, whatever the
    /// client sends meanwhile.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Request-body bytes held across the proxy at once (bodies are kept
    /// whole so that a call can be replayed); past it a request gets 503
    /// (Marketo's 608) with `Retry-After` instead of being buffered.
    pub max_buffered_body_bytes: NonZeroUsize,
    /// The part of `max_buffered_body_bytes` for the bodies of requests
    /// whose caller is not known yet (a credential in a form or multipart
    /// body, client credentials at the identity endpoint); the rest is
    /// for callers already known. Default: a sixteenth.
    pub unauthenticated_body_bytes: Option<NonZeroUsize>,
    /// Such bodies read at once from one client address.
    pub unauthenticated_bodies_per_address: NonZeroUsize,
    /// A client that takes nothing of its answer for this long is
    /// disconnected, and the answer's spool freed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Bytes of Marketo's large answers kept in memory, all answers
    /// together, while their clients read them.
    pub spool_memory_bytes: NonZeroUsize,
    /// Bytes of them kept on disk, in `spool_dir`.
    pub spool_disk_bytes: NonZeroU64,
    /// Where the spool's files go (unlinked at once); the system's
    /// temporary directory by default.
    pub spool_dir: Option<std::path::PathBuf>,
}

impl ServerConfig {
    /// The bytes of bodies whose caller is not known yet, and of the rest.
    pub fn body_budgets(&self) -> (usize, usize) {
        let total = self.max_buffered_body_bytes.get();
        let unknown = self
            .unauthenticated_body_bytes
            .map_or(total / 16, NonZeroUsize::get)
            .min(total);
        (unknown, total - unknown)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: const { NonZeroUsize::new(10_000).expect("not zero") },
            admin_max_connections: const { NonZeroUsize::new(64).expect("not zero") },
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            http2_max_concurrent_streams: 256,
            max_buffered_body_bytes: const { NonZeroUsize::new(256 * 1024 * 1024).expect("not zero") },
            unauthenticated_body_bytes: None,
            unauthenticated_bodies_per_address: const { NonZeroUsize::new(4).expect("not zero") },
            send_timeout: Duration::from_secs(60),
            spool_memory_bytes: const { NonZeroUsize::new(64 * 1024 * 1024).expect("not zero") },
            spool_disk_bytes: const { NonZeroU64::new(1024 * 1024 * 1024).expect("not zero") },
            spool_dir: None,
        }
    }
}

/// The Marketo instance behind the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarketoConfig {
    /// Base URL of the REST API, e.g. `https://123-ABC-456.mktorest.com`. Required.
    pub base_url: BaseUrl,
    /// Client id of the Marketo API user the proxy calls as. Required.
    pub client_id: String,
    /// Client secret of that API user. Required.
    pub client_secret: Secret,
    /// How long to wait for a connection to Marketo.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for Marketo's answer to one call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Refresh an access token once less than this much of its life is left.
    #[serde(with = "humantime_serde")]
    pub token_refresh_before: Duration,
    /// A PEM bundle of CA certificates trusted besides the system's and the
    /// bundled roots: a private CA, or a TLS-inspecting egress gateway's.
    pub ca_file: Option<PathBuf>,
    /// An HTTP proxy to reach Marketo through (`http://[user:password@]host:port`),
    /// tunnelling with CONNECT. Unset: `HTTPS_PROXY` / `NO_PROXY` from the
    /// environment, as curl reads them.
    pub egress_proxy: Option<Secret>,
}

impl Default for MarketoConfig {
    fn default() -> Self {
        Self {
            base_url: BaseUrl::default(),
            client_id: String::new(),
            client_secret: Secret::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            token_refresh_before: Duration::from_secs(60),
            ca_file: None,
            egress_proxy: None,
        }
    }
}

/// Limits of the Marketo instance, shared by every service. The defaults
/// are Marketo's documented limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls allowed in any rolling `window`.
    pub window_calls: NonZeroU32,
    /// Length of the rolling window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Extra time a call keeps its window slot, for clock and network slack.
    #[serde(with = "humantime_serde")]
    pub safety_margin: Duration,
    /// Calls in flight at once.
    pub concurrency: NonZeroU32,
    /// Calls allowed per day.
    pub daily_quota: NonZeroU64,
    /// The daily quota resets at midnight in this zone.
    pub timezone: chrono_tz::Tz,
    /// Longest a request may wait for admission before it is refused.
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// Most requests waiting for admission at once, over all services.
    pub max_queue_length: NonZeroUsize,
    /// After Marketo says the day's quota is spent (607), how long before
    /// one call probes whether it really is (its reset may come a little
    /// after ours).
    #[serde(with = "humantime_serde")]
    pub quota_probe_interval: Duration,
    /// `enforce` queues and refuses calls to keep within the limits;
    /// `observe` forwards every call at once and only counts which ones
    /// would have waited or been refused.
    pub mode: LimitsMode,
    /// Every answer to a known service carries `RateLimit-Policy` and
    /// `RateLimit` fields: what it has left of the window and the day.
    pub ratelimit_headers: bool,
    /// A window slot counts from when Marketo's clock (in each answer's
    /// `requestId`) says it took the call, when that is earlier than the
    /// answer and provably safe (see `admission::marketo_clock`).
    pub marketo_clock: bool,
}

/// Whether the limits are enforced or only watched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsMode {
    /// Calls wait in their service's queue, or are refused, to stay within
    /// the limits.
    #[default]
    Enforce,
    /// Calls go at once; what `enforce` would have done is counted.
    Observe,
}

// The `const` blocks below are evaluated when the crate compiles, so the
// `expect`s cannot fire at run time.
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            window_calls: const { NonZeroU32::new(limits::WINDOW_CALLS).expect("not zero") },
            window: limits::WINDOW,
            safety_margin: Duration::from_millis(250),
            concurrency: const { NonZeroU32::new(limits::CONCURRENCY).expect("not zero") },
            daily_quota: const { NonZeroU64::new(limits::DAILY_QUOTA).expect("not zero") },
            timezone: chrono_tz::America::Chicago,
            max_queue_wait: Duration::from_secs(30),
            max_queue_length: const { NonZeroUsize::new(10_000).expect("not zero") },
            quota_probe_interval: Duration::from_secs(5 * 60),
            mode: LimitsMode::Enforce,
            ratelimit_headers: true,
            marketo_clock: true,
        }
    }
}

/// One integration that calls Marketo through the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Unique name, `[a-z0-9_-]+`; it labels this service's metrics.
    pub name: String,
    /// Key the service sends as `X-Api-Key` or `Authorization: Bearer`.
    pub api_key: Option<Secret>,
    /// Client id the service presents to the proxy's `/identity/oauth/token`.
    pub client_id: Option<String>,
    /// Client secret that goes with `client_id`.
    pub client_secret: Option<Secret>,
    /// Share of the window this service gets when services compete.
    pub weight: NonZeroU32,
    /// Cap on this service's calls per window; at most `limits.window_calls`.
    pub window_calls: Option<NonZeroU32>,
    /// Cap on this service's calls in flight; at most `limits.concurrency`.
    pub concurrency: Option<NonZeroU32>,
    /// Cap on this service's calls per day; at most `limits.daily_quota`.
    pub daily_quota: Option<NonZeroU64>,
    /// Daily calls kept free for this service, whatever the others do.
    pub reserved_daily: u64,
    /// Longest this service's requests wait; defaults to `limits.max_queue_wait`.
    #[serde(with = "humantime_serde::option")]
    pub max_queue_wait: Option<Duration>,
    /// Own Marketo API user, so Marketo's usage report shows this service apart.
    pub marketo: Option<UpstreamCredential>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            api_key: None,
            client_id: None,
            client_secret: None,
            weight: NonZeroU32::MIN,
            window_calls: None,
            concurrency: None,
            daily_quota: None,
            reserved_daily: 0,
            max_queue_wait: None,
            marketo: None,
        }
    }
}

impl ServiceConfig {
    /// Calls per window this service may make: its cap, else the instance's.
    pub fn effective_window_calls(&self, limits: &LimitsConfig) -> NonZeroU32 {
        self.window_calls.unwrap_or(limits.window_calls)
    }

    /// Calls this service may have in flight: its cap, else the instance's.
    pub fn effective_concurrency(&self, limits: &LimitsConfig) -> NonZeroU32 {
        self.concurrency.unwrap_or(limits.concurrency)
    }

    /// Calls per day this service may make: its cap, else the instance's.
    pub fn effective_daily_quota(&self, limits: &LimitsConfig) -> NonZeroU64 {
        self.daily_quota.unwrap_or(limits.daily_quota)
    }

    /// Longest this service's requests wait: its own, else the instance's.
    pub fn effective_max_queue_wait(&self, limits: &LimitsConfig) -> Duration {
        self.max_queue_wait.unwrap_or(limits.max_queue_wait)
    }
}

/// A Marketo API user's client credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamCredential {
    /// Client id of the API user's LaunchPoint service.
    pub client_id: String,
    /// Client secret of that service.
    pub client_secret: Secret,
}

/// Where counters live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process; daily counts survive restarts through `state.file`.
    #[default]
    Memory,
    /// In Redis, shared by every replica in front of the same instance.
    Redis,
}

/// How the proxy keeps its counters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Where the window, concurrency and daily counters live.
    pub backend: Backend,
    /// File the memory backend saves daily counts to; `~` saves nothing.
    pub file: Option<PathBuf>,
    /// Redis connection; required when `backend` is `redis`.
    pub redis: Option<RedisConfig>,
    /// How often to reconcile daily counts with Marketo's usage API; `0s`
    /// turns it off.
    #[serde(with = "humantime_serde")]
    pub usage_sync_interval: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            file: Some(PathBuf::from("./marketo-proxy-state.json")),
            redis: None,
            usage_sync_interval: Duration::from_secs(5 * 60),
        }
    }
}

/// The Redis that replicas share limits through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS) or `unix://` URL; may hold an ACL
    /// user and password (`rediss://user:password@host:6380`).
    pub url: Secret,
    /// For `rediss://`: a PEM bundle of the CAs Redis's certificate may
    /// chain to, instead of the bundled webpki roots (managed Redis with a
    /// per-instance CA, such as Memorystore's).
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key; one per Marketo instance.
    pub key_prefix: String,
    /// While Redis is unreachable, each replica uses the limits divided by this.
    pub fallback_replicas: NonZeroU32,
    /// A call's concurrency lease lasts this long unless renewed (every
    /// third of it while the call runs), so a crashed replica's calls stop
    /// counting after at most this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

// `const`: checked when the crate compiles, like the limits above.
impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            ca_file: None,
            key_prefix: "marketo-proxy".to_owned(),
            fallback_replicas: const { NonZeroU32::new(2).expect("not zero") },
            lease: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Every name calls are counted under: the services in order, then the
    /// proxy's own ([`INTERNAL_SERVICE`]).
    pub fn counted_names(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|service| service.name.clone())
            .chain(std::iter::once(INTERNAL_SERVICE.to_owned()))
            .collect()
    }

    /// Reads, interpolates from the process environment, parses and
    /// validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with `env` standing in for the process environment.
    pub fn load_with_env(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml_with_env(&text, env)
    }

    /// Interpolates from the process environment, parses and validates.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(text, |name| std::env::var(name).ok())
    }

    /// [`Config::from_yaml`] with `env` standing in for the process
    /// environment, so tests need not touch it.
    pub fn from_yaml_with_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let expanded = interpolate::expand(text, env)?;
        let config: Self = serde_yaml_ng::from_str(&expanded.text)
            .map_err(|err| ConfigError::Parse(expanded.redact_yaml_error(&err)))?;
        config.validate().map_err(|err| expanded.redact_error(err))
    }

    /// Checks the rules one field's type cannot express: required values,
    /// unique names and credentials, service caps within instance limits.
    pub fn validate(self) -> Result<Self, ConfigError> {
        validate::check(&self)?;
        Ok(self)
    }

    /// What this valid config may still get wrong.
    pub fn warnings(&self) -> Vec<String> {
        validate::warnings(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
marketo:
  base_url: https://123-ABC-456.mktorest.com
  client_id: proxy
  client_secret: proxy-secret
services:
  - name: crm-sync
    api_key: crm-key-0123456789abcd
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_with_env(text, |_| None)
    }

    #[test]
    fn minimal_config_gets_marketo_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.marketo.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.marketo.request_timeout, Duration::from_secs(60));
        assert_eq!(config.marketo.token_refresh_before, Duration::from_secs(60));
        let limits = &config.limits;
        assert_eq!(limits.window_calls.get(), 100);
        assert_eq!(limits.window, Duration::from_secs(20));
        assert_eq!(limits.safety_margin, Duration::from_millis(250));
        assert_eq!(limits.concurrency.get(), 10);
        assert_eq!(limits.daily_quota.get(), 50_000);
        assert_eq!(limits.timezone, chrono_tz::America::Chicago);
        assert_eq!(limits.max_queue_wait, Duration::from_secs(30));
        assert_eq!(limits.max_queue_length.get(), 10_000);
        let service = &config.services[0];
        assert_eq!(service.weight.get(), 1);
        assert_eq!(service.reserved_daily, 0);
        assert!(service.client_id.is_none() && service.marketo.is_none());
        assert_eq!(config.state.backend, Backend::Memory);
        assert_eq!(
            config.state.file.as_deref(),
            Some(Path::new("./marketo-proxy-state.json"))
        );
        assert_eq!(config.state.usage_sync_interval, Duration::from_secs(300));
    }

    #[test]
    fn redis_defaults_fill_a_partial_block() {
        let text = format!("{MINIMAL}state:\n  backend: redis\n  redis:\n    url: redis://r:6379\n");
        let redis = parse(&text).unwrap().state.redis.unwrap();
        assert_eq!(redis.key_prefix, "marketo-proxy");
        assert_eq!(redis.fallback_replicas.get(), 2);
    }

    #[test]
    fn durations_read_humantime_strings() {
        let text = format!(
            "{MINIMAL}    max_queue_wait: 1h\nlimits:\n  window: 20s\n  safety_margin: 250ms\n  max_queue_wait: 1m 30s\nstate:\n  usage_sync_interval: 5m\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.limits.safety_margin, Duration::from_millis(250));
        assert_eq!(config.limits.max_queue_wait, Duration::from_secs(90));
        assert_eq!(config.state.usage_sync_interval, Duration::from_secs(300));
        assert_eq!(config.services[0].max_queue_wait, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn a_duration_without_unit_is_refused() {
        let text = format!("{MINIMAL}limits:\n  window: 20\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("limits.window: "), "{err}");
        assert!(err.contains("line 10"), "{err}");
    }

    #[test]
    fn bad_base_url_is_named_by_its_key() {
        let text = MINIMAL.replace("https://", "ftp://");
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "marketo.base_url: must start with http:// or https:// at line 3 column 13"
        );
    }

    #[test]
    fn state_file_tilde_means_no_file() {
        let text = format!("{MINIMAL}state:\n  file: ~\n");
        assert_eq!(parse(&text).unwrap().state.file, None);
    }

    #[test]
    fn unknown_timezone_is_refused() {
        let text = format!("{MINIMAL}limits:\n  timezone: America/Chicag\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("limits.timezone: "), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = format!("{MINIMAL}    wieght: 2\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("services[0]: unknown field `wieght`"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn service_falls_back_to_instance_limits() {
        let mut config = parse(MINIMAL).unwrap();
        let limits = config.limits.clone();
        let service = &mut config.services[0];
        assert_eq!(service.effective_max_queue_wait(&limits), limits.max_queue_wait);
        assert_eq!(service.effective_window_calls(&limits), limits.window_calls);
        assert_eq!(service.effective_concurrency(&limits), limits.concurrency);
        assert_eq!(service.effective_daily_quota(&limits), limits.daily_quota);
        service.max_queue_wait = Some(Duration::from_secs(3));
        service.concurrency = NonZeroU32::new(2);
        assert_eq!(service.effective_max_queue_wait(&limits), Duration::from_secs(3));
        assert_eq!(service.effective_concurrency(&limits).get(), 2);
    }

    #[test]
    fn reads_and_modes_default_to_coalescing_enforcing_and_no_cache() {
        let config = parse(MINIMAL).unwrap();
        assert!(config.coalesce_reads && config.cache.is_empty());
        assert_eq!(config.cache_max_bytes.get(), 64 * 1024 * 1024);
        assert_eq!(config.limits.mode, LimitsMode::Enforce);
        assert!(config.limits.ratelimit_headers);
        let text = format!(
            "{MINIMAL}limits: {{ mode: observe, ratelimit_headers: false }}\ncache: [{{ path: /rest/v1/leads/describe.json, ttl: 1h }}]\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.limits.mode, LimitsMode::Observe);
        assert!(!config.limits.ratelimit_headers);
        assert_eq!(config.cache[0].ttl, Duration::from_secs(3600));
    }

    #[test]
    fn cache_paths_must_be_forwarded_paths_with_a_ttl() {
        for (rule, key) in [
            ("{ path: /identity/oauth/token, ttl: 1h }", "cache[0].path: "),
            ("{ path: '/rest/v1/leads.json?x=1', ttl: 1h }", "cache[0].path: "),
            ("{ path: /rest/v1/leads.json, ttl: 0s }", "cache[0].ttl: "),
        ] {
            let err = parse(&format!("{MINIMAL}cache: [{rule}]\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{rule}: {err}");
        }
    }

    #[test]
    fn demo_config_is_valid() {
        let config = parse(DEMO_CONFIG).unwrap();
        assert!(!config.marketo.base_url.is_https());
        assert!(config.services.iter().any(|s| s.api_key.is_some()));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Path::new("/nonexistent/marketo-proxy.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
