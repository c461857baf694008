//! The upstream of the pass-through scenario: this binary re-run as
//! `--static-upstream ADDR`, in its own process, a hyper HTTP/1.1 server
//! that answers fixed Marketo shapes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Argument that turns this binary into the static upstream.
pub const ROLE: &str = "--static-upstream";

/// What the static upstream answers: Marketo's shapes, fixed.
const LEAD_ANSWER: &[u8] = br#"{"requestId":"e42b#14272d07d78","result":[{"id":1,"updatedAt":"2026-01-01T00:00:00Z","lastName":"Lead","email":"lead1@example.com","createdAt":"2026-01-01T00:00:00Z","firstName":"Bench"}],"success":true}"#;
const TOKEN_ANSWER: &[u8] = br#"{"access_token":"cdf01657-110d-4155-99a7-f986b2ff13a0:int","token_type":"bearer","expires_in":3599,"scope":"bench@example.com"}"#;

/// Serves Marketo-shaped answers with no bookkeeping at all, so the
/// pass-through figures measure the layer in front of it.
pub fn serve(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if request.uri().path() == "/identity/oauth/token" {
        TOKEN_ANSWER
    } else {
        LEAD_ANSWER
    };
    // Read the request body so the connection stays reusable.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    Ok(response)
}
