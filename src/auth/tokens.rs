//! Tokens the proxy issues at its `/identity/oauth/token`, Marketo's way:
//! the same token until it expires, handed back with its remaining life.
//!
//! Without `auth.token_key` a token is random and known to this process
//! only. With it, a token is derived from the key, the service's name and
//! the hour it belongs to (HMAC-SHA256), so every replica sharing the key
//! hands out the same token and accepts any replica's, with no shared
//! state to lose; it expires at the end of its hour. Replicas' clocks may
//! differ by up to [`SKEW`]: a token is accepted that long before its hour
//! and after it. A new key makes every earlier token unknown: clients get
//! 601 and fetch a new one, as after a Marketo token is revoked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use tokio::time::Instant;

use super::{PROXY_TOKEN_TTL, ServiceId};
use crate::secret::Secret;

/// How far apart the replicas' clocks may be.
pub const SKEW: Duration = Duration::from_secs(30);

/// The tokens issued to the services, by whichever scheme is configured.
pub enum IssuedTokens {
    Local(Mutex<Local>),
    Derived(Derived),
}

impl IssuedTokens {
    /// Derived tokens when `key` is set; `services` are the services' names.
    pub fn new(key: Option<&Secret>, services: &[Arc<str>]) -> Self {
        match key {
            Some(key) => Self::Derived(Derived::new(key, services)),
            None => Self::Local(Mutex::new(Local::default())),
        }
    }

    /// The token of `service` now, and how long it has left.
    pub fn issue(&self, service: ServiceId) -> (String, Duration) {
        match self {
            Self::Local(local) => lock(local).issue(service, Instant::now()),
            Self::Derived(derived) => derived.issue_at(service, unix_now()),
        }
    }

    /// Whose `token` is, if it is one of ours and has not expired.
    pub fn owner(&self, token: &str) -> Option<ServiceId> {
        match self {
            Self::Local(local) => lock(local).owner(token, Instant::now()),
            Self::Derived(derived) => derived.owner_at(token, unix_now()),
        }
    }
}

/// Random tokens, remembered here.
#[derive(Default)]
pub struct Local {
    /// Token → whose it is and when it expires.
    by_token: HashMap<String, (ServiceId, Instant)>,
    /// Service → its current token, to hand back the same one.
    current: HashMap<ServiceId, String>,
}

impl Local {
    fn issue(&mut self, service: ServiceId, now: Instant) -> (String, Duration) {
        if let Some(token) = self.current.get(&service) {
            if let Some((_, expires_at)) = self.by_token.get(token) {
                if *expires_at > now {
                    return (token.clone(), *expires_at - now);
                }
            }
            self.by_token.remove(token);
        }
        let token = crate::marketo::new_access_token("mp");
        self.by_token
            .insert(token.clone(), (service, now + PROXY_TOKEN_TTL));
        self.current.insert(service, token.clone());
        // Marketo rounds down: a fresh token says 3599.
        (token, PROXY_TOKEN_TTL - Duration::from_secs(1))
    }

    fn owner(&self, token: &str, now: Instant) -> Option<ServiceId> {
        let (service, expires_at) = self.by_token.get(token)?;
        (*expires_at > now).then_some(*service)
    }
}

/// Tokens derived from the shared key.
pub struct Derived {
    key: hmac::Key,
    services: Vec<Arc<str>>,
    /// The tokens of the hours around the current one, to look a presented
    /// token up without computing anything.
    around: RwLock<Around>,
}

#[derive(Default)]
struct Around {
    hour: u64,
    by_token: HashMap<String, (ServiceId, u64)>,
}

impl Derived {
    pub fn new(key: &Secret, services: &[Arc<str>]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.expose().as_bytes()),
            services: services.to_vec(),
            around: RwLock::new(Around::default()),
        }
    }

    /// The token of `service` for `hour` (hours since the epoch), shaped
    /// like Marketo's.
    fn token(&self, service: ServiceId, hour: u64) -> String {
        let name = self.services.get(service.index()).map_or("", |name| &**name);
        let message = format!("marketo-proxy access token\0{name}\0{hour}");
        let tag = hmac::sign(&self.key, message.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&tag.as_ref()[..16]);
        crate::marketo::access_token(bytes, "mp")
    }

    /// The token of `service` at `now` (since the epoch) and its time left.
    pub fn issue_at(&self, service: ServiceId, now: Duration) -> (String, Duration) {
        let hour = now.as_secs() / HOUR;
        let end = Duration::from_secs((hour + 1) * HOUR);
        (self.token(service, hour), end.saturating_sub(now))
    }

    /// Whose `token` is at `now`, if it belongs to this hour, or to the
    /// one before or after within [`SKEW`] of its edge.
    pub fn owner_at(&self, token: &str, now: Duration) -> Option<ServiceId> {
        let hour = now.as_secs() / HOUR;
        let (service, of) = self.lookup(token, hour)?;
        let into_hour = now.saturating_sub(Duration::from_secs(hour * HOUR));
        let valid = of == hour
            || (of + 1 == hour && into_hour < SKEW)
            || (of == hour + 1 && Duration::from_secs(HOUR) - into_hour < SKEW);
        valid.then_some(service)
    }

    fn lookup(&self, token: &str, hour: u64) -> Option<(ServiceId, u64)> {
        {
            let around = self
                .around
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if around.hour == hour && !around.by_token.is_empty() {
                return around.by_token.get(token).copied();
            }
        }
        let mut by_token = HashMap::with_capacity(self.services.len() * 3);
        for of in hour.saturating_sub(1)..=hour + 1 {
            for service in (0..self.services.len()).map(ServiceId) {
                by_token.insert(self.token(service, of), (service, of));
            }
        }
        let found = by_token.get(token).copied();
        *self
            .around
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Around { hour, by_token };
        found
    }
}

const HOUR: u64 = 3600;

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(key: &str) -> Derived {
        let names: Vec<Arc<str>> = vec![Arc::from("crm-sync"), Arc::from("warehouse")];
        Derived::new(&Secret::from(key), &names)
    }

    const KEY: &str = "a-shared-key-of-thirty-two-chars!";
    /// 10:00:00 on some day, in seconds since the epoch.
    const TEN: u64 = 1_764_583_200;

    #[test]
    fn replicas_with_the_same_key_issue_and_accept_the_same_token() {
        let (one, two) = (derived(KEY), derived(KEY));
        let at = Duration::from_secs(TEN + 600);
        let (token, left) = one.issue_at(ServiceId(0), at);
        assert_eq!(left, Duration::from_secs(3000));
        assert_eq!(
            two.issue_at(ServiceId(0), at + Duration::from_secs(60)).0,
            token,
            "same token all hour"
        );
        assert_eq!(two.owner_at(&token, at), Some(ServiceId(0)));
        assert_ne!(
            one.issue_at(ServiceId(1), at).0,
            token,
            "each service has its own"
        );
        assert_eq!(
            two.owner_at(&one.issue_at(ServiceId(1), at).0, at),
            Some(ServiceId(1))
        );
        assert!(token.ends_with(":mp") && token.len() == 39, "{token}");
    }

    #[test]
    fn a_token_expires_with_its_hour_give_or_take_the_clock_skew() {
        let replica = derived(KEY);
        let (token, _) = replica.issue_at(ServiceId(0), Duration::from_secs(TEN + 10));
        let at = |seconds: u64| Duration::from_secs(TEN + seconds);
        assert_eq!(replica.owner_at(&token, at(3599)), Some(ServiceId(0)));
        assert_eq!(
            replica.owner_at(&token, at(3600 + 29)),
            Some(ServiceId(0)),
            "a late clock"
        );
        assert_eq!(replica.owner_at(&token, at(3600 + 30)), None);
        // Issued by a replica whose clock is ahead, at 10:59:50.
        let (early, left) = replica.issue_at(ServiceId(0), at(3600 + 5));
        assert_eq!(left, Duration::from_secs(3595));
        assert_eq!(replica.owner_at(&early, at(3600 - 10)), Some(ServiceId(0)));
        assert_eq!(replica.owner_at(&early, at(3600 - 31)), None);
    }

    #[test]
    fn another_key_or_a_made_up_token_is_unknown() {
        let at = Duration::from_secs(TEN);
        let (token, _) = derived(KEY).issue_at(ServiceId(0), at);
        assert_eq!(
            derived("another-key-of-thirty-two-chars!!").owner_at(&token, at),
            None
        );
        assert_eq!(
            derived(KEY).owner_at("00000000-0000-0000-0000-000000000000:mp", at),
            None
        );
    }
}
