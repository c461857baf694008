//! The upstream access token, one cache per Marketo credential.
//!
//! Marketo hands back the same token until it expires, with its remaining
//! lifetime (which can be 0). The cache asks for a token once, keeps it
//! with its expiry, refreshes it in the background before it runs out, and
//! lets exactly one identity call run at a time however many requests are
//! waiting (single-flight). After a 601/602 the caller reports the token
//! it used as refused, and only that one is dropped.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::Full;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Config, UpstreamCredential};
use crate::marketo::TokenAnswer;
use crate::metrics::Metrics;
use crate::upstream::{AnswerBody, Upstream, UpstreamError};

/// How often to ask again when Marketo answers `expires_in: 0`.
const ZERO_LIFETIME_RETRY: Duration = Duration::from_millis(500);
/// A token with no more than this left was answered with `expires_in: 0`
/// (`fetch_once` adds a second for Marketo's rounding).
const END_OF_LIFE: Duration = Duration::from_secs(1);
/// Attempts per refresh before callers get an error.
const MAX_ATTEMPTS: u32 = 3;
/// First pause between failed identity calls; doubles up to the maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("Marketo rejected the client credentials (HTTP {0})")]
    Rejected(u16),
    #[error("the identity service answered HTTP {0}")]
    Unavailable(u16),
    #[error("the identity service is unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake failed (usually Marketo's certificate was not
    /// trusted): asking again at once would fail the same way.
    #[error("the identity service is unreachable: {0}")]
    Tls(String),
    #[error("the identity answer was not understood")]
    Malformed,
    #[error("the token kept expiring on arrival")]
    NoLifetime,
}

/// A token and when it stops working.
#[derive(Clone)]
pub struct Token {
    /// `Bearer ...`, marked sensitive so it never shows in debug output.
    pub header: HeaderValue,
    pub expires_at: Instant,
}

impl Token {
    fn is_fresh(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

/// Identity state for one credential.
pub struct TokenCache {
    upstream: Upstream,
    credential: UpstreamCredential,
    refresh_before: Duration,
    current: RwLock<Option<Token>>,
    /// The token Marketo last refused (601/602), if any: handed back again
    /// with no life left, it is at the very end of its life.
    refused: RwLock<Option<HeaderValue>>,
    last_error: RwLock<Option<TokenError>>,
    /// The last identity failure and when it was, kept after a success
    /// (for the status page).
    last_failure: RwLock<Option<(TokenError, Instant)>>,
    /// When Marketo last refused the credentials, or its certificate was
    /// refused: asking again at once for every request would not change
    /// either.
    rejected_at: RwLock<Option<Instant>>,
    refreshing: Mutex<()>,
    /// Refreshes completed, successful or not: a caller that waited for
    /// the lock while one finished takes its result instead of asking
    /// Marketo again.
    completed: AtomicU64,
    /// A token was held at some point (for readiness across a refresh).
    ever_held: AtomicBool,
    metrics: Metrics,
}

/// Every upstream credential's token cache, the instance's own first, and
/// which one each service calls with.
pub struct TokenCaches {
    caches: Vec<Arc<TokenCache>>,
    /// Service → index into `caches`; services without a credential of
    /// their own (and the proxy itself) use the instance's.
    by_service: Vec<usize>,
}

impl TokenCaches {
    pub fn new(config: &Config, upstream: &Upstream, metrics: &Metrics) -> Self {
        let refresh_before = config.marketo.token_refresh_before;
        let cache = |credential: UpstreamCredential| {
            TokenCache::new(upstream.clone(), credential, refresh_before, metrics.clone())
        };
        let mut caches = vec![cache(UpstreamCredential {
            client_id: config.marketo.client_id.clone(),
            client_secret: config.marketo.client_secret.clone(),
        })];
        let mut by_service = Vec::with_capacity(config.services.len());
        for service in &config.services {
            match &service.marketo {
                Some(credential) => {
                    caches.push(cache(credential.clone()));
                    by_service.push(caches.len() - 1);
                }
                None => by_service.push(0),
            }
        }
        Self { caches, by_service }
    }

    /// The cache `service` calls with.
    pub fn for_service(&self, service: usize) -> &Arc<TokenCache> {
        let index = self.by_service.get(service).copied().unwrap_or(0);
        &self.caches[index.min(self.caches.len() - 1)]
    }

    /// Service → the index of the upstream credential (API user) it calls
    /// as, in configuration order.
    pub fn users(&self) -> Vec<usize> {
        self.by_service.clone()
    }

    /// Every cache, the instance's own first.
    pub fn all(&self) -> &[Arc<TokenCache>] {
        &self.caches
    }
}

/// How long a refusal of the credentials is remembered.
const REJECTION_MEMORY: Duration = Duration::from_secs(5);

impl TokenCache {
    pub fn new(
        upstream: Upstream,
        credential: UpstreamCredential,
        refresh_before: Duration,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            credential,
            refresh_before,
            current: RwLock::new(None),
            refused: RwLock::new(None),
            last_error: RwLock::new(None),
            last_failure: RwLock::new(None),
            rejected_at: RwLock::new(None),
            refreshing: Mutex::new(()),
            completed: AtomicU64::new(0),
            ever_held: AtomicBool::new(false),
            metrics,
        })
    }

    /// A usable token: the cached one, or a fresh one when there is none.
    pub async fn get(&self) -> Result<Token, TokenError> {
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        self.refresh().await
    }

    /// Marketo said 601/602 for `failed`: it is dropped if it is still the
    /// cached token, and the next [`get`] asks for another, with one
    /// identity call however many callers saw the same failure.
    ///
    /// [`get`]: Self::get
    pub fn refused(&self, failed: &Token) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current
            .as_ref()
            .is_some_and(|token| token.header == failed.header)
        {
            *current = None;
        }
        write(&self.refused, Some(failed.header.clone()));
    }

    /// The cached token if it has not expired.
    pub fn cached(&self) -> Option<Token> {
        let now = Instant::now();
        read(&self.current).filter(|token| token.is_fresh(now))
    }

    /// The last identity failure, cleared by the next success.
    pub fn last_error(&self) -> Option<TokenError> {
        read(&self.last_error)
    }

    /// The last identity failure and when it happened, even if a token
    /// was had since.
    pub fn last_failure(&self) -> Option<(TokenError, Instant)> {
        read(&self.last_failure)
    }

    /// Ready to serve: a token is held, or was until a moment ago and the
    /// refresh in progress has not failed.
    pub fn is_ready(&self) -> bool {
        self.cached().is_some() || (self.ever_held.load(Ordering::Relaxed) && self.last_error().is_none())
    }

    /// Single-flight refresh. Whoever holds the lock fetches; everyone else
    /// waits for it and then uses what it stored.
    async fn refresh(&self) -> Result<Token, TokenError> {
        let seen = self.completed.load(Ordering::Acquire);
        let _flight = self.refreshing.lock().await;
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let failed = read(&self.refused);
        let failed = failed.as_ref();
        // A refresh finished while we waited and left no usable token: its
        // failure is ours too, rather than one more identity call each.
        if self.completed.load(Ordering::Acquire) != seen {
            if let Some(error) = self.last_error() {
                return Err(error);
            }
        }
        if let Some(error) = self.remembered_refusal() {
            return Err(error);
        }
        let result = self.fetch_with_retries(failed).await;
        self.completed.fetch_add(1, Ordering::AcqRel);
        match &result {
            Ok(token) => self.store(token.clone()),
            Err(error) => {
                if matches!(error, TokenError::Rejected(_) | TokenError::Tls(_)) {
                    write(&self.rejected_at, Some(Instant::now()));
                }
                self.failed(error.clone());
            }
        }
        result
    }

    /// The refusal (of the credentials, or of Marketo's certificate) seen
    /// less than [`REJECTION_MEMORY`] ago, if any.
    fn remembered_refusal(&self) -> Option<TokenError> {
        let recent = read(&self.rejected_at)
            .is_some_and(|at| Instant::now().saturating_duration_since(at) < REJECTION_MEMORY);
        match self.last_error() {
            Some(error @ (TokenError::Rejected(_) | TokenError::Tls(_))) if recent => Some(error),
            _ => None,
        }
    }

    fn failed(&self, error: TokenError) {
        write(&self.last_failure, Some((error.clone(), Instant::now())));
        write(&self.last_error, Some(error));
    }

    fn store(&self, token: Token) {
        self.ever_held.store(true, Ordering::Relaxed);
        write(&self.current, Some(token));
        write(&self.last_error, None);
        write(&self.rejected_at, None);
    }

    /// Fetches until a usable token comes back. A token Marketo just
    /// refused (`failed`) that comes back again with no life left is at the
    /// very end of its life: wait a moment for Marketo to issue the next
    /// one. If it comes back with life left, Marketo still stands by it
    /// (the refusal was spurious): use it again.
    async fn fetch_with_retries(&self, failed: Option<&HeaderValue>) -> Result<Token, TokenError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let result = self.fetch().await;
            match result {
                Ok(token)
                    if failed.is_some_and(|failed| *failed == token.header)
                        && token.expires_at <= Instant::now() + END_OF_LIFE =>
                {
                    if attempt >= MAX_ATTEMPTS * 2 {
                        return Err(TokenError::NoLifetime);
                    }
                    tokio::time::sleep(ZERO_LIFETIME_RETRY).await;
                }
                Ok(token) => return Ok(token),
                // Wrong credentials or an untrusted certificate do not get
                // better by asking again.
                Err(error @ (TokenError::Rejected(_) | TokenError::Tls(_))) => return Err(error),
                Err(error) if attempt >= MAX_ATTEMPTS => return Err(error),
                Err(error) => {
                    tracing::warn!(client_id = %self.credential.client_id, %error, "identity call failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            attempt += 1;
        }
    }

    /// One identity call. The secret travels in a form body, not the URL,
    /// so it stays out of access logs along the way.
    async fn fetch(&self) -> Result<Token, TokenError> {
        let result = self.fetch_once().await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TokenError::Rejected(_)) => "rejected",
            Err(_) => "error",
        };
        self.metrics.token_refreshes.with_label_values(&[outcome]).inc();
        result
    }

    async fn fetch_once(&self) -> Result<Token, TokenError> {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.credential.client_id)
            .append_pair("client_secret", self.credential.client_secret.expose())
            .finish();
        let uri = self
            .upstream
            .uri("/identity/oauth/token")
            .map_err(|error| TokenError::Unreachable(error.to_string()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|_| TokenError::Malformed)?;
        let asked_at = Instant::now();
        let answer = self.upstream.send(request).await.map_err(|error| match error {
            UpstreamError::Timeout(_) => TokenError::Unreachable("timed out".into()),
            UpstreamError::Connect(failure) if failure.tls => TokenError::Tls(failure.reason),
            other => TokenError::Unreachable(other.to_string()),
        })?;
        let status = answer.head.status;
        if status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            || status == StatusCode::BAD_REQUEST
        {
            return Err(TokenError::Rejected(status.as_u16()));
        }
        if !status.is_success() {
            return Err(TokenError::Unavailable(status.as_u16()));
        }
        let AnswerBody::Whole(body) = answer.body else {
            return Err(TokenError::Malformed);
        };
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| TokenError::Malformed)?;
        let mut header = HeaderValue::try_from(format!("Bearer {}", answer.access_token))
            .map_err(|_| TokenError::Malformed)?;
        header.set_sensitive(true);
        // `expires_in` is rounded down to whole seconds, so the token lives
        // up to a second longer; counting from when we asked covers the
        // time the answer took. A call that still meets an expired token
        // gets 602 and is replayed with the next one.
        let expires_at = asked_at + Duration::from_secs(answer.expires_in) + Duration::from_secs(1);
        self.metrics.token_expiry_seconds.set(answer.expires_in as f64);
        tracing::info!(client_id = %self.credential.client_id, expires_in = answer.expires_in, "access token fetched");
        Ok(Token { header, expires_at })
    }

    /// Keeps the token fresh so that steady traffic does not wait on the
    /// identity call. When less than `refresh_before` is left it asks
    /// again: a new token (revoked or reissued) replaces the old one at
    /// once; the same token (Marketo's rule) comes with its exact
    /// remaining life, and the next ask is made the moment it ends.
    /// Runs while it is polled, or until the cache is dropped.
    pub fn refresher(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let cache = Arc::downgrade(self);
        async move {
            let mut backoff = FIRST_BACKOFF;
            // The token whose remaining life was confirmed; it is not asked
            // about again before it ends.
            let mut confirmed: Option<HeaderValue> = None;
            loop {
                let Some(this) = cache.upgrade() else { return };
                let wake_at = match this.cached() {
                    Some(token) if confirmed.as_ref() == Some(&token.header) => token.expires_at,
                    Some(token) => token
                        .expires_at
                        .checked_sub(this.refresh_before)
                        .unwrap_or_else(Instant::now),
                    None => Instant::now(),
                };
                drop(this);
                tokio::time::sleep_until(wake_at).await;
                let Some(this) = cache.upgrade() else { return };
                let flight = this.refreshing.lock().await;
                let before = this.cached();
                let due = before.as_ref().is_none_or(|token| {
                    let left = token.expires_at.saturating_duration_since(Instant::now());
                    left <= this.refresh_before && confirmed.as_ref() != Some(&token.header)
                });
                if !due {
                    continue;
                }
                if this.remembered_refusal().is_some() {
                    // A caller was just refused: asking again now would be too.
                    drop(flight);
                    drop(this);
                    tokio::time::sleep(REJECTION_MEMORY).await;
                    continue;
                }
                // One attempt, not a full retry cycle: callers waiting
                // meanwhile make their own rather than inherit its failure.
                let fetched = this.fetch().await;
                match fetched {
                    Ok(mut token) => {
                        let same = before.as_ref().filter(|before| before.header == token.header);
                        if let Some(before) = same {
                            // Both expiries are upper bounds (whole seconds
                            // rounded down, plus one): the earlier is closer.
                            token.expires_at = token.expires_at.min(before.expires_at);
                        }
                        confirmed = same.map(|_| token.header.clone());
                        this.store(token);
                        backoff = FIRST_BACKOFF;
                    }
                    Err(error) => {
                        tracing::warn!(client_id = %this.credential.client_id, %error, "background token refresh failed");
                        if matches!(error, TokenError::Rejected(_) | TokenError::Tls(_)) {
                            // Callers meanwhile get this answer too, and
                            // the next ask waits as long as they do.
                            write(&this.rejected_at, Some(Instant::now()));
                            backoff = backoff.max(REJECTION_MEMORY);
                        }
                        this.failed(error);
                        drop(flight);
                        drop(this);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}

fn read<T: Clone>(lock: &RwLock<Option<T>>) -> Option<T> {
    lock.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

fn write<T>(lock: &RwLock<Option<T>>, value: Option<T>) {
    *lock.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
}

#[cfg(test)]
mod tests {
    //! The cache against a simulated Marketo on an ephemeral port: real
    //! sockets, so real time; short token lifetimes stand in for the hour.

    use std::time::Duration;

    use futures_util::future::join_all;
    use tokio::time::Instant;

    use super::*;
    use crate::marketo::limits::TOKEN_TTL;
    use crate::sim::{Faults, SimClient, SimConfig, SimHandle, Simulator};

    const DEMO_SECRET: &str = "demo-secret";
    const WAREHOUSE_ID: &str = "warehouse-client";
    const WAREHOUSE_SECRET: &str = "warehouse-secret";

    /// A simulator whose tokens live `token_ttl`, with the demo API user
    /// and the warehouse's.
    async fn simulator(token_ttl: Duration) -> SimHandle {
        Simulator::spawn(SimConfig {
            token_ttl,
            latency: Duration::ZERO,
            clients: vec![
                SimClient::demo(),
                SimClient {
                    client_id: WAREHOUSE_ID.into(),
                    client_secret: WAREHOUSE_SECRET.into(),
                    user: "warehouse@example.com".into(),
                },
            ],
            ..SimConfig::default()
        })
        .await
        .expect("the simulator starts")
    }

    /// The caches of a config calling `sim` as the demo user with
    /// `secret`: `crm` with the instance's credential, `warehouse` with its
    /// own.
    fn caches(sim: &SimHandle, secret: &str, refresh_before: &str) -> (TokenCaches, Metrics) {
        let yaml = format!(
            "marketo: {{ base_url: '{}', client_id: demo-client, client_secret: {secret}, \
             token_refresh_before: {refresh_before} }}\n\
             services:\n\
             - {{ name: crm, api_key: key-crm-1234567890abcd }}\n\
             - {{ name: warehouse, api_key: key-warehouse-1234567890, \
             marketo: {{ client_id: {WAREHOUSE_ID}, client_secret: {WAREHOUSE_SECRET} }} }}\n\
             state: {{ file: ~ }}",
            sim.url()
        );
        let config = Config::from_yaml_with_env(&yaml, |_| None).expect("test config is valid");
        let upstream = Upstream::new(&config.marketo).expect("the upstream client builds");
        let metrics = Metrics::new();
        (TokenCaches::new(&config, &upstream, &metrics), metrics)
    }

    /// The instance's cache, calling `sim` as the demo user with `secret`.
    fn cache(sim: &SimHandle, secret: &str, refresh_before: &str) -> (Arc<TokenCache>, Metrics) {
        let (caches, metrics) = caches(sim, secret, refresh_before);
        (Arc::clone(caches.for_service(0)), metrics)
    }

    fn identity_calls(sim: &SimHandle) -> u64 {
        sim.stats().identity_calls
    }

    fn has_line(metrics: &Metrics, line: &str) -> bool {
        metrics.render().lines().any(|metric| metric == line)
    }

    /// Polls `check` until it gives a value; fails once `deadline` passes.
    async fn eventually<T>(deadline: Instant, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: not by the deadline");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_identity_call_serves_concurrent_requests() {
        let sim = simulator(TOKEN_TTL).await;
        let (cache, metrics) = cache(&sim, DEMO_SECRET, "60s");
        let tokens = join_all((0..20).map(|_| cache.get())).await;
        let first = tokens[0].as_ref().expect("a token").header.clone();
        for token in &tokens {
            assert_eq!(token.as_ref().expect("a token").header, first);
        }
        assert!(first.is_sensitive());
        assert_eq!(identity_calls(&sim), 1);
        assert!(
            has_line(&metrics, r#"marketo_proxy_token_refreshes_total{result="ok"} 1"#),
            "{}",
            metrics.render()
        );
    }

    #[tokio::test]
    async fn callers_waiting_on_a_failed_refresh_share_its_error() {
        let sim = simulator(TOKEN_TTL).await;
        sim.inject(Faults {
            identity_fail_next: MAX_ATTEMPTS,
            ..Faults::default()
        });
        let (cache, _) = cache(&sim, DEMO_SECRET, "60s");
        let results = join_all((0..8).map(|_| cache.get())).await;
        for result in results {
            assert!(
                matches!(result, Err(TokenError::Unavailable(503))),
                "{:?}",
                result.err()
            );
        }
        assert_eq!(
            identity_calls(&sim),
            u64::from(MAX_ATTEMPTS),
            "one caller's attempts, not one set per caller"
        );
    }

    #[tokio::test]
    async fn the_same_token_is_handed_back_until_it_expires() {
        const TTL: Duration = Duration::from_secs(2);
        let sim = simulator(TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "1s");
        let asked = Instant::now();
        let first = cache.get().await.expect("a token");
        let received = Instant::now();
        // Marketo says a second less than the lifetime (rounded down); the
        // cache adds that second back, counted from when it asked.
        assert!(
            first.expires_at >= asked + TTL && first.expires_at <= received + TTL,
            "expires {:?} after asking",
            first.expires_at - asked
        );
        for _ in 0..5 {
            assert_eq!(cache.get().await.expect("a token").header, first.header);
        }
        assert_eq!(identity_calls(&sim), 1);
        // The simulator issued it before `received`, so it has expired
        // there and here by then.
        tokio::time::sleep_until(received + TTL).await;
        assert!(cache.cached().is_none(), "an expired token is not handed out");
        let second = cache.get().await.expect("a token");
        assert_ne!(second.header, first.header);
        assert_eq!(identity_calls(&sim), 2);
    }

    #[tokio::test]
    async fn the_refresher_asks_ahead_of_expiry_and_fetches_the_next_token_when_it_ends() {
        const TTL: Duration = Duration::from_secs(3);
        let sim = simulator(TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "2s");
        let first = cache.get().await.expect("a token");
        let refresher = tokio::spawn(cache.refresher());
        // Two seconds before the end it asks, and Marketo hands back the same
        // token with what is left of its life.
        eventually(first.expires_at, "an identity call ahead of expiry", || {
            (identity_calls(&sim) >= 2).then_some(())
        })
        .await;
        let cached = cache.cached().expect("still held");
        assert_eq!(cached.header, first.header);
        assert!(
            cached.expires_at <= first.expires_at,
            "the earlier of the two expiries is kept"
        );
        // When it ends, the next one is fetched without anyone asking.
        let next = eventually(
            first.expires_at + Duration::from_secs(3),
            "the next token",
            || cache.cached().filter(|token| token.header != first.header),
        )
        .await;
        let calls = identity_calls(&sim);
        assert_eq!(cache.get().await.expect("a token").header, next.header);
        assert_eq!(identity_calls(&sim), calls, "callers are served from the cache");
        refresher.abort();
    }

    #[tokio::test]
    async fn refused_drops_only_that_token_and_one_identity_call_replaces_it() {
        let sim = simulator(TOKEN_TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "60s");
        let first = cache.get().await.expect("a token");
        sim.inject(Faults {
            revoke_tokens: true,
            ..Faults::default()
        });
        // Every call in flight with it meets 601.
        for _ in 0..5 {
            cache.refused(&first);
        }
        assert!(cache.cached().is_none());
        let tokens = join_all((0..5).map(|_| cache.get())).await;
        let second = tokens[0].as_ref().expect("a token").header.clone();
        assert_ne!(second, first.header);
        assert!(
            tokens
                .iter()
                .all(|token| token.as_ref().is_ok_and(|token| token.header == second))
        );
        assert_eq!(identity_calls(&sim), 2);
        // A late 601 for a call made with the old token leaves the new one.
        cache.refused(&first);
        assert_eq!(cache.cached().map(|token| token.header), Some(second.clone()));
        assert_eq!(cache.get().await.expect("a token").header, second);
        assert_eq!(identity_calls(&sim), 2);
    }

    #[tokio::test]
    async fn a_refused_token_marketo_still_stands_by_is_used_again() {
        let sim = simulator(TOKEN_TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "60s");
        let first = cache.get().await.expect("a token");
        cache.refused(&first);
        let again = cache.get().await.expect("a token");
        assert_eq!(
            again.header, first.header,
            "handed back with life left, it is good"
        );
        assert!(again.expires_at > Instant::now() + Duration::from_secs(60));
        assert_eq!(identity_calls(&sim), 2);
    }

    #[tokio::test]
    async fn a_refused_token_handed_back_with_no_life_left_is_waited_out() {
        const TTL: Duration = Duration::from_secs(2);
        let sim = simulator(TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "1s");
        let first = cache.get().await.expect("a token");
        let received = Instant::now();
        // Less than a second of its life is left at the simulator from now
        // on: asked about it, it says `expires_in: 0`.
        tokio::time::sleep_until(received + Duration::from_secs(1)).await;
        cache.refused(&first);
        let next = cache.get().await.expect("a token");
        assert_ne!(
            next.header, first.header,
            "the dying token is not handed out again"
        );
        assert!(next.expires_at > Instant::now() + Duration::from_millis(500));
        let calls = identity_calls(&sim);
        assert!(
            calls >= 3,
            "the first token, at least one answer with no life left, the next token: {calls}"
        );
    }

    #[tokio::test]
    async fn bad_credentials_are_rejected_once_and_remembered() {
        let sim = simulator(TOKEN_TTL).await;
        let (cache, metrics) = cache(&sim, "wrong-secret", "60s");
        assert!(!cache.is_ready());
        let error = cache.get().await.err().expect("wrong credentials");
        assert!(matches!(error, TokenError::Rejected(401)), "{error:?}");
        assert_eq!(identity_calls(&sim), 1, "asking again would not help");
        assert!(matches!(cache.last_error(), Some(TokenError::Rejected(401))));
        assert!(matches!(
            cache.last_failure(),
            Some((TokenError::Rejected(401), _))
        ));
        assert!(!cache.is_ready());
        // Asked again at once, the cache answers from memory.
        let again = cache.get().await.err().expect("still wrong");
        assert!(matches!(again, TokenError::Rejected(401)), "{again:?}");
        assert_eq!(identity_calls(&sim), 1);
        assert!(
            has_line(
                &metrics,
                r#"marketo_proxy_token_refreshes_total{result="rejected"} 1"#
            ),
            "{}",
            metrics.render()
        );
    }

    #[tokio::test]
    async fn readiness_follows_the_last_identity_outcome() {
        let sim = simulator(TOKEN_TTL).await;
        let (cache, _) = cache(&sim, DEMO_SECRET, "60s");
        assert!(!cache.is_ready(), "no token yet");
        let first = cache.get().await.expect("a token");
        assert!(cache.is_ready());
        assert!(cache.last_error().is_none() && cache.last_failure().is_none());
        sim.inject(Faults {
            revoke_tokens: true,
            identity_fail_next: MAX_ATTEMPTS,
            ..Faults::default()
        });
        cache.refused(&first);
        assert!(cache.is_ready(), "a token was held and no refresh has failed yet");
        let error = cache.get().await.err().expect("the identity service is down");
        assert!(matches!(error, TokenError::Unavailable(503)), "{error:?}");
        assert_eq!(identity_calls(&sim), 1 + u64::from(MAX_ATTEMPTS));
        assert!(!cache.is_ready());
        assert!(matches!(cache.last_error(), Some(TokenError::Unavailable(503))));
        let second = cache.get().await.expect("the identity service is back");
        assert_ne!(second.header, first.header);
        assert!(cache.is_ready());
        assert!(cache.last_error().is_none());
        assert!(
            matches!(cache.last_failure(), Some((TokenError::Unavailable(503), _))),
            "the last failure is kept for the status page"
        );
    }

    #[tokio::test]
    async fn each_upstream_credential_has_its_own_cache() {
        let sim = simulator(TOKEN_TTL).await;
        let (caches, _) = caches(&sim, DEMO_SECRET, "60s");
        assert_eq!(caches.all().len(), 2);
        assert_eq!(caches.users(), vec![0, 1]);
        assert!(
            Arc::ptr_eq(caches.for_service(0), &caches.all()[0]),
            "crm calls as the instance"
        );
        assert!(
            Arc::ptr_eq(caches.for_service(1), &caches.all()[1]),
            "warehouse has its own"
        );
        assert!(
            Arc::ptr_eq(caches.for_service(7), &caches.all()[0]),
            "anyone else (the proxy itself) calls as the instance"
        );
        let instance = caches.for_service(0).get().await.expect("a token");
        let warehouse = caches.for_service(1).get().await.expect("a token");
        assert_ne!(instance.header, warehouse.header);
        assert_eq!(identity_calls(&sim), 2);
        assert_eq!(
            caches.for_service(7).get().await.expect("a token").header,
            instance.header
        );
        assert_eq!(identity_calls(&sim), 2);
    }
}
