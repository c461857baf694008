//! The binaries as a user runs them: `check-config` exit codes and
//! messages, and `demo` printing its status page's address first and a
//! `curl` line that works as printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const PROXY: &str = env!("CARGO_BIN_EXE_marketo-proxy");

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_config_accepts_every_bundled_config() {
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        let output = Command::new(PROXY)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{}: {stdout}", path.display());
        assert!(stdout.contains("window: 100 calls per 20s"), "{stdout}");
    }
}

#[test]
fn check_config_exits_64_naming_the_key_and_line_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "marketo:\n  base_url: https://123-ABC-456.mktorest.com\n  client_id: id\n  client_secret: ${SECRET}\nservices:\n  - name: crm\n    api_key: key-0123456789abcdefgh\n    wieght: 3\n",
    )
    .unwrap();
    let output = Command::new(PROXY)
        .arg("check-config")
        .arg(&path)
        .env("SECRET", "s3cr3t-value-that-must-not-leak")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wieght"), "{stderr}");
    assert!(stderr.contains("line 8"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");

    let output = Command::new(PROXY)
        .args(["serve", "--config"])
        .arg(&path)
        .env("SECRET", "s3cr3t-value-that-must-not-leak")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(64),
        "serve refuses a bad config the same way"
    );
}

#[test]
fn check_config_exits_64_for_a_missing_file() {
    let output = Command::new(PROXY)
        .args(["check-config", "/nonexistent/marketo-proxy.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
}

#[tokio::test]
async fn demo_prints_a_curl_line_that_works_as_printed() {
    let mut child = Command::new(PROXY)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _running = Running(child);
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    })
    .await
    .unwrap();
    let curl = lines
        .iter()
        .find(|line| line.trim_start().starts_with("curl -H"))
        .unwrap_or_else(|| panic!("no curl line in {lines:#?}"));
    // curl -H 'X-Api-Key: KEY' URL
    let parts: Vec<&str> = curl.split('\'').collect();
    let (name, value) = parts[1].split_once(": ").unwrap();
    let url = parts[2].trim();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Works at once, as a user would paste it: the listeners are bound
    // before the lines are printed.
    let answer = http.get(url).header(name, value).send().await;
    let body: serde_json::Value = answer
        .unwrap_or_else(|error| panic!("{url}: {error}"))
        .json()
        .await
        .unwrap();
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["result"][0]["id"], 1);

    // The first line is the status page's address, and it is served.
    let page_url = lines[0]
        .strip_prefix("status page: ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the status page is not first: {lines:#?}"));
    let page = http.get(page_url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("status.json"));

    let identity = lines
        .iter()
        .find(|line| line.contains("/identity/oauth/token"))
        .unwrap();
    let identity_url = identity.split('\'').nth(1).unwrap();
    let token: serde_json::Value = http.get(identity_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(token["token_type"], "bearer", "{token}");
}

#[test]
fn check_config_refuses_a_ca_file_without_certificates_and_an_unusable_egress_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("ca.pem");
    std::fs::write(
        &bundle,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let base = "marketo:\n  base_url: https://123-ABC-456.mktorest.com\n  client_id: id\n  client_secret: secret\nservices:\n  - name: crm\n    api_key: key-0123456789abcdefgh\n";
    let check = |extra: &str| {
        let path = dir.path().join("proxy.yaml");
        std::fs::write(
            &path,
            base.replace("  client_id: id\n", &format!("  client_id: id\n  {extra}\n")),
        )
        .unwrap();
        let output = Command::new(PROXY)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, text) = check(&format!("ca_file: {}", bundle.display()));
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("marketo.ca_file"), "{text}");
    assert!(text.contains("holds no PEM certificate"), "{text}");

    let (code, text) = check("egress_proxy: socks5://user:hunter2-password@gw:1080");
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("marketo.egress_proxy: must be an http:// proxy URL"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    let (code, text) = check("egress_proxy: http://user:hunter2-password@gw:3128");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("egress: through http://gw:3128 (from marketo.egress_proxy, with credentials)"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn check_config_into_a_reader_that_stops_early_still_exits_0() {
    let mut child = Command::new(PROXY)
        .args(["check-config", "config/example.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -0`: the reader is gone before anything is written.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
