//! Admission: a call goes to Marketo only when this replica's limits and,
//! with replicas, the limits they share through Redis all have room.
//!
//! The call first waits in its service's queue ([`Admission`]: fair
//! between services by weight, FIFO within one, bounded by the call's
//! deadline, replays at the head); then, with replicas, asks Redis
//! ([`SharedLimits`]) and waits while another replica holds what it needs.
//! The answer comes back with the call's [`Slot`], which the answer's body
//! holds until the client has it.
//!
//! This is one service rather than tower's `poll_ready` back-pressure:
//! readiness in tower belongs to a service instance and says nothing about
//! which request will be sent next, while admission decides per request
//! (whose queue, which deadline, a replay ahead of its service's queue,
//! which service's turn it is). So `poll_ready` is always ready and the
//! waiting happens in `call`'s future, which leaves the queue when dropped.
//!
//! A call that got no answer keeps its slot a while: Marketo may still be
//! executing it. That holds when the upstream timed out and when the
//! request went away mid-call (the client disconnected).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::call::{Call, Lead, Sharing};
use crate::admission::shared::{Grant, Lease, SharedLimits};
use crate::admission::{Admission, AdmissionError, Permit, Slot};
use crate::error::ProxyError;
use crate::marketo;
use crate::tasks::Tasks;
use crate::upstream::{Answer, UpstreamError};

/// How long a call that got no answer keeps its slot: Marketo may still be
/// executing it.
pub const UNANSWERED_CALL_GRACE: Duration = Duration::from_secs(10);

/// Marketo's answer to an admitted call, with the call's slot (none for an
/// answer kept from an earlier attempt).
pub struct Admitted {
    pub answer: Answer,
    pub slot: Option<Slot>,
}

/// Admits calls; see the module documentation.
#[derive(Clone)]
pub struct AdmitLayer {
    gate: Gate,
}

impl AdmitLayer {
    pub fn new(admission: Arc<Admission>, limits: Option<Arc<SharedLimits>>, tasks: Tasks) -> Self {
        Self {
            gate: Gate {
                admission,
                limits,
                tasks,
            },
        }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            shared: Arc::new((self.gate.clone(), inner)),
        }
    }
}

/// One `Arc` for everything, so that the per-call copy is one count.
pub struct Admit<S> {
    shared: Arc<(Gate, S)>,
}

impl<S> Clone for Admit<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The limits a call must get through: this replica's, then the shared.
#[derive(Clone)]
struct Gate {
    admission: Arc<Admission>,
    limits: Option<Arc<SharedLimits>>,
    /// Where a call without an answer keeps its slot a while.
    tasks: Tasks,
}

impl<S> Service<Call> for Admit<S>
where
    S: Service<Call, Response = Answer, Error = ProxyError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    type Response = Admitted;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Admitted, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let (gate, inner) = &*shared;
            // A read that follows an identical one steps aside when that one
            // is at Marketo by the time its own turn comes (a replay has
            // gone itself already).
            let follows = match &call.sharing {
                Some(Sharing::Follows(lead)) if !call.replay => Some(lead.as_ref()),
                _ => None,
            };
            let slot = gate
                .slot(call.caller.id.index(), call.deadline, call.replay, follows)
                .await?;
            if let Some(Sharing::Leads(lead)) = &call.sharing {
                lead.reached_marketo();
            }
            // Boxed: a request waiting in the queue does not carry the
            // state of its call (Redis round trips included).
            Box::pin(send(inner.clone(), call, slot, &gate.tasks)).await
        })
    }
}

impl Gate {
    /// Waits for a slot in this replica's limits and then the shared ones;
    /// steps aside (before the shared limits are asked) when it `follows`
    /// a read that is at Marketo by then.
    async fn slot(
        &self,
        service: usize,
        deadline: Instant,
        mut front: bool,
        follows: Option<&Lead>,
    ) -> Result<Slot, ProxyError> {
        let mut readmitted = false;
        loop {
            let permit = self.admission.admit(service, deadline, front).await?;
            if follows.is_some_and(Lead::is_at_marketo) {
                permit.unsent();
                return Err(ProxyError::SteppedAside);
            }
            if self.admission.observes() {
                // Observe mode holds nothing back, here or across replicas.
                return Ok(Slot::new(permit, None));
            }
            // Rare or large awaits are boxed, so that a request waiting in
            // the queue does not carry their state.
            match Box::pin(self.shared_grant(service, &permit, deadline)).await {
                Ok(SharedGrant::Go(lease)) => return Ok(Slot::new(permit, lease)),
                // Admitted under limits that no longer hold (Redis went
                // away just now): once more under this replica's share.
                Ok(SharedGrant::Readmit) if !readmitted => {
                    permit.unsent();
                    readmitted = true;
                    front = true;
                }
                Ok(SharedGrant::Readmit) => return Ok(Slot::new(permit, None)),
                Err(error) => {
                    permit.unsent();
                    return Err(error);
                }
            }
        }
    }

    /// A grant from the limits shared with other replicas, if any: waits
    /// while another replica holds what this call needs, within the
    /// deadline.
    async fn shared_grant(
        &self,
        service: usize,
        permit: &Permit,
        deadline: Instant,
    ) -> Result<SharedGrant, ProxyError> {
        let Some(limits) = &self.limits else {
            return Ok(SharedGrant::Go(None));
        };
        let admission = &self.admission;
        let asked = Instant::now();
        loop {
            match limits.acquire(service, permit, admission).await {
                Grant::Granted(lease) => return Ok(SharedGrant::Go(Some(lease))),
                Grant::Readmit => return Ok(SharedGrant::Readmit),
                Grant::QuotaSpent(scope, wait) => {
                    let retry_after = wait.unwrap_or_else(|| admission.quota_retry_after(scope));
                    return Err(AdmissionError::Quota { scope, retry_after }.into());
                }
                Grant::Wait(wait) => {
                    if Instant::now() + wait >= deadline {
                        return Err(AdmissionError::DeadlineExpired {
                            max_wait: deadline.saturating_duration_since(asked),
                            retry_after: wait.max(Duration::from_secs(1)),
                        }
                        .into());
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// What the shared limits said about a call already admitted here.
enum SharedGrant {
    /// Go, with the lease on the shared limits if there are any.
    Go(Option<Lease>),
    /// The limits here changed under the call: admit it again.
    Readmit,
}

/// One call on its slot.
async fn send<S>(inner: S, call: Call, slot: Slot, tasks: &Tasks) -> Result<Admitted, ProxyError>
where
    S: tower::Service<Call, Response = Answer, Error = ProxyError>,
{
    let mut unanswered = Unanswered(Some(slot), tasks);
    let result = inner.oneshot(call).await;
    let Some(mut slot) = unanswered.0.take() else {
        return Err(AdmissionError::Closed.into());
    };
    match result {
        Ok(answer) => {
            match answer
                .error_code
                .as_deref()
                .filter(|code| marketo::is_uncounted(code))
            {
                Some(code) => slot.uncounted(code).await,
                None => slot.answered_by(answer.marketo_time).await,
            }
            Ok(Admitted {
                answer,
                slot: Some(slot),
            })
        }
        // Never sent: no token could be had.
        Err(error @ ProxyError::Token(_)) => {
            slot.unsent();
            Err(error)
        }
        Err(error @ ProxyError::Upstream(UpstreamError::Timeout(_))) => {
            slot.hold_for(UNANSWERED_CALL_GRACE, tasks);
            Err(error)
        }
        Err(error) => {
            slot.answered().await;
            Err(error)
        }
    }
}

/// The slot of a call sent and not yet answered. Dropped unanswered (the
/// request went away mid-call), it keeps the slot a while.
struct Unanswered<'a>(Option<Slot>, &'a Tasks);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.hold_for(UNANSWERED_CALL_GRACE, self.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::proxy::testing::{self, Scripted, ScriptedMarketo};
    use crate::token::TokenError;
    use http::StatusCode;

    fn admitting(script: Vec<Scripted>) -> (Admit<ScriptedMarketo>, Arc<Admission>) {
        let admission = Admission::new(&testing::config(), Metrics::new());
        let service =
            AdmitLayer::new(Arc::clone(&admission), None, Tasks::new()).layer(ScriptedMarketo::new(script));
        (service, admission)
    }

    fn request(service: usize) -> Call {
        testing::call(service, Duration::from_secs(30))
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_holds_its_slot_until_it_is_dropped() {
        let (service, admission) = admitting(vec![]);
        let admitted = service.oneshot(request(1)).await.unwrap();
        let snapshot = admission.snapshot();
        assert_eq!((snapshot.in_flight, snapshot.window_used), (1, 1));
        assert_eq!(snapshot.services[1].daily_used, 1, "counted to its service");
        drop(admitted);
        let snapshot = admission.snapshot();
        assert_eq!((snapshot.in_flight, snapshot.window_used), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_never_sent_gives_everything_back() {
        let no_token = || ProxyError::Token(TokenError::Unreachable("down".into()));
        let (service, admission) = admitting(vec![Scripted::Fail(no_token)]);
        let result = service.oneshot(request(0)).await;
        assert!(matches!(result, Err(ProxyError::Token(_))));
        let snapshot = admission.snapshot();
        assert_eq!(
            (snapshot.in_flight, snapshot.window_used, snapshot.daily_used),
            (0, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_keeps_its_slot_for_the_grace_period() {
        let timed_out = || ProxyError::Upstream(UpstreamError::Timeout(Duration::from_secs(60)));
        let (service, admission) = admitting(vec![Scripted::Fail(timed_out)]);
        assert!(service.oneshot(request(0)).await.is_err());
        assert_eq!(
            admission.snapshot().in_flight,
            1,
            "Marketo may still be executing it"
        );
        tokio::time::sleep(UNANSWERED_CALL_GRACE + Duration::from_millis(1)).await;
        assert_eq!(admission.snapshot().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_admitted_in_time_is_refused_without_a_call() {
        let (mut service, admission) = admitting(vec![Scripted::Answer(StatusCode::OK, None)]);
        admission.pause(Duration::from_secs(60));
        let result = (&mut service).oneshot(request(0)).await;
        assert!(
            matches!(
                result,
                Err(ProxyError::Admission(AdmissionError::WouldWait { .. }))
            ),
            "{:?}",
            result.err()
        );
        assert_eq!(admission.snapshot().daily_used, 0);
    }
}
