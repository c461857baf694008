//! Stub inner services and fixtures for the layers' unit tests.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::request::Parts;
use http::{Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use tower::Service;

use super::admit::Admitted;
use super::call::Call;
use crate::auth::Callers;
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::response::{BoxError, Outcome, ResponseBody, json_response};
use crate::upstream::{Answer, AnswerBody};

/// Two services: `crm` (API key and client credentials) and `forms`.
pub const CONFIG: &str = r#"
marketo: { base_url: "http://127.0.0.1:1", client_id: a, client_secret: b }
services:
  - { name: crm, api_key: key-crm-1234567890abcd, client_id: crm-id, client_secret: crm-secret-0123456789 }
  - { name: forms, api_key: key-forms-0987654321 }
state: { file: ~ }
"#;

pub fn config() -> Config {
    Config::from_yaml_with_env(CONFIG, |_| None).unwrap()
}

pub fn callers() -> Arc<Callers> {
    callers_counting_in(&Metrics::new())
}

/// The callers, their calls counted in `metrics`.
pub fn callers_counting_in(metrics: &Metrics) -> Arc<Callers> {
    Arc::new(Callers::new(&config(), metrics))
}

/// The Marketo error code of an answer's body.
pub async fn marketo_code(response: Response<ResponseBody>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    value["errors"][0]["code"].as_str().unwrap_or_default().to_owned()
}

/// An inner service that answers 200 to everything and keeps what it was
/// sent.
#[derive(Clone, Default)]
pub struct StubAnswer {
    seen: Arc<Mutex<Vec<(Parts, Bytes)>>>,
}

impl StubAnswer {
    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request, its body read whole.
    pub fn last_request(&self) -> Option<(Parts, Bytes)> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// An extension of the last request.
    pub fn last<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.last_request()
            .and_then(|(parts, _)| parts.extensions.get::<T>().cloned())
    }
}

impl<B> Service<Request<B>> for StubAnswer
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let seen = Arc::clone(&self.seen);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map_err(Into::into).unwrap().to_bytes();
            seen.lock().unwrap().push((parts, body));
            let mut response = json_response(StatusCode::OK, Bytes::from_static(br#"{"success":true}"#));
            response.extensions_mut().insert(Outcome::OK);
            Ok(response)
        })
    }
}

/// A call of `service` that must be admitted within `wait`.
pub fn call(service: usize, wait: std::time::Duration) -> Call {
    let mut request = Request::get("/rest/v1/lead/1.json").body(Bytes::new()).unwrap();
    let extensions = request.extensions_mut();
    extensions.insert(crate::target::normalise("/rest/v1/lead/1.json", None).unwrap());
    let callers = callers();
    let service = callers.service(service).expect("a configured service");
    extensions.insert(callers.caller(service));
    extensions.insert(super::caller::Deadline::after(tokio::time::Instant::now(), wait));
    Call::from_request(request).unwrap()
}

/// What a scripted Marketo says to one call.
pub enum Scripted {
    /// An answer with this status and, if given, this error code.
    Answer(StatusCode, Option<&'static str>),
    /// No answer.
    Fail(fn() -> ProxyError),
}

/// An answer as Marketo would give it.
pub fn answer(status: StatusCode, code: Option<&str>) -> Answer {
    let body = match code {
        Some(code) => crate::marketo::error_body("x#1", code, "scripted"),
        None => Bytes::from_static(br#"{"requestId":"x#1","result":[],"success":true}"#),
    };
    let mut head = Response::new(()).into_parts().0;
    head.status = status;
    head.headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // Hop-by-hop: never passed on.
    head.headers
        .insert(header::CONNECTION, http::HeaderValue::from_static("keep-alive"));
    Answer {
        head,
        body: AnswerBody::Whole(body),
        error_code: code.map(str::to_owned),
        marketo_time: None,
    }
}

/// An inner service that plays a script, one entry per call, and keeps
/// the requests it was sent. Past the script's end it answers success.
#[derive(Clone, Default)]
pub struct ScriptedMarketo {
    script: Arc<Mutex<VecDeque<Scripted>>>,
    seen: Arc<Mutex<Vec<Call>>>,
}

impl ScriptedMarketo {
    pub fn new(script: impl IntoIterator<Item = Scripted>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            seen: Arc::default(),
        }
    }

    pub fn requests(&self) -> Vec<Call> {
        self.seen.lock().unwrap().clone()
    }

    fn next(&self, call: Call) -> Result<Answer, ProxyError> {
        self.seen.lock().unwrap().push(call);
        match self.script.lock().unwrap().pop_front() {
            Some(Scripted::Answer(status, code)) => Ok(answer(status, code)),
            Some(Scripted::Fail(error)) => Err(error()),
            None => Ok(answer(StatusCode::OK, None)),
        }
    }
}

impl Service<Call> for ScriptedMarketo {
    type Response = Answer;
    type Error = ProxyError;
    type Future = std::future::Ready<Result<Answer, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        std::future::ready(self.next(call))
    }
}

/// The same script, one level up: answers as admission returns them
/// (without a slot).
#[derive(Clone, Default)]
pub struct ScriptedAdmitted(pub ScriptedMarketo);

impl Service<Call> for ScriptedAdmitted {
    type Response = Admitted;
    type Error = ProxyError;
    type Future = std::future::Ready<Result<Admitted, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        std::future::ready(self.0.next(call).map(|answer| Admitted { answer, slot: None }))
    }
}
