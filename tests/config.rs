#![allow(clippy::unwrap_used)]
//! The config as an operator meets it: the bundled files load, mistakes
//! are reported with their key and line, and values from the environment
//! never show up in an error.

use std::fs;
use std::path::{Path, PathBuf};

use marketo_proxy::config::{Backend, Config, ConfigError, DEMO_CONFIG};

const SECRET: &str = "s3cr3t-value-xyz-0123456789";

fn no_env(_: &str) -> Option<String> {
    None
}

/// An environment holding only `CRM_KEY`.
fn crm_key_env(name: &str) -> Option<String> {
    (name == "CRM_KEY").then(|| SECRET.to_owned())
}

fn bundled_configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    paths
}

/// A valid config whose services block ends on line 10, with `extra`
/// appended as the next lines.
fn config_text(extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:8080
marketo:
  base_url: https://123-ABC-456.mktorest.com
  client_id: proxy
  client_secret: proxy-secret
services:
  - name: crm-sync
    api_key: crm-key-0123456789abcd
  - name: forms
    api_key: forms-key-0123456789ab
{extra}"
    )
}

#[test]
fn every_bundled_config_loads_with_an_empty_environment() {
    let paths = bundled_configs();
    for name in ["demo.yaml", "example.yaml", "sidecar.yaml"] {
        assert!(
            paths.iter().any(|path| path.ends_with(name)),
            "config/{name} is missing"
        );
    }
    for path in paths {
        if let Err(err) = Config::load_with_env(&path, no_env) {
            panic!("{}: {err}", path.display());
        }
    }
}

#[test]
fn demo_config_is_the_bundled_demo_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
    assert_eq!(fs::read_to_string(path).unwrap(), DEMO_CONFIG);
    let config = Config::from_yaml_with_env(DEMO_CONFIG, no_env).unwrap();
    assert_eq!(config.marketo.client_id, "demo-client");
    assert!(config.marketo.client_secret.matches("demo-secret"));
    let crm = &config.services[0];
    assert!(crm.api_key.as_ref().unwrap().matches("demo-key-crm-0123456789"));
}

#[test]
fn sidecar_config_uses_redis_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecar.yaml");
    let env = |name: &str| match name {
        "REDIS_URL" => Some("redis://:pw@redis.internal:6380/0".to_owned()),
        "MARKETO_PROXY_REPLICAS" => Some("4".to_owned()),
        "SERVICE_NAME" => Some("lead-scoring".to_owned()),
        _ => None,
    };
    let config = Config::load_with_env(&path, env).unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.state.backend, Backend::Redis);
    let redis = config.state.redis.unwrap();
    assert_eq!(redis.url.expose(), "redis://:pw@redis.internal:6380/0");
    assert_eq!(redis.fallback_replicas.get(), 4);
    assert_eq!(config.services[0].name, "lead-scoring");
}

#[test]
fn redis_state_reads_its_url_from_the_environment() {
    let yaml = "marketo: { base_url: 'https://123-ABC-456.mktorest.com', client_id: a, client_secret: b }\n\
                services: [{ name: s, api_key: key-s-0123456789abcdef }]\n\
                state:\n  backend: redis\n  file: ~\n  redis:\n    url: ${REDIS_URL}\n    fallback_replicas: ${REPLICAS:-4}\n";
    let env = |name: &str| (name == "REDIS_URL").then(|| "redis://:pw@redis.internal:6380/0".to_owned());
    let config = Config::from_yaml_with_env(yaml, env).unwrap();
    assert_eq!(config.state.backend, Backend::Redis);
    let redis = config.state.redis.unwrap();
    assert_eq!(redis.url.expose(), "redis://:pw@redis.internal:6380/0");
    assert_eq!(redis.fallback_replicas.get(), 4);
}

#[test]
fn example_config_reads_secrets_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let env = |name: &str| match name {
        "MARKETO_BASE_URL" => Some("https://987-XYZ-654.mktorest.com".to_owned()),
        "CRM_SYNC_KEY" => Some("from-the-environment".to_owned()),
        _ => None,
    };
    let config = Config::load_with_env(&path, env).unwrap();
    assert_eq!(
        config.marketo.base_url.as_str(),
        "https://987-XYZ-654.mktorest.com"
    );
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["crm-sync", "warehouse", "forms"]);
    let crm_key = config.services[0].api_key.as_ref().unwrap();
    assert!(crm_key.matches("from-the-environment"));
}

#[test]
fn misspelled_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    fs::write(&path, config_text("    wieght: 2\n")).unwrap();
    let message = Config::load_with_env(&path, no_env).unwrap_err().to_string();
    assert!(message.contains("unknown field `wieght`"), "{message}");
    assert!(message.contains("services[1]"), "{message}");
    assert!(message.contains("line 11"), "{message}");
}

#[test]
fn missing_variable_is_named_with_its_line() {
    let text = config_text("state:\n  redis:\n    url: ${REDIS_URL}\n");
    let err = Config::from_yaml_with_env(&text, no_env).unwrap_err();
    assert!(
        matches!(&err, ConfigError::MissingVar { name, line: 13 } if name == "REDIS_URL"),
        "{err:?}"
    );
}

/// Checks that `message` names the key and line but not the secret, and
/// that the secret was there to hide: the parser quotes bad values, so
/// without redaction this fails.
fn assert_redacted(message: &str, key: &str, line: &str) {
    assert!(!message.contains(SECRET), "secret leaked: {message}");
    assert!(
        !message.contains("s3cr3t"),
        "part of the secret leaked: {message}"
    );
    assert!(message.contains("[redacted]"), "nothing was redacted: {message}");
    assert!(message.contains(key), "{message}");
    assert!(message.contains(line), "{message}");
}

#[test]
fn secret_in_a_numeric_field_is_redacted() {
    let text = config_text("    weight: ${CRM_KEY}\n");
    let message = Config::from_yaml_with_env(&text, crm_key_env)
        .unwrap_err()
        .to_string();
    assert_redacted(&message, "services[1].weight", "line 11");
}

#[test]
fn secret_in_an_enum_field_is_redacted() {
    let text = config_text("state:\n  backend: ${CRM_KEY}\n");
    let message = Config::from_yaml_with_env(&text, crm_key_env)
        .unwrap_err()
        .to_string();
    assert_redacted(&message, "state.backend", "line 12");
}

#[test]
fn secret_inside_a_longer_value_is_redacted() {
    let text = config_text("limits:\n  window: x${CRM_KEY}s\n");
    let message = Config::from_yaml_with_env(&text, crm_key_env)
        .unwrap_err()
        .to_string();
    assert_redacted(&message, "limits.window", "line 12");
}

#[test]
fn duplicate_keys_from_the_environment_are_not_shown() {
    let text = config_text("")
        .replace("crm-key-0123456789abcd", "${CRM_KEY}")
        .replace("forms-key-0123456789ab", "${CRM_KEY}");
    let message = Config::from_yaml_with_env(&text, crm_key_env)
        .unwrap_err()
        .to_string();
    assert!(!message.contains(SECRET), "{message}");
    assert!(
        message.starts_with("services[1].api_key: is the same as services[0].api_key"),
        "{message}"
    );
}

#[test]
fn secret_with_yaml_syntax_arrives_intact() {
    let tricky = "*not: an alias # nor a comment, \"quoted\" 'too'";
    let text = config_text("").replace("crm-key-0123456789abcd", "${CRM_KEY}");
    let config =
        Config::from_yaml_with_env(&text, |name| (name == "CRM_KEY").then(|| tricky.to_owned())).unwrap();
    assert!(config.services[0].api_key.as_ref().unwrap().matches(tricky));
}
