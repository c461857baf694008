//! Identical reads share one call: while a read (GET, or POST with
//! `_method=GET`) is queued or in flight, an identical one (see
//! [`ReadKey`]) waits for its answer instead of spending a call of its
//! own; and reads of the paths listed under `cache:` are answered from
//! the [`AnswerCache`] for a while after a successful answer.
//!
//! - The first of identical reads leads: it goes on down the stack
//!   (replays, admission, Marketo). Those arriving meanwhile follow: they
//!   get byte for byte what it got, whatever it was (an error envelope
//!   too), and spend nothing. Later reads call again, unless the answer
//!   was kept in the cache, which never keeps an error.
//! - A read is never slower for having followed: a follower waits in its
//!   own service's queue, under its own deadline and its service's rules
//!   (so it counts in `max_queue_length`), and takes the lead's answer if
//!   that comes first. When its own turn comes and the lead is at Marketo,
//!   it steps aside and waits for that answer; when the lead is still
//!   queued (behind its own service's caps, say), it goes itself.
//! - Only answers that arrive whole are shared: those within the upstream
//!   peek limit ([`PEEK_LIMIT`], 64 KB). A larger answer (a bulk export
//!   file) streams to its leader alone, and each follower then calls on its
//!   own, as it would without this layer; so does each follower when the
//!   leader got no answer (a local refusal, a timeout, a request that went
//!   away). A refusal under the leader's deadline says nothing about the
//!   followers', which may be longer.
//! - A read that depends on what its client already holds (`Range`,
//!   `If-Range`, `If-None-Match`, `If-Modified-Since`, `If-Match`) is
//!   never shared nor answered from the cache: it goes to Marketo as
//!   sent, and its answer (a 206 of some bytes, a 304) to it alone. Only
//!   a 200 is kept in the cache.
//! - `Cache-Control: no-cache` from a client skips the cache; its fresh
//!   answer is kept for those that come after. `no-store` skips it too,
//!   and its answer is not kept.
//! - Every saved request counts under its own service, as `coalesced` or
//!   `cached`; the leader's call counts once, under the leader's service.
//!
//! It sits between the answer layer and the replay policy: what it hands
//! up is what a call would have, without a slot. Writes, and every read
//! when coalescing is off and no cache path matches, go straight through
//! without a copy or an allocation.
//!
//! [`PEEK_LIMIT`]: crate::upstream::PEEK_LIMIT

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::admit::Admitted;
use super::call::{Call, Lead, Sharing};
use super::replay::is_read;
use crate::admission::{Admission, Saved};
use crate::answer_cache::{AnswerCache, ReadKey, SharedAnswer, forbids_keeping, is_conditional, wants_fresh};
use crate::config::{CacheRule, Config};
use crate::error::ProxyError;

/// Shares reads; see the module documentation.
#[derive(Clone)]
pub struct CoalesceLayer {
    /// `None` when neither coalescing nor any cache path is configured.
    reads: Option<Arc<Reads>>,
}

/// What the layer shares reads through.
pub struct Reads {
    coalesce: bool,
    paths: Vec<CachePath>,
    cache: AnswerCache,
    /// Service → the upstream API user it calls as.
    users: Vec<usize>,
    admission: Arc<Admission>,
    /// Reads queued or in flight, and who waits for each one's answer.
    leading: Mutex<HashMap<Arc<ReadKey>, Leader>>,
}

/// A read that leads, and those that wait for its answer.
struct Leader {
    lead: Arc<Lead>,
    followers: Vec<Follower>,
}

/// Where a read that waits for an identical one gets its answer.
type Follower = oneshot::Sender<Arc<SharedAnswer>>;

impl CoalesceLayer {
    /// `users` maps each service to the upstream API user it calls as.
    pub fn new(config: &Config, users: Vec<usize>, admission: Arc<Admission>) -> Self {
        let reads = (config.coalesce_reads || !config.cache.is_empty()).then(|| {
            Arc::new(Reads {
                coalesce: config.coalesce_reads,
                paths: config.cache.iter().map(CachePath::new).collect(),
                cache: AnswerCache::new(config.cache_max_bytes.get()),
                users,
                admission,
                leading: Mutex::new(HashMap::new()),
            })
        });
        Self { reads }
    }

    /// What reads are shared through, if anything is.
    pub fn reads(&self) -> Option<&Arc<Reads>> {
        self.reads.as_ref()
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce {
            inner,
            reads: self.reads.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Coalesce<S> {
    inner: S,
    reads: Option<Arc<Reads>>,
}

impl<S> Service<Call> for Coalesce<S>
where
    S: Service<Call, Response = Admitted, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Admitted;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Admitted, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(reads) = &self.reads else {
            return Either::Left(self.inner.call(call));
        };
        let ttl = reads.ttl(&call);
        if !(reads.coalesce || ttl.is_some()) || !is_read(&call) || is_conditional(call.request.headers()) {
            return Either::Left(self.inner.call(call));
        }
        let inner = self.inner.clone();
        Either::Right(Box::pin(Arc::clone(reads).answer(inner, call, ttl)))
    }
}

/// What a read does about an identical one.
enum Role {
    /// None is queued or in flight: this one calls, and others may wait.
    Lead(Arc<Lead>),
    /// Another is: wait for its answer, or go when it is still queued.
    Follow(Arc<Lead>, oneshot::Receiver<Arc<SharedAnswer>>),
}

impl Reads {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<ReadKey>, Leader>> {
        self.leading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long answers to `call`'s path are kept, if they are.
    fn ttl(&self, call: &Call) -> Option<Duration> {
        self.paths
            .iter()
            .find(|path| path.matches(&call.target.path))
            .map(|path| path.ttl)
    }

    fn key(&self, call: &Call) -> Arc<ReadKey> {
        let request = &call.request;
        Arc::new(ReadKey {
            user: self.users.get(call.caller.id.index()).copied().unwrap_or(0),
            method: request.method().clone(),
            path: call.target.path.clone(),
            query: call.target.query.clone(),
            content_type: request.headers().get(http::header::CONTENT_TYPE).cloned(),
            body: request.body().clone(),
        })
    }

    /// The answer to a read: from the cache, from an identical read in
    /// flight, or from a call of its own.
    async fn answer<S>(
        self: Arc<Self>,
        inner: S,
        call: Call,
        ttl: Option<Duration>,
    ) -> Result<Admitted, ProxyError>
    where
        S: Service<Call, Response = Admitted, Error = ProxyError> + Clone,
    {
        let service = call.caller.id.index();
        let key = self.key(&call);
        let headers = call.request.headers();
        let ttl = ttl.filter(|_| !forbids_keeping(headers));
        if ttl.is_some() && !wants_fresh(headers) {
            if let Some(kept) = self.cache.get(&key, Instant::now()) {
                self.admission.saved(service, Saved::Cached);
                return Ok(shared(&kept));
            }
        }
        if !self.coalesce {
            let result = inner.oneshot(call).await;
            self.keep(key, ttl, &result);
            return result;
        }
        match self.join(&key) {
            Role::Follow(lead, answer) => self.follow(inner, call, key, ttl, lead, answer).await,
            Role::Lead(lead) => {
                let mut lead_guard = Leading {
                    reads: &self,
                    key: Some(Arc::clone(&key)),
                };
                let mut call = call;
                call.sharing = Some(Sharing::Leads(lead));
                let result = inner.oneshot(call).await;
                let followers = lead_guard.finish();
                let answer = self.keep(key, ttl, &result);
                if let Some(answer) = answer {
                    for follower in followers {
                        let _ = follower.send(Arc::clone(&answer));
                    }
                }
                result
            }
        }
    }

    /// A read identical to one that leads: it waits in its own queue and
    /// takes the lead's answer if that comes first; when its own turn comes
    /// it steps aside if the lead is at Marketo, and goes itself if not.
    async fn follow<S>(
        &self,
        inner: S,
        call: Call,
        key: Arc<ReadKey>,
        ttl: Option<Duration>,
        lead: Arc<Lead>,
        mut answer: oneshot::Receiver<Arc<SharedAnswer>>,
    ) -> Result<Admitted, ProxyError>
    where
        S: Service<Call, Response = Admitted, Error = ProxyError> + Clone,
    {
        let service = call.caller.id.index();
        let mut own = call.clone();
        own.sharing = Some(Sharing::Follows(Arc::clone(&lead)));
        let own = inner.clone().oneshot(own);
        let mut own = std::pin::pin!(own);
        let own_first = tokio::select! {
            shared = &mut answer => match shared {
                Ok(shared) => return Ok(self.shared_with(service, &shared)),
                // The lead got nothing to share: its own call goes on alone.
                Err(_) => None,
            },
            result = &mut own => Some(result),
        };
        let (result, answer) = match own_first {
            Some(result) => (result, Some(answer)),
            None => (own.await, None),
        };
        if !matches!(result, Err(ProxyError::SteppedAside)) {
            self.keep(key, ttl, &result);
            return result;
        }
        if let Some(Ok(shared)) = match answer {
            Some(answer) => Some(answer.await),
            None => None,
        } {
            return Ok(self.shared_with(service, &shared));
        }
        // The lead got nothing to share after all: call as if alone.
        let result = inner.oneshot(call).await;
        self.keep(key, ttl, &result);
        result
    }

    /// An answer shared with a read of `service`, which spent nothing.
    fn shared_with(&self, service: usize, answer: &SharedAnswer) -> Admitted {
        self.admission.saved(service, Saved::Coalesced);
        shared(answer)
    }

    /// Leads the reads identical to `key`, or follows the one that does.
    fn join(&self, key: &Arc<ReadKey>) -> Role {
        let mut leading = self.lock();
        if let Some(leader) = leading.get_mut(key) {
            let (sender, receiver) = oneshot::channel();
            leader.followers.push(sender);
            return Role::Follow(Arc::clone(&leader.lead), receiver);
        }
        let lead = Arc::new(Lead::default());
        leading.insert(
            Arc::clone(key),
            Leader {
                lead: Arc::clone(&lead),
                followers: Vec::new(),
            },
        );
        Role::Lead(lead)
    }

    /// The shareable form of a call's answer, kept in the cache when its
    /// path is cached and it is a success.
    fn keep(
        &self,
        key: Arc<ReadKey>,
        ttl: Option<Duration>,
        result: &Result<Admitted, ProxyError>,
    ) -> Option<Arc<SharedAnswer>> {
        let answer = Arc::new(SharedAnswer::of(&result.as_ref().ok()?.answer)?);
        if let Some(ttl) = ttl.filter(|_| answer.is_whole_success()) {
            self.cache.insert(key, Arc::clone(&answer), ttl, Instant::now());
        }
        Some(answer)
    }

    /// The cache's size: entries and bytes.
    pub fn cache_size(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.bytes())
    }
}

/// A shared answer for one more request: no slot, nothing spent.
fn shared(answer: &SharedAnswer) -> Admitted {
    Admitted {
        answer: answer.answer(),
        slot: None,
    }
}

/// The lead of identical reads. Dropped before it finished (the request
/// went away), it lets the followers go: each calls on its own.
struct Leading<'a> {
    reads: &'a Reads,
    key: Option<Arc<ReadKey>>,
}

impl Leading<'_> {
    /// Ends the lead: later identical reads call again. Returns those
    /// waiting for this one's answer.
    fn finish(&mut self) -> Vec<Follower> {
        self.key
            .take()
            .and_then(|key| self.reads.lock().remove(&key))
            .map(|leader| leader.followers)
            .unwrap_or_default()
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        drop(self.finish());
    }
}

/// A `cache:` path pattern, split into segments; `*` in a segment stands
/// for any characters within it.
struct CachePath {
    segments: Vec<String>,
    ttl: Duration,
}

impl CachePath {
    fn new(rule: &CacheRule) -> Self {
        Self {
            segments: rule.path.split('/').map(str::to_owned).collect(),
            ttl: rule.ttl,
        }
    }

    fn matches(&self, path: &str) -> bool {
        let mut segments = path.split('/');
        self.segments
            .iter()
            .all(|pattern| segments.next().is_some_and(|segment| glob(pattern, segment)))
            && segments.next().is_none()
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any characters.
fn glob(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut text) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        match text.find(part) {
            Some(at) => text = &text[at + part.len()..],
            None => return false,
        }
    }
    text.len() >= last.len() && text.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::proxy::testing;
    use bytes::Bytes;
    use http::StatusCode;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A Marketo that answers each read with its query, after `delay`,
    /// and counts the calls it got; admitted at once, as the admission
    /// layer does it marks a lead at Marketo and steps a follower aside.
    #[derive(Clone)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        delay: Duration,
        code: Option<&'static str>,
    }

    impl Service<Call> for Counting {
        type Response = Admitted;
        type Error = ProxyError;
        type Future = BoxFuture<'static, Result<Admitted, ProxyError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, call: Call) -> Self::Future {
            let (calls, delay, code) = (Arc::clone(&self.calls), self.delay, self.code);
            match &call.sharing {
                Some(Sharing::Leads(lead)) => lead.reached_marketo(),
                Some(Sharing::Follows(lead)) if lead.is_at_marketo() => {
                    return Box::pin(std::future::ready(Err(ProxyError::SteppedAside)));
                }
                _ => {}
            }
            Box::pin(async move {
                let number = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                let mut answer = testing::answer(StatusCode::OK, code);
                if code.is_none() {
                    let query = call.target.query.unwrap_or_default();
                    let body = format!(
                        r#"{{"call":{number},"query":"{query}","padding":"{}"}}"#,
                        "x".repeat(1000)
                    );
                    answer.body = crate::upstream::AnswerBody::Whole(Bytes::from(body));
                }
                Ok(Admitted { answer, slot: None })
            })
        }
    }

    fn sharing(
        yaml: &str,
        delay: Duration,
        code: Option<&'static str>,
    ) -> (Coalesce<Counting>, Arc<AtomicUsize>, Arc<Reads>) {
        let config = Config::from_yaml_with_env(&format!("{}{yaml}", testing::CONFIG), |_| None).unwrap();
        let admission = Admission::new(&config, Metrics::new());
        let layer = CoalesceLayer::new(&config, vec![0, 1], admission);
        let calls = Arc::new(AtomicUsize::new(0));
        let reads = Arc::clone(layer.reads().unwrap());
        let service = layer.layer(Counting {
            calls: Arc::clone(&calls),
            delay,
            code,
        });
        (service, calls, reads)
    }

    fn read(service: usize, query: &str) -> Call {
        let mut call = testing::call(service, Duration::from_secs(30));
        call.target = crate::target::normalise("/rest/v1/leads/describe.json", Some(query)).unwrap();
        call
    }

    async fn body(service: &Coalesce<Counting>, call: Call) -> Bytes {
        match service.clone().oneshot(call).await.unwrap().answer.body {
            crate::upstream::AnswerBody::Whole(bytes) => bytes,
            crate::upstream::AnswerBody::Streaming { .. } => panic!("streamed"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_answer_is_served_until_its_ttl_and_not_after() {
        let yaml = "cache: [{ path: /rest/v1/leads/describe.json, ttl: 1h }]\n";
        let (service, calls, _) = sharing(yaml, Duration::ZERO, None);
        let first = body(&service, read(0, "a")).await;
        tokio::time::advance(Duration::from_secs(3600) - Duration::from_millis(1)).await;
        assert_eq!(body(&service, read(0, "a")).await, first);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_ne!(body(&service, read(0, "a")).await, first);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_not_cached() {
        let yaml = "cache: [{ path: /rest/v1/leads/*.json, ttl: 1h }]\n";
        let (service, calls, reads) = sharing(yaml, Duration::ZERO, Some("603"));
        for _ in 0..3 {
            service.clone().oneshot(read(0, "a")).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(reads.cache_size(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_and_other_users_never_share() {
        let (service, calls, _) = sharing("", Duration::from_millis(100), None);
        let mut write = read(0, "a");
        *write.request_mut().method_mut() = http::Method::POST;
        let other_user = read(1, "a");
        let other_body = {
            let mut call = read(0, "a");
            *call.request_mut().method_mut() = http::Method::POST;
            call.target.query = Some("a&_method=GET".into());
            call
        };
        let same_as_other_body = {
            let mut call = other_body.clone();
            *call.request_mut().body_mut() = Bytes::from_static(b"filterValues=1");
            call
        };
        let all = [
            read(0, "a"),
            read(0, "a"),
            write.clone(),
            write,
            other_user,
            other_body,
            same_as_other_body,
        ];
        let answers = futures_util::future::join_all(all.map(|call| service.clone().oneshot(call))).await;
        assert!(answers.iter().all(Result::is_ok));
        // One for both reads of user 0; the writes, user 1's read and the
        // two reads that differ by body each call.
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_stays_within_its_bound_under_ten_thousand_keys() {
        let yaml = "cache: [{ path: /rest/v1/leads/describe.json, ttl: 1h }]\ncache_max_bytes: 262144\n";
        let (service, calls, reads) = sharing(yaml, Duration::ZERO, None);
        let mut largest = 0;
        for index in 0..10_000 {
            body(&service, read(0, &format!("key={index}"))).await;
            largest = largest.max(reads.cache_size().1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10_000);
        assert!(largest <= 262_144, "{largest}");
        let (entries, _) = reads.cache_size();
        assert!((100..10_000).contains(&entries), "{entries}");
        // The most recent are kept.
        body(&service, read(0, "key=9999")).await;
        assert_eq!(calls.load(Ordering::SeqCst), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn followers_are_let_go_when_the_leader_goes_away() {
        let (service, calls, _) = sharing("", Duration::from_secs(1), None);
        let leader = tokio::spawn(service.clone().oneshot(read(0, "a")));
        tokio::task::yield_now().await;
        let follower = tokio::spawn(service.clone().oneshot(read(0, "a")));
        tokio::task::yield_now().await;
        leader.abort();
        let answer = follower.await.unwrap().unwrap();
        assert_eq!(answer.answer.head.status, StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the follower called on its own");
    }

    #[test]
    fn cache_paths_match_whole_segments() {
        let path = |pattern: &str| CachePath {
            segments: pattern.split('/').map(str::to_owned).collect(),
            ttl: Duration::ZERO,
        };
        assert!(path("/rest/v1/leads/describe.json").matches("/rest/v1/leads/describe.json"));
        assert!(!path("/rest/v1/leads/describe.json").matches("/rest/v1/leads/describe.json/x"));
        assert!(path("/rest/asset/v1/folder/*.json").matches("/rest/asset/v1/folder/12.json"));
        assert!(!path("/rest/asset/v1/folder/*.json").matches("/rest/asset/v1/folder/12/x.json"));
        assert!(path("/rest/v1/*/describe*.json").matches("/rest/v1/activities/describe2.json"));
        assert!(!path("/rest/v1/*.json").matches("/rest/v1/lead"));
        assert!(glob("a*b*c", "aXXbYYc") && !glob("a*b*c", "aXXcYYb") && glob("*", ""));
    }
}
