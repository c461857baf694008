//! Who is calling: every request is accounted to one configured service,
//! or refused before anything is forwarded.
//!
//! A service proves itself with its API key (`X-Api-Key`, or
//! `Authorization: Bearer <key>`), or, for integrations that only know how
//! to talk to Marketo, with a token the proxy issued at its own
//! `/identity/oauth/token` in exchange for the service's client id and
//! secret. Those tokens follow Marketo's rule: the same token until it
//! expires, with its remaining lifetime.
//!
//! Secrets are compared in constant time. Failed attempts are throttled
//! per client address (a keyed `governor` limiter): past the limit a wrong
//! credential gets 429 instead of 401 for a while. A right one is always
//! accepted, so behind a NAT or a load balancer one integration with a
//! stale key cannot lock the others out; keys and secrets are long enough
//! (see the config's validation) that guessing is hopeless at any rate.

mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::Config;
use crate::marketo::TokenAnswer;
use crate::metrics::{Metrics, ServiceSeries};
use crate::secret::Secret;
use tokens::IssuedTokens;

/// Lifetime of a proxy-issued token, as Marketo's.
pub const PROXY_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Failed attempts a client address may make per minute.
const FAILURES_PER_MINUTE: u32 = 10;

/// A configured service, as the caller table knows it. Only the table
/// makes one ([`Callers::authenticate`], [`Callers::issue_token`],
/// [`Callers::internal`]), so a request's service is always one the
/// configuration has; the limits index their lanes by [`ServiceId::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(usize);

impl ServiceId {
    /// The service's place in the configuration (the proxy's own calls
    /// last), as the limits' lanes are laid out.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or unknown credentials")]
    Unauthenticated,
    #[error("too many failed attempts from this address")]
    Throttled { retry_after: Duration },
}

struct ServiceCredentials {
    api_key: Option<Secret>,
    client_id: Option<String>,
    client_secret: Option<Secret>,
}

/// A service that proved who it is, as the request's extensions carry it
/// from the caller layer down (and back up with the answer).
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: ServiceId,
    /// The series its calls count in; their label is its name.
    pub series: Arc<ServiceSeries>,
}

impl Caller {
    /// The service's name: its metrics label.
    pub fn name(&self) -> &str {
        self.series.name()
    }
}

/// The same service of the same proxy.
impl PartialEq for Caller {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && Arc::ptr_eq(&self.series, &other.series)
    }
}

impl Eq for Caller {}

/// The credentials of every service and the tokens issued to them.
pub struct Callers {
    services: Vec<ServiceCredentials>,
    /// Every counted service as a caller, the proxy's own last.
    callers: Vec<Caller>,
    /// Longest a request may wait for admission, per service.
    max_waits: Vec<Duration>,
    issued: IssuedTokens,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses refused until the given time.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Callers {
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        let services = config
            .services
            .iter()
            .map(|service| ServiceCredentials {
                api_key: service.api_key.clone(),
                client_id: service.client_id.clone(),
                client_secret: service.client_secret.clone(),
            })
            .collect();
        let per_minute = NonZeroU32::new(FAILURES_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        Self {
            services,
            // The proxy's own calls come last, under a name no service has.
            callers: config
                .counted_names()
                .into_iter()
                .enumerate()
                .map(|(id, name)| Caller {
                    id: ServiceId(id),
                    series: Arc::new(metrics.service_series(Arc::from(name))),
                })
                .collect(),
            max_waits: config
                .services
                .iter()
                .map(|service| service.effective_max_queue_wait(&config.limits))
                .chain(std::iter::once(config.limits.max_queue_wait))
                .collect(),
            issued: IssuedTokens::new(
                config.auth.token_key.as_ref(),
                &config
                    .services
                    .iter()
                    .map(|service| Arc::from(service.name.as_str()))
                    .collect::<Vec<_>>(),
            ),
            failures: RateLimiter::keyed(Quota::per_minute(per_minute)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    pub fn name(&self, service: ServiceId) -> &str {
        self.callers.get(service.0).map_or("unknown", Caller::name)
    }

    /// The caller `service`, as request extensions carry it. Every
    /// [`ServiceId`] comes from this table ([`Callers::authenticate`]).
    pub fn caller(&self, service: ServiceId) -> Caller {
        self.callers[service.0].clone()
    }

    /// The service configured at `index` (the proxy's own calls last),
    /// if there is one: how the layers' unit tests name a caller.
    #[cfg(test)]
    pub fn service(&self, index: usize) -> Option<ServiceId> {
        (index < self.callers.len()).then_some(ServiceId(index))
    }

    /// The caller at `index` in admission order (the proxy's own last):
    /// whom the proxy's own calls for a service are made as.
    pub fn at(&self, index: usize) -> Option<Caller> {
        self.callers.get(index).cloned()
    }

    /// The proxy's own calls (its usage report), as a caller.
    pub fn internal(&self) -> Caller {
        self.callers
            .last()
            .expect("the proxy's own caller comes last")
            .clone()
    }

    /// The longest a request of `service` may wait to be admitted.
    pub fn max_wait(&self, service: ServiceId) -> Duration {
        self.max_waits.get(service.0).copied().unwrap_or_default()
    }

    /// Notes a failed attempt from `peer` and says how to refuse it: as
    /// unknown, or, once the address has failed too often, as throttled.
    pub fn failed(&self, peer: IpAddr) -> AuthError {
        let now = Instant::now();
        {
            let mut blocked = lock(&self.blocked);
            if let Some(until) = blocked.get(&peer).copied() {
                if until > now {
                    return AuthError::Throttled {
                        retry_after: until - now,
                    };
                }
                blocked.remove(&peer);
            }
        }
        if let Err(not_until) = self.failures.check_key(&peer) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let wait = wait.max(Duration::from_secs(1));
            lock(&self.blocked).insert(peer, now + wait);
            tracing::info!(%peer, retry_after_s = wait.as_secs(), "failed authentication from this address throttled");
            return AuthError::Throttled { retry_after: wait };
        }
        // Keep memory bounded under a spray of addresses; sweeping is a
        // full scan, so only now and then.
        if self.failures.len() > 10_000 && rand::random::<u8>() == 0 {
            self.failures.retain_recent();
            lock(&self.blocked).retain(|_, until| *until > now);
        }
        AuthError::Unauthenticated
    }

    /// The service that presented `credential` (an API key or a token this
    /// proxy issued), if any.
    pub fn authenticate(&self, credential: &str) -> Option<ServiceId> {
        if credential.is_empty() {
            return None;
        }
        // Check every key, so the time taken does not say which one matched.
        let mut matched = None;
        for (index, service) in self.services.iter().enumerate() {
            if service
                .api_key
                .as_ref()
                .is_some_and(|key| key.matches(credential))
            {
                matched = Some(ServiceId(index));
            }
        }
        matched.or_else(|| self.issued.owner(credential))
    }

    /// The proxy's `/identity/oauth/token`: a token for the service with
    /// these client credentials, and whose it is; `None` for unknown ones.
    pub fn issue_token(&self, client_id: &str, client_secret: &str) -> Option<(ServiceId, TokenAnswer)> {
        let mut matched = None;
        for (index, service) in self.services.iter().enumerate() {
            let id_matches = service
                .client_id
                .as_deref()
                .is_some_and(|id| Secret::new(id).matches(client_id));
            let secret_matches = service
                .client_secret
                .as_ref()
                .is_some_and(|secret| secret.matches(client_secret));
            if id_matches & secret_matches {
                matched = Some(ServiceId(index));
            }
        }
        let service = matched?;
        let (token, left) = self.issued.issue(service);
        Some((service, answer(token, left, self.name(service))))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn answer(token: String, left: Duration, service: &str) -> TokenAnswer {
    TokenAnswer {
        access_token: token,
        token_type: "bearer".into(),
        expires_in: left.as_secs(),
        scope: service.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers() -> Callers {
        let config = crate::config::Config::from_yaml_with_env(
            r#"
marketo: { base_url: "http://127.0.0.1:1", client_id: a, client_secret: b }
services:
  - { name: crm, api_key: key-crm-1234567890abcd, client_id: crm-id, client_secret: crm-secret-0123456789 }
  - { name: forms, api_key: key-forms-0987654321 }
"#,
            |_| None,
        )
        .unwrap();
        Callers::new(&config, &Metrics::new())
    }

    #[tokio::test]
    async fn api_keys_name_their_service() {
        let callers = callers();
        assert_eq!(callers.authenticate("key-crm-1234567890abcd"), Some(ServiceId(0)));
        assert_eq!(callers.authenticate("key-forms-0987654321"), Some(ServiceId(1)));
        assert_eq!(callers.authenticate("key-forms-098765432"), None);
        assert_eq!(callers.authenticate(""), None);
    }

    #[tokio::test]
    async fn issued_tokens_are_the_same_until_expiry() {
        let callers = callers();
        assert!(callers.issue_token("crm-id", "wrong").is_none());
        assert!(callers.issue_token("forms", "").is_none());
        let (_, first) = callers.issue_token("crm-id", "crm-secret-0123456789").unwrap();
        assert_eq!(first.scope, "crm");
        assert_eq!(first.expires_in, 3599);
        assert_eq!(callers.authenticate(&first.access_token), Some(ServiceId(0)));
        let (_, again) = callers.issue_token("crm-id", "crm-secret-0123456789").unwrap();
        assert_eq!(again.access_token, first.access_token);
        assert!(again.expires_in <= first.expires_in);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_tokens_are_refused_and_replaced() {
        let callers = callers();
        let (_, first) = callers.issue_token("crm-id", "crm-secret-0123456789").unwrap();
        tokio::time::advance(PROXY_TOKEN_TTL).await;
        assert_eq!(callers.authenticate(&first.access_token), None);
        let (_, second) = callers.issue_token("crm-id", "crm-secret-0123456789").unwrap();
        assert_ne!(second.access_token, first.access_token);
        assert_eq!(callers.authenticate(&second.access_token), Some(ServiceId(0)));
    }

    #[tokio::test]
    async fn repeated_failures_throttle_further_failures_from_the_address_only() {
        let callers = callers();
        let peer: IpAddr = [192, 0, 2, 7].into();
        for _ in 0..FAILURES_PER_MINUTE {
            assert_eq!(callers.failed(peer), AuthError::Unauthenticated);
        }
        assert!(matches!(callers.failed(peer), AuthError::Throttled { .. }));
        assert!(matches!(callers.failed(peer), AuthError::Throttled { .. }));
        let other: IpAddr = [192, 0, 2, 8].into();
        assert_eq!(callers.failed(other), AuthError::Unauthenticated);
    }
}
