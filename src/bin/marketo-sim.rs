//! `marketo-sim`: run a simulated Marketo instance for tests, demos and
//! integrators who want to exercise their code against Marketo's limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use marketo_proxy::sim::{SimClient, SimConfig, Simulator, server_config};

/// A simulated Marketo instance: identity, the rolling window, the
/// concurrency limit, the daily quota, leads and bulk exports.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Calls allowed in one rolling window.
    #[arg(long, default_value_t = 100)]
    window_calls: u32,
    /// Length of the rolling window, in seconds.
    #[arg(long, default_value_t = 20)]
    window_seconds: u64,
    /// Calls allowed in flight at once.
    #[arg(long, default_value_t = 10)]
    concurrency: u32,
    /// Calls allowed per day.
    #[arg(long, default_value_t = 50_000)]
    daily_quota: u64,
    /// Lifetime of an access token (e.g. 3600s, 1h).
    #[arg(long, default_value = "3600s", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Time every call takes (e.g. 50ms).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Each call takes up to this much more or less than --latency, uniformly.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    latency_jitter: Duration,
    /// Every this many calls, one takes --slow-latency instead (0: none).
    #[arg(long, default_value_t = 0)]
    slow_every: u32,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    slow_latency: Duration,
    /// The instance's clock, in its request ids, ahead of the true time by
    /// this many milliseconds (negative: behind).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_skew_ms: i64,
    /// Time a bulk export spends processing.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    export_time: Duration,
    /// Time a bulk import spends processing.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    import_time: Duration,
    /// Export file bytes allowed a day.
    #[arg(long, default_value_t = marketo_proxy::marketo::limits::EXPORT_DAILY_BYTES)]
    export_daily_bytes: u64,
    /// Time zone whose midnight resets the daily quota.
    #[arg(long, default_value = "America/Chicago")]
    timezone: chrono_tz::Tz,
    /// An API user as ID:SECRET:USER; repeat for more. Default: demo-client:demo-secret:demo@example.com
    #[arg(long = "client")]
    clients: Vec<SimClient>,
    /// Leads in the database at start.
    #[arg(long, default_value_t = 1000)]
    leads: u64,
    /// Write answers as pretty-printed JSON, with spaces.
    #[arg(long)]
    spaced_json: bool,
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marketo_proxy::logging::init(false);
    let args = Args::parse();
    anyhow::ensure!(args.window_seconds > 0, "--window-seconds must be at least 1");
    let clients = if args.clients.is_empty() {
        vec![SimClient::demo()]
    } else {
        args.clients
    };
    let config = SimConfig {
        window_calls: args.window_calls,
        window: Duration::from_secs(args.window_seconds),
        concurrency: args.concurrency,
        daily_quota: args.daily_quota,
        token_ttl: args.token_ttl,
        latency: args.latency,
        latency_jitter: args.latency_jitter,
        slow_every: args.slow_every,
        slow_latency: args.slow_latency,
        clock_skew_ms: args.clock_skew_ms,
        export_time: args.export_time,
        import_time: args.import_time,
        export_daily_bytes: args.export_daily_bytes,
        clients,
        timezone: args.timezone,
        leads: args.leads,
        spaced_json: args.spaced_json,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            };
            Some(server_config(&read(cert)?, &read(key)?).context("cannot serve HTTPS")?)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        window_calls = config.window_calls,
        window_seconds = args.window_seconds,
        concurrency = config.concurrency,
        daily_quota = config.daily_quota,
        https = tls.is_some(),
        "marketo-sim listening"
    );
    Simulator::new(config)
        .serve_with(listener, tls, marketo_proxy::shutdown_signal())
        .await;
    Ok(())
}
