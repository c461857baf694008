//! Several replicas in front of one Marketo instance share its limits
//! through a real `redis-server` (started here on an ephemeral port): the
//! simulator must never see the window, the concurrency limit or the
//! quota exceeded, whichever replica the calls went through; with Redis
//! gone each replica keeps to its fallback share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::Config;
use marketo_proxy::sim::{SimConfig, SimHandle, Simulator};
use serde_json::Value;
use support::redis::RedisServer;

const KEY: &str = "key-shared-0123456789";

fn replica_config(sim_url: &str, redis_url: &str, limits: &str, prefix: &str) -> Config {
    replica_config_of(sim_url, redis_url, limits, prefix, 2)
}

/// The same, for `replicas` replicas.
fn replica_config_of(sim_url: &str, redis_url: &str, limits: &str, prefix: &str, replicas: u32) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits:
{limits}
services:
  - {{ name: integration, api_key: {KEY} }}
# The same read fired many times at once is the load: each one a call.
coalesce_reads: false
state:
  backend: redis
  file: ~
  usage_sync_interval: 0s
  redis: {{ url: "{redis_url}", key_prefix: "{prefix}", fallback_replicas: {replicas} }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

/// Two proxies in front of the simulator at `sim_url`, sharing `redis`.
async fn two_replicas(
    sim_url: &str,
    redis: &RedisServer,
    limits: &str,
    prefix: &str,
) -> (RunningProxy, RunningProxy) {
    let first = app::spawn(replica_config(sim_url, &redis.url(), limits, prefix))
        .await
        .unwrap();
    let second = app::spawn(replica_config(sim_url, &redis.url(), limits, prefix))
        .await
        .unwrap();
    (first, second)
}

/// A simulator that answers at once and allows 10 calls in `window`.
async fn quick_sim(window: Duration) -> SimHandle {
    Simulator::spawn(SimConfig {
        window_calls: 10,
        window,
        latency: Duration::ZERO,
        ..support::sim_config()
    })
    .await
    .unwrap()
}

/// The simulator's stats, once checked that it never saw more than 10
/// calls in one window nor answered 606.
fn window_kept(sim: &SimHandle) -> marketo_proxy::sim::Stats {
    let stats = sim.stats();
    assert_eq!(stats.code("606"), 0, "{:?}", stats.codes);
    assert!(
        stats.max_in_window <= 10,
        "{} calls in one window",
        stats.max_in_window
    );
    stats
}

/// Waits until `proxy` says it shares the limits through Redis (`up`) or
/// keeps to its share.
async fn backend_up(proxy: &RunningProxy, up: bool) {
    let expected = if up { 1.0 } else { 0.0 };
    support::eventually(Duration::from_secs(5), async || {
        let metrics = support::metrics_text(&proxy.admin_url()).await;
        match support::metric(&metrics, "marketo_proxy_backend_up") {
            Some(value) if value == expected => Ok(()),
            value => Err(format!("marketo_proxy_backend_up {value:?}")),
        }
    })
    .await;
}

/// Waits until `replica` has `calls` calls in flight (admitted here, at
/// Marketo or waiting for the shared limits).
async fn in_flight_becomes(replica: &RunningProxy, calls: f64) {
    support::eventually(Duration::from_secs(5), async || {
        let metrics = support::metrics_text(&replica.admin_url()).await;
        match support::metric(&metrics, "marketo_proxy_inflight") {
            Some(value) if value == calls => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// Fires `count` requests at once, spread over the replicas; returns the
/// (HTTP status, Marketo success, error code) of each.
async fn fire(replicas: &[&RunningProxy], count: usize) -> Vec<(u16, bool, String)> {
    let http = support::client();
    let mut calls = Vec::new();
    for index in 0..count {
        let url = format!("{}/rest/v1/lead/1.json", replicas[index % replicas.len()].url());
        let http = http.clone();
        calls.push(tokio::spawn(async move {
            let answer = http.get(url).header("X-Api-Key", KEY).send().await.unwrap();
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap();
            let code = body["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
            (status, body["success"] == true, code)
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_window() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(SimConfig {
        window_calls: 10,
        window: Duration::from_secs(2),
        latency: Duration::from_millis(20),
        ..support::sim_config()
    })
    .await
    .unwrap();
    let limits = "  window_calls: 10\n  window: 2s\n  safety_margin: 100ms\n  max_queue_wait: 20s";
    let (first, second) = two_replicas(&sim.url(), &redis, limits, "window").await;
    let answers = fire(&[&first, &second], 30).await;
    assert!(
        answers.iter().all(|(status, ok, _)| *status == 200 && *ok),
        "{answers:?}"
    );
    let stats = window_kept(&sim);
    assert_eq!(stats.ok, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_concurrency_limit() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(SimConfig {
        concurrency: 3,
        latency: Duration::from_millis(150),
        ..support::sim_config()
    })
    .await
    .unwrap();
    let limits = "  concurrency: 3\n  max_queue_wait: 20s";
    let (first, second) = two_replicas(&sim.url(), &redis, limits, "concurrency").await;
    let answers = fire(&[&first, &second], 16).await;
    assert!(answers.iter().all(|(_, ok, _)| *ok), "{answers:?}");
    let stats = sim.stats();
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    assert_eq!(stats.max_in_flight, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_daily_quota() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let limits = "  daily_quota: 10";
    let (first, second) = two_replicas(&sim.url(), &redis, limits, "quota").await;
    let answers = fire(&[&first, &second], 16).await;
    let ok = answers.iter().filter(|(_, ok, _)| *ok).count();
    let refused = answers.iter().filter(|(_, _, code)| code == "607").count();
    assert_eq!((ok, refused), (10, 6), "{answers:?}");
    assert_eq!(sim.stats().calls, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_replica_keeps_to_its_share_and_comes_back_when_it_returns() {
    let port = support::redis::free_port();
    let sim = quick_sim(Duration::from_secs(2)).await;
    let limits = "  window_calls: 10\n  window: 2s\n  safety_margin: 100ms\n  max_queue_wait: 500ms";
    let url = format!("redis://127.0.0.1:{port}");
    let proxy = app::spawn(replica_config(&sim.url(), &url, limits, "fallback"))
        .await
        .unwrap();
    // Redis is not there: 1/2 of the window (5 calls) for this replica.
    let answers = fire(&[&proxy], 10).await;
    let ok = answers.iter().filter(|(_, ok, _)| *ok).count();
    assert_eq!(ok, 5, "{answers:?}");
    assert!(
        answers
            .iter()
            .filter(|(_, ok, _)| !ok)
            .all(|(_, _, code)| code == "606")
    );
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    assert_eq!(support::metric(&metrics, "marketo_proxy_backend_up"), Some(0.0));
    assert_eq!(support::metric(&metrics, "marketo_proxy_window_limit"), Some(5.0));

    // Redis starts: the replica writes what it did and shares again.
    let redis = RedisServer::start_on(port);
    backend_up(&proxy, true).await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_redis_falls_back_to_its_share() {
    let redis = RedisServer::start();
    let sim = quick_sim(Duration::from_secs(2)).await;
    // Noticing that Redis is gone can take up to its 500 ms timeout: the
    // queue wait leaves room for that.
    let limits = "  window_calls: 10\n  window: 2s\n  safety_margin: 100ms\n  max_queue_wait: 5s";
    let proxy = app::spawn(replica_config(&sim.url(), &redis.url(), limits, "lost"))
        .await
        .unwrap();
    assert!(fire(&[&proxy], 1).await[0].1);
    redis.stop();
    // Calls admitted under the full limits when Redis went away are
    // admitted again under the share: never more than this replica's half
    // of the window (5) in any window, the call above included (less the
    // calls the other replica may have made since it last asked).
    let answers = fire(&[&proxy], 10).await;
    let ok = answers.iter().filter(|(_, ok, _)| *ok).count();
    assert!(ok >= 3, "{answers:?}");
    assert!(
        answers.iter().all(|(_, ok, code)| *ok || code == "606"),
        "{answers:?}"
    );
    let most = sim.stats().max_in_window;
    assert!((4..=5).contains(&most), "{most} calls in one window");
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    assert_eq!(support::metric(&metrics, "marketo_proxy_backend_up"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_lose_redis_after_a_full_window_serve_their_requests_as_its_slots_free() {
    // Each replica's part of the window grows as the slots it saw free:
    // the replicas that made none of the window's calls get theirs one
    // window after the loss, not after every call could be over.
    // Marketo's real limits, 50 ms a call; three replicas.
    let redis = RedisServer::start();
    let sim = Simulator::spawn(SimConfig {
        latency: Duration::from_millis(50),
        ..support::sim_config()
    })
    .await
    .unwrap();
    let limits = "  max_queue_wait: 90s";
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let config = replica_config_of(&sim.url(), &redis.url(), limits, "outage-load", 3);
        replicas.push(app::spawn(config).await.unwrap());
    }
    // A full window, all of it through the first replica; the others each
    // have a request waiting for the window meanwhile, so they know how
    // full it is.
    let answers = fire(&[&replicas[0]], 100).await;
    assert!(answers.iter().all(|(_, ok, _)| *ok), "{answers:?}");
    let waiting: Vec<_> = replicas[1..]
        .iter()
        .map(|replica| {
            let request = support::client()
                .get(format!("{}/rest/v1/lead/2.json", replica.url()))
                .header("X-Api-Key", KEY)
                .send();
            tokio::spawn(async move { request.await.unwrap().json::<Value>().await.unwrap() })
        })
        .collect();
    for replica in &replicas[1..] {
        in_flight_becomes(replica, 1.0).await;
    }
    redis.stop();
    // Ten more at each, from clients that wait a minute.
    let lost_at = tokio::time::Instant::now();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut calls = Vec::new();
    for replica in &replicas {
        for _ in 0..10 {
            let request = http
                .get(format!("{}/rest/v1/lead/1.json", replica.url()))
                .header("X-Api-Key", KEY)
                .send();
            calls.push(tokio::spawn(async move {
                match request.await {
                    Ok(answer) => answer.json::<Value>().await.unwrap()["success"] == true,
                    Err(_) => false,
                }
            }));
        }
    }
    let mut served = 0;
    for call in calls {
        served += usize::from(call.await.unwrap());
    }
    for call in waiting {
        let answer = call.await.unwrap();
        assert_eq!(answer["success"], true, "{answer}");
    }
    println!(
        "after losing Redis: {served} of 30 served in {:.1} s",
        lost_at.elapsed().as_secs_f64()
    );
    assert_eq!(served, 30);
    let stats = sim.stats();
    assert_eq!(stats.code("606") + stats.code("615"), 0, "{:?}", stats.codes);
    assert!(
        stats.max_in_window <= 100,
        "{} calls in one window",
        stats.max_in_window
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_the_shared_window_when_redis_goes_away_wait_for_the_share() {
    let redis = RedisServer::start();
    let sim = quick_sim(Duration::from_secs(4)).await;
    let limits = "  window_calls: 10\n  window: 4s\n  safety_margin: 100ms\n  max_queue_wait: 20s";
    let (first, second) = two_replicas(&sim.url(), &redis, limits, "waiting").await;
    // The window is full: half of it each.
    assert!(fire(&[&first], 5).await.iter().all(|(_, ok, _)| *ok));
    assert!(fire(&[&second], 5).await.iter().all(|(_, ok, _)| *ok));
    // Three more wait at the second for the shared window to free.
    let url = format!("{}/rest/v1/lead/1.json", second.url());
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let (http, url) = (support::client(), url.clone());
            tokio::spawn(async move {
                let answer = http.get(url).header("X-Api-Key", KEY).send().await.unwrap();
                answer.json::<Value>().await.unwrap()
            })
        })
        .collect();
    in_flight_becomes(&second, 3.0).await;
    // Redis goes away: they were admitted under the shared limits and hold
    // nothing there, so they wait for room in the second's share (its own
    // five slots: nothing was left), not go out at once.
    redis.stop();
    for call in waiting {
        let answer = call.await.unwrap();
        assert_eq!(answer["success"], true, "{answer}");
    }
    window_kept(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_replica_back_from_an_outage_waits_for_the_calls_the_others_made_meanwhile() {
    let redis = RedisServer::start_with_users(&[("one", "password-one-0123"), ("two", "password-two-0123")]);
    let sim = Simulator::spawn(SimConfig {
        concurrency: 2,
        latency: Duration::from_secs(3),
        ..support::sim_config()
    })
    .await
    .unwrap();
    let limits = "  concurrency: 2\n  max_queue_wait: 30s";
    let replica = |user: &str| {
        let url = format!("redis://{user}:password-{user}-0123@127.0.0.1:{}", redis.port);
        app::spawn(replica_config(&sim.url(), &url, limits, "outage"))
    };
    let (one, two) = (replica("one").await.unwrap(), replica("two").await.unwrap());
    backend_up(&one, true).await;
    backend_up(&two, true).await;
    // Both lose Redis; the second makes a call on its share (one of the
    // two slots), which Redis cannot know of.
    redis.shut_out("one", true).await;
    redis.shut_out("two", true).await;
    backend_up(&one, false).await;
    backend_up(&two, false).await;
    let url = format!("{}/rest/v1/lead/1.json", two.url());
    let running = tokio::spawn(support::send_json(
        support::client().get(url).header("X-Api-Key", KEY),
    ));
    support::eventually(Duration::from_secs(5), async || match sim.stats().in_flight {
        1 => Ok(()),
        other => Err(other),
    })
    .await;
    // The first is back, the second a moment later (its next attempt):
    // until the second has written its call, the first must not take its
    // slot for free.
    redis.shut_out("one", false).await;
    backend_up(&one, true).await;
    redis.shut_out("two", false).await;
    let answers = fire(&[&one], 2).await;
    assert!(answers.iter().all(|(_, ok, _)| *ok), "{answers:?}");
    let answer = running.await.unwrap();
    assert_eq!(answer["success"], true, "{answer}");
    let stats = sim.stats();
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    assert_eq!(stats.max_in_flight, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_leases_lapse_while_a_running_call_keeps_its_own() {
    use marketo_proxy::admission::Admission;
    use marketo_proxy::admission::shared::{Grant, SharedLimits};
    use marketo_proxy::metrics::Metrics;
    use std::sync::Arc;

    let redis = RedisServer::start();
    let mut config = replica_config("http://127.0.0.1:1", &redis.url(), "  concurrency: 2", "leases");
    if let Some(redis) = config.state.redis.as_mut() {
        redis.lease = Duration::from_secs(1);
    }
    let redis_config = config.state.redis.clone().unwrap();
    let replica = |metrics: Metrics| {
        let admission = Admission::new(&config, metrics.clone());
        let shared = SharedLimits::new(
            &config,
            &redis_config,
            metrics,
            admission.marketo_day().clone(),
            marketo_proxy::tasks::Tasks::new(),
        )
        .unwrap();
        (admission, shared)
    };
    let (living_admission, living) = replica(Metrics::new());
    let (crashed_admission, crashed) = replica(Metrics::new());
    living.connect(&living_admission).await;
    crashed.connect(&crashed_admission).await;
    assert!(living.is_up() && crashed.is_up());
    // Only the living replica renews its leases.
    let _maintenance = tokio::spawn(living.maintenance(Arc::clone(&living_admission)));
    // Admitted here: what the acquisitions below are asked for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let living_permit = living_admission.admit(0, deadline, false).await.unwrap();
    let crashed_permit = crashed_admission.admit(0, deadline, false).await.unwrap();

    // The crashed replica took a slot and will never give it back (as
    // soon as Redis, new here, grants anything).
    let lease = support::eventually(Duration::from_secs(5), async || {
        match crashed.acquire(0, &crashed_permit, &crashed_admission).await {
            Grant::Granted(lease) => Ok(lease),
            _ => Err("the first slot is not granted"),
        }
    })
    .await;
    std::mem::forget(lease);
    let running = match living.acquire(0, &living_permit, &living_admission).await {
        Grant::Granted(lease) => lease,
        _ => panic!("the second slot is free"),
    };
    assert!(matches!(
        living.acquire(0, &living_permit, &living_admission).await,
        Grant::Wait(_)
    ));

    // After the lease's lifetime the crashed replica's slot is free again;
    // the running call renewed its own. A fixed wait on purpose: polling
    // for the first free slot would stop as soon as the crashed lease
    // lapses, before an unrenewed running lease would lapse too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = match living.acquire(0, &living_permit, &living_admission).await {
        Grant::Granted(lease) => lease,
        _ => panic!("the crashed replica's lease should have lapsed"),
    };
    assert!(
        matches!(
            living.acquire(0, &living_permit, &living_admission).await,
            Grant::Wait(_)
        ),
        "the running call kept its lease"
    );
    drop((running, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_named_like_the_day_hashs_own_fields_do_not_touch_them() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let yaml = format!(
        r#"
marketo: {{ base_url: "{}", client_id: demo-client, client_secret: demo-secret }}
limits: {{ daily_quota: 8 }}
services:
  - {{ name: spent, api_key: key-spent-0123456789 }}
  - {{ name: total, api_key: key-total-0123456789 }}
  - {{ name: foreign, api_key: key-foreign-0123456789 }}
state:
  backend: redis
  file: ~
  usage_sync_interval: 0s
  redis: {{ url: "{}", key_prefix: "names", fallback_replicas: 2 }}
"#,
        sim.url(),
        redis.url()
    );
    let proxy = app::spawn(Config::from_yaml_with_env(&yaml, |_| None).unwrap())
        .await
        .unwrap();
    support::wait_ready(&proxy).await;
    let http = support::client();
    // Each service calls twice: a field written by the first call must not
    // spend the day, swell the total or count as calls from outside.
    for _ in 0..2 {
        for name in ["spent", "total", "foreign"] {
            let answer: Value = http
                .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
                .header("X-Api-Key", format!("key-{name}-0123456789"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["success"], true, "{name}: {answer}");
        }
    }
    assert_eq!(sim.stats().ok, 6);
    let usage = support::usage(&proxy.admin_url()).await;
    assert_eq!(usage["remaining"], 2, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_607_on_one_replica_holds_every_replica_until_a_probe() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let (first, second) = two_replicas(&sim.url(), &redis, "  quota_probe_interval: 2s", "probe").await;
    support::wait_ready(&first).await;
    support::wait_ready(&second).await;
    sim.inject(support::fail_next(1, "607"));
    let answers = fire(&[&first], 1).await;
    assert_eq!(answers[0].2, "607");
    // The other replica learns it through Redis: refused without a call.
    let answers = fire(&[&second], 1).await;
    assert_eq!(answers[0].2, "607", "{answers:?}");
    assert_eq!(sim.stats().calls, 1);
    // After the probe time a call goes through, and then every replica.
    support::eventually(Duration::from_secs(5), async || {
        let answers = fire(&[&second], 1).await;
        if answers[0].1 { Ok(()) } else { Err(answers) }
    })
    .await;
    // Its probe cleared the day for every replica: well before another
    // probe interval, calls flow again.
    support::eventually(Duration::from_secs(1), async || {
        let answers = fire(&[&second], 4).await;
        if answers.iter().all(|(_, success, _)| *success) {
            Ok(())
        } else {
            Err(answers)
        }
    })
    .await;
    // The replica that met the 607 probes once more on its own.
    support::eventually(Duration::from_secs(5), async || {
        let answers = fire(&[&first, &second], 4).await;
        if answers.iter().all(|(_, success, _)| *success) {
            Ok(())
        } else {
            Err(answers)
        }
    })
    .await;
    let stats = sim.stats();
    assert_eq!(
        stats.code("607"),
        1,
        "Marketo was asked nothing while the day was held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_reader_keeps_its_lock_and_another_replica_takes_over_when_it_lapses() {
    use marketo_proxy::admission::shared::SharedLimits;
    use marketo_proxy::metrics::Metrics;
    use marketo_proxy::usage_sync::Election;
    use std::sync::Arc;

    let redis = RedisServer::start();
    let config = replica_config(
        "http://127.0.0.1:1",
        &redis.url(),
        "  window_calls: 100",
        "reader",
    );
    let redis_config = config.state.redis.clone().unwrap();
    let replica = || {
        let day = marketo_proxy::limits::day::MarketoDay::new(config.limits.timezone);
        SharedLimits::new(
            &config,
            &redis_config,
            Metrics::new(),
            day,
            marketo_proxy::tasks::Tasks::new(),
        )
        .unwrap()
    };
    let (reader, other) = ((replica(), Election::new()), (replica(), Election::new()));
    let hold = Duration::from_millis(300);
    let lead = async |(limits, election): &(Arc<SharedLimits>, Election)| election.lead(limits, hold).await;
    assert_eq!(lead(&reader).await, Some(true));
    assert_eq!(lead(&other).await, Some(false));
    // The reader renews it at each interval and stays the reader.
    assert_eq!(lead(&reader).await, Some(true));
    assert_eq!(lead(&other).await, Some(false));
    // The reader is gone (no more renewals): the lock lapses, and the
    // other replica takes over, which the old reader then cannot.
    support::eventually(Duration::from_secs(3), async || match lead(&other).await {
        Some(true) => Ok(()),
        other => Err(other),
    })
    .await;
    assert_eq!(lead(&reader).await, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_is_counted_as_a_bug_and_does_not_start_the_fallback() {
    use redis::AsyncCommands;

    let redis = RedisServer::start();
    let sim = quick_sim(Duration::from_secs(2)).await;
    let limits = "  window_calls: 10\n  window: 2s\n  max_queue_wait: 1s";
    let proxy = app::spawn(replica_config(&sim.url(), &redis.url(), limits, "bug"))
        .await
        .unwrap();
    backend_up(&proxy, true).await;
    // The shared window turned into a string: every acquire script fails
    // on it, while Redis itself answers.
    let mut connection = redis.connection().await;
    let _: () = connection.set("{bug}:window", "not a sorted set").await.unwrap();

    let answers = fire(&[&proxy], 1).await;
    assert!(!answers[0].1, "no call can be admitted: {answers:?}");
    assert_eq!(answers[0].2, "606", "refused at its deadline: {answers:?}");
    let metrics = support::metrics_text(&proxy.admin_url()).await;
    let errors = support::metric(
        &metrics,
        r#"marketo_proxy_backend_script_errors_total{script="acquire"}"#,
    );
    assert!(errors.is_some_and(|errors| errors >= 1.0), "{errors:?}");
    assert_eq!(support::metric(&metrics, "marketo_proxy_backend_up"), Some(1.0));
    assert_eq!(sim.stats().calls, 0, "nothing went to Marketo");

    // Mended, calls go through on the shared limits again (once the new
    // Redis has settled: it grants nothing for its first 2 s).
    let _: () = connection.del("{bug}:window").await.unwrap();
    support::eventually(Duration::from_secs(5), async || {
        let answers = fire(&[&proxy], 1).await;
        if answers[0].1 {
            Ok(())
        } else {
            Err(format!("{answers:?}"))
        }
    })
    .await;
    assert_eq!(sim.stats().calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_while_redis_was_away_count_to_the_day_they_were_made_on() {
    use marketo_proxy::admission::Admission;
    use marketo_proxy::admission::shared::{Grant, SharedLimits};
    use marketo_proxy::limits::day::{MarketoDay, WallClock};
    use marketo_proxy::metrics::Metrics;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    let port = support::redis::free_port();
    let redis = RedisServer::start_on(port);
    // A window of 1 s: what the replica did not see of it is free soon.
    let limits = "  timezone: UTC\n  window: 1s\n  safety_margin: 50ms";
    let config = replica_config("http://127.0.0.1:1", &redis.url(), limits, "midnight");
    // Ten seconds before midnight, UTC, on a clock the test moves.
    let midnight = chrono::DateTime::parse_from_rfc3339("2026-12-05T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let offset = Arc::new(AtomicI64::new(
        (midnight - chrono::Duration::seconds(10) - chrono::Utc::now()).num_milliseconds(),
    ));
    let clock: WallClock = {
        let offset = Arc::clone(&offset);
        Arc::new(move || chrono::Utc::now() + chrono::Duration::milliseconds(offset.load(Ordering::Relaxed)))
    };
    let metrics = Metrics::new();
    let admission = Admission::with_clock(&config, metrics.clone(), Arc::clone(&clock));
    let _timer = tokio::spawn(admission.timer());
    let shared = SharedLimits::new(
        &config,
        config.state.redis.as_ref().unwrap(),
        metrics,
        MarketoDay::with_clock(chrono_tz::UTC, clock),
        marketo_proxy::tasks::Tasks::new(),
    )
    .unwrap();
    shared.connect(&admission).await;
    assert!(shared.is_up());
    redis.stop();
    // One call before midnight and one after, each on this replica's own
    // share while Redis is away.
    let mut calls = 0;
    for day in 0..2 {
        if day == 1 {
            offset.fetch_add(20_000, Ordering::Relaxed);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let permit = admission.admit(0, deadline, false).await.unwrap();
            let grant = shared.acquire(0, &permit, &admission).await;
            match grant {
                Grant::Granted(lease) => {
                    drop(lease);
                    calls += 1;
                    break;
                }
                _ => permit.unsent(),
            }
        }
    }
    assert_eq!(calls, 2);
    assert!(!shared.is_up());
    // Redis is back: each call is counted to its own day.
    let redis = RedisServer::start_on(port);
    support::eventually(Duration::from_secs(5), async || {
        shared.connect(&admission).await;
        if shared.is_up() {
            Ok(())
        } else {
            Err("Redis still away")
        }
    })
    .await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    for day in ["2026-12-04", "2026-12-05"] {
        let total: Option<u64> = ::redis::cmd("HGET")
            .arg(format!("{{midnight}}:day:{day}"))
            .arg("total")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(total, Some(1), "{day}");
    }
}
