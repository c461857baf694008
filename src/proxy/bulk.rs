//! The tower layer for bulk calls, around everything one call to Marketo
//! needs (replays, admission, token, send), so that an enqueue holds its
//! place in Marketo's queue across its replays and the proxy's own status
//! calls are seen like any other.
//!
//! A call outside `/bulk/v1/` passes on a prefix check. A bulk call:
//! - creating or enqueuing an export when today's export bytes are spent
//!   is answered locally with 1029 "Export daily quota exceeded";
//! - an enqueue or import waits for a place in its queue ([`BulkJobs::admit`])
//!   and holds it until Marketo has answered;
//! - when Marketo answers that the queue is full anyway (jobs started
//!   outside the proxy), bulk admission to that queue pauses, the jobs are
//!   read again, and the call waits for a place again, within its
//!   deadline: the client sees Marketo's success, or a local 1029 with
//!   `Retry-After` once the deadline has passed;
//! - every answer read whole is given to [`BulkJobs::observe`].

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use tower::{Layer, Service, ServiceExt};

use super::admit::Admitted;
use super::call::Call;
use crate::bulk::BulkJobs;
use crate::bulk::endpoint::{Endpoint, Op, Queue};
use crate::bulk::jobs::says_full;
use crate::error::ProxyError;
use crate::upstream::AnswerBody;

/// Tracks bulk jobs and admits enqueues; see the module documentation.
#[derive(Clone)]
pub struct BulkLayer {
    jobs: Arc<BulkJobs>,
}

impl BulkLayer {
    pub fn new(jobs: Arc<BulkJobs>) -> Self {
        Self { jobs }
    }
}

impl<S> Layer<S> for BulkLayer {
    type Service = BulkAdmit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkAdmit {
            inner,
            jobs: Arc::clone(&self.jobs),
        }
    }
}

#[derive(Clone)]
pub struct BulkAdmit<S> {
    inner: S,
    jobs: Arc<BulkJobs>,
}

impl<S> Service<Call> for BulkAdmit<S>
where
    S: Service<Call, Response = Admitted, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Admitted;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Admitted, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        if !call.target.path.starts_with("/bulk/v1/") {
            return Either::Left(self.inner.call(call));
        }
        let Some(endpoint) = Endpoint::parse(call.request.method(), &call.target.path) else {
            return Either::Left(self.inner.call(call));
        };
        // The clone that was made ready goes with this call.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let jobs = Arc::clone(&self.jobs);
        Either::Right(Box::pin(bulk_call(jobs, inner, endpoint, call)))
    }
}

async fn bulk_call<S>(
    jobs: Arc<BulkJobs>,
    inner: S,
    endpoint: Endpoint,
    call: Call,
) -> Result<Admitted, ProxyError>
where
    S: Service<Call, Response = Admitted, Error = ProxyError> + Clone,
{
    let queue = endpoint.kind.queue();
    let service = call.caller.id.index();
    let starts_export = queue == Queue::Extract && matches!(endpoint.op, Op::Create | Op::Enqueue);
    if starts_export {
        jobs.check_export_bytes().await?;
    }
    if !matches!(endpoint.op, Op::Enqueue | Op::Import) {
        let admitted = inner.oneshot(call).await?;
        let answer = &admitted.answer;
        if endpoint.op == Op::File && answer.head.status.is_success() && answer.error_code.is_none() {
            jobs.file_served(&endpoint, service).await;
        } else {
            jobs.observe(&endpoint, service, whole(&admitted)).await;
        }
        return Ok(admitted);
    }
    loop {
        let place = jobs.admit(queue, service, call.deadline).await?;
        let admitted = inner.clone().oneshot(call.clone()).await?;
        if says_full(queue, whole(&admitted)) {
            // Jobs the proxy has not seen hold the queue: Marketo did not
            // take this one, so it waits for a place again.
            drop(admitted);
            drop(place);
            jobs.marketo_says_full(queue);
            continue;
        }
        jobs.observe(&endpoint, service, whole(&admitted)).await;
        drop(place);
        return Ok(admitted);
    }
}

/// The answer's body when it was read whole.
fn whole(admitted: &Admitted) -> Option<&Bytes> {
    match &admitted.answer.body {
        AnswerBody::Whole(bytes) => Some(bytes),
        AnswerBody::Streaming { .. } => None,
    }
}
