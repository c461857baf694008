//! End-to-end pacing against the simulator with Marketo's real limits:
//! the proxy uses nearly the whole window and Marketo never has to refuse
//! a call because of the proxy's own traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::app;
use marketo_proxy::config::Config;
use marketo_proxy::sim::{SimConfig, Simulator};
use serde_json::Value;

/// Three services against a simulator at `sim_url`, with `limits` (YAML).
fn three_services(sim_url: &str, limits: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits:
{limits}
services:
  - {{ name: crm-sync, api_key: key-crm-0123456789, weight: 3 }}
  - {{ name: warehouse, api_key: key-warehouse-0123456789, weight: 1 }}
  - {{ name: forms, api_key: key-forms-0123456789, weight: 2 }}
state: {{ file: ~, usage_sync_interval: 0s }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

const KEYS: [&str; 3] = [
    "key-crm-0123456789",
    "key-warehouse-0123456789",
    "key-forms-0123456789",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_calls_at_once_use_the_window_fully_and_never_trip_marketo() {
    let sim = Simulator::spawn(SimConfig {
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let config = three_services(&sim.url(), "  max_queue_wait: 60s");
    let proxy = app::spawn(config).await.unwrap();
    let http = support::client();
    let mut calls = Vec::new();
    for index in 0..300 {
        let http = http.clone();
        let url = format!("{}/rest/v1/lead/{}.json", proxy.url(), index % 50 + 1);
        let key = KEYS[index % 3];
        calls.push(tokio::spawn(async move {
            let answer = http.get(url).header("X-Api-Key", key).send().await.unwrap();
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap();
            (status, body["success"] == true)
        }));
    }
    for call in calls {
        let (status, success) = call.await.unwrap();
        assert_eq!(status, 200);
        assert!(success);
    }
    let stats = sim.stats();
    assert_eq!(stats.ok, 300);
    assert_eq!(stats.code("606"), 0, "{:?}", stats.codes);
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    assert!(stats.max_in_window <= 100);
    assert!(stats.max_in_flight <= 10);
    // Each batch of 100 may start once the previous batch's answers are
    // 20 s (+ 250 ms margin) old: the third batch near 40.6 s.
    let first = stats.arrivals[0].at;
    let third_batch = stats.arrivals[200].at - first;
    assert!(third_batch >= 40.0, "third batch after {third_batch:.2} s");
    assert!(
        third_batch <= 41.5,
        "third batch after {third_batch:.2} s: the window is under-used"
    );
}

#[tokio::test]
async fn a_spent_daily_quota_is_answered_locally_with_607() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let config = three_services(&sim.url(), "  daily_quota: 50");
    let proxy = app::spawn(config).await.unwrap();
    let http = support::client();
    let (mut ok, mut refused) = (0, 0);
    for index in 0..60 {
        let answer = http
            .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
            .header("X-Api-Key", KEYS[index % 3])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let retry_after = answer.headers().get("retry-after").cloned();
        let body: Value = answer.json().await.unwrap();
        if body["success"] == true {
            ok += 1;
        } else {
            assert_eq!(body["errors"][0]["code"], "607", "{body}");
            let seconds: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
            assert!(seconds > 0 && seconds <= 25 * 3600, "Retry-After {seconds}");
            refused += 1;
        }
    }
    assert_eq!((ok, refused), (50, 10));
    assert_eq!(sim.stats().calls, 50);
}

#[tokio::test]
async fn marketo_606_and_615_are_absorbed_by_a_replay() {
    let stack = support::Stack::start(support::sim_config()).await;
    for code in ["606", "615"] {
        stack.sim.inject(support::fail_next(1, code));
        let answer = stack.get(support::CRM_KEY, "/rest/v1/lead/1.json").await;
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["success"], true, "after {code}: {body}");
    }
    let stats = stack.sim.stats();
    assert_eq!((stats.code("606"), stats.code("615"), stats.ok), (1, 1, 2));
    let metrics = stack.metrics().await;
    for code in ["606", "615"] {
        let series = format!("marketo_proxy_replays_total{{reason=\"{code}\"}}");
        assert_eq!(support::metric(&metrics, &series), Some(1.0), "{metrics}");
    }
}

#[tokio::test]
async fn transient_errors_are_replayed_only_for_reads() {
    let stack = support::Stack::start(support::sim_config()).await;
    stack.sim.inject(support::fail_next(1, "611"));
    let body: Value = stack
        .get(support::CRM_KEY, "/rest/v1/lead/1.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["success"], true, "{body}");
    stack.sim.inject(support::fail_next_status(1, 503));
    let answer = stack.get(support::CRM_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(answer.status(), 200);

    // A write that meets a transient error is passed back, not repeated.
    stack.sim.inject(support::fail_next(1, "611"));
    let body: Value = stack
        .http
        .post(format!("{}/rest/v1/leads.json", stack.proxy.url()))
        .header("X-Api-Key", support::CRM_KEY)
        .json(&serde_json::json!({"input": [{"email": "w@example.com"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["errors"][0]["code"], "611", "{body}");
    let stats = stack.sim.stats();
    assert_eq!(stats.calls, 5);
}

#[tokio::test]
async fn marketo_607_spends_the_day_for_every_service() {
    let stack = support::Stack::start(support::sim_config()).await;
    stack.sim.inject(support::fail_next(1, "607"));
    let body: Value = stack
        .get(support::CRM_KEY, "/rest/v1/lead/1.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["errors"][0]["code"], "607");
    let answer = stack.get(support::WAREHOUSE_KEY, "/rest/v1/lead/1.json").await;
    assert!(answer.headers().contains_key("retry-after"));
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "607");
    assert_eq!(
        stack.sim.stats().calls,
        1,
        "the second call never reached Marketo"
    );
}

#[tokio::test]
async fn a_request_that_cannot_be_admitted_in_time_gets_606_with_retry_after() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let config = three_services(&sim.url(), "  window_calls: 3\n  max_queue_wait: 2s");
    let proxy = app::spawn(config).await.unwrap();
    let http = support::client();
    for _ in 0..3 {
        let answer = http
            .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
            .header("X-Api-Key", KEYS[0])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.json::<Value>().await.unwrap()["success"], true);
    }
    let started = std::time::Instant::now();
    let answer = http
        .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
        .header("X-Api-Key", KEYS[1])
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not after the wait"
    );
    let retry_after: u64 = answer.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((19..=21).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "606");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("rate limit"),
        "{body}"
    );
    assert_eq!(sim.stats().calls, 3);
}
