//! The usage ledger: today's per-service counts, saved to `state.file` so
//! that a restart does not forget how much of the day's quota is spent,
//! and when the window slots its calls still hold free, so that the next
//! run does not send into a window they filled.
//!
//! The file is small JSON, written to a temporary file beside it and
//! renamed over it, so a crash mid-write leaves the previous version. It
//! is written at most every [`SAVE_INTERVAL`] when something changed, and
//! once more on shutdown. Counts saved on another day are ignored: the
//! quota has been reset since.
//!
//! The temporary file has a name no other writer uses (the process id and
//! a count) and is created only where nothing is, readable by its owner
//! alone and never through a symbolic link, so whoever can write to the
//! ledger's directory cannot make the proxy write somewhere else. What a
//! save interrupted by a crash left behind is removed at start. A file
//! that is not a ledger is kept under a name with the time it was found,
//! never overwritten.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::future::Future;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::admission::Admission;
use crate::bulk::{BulkJobs, ServiceDay};

/// How often the ledger is written while calls are being made.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a usage ledger; kept as {}", path.display(), kept_as.display())]
    Corrupt { path: PathBuf, kept_as: PathBuf },
    #[error("{} is not a usage ledger and cannot be moved aside; the next save replaces it", path.display())]
    CannotSetAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    /// The quota's day (local date in the configured zone).
    day: NaiveDate,
    /// Calls per service name.
    services: BTreeMap<String, u64>,
    /// Calls Marketo counted that did not go through the proxy.
    #[serde(default)]
    foreign: u64,
    /// When each slot of the instance's window taken by the proxy's calls
    /// frees.
    #[serde(default)]
    window: Vec<DateTime<Utc>>,
    /// Bulk jobs and export bytes today.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bulk: Option<SavedBulk>,
}

/// Today's bulk usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedBulk {
    /// Export bytes of every completed export seen, whoever started it.
    export_bytes: u64,
    /// Per service name.
    services: BTreeMap<String, ServiceDay>,
}

impl Saved {
    /// The same calls counted: the window only changes with them.
    fn same_counts(&self, other: &Self) -> bool {
        (self.day, &self.services, self.foreign, &self.bulk)
            == (other.day, &other.services, other.foreign, &other.bulk)
    }
}

/// Reads and writes one ledger file for one admission state.
pub struct Ledger {
    path: PathBuf,
    names: Vec<String>,
    admission: Arc<Admission>,
    /// Bulk jobs and export bytes, when tracked.
    bulk: Option<Arc<BulkJobs>>,
    /// One writer at a time: a periodic save still running in the
    /// blocking pool and the one at shutdown do not interleave.
    writing: std::sync::Mutex<()>,
}

impl Ledger {
    /// `names` are the service names in admission order (the proxy's own
    /// last).
    pub fn new(path: &Path, names: Vec<String>, admission: Arc<Admission>) -> Self {
        Self {
            path: path.to_owned(),
            names,
            admission,
            bulk: None,
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Saves and restores today's bulk usage too.
    #[must_use]
    pub fn with_bulk(mut self, bulk: Arc<BulkJobs>) -> Self {
        self.bulk = Some(bulk);
        self
    }

    /// Restores today's counts from the file, if it holds today's. A
    /// missing file is a first start. An error says that today's usage is
    /// unknown: the file could not be read, or held something else and
    /// was moved aside (not overwritten).
    pub fn restore(&self) -> Result<(), LedgerError> {
        remove_leftover_temporaries(&self.path);
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(LedgerError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(saved) => saved,
            Err(_) => {
                let path = self.path.clone();
                return Err(match set_aside(&self.path) {
                    Ok(kept_as) => LedgerError::Corrupt { path, kept_as },
                    Err(source) => LedgerError::CannotSetAside { path, source },
                });
            }
        };
        let used: Vec<u64> = self
            .names
            .iter()
            .map(|name| saved.services.get(name).copied().unwrap_or(0))
            .collect();
        // Calls of services no longer configured still count against
        // today's quota.
        let departed: u64 = saved
            .services
            .iter()
            .filter(|(name, _)| !self.names.contains(name))
            .map(|(_, calls)| calls)
            .sum();
        self.admission.restore(saved.day, &used, saved.foreign + departed);
        self.admission.restore_window(&saved.window);
        if let (Some(bulk), Some(saved_bulk)) = (&self.bulk, &saved.bulk) {
            let services = saved_bulk
                .services
                .iter()
                .map(|(name, day)| (name.clone(), *day))
                .collect();
            bulk.restore(saved.day, &services, saved_bulk.export_bytes);
        }
        tracing::info!(
            day = %saved.day,
            calls = used.iter().sum::<u64>(),
            file = %self.path.display(),
            "restored today's usage"
        );
        Ok(())
    }

    fn current(&self) -> Saved {
        let (day, used, foreign) = self.admission.daily_counts();
        Saved {
            day,
            services: self.names.iter().cloned().zip(used).collect(),
            foreign,
            window: self.admission.window_frees_at(),
            bulk: self.bulk.as_ref().map(|bulk| {
                let (_, services, export_bytes) = bulk.daily();
                SavedBulk {
                    export_bytes,
                    services: services.into_iter().collect(),
                }
            }),
        }
    }

    /// Writes today's counts: to a temporary file, then renamed over the
    /// ledger.
    pub fn save(&self) -> Result<(), LedgerError> {
        self.write_current()
            .map(drop)
            .map_err(|source| LedgerError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes the counts as they are once this writer has the file, and
    /// returns them. A periodic save abandoned at shutdown still runs on
    /// its blocking thread and may get the file after the final save; as
    /// it takes the counts only then, it cannot put older ones over newer.
    fn write_current(&self) -> std::io::Result<Saved> {
        let _one_writer = self
            .writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let saved = self.current();
        write_atomically(&self.path, &temporary_path(&self.path), &saved)?;
        Ok(saved)
    }

    /// Saves every [`SAVE_INTERVAL`] while the counts change, for as long
    /// as it is polled; the caller saves once more at shutdown.
    pub fn saver(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let ledger = Arc::clone(self);
        async move {
            let mut last = ledger.current();
            let mut ticks = tokio::time::interval(SAVE_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if ledger.current().same_counts(&last) {
                    continue;
                }
                let writer = Arc::clone(&ledger);
                // File I/O off the async workers.
                let written = tokio::task::spawn_blocking(move || writer.write_current()).await;
                match written {
                    Ok(Ok(saved)) => last = saved,
                    Ok(Err(error)) => {
                        tracing::warn!(file = %ledger.path.display(), %error, "cannot save the usage ledger")
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// Temporary files this process has written, for their names.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// A name beside `path` that no other writer uses: this process's id and
/// a count (`usage.json.4242.7.tmp`).
fn temporary_path(path: &Path) -> PathBuf {
    let count = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{count}.tmp", std::process::id()));
    PathBuf::from(name)
}

/// Whether `candidate` names a temporary file of the ledger named
/// `ledger`: `<ledger>.<pid>.<count>.tmp`, or `<ledger>.tmp` as earlier
/// versions wrote it.
fn is_temporary_of(ledger: &OsStr, candidate: &OsStr) -> bool {
    let Some(rest) = candidate
        .as_encoded_bytes()
        .strip_prefix(ledger.as_encoded_bytes())
    else {
        return false;
    };
    if rest == b".tmp" {
        return true;
    }
    let Some(numbers) = rest
        .strip_prefix(b".")
        .and_then(|rest| rest.strip_suffix(b".tmp"))
    else {
        return false;
    };
    let parts: Vec<&[u8]> = numbers.split(|byte| *byte == b'.').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.iter().all(u8::is_ascii_digit))
}

/// The directory `path` is in.
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Removes the temporary files that saves interrupted by a crash left
/// beside the ledger. Called at start, before this process saves.
fn remove_leftover_temporaries(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(directory_of(path)) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_temporary_of(name, &entry.file_name()) {
            continue;
        }
        let leftover = entry.path();
        if let Err(error) = remove_leftover(&leftover) {
            tracing::warn!(file = %leftover.display(), %error, "cannot remove a temporary file of the usage ledger");
        }
    }
}

/// Removes whatever is at a temporary path no save of ours is using. A
/// symbolic link is removed itself, never followed.
fn remove_leftover(temporary: &Path) -> std::io::Result<()> {
    let metadata = match std::fs::symlink_metadata(temporary) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    std::fs::remove_file(temporary)?;
    if metadata.file_type().is_symlink() {
        tracing::warn!(
            file = %temporary.display(),
            "removed a symbolic link at a temporary path of the usage ledger (not what it pointed to)"
        );
    } else {
        tracing::info!(file = %temporary.display(), "removed a temporary file left by an interrupted save of the usage ledger");
    }
    Ok(())
}

/// Creates `temporary` for writing: only where nothing is (not even a
/// dangling link), readable and writable by its owner alone, and never
/// through a symbolic link.
fn create_private(temporary: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(temporary)
}

/// Writes `saved` to `temporary`, makes it durable and renames it over
/// `path`.
fn write_atomically(path: &Path, temporary: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let directory = directory_of(path);
    std::fs::create_dir_all(directory)?;
    remove_leftover(temporary)?;
    let mut file = create_private(temporary)?;
    let written = file.write_all(&text).and_then(|()| file.sync_all());
    drop(file);
    if let Err(error) = written.and_then(|()| std::fs::rename(temporary, path)) {
        // Leave nothing behind for later saves to trip over.
        let _ = std::fs::remove_file(temporary);
        return Err(error);
    }
    // Make the rename itself durable.
    if let Ok(directory) = std::fs::File::open(directory) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// Moves a file that is not a ledger out of the way, to a name with the
/// time it was found (`usage.json.corrupt-20261128T180000.123Z`), so that
/// it can be looked at and no copy set aside earlier is overwritten.
fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let found = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    for attempt in 0..100u32 {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".corrupt-{found}"));
        if attempt > 0 {
            name.push(format!("-{attempt}"));
        }
        let kept_as = PathBuf::from(name);
        match std::fs::symlink_metadata(&kept_as) {
            Ok(_) => continue,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                std::fs::rename(path, &kept_as)?;
                return Ok(kept_as);
            }
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        "every name tried for the corrupt ledger is taken",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn ledger(path: &Path) -> Ledger {
        let yaml = "marketo: { base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }\n\
                    services:\n  - { name: crm-sync, api_key: key-crm-0123456789abcd }\n\
                    state: { file: ~ }\n";
        let config = Config::from_yaml_with_env(yaml, |_| None).unwrap();
        let admission = Admission::new(&config, Metrics::new());
        Ledger::new(path, config.counted_names(), admission)
    }

    /// The names in `directory`, sorted.
    fn names_in(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    #[test]
    fn a_saved_ledger_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("usage.json");
        ledger(&file).save().unwrap();
        // The ledger is the temporary file renamed: it kept its mode.
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(names_in(directory.path()), ["usage.json"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_at_the_temporary_path_is_removed_not_followed() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("usage.json");
        let victim = directory.path().join("victim");
        std::fs::write(&victim, "not the proxy's").unwrap();
        // A link to a file, and one to where a file could be created.
        let nowhere = directory.path().join("nowhere");
        for target in [&victim, &nowhere] {
            let temporary = temporary_path(&file);
            std::os::unix::fs::symlink(target, &temporary).unwrap();

            let saved = ledger(&file).current();
            write_atomically(&file, &temporary, &saved).unwrap();

            let written: Saved = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            assert_eq!(written, saved);
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not the proxy's");
            assert_eq!(names_in(directory.path()), ["usage.json", "victim"]);
        }
    }

    #[cfg(unix)]
    #[test]
    fn leftovers_of_interrupted_saves_are_removed_at_start() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("usage.json");
        let victim = directory.path().join("victim");
        std::fs::write(&victim, "not the proxy's").unwrap();
        // What a crash between create and rename leaves: this version's
        // name and the one earlier versions used (here a planted link).
        std::fs::write(directory.path().join("usage.json.4242.3.tmp"), "{").unwrap();
        std::os::unix::fs::symlink(&victim, directory.path().join("usage.json.tmp")).unwrap();
        // Not the ledger's.
        for other in ["usage.json.bak", "usage.json.1.tmp", "other.json.4242.3.tmp"] {
            std::fs::write(directory.path().join(other), "keep").unwrap();
        }

        ledger(&file).restore().unwrap();

        assert_eq!(
            names_in(directory.path()),
            [
                "other.json.4242.3.tmp",
                "usage.json.1.tmp",
                "usage.json.bak",
                "victim"
            ]
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not the proxy's");
    }

    #[test]
    fn temporary_names_are_told_apart_from_other_files() {
        let ledger = OsStr::new("usage.json");
        for name in ["usage.json.tmp", "usage.json.1.0.tmp", "usage.json.4242.17.tmp"] {
            assert!(is_temporary_of(ledger, OsStr::new(name)), "{name}");
        }
        for name in [
            "usage.json",
            "usage.json.1.tmp",
            "usage.json..0.tmp",
            "usage.json.1.2.3.tmp",
            "usage.json.a.0.tmp",
            "usage.json.1.0.tmp.bak",
            "usage.jsonx.1.0.tmp",
            "other.json.1.0.tmp",
        ] {
            assert!(!is_temporary_of(ledger, OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn a_corrupt_ledger_is_kept_and_a_later_one_does_not_replace_it() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("usage.json");
        let ledger = ledger(&file);
        let mut kept = Vec::new();
        for text in ["not json", "not json either"] {
            std::fs::write(&file, text).unwrap();
            match ledger.restore() {
                Err(LedgerError::Corrupt { kept_as, .. }) => kept.push((kept_as, text)),
                other => panic!("{other:?}"),
            }
        }
        assert_ne!(kept[0].0, kept[1].0);
        for (kept_as, text) in &kept {
            assert_eq!(std::fs::read_to_string(kept_as).unwrap(), *text);
            let name = kept_as.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("usage.json.corrupt-"), "{name}");
        }
        assert!(!file.exists());
    }
}
