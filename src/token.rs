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
