//! The HTTP client side of the harness: hyper 1 client connections over
//! HTTP/1.1 and HTTP/2, the request the load generator repeats, the check
//! that an answer is a Marketo success, one-off requests to the
//! simulator's and the proxy's control endpoints, and the reading of the
//! proxy's metrics.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::processes::local_addr;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request the load generator sends over and over.
#[derive(Clone)]
pub struct RequestSpec {
    pub addr: SocketAddr,
    method: Method,
    path: String,
    api_key: Option<String>,
    /// `Authorization: Bearer` value (a proxy-issued token).
    bearer: Option<String>,
    content_type: &'static str,
    body: Bytes,
}

impl RequestSpec {
    pub fn get(path: &str) -> Self {
        Self {
            addr: local_addr(0),
            method: Method::GET,
            path: path.to_owned(),
            api_key: None,
            bearer: None,
            content_type: "application/json",
            body: Bytes::new(),
        }
    }

    pub fn post(path: &str, body: Bytes) -> Self {
        Self {
            method: Method::POST,
            body,
            ..Self::get(path)
        }
    }

    pub fn to(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    pub fn with_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_owned());
        self
    }

    pub fn with_bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// The body is sent as `application/x-www-form-urlencoded`.
    pub fn form(mut self) -> Self {
        self.content_type = "application/x-www-form-urlencoded";
        self
    }

    fn build(&self, with_host: bool) -> Result<Request<Full<Bytes>>, BoxError> {
        let mut builder = Request::builder().method(self.method.clone());
        if with_host {
            builder = builder
                .uri(self.path.as_str())
                .header(header::HOST, self.addr.to_string());
        } else {
            builder = builder.uri(format!("http://{}{}", self.addr, self.path));
        }
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key.as_str());
        }
        if let Some(token) = &self.bearer {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if !self.body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, self.content_type);
        }
        Ok(builder.body(Full::new(self.body.clone()))?)
    }
}

pub async fn connect_h1(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

pub async fn connect_h2(addr: SocketAddr) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request and its whole answer, which must be a Marketo success.
pub async fn exchange(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(), BoxError> {
    let (status, body) = answer(sender, request).await?;
    success_or_error(status, &body)
}

pub async fn exchange_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(), BoxError> {
    let (status, body) = answer_h2(sender, request).await?;
    success_or_error(status, &body)
}

/// One request and its whole answer, whatever it is.
pub async fn answer(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(StatusCode, Bytes), BoxError> {
    sender.ready().await?;
    read_answer(sender.send_request(request.build(true)?).await?).await
}

pub async fn answer_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(StatusCode, Bytes), BoxError> {
    sender.ready().await?;
    read_answer(sender.send_request(request.build(false)?).await?).await
}

async fn read_answer(response: Response<Incoming>) -> Result<(StatusCode, Bytes), BoxError> {
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// Whether an answer is a Marketo success: HTTP 200 with `"success":true`.
pub fn is_success(status: StatusCode, body: &[u8]) -> bool {
    const SUCCESS: &[u8] = b"\"success\":true";
    status == StatusCode::OK && body.windows(SUCCESS.len()).any(|window| window == SUCCESS)
}

fn success_or_error(status: StatusCode, body: &[u8]) -> Result<(), BoxError> {
    if is_success(status, body) {
        Ok(())
    } else {
        Err(format!("answer {status}: {}", String::from_utf8_lossy(body)).into())
    }
}

/// A one-off GET on a fresh connection; the body when the status is 200.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Bytes, BoxError> {
    one_off(addr, Method::GET, path, Bytes::new()).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &'static [u8]) -> Result<Bytes, BoxError> {
    one_off(addr, Method::POST, path, Bytes::from_static(body)).await
}

async fn one_off(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> Result<Bytes, BoxError> {
    let mut sender = connect_h1(addr).await?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status == StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("{path}: {status}").into())
    }
}

/// The sum of every series of metric `name` in a Prometheus text
/// exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
