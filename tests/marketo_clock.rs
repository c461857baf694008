//! Slow calls and Marketo's clock: a window slot counts from when
//! Marketo's `requestId` says it took the call (at the latest, by our
//! clock), not from the answer, so slow answers waste less of the window,
//! and a simulator whose clock is off by seconds changes nothing about
//! safety.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use marketo_proxy::sim::SimConfig;
use support::{CRM_KEY, Stack};

/// Marketo's window at a tenth of the time (10 calls a 2 s window) with
/// calls of 300 ± 280 ms, and every tenth 1 s. (The bound on when Marketo
/// took a call is as tight as the quickest recent call: the wider the
/// spread, the more it gains over the answer.)
fn slow_sim(clock_skew_ms: i64) -> SimConfig {
    SimConfig {
        window_calls: 10,
        window: Duration::from_secs(2),
        latency: Duration::from_millis(300),
        latency_jitter: Duration::from_millis(280),
        slow_every: 10,
        slow_latency: Duration::from_secs(1),
        clock_skew_ms,
        ..support::sim_config()
    }
}

/// 50 reads at once through a proxy with `marketo_clock` on or off: when
/// the fifth batch of 10 reached the simulator, in seconds after the
/// first call, and the simulator's 606 and 615 count.
async fn fifth_batch(clock_skew_ms: i64, marketo_clock: bool) -> (f64, u64) {
    fifth_batch_of(slow_sim(clock_skew_ms), marketo_clock).await
}

async fn fifth_batch_of(sim: SimConfig, marketo_clock: bool) -> (f64, u64) {
    let limits = format!(
        "{{ window_calls: 10, window: 2s, safety_margin: 50ms, max_queue_wait: 30s, marketo_clock: {marketo_clock} }}"
    );
    let stack = Stack::start_configured(sim, |sim_url| {
        support::proxy_config_with(sim_url, "", &limits, "{ file: ~, usage_sync_interval: 0s }")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    let paths: Vec<String> = (1..=50)
        .map(|lead| format!("/rest/v1/lead/{lead}.json"))
        .collect();
    let reads = paths.iter().map(|path| stack.get(CRM_KEY, path));
    for answer in futures_util::future::join_all(reads).await {
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["success"], true, "{body}");
    }
    let stats = stack.sim.stats();
    let arrivals = &stats.arrivals;
    assert_eq!(arrivals.len(), 50, "{arrivals:?}");
    (
        arrivals[40].at - arrivals[0].at,
        stats.code("606") + stats.code("615"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketos_clock_starts_the_fifth_batch_sooner_and_never_too_soon() {
    let (from_answers, refused_off) = fifth_batch(0, false).await;
    let (from_clock, refused_on) = fifth_batch(0, true).await;
    // The same answers with spaces in their JSON.
    let spaced = SimConfig {
        spaced_json: true,
        ..slow_sim(0)
    };
    let (from_spaced, refused_spaced) = fifth_batch_of(spaced, true).await;
    assert_eq!((refused_off, refused_on, refused_spaced), (0, 0, 0));
    for (from_clock, json) in [(from_clock, "compact"), (from_spaced, "spaced")] {
        // Four windows and margins is the least any proxy could do.
        assert!(
            from_clock >= 8.2,
            "fifth batch after {from_clock:.3} s ({json}): too soon"
        );
        assert!(
            from_clock + 0.2 < from_answers,
            "fifth batch after {from_clock:.3} s by Marketo's clock in {json} JSON, {from_answers:.3} s by the answers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketo_clock_five_seconds_off_either_way_changes_nothing_about_safety() {
    for skew in [5_000, -5_000] {
        let (fifth, refused) = fifth_batch(skew, true).await;
        assert_eq!(refused, 0, "clock {skew} ms off");
        assert!(
            fifth >= 8.2,
            "fifth batch after {fifth:.3} s with the clock {skew} ms off"
        );
    }
}
