//! Accounting end to end: what `/metrics` and `/usage` say against what
//! the clients saw and what the simulator recorded; the usage ledger
//! across restarts; reconciliation with Marketo's usage report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::app;
use marketo_proxy::config::Config;
use marketo_proxy::sim::{SimConfig, Simulator};
use serde_json::Value;
use support::{CRM_KEY, Stack, WAREHOUSE_KEY, metric};

#[tokio::test]
async fn metrics_match_what_clients_saw_and_marketo_recorded() {
    let stack = Stack::start(support::sim_config()).await;
    // crm-sync: 6 successes, then 2 Marketo errors (1003, passed through).
    for id in 1..=6 {
        assert_eq!(
            stack
                .get(CRM_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
    }
    stack.sim.inject(support::fail_next(2, "1003"));
    for _ in 0..2 {
        let body: Value = stack
            .get(CRM_KEY, "/rest/v1/lead/1.json")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["errors"][0]["code"], "1003");
    }
    // warehouse: 4 successes through its own API user, one bulk call.
    for id in 1..=4 {
        assert_eq!(
            stack
                .get(WAREHOUSE_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
    }
    let status = stack
        .get(WAREHOUSE_KEY, "/bulk/v1/leads/export/missing/status.json")
        .await;
    assert_eq!(status.status(), 200);
    // Three callers that are refused.
    for key in ["wrong-1", "wrong-2", "wrong-3"] {
        assert_eq!(stack.get(key, "/rest/v1/lead/1.json").await.status(), 401);
    }

    let metrics = stack.metrics().await;
    let value =
        |series: &str| metric(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="ok",service="crm-sync"}"#),
        6.0
    );
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="marketo_error",service="crm-sync"}"#),
        2.0
    );
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="ok",service="warehouse"}"#),
        4.0
    );
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="marketo_error",service="warehouse"}"#),
        1.0
    );
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="rejected_auth",service="unauthenticated"}"#),
        3.0
    );
    assert_eq!(
        value(r#"marketo_proxy_upstream_calls_total{api="rest",code="ok",service="crm-sync"}"#),
        6.0
    );
    assert_eq!(
        value(r#"marketo_proxy_upstream_calls_total{api="rest",code="1003",service="crm-sync"}"#),
        2.0
    );
    assert_eq!(
        value(r#"marketo_proxy_upstream_calls_total{api="rest",code="ok",service="warehouse"}"#),
        4.0
    );
    assert_eq!(
        value(r#"marketo_proxy_upstream_calls_total{api="bulk",code="610",service="warehouse"}"#),
        1.0
    );
    assert_eq!(value(r#"marketo_proxy_daily_used{service="crm-sync"}"#), 8.0);
    assert_eq!(value(r#"marketo_proxy_daily_used{service="warehouse"}"#), 5.0);
    assert_eq!(value("marketo_proxy_daily_remaining"), 50_000.0 - 13.0);
    assert_eq!(
        value(r#"marketo_proxy_queue_wait_seconds_count{service="crm-sync"}"#),
        8.0
    );
    assert_eq!(
        value(r#"marketo_proxy_upstream_duration_seconds_count{api="rest",service="warehouse"}"#),
        4.0
    );
    assert_eq!(value("marketo_proxy_inflight"), 0.0);
    assert_eq!(value("marketo_proxy_window_used"), 13.0);
    assert_eq!(value("marketo_proxy_window_limit"), 100.0);

    // The simulator saw the same calls, split by API user.
    let stats = stack.sim.stats();
    let by_user = |user: &str| {
        stats
            .arrivals
            .iter()
            .filter(|arrival| arrival.user.as_deref() == Some(user))
            .count()
    };
    assert_eq!(by_user("demo@example.com"), 8);
    assert_eq!(by_user("warehouse@example.com"), 5);
    assert_eq!(stats.calls, 13);

    // /usage says the same.
    let usage: Value = support::usage(&stack.proxy.admin_url()).await;
    assert_eq!(usage["used"], 13);
    assert_eq!(usage["remaining"], 50_000 - 13);
    assert_eq!(usage["services"][0]["name"], "crm-sync");
    assert_eq!(usage["services"][0]["used"], 8);
    assert_eq!(usage["services"][1]["used"], 5);
    assert_eq!(usage["window"]["limit"], 100);
    assert_eq!(usage["concurrency"]["limit"], 10);
}

fn ledger_config(sim_url: &str, file: &std::path::Path, extra_state: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits: {{ daily_quota: 1000 }}
services:
  - {{ name: crm-sync, api_key: {CRM_KEY} }}
  - {{ name: warehouse, api_key: {WAREHOUSE_KEY} }}
state:
  file: "{}"
  {extra_state}
"#,
        file.display()
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

#[tokio::test]
async fn a_restart_keeps_todays_usage() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    let http = support::client();

    let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 0s"))
        .await
        .unwrap();
    for (key, calls) in [(CRM_KEY, 3), (WAREHOUSE_KEY, 2)] {
        for _ in 0..calls {
            let answer = http
                .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
                .header("X-Api-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
    }
    proxy.shutdown().await.unwrap();
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["services"]["crm-sync"], 3, "{saved}");

    let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 0s"))
        .await
        .unwrap();
    // The ledger is read before the proxy answers anything, so no call can
    // be admitted against a day that forgot its usage: the first answer
    // already counts it.
    let restored = support::usage(&proxy.admin_url()).await;
    assert_eq!(restored["used"], 5, "{restored}");
    assert_eq!(restored["services"][0]["used"], 3);
    assert_eq!(restored["services"][1]["used"], 2);
    assert_eq!(restored["remaining"], 995);
}

#[tokio::test]
async fn usage_saved_on_another_day_is_not_restored() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    std::fs::write(
        &file,
        r#"{"day":"2020-01-01","services":{"crm-sync":900,"warehouse":50},"foreign":10}"#,
    )
    .unwrap();
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 0s"))
        .await
        .unwrap();
    // Answered only once the ledger has been read (see the restart test).
    let today = support::usage(&proxy.admin_url()).await;
    assert_eq!(today["used"], 0, "{today}");
    assert_eq!(today["remaining"], 1000);
}

/// The contents of the files in `directory` whose names start with
/// `prefix`, in the order of their names.
fn contents_of_files_named(directory: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| std::fs::read_to_string(directory.join(name)).unwrap())
        .collect()
}

#[tokio::test]
async fn a_corrupt_ledger_is_moved_aside_not_lost() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    // Two starts that each find a corrupt ledger: the second copy set
    // aside does not replace the first.
    for text in ["not json", "not json either"] {
        std::fs::write(&file, text).unwrap();
        let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 0s"))
            .await
            .unwrap();
        // Answered only once the ledger has been read (see the restart test).
        assert_eq!(support::usage(&proxy.admin_url()).await["used"], 0);
        proxy.shutdown().await.unwrap();
    }
    // Named by the time each was found.
    assert_eq!(
        contents_of_files_named(dir.path(), "usage.json.corrupt-"),
        ["not json", "not json either"]
    );
}

#[tokio::test]
async fn with_the_ledger_lost_the_first_call_waits_for_marketos_usage_report() {
    // Marketo answers slowly: a proxy that served before its usage report
    // came would admit the first call.
    let sim = Simulator::spawn(SimConfig {
        latency: Duration::from_millis(300),
        ..support::sim_config()
    })
    .await
    .unwrap();
    // Integrations outside the proxy spent 999 of today's 1000 calls; the
    // usage call itself is the last one.
    sim.simulator().add_foreign_usage("other@example.com", 999);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    std::fs::write(&file, "not json").unwrap();
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 10m"))
        .await
        .unwrap();

    let answer = support::client()
        .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .send()
        .await
        .unwrap();
    let retry_after = answer.headers().get("retry-after").cloned();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "607", "{body}");
    assert!(retry_after.is_some());
    // Refused by the proxy: Marketo saw the usage call and nothing else
    // (the error report's call after it was refused by the proxy too).
    let targets: Vec<String> = sim
        .stats()
        .arrivals
        .into_iter()
        .map(|arrival| arrival.target)
        .collect();
    assert_eq!(targets, ["/rest/v1/stats/usage.json"]);
    let usage = support::usage(&proxy.admin_url()).await;
    assert_eq!(usage["marketo_reported"]["total"], 1000, "{usage}");
    assert_eq!(usage["remaining"], 0);
}

#[tokio::test]
async fn marketo_counting_more_calls_shrinks_the_remaining_quota() {
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    // Another integration, not behind the proxy, made 600 calls today.
    sim.simulator().add_foreign_usage("other@example.com", 600);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "usage_sync_interval: 10m"))
        .await
        .unwrap();
    // The first reconciliation runs in the background right after start.
    let today = support::eventually(Duration::from_secs(5), async || {
        let today = support::usage(&proxy.admin_url()).await;
        if today["marketo_reported"].is_null() {
            Err(today)
        } else {
            Ok(today)
        }
    })
    .await;
    // Marketo counted its 600 and the usage call itself; the proxy counted
    // that and the error report's call after it, under its own name.
    assert_eq!(today["marketo_reported"]["total"], 601, "{today}");
    assert_eq!(today["marketo_reported"]["refused"], 0, "{today}");
    assert_eq!(today["marketo_reported"]["foreign"], 600, "{today}");
    assert_eq!(today["proxy_used"], 2);
    assert_eq!(today["outside_proxy"], 600);
    assert_eq!(today["remaining"], 1000 - 602);
    let proxy_lane = today["services"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(proxy_lane["name"], "marketo-proxy");
    assert_eq!(proxy_lane["used"], 2);
}

/// The process collector's families, with their types, as `/metrics`
/// serves them on Linux.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_series_alerts_watch_start_at_zero_so_the_first_refusal_is_an_increase() {
    let stack = Stack::start(support::sim_config()).await;
    let metrics = stack.metrics().await;
    for series in [
        r#"marketo_proxy_upstream_calls_total{api="rest",code="606",service="crm-sync"}"#,
        r#"marketo_proxy_upstream_calls_total{api="bulk",code="607",service="warehouse"}"#,
        r#"marketo_proxy_upstream_calls_total{api="rest",code="615",service="marketo-proxy"}"#,
        r#"marketo_proxy_requests_total{outcome="rejected_rate",service="warehouse"}"#,
        r#"marketo_proxy_requests_total{outcome="upstream_error",service="crm-sync"}"#,
        r#"marketo_proxy_token_refreshes_total{result="rejected"}"#,
    ] {
        assert_eq!(metric(&metrics, series), Some(0.0), "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn metrics_carry_the_process_families() {
    let stack = Stack::start(support::sim_config()).await;
    let metrics = stack.metrics().await;
    for (family, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_threads", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            metrics
                .lines()
                .any(|line| line == format!("# TYPE {family} {kind}")),
            "no `# TYPE {family} {kind}` in\n{metrics}"
        );
        assert!(metric(&metrics, family).is_some(), "no {family} sample");
    }
    // Read from /proc for this process: it has memory, descriptors (the
    // listeners at least) and a start time.
    assert!(metric(&metrics, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(metric(&metrics, "process_open_fds").unwrap() >= 2.0);
    assert!(metric(&metrics, "process_open_fds").unwrap() < metric(&metrics, "process_max_fds").unwrap());
    assert!(metric(&metrics, "process_start_time_seconds").unwrap() > 1.6e9);
}
