//! Every way a request can end without Marketo's own answer, and the one
//! function that turns it into a response.
//!
//! Local refusals look like Marketo's: a `success:false` envelope with the
//! code an existing client already knows how to handle, and `Retry-After`
//! where waiting helps. Each error knows who caused it (the client, the
//! upstream, or the proxy) and which `outcome` label it counts under.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::admission::AdmissionError;
use crate::auth::AuthError;
use crate::marketo::code;
use crate::recent::Refusal;
use crate::response::{Outcome, ResponseBody, marketo_error};
use crate::target::PathError;
use crate::token::TokenError;
use crate::upstream::UpstreamError;

/// The methods Marketo's REST API knows; anything else is answered with
/// Marketo's 605 and never forwarded.
pub const ALLOWED_METHODS: &str = "GET, POST, PUT, DELETE";

/// The longest multipart boundary RFC 2046 allows.
pub const MAX_BOUNDARY_CHARS: usize = 70;

/// A `multipart/form-data` body whose boundary RFC 2046 does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the multipart boundary must be 1 to {MAX_BOUNDARY_CHARS} characters long (RFC 2046)")]
pub struct InvalidBoundary;

/// Who made a request fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Proxy,
}

impl ErrorSource {
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Proxy => "proxy",
        }
    }
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("the method {0} is not supported; use {ALLOWED_METHODS}")]
    Method(http::Method),
    #[error("the request URI is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read")]
    BodyUnreadable(#[source] crate::response::BoxError),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the proxy holds as many {what} as it may; try again shortly")]
    Busy {
        what: &'static str,
        retry_after: Duration,
    },
    #[error(transparent)]
    Boundary(#[from] InvalidBoundary),
    #[error("no access token: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Bulk(#[from] crate::bulk::BulkError),
    /// A read stepped aside for an identical one already at Marketo, whose
    /// answer it takes instead: the layer that shares reads turns this
    /// into that answer, and no client ever gets it.
    #[error("an identical read at Marketo answers this one")]
    SteppedAside,
}

impl ProxyError {
    pub fn source_of_error(&self) -> ErrorSource {
        match self {
            Self::Auth(_)
            | Self::Path(_)
            | Self::Method(_)
            | Self::UriTooLong { .. }
            | Self::BodyTooLarge { .. }
            | Self::BodyUnreadable(_)
            | Self::BodyTimeout(_)
            | Self::Boundary(_) => ErrorSource::Client,
            Self::Token(TokenError::Rejected(_))
            | Self::Admission(AdmissionError::Closed)
            | Self::Busy { .. }
            | Self::SteppedAside => ErrorSource::Proxy,
            Self::Admission(_) | Self::Bulk(_) => ErrorSource::Client,
            Self::Token(_) | Self::Upstream(_) => ErrorSource::Upstream,
        }
    }

    /// The `outcome` label of `marketo_proxy_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Auth(_) => "rejected_auth",
            Self::Path(_)
            | Self::Method(_)
            | Self::BodyUnreadable(_)
            | Self::BodyTimeout(_)
            | Self::Boundary(_) => "rejected_request",
            Self::UriTooLong { .. } | Self::BodyTooLarge { .. } => "rejected_size",
            Self::Token(_)
            | Self::Upstream(_)
            | Self::Admission(AdmissionError::Closed)
            | Self::SteppedAside => "upstream_error",
            Self::Admission(AdmissionError::Quota { .. }) => "rejected_quota",
            Self::Admission(AdmissionError::QueueFull { .. }) => "rejected_queue",
            Self::Busy { .. } => "rejected_busy",
            Self::Admission(_) => "rejected_rate",
            Self::Bulk(_) => "rejected_bulk",
        }
    }

    /// The answer the client gets, with its [`Outcome`]. Logged here, in
    /// the request's span (which names the service once it is known).
    pub fn into_response(self) -> Response<ResponseBody> {
        tracing::info!(cause = self.source_of_error().label(), error = %self, "request refused");
        let message = self.to_string();
        let (status, marketo_code, retry_after) = match &self {
            Self::Auth(AuthError::Unauthenticated) => (StatusCode::UNAUTHORIZED, code::TOKEN_INVALID, None),
            Self::Auth(AuthError::Throttled { retry_after }) => (
                StatusCode::TOO_MANY_REQUESTS,
                code::ACCESS_DENIED,
                Some(*retry_after),
            ),
            Self::Path(PathError::NotForwarded) => (StatusCode::NOT_FOUND, code::NOT_FOUND, None),
            Self::Method(_) => (StatusCode::METHOD_NOT_ALLOWED, code::METHOD_NOT_SUPPORTED, None),
            Self::Path(PathError::Invalid) | Self::BodyUnreadable(_) | Self::Boundary(_) => {
                (StatusCode::BAD_REQUEST, code::INVALID_VALUE, None)
            }
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "408", None),
            Self::Busy { retry_after, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                Some(*retry_after),
            ),
            Self::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "414", None),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "413", None),
            Self::Token(TokenError::Rejected(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                Some(Duration::from_secs(30)),
            ),
            Self::Token(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                Some(Duration::from_secs(5)),
            ),
            Self::Upstream(UpstreamError::Timeout(_)) => (StatusCode::GATEWAY_TIMEOUT, code::TIMED_OUT, None),
            Self::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                code::UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            // Marketo answers these inside HTTP 200, and clients look there.
            Self::Admission(error @ AdmissionError::Quota { .. }) => {
                (StatusCode::OK, code::QUOTA_REACHED, error.retry_after())
            }
            Self::Admission(AdmissionError::Closed) | Self::SteppedAside => (
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            Self::Admission(error) => (StatusCode::OK, code::RATE_LIMITED, error.retry_after()),
            // Marketo's own code for a full queue or spent export bytes.
            Self::Bulk(error) => (StatusCode::OK, code::TOO_MANY_JOBS, Some(error.retry_after())),
        };
        let mut response = marketo_error(status, marketo_code, &message, retry_after);
        if matches!(self, Self::Method(_)) {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        response.extensions_mut().insert(Outcome(self.outcome()));
        if let Some(refusal) = self.refusal() {
            response.extensions_mut().insert(refusal);
        }
        response
    }

    /// Which of Marketo's limits a local refusal stands for, when it is
    /// one (the status page counts them).
    fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Admission(AdmissionError::Quota { .. }) => Some(Refusal::Quota),
            Self::Admission(
                AdmissionError::QueueFull { .. }
                | AdmissionError::WouldWait { .. }
                | AdmissionError::DeadlineExpired { .. },
            ) => Some(Refusal::Rate),
            _ => None,
        }
    }
}

/// The answer to a request during which a layer panicked: Marketo's 611
/// (system error), so clients treat it as a transient failure. The server
/// goes on serving.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response<ResponseBody> {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %detail, "a request handler panicked");
    let mut response = marketo_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::SYSTEM_ERROR,
        "internal error in the proxy",
        Some(Duration::from_secs(1)),
    );
    response.extensions_mut().insert(Outcome::INTERNAL_ERROR);
    response
}
