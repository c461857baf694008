//! The processes under test: each started with its log in the scenario's
//! temporary directory, checked for life while it is used, and stopped
//! when dropped, panics included. `marketo-proxy serve` (from the config a
//! scenario generates) and `marketo-sim` come from this build, listen on
//! ephemeral ports and are waited for until they answer. CPU time,
//! resident memory and open descriptors are read from `/proc`.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::get;
use crate::static_upstream;

const PROXY_EXE: &str = env!("CARGO_BIN_EXE_marketo-proxy");
const SIM_EXE: &str = env!("CARGO_BIN_EXE_marketo-sim");

/// The upstream API user in every scenario.
pub const CLIENT_ID: &str = "bench-client";
pub const CLIENT_SECRET: &str = "bench-secret";
/// The API key of the one service the pass-through and memory scenarios
/// configure.
pub const API_KEY: &str = "bench-key-0123456789";

/// A child process that is stopped when this is dropped, panics included.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Stop with SIGTERM (and wait) before SIGKILL.
    pub terminate_gently: bool,
}

impl Process {
    pub fn spawn(name: &str, program: &Path, args: &[&str], dir: &Path) -> Self {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the end of the log when the process has exited.
    pub fn check_alive(&mut self) {
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

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

/// Resident memory of process `pid` (`VmRSS`), 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Descriptors process `pid` holds open (`/proc/PID/fd`), 0 once it is gone.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
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
pub async fn start_proxy(dir: &Path, name: &str, config: &str, admin: SocketAddr) -> Process {
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

/// Starts the static upstream (this binary re-run as `--static-upstream`)
/// on a free port and waits until it answers.
pub async fn start_static_upstream(dir: &Path) -> (Process, SocketAddr) {
    let addr = local_addr(free_port());
    let me = std::env::current_exe().expect("own path");
    let mut upstream = Process::spawn(
        "static-upstream",
        &me,
        &[static_upstream::ROLE, &addr.to_string()],
        dir,
    );
    wait_ready(&mut upstream, addr, "/rest/v1/lead/1.json").await;
    (upstream, addr)
}

/// A proxy config in front of `upstream` with Marketo's limits lifted far
/// above any load the harness makes (10,000,000 calls a second,
/// concurrency 1,000,000, a daily quota of 10^12, no safety margin), no
/// state file, no usage sync, and one service with [`API_KEY`]. Identical
/// reads are not coalesced: the load sends the same read many times at
/// once, and each must be a call through the whole path. `server` is
/// added as the `server:` settings when not empty.
pub fn lifted_limits_config(
    proxy: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    server: &str,
) -> String {
    let mut config = format!(
        "listen: {proxy}\nadmin_listen: {admin}\n\
         marketo: {{ base_url: 'http://{upstream}', client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET} }}\n\
         limits:\n  window_calls: 10000000\n  window: 1s\n  safety_margin: 0s\n  concurrency: 1000000\n  \
         daily_quota: 1000000000000\n  max_queue_wait: 60s\n\
         services:\n  - {{ name: bench, api_key: {API_KEY} }}\n\
         coalesce_reads: false\n\
         state: {{ file: ~, usage_sync_interval: 0s }}\n"
    );
    if !server.is_empty() {
        config.push_str(&format!("server: {server}\n"));
    }
    config
}

pub async fn start_sim(dir: &Path, addr: SocketAddr, extra: &[&str]) -> Process {
    let listen = addr.to_string();
    let client = format!("{CLIENT_ID}:{CLIENT_SECRET}:bench@example.com");
    let mut args = vec!["--listen", &listen, "--client", &client];
    args.extend_from_slice(extra);
    let mut sim = Process::spawn("marketo-sim", Path::new(SIM_EXE), &args, dir);
    wait_ready(&mut sim, addr, "/_sim/stats").await;
    sim
}

/// Waits until `GET path` answers 200.
pub async fn wait_ready(process: &mut Process, addr: SocketAddr, path: &str) {
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
pub fn free_port() -> u16 {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

pub fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// CPU seconds a process's live threads have run (`schedstat`, in ns).
pub fn cpu_seconds(pid: u32) -> f64 {
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
pub fn cpu_seconds_with_children(pid: u32) -> f64 {
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
