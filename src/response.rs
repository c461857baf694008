//! The bodies of the proxy's answers and the facts that travel back up the
//! stack with them.
//!
//! Inside the request stack every answer has a [`ResponseBody`]: Marketo's
//! answer as it streams in, or a body the proxy wrote itself. An answer
//! from Marketo carries its call's [`Slot`] until the body has been passed
//! on in full or dropped, so a call holds its concurrency slot while
//! Marketo's answer is still on its way to the client, and no longer. A
//! streamed answer that the client stops reading gives its slot up after a
//! while: a slow client must not hold one of the instance's few slots.
//!
//! The stack's outer layer boxes the body once into [`ProxyBody`].

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;

use crate::admission::Slot;
use crate::marketo;
use crate::upstream::{AnswerBody, PassThrough, StreamError};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The body of every answer the server sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What became of a request, the `outcome` label of
/// `marketo_proxy_requests_total`. Whoever writes an answer puts it in the
/// answer's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

impl Outcome {
    pub const OK: Self = Self("ok");
    /// Marketo answered with an error (a `success:false` envelope or an
    /// HTTP error status), passed on as it was.
    pub const MARKETO_ERROR: Self = Self("marketo_error");
    /// A layer panicked; the client got a 611.
    pub const INTERNAL_ERROR: Self = Self("internal_error");
}

pin_project_lite::pin_project! {
    /// The body of an answer inside the request stack: Marketo's (peeked
    /// bytes, then the rest as it arrives) holding its call's slot, or one
    /// the proxy wrote.
    pub struct ResponseBody {
        #[pin]
        body: PassThrough,
        slot: Option<Arc<HeldSlot>>,
    }
}

impl ResponseBody {
    /// A body the proxy wrote itself.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            body: AnswerBody::Whole(bytes).into_body(),
            slot: None,
        }
    }

    /// Marketo's answer, holding `slot` until it has been passed on. A
    /// streamed answer that the client reads nothing of for `idle` gives
    /// the slot up.
    pub fn answer(body: AnswerBody, slot: Option<Slot>, idle: Duration) -> Self {
        let streamed = matches!(body, AnswerBody::Streaming { .. });
        let slot = slot.map(|slot| {
            Arc::new(HeldSlot {
                slot: Mutex::new(Some(slot)),
                progress: AtomicU64::new(0),
            })
        });
        if let (true, Some(held)) = (streamed, &slot) {
            watch_progress(Arc::downgrade(held), idle);
        }
        Self {
            body: body.into_body(),
            slot,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Some(held) = this.slot.as_ref() {
            match &polled {
                Poll::Ready(Some(Ok(_))) => {
                    held.progress.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(None | Some(Err(_))) => held.release(),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The slot of an answer being passed on, shared (weakly) with the
/// watchdog of a streamed answer. Dropping the body drops the slot.
struct HeldSlot {
    slot: Mutex<Option<Slot>>,
    /// Frames passed on so far.
    progress: AtomicU64,
}

impl HeldSlot {
    fn release(&self) {
        let slot = self
            .slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(slot);
    }

    fn is_held(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }
}

/// Releases the slot of a streamed answer whose client read nothing for
/// `idle`. Ends with the answer.
fn watch_progress(held: Weak<HeldSlot>, idle: Duration) {
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

/// A Marketo-shaped error answer, with `Retry-After` when given.
pub fn marketo_error(
    status: StatusCode,
    marketo_code: &str,
    message: &str,
    retry_after: Option<Duration>,
) -> Response<ResponseBody> {
    let body = marketo::error_body(&marketo::request_id(), marketo_code, message);
    let mut response = json_response(status, body);
    if let Some(wait) = retry_after {
        // Whole seconds, rounded up: waiting less would be refused again.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

/// A JSON answer written by the proxy itself.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Admission;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use http_body_util::BodyExt;
    use tokio::time::Instant;

    fn one_service_admission() -> Arc<Admission> {
        let config = Config::from_yaml_with_env(
            "marketo: { base_url: 'http://127.0.0.1:1', client_id: a, client_secret: b }\n\
             services: [{ name: s, api_key: key-s-0123456789 }]\nstate: { file: ~ }",
            |_| None,
        )
        .unwrap();
        Admission::new(&config, Metrics::new())
    }

    async fn answered_slot(admission: &Arc<Admission>) -> Slot {
        let permit = admission
            .admit(0, Instant::now() + Duration::from_secs(1), false)
            .await
            .unwrap();
        let mut slot = Slot::local(permit);
        slot.answered().await;
        slot
    }

    #[tokio::test]
    async fn the_concurrency_slot_is_held_until_the_body_has_been_sent() {
        let admission = one_service_admission();
        let slot = answered_slot(&admission).await;
        let mut body = std::pin::pin!(ResponseBody::answer(
            AnswerBody::Whole(Bytes::from_static(b"part")),
            Some(slot),
            Duration::from_secs(60),
        ));
        assert_eq!(
            admission.snapshot().in_flight,
            1,
            "the answer's head is not enough"
        );
        assert!(body.frame().await.is_some());
        assert_eq!(admission.snapshot().in_flight, 1, "nor is its last frame");
        assert!(body.frame().await.is_none());
        assert_eq!(admission.snapshot().in_flight, 0, "the body ended");
    }

    #[tokio::test]
    async fn dropping_an_unsent_answer_frees_its_slot() {
        let admission = one_service_admission();
        let slot = answered_slot(&admission).await;
        let body = ResponseBody::answer(
            AnswerBody::Whole(Bytes::from_static(b"{}")),
            Some(slot),
            Duration::from_secs(60),
        );
        assert_eq!(admission.snapshot().in_flight, 1);
        drop(body);
        assert_eq!(admission.snapshot().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_a_streamed_answer_loses_its_slot() {
        let admission = one_service_admission();
        let slot = answered_slot(&admission).await;
        let held = Arc::new(HeldSlot {
            slot: Mutex::new(Some(slot)),
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
