//! End-to-end: clients that attack the proxy on purpose. Each attack must
//! end (the proxy cuts it off or refuses it), the proxy must hold no more
//! than its bounds (connections, buffered body bytes, streams per HTTP/2
//! connection, request-head bytes), nothing of an attack may reach Marketo,
//! and a well-behaved client must be served while it runs.
//!
//! The attackers use raw sockets and hand-written HTTP/2 frames
//! ([`support::raw_h2`]), since a client library refuses to misbehave.
//! Deadlines are generous "it ended" bounds, never measurements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use marketo_proxy::app::RunningProxy;
use support::raw_h2::{REFUSED_STREAM, RST_STREAM, RawH2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const GET_LEAD: &str =
    "GET /rest/v1/lead/1.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: test-key-crm-0123456789\r\n\r\n";

/// A body Marketo takes for `POST /rest/v1/leads.json`.
const LEAD_BODY: &str = r#"{"action":"createOrUpdate","input":[{"email":"q@example.com"}]}"#;

/// How long any attack, or a request made during one, may take to end.
const ENDED_WITHIN: Duration = Duration::from_secs(20);

/// A request from a client that behaves, made while an attack runs: it
/// must be answered with Marketo's success.
async fn well_behaved(proxy: &RunningProxy) {
    well_behaved_with(&support::client(), proxy).await;
}

/// The same over HTTP/2 (prior knowledge, as the attackers use).
async fn well_behaved_h2(proxy: &RunningProxy) {
    let http2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    well_behaved_with(&http2, proxy).await;
}

async fn well_behaved_with(client: &reqwest::Client, proxy: &RunningProxy) {
    let answer = client
        .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
        .header("X-Api-Key", support::CRM_KEY)
        .timeout(ENDED_WITHIN)
        .send()
        .await
        .expect("a well-behaved request is answered during the attack");
    assert_eq!(answer.status(), 200);
    let body = answer.text().await.unwrap();
    assert!(body.contains(r#""success":true"#), "{body}");
}

/// The value of one metric series of `proxy` (0 when it is absent).
async fn metric(proxy: &RunningProxy, series: &str) -> f64 {
    let text = support::metrics_text(&proxy.admin_url()).await;
    support::metric(&text, series).unwrap_or(0.0)
}

fn requests(service: &str, outcome: &str) -> String {
    format!(r#"marketo_proxy_requests_total{{outcome="{outcome}",service="{service}"}}"#)
}

/// Connections the proxy holds open on `addr`'s port.
fn held_connections(addr: SocketAddr) -> usize {
    support::kernel::held_connections(addr.port())
}

/// The fields of `GET /rest/v1/lead/1.json` with crm-sync's key, over
/// HTTP/2 to `authority`.
fn get_lead(authority: &str) -> [(&str, &str); 5] {
    [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", "/rest/v1/lead/1.json"),
        ("x-api-key", support::CRM_KEY),
    ]
}

/// The next `count` answers on `connection`: each stream with its
/// `:status`, in the order they came.
async fn next_statuses(connection: &mut RawH2, count: usize) -> Vec<(u32, u16)> {
    let mut statuses = Vec::new();
    while statuses.len() < count {
        let frame = tokio::time::timeout(ENDED_WITHIN, connection.read_frame())
            .await
            .expect("answered in time")
            .expect("the connection stays open");
        if let Some(status) = frame.status() {
            statuses.push((frame.stream, status));
        }
    }
    statuses
}

/// What a client that sends `bytes` one at a time saw.
#[derive(Debug)]
struct Trickled {
    /// Bytes written before the proxy closed the connection.
    sent: usize,
    /// The proxy closed it (end of file, reset or a failed write).
    closed: bool,
}

/// Connects and sends `bytes` one every `pause`, watching for the proxy
/// to close the connection; gives up (not closed) after [`ENDED_WITHIN`].
async fn trickle(addr: SocketAddr, bytes: &[u8], pause: Duration) -> Trickled {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let deadline = Instant::now() + ENDED_WITHIN;
    let mut buffer = [0_u8; 4096];
    let mut sent = 0;
    while Instant::now() < deadline {
        if sent < bytes.len() {
            if stream.write_all(&bytes[sent..=sent]).await.is_err() {
                return Trickled { sent, closed: true };
            }
            sent += 1;
        }
        // An answer before the close, or nothing yet: go on.
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(pause, stream.read(&mut buffer)).await {
            return Trickled { sent, closed: true };
        }
    }
    Trickled { sent, closed: false }
}

/// Runs `attack` over and over in the background until the returned
/// sender says stop; the task returns how many rounds ran.
fn repeat<F>(mut attack: impl FnMut() -> F + Send + 'static) -> (watch::Sender<bool>, JoinHandle<u32>)
where
    F: Future<Output = ()> + Send,
{
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut rounds = 0;
        while !*stopped.borrow_and_update() {
            attack().await;
            rounds += 1;
        }
        rounds
    });
    (stop, task)
}

/// A request head for `POST /rest/v1/leads.json` with `headers` added.
fn post_head(headers: &str) -> String {
    format!("POST /rest/v1/leads.json HTTP/1.1\r\nHost: proxy\r\n{headers}\r\n")
}

/// Everything the proxy sends on `stream` until it closes it; panics when
/// it is still open after [`ENDED_WITHIN`].
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        match tokio::time::timeout(ENDED_WITHIN, stream.read(&mut buffer)).await {
            Err(_) => panic!(
                "still open after {ENDED_WITHIN:?}; sent so far: {}",
                String::from_utf8_lossy(&answer)
            ),
            Ok(Ok(0) | Err(_)) => return String::from_utf8_lossy(&answer).into_owned(),
            Ok(Ok(read)) => answer.extend_from_slice(&buffer[..read]),
        }
    }
}

#[tokio::test]
async fn clients_that_trickle_their_headers_are_cut_off_while_others_are_served() {
    let (sim, proxy) = support::proxy_with_server("{ header_read_timeout: 500ms, idle_timeout: 30s }").await;
    // Twenty clients send a byte every 100 ms: a whole head would take 8 s.
    let tricklers: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(trickle(
                proxy.addr,
                GET_LEAD.as_bytes(),
                Duration::from_millis(100),
            ))
        })
        .collect();
    // And one HTTP/2 client sends a head that never ends: HEADERS without
    // END_HEADERS, then nothing.
    let mut unfinished = RawH2::connect(proxy.addr).await.unwrap();
    let authority = proxy.addr.to_string();
    unfinished
        .headers_unfinished(1, &get_lead(&authority))
        .await
        .unwrap();

    well_behaved(&proxy).await;
    well_behaved_h2(&proxy).await;

    for trickler in tricklers {
        let trickled = trickler.await.unwrap();
        assert!(
            trickled.closed,
            "a trickling client was never cut off: {trickled:?}"
        );
        assert!(
            trickled.sent < GET_LEAD.len(),
            "a trickling client got its whole head in: {trickled:?}"
        );
    }
    let ended = tokio::time::timeout(ENDED_WITHIN, unfinished.until_closed()).await;
    assert!(ended.is_ok(), "the unfinished HTTP/2 head was never cut off");
    // Only the two well-behaved requests were forwarded and counted.
    assert_eq!(sim.stats().calls, 2);
    assert_eq!(metric(&proxy, &requests("crm-sync", "ok")).await, 2.0);
    assert_eq!(held_connections(proxy.addr), 0, "every connection is closed");
}

#[tokio::test]
async fn slow_bodies_hold_no_more_than_the_body_budget_and_requests_without_one_are_served() {
    // 4,096 bytes for the bodies of known callers, one for the others.
    let (sim, proxy) =
        support::proxy_with_server("{ max_buffered_body_bytes: 4097, unauthenticated_body_bytes: 1 }").await;
    let slow_head = post_head(&format!(
        "X-Api-Key: {}\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n",
        support::CRM_KEY
    ));
    // Each slow client sends half of a 2,000-byte body and then stalls, as
    // a client that trickles its body does between two bytes.
    let stall = async || {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let mut first_half = slow_head.clone().into_bytes();
        first_half.extend_from_slice(&[b' '; 1000]);
        stream.write_all(&first_half).await.unwrap();
        stream
    };
    let post = async |body: String| {
        support::client()
            .post(format!("{}/rest/v1/leads.json", proxy.url()))
            .header("X-Api-Key", support::CRM_KEY)
            .header("Content-Type", "application/json")
            .body(body)
            .timeout(ENDED_WITHIN)
            .send()
            .await
            .unwrap()
    };
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stall().await);
    }
    // Once the four hold 4,000 bytes, a body of 97 no longer fits...
    let padded_to = |length: usize| format!("{LEAD_BODY:<length$}");
    support::eventually(ENDED_WITHIN, async || match post(padded_to(97)).await.status() {
        reqwest::StatusCode::SERVICE_UNAVAILABLE => Ok(()),
        status => Err(status),
    })
    .await;
    // ...one of 96 does, and a fifth slow client is refused at once.
    assert_eq!(post(padded_to(96)).await.status(), 200);
    let mut fifth = stall().await;
    let refused = read_until_closed(&mut fifth).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains(r#""code":"608""#), "{refused}");
    // Requests without a body need none of it.
    well_behaved(&proxy).await;
    // The stalled clients went nowhere, and their bytes free when they go.
    let forwarded = sim.stats().calls;
    drop(stalled);
    support::eventually(ENDED_WITHIN, async || {
        match post(padded_to(1000)).await.status() {
            reqwest::StatusCode::OK => Ok(()),
            status => Err(status),
        }
    })
    .await;
    assert_eq!(sim.stats().calls, forwarded + 1);
    assert!(metric(&proxy, &requests("crm-sync", "rejected_busy")).await >= 2.0);
}

/// A form body of 65,536 bytes from a caller not known yet (an old client
/// may put its `access_token` there), of which 65,000 are sent before the
/// client stalls: the proxy must read it to know who sent it.
async fn stalled_unknown_form(addr: SocketAddr) -> TcpStream {
    let head = post_head("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 65536\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut sent = head.into_bytes();
    sent.extend_from_slice(b"input=");
    sent.resize(sent.len() + 65_000 - 6, b'a');
    stream.write_all(&sent).await.unwrap();
    stream
}

#[tokio::test]
async fn stalled_unauthenticated_bodies_leave_authenticated_writes_their_part_of_the_budget() {
    // 4 MiB in all: 256 KiB for bodies whose caller is not known yet.
    let (sim, proxy) = support::proxy_with_server(
        "{ max_buffered_body_bytes: 4194304, unauthenticated_bodies_per_address: 1000 }",
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(stalled_unknown_form(proxy.addr).await);
    }
    // At most four of them fit in their part; the rest are refused as
    // their bytes come.
    let answers = futures_util::future::join_all(stalled.iter_mut().map(async |stream| {
        tokio::time::timeout(Duration::from_secs(3), read_until_closed(stream))
            .await
            .ok()
    }))
    .await;
    let reading = answers.iter().filter(|answer| answer.is_none()).count();
    assert!(
        (1..=4).contains(&reading),
        "{reading} unauthenticated bodies held at once"
    );
    for answer in answers.iter().flatten() {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    // A known service's 150 KB write still finds its part.
    let write = format!(
        r#"{{"action":"createOrUpdate","input":[{{"email":"w@example.com","note":"{}"}}]}}"#,
        "n".repeat(150_000)
    );
    let answer = support::client()
        .post(format!("{}/rest/v1/leads.json", proxy.url()))
        .header("X-Api-Key", support::CRM_KEY)
        .header("Content-Type", "application/json")
        .body(write)
        .timeout(ENDED_WITHIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(
        sim.stats().calls,
        1,
        "only the known service's write was forwarded"
    );
    drop(stalled);
}

#[tokio::test]
async fn only_a_few_unauthenticated_bodies_are_read_at_once_from_one_address() {
    let (sim, proxy) = support::proxy_with_server("{ unauthenticated_bodies_per_address: 4 }").await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_unknown_form(proxy.addr).await);
    }
    // The fifth from the same address is refused once the four are read.
    let fifth = support::eventually(ENDED_WITHIN, async || {
        let mut fifth = stalled_unknown_form(proxy.addr).await;
        match tokio::time::timeout(Duration::from_secs(2), read_until_closed(&mut fifth)).await {
            Ok(answer) => Ok(answer),
            Err(_) => Err("the fifth is being read"),
        }
    })
    .await;
    assert!(fifth.starts_with("HTTP/1.1 503"), "{fifth}");
    assert!(fifth.contains(r#""code":"608""#), "{fifth}");
    // Once they go, bodies from that address are read again.
    drop(stalled);
    let form = support::client()
        .post(format!("{}/rest/v1/leads.json", proxy.url()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("access_token=wrong")
        .timeout(ENDED_WITHIN);
    let answer = support::eventually(ENDED_WITHIN, async || {
        let answer = form.try_clone().unwrap().send().await.unwrap();
        match answer.status() {
            reqwest::StatusCode::SERVICE_UNAVAILABLE => Err(answer.status()),
            _ => Ok(answer),
        }
    })
    .await;
    assert_eq!(answer.status(), 401);
    assert_eq!(sim.stats().calls, 0);
}

#[tokio::test]
async fn silent_connections_past_the_cap_are_closed_in_turn_and_the_cap_holds() {
    let (sim, proxy) =
        support::proxy_with_server("{ max_connections: 8, header_read_timeout: 500ms, idle_timeout: 30s }")
            .await;
    // A client with a keep-alive connection from before the attack.
    let mut regular = TcpStream::connect(proxy.addr).await.unwrap();
    regular.write_all(GET_LEAD.as_bytes()).await.unwrap();
    let mut buffer = vec![0_u8; 8192];
    let read = regular.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200 OK"));

    // Forty connections that never send a byte: five times the cap.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let watch_cap = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..200 {
            most = most.max(held_connections(proxy.addr));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    });

    // The connection from before is served at once; a new one waits in
    // the accept queue behind the silent ones until they are cut off.
    regular.write_all(GET_LEAD.as_bytes()).await.unwrap();
    let read = tokio::time::timeout(ENDED_WITHIN, regular.read(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200 OK"));
    well_behaved(&proxy).await;
    let admin = support::client()
        .get(format!("{}/healthz", proxy.admin_url()))
        .timeout(ENDED_WITHIN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);

    for stream in &mut silent {
        support::closed_within(stream, ENDED_WITHIN).await;
    }
    let most = watch_cap.await.unwrap();
    assert!(most <= 8, "the proxy held {most} connections, past its cap of 8");
    assert!(most >= 7, "the silent connections were never held ({most})");
    assert_eq!(
        sim.stats().calls,
        3,
        "nothing but the three requests was forwarded"
    );
}

#[tokio::test]
async fn streams_past_the_http2_limit_are_refused_and_the_connection_survives() {
    let (sim, proxy) = support::proxy_with_server("{ http2_max_concurrent_streams: 8 }").await;
    let mut flood = RawH2::connect(proxy.addr).await.unwrap();
    let authority = proxy.addr.to_string();
    let length = LEAD_BODY.len().to_string();
    let post = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority.as_str()),
        (":path", "/rest/v1/leads.json"),
        ("x-api-key", support::CRM_KEY),
        ("content-type", "application/json"),
        ("content-length", length.as_str()),
    ];
    // 200 streams at once, each waiting for its body: 25 times the limit.
    let streams: Vec<u32> = (0..200).map(|index| 2 * index + 1).collect();
    for &stream in &streams {
        flood.headers(stream, &post, false).await.unwrap();
    }
    let mut refused = Vec::new();
    while refused.len() < 192 {
        let frame = tokio::time::timeout(ENDED_WITHIN, flood.read_frame())
            .await
            .expect("the extra streams are refused")
            .expect("the connection stays open");
        if frame.kind == RST_STREAM {
            assert_eq!(frame.error_code(), Some(REFUSED_STREAM), "{frame:?}");
            refused.push(frame.stream);
        }
    }
    assert_eq!(refused, streams[8..], "every stream past the first 8 is refused");

    // Meanwhile others are served, over HTTP/1.1 and HTTP/2.
    well_behaved(&proxy).await;
    well_behaved_h2(&proxy).await;

    // The 8 accepted streams complete and are answered...
    for &stream in &streams[..8] {
        flood.data(stream, LEAD_BODY.as_bytes()).await.unwrap();
    }
    let mut answered = next_statuses(&mut flood, 8).await;
    answered.sort_unstable();
    let all_ok: Vec<(u32, u16)> = streams[..8].iter().map(|&stream| (stream, 200)).collect();
    assert_eq!(answered, all_ok);
    // ...and the connection takes new streams.
    let next = streams[streams.len() - 1] + 2;
    let get = get_lead(&authority);
    flood.headers(next, &get, true).await.unwrap();
    assert_eq!(next_statuses(&mut flood, 1).await, [(next, 200)]);
    // Only what was accepted reached Marketo: nothing was queued.
    assert_eq!(sim.stats().calls, 8 + 2 + 1);
}

#[tokio::test]
async fn a_multipart_boundary_over_70_characters_gets_400_before_the_body_is_read() {
    let (sim, proxy) = support::proxy_with_server("{}").await;
    let boundary = "b".repeat(71);
    let head = |key: &str| {
        post_head(&format!(
            "{key}Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n"
        ))
    };
    let with_key = head(&format!("X-Api-Key: {}\r\n", support::CRM_KEY));
    let without_key = head("");
    // The attack over and over, with and without a credential: the head
    // alone, a megabyte announced and never sent.
    let addr = proxy.addr;
    let (stop, attack) = repeat(move || {
        let heads = [with_key.clone(), without_key.clone()];
        async move {
            for head in heads {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(head.as_bytes()).await.unwrap();
                let answer = read_until_closed(&mut stream).await;
                assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
                assert!(answer.contains(r#""code":"1003""#), "{answer}");
            }
        }
    });
    well_behaved(&proxy).await;
    stop.send(true).unwrap();
    let rounds = attack.await.unwrap();
    assert!(rounds >= 1);
    assert_eq!(
        sim.stats().calls,
        1,
        "only the well-behaved request was forwarded"
    );
    let rounds = f64::from(rounds);
    assert_eq!(
        metric(&proxy, &requests("crm-sync", "rejected_request")).await,
        rounds
    );
    assert_eq!(
        metric(&proxy, &requests("unauthenticated", "rejected_request")).await,
        rounds
    );
}

/// Sends a request line and then 1 KB header lines until the proxy
/// closes the connection, and returns what the proxy answered (nothing
/// when the reset overtook the answer); panics when the proxy took 16 MB
/// or stopped reading without closing.
async fn endless_head(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut written = 0;
    let line = format!("X-Padding: {}\r\n", "a".repeat(1010));
    let start = format!(
        "GET /rest/v1/lead/1.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {}\r\n",
        support::CRM_KEY
    );
    let writing = async {
        stream.write_all(start.as_bytes()).await?;
        loop {
            assert!(written < 16 << 20, "the proxy read 16 MB of one request head");
            stream.write_all(line.as_bytes()).await?;
            written += line.len();
        }
    };
    let failed: std::io::Result<()> = tokio::time::timeout(ENDED_WITHIN, writing)
        .await
        .expect("the proxy stopped reading the head but kept the connection");
    assert!(failed.is_err());
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(ENDED_WITHIN, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_head_over_64_kb_is_refused_without_reading_on() {
    let (sim, proxy) = support::proxy_with_server("{}").await;
    let addr = proxy.addr;
    // HTTP/1.1: header lines without end, over and over.
    let (stop, attack) = repeat(move || async move {
        let answer = endless_head(addr).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
    });
    // HTTP/2: a 100 KB head in CONTINUATION frames gets 431 on its
    // stream, and the connection goes on serving.
    let mut connection = RawH2::connect(addr).await.unwrap();
    let authority = addr.to_string();
    let padding = "a".repeat(100 * 1024);
    let get = get_lead(&authority);
    let mut oversized = get.to_vec();
    oversized.push(("x-padding", padding.as_str()));
    connection.headers(1, &oversized, true).await.unwrap();
    connection.headers(3, &get, true).await.unwrap();
    let mut statuses = next_statuses(&mut connection, 2).await;
    statuses.sort_unstable();
    assert_eq!(statuses, [(1, 431), (3, 200)]);
    // HTTP/2: CONTINUATION frames without end are cut off with the
    // connection.
    let mut endless = RawH2::connect(addr).await.unwrap();
    endless.headers_unfinished(1, &get).await.unwrap();
    let chunk = "a".repeat(16_000);
    let mut written = 0;
    let flood = async {
        loop {
            assert!(written < 16 << 20, "the proxy read 16 MB of one HTTP/2 head");
            endless.continuation(1, &[("x-padding", chunk.as_str())]).await?;
            written += chunk.len();
        }
    };
    let cut_off: std::io::Result<()> = tokio::time::timeout(ENDED_WITHIN, flood)
        .await
        .expect("the proxy stopped reading the head but kept the connection");
    assert!(cut_off.is_err());

    well_behaved(&proxy).await;
    well_behaved_h2(&proxy).await;
    stop.send(true).unwrap();
    assert!(attack.await.unwrap() >= 1);
    assert_eq!(
        sim.stats().calls,
        3,
        "nothing of the oversized heads was forwarded"
    );
}

/// The spool's file descriptors this process holds (the proxy runs in
/// it): its files are unlinked at once, so they show as deleted links.
fn spool_files() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().contains("marketo-proxy-spool"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_a_large_answer_keep_the_spool_within_bounds_and_are_cut_off() {
    const MEMORY: f64 = 4.0 * 1024.0 * 1024.0;
    const DISK: f64 = 8.0 * 1024.0 * 1024.0;
    let sim = marketo_proxy::sim::Simulator::spawn(marketo_proxy::sim::SimConfig {
        leads: 120_000,
        export_time: Duration::from_millis(50),
        ..support::sim_config()
    })
    .await
    .unwrap();
    let mut config = support::proxy_config(&sim.url(), "");
    config.server = serde_yaml_ng::from_str(&format!(
        "{{ spool_memory_bytes: {MEMORY}, spool_disk_bytes: {DISK}, send_timeout: 1s }}"
    ))
    .unwrap();
    config.limits.max_queue_wait = Duration::from_secs(120);
    let proxy = marketo_proxy::app::spawn(config).await.unwrap();
    support::wait_ready(&proxy).await;
    let file = support::export_leads(
        &proxy.url(),
        support::CRM_KEY,
        &["id", "email", "firstName", "lastName"],
    )
    .await;
    let size = file.bytes().await.unwrap().len();
    // Larger than the kernel's socket buffers take on loopback (4 MB).
    assert!(size > 5_000_000, "a file of {size} bytes");
    let path = support::file_path(&sim);
    // Sixty clients ask for it and read nothing.
    let mut clients = Vec::new();
    for _ in 0..60 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(proxy.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {}\r\n\r\n",
            support::CRM_KEY
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        clients.push(stream);
    }
    // The spool stays within its bounds (an answer that streams holds one
    // part past them) until every one of them is cut off.
    let (mut most_memory, mut most_disk) = (0.0_f64, 0.0_f64);
    support::eventually(Duration::from_secs(90), async || {
        let metrics = support::metrics_text(&proxy.admin_url()).await;
        let held = |place: &str| {
            metric_in(
                &metrics,
                &format!(r#"marketo_proxy_spool_bytes{{place="{place}"}}"#),
            )
        };
        most_memory = most_memory.max(held("memory"));
        most_disk = most_disk.max(held("disk"));
        match held_connections(proxy.addr) {
            0 => Ok(()),
            open => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(open)
            }
        }
    })
    .await;
    assert!(
        most_memory <= MEMORY + 10.0 * 64.0 * 1024.0,
        "{most_memory} bytes in memory"
    );
    assert!(most_disk <= DISK, "{most_disk} bytes on disk");
    assert!(most_disk > 0.0, "the disk was used");
    // Once they are cut off, nothing is left of their spools.
    support::eventually(Duration::from_secs(30), async || {
        let metrics = support::metrics_text(&proxy.admin_url()).await;
        let held = (
            metric_in(&metrics, r#"marketo_proxy_spool_bytes{place="memory"}"#),
            metric_in(&metrics, r#"marketo_proxy_spool_bytes{place="disk"}"#),
            spool_files(),
        );
        if held == (0.0, 0.0, 0) { Ok(()) } else { Err(held) }
    })
    .await;
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    assert!(metric_in(&metrics, "marketo_proxy_spool_streamed_total") > 0.0);
    drop(clients);
}

fn metric_in(metrics: &str, series: &str) -> f64 {
    support::metric(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}
