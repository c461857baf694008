//! The rules a config must meet beyond the shape serde already checks:
//! required values, unique service names and credentials, and service caps
//! that fit inside the instance's limits. The first broken rule is
//! reported, under the key an operator would edit. Messages never quote a
//! secret.

use std::collections::HashMap;
use std::time::Duration;

use super::{Backend, Config, ConfigError, LimitsConfig, MarketoConfig, RedisConfig, ServiceConfig};
use crate::secret::Secret;

/// A Marketo access token lives this long.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

type Check = Result<(), ConfigError>;

const REQUIRED: &str = "is required";
const NOT_EMPTY: &str = "must not be empty";

/// The shortest API key or client secret a service may have: long enough
/// that guessing is hopeless however fast, so the failed-login throttle
/// never has to refuse a right one.
pub const MIN_SECRET_CHARS: usize = 20;

/// The shortest `auth.token_key`.
pub const MIN_TOKEN_KEY_CHARS: usize = 32;

pub(super) fn check(config: &Config) -> Check {
    check_listeners(config)?;
    check_positive("server.idle_timeout", config.server.idle_timeout)?;
    check_positive("server.header_read_timeout", config.server.header_read_timeout)?;
    if config.server.http2_max_concurrent_streams == 0 {
        return invalid("server.http2_max_concurrent_streams", "must be at least 1");
    }
    if config
        .server
        .unauthenticated_body_bytes
        .is_some_and(|bytes| bytes >= config.server.max_buffered_body_bytes)
    {
        return invalid(
            "server.unauthenticated_body_bytes",
            "must be less than server.max_buffered_body_bytes: the rest is for callers already known",
        );
    }
    check_marketo(&config.marketo)?;
    check_limits(&config.limits)?;
    check_services(&config.services, &config.limits)?;
    if let Some(key) = &config.auth.token_key {
        if key.expose().chars().count() < MIN_TOKEN_KEY_CHARS {
            return invalid(
                "auth.token_key",
                format!("must be at least {MIN_TOKEN_KEY_CHARS} characters (e.g. `openssl rand -hex 32`)"),
            );
        }
    }
    check_cache(&config.cache)?;
    check_state(config)
}

/// What a valid config may still get wrong, for `check-config` and the
/// startup log.
pub(super) fn warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.state.backend == Backend::Redis && config.auth.token_key.is_none() {
        warnings.push(
            "state.backend is redis but auth.token_key is not set: a token from one replica's \
             /identity/oauth/token is refused by the others"
                .to_owned(),
        );
    }
    warnings
}

fn check_cache(rules: &[super::CacheRule]) -> Check {
    for (index, rule) in rules.iter().enumerate() {
        let key = format!("cache[{index}]");
        if !(rule.path.starts_with("/rest/") || rule.path.starts_with("/bulk/")) {
            return invalid(
                format!("{key}.path"),
                "must start with /rest/ or /bulk/ (the paths the proxy forwards)",
            );
        }
        if rule.path.contains(['?', '#']) {
            return invalid(
                format!("{key}.path"),
                "is a path without a query: answers are kept per query anyway",
            );
        }
        check_positive(&format!("{key}.ttl"), rule.ttl)?;
    }
    Ok(())
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Check {
    Err(ConfigError::invalid(key, reason))
}

fn check_listeners(config: &Config) -> Check {
    // Port 0 asks the OS for a free port, so two of them do not clash.
    if config.admin_listen == config.listen && config.listen.port() != 0 {
        return invalid("admin_listen", "must differ from listen");
    }
    Ok(())
}

fn check_marketo(marketo: &MarketoConfig) -> Check {
    if marketo.base_url.is_empty() {
        return invalid(
            "marketo.base_url",
            "is required, e.g. https://123-ABC-456.mktorest.com",
        );
    }
    if !marketo.base_url.is_https()
        && marketo
            .base_url
            .host()
            .to_ascii_lowercase()
            .ends_with(".mktorest.com")
    {
        return invalid("marketo.base_url", "Marketo serves only HTTPS; use https://");
    }
    check_non_empty("marketo.client_id", &marketo.client_id, REQUIRED)?;
    check_non_empty("marketo.client_secret", marketo.client_secret.expose(), REQUIRED)?;
    if let Some(path) = &marketo.ca_file {
        if let Err(crate::trust::TrustError::CaFile { path, reason }) = crate::trust::read_ca_file(path) {
            return invalid("marketo.ca_file", format!("{}: {reason}", path.display()));
        }
    }
    if let Some(proxy) = &marketo.egress_proxy {
        let base = marketo.base_url.as_str().parse().unwrap_or_default();
        if crate::egress::EgressProxy::choose(Some(proxy), &base, |_| None).is_err() {
            return invalid(
                "marketo.egress_proxy",
                "must be an http:// proxy URL: http://[user:password@]host:port",
            );
        }
    }
    check_positive("marketo.connect_timeout", marketo.connect_timeout)?;
    check_positive("marketo.request_timeout", marketo.request_timeout)?;
    if marketo.token_refresh_before >= TOKEN_LIFETIME {
        return invalid(
            "marketo.token_refresh_before",
            "must be less than an access token's lifetime of 1h",
        );
    }
    Ok(())
}

fn check_limits(limits: &LimitsConfig) -> Check {
    check_positive("limits.quota_probe_interval", limits.quota_probe_interval)?;
    check_positive("limits.window", limits.window)
}

fn check_services(services: &[ServiceConfig], limits: &LimitsConfig) -> Check {
    if services.is_empty() {
        return invalid("services", "needs at least one service");
    }
    for (index, service) in services.iter().enumerate() {
        check_service(&format!("services[{index}]"), service, limits)?;
    }
    check_unique(services, "name", |s| Some(s.name.as_str()))?;
    check_unique(services, "api_key", |s| s.api_key.as_ref().map(Secret::expose))?;
    check_unique(services, "client_id", |s| s.client_id.as_deref())?;
    let reserved = services
        .iter()
        .fold(0_u64, |sum, s| sum.saturating_add(s.reserved_daily));
    if reserved > limits.daily_quota.get() {
        return invalid(
            "services",
            format!(
                "reserved_daily adds up to {reserved}, more than limits.daily_quota ({})",
                limits.daily_quota
            ),
        );
    }
    Ok(())
}

fn check_service(key: &str, service: &ServiceConfig, limits: &LimitsConfig) -> Check {
    check_name(&format!("{key}.name"), &service.name)?;
    if let Some(api_key) = &service.api_key {
        check_secret(&format!("{key}.api_key"), api_key)?;
    }
    match (&service.client_id, &service.client_secret) {
        (None, None) if service.api_key.is_none() => {
            return invalid(key, "needs an api_key, or a client_id and client_secret, or both");
        }
        (Some(_), None) => {
            return invalid(format!("{key}.client_secret"), "is required with client_id");
        }
        (None, Some(_)) => {
            return invalid(format!("{key}.client_id"), "is required with client_secret");
        }
        (Some(id), Some(secret)) => {
            check_non_empty(&format!("{key}.client_id"), id, NOT_EMPTY)?;
            check_secret(&format!("{key}.client_secret"), secret)?;
        }
        (None, None) => {}
    }
    check_cap(
        key,
        "window_calls",
        service.window_calls.map(|n| n.get().into()),
        limits.window_calls.get().into(),
    )?;
    check_cap(
        key,
        "concurrency",
        service.concurrency.map(|n| n.get().into()),
        limits.concurrency.get().into(),
    )?;
    check_cap(
        key,
        "daily_quota",
        service.daily_quota.map(|n| n.get()),
        limits.daily_quota.get(),
    )?;
    if let Some(cap) = service.daily_quota {
        if service.reserved_daily > cap.get() {
            return invalid(
                format!("{key}.reserved_daily"),
                format!(
                    "{} is more than this service's daily_quota ({cap})",
                    service.reserved_daily
                ),
            );
        }
    }
    if let Some(upstream) = &service.marketo {
        check_non_empty(&format!("{key}.marketo.client_id"), &upstream.client_id, REQUIRED)?;
        check_non_empty(
            &format!("{key}.marketo.client_secret"),
            upstream.client_secret.expose(),
            REQUIRED,
        )?;
    }
    Ok(())
}

/// Names label metrics, so they keep to Prometheus-friendly characters.
fn check_name(key: &str, name: &str) -> Check {
    check_non_empty(key, name, REQUIRED)?;
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if !name.chars().all(allowed) {
        return invalid(key, "may hold only a-z, 0-9, - and _");
    }
    if name == super::INTERNAL_SERVICE {
        return invalid(
            key,
            format!("'{name}' is the name the proxy's own calls are counted under"),
        );
    }
    if super::RESERVED_NAMES.contains(&name) {
        return invalid(
            key,
            format!("'{name}' is a name the proxy labels metrics with itself"),
        );
    }
    Ok(())
}

/// A service cap above the instance limit could never be used, and is
/// almost always a typo.
fn check_cap(service_key: &str, field: &str, cap: Option<u64>, limit: u64) -> Check {
    match cap {
        Some(cap) if cap > limit => invalid(
            format!("{service_key}.{field}"),
            format!("{cap} is more than limits.{field} ({limit})"),
        ),
        _ => Ok(()),
    }
}

/// Reports the second service that repeats a value of `field`. The
/// message names the services, never the value.
fn check_unique<'a>(
    services: &'a [ServiceConfig],
    field: &str,
    value: impl Fn(&'a ServiceConfig) -> Option<&'a str>,
) -> Check {
    let mut first_with: HashMap<&str, usize> = HashMap::new();
    for (index, service) in services.iter().enumerate() {
        let Some(value) = value(service) else {
            continue;
        };
        if let Some(first) = first_with.insert(value, index) {
            return invalid(
                format!("services[{index}].{field}"),
                format!("is the same as services[{first}].{field}; each service needs its own"),
            );
        }
    }
    Ok(())
}

fn check_state(config: &Config) -> Check {
    let state = &config.state;
    if state
        .file
        .as_ref()
        .is_some_and(|file| file.as_os_str().is_empty())
    {
        return invalid("state.file", "must not be empty; write ~ to keep no state file");
    }
    match (&state.redis, state.backend) {
        (None, Backend::Redis) => {
            return invalid("state.redis", "is required when state.backend is redis");
        }
        (Some(redis), _) => check_redis(redis)?,
        (None, Backend::Memory) => {}
    }
    // 0s turns reconciliation off; anything shorter than a few seconds
    // would spend quota on the usage report itself.
    if !state.usage_sync_interval.is_zero() && state.usage_sync_interval < std::time::Duration::from_secs(10)
    {
        return invalid(
            "state.usage_sync_interval",
            "must be 0s (off) or at least 10s: each reconciliation is a call that counts",
        );
    }
    Ok(())
}

fn check_redis(redis: &RedisConfig) -> Check {
    check_non_empty("state.redis.url", redis.url.expose(), REQUIRED)?;
    // The URL may hold a password, so neither it nor the parser's
    // complaint about it goes into the message.
    let scheme = url::Url::parse(redis.url.expose()).map(|url| url.scheme().to_owned());
    match scheme.as_deref() {
        Ok("redis" | "rediss" | "redis+unix" | "unix") => {}
        _ => return invalid("state.redis.url", "must be a redis://, rediss:// or unix:// URL"),
    }
    if let Some(path) = &redis.ca_file {
        if let Err(crate::trust::TrustError::CaFile { path, reason }) = crate::trust::read_ca_file(path) {
            return invalid("state.redis.ca_file", format!("{}: {reason}", path.display()));
        }
    }
    check_non_empty("state.redis.key_prefix", &redis.key_prefix, REQUIRED)?;
    if redis.lease < Duration::from_secs(1) {
        return invalid(
            "state.redis.lease",
            "must be at least 1s (it is renewed every third of it)",
        );
    }
    Ok(())
}

fn check_non_empty(key: &str, value: &str, reason_if_empty: &str) -> Check {
    if value.is_empty() {
        return invalid(key, reason_if_empty);
    }
    Ok(())
}

fn check_secret(key: &str, secret: &Secret) -> Check {
    if secret.expose().chars().count() < MIN_SECRET_CHARS {
        return invalid(
            key,
            format!("must be at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex 16`)"),
        );
    }
    Ok(())
}

fn check_positive(key: &str, duration: Duration) -> Check {
    if duration.is_zero() {
        return invalid(key, "must be more than 0s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64};
    use std::path::PathBuf;

    use super::*;
    use crate::config::UpstreamCredential;

    fn valid() -> Config {
        let text = "
marketo:
  base_url: https://123-ABC-456.mktorest.com
  client_id: proxy
  client_secret: proxy-secret
limits:
  daily_quota: 1000
services:
  - name: crm-sync
    api_key: crm-key-0123456789abcd
    client_id: crm
    client_secret: crm-secret-0123456789
  - name: warehouse
    api_key: warehouse-key-0123456789
";
        Config::from_yaml_with_env(text, |_| None).unwrap()
    }

    /// Asserts that `config` fails validation at `key`, with `reason` in the message.
    fn assert_invalid(config: Config, key: &str, reason: &str) {
        match config.validate() {
            Err(ConfigError::Invalid {
                key: got,
                reason: why,
            }) => {
                assert_eq!(got, key, "reason: {why}");
                assert!(why.contains(reason), "{key}: {why}");
            }
            other => panic!("expected {key} to be invalid, got {other:?}"),
        }
    }

    #[test]
    fn valid_config_passes() {
        valid().validate().unwrap();
    }

    #[test]
    fn marketo_credentials_and_url_are_required() {
        let mut config = valid();
        config.marketo.base_url = Default::default();
        assert_invalid(config, "marketo.base_url", "required");
        let mut config = valid();
        config.marketo.client_id.clear();
        assert_invalid(config, "marketo.client_id", "required");
        let mut config = valid();
        config.marketo.client_secret = Secret::default();
        assert_invalid(config, "marketo.client_secret", "required");
    }

    #[test]
    fn real_marketo_must_use_https() {
        let mut config = valid();
        config.marketo.base_url = "http://123-abc-456.MKTOREST.com".parse().unwrap();
        assert_invalid(config, "marketo.base_url", "HTTPS");
    }

    #[test]
    fn timeouts_must_be_positive() {
        let mut config = valid();
        config.marketo.connect_timeout = Duration::ZERO;
        assert_invalid(config, "marketo.connect_timeout", "more than 0s");
        let mut config = valid();
        config.marketo.request_timeout = Duration::ZERO;
        assert_invalid(config, "marketo.request_timeout", "more than 0s");
    }

    #[test]
    fn token_refresh_must_leave_part_of_the_lifetime() {
        let mut config = valid();
        config.marketo.token_refresh_before = Duration::from_secs(3600);
        assert_invalid(config, "marketo.token_refresh_before", "1h");
    }

    #[test]
    fn bodies_of_unknown_callers_get_a_part_of_the_body_budget_and_leave_the_rest() {
        let config = valid();
        assert_eq!(config.server.body_budgets(), (16 << 20, 240 << 20));
        let mut config = valid();
        config.server.max_buffered_body_bytes = std::num::NonZeroUsize::new(1000).unwrap();
        config.server.unauthenticated_body_bytes = std::num::NonZeroUsize::new(1000);
        assert_invalid(config, "server.unauthenticated_body_bytes", "less than");
    }

    #[test]
    fn window_must_be_positive() {
        let mut config = valid();
        config.limits.window = Duration::ZERO;
        assert_invalid(config, "limits.window", "more than 0s");
    }

    #[test]
    fn listeners_must_differ() {
        let mut config = valid();
        config.admin_listen = config.listen;
        assert_invalid(config, "admin_listen", "differ");
        let mut config = valid();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin_listen = config.listen;
        config.validate().unwrap();
    }

    #[test]
    fn at_least_one_service() {
        let mut config = valid();
        config.services.clear();
        assert_invalid(config, "services", "at least one");
    }

    #[test]
    fn service_names_are_required_label_safe_and_unique() {
        let mut config = valid();
        config.services[1].name.clear();
        assert_invalid(config, "services[1].name", "required");
        for bad in ["CRM", "crm sync", "crm.sync", "crm\"sync"] {
            let mut config = valid();
            config.services[0].name = bad.to_owned();
            assert_invalid(config, "services[0].name", "a-z, 0-9");
        }
        let mut config = valid();
        config.services[1].name = "crm-sync".to_owned();
        assert_invalid(config.clone(), "services[1].name", "same as services[0].name");
        config.services[1].name = "marketo-proxy".to_owned();
        assert_invalid(config, "services[1].name", "proxy's own calls");
        for reserved in ["unauthenticated", "unknown"] {
            let mut config = valid();
            config.services[0].name = reserved.to_owned();
            assert_invalid(config, "services[0].name", "labels metrics with itself");
        }
    }

    #[test]
    fn service_needs_a_credential() {
        let mut config = valid();
        config.services[1].api_key = None;
        assert_invalid(config, "services[1]", "needs an api_key");
    }

    #[test]
    fn client_id_and_secret_come_together() {
        let mut config = valid();
        config.services[0].client_secret = None;
        assert_invalid(config, "services[0].client_secret", "with client_id");
        let mut config = valid();
        config.services[0].client_id = None;
        assert_invalid(config, "services[0].client_id", "with client_secret");
    }

    #[test]
    fn empty_service_secrets_are_refused() {
        let mut config = valid();
        config.services[0].api_key = Some(Secret::default());
        assert_invalid(config, "services[0].api_key", "at least 20 characters");
        let mut config = valid();
        config.services[0].client_secret = Some(Secret::new("nineteen-characters"));
        assert_invalid(config, "services[0].client_secret", "at least 20 characters");
        let mut config = valid();
        config.services[0].client_id = Some(String::new());
        assert_invalid(config, "services[0].client_id", "empty");
    }

    #[test]
    fn api_keys_and_client_ids_are_unique() {
        let mut config = valid();
        config.services[1].api_key = Some(Secret::new("crm-key-0123456789abcd"));
        assert_invalid(config, "services[1].api_key", "same as services[0].api_key");
        let mut config = valid();
        config.services[1].client_id = Some("crm".to_owned());
        config.services[1].client_secret = Some(Secret::new("other-secret-0123456789"));
        assert_invalid(config, "services[1].client_id", "same as services[0].client_id");
    }

    #[test]
    fn duplicate_key_message_does_not_show_the_key() {
        let mut config = valid();
        config.services[1].api_key = Some(Secret::new("crm-key-0123456789abcd"));
        let message = config.validate().unwrap_err().to_string();
        assert!(!message.contains("crm-key-0123456789abcd"), "{message}");
    }

    #[test]
    fn service_caps_fit_the_instance() {
        let mut config = valid();
        config.services[0].window_calls = NonZeroU32::new(101);
        assert_invalid(
            config,
            "services[0].window_calls",
            "101 is more than limits.window_calls (100)",
        );
        let mut config = valid();
        config.services[0].concurrency = NonZeroU32::new(11);
        assert_invalid(config, "services[0].concurrency", "more than limits.concurrency");
        let mut config = valid();
        config.services[0].daily_quota = NonZeroU64::new(1001);
        assert_invalid(config, "services[0].daily_quota", "more than limits.daily_quota");
        let mut config = valid();
        config.services[0].window_calls = NonZeroU32::new(100);
        config.services[0].concurrency = NonZeroU32::new(10);
        config.services[0].daily_quota = NonZeroU64::new(1000);
        config.validate().unwrap();
    }

    #[test]
    fn reserved_daily_fits_the_service_cap() {
        let mut config = valid();
        config.services[0].daily_quota = NonZeroU64::new(100);
        config.services[0].reserved_daily = 101;
        assert_invalid(
            config,
            "services[0].reserved_daily",
            "this service's daily_quota (100)",
        );
    }

    #[test]
    fn reserved_daily_sums_to_at_most_the_quota() {
        let mut config = valid();
        config.services[0].reserved_daily = 600;
        config.services[1].reserved_daily = 400;
        config.clone().validate().unwrap();
        config.services[1].reserved_daily = 401;
        assert_invalid(config, "services", "adds up to 1001");
        let mut config = valid();
        config.services[0].reserved_daily = u64::MAX;
        config.services[1].reserved_daily = u64::MAX;
        assert_invalid(config, "services", "more than limits.daily_quota");
    }

    #[test]
    fn own_upstream_credential_needs_both_parts() {
        let mut config = valid();
        config.services[0].marketo = Some(UpstreamCredential {
            client_id: "user".to_owned(),
            client_secret: Secret::default(),
        });
        assert_invalid(config, "services[0].marketo.client_secret", "required");
        let mut config = valid();
        config.services[0].marketo = Some(UpstreamCredential {
            client_id: String::new(),
            client_secret: Secret::new("s"),
        });
        assert_invalid(config, "services[0].marketo.client_id", "required");
    }

    #[test]
    fn redis_backend_needs_a_redis_block() {
        let mut config = valid();
        config.state.backend = Backend::Redis;
        assert_invalid(config.clone(), "state.redis", "required");
        config.state.redis = Some(RedisConfig {
            url: Secret::new("redis://:pw@127.0.0.1:6379/0"),
            ..Default::default()
        });
        config.validate().unwrap();
    }

    #[test]
    fn redis_url_and_prefix_are_checked_without_echoing_the_url() {
        let with_redis = |redis: RedisConfig| {
            let mut config = valid();
            config.state.backend = Backend::Redis;
            config.state.redis = Some(redis);
            config
        };
        assert_invalid(with_redis(RedisConfig::default()), "state.redis.url", "required");
        let bad = with_redis(RedisConfig {
            url: Secret::new("http://user:hunter2@host"),
            ..Default::default()
        });
        let message = bad.clone().validate().unwrap_err().to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert_invalid(bad, "state.redis.url", "redis://");
        let tls = with_redis(RedisConfig {
            url: Secret::new("rediss://:hunter2@host:6380"),
            ..Default::default()
        });
        assert!(tls.validate().is_ok(), "rediss:// is accepted");
        let bad_ca = with_redis(RedisConfig {
            url: Secret::new("rediss://:hunter2@host:6380"),
            ca_file: Some("/nonexistent/redis-ca.pem".into()),
            ..Default::default()
        });
        assert_invalid(bad_ca, "state.redis.ca_file", "/nonexistent/redis-ca.pem");
        let no_prefix = with_redis(RedisConfig {
            url: Secret::new("redis://host:6380"),
            key_prefix: String::new(),
            ..Default::default()
        });
        assert_invalid(no_prefix, "state.redis.key_prefix", "required");
    }

    #[test]
    fn state_file_and_sync_interval_are_checked() {
        let mut config = valid();
        config.state.file = Some(PathBuf::new());
        assert_invalid(config, "state.file", "~");
        let mut config = valid();
        config.state.usage_sync_interval = Duration::from_secs(1);
        assert_invalid(config, "state.usage_sync_interval", "at least 10s");
        let mut config = valid();
        config.state.usage_sync_interval = Duration::ZERO;
        config.validate().unwrap();
    }
}
