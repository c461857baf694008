//! The `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers-12) on every answer to a known
//! service, whoever wrote it: what the service may spend per rolling
//! window and per day, and what it has left of each right now.
//!
//! Two named policies, `"window"` and `"day"`, counted for the calling
//! service: its own caps, this replica's share of the instance's limits,
//! and the daily calls other services' reserves hold back, whichever
//! leaves less. Read from the admission state when the answer passes
//! here, so a forwarded call already counts its own slot:
//!
//! ```text
//! RateLimit-Policy: "window";q=50;w=20, "day";q=20000;w=86400
//! RateLimit: "window";r=20;t=12, "day";r=19970;t=40210
//! ```
//!
//! `t` is how long until the number left next grows: a window slot frees,
//! or the day resets. Marketo's own headers are left as they are, and so
//! is `Retry-After`. Answers to callers not known get neither field.

use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::admission::{Admission, Standing};
use crate::auth::Caller;

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Adds the fields; with `None` (turned off in the config) it adds
/// nothing and costs nothing.
#[derive(Clone)]
pub struct RateLimitLayer {
    admission: Option<Arc<Admission>>,
}

impl RateLimitLayer {
    pub fn new(admission: Option<Arc<Admission>>) -> Self {
        Self { admission }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitFields<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitFields {
            inner,
            admission: self.admission.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimitFields<S> {
    inner: S,
    admission: Option<Arc<Admission>>,
}

impl<S, B, R> Service<Request<B>> for RateLimitFields<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = WithFields<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        WithFields {
            future: self.inner.call(request),
            admission: self.admission.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct WithFields<F> {
        #[pin]
        future: F,
        admission: Option<Arc<Admission>>,
    }
}

impl<F, R, E> Future for WithFields<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.future.poll(cx));
        if let (Ok(response), Some(admission)) = (&mut result, this.admission.take()) {
            let standing = response
                .extensions()
                .get::<Caller>()
                .and_then(|caller| admission.standing(caller.id.index()));
            if let Some(standing) = standing {
                let (policy, limit) = fields(&standing);
                let headers = response.headers_mut();
                headers.insert(RATELIMIT_POLICY.clone(), policy);
                headers.insert(RATELIMIT.clone(), limit);
            }
        }
        Poll::Ready(result)
    }
}

/// The two field values for `standing`.
pub fn fields(standing: &Standing) -> (HeaderValue, HeaderValue) {
    let policies = [("window", &standing.window), ("day", &standing.day)];
    let mut policy = String::with_capacity(64);
    let mut limit = String::with_capacity(64);
    for (index, (name, standing)) in policies.iter().enumerate() {
        let separator = if index == 0 { "" } else { ", " };
        // Writing to a String cannot fail.
        let _ = write!(
            policy,
            "{separator}\"{name}\";q={};w={}",
            standing.quota,
            whole_seconds(standing.length).max(1)
        );
        let _ = write!(
            limit,
            "{separator}\"{name}\";r={};t={}",
            standing.remaining,
            whole_seconds(standing.resets_in)
        );
    }
    // Digits, names and punctuation only: always a valid header value.
    let value = |text: String| HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static(""));
    (value(policy), value(limit))
}

/// Whole seconds, rounded up: a client that waits less finds nothing new.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::PolicyStanding;

    #[test]
    fn fields_are_structured_lists_of_the_two_policies() {
        let standing = Standing {
            window: PolicyStanding {
                quota: 50,
                length: Duration::from_secs(20),
                remaining: 20,
                resets_in: Duration::from_millis(11_200),
            },
            day: PolicyStanding {
                quota: 50_000,
                length: Duration::from_secs(86_400),
                remaining: 49_970,
                resets_in: Duration::from_secs(3_600),
            },
        };
        let (policy, limit) = fields(&standing);
        assert_eq!(policy, r#""window";q=50;w=20, "day";q=50000;w=86400"#);
        assert_eq!(limit, r#""window";r=20;t=12, "day";r=49970;t=3600"#);
    }
}
