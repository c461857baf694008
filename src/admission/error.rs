//! Why a request was not admitted, and the words its refusal says.

use super::*;

/// The rate limit a request could not be admitted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The instance's window (`limits.window_calls`).
    Instance,
    /// The service's own share (`services[].window_calls`).
    Service,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("{}", quota_message(*scope))]
    Quota {
        scope: QuotaScope,
        retry_after: Duration,
    },
    #[error("queue full: {limit} requests are already waiting")]
    QueueFull { limit: usize, retry_after: Duration },
    #[error("{} rate limit: this request could not start within its {} queue wait", rate_name(*scope), humantime::format_duration(*max_wait))]
    WouldWait {
        scope: RateScope,
        max_wait: Duration,
        retry_after: Duration,
    },
    #[error("rate limit: not admitted within the {} queue wait", humantime::format_duration(*max_wait))]
    DeadlineExpired {
        max_wait: Duration,
        retry_after: Duration,
    },
    #[error("the proxy is shutting down")]
    Closed,
}

impl AdmissionError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Quota { retry_after, .. }
            | Self::QueueFull { retry_after, .. }
            | Self::WouldWait { retry_after, .. }
            | Self::DeadlineExpired { retry_after, .. } => Some(*retry_after),
            Self::Closed => Some(Duration::from_secs(1)),
        }
    }
}

pub(super) fn quota_message(scope: QuotaScope) -> &'static str {
    match scope {
        QuotaScope::Instance => "daily quota reached for the instance; it resets at local midnight",
        QuotaScope::ServiceCap => "daily quota reached for this service (its daily_quota cap)",
        QuotaScope::Reserved => "daily quota: what is left today is reserved for other services",
    }
}

pub(super) fn rate_name(scope: RateScope) -> &'static str {
    match scope {
        RateScope::Instance => "instance",
        RateScope::Service => "service",
    }
}
