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
//! 7. Token and send: the service's upstream token is injected; a 601/602
//!    answer drops that token, fetches another (single-flight) and
//!    replays the call once.
//! 8. Answer: hop-by-hop headers dropped, the body streamed to the client.
//!
//! The proxy's own `/identity/oauth/token` is answered before step 1's
//! path check, for clients that only know how to talk to Marketo.

pub mod path;
pub mod rewrite;

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{AuthError, Callers, ServiceId};
use crate::config::{Config, UpstreamCredential};
use crate::error::{ProxyError, json_response};
use crate::marketo::{IdentityError, code};
use crate::metrics::Metrics;
use crate::token::{Token, TokenCache};
use crate::upstream::{Answer, Upstream, UpstreamError};
use path::Target;
use rewrite::{API_KEY_HEADER, BodyKind};

/// Body of every proxy response.
pub type ProxyBody = UnsyncBoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// Longest URI Marketo accepts.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest request body Marketo accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest bulk import body.
pub const MAX_IMPORT_BODY_BYTES: usize = 10 * 1024 * 1024;

/// Label used for requests that no service could be found for.
const NO_SERVICE: &str = "unauthenticated";

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
    metrics: Metrics,
}

/// A request ready to be sent (and sent again).
struct Outgoing {
    method: Method,
    path_and_query: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Proxy {
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, UpstreamError> {
        let upstream = Upstream::new(&config.marketo)?;
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
        Ok(Self {
            shared: Arc::new(Shared {
                upstream,
                callers: Callers::new(config),
                tokens,
                service_tokens,
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
        let mut service = None;
        let result = self.forward(request, peer.ip(), &mut service).await;
        let service_name = service.map_or(NO_SERVICE, |id| self.shared.callers.name(id));
        match result {
            Ok((response, outcome)) => {
                self.count(service_name, outcome);
                response
            }
            Err(error) => {
                self.count(service_name, error.outcome());
                tracing::info!(service = service_name, %peer, error = %error, "request refused");
                error.into_response()
            }
        }
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
        let body = read_body(body, limit).await?;
        // 6. Credentials out (old clients may have sent theirs in the body).
        let (body, body_token) = match &kind {
            BodyKind::Form => {
                let text = String::from_utf8_lossy(&body);
                let token = rewrite::find_access_token(text.as_bytes());
                match token {
                    Some(token) => (Bytes::from(rewrite::strip_access_token_pairs(&text)), Some(token)),
                    None => (body, None),
                }
            }
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
        let mut headers = parts.headers;
        rewrite::request_headers(&mut headers);
        let outgoing = Outgoing {
            method: parts.method,
            path_and_query: without_access_token(&target),
            headers,
            body,
        };
        // 7. Token and send.
        let answer = self.send(service, &target, &outgoing).await?;
        // 8. Answer.
        let outcome = if answer.error_code.is_some() || !answer.head.status.is_success() {
            "marketo_error"
        } else {
            "ok"
        };
        Ok((respond(answer), outcome))
    }

    /// Sends with the service's token; on 601/602 replaces that token and
    /// replays once.
    async fn send(
        &self,
        service: ServiceId,
        target: &Target,
        outgoing: &Outgoing,
    ) -> Result<Answer, ProxyError> {
        let cache = &self.shared.tokens[self.shared.service_tokens.get(service).copied().unwrap_or(0)];
        let mut token = cache.get().await?;
        let mut replayed = false;
        loop {
            let answer = self.send_once(service, target, outgoing, &token).await?;
            let token_failed = matches!(
                answer.error_code.as_deref(),
                Some(code::TOKEN_INVALID | code::TOKEN_EXPIRED)
            );
            if !token_failed || replayed {
                return Ok(answer);
            }
            let reason = answer.error_code.clone().unwrap_or_default();
            tracing::info!(service = self.shared.callers.name(service), code = %reason, "token refused by Marketo, refreshing and replaying");
            self.shared.metrics.replays.with_label_values(&[&reason]).inc();
            token = cache.replace(&token).await?;
            replayed = true;
        }
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
        let host = HeaderValue::from_str(self.shared.upstream.host()).map_err(|_| UpstreamError::BaseUrl)?;
        request.headers_mut().insert(header::HOST, host);
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
                Some(code) => code.clone(),
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

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => match error.downcast::<hyper::Error>() {
            Ok(error) => Err(ProxyError::BodyUnreadable(*error)),
            Err(_) => Err(ProxyError::BodyTooLarge { limit }),
        },
    }
}

/// Marketo's answer as the client gets it.
fn respond(answer: Answer) -> Response<ProxyBody> {
    let mut head = answer.head;
    rewrite::strip_hop_by_hop(&mut head.headers);
    let body = answer
        .body
        .into_body()
        .map_err(|error| Box::new(error) as Box<dyn StdError + Send + Sync>)
        .boxed_unsync();
    Response::from_parts(head, body)
}

fn identity_error(status: StatusCode, error: &str, description: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&IdentityError {
        error: error.to_owned(),
        error_description: description.to_owned(),
    })
    .unwrap_or_default();
    json_response(status, Bytes::from(body))
}
