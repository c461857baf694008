//! Replicas that behave as one proxy: behind a load balancer, an
//! unmodified Marketo client's token from one replica works on the others,
//! and a wrong credential from the balancer's address never locks out the
//! right ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::num::NonZeroU32;
use std::time::Duration;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::{Config, LimitsConfig};
use marketo_proxy::sim::{SimConfig, SimHandle, Simulator};
use serde_json::Value;
use support::redis::RedisServer;

const KEY: &str = "key-replicas-0123456789";
const CLIENT_ID: &str = "crm-client";
const CLIENT_SECRET: &str = "crm-client-secret-0123456789";
const TOKEN_KEY: &str = "0123456789abcdef0123456789abcdef-shared";

fn replica_config(sim_url: &str, redis_url: &str, token_key: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
services:
  - {{ name: crm-sync, api_key: {KEY}, client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET} }}
auth: {{ token_key: "{token_key}" }}
state:
  backend: redis
  file: ~
  usage_sync_interval: 0s
  redis: {{ url: "{redis_url}", key_prefix: replicas, fallback_replicas: 2 }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

/// A token from `replica`'s identity endpoint, asked as marketorestpython
/// and node-marketo-rest ask Marketo: a GET with the credentials in the
/// query. Answers the token and its `expires_in`.
async fn token_from(replica: &RunningProxy, secret: &str) -> (u16, Value) {
    let answer = support::client()
        .get(format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={secret}",
            replica.url()
        ))
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

/// A lead read through `replica` with `Authorization: Bearer token`.
async fn read_with(replica: &RunningProxy, token: &str) -> (u16, Value) {
    let answer = support::client()
        .get(format!("{}/rest/v1/lead/2.json", replica.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_replica_works_on_every_replica_until_the_key_changes() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let one = app::spawn(replica_config(&sim.url(), &redis.url(), TOKEN_KEY))
        .await
        .unwrap();
    let two = app::spawn(replica_config(&sim.url(), &redis.url(), TOKEN_KEY))
        .await
        .unwrap();

    // A round-robin balancer: the login lands on one replica, the calls
    // alternate.
    let (status, first) = token_from(&one, CLIENT_SECRET).await;
    assert_eq!(status, 200, "{first}");
    let token = first["access_token"].as_str().unwrap().to_owned();
    for replica in [&two, &one, &two, &one] {
        let (status, lead) = read_with(replica, &token).await;
        assert_eq!(status, 200, "{lead}");
        assert_eq!(lead["success"], true, "{lead}");
    }
    // Asking the other replica hands back the same token, as Marketo does.
    let (_, again) = token_from(&two, CLIENT_SECRET).await;
    assert_eq!(again["access_token"], token.as_str(), "{again}");
    assert!(again["expires_in"].as_u64().unwrap() <= first["expires_in"].as_u64().unwrap());
    assert_eq!(sim.stats().calls, 4);

    // A replica with another key (the key was rotated) knows none of the
    // old tokens: 601, and the client logs in again.
    let rotated = app::spawn(replica_config(
        &sim.url(),
        &redis.url(),
        "another-key-0123456789abcdef0123456789",
    ))
    .await
    .unwrap();
    let (status, refused) = read_with(&rotated, &token).await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["errors"][0]["code"], "601", "{refused}");
    let (status, fresh) = token_from(&rotated, CLIENT_SECRET).await;
    assert_eq!(status, 200, "{fresh}");
    assert_ne!(fresh["access_token"], token.as_str());
    let (status, lead) = read_with(&rotated, fresh["access_token"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{lead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_secret_behind_the_balancer_does_not_lock_out_the_right_one() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let replica = app::spawn(replica_config(&sim.url(), &redis.url(), TOKEN_KEY))
        .await
        .unwrap();
    // Everything arrives from the balancer's address: one integration
    // keeps logging in with an old secret...
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(token_from(&replica, "an-old-secret-0123456789").await.0);
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert!(statuses[10..].iter().all(|status| *status == 429), "{statuses:?}");
    // ...and the others, with the right ones, go on.
    let (status, answer) = token_from(&replica, CLIENT_SECRET).await;
    assert_eq!(status, 200, "{answer}");
    let (status, lead) = read_with(&replica, answer["access_token"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{lead}");
    let lead = support::send_json(
        support::client()
            .get(format!("{}/rest/v1/lead/3.json", replica.url()))
            .header("X-Api-Key", KEY),
    )
    .await;
    assert_eq!(lead["success"], true, "{lead}");
}

/// What the replicas hold in Redis under `prefix` right now: window slots
/// and concurrency leases still running, and the day's count.
async fn held_in_redis(redis: &RedisServer, prefix: &str) -> (u64, u64, u64) {
    let mut connection = redis.connection().await;
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut connection).await.unwrap();
    let now = seconds * 1000 + micros / 1000;
    let running = |key: String| {
        let mut connection = connection.clone();
        async move {
            redis::cmd("ZCOUNT")
                .arg(key)
                .arg(format!("({now}"))
                .arg("+inf")
                .query_async::<u64>(&mut connection)
                .await
                .unwrap()
        }
    };
    let window = running(format!("{{{prefix}}}:window")).await;
    let in_flight = running(format!("{{{prefix}}}:inflight")).await;
    let days = redis.day_counts(prefix, "total").await;
    assert!(days.len() <= 1, "{days:?}");
    (window, in_flight, days.iter().sum())
}

fn slow_config(sim_url: &str, redis_url: &str, prefix: &str) -> Config {
    let yaml = format!(
        r#"
marketo: {{ base_url: "{sim_url}", client_id: demo-client, client_secret: demo-secret }}
limits: {{ max_queue_wait: 10s }}
services:
  - {{ name: crm-sync, api_key: {KEY} }}
auth: {{ token_key: "{TOKEN_KEY}" }}
state:
  backend: redis
  file: ~
  usage_sync_interval: 0s
  redis: {{ url: "{redis_url}", key_prefix: {prefix}, fallback_replicas: 2 }}
"#
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

/// `count` reads at once, each of another lead (identical reads would
/// share one call).
async fn reads(replica: &RunningProxy, count: usize) {
    let calls = (0..count).map(|lead| {
        support::send_json(
            support::client()
                .get(format!("{}/rest/v1/lead/{}.json", replica.url(), lead + 1))
                .header("X-Api-Key", KEY),
        )
    });
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer["success"], true, "{answer}");
    }
}

async fn backend_up(replica: &RunningProxy) {
    support::eventually(Duration::from_secs(10), async || {
        let metrics = support::metrics_text(&replica.admin_url()).await;
        match support::metric(&metrics, "marketo_proxy_backend_up") {
            Some(1.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stalls_and_flaps_leaks_nothing_and_counts_every_call_once() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let replica = app::spawn(slow_config(&sim.url(), &redis.url(), "flaps"))
        .await
        .unwrap();
    support::wait_ready(&replica).await;
    reads(&replica, 3).await;
    backend_up(&replica).await;
    for _ in 0..3 {
        // Redis stops answering while acquisitions are on their way: they
        // time out, the replica goes on alone on its share, and when Redis
        // wakes up it runs the acquisitions it was sent, then their
        // releases.
        redis.pause();
        reads(&replica, 4).await;
        redis.resume();
        backend_up(&replica).await;
    }
    let calls = sim.stats().calls;
    assert_eq!(calls, 15);
    // Every call counted once, every slot held once, no lease left over
    // (a leaked one would run for its whole 30 s lease).
    let held = support::eventually(Duration::from_secs(5), async || {
        match held_in_redis(&redis, "flaps").await {
            held @ (window, 0, total) if window == calls && total == calls => Ok(held),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(held, (15, 0, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reads_marketos_usage_report_for_all_of_them() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    sim.simulator().add_foreign_usage("other@example.com", 1234);
    let config = || {
        let mut config = slow_config(&sim.url(), &redis.url(), "reconciler");
        config.state.usage_sync_interval = Duration::from_secs(10);
        config
    };
    let usage_calls = || {
        sim.stats()
            .arrivals
            .iter()
            .filter(|arrival| arrival.target.starts_with("/rest/v1/stats/usage.json"))
            .count()
    };
    let reported = async |replica: &RunningProxy| {
        support::eventually(Duration::from_secs(5), async || {
            let usage = support::usage(&replica.admin_url()).await;
            match usage["marketo_reported"]["total"].as_u64() {
                Some(total) => Ok(total),
                None => Err(usage),
            }
        })
        .await
    };
    let first = app::spawn(config()).await.unwrap();
    let total = reported(&first).await;
    assert!(total >= 1234, "{total}");
    let second = app::spawn(config()).await.unwrap();
    let third = app::spawn(config()).await.unwrap();
    assert_eq!(reported(&second).await, total);
    assert_eq!(reported(&third).await, total);
    assert_eq!(usage_calls(), 1, "the others took the report from Redis");
}

/// Another integration calls once a second. The replica that reads
/// Marketo's reports publishes what they show, and every replica keeps
/// the same 20 calls of each 20 s window free for it; both reports are
/// read once per interval, however many replicas there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_keeps_free_the_part_of_the_window_marketos_reports_show() {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let config = || {
        let mut config = slow_config(&sim.url(), &redis.url(), "reports");
        config.state.usage_sync_interval = Duration::from_secs(10);
        config
    };
    let simulator = sim.simulator().clone();
    let other = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            simulator.add_foreign_usage("other@example.com", 1);
        }
    });
    let replicas = [
        app::spawn(config()).await.unwrap(),
        app::spawn(config()).await.unwrap(),
    ];
    for replica in &replicas {
        let kept = support::eventually(Duration::from_secs(50), async || {
            let usage = support::usage(&replica.admin_url()).await;
            match usage["window"]["kept_free"].as_u64() {
                Some(kept) if kept > 0 => Ok(kept),
                _ => Err(usage),
            }
        })
        .await;
        assert!((18..=22).contains(&kept), "{kept} calls a window kept free");
        let usage = support::usage(&replica.admin_url()).await;
        assert_eq!(usage["window"]["limit"], 100 - kept, "{usage}");
    }
    other.abort();
    let reads = |path: &str| {
        let arrivals = sim.stats().arrivals;
        arrivals
            .iter()
            .filter(|arrival| arrival.target.starts_with(path))
            .count()
    };
    let (usage_reads, error_reads) = (
        reads("/rest/v1/stats/usage.json"),
        reads("/rest/v1/stats/errors.json"),
    );
    assert!(
        usage_reads <= 6 && error_reads >= 1,
        "{usage_reads} usage and {error_reads} error reports read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_limits_through_redis_over_tls_with_an_acl_user() {
    let pki = support::tls::Pki::new();
    let (cert, key) = pki.server_pem(support::tls::Validity::Current);
    let redis = RedisServer::start_tls(&cert, &key, "proxy", "redis-acl-password-0123");
    let sim = Simulator::spawn(support::sim_config()).await.unwrap();
    let url = format!("rediss://proxy:redis-acl-password-0123@127.0.0.1:{}", redis.port);
    let config = |ca_file: Option<&std::path::Path>| {
        let mut config = slow_config(&sim.url(), &url, "tls");
        if let Some(redis) = config.state.redis.as_mut() {
            redis.ca_file = ca_file.map(std::path::Path::to_path_buf);
        }
        config
    };
    let one = app::spawn(config(Some(&pki.ca_file()))).await.unwrap();
    let two = app::spawn(config(Some(&pki.ca_file()))).await.unwrap();
    backend_up(&one).await;
    backend_up(&two).await;
    reads(&one, 3).await;
    reads(&two, 2).await;
    // Both counted in the one day hash, which only the ACL user could write.
    let mut shared = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(pki.ca_file()).unwrap()),
        },
    )
    .unwrap()
    .get_multiplexed_async_connection()
    .await
    .unwrap();
    let days: Vec<String> = redis::cmd("KEYS")
        .arg("{tls}:day:*")
        .query_async(&mut shared)
        .await
        .unwrap();
    let total: u64 = redis::cmd("HGET")
        .arg(&days[0])
        .arg("total")
        .query_async(&mut shared)
        .await
        .unwrap();
    assert_eq!(total, 5);

    // Without the CA, Redis's certificate is not trusted: the replica
    // keeps to its share, and says so.
    let untrusting = app::spawn(config(None)).await.unwrap();
    reads(&untrusting, 1).await;
    let metrics = support::metrics_text(&untrusting.admin_url()).await;
    assert_eq!(support::metric(&metrics, "marketo_proxy_backend_up"), Some(0.0));
}

/// Redis loses everything: `restart`, restarted without persistence,
/// which drops the replicas' connections; otherwise `FLUSHALL`, as after a
/// failover to an empty node, which keeps them.
async fn lose_data(redis: RedisServer, restart: bool) -> RedisServer {
    if restart {
        let port = redis.stop();
        return RedisServer::start_on(port);
    }
    let mut connection = redis.connection().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    redis
}

/// Redis, the simulator (`sim`) and two replicas in front of it that
/// share its limits (`limits` changes them) through Redis under `prefix`,
/// both in touch with Redis.
async fn two_replicas(
    sim: SimConfig,
    prefix: &str,
    limits: impl Fn(&mut LimitsConfig),
) -> (RedisServer, SimHandle, RunningProxy, RunningProxy) {
    let redis = RedisServer::start();
    let sim = Simulator::spawn(sim).await.unwrap();
    let config = || {
        let mut config = slow_config(&sim.url(), &redis.url(), prefix);
        config.limits.max_queue_wait = Duration::from_secs(30);
        limits(&mut config.limits);
        config
    };
    let one = app::spawn(config()).await.unwrap();
    let two = app::spawn(config()).await.unwrap();
    backend_up(&one).await;
    backend_up(&two).await;
    (redis, sim, one, two)
}

/// Replica one fills most of the window; Redis then loses everything;
/// replica two, asking at once, must not take the window for empty before
/// replica one has written its slots again.
async fn the_window_survives_redis_losing_its_data(restart: bool) {
    let sim = SimConfig {
        window_calls: 10,
        window: Duration::from_secs(5),
        ..support::sim_config()
    };
    let (redis, sim, one, two) = two_replicas(sim, "empty", |limits| {
        limits.window_calls = NonZeroU32::new(10).unwrap();
        limits.window = Duration::from_secs(5);
    })
    .await;
    // Both have been busy: each knows how full the instance is.
    reads(&two, 1).await;
    reads(&one, 8).await;
    let _redis = lose_data(redis, restart).await;
    reads(&two, 10).await;
    let stats = sim.stats();
    assert_eq!(stats.calls, 19, "{:?}", stats.codes);
    assert!(
        stats.max_in_window <= 10,
        "{} calls in one window",
        stats.max_in_window
    );
    assert_eq!(stats.code("606"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_learns_the_window_again_from_the_replicas() {
    the_window_survives_redis_losing_its_data(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_without_a_restart_learns_the_window_again() {
    the_window_survives_redis_losing_its_data(false).await;
}

/// Replica one has two calls running at Marketo when Redis loses
/// everything; replica two must wait for them rather than take their
/// concurrency while replica one's leases are missing (a lease is renewed
/// only every third of its lifetime).
async fn leases_survive_redis_losing_its_data(restart: bool) {
    let sim = SimConfig {
        concurrency: 2,
        latency: Duration::from_secs(3),
        ..support::sim_config()
    };
    let (redis, sim, one, two) = two_replicas(sim, "leases", |limits| {
        limits.concurrency = NonZeroU32::new(2).unwrap();
    })
    .await;
    // Other leads than the reads below: identical reads share one call.
    let running: Vec<_> = [101, 102]
        .into_iter()
        .map(|lead| {
            let url = format!("{}/rest/v1/lead/{lead}.json", one.url());
            tokio::spawn(support::send_json(
                support::client().get(url).header("X-Api-Key", KEY),
            ))
        })
        .collect();
    support::eventually(Duration::from_secs(5), async || match sim.stats().in_flight {
        2 => Ok(()),
        other => Err(other),
    })
    .await;
    let _redis = lose_data(redis, restart).await;
    reads(&two, 2).await;
    for call in running {
        let answer = call.await.unwrap();
        assert_eq!(answer["success"], true, "{answer}");
    }
    let stats = sim.stats();
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    assert_eq!((stats.calls, stats.max_in_flight), (4, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_learns_the_calls_in_flight_again() {
    leases_survive_redis_losing_its_data(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_without_a_restart_learns_the_calls_in_flight_again() {
    leases_survive_redis_losing_its_data(false).await;
}
