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
//! - `hostile`: a well-behaved service's light-load latency on a quiet
//!   proxy and while hostile clients attack the same process (slowloris
//!   heads and bodies, silent connections, an HTTP/2 stream flood, long
//!   multipart boundaries, endless heads); the proxy's memory and
//!   descriptors before, during and after.
//! - `soak`: ten minutes of mixed load (four services, reads and writes,
//!   logins, injected faults, a small window) against `marketo-sim`, the
//!   proxy's memory and descriptors every 10 s, and whether they stayed
//!   flat. Not in the default run: `cargo bench --bench proxy -- soak`.
//!
//! `cargo bench --bench proxy` runs the full measurement (BENCHMARKS.md
//! holds the figures). Without `--bench`, as `cargo test --all-targets`
//! runs it, every scenario runs as a short smoke test that asserts basic
//! sanity. Any other argument that does not start with `--` selects the
//! scenarios whose name contains it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bare_proxy;
mod client;
#[path = "../../tests/support/kernel.rs"]
mod kernel;
mod load;
mod nginx;
mod processes;
#[path = "../../tests/support/raw_h2.rs"]
#[allow(dead_code)]
mod raw_h2;
mod report;
mod scenarios;
mod static_upstream;

use scenarios::{hostile, memory, pacing, pass_through, soak};

/// How long the scenarios run and whether they assert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A second or two per scenario, with assertions: what CI runs.
    Smoke,
    /// The measurement BENCHMARKS.md reports.
    Full,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(position) = args.iter().position(|arg| arg == static_upstream::ROLE) {
        let addr = args
            .get(position + 1)
            .and_then(|addr| addr.parse().ok())
            .expect("--static-upstream ADDR");
        static_upstream::serve(addr);
        return;
    }
    if let Some(position) = args.iter().position(|arg| arg == bare_proxy::ROLE) {
        let addr = |offset: usize| {
            args.get(position + offset)
                .and_then(|addr| addr.parse().ok())
                .expect("--bare-proxy LISTEN UPSTREAM")
        };
        bare_proxy::serve(addr(1), addr(2));
        return;
    }
    let scenarios = ["pass-through", "pacing", "memory", "hostile", "soak"];
    // Ten minutes: measured only when asked for by name.
    const ON_REQUEST: &[&str] = &["soak"];
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
        .filter(|name| {
            if filters.is_empty() {
                mode == Mode::Smoke || !ON_REQUEST.contains(name)
            } else {
                filters.iter().any(|filter| name.contains(filter))
            }
        })
        .collect();
    if selected.is_empty() {
        println!("proxy bench: no scenario matches {filters:?}");
        return;
    }
    match mode {
        Mode::Smoke => {
            println!("proxy bench: SMOKE RUN (short, with assertions; `cargo bench --bench proxy` measures)")
        }
        Mode::Full => {
            println!("proxy bench: full measurement");
            for name in ON_REQUEST.iter().filter(|name| !selected.contains(name)) {
                println!("note: `{name}` runs only when named: cargo bench --bench proxy -- {name}");
            }
        }
    }
    report::print_machine();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut verdicts = Vec::new();
    for name in selected {
        println!();
        verdicts.extend(runtime.block_on(async {
            match name {
                "pass-through" => pass_through::run(mode).await,
                "pacing" => pacing::run(mode).await,
                "memory" => memory::run(mode).await,
                "hostile" => hostile::run(mode).await,
                _ => soak::run(mode).await,
            }
        }));
    }
    report::print_targets(mode, &verdicts);
}
