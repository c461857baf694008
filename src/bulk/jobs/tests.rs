//! The bulk job state machine with the memory backend: places, lines,
//! the day's export bytes and the proxy's own polls. Enqueues that wait
//! are futures polled by hand, so the order places are granted in is the
//! order the test sees; the clock is tokio's, paused where time matters.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use http::{Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;
use crate::error::ProxyError;
use crate::limits::day::MarketoDay;
use crate::proxy::testing::marketo_code;

const CRM: usize = 0;
const FORMS: usize = 1;

/// The bulk state of a config with two services, `crm` and `forms`, and
/// `bulk` (YAML) as its bulk settings, on the system's clock.
fn bulk_jobs(bulk: &str) -> (Arc<BulkJobs>, Metrics) {
    bulk_jobs_on(bulk, MarketoDay::new(chrono_tz::America::Chicago))
}

/// As [`bulk_jobs`], its day told by `day`.
fn bulk_jobs_on(bulk: &str, day: MarketoDay) -> (Arc<BulkJobs>, Metrics) {
    let yaml = format!(
        r#"
marketo: {{ base_url: "http://127.0.0.1:1", client_id: a, client_secret: b }}
services:
  - {{ name: crm, api_key: key-crm-1234567890abcd }}
  - {{ name: forms, api_key: key-forms-0987654321 }}
bulk: {bulk}
state: {{ file: ~ }}
"#
    );
    let config = Config::from_yaml_with_env(&yaml, |_| None).expect("test config is valid");
    let metrics = Metrics::new();
    (
        BulkJobs::new(&config, metrics.clone(), None, day, crate::tasks::Tasks::new()),
        metrics,
    )
}

/// Marketo's day in Chicago on a wall clock the test sets (milliseconds
/// since the epoch), starting at `start`.
fn chicago_day_at(start: &str) -> (MarketoDay, Arc<AtomicI64>) {
    let start: DateTime<Utc> = start.parse().expect("an RFC 3339 time");
    let millis = Arc::new(AtomicI64::new(start.timestamp_millis()));
    let clock = Arc::clone(&millis);
    let day = MarketoDay::with_clock(
        chrono_tz::America::Chicago,
        Arc::new(move || {
            DateTime::from_timestamp_millis(clock.load(Ordering::SeqCst)).expect("a time in range")
        }),
    );
    (day, millis)
}

/// A deadline no test reaches.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Whether an enqueue would get a place in `queue` at once (it is given
/// back at once).
async fn room_now(jobs: &Arc<BulkJobs>, queue: Queue) -> bool {
    jobs.admit(queue, jobs.internal(), Instant::now()).await.is_ok()
}

fn has_line(metrics: &Metrics, line: &str) -> bool {
    metrics.render().lines().any(|metric| metric == line)
}

/// Marketo answered the bulk call `method` `path` of `service` with
/// success and `results`.
async fn answered(jobs: &BulkJobs, service: usize, method: Method, path: &str, results: Value) {
    let endpoint = Endpoint::parse(&method, path).expect("a bulk call");
    let body = json!({"requestId": "e42b#1", "success": true, "result": results});
    jobs.observe(&endpoint, service, Some(&Bytes::from(body.to_string())))
        .await;
}

/// Marketo refused the bulk call `method` `path` with `code` and `message`.
async fn refused(jobs: &BulkJobs, method: Method, path: &str, code: &str, message: &str) {
    let endpoint = Endpoint::parse(&method, path).expect("a bulk call");
    jobs.observe(&endpoint, CRM, Some(&error_body(code, message)))
        .await;
}

fn error_body(code: &str, message: &str) -> Bytes {
    let body =
        json!({"requestId": "e42b#1", "success": false, "errors": [{"code": code, "message": message}]});
    Bytes::from(body.to_string())
}

async fn created(jobs: &BulkJobs, service: usize, id: &str) {
    let result = json!([{"exportId": id, "status": "Created", "format": "CSV"}]);
    answered(
        jobs,
        service,
        Method::POST,
        "/bulk/v1/leads/export/create.json",
        result,
    )
    .await;
}

async fn enqueued(jobs: &BulkJobs, service: usize, id: &str) {
    let path = format!("/bulk/v1/leads/export/{id}/enqueue.json");
    let result = json!([{"exportId": id, "status": "Queued"}]);
    answered(jobs, service, Method::POST, &path, result).await;
}

/// An enqueue of `service` as the layer makes it: a place, Marketo's
/// answer, the place given back.
async fn enqueue(jobs: &Arc<BulkJobs>, service: usize, id: &str) {
    let place = jobs
        .admit(Queue::Extract, service, Instant::now())
        .await
        .expect("room in the queue");
    enqueued(jobs, service, id).await;
    drop(place);
}

async fn status(jobs: &BulkJobs, service: usize, id: &str, state: &str, file_size: Option<u64>) {
    let path = format!("/bulk/v1/leads/export/{id}/status.json");
    let mut result = json!({"exportId": id, "status": state});
    if let Some(size) = file_size {
        result["fileSize"] = json!(size);
    }
    answered(jobs, service, Method::GET, &path, json!([result])).await;
}

fn service_day(usage: &BulkUsage, name: &str) -> ServiceDay {
    usage
        .services
        .iter()
        .find(|(service, _)| service == name)
        .map(|(_, day)| *day)
        .expect("every service is listed")
}

#[tokio::test]
async fn an_enqueue_holds_its_place_until_its_reservation_drops() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 2 }");
    let first = jobs.admit(Queue::Extract, CRM, far()).await.expect("room");
    let second = jobs.admit(Queue::Extract, FORMS, far()).await.expect("room");
    assert!(
        !room_now(&jobs, Queue::Extract).await,
        "two places held in a queue of two"
    );
    assert!(room_now(&jobs, Queue::Import).await, "the import queue is apart");
    assert_eq!(jobs.usage().extract_in_queue, 0, "a place held is not a job");
    drop(first);
    assert!(room_now(&jobs, Queue::Extract).await);
    drop(second);
}

#[tokio::test]
async fn a_queued_job_keeps_its_place_until_it_completes_and_a_late_status_does_not_bring_it_back() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1 }");
    let poller = jobs.internal();
    created(&jobs, CRM, "e1").await;
    assert!(
        room_now(&jobs, Queue::Extract).await,
        "a created export is in no queue"
    );
    enqueue(&jobs, CRM, "e1").await;
    assert!(
        !room_now(&jobs, Queue::Extract).await,
        "the job holds the place its enqueue had"
    );
    assert_eq!(jobs.usage().extract_in_queue, 1);
    status(&jobs, poller, "e1", "Processing", None).await;
    assert!(!room_now(&jobs, Queue::Extract).await);
    status(&jobs, poller, "e1", "Completed", Some(10)).await;
    assert!(room_now(&jobs, Queue::Extract).await);
    // An older answer arriving late (two status calls crossing).
    status(&jobs, CRM, "e1", "Processing", None).await;
    assert!(room_now(&jobs, Queue::Extract).await);
    assert_eq!(jobs.usage().extract_in_queue, 0);
}

#[tokio::test]
async fn a_cancelled_job_hands_its_place_to_the_next_waiter() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1 }");
    enqueue(&jobs, CRM, "e1").await;
    let mut waiter = Box::pin(jobs.admit(Queue::Extract, FORMS, far()));
    assert!((&mut waiter).now_or_never().is_none(), "the queue is full");
    let path = "/bulk/v1/leads/export/e1/cancel.json";
    let result = json!([{"exportId": "e1", "status": "Cancelled"}]);
    answered(&jobs, CRM, Method::POST, path, result).await;
    let place = (&mut waiter)
        .now_or_never()
        .expect("granted when the job left")
        .expect("a place");
    assert!(
        !room_now(&jobs, Queue::Extract).await,
        "the waiter holds the freed place"
    );
    drop(place);
    assert!(room_now(&jobs, Queue::Extract).await);
}

#[tokio::test]
async fn waiters_of_one_service_get_places_in_arrival_order() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1 }");
    let held = jobs.admit(Queue::Extract, CRM, far()).await.expect("room");
    let mut first = Box::pin(jobs.admit(Queue::Extract, CRM, far()));
    let mut second = Box::pin(jobs.admit(Queue::Extract, CRM, far()));
    let mut third = Box::pin(jobs.admit(Queue::Extract, CRM, far()));
    assert!((&mut first).now_or_never().is_none());
    assert!((&mut second).now_or_never().is_none());
    assert!((&mut third).now_or_never().is_none());
    drop(held);
    let place = (&mut first)
        .now_or_never()
        .expect("the first waiter goes first")
        .expect("a place");
    assert!((&mut second).now_or_never().is_none());
    assert!((&mut third).now_or_never().is_none());
    drop(place);
    let place = (&mut second)
        .now_or_never()
        .expect("then the second")
        .expect("a place");
    assert!((&mut third).now_or_never().is_none());
    drop(place);
    let place = (&mut third)
        .now_or_never()
        .expect("then the third")
        .expect("a place");
    drop(place);
}

#[tokio::test]
async fn a_freed_place_goes_to_the_service_with_the_fewest_jobs_in_the_queue() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 3 }");
    enqueue(&jobs, CRM, "e1").await;
    enqueue(&jobs, CRM, "e2").await;
    // crm's third enqueue is with Marketo: the queue is full.
    let held = jobs.admit(Queue::Extract, CRM, far()).await.expect("room");
    let mut crm = Box::pin(jobs.admit(Queue::Extract, CRM, far()));
    assert!((&mut crm).now_or_never().is_none());
    let mut forms = Box::pin(jobs.admit(Queue::Extract, FORMS, far()));
    assert!((&mut forms).now_or_never().is_none());
    drop(held);
    let place = (&mut forms)
        .now_or_never()
        .expect("forms, with no job in the queue, goes before crm, which waited longer")
        .expect("a place");
    assert!((&mut crm).now_or_never().is_none());
    drop(place);
    let place = (&mut crm)
        .now_or_never()
        .expect("crm gets the next place")
        .expect("a place");
    drop(place);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_deadline_passes_gets_a_local_1029() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1, pause: 10s }");
    let held = jobs.admit(Queue::Extract, CRM, far()).await.expect("room");
    let asked = Instant::now();
    let error = jobs
        .admit(Queue::Extract, FORMS, asked + Duration::from_secs(5))
        .await
        .err()
        .expect("no place before the deadline");
    assert!(Instant::now() >= asked + Duration::from_secs(5), "it waited");
    assert_eq!(
        error,
        BulkError::QueueFull {
            queue: Queue::Extract,
            retry_after: Duration::from_secs(10),
        }
    );
    let response = ProxyError::from(error).into_response();
    assert_eq!(response.status(), StatusCode::OK, "as Marketo answers it");
    assert_eq!(response.headers()[header::RETRY_AFTER], "10");
    assert_eq!(marketo_code(response).await, "1029");
    drop(held);
    assert!(room_now(&jobs, Queue::Extract).await);
}

#[tokio::test]
async fn export_bytes_are_counted_once_per_completed_export() {
    let (jobs, metrics) = bulk_jobs("{ export_daily_bytes: 1000 }");
    let poller = jobs.internal();
    created(&jobs, CRM, "e1").await;
    enqueue(&jobs, CRM, "e1").await;
    status(&jobs, poller, "e1", "Processing", None).await;
    status(&jobs, poller, "e1", "Completed", Some(600)).await;
    status(&jobs, poller, "e1", "Completed", Some(600)).await;
    // The client reads the status too.
    status(&jobs, CRM, "e1", "Completed", Some(600)).await;
    // An export started outside the proxy: the day's, no service's.
    status(&jobs, poller, "x9", "Completed", Some(100)).await;
    let usage = jobs.usage();
    assert_eq!(usage.export_bytes, 700);
    assert_eq!(usage.export_bytes_limit, 1000);
    assert_eq!(usage.export_bytes_remaining, 300);
    assert_eq!(
        service_day(&usage, "crm"),
        ServiceDay {
            jobs: 1,
            export_bytes: 600
        }
    );
    assert_eq!(service_day(&usage, "forms"), ServiceDay::default());
    let text = metrics.render();
    for line in [
        r#"marketo_proxy_bulk_export_bytes_total{service="crm"} 600"#,
        r#"marketo_proxy_bulk_export_bytes_total{service="forms"} 0"#,
        "marketo_proxy_bulk_export_bytes_remaining 300",
    ] {
        assert!(has_line(&metrics, line), "{line} missing in\n{text}");
    }
}

#[tokio::test]
async fn exports_are_refused_locally_once_the_days_bytes_are_spent_until_the_reset() {
    // 23:00 in Chicago (CST): the day resets in an hour.
    let (day, clock) = chicago_day_at("2026-11-28T23:00:00-06:00");
    let (jobs, metrics) = bulk_jobs_on("{ export_daily_bytes: 1000 }", day);
    let poller = jobs.internal();
    enqueue(&jobs, CRM, "e1").await;
    status(&jobs, poller, "e1", "Completed", Some(600)).await;
    assert!(jobs.check_export_bytes().await.is_ok(), "400 bytes are left");
    enqueue(&jobs, FORMS, "e2").await;
    status(&jobs, poller, "e2", "Completed", Some(400)).await;
    // Still in a queue at midnight.
    enqueue(&jobs, FORMS, "e3").await;
    let error = jobs
        .check_export_bytes()
        .await
        .expect_err("the day's bytes are spent");
    assert_eq!(
        error,
        BulkError::ExportQuota {
            retry_after: Duration::from_secs(3600)
        }
    );
    assert_eq!(
        marketo_code(ProxyError::from(error).into_response()).await,
        "1029"
    );
    assert_eq!(jobs.usage().export_bytes_remaining, 0);
    assert!(has_line(&metrics, "marketo_proxy_bulk_export_bytes_remaining 0"));
    // Past midnight the bytes and the day's counts start again; the job
    // still in the queue keeps its place.
    clock.fetch_add(3_600_001, Ordering::SeqCst);
    assert!(jobs.check_export_bytes().await.is_ok());
    let usage = jobs.usage();
    assert_eq!(usage.day, "2026-11-29".parse::<NaiveDate>().expect("a date"));
    assert_eq!(usage.export_bytes, 0);
    assert_eq!(usage.export_bytes_remaining, 1000);
    assert_eq!(service_day(&usage, "forms"), ServiceDay::default());
    assert_eq!(usage.extract_in_queue, 1);
}

#[tokio::test]
async fn marketos_export_quota_answer_refuses_later_exports_and_its_queue_full_answer_does_not() {
    let (jobs, metrics) = bulk_jobs("{}");
    let full = error_body("1029", "Too many jobs in queue");
    assert!(says_full(Queue::Extract, Some(&full)));
    refused(
        &jobs,
        Method::POST,
        "/bulk/v1/leads/export/e1/enqueue.json",
        "1029",
        "Too many jobs in queue",
    )
    .await;
    assert!(
        jobs.check_export_bytes().await.is_ok(),
        "a full queue is not the day's bytes"
    );
    let spent = error_body("1029", "Export daily quota exceeded");
    assert!(!says_full(Queue::Extract, Some(&spent)));
    refused(
        &jobs,
        Method::POST,
        "/bulk/v1/leads/export/create.json",
        "1029",
        "Export daily quota exceeded",
    )
    .await;
    assert!(matches!(
        jobs.check_export_bytes().await,
        Err(BulkError::ExportQuota { .. })
    ));
    assert_eq!(
        jobs.usage().export_bytes,
        0,
        "Marketo's word, not bytes the proxy saw"
    );
    assert!(has_line(&metrics, "marketo_proxy_bulk_export_bytes_remaining 0"));
}

#[tokio::test]
async fn usage_counts_each_queues_jobs_whoever_started_them_and_each_services_starts_once() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 3 }");
    let poller = jobs.internal();
    created(&jobs, CRM, "e1").await;
    enqueue(&jobs, CRM, "e1").await;
    // A replayed enqueue answered again.
    enqueued(&jobs, CRM, "e1").await;
    let import = json!([{"batchId": 7, "status": "Queued"}]);
    answered(&jobs, FORMS, Method::POST, "/bulk/v1/leads.json", import).await;
    // Two exports started elsewhere, named by a list the poller read.
    let listed = json!([
        {"exportId": "x1", "status": "Queued"},
        {"exportId": "x2", "status": "Processing"},
    ]);
    answered(
        &jobs,
        poller,
        Method::GET,
        "/bulk/v1/activities/export.json",
        listed,
    )
    .await;
    let usage = jobs.usage();
    assert_eq!(
        usage.day,
        Utc::now()
            .with_timezone(&chrono_tz::America::Chicago)
            .date_naive()
    );
    assert_eq!(usage.extract_in_queue, 3);
    assert_eq!(usage.import_in_queue, 1);
    assert!(
        !room_now(&jobs, Queue::Extract).await,
        "jobs started elsewhere hold places too"
    );
    let one_job = ServiceDay {
        jobs: 1,
        export_bytes: 0,
    };
    assert_eq!(
        usage.services,
        vec![
            ("crm".to_owned(), one_job),
            ("forms".to_owned(), one_job),
            (crate::config::INTERNAL_SERVICE.to_owned(), ServiceDay::default()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn next_poll_asks_about_jobs_in_a_queue_not_heard_of_for_a_while() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1, poll_after: 60s, poll_pace: 2s }");
    let poller = jobs.internal();
    created(&jobs, CRM, "e0").await;
    enqueue(&jobs, CRM, "e1").await;
    assert_eq!(jobs.next_poll(), None, "just heard of");
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(jobs.next_poll(), None);
    tokio::time::advance(Duration::from_secs(1)).await;
    let e1 = "/bulk/v1/leads/export/e1/status.json".to_owned();
    assert_eq!(jobs.next_poll(), Some((e1.clone(), poller)), "e0 is in no queue");
    assert_eq!(jobs.next_poll(), None, "asked about just now");
    // Someone waiting for a place changes nothing about how often a job
    // is read (Marketo updates its status once a minute at most), only
    // whose call it is.
    let mut waiter = Box::pin(jobs.admit(Queue::Extract, FORMS, far()));
    assert!((&mut waiter).now_or_never().is_none());
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(jobs.next_poll(), None);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(jobs.next_poll(), Some((e1, FORMS)), "for the service that waits");
    drop(waiter);
    status(&jobs, poller, "e1", "Completed", Some(1)).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(
        jobs.next_poll(),
        None,
        "a job out of the queue is not asked about"
    );
}

#[tokio::test(start_paused = true)]
async fn a_clients_status_call_or_download_is_heard_as_the_proxys_own() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 1, poll_after: 60s }");
    enqueue(&jobs, CRM, "e1").await;
    tokio::time::advance(Duration::from_secs(50)).await;
    // The client asks itself: no call of the proxy's own for a minute.
    status(&jobs, CRM, "e1", "Processing", None).await;
    tokio::time::advance(Duration::from_secs(50)).await;
    assert_eq!(jobs.next_poll(), None);
    assert!(!room_now(&jobs, Queue::Extract).await);
    // It downloads the file: the job is over, its place free.
    let file = Endpoint::parse(&Method::GET, "/bulk/v1/leads/export/e1/file.json").expect("a bulk call");
    jobs.file_served(&file, CRM).await;
    assert!(room_now(&jobs, Queue::Extract).await);
}

#[tokio::test]
async fn a_job_is_known_by_the_id_marketo_gave_and_no_other_spelling() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 2 }");
    // Marketo's answer names the job: its id, not the path's spelling.
    let place = jobs
        .admit(Queue::Extract, CRM, Instant::now())
        .await
        .expect("room");
    answered(
        &jobs,
        CRM,
        Method::POST,
        "/bulk/v1/leads/export/E1/enqueue.json",
        json!([{"exportId": "e1", "status": "Queued"}]),
    )
    .await;
    drop(place);
    assert_eq!(jobs.usage().extract_in_queue, 1);
    // A status answer without an id, for a spelling Marketo never gave,
    // is no job; for the id it gave, it is that job.
    answered(
        &jobs,
        CRM,
        Method::GET,
        "/bulk/v1/leads/export/E1/status.json",
        json!([{"status": "Completed"}]),
    )
    .await;
    assert_eq!(jobs.usage().extract_in_queue, 1);
    answered(
        &jobs,
        CRM,
        Method::GET,
        "/bulk/v1/leads/export/e1/status.json",
        json!([{"status": "Completed"}]),
    )
    .await;
    assert_eq!(jobs.usage().extract_in_queue, 0);
    // Nor does a download under another spelling free anything.
    enqueue(&jobs, CRM, "e2").await;
    let file = Endpoint::parse(&Method::GET, "/bulk/v1/leads/export/E2/file.json").expect("a bulk call");
    jobs.file_served(&file, CRM).await;
    assert_eq!(jobs.usage().extract_in_queue, 1);
}

#[tokio::test(start_paused = true)]
async fn marketo_saying_full_pauses_the_queue_and_rereads_its_jobs() {
    let (jobs, _) = bulk_jobs("{ extract_queue: 2, pause: 10s }");
    let poller = jobs.internal();
    enqueue(&jobs, CRM, "e1").await;
    jobs.marketo_says_full(Queue::Extract);
    assert!(
        !room_now(&jobs, Queue::Extract).await,
        "paused, though the proxy sees a free place"
    );
    assert!(room_now(&jobs, Queue::Import).await);
    for list in [
        "/bulk/v1/leads/export.json?status=Queued,Processing",
        "/bulk/v1/activities/export.json?status=Queued,Processing",
        "/bulk/v1/program/members/export.json?status=Queued,Processing",
    ] {
        assert_eq!(jobs.next_poll(), Some((list.to_owned(), poller)));
    }
    assert_eq!(jobs.next_poll(), None, "each list once");
    // A job leaving ends the pause at once.
    status(&jobs, poller, "e1", "Completed", Some(1)).await;
    assert!(room_now(&jobs, Queue::Extract).await);
    // Otherwise the pause ends on its own, and hands its place to a waiter.
    jobs.marketo_says_full(Queue::Import);
    let mut waiter = Box::pin(jobs.admit(Queue::Import, FORMS, far()));
    assert!((&mut waiter).now_or_never().is_none());
    tokio::time::sleep(Duration::from_secs(10) + Duration::from_millis(1)).await;
    let place = (&mut waiter)
        .now_or_never()
        .expect("granted when the pause ended")
        .expect("a place");
    drop(place);
}
