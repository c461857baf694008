//! The bare hyper proxy of the pass-through scenario: this binary re-run
//! as `--bare-proxy LISTEN UPSTREAM`, in its own process. It is the floor
//! any hyper-based proxy starts from.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Argument that turns this binary into a bare hyper reverse proxy.
pub const ROLE: &str = "--bare-proxy";

/// A reverse proxy with nothing but hyper in it: the same server (auto
/// HTTP/1 + HTTP/2) and pooled hyper-util client as marketo-proxy, the
/// request passed on as it came. A reference for what the stacks cost.
pub fn serve(listen: SocketAddr, upstream: SocketAddr) {
    use hyper_util::client::legacy::Client;
    use hyper_util::server::conn::auto;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client: BareClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let server = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let server = server.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| forward(client.clone(), upstream, request));
                let _ = server.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}

type BareClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>;
type BareBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn forward(
    client: BareClient,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<BareBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let sent = match format!("http://{upstream}{path}").parse() {
        Ok(uri) => {
            parts.uri = uri;
            client.request(Request::from_parts(parts, body)).await.ok()
        }
        Err(_) => None,
    };
    Ok(match sent {
        Some(response) => response.map(BodyExt::boxed),
        None => {
            let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    })
}
