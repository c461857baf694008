//! The client side: one pooled hyper client to the configured Marketo host,
//! HTTPS through rustls (plain HTTP for a local simulator), directly or
//! through an egress proxy, with connect and answer timeouts, and the peek
//! that classifies Marketo's answers.
//!
//! Marketo reports most failures inside HTTP 200 as a small
//! `success:false` envelope, so the first bytes of every answer are read
//! before anything is sent to the client. An answer that ends within
//! [`PEEK_LIMIT`] is classified by its envelope; a larger one cannot be an
//! error envelope and is streamed through with the peeked bytes in front.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, Uri, header, response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::MarketoConfig;
use crate::egress::{Egress, EgressError, EgressProxy};
use crate::marketo::Envelope;
use crate::target::Target;
use crate::trust::{ConnectFailure, TrustError};

/// Answers up to this size are read whole and classified.
pub const PEEK_LIMIT: usize = 64 * 1024;

/// Idle upstream connections kept per host. Marketo allows 10 calls in
/// flight, so a few more than that covers bursts without reconnecting.
const MAX_IDLE_PER_HOST: usize = 32;

/// Why a call did not get an answer from Marketo.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Egress(#[from] EgressError),
    #[error("marketo.base_url is not an absolute http(s) URL")]
    BaseUrl,
    #[error("invalid upstream address")]
    Uri(#[source] http::Error),
    #[error("cannot reach Marketo: {}", .0.reason)]
    Connect(ConnectFailure),
    #[error("Marketo did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer from Marketo broke off")]
    Body(#[source] hyper::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// A pooled client bound to one Marketo base URL.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<Egress>, Full<Bytes>>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// `Host` of every call, built once.
    host: http::HeaderValue,
    /// Path prefix of the base URL without a trailing slash (usually empty).
    prefix: String,
    request_timeout: Duration,
}

impl Upstream {
    /// A client for `marketo`, reading the egress proxy from the process
    /// environment when the config sets none.
    pub fn new(marketo: &MarketoConfig) -> Result<Self, UpstreamError> {
        Self::with_env(marketo, |name| std::env::var(name).ok())
    }

    /// As [`Upstream::new`], with the environment read through `env`.
    pub fn with_env(
        marketo: &MarketoConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, UpstreamError> {
        let base: Uri = marketo
            .base_url
            .as_str()
            .parse()
            .map_err(|_| UpstreamError::BaseUrl)?;
        let scheme = base.scheme().cloned().ok_or(UpstreamError::BaseUrl)?;
        let authority = base.authority().cloned().ok_or(UpstreamError::BaseUrl)?;
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::BaseUrl)?;
        let proxy = EgressProxy::choose(marketo.egress_proxy.as_ref(), &base, env)?;
        if let Some(proxy) = &proxy {
            tracing::info!(proxy = %proxy.describe(), "calls to Marketo go through an egress proxy");
        }
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(marketo.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::trust::client_config(marketo.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Egress::new(tcp, proxy.as_ref()));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .build(https);
        Ok(Self {
            host,
            client,
            scheme,
            authority,
            prefix: base.path().trim_end_matches('/').to_owned(),
            request_timeout: marketo.request_timeout,
        })
    }

    /// The absolute URI of `path_and_query` on the Marketo host.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.prefix, path_and_query))
            .build()
            .map_err(UpstreamError::Uri)
    }

    /// The absolute URI of `target` on the Marketo host, built from its
    /// path and query without copying them again.
    pub fn uri_for(&self, target: Target) -> Result<Uri, UpstreamError> {
        let mut path_and_query = if self.prefix.is_empty() {
            target.path
        } else {
            format!("{}{}", self.prefix, target.path)
        };
        if let Some(query) = target.query {
            path_and_query.push('?');
            path_and_query.push_str(&query);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            http::uri::PathAndQuery::from_maybe_shared(Bytes::from(path_and_query))
                .map_err(|error| UpstreamError::Uri(error.into()))?,
        );
        Uri::from_parts(parts).map_err(|error| UpstreamError::Uri(error.into()))
    }

    /// How long Marketo gets to answer a call.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends a request and waits for the answer's head and first
    /// [`PEEK_LIMIT`] bytes, within the request timeout.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Answer, UpstreamError> {
        // Whatever the caller set, the call names the configured host.
        request.headers_mut().insert(header::HOST, self.host.clone());
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| UpstreamError::Connect(ConnectFailure::of(&error)))?;
            Answer::read(response, self.request_timeout).await
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }
}

/// An answer from Marketo with its body peeked.
pub struct Answer {
    pub head: response::Parts,
    pub body: AnswerBody,
    /// The Marketo error code, when the answer is a `success:false` envelope.
    pub error_code: Option<String>,
    /// Marketo's clock in the answer's `requestId`, epoch milliseconds.
    pub marketo_time: Option<i64>,
}

impl Answer {
    async fn read(response: Response<Incoming>, idle_timeout: Duration) -> Result<Self, UpstreamError> {
        let (head, mut incoming) = response.into_parts();
        let mut peeked = BytesMut::new();
        let complete = loop {
            match incoming.frame().await {
                None => break true,
                Some(Err(error)) => return Err(UpstreamError::Body(error)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        peeked.extend_from_slice(&data);
                    }
                    if peeked.len() > PEEK_LIMIT {
                        break false;
                    }
                }
            }
        };
        let peeked = peeked.freeze();
        let marketo_time = is_json(&head)
            .then(|| crate::admission::marketo_clock::in_request_id(&peeked))
            .flatten();
        if !complete {
            return Ok(Self {
                head,
                body: AnswerBody::Streaming {
                    head: peeked,
                    rest: incoming,
                    idle_timeout,
                },
                error_code: None,
                marketo_time,
            });
        }
        // Only an answer that names `errors` can be an error envelope; the
        // rest (most answers) is not parsed at all.
        let error_code = (is_json(&head) && mentions_errors(&peeked))
            .then(|| serde_json::from_slice::<Envelope>(&peeked).ok())
            .flatten()
            .and_then(|outcome| outcome.first_code().map(str::to_owned));
        Ok(Self {
            head,
            body: AnswerBody::Whole(peeked),
            error_code,
            marketo_time,
        })
    }
}

fn mentions_errors(body: &[u8]) -> bool {
    body.windows(8).any(|window| window == b"\"errors\"")
}

fn is_json(head: &response::Parts) -> bool {
    head.headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("json"))
}

/// The body of an answer: read whole, or the peeked part and the rest still
/// arriving.
pub enum AnswerBody {
    Whole(Bytes),
    Streaming {
        head: Bytes,
        rest: Incoming,
        /// Longest pause between two parts before the answer is given up.
        idle_timeout: Duration,
    },
}

/// Why the rest of a streamed answer did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the answer from Marketo broke off")]
    Broken(#[source] hyper::Error),
    #[error("the answer from Marketo stalled for {0:?}")]
    Stalled(Duration),
}

impl AnswerBody {
    /// A body to hand to the client: peeked bytes first, then the rest as it
    /// arrives.
    pub fn into_body(self) -> PassThrough {
        match self {
            Self::Whole(bytes) => PassThrough {
                head: Some(bytes),
                rest: None,
                idle: None,
                idle_timeout: Duration::ZERO,
                waiting: false,
            },
            Self::Streaming {
                head,
                rest,
                idle_timeout,
            } => PassThrough {
                head: Some(head),
                rest: Some(rest),
                idle: Some(Box::pin(tokio::time::sleep(idle_timeout))),
                idle_timeout,
                waiting: false,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Peeked bytes, then the remaining upstream body, without copying. A
    /// stalled upstream ends the body with an error instead of holding the
    /// call's concurrency slot forever.
    pub struct PassThrough {
        head: Option<Bytes>,
        #[pin]
        rest: Option<Incoming>,
        idle: Option<Pin<Box<tokio::time::Sleep>>>,
        idle_timeout: Duration,
        // The last poll found nothing: the idle timer is running. A client
        // that reads slowly is not an upstream that stalls, so the timer
        // only runs while we wait on the upstream.
        waiting: bool,
    }
}

impl Body for PassThrough {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(head) = this.head.take() {
            if !head.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
        }
        let Some(rest) = this.rest.as_pin_mut() else {
            return Poll::Ready(None);
        };
        match rest.poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(idle) = this.idle.as_mut() {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + *this.idle_timeout);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(StreamError::Broken)))
            }
            Poll::Pending => match this.idle.as_mut().map(|idle| idle.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Some(Err(StreamError::Stalled(*this.idle_timeout)))),
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.as_ref().is_none_or(Bytes::is_empty) && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, Bytes::len) as u64;
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + head);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
        }
    }
}
