//! Soak: ten minutes of mixed load through one proxy process against
//! `marketo-sim`, with the proxy's resident memory and open descriptors
//! sampled every 10 s, and a verdict whether both stayed flat.
//!
//! Four services share a window small enough (100 calls per 2 s, 10 in
//! flight) that the proxy paces and queues: reads over keep-alive
//! HTTP/1.1, writes over HTTP/2, `_method=GET` form posts
//! each on a new connection with a token from the proxy's identity
//! endpoint, and an old client that sends its token as `access_token`.
//! Every 20 s the simulator is told (`/_sim/faults`) to fail, drop, hang
//! or expire something. Flat means: the average of the last minute is
//! within a few percent of the average of the second minute (the first
//! minute is warm-up: pools, caches and the allocator fill).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use marketo_proxy::sim::Stats;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Mode;
use crate::client::{
    BoxError, RequestSpec, answer, answer_h2, connect_h1, connect_h2, get, is_success, metric_sum, post,
};
use crate::processes::{
    CLIENT_ID, CLIENT_SECRET, free_port, local_addr, open_fds, rss_kib, start_proxy, start_sim,
};
use crate::report::Verdict;

/// How long the soak runs and how it is sampled.
struct SoakPlan {
    run: Duration,
    sample_every: Duration,
    /// How often the simulator is told to misbehave.
    fault_every: Duration,
    /// How often the services that log in fetch a new proxy token.
    login_every: Duration,
    /// The proxy's answer timeout, which ends an injected hang.
    request_timeout: Duration,
    /// Multiplies every service's request rate.
    rate_scale: f64,
}

impl SoakPlan {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Smoke => Self {
                run: Duration::from_secs(6),
                sample_every: Duration::from_millis(500),
                fault_every: Duration::from_millis(700),
                login_every: Duration::from_secs(2),
                request_timeout: Duration::from_secs(1),
                rate_scale: 0.5,
            },
            Mode::Full => Self {
                run: Duration::from_secs(600),
                sample_every: Duration::from_secs(10),
                fault_every: Duration::from_secs(20),
                login_every: Duration::from_secs(60),
                request_timeout: Duration::from_secs(5),
                rate_scale: 1.0,
            },
        }
    }

    /// A tenth of the run: a minute of the full soak.
    fn minute(&self) -> Duration {
        self.run / 10
    }
}

/// The simulator's and the proxy's limits: small, so the proxy paces.
const WINDOW_CALLS: u32 = 100;
const WINDOW_SECONDS: u32 = 2;
const CONCURRENCY: u32 = 10;
const LATENCY: &str = "20ms";

/// The services: name and API key, or name (also the client id) and
/// client secret for those that log in; how each calls is in
/// [`start_clients`].
const CRM: (&str, &str) = ("crm-sync", "soak-key-crm-0123456789");
const FORMS: (&str, &str) = ("forms", "soak-key-forms-0123456789");
const WAREHOUSE: (&str, &str) = ("warehouse", "soak-warehouse-secret-0123456789");
const LEGACY: (&str, &str) = ("legacy", "soak-legacy-secret-0123456789");

/// What the simulator is told in turn, every `fault_every`.
const FAULTS: [&[u8]; 9] = [
    br#"{"fail_next":{"count":3,"code":"606"}}"#,
    br#"{"fail_next":{"count":2,"code":"615"}}"#,
    br#"{"expire_tokens":true}"#,
    br#"{"fail_next":{"count":2,"http_status":503}}"#,
    br#"{"drop_next":1}"#,
    br#"{"fail_next":{"count":2,"code":"604"}}"#,
    br#"{"hang_next":1}"#,
    br#"{"revoke_tokens":true}"#,
    br#"{"fail_next":{"count":2,"code":"611"}}"#,
];

/// One sample of the proxy.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    answered: u64,
    queued: f64,
    in_flight: f64,
}

/// Answers by service and outcome (`ok`, an HTTP status with Marketo's
/// code, or `transport error`).
type Outcomes = Arc<Mutex<BTreeMap<(&'static str, String), u64>>>;

pub async fn run(mode: Mode) -> Vec<Verdict> {
    let plan = SoakPlan::new(mode);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== soak: {:?} of mixed load, {WINDOW_CALLS} calls / {WINDOW_SECONDS} s, {CONCURRENCY} concurrent, \
         simulator latency {LATENCY}; 4 services (reads, writes over HTTP/2, logins and form posts on new \
         connections, access_token in the query) at about {:.0} req/s; a simulator fault every {:?}; \
         proxy RSS and descriptors every {:?}",
        plan.run,
        48.0 * plan.rate_scale,
        plan.fault_every,
        plan.sample_every
    );
    let sim_addr = local_addr(free_port());
    let mut sim = start_sim(
        dir.path(),
        sim_addr,
        &[
            "--window-calls",
            &WINDOW_CALLS.to_string(),
            "--window-seconds",
            &WINDOW_SECONDS.to_string(),
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--latency",
            LATENCY,
            "--daily-quota",
            "100000000",
        ],
    )
    .await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let login = |(name, secret): (&str, &str)| {
        format!("  - {{ name: {name}, client_id: {name}, client_secret: {secret}, weight: 1 }}\n")
    };
    let services = [
        format!("  - {{ name: {}, api_key: {}, weight: 3 }}\n", CRM.0, CRM.1),
        format!("  - {{ name: {}, api_key: {}, weight: 2 }}\n", FORMS.0, FORMS.1),
        login(WAREHOUSE),
        login(LEGACY),
    ]
    .concat();
    let config = format!(
        "listen: {proxy_addr}\nadmin_listen: {admin_addr}\n\
         marketo: {{ base_url: 'http://{sim_addr}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET}, \
         request_timeout: {}ms }}\n\
         limits:\n  window_calls: {WINDOW_CALLS}\n  window: {WINDOW_SECONDS}s\n  safety_margin: 100ms\n  \
         concurrency: {CONCURRENCY}\n  daily_quota: 100000000\n  max_queue_wait: 3s\n\
         services:\n{services}\
         state: {{ file: ~, usage_sync_interval: 0s }}\n",
        plan.request_timeout.as_millis()
    );
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;
    let pid = proxy.pid();

    let started = Instant::now();
    let end = started + plan.run;
    let outcomes: Outcomes = Arc::default();
    let mut load = JoinSet::new();
    start_clients(&mut load, &plan, proxy_addr, end, &outcomes).await;
    load.spawn(inject_faults(sim_addr, plan.fault_every, end));

    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(plan.sample_every);
    loop {
        let tick = ticks.tick().await;
        proxy.check_alive();
        samples.push(sample(pid, admin_addr, started, &outcomes).await);
        if tick >= end {
            break;
        }
    }
    while load.join_next().await.is_some() {}
    proxy.check_alive();
    let stats: Stats =
        serde_json::from_slice(&get(sim_addr, "/_sim/stats").await.expect("simulator stats")).expect("stats");
    sim.check_alive();

    print_samples(&samples);
    let outcomes = outcomes.lock().expect("outcomes").clone();
    print_outcomes(&outcomes, &stats);
    let verdicts = flatness(&plan, &samples);
    if mode == Mode::Smoke {
        for service in [CRM.0, FORMS.0, WAREHOUSE.0, LEGACY.0] {
            let ok = outcomes.get(&(service, "ok".to_owned())).copied().unwrap_or(0);
            assert!(ok > 0, "{service} got no answer: {outcomes:?}");
        }
        let broken: u64 = outcomes
            .iter()
            .filter(|((_, outcome), _)| outcome == "transport error")
            .map(|(_, count)| count)
            .sum();
        assert_eq!(broken, 0, "requests failed below HTTP: {outcomes:?}");
        assert!(samples.iter().all(|sample| sample.rss_kib > 0 && sample.fds > 0));
    }
    drop(proxy);
    verdicts
}

/// The proxy's footprint and progress now.
async fn sample(pid: u32, admin: SocketAddr, started: Instant, outcomes: &Outcomes) -> Sample {
    let metrics = get(admin, "/metrics").await.unwrap_or_default();
    let metrics = String::from_utf8_lossy(&metrics);
    Sample {
        at: started.elapsed(),
        rss_kib: rss_kib(pid),
        fds: open_fds(pid),
        answered: outcomes.lock().expect("outcomes").values().sum(),
        queued: metric_sum(&metrics, "marketo_proxy_queue_depth"),
        in_flight: metric_sum(&metrics, "marketo_proxy_inflight"),
    }
}

/// Every service's clients, each a task until `end`; the services that
/// log in have their first token before they start.
async fn start_clients(
    load: &mut JoinSet<()>,
    plan: &SoakPlan,
    proxy: SocketAddr,
    end: Instant,
    outcomes: &Outcomes,
) {
    let client = |service: &'static str, rate: f64, transport: Transport| Client {
        service,
        proxy,
        every: Duration::from_secs_f64(1.0 / (rate * plan.rate_scale)),
        end,
        transport,
        outcomes: Arc::clone(outcomes),
    };
    // crm-sync: reads, four keep-alive connections, 25 req/s.
    for _ in 0..4 {
        load.spawn(client(CRM.0, 6.25, Transport::KeepAlive).run(move |n| {
            let path = if n % 2 == 0 {
                format!("/rest/v1/lead/{}.json", n % 100 + 1)
            } else {
                "/rest/v1/leads.json?filterType=id&filterValues=1,2,3".to_owned()
            };
            RequestSpec::get(&path).to(proxy).with_key(CRM.1)
        }));
    }
    // forms: createOrUpdate, two HTTP/2 connections, 10 req/s.
    for _ in 0..2 {
        load.spawn(client(FORMS.0, 5.0, Transport::Http2).run(move |n| {
            let body = format!(
                r#"{{"action":"createOrUpdate","input":[{{"email":"soak{}@example.com"}}]}}"#,
                n % 50
            );
            RequestSpec::post("/rest/v1/leads.json", Bytes::from(body))
                .to(proxy)
                .with_key(FORMS.1)
        }));
    }
    // warehouse: logs in, then `_method=GET` form posts, each on a new
    // connection, 8 req/s.
    let warehouse_token = logged_in(load, proxy, WAREHOUSE, plan.login_every, end).await;
    for _ in 0..2 {
        let token = Arc::clone(&warehouse_token);
        load.spawn(client(WAREHOUSE.0, 4.0, Transport::Fresh).run(move |n| {
            let body = format!("filterType=id&filterValues={},{}", n % 100 + 1, n % 100 + 2);
            RequestSpec::post("/rest/v1/leads.json?_method=GET", Bytes::from(body))
                .form()
                .to(proxy)
                .with_bearer(&token.read().expect("token"))
        }));
    }
    // legacy: logs in, then sends the token as `access_token`, 5 req/s.
    let legacy_token = logged_in(load, proxy, LEGACY, plan.login_every, end).await;
    load.spawn(client(LEGACY.0, 5.0, Transport::KeepAlive).run(move |n| {
        let path = format!(
            "/rest/v1/leads.json?filterType=email&filterValues=lead{}@example.com&access_token={}",
            n % 100 + 1,
            token_of(&legacy_token)
        );
        RequestSpec::get(&path).to(proxy)
    }));
}

fn token_of(token: &RwLock<String>) -> String {
    token.read().expect("token").clone()
}

/// How a client reaches the proxy.
#[derive(Clone, Copy)]
enum Transport {
    /// One HTTP/1.1 connection, kept open (a new one after an error).
    KeepAlive,
    /// One HTTP/2 connection per client.
    Http2,
    /// A new HTTP/1.1 connection for every request.
    Fresh,
}

/// One client of one service: a request every `every` until `end`.
struct Client {
    service: &'static str,
    proxy: SocketAddr,
    every: Duration,
    end: Instant,
    transport: Transport,
    outcomes: Outcomes,
}

impl Client {
    async fn run(self, mut request: impl FnMut(u64) -> RequestSpec + Send) {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut kept: Option<Connection> = None;
        for n in 0.. {
            if ticks.tick().await >= self.end {
                break;
            }
            let request = request(n);
            let connection = match kept.take() {
                Some(connection) => Ok(connection),
                None => Connection::open(self.proxy, self.transport).await,
            };
            let answered = match connection {
                Ok(mut connection) => {
                    let answered = connection.answer(&request).await;
                    // Kept for the next request unless it failed or the
                    // client makes a new connection every time.
                    if answered.is_ok() && !matches!(self.transport, Transport::Fresh) {
                        kept = Some(connection);
                    }
                    answered
                }
                Err(error) => Err(error),
            };
            let outcome = outcome(answered);
            *self
                .outcomes
                .lock()
                .expect("outcomes")
                .entry((self.service, outcome))
                .or_default() += 1;
        }
    }
}

/// A client connection to the proxy.
enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    async fn open(proxy: SocketAddr, transport: Transport) -> Result<Self, BoxError> {
        Ok(match transport {
            Transport::Http2 => Self::Http2(connect_h2(proxy).await?),
            Transport::KeepAlive | Transport::Fresh => Self::Http1(connect_h1(proxy).await?),
        })
    }

    async fn answer(&mut self, request: &RequestSpec) -> Result<(StatusCode, Bytes), BoxError> {
        match self {
            Self::Http1(sender) => answer(sender, request).await,
            Self::Http2(sender) => answer_h2(sender, request).await,
        }
    }
}

/// `ok` for a Marketo success; otherwise the HTTP status and Marketo's
/// code, if the answer names one.
fn outcome(answered: Result<(StatusCode, Bytes), BoxError>) -> String {
    match answered {
        Err(_) => "transport error".to_owned(),
        Ok((status, body)) if is_success(status, &body) => "ok".to_owned(),
        Ok((status, body)) => {
            let text = String::from_utf8_lossy(&body);
            match text
                .split(r#""code":""#)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            {
                Some(code) => format!("{} code {code}", status.as_u16()),
                None => status.as_u16().to_string(),
            }
        }
    }
}

/// The proxy token of `service`, fetched now and again every `every`
/// until `end` by a task on `load`.
async fn logged_in(
    load: &mut JoinSet<()>,
    proxy: SocketAddr,
    service: (&'static str, &'static str),
    every: Duration,
    end: Instant,
) -> Arc<RwLock<String>> {
    let token = Arc::new(RwLock::new(String::new()));
    log_in(proxy, service, &token).await;
    let refreshed = Arc::clone(&token);
    load.spawn(async move {
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        while ticks.tick().await < end {
            log_in(proxy, service, &refreshed).await;
        }
    });
    token
}

/// Fetches a proxy token for `service` from the proxy's identity endpoint.
async fn log_in(proxy: SocketAddr, (service, secret): (&str, &str), token: &RwLock<String>) {
    let path = format!(
        "/identity/oauth/token?grant_type=client_credentials&client_id={service}&client_secret={secret}"
    );
    let issued = get(proxy, &path)
        .await
        .ok()
        .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|body| Some(body.get("access_token")?.as_str()?.to_owned()));
    match issued {
        Some(issued) => *token.write().expect("token") = issued,
        None => eprintln!("soak: {service} could not log in"),
    }
}

/// Tells the simulator to misbehave, a different way every `every`.
async fn inject_faults(sim: SocketAddr, every: Duration, end: Instant) {
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    for fault in FAULTS.iter().cycle() {
        if ticks.tick().await >= end {
            return;
        }
        if let Err(error) = post(sim, "/_sim/faults", fault).await {
            eprintln!("soak: cannot inject a fault: {error}");
        }
    }
}

fn print_samples(samples: &[Sample]) {
    println!(
        "{:>8} {:>10} {:>6} {:>9} {:>7} {:>9}",
        "t", "RSS KiB", "fds", "answered", "queued", "in flight"
    );
    for sample in samples {
        println!(
            "{:>7.1}s {:>10} {:>6} {:>9} {:>7.0} {:>9.0}",
            sample.at.as_secs_f64(),
            sample.rss_kib,
            sample.fds,
            sample.answered,
            sample.queued,
            sample.in_flight
        );
    }
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    let most_rss = samples.iter().map(|sample| sample.rss_kib).max().unwrap_or(0);
    let most_fds = samples.iter().map(|sample| sample.fds).max().unwrap_or(0);
    println!(
        "RSS first {} KiB, last {} KiB, most {most_rss} KiB; descriptors first {}, last {}, most {most_fds}",
        first.rss_kib, last.rss_kib, first.fds, last.fds
    );
}

fn print_outcomes(outcomes: &BTreeMap<(&'static str, String), u64>, stats: &Stats) {
    let mut by_service: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((service, outcome), count) in outcomes {
        by_service
            .entry(service)
            .or_default()
            .push(format!("{outcome} {count}"));
    }
    for (service, counts) in by_service {
        println!("{service:<10} {}", counts.join(", "));
    }
    println!(
        "simulator: {} calls, {} ok, {} identity calls, codes {:?}; most admitted in a window {} of {WINDOW_CALLS}, \
         in flight {} of {CONCURRENCY}",
        stats.calls,
        stats.ok,
        stats.identity_calls,
        stats.codes,
        stats.max_admitted_in_window,
        stats.max_admitted_in_flight
    );
}

/// Whether RSS and descriptors stayed flat: the last minute's average
/// against the second minute's.
fn flatness(plan: &SoakPlan, samples: &[Sample]) -> Vec<Verdict> {
    let minute = plan.minute();
    let average = |from: Duration, to: Duration, value: fn(&Sample) -> f64| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|sample| sample.at >= from && sample.at < to)
            .map(value)
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let last_from = plan.run.saturating_sub(minute);
    let after_end = plan.run + plan.sample_every;
    let rss = |sample: &Sample| sample.rss_kib as f64;
    let fds = |sample: &Sample| sample.fds as f64;
    let (rss_second, rss_last) = (
        average(minute, minute * 2, rss),
        average(last_from, after_end, rss),
    );
    let (fds_second, fds_last) = (
        average(minute, minute * 2, fds),
        average(last_from, after_end, fds),
    );
    let rss_change = (rss_last - rss_second) / rss_second.max(1.0);
    let rss_flat = rss_change.abs() <= 0.05;
    let fds_flat = (fds_last - fds_second).abs() <= (fds_second * 0.05).max(3.0);
    println!(
        "second minute against last minute: RSS {rss_second:.0} -> {rss_last:.0} KiB ({:+.1} %): {}; \
         descriptors {fds_second:.1} -> {fds_last:.1}: {}",
        rss_change * 100.0,
        if rss_flat { "flat" } else { "NOT flat" },
        if fds_flat { "flat" } else { "NOT flat" },
    );
    vec![
        Verdict::new(
            "soak: RSS flat (last minute within 5 % of the second)",
            format!(
                "{rss_second:.0} -> {rss_last:.0} KiB ({:+.1} %)",
                rss_change * 100.0
            ),
            rss_flat,
        ),
        Verdict::new(
            "soak: open descriptors flat (last minute within 5 % or 3 of the second)",
            format!("{fds_second:.1} -> {fds_last:.1}"),
            fds_flat,
        ),
    ]
}
