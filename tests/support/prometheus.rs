//! A real `prometheus` on an ephemeral port, scraping one target with the
//! shipped scrape config made fast (every second) and the shipped alert
//! rules loaded, with its storage in a temporary directory. Stopped when
//! dropped; its log is printed when a test fails while it runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use super::{client, eventually};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// `program` when it is on `PATH`; otherwise prints why the calling test
/// does nothing and returns `None`.
pub fn on_path_or_skip(program: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: `{program}` is not on PATH (Debian package `{package}`; .ci/run installs it)");
    }
    found
}

pub struct Prometheus {
    pub url: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `binary` scraping `target` (`host:port` of a proxy's admin
    /// listener) every second, with `deploy/prometheus/prometheus.yml` as
    /// the base config and the rules it loads evaluated every second, and
    /// waits until it is ready.
    pub async fn start(binary: &Path, target: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("prometheus.yml");
        fs::write(&config, fast_scrape_config(target)).expect("config written");
        let log = dir.path().join("prometheus.log");
        let port = super::redis::free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        let http = client();
        eventually(Duration::from_secs(30), async || {
            match http.get(&ready).send().await {
                Ok(answer) if answer.status().is_success() => Ok(()),
                Ok(answer) => Err(format!("/-/ready answered {}", answer.status())),
                Err(error) => Err(error.to_string()),
            }
        })
        .await;
        prometheus
    }

    /// `GET /api/v1/<path>` with `params`; the JSON answer whatever its
    /// status (errors carry `"status":"error"` and an `error` text).
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Json {
        client()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("prometheus answers JSON")
    }

    /// An instant query at the current time: `Ok(result)` (the `data`
    /// object) or `Err(Prometheus's error)`.
    pub async fn query(&self, expr: &str) -> Result<Json, String> {
        let answer = self.api("query", &[("query", expr)]).await;
        if answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(format!("{}: {}", answer["errorType"], answer["error"]))
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- prometheus log\n{log}");
        }
    }
}

/// The shipped scrape config with `target` as its only target, every
/// interval one second, and the rule files given by absolute path.
fn fast_scrape_config(target: &str) -> String {
    let shipped = deploy_dir().join("prometheus/prometheus.yml");
    let text = fs::read_to_string(&shipped).expect("deploy/prometheus/prometheus.yml");
    let mut config: Yaml = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let one_second = Yaml::from("1s");
    config["global"]["scrape_interval"] = one_second.clone();
    config["global"]["evaluation_interval"] = one_second.clone();
    let rule_files = config["rule_files"].as_sequence_mut().expect("rule_files");
    for file in rule_files.iter_mut() {
        let name = file.as_str().expect("a rule file path");
        *file = Yaml::from(shipped.with_file_name(name).display().to_string());
    }
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs");
    assert_eq!(jobs.len(), 1, "the shipped config scrapes one proxy");
    let job = &mut jobs[0];
    job["scrape_interval"] = one_second.clone();
    job["scrape_timeout"] = one_second;
    job["static_configs"] =
        serde_yaml_ng::from_str(&format!("[{{ targets: [\"{target}\"] }}]")).expect("static_configs");
    serde_yaml_ng::to_string(&config).expect("config serialises")
}
