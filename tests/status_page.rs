//! The status page on the admin listener: its JSON against `/usage` and
//! `/metrics`, what it never shows, and the page itself rendered by a
//! headless Chromium while two services send traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use marketo_proxy::config::Config;
use marketo_proxy::sim::SimConfig;
use serde_json::Value;
use support::{CRM_CLIENT_ID, CRM_CLIENT_SECRET, CRM_KEY, Stack, WAREHOUSE_KEY, metric};

/// Two services as in `support::proxy_config`, with `crm-sync` capped at
/// two calls a day and `warehouse` at one call per window, so that each
/// runs into a limit of its own at once.
fn capped_config(sim_url: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits: {{ max_queue_wait: 200ms }}
services:
  - name: crm-sync
    api_key: {CRM_KEY}
    client_id: {CRM_CLIENT_ID}
    client_secret: {CRM_CLIENT_SECRET}
    daily_quota: 2
    reserved_daily: 1
  - name: warehouse
    api_key: {WAREHOUSE_KEY}
    window_calls: 1
    marketo: {{ client_id: warehouse-user, client_secret: warehouse-user-secret }}
state: {{ file: ~, usage_sync_interval: 0s }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

async fn status_json(admin_url: &str) -> Value {
    let answer = support::client()
        .get(format!("{admin_url}/status.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    answer.json().await.unwrap()
}

async fn marketo_code(answer: reqwest::Response) -> Option<String> {
    let body: Value = answer.json().await.unwrap();
    body["errors"][0]["code"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn the_status_json_says_what_usage_and_metrics_say() {
    let stack = Stack::start_configured(support::sim_config(), capped_config).await;
    support::wait_ready(&stack.proxy).await;
    // crm-sync: Marketo says 601 once (the proxy replays with a fresh
    // token; Marketo does not count the 601, nor does the proxy), then its
    // cap of two is spent and the proxy answers 607.
    stack.sim.inject(support::fail_next(1, "601"));
    for _ in 0..2 {
        assert_eq!(
            marketo_code(stack.get(CRM_KEY, "/rest/v1/lead/1.json").await).await,
            None
        );
    }
    assert_eq!(
        marketo_code(stack.get(CRM_KEY, "/rest/v1/lead/1.json").await)
            .await
            .as_deref(),
        Some("607")
    );
    // warehouse: one call fills its share of the window; the next could
    // not start within its queue wait, so the proxy answers 606.
    assert_eq!(
        marketo_code(stack.get(WAREHOUSE_KEY, "/rest/v1/lead/2.json").await).await,
        None
    );
    assert_eq!(
        marketo_code(stack.get(WAREHOUSE_KEY, "/rest/v1/lead/2.json").await)
            .await
            .as_deref(),
        Some("606")
    );

    let admin = stack.proxy.admin_url();
    let status = status_json(&admin).await;
    let usage = support::usage(&admin).await;
    let metrics = stack.metrics().await;
    let value =
        |series: &str| metric(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"));

    // The instance, as /usage has it.
    assert_eq!(
        status["window"]["used"], usage["window"]["used"],
        "{status}\n{usage}"
    );
    assert_eq!(status["window"]["used"], 3);
    assert_eq!(status["window"]["limit"], usage["window"]["limit"]);
    assert_eq!(status["window"]["in_flight"], 0);
    assert_eq!(status["window"]["answered"], 3);
    assert_eq!(
        status["concurrency"]["in_flight"],
        usage["concurrency"]["in_flight"]
    );
    assert_eq!(status["concurrency"]["limit"], usage["concurrency"]["limit"]);
    assert_eq!(status["queued"], usage["queued"]);
    for key in ["quota", "used", "remaining", "proxy_used", "outside_proxy"] {
        assert_eq!(status["day"][key], usage[key], "day.{key}: {status}\n{usage}");
    }
    assert_eq!(status["day"]["date"], usage["day"]);
    assert_eq!(status["day"]["resets_at"], usage["resets_at"]);
    assert_eq!(status["day"]["timezone"], "America/Chicago");
    assert_eq!(status["day"]["reserved"], 1);
    assert_eq!(status["day"]["reserved_left"], 0, "crm-sync used its reserve");
    // And as /metrics has it.
    assert_eq!(value("marketo_proxy_window_used"), 3.0);
    assert_eq!(value("marketo_proxy_daily_remaining"), 50_000.0 - 3.0);

    // Each service, as /usage has it, with what only the page adds.
    let services = status["services"].as_array().unwrap();
    assert_eq!(services.len(), usage["services"].as_array().unwrap().len());
    for (shown, used) in services.iter().zip(usage["services"].as_array().unwrap()) {
        assert_eq!(shown["name"], used["name"]);
        for key in ["used", "cap", "reserved", "queued", "in_flight", "concurrency"] {
            assert_eq!(shown[key], used[key], "{key} of {}", shown["name"]);
        }
    }
    let (crm, warehouse) = (&services[0], &services[1]);
    assert_eq!(crm["used"], 2);
    assert_eq!(
        crm["last_hour"],
        serde_json::json!({"refused_606": 0, "refused_607": 1, "replays": 1})
    );
    assert_eq!(
        warehouse["last_hour"],
        serde_json::json!({"refused_606": 1, "refused_607": 0, "replays": 0})
    );
    assert_eq!(warehouse["window"], serde_json::json!({"used": 1, "limit": 1}));
    // The same events in /metrics.
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="rejected_quota",service="crm-sync"}"#),
        1.0
    );
    assert_eq!(
        value(r#"marketo_proxy_requests_total{outcome="rejected_rate",service="warehouse"}"#),
        1.0
    );
    assert_eq!(value(r#"marketo_proxy_replays_total{reason="601"}"#), 1.0);
    // Every call admitted counts one queue wait, as in the histogram (the
    // 601's replay too).
    assert_eq!(crm["wait"]["count"], 3);
    assert_eq!(
        value(r#"marketo_proxy_queue_wait_seconds_count{service="crm-sync"}"#),
        3.0
    );
    assert!(crm["wait"]["p99_seconds"].as_f64().unwrap() < 0.2, "{crm}");

    // Four calls sent this second (or the last, if it just turned): the
    // three Marketo counted and its 601.
    let timeline: Vec<u64> = status["timeline"]["calls_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|calls| calls.as_u64().unwrap())
        .collect();
    assert_eq!(timeline.len(), 40, "two 20 s windows");
    assert_eq!(timeline.iter().sum::<u64>(), 4, "{timeline:?}");

    // Health: a token for each credential, the one limit-free backend.
    let tokens = status["health"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        tokens[0]["services"],
        serde_json::json!(["crm-sync", "marketo-proxy"])
    );
    assert_eq!(tokens[1]["services"], serde_json::json!(["warehouse"]));
    let expiry = tokens[0]["expires_in_seconds"].as_u64().unwrap();
    assert!((3500..=3600).contains(&expiry), "{expiry}");
    let metric_expiry = value("marketo_proxy_token_expiry_seconds");
    assert!(
        (metric_expiry - expiry as f64).abs() < 2.0,
        "{metric_expiry} {expiry}"
    );
    assert_eq!(
        status["health"]["backend"],
        serde_json::json!({"kind": "memory", "up": true})
    );
    assert_eq!(status["health"]["lowered"], serde_json::json!([]));
    assert!(status["health"]["last_identity_error"].is_null());
}

#[tokio::test]
async fn an_identity_failure_stays_on_the_page_after_a_token_is_had() {
    let stack = Stack::start(support::sim_config()).await;
    support::wait_ready(&stack.proxy).await;
    // Marketo loses every token and fails the next three identity calls
    // (all the attempts of one refresh): the next call needs a new token
    // and cannot have one; a later one can.
    stack.sim.inject(marketo_proxy::sim::Faults {
        identity_fail_next: 3,
        revoke_tokens: true,
        ..Default::default()
    });
    let admin = stack.proxy.admin_url();
    let _ = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    let error = support::eventually(Duration::from_secs(10), async || {
        let status = status_json(&admin).await;
        let error = status["health"]["last_identity_error"].clone();
        if error.is_null() { Err(status) } else { Ok(error) }
    })
    .await;
    assert!(error["error"].as_str().unwrap().contains("identity"), "{error}");
    assert!(error["services"].as_array().unwrap().contains(&"crm-sync".into()));
    // Once a token is had again, the error is still shown, as past.
    support::eventually(Duration::from_secs(10), async || {
        let answer = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
        marketo_code(answer).await.map_or(Ok(()), Err)
    })
    .await;
    let status = status_json(&admin).await;
    let error = &status["health"]["last_identity_error"];
    assert_eq!(error["current"], false, "{status}");
}

#[tokio::test]
async fn the_page_and_its_json_never_show_a_secret_or_a_token() {
    let stack = Stack::start(support::sim_config()).await;
    support::wait_ready(&stack.proxy).await;
    let http = support::client();
    // Marketo hands the same token again while it is valid: this is the
    // one the proxy holds.
    let marketo: Value = http
        .get(format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret",
            stack.sim.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let marketo_token = marketo["access_token"].as_str().unwrap().to_owned();
    // A token the proxy issued to crm-sync.
    let issued: Value = http
        .get(format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id={CRM_CLIENT_ID}&client_secret={CRM_CLIENT_SECRET}",
            stack.proxy.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issued_token = issued["access_token"].as_str().unwrap().to_owned();
    assert_eq!(stack.get(CRM_KEY, "/rest/v1/lead/1.json").await.status(), 200);

    let admin = stack.proxy.admin_url();
    let json = http
        .get(format!("{admin}/status.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let page = http
        .get(format!("{admin}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let secrets = [
        "demo-secret",
        "warehouse-user-secret",
        CRM_CLIENT_SECRET,
        CRM_KEY,
        WAREHOUSE_KEY,
        &marketo_token,
        &issued_token,
    ];
    for secret in secrets {
        assert!(!json.contains(secret), "status.json shows {secret}: {json}");
        assert!(!page.contains(secret), "the page shows {secret}");
    }
    // Sanity: the JSON did describe this proxy.
    assert!(json.contains("crm-sync"), "{json}");
}

#[tokio::test]
async fn the_page_is_self_contained_and_the_admin_port_read_only() {
    let stack = Stack::start(support::sim_config()).await;
    let admin = stack.proxy.admin_url();
    let http = support::client();
    let answer = http.get(format!("{admin}/")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/html; charset=utf-8");
    let policy = answer.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let page = answer.text().await.unwrap();
    // Nothing from elsewhere: no absolute URL anywhere in the page.
    for outside in ["http://", "https://", "//cdn", "@import", "url("] {
        assert!(!page.contains(outside), "the page refers to {outside}");
    }
    assert!(page.contains("status.json"));
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        for path in ["/", "/status.json"] {
            let answer = http
                .request(method.clone(), format!("{admin}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 405, "{method} {path}");
        }
    }
}

/// Chromium, if installed: `CHROMIUM` names it, else the first of
/// `chromium` and `chromium-browser` on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// What headless Chromium made of a page.
struct Rendered {
    /// The DOM after the scripts ran.
    dom: String,
    /// Console messages and uncaught exceptions, as Chromium logged them.
    console: Vec<String>,
}

/// Loads `url` in headless Chromium for `budget` of the page's (virtual)
/// time, which runs on while the page waits for the network, and saves a
/// screenshot to `screenshot`.
async fn render(chromium: &Path, url: &str, budget: Duration, screenshot: &Path) -> Rendered {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chromium failed: {stderr}");
    Rendered {
        dom: String::from_utf8(output.stdout).unwrap(),
        console: stderr
            .lines()
            .filter(|line| line.contains(":CONSOLE"))
            .map(str::to_owned)
            .collect(),
    }
}

/// The opening tag of the element whose attribute `needle` (e.g.
/// `id="window-used"`) is in `dom`.
fn tag_with<'a>(dom: &'a str, needle: &str) -> &'a str {
    let at = dom.find(needle).unwrap_or_else(|| panic!("no {needle} in {dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// The value of `attribute` in an opening tag.
fn attribute<'a>(tag: &'a str, attribute: &str) -> &'a str {
    let key = format!("{attribute}=\"");
    let start = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attribute} in {tag}"))
        + key.len();
    let end = start + tag[start..].find('"').unwrap();
    &tag[start..end]
}

/// Sends one call every `every` with `key`, without waiting for answers
/// (so it keeps its pace however long the proxy queues them), until
/// dropped.
fn paced_load(stack: &Stack, key: &'static str, every: Duration) -> tokio::task::JoinHandle<()> {
    let http = stack.http.clone();
    let url = format!("{}/rest/v1/lead/1.json", stack.proxy.url());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            let call = http.get(&url).header("X-Api-Key", key).send();
            tokio::spawn(async move {
                let _ = call.await;
            });
        }
    })
}

/// Aborts the load tasks when the test ends, however it ends.
struct Load(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Load {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Asserts that the page ran without an error and updated at least
/// twice, as Chromium's console and the page itself saw it.
fn assert_ran_cleanly(rendered: &Rendered) {
    assert!(rendered.console.is_empty(), "console: {:#?}", rendered.console);
    let dom = &rendered.dom;
    let body = tag_with(dom, "data-updates=");
    assert_eq!(attribute(body, "data-errors"), "0", "{dom}");
    assert_eq!(attribute(body, "data-fetch-failures"), "0", "{dom}");
    let updates: u32 = attribute(body, "data-updates").parse().unwrap();
    assert!(updates >= 2, "{updates} updates");
}

/// The calls per second of the rendered timeline, oldest first, and the
/// calls in flight drawn after them.
fn timeline_bars(dom: &str) -> (Vec<u64>, u64) {
    let start = dom.find("id=\"timeline\"").unwrap();
    let timeline = &dom[start..start + dom[start..].find("</div></div>").unwrap()];
    let mut bars: Vec<u64> = timeline
        .match_indices("data-calls=\"")
        .map(|(at, key)| {
            let rest = &timeline[at + key.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    let in_flight = bars.pop().expect("a bar for the calls in flight");
    (bars, in_flight)
}

/// The text of the cell `label` in the row of `service`.
fn service_cell<'a>(dom: &'a str, service: &str, label: &str) -> &'a str {
    let row = &dom[dom.find(&format!("data-service=\"{service}\"")).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    let key = format!("data-label=\"{label}\">");
    let cell = &row[row.find(&key).unwrap_or_else(|| panic!("no {label} in {row}")) + key.len()..];
    &cell[..cell.find('<').unwrap()]
}

#[tokio::test]
async fn the_page_shows_a_quiet_proxys_numbers_exactly_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no chromium on PATH (Debian: apt-get install chromium; or set CHROMIUM)");
        return;
    };
    let stack = Stack::start(support::sim_config()).await;
    support::wait_ready(&stack.proxy).await;
    for (key, calls) in [(CRM_KEY, 4), (WAREHOUSE_KEY, 3)] {
        for _ in 0..calls {
            assert_eq!(stack.get(key, "/rest/v1/lead/1.json").await.status(), 200);
        }
    }
    let screenshot = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    let admin = stack.proxy.admin_url();
    let rendered = render(
        &chromium,
        &format!("{admin}/"),
        Duration::from_millis(2500),
        screenshot.path(),
    )
    .await;
    assert_ran_cleanly(&rendered);
    let dom = &rendered.dom;
    let usage = support::usage(&admin).await;
    assert_eq!(usage["window"]["used"], 7);
    assert_eq!(attribute(tag_with(dom, "id=\"window-used\""), "data-value"), "7");
    assert_eq!(service_cell(dom, "crm-sync", "today"), "4");
    assert_eq!(service_cell(dom, "warehouse", "today"), "3");
    assert_eq!(service_cell(dom, "warehouse", "in flight"), "0 / 10");
    let (bars, in_flight) = timeline_bars(dom);
    assert_eq!(
        (bars.len(), bars.iter().sum::<u64>(), in_flight),
        (40, 7, 0),
        "{bars:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_live_under_load_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no chromium on PATH (Debian: apt-get install chromium; or set CHROMIUM)");
        return;
    };
    // Marketo's real limits; calls take 100 ms, so some are in flight.
    let stack = Stack::start(SimConfig {
        latency: Duration::from_millis(100),
        ..support::sim_config()
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let admin = stack.proxy.admin_url();
    // Ten calls a second from two services against Marketo's five: the
    // window fills in about ten seconds and the queues grow; from about
    // twenty, calls leave the queue as the first slots free, after
    // waiting seconds.
    let _load = Load(vec![
        paced_load(&stack, CRM_KEY, Duration::from_millis(166)),
        paced_load(&stack, WAREHOUSE_KEY, Duration::from_millis(250)),
    ]);
    let limit = support::usage(&admin).await["window"]["limit"].as_u64().unwrap();
    support::eventually(Duration::from_secs(45), async || {
        let status = status_json(&admin).await;
        let waited = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|service| service["wait"]["p99_seconds"].as_f64() > Some(1.0));
        if status["window"]["used"].as_u64() == Some(limit) && waited {
            Ok(())
        } else {
            Err(status)
        }
    })
    .await;

    let screenshot = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    let rendered = render(
        &chromium,
        &format!("{admin}/"),
        Duration::from_millis(3500),
        screenshot.path(),
    )
    .await;
    let usage = support::usage(&admin).await;
    let dom = &rendered.dom;
    assert_ran_cleanly(&rendered);

    // Both services, the window as /usage counts it, a timeline.
    for service in ["crm-sync", "warehouse"] {
        tag_with(dom, &format!("data-service=\"{service}\""));
    }
    let shown: i64 = attribute(tag_with(dom, "id=\"window-used\""), "data-value")
        .parse()
        .unwrap();
    let counted = usage["window"]["used"].as_i64().unwrap();
    assert!((shown - counted).abs() <= 2, "page {shown}, /usage {counted}");
    // The window's calls were all sent in the last two windows.
    let (bars, _) = timeline_bars(dom);
    assert_eq!(bars.len(), 40);
    assert!(bars.iter().sum::<u64>() >= limit, "{bars:?}");

    // The screenshot; STATUS_PAGE_SCREENSHOT=docs/status-page.png keeps it.
    let png = std::fs::read(screenshot.path()).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    if let Some(keep) = std::env::var_os("STATUS_PAGE_SCREENSHOT") {
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join(keep);
        std::fs::write(&keep, &png).unwrap();
        eprintln!("screenshot saved to {}", keep.display());
    }
}
