//! `marketo-sim`: a stand-in for one Marketo instance, faithful where the
//! proxy's correctness depends on it.
//!
//! It issues tokens with Marketo's same-token-until-expiry rule, enforces
//! the rolling window (606), the concurrency limit (615) and the daily
//! quota (607), answers with Marketo's envelopes, serves a few lead and
//! bulk export endpoints, and records every arrival so tests can prove that
//! a limit was never exceeded. Faults are injected through `/_sim/faults`
//! (or [`Simulator::inject`] in process); `/_sim/stats` reports counters
//! and arrivals.
//!
//! Tests, the demo and the benchmarks start it in process on an ephemeral
//! port with [`Simulator::spawn`]; the `marketo-sim` binary wraps it.

mod bulk;
mod bulk_routes;
mod http_parts;
mod leads;
mod state;
mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use bulk::{BulkStats, MAX_IN_QUEUE, MAX_PROCESSING, Occupancy, QueueStats};
pub use state::{Arrival, FailNext, Failure, Faults, Stats};
pub use tls::{TlsSetupError, server_config};

use crate::marketo::{self, IdentityError, TokenAnswer, code};
use http_parts::*;
use state::{Admission, State};

use crate::marketo::limits::{self, MAX_BODY_BYTES, MAX_IMPORT_BODY_BYTES, MAX_URI_BYTES};

/// How the simulated instance behaves. Defaults are Marketo's.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub window_calls: u32,
    pub window: Duration,
    pub concurrency: u32,
    pub daily_quota: u64,
    pub token_ttl: Duration,
    /// Time each call takes inside the instance.
    pub latency: Duration,
    /// Each call takes up to this much more or less than `latency`,
    /// uniformly.
    pub latency_jitter: Duration,
    /// Every this many calls, one takes `slow_latency` instead (0: none).
    pub slow_every: u32,
    pub slow_latency: Duration,
    /// The instance's clock (in request ids) minus the true time, in
    /// milliseconds.
    pub clock_skew_ms: i64,
    /// Time a bulk export spends processing.
    pub export_time: Duration,
    /// Time a bulk import spends processing.
    pub import_time: Duration,
    /// Export file bytes allowed a day (Marketo: 500 MB).
    pub export_daily_bytes: u64,
    /// API users allowed to ask for tokens.
    pub clients: Vec<SimClient>,
    /// Where the day (and the daily quota) starts.
    pub timezone: chrono_tz::Tz,
    /// Leads in the database at start.
    pub leads: u64,
    /// Answers are pretty-printed JSON (`"requestId": "…"`, with spaces),
    /// as a client's own tools and some Marketo pods write it.
    pub spaced_json: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            window_calls: limits::WINDOW_CALLS,
            window: limits::WINDOW,
            concurrency: limits::CONCURRENCY,
            daily_quota: limits::DAILY_QUOTA,
            token_ttl: limits::TOKEN_TTL,
            latency: Duration::from_millis(50),
            latency_jitter: Duration::ZERO,
            slow_every: 0,
            slow_latency: Duration::ZERO,
            clock_skew_ms: 0,
            export_time: Duration::from_secs(2),
            import_time: Duration::from_secs(2),
            export_daily_bytes: limits::EXPORT_DAILY_BYTES,
            clients: vec![SimClient::demo()],
            timezone: chrono_tz::America::Chicago,
            leads: 1000,
            spaced_json: false,
        }
    }
}

/// An API user: the client id and secret of a LaunchPoint service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimClient {
    pub client_id: String,
    pub client_secret: String,
    /// The API user's name, as the usage report shows it.
    pub user: String,
}

impl SimClient {
    /// The credential the demo and the examples use.
    pub fn demo() -> Self {
        Self {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            user: "demo@example.com".into(),
        }
    }
}

impl FromStr for SimClient {
    type Err = String;

    /// Parses `ID:SECRET:USER`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(secret), Some(user))
                if !id.is_empty() && !secret.is_empty() && !user.is_empty() =>
            {
                Ok(Self {
                    client_id: id.into(),
                    client_secret: secret.into(),
                    user: user.into(),
                })
            }
            _ => Err("expected ID:SECRET:USER".into()),
        }
    }
}

/// Body of every simulator answer.
pub type SimBody = BoxBody<Bytes, Infallible>;

/// Why a connection is closed without an answer (an injected fault).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
pub struct DroppedConnection;

/// A simulated Marketo instance. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<State>,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        Self {
            state: Arc::new(State::new(config)),
        }
    }

    /// Binds `127.0.0.1:0` and serves in a background task until the
    /// returned handle is dropped.
    pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
        Self::spawn_with(config, None).await
    }

    /// As [`Simulator::spawn`], serving HTTPS with `tls`.
    pub async fn spawn_tls(config: SimConfig, tls: Arc<rustls::ServerConfig>) -> std::io::Result<SimHandle> {
        Self::spawn_with(config, Some(tls)).await
    }

    async fn spawn_with(
        config: SimConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let simulator = Self::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(simulator.clone().serve_with(listener, tls, async move {
            let _ = stopped.await;
        }));
        Ok(SimHandle {
            addr,
            scheme,
            simulator,
            stop: Some(stop),
            task,
        })
    }

    /// Serves plain HTTP on `listener` until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.serve_with(listener, None, shutdown).await;
    }

    /// Serves on `listener`, HTTPS when `tls` is given, until `shutdown`
    /// completes.
    pub async fn serve_with(
        self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()>,
    ) {
        let accept = tls::Accept {
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            state: Arc::clone(&self.state),
        };
        let service = tower::service_fn(move |request| {
            let simulator = self.clone();
            async move { simulator.handle(request).await }
        });
        crate::server::serve_with(
            listener,
            accept,
            service,
            crate::server::ConnectionLimits::default(),
            shutdown,
        )
        .await;
    }

    pub fn config(&self) -> &SimConfig {
        &self.state.config
    }

    /// Counters and arrivals so far.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Injects faults, as `POST /_sim/faults` does.
    pub fn inject(&self, faults: Faults) {
        self.state.apply_faults(faults);
    }

    /// Adds calls to today's usage as if an integration outside the proxy
    /// had made them.
    pub fn add_foreign_usage(&self, user: &str, calls: u64) {
        self.state.add_foreign_usage(user, calls);
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Result<Response<SimBody>, DroppedConnection> {
        let path = request.uri().path().to_owned();
        if path.starts_with("/_sim/") {
            return Ok(self.control(request).await);
        }
        if path == "/identity/oauth/token" {
            return Ok(self.identity(request).await);
        }
        if !(path.starts_with("/rest/") || path.starts_with("/bulk/")) {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not found"}),
            ));
        }
        self.rest(request).await
    }

    async fn identity(&self, request: Request<Incoming>) -> Response<SimBody> {
        let mut params = query_params(request.uri().query());
        if request.method() == Method::POST {
            match read_body(request.into_body(), MAX_BODY_BYTES).await {
                Ok(body) => params.extend(form_params(&body)),
                Err(status) => return identity_error(status, "invalid_request", "Body too large"),
            }
        }
        {
            let mut inner = self.state.lock();
            inner.stats.identity_calls += 1;
            if inner.faults.identity_fail_next > 0 {
                inner.faults.identity_fail_next -= 1;
                return identity_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "Try again",
                );
            }
        }
        if params.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return identity_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Unsupported grant type",
            );
        }
        let id = params.get("client_id").map(String::as_str).unwrap_or_default();
        let secret = params
            .get("client_secret")
            .map(String::as_str)
            .unwrap_or_default();
        match self.state.issue_token(id, secret) {
            Some((access_token, expires_in, user)) => json_response(
                StatusCode::OK,
                &TokenAnswer {
                    access_token,
                    token_type: "bearer".into(),
                    expires_in,
                    scope: user,
                },
            ),
            None => identity_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Bad client credentials",
            ),
        }
    }

    async fn rest(&self, request: Request<Incoming>) -> Result<Response<SimBody>, DroppedConnection> {
        let (parts, body) = request.into_parts();
        let target = parts
            .uri
            .path_and_query()
            .map(|target| target.as_str().to_owned())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let mut arrival = Arrival {
            at: self.state.seconds_since_start(),
            user: None,
            method: parts.method.to_string(),
            target: target.clone(),
            code: "ok".into(),
            headers: parts
                .headers
                .iter()
                .map(|(name, _)| name.as_str().to_owned())
                .collect(),
        };

        // Marketo's request ids carry its clock.
        let request_id = self.state.request_id();
        if target.len() > MAX_URI_BYTES {
            arrival.code = "http_414".into();
            self.state.record(arrival);
            return Ok(error_response(
                &request_id,
                StatusCode::URI_TOO_LONG,
                "414",
                "Request-URI Too Long",
            ));
        }
        let limit = if path.starts_with("/bulk/") && path.contains("/import") {
            MAX_IMPORT_BODY_BYTES
        } else {
            MAX_BODY_BYTES
        };
        let body = match read_body(body, limit).await {
            Ok(body) => body,
            Err(status) => {
                arrival.code = format!("http_{}", status.as_u16());
                self.state.record(arrival);
                return Ok(error_response(
                    &request_id,
                    status,
                    &status.as_u16().to_string(),
                    "Request body rejected",
                ));
            }
        };

        let (hang, drop_connection) = {
            let mut inner = self.state.lock();
            let hang = take_one(&mut inner.faults.hang_next);
            let drop_connection = !hang && take_one(&mut inner.faults.drop_next);
            (hang, drop_connection)
        };
        if drop_connection {
            arrival.code = "dropped".into();
            self.state.record(arrival);
            return Err(DroppedConnection);
        }
        if hang {
            arrival.code = "hung".into();
            self.state.record(arrival);
            let never: Infallible = std::future::pending().await;
            match never {}
        }

        let is_form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
        let mut params = query_params(parts.uri.query());
        let form = if is_form {
            form_params(&body)
        } else {
            BTreeMap::new()
        };
        if params.contains_key("access_token")
            || form.contains_key("access_token")
            || body_mentions_access_token(&parts.headers, &body)
        {
            self.state.lock().stats.access_token_params += 1;
        }
        params.extend(form);

        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::to_owned);
        let token = bearer.or_else(|| params.get("access_token").cloned());
        let user = match self.state.check_token(token.as_deref()) {
            Ok(user) => user,
            Err(error_code) => {
                arrival.code = error_code.into();
                self.state.record(arrival);
                let message = match error_code {
                    code::TOKEN_MISSING => "Access token not specified",
                    code::TOKEN_EXPIRED => "Access token expired",
                    _ => "Access token invalid",
                };
                return Ok(envelope_error(&request_id, error_code, message));
            }
        };
        arrival.user = Some(user.clone());

        let in_flight = match self.state.admit(&user) {
            Admission::Admitted(in_flight) => in_flight,
            Admission::Rejected(error_code, message) => {
                arrival.code = error_code.into();
                self.state.record(arrival);
                return Ok(envelope_error(&request_id, error_code, &message));
            }
        };
        // Counted in the window now: its id says so.
        let request_id = self.state.request_id();

        let (failure, extra_latency) = {
            let mut inner = self.state.lock();
            (inner.faults.fail_next.pop_front(), inner.faults.extra_latency)
        };
        let latency = self.state.latency() + extra_latency;
        if !latency.is_zero() {
            // hyper drops this future when the client goes away during the
            // sleep; the call was admitted and counted, so record it anyway.
            let mut abandoned = RecordOnDrop {
                state: &self.state,
                arrival: Some(Arrival {
                    code: "cancelled".into(),
                    ..arrival.clone()
                }),
            };
            tokio::time::sleep(latency).await;
            abandoned.arrival = None;
        }
        let padding = failure.as_ref().and_then(|failure| failure.header_bytes);
        let (mut response, recorded) = match failure.and_then(|failure| injected_answer(&request_id, failure))
        {
            Some(injected) => injected,
            None => self.answer(&request_id, &parts, &path, &params, &body),
        };
        in_flight.answered_with(&recorded);
        arrival.code = recorded;
        self.state.record(arrival);
        if let Some(bytes) = padding {
            let padding =
                HeaderValue::from_bytes(&vec![b'a'; bytes]).unwrap_or(HeaderValue::from_static("a"));
            response.headers_mut().insert(PADDING_HEADER, padding);
        }
        Ok(response)
    }

    /// The call's own answer, and the code it is recorded under.
    fn answer(
        &self,
        request_id: &str,
        parts: &http::request::Parts,
        path: &str,
        params: &BTreeMap<String, String>,
        body: &Bytes,
    ) -> (Response<SimBody>, String) {
        let method = &parts.method;
        let method = if method == Method::POST && params.get("_method").map(String::as_str) == Some("GET") {
            Method::GET
        } else {
            method.clone()
        };
        match self.route(&method, path, params, body) {
            Routed::Json(Ok(result)) => {
                let answer = json!({"requestId": request_id, "result": result, "success": true});
                let response = if self.state.config.spaced_json {
                    json_response_with(StatusCode::OK, serde_json::to_vec_pretty(&answer))
                } else {
                    json_response(StatusCode::OK, &answer)
                };
                (response, "ok".into())
            }
            Routed::Json(Err((error_code, message))) => (
                envelope_error(request_id, error_code, &message),
                error_code.into(),
            ),
            Routed::File(rows) => (csv_response(rows, parts.headers.get(header::RANGE)), "ok".into()),
        }
    }

    fn route(&self, method: &Method, path: &str, params: &BTreeMap<String, String>, body: &Bytes) -> Routed {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut inner = self.state.lock();
        if let Some(endpoint) = bulk_routes::route(method, path) {
            let state::Inner { bulk, leads, .. } = &mut *inner;
            let context = self.state.bulk_context(leads);
            return match bulk.answer(&endpoint, params, body, &context) {
                bulk::BulkReply::Json(answer) => Routed::Json(answer),
                bulk::BulkReply::File(rows) => Routed::File(rows),
            };
        }
        let leads = &mut inner.leads;
        let answer = match (method, segments.as_slice()) {
            (&Method::GET, ["rest", "v1", "lead", file]) => {
                match file.strip_suffix(".json").map(str::parse::<u64>) {
                    Some(Ok(id)) => Ok(leads.by_id(id, params.get("fields").map(String::as_str))),
                    _ => Err((code::INVALID_VALUE, format!("Invalid lead id '{file}'"))),
                }
            }
            (&Method::GET, ["rest", "v1", "leads.json"]) => leads.by_filter(params),
            (&Method::GET, ["rest", "v1", "leads", "describe.json"]) => Ok(leads.describe_fields()),
            (&Method::POST, ["rest", "v1", "leads.json"]) => match serde_json::from_slice::<Value>(body) {
                Ok(body) => leads.sync(&body),
                Err(_) => Err((code::INVALID_JSON, "Invalid JSON".to_owned())),
            },
            (&Method::GET, ["rest", "v1", "stats", "usage.json"]) => {
                drop(inner);
                let (day, total, users) = self.state.usage_today();
                let users: Vec<Value> = users
                    .iter()
                    .map(|(user, count)| json!({"userId": user, "count": count}))
                    .collect();
                return Routed::Json(Ok(
                    json!([{"date": day.to_string(), "total": total, "users": users}]),
                ));
            }
            (&Method::GET, ["rest", "v1", "stats", "errors.json"]) => {
                drop(inner);
                let (day, errors) = self.state.errors_today();
                let total: u64 = errors.values().sum();
                let errors: Vec<Value> = errors
                    .iter()
                    .map(|(code, count)| json!({"errorCode": code, "count": count}))
                    .collect();
                return Routed::Json(Ok(
                    json!([{"date": day.to_string(), "total": total, "errors": errors}]),
                ));
            }
            _ => Err((code::NOT_FOUND, "Requested resource not found".to_owned())),
        };
        Routed::Json(answer)
    }

    async fn control(&self, request: Request<Incoming>) -> Response<SimBody> {
        let (parts, body) = request.into_parts();
        match (parts.method, parts.uri.path()) {
            (Method::GET, "/_sim/stats") => json_response(StatusCode::OK, &self.stats()),
            (Method::POST, "/_sim/faults") => {
                let body = match read_body(body, MAX_BODY_BYTES).await {
                    Ok(body) => body,
                    Err(status) => {
                        return json_response(status, &json!({"error": "body too large"}));
                    }
                };
                match serde_json::from_slice::<Faults>(&body) {
                    Ok(faults) => {
                        self.inject(faults);
                        json_response(StatusCode::OK, &json!({"ok": true}))
                    }
                    Err(error) => {
                        json_response(StatusCode::BAD_REQUEST, &json!({"error": error.to_string()}))
                    }
                }
            }
            (Method::POST, "/_sim/usage") => {
                let body = read_body(body, MAX_BODY_BYTES).await.unwrap_or_default();
                let parsed: Result<Value, _> = serde_json::from_slice(&body);
                match parsed.ok().and_then(|value| {
                    Some((
                        value.get("user")?.as_str()?.to_owned(),
                        value.get("calls")?.as_u64()?,
                    ))
                }) {
                    Some((user, calls)) => {
                        self.add_foreign_usage(&user, calls);
                        json_response(StatusCode::OK, &json!({"ok": true}))
                    }
                    None => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "expected {\"user\": .., \"calls\": ..}"}),
                    ),
                }
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
        }
    }
}

/// Records an admitted call whose client went away before the answer.
struct RecordOnDrop<'a> {
    state: &'a State,
    arrival: Option<Arrival>,
}

impl Drop for RecordOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(arrival) = self.arrival.take() {
            self.state.record(arrival);
        }
    }
}

enum Routed {
    Json(Result<Value, (&'static str, String)>),
    File(Vec<String>),
}

/// A running in-process simulator. Dropping it stops the server.
pub struct SimHandle {
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    simulator: Simulator,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or `https://`), the base URL to configure.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }

    pub fn stats(&self) -> Stats {
        self.simulator.stats()
    }

    pub fn inject(&self, faults: Faults) {
        self.simulator.inject(faults);
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The header a [`Failure`] with `header_bytes` adds to an answer.
pub const PADDING_HEADER: &str = "x-sim-padding";
