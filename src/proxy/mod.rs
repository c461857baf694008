//! The request path: a tower stack, one concern per layer, each a
//! `Layer` + `Service` in its own file.
//!
//! # Order
//! [`stack`] composes it, top to bottom. A request passes the layers in
//! this order and its answer comes back up through them:
//!
//! 1. trace (tower-http `TraceLayer`): a span per request naming the
//!    method and path, and, once known below, the service and outcome.
//! 2. [`account`]: every answer counts once by service and outcome; it sits
//!    above everything that can answer, so no answer escapes it.
//! 3. [`ratelimit`]: every answer to a known service says where the
//!    service stands against the window and the day; below the account
//!    and above everything else that can answer, for the same reason.
//! 4. catch panic (tower-http `CatchPanicLayer`): a panic below becomes
//!    Marketo's 611 and the server keeps serving.
//! 5. sensitive headers (tower-http): credentials never show in debug
//!    output, whatever a layer below logs.
//! 6. [`identity`]: the proxy's own `/identity/oauth/token`, answered here
//!    for clients that only know how to talk to Marketo.
//! 7. [`guard`]: method, path and URI size, from the request line alone,
//!    before anything is spent on the request.
//! 8. [`caller`]: who is calling and by when it must be admitted; nothing
//!    unauthenticated goes further.
//! 9. [`body`]: read whole within Marketo's limits (a replay sends it
//!    again), every client credential removed.
//! 10. [`answer`]: Marketo's answer, or the refusal of a layer below, becomes
//!     the response; an answer's body holds its call's slot.
//! 11. [`share`]: a read identical to one queued or in flight waits for its
//!     answer, a cached one is answered at once; above the replays and
//!     admission, so a shared read spends none of either.
//! 12. [`replay`]: the replay policy, around everything one call needs.
//! 13. [`admit`]: the service's queue, then the limits shared with other
//!     replicas.
//! 14. [`authorize`]: Marketo's access token, taken after admission so a
//!     request that waited does not carry a stale one.
//! 15. [`send`]: the call to Marketo.
//!
//! Layers 12 to 15 are [`forward`], with [`crate::bulk::layer`] on top of
//! them for bulk calls; the proxy's own calls (its reading of
//! Marketo's usage report) go through them too. Per-request facts travel
//! in the request's extensions: the guard puts the [`Target`] there, the
//! caller layer the [`Caller`] and the [`Deadline`]; answers carry their
//! [`Outcome`] and caller back up. Below the answer layer they travel
//! typed, in a [`Call`](call::Call), which a replay copies cheaply.
//!
//! [`Target`]: crate::target::Target
//! [`Caller`]: crate::auth::Caller
//! [`Deadline`]: caller::Deadline
//! [`Outcome`]: crate::response::Outcome

pub mod account;
pub mod admit;
pub mod answer;
pub mod authorize;
pub mod body;
pub mod bulk;
pub mod call;
pub mod caller;
pub mod coalesce;
pub mod guard;
pub mod identity;
pub mod ratelimit;
pub mod replay;
pub mod rewrite;
pub mod send;
#[cfg(test)]
pub(crate) mod testing;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::admission::Admission;
use crate::admission::shared::SharedLimits;
use crate::auth::Callers;
use crate::error::{ProxyError, panic_response};
use crate::metrics::Metrics;
use crate::recent::LastHour;
use crate::response::BoxError;
use crate::token::TokenCaches;
use crate::upstream::Upstream;
use admit::{AdmitLayer, Admitted};
use answer::AnswerLayer;
use authorize::AuthorizeLayer;
use body::BodyLayer;
use caller::CallerLayer;
use guard::GuardLayer;
use identity::IdentityLayer;
use replay::ReplayLayer;
use send::SendToMarketo;

/// The calls a request makes to Marketo, as [`crate::proxy::forward`]
/// builds them.
pub type Forward = tower::util::BoxCloneSyncService<call::Call, Admitted, ProxyError>;

/// What the layers are built from; `app.rs` builds each once.
pub struct Components {
    pub callers: Arc<Callers>,
    pub tokens: Arc<TokenCaches>,
    pub admission: Arc<Admission>,
    /// The limits shared with other replicas through Redis, if configured.
    pub limits: Option<Arc<SharedLimits>>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    /// The bound on request-body bytes of known callers held across the
    /// proxy.
    pub body_budget: body::BodyBudget,
    /// The bodies read before their caller is known, bounded apart.
    pub unknown_bodies: Arc<body::UnknownBodies>,
    /// Where Marketo's large answers wait for their clients, and its
    /// bounds.
    pub spooler: Arc<crate::spool::Spooler>,
    /// Local refusals and replays per service over the last hour.
    pub last_hour: Arc<LastHour>,
    /// Answers carry `RateLimit-Policy` and `RateLimit` fields.
    pub ratelimit_headers: bool,
    /// How identical reads share calls.
    pub coalesce: coalesce::CoalesceLayer,
    /// The bulk jobs seen and admission to Marketo's bulk queues.
    pub bulk: Arc<crate::bulk::BulkJobs>,
    /// Every task a layer spawns, stopped with the server.
    pub tasks: crate::tasks::Tasks,
}

/// The whole request path, for the proxy listener.
pub fn stack<B>(
    components: &Components,
) -> impl Service<
    Request<B>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<B>| {
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = request.uri().path(),
                        service = tracing::field::Empty,
                        outcome = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(()),
        )
        .layer(account::AccountLayer::new(
            components.metrics.requests.clone(),
            Arc::clone(&components.last_hour),
        ))
        .layer(ratelimit::RateLimitLayer::new(
            components
                .ratelimit_headers
                .then(|| Arc::clone(&components.admission)),
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            rewrite::API_KEY_HEADER,
            header::COOKIE,
        ]))
        .layer(IdentityLayer::new(
            Arc::clone(&components.callers),
            Arc::clone(&components.unknown_bodies),
        ))
        .layer(GuardLayer)
        .layer(CallerLayer::new(
            Arc::clone(&components.callers),
            Arc::clone(&components.unknown_bodies),
        ))
        .layer(BodyLayer::new(components.body_budget.clone()))
        .layer(AnswerLayer::new(Arc::clone(&components.spooler)))
        .layer(components.coalesce.clone())
        .service(forward(components))
}

/// One [`Call`](call::Call) to Marketo for a request already
/// authenticated and read: replays, admission, token, send.
pub fn forward(
    components: &Components,
) -> impl Service<call::Call, Response = Admitted, Error = ProxyError, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        // Bulk jobs: an enqueue holds its place in Marketo's queue across
        // its replays; a prefix check for every other call.
        .layer(bulk::BulkLayer::new(Arc::clone(&components.bulk)))
        .layer(ReplayLayer::new(
            Arc::clone(&components.admission),
            components.limits.clone(),
            components.metrics.replays.clone(),
            Arc::clone(&components.last_hour),
            components.tasks.clone(),
        ))
        .layer(AdmitLayer::new(
            Arc::clone(&components.admission),
            components.limits.clone(),
            components.tasks.clone(),
        ))
        .layer(AuthorizeLayer::new(Arc::clone(&components.tokens)))
        .service(SendToMarketo::new(
            components.upstream.clone(),
            components.metrics.clone(),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::ResponseBody;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    fn components() -> Components {
        let config = testing::config();
        let metrics = Metrics::new();
        let upstream = Upstream::new(&config.marketo).unwrap();
        let tokens = Arc::new(TokenCaches::new(&config, &upstream, &metrics));
        let admission = Admission::new(&config, metrics.clone());
        let bulk = crate::bulk::BulkJobs::new(
            &config,
            metrics.clone(),
            None,
            admission.marketo_day().clone(),
            crate::tasks::Tasks::new(),
        );
        Components {
            callers: Arc::new(Callers::new(&config, &metrics)),
            coalesce: coalesce::CoalesceLayer::new(&config, tokens.users(), Arc::clone(&admission)),
            tokens,
            admission,
            bulk,
            limits: None,
            upstream,
            metrics,
            body_budget: body::BodyBudget::new(1 << 26),
            unknown_bodies: Arc::new(body::UnknownBodies::new(1 << 22, 4)),
            spooler: crate::spool::Spooler::for_tests(std::time::Duration::from_secs(60)),
            last_hour: Arc::new(LastHour::new(config.counted_names().len())),
            ratelimit_headers: true,
            tasks: crate::tasks::Tasks::new(),
        }
    }

    async fn code_of<B: Body<Data = Bytes>>(body: B) -> String
    where
        B::Error: Into<BoxError>,
    {
        let body = body.collect().await.map_err(Into::into).unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        value["errors"][0]["code"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn refusals_from_every_layer_are_answered_and_counted_once() {
        let components = components();
        let stack = stack::<Full<Bytes>>(&components);
        let cases = [
            (
                Request::get("/rest/v1/lead/1.json"),
                StatusCode::UNAUTHORIZED,
                "601",
            ),
            (Request::get("/other"), StatusCode::NOT_FOUND, "610"),
            (
                Request::patch("/rest/v1/lead/1.json").header("x-api-key", "key-crm-1234567890abcd"),
                StatusCode::METHOD_NOT_ALLOWED,
                "605",
            ),
        ];
        for (request, status, code) in cases {
            let response = stack
                .clone()
                .oneshot(request.body(Full::default()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), status);
            assert_eq!(code_of(response.into_body()).await, code);
        }
        let text = components.metrics.render();
        for line in [
            r#"marketo_proxy_requests_total{outcome="rejected_auth",service="unauthenticated"} 1"#,
            r#"marketo_proxy_requests_total{outcome="rejected_request",service="unauthenticated"} 2"#,
        ] {
            assert!(
                text.lines().any(|metric| metric == line),
                "{line} missing in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_panic_becomes_marketos_611_and_is_counted() {
        let metrics = Metrics::new();
        let panicking = tower::service_fn(|_: Request<()>| async {
            if true {
                panic!("a layer broke");
            }
            Ok::<_, Infallible>(Response::new(ResponseBody::full(Bytes::new())))
        });
        let service = ServiceBuilder::new()
            .layer(account::AccountLayer::new(
                metrics.requests.clone(),
                Arc::new(LastHour::new(1)),
            ))
            .layer(CatchPanicLayer::custom(panic_response))
            .service(panicking);
        let response = service.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(code_of(response.into_body()).await, "611");
        let line = r#"marketo_proxy_requests_total{outcome="internal_error",service="unauthenticated"} 1"#;
        assert!(metrics.render().lines().any(|metric| metric == line));
    }
}
