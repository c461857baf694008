//! The monitoring files under `deploy/` against a real Prometheus
//! (Debian package `prometheus`, which has `prometheus` and `promtool`):
//!
//! - a Prometheus scrapes a proxy in front of the simulator while two
//!   services call through it, Marketo answers a 606 that the proxy
//!   replays, and one service runs into its own daily cap (a 607 answered
//!   by the proxy); then every query of the Grafana dashboard, with
//!   Grafana's variables expanded, returns data; every alert rule loads
//!   and evaluates; the alerts this traffic should start are pending; and
//!   the counters Prometheus scraped equal the calls the simulator saw
//!   from each API user;
//! - `promtool` accepts the rules and the scrape configs, and the rules'
//!   unit tests (`deploy/prometheus/alerts.test.yml`) pass and cover
//!   every alert.
//!
//! A test whose program is not on `PATH` prints why and does nothing;
//! `.ci/run` installs the package.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::num::NonZeroU64;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use support::prometheus::{Prometheus, deploy_dir, on_path_or_skip};
use support::{CRM_KEY, Stack, WAREHOUSE_KEY, eventually};

/// The warehouse service's own daily cap: its next call is refused by the
/// proxy with 607.
const WAREHOUSE_DAILY_CAP: u64 = 30;
/// The instance's daily quota, small so that the exhaustion forecast is
/// minutes, not days.
const DAILY_QUOTA: u64 = 600;
/// The API user each service calls Marketo as (see `support::proxy_config`).
const USERS: [(&str, &str); 2] = [
    ("crm-sync", "demo@example.com"),
    ("warehouse", "warehouse@example.com"),
];
/// How long Prometheus may take to show what happened: a few scrapes and
/// rule evaluations at one a second.
const SCRAPED_WITHIN: Duration = Duration::from_secs(20);
/// How long an alert may take to turn pending: a rate needs two scrapes of
/// its series and then a rule evaluation, and on a busy machine (the whole
/// suite on two cores) Prometheus's evaluations fall behind by seconds.
const ALERTED_WITHIN: Duration = Duration::from_secs(60);

/// Grafana's variables as the dashboard expands them with every service
/// and every proxy instance selected, over the last 5 minutes, against a
/// data source whose scrape interval is set to Prometheus's 1 s:
/// `$__interval` is that 1 s (5 min over the panel's width is less), and
/// `$__rate_interval` is `max($__interval + scrape interval, 4 × scrape
/// interval)`. Multi-value variables become a regex alternation.
fn grafana_variable(name: &str) -> Option<&'static str> {
    Some(match name {
        "service" => "(crm-sync|warehouse)",
        "instance" => ".*",
        "__interval" => "1s",
        "__interval_ms" => "1000",
        "__rate_interval" => "4s",
        "__rate_interval_ms" => "4000",
        "__range" => "5m",
        "__range_s" => "300",
        "__range_ms" => "300000",
        _ => return None,
    })
}

/// `expr` with `$name` and `${name}` replaced; panics on a variable
/// Grafana would not know.
fn expand_grafana_variables(expr: &str) -> String {
    let mut expanded = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(dollar) = rest.find('$') {
        expanded.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        let (name, consumed) = match after.strip_prefix('{') {
            Some(braced) => {
                let close = braced.find('}').expect("closing brace of ${...}");
                (&braced[..close], close + 2)
            }
            None => {
                let end = after
                    .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = grafana_variable(name).unwrap_or_else(|| panic!("unknown variable ${name} in {expr}"));
        expanded.push_str(value);
        rest = &after[consumed..];
    }
    expanded.push_str(rest);
    expanded
}

/// Every query of the dashboard: `(panel title, expr)`, rows' nested
/// panels included.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = deploy_dir().join("grafana/marketo-proxy.json");
    let dashboard: Json = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let mut panels: Vec<&Json> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    panels
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |target| Some((title.clone(), target["expr"].as_str()?.to_owned())))
        })
        .collect()
}

/// The template variables that are Prometheus queries:
/// `(name, label, series selector)` from `label_values(selector, label)`.
fn variable_queries() -> Vec<(String, String, String)> {
    let path = deploy_dir().join("grafana/marketo-proxy.json");
    let dashboard: Json = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|variable| variable["type"] == "query")
        .map(|variable| {
            let definition = variable["definition"].as_str().unwrap();
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or_else(|| panic!("not label_values(selector, label): {definition}"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            (
                variable["name"].as_str().unwrap().to_owned(),
                label.trim().to_owned(),
                selector.trim().to_owned(),
            )
        })
        .collect()
}

/// Every alerting rule: `(alert, expr)`.
fn alert_rules() -> Vec<(String, String)> {
    let text = fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).unwrap();
    let document: Yaml = serde_yaml_ng::from_str(&text).unwrap();
    document["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_sequence().unwrap())
        .map(|rule| {
            (
                rule["alert"].as_str().unwrap().to_owned(),
                rule["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The samples of an instant-vector result: `(labels, value)`.
fn samples(data: &Json) -> Vec<(BTreeMap<String, String>, f64)> {
    assert_eq!(data["resultType"], "vector", "{data}");
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sample| {
            let labels = sample["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, value)| (name.clone(), value.as_str().unwrap().to_owned()))
                .collect();
            let value = sample["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (labels, value)
        })
        .collect()
}

/// Sends requests from both services every 300 ms until told to stop:
/// crm-sync's are served, warehouse's (past its cap) refused with 607.
/// Calls in flight when it stops are finished, so the counts settle.
fn steady_traffic(stack: &Stack, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let http = stack.http.clone();
    let proxy = stack.proxy.url();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        let mut round = 0_u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            round += 1;
            let answer = http
                .get(format!("{proxy}/rest/v1/lead/{}.json", round % 50 + 1))
                .header("X-Api-Key", CRM_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            if round % 3 == 0 {
                let refused: Json = http
                    .get(format!("{proxy}/rest/v1/lead/1.json"))
                    .header("X-Api-Key", WAREHOUSE_KEY)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(refused["errors"][0]["code"], "607", "{refused}");
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_proxy_and_every_dashboard_query_and_rule_runs() {
    let Some(binary) = on_path_or_skip("prometheus", "prometheus") else {
        return;
    };
    let stack = Stack::start_configured(support::sim_config(), |sim_url| {
        let mut config = support::proxy_config_with(
            sim_url,
            "",
            &format!("{{ daily_quota: {DAILY_QUOTA} }}"),
            "{ file: ~, usage_sync_interval: 0s }",
        );
        config.services[1].daily_quota = NonZeroU64::new(WAREHOUSE_DAILY_CAP);
        config.validate().expect("valid config")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let admin = stack.proxy.admin_url();
    let target = admin.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&binary, &target).await;
    let up = format!("up{{job=\"marketo-proxy\",instance=\"{target}\"}}");
    eventually(SCRAPED_WITHIN, async || match prometheus.query(&up).await {
        Ok(data) if samples(&data).first().is_some_and(|(_, value)| *value == 1.0) => Ok(()),
        other => Err(other),
    })
    .await;

    // Both services call; Marketo answers one call with 606, which the
    // proxy replays after a pause.
    for id in 1..=10 {
        assert_eq!(
            stack
                .get(CRM_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
        assert_eq!(
            stack
                .get(WAREHOUSE_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
    }
    let replays = "marketo_proxy_replays_total{job=\"marketo-proxy\",reason=\"606\"}";
    for count in [1.0, 2.0] {
        // Twice, with a scrape in between: the replay counter is created
        // at 1 by the first replay, and `increase` sees it grow only from
        // its second sample on (the 606 counter itself starts at 0).
        stack.sim.inject(support::fail_next(1, "606"));
        let replayed = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
        assert_eq!(replayed.status(), 200);
        let body: Json = replayed.json().await.unwrap();
        assert_eq!(body["success"], true, "{body}");
        eventually(SCRAPED_WITHIN, async || match prometheus.query(replays).await {
            Ok(data) if samples(&data).first().is_some_and(|(_, value)| *value == count) => Ok(()),
            other => Err(other),
        })
        .await;
    }
    // warehouse spends the rest of its cap; the next call is refused by
    // the proxy (Marketo never sees it).
    for id in 11..=WAREHOUSE_DAILY_CAP {
        assert_eq!(
            stack
                .get(WAREHOUSE_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
    }
    let refused: Json = stack
        .get(WAREHOUSE_KEY, "/rest/v1/lead/1.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(refused["errors"][0]["code"], "607", "{refused}");

    // Traffic goes on while the dashboard is looked at.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = steady_traffic(&stack, Arc::clone(&stop));

    // Every template variable finds its values.
    for (name, label, selector) in variable_queries() {
        let selector = expand_grafana_variables(&selector);
        let answer = prometheus
            .api(&format!("label/{label}/values"), &[("match[]", &selector)])
            .await;
        assert_eq!(answer["status"], "success", "${name}: {answer}");
        let values: BTreeSet<&str> = answer["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        match name.as_str() {
            "service" => assert!(
                values.contains("crm-sync") && values.contains("warehouse"),
                "${name}: {values:?}"
            ),
            "instance" => assert!(values.contains(target.as_str()), "${name}: {values:?}"),
            _ => assert!(!values.is_empty(), "${name}: no values for {selector}"),
        }
    }

    // Every panel query returns at least one series with a number (not
    // NaN, which a histogram quantile over no observations would give).
    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "{} queries", queries.len());
    let mut waiting: Vec<(String, String)> = queries
        .iter()
        .map(|(title, expr)| (title.clone(), expand_grafana_variables(expr)))
        .collect();
    let deadline = tokio::time::Instant::now() + SCRAPED_WITHIN;
    let mut last_seen = BTreeMap::new();
    while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for (title, expr) in waiting {
            match prometheus.query(&expr).await {
                Ok(data) if samples(&data).iter().any(|(_, value)| !value.is_nan()) => {}
                Err(error) => panic!("{title}: Prometheus refuses `{expr}`: {error}"),
                Ok(data) => {
                    last_seen.insert(expr.clone(), data["result"].to_string());
                    still.push((title, expr));
                }
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let empty: Vec<String> = waiting
        .iter()
        .map(|(title, expr)| format!("{title}: `{expr}` gave {}", last_seen[expr]))
        .collect();
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n  {}",
        empty.join("\n  ")
    );

    // Every alert expression parses and runs, and Prometheus evaluates
    // every rule of alerts.yml without an error.
    let rules = alert_rules();
    for (alert, expr) in &rules {
        if let Err(error) = prometheus.query(expr).await {
            panic!("{alert}: Prometheus refuses `{expr}`: {error}");
        }
    }
    let evaluated = eventually(SCRAPED_WITHIN, async || {
        let answer = prometheus.api("rules", &[]).await;
        let loaded: Vec<&Json> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        let healthy = loaded.iter().filter(|rule| rule["health"] == "ok").count();
        if loaded.len() == rules.len() && healthy == rules.len() {
            Ok(loaded.len())
        } else {
            Err(format!("{healthy} of {} rules healthy: {answer}", rules.len()))
        }
    })
    .await;
    assert_eq!(evaluated, rules.len());

    // The alerts this traffic should start are pending (their `for` keeps
    // them from firing within the test).
    let expected = [
        ("MarketoProxyUpstreamRateLimited", Some(("service", "crm-sync"))),
        ("MarketoProxyRequestsRejected", Some(("service", "warehouse"))),
        ("MarketoProxyQuotaExhaustionForecast", None),
    ];
    eventually(ALERTED_WITHIN, async || {
        let answer = prometheus.api("alerts", &[]).await;
        let alerts = answer["data"]["alerts"].as_array().cloned().unwrap_or_default();
        let missing: Vec<&str> = expected
            .iter()
            .filter(|(name, label)| {
                !alerts.iter().any(|alert| {
                    alert["labels"]["alertname"] == *name
                        && label.is_none_or(|(key, value)| alert["labels"][key] == value)
                        && (alert["state"] == "pending" || alert["state"] == "firing")
                })
            })
            .map(|(name, _)| *name)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not active: {missing:?}; alerts: {alerts:?}"))
        }
    })
    .await;

    // Traffic stops; once Prometheus has scraped the last of it, its
    // counters equal the simulator's own record, per API user and code.
    stop.store(true, Ordering::Relaxed);
    traffic
        .await
        .expect("the steady traffic got the answers it expected");
    let stats = stack.sim.stats();
    let mut simulated: BTreeMap<(String, String), f64> = BTreeMap::new();
    for arrival in &stats.arrivals {
        let user = arrival.user.as_deref().expect("every call carried a valid token");
        let (service, _) = USERS
            .iter()
            .find(|(_, api_user)| *api_user == user)
            .unwrap_or_else(|| panic!("a call from an unknown API user {user}"));
        *simulated
            .entry(((*service).to_owned(), arrival.code.clone()))
            .or_default() += 1.0;
    }
    assert_eq!(
        simulated.get(&("crm-sync".to_owned(), "606".to_owned())),
        Some(&2.0)
    );
    assert_eq!(
        simulated.get(&("warehouse".to_owned(), "ok".to_owned())),
        Some(&(WAREHOUSE_DAILY_CAP as f64))
    );
    let by_service_and_code =
        "sum by (service, code) (marketo_proxy_upstream_calls_total{job=\"marketo-proxy\"}) > 0";
    eventually(SCRAPED_WITHIN, async || {
        let data = prometheus.query(by_service_and_code).await.unwrap();
        let scraped: BTreeMap<(String, String), f64> = samples(&data)
            .into_iter()
            .map(|(labels, value)| ((labels["service"].clone(), labels["code"].clone()), value))
            .collect();
        if scraped == simulated {
            Ok(())
        } else {
            Err(format!("Prometheus {scraped:?}\nsimulator {simulated:?}"))
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// promtool

fn promtool(binary: &std::path::Path, args: &[&str]) {
    promtool_in(binary, &deploy_dir(), args);
}

fn promtool_in(binary: &std::path::Path, dir: &std::path::Path, args: &[&str]) {
    let output = Command::new(binary)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_the_scrape_configs() {
    let Some(binary) = on_path_or_skip("promtool", "prometheus") else {
        return;
    };
    promtool(&binary, &["check", "rules", "prometheus/alerts.yml"]);
    promtool(&binary, &["check", "config", "prometheus/prometheus.yml"]);
    // The compose stack's config, laid out as in its container: the
    // shipped rules mounted next to it.
    let container = tempfile::tempdir().unwrap();
    fs::copy(
        deploy_dir().join("compose/prometheus.yml"),
        container.path().join("prometheus.yml"),
    )
    .unwrap();
    fs::copy(
        deploy_dir().join("prometheus/alerts.yml"),
        container.path().join("alerts.yml"),
    )
    .unwrap();
    promtool_in(&binary, container.path(), &["check", "config", "prometheus.yml"]);
}

#[test]
fn promtool_unit_tests_of_the_alerts_pass() {
    let Some(binary) = on_path_or_skip("promtool", "prometheus") else {
        return;
    };
    promtool(&binary, &["test", "rules", "prometheus/alerts.test.yml"]);
}

/// Each alert is shown firing on some series and, at another time or on
/// another instance, not firing.
#[test]
fn every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() {
    let text = fs::read_to_string(deploy_dir().join("prometheus/alerts.test.yml")).unwrap();
    let document: Yaml = serde_yaml_ng::from_str(&text).unwrap();
    let rule_files: Vec<&str> = document["rule_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|file| file.as_str().unwrap())
        .collect();
    assert_eq!(rule_files, ["alerts.yml"]);
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in document["tests"].as_sequence().unwrap() {
        for case in test["alert_rule_test"].as_sequence().unwrap() {
            let alert = case["alertname"].as_str().unwrap().to_owned();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected == 0 {
                silent.insert(alert);
            } else {
                fired.insert(alert);
            }
        }
    }
    let alerts: BTreeSet<String> = alert_rules().into_iter().map(|(alert, _)| alert).collect();
    let never_fired: Vec<&String> = alerts.difference(&fired).collect();
    let never_silent: Vec<&String> = alerts.difference(&silent).collect();
    assert!(never_fired.is_empty(), "no unit test fires {never_fired:?}");
    assert!(
        never_silent.is_empty(),
        "no unit test holds back {never_silent:?}"
    );
    let unknown: Vec<&String> = fired
        .union(&silent)
        .filter(|alert| !alerts.contains(*alert))
        .collect();
    assert!(
        unknown.is_empty(),
        "unit tests of alerts that do not exist: {unknown:?}"
    );
}
