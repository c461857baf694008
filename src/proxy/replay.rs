//! Replays: calls Marketo again when its answer says the call can be made
//! to work, within the request's deadline.
//!
//! The policy is the pure function [`classify`]: an answer (or its
//! absence) and the attempt so far in, the next step out. The loop in
//! [`Replay`] applies it: each attempt goes through admission again, at
//! the head of its service's queue.
//!
//! | answer | next step |
//! |---|---|
//! | 601/602, token not yet replaced | the token was dropped below; call again with the next one |
//! | 606 | calls we cannot see used the window: lower the window in force, call again |
//! | 615 | calls we cannot see are in flight: lower the concurrency in force, pause 250 ms, call again |
//! | 607 | the day is spent: pass it on, answer later calls locally until the probe time |
//! | 604/608/611/713, HTTP 502/503, no answer | reads only: back off, call again |
//! | anything else, or the last attempt | pass it on |
//!
//! A call refused for the window or concurrency (606, 615) was not
//! executed: calling it again is safe, it does not count as an attempt,
//! and it keeps its place at the head of its queue until its deadline,
//! when the client gets the proxy's own 606 with `Retry-After`. The
//! limits in force learn from the refusal (see [`crate::admission::learn`]).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Method, StatusCode};
use prometheus::IntCounterVec;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::admit::Admitted;
use super::call::Call;
use super::rewrite::{self, BodyKind};
use crate::admission::shared::SharedLimits;
use crate::admission::{Admission, MarketoLimit, Slot};
use crate::error::ProxyError;
use crate::marketo::{self, code};
use crate::recent::LastHour;
use crate::tasks::Tasks;
use crate::upstream::UpstreamError;

/// Attempts per request, replays included.
pub const MAX_ATTEMPTS: u32 = 5;
/// Pause after Marketo said 615: calls outside the proxy are in flight.
pub const PAUSE_AFTER_615: Duration = Duration::from_millis(250);
/// Pause before the first replay after a transient failure; doubles with
/// each attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// What came back from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Marketo answered, with this HTTP status and error code (if the
    /// answer is a `success:false` envelope).
    Answered {
        status: StatusCode,
        code: Option<&'a str>,
    },
    /// No answer: the connection failed or Marketo did not answer in time.
    NoAnswer,
}

/// The attempt an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first call.
    pub number: u32,
    /// A read (GET, or POST with `_method=GET`): safe to send again after
    /// a timeout or a transient error.
    pub read: bool,
    /// The token was replaced after a 601/602 already.
    pub token_replaced: bool,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Pass the answer (or the error) on.
    Pass,
    /// The token was refused: call again with the next one.
    ReplaceTokenAndReplay,
    /// Marketo refused the call for this limit: learn from it, then call
    /// again from the head of the queue.
    OverLimit(MarketoLimit),
    /// Wait this long, then call again.
    Replay(Duration),
    /// Marketo says the day's quota is spent: pass the answer on and
    /// answer later calls locally until the reset.
    DaySpent,
}

/// The replay policy; see the module documentation.
pub fn classify(reply: Reply<'_>, attempt: Attempt) -> Next {
    let Reply::Answered { status, code } = reply else {
        return transient(attempt);
    };
    match code {
        Some(code::QUOTA_REACHED) => Next::DaySpent,
        Some(code::RATE_LIMITED) => Next::OverLimit(MarketoLimit::Window),
        Some(code::CONCURRENCY_LIMITED) => Next::OverLimit(MarketoLimit::Concurrency),
        _ if attempt.number >= MAX_ATTEMPTS => Next::Pass,
        Some(code::TOKEN_INVALID | code::TOKEN_EXPIRED) if !attempt.token_replaced => {
            Next::ReplaceTokenAndReplay
        }
        Some(code::TIMED_OUT | code::UNAVAILABLE | code::SYSTEM_ERROR | code::TRANSIENT) => {
            transient(attempt)
        }
        _ if matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE) => {
            transient(attempt)
        }
        _ => Next::Pass,
    }
}

/// A failure that may pass: reads are called again after a backoff.
fn transient(attempt: Attempt) -> Next {
    if attempt.read && attempt.number < MAX_ATTEMPTS {
        Next::Replay(FIRST_BACKOFF * 2u32.pow(attempt.number.saturating_sub(1)))
    } else {
        Next::Pass
    }
}

impl Reply<'_> {
    /// The `reason` label of `marketo_proxy_replays_total`.
    fn label(&self) -> &str {
        match self {
            Self::Answered {
                code:
                    Some(
                        code @ (code::TOKEN_INVALID
                        | code::TOKEN_EXPIRED
                        | code::RATE_LIMITED
                        | code::CONCURRENCY_LIMITED
                        | code::TIMED_OUT
                        | code::UNAVAILABLE
                        | code::SYSTEM_ERROR
                        | code::TRANSIENT),
                    ),
                ..
            } => marketo::code_label(code),
            Self::Answered { .. } => "http_5xx",
            Self::NoAnswer => "no_answer",
        }
    }
}

/// Is this call a read (GET, or POST with `_method=GET` in the query or
/// the form body)?
pub fn is_read(call: &Call) -> bool {
    let request = &call.request;
    let method = request.method();
    if method == Method::GET {
        return true;
    }
    if method != Method::POST {
        return false;
    }
    let says_get = |pairs: &[u8]| {
        form_urlencoded::parse(pairs)
            .any(|(key, value)| key == "_method" && value.eq_ignore_ascii_case("GET"))
    };
    call.target
        .query
        .as_deref()
        .is_some_and(|query| says_get(query.as_bytes()))
        || (matches!(rewrite::body_kind(request.headers()), Ok(BodyKind::Form)) && says_get(request.body()))
}

/// Applies the replay policy; see the module documentation.
#[derive(Clone)]
pub struct ReplayLayer {
    admission: Arc<Admission>,
    limits: Option<Arc<SharedLimits>>,
    /// `marketo_proxy_replays_total`.
    replays: IntCounterVec,
    /// Replays per service, for the status page.
    last_hour: Arc<LastHour>,
    /// Where what a refusal taught is shared with the other replicas.
    tasks: Tasks,
}

impl ReplayLayer {
    pub fn new(
        admission: Arc<Admission>,
        limits: Option<Arc<SharedLimits>>,
        replays: IntCounterVec,
        last_hour: Arc<LastHour>,
        tasks: Tasks,
    ) -> Self {
        Self {
            admission,
            limits,
            replays,
            last_hour,
            tasks,
        }
    }
}

impl<S> Layer<S> for ReplayLayer {
    type Service = Replay<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Replay {
            shared: Arc::new((self.clone(), inner)),
        }
    }
}

/// One `Arc` for everything, so that the per-request copy is one count.
pub struct Replay<S> {
    shared: Arc<(ReplayLayer, S)>,
}

impl<S> Clone for Replay<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> Service<Call> for Replay<S>
where
    S: Service<Call, Response = Admitted, Error = ProxyError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    type Response = Admitted;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Admitted, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Box::pin(run(Arc::clone(&self.shared), call))
    }
}

/// Calls until an answer passes, as [`classify`] says.
///
/// An `async` block, not an `async fn`: the block uses the call where it
/// captured it, where an `async fn` would also hold a copy of its
/// arguments for as long as the request waits.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold the call twice")]
fn run<S>(shared: Arc<(ReplayLayer, S)>, call: Call) -> impl Future<Output = Result<Admitted, ProxyError>>
where
    S: Service<Call, Response = Admitted, Error = ProxyError> + Clone,
{
    async move {
        let (policy, inner) = &*shared;
        let mut attempt = Attempt {
            number: 0,
            read: is_read(&call),
            token_replaced: false,
        };
        // What Marketo said last, passed on when a replay cannot be admitted
        // before the deadline (unless it refused the call for a limit: then
        // the client gets the proxy's own answer, with `Retry-After`).
        let mut last: Option<Box<Admitted>> = None;
        let mut calls = 0u32;
        let day_spent = loop {
            attempt.number += 1;
            calls += 1;
            // Only the attempt's own (boxed) future waits in the queue: its
            // copy of the call is moved into it at once.
            let mut inner = inner.clone();
            inner.ready().await?;
            let future = {
                let mut copy = call.clone();
                copy.replay = calls > 1;
                inner.call(copy)
            };
            drop(inner);
            // The answer lives in this block only, so that the pause before a
            // replay (and every other wait of a request) does not carry room
            // for it.
            let backoff = {
                let result = future.await;
                let reply = match &result {
                    Ok(admitted) => Reply::Answered {
                        status: admitted.answer.head.status,
                        code: admitted.answer.error_code.as_deref(),
                    },
                    // Marketo's certificate was refused: calling again fails
                    // the same way.
                    Err(ProxyError::Upstream(UpstreamError::Connect(failure))) if failure.tls => {
                        return result;
                    }
                    Err(ProxyError::Upstream(_)) => Reply::NoAnswer,
                    // A replay that no longer fits its deadline: pass on what
                    // Marketo said last.
                    Err(ProxyError::Admission(_)) => return last.map_or(result, |last| Ok(*last)),
                    Err(_) => return result,
                };
                let next = classify(reply, attempt);
                if next != Next::DaySpent {
                    if let Ok(admitted) = &result {
                        let probe = admitted.slot.as_ref().is_some_and(Slot::is_shared_probe);
                        policy.confirm_available(probe);
                    }
                }
                match next {
                    Next::Pass => return result,
                    // Boxed with the answer it passes on: rare, and Redis'
                    // round trip is large.
                    Next::DaySpent => {
                        break Box::pin(async move {
                            policy.day_spent(&call).await;
                            result
                        });
                    }
                    Next::ReplaceTokenAndReplay => attempt.token_replaced = true,
                    Next::OverLimit(limit) => {
                        // Not executed: it does not count as an attempt.
                        attempt.number -= 1;
                        let sent = result.as_ref().ok().and_then(|admitted| admitted.slot.as_ref());
                        policy.refused(limit, sent.map_or_else(Instant::now, Slot::sent_at));
                    }
                    Next::Replay(backoff) if Instant::now() + backoff >= call.deadline => return result,
                    Next::Replay(_) => {}
                }
                policy.count(&call, reply.label());
                // Kept without its slot: the next attempt needs one of its own.
                last = match next {
                    Next::OverLimit(_) => None,
                    _ => result
                        .ok()
                        .map(|admitted| {
                            Box::new(Admitted {
                                answer: admitted.answer,
                                slot: None,
                            })
                        })
                        .or(last),
                };
                match next {
                    Next::Replay(backoff) => Some(backoff),
                    _ => None,
                }
            };
            if let Some(backoff) = backoff {
                tokio::time::sleep(backoff).await;
            }
        };
        day_spent.await
    }
}

impl ReplayLayer {
    /// Marketo said 607: later calls are answered locally until the probe
    /// time, on every replica (Redis knows before the 607 is passed on).
    async fn day_spent(&self, call: &Call) {
        tracing::warn!(
            service = call.caller.name(),
            "Marketo says the daily quota is spent"
        );
        let admission = &self.admission;
        admission.quota_spent();
        if let Some(limits) = &self.limits {
            limits.mark_spent().await;
        }
    }

    /// A call was answered without 607: a day marked spent (here, or for
    /// every replica when the call was their probe) is not.
    fn confirm_available(&self, shared_probe: bool) {
        if self.admission.quota_confirmed() || shared_probe {
            if let Some(limits) = self.limits.clone() {
                self.tasks
                    .to_the_end(async move { limits.confirm_available().await });
            }
        }
    }

    /// Marketo refused a call for `limit`: the limits in force learn from
    /// it; after a 615, nothing goes for a moment (the calls we cannot see
    /// end within it, usually).
    fn refused(&self, limit: MarketoLimit, sent: Instant) {
        let instance_window = self.limits.as_ref().map(|limits| limits.instance_window());
        self.admission.refused(limit, sent, instance_window);
        if let Some(limits) = self.limits.clone() {
            let admission = Arc::clone(&self.admission);
            self.tasks
                .to_the_end(async move { limits.refused(&admission).await });
        }
        if limit == MarketoLimit::Concurrency {
            self.admission.pause(PAUSE_AFTER_615);
        }
    }

    fn count(&self, call: &Call, reason: &str) {
        tracing::info!(service = call.caller.name(), reason, "replaying a call");
        self.replays.with_label_values(&[reason]).inc();
        self.last_hour.replayed(call.caller.id.index());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::proxy::testing::{self, Scripted, ScriptedAdmitted, ScriptedMarketo};
    use crate::target;
    use bytes::Bytes;
    use http::Request;

    const OK: StatusCode = StatusCode::OK;

    fn attempt(number: u32, read: bool, token_replaced: bool) -> Attempt {
        Attempt {
            number,
            read,
            token_replaced,
        }
    }

    fn answered(code: Option<&str>) -> Reply<'_> {
        Reply::Answered { status: OK, code }
    }

    #[test]
    fn the_policy_for_every_answer_marketo_gives() {
        let first_read = attempt(1, true, false);
        let first_write = attempt(1, false, false);
        let last_read = attempt(MAX_ATTEMPTS, true, false);
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let cases: &[(Reply<'_>, Attempt, Next)] = &[
            // Passed on as they are.
            (answered(None), first_read, Next::Pass),
            (answered(Some("603")), first_read, Next::Pass),
            (answered(Some("610")), first_read, Next::Pass),
            (answered(Some("1003")), first_read, Next::Pass),
            (answered(Some("1029")), first_read, Next::Pass),
            (Reply::Answered { status: StatusCode::NOT_FOUND, code: None }, first_read, Next::Pass),
            (Reply::Answered { status: StatusCode::INTERNAL_SERVER_ERROR, code: None }, first_read, Next::Pass),
            (Reply::Answered { status: StatusCode::SERVICE_UNAVAILABLE, code: Some("1003") }, first_read, Next::Replay(Duration::from_millis(200))),
            // The token: replaced once, then the refusal is passed on.
            (answered(Some("601")), first_write, Next::ReplaceTokenAndReplay),
            (answered(Some("602")), first_read, Next::ReplaceTokenAndReplay),
            (answered(Some("601")), attempt(2, true, true), Next::Pass),
            (answered(Some("602")), attempt(3, false, true), Next::Pass),
            // Calls we cannot see: reads and writes alike (not executed),
            // whatever the attempt.
            (answered(Some("606")), first_write, Next::OverLimit(MarketoLimit::Window)),
            (answered(Some("606")), attempt(4, true, false), Next::OverLimit(MarketoLimit::Window)),
            (answered(Some("615")), first_write, Next::OverLimit(MarketoLimit::Concurrency)),
            (answered(Some("606")), last_read, Next::OverLimit(MarketoLimit::Window)),
            (answered(Some("615")), last_read, Next::OverLimit(MarketoLimit::Concurrency)),
            // The day is spent, whatever the attempt.
            (answered(Some("607")), first_write, Next::DaySpent),
            (answered(Some("607")), last_read, Next::DaySpent),
            // Transient failures: reads only, with a doubling backoff.
            (answered(Some("604")), first_read, Next::Replay(ms(200))),
            (answered(Some("608")), attempt(2, true, false), Next::Replay(ms(400))),
            (answered(Some("611")), attempt(3, true, true), Next::Replay(ms(800))),
            (answered(Some("713")), attempt(4, true, false), Next::Replay(ms(1600))),
            (Reply::Answered { status: StatusCode::BAD_GATEWAY, code: None }, first_read, Next::Replay(ms(200))),
            (Reply::Answered { status: StatusCode::SERVICE_UNAVAILABLE, code: None }, first_read, Next::Replay(ms(200))),
            (Reply::NoAnswer, first_read, Next::Replay(ms(200))),
            (answered(Some("604")), first_write, Next::Pass),
            (answered(Some("611")), first_write, Next::Pass),
            (Reply::Answered { status: StatusCode::BAD_GATEWAY, code: None }, first_write, Next::Pass),
            (Reply::NoAnswer, first_write, Next::Pass),
            // The last attempt passes on whatever else it got.
            (answered(Some("601")), last_read, Next::Pass),
            (answered(Some("604")), last_read, Next::Pass),
            (Reply::NoAnswer, last_read, Next::Pass),
        ];
        for (reply, attempt, expected) in cases {
            assert_eq!(classify(*reply, *attempt), *expected, "{reply:?} on {attempt:?}");
        }
    }

    #[test]
    fn reads_are_gets_and_posts_that_say_get() {
        let request = |method: Method, uri: &str, content_type: Option<&str>, body: &'static str| {
            let mut request = Request::builder().method(method).uri(uri);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let request = request.body(Bytes::from_static(body.as_bytes())).unwrap();
            let mut call = testing::call(0, Duration::from_secs(1));
            call.target = target::normalise(request.uri().path(), request.uri().query()).unwrap();
            *call.request_mut() = request;
            call
        };
        let form = Some("application/x-www-form-urlencoded");
        assert!(is_read(&request(Method::GET, "/rest/v1/lead/1.json", None, "")));
        assert!(is_read(&request(
            Method::POST,
            "/rest/v1/leads.json?_method=GET",
            None,
            ""
        )));
        assert!(is_read(&request(
            Method::POST,
            "/rest/v1/leads.json",
            form,
            "_method=get&filterType=id"
        )));
        assert!(!is_read(&request(
            Method::POST,
            "/rest/v1/leads.json",
            None,
            "_method=GET"
        )));
        assert!(!is_read(&request(
            Method::POST,
            "/rest/v1/leads.json",
            form,
            "filterType=id"
        )));
        assert!(!is_read(&request(
            Method::DELETE,
            "/rest/v1/leads.json?_method=GET",
            None,
            ""
        )));
    }

    /// A replay layer over a scripted Marketo, and a request for it.
    fn replaying(
        script: Vec<Scripted>,
        wait: Duration,
    ) -> (Replay<ScriptedAdmitted>, ScriptedMarketo, Arc<Admission>, Call) {
        let config = Config::from_yaml_with_env(testing::CONFIG, |_| None).unwrap();
        let metrics = Metrics::new();
        let admission = Admission::new(&config, metrics.clone());
        let marketo = ScriptedMarketo::new(script);
        let layer = ReplayLayer::new(
            Arc::clone(&admission),
            None,
            metrics.replays.clone(),
            Arc::new(LastHour::new(config.counted_names().len())),
            Tasks::new(),
        );
        let service = layer.layer(ScriptedAdmitted(marketo.clone()));
        (service, marketo, admission, testing::call(0, wait))
    }

    #[tokio::test(start_paused = true)]
    async fn replays_go_to_the_head_of_the_queue_until_an_answer_passes() {
        let script = vec![
            Scripted::Answer(OK, Some("606")),
            Scripted::Answer(OK, Some("601")),
            Scripted::Fail(|| {
                ProxyError::Upstream(crate::upstream::UpstreamError::Timeout(Duration::from_secs(1)))
            }),
        ];
        let (service, marketo, admission, request) = replaying(script, Duration::from_secs(30));
        let admitted = service.oneshot(request).await.unwrap();
        assert_eq!(admitted.answer.error_code, None);
        let requests = marketo.requests();
        assert_eq!(requests.len(), 4);
        assert!(!requests[0].replay);
        assert!(requests[1..].iter().all(|call| call.replay));
        drop(admission);
    }

    #[tokio::test(start_paused = true)]
    async fn a_607_spends_the_day() {
        let (service, _, admission, request) =
            replaying(vec![Scripted::Answer(OK, Some("607"))], Duration::from_secs(30));
        let admitted = service.oneshot(request).await.unwrap();
        assert_eq!(admitted.answer.error_code.as_deref(), Some("607"));
        assert_eq!(admission.snapshot().daily_remaining, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backoff_past_the_deadline_passes_the_answer_on() {
        let script = vec![
            Scripted::Answer(OK, Some("604")),
            Scripted::Answer(OK, Some("604")),
        ];
        let (service, marketo, _, request) = replaying(script, Duration::from_millis(500));
        let admitted = service.oneshot(request).await.unwrap();
        assert_eq!(admitted.answer.error_code.as_deref(), Some("604"));
        assert_eq!(
            marketo.requests().len(),
            2,
            "200 ms fit the deadline, 400 ms more did not"
        );
    }
}
