//! Pass-through overhead: what a layer in front of Marketo costs when the
//! limits never hold a request back. The same static upstream is loaded
//! (a) directly, (b) through marketo-proxy with its limits lifted, (c)
//! through nginx when it is installed and (d) through a bare hyper proxy,
//! in a closed loop and at light load, with the CPU time each process
//! spends per request.

use std::time::Duration;

use tokio::time::Instant;

use crate::Mode;
use crate::bare_proxy;
use crate::client::RequestSpec;
use crate::load::{Samples, closed_loop, paced_loop};
use crate::nginx::{find_nginx, start_nginx};
use crate::processes::{
    API_KEY, Process, cpu_seconds, cpu_seconds_with_children, free_port, lifted_limits_config, local_addr,
    start_proxy, start_static_upstream, wait_ready,
};
use crate::report::{Verdict, ms};

/// How long each part of the pass-through scenario runs.
struct PassPlan {
    connections: usize,
    warmup: Duration,
    measure: Duration,
    /// Closed-loop rounds per target, interleaved across targets so a
    /// disturbance on the machine hits every target alike.
    rounds: usize,
    /// The light-load latency run: total requests/s and connections.
    paced_rate: f64,
    paced_connections: usize,
    paced_measure: Duration,
}

impl PassPlan {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Smoke => Self {
                connections: 4,
                warmup: Duration::from_millis(200),
                measure: Duration::from_millis(500),
                rounds: 1,
                paced_rate: 200.0,
                paced_connections: 2,
                paced_measure: Duration::from_millis(300),
            },
            Mode::Full => Self {
                connections: 32,
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(5),
                rounds: 2,
                paced_rate: 1000.0,
                paced_connections: 10,
                paced_measure: Duration::from_secs(5),
            },
        }
    }
}

/// One thing the load generator can point at, and the processes that
/// serve it (for their CPU time).
struct Target {
    name: &'static str,
    request: RequestSpec,
    /// The proxy layer, whose CPU time per request is reported; none when
    /// going direct.
    layer: Option<u32>,
    upstream: u32,
}

/// Totals of one target over all its rounds.
#[derive(Default)]
struct PassResult {
    closed: Samples,
    paced: Samples,
    /// CPU seconds spent by the layer, the upstream and the load generator
    /// during the closed-loop rounds.
    layer_cpu: f64,
    upstream_cpu: f64,
    client_cpu: f64,
}

pub async fn run(mode: Mode) -> Vec<Verdict> {
    let plan = PassPlan::new(mode);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== pass-through: limits lifted, static upstream, {} keep-alive HTTP/1.1 clients (closed loop), \
         {} x {:?} per target after {:?} warm-up",
        plan.connections, plan.rounds, plan.measure, plan.warmup
    );

    let (upstream, upstream_addr) = start_static_upstream(dir.path()).await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let config = lifted_limits_config(proxy_addr, admin_addr, upstream_addr, "");
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;

    let mut nginx = None;
    let mut nginx_addr = None;
    match find_nginx() {
        Some(path) => {
            let addr = local_addr(free_port());
            match start_nginx(&path, dir.path(), addr, upstream_addr) {
                Ok(mut process) => {
                    wait_ready(&mut process, addr, "/rest/v1/lead/1.json").await;
                    nginx_addr = Some(addr);
                    nginx = Some(process);
                }
                Err(reason) => println!(
                    "note: {} cannot run the comparison config, so (c) is skipped: {reason}",
                    path.display()
                ),
            }
        }
        None => println!(
            "note: nginx is not installed, so (c) is skipped; install it with \
             `apt-get install -y nginx-light` (or put nginx on PATH, or set NGINX=/path/to/nginx)"
        ),
    }

    let me = std::env::current_exe().expect("own path");
    // The floor any hyper-based proxy starts from: the same server and
    // client stacks as marketo-proxy, and nothing else.
    let bare_addr = local_addr(free_port());
    let mut bare = Process::spawn(
        "bare-hyper-proxy",
        &me,
        &[
            bare_proxy::ROLE,
            &bare_addr.to_string(),
            &upstream_addr.to_string(),
        ],
        dir.path(),
    );
    wait_ready(&mut bare, bare_addr, "/rest/v1/lead/1.json").await;

    let lead = RequestSpec::get("/rest/v1/lead/1.json");
    let mut targets = vec![
        Target {
            name: "(a) direct",
            request: lead.clone().to(upstream_addr),
            layer: None,
            upstream: upstream.pid(),
        },
        Target {
            name: "(b) marketo-proxy",
            request: lead.clone().to(proxy_addr).with_key(API_KEY),
            layer: Some(proxy.pid()),
            upstream: upstream.pid(),
        },
    ];
    if let (Some(addr), Some(process)) = (nginx_addr, &nginx) {
        targets.push(Target {
            name: "(c) nginx",
            request: lead.clone().to(addr),
            layer: Some(process.pid()),
            upstream: upstream.pid(),
        });
    }
    targets.push(Target {
        name: "(d) bare hyper",
        request: lead.clone().to(bare_addr),
        layer: Some(bare.pid()),
        upstream: upstream.pid(),
    });

    let mut results: Vec<PassResult> = targets.iter().map(|_| PassResult::default()).collect();
    for _ in 0..plan.rounds {
        for (target, result) in targets.iter().zip(&mut results) {
            // CPU time is sampled over exactly the measured interval.
            let start = Instant::now() + plan.warmup;
            let end = start + plan.measure;
            let (layer, upstream) = (target.layer, target.upstream);
            let cpu = tokio::spawn(async move {
                tokio::time::sleep_until(start).await;
                let before = CpuSnapshot::take(layer, upstream);
                tokio::time::sleep_until(end).await;
                (before, CpuSnapshot::take(layer, upstream))
            });
            let samples = closed_loop(&target.request, plan.connections, start, end).await;
            let (before, after) = cpu.await.expect("CPU sampler");
            result.layer_cpu += after.layer - before.layer;
            result.upstream_cpu += after.upstream - before.upstream;
            result.client_cpu += after.client - before.client;
            result.closed.merge(samples);
        }
    }
    for (target, result) in targets.iter().zip(&mut results) {
        result.paced = paced_loop(
            &target.request,
            plan.paced_connections,
            plan.paced_rate,
            plan.warmup,
            plan.paced_measure,
        )
        .await;
    }
    proxy.check_alive();
    if let Some(nginx) = &mut nginx {
        nginx.check_alive();
    }

    let verdicts = print_tables(&plan, &targets, &results);
    println!("proxy resident memory after the run: {} KiB", proxy.rss_kib());

    if mode == Mode::Smoke {
        for (target, result) in targets.iter().zip(&results) {
            assert_eq!(result.closed.errors, 0, "{}: errors", target.name);
            assert_eq!(result.paced.errors, 0, "{}: errors at light load", target.name);
            assert!(result.closed.ok > 0, "{}: no answers", target.name);
            assert!(result.paced.ok > 0, "{}: no answers at light load", target.name);
        }
    }
    verdicts
}

/// The saturated and light-load tables, then every target's figures
/// against direct, nginx and the bare hyper proxy; the verdicts come from
/// the comparison with nginx.
fn print_tables(plan: &PassPlan, targets: &[Target], results: &[PassResult]) -> Vec<Verdict> {
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>7} {:>13} {:>13} {:>13}",
        "saturated", "req/s", "p50", "p99", "errors", "layer µs/req", "upstrm µs/req", "client µs/req"
    );
    for (target, result) in targets.iter().zip(results) {
        let closed = &result.closed;
        let per_request = |cpu: f64| cpu * 1e6 / closed.ok.max(1) as f64;
        let layer = if target.layer.is_some() {
            format!("{:.1}", per_request(result.layer_cpu))
        } else {
            "-".into()
        };
        println!(
            "{:<20} {:>9.0} {:>9} {:>9} {:>7} {:>13} {:>13.1} {:>13.1}",
            target.name,
            closed.rate(),
            ms(closed.percentile(0.50)),
            ms(closed.percentile(0.99)),
            closed.errors,
            layer,
            per_request(result.upstream_cpu),
            per_request(result.client_cpu),
        );
    }
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>7}   ({} req/s over {} connections, {:?})",
        "light load",
        "req/s",
        "p50",
        "p99",
        "errors",
        plan.paced_rate,
        plan.paced_connections,
        plan.paced_measure
    );
    for (target, result) in targets.iter().zip(results) {
        let paced = &result.paced;
        println!(
            "{:<20} {:>9.0} {:>9} {:>9} {:>7}",
            target.name,
            paced.rate(),
            ms(paced.percentile(0.50)),
            ms(paced.percentile(0.99)),
            paced.errors
        );
    }

    let direct = &results[0];
    let via_proxy = &results[1];
    let cpu_per_request = |result: &PassResult| result.layer_cpu / result.closed.ok.max(1) as f64;
    let added = |result: &PassResult, p: f64| {
        (result.paced.percentile(p).as_secs_f64() - direct.paced.percentile(p).as_secs_f64()) * 1e3
    };
    println!(
        "ratio throughput proxy/direct: {:.2}",
        via_proxy.closed.rate() / direct.closed.rate()
    );
    for (target, result) in targets.iter().zip(results).skip(1) {
        println!(
            "added latency at light load, {}: p50 {:+.3} ms, p99 {:+.3} ms",
            target.name,
            added(result, 0.50),
            added(result, 0.99)
        );
    }
    let compare = |label: &str, reference: &PassResult, targets: &str| {
        println!(
            "ratios proxy/{label}: throughput {:.2}{targets}; saturated p99 {:.2}; light-load p99 {:.2}{}; \
             CPU per request {:.2}",
            via_proxy.closed.rate() / reference.closed.rate(),
            via_proxy.closed.percentile(0.99).as_secs_f64() / reference.closed.percentile(0.99).as_secs_f64(),
            via_proxy.paced.percentile(0.99).as_secs_f64() / reference.paced.percentile(0.99).as_secs_f64(),
            if targets.is_empty() {
                ""
            } else {
                " (target <= 1.0)"
            },
            cpu_per_request(via_proxy) / cpu_per_request(reference),
        );
    };
    let mut verdicts = Vec::new();
    match targets.iter().position(|target| target.name.contains("nginx")) {
        Some(index) => {
            let nginx = &results[index];
            compare("nginx", nginx, " (target >= 1.0)");
            let throughput = via_proxy.closed.rate() / nginx.closed.rate();
            verdicts.push(Verdict::new(
                "pass-through throughput proxy/nginx >= 1.0",
                format!("{throughput:.2}"),
                throughput >= 1.0,
            ));
            // The direct p99 is common to both, so comparing p99s compares
            // the latency each adds.
            let p99 =
                via_proxy.paced.percentile(0.99).as_secs_f64() / nginx.paced.percentile(0.99).as_secs_f64();
            verdicts.push(Verdict::new(
                "light-load p99 proxy/nginx <= 1.0 (added p99 no worse than nginx's)",
                format!(
                    "{p99:.2} (added p99 {:+.3} ms vs {:+.3} ms)",
                    added(via_proxy, 0.99),
                    added(nginx, 0.99)
                ),
                p99 <= 1.0,
            ));
        }
        None => {
            println!("ratios proxy/nginx: skipped (nginx not available)");
            verdicts.push(Verdict {
                target: "pass-through against nginx",
                value: "nginx not available".into(),
                met: None,
            });
        }
    }
    compare("bare hyper", &results[results.len() - 1], "");
    verdicts
}

/// CPU seconds run so far by the layer, the upstream and this process.
struct CpuSnapshot {
    layer: f64,
    upstream: f64,
    client: f64,
}

impl CpuSnapshot {
    fn take(layer: Option<u32>, upstream: u32) -> Self {
        Self {
            layer: layer.map_or(0.0, cpu_seconds_with_children),
            upstream: cpu_seconds_with_children(upstream),
            client: cpu_seconds(std::process::id()),
        }
    }
}
