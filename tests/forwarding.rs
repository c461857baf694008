//! End-to-end: the forwarding path between real clients, the proxy and the
//! simulator, all over real sockets on ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::sim::{Faults, SimConfig, Simulator};
use serde_json::{Value, json};
use support::{CRM_KEY, Stack, without_request_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A token for calling the simulator directly.
async fn sim_token(http: &reqwest::Client, sim_url: &str) -> String {
    let answer: Value = http
        .get(format!(
            "{sim_url}/identity/oauth/token?grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().unwrap().to_owned()
}

/// Sends the same request to a fresh simulator directly and to another
/// fresh simulator through the proxy, and returns both answers.
async fn direct_and_proxied(
    build: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
) -> ((u16, String, String), (u16, String, String)) {
    let direct_sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let stack = Stack::start(support::sim_config()).await;
    let token = sim_token(&stack.http, &direct_sim.url()).await;
    let read = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    };
    let direct = build(&stack.http, direct_sim.url())
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let proxied = build(&stack.http, stack.proxy.url())
        .header("X-Api-Key", CRM_KEY)
        .send()
        .await
        .unwrap();
    (read(direct).await, read(proxied).await)
}

fn assert_same_answer(direct: (u16, String, String), proxied: (u16, String, String)) {
    assert_eq!(proxied.0, direct.0, "status");
    assert_eq!(proxied.1, direct.1, "content type");
    assert_eq!(
        without_request_id(&proxied.2),
        without_request_id(&direct.2),
        "body"
    );
}

#[tokio::test]
async fn lead_get_round_trips_byte_for_byte() {
    let (direct, proxied) = direct_and_proxied(|http, base| {
        http.get(format!("{base}/rest/v1/lead/7.json?fields=email,lastName"))
    })
    .await;
    assert!(proxied.2.contains("lead7@example.com"), "{}", proxied.2);
    assert_same_answer(direct, proxied);
}

#[tokio::test]
async fn method_get_post_round_trips_byte_for_byte() {
    let (direct, proxied) = direct_and_proxied(|http, base| {
        http.post(format!("{base}/rest/v1/leads.json?_method=GET"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("filterType=email&filterValues=lead3%40example.com,lead4%40example.com&fields=email")
    })
    .await;
    let body: Value = serde_json::from_str(&proxied.2).unwrap();
    assert_eq!(body["result"].as_array().unwrap().len(), 2, "{body}");
    assert_same_answer(direct, proxied);
}

#[tokio::test]
async fn json_post_round_trips_byte_for_byte() {
    let input = json!({
        "action": "createOrUpdate",
        "lookupField": "email",
        "input": [{"email": "new@example.com", "firstName": "New"}, {"email": "lead1@example.com", "lastName": "Changed"}]
    });
    let (direct, proxied) =
        direct_and_proxied(|http, base| http.post(format!("{base}/rest/v1/leads.json")).json(&input)).await;
    let body: Value = serde_json::from_str(&proxied.2).unwrap();
    assert_eq!(body["result"][0]["status"], "created", "{body}");
    assert_eq!(body["result"][1]["status"], "updated", "{body}");
    assert_same_answer(direct, proxied);
}

#[tokio::test]
async fn large_export_file_streams_through_unchanged() {
    let sim = SimConfig {
        leads: 3000,
        export_time: Duration::from_millis(50),
        ..support::sim_config()
    };
    let stack = Stack::start(sim).await;
    let file = support::export_leads(&stack.proxy.url(), CRM_KEY, &["id", "email", "firstName"]).await;
    assert_eq!(file.status(), 200);
    let csv = file.text().await.unwrap();
    assert!(
        csv.len() > marketo_proxy::upstream::PEEK_LIMIT,
        "file is {} bytes",
        csv.len()
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3001);
    assert_eq!(lines[0], "id,email,firstName");
    assert_eq!(lines[3000], "3000,lead3000@example.com,First3000");
}

/// Sends raw HTTP/1.1 to the proxy (clients normalise URLs; this must not).
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn absolute_uri_and_host_header_never_choose_the_target() {
    let stack = Stack::start(support::sim_config()).await;
    let answer = raw(
        stack.proxy.addr,
        &format!(
            "GET http://evil.invalid/rest/v1/lead/2.json HTTP/1.1\r\nHost: evil.invalid\r\nX-Api-Key: {CRM_KEY}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("lead2@example.com"), "{answer}");
    let arrivals = stack.sim.stats().arrivals;
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].target, "/rest/v1/lead/2.json");
}

#[tokio::test]
async fn dot_segments_are_resolved_before_forwarding() {
    let stack = Stack::start(support::sim_config()).await;
    let answer = raw(
        stack.proxy.addr,
        &format!(
            "GET /rest/../bulk/v1/leads/export/none/status.json HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CRM_KEY}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let arrivals = stack.sim.stats().arrivals;
    assert_eq!(arrivals[0].target, "/bulk/v1/leads/export/none/status.json");

    for escape in ["/rest/../_sim/stats", "/_sim/stats", "//evil.invalid/rest/v1/x"] {
        let answer = raw(
            stack.proxy.addr,
            &format!("GET {escape} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CRM_KEY}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        if escape.starts_with("//") {
            // Resolves to /rest/v1/x on the configured host, or is refused.
            continue;
        }
        assert!(answer.starts_with("HTTP/1.1 404"), "{escape}: {answer}");
    }
    assert!(
        stack
            .sim
            .stats()
            .arrivals
            .iter()
            .all(|arrival| !arrival.target.contains("_sim"))
    );
}

#[tokio::test]
async fn paths_servers_read_differently_are_refused_with_400_before_marketo() {
    let stack = Stack::start(support::sim_config()).await;
    for path in [
        "/rest/..;/identity/oauth/token",
        "/rest/v1;jsessionid=1/lead/1.json",
        "/rest/v1%2f..%2f..%2fidentity/oauth/token",
        "/rest/v1%2F..%2Fidentity/oauth/token",
        "/rest/v1%5c..%5cidentity/oauth/token",
        "/rest/v1%5C..%5Cidentity/oauth/token",
        "/rest/v1\\..\\identity/oauth/token",
        "/rest/%2e%2e/identity/oauth/token",
        "/rest/%2E%2E/bulk/v1/leads/export/x/status.json",
        "/rest/.%2e/v1/lead/1.json",
        "/rest/%2e/v1/lead/1.json",
    ] {
        let answer = raw(
            stack.proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CRM_KEY}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains(r#""code":"1003""#), "{path}: {answer}");
    }
    let stats = stack.sim.stats();
    assert!(stats.arrivals.is_empty(), "{:?}", stats.arrivals);
    assert_eq!(stats.calls, 0);
}

#[tokio::test]
async fn oversized_uri_and_body_are_refused_before_marketo() {
    let stack = Stack::start(support::sim_config()).await;
    let long = "x".repeat(9000);
    let answer = stack
        .get(
            CRM_KEY,
            &format!("/rest/v1/leads.json?filterType=email&filterValues={long}"),
        )
        .await;
    assert_eq!(answer.status(), 414);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["success"], false);

    let answer = stack
        .http
        .post(format!("{}/rest/v1/leads.json", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    assert_eq!(stack.sim.stats().calls, 0);
}

#[tokio::test]
async fn a_read_that_gets_no_answer_is_replayed() {
    let stack = Stack::start_with(support::sim_config(), "request_timeout: 500ms").await;
    stack.sim.inject(Faults {
        hang_next: 1,
        ..Faults::default()
    });
    let answer = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(answer.status(), 200);
    let codes: Vec<String> = stack
        .sim
        .stats()
        .arrivals
        .into_iter()
        .map(|arrival| arrival.code)
        .collect();
    assert_eq!(codes, ["hung", "ok"]);
    let metrics = stack.metrics().await;
    assert_eq!(
        support::metric(&metrics, "marketo_proxy_replays_total{reason=\"no_answer\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_write_that_gets_no_answer_times_out_with_604_and_is_not_replayed() {
    let stack = Stack::start_with(support::sim_config(), "request_timeout: 500ms").await;
    stack.sim.inject(Faults {
        hang_next: 1,
        ..Faults::default()
    });
    let answer = stack
        .http
        .post(format!("{}/rest/v1/leads.json", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .json(&json!({"action": "createOnly", "input": [{"email": "once@example.com"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 504);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["errors"][0]["code"], "604");
    assert_eq!(stack.sim.stats().calls, 1, "a write is never sent twice");
}

#[tokio::test]
async fn unreachable_marketo_gives_a_marketo_shaped_503() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = support::proxy_config(&url, "connect_timeout: 1s");
    let proxy = marketo_proxy::app::spawn(config).await.unwrap();
    let answer = support::client()
        .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        503,
        "no token can be had from an unreachable Marketo"
    );
    assert!(answer.headers().contains_key("retry-after"));
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["errors"][0]["code"], "608");
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let stack = Stack::start(support::sim_config()).await;
    let admin = stack.proxy.admin_url();
    assert_eq!(
        stack
            .http
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Ready once a token has been fetched.
    support::wait_ready(&stack.proxy).await;
    stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    let metrics = stack.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "marketo_proxy_requests_total{outcome=\"ok\",service=\"crm-sync\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        support::metric(
            &metrics,
            "marketo_proxy_upstream_calls_total{api=\"rest\",code=\"ok\",service=\"crm-sync\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// An upstream that issues tokens and answers every call with 100 KB of a
/// file, then stalls without ending it.
async fn stalling_upstream() -> String {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        type Frames = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>;
                        let body = if request.uri().path() == "/identity/oauth/token" {
                            let token = r#"{"access_token":"t:1","token_type":"bearer","expires_in":3599,"scope":"u"}"#;
                            http_body_util::Full::new(bytes::Bytes::from(token)).boxed_unsync()
                        } else {
                            let part = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                                hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 100 * 1024])),
                            )]);
                            let stalled = futures_util::stream::pending::<Frames>();
                            http_body_util::StreamBody::new(futures_util::StreamExt::chain(part, stalled))
                                .boxed_unsync()
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    url
}

#[tokio::test]
async fn a_stalled_answer_is_cut_off_and_frees_its_slot() {
    let upstream = stalling_upstream().await;
    let config = support::proxy_config(&upstream, "request_timeout: 500ms");
    let proxy = marketo_proxy::app::spawn(config).await.unwrap();
    let answer = support::client()
        .get(format!("{}/bulk/v1/leads/export/x/file.json", proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let started = std::time::Instant::now();
    assert!(
        answer.bytes().await.is_err(),
        "the body breaks off instead of hanging"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The slot is given back once the proxy has dropped the broken body.
    support::eventually(Duration::from_secs(5), async || {
        let metrics = support::metrics_text(&proxy.admin_url()).await;
        match support::metric(&metrics, "marketo_proxy_inflight") {
            Some(0.0) => Ok(()),
            _ => Err(metrics),
        }
    })
    .await;
}

#[tokio::test]
async fn http2_clients_are_forwarded_over_http1_to_marketo() {
    let stack = Stack::start(support::sim_config()).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let read = h2
        .get(format!("{}/rest/v1/lead/1.json", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(read.version(), reqwest::Version::HTTP_2);
    let body: Value = read.json().await.unwrap();
    assert_eq!(body["success"], true, "{body}");
    let write: Value = h2
        .post(format!("{}/rest/v1/leads.json", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .json(&json!({"input": [{"email": "h2@example.com"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(write["success"], true, "{write}");
    assert_eq!(stack.sim.stats().ok, 2);
}
