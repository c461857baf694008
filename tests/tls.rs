//! End-to-end over HTTPS, as the proxy reaches Marketo in production: the
//! simulator serves TLS with a certificate from a throwaway private CA, and
//! the proxy trusts it through `marketo.ca_file`, reuses its connections,
//! names certificate failures, and tunnels through an egress proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use marketo_proxy::app::{self, RunningProxy};
use marketo_proxy::sim::{SimConfig, SimHandle};
use serde_json::{Value, json};
use support::connect_proxy::ConnectProxy;
use support::tls::{Pki, Validity};
use support::{CRM_KEY, WAREHOUSE_KEY};

/// A proxy in front of `sim` with `extra` under `marketo:`, ready.
async fn proxy(sim: &SimHandle, extra: &str) -> RunningProxy {
    let proxy = app::spawn(support::proxy_config(&sim.url(), extra))
        .await
        .expect("proxy starts");
    support::wait_ready(&proxy).await;
    proxy
}

fn trusting(pki: &Pki) -> String {
    format!("ca_file: {}", pki.ca_file().display())
}

fn post(proxy: &RunningProxy, path: &str) -> reqwest::RequestBuilder {
    support::client()
        .post(format!("{}{path}", proxy.url()))
        .header("X-Api-Key", CRM_KEY)
}

async fn get_json(proxy: &RunningProxy, key: &str, path: &str) -> Value {
    support::send_json(
        support::client()
            .get(format!("{}{path}", proxy.url()))
            .header("X-Api-Key", key),
    )
    .await
}

/// The forwarding round trips: a lead read, a `_method=GET` read with a
/// form body, a bulk export file larger than the peek, and a JSON write.
async fn round_trips(proxy: &RunningProxy) {
    let lead = get_json(proxy, CRM_KEY, "/rest/v1/lead/7.json?fields=email,lastName").await;
    assert_eq!(lead["result"][0]["email"], "lead7@example.com", "{lead}");

    let found = support::send_json(
        post(proxy, "/rest/v1/leads.json?_method=GET")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("filterType=email&filterValues=lead3%40example.com,lead4%40example.com&fields=email"),
    )
    .await;
    assert_eq!(found["result"].as_array().unwrap().len(), 2, "{found}");

    let file = support::export_leads(&proxy.url(), CRM_KEY, &["id", "email"]).await;
    assert_eq!(file.status(), 200);
    let csv = file.text().await.unwrap();
    assert!(
        csv.len() > marketo_proxy::upstream::PEEK_LIMIT,
        "file is {} bytes",
        csv.len()
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3001);
    assert_eq!(lines[3000], "3000,lead3000@example.com");

    let written = support::send_json(post(proxy, "/rest/v1/leads.json").json(&json!({
        "action": "createOrUpdate",
        "lookupField": "email",
        "input": [{"email": "new@example.com"}, {"email": "lead1@example.com", "lastName": "Changed"}]
    })))
    .await;
    assert_eq!(written["result"][0]["status"], "created", "{written}");
    assert_eq!(written["result"][1]["status"], "updated", "{written}");
}

fn export_sim() -> SimConfig {
    SimConfig {
        leads: 3000,
        export_time: Duration::from_millis(50),
        ..support::sim_config()
    }
}

#[tokio::test]
async fn the_forwarding_round_trips_pass_over_https_with_a_private_ca() {
    let pki = Pki::new();
    let sim = pki.simulator(export_sim(), Validity::Current).await;
    assert!(sim.url().starts_with("https://"), "{}", sim.url());
    let proxy = proxy(&sim, &trusting(&pki)).await;
    round_trips(&proxy).await;
    let stats = sim.stats();
    assert!(stats.tls_handshakes >= 1, "{stats:?}");
    assert_eq!(stats.tls_failed_handshakes, 0);
    assert_eq!(
        stats.connections, stats.tls_handshakes,
        "every connection spoke TLS"
    );
}

#[tokio::test]
async fn calls_reuse_pooled_tls_connections() {
    let pki = Pki::new();
    let sim = pki
        .simulator(
            SimConfig {
                latency: Duration::from_millis(20),
                ..support::sim_config()
            },
            Validity::Current,
        )
        .await;
    let mut config = support::proxy_config(&sim.url(), &trusting(&pki));
    // Rounds of the same read at once: each one a call over the pool.
    config.coalesce_reads = false;
    let proxy = app::spawn(config).await.expect("proxy starts");
    support::wait_ready(&proxy).await;
    // Readiness fetched a token per API user, over the same pool.
    for _ in 0..30 {
        let lead = get_json(&proxy, CRM_KEY, "/rest/v1/lead/1.json").await;
        assert_eq!(lead["success"], true, "{lead}");
    }
    let sequential = sim.stats().tls_handshakes;
    assert!(
        sequential <= 2,
        "30 sequential calls (and 2 identity calls) opened {sequential} TLS connections"
    );

    let round = || async {
        let calls = (0..10).map(|_| get_json(&proxy, CRM_KEY, "/rest/v1/lead/2.json"));
        for answer in futures_util::future::join_all(calls).await {
            assert_eq!(answer["success"], true, "{answer}");
        }
    };
    round().await;
    let first_round = sim.stats().tls_handshakes;
    assert!(
        first_round <= 12,
        "10 concurrent calls opened {first_round} connections in all"
    );
    round().await;
    round().await;
    let after = sim.stats().tls_handshakes;
    // A call may start in the instant between its predecessor's answer and
    // that connection's return to the pool; without a pool it would be 20.
    assert!(
        after <= first_round + 2,
        "two more rounds of 10 opened {} new connections",
        after - first_round
    );
    assert_eq!(sim.stats().calls, 60);
    eprintln!(
        "TLS connections: {sequential} for 30 sequential calls, {first_round} after 10 at once, {after} after 30 more"
    );
}

/// What a refused certificate looks like to a client and on `/readyz`,
/// and how many handshakes it cost the simulator.
async fn refused_certificate(extra: impl Fn(&Pki) -> String, validity: Validity, expected: &str) {
    let pki = Pki::new();
    let sim = pki.simulator(support::sim_config(), validity).await;
    let proxy = app::spawn(support::proxy_config(&sim.url(), &extra(&pki)))
        .await
        .expect("proxy starts");
    let started = Instant::now();
    let calls = (0..10).map(|index| {
        let key = if index % 2 == 0 { CRM_KEY } else { WAREHOUSE_KEY };
        support::client()
            .get(format!("{}/rest/v1/lead/1.json", proxy.url()))
            .header("X-Api-Key", key)
            .send()
    });
    for answer in futures_util::future::join_all(calls).await {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 503);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "608", "{body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the error took {:?}",
        started.elapsed()
    );
    let ready = support::client()
        .get(format!("{}/readyz", proxy.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let why = ready.text().await.unwrap();
    assert!(why.contains(expected), "{why}");
    let stats = sim.stats();
    assert_eq!(
        stats.identity_calls + stats.calls,
        0,
        "nothing got through: {stats:?}"
    );
    assert_eq!(stats.tls_handshakes, 0);
    // One refused handshake per API user at boot; the ten requests get the
    // remembered error instead of a handshake each.
    assert!(
        (2..=3).contains(&stats.tls_failed_handshakes),
        "{} refused handshakes",
        stats.tls_failed_handshakes
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_named_and_not_retried() {
    refused_certificate(|_| String::new(), Validity::Current, "certificate not trusted").await;
}

#[tokio::test]
async fn an_expired_certificate_is_named_and_not_retried() {
    refused_certificate(trusting, Validity::Expired, "certificate expired").await;
}

#[tokio::test]
async fn calls_tunnel_through_an_egress_proxy_with_credentials() {
    let pki = Pki::new();
    let sim = pki.simulator(export_sim(), Validity::Current).await;
    let egress = ConnectProxy::with_credentials().await;
    let extra = format!("{}\n  egress_proxy: {}", trusting(&pki), egress.url(true));
    let proxy = proxy(&sim, &extra).await;
    round_trips(&proxy).await;
    let log = egress.log();
    let authority = sim.addr().to_string();
    assert!(!log.tunnels.is_empty());
    assert!(log.tunnels.iter().all(|tunnel| *tunnel == authority), "{log:?}");
    assert_eq!(log.refused, 0);
    // Every connection the simulator accepted came through a tunnel.
    assert_eq!(sim.stats().connections, log.tunnels.len() as u64);
}

#[tokio::test]
async fn an_egress_proxy_that_refuses_the_credentials_is_named() {
    let pki = Pki::new();
    let sim = pki.simulator(support::sim_config(), Validity::Current).await;
    let egress = ConnectProxy::with_credentials().await;
    let extra = format!("{}\n  egress_proxy: {}", trusting(&pki), egress.url(false));
    let proxy = app::spawn(support::proxy_config(&sim.url(), &extra))
        .await
        .expect("proxy starts");
    let why = support::eventually(Duration::from_secs(5), async || {
        let ready = support::client()
            .get(format!("{}/readyz", proxy.admin_url()))
            .send()
            .await
            .unwrap();
        let text = ready.text().await.unwrap();
        if text.contains("egress proxy") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert!(why.contains("proxy authorization required"), "{why}");
    assert!(egress.log().refused >= 1);
    assert_eq!(sim.stats().connections, 0);
}

/// A child process, killed when the test ends however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `marketo-proxy serve` as a user runs it, with the egress proxy taken
/// from the environment.
struct Served {
    _child: Killed,
    /// Everything it logged, read on a thread.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_marketo-proxy"));
        command
            .args(["--log-json", "serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for name in [
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("marketo-proxy starts");
        let stderr = child.stderr.take().expect("stderr");
        let child = Killed(child);
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let shared = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = shared.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { _child: child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// The two listeners' addresses, once it has logged them.
    async fn addresses(&self) -> (String, String) {
        support::eventually(Duration::from_secs(10), async || {
            let log = self.log();
            let line = log
                .lines()
                .find(|line| line.contains("marketo-proxy listening"))
                .ok_or_else(|| log.clone())?;
            let line: Value = serde_json::from_str(line).map_err(|error| error.to_string())?;
            Ok::<_, String>((
                line["listen"].as_str().unwrap_or_default().to_owned(),
                line["admin"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .await
    }
}

#[tokio::test]
async fn https_proxy_and_no_proxy_from_the_environment_are_honoured() {
    let pki = Pki::new();
    let sim = pki.simulator(support::sim_config(), Validity::Current).await;
    let egress = ConnectProxy::with_credentials().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmarketo:\n  base_url: {}\n  client_id: demo-client\n  client_secret: demo-secret\n  {}\nservices:\n  - name: crm-sync\n    api_key: {CRM_KEY}\nstate: {{ file: ~, usage_sync_interval: 0s }}\n",
            sim.url(),
            trusting(&pki),
        ),
    )
    .unwrap();

    let call = async |served: &Served| {
        let (listen, admin) = served.addresses().await;
        support::eventually(Duration::from_secs(10), async || {
            let ready = support::client()
                .get(format!("http://{admin}/readyz"))
                .send()
                .await;
            match ready {
                Ok(ready) if ready.status() == 200 => Ok(()),
                Ok(ready) => Err(ready.text().await.unwrap_or_default()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await;
        let lead = support::send_json(
            support::client()
                .get(format!("http://{listen}/rest/v1/lead/3.json"))
                .header("X-Api-Key", CRM_KEY),
        )
        .await;
        assert_eq!(lead["result"][0]["email"], "lead3@example.com", "{lead}");
    };

    let through = Served::start(&config, &[("HTTPS_PROXY", &egress.url(true))]);
    call(&through).await;
    let tunnels = egress.log().tunnels.len();
    assert!(tunnels >= 1, "no tunnel through HTTPS_PROXY");
    assert_eq!(sim.stats().connections, tunnels as u64);
    let log = through.log();
    assert!(
        log.contains("(from HTTPS_PROXY, with credentials)"),
        "the startup log names the proxy: {log}"
    );
    assert!(!log.contains(support::connect_proxy::PASSWORD), "{log}");
    drop(through);

    // NO_PROXY naming Marketo's host: straight there, as curl does.
    let direct = Served::start(
        &config,
        &[
            ("https_proxy", &egress.url(true)),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    );
    call(&direct).await;
    assert_eq!(egress.log().tunnels.len(), tunnels, "NO_PROXY was ignored");
    assert!(sim.stats().connections > tunnels as u64);
}

#[tokio::test]
async fn the_simulator_binary_serves_https_with_a_given_certificate() {
    let pki = Pki::new();
    let (cert, key) = pki.server_pem(Validity::Current);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let mut sim = std::process::Command::new(env!("CARGO_BIN_EXE_marketo-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "0s",
            "--client",
            "demo-client:demo-secret:demo@example.com",
            "--client",
            "warehouse-user:warehouse-user-secret:warehouse@example.com",
            "--tls-cert",
        ])
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("marketo-sim starts");
    let stderr = sim.stderr.take().expect("stderr");
    let _sim = Killed(sim);
    let (lines, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Read to the end, so the simulator never blocks on a full pipe.
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("marketo-sim listening") {
                let _ = lines.send(line);
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || listening.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("marketo-sim logged its address");
    assert!(line.contains("https=true"), "{line}");
    let addr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("addr= in the log line")
        .to_owned();
    let config = support::proxy_config(&format!("https://{addr}"), &trusting(&pki));
    let proxy = app::spawn(config).await.expect("proxy starts");
    support::wait_ready(&proxy).await;
    let lead = get_json(&proxy, CRM_KEY, "/rest/v1/lead/5.json").await;
    assert_eq!(lead["result"][0]["email"], "lead5@example.com", "{lead}");
}
