//! The bodies of the proxy's answers and the facts that travel back up the
//! stack with them.
//!
//! Inside the request stack every answer has a [`ResponseBody`]: bytes
//! already whole, or Marketo's large answer coming out of its spool (see
//! [`crate::spool`]). Either way a call's [`Slot`] is free as soon as
//! Marketo has finished sending, whatever pace the client reads at.
//!
//! The stack's outer layer boxes the body once into [`ProxyBody`].

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;

use crate::admission::Slot;
use crate::marketo;
use crate::spool::{SpoolReader, Spooler, spool};
use crate::upstream::AnswerBody;

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

/// The body of an answer inside the request stack: bytes already whole
/// (the proxy's own answers, and Marketo's small ones), or Marketo's large
/// answer as it comes out of its spool.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Whole(Option<Bytes>),
    Spooled(SpoolReader),
}

impl ResponseBody {
    /// A body the proxy wrote itself.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Whole(Some(bytes).filter(|bytes| !bytes.is_empty())),
        }
    }

    /// Marketo's answer. A whole one has ended, so its call's slot is free
    /// now; the rest of a streamed one is read into a spool at Marketo's
    /// pace, and the slot is free when Marketo has sent it all (within the
    /// spooler's deadline), however slowly the client reads, while the
    /// spooler's bounds allow.
    pub fn answer(body: AnswerBody, slot: Option<Slot>, spooler: &Arc<Spooler>) -> Self {
        match body {
            AnswerBody::Whole(bytes) => {
                drop(slot);
                Self::full(bytes)
            }
            streaming @ AnswerBody::Streaming { .. } => Self {
                kind: Kind::Spooled(spool(streaming.into_body(), slot, spooler)),
            },
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Whole(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Kind::Spooled(reader) => Pin::new(reader)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(|error| Box::new(error) as BoxError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Whole(bytes) => bytes.is_none(),
            Kind::Spooled(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64)),
            Kind::Spooled(reader) => reader.size_hint(),
        }
    }
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
    use std::sync::Arc;
    use tokio::time::Instant;

    fn one_service_admission() -> Arc<Admission> {
        let config = Config::from_yaml_with_env(
            "marketo: { base_url: 'http://127.0.0.1:1', client_id: a, client_secret: b }\n\
             services: [{ name: s, api_key: key-s-0123456789abcdef }]\nstate: { file: ~ }",
            |_| None,
        )
        .unwrap();
        Admission::new(&config, Metrics::new())
    }

    #[tokio::test]
    async fn a_whole_answer_frees_its_slot_at_once_and_is_passed_on_as_it_was() {
        let admission = one_service_admission();
        let permit = admission
            .admit(0, Instant::now() + Duration::from_secs(1), false)
            .await
            .unwrap();
        let mut slot = Slot::local(permit);
        slot.answered().await;
        assert_eq!(admission.snapshot().in_flight, 1);
        let body = ResponseBody::answer(
            AnswerBody::Whole(Bytes::from_static(b"{}")),
            Some(slot),
            &Spooler::for_tests(Duration::from_secs(60)),
        );
        assert_eq!(admission.snapshot().in_flight, 0, "Marketo has finished");
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{}");
    }
}
