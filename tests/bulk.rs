#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bulk admission end to end: the simulator's extract queue behind a real
//! proxy, integrations calling it over real sockets.
//!
//! Marketo holds 10 jobs in its extract queue and runs 2 of them; past
//! that it answers 1029, and past its daily export bytes too. These tests
//! check that three integrations starting exports at once never meet a
//! 1029 from Marketo, that the proxy refuses an export itself once the
//! day's bytes are spent (and still does after a restart), and that jobs
//! started outside the proxy are absorbed without an error to the client.
//! Then the same with two replicas sharing a real redis-server: together
//! they keep to the one queue and the one day's export bytes, report the
//! same usage, and a replica that loses Redis keeps to its share and
//! counts what it did meanwhile once.

mod support;

use std::time::Duration;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::Config;
use marketo_proxy::sim::{SimClient, SimConfig, SimHandle, Simulator};
use serde_json::{Value, json};
use support::redis::RedisServer;
use support::{eventually, metric, send_json};

const KEYS: [(&str, &str); 3] = [
    ("crm-sync", "bulk-key-crm-sync-0123456789"),
    ("warehouse", "bulk-key-warehouse-0123456789"),
    ("analytics", "bulk-key-analytics-0123456789"),
];

/// A simulator whose exports take `export_time`, with a window large
/// enough for clients that poll often.
fn sim(export_time: Duration) -> SimConfig {
    SimConfig {
        latency: Duration::ZERO,
        export_time,
        window_calls: 100_000,
        leads: 50,
        ..SimConfig::default()
    }
}

/// Three services in front of `sim_url`, with `bulk:` and `state:` as
/// YAML flow mappings.
/// A simulator whose exports take `export_time` and a ready proxy with
/// `bulk` settings (YAML) in front of it, keeping no state on disk.
async fn start(export_time: Duration, bulk: &str) -> (SimHandle, RunningProxy) {
    let sim = Simulator::spawn(sim(export_time)).await.unwrap();
    let proxy = app::spawn(config(&sim.url(), bulk, "{ file: ~, usage_sync_interval: 0s }"))
        .await
        .unwrap();
    support::wait_ready(&proxy).await;
    (sim, proxy)
}

fn config(sim_url: &str, bulk: &str, state: &str) -> Config {
    let services: String = KEYS
        .iter()
        .map(|(name, key)| format!("  - name: {name}\n    api_key: {key}\n"))
        .collect();
    let yaml = format!(
        r#"
marketo:
  base_url: {sim_url}
  client_id: demo-client
  client_secret: demo-secret
limits: {{ window_calls: 100000 }}
services:
{services}
bulk: {bulk}
state: {state}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).expect("test config is valid")
}

/// An integration calling the proxy with its API key.
struct Integration {
    proxy: String,
    key: &'static str,
    http: reqwest::Client,
}

impl Integration {
    fn new(proxy: &str, key: &'static str) -> Self {
        Self {
            proxy: proxy.to_owned(),
            key,
            http: support::client(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.proxy))
            .header("X-Api-Key", self.key)
            .json(&body)
            .send()
            .await
            .expect("proxy answers")
    }

    async fn get(&self, path: &str) -> Value {
        send_json(
            self.http
                .get(format!("{}{path}", self.proxy))
                .header("X-Api-Key", self.key),
        )
        .await
    }

    /// Creates a lead export; its id.
    async fn create(&self) -> String {
        let created: Value = self
            .post("/bulk/v1/leads/export/create.json", json!({"format": "CSV"}))
            .await
            .json()
            .await
            .unwrap();
        created["result"][0]["exportId"]
            .as_str()
            .unwrap_or_else(|| panic!("no export id in {created}"))
            .to_owned()
    }

    async fn enqueue(&self, id: &str) -> Value {
        self.post(&format!("/bulk/v1/leads/export/{id}/enqueue.json"), json!({}))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Polls the job's status until it completes; its last status.
    async fn completed(&self, id: &str) -> Value {
        eventually(Duration::from_secs(20), async || {
            let status = self.get(&format!("/bulk/v1/leads/export/{id}/status.json")).await;
            match status["result"][0]["status"].as_str() {
                Some("Completed") => Ok(status),
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(status)
                }
            }
        })
        .await
    }

    /// Creates, enqueues and waits for one export; the enqueue's answer.
    async fn export(&self) -> Value {
        let id = self.create().await;
        let enqueued = self.enqueue(&id).await;
        if enqueued["success"] == json!(true) {
            self.completed(&id).await;
        }
        enqueued
    }
}

fn code(body: &Value) -> &str {
    if body["success"] == json!(true) {
        "ok"
    } else {
        body["errors"][0]["code"].as_str().unwrap_or("?")
    }
}

/// Three services each start 5 exports at once, through `proxies` in
/// turn: every enqueue is taken, Marketo never says its queue is full,
/// and the queue is used to the full, never beyond, at any time.
async fn fifteen_exports_at_once(sim: &SimHandle, proxies: &[String]) {
    let integrations: Vec<Integration> = KEYS
        .iter()
        .flat_map(|(_, key)| std::iter::repeat_n(*key, 5))
        .enumerate()
        .map(|(n, key)| Integration::new(&proxies[n % proxies.len()], key))
        .collect();
    let answers = futures_util::future::join_all(integrations.iter().map(Integration::export)).await;

    for answer in &answers {
        assert_eq!(code(answer), "ok", "every enqueue taken: {answer}");
    }
    let stats = sim.stats();
    assert_eq!(stats.code("1029"), 0, "Marketo never said its queue was full");
    let queue = &stats.bulk.extract;
    assert_eq!(queue.completed, 15);
    assert!(queue.max_processing <= 2, "{queue:?}");
    assert!(queue.max_in_queue <= 10, "{queue:?}");
    assert_eq!(queue.max_in_queue, 10, "the queue was used to the full");
}

#[tokio::test]
async fn three_services_enqueuing_five_exports_at_once_never_meet_marketos_1029() {
    let (sim, proxy) = start(Duration::from_millis(200), "{ poll_pace: 50ms, poll_after: 1s }").await;

    fifteen_exports_at_once(&sim, &[proxy.url()]).await;

    let usage = support::usage(&proxy.admin_url()).await;
    for (name, _) in KEYS {
        assert_eq!(usage["bulk"]["services"][name]["jobs"], 5, "{usage}");
        assert!(usage["bulk"]["services"][name]["export_bytes"].as_u64().unwrap() > 0);
    }
    let text = support::metrics_text(&proxy.admin_url()).await;
    assert_eq!(
        metric(
            &text,
            r#"marketo_proxy_bulk_jobs{kind="leads",state="completed"}"#
        ),
        Some(15.0),
        "{text}"
    );
}

#[tokio::test]
async fn the_daily_export_bytes_are_enforced_locally_and_kept_across_a_restart() {
    let sim = Simulator::spawn(sim(Duration::from_millis(50))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("usage.json");
    let state = format!("{{ file: {}, usage_sync_interval: 0s }}", ledger.display());
    // One export of 50 leads is more than the day allows.
    let bulk = "{ export_daily_bytes: 100, poll_pace: 50ms }";
    let proxy = app::spawn(config(&sim.url(), bulk, &state)).await.unwrap();
    support::wait_ready(&proxy).await;
    let crm = Integration::new(&proxy.url(), KEYS[0].1);
    assert_eq!(code(&crm.export().await), "ok");

    let creates = |sim: &marketo_proxy::sim::SimHandle| {
        sim.stats()
            .arrivals
            .iter()
            .filter(|arrival| arrival.target.ends_with("/create.json"))
            .count()
    };
    let warehouse = Integration::new(&proxy.url(), KEYS[1].1);
    let refused = warehouse
        .post("/bulk/v1/activities/export/create.json", json!({}))
        .await;
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(code(&refused), "1029", "{refused}");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Export daily quota exceeded")
    );
    assert!(
        (1..=25 * 3600).contains(&retry_after),
        "until the reset: {retry_after}"
    );
    assert_eq!(creates(&sim), 1, "the refused create never reached Marketo");
    let text = support::metrics_text(&proxy.admin_url()).await;
    assert_eq!(
        metric(&text, "marketo_proxy_bulk_export_bytes_remaining"),
        Some(0.0)
    );
    let crm_bytes = metric(
        &text,
        r#"marketo_proxy_bulk_export_bytes_total{service="crm-sync"}"#,
    )
    .unwrap();
    assert!(crm_bytes > 100.0, "{text}");

    proxy.shutdown().await.unwrap();
    let proxy = app::spawn(config(&sim.url(), bulk, &state)).await.unwrap();
    support::wait_ready(&proxy).await;
    let usage = support::usage(&proxy.admin_url()).await;
    assert_eq!(usage["bulk"]["services"]["crm-sync"]["jobs"], 1, "{usage}");
    assert_eq!(
        usage["bulk"]["services"]["crm-sync"]["export_bytes"].as_f64(),
        Some(crm_bytes)
    );
    assert_eq!(usage["bulk"]["export_bytes_remaining"], 0);
    let warehouse = Integration::new(&proxy.url(), KEYS[1].1);
    let refused: Value = warehouse
        .post("/bulk/v1/leads/export/create.json", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(code(&refused), "1029", "still spent after the restart");
    assert_eq!(creates(&sim), 1);
}

#[tokio::test]
async fn a_queue_filled_outside_the_proxy_is_waited_out_without_an_error_to_the_client() {
    let (sim, proxy) = start(
        Duration::from_millis(300),
        "{ poll_after: 300ms, poll_pace: 50ms, pause: 200ms }",
    )
    .await;

    // Another integration, straight to Marketo, fills the queue.
    let http = support::client();
    let demo = SimClient::demo();
    let token: Value = send_json(http.get(format!(
        "{}/identity/oauth/token?grant_type=client_credentials&client_id={}&client_secret={}",
        sim.url(),
        demo.client_id,
        demo.client_secret
    )))
    .await;
    let token = token["access_token"].as_str().unwrap().to_owned();
    for _ in 0..10 {
        let created = send_json(
            http.post(format!("{}/bulk/v1/leads/export/create.json", sim.url()))
                .bearer_auth(&token)
                .json(&json!({})),
        )
        .await;
        let id = created["result"][0]["exportId"].as_str().unwrap();
        let enqueued = send_json(
            http.post(format!("{}/bulk/v1/leads/export/{id}/enqueue.json", sim.url()))
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(code(&enqueued), "ok");
    }

    let crm = Integration::new(&proxy.url(), KEYS[0].1);
    let enqueued = crm.export().await;

    assert_eq!(code(&enqueued), "ok", "the client saw no error: {enqueued}");
    let stats = sim.stats();
    assert!(stats.code("1029") >= 1, "Marketo did say its queue was full");
    assert_eq!(stats.bulk.extract.completed, 11);
    let listed = stats
        .arrivals
        .iter()
        .any(|arrival| arrival.target.starts_with("/bulk/v1/leads/export.json"));
    assert!(listed, "the proxy read the queue's jobs again");
}

#[tokio::test]
async fn while_an_enqueue_waits_each_job_is_polled_once_a_poll_after_for_the_waiting_service() {
    // A tenth of the defaults: a job's status read at most once in 6 s,
    // one call of the proxy's own a second.
    let (sim, proxy) = start(Duration::from_secs(3), "{ poll_after: 6s, poll_pace: 1s }").await;
    // The warehouse fills the queue and never asks about its jobs.
    let warehouse = Integration::new(&proxy.url(), KEYS[1].1);
    for _ in 0..10 {
        let id = warehouse.create().await;
        assert_eq!(code(&warehouse.enqueue(&id).await), "ok");
    }
    // crm-sync's export waits for a place: the proxy learns of one from
    // its own status calls.
    let crm = Integration::new(&proxy.url(), KEYS[0].1);
    let id = crm.create().await;
    let enqueued = crm.enqueue(&id).await;
    assert_eq!(code(&enqueued), "ok", "{enqueued}");
    let stats = sim.stats();
    assert_eq!(stats.code("1029"), 0, "{:?}", stats.codes);
    let taken_at = stats
        .arrivals
        .iter()
        .find(|arrival| arrival.target.ends_with(&format!("{id}/enqueue.json")) && arrival.code == "ok")
        .map(|arrival| arrival.at)
        .unwrap();
    let polls = stats
        .arrivals
        .iter()
        .filter(|arrival| arrival.target.ends_with("/status.json") && arrival.at <= taken_at)
        .count();
    println!("{polls} status calls of the proxy's own while the enqueue waited");
    assert!(
        (1..=6).contains(&polls),
        "{polls} status calls while the enqueue waited"
    );
    // Made for the service that waited, and counted as its calls.
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    let crm_bulk = metric(
        &metrics,
        r#"marketo_proxy_upstream_calls_total{api="bulk",code="ok",service="crm-sync"}"#,
    )
    .unwrap_or(0.0);
    assert!(crm_bulk >= 2.0 + polls as f64, "{metrics}");
}

#[tokio::test]
async fn an_import_counts_as_a_job_of_the_service_that_started_it() {
    let (_sim, proxy) = start(Duration::from_millis(50), "{ poll_pace: 50ms }").await;
    let warehouse = Integration::new(&proxy.url(), KEYS[1].1);
    let imported: Value = warehouse
        .post("/bulk/v1/leads.json?format=csv", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(code(&imported), "ok", "{imported}");
    let usage = support::usage(&proxy.admin_url()).await;
    assert_eq!(usage["bulk"]["services"]["warehouse"]["jobs"], 1, "{usage}");
    assert_eq!(usage["bulk"]["services"]["crm-sync"]["jobs"], 0, "{usage}");
}

/// `state:` for a replica sharing `redis` under `prefix`.
fn shared_state(redis: &RedisServer, prefix: &str) -> String {
    format!(
        "{{ backend: redis, file: ~, usage_sync_interval: 0s, redis: {{ url: '{}', key_prefix: {prefix}, fallback_replicas: 2 }} }}",
        redis.url()
    )
}

/// Two replicas in front of `sim`, sharing `redis`.
async fn replicas(sim: &str, bulk: &str, redis: &RedisServer, prefix: &str) -> [RunningProxy; 2] {
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica = app::spawn(config(sim, bulk, &shared_state(redis, prefix)))
            .await
            .unwrap();
        support::wait_ready(&replica).await;
        replicas.push(replica);
    }
    replicas.try_into().unwrap_or_else(|_| unreachable!())
}

/// The `bulk` object of `/usage` once every replica reports the same one
/// and `check` accepts it.
async fn agreed_bulk_usage(replicas: &[RunningProxy], check: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(10), async || {
        let mut seen = Vec::new();
        for replica in replicas {
            let mut usage = support::usage(&replica.admin_url()).await["bulk"].take();
            // Jobs in the queue right now may differ for a moment.
            usage["extract_in_queue"].take();
            seen.push(usage);
        }
        if seen.windows(2).all(|pair| pair[0] == pair[1]) && check(&seen[0]) {
            Ok(seen.swap_remove(0))
        } else {
            Err(seen)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_keep_to_one_queue_and_report_the_same_usage() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(sim(Duration::from_millis(200))).await.unwrap();
    let replicas = replicas(
        &sim.url(),
        "{ poll_pace: 50ms, poll_after: 1s }",
        &redis,
        "queues",
    )
    .await;

    // Each service's five exports go half through one replica, half
    // through the other.
    fifteen_exports_at_once(&sim, &[replicas[0].url(), replicas[1].url()]).await;
    let stats = sim.stats();

    let exported = stats.bulk.export_bytes_today;
    let usage = agreed_bulk_usage(&replicas, |usage| usage["export_bytes"] == exported).await;
    let mut bytes = 0;
    for (name, _) in KEYS {
        assert_eq!(usage["services"][name]["jobs"], 5, "{usage}");
        bytes += usage["services"][name]["export_bytes"].as_u64().unwrap();
    }
    assert_eq!(bytes, exported, "{usage}");
    for replica in &replicas {
        let text = support::metrics_text(&replica.admin_url()).await;
        for (name, _) in KEYS {
            let series = format!(r#"marketo_proxy_bulk_export_bytes_total{{service="{name}"}}"#);
            assert_eq!(
                metric(&text, &series),
                usage["services"][name]["export_bytes"].as_f64(),
                "{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_goes_to_the_service_with_the_fewest_jobs_whichever_replica_it_waits_on() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(sim(Duration::from_millis(600))).await.unwrap();
    let [one, two] = replicas(
        &sim.url(),
        "{ poll_after: 300ms, poll_pace: 50ms }",
        &redis,
        "fair",
    )
    .await;
    // crm-sync fills the queue through one replica and waits there for
    // two places more; warehouse, with no job in the queue, waits on the
    // other replica.
    let crm = Integration::new(&one.url(), KEYS[0].1);
    for _ in 0..10 {
        let id = crm.create().await;
        assert_eq!(code(&crm.enqueue(&id).await), "ok");
    }
    let warehouse = Integration::new(&two.url(), KEYS[1].1);
    let (crm_ids, warehouse_id) = ([crm.create().await, crm.create().await], warehouse.create().await);
    let (crm_answers, warehouse_answer) = tokio::join!(
        futures_util::future::join_all(crm_ids.iter().map(|id| crm.enqueue(id))),
        warehouse.enqueue(&warehouse_id),
    );
    assert_eq!(code(&warehouse_answer), "ok", "{warehouse_answer}");
    for answer in &crm_answers {
        assert_eq!(code(answer), "ok", "{answer}");
    }
    let enqueued: Vec<String> = sim
        .stats()
        .arrivals
        .into_iter()
        .filter(|arrival| arrival.target.ends_with("/enqueue.json") && arrival.code == "ok")
        .map(|arrival| arrival.target)
        .collect();
    assert_eq!(enqueued.len(), 13);
    assert!(
        enqueued[10].contains(&warehouse_id),
        "the first place freed went to warehouse: {enqueued:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_bytes_downloaded_through_one_replica_count_on_the_other() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(sim(Duration::from_millis(50))).await.unwrap();
    // One export of 50 leads is more than the day allows.
    let [one, two] = replicas(
        &sim.url(),
        "{ export_daily_bytes: 100, poll_pace: 50ms }",
        &redis,
        "bytes",
    )
    .await;
    let crm = Integration::new(&one.url(), KEYS[0].1);
    assert_eq!(code(&crm.export().await), "ok");

    let warehouse = Integration::new(&two.url(), KEYS[1].1);
    let refused: Value = warehouse
        .post("/bulk/v1/leads/export/create.json", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(code(&refused), "1029", "{refused}");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Export daily quota exceeded")
    );
    let creates = sim
        .stats()
        .arrivals
        .iter()
        .filter(|arrival| arrival.target.ends_with("/create.json"))
        .count();
    assert_eq!(creates, 1, "the refused create never reached Marketo");
    let exported = sim.stats().bulk.export_bytes_today;
    let usage = agreed_bulk_usage(&[one, two], |usage| usage["export_bytes"] == exported).await;
    assert_eq!(usage["export_bytes_remaining"], 0, "{usage}");
    assert_eq!(usage["services"]["crm-sync"]["export_bytes"], exported, "{usage}");
    assert_eq!(usage["services"]["crm-sync"]["jobs"], 1, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_redis_keeps_to_its_share_and_counts_what_it_did_once() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(sim(Duration::from_millis(200))).await.unwrap();
    let replicas = replicas(
        &sim.url(),
        "{ poll_pace: 50ms, poll_after: 1s }",
        &redis,
        "outage",
    )
    .await;

    // Redis stops answering: seven exports through one replica, which
    // keeps to half of the queue (fallback_replicas: 2).
    redis.pause();
    let crm: Vec<Integration> = (0..7)
        .map(|_| Integration::new(&replicas[0].url(), KEYS[0].1))
        .collect();
    let answers = futures_util::future::join_all(crm.iter().map(Integration::export)).await;
    for answer in &answers {
        assert_eq!(code(answer), "ok", "{answer}");
    }
    let queue = sim.stats().bulk.extract;
    assert_eq!(queue.completed, 7);
    assert!(queue.max_in_queue <= 5, "its share of the queue: {queue:?}");

    // Back: what it did meanwhile is written once, and the other replica
    // reports it too.
    redis.resume();
    let usage = agreed_bulk_usage(&replicas, |usage| usage["services"]["crm-sync"]["jobs"] == 7).await;
    let exported = sim.stats().bulk.export_bytes_today;
    assert_eq!(usage["export_bytes"], exported, "{usage}");
    assert_eq!(usage["services"]["crm-sync"]["export_bytes"], exported, "{usage}");

    // Another outage, two exports through the other replica: added to
    // the first seven, which nobody counts again.
    redis.pause();
    let warehouse: Vec<Integration> = (0..2)
        .map(|_| Integration::new(&replicas[1].url(), KEYS[1].1))
        .collect();
    for answer in futures_util::future::join_all(warehouse.iter().map(Integration::export)).await {
        assert_eq!(code(&answer), "ok", "{answer}");
    }
    redis.resume();
    let usage = agreed_bulk_usage(&replicas, |usage| usage["services"]["warehouse"]["jobs"] == 2).await;
    assert_eq!(usage["services"]["crm-sync"]["jobs"], 7, "{usage}");
    assert_eq!(
        usage["export_bytes"],
        sim.stats().bulk.export_bytes_today,
        "{usage}"
    );
    assert_eq!(sim.stats().bulk.extract.completed, 9);
}
