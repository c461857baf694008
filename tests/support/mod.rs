//! Shared helpers for the end-to-end tests: a simulator and a proxy in
//! front of it, both in process on ephemeral ports, and a real HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod connect_proxy;
pub mod kernel;
pub mod prometheus;
pub mod raw_h2;
pub mod redis;
pub mod tls;

use std::fmt::Debug;
use std::time::Duration;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::Config;
use marketo_proxy::sim::{SimClient, SimConfig, SimHandle, Simulator};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// API keys of the services in [`proxy_config`].
pub const CRM_KEY: &str = "test-key-crm-0123456789";
pub const WAREHOUSE_KEY: &str = "test-key-warehouse-0123456789";
/// Client credentials the `crm-sync` service presents to the proxy.
pub const CRM_CLIENT_ID: &str = "crm-sync-client";
pub const CRM_CLIENT_SECRET: &str = "crm-sync-secret-0123456789";

/// A simulator with no latency and Marketo's limits, unless changed.
pub fn sim_config() -> SimConfig {
    SimConfig {
        latency: std::time::Duration::ZERO,
        clients: vec![
            SimClient::demo(),
            SimClient {
                client_id: "warehouse-user".into(),
                client_secret: "warehouse-user-secret".into(),
                user: "warehouse@example.com".into(),
            },
        ],
        ..SimConfig::default()
    }
}

/// A proxy config for a simulator at `sim_url`, with two services:
/// `crm-sync` (API key and client credentials) and `warehouse` (API key,
/// own Marketo API user). `extra_marketo` is added under `marketo:`.
pub fn proxy_config(sim_url: &str, extra_marketo: &str) -> Config {
    proxy_config_with(
        sim_url,
        extra_marketo,
        "{}",
        "{ file: ~, usage_sync_interval: 0s }",
    )
}

/// [`proxy_config`] with `limits:` and `state:` given as YAML flow
/// mappings, e.g. `{ window_calls: 10, window: 2s }`.
pub fn proxy_config_with(sim_url: &str, extra_marketo: &str, limits: &str, state: &str) -> Config {
    let yaml = format!(
        r#"
marketo:
  base_url: {sim_url}
  client_id: demo-client
  client_secret: demo-secret
  {extra_marketo}
limits: {limits}
services:
  - name: crm-sync
    api_key: {CRM_KEY}
    client_id: {CRM_CLIENT_ID}
    client_secret: {CRM_CLIENT_SECRET}
  - name: warehouse
    api_key: {WAREHOUSE_KEY}
    marketo:
      client_id: warehouse-user
      client_secret: warehouse-user-secret
state: {state}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).expect("test config is valid")
}

/// A simulator and a proxy in front of it.
pub struct Stack {
    pub sim: SimHandle,
    pub proxy: RunningProxy,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(sim: SimConfig) -> Self {
        Self::start_with(sim, "").await
    }

    pub async fn start_with(sim: SimConfig, extra_marketo: &str) -> Self {
        Self::start_configured(sim, |sim_url| proxy_config(sim_url, extra_marketo)).await
    }

    /// A simulator, and a proxy with the config `config` makes for the
    /// simulator's URL.
    pub async fn start_configured(sim: SimConfig, config: impl FnOnce(&str) -> Config) -> Self {
        let sim = Simulator::spawn(sim).await.expect("simulator starts");
        let config = config(&sim.url());
        let proxy = app::spawn(config).await.expect("proxy starts");
        Self {
            sim,
            proxy,
            http: client(),
        }
    }

    /// `GET` through the proxy with an API key.
    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.proxy.url()))
            .header("X-Api-Key", key)
            .send()
            .await
            .expect("proxy answers")
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.proxy.admin_url()).await
    }
}

/// A simulator and a ready proxy in front of it whose `server:` settings
/// are `server`, in YAML (e.g. `{ header_read_timeout: 500ms }`).
pub async fn proxy_with_server(server: &str) -> (SimHandle, RunningProxy) {
    let sim = Simulator::spawn(sim_config()).await.expect("simulator starts");
    let mut config = proxy_config(&sim.url(), "");
    config.server = serde_yaml_ng::from_str(server).expect("server settings are valid");
    let proxy = app::spawn(config).await.expect("proxy starts");
    wait_ready(&proxy).await;
    (sim, proxy)
}

/// Waits until the server closes `stream` (a read returns end of file or
/// a reset), reading past any answer, and says how long that took; panics
/// after `within`.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buffer = [0_u8; 4096];
    loop {
        match tokio::time::timeout_at(started + within, stream.read(&mut buffer)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// How often [`eventually`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits for background work without guessing how long it takes: runs
/// `check` until it returns `Ok` and returns that value, or panics with the
/// last `Err` (what was seen instead) once `within` has passed.
pub async fn eventually<T, E: Debug>(within: Duration, mut check: impl AsyncFnMut() -> Result<T, E>) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("still not there after {within:?}: {seen:?}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Waits until `/readyz` answers 200: every upstream credential has a
/// token, so the boot refreshers' identity calls are done.
pub async fn wait_ready(proxy: &RunningProxy) {
    let http = client();
    let url = format!("{}/readyz", proxy.admin_url());
    eventually(Duration::from_secs(5), async || {
        let status = http.get(&url).send().await.expect("admin answers").status();
        if status == 200 {
            Ok(())
        } else {
            Err(format!("/readyz answered {status}"))
        }
    })
    .await;
}

/// The `/metrics` text of the admin listener at `admin_url`.
pub async fn metrics_text(admin_url: &str) -> String {
    client()
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("metrics text")
}

/// The `/usage` JSON of the admin listener at `admin_url`.
pub async fn usage(admin_url: &str) -> serde_json::Value {
    client()
        .get(format!("{admin_url}/usage"))
        .send()
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("usage JSON")
}

/// Faults that answer the next `count` calls with Marketo `code`.
pub fn fail_next(count: u32, code: &str) -> marketo_proxy::sim::Faults {
    fail_with(count, Some(code), None)
}

/// Faults that answer the next `count` calls with a bare HTTP `status`.
pub fn fail_next_status(count: u32, status: u16) -> marketo_proxy::sim::Faults {
    fail_with(count, None, Some(status))
}

fn fail_with(count: u32, code: Option<&str>, http_status: Option<u16>) -> marketo_proxy::sim::Faults {
    marketo_proxy::sim::Faults {
        fail_next: Some(marketo_proxy::sim::FailNext {
            count,
            failure: marketo_proxy::sim::Failure {
                code: code.map(str::to_owned),
                http_status,
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

/// Sends `request` and reads the answer as JSON.
pub async fn send_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    request
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("a JSON answer")
}

/// Runs a bulk lead export of `fields` through the proxy at `proxy_url`
/// as the service with `key`: create, enqueue, wait for it to complete,
/// and answer the file's response.
pub async fn export_leads(proxy_url: &str, key: &str, fields: &[&str]) -> reqwest::Response {
    let http = client();
    let post = |path: &str| http.post(format!("{proxy_url}{path}")).header("X-Api-Key", key);
    let get = |path: &str| http.get(format!("{proxy_url}{path}")).header("X-Api-Key", key);
    let created = send_json(
        post("/bulk/v1/leads/export/create.json")
            .json(&serde_json::json!({"fields": fields, "format": "CSV"})),
    )
    .await;
    let id = created["result"][0]["exportId"]
        .as_str()
        .unwrap_or_else(|| panic!("no export id in {created}"))
        .to_owned();
    send_json(post(&format!("/bulk/v1/leads/export/{id}/enqueue.json"))).await;
    eventually(Duration::from_secs(5), async || {
        let status = send_json(get(&format!("/bulk/v1/leads/export/{id}/status.json"))).await;
        match status["result"][0]["status"].as_str() {
            Some("Completed") => Ok(()),
            _ => Err(status),
        }
    })
    .await;
    get(&format!("/bulk/v1/leads/export/{id}/file.json"))
        .send()
        .await
        .expect("file answered")
}

/// The path of the first export file `sim` served.
pub fn file_path(sim: &SimHandle) -> String {
    sim.stats()
        .arrivals
        .iter()
        .find(|arrival| arrival.target.ends_with("/file.json"))
        .map(|arrival| arrival.target.clone())
        .expect("an export file was served")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client builds")
}

/// The value of one exposition line, e.g.
/// `marketo_proxy_requests_total{outcome="ok",service="crm-sync"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Replaces the value of `"requestId"` so two answers can be compared
/// byte for byte apart from it.
pub fn without_request_id(body: &str) -> String {
    match body.find("\"requestId\":\"") {
        Some(start) => {
            let value_start = start + "\"requestId\":\"".len();
            let end = body[value_start..]
                .find('"')
                .map_or(body.len(), |end| value_start + end);
            format!("{}REQUEST-ID{}", &body[..value_start], &body[end..])
        }
        None => body.to_owned(),
    }
}
