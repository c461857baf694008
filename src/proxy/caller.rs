//! Caller authentication: every request is accounted to one configured
//! service, or refused here before anything is forwarded.
//!
//! The credential is the service's API key (`X-Api-Key` or
//! `Authorization: Bearer`) or a token the proxy issued, in a header or in
//! the deprecated `access_token` query parameter. Old clients may send the
//! token in an urlencoded or multipart body instead; only then is the body
//! read here, and no more than [`UNKNOWN_CALLER_BODY_BYTES`] of it, since
//! the caller is not known yet (a multipart boundary RFC 2046 does not allow
//! gets 400 before anything is read). A wrong credential from an address that
//! failed too often gets 429 instead of 401; a right one is always accepted.
//!
//! The [`Caller`] and the request's [`Deadline`] go into the request's
//! extensions; the caller also goes into the answer's, for the accounting
//! above, and into the request's span.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http::{HeaderMap, Request, Response, header};
use http_body::Body;
use http_body_util::{Either as EitherBody, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::body::UnknownBodies;
use super::rewrite::{self, API_KEY_HEADER, BodyKind};
use crate::auth::{Caller, Callers, ServiceId};
use crate::error::ProxyError;
use crate::response::{BoxError, ResponseBody};
use crate::server::Peer;

/// The most of a body read to find the credential of a caller not known
/// yet (an old client's `access_token` form field): whoever sent it may be
/// nobody.
pub const UNKNOWN_CALLER_BODY_BYTES: usize = 64 * 1024;

/// When the request must have been admitted, from its arrival and its
/// service's `max_queue_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// `start + wait`, for any configured wait.
    pub fn after(start: Instant, wait: Duration) -> Self {
        Self(
            start
                .checked_add(wait)
                .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600)),
        )
    }
}

/// The body below this layer: as it arrives, or already read here (the
/// credential was in it).
pub type CallerBody<B> = EitherBody<B, Full<Bytes>>;

/// Authenticates callers; see the module documentation.
#[derive(Clone)]
pub struct CallerLayer {
    callers: Arc<Callers>,
    bodies: Arc<UnknownBodies>,
}

impl CallerLayer {
    pub fn new(callers: Arc<Callers>, bodies: Arc<UnknownBodies>) -> Self {
        Self { callers, bodies }
    }
}

impl<S> Layer<S> for CallerLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            callers: Arc::clone(&self.callers),
            bodies: Arc::clone(&self.bodies),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    callers: Arc<Callers>,
    /// The bodies read here, of callers not known yet.
    bodies: Arc<UnknownBodies>,
}

impl<S, B> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<CallerBody<B>>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<Tagged<S::Future>, BoxFuture<'static, Result<Self::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let peer = Peer::ip_of(&request);
        match identify(&self.callers, &request, peer) {
            Ok(Some(service)) => {
                let caller = self.callers.caller(service);
                let request = admit(&self.callers, request.map(EitherBody::Left), &caller);
                Either::Left(Tagged {
                    future: self.inner.call(request),
                    caller: Some(caller),
                })
            }
            Ok(None) => {
                // The credential may be in the body: read a little of it
                // and look there.
                let inner = self.inner.clone();
                let callers = Arc::clone(&self.callers);
                let bodies = Arc::clone(&self.bodies);
                Either::Right(Box::pin(async move {
                    let (parts, body) = request.into_parts();
                    // The body layer below accounts for these bytes again.
                    let body = match bodies.read(peer, body, UNKNOWN_CALLER_BODY_BYTES, &callers).await {
                        Ok(body) => body,
                        Err(error) => return Ok(error.into_response()),
                    };
                    let service = credential_in_body(&parts.headers, &body)
                        .and_then(|credential| callers.authenticate(&credential));
                    let Some(service) = service else {
                        return Ok(ProxyError::from(callers.failed(peer)).into_response());
                    };
                    let caller = callers.caller(service);
                    let request = Request::from_parts(parts, EitherBody::Right(Full::new(body)));
                    let request = admit(&callers, request, &caller);
                    let mut response = inner.oneshot(request).await?;
                    response.extensions_mut().insert(caller);
                    Ok(response)
                }))
            }
            Err(error) => Either::Right(Box::pin(std::future::ready(Ok(error.into_response())))),
        }
    }
}

/// The service that presented the request's header or query credential;
/// `None` when it presented none there but its body may hold one.
fn identify<B>(
    callers: &Callers,
    request: &Request<B>,
    peer: IpAddr,
) -> Result<Option<ServiceId>, ProxyError> {
    let presented = presented_credential(request.headers(), request.uri().query());
    if let Some(credential) = presented {
        return match callers.authenticate(&credential) {
            Some(service) => Ok(Some(service)),
            None => Err(callers.failed(peer).into()),
        };
    }
    // A multipart boundary we refuse is answered before the body is read.
    match rewrite::body_kind(request.headers())? {
        BodyKind::Form | BodyKind::Multipart { .. } => Ok(None),
        BodyKind::Other => Err(callers.failed(peer).into()),
    }
}

/// The request with its caller and deadline, which start now.
fn admit<B>(callers: &Callers, mut request: Request<B>, caller: &Caller) -> Request<B> {
    tracing::Span::current().record("service", caller.name());
    let deadline = Deadline::after(Instant::now(), callers.max_wait(caller.id));
    request.extensions_mut().insert(deadline);
    request.extensions_mut().insert(caller.clone());
    request
}

/// The credential a client presented in headers or query: `X-Api-Key`,
/// `Authorization: Bearer`, or the deprecated `access_token` parameter.
fn presented_credential<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Option<Cow<'a, str>> {
    if let Some(key) = headers.get(API_KEY_HEADER).and_then(|value| value.to_str().ok()) {
        return Some(Cow::Borrowed(key.trim()));
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
            return Some(Cow::Borrowed(credential.trim()));
        }
    }
    query
        .and_then(|query| rewrite::find_access_token(query.as_bytes()))
        .map(Cow::Owned)
}

/// The `access_token` of an urlencoded or multipart body.
fn credential_in_body(headers: &HeaderMap, body: &Bytes) -> Option<String> {
    match rewrite::body_kind(headers).ok()? {
        BodyKind::Form => rewrite::find_access_token(body),
        BodyKind::Multipart { boundary } => rewrite::strip_access_token_multipart(body, &boundary).1,
        BodyKind::Other => None,
    }
}

pin_project_lite::pin_project! {
    /// The inner answer, marked with its caller.
    pub struct Tagged<F> {
        #[pin]
        future: F,
        caller: Option<Caller>,
    }
}

impl<F> Future for Tagged<F>
where
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.future.poll(cx))?;
        if let Some(caller) = this.caller.take() {
            response.extensions_mut().insert(caller);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{StubAnswer, callers, marketo_code};
    use http::StatusCode;

    const CRM_KEY: &str = "key-crm-1234567890abcd";

    async fn call<B>(callers: &Arc<Callers>, request: Request<B>) -> (Response<ResponseBody>, StubAnswer)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stub = StubAnswer::default();
        let response = CallerLayer::new(Arc::clone(callers), Arc::new(UnknownBodies::new(1 << 24, 4)))
            .layer(stub.clone())
            .oneshot(request)
            .await
            .unwrap();
        (response, stub)
    }

    fn get(uri: &str) -> http::request::Builder {
        Request::get(uri).extension(Peer(([192, 0, 2, 1], 4000).into()))
    }

    #[tokio::test]
    async fn every_way_of_presenting_a_key_names_the_service() {
        let callers = callers();
        let requests = [
            get("/rest/v1/lead/1.json").header("x-api-key", CRM_KEY),
            get("/rest/v1/lead/1.json").header("authorization", format!("bearer {CRM_KEY}")),
            get(&format!("/rest/v1/lead/1.json?access_token={CRM_KEY}")),
            Request::post("/rest/v1/leads.json").header("content-type", "application/x-www-form-urlencoded"),
        ];
        for (index, request) in requests.into_iter().enumerate() {
            let body = if index == 3 {
                Bytes::from(format!("_method=GET&access_token={CRM_KEY}"))
            } else {
                Bytes::new()
            };
            let (response, stub) = call(&callers, request.body(Full::new(body)).unwrap()).await;
            assert_eq!(response.status(), StatusCode::OK, "way {index}");
            let caller = stub.last::<Caller>().expect("the caller travels down");
            assert_eq!(caller.name(), "crm");
            assert!(stub.last::<Deadline>().is_some());
            assert_eq!(
                response.extensions().get::<Caller>(),
                Some(&caller),
                "and back up"
            );
        }
    }

    #[tokio::test]
    async fn a_body_with_the_only_credential_gets_a_small_allowance() {
        let callers = callers();
        let form = |padding: usize| {
            let body = format!("access_token={CRM_KEY}&padding={}", "a".repeat(padding));
            Request::post("/rest/v1/leads.json")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let (response, stub) = call(&callers, form(UNKNOWN_CALLER_BODY_BYTES - 100)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub.calls(), 1);
        let (response, stub) = call(&callers, form(UNKNOWN_CALLER_BODY_BYTES)).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(stub.calls(), 0);
    }

    #[tokio::test]
    async fn unknown_or_missing_credentials_get_401_and_go_no_further() {
        let callers = callers();
        let requests = [
            get("/rest/v1/lead/1.json"),
            get("/rest/v1/lead/1.json").header("x-api-key", "key-crm-123456789"),
            get("/rest/v1/lead/1.json").header("authorization", format!("Basic {CRM_KEY}")),
            Request::post("/rest/v1/leads.json").header("content-type", "application/x-www-form-urlencoded"),
        ];
        for (index, request) in requests.into_iter().enumerate() {
            let (response, stub) = call(&callers, request.body(Full::default()).unwrap()).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "way {index}");
            assert!(response.extensions().get::<Caller>().is_none());
            assert_eq!(marketo_code(response).await, "601");
            assert_eq!(stub.calls(), 0, "way {index} went through");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_20_kb_multipart_boundary_without_a_header_credential_gets_400_before_the_body_is_read() {
        // The body never arrives: reading it would end in 408, so a 400
        // shows it was neither read nor scanned for a token.
        let silent = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        let boundary = "b".repeat(20 * 1024);
        let request = Request::post("/rest/v1/leads.json")
            .extension(Peer(([192, 0, 2, 1], 4000).into()))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(http_body_util::StreamBody::new(silent))
            .unwrap();
        let (response, stub) = call(&callers(), request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(marketo_code(response).await, "1003");
        assert_eq!(stub.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn form_bodies_that_never_arrive_count_as_failed_attempts_and_get_their_address_throttled() {
        let callers = callers();
        let peer = Peer(([192, 0, 2, 7], 4000).into());
        for _ in 0..10 {
            let silent = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
            let request = Request::post("/rest/v1/leads.json")
                .extension(peer)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(http_body_util::StreamBody::new(silent))
                .unwrap();
            let (response, stub) = call(&callers, request).await;
            assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
            assert_eq!(stub.calls(), 0);
        }
        let wrong = get("/rest/v1/lead/1.json")
            .extension(peer)
            .header("x-api-key", "wrong-key-0123456789012");
        let (response, _) = call(&callers, wrong.body(Full::default()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn an_address_that_failed_too_often_is_throttled_for_wrong_keys_only() {
        let callers = callers();
        for _ in 0..10 {
            let (response, _) = call(
                &callers,
                get("/rest/v1/lead/1.json").body(Full::default()).unwrap(),
            )
            .await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        let wrong = get("/rest/v1/lead/1.json").header("x-api-key", "wrong-key-0123456789012");
        let (response, stub) = call(&callers, wrong.body(Full::default()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(stub.calls(), 0);
        let right = get("/rest/v1/lead/1.json").header("x-api-key", CRM_KEY);
        let (response, stub) = call(&callers, right.body(Full::default()).unwrap()).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "a right key is accepted from a throttled address"
        );
        assert_eq!(stub.calls(), 1);
    }
}
