//! The usage ledger: today's per-service counts, saved to `state.file` so
//! that a restart does not forget how much of the day's quota is spent.
//!
//! The file is small JSON, written to a temporary file beside it and
//! renamed over it, so a crash mid-write leaves the previous version. It
//! is written at most every [`SAVE_INTERVAL`] when something changed, and
//! once more on shutdown. Counts saved on another day are ignored: the
//! quota has been reset since.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::admission::Admission;

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
    #[error("{} is not a usage ledger (moved aside to {})", path.display(), moved_to.display())]
    Corrupt { path: PathBuf, moved_to: PathBuf },
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
}

/// Reads and writes one ledger file for one admission state.
pub struct Ledger {
    path: PathBuf,
    names: Vec<String>,
    admission: Arc<Admission>,
    /// One writer at a time: the periodic save and the one at shutdown
    /// share the temporary file.
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
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Restores today's counts from the file, if it holds today's. A
    /// missing file is a first start; an unreadable one is moved aside,
    /// not overwritten.
    pub fn restore(&self) -> Result<(), LedgerError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
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
                let moved_to = self.path.with_extension("corrupt");
                let _ = std::fs::rename(&self.path, &moved_to);
                return Err(LedgerError::Corrupt {
                    path: self.path.clone(),
                    moved_to,
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
        write_atomically(&self.path, &saved)?;
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
                if ledger.current() == last {
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

fn write_atomically(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    // Make the rename itself durable.
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        if let Ok(directory) = std::fs::File::open(parent) {
            let _ = directory.sync_all();
        }
    }
    Ok(())
}
