//! Micro-benchmarks of the admission path: the sliding window, one
//! admission decision, the fair queue under contention, and the token
//! cache's hit path. Run with `cargo bench --bench admission`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use marketo_proxy::admission::Admission;
use marketo_proxy::admission::window::SlidingWindow;
use marketo_proxy::config::{Config, UpstreamCredential};
use marketo_proxy::metrics::Metrics;
use marketo_proxy::sim::{SimConfig, Simulator};
use marketo_proxy::token::TokenCache;
use marketo_proxy::upstream::Upstream;
use tokio::time::Instant;

fn config(limits: &str, services: usize) -> Config {
    let services: String = (0..services)
        .map(|index| {
            format!(
                "  - {{ name: s{index}, api_key: key-{index}-0123456789abcdefgh, weight: {} }}\n",
                index % 3 + 1
            )
        })
        .collect();
    let yaml = format!(
        "marketo: {{ base_url: 'http://127.0.0.1:1', client_id: a, client_secret: b }}\n\
         limits:\n{limits}\nservices:\n{services}state: {{ file: ~ }}\n"
    );
    Config::from_yaml_with_env(&yaml, |_| None).expect("bench config is valid")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn sliding_window(c: &mut Criterion) {
    let mut group = c.benchmark_group("window");
    group.bench_function("acquire_and_stamp_at_the_limit", |b| {
        let rt = runtime();
        let _guard = rt.enter();
        let mut window = SlidingWindow::new(100, Duration::from_millis(1), Duration::ZERO);
        b.iter(|| {
            let now = Instant::now();
            if window.has_room(now) {
                window.acquire();
                window.stamp(now);
            }
        });
    });
    group.bench_function("estimate_start_1000_ahead", |b| {
        let rt = runtime();
        let _guard = rt.enter();
        let mut window = SlidingWindow::new(100, Duration::from_secs(20), Duration::from_millis(250));
        let now = Instant::now();
        for _ in 0..100 {
            window.acquire();
            window.stamp(now);
        }
        b.iter(|| window.estimate_start(now, 1000, Duration::from_millis(50)));
    });
    group.finish();
}

fn admission(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("admission");
    // Limits far above the load: the cost of the decision alone.
    let open = config(
        "  window_calls: 1000000000\n  window: 1ms\n  safety_margin: 0s\n  concurrency: 1000000\n  daily_quota: 1000000000000",
        3,
    );
    group.bench_function("admit_answer_release_uncontended", |b| {
        let admission = rt.block_on(async { Admission::new(&open, Metrics::new()) });
        b.to_async(&rt).iter(|| async {
            let mut permit = admission
                .admit(0, Instant::now() + Duration::from_secs(1), false)
                .await
                .expect("admitted");
            permit.answered();
        });
    });
    // 64 clients across 8 services sharing 10 concurrency slots: every
    // admission goes through the queue and the fair choice of a service.
    let contended = config(
        "  window_calls: 1000000000\n  window: 1ms\n  safety_margin: 0s\n  concurrency: 10\n  daily_quota: 1000000000000\n  max_queue_wait: 1h",
        8,
    );
    group.bench_function("1000_admissions_64_clients_8_services_10_slots", |b| {
        b.to_async(&rt).iter_batched(
            || {
                // Setup runs inside the benchmark's runtime.
                let admission = Admission::new(&contended, Metrics::new());
                tokio::spawn(admission.timer());
                admission
            },
            |admission| async move {
                let mut clients = Vec::new();
                for client in 0..64 {
                    let admission = Arc::clone(&admission);
                    clients.push(tokio::spawn(async move {
                        for _ in 0..1000 / 64 + 1 {
                            let mut permit = admission
                                .admit(client % 8, Instant::now() + Duration::from_secs(3600), false)
                                .await
                                .expect("admitted");
                            tokio::task::yield_now().await;
                            permit.answered();
                        }
                    }));
                }
                for client in clients {
                    client.await.expect("client task");
                }
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn token_cache(c: &mut Criterion) {
    let rt = runtime();
    let (sim, cache) = rt.block_on(async {
        let sim = Simulator::spawn(SimConfig {
            latency: Duration::ZERO,
            ..SimConfig::default()
        })
        .await
        .expect("simulator");
        let mut config = config("  window_calls: 100", 1);
        config.marketo.base_url = sim.url().parse().expect("simulator URL");
        let upstream = Upstream::new(&config.marketo).expect("client");
        let credential = UpstreamCredential {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
        };
        let cache = TokenCache::new(upstream, credential, Duration::from_secs(60), Metrics::new());
        cache.get().await.expect("first token");
        (sim, cache)
    });
    c.bench_function("token/cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get().await.expect("cached token") });
    });
    drop(sim);
}

criterion_group!(benches, sliding_window, admission, token_cache);
criterion_main!(benches);
