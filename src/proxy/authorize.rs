//! Marketo's access token on every call: `Authorization: Bearer`, marked
//! sensitive, from the cache of the caller's upstream credential.
//!
//! The token is taken after admission, so a request that waited in the
//! queue does not carry one that expired meanwhile; the background
//! refresher keeps it warm, so the usual case is a cache hit and no await.
//! When Marketo answers 601/602 the token used is reported to its cache,
//! which drops it; the replay layer above decides whether to call again,
//! and that call fetches the next token (once, however many calls failed).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, Either};
use http::header;
use tower::{Layer, Service, ServiceExt};

use super::call::Call;
use crate::error::ProxyError;
use crate::marketo::code;
use crate::token::{Token, TokenCache, TokenCaches, TokenError};
use crate::upstream::Answer;

/// Injects Marketo's access token; see the module documentation.
#[derive(Clone)]
pub struct AuthorizeLayer {
    tokens: Arc<TokenCaches>,
}

impl AuthorizeLayer {
    pub fn new(tokens: Arc<TokenCaches>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            tokens: Arc::clone(&self.tokens),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    tokens: Arc<TokenCaches>,
}

impl<S> Service<Call> for Authorize<S>
where
    S: Service<Call, Response = Answer, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = ProxyError;
    type Future = Either<Checked<S::Future>, BoxFuture<'static, Result<Answer, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let cache = Arc::clone(self.tokens.for_service(call.caller.id.index()));
        if let Some(token) = cache.cached() {
            call.request_mut()
                .headers_mut()
                .insert(header::AUTHORIZATION, token.header.clone());
            return Either::Left(Checked {
                future: self.inner.call(call),
                cache,
                token,
            });
        }
        // No token yet, or it was just refused: wait for the one identity
        // call in flight, within the call's deadline.
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            let token = tokio::time::timeout_at(call.deadline, cache.get())
                .await
                .unwrap_or_else(|_| {
                    Err(TokenError::Unreachable(
                        "no token before the request's deadline".into(),
                    ))
                })?;
            call.request_mut()
                .headers_mut()
                .insert(header::AUTHORIZATION, token.header.clone());
            Checked {
                future: inner.oneshot(call),
                cache,
                token,
            }
            .await
        }))
    }
}

pin_project_lite::pin_project! {
    /// A call with its token: a 601/602 answer reports the token refused.
    pub struct Checked<F> {
        #[pin]
        future: F,
        cache: Arc<TokenCache>,
        token: Token,
    }
}

impl<F> Future for Checked<F>
where
    F: Future<Output = Result<Answer, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.future.poll(cx))?;
        if matches!(
            answer.error_code.as_deref(),
            Some(code::TOKEN_INVALID | code::TOKEN_EXPIRED)
        ) {
            this.cache.refused(this.token);
        }
        Poll::Ready(Ok(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::proxy::testing::{self, Scripted, ScriptedMarketo};
    use crate::sim::{Faults, SimConfig, Simulator};
    use crate::upstream::Upstream;
    use http::StatusCode;
    use std::time::Duration;

    /// Token caches that ask a simulated Marketo for their tokens.
    async fn tokens() -> (Arc<TokenCaches>, crate::sim::SimHandle) {
        let sim = Simulator::spawn(SimConfig {
            latency: Duration::ZERO,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let yaml = format!(
            "marketo: {{ base_url: '{}', client_id: demo-client, client_secret: demo-secret }}\n\
             services: [{{ name: crm, api_key: key-crm-1234567890abcd }}]\nstate: {{ file: ~ }}",
            sim.url()
        );
        let config = Config::from_yaml_with_env(&yaml, |_| None).unwrap();
        let upstream = Upstream::new(&config.marketo).unwrap();
        (
            Arc::new(TokenCaches::new(&config, &upstream, &Metrics::new())),
            sim,
        )
    }

    fn request() -> Call {
        testing::call(0, Duration::from_secs(5))
    }

    fn bearer(call: &Call) -> http::HeaderValue {
        call.request.headers()[header::AUTHORIZATION].clone()
    }

    #[tokio::test]
    async fn every_call_carries_the_cached_token_marked_sensitive() {
        let (tokens, sim) = tokens().await;
        let marketo = ScriptedMarketo::default();
        let service = AuthorizeLayer::new(Arc::clone(&tokens)).layer(marketo.clone());
        for _ in 0..3 {
            service.clone().oneshot(request()).await.unwrap();
        }
        let sent = marketo.requests();
        let first = bearer(&sent[0]);
        assert!(first.to_str().unwrap().starts_with("Bearer "));
        assert!(first.is_sensitive());
        assert!(sent.iter().all(|request| bearer(request) == first));
        assert_eq!(
            sim.stats().identity_calls,
            1,
            "one identity call, then cache hits"
        );
    }

    #[tokio::test]
    async fn a_refused_token_is_dropped_and_the_next_call_gets_a_new_one() {
        let (tokens, sim) = tokens().await;
        let marketo = ScriptedMarketo::new([Scripted::Answer(StatusCode::OK, Some("601"))]);
        let service = AuthorizeLayer::new(Arc::clone(&tokens)).layer(marketo.clone());
        let answer = service.clone().oneshot(request()).await.unwrap();
        assert_eq!(
            answer.error_code.as_deref(),
            Some("601"),
            "passed up for the replay layer"
        );
        assert!(
            tokens.for_service(0).cached().is_none(),
            "the refused token is gone"
        );
        sim.inject(Faults {
            revoke_tokens: true,
            ..Faults::default()
        });
        service.clone().oneshot(request()).await.unwrap();
        let sent = marketo.requests();
        assert_ne!(bearer(&sent[0]), bearer(&sent[1]));
        assert_eq!(sim.stats().identity_calls, 2);
    }
}
