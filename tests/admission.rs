//! Admission control under paused time: fairness, reserves, deadlines,
//! queue bounds and the quota's day, driven through the public API with
//! tokio's clock paused so that minutes pass in milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use marketo_proxy::admission::quota::QuotaScope;
use marketo_proxy::admission::{Admission, AdmissionError, RateScope};
use marketo_proxy::config::Config;
use marketo_proxy::metrics::Metrics;
use tokio::time::Instant;

/// A config with the given limits and services (YAML fragments).
fn config(limits: &str, services: &str) -> Config {
    let yaml = format!(
        "marketo: {{ base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }}\n\
         limits:\n{limits}\nservices:\n{services}\nstate: {{ file: ~ }}\n"
    );
    Config::from_yaml_with_env(&yaml, |_| None).unwrap()
}

const TWO_SERVICES: &str = "  - { name: a, api_key: key-a-0123456789abcdef, weight: 3 }\n  - { name: b, api_key: key-b-0123456789abcdef, weight: 1 }";

/// Asks admission for a call of `service` that may wait up to `wait`.
async fn admit(
    admission: &Arc<Admission>,
    service: usize,
    wait: Duration,
) -> Result<marketo_proxy::admission::Permit, AdmissionError> {
    admission.admit(service, Instant::now() + wait, false).await
}

fn admission(config: &Config) -> Arc<Admission> {
    let admission = Admission::new(config, Metrics::new());
    tokio::spawn(admission.timer());
    admission
}

/// A wall clock the test moves by hand.
fn wall_clock(start: &str) -> (Arc<AtomicI64>, marketo_proxy::admission::WallClock) {
    let millis = Arc::new(AtomicI64::new(
        start.parse::<DateTime<Utc>>().unwrap().timestamp_millis(),
    ));
    let read = Arc::clone(&millis);
    let clock = Arc::new(move || DateTime::from_timestamp_millis(read.load(Ordering::SeqCst)).unwrap());
    (millis, clock)
}

/// Runs `calls` requests of `service` back to back from `clients` tasks,
/// each call taking `latency`; returns when each was admitted.
fn load(
    admission: &Arc<Admission>,
    service: usize,
    clients: usize,
    calls: usize,
    latency: Duration,
) -> tokio::task::JoinHandle<Vec<Instant>> {
    let admission = Arc::clone(admission);
    tokio::spawn(async move {
        let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(calls));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let admission = Arc::clone(&admission);
            let remaining = Arc::clone(&remaining);
            tasks.push(tokio::spawn(async move {
                let mut admitted = Vec::new();
                while remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1))
                    .is_ok()
                {
                    let deadline = Instant::now() + Duration::from_secs(3600);
                    let mut permit = admission.admit(service, deadline, false).await.unwrap();
                    admitted.push(Instant::now());
                    // The call's time at Marketo, on the paused clock.
                    tokio::time::sleep(latency).await;
                    permit.answered();
                }
                admitted
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort();
        all
    })
}

#[tokio::test(start_paused = true)]
async fn weights_three_to_one_share_a_saturated_window_three_to_one() {
    let config = config(
        "  window_calls: 100\n  window: 20s\n  safety_margin: 0s\n  max_queue_wait: 1h",
        TWO_SERVICES,
    );
    let admission = admission(&config);
    let start = Instant::now();
    let a = load(&admission, 0, 10, 1000, Duration::from_millis(50));
    let b = load(&admission, 1, 10, 1000, Duration::from_millis(50));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    // Both stay backlogged for the first four windows.
    let horizon = start + Duration::from_secs(80);
    let a_in = a.iter().filter(|at| **at < horizon).count() as f64;
    let b_in = b.iter().filter(|at| **at < horizon).count() as f64;
    assert!(
        (a_in + b_in - 400.0).abs() <= 10.0,
        "window used: a {a_in}, b {b_in}"
    );
    let ratio = a_in / b_in;
    assert!((2.7..=3.3).contains(&ratio), "a {a_in} : b {b_in} = {ratio:.2}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_service_leaves_its_share_to_the_others() {
    let config = config(
        "  window_calls: 100\n  window: 20s\n  safety_margin: 0s\n  max_queue_wait: 1h",
        TWO_SERVICES,
    );
    let admission = admission(&config);
    let start = Instant::now();
    // Only b (weight 1) has work: it gets the whole window.
    let b = load(&admission, 1, 10, 200, Duration::from_millis(50))
        .await
        .unwrap();
    let first_window = b
        .iter()
        .filter(|at| **at < start + Duration::from_secs(20))
        .count();
    assert_eq!(first_window, 100);
}

#[tokio::test(start_paused = true)]
async fn a_service_window_share_caps_it_and_leaves_the_rest_to_others() {
    let services = "  - { name: a, api_key: key-a-0123456789abcdef, window_calls: 30 }\n  - { name: b, api_key: key-b-0123456789abcdef }";
    let config = config(
        "  window_calls: 100\n  window: 20s\n  safety_margin: 0s\n  max_queue_wait: 1h",
        services,
    );
    let admission = admission(&config);
    let start = Instant::now();
    let a = load(&admission, 0, 10, 60, Duration::from_millis(50));
    let b = load(&admission, 1, 10, 200, Duration::from_millis(50));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let window = start + Duration::from_secs(20);
    assert_eq!(a.iter().filter(|at| **at < window).count(), 30);
    assert_eq!(b.iter().filter(|at| **at < window).count(), 70);
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_capped_for_the_instance_and_each_service() {
    let services = "  - { name: a, api_key: key-a-0123456789abcdef, concurrency: 3 }\n  - { name: b, api_key: key-b-0123456789abcdef }";
    let config = config(
        "  window_calls: 1000\n  concurrency: 10\n  max_queue_wait: 1h",
        services,
    );
    let admission = admission(&config);
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(admit(&admission, 0, Duration::from_secs(60)).await.unwrap());
    }
    // a is at its cap: its fourth call waits, b goes on.
    let waiting = {
        let admission = Arc::clone(&admission);
        tokio::spawn(async move { admit(&admission, 0, Duration::from_secs(60)).await })
    };
    tokio::task::yield_now().await;
    for _ in 0..7 {
        permits.push(admit(&admission, 1, Duration::from_secs(60)).await.unwrap());
    }
    assert_eq!(admission.snapshot().in_flight, 10);
    assert!(!waiting.is_finished());
    // Freeing one of a's slots lets its waiting call go.
    permits.remove(0);
    let permit = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(permit);
    assert_eq!(admission.snapshot().services[0].in_flight, 2);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_cannot_be_met_is_refused_at_once() {
    let config = config(
        "  window_calls: 10\n  window: 20s\n  safety_margin: 0s",
        TWO_SERVICES,
    );
    let admission = admission(&config);
    for _ in 0..10 {
        let mut permit = admit(&admission, 0, Duration::from_secs(1)).await.unwrap();
        permit.answered();
    }
    let asked = Instant::now();
    let refused = admission.admit(1, asked + Duration::from_secs(5), false).await;
    assert_eq!(Instant::now(), asked, "answered without waiting");
    match refused {
        Err(AdmissionError::WouldWait {
            scope: RateScope::Instance,
            retry_after,
            ..
        }) => assert!(
            retry_after > Duration::from_secs(19) && retry_after <= Duration::from_secs(20),
            "{retry_after:?}"
        ),
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    // With a deadline past the window's end it waits and is admitted.
    let permit = admission
        .admit(1, asked + Duration::from_secs(25), false)
        .await
        .unwrap();
    assert!(Instant::now() >= asked + Duration::from_secs(20));
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_passes_in_the_queue_is_refused_then() {
    let config = config(
        "  window_calls: 1\n  window: 20s\n  safety_margin: 0s",
        TWO_SERVICES,
    );
    let admission = admission(&config);
    // The one slot is taken by a call that never answers.
    let _stuck = admit(&admission, 0, Duration::from_secs(1)).await.unwrap();
    let asked = Instant::now();
    let refused = admission.admit(0, asked + Duration::from_secs(25), false).await;
    assert!(
        matches!(refused, Err(AdmissionError::DeadlineExpired { .. })),
        "{refused:?}"
    );
    assert_eq!(Instant::now(), asked + Duration::from_secs(25));
    assert_eq!(admission.snapshot().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded() {
    let config = config(
        "  window_calls: 1\n  max_queue_length: 5\n  max_queue_wait: 1h",
        TWO_SERVICES,
    );
    let admission = admission(&config);
    let _first = admit(&admission, 0, Duration::from_secs(60)).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let admission = Arc::clone(&admission);
        waiting.push(tokio::spawn(async move {
            admit(&admission, 1, Duration::from_secs(3600)).await.map(drop)
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(admission.snapshot().queued, 5);
    let refused = admit(&admission, 0, Duration::from_secs(3600)).await;
    assert!(
        matches!(refused, Err(AdmissionError::QueueFull { limit: 5, .. })),
        "{refused:?}"
    );
    for task in waiting {
        task.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_leaves_the_queue() {
    let config = config("  window_calls: 1\n  max_queue_wait: 1h", TWO_SERVICES);
    let admission = admission(&config);
    let _first = admit(&admission, 0, Duration::from_secs(60)).await.unwrap();
    let waiter = {
        let admission = Arc::clone(&admission);
        tokio::spawn(async move { admit(&admission, 1, Duration::from_secs(3600)).await.map(drop) })
    };
    tokio::task::yield_now().await;
    assert_eq!(admission.snapshot().queued, 1);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(admission.snapshot().queued, 0);
    assert_eq!(admission.snapshot().services[1].queued, 0);
}

#[tokio::test(start_paused = true)]
async fn reserved_daily_calls_stay_free_for_their_service() {
    let services = "  - { name: a, api_key: key-a-0123456789abcdef, reserved_daily: 20 }\n  - { name: b, api_key: key-b-0123456789abcdef }";
    let config = config("  window_calls: 1000\n  daily_quota: 100", services);
    let admission = admission(&config);
    let mut b_calls = 0;
    let refusal = loop {
        match admit(&admission, 1, Duration::from_secs(1)).await {
            Ok(permit) => {
                drop(permit);
                b_calls += 1;
            }
            Err(error) => break error,
        }
    };
    assert_eq!(b_calls, 80);
    assert!(
        matches!(
            refusal,
            AdmissionError::Quota {
                scope: QuotaScope::Reserved,
                ..
            }
        ),
        "{refusal:?}"
    );
    for _ in 0..20 {
        drop(admit(&admission, 0, Duration::from_secs(1)).await.unwrap());
    }
    let refusal = admit(&admission, 0, Duration::from_secs(1)).await;
    assert!(matches!(
        refusal,
        Err(AdmissionError::Quota {
            scope: QuotaScope::Instance,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_quota_resets_at_local_midnight_across_a_daylight_saving_change() {
    let config = config(
        "  window_calls: 1000\n  daily_quota: 5\n  timezone: America/Chicago",
        TWO_SERVICES,
    );
    // 2026-03-08 is 23 hours long in Chicago: the 9th begins at 05:00 UTC.
    let (wall, clock) = wall_clock("2026-03-09T04:00:00Z");
    let admission = Admission::with_clock(&config, Metrics::new(), clock);
    tokio::spawn(admission.timer());
    for _ in 0..5 {
        drop(admit(&admission, 0, Duration::from_secs(1)).await.unwrap());
    }
    match admit(&admission, 0, Duration::from_secs(1)).await {
        Err(AdmissionError::Quota {
            scope: QuotaScope::Instance,
            retry_after,
        }) => assert!(
            retry_after >= Duration::from_secs(3600) && retry_after <= Duration::from_secs(3600 + 300),
            "until 05:00 UTC, spread over five minutes after it: {retry_after:?}"
        ),
        other => panic!("expected the quota to be spent, got {other:?}"),
    }
    wall.store(
        "2026-03-09T04:59:59Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp_millis(),
        Ordering::SeqCst,
    );
    assert!(admit(&admission, 0, Duration::from_secs(1)).await.is_err());
    wall.store(
        "2026-03-09T05:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp_millis(),
        Ordering::SeqCst,
    );
    assert!(admit(&admission, 0, Duration::from_secs(1)).await.is_ok());
    assert_eq!(admission.snapshot().daily_used, 1);
}

#[tokio::test(start_paused = true)]
async fn marketo_saying_607_holds_until_a_probe_goes_through() {
    let config = config(
        "  window_calls: 1000\n  daily_quota: 50000\n  quota_probe_interval: 5m",
        TWO_SERVICES,
    );
    let (wall, clock) = wall_clock("2026-11-28T12:00:00Z");
    let admission = Admission::with_clock(&config, Metrics::new(), clock);
    tokio::spawn(admission.timer());
    drop(admit(&admission, 0, Duration::from_secs(1)).await.unwrap());
    admission.quota_spent();
    match admit(&admission, 1, Duration::from_secs(1)).await {
        Err(AdmissionError::Quota {
            scope: QuotaScope::Instance,
            retry_after,
        }) => assert_eq!(retry_after, Duration::from_secs(300), "until the probe"),
        other => panic!("expected the day spent, got {other:?}"),
    }
    assert_eq!(admission.snapshot().daily_remaining, 0);
    // Five minutes on, one call probes; the others wait for its answer.
    wall.fetch_add(300_000, Ordering::SeqCst);
    let probe = admit(&admission, 1, Duration::from_secs(1)).await.unwrap();
    assert!(admit(&admission, 0, Duration::from_secs(1)).await.is_err());
    // It went through: the day is not spent after all.
    assert!(admission.quota_confirmed());
    drop(probe);
    assert!(admit(&admission, 0, Duration::from_secs(1)).await.is_ok());
    assert_eq!(admission.snapshot().daily_remaining, 50000 - 3);
    assert!(!admission.quota_confirmed(), "nothing left to confirm");
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_every_call_back() {
    let config = config("  window_calls: 1000\n  max_queue_wait: 1h", TWO_SERVICES);
    let admission = admission(&config);
    admission.pause(Duration::from_secs(2));
    let asked = Instant::now();
    drop(
        admission
            .admit(0, asked + Duration::from_secs(10), false)
            .await
            .unwrap(),
    );
    assert!(Instant::now() >= asked + Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn closing_answers_every_waiter_and_refuses_newcomers() {
    let config = config("  window_calls: 1\n  max_queue_wait: 1h", TWO_SERVICES);
    let admission = admission(&config);
    let first = admit(&admission, 0, Duration::from_secs(60)).await.unwrap();
    let waiter = {
        let admission = Arc::clone(&admission);
        tokio::spawn(async move { admit(&admission, 1, Duration::from_secs(3600)).await })
    };
    tokio::task::yield_now().await;
    admission.close();
    let answered = waiter.await.unwrap();
    assert!(matches!(answered, Err(AdmissionError::Closed)), "{answered:?}");
    let refused = admit(&admission, 0, Duration::from_secs(60)).await;
    assert!(matches!(refused, Err(AdmissionError::Closed)));
    // The call already admitted finishes normally.
    drop(first);
    assert_eq!(admission.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn the_quota_forecast_follows_the_recent_rate() {
    let config = config(
        "  window_calls: 100000\n  daily_quota: 1000\n  max_queue_wait: 1h",
        TWO_SERVICES,
    );
    // Noon in Chicago: the reset is twelve hours away.
    let (_wall, clock) = wall_clock("2026-11-28T18:00:00Z");
    let metrics = Metrics::new();
    let admission = Admission::with_clock(&config, metrics.clone(), clock);
    tokio::spawn(admission.timer());
    let forecast = |metrics: &Metrics| {
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("marketo_proxy_quota_exhaustion_eta_seconds "))
            .map(str::to_owned)
    };
    admission.refresh_metrics();
    // The exposition writes `inf`, which Prometheus reads as +Inf.
    let none: f64 = forecast(&metrics).unwrap().parse().unwrap();
    assert!(none.is_infinite(), "no calls, no forecast");
    for _ in 0..100 {
        drop(admit(&admission, 0, Duration::from_secs(1)).await.unwrap());
    }
    tokio::time::advance(Duration::from_secs(100)).await;
    admission.refresh_metrics();
    // 100 calls in 100 s: the 900 left last 900 s.
    let eta: f64 = forecast(&metrics).unwrap().parse().unwrap();
    assert!((eta - 900.0).abs() < 10.0, "{eta}");
}
