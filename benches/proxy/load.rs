//! The load generator: keep-alive HTTP/1.1 clients in a closed loop (as
//! fast as answers come) or paced at a steady light rate, or one request
//! per new connection, and the latencies and counts they collect.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{BoxError, RequestSpec, connect_h1, exchange};

/// Latencies and counts of answered requests.
#[derive(Default)]
pub struct Samples {
    latencies: Vec<Duration>,
    pub ok: u64,
    pub errors: u64,
    measured: Duration,
}

impl Samples {
    /// Counts the outcome of a request begun at `began`: an answer with
    /// its latency, or an error, which is logged. False on an error.
    fn count(&mut self, began: Instant, result: Result<(), BoxError>, addr: SocketAddr) -> bool {
        self.record(result.map(|()| began.elapsed()), addr)
    }

    /// Counts an answer that took `latency`, or an error, which is logged.
    fn record(&mut self, latency: Result<Duration, BoxError>, addr: SocketAddr) -> bool {
        match latency {
            Ok(latency) => {
                self.ok += 1;
                self.latencies.push(latency);
                true
            }
            Err(error) => {
                eprintln!("request to {addr}: {error}");
                self.errors += 1;
                false
            }
        }
    }

    pub fn merge(&mut self, mut other: Samples) {
        self.latencies.append(&mut other.latencies);
        self.ok += other.ok;
        self.errors += other.errors;
        self.measured += other.measured;
        self.latencies.sort_unstable();
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.measured.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `connections` clients, each sending its next request as soon as the
/// last is answered, until `end`; requests begun after `start` count.
pub async fn closed_loop(request: &RequestSpec, connections: usize, start: Instant, end: Instant) -> Samples {
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
                    if !samples.count(began, result, request.addr) {
                        sender = None;
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
pub async fn paced_loop(
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
                    if !samples.count(began, result, request.addr) {
                        match connect_h1(request.addr).await {
                            Ok(fresh) => sender = fresh,
                            Err(_) => return samples,
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

/// One request per new connection, `rate` requests/s for `measure`: what
/// a client that keeps no connection open sees. Latency counts from the
/// moment the request was due, connecting included.
pub async fn fresh_connections(request: &RequestSpec, rate: f64, measure: Duration) -> Samples {
    let end = Instant::now() + measure;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut requests = Vec::new();
    loop {
        let due = ticks.tick().await;
        if due >= end {
            break;
        }
        let request = request.clone();
        requests.push(tokio::spawn(async move {
            let result = async {
                let mut sender = connect_h1(request.addr).await?;
                exchange(&mut sender, &request).await
            }
            .await;
            result.map(|()| due.elapsed())
        }));
    }
    let mut total = Samples::default();
    for answered in requests {
        total.record(answered.await.expect("request task"), request.addr);
    }
    total.latencies.sort_unstable();
    total.measured = measure;
    total
}
