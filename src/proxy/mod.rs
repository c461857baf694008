//! The forwarding path: from a client's request to Marketo's answer.
//!
//! # Order
//! Each request goes through these steps, top to bottom, in
//! [`Proxy::forward`]:
//! 1. Throttle: an address with too many failed logins is refused before
//!    anything it sends is looked at.
//! 2. Target: only `/rest/...` and `/bulk/...`, dot-segments resolved;
//!    the configured host is the only destination.
//! 3. URI size: over 8 KB is refused (414) before it costs anything.
//! 4. Caller: an API key or proxy-issued token names the service;
//!    nothing unauthenticated goes further.
//! 5. Body: buffered within Marketo's limits (413 otherwise), so that a
//!    replay can resend it.
//! 6. Credentials: every `access_token` and client header removed.
//! 7. Token: the service's upstream token, fetched before admission since
//!    identity calls cost no quota.
//! 8. Admission: the service's queue, fair between services; then, with
//!    replicas, the limits shared through Redis. Refused with 606/607 and
//!    `Retry-After` when the deadline cannot be met or the quota is spent.
//! 9. Send: the token injected, the answer peeked and classified; 601/602
//!    replaces the token and replays once, 606/615 pause admission and
//!    replay, transient failures replay reads (see [`Proxy::send`]).
//! 10. Answer: hop-by-hop headers dropped, the body streamed to the
//!     client, holding the call's concurrency slot until it has been sent.
//!
//! The proxy's own `/identity/oauth/token` is answered before step 1's
//! path check, for clients that only know how to talk to Marketo.

pub mod path;
pub mod rewrite;

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::admission::shared::{Grant, Lease, SharedLimits};
use crate::admission::{Admission, AdmissionError, Permit};
use crate::auth::{AuthError, Callers, ServiceId};
use crate::config::{Backend, Config, UpstreamCredential};
use crate::error::{ProxyError, json_response};
use crate::marketo::{IdentityError, code};
use crate::metrics::Metrics;
use crate::token::{Token, TokenCache};
use crate::upstream::{Answer, AnswerBody, Upstream, UpstreamError};
use crate::usage_sync::MarketoUsage;
use path::Target;
use rewrite::{API_KEY_HEADER, BodyKind};

/// Body of every proxy response.
pub type ProxyBody = UnsyncBoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// Longest URI Marketo accepts.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest request body Marketo accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest bulk import body.
pub const MAX_IMPORT_BODY_BYTES: usize = 10 * 1024 * 1024;

/// Attempts per request, replays included.
const MAX_ATTEMPTS: u32 = 5;
/// Pause after Marketo said 606: calls outside the proxy used the window.
const PAUSE_AFTER_606: Duration = Duration::from_secs(2);
/// Pause after Marketo said 615: calls outside the proxy are in flight.
const PAUSE_AFTER_615: Duration = Duration::from_millis(250);
/// How long a call that got no answer in time keeps its concurrency slot:
/// Marketo may still be executing it.
const TIMED_OUT_CALL_GRACE: Duration = Duration::from_secs(10);
/// First pause before replaying after a transient failure; doubles.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Label used for requests that no service could be found for.
const NO_SERVICE: &str = "unauthenticated";

/// Why a proxy could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Shared(#[from] crate::admission::shared::SharedError),
}

/// The proxy: shared state behind an `Arc`, cheap to clone per connection.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    callers: Callers,
    /// One cache per upstream credential; index 0 is `marketo`'s own.
    tokens: Vec<Arc<TokenCache>>,
    /// Service → index into `tokens`.
    service_tokens: Vec<usize>,
    admission: Arc<Admission>,
    /// The limits shared with other replicas through Redis, if configured.
    limits: Option<Arc<SharedLimits>>,
    /// Marketo's own count of today's calls, when last read.
    marketo_usage: std::sync::Mutex<Option<MarketoUsage>>,
    metrics: Metrics,
}

/// A request ready to be sent (and sent again).
#[derive(Clone)]
struct Outgoing {
    method: Method,
    path_and_query: String,
    headers: http::HeaderMap,
    body: Bytes,
    /// A read (GET, or POST with `_method=GET`): safe to send again after
    /// a timeout or a transient error.
    idempotent: bool,
}

impl Proxy {
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, BuildError> {
        let upstream = Upstream::new(&config.marketo)?;
        let limits = match (&config.state.backend, &config.state.redis) {
            (Backend::Redis, Some(redis)) => Some(SharedLimits::new(config, redis, metrics.clone())?),
            _ => None,
        };
        let refresh_before = config.marketo.token_refresh_before;
        let default_credential = UpstreamCredential {
            client_id: config.marketo.client_id.clone(),
            client_secret: config.marketo.client_secret.clone(),
        };
        let mut tokens = vec![TokenCache::new(
            upstream.clone(),
            default_credential,
            refresh_before,
            metrics.clone(),
        )];
        let mut service_tokens = Vec::with_capacity(config.services.len());
        for service in &config.services {
            match &service.marketo {
                Some(credential) => {
                    tokens.push(TokenCache::new(
                        upstream.clone(),
                        credential.clone(),
                        refresh_before,
                        metrics.clone(),
                    ));
                    service_tokens.push(tokens.len() - 1);
                }
                None => service_tokens.push(0),
            }
        }
        let admission = Admission::new(config, metrics.clone());
        if let Some(limits) = &limits {
            admission.set_share(limits.fallback_replicas());
        }
        Ok(Self {
            shared: Arc::new(Shared {
                upstream,
                callers: Callers::new(config),
                tokens,
                service_tokens,
                admission,
                limits,
                marketo_usage: std::sync::Mutex::new(None),
                metrics,
            }),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Every upstream token cache, the instance's own first.
    pub fn token_caches(&self) -> &[Arc<TokenCache>] {
        &self.shared.tokens
    }

    pub fn admission(&self) -> &Arc<Admission> {
        &self.shared.admission
    }

    /// Calls Marketo as the proxy itself (its usage report): admitted,
    /// counted and replayed like any call. Returns the answer's body.
    pub async fn internal_get(&self, path_and_query: &str) -> Result<Bytes, ProxyError> {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let target = path::normalise(path, Some(query))?;
        let service = self.shared.admission.internal_service();
        let deadline = deadline_after(Instant::now(), self.shared.admission.max_wait(service));
        let mut headers = http::HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let outgoing = Outgoing {
            method: Method::GET,
            path_and_query: target.path_and_query(),
            headers,
            body: Bytes::new(),
            idempotent: true,
        };
        let (answer, _permit) = self.send(service, &target, &outgoing, deadline).await?;
        let body = answer
            .body
            .into_body()
            .collect()
            .await
            .map_err(|error| ProxyError::Upstream(UpstreamError::Stream(error)))?
            .to_bytes();
        Ok(body)
    }

    /// Takes Marketo's count of today's calls into the quota.
    pub async fn apply_marketo_usage(&self, usage: &crate::usage_sync::MarketoUsage) {
        let admission = &self.shared.admission;
        if admission.day() == usage.date {
            admission.reconcile(usage.total);
            if let Some(limits) = &self.shared.limits {
                limits.reconcile(usage.date, usage.total).await;
            }
        }
        *self
            .shared
            .marketo_usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(usage.clone());
    }

    /// Marketo's count of today's calls, when last read.
    pub fn marketo_usage(&self) -> Option<crate::usage_sync::MarketoUsage> {
        self.shared
            .marketo_usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Brings time-dependent gauges up to date before a scrape.
    pub fn refresh_metrics(&self) {
        self.shared.admission.refresh_metrics();
        let now = Instant::now();
        if let Some(token) = self.shared.tokens.first().and_then(|cache| cache.cached()) {
            let left = token.expires_at.saturating_duration_since(now);
            self.shared.metrics.token_expiry_seconds.set(left.as_secs_f64());
        } else {
            self.shared.metrics.token_expiry_seconds.set(0.0);
        }
    }

    /// Service names in admission order, the proxy's own last.
    pub fn service_names(&self) -> Vec<String> {
        self.shared.admission.names().to_vec()
    }

    /// The limits shared with other replicas, when configured.
    pub fn shared_limits(&self) -> Option<&Arc<SharedLimits>> {
        self.shared.limits.as_ref()
    }

    /// Starts the background refresh of every upstream token.
    pub fn spawn_token_refreshers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.shared
            .tokens
            .iter()
            .map(TokenCache::spawn_refresher)
            .collect()
    }

    /// Answers one client request.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        if request.uri().path() == "/identity/oauth/token" {
            return self.identity(request, peer.ip()).await;
        }
        let started = Instant::now();
        // Copied for the per-request log line only when it is on.
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        let mut service = None;
        let result = self.forward(request, peer.ip(), &mut service).await;
        let service_name = service.map_or(NO_SERVICE, |id| self.shared.callers.name(id));
        let (response, outcome) = match result {
            Ok((response, outcome)) => (response, outcome),
            Err(error) => {
                tracing::info!(
                    service = service_name,
                    %peer,
                    cause = error.source_of_error().label(),
                    error = %error,
                    "request refused"
                );
                let outcome = error.outcome();
                (error.into_response(), outcome)
            }
        };
        self.count(service_name, outcome);
        if let Some((method, path)) = logged {
            tracing::debug!(
                service = service_name,
                %method,
                path,
                status = response.status().as_u16(),
                outcome,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request"
            );
        }
        response
    }

    fn count(&self, service: &str, outcome: &str) {
        self.shared
            .metrics
            .requests
            .with_label_values(&[service, outcome])
            .inc();
    }

    /// The pipeline, in the order the module documentation gives.
    async fn forward(
        &self,
        request: Request<Incoming>,
        peer: IpAddr,
        service_out: &mut Option<ServiceId>,
    ) -> Result<(Response<ProxyBody>, &'static str), ProxyError> {
        let arrived = Instant::now();
        let callers = &self.shared.callers;
        // 1. Throttle.
        callers.check_throttle(peer)?;
        let (parts, body) = request.into_parts();
        // 2. Target.
        let target = path::normalise(parts.uri.path(), parts.uri.query())?;
        // 3. URI size.
        let uri_len = parts
            .uri
            .path_and_query()
            .map_or(0, |target| target.as_str().len());
        if uri_len > MAX_URI_BYTES {
            return Err(ProxyError::UriTooLong { limit: MAX_URI_BYTES });
        }
        // 4. Caller, from the headers or the query; 5. the body.
        let limit = if target.is_bulk_import() {
            MAX_IMPORT_BODY_BYTES
        } else {
            MAX_BODY_BYTES
        };
        let presented = presented_credential(&parts.headers, target.query.as_deref());
        let mut service = presented
            .as_deref()
            .and_then(|credential| callers.authenticate(credential));
        if presented.is_some() && service.is_none() {
            callers.record_failure(peer);
            return Err(AuthError::Unauthenticated.into());
        }
        let kind = rewrite::body_kind(&parts.headers);
        if service.is_none() && matches!(kind, BodyKind::Other) {
            callers.record_failure(peer);
            return Err(AuthError::Unauthenticated.into());
        }
        // A caller not yet known (its token may be in the body) gets no
        // more than an ordinary body's worth of our memory.
        let limit = if service.is_none() {
            limit.min(MAX_BODY_BYTES)
        } else {
            limit
        };
        let body = read_body(body, limit).await?;
        // 6. Credentials out (old clients may have sent theirs in the body).
        let (body, body_token) = match &kind {
            BodyKind::Form => match rewrite::find_access_token(&body) {
                Some(token) => (Bytes::from(rewrite::strip_access_token_bytes(&body)), Some(token)),
                None => (body, None),
            },
            BodyKind::Multipart { boundary } => rewrite::strip_access_token_multipart(&body, boundary),
            BodyKind::Other => (body, None),
        };
        if service.is_none() {
            service = body_token
                .as_deref()
                .and_then(|token| callers.authenticate(token));
        }
        let Some(service) = service else {
            callers.record_failure(peer);
            return Err(AuthError::Unauthenticated.into());
        };
        *service_out = Some(service);
        let deadline = deadline_after(arrived, self.shared.admission.max_wait(service));
        let mut headers = parts.headers;
        rewrite::request_headers(&mut headers);
        let idempotent = parts.method == Method::GET
            || (parts.method == Method::POST && asks_for_get(target.query.as_deref(), &kind, &body));
        let outgoing = Outgoing {
            method: parts.method,
            path_and_query: without_access_token(&target),
            headers,
            body,
            idempotent,
        };
        // 7. Admission, token and send.
        let (answer, permit) = self.send(service, &target, &outgoing, deadline).await?;
        // 8. Answer.
        let outcome = if answer.error_code.is_some() || !answer.head.status.is_success() {
            "marketo_error"
        } else {
            "ok"
        };
        Ok((
            respond(answer, permit, self.shared.upstream.request_timeout()),
            outcome,
        ))
    }

    /// Admits, sends and replays until Marketo gives an answer worth
    /// passing on. Every attempt waits for admission like any call.
    ///
    /// - 601/602: the token is replaced (single-flight) and the call
    ///   replayed once.
    /// - 606/615: calls we cannot see used the window or the concurrency;
    ///   admission pauses and the call is replayed from the head of its
    ///   queue (Marketo did not execute it).
    /// - 604/608/611/713, HTTP 502/503, no answer: replayed only when
    ///   idempotent, with backoff.
    /// - 607: the day is spent; later calls are answered locally.
    ///
    /// All within the request's deadline and [`MAX_ATTEMPTS`].
    async fn send(
        &self,
        service: ServiceId,
        target: &Target,
        outgoing: &Outgoing,
        deadline: Instant,
    ) -> Result<(Answer, Option<Slot>), ProxyError> {
        let shared = &self.shared;
        let cache = &shared.tokens[shared.service_tokens.get(service).copied().unwrap_or(0)];
        // The identity call costs no quota: get the token before a slot,
        // within the request's deadline.
        // Rare or large awaits are boxed, so that a request waiting in the
        // queue does not carry their state.
        let mut token = Box::pin(within(deadline, cache.get())).await?;
        let mut token_replaced = false;
        let mut front = false;
        let mut backoff = FIRST_BACKOFF;
        let mut last: Option<Answer> = None;
        let mut attempt = 0;
        let mut readmitted = false;
        while attempt < MAX_ATTEMPTS {
            attempt += 1;
            let permit = match shared.admission.admit(service, deadline, front).await {
                Ok(permit) => permit,
                // A replay that no longer fits its deadline: pass on what
                // Marketo said last.
                Err(_) if last.is_some() => break,
                Err(error) => return Err(error.into()),
            };
            // With replicas, the limits they share must agree too.
            let lease = match Box::pin(self.shared_grant(service, deadline)).await {
                Ok(SharedGrant::Go(lease)) => lease,
                // Admitted under limits that no longer hold: once more
                // under this replica's share.
                Ok(SharedGrant::Readmit) if !readmitted => {
                    permit.unsent();
                    readmitted = true;
                    attempt -= 1;
                    front = true;
                    continue;
                }
                Ok(SharedGrant::Readmit) => None,
                Err(error) => {
                    permit.unsent();
                    if last.is_some() {
                        break;
                    }
                    return Err(error);
                }
            };
            let slot = Slot { permit, lease };
            let (result, permit) = Box::pin(self.attempt(service, target, outgoing, &token, slot)).await;
            let answer = match result {
                Ok(answer) => answer,
                Err(error) => {
                    let retry =
                        outgoing.idempotent && attempt < MAX_ATTEMPTS && Instant::now() + backoff < deadline;
                    if !retry {
                        return Err(error);
                    }
                    self.replay(service, "no_answer");
                    drop(permit);
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    front = true;
                    continue;
                }
            };
            let reason =
                match answer.error_code.as_deref() {
                    Some(code @ (code::TOKEN_INVALID | code::TOKEN_EXPIRED)) if !token_replaced => {
                        let code = code.to_owned();
                        self.replay(service, &code);
                        drop(permit);
                        token = Box::pin(within(deadline, cache.replace(&token))).await?;
                        token_replaced = true;
                        front = true;
                        last = Some(answer);
                        continue;
                    }
                    Some(code::RATE_LIMITED) => {
                        shared.admission.pause(PAUSE_AFTER_606);
                        code::RATE_LIMITED
                    }
                    Some(code::CONCURRENCY_LIMITED) => {
                        shared.admission.pause(PAUSE_AFTER_615);
                        code::CONCURRENCY_LIMITED
                    }
                    Some(code::QUOTA_REACHED) => {
                        tracing::warn!(
                            service = shared.callers.name(service),
                            "Marketo says the daily quota is spent"
                        );
                        shared.admission.quota_spent();
                        if let Some(limits) = &shared.limits {
                            Box::pin(limits.mark_spent(shared.admission.day())).await;
                        }
                        return Ok((answer, permit));
                    }
                    Some(
                        code @ (code::TIMED_OUT | code::UNAVAILABLE | code::SYSTEM_ERROR | code::TRANSIENT),
                    ) if outgoing.idempotent => code,
                    _ if outgoing.idempotent
                        && matches!(
                            answer.head.status,
                            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                        ) =>
                    {
                        "http_5xx"
                    }
                    _ => return Ok((answer, permit)),
                };
            if attempt == MAX_ATTEMPTS {
                return Ok((answer, permit));
            }
            self.replay(service, reason);
            drop(permit);
            if !matches!(reason, code::RATE_LIMITED | code::CONCURRENCY_LIMITED) {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            front = true;
            last = Some(answer);
        }
        match last {
            Some(answer) => Ok((answer, None)),
            None => Err(ProxyError::Admission(AdmissionError::Closed)),
        }
    }

    /// One call to Marketo. A request that goes away while its call is out
    /// (the client disconnected) does not free the call's slot at once:
    /// Marketo may still be executing it, so the slot is kept for
    /// [`TIMED_OUT_CALL_GRACE`], as for a call that timed out.
    async fn attempt(
        &self,
        service: ServiceId,
        target: &Target,
        outgoing: &Outgoing,
        token: &Token,
        slot: Slot,
    ) -> (Result<Answer, ProxyError>, Option<Slot>) {
        let mut unanswered = UnansweredCall(Some(slot));
        let result = self.send_once(service, target, outgoing, token).await;
        let Some(mut slot) = unanswered.0.take() else {
            return (result, None);
        };
        if matches!(result, Err(ProxyError::Upstream(UpstreamError::Timeout(_)))) {
            hold_for_grace(slot);
            return (result, None);
        }
        slot.permit.answered();
        if let Some(lease) = slot.lease.as_mut() {
            lease.answered().await;
        }
        (result, Some(slot))
    }

    /// A grant from the limits shared with other replicas, if any: waits
    /// while another replica holds what this call needs, within the
    /// deadline. `None` when there is nothing to share.
    async fn shared_grant(&self, service: ServiceId, deadline: Instant) -> Result<SharedGrant, ProxyError> {
        let Some(limits) = &self.shared.limits else {
            return Ok(SharedGrant::Go(None));
        };
        let admission = &self.shared.admission;
        let asked = Instant::now();
        loop {
            match limits.acquire(service, admission.day(), admission).await {
                Grant::Granted(lease) => return Ok(SharedGrant::Go(Some(lease))),
                Grant::Readmit => return Ok(SharedGrant::Readmit),
                Grant::Refused(scope) => {
                    let retry_after = (admission.next_reset() - chrono::Utc::now())
                        .to_std()
                        .unwrap_or_default();
                    return Err(AdmissionError::Quota { scope, retry_after }.into());
                }
                Grant::Wait(wait) => {
                    if Instant::now() + wait >= deadline {
                        return Err(AdmissionError::DeadlineExpired {
                            max_wait: deadline.saturating_duration_since(asked),
                            retry_after: wait.max(Duration::from_secs(1)),
                        }
                        .into());
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn replay(&self, service: ServiceId, reason: &str) {
        tracing::info!(
            service = self.shared.callers.name(service),
            reason,
            "replaying a call"
        );
        self.shared.metrics.replays.with_label_values(&[reason]).inc();
    }

    async fn send_once(
        &self,
        service: ServiceId,
        target: &Target,
        outgoing: &Outgoing,
        token: &Token,
    ) -> Result<Answer, ProxyError> {
        let uri: Uri = self.shared.upstream.uri(&outgoing.path_and_query)?;
        let mut request = Request::builder()
            .method(outgoing.method.clone())
            .uri(uri)
            .body(Full::new(outgoing.body.clone()))
            .map_err(|error| ProxyError::Upstream(UpstreamError::Uri(error)))?;
        *request.headers_mut() = outgoing.headers.clone();
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());

        let service_name = self.shared.callers.name(service);
        let api = target.api.label();
        let started = Instant::now();
        let result = self.shared.upstream.send(request).await;
        let metrics = &self.shared.metrics;
        metrics
            .upstream_duration
            .with_label_values(&[service_name, api])
            .observe(started.elapsed().as_secs_f64());
        let code_label = match &result {
            Ok(answer) => match &answer.error_code {
                Some(code) => crate::marketo::code_label(code).to_owned(),
                None if answer.head.status.is_success() => "ok".to_owned(),
                None => answer.head.status.as_u16().to_string(),
            },
            Err(UpstreamError::Timeout(_)) => "timeout".to_owned(),
            Err(_) => "connect_error".to_owned(),
        };
        metrics
            .upstream_calls
            .with_label_values(&[service_name, api, &code_label])
            .inc();
        tracing::debug!(service = service_name, api, path = %target.path, code = %code_label, "upstream call");
        Ok(result?)
    }

    /// The proxy's own `/identity/oauth/token`, in Marketo's shape.
    async fn identity(&self, request: Request<Incoming>, peer: IpAddr) -> Response<ProxyBody> {
        let callers = &self.shared.callers;
        if let Err(error) = callers.check_throttle(peer) {
            self.count(NO_SERVICE, "rejected_auth");
            return ProxyError::from(error).into_response();
        }
        let (parts, body) = request.into_parts();
        let mut params: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|query| form_urlencoded::parse(query.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        if parts.method == Method::POST {
            match read_body(body, MAX_BODY_BYTES).await {
                Ok(body) => params.extend(form_urlencoded::parse(&body).into_owned()),
                Err(error) => return error.into_response(),
            }
        } else if parts.method != Method::GET {
            return identity_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "Use GET or POST",
            );
        }
        let param = |name: &str| {
            params
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
                .unwrap_or_default()
        };
        if param("grant_type") != "client_credentials" {
            return identity_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Unsupported grant type",
            );
        }
        match callers.issue_token(param("client_id"), param("client_secret")) {
            Some(answer) => {
                self.count(&answer.scope, "ok");
                let body = serde_json::to_vec(&answer).unwrap_or_default();
                json_response(StatusCode::OK, Bytes::from(body))
            }
            None => {
                callers.record_failure(peer);
                self.count(NO_SERVICE, "rejected_auth");
                identity_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "Bad client credentials",
                )
            }
        }
    }
}

/// `start + wait`, for any configured wait.
fn deadline_after(start: Instant, wait: Duration) -> Instant {
    start
        .checked_add(wait)
        .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600))
}

/// Waits for a token no longer than the request may wait.
async fn within(
    deadline: Instant,
    token: impl std::future::Future<Output = Result<Token, crate::token::TokenError>>,
) -> Result<Token, ProxyError> {
    match tokio::time::timeout_at(deadline, token).await {
        Ok(token) => Ok(token?),
        Err(_) => {
            Err(crate::token::TokenError::Unreachable("no token before the request's deadline".into()).into())
        }
    }
}

/// The credential a client presented in headers or query: `X-Api-Key`,
/// `Authorization: Bearer`, or the deprecated `access_token` parameter.
fn presented_credential(headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(key) = headers.get(API_KEY_HEADER).and_then(|value| value.to_str().ok()) {
        return Some(key.trim().to_owned());
    }
    if let Some(authorization) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        let (scheme, credential) = authorization
            .trim()
            .split_once(' ')
            .unwrap_or((authorization, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(credential.trim().to_owned());
        }
    }
    query.and_then(|query| rewrite::find_access_token(query.as_bytes()))
}

fn without_access_token(target: &Target) -> String {
    match target.query.as_deref().map(rewrite::strip_access_token_pairs) {
        Some(query) if !query.is_empty() => format!("{}?{}", target.path, query),
        _ => target.path.clone(),
    }
}

/// Reads a request body whole (a replay must be able to resend it),
/// within `limit` bytes and [`BODY_READ_TIMEOUT`].
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect()).await;
    match read {
        Err(_) => Err(ProxyError::BodyTimeout(BODY_READ_TIMEOUT)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => match error.downcast::<hyper::Error>() {
            Ok(error) => Err(ProxyError::BodyUnreadable(*error)),
            Err(_) => Err(ProxyError::BodyTooLarge { limit }),
        },
    }
}

/// The slot of a call sent and not yet answered. Dropped unanswered (the
/// request went away mid-call), it keeps the slot a while: Marketo may
/// still be executing the call.
struct UnansweredCall(Option<Slot>);

impl Drop for UnansweredCall {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            hold_for_grace(slot);
        }
    }
}

/// Keeps a call's slot for [`TIMED_OUT_CALL_GRACE`] after it got no answer.
fn hold_for_grace(mut slot: Slot) {
    // The call may have reached Marketo: its window slot counts from now.
    slot.permit.answered();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            tokio::time::sleep(TIMED_OUT_CALL_GRACE).await;
            drop(slot);
        });
    }
}

/// What the shared limits said about a call already admitted here.
enum SharedGrant {
    /// Go, with the lease on the shared limits if there are any.
    Go(Option<Lease>),
    /// The limits here changed under the call: admit it again.
    Readmit,
}

/// What one call to Marketo holds while it runs: its place in this
/// replica's limits and, when replicas share the instance, its lease on
/// the shared ones. Dropping it gives both back.
struct Slot {
    permit: Permit,
    lease: Option<Lease>,
}

impl Slot {
    #[cfg(test)]
    fn local(permit: Permit) -> Self {
        Self { permit, lease: None }
    }
}

/// Marketo's answer as the client gets it. The permit (the concurrency
/// slot) goes with the body and is released when the body has been sent
/// in full or dropped, or, for a streamed answer, when the client has read
/// nothing for `idle` (a client that stops reading must not hold one of
/// the instance's few slots forever).
fn respond(answer: Answer, permit: Option<Slot>, idle: Duration) -> Response<ProxyBody> {
    let mut head = answer.head;
    rewrite::strip_hop_by_hop(&mut head.headers);
    let streamed = matches!(answer.body, AnswerBody::Streaming { .. });
    let held = permit.map(|permit| {
        Arc::new(HeldPermit {
            permit: std::sync::Mutex::new(Some(permit)),
            progress: AtomicU64::new(0),
        })
    });
    if let (true, Some(held)) = (streamed, &held) {
        watch_progress(Arc::downgrade(held), idle);
    }
    let body = HoldsPermit {
        body: answer.body.into_body(),
        held,
    }
    .map_err(|error| Box::new(error) as Box<dyn StdError + Send + Sync>)
    .boxed_unsync();
    Response::from_parts(head, body)
}

/// The permit of an answer being passed on, shared (weakly) with the
/// watchdog of a streamed answer. Dropping the body drops the permit.
struct HeldPermit {
    permit: std::sync::Mutex<Option<Slot>>,
    /// Frames passed on so far.
    progress: AtomicU64,
}

impl HeldPermit {
    fn release(&self) {
        let permit = self
            .permit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(permit);
    }

    fn is_held(&self) -> bool {
        self.permit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }
}

/// Releases the permit of a streamed answer whose client read nothing for
/// `idle`.
fn watch_progress(held: std::sync::Weak<HeldPermit>, idle: Duration) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            tokio::time::sleep(idle).await;
            let Some(held) = held.upgrade() else { return };
            if !held.is_held() {
                return;
            }
            let progress = held.progress.load(Ordering::Relaxed);
            if last == Some(progress) {
                tracing::warn!(
                    "a client stopped reading a streamed answer; its concurrency slot is released"
                );
                held.release();
                return;
            }
            last = Some(progress);
        }
    });
}

/// Is this POST a read (`_method=GET` in the query or the form body)?
fn asks_for_get(query: Option<&str>, kind: &BodyKind, body: &Bytes) -> bool {
    let says_get = |pairs: &[u8]| {
        form_urlencoded::parse(pairs)
            .any(|(key, value)| key == "_method" && value.eq_ignore_ascii_case("GET"))
    };
    query.is_some_and(|query| says_get(query.as_bytes()))
        || (matches!(kind, BodyKind::Form) && says_get(body))
}

pin_project_lite::pin_project! {
    /// A response body that holds a [`Permit`] until it ends.
    struct HoldsPermit<B> {
        #[pin]
        body: B,
        held: Option<Arc<HeldPermit>>,
    }
}

impl<B: http_body::Body> http_body::Body for HoldsPermit<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Some(held) = this.held.as_ref() {
            match &polled {
                std::task::Poll::Ready(Some(Ok(_))) => {
                    held.progress.fetch_add(1, Ordering::Relaxed);
                }
                std::task::Poll::Ready(None | Some(Err(_))) => held.release(),
                std::task::Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn identity_error(status: StatusCode, error: &str, description: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&IdentityError {
        error: error.to_owned(),
        error_description: description.to_owned(),
    })
    .unwrap_or_default();
    json_response(status, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::StreamBody;

    fn one_service_admission() -> Arc<Admission> {
        let config = Config::from_yaml_with_env(
            "marketo: { base_url: 'http://127.0.0.1:1', client_id: a, client_secret: b }\n\
             services: [{ name: s, api_key: key-s-0123456789 }]\nstate: { file: ~ }",
            |_| None,
        )
        .unwrap();
        Admission::new(&config, Metrics::new())
    }

    #[tokio::test]
    async fn the_concurrency_slot_is_held_until_the_body_has_been_sent() {
        let admission = one_service_admission();
        let mut permit = admission
            .admit(0, Instant::now() + Duration::from_secs(1), false)
            .await
            .unwrap();
        permit.answered();
        let (sender, receiver) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, hyper::Error>>(1);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        let held = Arc::new(HeldPermit {
            permit: std::sync::Mutex::new(Some(Slot::local(permit))),
            progress: AtomicU64::new(0),
        });
        let mut body = std::pin::pin!(HoldsPermit {
            body: StreamBody::new(stream),
            held: Some(held),
        });
        sender
            .send(Ok(http_body::Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        assert!(body.frame().await.is_some());
        assert_eq!(
            admission.snapshot().in_flight,
            1,
            "answer headers and part of the body are not enough"
        );
        drop(sender);
        assert!(body.frame().await.is_none());
        assert_eq!(admission.snapshot().in_flight, 0, "the body ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_a_streamed_answer_loses_its_slot() {
        let admission = one_service_admission();
        let permit = admission
            .admit(0, Instant::now() + Duration::from_secs(1), false)
            .await
            .unwrap();
        let held = Arc::new(HeldPermit {
            permit: std::sync::Mutex::new(Some(Slot::local(permit))),
            progress: AtomicU64::new(0),
        });
        watch_progress(Arc::downgrade(&held), Duration::from_secs(60));
        tokio::time::sleep(Duration::from_secs(61)).await;
        held.progress.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(admission.snapshot().in_flight, 1, "it was reading");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(admission.snapshot().in_flight, 0, "it read nothing for a minute");
        assert!(!held.is_held());
    }
}
