//! The Lua scripts, each called through one typed argument struct whose
//! reply type is decoded once.
//!
//! An argument struct names every value its script reads (`a.window_calls`
//! in Lua is `window_calls` here) and is sent as JSON in `ARGV[1]`; the keys
//! go in the order the script's first lines name them.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{FromRedisValue, RedisResult, Value};
use serde::Serialize;

/// One script and its name, for logs and metrics.
pub struct Script {
    pub name: &'static str,
    script: redis::Script,
}

impl Script {
    fn new(name: &'static str, code: &str) -> Self {
        Self {
            name,
            script: redis::Script::new(code),
        }
    }

    /// The invocation of this script on `keys` with `args`.
    pub fn invocation(&self, keys: &[&str], args: &impl Serialize) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        // Plain structs of numbers and strings always serialize; were one
        // not to, the script's decoding fails and counts as a bug.
        invocation.arg(serde_json::to_string(args).unwrap_or_default());
        invocation
    }
}

/// The arguments of one script: which script, and what it answers.
pub trait Args: Serialize {
    /// What the script answers, decoded once.
    type Reply: FromRedisValue;
    /// The script these arguments are for.
    fn script() -> &'static Script;
}

macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            static $name: LazyLock<Script> =
                LazyLock::new(|| Script::new($file, include_str!(concat!("scripts/", $file, ".lua"))));
        )*

        /// Every script's name: the `script` label of its errors.
        pub const NAMES: &[&str] = &[$($file),*];
    };
}

scripts! {
    ACQUIRE => "acquire",
    LEARN => "learn",
    UNDO => "undo",
    UNCOUNT => "uncount",
    RELEASE => "release",
    RENEW => "renew",
    RESCORE => "rescore",
    CATCH_UP => "catch_up",
    MARK_SPENT => "mark_spent",
    RECONCILE => "reconcile",
    LEAD => "lead",
    EPOCH => "epoch",
    BULK_ADMIT => "bulk_admit",
    BULK_PLACES => "bulk_places",
    BULK_OBSERVE => "bulk_observe",
    BULK_SNAPSHOT => "bulk_snapshot",
    BULK_EXPORT_DAY => "bulk_export_day",
    BULK_SPENT => "bulk_spent",
    BULK_PAUSE => "bulk_pause",
    LEARNED => "learned",
    CLEAR_SPENT => "clear_spent",
    HOLD => "hold",
    PUBLISH => "publish",
    PUBLISHED => "published",
}

macro_rules! args {
    ($args:ident $(<$life:lifetime>)? => $script:ident, $reply:ty) => {
        impl $(<$life>)? Args for $args $(<$life>)? {
            type Reply = $reply;
            fn script() -> &'static Script {
                &$script
            }
        }
    };
}

/// Milliseconds, as the scripts count them.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A call's window slot, concurrency lease and unit of the day's quota.
/// Keys: window, inflight, service window, service inflight, day, done,
/// epoch, settling, learned.
#[derive(Debug, Serialize)]
pub struct Acquire<'a> {
    /// The acquisition's id, chosen by the replica.
    pub id: &'a str,
    /// The instance's window and concurrency, as far as others leave them.
    pub window_calls: u32,
    pub concurrency: u32,
    /// How long a window slot is held before its answer re-scores it.
    pub pending_ms: u64,
    pub lease_ms: u64,
    /// The service's caps (window: 0 for none).
    pub service_window_calls: u32,
    pub service_concurrency: u32,
    pub daily_quota: u64,
    /// The service's field in the day hash, and its daily cap.
    pub field: &'a str,
    pub cap: u64,
    pub day_ttl_s: u64,
    /// After Marketo's 607, how long the probe holds the others back.
    pub probe_after_ms: u64,
    /// The mark of Redis's data as the replica last saw it ("" for none).
    pub epoch: &'a str,
    /// Other services' day fields and their reserves.
    pub reserves: Vec<(&'a str, u64)>,
}
args!(Acquire<'a> => ACQUIRE, Acquired);

/// What the acquire script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    /// Granted, and the call probes whether Marketo's day is spent.
    Probe,
    /// The asker gave it up already.
    Released,
    /// Redis lost the data the replica wrote.
    Lost,
    /// Redis lost its data just now; the replicas are writing theirs.
    Settling,
    Concurrency,
    ServiceConcurrency,
    Window,
    ServiceWindow,
    /// Marketo said 607; the probe time has not come.
    Spent,
    Quota,
    ServiceCap,
    Reserved,
}

/// The acquire script's reply.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub verdict: Verdict,
    /// How long the limit in the way holds, in ms.
    pub wait_ms: u64,
    /// The whole instance's use as the script saw it.
    pub window: u32,
    pub in_flight: u32,
    pub day_used: u64,
    /// Redis's clock, in ms.
    pub redis_now: i64,
    /// The version of the learned limits.
    pub learned_version: i64,
    /// Milliseconds until each window slot frees, soonest first (a call
    /// still in flight: its pending hold).
    pub window_frees_ms: Vec<u64>,
}

impl FromRedisValue for Acquired {
    fn from_redis_value(value: &Value) -> RedisResult<Self> {
        let (
            granted,
            verdict,
            wait_ms,
            window,
            in_flight,
            day_used,
            redis_now,
            learned_version,
            window_frees_ms,
        ): (u8, String, u64, u32, u32, u64, i64, i64, Vec<u64>) = FromRedisValue::from_redis_value(value)?;
        let verdict = match (granted, verdict.as_str()) {
            (1, "granted") => Verdict::Granted,
            (1, "probe") => Verdict::Probe,
            (0, "released") => Verdict::Released,
            (0, "lost") => Verdict::Lost,
            (0, "settling") => Verdict::Settling,
            (0, "concurrency") => Verdict::Concurrency,
            (0, "service_concurrency") => Verdict::ServiceConcurrency,
            (0, "window") => Verdict::Window,
            (0, "service_window") => Verdict::ServiceWindow,
            (0, "spent") => Verdict::Spent,
            (0, "quota") => Verdict::Quota,
            (0, "service_cap") => Verdict::ServiceCap,
            (0, "reserved") => Verdict::Reserved,
            _ => {
                return Err((
                    redis::ErrorKind::TypeError,
                    "the acquire script answered a verdict it does not have",
                    verdict,
                )
                    .into());
            }
        };
        Ok(Self {
            verdict,
            wait_ms,
            window,
            in_flight,
            day_used,
            redis_now,
            learned_version,
            window_frees_ms,
        })
    }
}

/// One learned limit's latest lowering, by Redis's clock (all 0: none).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LearnedEpisode {
    pub floor: u32,
    pub at_ms: i64,
    pub hold_ms: u64,
}

/// Counts a refusal of Marketo's and shares what it taught. Keys: learned,
/// day. Answers the learned hash.
#[derive(Debug, Serialize)]
pub struct Learn {
    pub window: LearnedEpisode,
    pub concurrency: LearnedEpisode,
    pub learned_ttl_ms: u64,
    pub day_ttl_s: u64,
}
args!(Learn => LEARN, std::collections::HashMap<String, i64>);

/// The learned limits as [`Learn`] keeps them. Keys: learned.
#[derive(Debug, Serialize)]
pub struct Learned {}
args!(Learned => LEARNED, std::collections::HashMap<String, i64>);

/// Gives back what an unanswered acquisition took. Keys: those of
/// [`Acquire`], the first six. Answers how many sets held it.
#[derive(Debug, Serialize)]
pub struct Undo<'a> {
    pub id: &'a str,
    pub field: &'a str,
    pub tombstone_ms: u64,
}
args!(Undo<'a> => UNDO, u8);

/// Marketo did not count a call (see [`marketo::is_uncounted`]): its
/// window slots and its unit of the day go back, its lease stays. Keys:
/// day, window, and the service's window when it has one. Answers how many
/// windows held it.
///
/// [`marketo::is_uncounted`]: crate::marketo::is_uncounted
#[derive(Debug, Serialize)]
pub struct Uncount<'a> {
    pub id: &'a str,
    pub field: &'a str,
}
args!(Uncount<'a> => UNCOUNT, u8);

/// A call is over: its leases go. Keys: inflight, service inflight, done.
#[derive(Debug, Serialize)]
pub struct Release<'a> {
    pub id: &'a str,
    pub tombstone_ms: u64,
}
args!(Release<'a> => RELEASE, u8);

/// Renews a call's leases. Keys: inflight, service inflight, done.
/// Answers 0 when the call is over.
#[derive(Debug, Serialize)]
pub struct Renew<'a> {
    pub id: &'a str,
    pub lease_ms: u64,
}
args!(Renew<'a> => RENEW, u8);

/// A call was answered: its window slots free `free_in_ms` from now. Keys:
/// window, and the service's window when it has one.
#[derive(Debug, Serialize)]
pub struct Rescore<'a> {
    pub id: &'a str,
    pub free_in_ms: u64,
}
args!(Rescore<'a> => RESCORE, Vec<u64>);

/// One batch of calls counted while Redis was unreachable: its id, the
/// day they count to (an index into the catch-up's day keys), then (day
/// field, calls) per service.
#[derive(Debug, Serialize)]
pub struct Batch<'a> {
    pub id: &'a str,
    pub day: usize,
    pub calls: Vec<(&'a str, u64)>,
}

/// Writes what a replica did while Redis was unreachable. Keys: window,
/// inflight, applied batches, done, then the key of each day its batches
/// count to.
#[derive(Debug, Serialize)]
pub struct CatchUp<'a> {
    pub pending_ms: u64,
    pub lease_ms: u64,
    pub day_ttl_s: u64,
    /// Answered calls whose slots still run: (id, ms left).
    pub slots: Vec<(&'a str, u64)>,
    /// Calls still in flight, by id.
    pub live: Vec<&'a str>,
    pub batches: Vec<Batch<'a>>,
}
args!(CatchUp<'a> => CATCH_UP, u8);

/// Marketo said 607. Keys: day.
#[derive(Debug, Serialize)]
pub struct MarkSpent {
    pub probe_after_ms: u64,
    pub day_ttl_s: u64,
}
args!(MarkSpent => MARK_SPENT, u8);

/// A call went through after Marketo's 607: the day is not spent. Keys:
/// day.
#[derive(Debug, Serialize)]
pub struct ClearSpent {}
args!(ClearSpent => CLEAR_SPENT, u8);

/// Nothing is granted for `hold_ms`, unless a hold is on already. Keys:
/// settling.
#[derive(Debug, Serialize)]
pub struct Hold {
    pub hold_ms: u64,
}
args!(Hold => HOLD, u8);

/// Keeps `text` for `keep_ms`. Keys: the text's.
#[derive(Debug, Serialize)]
pub struct Publish<'a> {
    pub text: &'a str,
    pub keep_ms: u64,
}
args!(Publish<'a> => PUBLISH, u8);

/// The text last published, if it is still kept. Keys: the text's.
#[derive(Debug, Serialize)]
pub struct Published {}
args!(Published => PUBLISHED, Option<String>);

/// Marketo's count of today's calls. Keys: day. Answers (calls from
/// outside, the replicas' calls Marketo refused).
#[derive(Debug, Serialize)]
pub struct Reconcile {
    pub marketo_total: u64,
    pub day_ttl_s: u64,
}
args!(Reconcile => RECONCILE, (u64, u64));

/// The usage reader's lock. Keys: lock. Answers 1 when held.
#[derive(Debug, Serialize)]
pub struct Lead<'a> {
    pub replica: &'a str,
    pub hold_ms: u64,
}
args!(Lead<'a> => LEAD, u8);

/// The mark of Redis's data. Keys: epoch, settling, learned. Answers (the
/// mark, the learned limits' version).
#[derive(Debug, Serialize)]
pub struct Epoch<'a> {
    /// Made the mark if there is none.
    pub new_mark: &'a str,
    pub settle_ms: u64,
}
args!(Epoch<'a> => EPOCH, (String, i64));

/// A place in a bulk queue. Keys: queue, reserved, paused, released,
/// waiting. Answers 1 when taken.
#[derive(Debug, Serialize)]
pub struct BulkAdmit<'a> {
    pub id: &'a str,
    pub limit: usize,
    pub hold_ms: u64,
    /// The service's name ("" for none).
    pub service: &'a str,
    /// How long the service counts as waiting (0: it does not wait).
    pub waits_ms: u64,
}
args!(BulkAdmit<'a> => BULK_ADMIT, u8);

/// Places held and given back. Keys: reserved, released.
#[derive(Debug, Serialize)]
pub struct BulkPlaces<'a> {
    pub hold_ms: u64,
    pub tombstone_ms: u64,
    pub hold: &'a [String],
    pub release: &'a [String],
}
args!(BulkPlaces<'a> => BULK_PLACES, u8);

/// What one answer said of one job.
#[derive(Debug, Serialize)]
pub struct SeenJob<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub queue: &'a str,
    pub base: &'a str,
    pub state: &'a str,
    /// Its owner's name ("" for none).
    pub owner: &'a str,
    pub started: bool,
    pub file_size: Option<u64>,
}

/// Writes what replicas saw of jobs. Keys: jobs, extract queue, import
/// queue, day, extract pause, import pause. Answers the day's fields it
/// changed, with their new totals, as pairs.
#[derive(Debug, Serialize)]
pub struct BulkObserve<'a> {
    pub today: String,
    pub keep_ms: u64,
    pub jobs: Vec<SeenJob<'a>>,
}
args!(BulkObserve<'a> => BULK_OBSERVE, Vec<String>);

/// Every job, the day's counts and the places taken. Keys: jobs, day,
/// extract reserved, import reserved.
#[derive(Debug, Serialize)]
pub struct BulkSnapshot {
    pub today: String,
    pub stale_created_ms: u64,
}
args!(BulkSnapshot => BULK_SNAPSHOT, (Vec<String>, Vec<String>, usize, usize));

/// The day's export bytes and whether they are spent. Keys: day.
#[derive(Debug, Serialize)]
pub struct BulkExportDay {}
args!(BulkExportDay => BULK_EXPORT_DAY, (u64, u8));

/// The day's export bytes are spent. Keys: day.
#[derive(Debug, Serialize)]
pub struct BulkSpent {
    pub keep_ms: u64,
}
args!(BulkSpent => BULK_SPENT, u8);

/// A bulk queue is full. Keys: paused.
#[derive(Debug, Serialize)]
pub struct BulkPause {
    pub pause_ms: u64,
}
args!(BulkPause => BULK_PAUSE, u8);
