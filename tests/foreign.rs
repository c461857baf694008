//! Calls the proxy cannot see: an integration that calls Marketo directly
//! shares the instance's window. The proxy learns the part it leaves from
//! Marketo's 606s instead of calling into a full window again and again,
//! and keeps every request until its own deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::Config;
use marketo_proxy::sim::{Arrival, SimClient, SimHandle, Simulator};
use support::redis::RedisServer;
use support::{CRM_KEY, Stack};

/// An API user of an integration the proxy does not front.
fn vendor() -> SimClient {
    SimClient {
        client_id: "vendor-tool".into(),
        client_secret: "vendor-tool-secret".into(),
        user: "vendor@example.com".into(),
    }
}

/// A simulator whose window lasts `window` and calls `latency`, which the
/// vendor's tool calls too, and a ready proxy with `limits` (YAML) in
/// front of it; and the vendor's tool, logged in.
async fn start(window: Duration, latency: Duration, limits: &str) -> (Stack, Foreign) {
    start_with_state(window, latency, limits, "{ file: ~, usage_sync_interval: 0s }").await
}

/// [`start`] with the proxy's `state` (YAML).
async fn start_with_state(
    window: Duration,
    latency: Duration,
    limits: &str,
    state: &str,
) -> (Stack, Foreign) {
    let mut sim = support::sim_config();
    sim.clients.push(vendor());
    sim.window = window;
    sim.latency = latency;
    let stack = Stack::start_configured(sim, |sim_url| {
        support::proxy_config_with(sim_url, "", limits, state)
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let foreign = Foreign::login(&stack.sim).await;
    (stack, foreign)
}

/// The vendor's integration, calling the simulator directly.
struct Foreign {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Foreign {
    async fn login(sim: &SimHandle) -> Self {
        let http = support::client();
        let vendor = vendor();
        let answer = support::send_json(http.get(format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id={}&client_secret={}",
            sim.url(),
            vendor.client_id,
            vendor.client_secret
        )))
        .await;
        Self {
            http,
            url: sim.url(),
            token: answer["access_token"].as_str().unwrap().to_owned(),
        }
    }

    /// Spends `calls` of the window, five at a time.
    async fn spend(&self, calls: u32) {
        for round in 0..calls / 5 {
            let batch = (0..5).map(|n| self.call(round * 5 + n + 1));
            let executed = futures_util::future::join_all(batch).await;
            assert!(
                executed.into_iter().all(|ok| ok),
                "Marketo refused the vendor's call"
            );
        }
    }

    /// One lead read every `every` until `until`.
    async fn trickle(self, every: Duration, until: tokio::time::Instant) {
        let mut tick = tokio::time::interval(every);
        let mut lead = 0;
        while tokio::time::Instant::now() < until {
            tick.tick().await;
            lead += 1;
            self.call(lead % 1000 + 1).await;
        }
    }

    /// One lead read; says whether Marketo executed it.
    async fn call(&self, lead: u32) -> bool {
        let answer = support::send_json(
            self.http
                .get(format!("{}/rest/v1/lead/{lead}.json", self.url))
                .bearer_auth(&self.token),
        )
        .await;
        answer["success"] == true
    }
}

/// Reads distinct leads through the proxy (distinct, so that none shares
/// another's call), `clients` at a time, until `requests` are answered or
/// `until` passes. Answers the HTTP status and Marketo success of each.
async fn load(stack: &Stack, requests: u32, clients: u32, until: tokio::time::Instant) -> Vec<(u16, bool)> {
    load_through(&stack.proxy, 0, requests, clients, until).await
}

/// [`load`] through `proxy`, reading leads from `first` on.
async fn load_through(
    proxy: &RunningProxy,
    first: u32,
    requests: u32,
    clients: u32,
    until: tokio::time::Instant,
) -> Vec<(u16, bool)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(first));
    let requests = first.saturating_add(requests);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (http, url, next) = (support::client(), proxy.url(), next.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= requests || tokio::time::Instant::now() >= until {
                    return answers;
                }
                let answer = http
                    .get(format!("{url}/rest/v1/lead/{}.json", n % 1000 + 1))
                    .header("X-Api-Key", CRM_KEY)
                    .send()
                    .await
                    .unwrap();
                let status = answer.status().as_u16();
                let body: serde_json::Value = answer.json().await.unwrap_or_default();
                answers.push((status, body["success"] == true));
            }
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

/// Every request got Marketo's success through the proxy.
fn all_succeeded(answers: &[(u16, bool)]) {
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, ok)| *status != 200 || !ok)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
}

/// The proxy's calls as the simulator saw them.
fn proxy_calls(sim: &SimHandle) -> Vec<Arrival> {
    let proxy_user = SimClient::demo().user;
    sim.stats()
        .arrivals
        .into_iter()
        .filter(|arrival| arrival.user.as_deref() == Some(proxy_user.as_str()))
        .collect()
}

/// The most executed calls in any `window` that ends by `by` (seconds of
/// the simulator's clock).
fn most_in_a_window(calls: &[Arrival], window: f64, by: f64) -> usize {
    let ok: Vec<f64> = calls
        .iter()
        .filter(|call| call.code == "ok")
        .map(|call| call.at)
        .collect();
    ok.iter()
        .filter(|start| **start + window <= by)
        .map(|start| {
            ok.iter()
                .filter(|at| **at >= *start && **at < start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn refusals(calls: &[Arrival]) -> usize {
    calls
        .iter()
        .filter(|call| call.code == "606" || call.code == "615")
        .count()
}

/// Marketo's real limits (100 calls a rolling 20 s, 10 in flight), 50 ms
/// a call. The vendor's tool spends 60 of the 100 calls just before 250
/// requests reach the proxy, with two minutes to spare each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_burst_costs_a_few_refusals_and_no_request() {
    let window = Duration::from_secs(20);
    let (stack, foreign) = start(window, Duration::from_millis(50), "{ max_queue_wait: 120s }").await;
    foreign.spend(60).await;
    let foreign_done = stack.sim.stats().arrivals.last().unwrap().at;

    let until = tokio::time::Instant::now() + Duration::from_secs(150);
    let (answers, lowered) = tokio::join!(load(&stack, 250, 50, until), async {
        // While it holds back, `/usage` says by how much and why.
        support::eventually(Duration::from_secs(10), async || {
            let usage = support::usage(&stack.proxy.admin_url()).await;
            let window = &usage["window"];
            match (window["limit"].as_u64(), window["outside_proxy"].as_u64()) {
                (Some(limit), Some(outside)) if limit < 100 && limit + outside == 100 => Ok(limit),
                _ => Err(window.clone()),
            }
        })
        .await
    });
    assert!(lowered <= 50, "the window in force fell only to {lowered}");

    assert_eq!(answers.len(), 250);
    all_succeeded(&answers);
    let calls = proxy_calls(&stack.sim);
    assert!(
        refusals(&calls) <= 10,
        "Marketo refused {} of the proxy's calls for the window or concurrency",
        refusals(&calls)
    );
    // Two windows after the vendor stopped, the proxy had the whole window
    // again (the margin aside).
    let most = most_in_a_window(
        &calls,
        window.as_secs_f64(),
        foreign_done + 2.0 * window.as_secs_f64() + 1.0,
    );
    assert!(
        most >= 98,
        "at most {most} of the proxy's calls in a window by then"
    );

    let metrics = stack.metrics().await;
    assert!(
        metrics.contains("marketo_proxy_window_effective_limit 100\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("marketo_proxy_concurrency_effective_limit 10\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("marketo_proxy_foreign_calls_estimate 0\n"),
        "{metrics}"
    );
}

/// A vendor's steady trickle of a fifth of the window: the proxy settles
/// just below what it leaves, and Marketo refuses it less and less often.
/// Time runs ten times faster than Marketo's (a 2 s window), so a minute
/// of Marketo's is 6 s here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_foreign_trickle_leaves_the_proxy_near_the_rest_of_the_window() {
    let window = Duration::from_secs(2);
    let limits = "{ window: 2s, safety_margin: 50ms, max_queue_wait: 60s }";
    let (stack, foreign) = start(window, Duration::from_millis(10), limits).await;
    let run = Duration::from_secs(30);
    let until = tokio::time::Instant::now() + run;
    let trickle = tokio::spawn(foreign.trickle(window / 20, until));
    let answers = load(&stack, u32::MAX, 20, until).await;
    trickle.await.unwrap();

    all_succeeded(&answers);
    let calls = proxy_calls(&stack.sim);
    let refused: Vec<f64> = calls
        .iter()
        .filter(|call| call.code == "606")
        .map(|call| call.at)
        .collect();
    // The first refusal finds the calls already in flight, which it
    // cannot recall; after that window, one a minute at most.
    let learned = refused.first().map_or(0.0, |first| first + window.as_secs_f64());
    let later = refused.iter().filter(|at| **at > learned).count();
    assert!(
        later <= 5,
        "{later} × 606 after the first window, in 30 s (5 minutes of Marketo's): {refused:?}"
    );
    // The second half, once it has settled: the proxy near the 80 the
    // vendor leaves it, and the vendor's calls executed, nearly all.
    let half = calls[0].at + run.as_secs_f64() / 2.0;
    let windows = run.as_secs_f64() / 2.0 / window.as_secs_f64();
    let executed =
        |user: &str| {
            let calls =
                stack.sim.stats().arrivals.into_iter().filter(|call| {
                    call.at >= half && call.code == "ok" && call.user.as_deref() == Some(user)
                });
            calls.count() as f64 / windows
        };
    let vendor_user = vendor().user;
    let (proxy, vendor) = (executed(&SimClient::demo().user), executed(&vendor_user));
    assert!(
        proxy >= 70.0,
        "{proxy:.1} of the proxy's calls per window once settled"
    );
    let offered = stack
        .sim
        .stats()
        .arrivals
        .iter()
        .filter(|call| call.at >= half && call.user.as_deref() == Some(vendor_user.as_str()))
        .count() as f64
        / windows;
    assert!(
        vendor >= offered * 0.9,
        "the vendor got {vendor:.1} of its {offered:.1} calls per window executed"
    );
}

/// A vendor's tool calling a fifth of the window while the proxy has more
/// to send than the window takes. Left alone, the proxy would take every
/// slot the moment it frees, Marketo would refuse the vendor instead of
/// the proxy, and the vendor would get little done. Marketo's usage and
/// error reports show the vendor's demand, executed and refused: the
/// proxy keeps its calls of every window free. Time runs ten times faster
/// than Marketo's (a 2 s window; the reports read every 20 s, ten windows,
/// as the default 5 minutes is fifteen: each reading is off by the calls in
/// flight when Marketo counted, and a rate needs windows enough to dwarf
/// them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_reports_of_a_steady_foreign_trickle_keep_its_part_of_the_window_free() {
    let window = Duration::from_secs(2);
    let (stack, foreign) = start_with_state(
        window,
        Duration::from_millis(10),
        "{ window: 2s, safety_margin: 50ms, max_queue_wait: 60s }",
        "{ file: ~, usage_sync_interval: 20s }",
    )
    .await;
    let run = Duration::from_secs(75);
    let until = tokio::time::Instant::now() + run;
    let trickle = tokio::spawn(foreign.trickle(window / 20, until));
    let (answers, kept) = tokio::join!(load(&stack, u32::MAX, 20, until), async {
        // Two readings after the first, the rate is steady: `/usage` shows
        // the part kept free and what Marketo's reports counted.
        support::eventually(Duration::from_secs(50), async || {
            let usage = support::usage(&stack.proxy.admin_url()).await;
            match (
                usage["window"]["kept_free"].as_u64(),
                usage["marketo_reported"]["foreign"].as_u64(),
            ) {
                (Some(kept), Some(_)) if kept > 0 => Ok(kept),
                _ => Err(usage),
            }
        })
        .await
    });
    trickle.await.unwrap();
    // The vendor's 10 calls a second are 20 a window.
    assert!((18..=22).contains(&kept), "{kept} calls a window kept free");

    all_succeeded(&answers);
    // The last 25 s, once the part is kept: the proxy near the 80 the
    // vendor leaves (a little below while other tests share the CPU), the
    // vendor's calls executed, nearly all, and Marketo refusing the proxy
    // hardly ever.
    let arrivals = stack.sim.stats().arrivals;
    let (proxy_user, vendor_user) = (SimClient::demo().user, vendor().user);
    let calls = |user: &str, code: Option<&str>, from: f64, to: f64| {
        let calls = arrivals.iter().filter(|call| {
            (from..to).contains(&call.at)
                && call.user.as_deref() == Some(user)
                && code.is_none_or(|code| call.code == code)
        });
        calls.count()
    };
    let end = arrivals.last().unwrap().at.floor();
    let from = end - 25.0;
    let windows = 25.0 / window.as_secs_f64();
    let proxy = calls(&proxy_user, Some("ok"), from, end) as f64 / windows;
    assert!(
        (70.0..=84.0).contains(&proxy),
        "{proxy:.1} of the proxy's calls per window once settled"
    );
    let (executed, offered) = (
        calls(&vendor_user, Some("ok"), from, end),
        calls(&vendor_user, None, from, end),
    );
    assert!(
        executed * 10 >= offered * 9,
        "the vendor got {executed} of its {offered} calls executed in the last 25 s"
    );
    let refused = calls(&proxy_user, Some("606"), from, end);
    assert!(refused <= 1, "{refused} × 606 to the proxy in the last 25 s");
}

/// A replica sharing the instance's limits through Redis at `redis_url`.
fn replica_config(sim_url: &str, redis_url: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits: {{ max_queue_wait: 120s }}
services:
  - {{ name: crm-sync, api_key: {CRM_KEY} }}
auth: {{ token_key: "0123456789abcdef0123456789abcdef-foreign" }}
state:
  backend: redis
  file: ~
  usage_sync_interval: 0s
  redis: {{ url: "{redis_url}", key_prefix: foreign, fallback_replicas: 2 }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

async fn effective_window(replica: &RunningProxy) -> Option<f64> {
    support::metric(
        &support::metrics_text(&replica.admin_url()).await,
        "marketo_proxy_window_effective_limit",
    )
}

/// Two replicas share one instance through Redis. What one learns from
/// Marketo's 606s, the other keeps to before it calls: the vendor's burst
/// costs the pair no more refusals than it costs one proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_learns_the_others_keep_to() {
    let redis = RedisServer::start();
    let mut sim = support::sim_config();
    sim.clients.push(vendor());
    sim.latency = Duration::from_millis(50);
    let sim = Simulator::spawn(sim).await.unwrap();
    let one = app::spawn(replica_config(&sim.url(), &redis.url()))
        .await
        .unwrap();
    let two = app::spawn(replica_config(&sim.url(), &redis.url()))
        .await
        .unwrap();
    support::wait_ready(&one).await;
    support::wait_ready(&two).await;
    let foreign = Foreign::login(&sim).await;
    foreign.spend(60).await;

    let until = tokio::time::Instant::now() + Duration::from_secs(100);
    let first = tokio::spawn(async move {
        let answers = load_through(&one, 0, 60, 20, until).await;
        (one, answers)
    });
    // The first replica meets the full window and learns; the second
    // takes what it learned without a call of its own.
    let lowered = support::eventually(Duration::from_secs(10), async || {
        match effective_window(&two).await {
            Some(limit) if limit < 100.0 => Ok(limit),
            seen => Err(seen),
        }
    })
    .await;
    assert!(lowered <= 50.0, "the second replica keeps to {lowered}");
    let answers = load_through(&two, 500, 40, 20, until).await;
    let (one, mut first_answers) = first.await.unwrap();
    first_answers.extend(answers);

    assert_eq!(first_answers.len(), 100);
    all_succeeded(&first_answers);
    let calls = proxy_calls(&sim);
    assert!(
        refusals(&calls) <= 10,
        "Marketo refused {} of the replicas' calls",
        refusals(&calls)
    );
    // Both replicas' refusals counted together, as Marketo's error report
    // counts them, for the reading of its reports.
    let counted = support::eventually(Duration::from_secs(5), async || {
        let counted: u64 = redis.day_counts("foreign", "refused").await.iter().sum();
        if counted == refusals(&calls) as u64 {
            Ok(counted)
        } else {
            Err(counted)
        }
    })
    .await;
    assert!(counted > 0, "the vendor's burst cost no refusal");
    drop((one, two, redis));
}
