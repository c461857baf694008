//! Memory per queued request: the proxy's resident memory with many
//! requests waiting in its queue behind one call hung at the simulator,
//! over HTTP/2 streams and over HTTP/1.1 connections.

use std::fs;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::Mode;
use crate::client::{RequestSpec, connect_h1, connect_h2, exchange, exchange_h2, get, metric_sum, post};
use crate::processes::{
    API_KEY, CLIENT_ID, CLIENT_SECRET, Process, free_port, local_addr, start_proxy, start_sim,
};
use crate::report::Verdict;

/// Body of every queued request.
const QUEUED_BODY: &[u8] = br#"{"action":"createOrUpdate","input":[{"email":"q@example.com"}]}"#;

pub async fn run(mode: Mode) -> Vec<Verdict> {
    let queued = match mode {
        Mode::Smoke => 200,
        Mode::Full => 10_000,
    };
    println!(
        "== memory: {queued} requests waiting in the queue (POST, {}-byte bodies), proxy concurrency 1, \
         the one call in flight hung at the simulator",
        QUEUED_BODY.len()
    );
    let mut verdicts = vec![run_transport(Transport::Http2, queued).await];
    let needed = queued as u64 + 200;
    match open_files_limit("self") {
        Some(limit) if limit < needed => println!(
            "http1: skipped, {queued} connections need an open-files limit of {needed} (this process has {limit}); \
             raise it with `ulimit -n`"
        ),
        _ => verdicts.push(run_transport(Transport::Http1, queued).await),
    }
    verdicts
}

/// How the queued requests reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// 100 streams per connection.
    Http2,
    /// One connection per request.
    Http1,
}

/// The proxy's resident memory before and with `queued` requests waiting,
/// over one transport.
async fn run_transport(transport: Transport, queued: usize) -> Verdict {
    const STREAMS_PER_CONNECTION: usize = 100;
    let dir = tempfile::tempdir().expect("temp dir");
    let sim_addr = local_addr(free_port());
    let mut sim = start_sim(
        dir.path(),
        sim_addr,
        &[
            "--latency",
            "0ms",
            "--window-calls",
            "1000000",
            "--concurrency",
            "1000",
            "--daily-quota",
            "1000000000",
        ],
    )
    .await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let config = format!(
        "listen: {proxy_addr}\nadmin_listen: {admin_addr}\n\
         marketo: {{ base_url: 'http://{sim_addr}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET}, \
         request_timeout: 1h }}\n\
         limits:\n  window_calls: 1000000\n  window: 1s\n  safety_margin: 0s\n  concurrency: 1\n  \
         daily_quota: 1000000000\n  max_queue_wait: 1h\n  max_queue_length: {}\n\
         services:\n  - {{ name: bench, api_key: {API_KEY} }}\n\
         state: {{ file: ~, usage_sync_interval: 0s }}\n\
         server: {{ max_connections: {} }}\n",
        queued * 2,
        // One connection per queued request over HTTP/1.1, and the blocker.
        queued * 2
    );
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;
    if transport == Transport::Http1 {
        let limit = open_files_limit(&proxy.pid().to_string()).unwrap_or(u64::MAX);
        if limit < queued as u64 + 100 {
            println!("http1: skipped, the proxy's open-files limit is {limit}");
            return Verdict {
                target: "memory per queued request, HTTP/1.1",
                value: format!("skipped, the proxy's open-files limit is {limit}"),
                met: None,
            };
        }
    }
    let request = RequestSpec::post("/rest/v1/leads.json", Bytes::from_static(QUEUED_BODY))
        .to(proxy_addr)
        .with_key(API_KEY);

    // Warm up: every connection HTTP/2 will use answers once, so the
    // baseline holds the connections and only requests are added.
    let mut h2_senders = Vec::new();
    if transport == Transport::Http2 {
        for _ in 0..queued.div_ceil(STREAMS_PER_CONNECTION) + 1 {
            let mut sender = connect_h2(proxy_addr).await.expect("h2 connection");
            exchange_h2(&mut sender, &request).await.expect("warm-up answer");
            h2_senders.push(sender);
        }
    } else {
        for _ in 0..10 {
            let mut sender = connect_h1(proxy_addr).await.expect("connection");
            exchange(&mut sender, &request).await.expect("warm-up answer");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = proxy.rss_kib();

    // One call hangs at the simulator and holds the only slot.
    post(sim_addr, "/_sim/faults", br#"{"hang_next":1}"#)
        .await
        .expect("inject a hang");
    let mut tasks = Vec::new();
    let blocker = request.clone();
    let mut blocker_sender = h2_senders.pop();
    tasks.push(tokio::spawn(async move {
        match blocker_sender.as_mut() {
            Some(sender) => exchange_h2(sender, &blocker).await,
            None => exchange(&mut connect_h1(blocker.addr).await?, &blocker).await,
        }
    }));
    wait_metric(admin_addr, "marketo_proxy_inflight", 1.0, &mut proxy).await;

    let connecting = Arc::new(Semaphore::new(256));
    for index in 0..queued {
        let request = request.clone();
        let sender = h2_senders.get(index / STREAMS_PER_CONNECTION).cloned();
        let connecting = Arc::clone(&connecting);
        tasks.push(tokio::spawn(async move {
            match sender {
                Some(mut sender) => exchange_h2(&mut sender, &request).await,
                None => {
                    let permit = connecting.acquire_owned().await;
                    let mut sender = connect_h1(request.addr).await?;
                    drop(permit);
                    exchange(&mut sender, &request).await
                }
            }
        }));
    }
    let depth = wait_metric(admin_addr, "marketo_proxy_queue_depth", queued as f64, &mut proxy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = proxy.rss_kib();
    sim.check_alive();
    let grown = loaded.saturating_sub(baseline) as f64 * 1024.0;
    let per_request = grown / queued as f64;
    let label = match transport {
        Transport::Http2 => format!(
            "http2 ({} connections x {STREAMS_PER_CONNECTION} streams, opened before the baseline)",
            queued.div_ceil(STREAMS_PER_CONNECTION)
        ),
        Transport::Http1 => {
            format!("http1 ({queued} connections, one request each, opened after the baseline)")
        }
    };
    println!("{label}:");
    println!(
        "  queue depth {depth:.0}; proxy RSS {baseline} KiB before, {loaded} KiB with the queue full: \
         {per_request:.0} bytes per queued request, {:.0} bytes beyond its {}-byte body (target <= 2048)",
        per_request - QUEUED_BODY.len() as f64,
        QUEUED_BODY.len()
    );
    for task in &tasks {
        assert!(!task.is_finished(), "a queued request was answered or failed");
    }
    for task in tasks {
        task.abort();
    }
    assert_eq!(depth as usize, queued);
    assert!(loaded > 0);
    let beyond_body = per_request - QUEUED_BODY.len() as f64;
    Verdict::new(
        match transport {
            Transport::Http2 => "memory per queued request beyond its body <= 2048 B, HTTP/2 streams",
            Transport::Http1 => "memory per queued request beyond its body <= 2048 B, HTTP/1.1 connections",
        },
        format!("{beyond_body:.0} B"),
        beyond_body <= 2048.0,
    )
}

/// Polls the proxy's `/metrics` until the sum of `name`'s series reaches
/// `want`; returns the value seen.
async fn wait_metric(admin: SocketAddr, name: &str, want: f64, proxy: &mut Process) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        proxy.check_alive();
        let text = get(admin, "/metrics").await.unwrap_or_default();
        let value = metric_sum(&String::from_utf8_lossy(&text), name);
        if value >= want {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {value}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn open_files_limit(pid: &str) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
