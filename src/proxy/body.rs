//! The request body: read whole within Marketo's limits, so that a replay
//! can send it again, and cleaned of the client's credentials.
//!
//! A body over Marketo's limit (1 MB, 10 MB for bulk imports) is refused
//! with 413 while it arrives, without buffering the rest; one that does
//! not arrive within [`BODY_READ_TIMEOUT`] gets 408; a multipart body whose
//! boundary RFC 2046 does not allow gets 400 before it is read. Every
//! `access_token` (query, urlencoded body, multipart field), the client's
//! credential headers and hop-by-hop headers are removed here, in one
//! linear pass, so nothing below ever sees them. The request leaves as
//! `Request<Bytes>`, its query in the [`Target`] cleaned too.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Either, ready};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt};

use std::net::IpAddr;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::rewrite::{self, BodyKind};
use crate::auth::{AuthError, Callers};
use crate::error::ProxyError;
use crate::marketo::limits::{MAX_BODY_BYTES, MAX_IMPORT_BODY_BYTES};
use crate::response::{BoxError, ResponseBody};
use crate::target::Target;

/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One bound on the request-body bytes held across the proxy, so that
/// slow or large uploads cannot take its memory: a request whose body
/// would pass it is refused (503, Marketo's 608) instead of buffered. A
/// request holds its bytes ([`HeldBytes`]) until it has been answered.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Bytes not held by any request.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// Bodies read before anyone knows who sent them (an old client's
/// `access_token` in a form, client credentials at the identity endpoint):
/// whoever sent them may be nobody, so they have a budget of their own,
/// apart from the bodies of known callers, and only a few are read at once
/// per client address. A read that stalls past [`BODY_READ_TIMEOUT`]
/// counts as a failed attempt to authenticate.
pub struct UnknownBodies {
    budget: BodyBudget,
    per_address: usize,
    reading: DashMap<IpAddr, usize>,
}

impl UnknownBodies {
    pub fn new(bytes: usize, per_address: usize) -> Self {
        Self {
            budget: BodyBudget::new(bytes),
            per_address,
            reading: DashMap::new(),
        }
    }

    /// Reads the body `peer` sent, within `limit` bytes (see
    /// [`read_within`]). The bytes are not held past the read: once the
    /// caller is known, the body counts in its own budget.
    pub async fn read<B>(
        &self,
        peer: IpAddr,
        body: B,
        limit: usize,
        callers: &Callers,
    ) -> Result<Bytes, ProxyError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let _reading = self.start(peer)?;
        match read_within(body, limit, &self.budget).await {
            Ok((body, _)) => Ok(body),
            Err(error @ ProxyError::BodyTimeout(_)) => match callers.failed(peer) {
                throttled @ AuthError::Throttled { .. } => Err(throttled.into()),
                AuthError::Unauthenticated => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    fn start(&self, peer: IpAddr) -> Result<Reading<'_>, ProxyError> {
        let mut reading = self.reading.entry(peer).or_insert(0);
        if *reading >= self.per_address {
            return Err(ProxyError::Busy {
                what: "unauthenticated request bodies from this address",
                retry_after: BUSY_RETRY_AFTER,
            });
        }
        *reading += 1;
        Ok(Reading { bodies: self, peer })
    }
}

/// One body of an unknown caller being read; counted for its address.
struct Reading<'a> {
    bodies: &'a UnknownBodies,
    peer: IpAddr,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if let Entry::Occupied(mut reading) = self.bodies.reading.entry(self.peer) {
            *reading.get_mut() -= 1;
            if *reading.get() == 0 {
                reading.remove();
            }
        }
    }
}

/// The part of the [`BodyBudget`] a request's body holds.
#[derive(Debug, Clone)]
pub struct HeldBytes(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Reads request bodies whole and cleans requests of credentials.
#[derive(Debug, Clone)]
pub struct BodyLayer {
    budget: BodyBudget,
}

impl BodyLayer {
    pub fn new(budget: BodyBudget) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for BodyLayer {
    type Service = ReadBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadBody {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadBody<S> {
    inner: S,
    budget: BodyBudget,
}

impl<S, B> Service<Request<B>> for ReadBody<S>
where
    S: Service<Request<Bytes>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        // Reading is boxed apart, so that the request waiting below does
        // not carry the reading's state (nor a copy of the request).
        Box::pin(
            Box::pin(clean(request, self.budget.clone())).then(move |cleaned| match cleaned {
                Ok(request) => Either::Left(inner.oneshot(request)),
                Err(error) => Either::Right(ready(Ok(error.into_response()))),
            }),
        )
    }
}

/// The request read whole and without the client's credentials.
async fn clean<B>(request: Request<B>, budget: BodyBudget) -> Result<Request<Bytes>, ProxyError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let limit = match parts.extensions.get::<Target>() {
        Some(target) if target.is_bulk_import() => MAX_IMPORT_BODY_BYTES,
        _ => MAX_BODY_BYTES,
    };
    // Before the body is read: a boundary we refuse costs nothing.
    let kind = rewrite::body_kind(&parts.headers)?;
    let (body, held) = read_within(body, limit, &budget).await?;
    if let Some(held) = held {
        parts.extensions.insert(held);
    }
    let body = match kind {
        BodyKind::Form if rewrite::find_access_token(&body).is_some() => {
            Bytes::from(rewrite::strip_access_token_bytes(&body))
        }
        BodyKind::Multipart { boundary } => rewrite::strip_access_token_multipart(&body, &boundary).0,
        BodyKind::Form | BodyKind::Other => body,
    };
    rewrite::request_headers(&mut parts.headers);
    if let Some(target) = parts.extensions.get_mut::<Target>() {
        target.query = target
            .query
            .as_deref()
            .map(rewrite::strip_access_token_pairs)
            .filter(|query| !query.is_empty());
    }
    Ok(Request::from_parts(parts, body))
}

/// Reads a request body whole (a replay must be able to send it again),
/// within `limit` bytes, [`BODY_READ_TIMEOUT`] and what is left of the
/// proxy's `budget`; returns the bytes and the part of the budget they
/// hold (none for an empty body).
pub async fn read_within<B>(
    body: B,
    limit: usize,
    budget: &BodyBudget,
) -> Result<(Bytes, Option<HeldBytes>), ProxyError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let reading = async {
        let mut body = std::pin::pin!(body);
        let mut parts: Vec<Bytes> = Vec::new();
        let mut length = 0;
        let mut held: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let Ok(mut data) = frame
                .map_err(|error| ProxyError::BodyUnreadable(error.into()))?
                .into_data()
            else {
                continue;
            };
            let data = data.copy_to_bytes(data.remaining());
            length += data.len();
            if length > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            if data.is_empty() {
                continue;
            }
            let bytes = u32::try_from(data.len()).map_err(|_| ProxyError::BodyTooLarge { limit })?;
            let permit =
                Arc::clone(&budget.0)
                    .try_acquire_many_owned(bytes)
                    .map_err(|_| ProxyError::Busy {
                        what: "request bodies",
                        retry_after: BUSY_RETRY_AFTER,
                    })?;
            match held.as_mut() {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            parts.push(data);
        }
        let body = match parts.len() {
            0 => Bytes::new(),
            1 => parts.swap_remove(0),
            _ => Bytes::from(parts.concat()),
        };
        Ok((body, held.map(|held| HeldBytes(Arc::new(held)))))
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, reading)
        .await
        .map_err(|_| ProxyError::BodyTimeout(BODY_READ_TIMEOUT))?
}

/// How long a client refused for want of buffer space is asked to wait.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{StubAnswer, marketo_code};
    use crate::response::Outcome;
    use http::StatusCode;
    use http_body_util::Full;

    async fn cleaned<B>(request: Request<B>) -> (Response<ResponseBody>, StubAnswer)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stub = StubAnswer::default();
        let (mut parts, body) = request.into_parts();
        let target = crate::target::normalise(parts.uri.path(), parts.uri.query()).unwrap();
        parts.extensions.insert(target);
        let inner = stub
            .clone()
            .map_request(|request: Request<Bytes>| request.map(Full::new));
        let response = BodyLayer::new(BodyBudget::new(32 << 20))
            .layer(inner)
            .oneshot(Request::from_parts(parts, body))
            .await
            .unwrap();
        (response, stub)
    }

    #[tokio::test]
    async fn removes_every_client_credential_and_keeps_the_rest() {
        let request = Request::post("/rest/v1/leads.json?access_token=abc&_method=GET")
            .header("x-api-key", "key")
            .header("authorization", "Bearer key")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-kept", "yes")
            .body(Full::new(Bytes::from_static(
                b"filterType=id&access_token=abc&filterValues=1",
            )))
            .unwrap();
        let (response, stub) = cleaned(request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (parts, body) = stub.last_request().unwrap();
        assert_eq!(&body[..], b"filterType=id&filterValues=1");
        for gone in ["x-api-key", "authorization", "connection", "x-hop"] {
            assert!(!parts.headers.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(parts.headers["x-kept"], "yes");
        let target = parts.extensions.get::<Target>().unwrap();
        assert_eq!(target.query.as_deref(), Some("_method=GET"));
    }

    #[tokio::test]
    async fn a_query_of_only_the_token_leaves_none() {
        let request = Request::get("/rest/v1/lead/1.json?access_token=abc")
            .body(Full::default())
            .unwrap();
        let (_, stub) = cleaned(request).await;
        assert_eq!(stub.last::<Target>().unwrap().query, None);
    }

    #[tokio::test]
    async fn refuses_bodies_over_marketos_limit_with_413() {
        let body = Bytes::from(vec![b'a'; MAX_BODY_BYTES + 1]);
        let request = Request::post("/rest/v1/leads.json")
            .body(Full::new(body.clone()))
            .unwrap();
        let (response, stub) = cleaned(request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(marketo_code(response).await, "413");
        assert_eq!(stub.calls(), 0);
        // A bulk import may be ten times larger.
        let request = Request::post("/bulk/v1/leads.json")
            .body(Full::new(body))
            .unwrap();
        let (response, stub) = cleaned(request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub.last_request().unwrap().1.len(), MAX_BODY_BYTES + 1);
    }

    #[tokio::test]
    async fn bodies_hold_their_bytes_of_the_budget_until_dropped() {
        let budget = BodyBudget::new(100);
        let body = || Full::new(Bytes::from(vec![b'a'; 60]));
        let (_, first) = read_within(body(), 1000, &budget).await.unwrap();
        assert_eq!(budget.available(), 40);
        let refused = read_within(body(), 1000, &budget).await;
        assert!(matches!(refused, Err(ProxyError::Busy { .. })), "{refused:?}");
        let response = refused.unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(marketo_code(response).await, "608");
        assert_eq!(budget.available(), 40, "a refused body holds nothing");
        drop(first);
        assert_eq!(budget.available(), 100);
        let (_, again) = read_within(body(), 1000, &budget).await.unwrap();
        assert!(again.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_20_kb_multipart_boundary_is_refused_with_400_before_the_body_is_read() {
        // The body never arrives: reading it would end in 408, so a 400
        // shows it was neither read nor scanned.
        let boundary = "b".repeat(20 * 1024);
        let request = Request::post("/rest/v1/leads.json")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(never_arrives())
            .unwrap();
        let (response, stub) = cleaned(request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.extensions().get::<Outcome>(),
            Some(&Outcome("rejected_request"))
        );
        assert_eq!(marketo_code(response).await, "1003");
        assert_eq!(stub.calls(), 0);
    }

    fn never_arrives() -> impl Body<Data = Bytes, Error = Infallible> + Send + 'static {
        let silent = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        http_body_util::StreamBody::new(silent)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_gets_408() {
        let result = read_within(never_arrives(), 10, &BodyBudget::new(10)).await;
        assert!(matches!(result, Err(ProxyError::BodyTimeout(_))), "{result:?}");
    }
}
