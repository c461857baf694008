//! The bottom of the stack: one call to Marketo through the pooled
//! [`Upstream`] client, to the configured host and the call's target,
//! counted by service, API and the code Marketo answered.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::Request;
use http_body_util::Full;
use tokio::time::Instant;
use tower::Service;

use super::call::Call;
use crate::error::ProxyError;
use crate::metrics::Metrics;
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

impl Service<Call> for SendToMarketo {
    type Response = Answer;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Answer, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.send(call).await })
    }
}

impl Shared {
    async fn send(&self, call: Call) -> Result<Answer, ProxyError> {
        let Call {
            request,
            target,
            caller,
            ..
        } = call;
        // Copied only if a replay still holds the call (a layer that
        // changed it has already made it this copy's own).
        let (mut parts, body) = Arc::unwrap_or_clone(request).into_parts();
        let service = caller.name();
        let called = target.api;
        let api = called.label();
        let path = tracing::enabled!(tracing::Level::DEBUG).then(|| target.path.clone());
        parts.uri = self.upstream.uri_for(target)?;
        // The client's HTTP version is its own connection's business.
        parts.version = http::Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        let request = Request::from_parts(parts, Full::new(body));

        let started = Instant::now();
        let result = self.upstream.send(request).await;
        let took = started.elapsed().as_secs_f64();
        let series = caller.series.calls(called);
        match series {
            Some(series) => series.duration.observe(took),
            None => self
                .metrics
                .upstream_duration
                .with_label_values(&[service, api])
                .observe(took),
        }
        let code = match &result {
            Ok(answer) => match &answer.error_code {
                Some(code) => crate::marketo::code_label(code),
                None if answer.head.status.is_success() => "ok",
                None => answer.head.status.as_str(),
            },
            Err(UpstreamError::Timeout(_)) => "timeout",
            Err(_) => "connect_error",
        };
        match series {
            Some(series) if code == "ok" => series.ok.inc(),
            _ => self
                .metrics
                .upstream_calls
                .with_label_values(&[service, api, code])
                .inc(),
        }
        if let Some(path) = path {
            tracing::debug!(service, api, path, code, "upstream call");
        }
        Ok(result?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::proxy::testing;
    use crate::sim::{SimConfig, Simulator};
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test]
    async fn calls_the_configured_host_at_the_target_and_counts_the_answer() {
        let sim = Simulator::spawn(SimConfig {
            latency: Duration::ZERO,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let yaml = format!(
            "marketo: {{ base_url: '{}', client_id: a, client_secret: b }}\n\
             services: [{{ name: crm, api_key: key-crm-1234567890abcd }}]\nstate: {{ file: ~ }}",
            sim.url()
        );
        let config = Config::from_yaml_with_env(&yaml, |_| None).unwrap();
        let metrics = Metrics::new();
        let send = SendToMarketo::new(Upstream::new(&config.marketo).unwrap(), metrics.clone());
        // The request's own URI and Host say elsewhere; only the target counts.
        let mut call = testing::call(0, Duration::from_secs(5));
        *call.request_mut() = Request::get("http://elsewhere.example/other")
            .header("host", "elsewhere.example")
            .version(http::Version::HTTP_2)
            .body(Bytes::new())
            .unwrap();
        call.target = crate::target::normalise("/rest/v1/lead/1.json", Some("fields=email")).unwrap();
        let answer = send.oneshot(call).await.unwrap();
        assert_eq!(answer.head.status, StatusCode::OK);
        // No token: the simulator says 600, and the answer is classified.
        assert_eq!(answer.error_code.as_deref(), Some("600"));
        let body = answer.body.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("\"600\""));
        let arrivals = sim.stats().arrivals;
        assert_eq!(arrivals.len(), 1);
        assert!(
            arrivals[0].target.starts_with("/rest/v1/lead/1.json"),
            "{:?}",
            arrivals[0]
        );
        let line = r#"marketo_proxy_upstream_calls_total{api="rest",code="600",service="crm"} 1"#;
        let text = metrics.render();
        assert!(
            text.lines().any(|metric| metric == line),
            "{line} missing in\n{text}"
        );
    }
}
