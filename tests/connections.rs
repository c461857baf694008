//! End-to-end: how the proxy holds client connections. Idle and silent
//! connections are closed, the connection cap holds new ones back, and the
//! admin port answers while the proxy's connections are used up. Raw
//! sockets, so nothing a client library does hides what the server did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use marketo_proxy::app::RunningProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const GET_LEAD: &str =
    "GET /rest/v1/lead/1.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: test-key-crm-0123456789\r\n\r\n";

/// Sends one request and reads its answer's status line.
async fn status_line(stream: &mut TcpStream) -> String {
    stream.write_all(GET_LEAD.as_bytes()).await.unwrap();
    let mut buffer = vec![0_u8; 8192];
    let read = stream.read(&mut buffer).await.unwrap();
    let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

fn addr(proxy: &RunningProxy) -> SocketAddr {
    proxy.addr
}

#[tokio::test]
async fn connections_that_send_nothing_are_closed_after_the_header_read_timeout() {
    let (_sim, proxy) = support::proxy_with_server("{ header_read_timeout: 500ms, idle_timeout: 10s }").await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr(&proxy)).await.unwrap());
    }
    for stream in &mut silent {
        let took = support::closed_within(stream, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
    }
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    let (sim, proxy) = support::proxy_with_server("{ header_read_timeout: 500ms, idle_timeout: 10s }").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms: the whole head would take seconds.
    for byte in GET_LEAD.bytes() {
        if stream.write_all(&[byte]).await.is_err() || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed() + support::closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    assert_eq!(sim.stats().arrivals.len(), 0, "nothing was forwarded");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (_sim, proxy) = support::proxy_with_server("{ header_read_timeout: 10s, idle_timeout: 500ms }").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    assert_eq!(status_line(&mut stream).await, "HTTP/1.1 200 OK");
    let took = support::closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn past_the_cap_a_connection_waits_until_another_closes() {
    let (_sim, proxy) =
        support::proxy_with_server("{ max_connections: 2, header_read_timeout: 30s, idle_timeout: 30s }")
            .await;
    // Two connections, each with a request answered, stay open.
    let mut first = TcpStream::connect(addr(&proxy)).await.unwrap();
    assert_eq!(status_line(&mut first).await, "HTTP/1.1 200 OK");
    let mut second = TcpStream::connect(addr(&proxy)).await.unwrap();
    assert_eq!(status_line(&mut second).await, "HTTP/1.1 200 OK");
    // A third is not served while they are open...
    let mut third = TcpStream::connect(addr(&proxy)).await.unwrap();
    third.write_all(GET_LEAD.as_bytes()).await.unwrap();
    let mut buffer = vec![0_u8; 8192];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buffer)).await;
    assert!(early.is_err(), "the third connection was served past the cap");
    // ...and is, as soon as one of them goes away.
    drop(first);
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200 OK"));
    drop(second);
}

#[tokio::test]
async fn the_admin_port_answers_while_the_proxy_port_is_full() {
    let (_sim, proxy) =
        support::proxy_with_server("{ max_connections: 1, header_read_timeout: 30s, idle_timeout: 30s }")
            .await;
    let mut only = TcpStream::connect(addr(&proxy)).await.unwrap();
    assert_eq!(status_line(&mut only).await, "HTTP/1.1 200 OK");
    for path in ["/healthz", "/metrics"] {
        let answer = support::client()
            .get(format!("{}{path}", proxy.admin_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn past_the_body_budget_a_request_is_refused_with_608_until_bytes_free() {
    let (sim, proxy) = support::proxy_with_server("{ max_buffered_body_bytes: 2000 }").await;
    let post = |length: usize| {
        format!(
            "POST /rest/v1/leads.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: test-key-crm-0123456789\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let body = |length: usize| {
        let filler = "x".repeat(length - 24);
        let body = format!(r#"{{"input":[{{"email":"{filler}"}}]}}"#);
        assert_eq!(body.len(), length);
        body
    };
    // A slow upload holds 1,500 of the 2,000 bytes while it trickles in.
    let mut slow = TcpStream::connect(addr(&proxy)).await.unwrap();
    let slow_body = body(1600);
    slow.write_all(post(1600).as_bytes()).await.unwrap();
    slow.write_all(&slow_body.as_bytes()[..1500]).await.unwrap();
    // Another body does not fit beside it: refused, not buffered.
    let answer = support::eventually(Duration::from_secs(5), async || {
        let answer = support::client()
            .post(format!("{}/rest/v1/leads.json", proxy.url()))
            .header("X-Api-Key", support::CRM_KEY)
            .header("Content-Type", "application/json")
            .body(body(1000))
            .send()
            .await
            .unwrap();
        if answer.status() == 503 {
            Ok(answer)
        } else {
            Err(answer.status())
        }
    })
    .await;
    assert_eq!(answer.headers()["retry-after"], "1");
    let refused: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(refused["errors"][0]["code"], "608", "{refused}");
    // The slow upload completes and is answered; its bytes are free again.
    slow.write_all(&slow_body.as_bytes()[1500..]).await.unwrap();
    let mut buffer = vec![0_u8; 8192];
    let read = slow.read(&mut buffer).await.unwrap();
    let text = String::from_utf8_lossy(&buffer[..read]);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let answer = support::client()
        .post(format!("{}/rest/v1/leads.json", proxy.url()))
        .header("X-Api-Key", support::CRM_KEY)
        .header("Content-Type", "application/json")
        .body(body(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(sim.stats().ok, 2, "the refused request never reached Marketo");
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    let line = r#"marketo_proxy_requests_total{outcome="rejected_busy",service="crm-sync"} 1"#;
    assert!(metrics.lines().any(|metric| metric == line), "{metrics}");
}

#[tokio::test]
async fn a_token_request_gets_no_more_than_a_small_body() {
    let (_sim, proxy) = support::proxy_with_server("{}").await;
    let answer = support::client()
        .post(format!("{}/identity/oauth/token", proxy.url()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&padding={}",
            "a".repeat(9000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
}
