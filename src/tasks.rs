//! Every task the proxy spawns, on one tracker that stops with the server.
//!
//! Two kinds: loops and waits that run until the server stops (token
//! refreshers, the admission timer, Redis maintenance, a spool reading
//! Marketo's answer, a pause), which are cancelled then; and short pieces
//! of bookkeeping that must not be lost (giving back a lease or a place in
//! Redis, sharing what a refusal taught), which run to their end, bounded
//! by their own timeouts, and which shutdown waits for.

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxy's tasks; clones share them. A clone is one count on an
/// `Arc` (a cancellation token's own clone takes a lock), so the request
/// path may carry one.
#[derive(Clone, Default)]
pub struct Tasks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` until it ends or the server stops. Outside a runtime
    /// (the process is ending) it is dropped.
    pub fn until_stopped(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(runtime) = Handle::try_current() {
            let Inner { tracker, stop } = &*self.inner;
            tracker.spawn_on(stop.clone().run_until_cancelled_owned(task), &runtime);
        }
    }

    /// Runs `task` to its end; the server's shutdown waits for it. Outside
    /// a runtime it is dropped: see [`Tasks::can_run`].
    pub fn to_the_end(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(runtime) = Handle::try_current() {
            self.inner.tracker.spawn_on(task, &runtime);
        }
    }

    /// Whether a task can run now: not once the runtime is gone.
    pub fn can_run() -> bool {
        Handle::try_current().is_ok()
    }

    /// Cancels the tasks that run until the server stops and waits for
    /// every task to end.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stopping_cancels_the_loops_and_waits_for_the_bookkeeping() {
        let tasks = Tasks::new();
        tasks.until_stopped(std::future::pending());
        let written = Arc::new(AtomicBool::new(false));
        tasks.to_the_end({
            let written = Arc::clone(&written);
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                written.store(true, Ordering::Release);
            }
        });
        tokio::time::timeout(Duration::from_secs(1), tasks.stop())
            .await
            .expect("the endless loop is cancelled");
        assert!(written.load(Ordering::Acquire), "shutdown waited for the write");
    }
}
