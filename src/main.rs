//! `marketo-proxy`: parse the command line, load the config (exit 64 when
//! it is bad), bind, and run. All logic lives in the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use marketo_proxy::app::{self, Listeners};
use marketo_proxy::config::{Config, DEMO_CONFIG};
use marketo_proxy::metrics::Metrics;
use marketo_proxy::sim::{SimConfig, Simulator};
use tokio::net::TcpListener;

/// sysexits.h EX_CONFIG... EX_USAGE (64): the config is unusable.
const EXIT_BAD_CONFIG: u8 = 64;

/// A reverse proxy that lets many integrations share one Marketo instance
/// without tripping its limits.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Serve {
        /// The YAML config file.
        #[arg(long, short, env = "MARKETO_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective limits.
    CheckConfig {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Start the bundled Marketo simulator and the proxy in front of it.
    Demo {
        /// Where the proxy listens (a free port is picked if taken).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin endpoints listen (a free port is picked if taken).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    marketo_proxy::logging::init(cli.log_json);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("marketo-proxy: invalid config {}: {error}", config.display());
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            exit(runtime().and_then(|runtime| runtime.block_on(serve(config))))
        }
        Command::Demo { listen, admin_listen } => {
            exit(runtime().and_then(|runtime| runtime.block_on(demo(listen, admin_listen))))
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            let mut report = format!("{}: ok\n", file.display());
            for warning in config.warnings() {
                report.push_str(&format!("warning: {warning}\n"));
            }
            report.push_str(&config.summary());
            // A reader that stops early (`| head`) is not an error of ours.
            let _ = writeln!(std::io::stdout(), "{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}: {error}", file.display());
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("marketo-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config)
        .await
        .with_context(|| format!("cannot listen on {} and {}", config.listen, config.admin_listen))?;
    tracing::info!(
        listen = %listeners.proxy.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        marketo = %config.marketo.base_url,
        services = config.services.len(),
        "marketo-proxy listening"
    );
    app::run(
        config,
        listeners,
        Metrics::new(),
        marketo_proxy::shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn demo(listen: SocketAddr, admin_listen: SocketAddr) -> anyhow::Result<()> {
    let sim = Simulator::spawn(SimConfig::default())
        .await
        .context("cannot start the simulator")?;
    let mut config = Config::from_yaml(DEMO_CONFIG).context("the bundled demo config is invalid")?;
    config.marketo.base_url = sim.url().parse().context("simulator address")?;
    let listeners = Listeners {
        proxy: bind_or_any(listen).await?,
        admin: bind_or_any(admin_listen).await?,
    };
    let proxy_url = format!("http://{}", listeners.proxy.local_addr()?);
    let admin_url = format!("http://{}", listeners.admin.local_addr()?);
    let api_key = config
        .services
        .first()
        .and_then(|service| service.api_key.as_ref())
        .map(|key| key.expose().to_owned())
        .unwrap_or_default();
    println!(
        "status page: {admin_url}/  (live; open it in a browser)\n\n\
         marketo-proxy demo: a simulated Marketo instance (100 calls / 20 s, 10 concurrent, 50,000 a day)\n\
         with the proxy in front of it.\n\n  \
         proxy:     {proxy_url}\n  \
         admin:     {admin_url}  (/usage /metrics /healthz /readyz)\n  \
         simulator: {sim_url}\n  \
         API key:   {api_key}  (service crm-sync; demo only)\n\n\
         Try:\n  \
         curl -H 'X-Api-Key: {api_key}' {proxy_url}/rest/v1/lead/1.json\n  \
         curl '{proxy_url}/identity/oauth/token?grant_type=client_credentials&client_id=demo-crm&client_secret=demo-crm-secret-0123456789'\n  \
         curl {admin_url}/metrics\n\n\
         Ctrl-C stops it.",
        sim_url = sim.url(),
    );
    app::run(
        config,
        listeners,
        Metrics::new(),
        marketo_proxy::shutdown_signal(),
    )
    .await?;
    sim.shutdown().await;
    Ok(())
}

/// Binds `addr`, or any free port on the same host when it is taken, so
/// the demo starts even next to another service.
async fn bind_or_any(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(addr.ip(), 0);
            TcpListener::bind(any)
                .await
                .with_context(|| format!("cannot listen on {any}"))
        }
        Err(error) => Err(error).with_context(|| format!("cannot listen on {addr}")),
    }
}
