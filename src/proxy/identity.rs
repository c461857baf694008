//! The proxy's own `/identity/oauth/token`, for integrations that only
//! know how to talk to Marketo: they send the service's *proxy* client id
//! and secret (query or form body, GET or POST, as Marketo accepts) and
//! get a proxy-issued token in Marketo's shape. Every other request goes
//! on down the stack.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower::{Layer, Service};

use super::body::UnknownBodies;
use crate::auth::{AuthError, Callers};
use crate::error::ProxyError;
use crate::marketo::IdentityError;
use crate::response::{BoxError, Outcome, ResponseBody, json_response};
use crate::server::Peer;

/// Where Marketo's clients ask for a token.
pub const IDENTITY_PATH: &str = "/identity/oauth/token";

/// The most a token request's body may hold: a grant type, a client id
/// and a secret take a few hundred bytes, and whoever sends it is not
/// known yet.
pub const IDENTITY_BODY_BYTES: usize = 8 * 1024;

/// Answers `/identity/oauth/token`; see the module documentation.
#[derive(Clone)]
pub struct IdentityLayer {
    callers: Arc<Callers>,
    bodies: Arc<UnknownBodies>,
}

impl IdentityLayer {
    pub fn new(callers: Arc<Callers>, bodies: Arc<UnknownBodies>) -> Self {
        Self { callers, bodies }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = Identity<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Identity {
            inner,
            callers: Arc::clone(&self.callers),
            bodies: Arc::clone(&self.bodies),
        }
    }
}

#[derive(Clone)]
pub struct Identity<S> {
    inner: S,
    callers: Arc<Callers>,
    /// Token requests come from callers not known yet.
    bodies: Arc<UnknownBodies>,
}

impl<S, B> Service<Request<B>> for Identity<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Self::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.uri().path() != IDENTITY_PATH {
            return Either::Left(self.inner.call(request));
        }
        let callers = Arc::clone(&self.callers);
        let bodies = Arc::clone(&self.bodies);
        Either::Right(Box::pin(
            async move { Ok(issue(&callers, &bodies, request).await) },
        ))
    }
}

/// A token for the service whose client credentials came with `request`.
async fn issue<B>(callers: &Callers, bodies: &UnknownBodies, request: Request<B>) -> Response<ResponseBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let peer = Peer::ip_of(&request);
    let (parts, body) = request.into_parts();
    let mut params: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|query| form_urlencoded::parse(query.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if parts.method == Method::POST {
        match bodies.read(peer, body, IDENTITY_BODY_BYTES, callers).await {
            Ok(body) => params.extend(form_urlencoded::parse(&body).into_owned()),
            Err(error) => return error.into_response(),
        }
    } else if parts.method != Method::GET {
        return identity_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "Use GET or POST",
            Outcome("rejected_request"),
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
            Outcome("rejected_request"),
        );
    }
    match callers.issue_token(param("client_id"), param("client_secret")) {
        Some((service, answer)) => {
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            let mut response = json_response(StatusCode::OK, Bytes::from(body));
            response.extensions_mut().insert(Outcome::OK);
            response.extensions_mut().insert(callers.caller(service));
            response
        }
        None => match callers.failed(peer) {
            throttled @ AuthError::Throttled { .. } => ProxyError::from(throttled).into_response(),
            AuthError::Unauthenticated => identity_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Bad client credentials",
                Outcome("rejected_auth"),
            ),
        },
    }
}

fn identity_error(
    status: StatusCode,
    error: &str,
    description: &str,
    outcome: Outcome,
) -> Response<ResponseBody> {
    let body = serde_json::to_vec(&IdentityError {
        error: error.to_owned(),
        error_description: description.to_owned(),
    })
    .unwrap_or_default();
    let mut response = json_response(status, Bytes::from(body));
    response.extensions_mut().insert(outcome);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Caller;
    use crate::marketo::TokenAnswer;
    use crate::proxy::testing::{StubAnswer, callers};
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    async fn call(
        callers: &Arc<Callers>,
        request: Request<Full<Bytes>>,
    ) -> (Response<ResponseBody>, StubAnswer) {
        let stub = StubAnswer::default();
        let response = IdentityLayer::new(Arc::clone(callers), Arc::new(UnknownBodies::new(1 << 20, 4)))
            .layer(stub.clone())
            .oneshot(request)
            .await
            .unwrap();
        (response, stub)
    }

    async fn token(response: Response<ResponseBody>) -> TokenAnswer {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn issues_the_same_token_by_get_and_by_post_form() {
        let callers = callers();
        let uri = "/identity/oauth/token?grant_type=client_credentials&client_id=crm-id&client_secret=crm-secret-0123456789";
        let (response, stub) = call(&callers, Request::get(uri).body(Full::default()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub.calls(), 0, "answered here");
        assert_eq!(
            response.extensions().get::<Caller>().map(|caller| caller.name()),
            Some("crm")
        );
        let by_get = token(response).await;
        assert_eq!(by_get.scope, "crm");
        let form = "grant_type=client_credentials&client_id=crm-id&client_secret=crm-secret-0123456789";
        let request = Request::post(IDENTITY_PATH)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .unwrap();
        let (response, _) = call(&callers, request).await;
        assert_eq!(token(response).await.access_token, by_get.access_token);
    }

    #[tokio::test]
    async fn refuses_bad_credentials_as_marketo_does() {
        let callers = callers();
        let uri = "/identity/oauth/token?grant_type=client_credentials&client_id=crm-id&client_secret=wrong";
        let (response, _) = call(&callers, Request::get(uri).body(Full::default()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.extensions().get::<Outcome>(),
            Some(&Outcome("rejected_auth"))
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"], "invalid_client");
    }

    #[tokio::test]
    async fn other_paths_go_down_the_stack() {
        let callers = callers();
        let (response, stub) = call(
            &callers,
            Request::get("/rest/v1/lead/1.json")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub.calls(), 1);
    }
}
