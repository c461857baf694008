//! Replicas that behave as one proxy: behind a load balancer, an
//! unmodified Marketo client's token from one replica works on the others,
//! and a wrong credential from the balancer's address never locks out the
//! right ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::config::Config;
use marketo_proxy::sim::Simulator;
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
