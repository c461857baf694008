//! The proxy's own status calls for bulk jobs: a job in a queue that no
//! client has asked about for `bulk.poll_after` (a minute: Marketo
//! updates a job's status no more often) gets a status call, and after
//! Marketo said a queue was full the export lists are read to find the
//! jobs started elsewhere. At most one call per `bulk.poll_pace`, through
//! the same replays, admission and token as any call: under the name of
//! the service waiting for a place in that queue, if one is, else under
//! the proxy's own. The bulk layer takes what the answers say.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::auth::{Caller, Callers};
use crate::bulk::BulkJobs;
use crate::error::ProxyError;
use crate::proxy::Forward;
use crate::proxy::call::Call;
use crate::proxy::caller::Deadline;
use crate::target;

/// Reads the status of bulk jobs; see the module documentation.
pub struct StatusPoller {
    pub jobs: Arc<BulkJobs>,
    pub forward: Forward,
    /// Whom each call is made for.
    pub callers: Arc<Callers>,
    pub max_wait: Duration,
}

impl StatusPoller {
    /// Polls for as long as it is polled itself.
    pub async fn run(self) {
        let pace = self.jobs.poll_pace().max(Duration::from_millis(10));
        loop {
            // Woken early when someone starts waiting or a queue is found
            // full, but never more often than the pace.
            let woken = self.jobs.poller_woken().notified();
            tokio::select! {
                () = tokio::time::sleep(pace) => {}
                () = woken => tokio::time::sleep(pace / 4).await,
            }
            let Some((path, service)) = self.jobs.next_poll() else {
                continue;
            };
            let caller = self
                .callers
                .at(service)
                .unwrap_or_else(|| self.callers.internal());
            if let Err(error) = self.get(&path, caller).await {
                tracing::debug!(%error, "bulk status call failed");
            }
        }
    }

    async fn get(&self, path_and_query: &str, caller: Caller) -> Result<(), ProxyError> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut request = Request::new(Bytes::new());
        *request.method_mut() = Method::GET;
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let extensions = request.extensions_mut();
        extensions.insert(target::normalise(path, query)?);
        extensions.insert(caller);
        extensions.insert(Deadline::after(Instant::now(), self.max_wait));
        // The answer matters to the bulk layer only, which has read it.
        self.forward.clone().oneshot(Call::from_request(request)?).await?;
        Ok(())
    }
}
