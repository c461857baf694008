//! One call to Marketo, as the layers of [`forward`](super::forward) handle
//! it: the cleaned request and the facts that decide its fate, typed.
//!
//! Above `forward`, facts travel in the request's extensions as each layer
//! learns them; the answer layer gathers them into a [`Call`]. A copy of it
//! (each attempt is one, so that a replay can send it again) shares the
//! request until a layer changes it: only an admitted call copies its
//! headers, once, and a request waiting in the queue holds them once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::Request;
use tokio::time::Instant;

use super::body::HeldBytes;
use super::caller::Deadline;
use crate::auth::Caller;
use crate::error::ProxyError;
use crate::target::{PathError, Target};

/// A call to Marketo and what is known about it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Method, headers and body as they go to Marketo; its extensions are
    /// empty and its URI is not used (the [`Target`] is). Shared by the
    /// call's copies; [`Call::request_mut`] changes this copy's own.
    pub request: Arc<Request<Bytes>>,
    pub target: Target,
    pub caller: Caller,
    /// When it must have been admitted.
    pub deadline: Instant,
    /// A replay: it goes to the head of its service's queue.
    pub replay: bool,
    /// The request body's share of the proxy's body budget, held until
    /// the call is answered.
    pub held: Option<HeldBytes>,
    /// Its part in a read shared with identical ones, if any.
    pub sharing: Option<Sharing>,
}

/// A read's part among identical reads (see [`coalesce`](super::coalesce)).
#[derive(Debug, Clone)]
pub enum Sharing {
    /// It leads: once admitted, it is at Marketo for all of them.
    Leads(Arc<Lead>),
    /// It follows: when its own turn comes and the lead is at Marketo
    /// already, it steps aside and waits for the lead's answer; otherwise
    /// it goes itself.
    Follows(Arc<Lead>),
}

/// What the reads identical to a leading one know of it.
#[derive(Debug, Default)]
pub struct Lead {
    at_marketo: AtomicBool,
}

impl Lead {
    /// The lead was admitted: its call goes to Marketo now.
    pub fn reached_marketo(&self) {
        self.at_marketo.store(true, Ordering::Release);
    }

    pub fn is_at_marketo(&self) -> bool {
        self.at_marketo.load(Ordering::Acquire)
    }
}

impl Call {
    /// This copy's request, to change: copied first if another copy of
    /// the call shares it.
    pub fn request_mut(&mut self) -> &mut Request<Bytes> {
        Arc::make_mut(&mut self.request)
    }

    /// The call for a request whose guard and caller layers put a
    /// [`Target`], a [`Caller`] and a [`Deadline`] in its extensions.
    pub fn from_request(mut request: Request<Bytes>) -> Result<Self, ProxyError> {
        let mut extensions = std::mem::take(request.extensions_mut());
        let target = extensions
            .remove::<Target>()
            .ok_or(ProxyError::Path(PathError::Invalid))?;
        let caller = extensions
            .remove::<Caller>()
            .ok_or(ProxyError::Auth(crate::auth::AuthError::Unauthenticated))?;
        let deadline = extensions
            .remove::<Deadline>()
            .map_or_else(Instant::now, |deadline| deadline.0);
        let held = extensions.remove::<HeldBytes>();
        Ok(Self {
            request: Arc::new(request),
            target,
            caller,
            deadline,
            replay: false,
            held,
            sharing: None,
        })
    }
}
