//! The load harness: what the proxy costs and how well it paces, measured
//! end to end against real processes on this machine.
//!
//! - `pass-through`: limits lifted far above the load, a static upstream
//!   (this binary re-run as `--static-upstream`, in its own process), N
//!   keep-alive HTTP/1.1 clients. Requests/s and p50/p99 latency directly
//!   against the upstream, through `marketo-proxy`, and through nginx as a
//!   plain reverse proxy when nginx is installed; CPU time per request of
//!   each process.
//! - `pacing`: Marketo's real limits, `marketo-sim` with 50 ms latency,
//!   three services with weights 3:2:1 saturating the proxy: calls per
//!   20 s window, 606/615 seen by the simulator, queue wait per service,
//!   fairness against the weights.
//! - `memory`: resident memory of the proxy with 10,000 requests waiting
//!   in the queue, over HTTP/2 streams and over HTTP/1.1 connections.
//!
//! `cargo bench --bench proxy` runs the full measurement (BENCHMARKS.md
//! holds the figures). Without `--bench`, as `cargo test --all-targets`
//! runs it, every scenario runs as a short smoke test that asserts basic
//! sanity. Any other argument that does not start with `--` selects the
//! scenarios whose name contains it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use marketo_proxy::sim::Stats;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Argument that turns this binary into the static upstream.
const STATIC_UPSTREAM_ROLE: &str = "--static-upstream";
/// Argument that turns this binary into a bare hyper reverse proxy.
const BARE_PROXY_ROLE: &str = "--bare-proxy";
const PROXY_EXE: &str = env!("CARGO_BIN_EXE_marketo-proxy");
const SIM_EXE: &str = env!("CARGO_BIN_EXE_marketo-sim");

/// The upstream API user in every scenario.
const CLIENT_ID: &str = "bench-client";
const CLIENT_SECRET: &str = "bench-secret";
const API_KEY: &str = "bench-key-0123456789";

/// What the static upstream answers: Marketo's shapes, fixed.
const LEAD_ANSWER: &[u8] = br#"{"requestId":"e42b#14272d07d78","result":[{"id":1,"updatedAt":"2026-01-01T00:00:00Z","lastName":"Lead","email":"lead1@example.com","createdAt":"2026-01-01T00:00:00Z","firstName":"Bench"}],"success":true}"#;
const TOKEN_ANSWER: &[u8] = br#"{"access_token":"cdf01657-110d-4155-99a7-f986b2ff13a0:int","token_type":"bearer","expires_in":3599,"scope":"bench@example.com"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A second or two per scenario, with assertions: what CI runs.
    Smoke,
    /// The measurement BENCHMARKS.md reports.
    Full,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(position) = args.iter().position(|arg| arg == STATIC_UPSTREAM_ROLE) {
        let addr = args
            .get(position + 1)
            .and_then(|addr| addr.parse().ok())
            .expect("--static-upstream ADDR");
        static_upstream(addr);
        return;
    }
    if let Some(position) = args.iter().position(|arg| arg == BARE_PROXY_ROLE) {
        let addr = |offset: usize| {
            args.get(position + offset)
                .and_then(|addr| addr.parse().ok())
                .expect("--bare-proxy LISTEN UPSTREAM")
        };
        bare_proxy(addr(1), addr(2));
        return;
    }
    let scenarios = ["pass-through", "pacing", "memory"];
    if args.iter().any(|arg| arg == "--list") {
        for name in scenarios {
            println!("{name}: bench");
        }
        return;
    }
    let mode = if args.iter().any(|arg| arg == "--bench") {
        Mode::Full
    } else {
        Mode::Smoke
    };
    let filters: Vec<&str> = args
        .iter()
        .filter(|arg| !arg.starts_with("--"))
        .map(String::as_str)
        .collect();
    let selected: Vec<&str> = scenarios
        .into_iter()
        .filter(|name| filters.is_empty() || filters.iter().any(|filter| name.contains(filter)))
        .collect();
    if selected.is_empty() {
        println!("proxy bench: no scenario matches {filters:?}");
        return;
    }
    match mode {
        Mode::Smoke => {
            println!("proxy bench: SMOKE RUN (short, with assertions; `cargo bench --bench proxy` measures)")
        }
        Mode::Full => println!("proxy bench: full measurement"),
    }
    print_machine();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut verdicts = Vec::new();
    for name in selected {
        println!();
        verdicts.extend(runtime.block_on(async {
            match name {
                "pass-through" => pass_through(mode).await,
                "pacing" => pacing(mode).await,
                _ => memory(mode).await,
            }
        }));
    }
    println!();
    println!(
        "== targets (measured, not asserted){}",
        match mode {
            Mode::Smoke => "; smoke run, figures not meaningful",
            Mode::Full => "",
        }
    );
    for verdict in verdicts {
        let status = match verdict.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "skipped",
        };
        println!("  {status:<7} {}: {}", verdict.target, verdict.value);
    }
}

/// A figure against its target from the issue.
struct Verdict {
    target: &'static str,
    value: String,
    /// `None` when it could not be measured here.
    met: Option<bool>,
}

impl Verdict {
    fn new(target: &'static str, value: String, met: bool) -> Self {
        Self {
            target,
            value,
            met: Some(met),
        }
    }
}

fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cpus} CPUs ({model}), Linux {}; load average {}",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("note: the load generator, the proxy under test and the upstream share these {cpus} CPUs");
}

// ---------------------------------------------------------------------------
// Pass-through overhead

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

async fn pass_through(mode: Mode) -> Vec<Verdict> {
    let plan = PassPlan::new(mode);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== pass-through: limits lifted, static upstream, {} keep-alive HTTP/1.1 clients (closed loop), \
         {} x {:?} per target after {:?} warm-up",
        plan.connections, plan.rounds, plan.measure, plan.warmup
    );

    let upstream_addr = local_addr(free_port());
    let me = std::env::current_exe().expect("own path");
    let mut upstream = Process::spawn(
        "static-upstream",
        &me,
        &[STATIC_UPSTREAM_ROLE, &upstream_addr.to_string()],
        dir.path(),
    );
    wait_ready(&mut upstream, upstream_addr, "/rest/v1/lead/1.json").await;

    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let config = format!(
        "listen: {proxy_addr}\nadmin_listen: {admin_addr}\n\
         marketo: {{ base_url: 'http://{upstream_addr}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET} }}\n\
         limits:\n  window_calls: 10000000\n  window: 1s\n  safety_margin: 0s\n  concurrency: 1000000\n  \
         daily_quota: 1000000000000\n  max_queue_wait: 60s\n\
         services:\n  - {{ name: bench, api_key: {API_KEY} }}\n\
         state: {{ file: ~, usage_sync_interval: 0s }}\n"
    );
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

    // The floor any hyper-based proxy starts from: the same server and
    // client stacks as marketo-proxy, and nothing else.
    let bare_addr = local_addr(free_port());
    let mut bare = Process::spawn(
        "bare-hyper-proxy",
        &me,
        &[
            BARE_PROXY_ROLE,
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

    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>7} {:>13} {:>13} {:>13}",
        "saturated", "req/s", "p50", "p99", "errors", "layer µs/req", "upstrm µs/req", "client µs/req"
    );
    for (target, result) in targets.iter().zip(&results) {
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
    for (target, result) in targets.iter().zip(&results) {
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
    for (target, result) in targets.iter().zip(&results).skip(1) {
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

/// Runs nginx as a plain keep-alive reverse proxy to `upstream`.
fn start_nginx(
    nginx: &Path,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Process, String> {
    let prefix = dir.join("nginx");
    fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let user = if running_as_root() { "user root;\n" } else { "" };
    let p = prefix.display();
    let conf = format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes 2;\npid {p}/nginx.pid;\n\
         error_log {p}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n\
         client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  \
         uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
         upstream marketo {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
         server {{\n    listen {listen};\n    keepalive_requests 1000000;\n\
         location / {{ proxy_pass http://marketo; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf).expect("nginx.conf");
    let prefix_arg = prefix.display().to_string();
    let conf_arg = conf_path.display().to_string();
    let log_arg = prefix.join("logs/error.log").display().to_string();
    let args = ["-p", &prefix_arg, "-c", &conf_arg, "-e", &log_arg];
    // An nginx that cannot run this config (too old for `-e`, no
    // permission) is skipped like a missing one.
    let test = Command::new(nginx).arg("-t").args(args).output();
    match test {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Err(error) => return Err(error.to_string()),
    }
    let mut process = Process::spawn("nginx", nginx, &args, dir);
    // nginx's master forwards SIGTERM to its workers; SIGKILL would orphan them.
    process.terminate_gently = true;
    Ok(process)
}

fn find_nginx() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Pacing efficiency

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

async fn pacing(mode: Mode) -> Vec<Verdict> {
    let plan = PacePlan::new(mode);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== pacing: {} calls / {:?} (margin {:?}), 10 concurrent, simulator latency {:?}; \
         3 services weights 3:2:1, {} clients each, {:?} of saturating load",
        plan.window_calls, plan.window, plan.safety_margin, plan.latency, plan.clients_per_service, plan.run
    );
    let sim_addr = local_addr(free_port());
    let mut sim = start_sim(
        dir.path(),
        sim_addr,
        &[
            "--window-calls",
            &plan.window_calls.to_string(),
            "--window-seconds",
            &plan.window.as_secs().to_string(),
            "--concurrency",
            "10",
            "--latency",
            &format!("{}ms", plan.latency.as_millis()),
        ],
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
         max_queue_wait: 120s\n\
         services:\n{services}\
         state: {{ file: ~, usage_sync_interval: 0s }}\n",
        plan.window_calls,
        plan.window.as_millis(),
        plan.safety_margin.as_millis()
    );
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;

    // Each service asks for its own lead id, so the simulator's log of
    // arrivals tells the services apart.
    let started = Instant::now();
    let end = started + plan.run;
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

    let report = PaceReport::new(&stats, &plan);
    let verdicts = report.print(&plan, &completed, client_errors);
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

// ---------------------------------------------------------------------------
// Memory per queued request

/// Body of every queued request.
const QUEUED_BODY: &[u8] = br#"{"action":"createOrUpdate","input":[{"email":"q@example.com"}]}"#;

async fn memory(mode: Mode) -> Vec<Verdict> {
    let queued = match mode {
        Mode::Smoke => 200,
        Mode::Full => 10_000,
    };
    println!(
        "== memory: {queued} requests waiting in the queue (POST, {}-byte bodies), proxy concurrency 1, \
         the one call in flight hung at the simulator",
        QUEUED_BODY.len()
    );
    let mut verdicts = vec![memory_variant(Transport::Http2, queued).await];
    let needed = queued as u64 + 200;
    match open_files_limit("self") {
        Some(limit) if limit < needed => println!(
            "http1: skipped, {queued} connections need an open-files limit of {needed} (this process has {limit}); \
             raise it with `ulimit -n`"
        ),
        _ => verdicts.push(memory_variant(Transport::Http1, queued).await),
    }
    verdicts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// 100 streams per connection.
    Http2,
    /// One connection per request.
    Http1,
}

async fn memory_variant(transport: Transport, queued: usize) -> Verdict {
    const STREAMS_PER_CONNECTION: usize = 100;
    let dir = tempfile::tempdir().expect("temp dir");
    let sim_addr = local_addr(free_port());
    let mut sim = start_sim(
        dir.path(),
        sim_addr,
        &[
            "--latency",
            "0ms",
            "--window-calls",
            "1000000",
            "--concurrency",
            "1000",
            "--daily-quota",
            "1000000000",
        ],
    )
    .await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let config = format!(
        "listen: {proxy_addr}\nadmin_listen: {admin_addr}\n\
         marketo: {{ base_url: 'http://{sim_addr}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET}, \
         request_timeout: 1h }}\n\
         limits:\n  window_calls: 1000000\n  window: 1s\n  safety_margin: 0s\n  concurrency: 1\n  \
         daily_quota: 1000000000\n  max_queue_wait: 1h\n  max_queue_length: {}\n\
         services:\n  - {{ name: bench, api_key: {API_KEY} }}\n\
         state: {{ file: ~, usage_sync_interval: 0s }}\n",
        queued * 2
    );
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;
    if transport == Transport::Http1 {
        let limit = open_files_limit(&proxy.pid().to_string()).unwrap_or(u64::MAX);
        if limit < queued as u64 + 100 {
            println!("http1: skipped, the proxy's open-files limit is {limit}");
            return Verdict {
                target: "memory per queued request, HTTP/1.1",
                value: format!("skipped, the proxy's open-files limit is {limit}"),
                met: None,
            };
        }
    }
    let request = RequestSpec::post("/rest/v1/leads.json", Bytes::from_static(QUEUED_BODY))
        .to(proxy_addr)
        .with_key(API_KEY);

    // Warm up: every connection HTTP/2 will use answers once, so the
    // baseline holds the connections and only requests are added.
    let mut h2_senders = Vec::new();
    if transport == Transport::Http2 {
        for _ in 0..queued.div_ceil(STREAMS_PER_CONNECTION) + 1 {
            let mut sender = connect_h2(proxy_addr).await.expect("h2 connection");
            exchange_h2(&mut sender, &request).await.expect("warm-up answer");
            h2_senders.push(sender);
        }
    } else {
        for _ in 0..10 {
            let mut sender = connect_h1(proxy_addr).await.expect("connection");
            exchange(&mut sender, &request).await.expect("warm-up answer");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = proxy.rss_kib();

    // One call hangs at the simulator and holds the only slot.
    post(sim_addr, "/_sim/faults", br#"{"hang_next":1}"#)
        .await
        .expect("inject a hang");
    let mut tasks = Vec::new();
    let blocker = request.clone();
    let mut blocker_sender = h2_senders.pop();
    tasks.push(tokio::spawn(async move {
        match blocker_sender.as_mut() {
            Some(sender) => exchange_h2(sender, &blocker).await,
            None => exchange(&mut connect_h1(blocker.addr).await?, &blocker).await,
        }
    }));
    wait_metric(admin_addr, "marketo_proxy_inflight", 1.0, &mut proxy).await;

    let connecting = Arc::new(Semaphore::new(256));
    for index in 0..queued {
        let request = request.clone();
        let sender = h2_senders.get(index / STREAMS_PER_CONNECTION).cloned();
        let connecting = Arc::clone(&connecting);
        tasks.push(tokio::spawn(async move {
            match sender {
                Some(mut sender) => exchange_h2(&mut sender, &request).await,
                None => {
                    let permit = connecting.acquire_owned().await;
                    let mut sender = connect_h1(request.addr).await?;
                    drop(permit);
                    exchange(&mut sender, &request).await
                }
            }
        }));
    }
    let depth = wait_metric(admin_addr, "marketo_proxy_queue_depth", queued as f64, &mut proxy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = proxy.rss_kib();
    sim.check_alive();
    let grown = loaded.saturating_sub(baseline) as f64 * 1024.0;
    let per_request = grown / queued as f64;
    let label = match transport {
        Transport::Http2 => format!(
            "http2 ({} connections x {STREAMS_PER_CONNECTION} streams, opened before the baseline)",
            queued.div_ceil(STREAMS_PER_CONNECTION)
        ),
        Transport::Http1 => {
            format!("http1 ({queued} connections, one request each, opened after the baseline)")
        }
    };
    println!("{label}:");
    println!(
        "  queue depth {depth:.0}; proxy RSS {baseline} KiB before, {loaded} KiB with the queue full: \
         {per_request:.0} bytes per queued request, {:.0} bytes beyond its {}-byte body (target <= 2048)",
        per_request - QUEUED_BODY.len() as f64,
        QUEUED_BODY.len()
    );
    for task in &tasks {
        assert!(!task.is_finished(), "a queued request was answered or failed");
    }
    for task in tasks {
        task.abort();
    }
    assert_eq!(depth as usize, queued);
    assert!(loaded > 0);
    let beyond_body = per_request - QUEUED_BODY.len() as f64;
    Verdict::new(
        match transport {
            Transport::Http2 => "memory per queued request beyond its body <= 2048 B, HTTP/2 streams",
            Transport::Http1 => "memory per queued request beyond its body <= 2048 B, HTTP/1.1 connections",
        },
        format!("{beyond_body:.0} B"),
        beyond_body <= 2048.0,
    )
}

/// Polls the proxy's `/metrics` until the sum of `name`'s series reaches
/// `want`; returns the value seen.
async fn wait_metric(admin: SocketAddr, name: &str, want: f64, proxy: &mut Process) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        proxy.check_alive();
        let text = get(admin, "/metrics").await.unwrap_or_default();
        let value = metric_sum(&String::from_utf8_lossy(&text), name);
        if value >= want {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {value}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn open_files_limit(pid: &str) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------
// The load generator

/// A request the load generator sends over and over.
#[derive(Clone)]
struct RequestSpec {
    addr: SocketAddr,
    method: Method,
    path: String,
    api_key: Option<String>,
    body: Bytes,
}

impl RequestSpec {
    fn get(path: &str) -> Self {
        Self {
            addr: local_addr(0),
            method: Method::GET,
            path: path.to_owned(),
            api_key: None,
            body: Bytes::new(),
        }
    }

    fn post(path: &str, body: Bytes) -> Self {
        Self {
            method: Method::POST,
            body,
            ..Self::get(path)
        }
    }

    fn to(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    fn with_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_owned());
        self
    }

    fn build(&self, with_host: bool) -> Result<Request<Full<Bytes>>, BoxError> {
        let mut builder = Request::builder().method(self.method.clone());
        if with_host {
            builder = builder
                .uri(self.path.as_str())
                .header(header::HOST, self.addr.to_string());
        } else {
            builder = builder.uri(format!("http://{}{}", self.addr, self.path));
        }
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key.as_str());
        }
        if !self.body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        Ok(builder.body(Full::new(self.body.clone()))?)
    }
}

/// Latencies and counts of answered requests.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    ok: u64,
    errors: u64,
    measured: Duration,
}

impl Samples {
    fn merge(&mut self, mut other: Samples) {
        self.latencies.append(&mut other.latencies);
        self.ok += other.ok;
        self.errors += other.errors;
        self.measured += other.measured;
        self.latencies.sort_unstable();
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.measured.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `connections` clients, each sending its next request as soon as the
/// last is answered, until `end`; requests begun after `start` count.
async fn closed_loop(request: &RequestSpec, connections: usize, start: Instant, end: Instant) -> Samples {
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut sender = None;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let sender_now = match &mut sender {
                        Some(sender) => sender,
                        None => match connect_h1(request.addr).await {
                            Ok(fresh) => sender.insert(fresh),
                            Err(error) => {
                                eprintln!("connect {}: {error}", request.addr);
                                samples.errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let result = exchange(sender_now, &request).await;
                    if began < start {
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            samples.ok += 1;
                            samples.latencies.push(began.elapsed());
                        }
                        Err(error) => {
                            eprintln!("request to {}: {error}", request.addr);
                            samples.errors += 1;
                            sender = None;
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut total = Samples::default();
    for client in clients {
        total.merge(client.await.expect("client task"));
    }
    total.measured = end - start;
    total
}

/// `connections` clients sending `rate` requests/s in total at a steady
/// pace: latency without queueing in the load generator.
async fn paced_loop(
    request: &RequestSpec,
    connections: usize,
    rate: f64,
    warmup: Duration,
    measure: Duration,
) -> Samples {
    let start = Instant::now() + warmup;
    let end = start + measure;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let clients: Vec<_> = (0..connections)
        .map(|index| {
            let request = request.clone();
            let first = Instant::now() + interval.mul_f64(index as f64 / connections as f64);
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut sender = match connect_h1(request.addr).await {
                    Ok(sender) => sender,
                    Err(_) => {
                        samples.errors += 1;
                        return samples;
                    }
                };
                let mut ticks = tokio::time::interval_at(first, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let began = ticks.tick().await;
                    if began >= end {
                        break;
                    }
                    let began = Instant::now().max(began);
                    let result = exchange(&mut sender, &request).await;
                    if began < start {
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            samples.ok += 1;
                            samples.latencies.push(began.elapsed());
                        }
                        Err(error) => {
                            eprintln!("request to {}: {error}", request.addr);
                            samples.errors += 1;
                            match connect_h1(request.addr).await {
                                Ok(fresh) => sender = fresh,
                                Err(_) => return samples,
                            }
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut total = Samples::default();
    for client in clients {
        total.merge(client.await.expect("client task"));
    }
    total.measured = measure;
    total
}

async fn connect_h1(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn connect_h2(addr: SocketAddr) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request and its whole answer, which must be a Marketo success.
async fn exchange(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(), BoxError> {
    sender.ready().await?;
    let response = sender.send_request(request.build(true)?).await?;
    check_success(response).await
}

async fn exchange_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    request: &RequestSpec,
) -> Result<(), BoxError> {
    sender.ready().await?;
    let response = sender.send_request(request.build(false)?).await?;
    check_success(response).await
}

async fn check_success(response: Response<Incoming>) -> Result<(), BoxError> {
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    const SUCCESS: &[u8] = b"\"success\":true";
    let success = body.windows(SUCCESS.len()).any(|window| window == SUCCESS);
    if status == StatusCode::OK && success {
        Ok(())
    } else {
        Err(format!("answer {status}: {}", String::from_utf8_lossy(&body)).into())
    }
}

/// A one-off GET on a fresh connection; the body when the status is 200.
async fn get(addr: SocketAddr, path: &str) -> Result<Bytes, BoxError> {
    one_off(addr, Method::GET, path, Bytes::new()).await
}

async fn post(addr: SocketAddr, path: &str, body: &'static [u8]) -> Result<Bytes, BoxError> {
    one_off(addr, Method::POST, path, Bytes::from_static(body)).await
}

async fn one_off(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> Result<Bytes, BoxError> {
    let mut sender = connect_h1(addr).await?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status == StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("{path}: {status}").into())
    }
}

// ---------------------------------------------------------------------------
// Processes under test

/// A child process that is stopped when this is dropped, panics included.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Stop with SIGTERM (and wait) before SIGKILL.
    terminate_gently: bool,
}

impl Process {
    fn spawn(name: &str, program: &Path, args: &[&str], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", program.display()));
        Self {
            name: name.to_owned(),
            child,
            log,
            terminate_gently: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the end of the log when the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{} exited ({status}); last lines of its log:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    fn rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmRSS:"))
                    .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.terminate_gently {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            for _ in 0..300 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `marketo-proxy serve` with `config`. With
/// `MARKETO_BENCH_PROXY_WRAPPER` set (e.g. `valgrind --tool=dhat` or
/// `perf record -g -o /tmp/proxy.perf --`), the proxy runs under that
/// command, for profiling; its figures then include the wrapper's cost.
async fn start_proxy(dir: &Path, name: &str, config: &str, admin: SocketAddr) -> Process {
    let path = dir.join(format!("{name}.yaml"));
    fs::write(&path, config).expect("proxy config");
    let config_path = path.display().to_string();
    let wrapper = std::env::var("MARKETO_BENCH_PROXY_WRAPPER").unwrap_or_default();
    let mut command: Vec<&str> = wrapper.split_whitespace().collect();
    let wrapped = !command.is_empty();
    command.extend([PROXY_EXE, "serve", "--config", &config_path]);
    let mut proxy = Process::spawn(name, Path::new(command[0]), &command[1..], dir);
    // A profiler writes its report when the proxy exits on SIGTERM.
    proxy.terminate_gently = wrapped;
    wait_ready(&mut proxy, admin, "/readyz").await;
    proxy
}

async fn start_sim(dir: &Path, addr: SocketAddr, extra: &[&str]) -> Process {
    let listen = addr.to_string();
    let client = format!("{CLIENT_ID}:{CLIENT_SECRET}:bench@example.com");
    let mut args = vec!["--listen", &listen, "--client", &client];
    args.extend_from_slice(extra);
    let mut sim = Process::spawn("marketo-sim", Path::new(SIM_EXE), &args, dir);
    wait_ready(&mut sim, addr, "/_sim/stats").await;
    sim
}

/// Waits until `GET path` answers 200.
async fn wait_ready(process: &mut Process, addr: SocketAddr, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        process.check_alive();
        if get(addr, path).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready at {addr}{path}",
            process.name
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// CPU seconds a process's live threads have run (`schedstat`, in ns).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// CPU seconds of a process and its direct children (nginx's workers).
fn cpu_seconds_with_children(pid: u32) -> f64 {
    let mut total = cpu_seconds(pid);
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            // The command name may hold spaces; the parent pid follows it.
            let parent = fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(pid) {
                total += cpu_seconds(child);
            }
        }
    }
    total
}

fn ms(duration: Duration) -> String {
    format!("{:.3}ms", duration.as_secs_f64() * 1e3)
}

fn secs(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

// ---------------------------------------------------------------------------
// The static upstream and the bare hyper proxy

/// Serves Marketo-shaped answers with no bookkeeping at all, so the
/// pass-through figures measure the layer in front of it.
fn static_upstream(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(static_answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn static_answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if request.uri().path() == "/identity/oauth/token" {
        TOKEN_ANSWER
    } else {
        LEAD_ANSWER
    };
    // Read the request body so the connection stays reusable.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    Ok(response)
}

/// A reverse proxy with nothing but hyper in it: the same server (auto
/// HTTP/1 + HTTP/2) and pooled hyper-util client as marketo-proxy, the
/// request passed on as it came. A reference for what the stacks cost.
fn bare_proxy(listen: SocketAddr, upstream: SocketAddr) {
    use hyper_util::client::legacy::Client;
    use hyper_util::server::conn::auto;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client: BareClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let server = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let server = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    bare_forward(client.clone(), upstream, request)
                });
                let _ = server.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}

type BareClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>;
type BareBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn bare_forward(
    client: BareClient,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<BareBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let sent = match format!("http://{upstream}{path}").parse() {
        Ok(uri) => {
            parts.uri = uri;
            client.request(Request::from_parts(parts, body)).await.ok()
        }
        Err(_) => None,
    };
    Ok(match sent {
        Some(response) => response.map(BodyExt::boxed),
        None => {
            let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    })
}
