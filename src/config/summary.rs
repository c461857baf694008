//! The effective limits in words, for `marketo-proxy check-config`.
//! Secrets are named by kind ("api key"), never shown; the Redis URL is
//! left out since it may hold a password.

use std::time::Duration;

use super::{Backend, Config, ServiceConfig};

impl Config {
    /// Human-readable account of what this config lets through.
    pub fn summary(&self) -> String {
        let limits = &self.limits;
        let marketo = &self.marketo;
        let mut lines = vec![
            format!("listen {}, admin {}", self.listen, self.admin_listen),
            format!(
                "marketo {} (connect timeout {}, request timeout {}, token refreshed {} before expiry)",
                marketo.base_url,
                human(marketo.connect_timeout),
                human(marketo.request_timeout),
                human(marketo.token_refresh_before),
            ),
            self.tls_line(),
            "instance limits:".to_owned(),
            format!(
                "  window: {} calls per {} (+{} safety margin)",
                limits.window_calls,
                human(limits.window),
                human(limits.safety_margin)
            ),
            format!("  concurrency: {} calls in flight", limits.concurrency),
            format!(
                "  daily quota: {} calls, reset at midnight {}",
                limits.daily_quota, limits.timezone
            ),
            format!(
                "  queue: at most {} requests, each waiting at most {}",
                limits.max_queue_length,
                human(limits.max_queue_wait)
            ),
            self.mode_line(),
            self.reads_line(),
            self.state_line(),
            format!(
                "services ({}, {} of {} daily calls reserved):",
                self.services.len(),
                self.services.iter().map(|s| s.reserved_daily).sum::<u64>(),
                limits.daily_quota
            ),
        ];
        lines.extend(self.services.iter().map(|service| self.service_line(service)));
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// Whom Marketo's certificate may chain to, and the way out.
    fn tls_line(&self) -> String {
        let marketo = &self.marketo;
        let trust = match &marketo.ca_file {
            Some(path) => format!("system and bundled CA roots, and {}", path.display()),
            None => "system and bundled CA roots".to_owned(),
        };
        let base = marketo.base_url.as_str().parse().unwrap_or_default();
        let egress = match crate::egress::EgressProxy::choose(marketo.egress_proxy.as_ref(), &base, |_| None)
        {
            Ok(Some(proxy)) => format!("through {}", proxy.describe()),
            _ if marketo.base_url.is_https() => "direct, or HTTPS_PROXY from the environment".to_owned(),
            _ => "direct".to_owned(),
        };
        format!("  trust: {trust}; egress: {egress}")
    }

    /// Whether the limits hold calls back, and what answers tell clients.
    fn mode_line(&self) -> String {
        let mode = match self.limits.mode {
            super::LimitsMode::Enforce => "enforce (calls wait or are refused to stay within the limits)",
            super::LimitsMode::Observe => {
                "observe (every call goes at once; what enforce would have held back is only counted)"
            }
        };
        let headers = if self.limits.ratelimit_headers {
            "RateLimit fields on every answer"
        } else {
            "no RateLimit fields"
        };
        format!("  mode: {mode}; {headers}")
    }

    /// Which reads share calls.
    fn reads_line(&self) -> String {
        let coalesce = if self.coalesce_reads {
            "identical reads in flight share one call"
        } else {
            "reads are not coalesced"
        };
        let cache = if self.cache.is_empty() {
            "no answers cached".to_owned()
        } else {
            let rules: Vec<String> = self
                .cache
                .iter()
                .map(|rule| format!("{} for {}", rule.path, human(rule.ttl)))
                .collect();
            format!(
                "cached (at most {} bytes): {}",
                self.cache_max_bytes,
                rules.join(", ")
            )
        };
        format!("reads: {coalesce}; {cache}")
    }

    fn state_line(&self) -> String {
        let state = &self.state;
        let storage = match (state.backend, &state.redis) {
            (Backend::Redis, Some(redis)) => format!(
                "redis, key prefix {}; while Redis is unreachable each replica uses limits / {}",
                redis.key_prefix, redis.fallback_replicas
            ),
            (Backend::Redis, None) => "redis".to_owned(),
            (Backend::Memory, _) => match &state.file {
                Some(file) => format!("memory, daily counts saved to {}", file.display()),
                None => "memory, nothing saved across restarts".to_owned(),
            },
        };
        format!(
            "state: {storage}; usage synced with Marketo every {}",
            human(state.usage_sync_interval)
        )
    }

    fn service_line(&self, service: &ServiceConfig) -> String {
        let limits = &self.limits;
        let mut parts = vec![
            format!("weight {}", service.weight),
            format!(
                "window {} calls per {}",
                service.effective_window_calls(limits),
                human(limits.window)
            ),
            format!("concurrency {}", service.effective_concurrency(limits)),
            format!(
                "daily quota {}, {} reserved",
                service.effective_daily_quota(limits),
                service.reserved_daily
            ),
            format!("queue wait {}", human(service.effective_max_queue_wait(limits))),
        ];
        let mut auth = Vec::new();
        if service.api_key.is_some() {
            auth.push("api key");
        }
        if service.client_id.is_some() {
            auth.push("client credentials");
        }
        parts.push(format!("auth: {}", auth.join(", ")));
        parts.push(
            match service.marketo {
                Some(_) => "upstream: own Marketo API user",
                None => "upstream: shared Marketo API user",
            }
            .to_owned(),
        );
        format!("  {}: {}", service.name, parts.join("; "))
    }
}

fn human(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn summary_shows_limits_and_auth_kinds_but_no_secrets() {
        let text = "
marketo:
  base_url: https://123-ABC-456.mktorest.com
  client_id: proxy
  client_secret: upstream-secret-1
  egress_proxy: http://gateway-user:gateway-password-7@gw.internal:3128
services:
  - name: crm-sync
    api_key: service-key-2-0123456789
    client_id: crm
    client_secret: service-secret-3-0123456789
    weight: 3
    window_calls: 50
    reserved_daily: 5000
    max_queue_wait: 10s
    marketo:
      client_id: own
      client_secret: own-secret-4
  - name: forms
    api_key: service-key-5-0123456789
state:
  backend: redis
  redis:
    url: redis://:redis-password-6@127.0.0.1:6379
    key_prefix: mp
    fallback_replicas: 3
";
        let summary = Config::from_yaml_with_env(text, |_| None).unwrap().summary();
        for expected in [
            "  trust: system and bundled CA roots; egress: through http://gw.internal:3128 (from marketo.egress_proxy, with credentials)",
            "window: 100 calls per 20s (+250ms safety margin)",
            "concurrency: 10 calls in flight",
            "daily quota: 50000 calls, reset at midnight America/Chicago",
            "queue: at most 10000 requests, each waiting at most 30s",
            "redis, key prefix mp; while Redis is unreachable each replica uses limits / 3",
            "services (2, 5000 of 50000 daily calls reserved):",
            "  crm-sync: weight 3; window 50 calls per 20s; concurrency 10; daily quota 50000, 5000 reserved; queue wait 10s; auth: api key, client credentials; upstream: own Marketo API user",
            "  forms: weight 1; window 100 calls per 20s; concurrency 10; daily quota 50000, 0 reserved; queue wait 30s; auth: api key; upstream: shared Marketo API user",
        ] {
            assert!(summary.contains(expected), "missing {expected:?} in\n{summary}");
        }
        for secret in [
            "secret-1",
            "key-2",
            "secret-3",
            "secret-4",
            "key-5",
            "password-6",
            "password-7",
        ] {
            assert!(!summary.contains(secret), "{secret} leaked into\n{summary}");
        }
    }
}
