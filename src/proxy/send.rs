//! The bottom of the stack: one call to Marketo through the pooled
//! [`Upstream`] client, to the configured host and the request's
//! [`Target`], counted by service, API and the code Marketo answered.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Request;
use http_body_util::Full;
use tokio::time::Instant;
use tower::Service;

use crate::auth::Caller;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::target::{PathError, Target};
use crate::upstream::{Answer, Upstream, UpstreamError};

/// Sends requests to Marketo.
#[derive(Clone)]
pub struct SendToMarketo {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    metrics: Metrics,
}

impl SendToMarketo {
    pub fn new(upstream: Upstream, metrics: Metrics) -> Self {
        Self {
            shared: Arc::new(Shared { upstream, metrics }),
        }
    }
}

impl Service<Request<Bytes>> for SendToMarketo {
    type Response = Answer;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Answer, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.send(request).await })
    }
}

impl Shared {
    async fn send(&self, request: Request<Bytes>) -> Result<Answer, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let target = parts
            .extensions
            .remove::<Target>()
            .ok_or(ProxyError::Path(PathError::Invalid))?;
        let caller = parts.extensions.remove::<Caller>();
        let service = caller.as_ref().map_or("unknown", |caller| &*caller.name);
        parts.uri = self.upstream.uri(&target.path_and_query())?;
        // The client's HTTP version is its own connection's business.
        parts.version = http::Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        let request = Request::from_parts(parts, Full::new(body));

        let api = target.api.label();
        let started = Instant::now();
        let result = self.upstream.send(request).await;
        self.metrics
            .upstream_duration
            .with_label_values(&[service, api])
            .observe(started.elapsed().as_secs_f64());
        let code = match &result {
            Ok(answer) => match &answer.error_code {
                Some(code) => crate::marketo::code_label(code),
                None if answer.head.status.is_success() => "ok",
                None => answer.head.status.as_str(),
            },
            Err(UpstreamError::Timeout(_)) => "timeout",
            Err(_) => "connect_error",
        };
        self.metrics
            .upstream_calls
            .with_label_values(&[service, api, code])
            .inc();
        tracing::debug!(service, api, path = %target.path, code, "upstream call");
        Ok(result?)
    }
}
