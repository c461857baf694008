//! The HTTP client side of the harness: hyper 1 client connections over
//! HTTP/1.1 and HTTP/2, the request the load generator repeats, the check
//! that an answer is a Marketo success, and one-off requests to the
//! simulator's and the proxy's control endpoints.

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
    body: Bytes,
}

impl RequestSpec {
    pub fn get(path: &str) -> Self {
        Self {
            addr: local_addr(0),
            method: Method::GET,
            path: path.to_owned(),
            api_key: None,
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
        if !self.body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
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
    sender.ready().await?;
    let response = sender.send_request(request.build(true)?).await?;
    check_success(response).await
}

pub async fn exchange_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(), BoxError> {
    sender.ready().await?;
    let response = sender.send_request(request.build(false)?).await?;
    check_success(response).await
}

async fn check_success(response: Response<Incoming>) -> Result<(), BoxError> {
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    const SUCCESS: &[u8] = b"\"success\":true";
    let success = body.windows(SUCCESS.len()).any(|window| window == SUCCESS);
    if status == StatusCode::OK && success {
        Ok(())
    } else {
        Err(format!("answer {status}: {}", String::from_utf8_lossy(&body)).into())
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
