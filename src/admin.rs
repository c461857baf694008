//! The admin listener, on its own port so it can stay private:
//! `/healthz` (the process answers), `/readyz` (a Marketo token can be
//! had), `/metrics` (Prometheus text).

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;

use crate::proxy::{Proxy, ProxyBody};

/// Answers one admin request.
pub async fn handle(proxy: &Proxy, request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ));
    }
    Ok(match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readiness(proxy),
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            proxy.metrics().render(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// Ready once every upstream credential has a token; otherwise says why
/// (the error names no secret).
fn readiness(proxy: &Proxy) -> Response<ProxyBody> {
    let problems: Vec<String> = proxy
        .token_caches()
        .iter()
        .filter(|cache| cache.cached().is_none())
        .map(|cache| match cache.last_error() {
            Some(error) => error.to_string(),
            None => "no access token yet".to_owned(),
        })
        .collect();
    if problems.is_empty() {
        text(
            StatusCode::OK,
            "application/json",
            json!({"ready": true}).to_string(),
        )
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            json!({"ready": false, "reasons": problems}).to_string(),
        )
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
