//! Pacing efficiency: Marketo's real limits at the simulator and three
//! services with weights 3:2:1 saturating the proxy. From the simulator's
//! log of arrivals: calls per window, the most in any sliding window,
//! 606/615, how fully the window is used, and fairness against the
//! weights; from the clients: queue wait per service.
//!
//! Then the same load again while a vendor's tool calls the simulator
//! directly, a fifth of the window at a steady pace: what the proxy gets
//! of the rest, how often Marketo refuses it, and how much of the vendor's
//! calls it executes; without Marketo's usage and error reports, and with
//! them read every 10 s for three times as long. And once more with calls
//! as slow and uneven as Marketo's (500 ± 300 ms, every tenth 3 s): when
//! the third batch of a window's calls starts, against the two windows
//! and margins that are the least it could be.

use std::collections::BTreeMap;
use std::time::Duration;

use marketo_proxy::sim::Stats;
use tokio::time::Instant;

use crate::Mode;
use crate::client::{RequestSpec, connect_h1, exchange, get};
use crate::load::percentile;
use crate::processes::{CLIENT_ID, CLIENT_SECRET, free_port, local_addr, start_proxy, start_sim};
use crate::report::{Verdict, secs};

/// How long the pacing scenario runs, and the limits it runs against.
#[derive(Clone, Copy)]
struct PacePlan {
    window_calls: u32,
    window: Duration,
    safety_margin: Duration,
    latency: Duration,
    clients_per_service: usize,
    run: Duration,
    /// Whole windows counted from the first arrival.
    windows: u32,
}

impl PacePlan {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Smoke => Self {
                window_calls: 10,
                window: Duration::from_secs(1),
                safety_margin: Duration::from_millis(50),
                latency: Duration::from_millis(5),
                clients_per_service: 4,
                run: Duration::from_millis(2200),
                windows: 2,
            },
            Mode::Full => Self {
                window_calls: 100,
                window: Duration::from_secs(20),
                safety_margin: Duration::from_millis(250),
                latency: Duration::from_millis(50),
                clients_per_service: 30,
                run: Duration::from_secs(62),
                windows: 3,
            },
        }
    }
}

/// The services of the pacing scenario: name, weight, API key.
const SERVICES: [(&str, u32, &str); 3] = [
    ("crm-sync", 3, "bench-key-crm-0123456789"),
    ("forms", 2, "bench-key-forms-0123456789"),
    ("warehouse", 1, "bench-key-warehouse-0123456789"),
];

/// One answered request of the pacing load.
struct Completed {
    service: usize,
    latency: Duration,
}

/// The vendor's API user, which calls the simulator without the proxy.
const VENDOR: (&str, &str, &str) = ("vendor-tool", "vendor-secret", "vendor@example.com");
/// The proxy's API user at the simulator.
const PROXY_USER: &str = "bench@example.com";

/// What runs next to the pacing load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Nothing: calls of a steady latency.
    Plain,
    /// A vendor's tool calling the simulator directly, with Marketo's
    /// usage and error reports read every 10 s or not at all.
    Foreign { reports: bool },
    /// Slow, uneven calls, with `limits.marketo_clock` on or off.
    Slow { marketo_clock: bool },
}

pub async fn run(mode: Mode) -> Vec<Verdict> {
    let plan = PacePlan::new(mode);
    let mut verdicts = Vec::new();
    let slow = |marketo_clock| Variant::Slow { marketo_clock };
    let foreign = |reports| Variant::Foreign { reports };
    for variant in [
        Variant::Plain,
        foreign(false),
        foreign(true),
        slow(false),
        slow(true),
    ] {
        // The reports take three readings 10 s apart to show a steady rate:
        // longer than a smoke run.
        if variant == foreign(true) && mode == Mode::Smoke {
            continue;
        }
        verdicts.extend(pace(mode, &plan, variant).await);
    }
    verdicts
}

/// One run of the pacing load.
async fn pace(mode: Mode, plan: &PacePlan, variant: Variant) -> Vec<Verdict> {
    let foreign = matches!(variant, Variant::Foreign { .. });
    let reports = variant == Variant::Foreign { reports: true };
    // With the reports, three times as long: the part kept for the vendor
    // settles in the first third.
    let longer = PacePlan {
        run: plan.run * 3,
        windows: plan.windows * 3,
        ..*plan
    };
    let plan = if reports { &longer } else { plan };
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== pacing: {} calls / {:?} (margin {:?}), 10 concurrent, simulator latency {:?}; \
         3 services weights 3:2:1, {} clients each, {:?} of saturating load",
        plan.window_calls, plan.window, plan.safety_margin, plan.latency, plan.clients_per_service, plan.run
    );
    let sim_addr = local_addr(free_port());
    let vendor = format!("{}:{}:{}", VENDOR.0, VENDOR.1, VENDOR.2);
    let mut sim = start_sim(
        dir.path(),
        sim_addr,
        &[
            "--client",
            &vendor,
            "--window-calls",
            &plan.window_calls.to_string(),
            "--window-seconds",
            &plan.window.as_secs().to_string(),
            "--concurrency",
            "10",
        ]
        .into_iter()
        .chain(latencies(plan, variant).iter().map(String::as_str))
        .collect::<Vec<_>>(),
    )
    .await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let services: String = SERVICES
        .iter()
        .map(|(name, weight, key)| format!("  - {{ name: {name}, api_key: {key}, weight: {weight} }}\n"))
        .collect();
    let config = format!(
        "listen: {proxy_addr}\nadmin_listen: {admin_addr}\n\
         marketo: {{ base_url: 'http://{sim_addr}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET} }}\n\
         limits:\n  window_calls: {}\n  window: {}ms\n  safety_margin: {}ms\n  concurrency: 10\n  \
         max_queue_wait: 120s\n{}\
         services:\n{services}\
         coalesce_reads: false\n\
         state: {{ file: ~, usage_sync_interval: {} }}\n",
        plan.window_calls,
        plan.window.as_millis(),
        plan.safety_margin.as_millis(),
        // Only when off: a binary from before the setting takes the rest.
        if variant == (Variant::Slow { marketo_clock: false }) {
            "  marketo_clock: false\n"
        } else {
            ""
        },
        if reports { "10s" } else { "0s" },
    );
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;

    // Each service asks for its own lead id, so the simulator's log of
    // arrivals tells the services apart.
    let started = Instant::now();
    let end = started + plan.run;
    let trickle = foreign.then(|| tokio::spawn(vendor_trickle(sim_addr, vendor_pace(plan), end)));
    let mut clients = Vec::new();
    for (service, (_, _, key)) in SERVICES.iter().enumerate() {
        let request = RequestSpec::get(&format!("/rest/v1/lead/{}.json", service + 1))
            .to(proxy_addr)
            .with_key(key);
        for _ in 0..plan.clients_per_service {
            let request = request.clone();
            clients.push(tokio::spawn(async move {
                let mut completed = Vec::new();
                let mut errors = 0u64;
                let Ok(mut sender) = connect_h1(request.addr).await else {
                    return (completed, 1);
                };
                loop {
                    let began = Instant::now();
                    match tokio::time::timeout_at(end, exchange(&mut sender, &request)).await {
                        Err(_) => break,
                        Ok(Ok(())) => completed.push(Completed {
                            service,
                            latency: began.elapsed(),
                        }),
                        Ok(Err(error)) => {
                            eprintln!("pacing: {error}");
                            errors += 1;
                            match connect_h1(request.addr).await {
                                Ok(fresh) => sender = fresh,
                                Err(_) => break,
                            }
                        }
                    }
                }
                (completed, errors)
            }));
        }
    }
    let mut completed = Vec::new();
    let mut client_errors = 0;
    if let Some(trickle) = trickle {
        trickle.await.expect("vendor task");
    }
    for client in clients {
        let (done, errors) = client.await.expect("client task");
        completed.extend(done);
        client_errors += errors;
    }
    // Let calls cut off by the end of the load finish at the simulator.
    tokio::time::sleep(plan.latency * 2 + Duration::from_millis(100)).await;
    proxy.check_alive();
    let stats: Stats =
        serde_json::from_slice(&get(sim_addr, "/_sim/stats").await.expect("simulator stats")).expect("stats");
    sim.check_alive();

    match variant {
        Variant::Foreign { reports } => return foreign_report(&stats, plan, client_errors, reports),
        Variant::Slow { marketo_clock } => return slow_report(&stats, plan, marketo_clock),
        Variant::Plain => {}
    }
    let report = PaceReport::new(&stats, plan);
    let verdicts = report.print(plan, &completed, client_errors);
    if mode == Mode::Smoke {
        assert_eq!(client_errors, 0, "requests refused through the proxy");
        assert_eq!(stats.code("606"), 0, "{:?}", stats.codes);
        assert_eq!(stats.code("615"), 0, "{:?}", stats.codes);
        assert!(
            stats.max_in_window <= plan.window_calls,
            "{}",
            stats.max_in_window
        );
        assert!(
            report.max_sliding <= plan.window_calls as usize,
            "{}",
            report.max_sliding
        );
        assert!(
            report.times.len() >= plan.window_calls as usize,
            "only {} calls",
            report.times.len()
        );
    }
    verdicts
}

/// The simulator's latency arguments: the plan's, or for slow, uneven
/// calls Marketo's 500 ± 300 ms and every tenth 3 s, over its 20 s window,
/// scaled with it.
fn latencies(plan: &PacePlan, variant: Variant) -> Vec<String> {
    if !matches!(variant, Variant::Slow { .. }) {
        return vec!["--latency".into(), format!("{}ms", plan.latency.as_millis())];
    }
    let scale = plan.window.as_secs_f64() / 20.0;
    let ms = |at_marketo: f64| format!("{:.0}ms", at_marketo * scale);
    vec![
        "--latency".into(),
        ms(500.0),
        "--latency-jitter".into(),
        ms(300.0),
        "--slow-every".into(),
        "10".into(),
        "--slow-latency".into(),
        ms(3000.0),
    ]
}

/// With slow, uneven calls: when the third batch of the window's calls
/// starts, against two windows and margins.
fn slow_report(stats: &Stats, plan: &PacePlan, marketo_clock: bool) -> Vec<Verdict> {
    let limit = plan.window_calls as usize;
    let times: Vec<f64> = stats.arrivals.iter().map(|arrival| arrival.at).collect();
    let refused = stats.code("606") + stats.code("615");
    println!(
        "== slow, uneven calls (Marketo's 500 ± 300 ms and every tenth 3 s, scaled to the window); \
         limits.marketo_clock {}",
        if marketo_clock { "on" } else { "off" }
    );
    let Some(third) = times.get(2 * limit).map(|at| at - times[0]) else {
        println!("fewer than {} calls reached the simulator", 2 * limit + 1);
        return Vec::new();
    };
    let window = plan.window.as_secs_f64();
    let of_raw = 100.0 * 2.0 * window / third;
    let least = 2.0 * (window + plan.safety_margin.as_secs_f64());
    println!(
        "third batch of {limit} starts {third:.2} s after the first call ({of_raw:.1}% of the raw window; \
         the least it could be is {least:.2} s); simulator 606/615: {refused}"
    );
    let (utilisation, safe) = if marketo_clock {
        (
            "slow calls, marketo_clock on: the third batch starts by >= 98% of the raw window",
            "slow calls, marketo_clock on: zero 606/615 at the simulator",
        )
    } else {
        (
            "slow calls, marketo_clock off: the third batch starts by >= 98% of the raw window",
            "slow calls, marketo_clock off: zero 606/615 at the simulator",
        )
    };
    vec![
        Verdict::new(utilisation, format!("{third:.2} s, {of_raw:.1}%"), of_raw >= 98.0),
        Verdict::new(safe, refused.to_string(), refused == 0),
    ]
}

/// How often the vendor calls: a fifth of the window.
fn vendor_pace(plan: &PacePlan) -> Duration {
    plan.window / (plan.window_calls / 5).max(1)
}

/// The vendor's tool: one lead read every `every`, straight to the
/// simulator, until `end`.
async fn vendor_trickle(sim: std::net::SocketAddr, every: Duration, end: Instant) {
    let http = reqwest::Client::new();
    let token: serde_json::Value = http
        .get(format!(
            "http://{sim}/identity/oauth/token?grant_type=client_credentials&client_id={}&client_secret={}",
            VENDOR.0, VENDOR.1
        ))
        .send()
        .await
        .expect("vendor token")
        .json()
        .await
        .expect("token JSON");
    let token = token["access_token"].as_str().unwrap_or_default().to_owned();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let call = http
            .get(format!("http://{sim}/rest/v1/lead/9.json"))
            .bearer_auth(&token);
        if let Err(error) = call.send().await {
            eprintln!("pacing: vendor call: {error}");
        }
    }
}

/// With the vendor's load: the proxy's calls per window against what the
/// vendor leaves, and Marketo's refusals of each. With the `reports`, the
/// last third of the run too, once the part kept for the vendor holds.
fn foreign_report(stats: &Stats, plan: &PacePlan, client_errors: u64, reports: bool) -> Vec<Verdict> {
    let window = plan.window.as_secs_f64();
    let of = |user: &str, code: Option<&str>| -> Vec<f64> {
        let calls = stats
            .arrivals
            .iter()
            .filter(|arrival| arrival.user.as_deref() == Some(user));
        calls
            .filter(|arrival| code.is_none_or(|code| arrival.code == code))
            .map(|arrival| arrival.at)
            .collect()
    };
    let proxy = of(PROXY_USER, Some("ok"));
    let Some(&t0) = proxy.first() else {
        println!("no calls reached the simulator");
        return Vec::new();
    };
    let in_window = |times: &[f64], k: u32| {
        let from = t0 + window * f64::from(k);
        times
            .iter()
            .filter(|at| **at >= from && **at < from + window)
            .count()
    };
    let vendor_ok = of(VENDOR.2, Some("ok"));
    let vendor_sent = of(VENDOR.2, None);
    let sent_per_window: Vec<usize> = (0..plan.windows).map(|k| in_window(&vendor_sent, k)).collect();
    let per_window: Vec<(usize, usize)> = (0..plan.windows)
        .map(|k| (in_window(&proxy, k), in_window(&vendor_ok, k)))
        .collect();
    let refused = of(PROXY_USER, Some("606"));
    let (refused_606, refused_615) = (refused.len(), of(PROXY_USER, Some("615")).len());
    // The first refusal finds the proxy's calls already in flight.
    let taught = refused.first().map_or(f64::INFINITY, |first| first + window);
    let later_606 = refused.iter().filter(|at| **at > taught).count();
    let vendor_refused = vendor_sent.len() - vendor_ok.len();
    let limit = plan.window_calls as usize;
    // What the vendor's calls leave the proxy, from the second window on
    // (the first teaches the proxy the vendor is there).
    let (used, left): (usize, usize) = per_window
        .iter()
        .zip(&sent_per_window)
        .skip(1)
        .fold((0, 0), |(used, left), ((proxy, _), sent)| {
            (used + proxy, left + limit.saturating_sub(*sent))
        });
    let utilisation = if left > 0 {
        100.0 * used as f64 / left as f64
    } else {
        0.0
    };
    println!(
        "== with a vendor calling the simulator directly, a fifth of the window at a steady pace \
         (one call per {:?}); Marketo's usage and error reports {}",
        vendor_pace(plan),
        if reports { "read every 10 s" } else { "not read" }
    );
    println!("calls per window from the first arrival (proxy, vendor): {per_window:?} of {limit}");
    let vendor_executed = 100.0 * vendor_ok.len() as f64 / vendor_sent.len().max(1) as f64;
    println!(
        "utilisation of what the vendor left, from the second window: {utilisation:.1}%; \
         Marketo refused the proxy 606 × {refused_606} ({later_606} after the first window), 615 × {refused_615}, \
         and the vendor {vendor_refused} ({vendor_executed:.0}% of its calls executed); \
         requests refused by the proxy: {client_errors}"
    );
    // Marketo's minute is three windows.
    let minutes = (plan.run.as_secs_f64() / (3.0 * window)).ceil();
    let refusals = Verdict::new(
        "with a vendor's steady fifth: at most one 606 a minute (three windows) after the first window",
        format!("{later_606} in {:.0} s", plan.run.as_secs_f64()),
        (later_606 as f64) <= minutes,
    );
    if !reports {
        // Without the reports, nothing tells the proxy that Marketo
        // refuses the vendor: the vendor's share is a figure, not a target.
        return vec![
            Verdict::new(
                "with a vendor's steady fifth, no reports: the proxy uses >= 90% of what the vendor leaves",
                format!("{utilisation:.1}%"),
                utilisation >= 90.0,
            ),
            refusals,
        ];
    }
    let settled = (plan.windows * 2 / 3)..plan.windows;
    let count = settled.len() as f64;
    let proxy_settled = settled.clone().map(|k| in_window(&proxy, k)).sum::<usize>() as f64 / count;
    let (vendor_ok_settled, vendor_sent_settled) = settled.fold((0, 0), |(ok, sent), k| {
        (ok + in_window(&vendor_ok, k), sent + in_window(&vendor_sent, k))
    });
    let vendor_settled = 100.0 * vendor_ok_settled as f64 / vendor_sent_settled.max(1) as f64;
    let near = f64::from(plan.window_calls) * 0.8;
    println!(
        "the last third ({count:.0} windows): the proxy {proxy_settled:.1} calls a window, \
         {vendor_settled:.0}% of the vendor's calls executed"
    );
    vec![
        Verdict::new(
            "with a vendor's steady fifth and the reports: the proxy settles near 80% of the window",
            format!("{proxy_settled:.1} a window"),
            (near - 0.06 * f64::from(plan.window_calls)..=near + 0.05 * f64::from(plan.window_calls))
                .contains(&proxy_settled),
        ),
        Verdict::new(
            "with a vendor's steady fifth and the reports: >= 90% of the vendor's calls executed once settled",
            format!("{vendor_settled:.0}%"),
            vendor_settled >= 90.0,
        ),
        refusals,
    ]
}

/// What the simulator saw during the pacing load.
struct PaceReport {
    /// Arrival times of executed calls, in seconds since the simulator started.
    times: Vec<f64>,
    /// Service index of each executed call.
    services: Vec<usize>,
    max_sliding: usize,
    codes: BTreeMap<String, u64>,
    max_in_flight: u32,
}

impl PaceReport {
    fn new(stats: &Stats, plan: &PacePlan) -> Self {
        let executed: Vec<_> = stats
            .arrivals
            .iter()
            .filter(|arrival| arrival.code == "ok" || arrival.code == "cancelled")
            .collect();
        let times: Vec<f64> = executed.iter().map(|arrival| arrival.at).collect();
        let services = executed
            .iter()
            .map(|arrival| {
                arrival
                    .target
                    .trim_start_matches("/rest/v1/lead/")
                    .trim_end_matches(".json")
                    .parse::<usize>()
                    .map_or(usize::MAX, |id| id - 1)
            })
            .collect();
        let window = plan.window.as_secs_f64();
        let mut max_sliding = 0;
        let mut first = 0;
        for (last, at) in times.iter().enumerate() {
            while *at - times[first] >= window {
                first += 1;
            }
            max_sliding = max_sliding.max(last + 1 - first);
        }
        Self {
            times,
            services,
            max_sliding,
            codes: stats.codes.clone(),
            max_in_flight: stats.max_in_flight,
        }
    }

    fn print(&self, plan: &PacePlan, completed: &[Completed], client_errors: u64) -> Vec<Verdict> {
        let limit = plan.window_calls as usize;
        let window = plan.window.as_secs_f64();
        let mut verdicts = Vec::new();
        let Some(&t0) = self.times.first() else {
            println!("no calls reached the simulator");
            return verdicts;
        };
        let per_window: Vec<usize> = (0..plan.windows)
            .map(|k| {
                let from = t0 + window * f64::from(k);
                self.times
                    .iter()
                    .filter(|at| **at >= from && **at < from + window)
                    .count()
            })
            .collect();
        println!(
            "calls per {:?} window from the first arrival: {per_window:?} of {limit} each",
            plan.window
        );
        println!(
            "most calls in any sliding {:?}: {} (limit {limit}); most in flight: {} (limit 10)",
            plan.window, self.max_sliding, self.max_in_flight
        );
        // The span of `limit` consecutive calls is the period in which the
        // window turns over once: exactly `window` when fully used.
        let spans: Vec<f64> = self
            .times
            .windows(limit + 1)
            .map(|calls| calls[limit] - calls[0])
            .collect();
        if !spans.is_empty() {
            let mean = spans.iter().sum::<f64>() / spans.len() as f64;
            let shortest = spans.iter().copied().fold(f64::INFINITY, f64::min);
            let ceiling = window + plan.safety_margin.as_secs_f64() + plan.latency.as_secs_f64();
            println!(
                "turnover: call n+{limit} arrives {mean:.3} s after call n on average (shortest {shortest:.3} s, \
                 never below {window:.0} s or Marketo says 606)"
            );
            let of_marketo = 100.0 * window / mean;
            let of_design = 100.0 * ceiling / mean;
            println!(
                "window utilisation: {of_marketo:.2}% of Marketo's {limit}/{window:.0} s; {of_design:.2}% of the \
                 design ceiling {limit} per {ceiling:.2} s (window + safety margin + upstream latency)"
            );
            verdicts.push(Verdict::new(
                "window utilisation >= 99% of the design ceiling (window + margin + latency)",
                format!("{of_design:.2}%"),
                of_design >= 99.0,
            ));
            verdicts.push(Verdict::new(
                "window utilisation >= 99% of Marketo's raw window",
                format!(
                    "{of_marketo:.2}% (the {:?} safety margin and {:?} latency cost {:.2}%)",
                    plan.safety_margin,
                    plan.latency,
                    100.0 * (1.0 - window / ceiling)
                ),
                of_marketo >= 99.0,
            ));
        }
        let rejected =
            self.codes.get("606").copied().unwrap_or(0) + self.codes.get("615").copied().unwrap_or(0);
        verdicts.push(Verdict::new(
            "zero 606/615 at the simulator",
            format!(
                "{rejected} (most in any sliding window {} of {limit})",
                self.max_sliding
            ),
            rejected == 0 && self.max_sliding <= limit,
        ));
        println!(
            "simulator codes: 606 = {}, 615 = {}, others {:?}; requests refused by the proxy: {client_errors}",
            self.codes.get("606").copied().unwrap_or(0),
            self.codes.get("615").copied().unwrap_or(0),
            self.codes
                .iter()
                .filter(|(code, _)| *code != "606" && *code != "615")
                .collect::<BTreeMap<_, _>>()
        );

        // Bursts: the window turns over in bursts once saturated. The first
        // burst is decided by how many clients each service has, the later
        // ones by the weights.
        let mut bursts: Vec<[usize; 3]> = Vec::new();
        let mut previous = f64::NEG_INFINITY;
        for (at, service) in self.times.iter().zip(&self.services) {
            if *at - previous > window / 4.0 {
                bursts.push([0; 3]);
            }
            previous = *at;
            if let (Some(burst), true) = (bursts.last_mut(), *service < 3) {
                burst[*service] += 1;
            }
        }
        println!("calls per burst by service (crm-sync, forms, warehouse): {bursts:?}");
        let steady: [usize; 3] = bursts.iter().skip(1).fold([0; 3], |mut sum, burst| {
            for (total, count) in sum.iter_mut().zip(burst) {
                *total += count;
            }
            sum
        });
        let total: usize = steady.iter().sum();
        let weights: u32 = SERVICES.iter().map(|(_, weight, _)| weight).sum();
        if total > 0 {
            let ratios: Vec<f64> = SERVICES
                .iter()
                .zip(steady)
                .map(|((_, weight, _), calls)| {
                    (calls as f64 / total as f64) / (f64::from(*weight) / f64::from(weights))
                })
                .collect();
            let worst = ratios.iter().map(|ratio| (ratio - 1.0).abs()).fold(0.0, f64::max);
            println!(
                "fairness after the first burst (share of calls / share of weight, 1.00 = exact): {} ; \
                 worst deviation {:.1}%",
                SERVICES
                    .iter()
                    .zip(&ratios)
                    .map(|((name, weight, _), ratio)| format!("{name} (w{weight}) {ratio:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                worst * 100.0
            );
        }
        println!(
            "queue wait per service (client latency - {:?} simulated latency), answered requests:",
            plan.latency
        );
        for (index, (name, weight, _)) in SERVICES.iter().enumerate() {
            let mut waits: Vec<Duration> = completed
                .iter()
                .filter(|done| done.service == index)
                .map(|done| done.latency.saturating_sub(plan.latency))
                .collect();
            waits.sort_unstable();
            println!(
                "  {name:<10} w{weight}: n = {:>4}, p50 {:>9}, p99 {:>9}",
                waits.len(),
                secs(percentile(&waits, 0.50)),
                secs(percentile(&waits, 0.99))
            );
        }
        verdicts
    }
}
