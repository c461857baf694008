//! The memory backend: every script's rule written in Rust over a
//! [`Store`], line for line with its `.lua` twin, so that the conformance
//! suite (`tests/backend_conformance.rs`) can hold the two to the same
//! assertions. Its clock, read as Redis's `TIME`, is the system's.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::limits::redis::scripts::{self, Acquired, Args, Verdict};
use crate::limits::rules::{QuotaScope, held_for_others, one_more_call};

/// One process's shared state, in memory.
#[derive(Default)]
pub struct Memory {
    store: Mutex<Store>,
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one operation at once, as Redis runs a script: alone.
    pub fn apply<A: InMemory>(&self, keys: &[&str], args: &A) -> A::Reply {
        let mut store = self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        args.apply(store.at(chrono::Utc::now().timestamp_millis()), keys)
    }
}

/// The Rust twin of a script: what it does to the store, and its reply.
pub trait InMemory: Args {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> Self::Reply;
}

fn key<'a>(keys: &[&'a str], index: usize) -> &'a str {
    keys.get(index).copied().unwrap_or_default()
}

/// Milliseconds from `now` until each slot of `window` frees, soonest
/// first.
fn window_frees(store: &Store, window: &str, now: i64) -> Vec<u64> {
    store
        .zscores(window)
        .into_iter()
        .map(|score| u64::try_from(score as i64 - now).unwrap_or(0))
        .collect()
}

/// A number of milliseconds as a score or a time.
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn hash_numbers(store: &Store, key: &str) -> HashMap<String, i64> {
    store
        .hgetall(key)
        .into_iter()
        .filter_map(|(field, value)| Some((field, value.parse().ok()?)))
        .collect()
}

fn flat(pairs: Vec<(String, String)>) -> Vec<String> {
    pairs
        .into_iter()
        .flat_map(|(field, value)| [field, value])
        .collect()
}

impl InMemory for scripts::Acquire<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> Acquired {
        let [
            window,
            inflight,
            service_window,
            service_inflight,
            day,
            done,
            epoch,
            settling,
            learned,
        ] = std::array::from_fn(|index| key(keys, index));
        let now = store.now();
        let score = now as f64;
        for key in [window, inflight, service_window, service_inflight, done] {
            store.zremrangebyscore(key, score);
        }
        let total = store.hget_number(day, "total");
        let foreign = store.hget_number(day, "foreign");
        let reply = |store: &Store, verdict, wait_ms: i64, total: i64| Acquired {
            verdict,
            wait_ms: u64::try_from(wait_ms).unwrap_or(0),
            window: u32::try_from(store.zcard(window)).unwrap_or(u32::MAX),
            in_flight: u32::try_from(store.zcard(inflight)).unwrap_or(u32::MAX),
            day_used: u64::try_from(total + foreign).unwrap_or(0),
            redis_now: now,
            learned_version: store.hget_number(learned, "version"),
            window_frees_ms: window_frees(store, window, now),
        };
        let wait = |store: &Store, key: &str| {
            store
                .zfirst(key)
                .map_or(1000, |first| (first as i64 - now).max(1))
        };
        if store.zscore(done, self.id).is_some() {
            return reply(store, Verdict::Released, 0, total);
        }
        if store.get(epoch) != Some(self.epoch) {
            return reply(store, Verdict::Lost, 0, total);
        }
        let settle = store.pttl(settling);
        if settle > 0 {
            return reply(store, Verdict::Settling, settle, total);
        }
        if store.zcard(inflight) >= u64::from(self.concurrency) {
            return reply(store, Verdict::Concurrency, 25, total);
        }
        if store.zcard(service_inflight) >= u64::from(self.service_concurrency) {
            return reply(store, Verdict::ServiceConcurrency, 25, total);
        }
        if store.zcard(window) >= u64::from(self.window_calls) {
            return reply(store, Verdict::Window, wait(store, window), total);
        }
        if self.service_window_calls > 0
            && store.zcard(service_window) >= u64::from(self.service_window_calls)
        {
            return reply(store, Verdict::ServiceWindow, wait(store, service_window), total);
        }
        let spent = store.hget_number(day, "spent");
        if spent > 0 && now < spent {
            return reply(store, Verdict::Spent, spent - now, total);
        }
        let count = |value: i64| u64::try_from(value).unwrap_or(0);
        let remaining = count(ms(self.daily_quota) - total - foreign);
        let held = held_for_others(
            self.reserves
                .iter()
                .map(|(field, reserved)| (*reserved, count(store.hget_number(day, field)))),
        );
        let used = count(store.hget_number(day, self.field));
        match one_more_call(remaining, used, self.cap, held) {
            Ok(()) => {}
            Err(QuotaScope::Instance) => return reply(store, Verdict::Quota, 0, total),
            Err(QuotaScope::ServiceCap) => return reply(store, Verdict::ServiceCap, 0, total),
            Err(QuotaScope::Reserved) => return reply(store, Verdict::Reserved, 0, total),
        }
        // After Marketo's 607 this call is the probe: the others wait for it.
        if spent > 0 {
            store.hset(day, "spent", now + ms(self.probe_after_ms));
        }
        let pending = (now + ms(self.pending_ms)) as f64;
        let lease = (now + ms(self.lease_ms)) as f64;
        store.zadd(window, pending, self.id);
        store.zadd(inflight, lease, self.id);
        if self.service_window_calls > 0 {
            store.zadd(service_window, pending, self.id);
        }
        store.zadd(service_inflight, lease, self.id);
        store.hincrby(day, "total", 1);
        store.hincrby(day, self.field, 1);
        store.pexpire(day, ms(self.day_ttl_s) * 1000);
        for key in [window, inflight, service_window, service_inflight] {
            store.pexpire(key, ms(self.pending_ms) + 60_000);
        }
        let verdict = if spent > 0 {
            Verdict::Probe
        } else {
            Verdict::Granted
        };
        reply(store, verdict, 0, total + 1)
    }
}

impl InMemory for scripts::Learn {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> HashMap<String, i64> {
        let (learned, day) = (key(keys, 0), key(keys, 1));
        store.hincrby(day, "refused", 1);
        store.pexpire(day, ms(self.day_ttl_s) * 1000);
        let mut changed = false;
        for (kind, episode) in [("window", self.window), ("concurrency", self.concurrency)] {
            let stored = store.hget_number(learned, &format!("{kind}_at"));
            let stored_floor = store.hget_number(learned, &format!("{kind}_floor"));
            let (at, floor) = (episode.at_ms, i64::from(episode.floor));
            if at > stored || (at == stored && at > 0 && floor < stored_floor) {
                store.hset(learned, &format!("{kind}_floor"), floor);
                store.hset(learned, &format!("{kind}_at"), at);
                store.hset(learned, &format!("{kind}_hold"), episode.hold_ms);
                changed = true;
            }
        }
        if changed {
            store.hincrby(learned, "version", 1);
        }
        store.pexpire(learned, ms(self.learned_ttl_ms));
        hash_numbers(store, learned)
    }
}

impl InMemory for scripts::Learned {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> HashMap<String, i64> {
        hash_numbers(store, key(keys, 0))
    }
}

impl InMemory for scripts::Undo<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let [window, inflight, service_window, service_inflight, day, done] =
            std::array::from_fn(|index| key(keys, index));
        let now = store.now();
        store.zadd(done, (now + ms(self.tombstone_ms)) as f64, self.id);
        store.pexpire(done, ms(self.tombstone_ms) + 60_000);
        let took: u8 = [window, inflight, service_window, service_inflight]
            .into_iter()
            .map(|key| store.zrem(key, self.id))
            .sum();
        if took > 0 {
            store.hincrby(day, "total", -1);
            store.hincrby(day, self.field, -1);
        }
        took
    }
}

impl InMemory for scripts::Uncount<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let day = key(keys, 0);
        let took: u8 = keys[1..].iter().map(|window| store.zrem(window, self.id)).sum();
        if took > 0 && store.exists(day) {
            store.hincrby(day, "total", -1);
            store.hincrby(day, self.field, -1);
        }
        took
    }
}

impl InMemory for scripts::Release<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let (inflight, service_inflight, done) = (key(keys, 0), key(keys, 1), key(keys, 2));
        let now = store.now();
        store.zadd(done, (now + ms(self.tombstone_ms)) as f64, self.id);
        store.pexpire(done, ms(self.tombstone_ms) + 60_000);
        store.zrem(inflight, self.id);
        store.zrem(service_inflight, self.id);
        1
    }
}

impl InMemory for scripts::Renew<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let (inflight, service_inflight, done) = (key(keys, 0), key(keys, 1), key(keys, 2));
        if store.zscore(done, self.id).is_some() {
            return 0;
        }
        let lease = (store.now() + ms(self.lease_ms)) as f64;
        for key in [inflight, service_inflight] {
            store.zadd(key, lease, self.id);
            store.pexpire(key, ms(self.lease_ms) + 60_000);
        }
        1
    }
}

impl InMemory for scripts::Rescore<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> Vec<u64> {
        let now = store.now();
        let frees = (now + ms(self.free_in_ms)) as f64;
        for key in keys {
            store.zadd_xx(key, frees, self.id);
        }
        window_frees(store, key(keys, 0), now)
    }
}

impl InMemory for scripts::CatchUp<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let [window, inflight, batches, done] = std::array::from_fn(|index| key(keys, index));
        let days = keys.get(4..).unwrap_or_default();
        let now = store.now();
        for (id, left) in &self.slots {
            store.zadd(window, (now + ms(*left)) as f64, id);
        }
        for id in &self.live {
            store.zadd_nx(window, (now + ms(self.pending_ms)) as f64, id);
            if store.zscore(done, id).is_none() {
                store.zadd(inflight, (now + ms(self.lease_ms)) as f64, id);
            }
        }
        store.zremrangebyscore(batches, now as f64);
        let keep = ms(self.day_ttl_s) * 1000;
        for batch in &self.batches {
            if store.zscore(batches, batch.id).is_none() {
                let day = key(days, batch.day);
                for (field, calls) in &batch.calls {
                    store.hincrby(day, field, ms(*calls));
                    store.hincrby(day, "total", ms(*calls));
                }
                store.zadd(batches, (now + keep) as f64, batch.id);
            }
        }
        for day in days {
            store.pexpire(day, keep);
        }
        store.pexpire(batches, keep);
        store.pexpire(window, ms(self.pending_ms) + 60_000);
        store.pexpire(inflight, ms(self.lease_ms) + 60_000);
        1
    }
}

impl InMemory for scripts::MarkSpent {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let day = key(keys, 0);
        let until = store.now() + ms(self.probe_after_ms);
        store.hset(day, "spent", until);
        store.pexpire(day, ms(self.day_ttl_s) * 1000);
        1
    }
}

impl InMemory for scripts::ClearSpent {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        store.hdel(key(keys, 0), "spent");
        1
    }
}

impl InMemory for scripts::Reconcile {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> (u64, u64) {
        let day = key(keys, 0);
        let total = store.hget_number(day, "total");
        let foreign = (ms(self.marketo_total) - total).max(0);
        let mut known = store.hget_number(day, "foreign");
        if foreign > known {
            store.hset(day, "foreign", foreign);
            known = foreign;
        }
        store.pexpire(day, ms(self.day_ttl_s) * 1000);
        let refused = store.hget_number(day, "refused");
        (
            u64::try_from(known).unwrap_or(0),
            u64::try_from(refused).unwrap_or(0),
        )
    }
}

impl InMemory for scripts::Lead<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let lock = key(keys, 0);
        if store.get(lock).is_some_and(|holder| holder != self.replica) {
            return 0;
        }
        store.set(lock, self.replica, Some(ms(self.hold_ms)));
        1
    }
}

impl InMemory for scripts::Epoch<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> (String, i64) {
        let (epoch, settling, learned) = (key(keys, 0), key(keys, 1), key(keys, 2));
        let version = store.hget_number(learned, "version");
        if let Some(mark) = store.get(epoch) {
            return (mark.to_owned(), version);
        }
        store.set(epoch, self.new_mark, None);
        store.set(settling, "1", Some(ms(self.settle_ms)));
        (self.new_mark.to_owned(), version)
    }
}

impl InMemory for scripts::Hold {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let settling = key(keys, 0);
        if !store.exists(settling) {
            store.set(settling, "1", Some(ms(self.hold_ms)));
        }
        1
    }
}

impl InMemory for scripts::Publish<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        store.set(key(keys, 0), self.text, Some(ms(self.keep_ms)));
        1
    }
}

impl InMemory for scripts::Published {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> Option<String> {
        store.get(key(keys, 0)).map(str::to_owned)
    }
}

impl InMemory for scripts::BulkAdmit<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let [queue, reserved, paused, released, waiting] = std::array::from_fn(|index| key(keys, index));
        let now = store.now();
        for key in [reserved, released, waiting] {
            store.zremrangebyscore(key, now as f64);
        }
        if !self.service.is_empty() && self.waits_ms > 0 {
            store.zadd(waiting, (now + ms(self.waits_ms)) as f64, self.service);
            store.pexpire(waiting, ms(self.waits_ms) + 60_000);
        }
        if store.zscore(released, self.id).is_some() || store.exists(paused) {
            return 0;
        }
        let owners = store.hvals(queue);
        if owners.len() as u64 + store.zcard(reserved) >= self.limit as u64 {
            return 0;
        }
        let owned = |name: &str| owners.iter().filter(|owner| *owner == name).count();
        let mine = owned(self.service);
        if store
            .zmembers(waiting)
            .iter()
            .any(|other| other != self.service && owned(other) < mine)
        {
            return 0;
        }
        store.zadd(reserved, (now + ms(self.hold_ms)) as f64, self.id);
        store.pexpire(reserved, ms(self.hold_ms) + 60_000);
        1
    }
}

impl InMemory for scripts::BulkPlaces<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let (reserved, released) = (key(keys, 0), key(keys, 1));
        let now = store.now();
        for id in self.hold {
            if store.zscore(released, id).is_none() {
                store.zadd(reserved, (now + ms(self.hold_ms)) as f64, id);
            }
        }
        for id in self.release {
            store.zadd(released, (now + ms(self.tombstone_ms)) as f64, id);
            store.zrem(reserved, id);
        }
        store.pexpire(reserved, ms(self.hold_ms) + 60_000);
        store.pexpire(released, ms(self.tombstone_ms) + 60_000);
        1
    }
}

/// A bulk job as the memory backend keeps it: the fields of the Lua
/// script's JSON, by the same one-letter names.
#[derive(Debug, Serialize, Deserialize)]
struct StoredJob {
    k: String,
    q: String,
    b: String,
    s: String,
    o: String,
    c: u8,
    n: u8,
    h: i64,
    d: Option<String>,
}

fn rank(state: &str) -> u8 {
    match state {
        "created" => 1,
        "queued" => 2,
        "processing" => 3,
        "completed" => 4,
        "failed" => 5,
        "cancelled" => 6,
        _ => 0,
    }
}

fn active(state: &str) -> bool {
    state == "queued" || state == "processing"
}

impl InMemory for scripts::BulkObserve<'_> {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> Vec<String> {
        let [
            jobs,
            extract_queue,
            import_queue,
            day,
            extract_paused,
            import_paused,
        ] = std::array::from_fn(|index| key(keys, index));
        let now = store.now();
        let mut changed = Vec::new();
        let mut add = |store: &mut Store, field: String, amount: i64| {
            let total = store.hincrby(day, &field, amount);
            changed.push(field);
            changed.push(total.to_string());
        };
        for seen in &self.jobs {
            let stored = store
                .hget(jobs, seen.id)
                .and_then(|raw| serde_json::from_str::<StoredJob>(raw).ok());
            let mut job = stored.unwrap_or_else(|| StoredJob {
                k: seen.kind.to_owned(),
                q: seen.queue.to_owned(),
                b: seen.base.to_owned(),
                s: "created".to_owned(),
                o: seen.owner.to_owned(),
                c: 0,
                n: 0,
                h: now,
                d: None,
            });
            let was = job.s.clone();
            if rank(seen.state) >= rank(&was) {
                job.s = seen.state.to_owned();
            }
            job.h = now;
            if seen.started && !active(&was) && job.n == 0 {
                job.n = 1;
                let who = if job.o.is_empty() {
                    seen.owner
                } else {
                    job.o.as_str()
                };
                if !who.is_empty() {
                    add(store, format!("jobs:{who}"), 1);
                }
            }
            if let (Some(size), true) = (
                seen.file_size,
                job.s == "completed" && job.q == "extract" && job.c == 0,
            ) {
                job.c = 1;
                add(store, "bytes".to_owned(), ms(size));
                if !job.o.is_empty() {
                    add(store, format!("bytes:{}", job.o), ms(size));
                }
            }
            if rank(&job.s) >= 4 && job.d.is_none() {
                job.d = Some(self.today.clone());
            }
            let (queue, pause) = if job.q == "import" {
                (import_queue, import_paused)
            } else {
                (extract_queue, extract_paused)
            };
            if active(&job.s) {
                store.hset(queue, seen.id, &job.o);
            } else if store.hdel(queue, seen.id) {
                store.del(pause);
            }
            store.hset(jobs, seen.id, serde_json::to_string(&job).unwrap_or_default());
        }
        for key in [jobs, extract_queue, import_queue, day] {
            store.pexpire(key, ms(self.keep_ms));
        }
        changed
    }
}

impl InMemory for scripts::BulkSnapshot {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> (Vec<String>, Vec<String>, usize, usize) {
        let [jobs, day, extract_reserved, import_reserved] = std::array::from_fn(|index| key(keys, index));
        let now = store.now();
        let mut listed = Vec::new();
        for (id, raw) in store.hgetall(jobs) {
            let Ok(job) = serde_json::from_str::<StoredJob>(&raw) else {
                continue;
            };
            let stale = job.s == "created" && now - job.h > ms(self.stale_created_ms);
            if stale || job.d.as_ref().is_some_and(|ended| *ended < self.today) {
                store.hdel(jobs, &id);
            } else {
                let quiet = (now - job.h).to_string();
                listed.extend([
                    id,
                    job.k,
                    job.b,
                    job.s,
                    job.o,
                    job.c.to_string(),
                    job.n.to_string(),
                    quiet,
                ]);
            }
        }
        store.zremrangebyscore(extract_reserved, now as f64);
        store.zremrangebyscore(import_reserved, now as f64);
        let extract = usize::try_from(store.zcard(extract_reserved)).unwrap_or(usize::MAX);
        let import = usize::try_from(store.zcard(import_reserved)).unwrap_or(usize::MAX);
        (listed, flat(store.hgetall(day)), extract, import)
    }
}

impl InMemory for scripts::BulkExportDay {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> (u64, u8) {
        let day = key(keys, 0);
        let bytes = u64::try_from(store.hget_number(day, "bytes")).unwrap_or(0);
        (bytes, u8::from(store.hexists(day, "spent")))
    }
}

impl InMemory for scripts::BulkSpent {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        let day = key(keys, 0);
        store.hset(day, "spent", 1);
        store.pexpire(day, ms(self.keep_ms));
        1
    }
}

impl InMemory for scripts::BulkPause {
    fn apply(&self, store: &mut Store, keys: &[&str]) -> u8 {
        store.set(key(keys, 0), 1, Some(ms(self.pause_ms)));
        1
    }
}
