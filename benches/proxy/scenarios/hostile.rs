//! Hostile clients against one proxy process: a well-behaved service's
//! latency at light load, first on a quiet proxy and then while attackers
//! run against the same process, with the proxy's resident memory and
//! open descriptors before, during and after the attacks. Measured and
//! printed, not asserted; a smoke run checks that every attack met its
//! refusal and that no well-behaved request failed.
//!
//! The attacks run all at once, each attacker starting again as soon as
//! the proxy has cut it off: heads trickled a byte at a time (slowloris);
//! a declared 1 MB body trickled in chunks (past the body budget); silent
//! connections; an HTTP/2 stream flood (far more streams than the stream
//! limit, each waiting for a body); multipart boundaries over 70
//! characters with a body announced and never sent; request heads without
//! end. `tests/hostile.rs` asserts what the proxy does to each; this
//! measures what they cost a well-behaved client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::Mode;
use crate::client::{RequestSpec, get};
use crate::kernel::held_connections;
use crate::load::{Samples, fresh_connections, paced_loop};
use crate::processes::{
    API_KEY, Process, cpu_seconds, free_port, lifted_limits_config, local_addr, open_fds, rss_kib,
    start_proxy, start_static_upstream,
};
use crate::raw_h2::{ENHANCE_YOUR_CALM, GOAWAY, REFUSED_STREAM, RST_STREAM, RawH2};
use crate::report::{Verdict, ms};

/// The body a slow client announces and never finishes.
const SLOW_BODY_BYTES: usize = 1_000_000;

/// The proxy's settings, the well-behaved load and the attackers.
struct HostilePlan {
    max_connections: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    http2_streams: u32,
    body_budget: usize,
    /// The well-behaved service: requests/s paced over keep-alive
    /// connections, and requests/s each on a new connection.
    paced_rate: f64,
    paced_connections: usize,
    fresh_rate: f64,
    warmup: Duration,
    measure: Duration,
    /// From starting the attackers to measuring, so that every attack is
    /// in place (the budget full, the silent connections open).
    ramp: Duration,
    /// Attacks one after the other, each followed by a quiet pause: if
    /// memory held after the first is reused by the second, it is the
    /// allocator keeping it, not a leak.
    rounds: usize,
    slowloris: usize,
    slowloris_pause: Duration,
    slow_bodies: usize,
    body_chunk: usize,
    body_pause: Duration,
    silent: usize,
    h2_connections: usize,
    /// Streams an HTTP/2 attacker opens at once, then again every
    /// [`H2_BURST_PAUSE`] on the same connection.
    h2_first_burst: u32,
    h2_burst: u32,
    boundaries_per_second: f64,
    endless_heads_per_second: f64,
}

/// Between two bursts of streams on one HTTP/2 connection.
const H2_BURST_PAUSE: Duration = Duration::from_millis(100);

/// Attack tasks that share one attack's rate.
const TASKS_PER_RATE: usize = 4;

impl HostilePlan {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Smoke => Self {
                max_connections: 256,
                header_read_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(3),
                http2_streams: 16,
                body_budget: 64 * 1024,
                paced_rate: 100.0,
                paced_connections: 2,
                fresh_rate: 10.0,
                warmup: Duration::from_millis(200),
                measure: Duration::from_secs(1),
                ramp: Duration::from_millis(1500),
                rounds: 1,
                slowloris: 10,
                slowloris_pause: Duration::from_millis(200),
                slow_bodies: 5,
                body_chunk: 8 * 1024,
                body_pause: Duration::from_millis(100),
                silent: 20,
                h2_connections: 1,
                h2_first_burst: 50,
                h2_burst: 10,
                boundaries_per_second: 20.0,
                endless_heads_per_second: 8.0,
            },
            Mode::Full => Self {
                max_connections: 1024,
                header_read_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(10),
                http2_streams: 256,
                body_budget: 16 << 20,
                paced_rate: 1000.0,
                paced_connections: 10,
                fresh_rate: 20.0,
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(10),
                ramp: Duration::from_secs(4),
                rounds: 2,
                slowloris: 200,
                slowloris_pause: Duration::from_secs(1),
                slow_bodies: 100,
                body_chunk: 16 * 1024,
                body_pause: Duration::from_millis(250),
                silent: 500,
                h2_connections: 4,
                h2_first_burst: 1000,
                h2_burst: 100,
                boundaries_per_second: 200.0,
                endless_heads_per_second: 20.0,
            },
        }
    }

    fn server_settings(&self) -> String {
        format!(
            "{{ max_connections: {}, header_read_timeout: {}ms, idle_timeout: {}ms, \
             http2_max_concurrent_streams: {}, max_buffered_body_bytes: {} }}",
            self.max_connections,
            self.header_read_timeout.as_millis(),
            self.idle_timeout.as_millis(),
            self.http2_streams,
            self.body_budget
        )
    }
}

/// What the attackers saw, counted as it happens.
#[derive(Default)]
struct Tally {
    /// Trickled heads the proxy closed before they were complete.
    heads_cut_off: AtomicU64,
    /// Slow bodies refused with 503 and Marketo's 608.
    bodies_refused: AtomicU64,
    /// Slow bodies that ended otherwise (a 408, or closed).
    bodies_ended_otherwise: AtomicU64,
    /// Silent connections the proxy closed.
    silent_closed: AtomicU64,
    /// HTTP/2 streams refused with `REFUSED_STREAM`.
    streams_refused: AtomicU64,
    /// HTTP/2 connections the proxy ended with GOAWAY, and of those, the
    /// ones with `ENHANCE_YOUR_CALM` (h2's bound on streams it reset).
    goaways: AtomicU64,
    goaways_calm: AtomicU64,
    /// Over-long boundaries answered with 400.
    boundaries_refused: AtomicU64,
    /// Heads without end answered with 431 or closed.
    endless_heads_refused: AtomicU64,
    /// Anything else an attacker got (an answer it should not have had).
    unexpected: AtomicU64,
    /// Connections that could not be made.
    connect_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The proxy's resident memory, open descriptors and client connections
/// at one moment.
#[derive(Clone, Copy, Default)]
struct Footprint {
    rss_kib: u64,
    fds: usize,
    /// Connections accepted on the proxy's listener and not closed yet
    /// (the rest of its descriptors: listeners, upstream connections, the
    /// runtime's own).
    clients: usize,
}

impl Footprint {
    fn of(pid: u32, listener: SocketAddr) -> Self {
        Self {
            rss_kib: rss_kib(pid),
            fds: open_fds(pid),
            clients: held_connections(listener.port()),
        }
    }

    fn max(self, other: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
            clients: self.clients.max(other.clients),
        }
    }
}

/// The well-behaved service over one phase.
struct Phase {
    paced: Samples,
    fresh: Samples,
    proxy_cpu: f64,
    /// CPU of this process: the well-behaved clients, and the attackers
    /// when they run.
    harness_cpu: f64,
}

/// One attack round: the well-behaved service under attack, what the
/// attackers saw, and the proxy's footprint during and after.
struct Round {
    under_attack: Phase,
    tally: Tally,
    attacked_for: Duration,
    most: Footprint,
    at_end: Footprint,
    after: Footprint,
    settled_after: Duration,
}

pub async fn run(mode: Mode) -> Vec<Verdict> {
    let plan = HostilePlan::new(mode);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "== hostile: limits lifted, static upstream; proxy server settings {}",
        plan.server_settings()
    );
    println!(
        "attackers: {} heads trickled (a byte every {:?}), {} slow bodies ({} B every {:?} of a declared {} B), \
         {} silent connections, {} HTTP/2 connections flooding streams ({} at once, then {} every {:?}), \
         {}/s multipart boundaries of 71 characters, {}/s heads without end",
        plan.slowloris,
        plan.slowloris_pause,
        plan.slow_bodies,
        plan.body_chunk,
        plan.body_pause,
        SLOW_BODY_BYTES,
        plan.silent,
        plan.h2_connections,
        plan.h2_first_burst,
        plan.h2_burst,
        H2_BURST_PAUSE,
        plan.boundaries_per_second,
        plan.endless_heads_per_second
    );
    println!(
        "well-behaved: {} req/s paced over {} keep-alive connections and {} req/s each on a new connection; \
         {:?} warm-up, {:?} measured",
        plan.paced_rate, plan.paced_connections, plan.fresh_rate, plan.warmup, plan.measure
    );

    let (_upstream, upstream_addr) = start_static_upstream(dir.path()).await;
    let proxy_addr = local_addr(free_port());
    let admin_addr = local_addr(free_port());
    let config = lifted_limits_config(proxy_addr, admin_addr, upstream_addr, &plan.server_settings());
    let mut proxy = start_proxy(dir.path(), "proxy", &config, admin_addr).await;
    let pid = proxy.pid();
    let lead = RequestSpec::get("/rest/v1/lead/1.json")
        .to(proxy_addr)
        .with_key(API_KEY);

    // The attackers run on a runtime of their own, on one thread, so that
    // they queue behind each other and not in front of the well-behaved
    // clients' tasks (the two still share the machine's CPUs).
    let attack_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("attackers")
        .enable_all()
        .build()
        .expect("attackers' runtime");

    let quiet = well_behaved(&plan, &lead, pid).await;
    let before = Footprint::of(pid, proxy_addr);
    let mut rounds = Vec::new();
    for _ in 0..plan.rounds {
        let attack = Attack {
            plan: &plan,
            addr: proxy_addr,
            runtime: attack_runtime.handle(),
        };
        rounds.push(attack.round(&lead, &mut proxy).await);
    }
    attack_runtime.shutdown_background();
    let still_serves = get(admin_addr, "/healthz").await.is_ok();

    print_phases(&quiet, &rounds);
    for (index, round) in rounds.iter().enumerate() {
        print_tally(index + 1, &round.tally, round.attacked_for);
    }
    println!(
        "{:<34} {:>10} {:>9} {:>19}",
        "proxy", "RSS KiB", "open fds", "client connections"
    );
    let mut footprints = vec![("before (quiet)".to_owned(), before)];
    for (index, round) in rounds.iter().enumerate() {
        let number = index + 1;
        footprints.push((format!("attack {number}: most"), round.most));
        footprints.push((format!("attack {number}: at its end"), round.at_end));
        footprints.push((
            format!(
                "attack {number}: after, {:.1}s later",
                round.settled_after.as_secs_f64()
            ),
            round.after,
        ));
    }
    for (label, footprint) in footprints {
        println!(
            "{label:<34} {:>10} {:>9} {:>19}",
            footprint.rss_kib, footprint.fds, footprint.clients
        );
    }

    let sum = |counter: fn(&Tally) -> &AtomicU64| {
        rounds
            .iter()
            .map(|round| read(counter(&round.tally)))
            .sum::<u64>()
    };
    let unexpected = sum(|tally| &tally.unexpected);
    let counters: [fn(&Tally) -> &AtomicU64; 6] = [
        |tally| &tally.heads_cut_off,
        |tally| &tally.bodies_refused,
        |tally| &tally.silent_closed,
        |tally| &tally.streams_refused,
        |tally| &tally.boundaries_refused,
        |tally| &tally.endless_heads_refused,
    ];
    let every_attack_refused = counters.into_iter().all(|counter| sum(counter) > 0);
    let failed: u64 = rounds
        .iter()
        .map(|round| round.under_attack.paced.errors + round.under_attack.fresh.errors)
        .sum();
    let left_open = rounds.iter().map(|round| round.after.clients).max().unwrap_or(0);
    if mode == Mode::Smoke {
        assert_eq!(
            quiet.paced.errors + quiet.fresh.errors,
            0,
            "errors on the quiet proxy"
        );
        assert_eq!(failed, 0, "well-behaved requests failed under attack");
        assert!(
            rounds
                .iter()
                .all(|round| round.under_attack.paced.ok > 0 && round.under_attack.fresh.ok > 0)
        );
        assert!(every_attack_refused, "an attack never met its refusal");
        assert_eq!(unexpected, 0, "an attacker got an answer it should not have");
        assert!(still_serves);
    }
    vec![
        Verdict::new(
            "hostile: every attack refused or cut off, no attacker answered otherwise",
            format!("{unexpected} unexpected answers"),
            every_attack_refused && unexpected == 0,
        ),
        Verdict::new(
            "hostile: no well-behaved request failed under attack",
            format!("{failed} failed"),
            failed == 0,
        ),
        Verdict::new(
            "hostile: no client connection left open once the attackers are gone",
            format!(
                "{left_open} left; most during an attack {} (cap {})",
                rounds.iter().map(|round| round.most.clients).max().unwrap_or(0),
                plan.max_connections
            ),
            left_open == 0,
        ),
    ]
}

/// Attacks on the proxy at `addr`, run on `runtime`.
struct Attack<'a> {
    plan: &'a HostilePlan,
    addr: SocketAddr,
    runtime: &'a Handle,
}

impl Attack<'_> {
    /// Attacks the proxy, measures the well-behaved service meanwhile, stops
    /// the attackers and waits until the proxy holds no client connection.
    async fn round(&self, lead: &RequestSpec, proxy: &mut Process) -> Round {
        let (plan, addr) = (self.plan, self.addr);
        let pid = proxy.pid();
        let tally = Arc::new(Tally::default());
        let stop = CancellationToken::new();
        let attackers = self.start(&tally, &stop);
        let sampler = tokio::spawn(sample_footprint(pid, addr, stop.clone()));
        let began = Instant::now();
        tokio::time::sleep(plan.ramp).await;
        proxy.check_alive();
        let under_attack = well_behaved(plan, lead, pid).await;
        let at_end = Footprint::of(pid, addr);
        stop.cancel();
        let attacked_for = began.elapsed();
        attackers.join_all().await;
        let most = sampler.await.expect("sampler");
        proxy.check_alive();

        // The attackers have closed their connections: how soon the proxy has
        // closed its side of every one.
        let stopped = Instant::now();
        let settle_within = plan.header_read_timeout + plan.idle_timeout + Duration::from_secs(5);
        while held_connections(addr.port()) > 0 && stopped.elapsed() < settle_within {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let settled_after = stopped.elapsed();
        // A quiet pause, as long as a measured run, before what follows.
        tokio::time::sleep(plan.measure).await;
        let tally = Arc::try_unwrap(tally).unwrap_or_default();
        Round {
            under_attack,
            tally,
            attacked_for,
            most,
            at_end,
            after: Footprint::of(pid, addr),
            settled_after,
        }
    }

    /// Every attacker, each in its own task until `stop`.
    fn start(&self, tally: &Arc<Tally>, stop: &CancellationToken) -> JoinSet<()> {
        let (plan, addr) = (self.plan, self.addr);
        let mut attackers = JoinSet::new();
        let attacker = |tally: &Arc<Tally>| Attacker {
            addr,
            tally: Arc::clone(tally),
            stop: stop.clone(),
        };
        for _ in 0..plan.slowloris {
            attackers.spawn_on(attacker(tally).trickle_head(plan.slowloris_pause), self.runtime);
        }
        for _ in 0..plan.slow_bodies {
            attackers.spawn_on(
                attacker(tally).trickle_body(plan.body_chunk, plan.body_pause),
                self.runtime,
            );
        }
        for _ in 0..plan.silent {
            attackers.spawn_on(attacker(tally).stay_silent(), self.runtime);
        }
        for _ in 0..plan.h2_connections {
            attackers.spawn_on(
                attacker(tally).flood_streams(plan.h2_first_burst, plan.h2_burst, plan.http2_streams),
                self.runtime,
            );
        }
        let every = |per_second: f64| Duration::from_secs_f64(TASKS_PER_RATE as f64 / per_second);
        for _ in 0..TASKS_PER_RATE {
            attackers.spawn_on(
                attacker(tally).long_boundaries(every(plan.boundaries_per_second)),
                self.runtime,
            );
            attackers.spawn_on(
                attacker(tally).endless_heads(every(plan.endless_heads_per_second)),
                self.runtime,
            );
        }
        attackers
    }
}

/// The well-behaved service for one phase, with the proxy's CPU time
/// over it.
async fn well_behaved(plan: &HostilePlan, lead: &RequestSpec, pid: u32) -> Phase {
    let proxy_cpu = cpu_seconds(pid);
    let harness_cpu = cpu_seconds(std::process::id());
    let (paced, fresh) = tokio::join!(
        paced_loop(
            lead,
            plan.paced_connections,
            plan.paced_rate,
            plan.warmup,
            plan.measure
        ),
        fresh_connections(lead, plan.fresh_rate, plan.warmup + plan.measure),
    );
    Phase {
        paced,
        fresh,
        proxy_cpu: cpu_seconds(pid) - proxy_cpu,
        harness_cpu: cpu_seconds(std::process::id()) - harness_cpu,
    }
}

fn print_phases(quiet: &Phase, rounds: &[Round]) {
    println!(
        "{:<16} {:>8} {:>9} {:>9} {:>7} | {:>12} {:>12} {:>12} {:>7} | {:>9} {:>9}",
        "phase",
        "req/s",
        "p50",
        "p99",
        "errors",
        "new-conn p50",
        "new-conn p99",
        "new-conn max",
        "errors",
        "proxy CPU",
        "harn. CPU"
    );
    let mut phases = vec![("quiet".to_owned(), quiet)];
    for (index, round) in rounds.iter().enumerate() {
        phases.push((format!("under attack {}", index + 1), &round.under_attack));
    }
    for (name, phase) in &phases {
        println!(
            "{name:<16} {:>8.0} {:>9} {:>9} {:>7} | {:>12} {:>12} {:>12} {:>7} | {:>8.2}s {:>8.2}s",
            phase.paced.rate(),
            ms(phase.paced.percentile(0.50)),
            ms(phase.paced.percentile(0.99)),
            phase.paced.errors,
            ms(phase.fresh.percentile(0.50)),
            ms(phase.fresh.percentile(0.99)),
            ms(phase.fresh.percentile(1.0)),
            phase.fresh.errors,
            phase.proxy_cpu,
            phase.harness_cpu
        );
    }
    let p99 = |samples: &Samples| samples.percentile(0.99).as_secs_f64().max(f64::MIN_POSITIVE);
    for (name, phase) in phases.iter().skip(1) {
        println!(
            "p99 {name} / quiet: keep-alive {:.2}, new connections {:.2}",
            p99(&phase.paced) / p99(&quiet.paced),
            p99(&phase.fresh) / p99(&quiet.fresh)
        );
    }
}

fn print_tally(round: usize, tally: &Tally, over: Duration) {
    println!(
        "attack {round}, {:.1}s: heads cut off {}; slow bodies refused with 608 {} (ended otherwise {}); \
         silent connections closed {}; HTTP/2 streams refused {} (GOAWAY {}, {} of them ENHANCE_YOUR_CALM); boundaries refused {}; \
         endless heads refused {}; unexpected answers {}; failed connects {}",
        over.as_secs_f64(),
        read(&tally.heads_cut_off),
        read(&tally.bodies_refused),
        read(&tally.bodies_ended_otherwise),
        read(&tally.silent_closed),
        read(&tally.streams_refused),
        read(&tally.goaways),
        read(&tally.goaways_calm),
        read(&tally.boundaries_refused),
        read(&tally.endless_heads_refused),
        read(&tally.unexpected),
        read(&tally.connect_failures),
    );
}

/// The largest footprint seen every 250 ms until `stop`.
async fn sample_footprint(pid: u32, listener: SocketAddr, stop: CancellationToken) -> Footprint {
    let mut most = Footprint::default();
    while !stop.is_cancelled() {
        most = most.max(Footprint::of(pid, listener));
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    most
}

/// One attacker: where it connects, what it counts, when it stops.
struct Attacker {
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: CancellationToken,
}

impl Attacker {
    /// A new connection, or `None` when stopped or the connect failed.
    async fn connect(&self) -> Option<TcpStream> {
        tokio::select! {
            () = self.stop.cancelled() => None,
            connected = TcpStream::connect(self.addr) => match connected {
                Ok(stream) => Some(stream),
                Err(_) => {
                    bump(&self.tally.connect_failures);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    None
                }
            },
        }
    }

    /// A new connection at the next of `ticks` (or the one after, if it
    /// failed), or `None` once stopped.
    async fn connect_at(&self, ticks: &mut Interval) -> Option<TcpStream> {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return None,
                _ = ticks.tick() => {}
            }
            if let Some(stream) = self.connect().await {
                return Some(stream);
            }
        }
    }

    /// Sends a request head a byte every `pause`, again on a new
    /// connection each time the proxy cuts it off.
    async fn trickle_head(self, pause: Duration) {
        let head =
            format!("GET /rest/v1/lead/1.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {API_KEY}\r\n\r\n");
        let head = head.as_bytes();
        while !self.stop.is_cancelled() {
            let Some(mut stream) = self.connect().await else {
                continue;
            };
            let mut buffer = [0_u8; 1024];
            let mut sent = 0;
            let cut_off = loop {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    read = stream.read(&mut buffer) => if matches!(read, Ok(0) | Err(_)) {
                        break true;
                    },
                    () = tokio::time::sleep(pause) => {
                        if sent == head.len() {
                            break false;
                        }
                        if stream.write_all(&head[sent..=sent]).await.is_err() {
                            break true;
                        }
                        sent += 1;
                    }
                }
            };
            bump(if cut_off {
                &self.tally.heads_cut_off
            } else {
                &self.tally.unexpected
            });
        }
    }

    /// Announces a 1 MB body and sends `chunk` bytes of it every `pause`,
    /// again on a new connection each time the proxy ends it.
    async fn trickle_body(self, chunk: usize, pause: Duration) {
        let head = format!(
            "POST /rest/v1/leads.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {SLOW_BODY_BYTES}\r\n\r\n"
        );
        let filler = vec![b' '; chunk];
        while !self.stop.is_cancelled() {
            let Some(mut stream) = self.connect().await else {
                continue;
            };
            if stream.write_all(head.as_bytes()).await.is_err() {
                bump(&self.tally.bodies_ended_otherwise);
                continue;
            }
            let mut answer = Vec::new();
            let mut buffer = [0_u8; 4096];
            let mut sent = 0;
            loop {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    read = stream.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(read) => answer.extend_from_slice(&buffer[..read]),
                    },
                    () = tokio::time::sleep(pause), if sent < SLOW_BODY_BYTES => {
                        let part = chunk.min(SLOW_BODY_BYTES - sent);
                        if stream.write_all(&filler[..part]).await.is_err() {
                            break;
                        }
                        sent += part;
                    }
                }
            }
            let answer = String::from_utf8_lossy(&answer);
            bump(
                if answer.starts_with("HTTP/1.1 503") && answer.contains(r#""code":"608""#) {
                    &self.tally.bodies_refused
                } else {
                    &self.tally.bodies_ended_otherwise
                },
            );
        }
    }

    /// Connects and sends nothing, again each time the proxy closes it.
    async fn stay_silent(self) {
        while !self.stop.is_cancelled() {
            let Some(mut stream) = self.connect().await else {
                continue;
            };
            let mut buffer = [0_u8; 256];
            let closed = async { while matches!(stream.read(&mut buffer).await, Ok(read) if read > 0) {} };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = closed => bump(&self.tally.silent_closed),
            }
        }
    }

    /// Opens `first` streams at once on an HTTP/2 connection, each a POST
    /// whose body never comes, then `burst` more every [`H2_BURST_PAUSE`];
    /// counts the refusals, and starts again on a new connection when the
    /// proxy ends this one.
    async fn flood_streams(self, first: u32, burst: u32, limit: u32) {
        let authority = self.addr.to_string();
        let post = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", authority.as_str()),
            (":path", "/rest/v1/leads.json"),
            ("x-api-key", API_KEY),
            ("content-type", "application/json"),
            ("content-length", "64"),
        ];
        while !self.stop.is_cancelled() {
            let connection = tokio::select! {
                () = self.stop.cancelled() => return,
                connected = RawH2::connect(self.addr) => connected,
            };
            let Ok(mut connection) = connection else {
                bump(&self.tally.connect_failures);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut next = 1_u32;
            // The first burst fills the limit; every stream past it is
            // refused.
            let mut opening = first;
            let mut refusals = first.saturating_sub(limit);
            'connection: loop {
                for _ in 0..opening {
                    if connection.headers(next, &post, false).await.is_err() {
                        break 'connection;
                    }
                    next += 2;
                }
                while refusals > 0 {
                    let frame = tokio::select! {
                        () = self.stop.cancelled() => return,
                        frame = tokio::time::timeout(Duration::from_secs(10), connection.read_frame()) => frame,
                    };
                    let Ok(Ok(frame)) = frame else {
                        break 'connection;
                    };
                    match (frame.kind, frame.error_code()) {
                        (RST_STREAM, Some(REFUSED_STREAM)) => {
                            bump(&self.tally.streams_refused);
                            refusals -= 1;
                        }
                        (GOAWAY, code) => {
                            bump(&self.tally.goaways);
                            if code == Some(ENHANCE_YOUR_CALM) {
                                bump(&self.tally.goaways_calm);
                            }
                            break 'connection;
                        }
                        (RST_STREAM, _) => bump(&self.tally.unexpected),
                        _ => {}
                    }
                }
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(H2_BURST_PAUSE) => {}
                }
                opening = burst;
                refusals = burst;
            }
        }
    }

    /// A multipart request whose boundary is 71 characters, announcing a
    /// 1 MB body it never sends, one every `every`.
    async fn long_boundaries(self, every: Duration) {
        let head = format!(
            "POST /rest/v1/leads.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {API_KEY}\r\n\
             Content-Type: multipart/form-data; boundary={}\r\nContent-Length: {SLOW_BODY_BYTES}\r\n\r\n",
            "b".repeat(71)
        );
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while let Some(mut stream) = self.connect_at(&mut ticks).await {
            let mut answer = Vec::new();
            let answered = async {
                stream.write_all(head.as_bytes()).await?;
                stream.read_to_end(&mut answer).await
            };
            let refused = matches!(
                tokio::time::timeout(Duration::from_secs(10), answered).await,
                Ok(Ok(_)) if answer.starts_with(b"HTTP/1.1 400")
            );
            bump(if refused {
                &self.tally.boundaries_refused
            } else {
                &self.tally.unexpected
            });
        }
    }

    /// A request head that never ends: 1 KB header lines until the proxy
    /// closes the connection, one every `every`.
    async fn endless_heads(self, every: Duration) {
        let start = format!("GET /rest/v1/lead/1.json HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: {API_KEY}\r\n");
        let line = format!("X-Padding: {}\r\n", "a".repeat(1010));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while let Some(mut stream) = self.connect_at(&mut ticks).await {
            let mut written = 0;
            let writing = async {
                stream.write_all(start.as_bytes()).await?;
                // 16 MB of one head would be far past any bound.
                while written < 16 << 20 {
                    stream.write_all(line.as_bytes()).await?;
                    written += line.len();
                }
                Ok::<(), std::io::Error>(())
            };
            let cut_off = matches!(
                tokio::time::timeout(Duration::from_secs(10), writing).await,
                Ok(Err(_))
            );
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer)).await;
            let refused = cut_off && (answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"));
            bump(if refused {
                &self.tally.endless_heads_refused
            } else {
                &self.tally.unexpected
            });
        }
    }
}
