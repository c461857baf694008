//! End-to-end: the `RateLimit-Policy` and `RateLimit` fields every answer
//! carries, against what admission counted at the moment of the answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::num::{NonZeroU32, NonZeroU64};

use marketo_proxy::sim::{FailNext, Failure, Faults, PADDING_HEADER};
use serde_json::Value;
use support::{CRM_KEY, Stack, WAREHOUSE_KEY};

fn field(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
}

/// The `r` of policy `name` in a `RateLimit` field.
fn remaining(limit: &str, name: &str) -> u64 {
    let item = limit
        .split(", ")
        .find(|item| item.starts_with(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no {name} in {limit}"));
    item.split(';')
        .find_map(|param| param.strip_prefix("r="))
        .unwrap()
        .parse()
        .unwrap()
}

/// crm-sync may make 50 calls per window and 40 a day; warehouse has
/// the instance's limits, less crm-sync's reserve of 10.
async fn capped_stack(ratelimit_headers: bool) -> Stack {
    Stack::start_configured(support::sim_config(), |sim_url| {
        let mut config = support::proxy_config(sim_url, "");
        config.limits.ratelimit_headers = ratelimit_headers;
        config.services[0].window_calls = NonZeroU32::new(50);
        config.services[0].daily_quota = NonZeroU64::new(40);
        config.services[0].reserved_daily = 10;
        config.validate().expect("valid config")
    })
    .await
}

#[tokio::test]
async fn answers_tell_each_service_what_it_has_left_of_the_window_and_the_day() {
    let stack = capped_stack(true).await;
    let mut last = None;
    for id in 1..=30 {
        let answer = stack.get(CRM_KEY, &format!("/rest/v1/lead/{id}.json")).await;
        assert_eq!(answer.status(), 200);
        last = Some(answer);
    }
    let last = last.unwrap();
    // Its own caps, as configured.
    assert_eq!(
        field(&last, "ratelimit-policy").as_deref(),
        Some(r#""window";q=50;w=20, "day";q=40;w=86400"#)
    );
    // 30 of its 50 per window used, 30 of its 40 a day.
    let limit = field(&last, "ratelimit").unwrap();
    assert_eq!(remaining(&limit, "window"), 20, "{limit}");
    assert_eq!(remaining(&limit, "day"), 10, "{limit}");
    let usage = support::usage(&stack.proxy.admin_url()).await;
    assert_eq!(usage["services"][0]["used"], 30, "{usage}");
    assert_eq!(usage["window"]["used"], 30, "{usage}");

    // warehouse has the instance's window, of which 31 are used now, and
    // the day less crm-sync's reserve (spent already).
    let answer = stack.get(WAREHOUSE_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(
        field(&answer, "ratelimit-policy").as_deref(),
        Some(r#""window";q=100;w=20, "day";q=50000;w=86400"#)
    );
    let limit = field(&answer, "ratelimit").unwrap();
    assert_eq!(remaining(&limit, "window"), 100 - 31, "{limit}");
    assert_eq!(remaining(&limit, "day"), 50_000 - 31, "{limit}");
    let t = limit
        .split(", ")
        .next()
        .and_then(|item| item.split(';').find_map(|param| param.strip_prefix("t=")))
        .unwrap();
    let t: u64 = t.parse().unwrap();
    assert!((1..=21).contains(&t), "a slot frees within the window: {limit}");
}

#[tokio::test]
async fn the_proxys_own_answers_carry_the_fields_and_retry_after_stays() {
    let stack = capped_stack(true).await;
    for id in 1..=40 {
        assert_eq!(
            stack
                .get(CRM_KEY, &format!("/rest/v1/lead/{id}.json"))
                .await
                .status(),
            200
        );
    }
    // The 41st is refused here with 607: nothing left today.
    let refused = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    assert!(refused.headers().contains_key("retry-after"));
    let limit = field(&refused, "ratelimit").unwrap();
    assert_eq!(remaining(&limit, "day"), 0, "{limit}");
    assert_eq!(remaining(&limit, "window"), 10, "{limit}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "607", "{body}");

    // A body too large is refused before any call, with the fields.
    let too_large = stack
        .http
        .post(format!("{}/rest/v1/leads.json", stack.proxy.url()))
        .header("X-Api-Key", CRM_KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert!(field(&too_large, "ratelimit").is_some());

    // A caller not known learns nothing about anyone's limits.
    let unknown = stack.get("no-such-key", "/rest/v1/lead/1.json").await;
    assert_eq!(unknown.status(), 401);
    assert!(field(&unknown, "ratelimit").is_none());
    assert!(field(&unknown, "ratelimit-policy").is_none());
}

#[tokio::test]
async fn marketos_own_headers_are_kept() {
    let stack = capped_stack(true).await;
    stack.sim.inject(Faults {
        fail_next: Some(FailNext {
            count: 1,
            failure: Failure {
                header_bytes: Some(16),
                ..Failure::default()
            },
        }),
        ..Faults::default()
    });
    let answer = stack.get(WAREHOUSE_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        field(&answer, PADDING_HEADER).as_deref(),
        Some("a".repeat(16).as_str())
    );
    assert_eq!(
        field(&answer, "content-type").as_deref(),
        Some("application/json;charset=UTF-8")
    );
    assert!(field(&answer, "ratelimit").is_some());
}

#[tokio::test]
async fn the_fields_can_be_turned_off() {
    let stack = capped_stack(false).await;
    let answer = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(answer.status(), 200);
    assert!(field(&answer, "ratelimit").is_none());
    assert!(field(&answer, "ratelimit-policy").is_none());
}
