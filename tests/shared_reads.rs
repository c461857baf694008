//! End-to-end: identical reads share one call to the simulator, through
//! coalescing and the cache, and never across API users, bodies or
//! streamed answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::config::Config;
use marketo_proxy::sim::SimConfig;
use support::{CRM_KEY, Stack, WAREHOUSE_KEY, eventually, metric};

const DESCRIBE: &str = "/rest/v1/leads/describe.json";

/// A simulator that takes `latency` per call, so that requests sent
/// together are all in the proxy before the first answer.
fn slow_sim(latency: Duration) -> SimConfig {
    SimConfig {
        latency,
        ..support::sim_config()
    }
}

/// The proxy config with `extra` YAML appended at the top level.
fn config_with(sim_url: &str, extra: &str) -> Config {
    let mut config = support::proxy_config(sim_url, "");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(extra).unwrap();
    if let Some(cache) = yaml.get("cache") {
        config.cache = serde_yaml_ng::from_value(cache.clone()).unwrap();
    }
    if let Some(coalesce) = yaml.get("coalesce_reads") {
        config.coalesce_reads = coalesce.as_bool().unwrap();
    }
    config.validate().expect("valid config")
}

/// Calls of the simulator to `path`.
fn calls_to(stack: &Stack, path: &str) -> usize {
    stack
        .sim
        .stats()
        .arrivals
        .iter()
        .filter(|arrival| arrival.target.starts_with(path))
        .count()
}

async fn saved(stack: &Stack, service: &str, reason: &str) -> f64 {
    let metrics = stack.metrics().await;
    metric(
        &metrics,
        &format!(r#"marketo_proxy_calls_saved_total{{reason="{reason}",service="{service}"}}"#),
    )
    .unwrap_or_else(|| panic!("no saved series for {service} in\n{metrics}"))
}

/// Sends `count` copies of the same GET at once and returns the bodies.
async fn together(stack: &Stack, key: &str, path: &str, count: usize) -> Vec<String> {
    let requests = (0..count).map(|_| async {
        let answer = stack.get(key, path).await;
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap()
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn twenty_identical_describes_cost_one_call_and_get_the_same_bytes() {
    let stack =
        Stack::start_configured(slow_sim(Duration::from_millis(500)), |url| config_with(url, "{}")).await;
    support::wait_ready(&stack.proxy).await;
    let bodies = together(&stack, CRM_KEY, DESCRIBE, 20).await;
    assert_eq!(calls_to(&stack, DESCRIBE), 1);
    assert!(bodies[0].contains(r#""success":true"#), "{}", bodies[0]);
    // The requestId the simulator made up for its one answer included.
    assert!(bodies.iter().all(|body| *body == bodies[0]));

    assert_eq!(saved(&stack, "crm-sync", "coalesced").await, 19.0);
    let metrics = stack.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"marketo_proxy_requests_total{outcome="ok",service="crm-sync"}"#
        ),
        Some(20.0)
    );
    // One call charged to the day; the rest shown as saved.
    let usage = support::usage(&stack.proxy.admin_url()).await;
    let crm = &usage["services"][0];
    assert_eq!(crm["used"], 1, "{usage}");
    assert_eq!(crm["saved"]["coalesced"], 19, "{usage}");
    assert_eq!(usage["used"], 1, "{usage}");
}

#[tokio::test]
async fn reads_of_different_api_users_or_bodies_never_share() {
    let stack = Stack::start_configured(slow_sim(Duration::from_millis(500)), |url| {
        config_with(url, "cache: [{ path: /rest/v1/leads.json, ttl: 1h }]")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    // crm-sync calls as the proxy's API user, warehouse as its own.
    let crm = together(&stack, CRM_KEY, DESCRIBE, 3);
    let warehouse = together(&stack, WAREHOUSE_KEY, DESCRIBE, 3);
    let (crm, warehouse) = tokio::join!(crm, warehouse);
    assert_eq!(calls_to(&stack, DESCRIBE), 2);
    assert_ne!(crm[0], warehouse[0], "each API user got its own answer");
    let users: Vec<Option<String>> = stack
        .sim
        .stats()
        .arrivals
        .iter()
        .filter(|arrival| arrival.target.starts_with(DESCRIBE))
        .map(|arrival| arrival.user.clone())
        .collect();
    assert!(users.contains(&Some("warehouse@example.com".into())), "{users:?}");

    // POST _method=GET with different bodies, at once: one call each; the
    // cached answer of one body is not the other's.
    let post = |filter: &'static str| {
        stack
            .http
            .post(format!("{}/rest/v1/leads.json?_method=GET", stack.proxy.url()))
            .header("X-Api-Key", CRM_KEY)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("filterType=email&filterValues={filter}&fields=email"))
            .send()
    };
    let (three, four) = tokio::join!(post("lead3%40example.com"), post("lead4%40example.com"));
    let (three, four) = (
        three.unwrap().text().await.unwrap(),
        four.unwrap().text().await.unwrap(),
    );
    assert!(
        three.contains("lead3@example.com") && !three.contains("lead4@"),
        "{three}"
    );
    assert!(
        four.contains("lead4@example.com") && !four.contains("lead3@"),
        "{four}"
    );
    assert_eq!(calls_to(&stack, "/rest/v1/leads.json"), 2);
    let again = post("lead4%40example.com").await.unwrap().text().await.unwrap();
    assert_eq!(again, four, "from the cache, byte for byte");
    assert_eq!(saved(&stack, "crm-sync", "cached").await, 1.0);
}

#[tokio::test]
async fn a_cached_answer_is_served_until_its_ttl_and_no_cache_skips_it() {
    let ttl = Duration::from_millis(800);
    let stack = Stack::start_configured(support::sim_config(), |url| {
        config_with(url, "cache: [{ path: /rest/v1/leads/describe.json, ttl: 800ms }]")
    })
    .await;
    let first = stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    let cached_at = tokio::time::Instant::now();
    let second = stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    assert_eq!(second, first, "byte for byte, the simulator's requestId too");
    assert_eq!(calls_to(&stack, DESCRIBE), 1);
    assert_eq!(saved(&stack, "crm-sync", "cached").await, 1.0);

    // A client that asks for a fresh answer gets one.
    let fresh = stack
        .http
        .get(format!("{}{DESCRIBE}", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_ne!(fresh, first);
    assert_eq!(calls_to(&stack, DESCRIBE), 2);

    // The fresh answer is kept in turn, and expires on time.
    let kept_at = tokio::time::Instant::now();
    let expired_after = eventually(Duration::from_secs(5), async || {
        let body = stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
        if body == fresh {
            Err("still cached")
        } else {
            Ok(kept_at.elapsed())
        }
    })
    .await;
    assert!(expired_after >= ttl, "expired after {expired_after:?}");
    assert!(cached_at.elapsed() >= ttl);
    assert_eq!(calls_to(&stack, DESCRIBE), 3);
}

#[tokio::test]
async fn an_error_is_shared_only_with_callers_already_waiting_and_never_cached() {
    let stack = Stack::start_configured(slow_sim(Duration::from_millis(500)), |url| {
        config_with(url, "cache: [{ path: /rest/v1/leads/describe.json, ttl: 1h }]")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    stack.sim.inject(support::fail_next(1, "603"));
    let bodies = together(&stack, CRM_KEY, DESCRIBE, 5).await;
    assert_eq!(calls_to(&stack, DESCRIBE), 1);
    assert!(
        bodies.iter().all(|body| body.contains(r#""code":"603""#)),
        "{bodies:?}"
    );
    // The next read calls again and gets Marketo's answer, which is kept.
    let next = stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    assert!(next.contains(r#""success":true"#), "{next}");
    assert_eq!(stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap(), next);
    assert_eq!(calls_to(&stack, DESCRIBE), 2);
}

#[tokio::test]
async fn streamed_answers_are_not_shared() {
    let sim = SimConfig {
        leads: 3000,
        export_time: Duration::from_millis(50),
        ..slow_sim(Duration::from_millis(200))
    };
    let stack = Stack::start_configured(sim, |url| {
        config_with(
            url,
            "cache: [{ path: '/bulk/v1/leads/export/*/file.json', ttl: 1h }]",
        )
    })
    .await;
    let file = support::export_leads(&stack.proxy.url(), CRM_KEY, &["id", "email"]).await;
    let whole = file.text().await.unwrap();
    assert!(whole.len() > marketo_proxy::upstream::PEEK_LIMIT);
    let path = support::file_path(&stack.sim);
    let files = together(&stack, CRM_KEY, &path, 3).await;
    assert!(files.iter().all(|file| *file == whole));
    assert_eq!(calls_to(&stack, &path), 4, "each streamed answer was a call");
    assert_eq!(saved(&stack, "crm-sync", "coalesced").await, 0.0);
    assert_eq!(saved(&stack, "crm-sync", "cached").await, 0.0);
}

#[tokio::test]
async fn coalescing_can_be_turned_off() {
    let stack = Stack::start_configured(slow_sim(Duration::from_millis(300)), |url| {
        config_with(url, "coalesce_reads: false")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    together(&stack, CRM_KEY, DESCRIBE, 4).await;
    assert_eq!(calls_to(&stack, DESCRIBE), 4);
}

#[tokio::test]
async fn range_reads_of_one_export_file_each_get_their_own_bytes_and_none_is_kept() {
    let sim = SimConfig {
        leads: 3000,
        export_time: Duration::from_millis(50),
        ..slow_sim(Duration::from_millis(200))
    };
    let stack = Stack::start_configured(sim, |url| {
        config_with(
            url,
            "{ coalesce_reads: true, cache: [{ path: '/bulk/v1/leads/export/*/file.json', ttl: 1h }] }",
        )
    })
    .await;
    let file = support::export_leads(&stack.proxy.url(), CRM_KEY, &["id", "email"]).await;
    let whole = file.bytes().await.unwrap();
    let path = support::file_path(&stack.sim);
    let tail = 1000;
    assert!(
        whole.len() - tail > marketo_proxy::upstream::PEEK_LIMIT,
        "the tail streams"
    );
    let ranges = [
        (0, Some(9)),
        (100, Some(109)),
        (5000, Some(5019)),
        (70, Some(79)),
        // A download resumed: the rest of the file, streamed.
        (tail, None),
    ];
    let downloads = ranges.map(|(start, end)| {
        let range = match end {
            Some(end) => format!("bytes={start}-{end}"),
            None => format!("bytes={start}-"),
        };
        let request = stack
            .http
            .get(format!("{}{path}", stack.proxy.url()))
            .header("X-Api-Key", CRM_KEY)
            .header("range", range)
            .send();
        async move { request.await.unwrap() }
    });
    for ((start, end), answer) in ranges.iter().zip(futures_util::future::join_all(downloads).await) {
        let end = end.unwrap_or(whole.len() - 1);
        assert_eq!(answer.status(), 206, "bytes {start}-{end}");
        let content_range = answer.headers()["content-range"].to_str().unwrap().to_owned();
        assert_eq!(content_range, format!("bytes {start}-{end}/{}", whole.len()));
        let part = answer.bytes().await.unwrap();
        assert_eq!(part, whole[*start..=end], "bytes {start}-{end}");
    }
    assert_eq!(calls_to(&stack, &path), 1 + ranges.len(), "each range was a call");
    // No part was kept for a plain read: it gets the whole file.
    let again = stack.get(CRM_KEY, &path).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.bytes().await.unwrap(), whole);
    assert_eq!(saved(&stack, "crm-sync", "coalesced").await, 0.0);
    assert_eq!(saved(&stack, "crm-sync", "cached").await, 0.0);
}

#[tokio::test]
async fn conditional_reads_are_their_own_and_no_store_answers_are_not_kept() {
    let stack = Stack::start_configured(slow_sim(Duration::from_millis(300)), |url| {
        config_with(
            url,
            "{ coalesce_reads: true, cache: [{ path: /rest/v1/leads/describe.json, ttl: 1h }] }",
        )
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let read = |name: &'static str, value: &'static str| {
        let request = stack
            .http
            .get(format!("{}{DESCRIBE}", stack.proxy.url()))
            .header("X-Api-Key", CRM_KEY)
            .header(name, value)
            .send();
        async move {
            let answer = request.await.unwrap();
            assert_eq!(answer.status(), 200);
            answer.text().await.unwrap()
        }
    };
    let conditional = [
        ("if-none-match", "\"x\""),
        ("if-none-match", "\"x\""),
        ("if-modified-since", "Fri, 04 Dec 2026 00:00:00 GMT"),
        ("if-match", "*"),
        ("if-range", "\"x\""),
    ];
    futures_util::future::join_all(conditional.map(|(name, value)| read(name, value))).await;
    assert_eq!(calls_to(&stack, DESCRIBE), conditional.len(), "none shared");
    assert_eq!(saved(&stack, "crm-sync", "coalesced").await, 0.0);

    // Nothing of those was kept, nor the answer to a no-store read.
    read("cache-control", "no-store").await;
    stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    assert_eq!(calls_to(&stack, DESCRIBE), conditional.len() + 2);
    // A plain read's answer is kept.
    stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    assert_eq!(calls_to(&stack, DESCRIBE), conditional.len() + 2);
    assert_eq!(saved(&stack, "crm-sync", "cached").await, 1.0);
}

/// A GET as the service with `key`, sent when spawned.
fn spawn_get(stack: &Stack, key: &str, path: &str) -> tokio::task::JoinHandle<reqwest::Response> {
    let request = stack
        .http
        .get(format!("{}{path}", stack.proxy.url()))
        .header("X-Api-Key", key)
        .send();
    tokio::spawn(async move { request.await.unwrap() })
}

/// Waits until the proxy has `calls` calls at Marketo (the simulator
/// records a call when it ends).
async fn at_marketo(stack: &Stack, calls: f64) {
    support::eventually(Duration::from_secs(5), async || {
        match support::metric(&stack.metrics().await, "marketo_proxy_inflight") {
            Some(value) if value == calls => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// Two services calling Marketo as the same API user: `batch` one call at
/// a time, `interactive` waiting at most 2 s for its turn.
fn batch_and_interactive(sim_url: &str) -> Config {
    batch_and_interactive_with(sim_url, "{}")
}

fn batch_and_interactive_with(sim_url: &str, limits: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: {sim_url}, client_id: demo-client, client_secret: demo-secret }}
limits: {limits}
coalesce_reads: true
services:
  - {{ name: batch, api_key: {CRM_KEY}, concurrency: 1 }}
  - {{ name: interactive, api_key: {WAREHOUSE_KEY}, max_queue_wait: 2s }}
state: {{ file: ~, usage_sync_interval: 0s }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).expect("test config is valid")
}

#[tokio::test]
async fn a_read_identical_to_one_still_queued_elsewhere_goes_itself_and_is_never_slower() {
    let stack = Stack::start_configured(slow_sim(Duration::from_secs(3)), batch_and_interactive).await;
    support::wait_ready(&stack.proxy).await;
    // The batch service has one call at Marketo and an identical describe
    // queued behind it, by its own concurrency of one.
    let busy = spawn_get(&stack, CRM_KEY, "/rest/v1/lead/1.json");
    at_marketo(&stack, 1.0).await;
    let queued = spawn_get(&stack, CRM_KEY, DESCRIBE);
    support::eventually(Duration::from_secs(5), async || {
        match support::metric(
            &stack.metrics().await,
            r#"marketo_proxy_queue_depth{service="batch"}"#,
        ) {
            Some(1.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    // The interactive service asks for the same describe: it does not wait
    // for the batch service's turn.
    let asked = tokio::time::Instant::now();
    let answer = stack.get(WAREHOUSE_KEY, DESCRIBE).await;
    let took = asked.elapsed();
    println!(
        "the interactive describe was answered after {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains(r#""success":true"#));
    assert!(
        took < Duration::from_millis(4500),
        "answered after {took:?}: it waited for the batch service's turn"
    );
    assert_eq!(busy.await.unwrap().status(), 200);
    assert_eq!(queued.await.unwrap().status(), 200);
    assert_eq!(calls_to(&stack, DESCRIBE), 2, "each went itself");
    assert_eq!(saved(&stack, "interactive", "coalesced").await, 0.0);
}

#[tokio::test]
async fn a_read_identical_to_one_at_marketo_waits_for_its_answer_and_spends_nothing() {
    let stack = Stack::start_configured(slow_sim(Duration::from_secs(1)), batch_and_interactive).await;
    support::wait_ready(&stack.proxy).await;
    let leader = spawn_get(&stack, CRM_KEY, DESCRIBE);
    at_marketo(&stack, 1.0).await;
    let follower = stack.get(WAREHOUSE_KEY, DESCRIBE).await.text().await.unwrap();
    let leader = leader.await.unwrap().text().await.unwrap();
    assert_eq!(follower, leader, "byte for byte");
    assert_eq!(calls_to(&stack, DESCRIBE), 1);
    assert_eq!(saved(&stack, "interactive", "coalesced").await, 1.0);
}

#[tokio::test]
async fn reads_that_follow_hold_their_place_in_the_queue_and_its_bound() {
    let stack = Stack::start_configured(slow_sim(Duration::from_secs(2)), |url| {
        batch_and_interactive_with(url, "{ max_queue_length: 2 }")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let busy = spawn_get(&stack, CRM_KEY, "/rest/v1/lead/1.json");
    at_marketo(&stack, 1.0).await;
    // A describe leads from the queue, and an identical one follows there:
    // the queue is full.
    let leader = spawn_get(&stack, CRM_KEY, DESCRIBE);
    let follower = spawn_get(&stack, CRM_KEY, DESCRIBE);
    support::eventually(Duration::from_secs(5), async || {
        match support::metric(
            &stack.metrics().await,
            r#"marketo_proxy_queue_depth{service="batch"}"#,
        ) {
            Some(2.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let refused = stack.get(CRM_KEY, DESCRIBE).await.text().await.unwrap();
    assert!(refused.contains(r#""code":"606""#), "{refused}");
    assert!(refused.contains("queue full"), "{refused}");
    for answer in [busy, leader, follower] {
        assert_eq!(answer.await.unwrap().status(), 200);
    }
    assert_eq!(
        calls_to(&stack, DESCRIBE),
        1,
        "the follower stepped aside for the leader"
    );
    assert_eq!(saved(&stack, "batch", "coalesced").await, 1.0);
}
