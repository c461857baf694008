//! The memory backend's store: the few kinds of value the scripts use
//! (strings, hashes, sorted sets), each key with an optional expiry, on
//! an injected clock in milliseconds. The operations mirror the Redis
//! commands of the same name, so that each script's Rust twin reads like
//! its Lua.

use std::collections::HashMap;

/// What one key holds.
#[derive(Debug, Clone)]
enum Value {
    Text(String),
    Hash(HashMap<String, String>),
    /// Members and their scores.
    Sorted(HashMap<String, f64>),
}

#[derive(Debug, Clone)]
struct Entry {
    value: Value,
    /// Milliseconds on the store's clock; `None`: no expiry.
    expires_at: Option<i64>,
}

/// Keys and their values; see the module documentation.
#[derive(Debug, Default)]
pub struct Store {
    entries: HashMap<String, Entry>,
    /// The clock of the operation under way, in milliseconds.
    now: i64,
}

impl Store {
    /// Starts an operation at `now` (the script's `TIME`): keys past their
    /// expiry are gone from here on.
    pub fn at(&mut self, now: i64) -> &mut Self {
        self.now = now;
        self.entries
            .retain(|_, entry| entry.expires_at.is_none_or(|at| at > now));
        self
    }

    pub fn now(&self) -> i64 {
        self.now
    }

    /// The value of `key`, made `empty` when missing or of another kind
    /// (the scripts never keep two kinds under one key).
    fn value_mut(&mut self, key: &str, empty: fn() -> Value) -> &mut Value {
        let entry = self.entries.entry(key.to_owned()).or_insert_with(|| Entry {
            value: empty(),
            expires_at: None,
        });
        if std::mem::discriminant(&entry.value) != std::mem::discriminant(&empty()) {
            entry.value = empty();
        }
        &mut entry.value
    }

    fn sorted(&mut self, key: &str) -> &mut HashMap<String, f64> {
        match self.value_mut(key, || Value::Sorted(HashMap::new())) {
            Value::Sorted(members) => members,
            _ => unreachable!("value_mut made a sorted set"),
        }
    }

    fn sorted_ref(&self, key: &str) -> Option<&HashMap<String, f64>> {
        match &self.entries.get(key)?.value {
            Value::Sorted(members) => Some(members),
            _ => None,
        }
    }

    fn hash(&mut self, key: &str) -> &mut HashMap<String, String> {
        match self.value_mut(key, || Value::Hash(HashMap::new())) {
            Value::Hash(fields) => fields,
            _ => unreachable!("value_mut made a hash"),
        }
    }

    fn hash_ref(&self, key: &str) -> Option<&HashMap<String, String>> {
        match &self.entries.get(key)?.value {
            Value::Hash(fields) => Some(fields),
            _ => None,
        }
    }

    /// An empty set or hash is no key at all, as in Redis.
    fn drop_if_empty(&mut self, key: &str) {
        let empty = match self.entries.get(key).map(|entry| &entry.value) {
            Some(Value::Sorted(members)) => members.is_empty(),
            Some(Value::Hash(fields)) => fields.is_empty(),
            _ => false,
        };
        if empty {
            self.entries.remove(key);
        }
    }

    pub fn zadd(&mut self, key: &str, score: f64, member: &str) {
        self.sorted(key).insert(member.to_owned(), score);
    }

    /// `ZADD key XX`: only a member already there moves.
    pub fn zadd_xx(&mut self, key: &str, score: f64, member: &str) {
        if let Some(current) = self.sorted(key).get_mut(member) {
            *current = score;
        }
        self.drop_if_empty(key);
    }

    /// `ZADD key NX`: only a member not there yet is added.
    pub fn zadd_nx(&mut self, key: &str, score: f64, member: &str) {
        self.sorted(key).entry(member.to_owned()).or_insert(score);
    }

    pub fn zrem(&mut self, key: &str, member: &str) -> u8 {
        let removed = self.sorted(key).remove(member).is_some();
        self.drop_if_empty(key);
        u8::from(removed)
    }

    pub fn zscore(&self, key: &str, member: &str) -> Option<f64> {
        self.sorted_ref(key)?.get(member).copied()
    }

    pub fn zcard(&self, key: &str) -> u64 {
        self.sorted_ref(key).map_or(0, |members| members.len() as u64)
    }

    /// `ZREMRANGEBYSCORE key -inf max`.
    pub fn zremrangebyscore(&mut self, key: &str, max: f64) {
        self.sorted(key).retain(|_, score| *score > max);
        self.drop_if_empty(key);
    }

    /// The lowest score (`ZRANGE key 0 0 WITHSCORES`).
    pub fn zfirst(&self, key: &str) -> Option<f64> {
        self.sorted_ref(key)?.values().copied().reduce(f64::min)
    }

    /// The scores, lowest first (of `ZRANGE key 0 -1 WITHSCORES`).
    pub fn zscores(&self, key: &str) -> Vec<f64> {
        let mut scores: Vec<f64> = self
            .sorted_ref(key)
            .map(|members| members.values().copied().collect())
            .unwrap_or_default();
        scores.sort_by(f64::total_cmp);
        scores
    }

    /// The members, lowest score first (`ZRANGE key 0 -1`).
    pub fn zmembers(&self, key: &str) -> Vec<String> {
        let Some(members) = self.sorted_ref(key) else {
            return Vec::new();
        };
        let mut members: Vec<(&String, f64)> =
            members.iter().map(|(member, score)| (member, *score)).collect();
        members.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
        members.into_iter().map(|(member, _)| member.clone()).collect()
    }

    pub fn hget(&self, key: &str, field: &str) -> Option<&str> {
        self.hash_ref(key)?.get(field).map(String::as_str)
    }

    /// A field read as a number, 0 when missing (`tonumber(HGET) or 0`).
    pub fn hget_number(&self, key: &str, field: &str) -> i64 {
        self.hget(key, field)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    }

    pub fn hset(&mut self, key: &str, field: &str, value: impl ToString) {
        self.hash(key).insert(field.to_owned(), value.to_string());
    }

    pub fn hincrby(&mut self, key: &str, field: &str, by: i64) -> i64 {
        let total = self.hget_number(key, field) + by;
        self.hset(key, field, total);
        total
    }

    pub fn hdel(&mut self, key: &str, field: &str) -> bool {
        let removed = self.hash(key).remove(field).is_some();
        self.drop_if_empty(key);
        removed
    }

    pub fn hexists(&self, key: &str, field: &str) -> bool {
        self.hget(key, field).is_some()
    }

    /// Every field and value, as `HGETALL` lists them.
    pub fn hgetall(&self, key: &str) -> Vec<(String, String)> {
        self.hash_ref(key).map_or_else(Vec::new, |fields| {
            fields
                .iter()
                .map(|(field, value)| (field.clone(), value.clone()))
                .collect()
        })
    }

    pub fn hvals(&self, key: &str) -> Vec<String> {
        self.hash_ref(key)
            .map_or_else(Vec::new, |fields| fields.values().cloned().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        match &self.entries.get(key)?.value {
            Value::Text(text) => Some(text),
            _ => None,
        }
    }

    /// `SET key value [PX ms]`.
    pub fn set(&mut self, key: &str, value: impl ToString, px: Option<i64>) {
        let expires_at = px.map(|ms| self.now + ms);
        self.entries.insert(
            key.to_owned(),
            Entry {
                value: Value::Text(value.to_string()),
                expires_at,
            },
        );
    }

    pub fn exists(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn del(&mut self, key: &str) {
        self.entries.remove(key);
    }

    pub fn pexpire(&mut self, key: &str, ms: i64) {
        let at = self.now + ms;
        if let Some(entry) = self.entries.get_mut(key) {
            entry.expires_at = Some(at);
        }
    }

    /// Milliseconds the key has left: -1 without expiry, -2 when missing.
    pub fn pttl(&self, key: &str) -> i64 {
        match self.entries.get(key) {
            None => -2,
            Some(Entry { expires_at: None, .. }) => -1,
            Some(Entry {
                expires_at: Some(at), ..
            }) => at - self.now,
        }
    }
}
