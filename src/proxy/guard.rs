//! The request guard: what may be forwarded at all, decided from the
//! request line alone, before anything is spent on the request.
//!
//! Only the methods Marketo's REST API knows (others get Marketo's 605),
//! only `/rest/...` and `/bulk/...` with dot-segments resolved (610
//! otherwise), no `;` path parameter, encoded `/` or `\`, or `%2e`
//! dot-segment (400 with 1003; see [`crate::target`]), and no URI longer
//! than Marketo takes (414). The [`Target`] goes into the request's
//! extensions for the layers below.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Method, Request, Response};
use tower::{Layer, Service};

use crate::error::ProxyError;
use crate::marketo::limits::MAX_URI_BYTES;
use crate::response::ResponseBody;
use crate::target::{self, Target};

/// Refuses what may not be forwarded; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardLayer;

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Self::Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match check(&request) {
            Ok(target) => {
                request.extensions_mut().insert(target);
                Either::Right(self.inner.call(request))
            }
            Err(error) => Either::Left(ready(Ok(error.into_response()))),
        }
    }
}

/// Where the request may go, or why it may not.
fn check<B>(request: &Request<B>) -> Result<Target, ProxyError> {
    let method = request.method();
    if !matches!(*method, Method::GET | Method::POST | Method::PUT | Method::DELETE) {
        return Err(ProxyError::Method(method.clone()));
    }
    let uri = request.uri();
    let target = target::normalise(uri.path(), uri.query())?;
    let length = uri.path_and_query().map_or(0, |target| target.as_str().len());
    if length > MAX_URI_BYTES {
        return Err(ProxyError::UriTooLong { limit: MAX_URI_BYTES });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{StubAnswer, marketo_code};
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::Full;
    use tower::ServiceExt;

    async fn guarded(method: Method, uri: &str) -> (Response<ResponseBody>, Option<Target>) {
        let stub = StubAnswer::default();
        let response = GuardLayer
            .layer(stub.clone())
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        (response, stub.last::<Target>())
    }

    #[tokio::test]
    async fn forwards_rest_and_bulk_paths_with_their_target() {
        let (response, target) = guarded(Method::GET, "/rest/../bulk/v1/leads/export/create.json?a=1").await;
        assert_eq!(response.status(), StatusCode::OK);
        let target = target.expect("the target travels in the extensions");
        assert_eq!(target.path, "/bulk/v1/leads/export/create.json");
        assert_eq!(target.query.as_deref(), Some("a=1"));
    }

    #[tokio::test]
    async fn refuses_methods_marketo_does_not_know_with_605() {
        for method in ["TRACE", "CONNECT", "PROPFIND", "PATCH", "OPTIONS"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let (response, target) = guarded(method.clone(), "/rest/v1/lead/1.json").await;
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(response.headers()["allow"], "GET, POST, PUT, DELETE");
            assert_eq!(marketo_code(response).await, "605");
            assert!(target.is_none(), "{method} went through");
        }
    }

    #[tokio::test]
    async fn refuses_paths_outside_the_api_with_610() {
        let (response, target) = guarded(Method::GET, "/rest/../identity/oauth/token").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(marketo_code(response).await, "610");
        assert!(target.is_none());
    }

    #[tokio::test]
    async fn refuses_uris_over_8_kb_with_414() {
        let at_limit = format!("/rest/v1/leads.json?f={}", "a".repeat(MAX_URI_BYTES - 22));
        assert_eq!(at_limit.len(), MAX_URI_BYTES);
        let (response, _) = guarded(Method::GET, &at_limit).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (response, target) = guarded(Method::GET, &format!("{at_limit}a")).await;
        assert_eq!(response.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(marketo_code(response).await, "414");
        assert!(target.is_none());
    }
}
