//! Marketo's answers to reads, kept so that identical reads can have them
//! without a call of their own: the key that says when two reads are the
//! same ([`ReadKey`]), the answer as every sharer gets it
//! ([`SharedAnswer`]), and the cache of them ([`AnswerCache`]): a time to
//! live per entry, and a bound on the bytes all entries take together,
//! the least recently used going first.
//!
//! Two reads are the same when they go to Marketo as the same API user
//! with the same method, path, query, body and body type. The API user is
//! in the key, so an answer never crosses from one Marketo user to
//! another, whatever the services are called.
//!
//! Time is passed in (tokio's clock), so tests can move it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, header, response};
use tokio::time::Instant;

use crate::upstream::{Answer, AnswerBody};

/// What makes two reads the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadKey {
    /// The upstream API user the call is made as (its credential's index).
    pub user: usize,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl ReadKey {
    /// Bytes the key holds, for the cache's bound.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.path.len()
            + self.query.as_ref().map_or(0, String::len)
            + self.content_type.as_ref().map_or(0, HeaderValue::len)
            + self.body.len()
    }
}

/// A whole answer from Marketo, as each request that shares it gets it:
/// the same status, headers and bytes.
#[derive(Debug)]
pub struct SharedAnswer {
    pub head: response::Parts,
    pub body: Bytes,
    /// The Marketo error code, when the answer is a `success:false` envelope.
    pub error_code: Option<String>,
}

impl SharedAnswer {
    /// The answer, if it came whole (answers over the peek limit stream and
    /// are never shared).
    pub fn of(answer: &Answer) -> Option<Self> {
        match &answer.body {
            AnswerBody::Whole(bytes) => Some(Self {
                head: answer.head.clone(),
                body: bytes.clone(),
                error_code: answer.error_code.clone(),
            }),
            AnswerBody::Streaming { .. } => None,
        }
    }

    /// A copy to answer one more request with; the body's bytes are shared.
    pub fn answer(&self) -> Answer {
        Answer {
            head: self.head.clone(),
            body: AnswerBody::Whole(self.body.clone()),
            error_code: self.error_code.clone(),
            // Not a call of its own: nothing to stamp.
            marketo_time: None,
        }
    }

    /// A 200 that is not an error envelope: the whole of a successful
    /// answer, and so one that may be kept (never a 206's part of one).
    pub fn is_whole_success(&self) -> bool {
        self.error_code.is_none() && self.head.status == http::StatusCode::OK
    }

    /// Bytes the answer holds, for the cache's bound.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .head
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        std::mem::size_of::<Self>()
            + headers
            + self.body.len()
            + self.error_code.as_ref().map_or(0, String::len)
    }
}

/// Whether the request's answer depends on what its client already holds
/// (a part of a file, or a copy it may have): such a read is its own.
pub fn is_conditional(headers: &http::HeaderMap) -> bool {
    [
        header::RANGE,
        header::IF_RANGE,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
    ]
    .iter()
    .any(|name| headers.contains_key(name))
}

/// Whether the client forbids keeping its answer (`Cache-Control:
/// no-store`).
pub fn forbids_keeping(headers: &http::HeaderMap) -> bool {
    cache_directives(headers).any(|directive| directive.eq_ignore_ascii_case("no-store"))
}

/// Whether the client asked for a fresh answer (`Cache-Control: no-cache`
/// or `no-store`).
pub fn wants_fresh(headers: &http::HeaderMap) -> bool {
    cache_directives(headers).any(|directive| {
        directive.eq_ignore_ascii_case("no-cache") || directive.eq_ignore_ascii_case("no-store")
    })
}

fn cache_directives(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

/// Answers kept for a while, within a bound on bytes.
pub struct AnswerCache {
    max_bytes: usize,
    store: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    entries: HashMap<Arc<ReadKey>, Entry>,
    /// Entries by when they were last used (a counter), oldest first.
    recency: BTreeMap<u64, Arc<ReadKey>>,
    clock: u64,
    bytes: usize,
}

struct Entry {
    answer: Arc<SharedAnswer>,
    expires_at: Instant,
    used: u64,
    size: usize,
}

impl AnswerCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            store: Mutex::new(Store::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer kept for `key`, unless it expired by `now`.
    pub fn get(&self, key: &ReadKey, now: Instant) -> Option<Arc<SharedAnswer>> {
        let mut store = self.lock();
        let store = &mut *store;
        let entry = store.entries.get_mut(key)?;
        if entry.expires_at <= now {
            let used = entry.used;
            store.remove(used);
            return None;
        }
        store.clock += 1;
        let previous = std::mem::replace(&mut entry.used, store.clock);
        if let Some(key) = store.recency.remove(&previous) {
            store.recency.insert(store.clock, key);
        }
        Some(Arc::clone(&entry.answer))
    }

    /// Keeps `answer` for `key` until `ttl` from `now`, making room by
    /// dropping the least recently used entries. An answer larger than the
    /// whole bound is not kept.
    pub fn insert(&self, key: Arc<ReadKey>, answer: Arc<SharedAnswer>, ttl: Duration, now: Instant) {
        let size = key.size() + answer.size();
        if size > self.max_bytes {
            return;
        }
        let mut store = self.lock();
        if let Some(used) = store.entries.get(&key).map(|entry| entry.used) {
            store.remove(used);
        }
        while store.bytes + size > self.max_bytes {
            let Some((&oldest, _)) = store.recency.iter().next() else {
                break;
            };
            store.remove(oldest);
        }
        store.clock += 1;
        let used = store.clock;
        store.bytes += size;
        store.recency.insert(used, Arc::clone(&key));
        store.entries.insert(
            key,
            Entry {
                answer,
                expires_at: now + ttl,
                used,
                size,
            },
        );
    }

    /// Bytes the entries take, keys included.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store {
    /// Drops the entry last used at `used`.
    fn remove(&mut self, used: u64) {
        if let Some(key) = self.recency.remove(&used) {
            if let Some(entry) = self.entries.remove(&key) {
                self.bytes -= entry.size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Response, StatusCode};

    fn key(user: usize, query: &str) -> Arc<ReadKey> {
        Arc::new(ReadKey {
            user,
            method: Method::GET,
            path: "/rest/v1/leads/describe.json".to_owned(),
            query: Some(query.to_owned()),
            content_type: None,
            body: Bytes::new(),
        })
    }

    fn answer(body: &'static [u8]) -> Arc<SharedAnswer> {
        let (head, ()) = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        Arc::new(SharedAnswer {
            head,
            body: Bytes::from_static(body),
            error_code: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_lives_exactly_its_ttl() {
        let cache = AnswerCache::new(1 << 20);
        let ttl = Duration::from_secs(3600);
        cache.insert(key(0, "a"), answer(b"{}"), ttl, Instant::now());
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert!(cache.get(&key(0, "a"), Instant::now()).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(cache.get(&key(0, "a"), Instant::now()).is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0), "expired entries go");
    }

    #[test]
    fn answers_never_cross_api_users() {
        let cache = AnswerCache::new(1 << 20);
        let now = Instant::now();
        cache.insert(key(0, "a"), answer(b"{}"), Duration::from_secs(60), now);
        assert!(cache.get(&key(1, "a"), now).is_none());
        assert!(cache.get(&key(0, "b"), now).is_none());
        assert!(cache.get(&key(0, "a"), now).is_some());
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let one = key(0, "0").size() + answer(&[b'x'; 1000]).size();
        let cache = AnswerCache::new(100 * one);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for index in 0..10_000 {
            cache.insert(key(0, &index.to_string()), answer(&[b'x'; 1000]), ttl, now);
            // Entry 0 is read after every insert: it stays.
            assert!(cache.get(&key(0, "0"), now).is_some(), "after {index}");
            assert!(cache.bytes() <= 100 * one, "{} after {index}", cache.bytes());
        }
        assert!(cache.len() <= 100);
        assert!(cache.get(&key(0, "9999"), now).is_some());
        assert!(cache.get(&key(0, "5000"), now).is_none());
    }

    #[test]
    fn an_answer_larger_than_the_bound_is_not_kept() {
        let cache = AnswerCache::new(512);
        cache.insert(
            key(0, "a"),
            answer(&[b'x'; 1024]),
            Duration::from_secs(60),
            Instant::now(),
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn no_cache_and_no_store_ask_for_a_fresh_answer() {
        let mut headers = http::HeaderMap::new();
        assert!(!wants_fresh(&headers));
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert!(wants_fresh(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(wants_fresh(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        assert!(!wants_fresh(&headers));
    }
}
