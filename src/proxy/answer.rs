//! The answer the client gets: Marketo's, without hop-by-hop headers and
//! with a body that holds the call's slot until it has been passed on (see
//! [`ResponseBody`]), or the proxy's own refusal when no call could be
//! made or none answered.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::admit::Admitted;
use super::call::Call;
use super::rewrite;
use crate::error::ProxyError;
use crate::response::{Outcome, ResponseBody};
use crate::spool::Spooler;

/// Turns Marketo's answers and refusals into responses.
#[derive(Clone)]
pub struct AnswerLayer {
    /// Where a streamed answer is read into its spool.
    spooler: Arc<Spooler>,
}

impl AnswerLayer {
    pub fn new(spooler: Arc<Spooler>) -> Self {
        Self { spooler }
    }
}

impl<S> Layer<S> for AnswerLayer {
    type Service = ToResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ToResponse {
            inner,
            spooler: Arc::clone(&self.spooler),
        }
    }
}

#[derive(Clone)]
pub struct ToResponse<S> {
    inner: S,
    spooler: Arc<Spooler>,
}

impl<S> Service<Request<Bytes>> for ToResponse<S>
where
    S: Service<Call, Response = Admitted, Error = ProxyError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Answering<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The services below are always ready; an error here would be one
        // more refusal to answer.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        match Call::from_request(request) {
            Ok(call) => Answering::Calling {
                future: self.inner.call(call),
                spooler: Arc::clone(&self.spooler),
            },
            Err(error) => Answering::Refused {
                response: Some(error.into_response()),
            },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = AnsweringProjection]
    pub enum Answering<F> {
        Calling {
            #[pin]
            future: F,
            spooler: Arc<Spooler>,
        },
        Refused {
            response: Option<Response<ResponseBody>>,
        },
    }
}

impl<F> Future for Answering<F>
where
    F: Future<Output = Result<Admitted, ProxyError>>,
{
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            AnsweringProjection::Calling { future, spooler } => match std::task::ready!(future.poll(cx)) {
                Ok(admitted) => respond(admitted, spooler),
                Err(error) => error.into_response(),
            },
            AnsweringProjection::Refused { response } => match response.take() {
                Some(response) => response,
                None => ProxyError::Admission(crate::admission::AdmissionError::Closed).into_response(),
            },
        };
        Poll::Ready(Ok(response))
    }
}

/// Marketo's answer as the client gets it.
fn respond(admitted: Admitted, spooler: &Arc<Spooler>) -> Response<ResponseBody> {
    let Admitted { answer, slot } = admitted;
    let mut head = answer.head;
    rewrite::strip_hop_by_hop(&mut head.headers);
    let outcome = if answer.error_code.is_some() || !head.status.is_success() {
        Outcome::MARKETO_ERROR
    } else {
        Outcome::OK
    };
    head.extensions.insert(outcome);
    Response::from_parts(head, ResponseBody::answer(answer.body, slot, spooler))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{Scripted, ScriptedAdmitted, ScriptedMarketo, marketo_code};
    use http::StatusCode;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tower::ServiceExt;

    fn answering(script: Vec<Scripted>) -> ToResponse<ScriptedAdmitted> {
        AnswerLayer::new(Spooler::for_tests(Duration::from_secs(60)))
            .layer(ScriptedAdmitted(ScriptedMarketo::new(script)))
    }

    fn request() -> Request<Bytes> {
        let call = crate::proxy::testing::call(0, Duration::from_secs(5));
        let mut request = Request::get("/rest/v1/lead/1.json").body(Bytes::new()).unwrap();
        request.extensions_mut().insert(call.target);
        request.extensions_mut().insert(call.caller);
        request
    }

    #[tokio::test]
    async fn marketo_answers_pass_with_their_outcome_and_without_hop_by_hop_headers() {
        let ok = answering(vec![]).oneshot(request()).await.unwrap();
        assert_eq!(ok.extensions().get::<Outcome>(), Some(&Outcome::OK));
        assert!(!ok.headers().contains_key("connection"));
        assert_eq!(ok.headers()["content-type"], "application/json");
        assert_eq!(
            &ok.into_body().collect().await.unwrap().to_bytes()[..],
            br#"{"requestId":"x#1","result":[],"success":true}"#
        );
        let refused = answering(vec![Scripted::Answer(StatusCode::OK, Some("603"))])
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::OK);
        assert_eq!(
            refused.extensions().get::<Outcome>(),
            Some(&Outcome::MARKETO_ERROR)
        );
        assert_eq!(marketo_code(refused).await, "603");
    }

    #[tokio::test]
    async fn a_refusal_becomes_a_marketo_shaped_answer() {
        let quota = || {
            ProxyError::Admission(crate::admission::AdmissionError::Quota {
                scope: crate::admission::quota::QuotaScope::Instance,
                retry_after: Duration::from_secs(90),
            })
        };
        let response = answering(vec![Scripted::Fail(quota)])
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["retry-after"], "90");
        assert_eq!(
            response.extensions().get::<Outcome>(),
            Some(&Outcome("rejected_quota"))
        );
        assert_eq!(marketo_code(response).await, "607");
    }
}
