//! One conformance suite for the shared state's backends: every check is
//! written once, as a function of a `&Backend`, and runs against the memory
//! backend (`memory::…`) and against a real `redis-server` (`redis::…`).
//! A rule changed in one backend alone turns that backend's tests red.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use marketo_proxy::limits::backend::{Backend, RedisClient};
use marketo_proxy::limits::day::MarketoDay;
use marketo_proxy::limits::redis::scripts::{
    Acquire, Acquired, Batch, BulkAdmit, BulkExportDay, BulkObserve, BulkPause, BulkPlaces, BulkSnapshot,
    BulkSpent, CatchUp, ClearSpent, Epoch, Lead, Learn, Learned, LearnedEpisode, MarkSpent, Publish,
    Published, Reconcile, Release, Renew, Rescore, SeenJob, Uncount, Undo, Verdict,
};
use marketo_proxy::metrics::Metrics;

/// Generates, for each check, one test per backend.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(&marketo_proxy::limits::backend::Backend::Memory(
                        marketo_proxy::limits::backend::Memory::new(),
                    ))
                    .await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let server = crate::support::redis::RedisServer::start();
                    super::$check(&super::redis_backend(&server.url())).await;
                }
            )*
        }
    };
}

conformance!(
    window_slots_hold_until_their_answer_plus_the_window,
    concurrency_leases_go_when_released_and_renew_only_while_running,
    the_day_quota_keeps_caps_reserves_and_calls_from_outside,
    learned_limits_keep_the_latest_lowering,
    a_lost_reply_is_given_back_and_its_late_acquisition_takes_nothing,
    a_call_marketo_did_not_count_gives_back_its_slots_and_day_once_and_keeps_its_lease,
    a_catch_up_counts_once_however_often_it_is_written,
    bulk_places_and_export_bytes_are_counted_once,
    a_bulk_place_goes_to_the_service_with_the_fewest_jobs,
    an_empty_store_settles_before_granting_and_a_lost_mark_is_seen,
    marketos_607_holds_every_caller_until_one_probe,
    one_replica_at_a_time_reads_the_usage_report,
    the_day_key_turns_at_local_midnight_across_a_daylight_saving_change,
);

fn redis_backend(url: &str) -> Backend {
    Backend::redis(RedisClient::new(
        ::redis::Client::open(url).expect("redis URL"),
        Metrics::new(),
    ))
}

/// The keys of one acquisition, as the shared limits name them.
struct Keys([String; 9]);

impl Keys {
    fn new(service: &str, day: &str) -> Self {
        Self([
            "{t}:window".to_owned(),
            "{t}:inflight".to_owned(),
            format!("{{t}}:window:{service}"),
            format!("{{t}}:inflight:{service}"),
            format!("{{t}}:day:{day}"),
            "{t}:done".to_owned(),
            "{t}:epoch".to_owned(),
            "{t}:settling".to_owned(),
            "{t}:learned".to_owned(),
        ])
    }

    fn all(&self) -> [&str; 9] {
        self.0.each_ref().map(String::as_str)
    }

    fn lease(&self) -> [&str; 3] {
        [&self.0[1], &self.0[3], &self.0[5]]
    }
}

const TODAY: &str = "2026-12-04";
const MARK: &str = "mark";

/// A call of `field`'s service with room in every limit.
fn call<'a>(id: &'a str, field: &'a str) -> Acquire<'a> {
    Acquire {
        id,
        window_calls: 100,
        concurrency: 10,
        pending_ms: 60_000,
        lease_ms: 60_000,
        service_window_calls: 0,
        service_concurrency: 10,
        daily_quota: 1000,
        field,
        cap: 1000,
        day_ttl_s: 3 * 24 * 3600,
        probe_after_ms: 60_000,
        epoch: MARK,
        reserves: Vec::new(),
    }
}

async fn acquire(backend: &Backend, keys: &Keys, args: &Acquire<'_>) -> Acquired {
    backend.run(&keys.all(), args).await.expect("acquire runs")
}

/// Marks the store's data and waits until it has settled.
async fn ready(backend: &Backend) {
    let keys = Keys::new("x", TODAY);
    let epoch = Epoch {
        new_mark: MARK,
        settle_ms: 1,
    };
    let (mark, _) = backend
        .run(&[&keys.0[6], &keys.0[7], &keys.0[8]], &epoch)
        .await
        .expect("epoch runs");
    assert_eq!(mark, MARK);
    // Asks on keys of their own, so that nothing the checks count moves.
    let probe = Keys::new("probe", "1999-01-01");
    let mut keys = probe.all();
    keys[0] = "{probe}:window";
    keys[1] = "{probe}:inflight";
    keys[5] = "{probe}:done";
    support::eventually(Duration::from_secs(5), async || {
        let acquired: Acquired = backend
            .run(&keys, &call("settle", "service:probe"))
            .await
            .expect("runs");
        match acquired.verdict {
            Verdict::Granted => Ok(()),
            verdict => Err(format!("{verdict:?}")),
        }
    })
    .await;
}

async fn window_slots_hold_until_their_answer_plus_the_window(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let small = |id| Acquire {
        window_calls: 2,
        pending_ms: 5_000,
        ..call(id, "service:x")
    };
    assert_eq!(
        acquire(backend, &keys, &small("a")).await.verdict,
        Verdict::Granted
    );
    assert_eq!(
        acquire(backend, &keys, &small("b")).await.verdict,
        Verdict::Granted
    );
    let full = acquire(backend, &keys, &small("c")).await;
    assert_eq!((full.verdict, full.window), (Verdict::Window, 2));
    assert!((1..=5_000).contains(&full.wait_ms), "{full:?}");
    // Each reply says when each slot frees: both in flight, after their
    // pending hold.
    assert_eq!(full.window_frees_ms.len(), 2, "{full:?}");
    assert!(
        full.window_frees_ms
            .iter()
            .all(|left| (4_000..=5_000).contains(left)),
        "{full:?}"
    );
    // "a" was answered: its slot frees a moment after, the call waiting
    // goes then.
    let answered = Rescore {
        id: "a",
        free_in_ms: 50,
    };
    let frees = backend.run(&[&keys.0[0]], &answered).await.expect("rescore runs");
    // It says when the slots free now: "a" soon, "b" after its pending hold.
    assert_eq!(frees.len(), 2, "{frees:?}");
    assert!(frees[0] <= 50 && (4_000..=5_000).contains(&frees[1]), "{frees:?}");
    support::eventually(Duration::from_secs(5), async || {
        match acquire(backend, &keys, &small("c")).await.verdict {
            Verdict::Granted => Ok(()),
            verdict => Err(format!("{verdict:?}")),
        }
    })
    .await;
    // A service's own window caps it within the instance's.
    let capped = |id| Acquire {
        service_window_calls: 1,
        ..call(id, "service:y")
    };
    let keys = Keys::new("y", TODAY);
    assert_eq!(
        acquire(backend, &keys, &capped("d")).await.verdict,
        Verdict::Granted
    );
    assert_eq!(
        acquire(backend, &keys, &capped("e")).await.verdict,
        Verdict::ServiceWindow
    );
}

async fn concurrency_leases_go_when_released_and_renew_only_while_running(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let one = |id| Acquire {
        concurrency: 1,
        ..call(id, "service:x")
    };
    assert_eq!(acquire(backend, &keys, &one("a")).await.verdict, Verdict::Granted);
    let busy = acquire(backend, &keys, &one("b")).await;
    assert_eq!((busy.verdict, busy.in_flight), (Verdict::Concurrency, 1));
    let release = Release {
        id: "a",
        tombstone_ms: 60_000,
    };
    backend.run(&keys.lease(), &release).await.expect("release runs");
    assert_eq!(acquire(backend, &keys, &one("b")).await.verdict, Verdict::Granted);
    // A renewal of a call that is over brings nothing back.
    let renew = |id| Renew { id, lease_ms: 60_000 };
    assert_eq!(backend.run(&keys.lease(), &renew("a")).await.expect("runs"), 0);
    assert_eq!(backend.run(&keys.lease(), &renew("b")).await.expect("runs"), 1);
    assert_eq!(acquire(backend, &keys, &one("c")).await.in_flight, 1);
    // The service's own cap, below the instance's.
    let keys = Keys::new("y", TODAY);
    let capped = |id| Acquire {
        service_concurrency: 1,
        ..call(id, "service:y")
    };
    assert_eq!(
        acquire(backend, &keys, &capped("d")).await.verdict,
        Verdict::Granted
    );
    assert_eq!(
        acquire(backend, &keys, &capped("e")).await.verdict,
        Verdict::ServiceConcurrency
    );
}

async fn the_day_quota_keeps_caps_reserves_and_calls_from_outside(backend: &Backend) {
    ready(backend).await;
    // Five calls a day; x may make two; three are kept for y.
    let day = |id, field, cap, reserves| Acquire {
        daily_quota: 5,
        cap,
        reserves,
        ..call(id, field)
    };
    let x = |id| day(id, "service:x", 2, vec![("service:y", 3)]);
    let z = |id| day(id, "service:z", 5, vec![("service:y", 3)]);
    let y = |id| day(id, "service:y", 5, Vec::new());
    let (xk, yk, zk) = (
        Keys::new("x", TODAY),
        Keys::new("y", TODAY),
        Keys::new("z", TODAY),
    );
    for id in ["x1", "x2"] {
        assert_eq!(acquire(backend, &xk, &x(id)).await.verdict, Verdict::Granted);
    }
    assert_eq!(acquire(backend, &xk, &x("x3")).await.verdict, Verdict::ServiceCap);
    // Two used, three left, all of them kept for y.
    assert_eq!(acquire(backend, &zk, &z("z1")).await.verdict, Verdict::Reserved);
    for id in ["y1", "y2"] {
        assert_eq!(acquire(backend, &yk, &y(id)).await.verdict, Verdict::Granted);
    }
    // y used two of its three: the last one is still kept for it.
    assert_eq!(acquire(backend, &zk, &z("z2")).await.verdict, Verdict::Reserved);
    let last = acquire(backend, &yk, &y("y3")).await;
    assert_eq!((last.verdict, last.day_used), (Verdict::Granted, 5));
    // Marketo counted 6 where the replicas made 5: one came from outside.
    let reconcile = Reconcile {
        marketo_total: 6,
        day_ttl_s: 3600,
    };
    let (foreign, refused) = backend.run(&[&yk.0[4]], &reconcile).await.expect("runs");
    assert_eq!((foreign, refused), (1, 0));
    let spent = acquire(backend, &yk, &y("y4")).await;
    assert_eq!((spent.verdict, spent.day_used), (Verdict::Quota, 6));
}

async fn learned_limits_keep_the_latest_lowering(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let learn = |floor, at_ms| Learn {
        window: LearnedEpisode {
            floor,
            at_ms,
            hold_ms: 5_000,
        },
        concurrency: LearnedEpisode::default(),
        learned_ttl_ms: 60_000,
        day_ttl_s: 3600,
    };
    let learned_keys = [keys.0[8].as_str(), keys.0[4].as_str()];
    let fields = backend.run(&learned_keys, &learn(50, 1_000)).await.expect("runs");
    assert_eq!(fields.get("window_floor"), Some(&50));
    assert_eq!(fields.get("version"), Some(&1));
    // An older lowering changes nothing; a lower floor at the same moment
    // does.
    let fields = backend.run(&learned_keys, &learn(10, 500)).await.expect("runs");
    assert_eq!(
        (fields.get("window_floor"), fields.get("version")),
        (Some(&50), Some(&1))
    );
    let fields = backend.run(&learned_keys, &learn(40, 1_000)).await.expect("runs");
    assert_eq!(
        (fields.get("window_floor"), fields.get("version")),
        (Some(&40), Some(&2))
    );
    assert_eq!(fields.get("window_hold"), Some(&5_000));
    assert!(!fields.contains_key("concurrency_floor"), "{fields:?}");
    let read = backend.run(&[&keys.0[8]], &Learned {}).await.expect("runs");
    assert_eq!(read, fields);
    assert_eq!(
        acquire(backend, &keys, &call("a", "service:x"))
            .await
            .learned_version,
        2
    );
    // Every refusal counted in the day, as Marketo's error report does.
    let reconcile = Reconcile {
        marketo_total: 0,
        day_ttl_s: 3600,
    };
    let (_, refused) = backend.run(&[&keys.0[4]], &reconcile).await.expect("runs");
    assert_eq!(refused, 3);
}

async fn a_lost_reply_is_given_back_and_its_late_acquisition_takes_nothing(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let undo = |id| Undo {
        id,
        field: "service:x",
        tombstone_ms: 60_000,
    };
    assert_eq!(
        acquire(backend, &keys, &call("a", "service:x")).await.verdict,
        Verdict::Granted
    );
    // Its answer was lost: what it took goes back, the day's unit too.
    let took = backend
        .run(&keys.all()[..6], &undo("a"))
        .await
        .expect("undo runs");
    assert_eq!(took, 3, "window, instance and service leases");
    let next = acquire(backend, &keys, &call("b", "service:x")).await;
    assert_eq!(
        (next.verdict, next.window, next.in_flight, next.day_used),
        (Verdict::Granted, 1, 1, 1)
    );
    // Given up before it ran: when it runs late, it takes nothing.
    assert_eq!(
        backend.run(&keys.all()[..6], &undo("late")).await.expect("runs"),
        0
    );
    let late = acquire(backend, &keys, &call("late", "service:x")).await;
    assert_eq!(
        (late.verdict, late.window, late.day_used),
        (Verdict::Released, 1, 1)
    );
}

async fn a_call_marketo_did_not_count_gives_back_its_slots_and_day_once_and_keeps_its_lease(
    backend: &Backend,
) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let with_own_window = |id| Acquire {
        service_window_calls: 5,
        ..call(id, "service:x")
    };
    for id in ["a", "b"] {
        assert_eq!(
            acquire(backend, &keys, &with_own_window(id)).await.verdict,
            Verdict::Granted
        );
    }
    // "a" was answered 608: out of both windows and the day, once.
    let uncount = Uncount {
        id: "a",
        field: "service:x",
    };
    let windows: [&str; 3] = [&keys.0[4], &keys.0[0], &keys.0[2]];
    assert_eq!(backend.run(&windows, &uncount).await.expect("runs"), 2);
    assert_eq!(backend.run(&windows, &uncount).await.expect("runs"), 0);
    // The service's own count went back too: a cap of 2 lets one more in.
    let capped = Acquire {
        cap: 2,
        ..with_own_window("c")
    };
    let next = acquire(backend, &keys, &capped).await;
    assert_eq!(
        (next.verdict, next.window, next.in_flight, next.day_used),
        (Verdict::Granted, 2, 3, 2),
        "a's lease still runs"
    );
    // A day that is gone is not brought back by a late give-back.
    let old = Keys::new("x", "2026-12-01");
    let windows: [&str; 3] = [&old.0[4], &keys.0[0], &keys.0[2]];
    let late = Uncount {
        id: "b",
        field: "service:x",
    };
    assert_eq!(backend.run(&windows, &late).await.expect("runs"), 2);
    let next = acquire(backend, &keys, &with_own_window("d")).await;
    assert_eq!((next.window, next.day_used), (2, 3));
}

async fn a_catch_up_counts_once_however_often_it_is_written(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let release = Release {
        id: "over",
        tombstone_ms: 60_000,
    };
    backend.run(&keys.lease(), &release).await.expect("release runs");
    let catch_up = CatchUp {
        pending_ms: 60_000,
        lease_ms: 60_000,
        day_ttl_s: 3600,
        slots: vec![("answered", 30_000)],
        live: vec!["running", "over"],
        batches: vec![
            Batch {
                id: "batch-1",
                day: 1,
                calls: vec![("service:x", 3)],
            },
            // Made before midnight: counted to that day, not this one.
            Batch {
                id: "batch-0",
                day: 0,
                calls: vec![("service:x", 5)],
            },
        ],
    };
    let yesterday = Keys::new("x", "2026-12-03");
    let catch_up_keys = [
        &*keys.0[0],
        &keys.0[1],
        "{t}:batches",
        &keys.0[5],
        &yesterday.0[4],
        &keys.0[4],
    ];
    for _ in 0..2 {
        backend
            .run(&catch_up_keys, &catch_up)
            .await
            .expect("catch-up runs");
    }
    let next = acquire(backend, &keys, &call("next", "service:x")).await;
    assert_eq!(next.verdict, Verdict::Granted);
    // Three slots before it (answered, running, over), the running call's
    // lease alone (the one over stays over), three calls of the day.
    assert_eq!((next.window, next.in_flight, next.day_used), (4, 2, 4));
    let before = acquire(backend, &yesterday, &call("late", "service:x")).await;
    assert_eq!(before.day_used, 6, "yesterday's five and this one");
}

fn seen<'a>(id: &'a str, state: &'a str, owner: &'a str, started: bool, size: Option<u64>) -> SeenJob<'a> {
    SeenJob {
        id,
        kind: "leads",
        queue: "extract",
        base: "/bulk/v1/leads/export",
        state,
        owner,
        started,
        file_size: size,
    }
}

fn bulk_keys() -> [&'static str; 6] {
    [
        "{t}:bulk:jobs",
        "{t}:bulk:queue:extract",
        "{t}:bulk:queue:import",
        "{t}:bulk:day:2026-12-04",
        "{t}:bulk:paused:extract",
        "{t}:bulk:paused:import",
    ]
}

const ADMIT_KEYS: [&str; 5] = [
    "{t}:bulk:queue:extract",
    "{t}:bulk:reserved:extract",
    "{t}:bulk:paused:extract",
    "{t}:bulk:released",
    "{t}:bulk:waiting:extract",
];

fn place<'a>(id: &'a str, limit: usize, service: &'a str, waits_ms: u64) -> BulkAdmit<'a> {
    BulkAdmit {
        id,
        limit,
        hold_ms: 60_000,
        service,
        waits_ms,
    }
}

async fn bulk_places_and_export_bytes_are_counted_once(backend: &Backend) {
    let admit = async |args: &BulkAdmit<'_>| backend.run(&ADMIT_KEYS, args).await.expect("admit runs") == 1;
    assert!(admit(&place("p1", 2, "x", 0)).await);
    assert!(admit(&place("p2", 2, "x", 0)).await);
    assert!(!admit(&place("p3", 2, "x", 0)).await, "two places, both taken");
    let places = |hold: &'static [String], release: &'static [String]| BulkPlaces {
        hold_ms: 60_000,
        tombstone_ms: 60_000,
        hold,
        release,
    };
    let given_back = vec!["p1".to_owned()].leak();
    let place_keys = [ADMIT_KEYS[1], ADMIT_KEYS[3]];
    backend
        .run(&place_keys, &places(&[], given_back))
        .await
        .expect("places run");
    // Given back, a place cannot be held again, even by a late catch-up.
    backend
        .run(&place_keys, &places(given_back, &[]))
        .await
        .expect("places run");
    assert!(!admit(&place("p1", 2, "x", 0)).await);
    assert!(admit(&place("p3", 2, "x", 0)).await);

    // A completed export's bytes count once, for the day and its owner.
    let observe = |jobs| BulkObserve {
        today: TODAY.to_owned(),
        keep_ms: 60_000,
        jobs,
    };
    let changed = backend
        .run(
            &bulk_keys(),
            &observe(vec![seen("j1", "queued", "x", true, None)]),
        )
        .await
        .expect("observe runs");
    assert_eq!(changed, ["jobs:x", "1"]);
    let done = || observe(vec![seen("j1", "completed", "x", false, Some(100))]);
    let changed = backend.run(&bulk_keys(), &done()).await.expect("observe runs");
    assert_eq!(changed, ["bytes", "100", "bytes:x", "100"]);
    let again = backend.run(&bulk_keys(), &done()).await.expect("observe runs");
    assert!(again.is_empty(), "counted once: {again:?}");
    let day = [bulk_keys()[3]];
    assert_eq!(
        backend.run(&day, &BulkExportDay {}).await.expect("runs"),
        (100, 0)
    );
    backend
        .run(&day, &BulkSpent { keep_ms: 60_000 })
        .await
        .expect("runs");
    assert_eq!(
        backend.run(&day, &BulkExportDay {}).await.expect("runs"),
        (100, 1)
    );
    // States only move forward: a late "queued" leaves it completed.
    backend
        .run(
            &bulk_keys(),
            &observe(vec![seen("j1", "queued", "x", true, None)]),
        )
        .await
        .expect("observe runs");
    let snapshot = BulkSnapshot {
        today: TODAY.to_owned(),
        stale_created_ms: 60_000,
    };
    let snapshot_keys = [
        bulk_keys()[0],
        bulk_keys()[3],
        ADMIT_KEYS[1],
        "{t}:bulk:reserved:import",
    ];
    let (jobs, day_fields, extract, import) = backend.run(&snapshot_keys, &snapshot).await.expect("runs");
    assert_eq!(
        &jobs[..7],
        ["j1", "leads", "/bulk/v1/leads/export", "completed", "x", "1", "1"]
    );
    let mut day_fields: Vec<_> = day_fields.chunks(2).map(<[String]>::to_vec).collect();
    day_fields.sort();
    assert_eq!(
        day_fields,
        [
            ["bytes", "100"],
            ["bytes:x", "100"],
            ["jobs:x", "1"],
            ["spent", "1"]
        ]
    );
    assert_eq!((extract, import), (2, 0));
    // Marketo said the queue is full: nothing is admitted while it holds.
    backend
        .run(&[ADMIT_KEYS[2]], &BulkPause { pause_ms: 60_000 })
        .await
        .expect("pause runs");
    assert!(!admit(&place("p4", 10, "x", 0)).await);
}

async fn a_bulk_place_goes_to_the_service_with_the_fewest_jobs(backend: &Backend) {
    let observe = BulkObserve {
        today: TODAY.to_owned(),
        keep_ms: 60_000,
        jobs: vec![seen("j1", "queued", "x", true, None)],
    };
    backend.run(&bulk_keys(), &observe).await.expect("observe runs");
    let admit = async |args: &BulkAdmit<'_>| backend.run(&ADMIT_KEYS, args).await.expect("admit runs") == 1;
    // y waits for the full queue (one job, one place).
    assert!(!admit(&place("y1", 1, "y", 5_000)).await);
    // With a second place, x (one job already) does not go before y (none).
    assert!(!admit(&place("x1", 2, "x", 5_000)).await);
    assert!(admit(&place("y1", 2, "y", 5_000)).await);
}

async fn an_empty_store_settles_before_granting_and_a_lost_mark_is_seen(backend: &Backend) {
    let keys = Keys::new("x", TODAY);
    let epoch_keys = [&keys.0[6], &keys.0[7], &keys.0[8]].map(String::as_str);
    let first = Epoch {
        new_mark: "first",
        settle_ms: 60_000,
    };
    assert_eq!(backend.run(&epoch_keys, &first).await.expect("runs").0, "first");
    let again = Epoch {
        new_mark: "second",
        settle_ms: 60_000,
    };
    assert_eq!(
        backend.run(&epoch_keys, &again).await.expect("runs").0,
        "first",
        "kept"
    );
    let waiting = acquire(
        backend,
        &keys,
        &Acquire {
            epoch: "first",
            ..call("a", "service:x")
        },
    )
    .await;
    assert_eq!(waiting.verdict, Verdict::Settling);
    assert!((1..=60_000).contains(&waiting.wait_ms));
    // A caller that wrote its state under another mark: the store lost it.
    let lost = acquire(
        backend,
        &keys,
        &Acquire {
            epoch: "older",
            ..call("b", "service:x")
        },
    )
    .await;
    assert_eq!((lost.verdict, lost.window), (Verdict::Lost, 0));
}

async fn marketos_607_holds_every_caller_until_one_probe(backend: &Backend) {
    ready(backend).await;
    let keys = Keys::new("x", TODAY);
    let mark = MarkSpent {
        probe_after_ms: 200,
        day_ttl_s: 3600,
    };
    backend.run(&[&keys.0[4]], &mark).await.expect("runs");
    let probing = |id| Acquire {
        probe_after_ms: 60_000,
        ..call(id, "service:x")
    };
    let held = acquire(backend, &keys, &probing("a")).await;
    assert_eq!(held.verdict, Verdict::Spent);
    assert!((1..=200).contains(&held.wait_ms), "{held:?}");
    support::eventually(Duration::from_secs(5), async || {
        match acquire(backend, &keys, &probing("probe")).await.verdict {
            Verdict::Probe => Ok(()),
            verdict => Err(format!("{verdict:?}")),
        }
    })
    .await;
    // The probe holds the others until its answer says the day goes on.
    assert_eq!(
        acquire(backend, &keys, &probing("b")).await.verdict,
        Verdict::Spent
    );
    backend.run(&[&keys.0[4]], &ClearSpent {}).await.expect("runs");
    assert_eq!(
        acquire(backend, &keys, &probing("b")).await.verdict,
        Verdict::Granted
    );
}

async fn one_replica_at_a_time_reads_the_usage_report(backend: &Backend) {
    let lock = ["{t}:reconciler"];
    let lead = |replica| Lead {
        replica,
        hold_ms: 300,
    };
    assert_eq!(backend.run(&lock, &lead("a")).await.expect("runs"), 1);
    assert_eq!(backend.run(&lock, &lead("b")).await.expect("runs"), 0);
    assert_eq!(backend.run(&lock, &lead("a")).await.expect("runs"), 1, "kept");
    support::eventually(Duration::from_secs(5), async || {
        match backend.run(&lock, &lead("b")).await.expect("runs") {
            1 => Ok(()),
            _ => Err("a's lock has not lapsed"),
        }
    })
    .await;
    let usage = ["{t}:usage"];
    assert_eq!(backend.run(&usage, &Published {}).await.expect("runs"), None);
    let publish = Publish {
        text: "{\"total\":7}",
        keep_ms: 60_000,
    };
    backend.run(&usage, &publish).await.expect("runs");
    assert_eq!(
        backend.run(&usage, &Published {}).await.expect("runs").as_deref(),
        Some("{\"total\":7}")
    );
}

/// The day's counts live under the day's key: Marketo's day, on an injected
/// clock, turns at local midnight, a daylight-saving change included.
async fn the_day_key_turns_at_local_midnight_across_a_daylight_saving_change(backend: &Backend) {
    ready(backend).await;
    let at = |text: &str| text.parse::<DateTime<Utc>>().expect("a time").timestamp_millis();
    // The last second of the 8th in Chicago (CST), an hour before the 23-hour
    // day's midnight in CDT.
    let clock = Arc::new(AtomicI64::new(at("2026-03-09T04:59:59Z")));
    let day = MarketoDay::with_clock(chrono_tz::America::Chicago, {
        let clock = Arc::clone(&clock);
        Arc::new(move || DateTime::from_timestamp_millis(clock.load(Ordering::Relaxed)).unwrap_or_default())
    });
    let one_a_day = |id| Acquire {
        daily_quota: 1,
        ..call(id, "service:x")
    };
    let keys = Keys::new("x", &day.today().to_string());
    assert_eq!(day.today().to_string(), "2026-03-08");
    assert_eq!(
        acquire(backend, &keys, &one_a_day("a")).await.verdict,
        Verdict::Granted
    );
    assert_eq!(
        acquire(backend, &keys, &one_a_day("b")).await.verdict,
        Verdict::Quota
    );
    clock.store(at("2026-03-09T05:00:00Z"), Ordering::Relaxed);
    let keys = Keys::new("x", &day.today().to_string());
    assert_eq!(day.today().to_string(), "2026-03-09");
    let new_day = acquire(backend, &keys, &one_a_day("c")).await;
    assert_eq!((new_day.verdict, new_day.day_used), (Verdict::Granted, 1));
}
