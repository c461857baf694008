//! Faults end to end: Marketo (the simulator) drops connections, hangs,
//! answers slowly, with 5xx, with transient error codes or with answers
//! that are not its usual envelope; its identity service goes down; its
//! tokens are revoked or expire; the proxy itself is stopped or killed.
//! Each test drives concurrent reads and writes from two services through
//! the proxy while the fault happens, then checks what must hold whatever
//! Marketo does:
//!
//! - every client got an answer, and it is what Marketo answered the
//!   request's last call (or, for a call Marketo never answered, the
//!   proxy's Marketo-shaped 604/608): never a hang, never a bare
//!   connection error; only the calls the replay policy allows were sent
//!   again (a write only after an answer that says it was not executed);
//! - nothing leaked: once the load is over no call is in flight, the
//!   window empties, and every unit of the day's quota the proxy counted
//!   is a call the simulator received, each once;
//! - Marketo never had to refuse a call (no 606, no 615) and never saw
//!   more calls in a window or in flight than its limits.
//!
//! Every request names its service and its number in the query, so the
//! simulator's record of arrivals says which request each call was for.
//! Small limits (10 calls a second, 4 in flight) keep each test short.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use marketo_proxy::app;
use marketo_proxy::config::Config;
use marketo_proxy::proxy::replay::MAX_ATTEMPTS;
use marketo_proxy::sim::{
    Arrival, FailNext, Failure, Faults, PADDING_HEADER, SimConfig, SimHandle, Simulator, Stats,
};
use serde_json::{Value, json};
use support::{CRM_KEY, Stack, WAREHOUSE_KEY, eventually};
use tokio::task::JoinSet;

const WINDOW_CALLS: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);
const CONCURRENCY: u32 = 4;
/// Time each call takes at the simulator, so that calls overlap.
const LATENCY: Duration = Duration::from_millis(30);
/// Requests per test: two windows' worth.
const LOAD: usize = 20;
/// No client waits longer than this; a request that does has hung.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the proxy to give everything back after the load: a
/// call that got no answer keeps its slot 10 s (Marketo may still be
/// executing it).
const SETTLE: Duration = Duration::from_secs(15);

/// The services of [`support::proxy_config`] and their keys.
const SERVICES: [(&str, &str); 2] = [("crm-sync", CRM_KEY), ("warehouse", WAREHOUSE_KEY)];

/// A simulator with the small limits.
fn sim_config() -> SimConfig {
    SimConfig {
        window_calls: WINDOW_CALLS,
        window: WINDOW,
        concurrency: CONCURRENCY,
        latency: LATENCY,
        ..support::sim_config()
    }
}

/// The proxy's `limits:`, the same as the simulator's.
fn limits() -> String {
    format!(
        "{{ window_calls: {WINDOW_CALLS}, window: {}ms, concurrency: {CONCURRENCY} }}",
        WINDOW.as_millis()
    )
}

/// A proxy with the small limits in front of a simulator with the same,
/// with `extra_marketo` under `marketo:`, ready to call.
async fn start(extra_marketo: &str) -> Stack {
    let stack = Stack::start_configured(sim_config(), |sim_url| {
        support::proxy_config_with(
            sim_url,
            extra_marketo,
            &limits(),
            "{ file: ~, usage_sync_interval: 0s }",
        )
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    stack
}

/// The same proxy, keeping the day's usage in `file` and reconciling with
/// Marketo's usage report every `usage_sync` (`0s`: never).
fn ledger_config(sim_url: &str, file: &Path, usage_sync: &str) -> Config {
    support::proxy_config_with(
        sim_url,
        "",
        &limits(),
        &format!(
            "{{ file: '{}', usage_sync_interval: {usage_sync} }}",
            file.display()
        ),
    )
}

// ------------------------------------------------------------------ load

/// What a client got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// `success:true`, with its HTTP status.
    Ok(u16),
    /// A Marketo-shaped error: `success:false` and a code.
    Error(u16, String),
    /// Anything else, as it arrived.
    Other(u16, String),
    /// No answer: the connection was closed or refused (never a timeout).
    Closed(String),
}

impl Answer {
    fn read(status: u16, text: String) -> Self {
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match (&body["success"], body["errors"][0]["code"].as_str()) {
            (Value::Bool(true), _) => Self::Ok(status),
            (Value::Bool(false), Some(code)) => Self::Error(status, code.to_owned()),
            _ => Self::Other(status, text),
        }
    }

    /// The proxy's own answer when Marketo is out of reach.
    fn is_608_in_503(&self) -> bool {
        matches!(self, Self::Error(503, code) if code == "608")
    }
}

/// One client's request and what it got.
#[derive(Debug)]
struct Reply {
    request: usize,
    write: bool,
    answer: Answer,
    /// Length of the simulator's padding header, if the answer had one.
    padding: Option<usize>,
}

/// Request `request` is from service `request % 2`; every third request of
/// a service is a write, the rest are reads.
fn is_write(request: usize) -> bool {
    (request / 2) % 3 == 2
}

async fn send(http: reqwest::Client, base: String, request: usize) -> Reply {
    let (name, key) = SERVICES[request % 2];
    let write = is_write(request);
    let query = format!("caller={name}&request={request}");
    let builder = if write {
        http.post(format!("{base}/rest/v1/leads.json?{query}"))
            .json(&json!({"input": [{"email": format!("fault-{request}@example.com")}]}))
    } else {
        http.get(format!("{base}/rest/v1/lead/{}.json?{query}", request + 1))
    };
    let closed = |error: reqwest::Error| {
        assert!(!error.is_timeout(), "request {request} hung: {error:?}");
        Answer::Closed(format!("{error:?}"))
    };
    let (answer, padding) = match builder
        .header("X-Api-Key", key)
        .timeout(CLIENT_TIMEOUT)
        .send()
        .await
    {
        Err(error) => (closed(error), None),
        Ok(response) => {
            let status = response.status().as_u16();
            let padding = response.headers().get(PADDING_HEADER).map(|value| value.len());
            match response.text().await {
                Ok(text) => (Answer::read(status, text), padding),
                Err(error) => (closed(error), padding),
            }
        }
    };
    Reply {
        request,
        write,
        answer,
        padding,
    }
}

/// Sends [`LOAD`] requests through the proxy at `base`, all at once.
fn start_load(base: &str) -> JoinSet<Reply> {
    let http = support::client();
    let mut load = JoinSet::new();
    for request in 0..LOAD {
        load.spawn(send(http.clone(), base.to_owned(), request));
    }
    load
}

/// Every client's reply, in request order.
async fn finish(load: JoinSet<Reply>) -> Vec<Reply> {
    let mut replies = load.join_all().await;
    replies.sort_by_key(|reply| reply.request);
    replies
}

/// Waits until the simulator has answered `calls` calls: the load is
/// under way, and the window holds the rest of it back.
async fn when_answered(sim: &SimHandle, calls: u64) {
    eventually(Duration::from_secs(10), async || {
        let answered = sim.stats().calls;
        if answered >= calls { Ok(()) } else { Err(answered) }
    })
    .await;
}

/// Runs the load through `stack` and injects `faults`, in order, once it
/// is under way; every client's reply.
async fn under_load(stack: &Stack, faults: impl IntoIterator<Item = Faults>) -> Vec<Reply> {
    let load = start_load(&stack.proxy.url());
    when_answered(&stack.sim, 4).await;
    for faults in faults {
        stack.sim.inject(faults);
    }
    finish(load).await
}

// ------------------------------------------------------------ invariants

/// The request a call was for, from its query.
fn request_of(arrival: &Arrival) -> Option<usize> {
    let (_, query) = arrival.target.split_once('?')?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "request")
        .and_then(|(_, value)| value.parse().ok())
}

/// Answers after which a call may be sent again: any that says the call
/// was not executed, and for reads also the transient failures.
fn may_replay(code: &str, write: bool) -> bool {
    let not_executed = matches!(code, "601" | "602" | "606" | "615");
    let transient = matches!(
        code,
        "604" | "608" | "611" | "713" | "http_502" | "http_503" | "dropped" | "hung" | "cancelled"
    );
    not_executed || (!write && transient)
}

/// What the client gets when Marketo's last answer to its request was
/// recorded as `code`; `None` for an injected body, passed on as it was.
fn expected_answer(code: &str) -> Option<Answer> {
    Some(match code {
        "ok" => Answer::Ok(200),
        // No answer: the proxy says Marketo is out of reach, or too slow.
        "dropped" => Answer::Error(502, "608".into()),
        "hung" | "cancelled" => Answer::Error(504, "604".into()),
        "body" => return None,
        code => match code.strip_prefix("http_") {
            Some(status) => Answer::Error(status.parse().unwrap(), status.into()),
            None => Answer::Error(200, code.into()),
        },
    })
}

/// Every client got Marketo's answer to its request's last call, or an
/// answer `local` allows the proxy to give itself; each request was sent
/// again only as the replay policy allows.
fn assert_answers_follow_marketo(replies: &[Reply], stats: &Stats, local: impl Fn(&Answer) -> bool) {
    assert_eq!(replies.len(), LOAD);
    for reply in replies {
        let calls: Vec<&Arrival> = stats
            .arrivals
            .iter()
            .filter(|arrival| request_of(arrival) == Some(reply.request))
            .collect();
        let codes: Vec<&str> = calls.iter().map(|arrival| arrival.code.as_str()).collect();
        let what = format!(
            "request {} (write: {}) after {codes:?}",
            reply.request, reply.write
        );
        assert!(calls.len() <= MAX_ATTEMPTS as usize, "{what}: too many calls");
        if let Some((_, earlier)) = codes.split_last() {
            for code in earlier {
                assert!(may_replay(code, reply.write), "{what}: sent again after {code}");
            }
        }
        if local(&reply.answer) {
            continue;
        }
        let last = codes
            .last()
            .unwrap_or_else(|| panic!("{what}: never sent, yet {:?}", reply.answer));
        match expected_answer(last) {
            Some(expected) => assert_eq!(reply.answer, expected, "{what}"),
            None => assert!(
                matches!(reply.answer, Answer::Other(..)),
                "{what}: {:?}",
                reply.answer
            ),
        }
    }
}

/// No answer is the proxy's own.
fn none(_: &Answer) -> bool {
    false
}

/// Once the load is over the proxy gives every slot back, and every unit
/// of quota it counted, per service, is a call the simulator received.
async fn assert_nothing_lost(stack: &Stack) {
    assert_slots_free_and_counts_match(&stack.proxy.admin_url(), &stack.sim).await;
}

async fn assert_slots_free_and_counts_match(admin_url: &str, sim: &SimHandle) {
    eventually(SETTLE, async || {
        let metrics = support::metrics_text(admin_url).await;
        let usage = support::usage(admin_url).await;
        let stats = sim.stats();
        let gauge = |series: &str| support::metric(&metrics, series);
        // Marketo does not count a call answered 601, 602, 604, 605, 608
        // or 611, and neither does the proxy.
        let counted = || {
            stats
                .arrivals
                .iter()
                .filter(|arrival| !marketo_proxy::marketo::is_uncounted(&arrival.code))
        };
        let mut seen = vec![
            ("in flight", gauge("marketo_proxy_inflight"), Some(0.0)),
            ("window", gauge("marketo_proxy_window_used"), Some(0.0)),
            (
                "counted today",
                usage["used"].as_f64(),
                Some(counted().count() as f64),
            ),
        ];
        for (name, _) in SERVICES {
            let received = counted()
                .filter(|arrival| arrival.target.contains(&format!("caller={name}&")))
                .count();
            let series = format!("marketo_proxy_daily_used{{service=\"{name}\"}}");
            seen.push((name, gauge(&series), Some(received as f64)));
        }
        if seen.iter().all(|(_, value, expected)| value == expected) {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;
}

/// Marketo never refused a call for rate or concurrency and never saw more
/// than its limits.
fn assert_within_marketos_limits(stats: &Stats) {
    assert_eq!(stats.code("606"), 0, "{:?}", stats.codes);
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    assert!(
        stats.max_in_window <= WINDOW_CALLS,
        "{} calls in one window",
        stats.max_in_window
    );
    assert!(
        stats.max_in_flight <= CONCURRENCY,
        "{} calls in flight",
        stats.max_in_flight
    );
}

/// The checks every fault test ends with; the simulator's record.
async fn assert_survived(stack: &Stack, replies: &[Reply], local: impl Fn(&Answer) -> bool) -> Stats {
    assert_nothing_lost(stack).await;
    let stats = stack.sim.stats();
    assert_answers_follow_marketo(replies, &stats, local);
    assert_within_marketos_limits(&stats);
    stats
}

/// Every read succeeded: the replays absorbed the fault.
fn assert_reads_succeeded(replies: &[Reply]) {
    let failed: Vec<&Reply> = replies
        .iter()
        .filter(|reply| !reply.write && reply.answer != Answer::Ok(200))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

fn count(replies: &[Reply], wanted: impl Fn(&Reply) -> bool) -> usize {
    replies.iter().filter(|reply| wanted(reply)).count()
}

// ---------------------------------------------------------------- faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_replay_reads_and_answer_writes_with_608() {
    let stack = start("").await;
    let replies = under_load(
        &stack,
        [Faults {
            drop_next: 4,
            ..Faults::default()
        }],
    )
    .await;
    let stats = assert_survived(&stack, &replies, none).await;
    assert_eq!(stats.code("dropped"), 4);
    assert_reads_succeeded(&replies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_are_waited_for_within_the_concurrency_limit() {
    let stack = start("").await;
    let replies = under_load(
        &stack,
        [Faults {
            extra_latency: Some(Duration::from_millis(400)),
            ..Faults::default()
        }],
    )
    .await;
    let stats = assert_survived(&stack, &replies, none).await;
    assert_eq!(stats.ok, LOAD as u64, "{:?}", stats.codes);
    assert_eq!(
        stats.max_in_flight, CONCURRENCY,
        "slow answers fill the concurrency limit, never more"
    );
}

/// Calls Marketo does not answer within `request_timeout`: some hang, the
/// others are answered only after it. The proxy gives up on them, replays
/// the reads, answers the writes with 604, and keeps each slot a while
/// (Marketo may still be executing the call) before it gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_not_answered_in_time_replay_reads_answer_writes_with_604_and_free_their_slots() {
    let stack = start("request_timeout: 1s").await;
    let load = start_load(&stack.proxy.url());
    when_answered(&stack.sim, 4).await;
    stack.sim.inject(Faults {
        hang_next: 2,
        extra_latency: Some(Duration::from_millis(1500)),
        ..Faults::default()
    });
    // The proxy gives up on a slow call, and Marketo sees it go.
    eventually(Duration::from_secs(5), async || {
        let cancelled = stack.sim.stats().code("cancelled");
        if cancelled >= 1 { Ok(()) } else { Err(cancelled) }
    })
    .await;
    stack.sim.inject(Faults {
        extra_latency: Some(Duration::ZERO),
        ..Faults::default()
    });
    let replies = finish(load).await;
    let stats = assert_survived(&stack, &replies, none).await;
    assert_eq!(stats.code("hung"), 2);
    assert_reads_succeeded(&replies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_5xx_replay_reads_on_502_and_503_and_pass_the_rest_on() {
    let stack = start("").await;
    let failures = [502, 503, 500].map(|status| support::fail_next_status(2, status));
    let replies = under_load(&stack, failures).await;
    let stats = assert_survived(&stack, &replies, none).await;
    for status in ["http_502", "http_503", "http_500"] {
        assert_eq!(stats.code(status), 2, "{:?}", stats.codes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_error_codes_replay_reads_and_pass_writes_on() {
    let stack = start("").await;
    let failures = ["604", "608", "611", "713"].map(|code| support::fail_next(2, code));
    let replies = under_load(&stack, failures).await;
    let stats = assert_survived(&stack, &replies, none).await;
    for code in ["604", "608", "611", "713"] {
        assert_eq!(stats.code(code), 2, "{:?}", stats.codes);
    }
    // Marketo counts none of those but the 713; the proxy gave back their
    // window slots and units of the day.
    assert_eq!(stats.uncounted, 6);
    let metrics = stack.metrics().await;
    let given_back: f64 = ["604", "608", "611"]
        .iter()
        .flat_map(|code| {
            SERVICES.map(|(service, _)| {
                support::metric(
                    &metrics,
                    &format!(r#"marketo_proxy_uncounted_calls_total{{code="{code}",service="{service}"}}"#),
                )
                .unwrap_or(0.0)
            })
        })
        .sum();
    assert_eq!(given_back, 6.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_storm_of_608s_marketo_did_not_count_the_next_window_admits_its_full_hundred_at_once() {
    // Marketo's real limits, 50 ms a call.
    let sim = SimConfig {
        latency: Duration::from_millis(50),
        ..support::sim_config()
    };
    let stack = Stack::start_configured(sim, |sim_url| {
        support::proxy_config_with(sim_url, "", "{}", "{ file: ~, usage_sync_interval: 0s }")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    // 50 writes, each answered 608 (a write is not replayed).
    stack.sim.inject(support::fail_next(50, "608"));
    let write = |number: usize| {
        let request = stack
            .http
            .post(format!("{}/rest/v1/leads.json?n={number}", stack.proxy.url()))
            .header("X-Api-Key", CRM_KEY)
            .json(&json!({"input": [{"email": format!("storm{number}@example.com")}]}))
            .send();
        async move { request.await.unwrap().text().await.unwrap() }
    };
    let storm = futures_util::future::join_all((0..50).map(write)).await;
    assert!(
        storm.iter().all(|body| body.contains(r#""code":"608""#)),
        "{storm:?}"
    );
    // Marketo is back: 100 reads at once all go within the window the
    // storm did not use.
    let recovered_at = stack.sim.stats().arrivals.len();
    let paths: Vec<String> = (1..=100)
        .map(|lead| format!("/rest/v1/lead/{lead}.json"))
        .collect();
    let reads = paths.iter().map(|path| stack.get(CRM_KEY, path));
    for answer in futures_util::future::join_all(reads).await {
        assert_eq!(answer.status(), 200);
    }
    let stats = stack.sim.stats();
    let recovery = &stats.arrivals[recovered_at..];
    assert_eq!(recovery.len(), 100);
    let took = recovery[99].at - recovery[0].at;
    println!("the 100 calls after the storm reached Marketo within {took:.2} s");
    assert!(
        took < 5.0,
        "the 100 calls after the storm took {took:.1} s: slots were held for the 608s"
    );
    assert_eq!(stats.code("606") + stats.code("615"), 0, "{:?}", stats.codes);
    assert_eq!(stats.uncounted, 50);
    let metrics = stack.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            r#"marketo_proxy_uncounted_calls_total{code="608",service="crm-sync"}"#
        ),
        Some(50.0),
        "{metrics}"
    );
}

fn fail_next(count: u32, failure: Failure) -> Faults {
    Faults {
        fail_next: Some(FailNext { count, failure }),
        ..Faults::default()
    }
}

/// Bodies Marketo should never send: JSON that does not parse, an
/// envelope without `errors`, a gateway's page in a 503.
const ODD_BODIES: [(Option<u16>, &str); 3] = [
    (None, r#"{"requestId":"x#1","success":"#),
    (None, r#"{"requestId":"x#2","success":false}"#),
    (Some(503), "<html>Service Unavailable</html>"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_an_unusual_shape_are_passed_on_and_cost_one_call_each() {
    let stack = start("").await;
    let odd_bodies = ODD_BODIES.map(|(http_status, body)| {
        let failure = Failure {
            http_status,
            body: Some(body.into()),
            ..Failure::default()
        };
        fail_next(1, failure)
    });
    let large_header = Failure {
        header_bytes: Some(60 * 1024),
        ..Failure::default()
    };
    let replies = under_load(&stack, odd_bodies.into_iter().chain([fail_next(2, large_header)])).await;
    // Answers that are not Marketo's envelope are checked below.
    let odd = |answer: &Answer| matches!(answer, Answer::Other(..));
    let stats = assert_survived(&stack, &replies, odd).await;
    assert_eq!(
        (stats.code("body"), stats.code("http_503")),
        (2, 1),
        "{:?}",
        stats.codes
    );
    // Each odd body reached a client as it was, unless it was a gateway's
    // 503 to a read, which was replayed.
    for reply in replies.iter().filter(|reply| odd(&reply.answer)) {
        let Answer::Other(status, text) = &reply.answer else {
            continue;
        };
        let injected = ((*status != 200).then_some(*status), text.as_str());
        assert!(ODD_BODIES.contains(&injected), "{reply:?}");
    }
    assert_eq!(
        count(&replies, |reply| matches!(reply.answer, Answer::Other(200, _))),
        2
    );
    assert_eq!(
        count(&replies, |reply| reply.padding == Some(60 * 1024)),
        2,
        "the 60 KB header reached both clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outage_during_load_is_answered_with_608_until_a_token_can_be_had() {
    let stack = start("").await;
    // Marketo forgets its tokens while identity fails more often than one
    // refresh tries: some requests cannot be authorized.
    let replies = under_load(
        &stack,
        [Faults {
            revoke_tokens: true,
            identity_fail_next: 5,
            ..Faults::default()
        }],
    )
    .await;
    assert_survived(&stack, &replies, Answer::is_608_in_503).await;
    assert!(
        count(&replies, |reply| reply.answer.is_608_in_503()) > 0,
        "the outage was felt: {replies:#?}"
    );
    let after = stack.get(CRM_KEY, "/rest/v1/lead/1.json").await;
    assert_eq!(after.status(), 200, "a token is had again");
}

async fn assert_token_loss_costs_clients_nothing(faults: Faults) {
    let stack = start("").await;
    let boot = stack.sim.stats().identity_calls;
    let replies = under_load(&stack, [faults]).await;
    let stats = assert_survived(&stack, &replies, none).await;
    assert_eq!(
        count(&replies, |reply| reply.answer == Answer::Ok(200)),
        LOAD,
        "{replies:#?}"
    );
    assert_eq!(
        stats.identity_calls - boot,
        2,
        "one new token per credential, however many calls were refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_revoked_during_load_cost_clients_nothing() {
    assert_token_loss_costs_clients_nothing(Faults {
        revoke_tokens: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expired_during_load_cost_clients_nothing() {
    assert_token_loss_costs_clients_nothing(Faults {
        expire_tokens: true,
        ..Faults::default()
    })
    .await;
}

// -------------------------------------------------------------- restarts

/// Today's counts per service in the ledger file.
fn saved_counts(file: &Path) -> Option<Value> {
    let saved: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    Some(saved["services"].clone())
}

/// Answers a client of a proxy that stopped may get: Marketo's, the
/// proxy's 608 while it shuts down, or a closed connection.
fn stopping(answer: &Answer) -> bool {
    answer.is_608_in_503() || matches!(answer, Answer::Closed(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stopped_mid_load_leaves_the_days_usage_to_the_next() {
    let sim = Simulator::spawn(sim_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "0s")).await.unwrap();
    support::wait_ready(&proxy).await;
    let load = start_load(&proxy.url());
    when_answered(&sim, 6).await;
    // SIGTERM: what is queued is answered at once, what is under way ends.
    proxy.shutdown().await.unwrap();
    let replies = finish(load).await;
    let stats = sim.stats();
    assert_answers_follow_marketo(&replies, &stats, stopping);
    assert!(
        count(&replies, |reply| stopping(&reply.answer)) > 0,
        "stopped mid-load"
    );

    // The next proxy counts on from there and keeps to the window its
    // predecessor filled, though it starts while that is still full.
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "0s")).await.unwrap();
    let restored = support::usage(&proxy.admin_url()).await;
    assert_eq!(restored["used"], stats.calls, "{restored}");
    let after = finish(start_load(&proxy.url())).await;
    assert_slots_free_and_counts_match(&proxy.admin_url(), &sim).await;
    assert_within_marketos_limits(&sim.stats());
    assert_eq!(
        count(&after, |reply| reply.answer == Answer::Ok(200)),
        LOAD,
        "{after:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_load_loses_no_call_marketo_counted() {
    // Slow answers: the load is still under way when the ledger is first
    // saved, a few seconds in.
    let sim = Simulator::spawn(SimConfig {
        latency: Duration::from_millis(400),
        ..sim_config()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.json");
    // A runtime of its own, so that dropping it ends every task of the
    // proxy at once, connections and ledger included, as SIGKILL would.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = runtime
        .spawn(app::spawn(ledger_config(&sim.url(), &file, "0s")))
        .await
        .unwrap()
        .unwrap();
    support::wait_ready(&proxy).await;
    let load = start_load(&proxy.url());
    // Killed once the ledger has been saved with some of the calls in it
    // and Marketo has answered one made since, which only Marketo knows.
    let saved_total = eventually(Duration::from_secs(10), async || {
        let saved = saved_counts(&file).and_then(|saved| {
            let counts = saved
                .as_object()?
                .values()
                .map(|calls| calls.as_u64().unwrap_or(0));
            Some(counts.sum::<u64>())
        });
        saved.filter(|total| *total > 0).ok_or(saved)
    })
    .await;
    when_answered(&sim, saved_total + 1).await;
    runtime.shutdown_background();
    drop(proxy);
    let replies = finish(load).await;
    let killed = sim.stats();
    let closed = |answer: &Answer| matches!(answer, Answer::Closed(_));
    assert_answers_follow_marketo(&replies, &killed, closed);
    assert!(
        count(&replies, |reply| closed(&reply.answer)) > 0,
        "killed mid-load"
    );
    assert_within_marketos_limits(&killed);
    let saved = saved_counts(&file).unwrap();

    // The next proxy starts from the saved counts and reads Marketo's own
    // count at once: what the killed proxy had not saved yet is in there.
    // Every call Marketo counted is counted, and no call it did not get.
    let proxy = app::spawn(ledger_config(&sim.url(), &file, "1h")).await.unwrap();
    let usage = eventually(SETTLE, async || {
        let usage = support::usage(&proxy.admin_url()).await;
        let stats = sim.stats();
        let charged = stats
            .arrivals
            .iter()
            .filter(|arrival| !matches!(arrival.code.as_str(), "606" | "607" | "615"))
            .count() as u64;
        let used = usage["used"].as_u64().unwrap();
        if usage["marketo_reported"].is_object() && (charged..=stats.calls).contains(&used) {
            Ok(usage)
        } else {
            Err((usage, charged, stats.calls))
        }
    })
    .await;
    assert_eq!(usage["remaining"], 50_000 - usage["used"].as_u64().unwrap());
    let stats = sim.stats();
    // The successor knows the window only as of the last save: its first
    // calls (Marketo's two reports) may meet a window the killed proxy
    // filled since. Then Marketo refuses them (606), and the proxy pauses
    // and calls again.
    assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
    for refused in stats.arrivals.iter().filter(|arrival| arrival.code == "606") {
        assert!(
            ["/rest/v1/stats/usage.json", "/rest/v1/stats/errors.json"].contains(&refused.target.as_str()),
            "{refused:?}"
        );
    }
    for (index, (name, _)) in SERVICES.iter().enumerate() {
        let restored = &usage["services"][index];
        assert_eq!(restored["name"], *name);
        assert_eq!(restored["used"], saved[name], "restored as saved");
        let received = stats
            .arrivals
            .iter()
            .filter(|arrival| arrival.target.contains(&format!("caller={name}&")))
            .count();
        assert!(
            restored["used"].as_u64().unwrap() <= received as u64,
            "{name}: more saved than Marketo received"
        );
    }
}
