//! Accounting: every answer the proxy gives, whoever wrote it, counts once
//! in `marketo_proxy_requests_total` under its service and outcome, read
//! from the answer's extensions (the caller layer puts the [`Caller`]
//! there, whoever wrote the answer its [`Outcome`]). Answers to callers not
//! known count under `unauthenticated`. The outcome is also recorded in
//! the request's span, and a local 606/607 (a [`Refusal`] among the
//! extensions) in its service's last hour, for the status page.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use prometheus::IntCounterVec;
use tower::{Layer, Service};

use crate::auth::Caller;
use crate::recent::{LastHour, Refusal};
use crate::response::Outcome;

/// The service label of requests whose caller is not known.
pub const NO_SERVICE: &str = crate::config::UNAUTHENTICATED;

/// Counts answers by service and outcome.
#[derive(Clone)]
pub struct AccountLayer {
    counters: Counters,
}

impl AccountLayer {
    pub fn new(requests: IntCounterVec, last_hour: Arc<LastHour>) -> Self {
        Self {
            counters: Counters { requests, last_hour },
        }
    }
}

/// Where answers are counted.
#[derive(Clone)]
pub struct Counters {
    /// `marketo_proxy_requests_total`.
    requests: IntCounterVec,
    /// Local refusals per service, for the status page.
    last_hour: Arc<LastHour>,
}

impl<S> Layer<S> for AccountLayer {
    type Service = Account<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Account {
            inner,
            counters: self.counters.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Account<S> {
    inner: S,
    counters: Counters,
}

impl<S, B, R> Service<Request<B>> for Account<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Counted {
            future: self.inner.call(request),
            counters: Some(self.counters.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Counted<F> {
        #[pin]
        future: F,
        counters: Option<Counters>,
    }
}

impl<F, R, E> Future for Counted<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        if let (Ok(response), Some(counters)) = (&result, this.counters.take()) {
            let extensions = response.extensions();
            let caller = extensions.get::<Caller>();
            let outcome = extensions.get::<Outcome>().copied().unwrap_or(Outcome::OK);
            tracing::Span::current().record("outcome", outcome.0);
            match caller {
                Some(caller) if outcome == Outcome::OK => caller.series.requests_ok.inc(),
                _ => {
                    let service = caller.map_or(NO_SERVICE, Caller::name);
                    counters.requests.with_label_values(&[service, outcome.0]).inc();
                }
            }
            if let (Some(caller), Some(refusal)) = (caller, extensions.get::<Refusal>()) {
                counters.last_hour.refused(caller.id.index(), *refusal);
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::proxy::testing;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// Answers with whatever extensions the request asks for.
    async fn answer(request: Request<()>) -> Result<Response<()>, Infallible> {
        let mut response = Response::new(());
        *response.extensions_mut() = request.extensions().clone();
        Ok(response)
    }

    #[tokio::test]
    async fn counts_every_answer_once_by_service_and_outcome() {
        let metrics = Metrics::new();
        let last_hour = Arc::new(LastHour::new(2));
        let service = AccountLayer::new(metrics.requests.clone(), Arc::clone(&last_hour))
            .layer(tower::service_fn(answer));
        let callers = testing::callers_counting_in(&metrics);
        let crm = callers.caller(callers.service(0).expect("crm"));
        let requests = [
            Request::builder().extension(crm.clone()).extension(Outcome::OK),
            Request::builder().extension(crm.clone()).extension(Outcome::OK),
            Request::builder()
                .extension(crm.clone())
                .extension(Outcome::MARKETO_ERROR),
            Request::builder()
                .extension(crm)
                .extension(Outcome("rejected_quota"))
                .extension(Refusal::Quota),
            Request::builder().extension(Outcome("rejected_auth")),
            Request::builder().extension(Outcome::INTERNAL_ERROR),
        ];
        for request in requests {
            service.clone().oneshot(request.body(()).unwrap()).await.unwrap();
        }
        let text = metrics.render();
        for line in [
            r#"marketo_proxy_requests_total{outcome="ok",service="crm"} 2"#,
            r#"marketo_proxy_requests_total{outcome="marketo_error",service="crm"} 1"#,
            r#"marketo_proxy_requests_total{outcome="rejected_quota",service="crm"} 1"#,
            r#"marketo_proxy_requests_total{outcome="rejected_auth",service="unauthenticated"} 1"#,
            r#"marketo_proxy_requests_total{outcome="internal_error",service="unauthenticated"} 1"#,
        ] {
            assert!(
                text.lines().any(|metric| metric == line),
                "{line} missing in\n{text}"
            );
        }
        // The local 607 also counts in crm's last hour, and nothing else.
        let counts = last_hour.counts();
        assert_eq!((counts[0].refused_quota, counts[0].refused_rate), (1, 0));
        assert_eq!(counts[1], Default::default());
    }
}
