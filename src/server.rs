//! The accept loop shared by every listener: the proxy, the admin port and
//! the simulator.
//!
//! It serves HTTP/1.1 and HTTP/2 (auto-detected) on an already-bound
//! listener, in plain text or after a [`Handshake`] such as TLS, until
//! `shutdown` resolves, then lets open connections finish
//! their current requests for a bounded grace period.
//!
//! No client may hold more than its share: each listener has a cap on
//! open connections (past it, new ones wait in the kernel's accept queue),
//! and a connection is closed when it has sent no complete request within
//! the header-read timeout of being accepted (whatever protocol it has yet
//! to announce), or when it has had no request in flight for the idle
//! timeout. HTTP/2 connections have a stream limit and keep-alive pings.

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::config::ServerConfig;

/// How long open connections get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Largest request head on HTTP/1.1 (Marketo takes URIs of 8 KB).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Largest header list on HTTP/2.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How long a connection told to close gets to finish what it has started.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

type BoxError = Box<dyn StdError + Send + Sync>;

/// The address a request's connection came from, in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl Peer {
    /// The client address of `request` (unspecified when it came from no
    /// connection, as in unit tests).
    pub fn ip_of<B>(request: &Request<B>) -> IpAddr {
        request
            .extensions()
            .get::<Self>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |peer| peer.0.ip())
    }
}

/// How one listener holds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// No request in flight for this long: closed. On HTTP/1.1 the next
    /// request's headers must also be complete within it.
    pub idle_timeout: Duration,
    /// From accept to the first request's complete headers.
    pub header_read_timeout: Duration,
    /// Requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// An answer whose client takes nothing of it for this long: the
    /// connection is closed (and the answer's spool freed).
    pub send_timeout: Duration,
}

impl ConnectionLimits {
    /// The proxy listener's, from the configuration.
    pub fn proxy(server: &ServerConfig) -> Self {
        Self {
            max_connections: server.max_connections.get(),
            idle_timeout: server.idle_timeout,
            header_read_timeout: server.header_read_timeout,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
            send_timeout: server.send_timeout,
        }
    }

    /// The admin listener's: the same timeouts, its own small cap.
    pub fn admin(server: &ServerConfig) -> Self {
        Self {
            max_connections: server.admin_max_connections.get(),
            ..Self::proxy(server)
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::proxy(&ServerConfig::default())
    }
}

/// Serves connections from `listener` with (a clone of) `service` until
/// `shutdown` completes. Each request carries its connection's [`Peer`].
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_with(listener, Plain, service, limits, shutdown).await;
}

/// What turns an accepted TCP connection into the stream HTTP is spoken
/// on: the connection itself, or a TLS session over it.
pub trait Handshake: Clone + Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn handshake(&self, stream: TcpStream) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Plain-text HTTP.
#[derive(Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, stream: TcpStream) -> std::io::Result<TcpStream> {
        Ok(stream)
    }
}

/// As [`serve`], each connection through `handshake` first. The handshake
/// counts against the header-read timeout.
pub async fn serve_with<H, S, B>(
    listener: TcpListener,
    handshake: H,
    service: S,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    H: Handshake,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Hyper's timer also runs while a keep-alive connection waits for
        // its next request: that wait is the idle timeout's to bound.
        .header_read_timeout(limits.header_read_timeout.max(limits.idle_timeout))
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.idle_timeout / 2);
    let builder = Arc::new(builder);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let check_every = (limits.idle_timeout.min(limits.header_read_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        // At the cap, nothing more is accepted until a connection closes.
        let permit = tokio::select! {
            permit = Arc::clone(&open).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = Tracked {
            inner: service.clone(),
            peer: Peer(peer),
            activity: Arc::clone(&activity),
        };
        let closing = closing.clone();
        let handshake = handshake.clone();
        let builder = Arc::clone(&builder);
        // Drives the connection until it ends, is idle or too slow, or the
        // server shuts down; the last two close it gracefully.
        connections.spawn(async move {
            // Declared before the connection, so dropped after it: the
            // slot frees once the socket is closed, and the cap holds for
            // descriptors, not just for connection tasks.
            let _permit = permit;
            let io = tokio::select! {
                io = handshake.handshake(stream) => match io {
                    Ok(io) => io,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "handshake failed");
                        return;
                    }
                },
                () = tokio::time::sleep(limits.header_read_timeout) => {
                    tracing::debug!(%peer, "handshake too slow");
                    return;
                }
                () = closing.cancelled() => return,
            };
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
                .into_owned();
            tokio::pin!(connection);
            let why = loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                        return;
                    }
                    () = tokio::time::sleep(check_every) => {
                        if let Some(why) = activity.expired(&limits) {
                            break why;
                        }
                    }
                    () = closing.cancelled() => break "shutdown",
                }
            };
            tracing::debug!(%peer, why, "closing a connection");
            if why == SEND_TIMEOUT {
                // Nothing of it would be taken: closed at once, and the
                // answer (its spool) dropped with it.
                return;
            }
            connection.as_mut().graceful_shutdown();
            let grace = if why == "shutdown" {
                SHUTDOWN_GRACE
            } else {
                CLOSE_GRACE
            };
            let _ = tokio::time::timeout(grace, connection).await;
        });
    }
    drop(listener);
    closing.cancel();
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// What a connection has been doing.
struct Activity {
    accepted: Instant,
    /// Milliseconds from `accepted` to when a request last started or an
    /// answer last ended.
    last: AtomicU64,
    /// Requests whose answer has not been sent in full yet.
    in_flight: AtomicUsize,
    /// Answers whose body is being sent.
    sending: AtomicUsize,
    /// Milliseconds from `accepted` to when a client last took a part of
    /// an answer (or an answer started).
    sent: AtomicU64,
    /// Requests seen so far.
    requests: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last.store(self.since_accepted(), Ordering::Relaxed);
    }

    /// A client took a part of an answer.
    fn took(&self) {
        self.sent.store(self.since_accepted(), Ordering::Relaxed);
    }

    fn since_accepted(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &ConnectionLimits) -> Option<&'static str> {
        let now = self.accepted.elapsed();
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            let sent = Duration::from_millis(self.sent.load(Ordering::Relaxed));
            let stalled =
                self.sending.load(Ordering::Relaxed) > 0 && now.saturating_sub(sent) > limits.send_timeout;
            return stalled.then_some(SEND_TIMEOUT);
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            return (now > limits.header_read_timeout).then_some("no request within the header-read timeout");
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        (now.saturating_sub(last) > limits.idle_timeout).then_some("idle")
    }
}

/// The service of one connection: requests carry the [`Peer`], and are
/// counted in flight until their answer has been sent in full.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    peer: Peer,
    activity: Arc<Activity>,
}

impl<S, B, R> Service<Request<B>> for Tracked<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<InFlightBody<R>>;
    type Error = S::Error;
    type Future = InFlight<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        self.activity.requests.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        self.activity.touch();
        InFlight {
            future: self.inner.call(request),
            activity: Some(Arc::clone(&self.activity)),
        }
    }
}

/// Why a connection whose client stopped taking its answer is closed.
const SEND_TIMEOUT: &str = "the client took nothing of its answer within the send timeout";

/// Marks a request done: no longer in flight, and the connection's idle
/// time counts from now.
fn done(activity: Option<Arc<Activity>>) {
    if let Some(activity) = activity {
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        activity.touch();
    }
}

pin_project_lite::pin_project! {
    /// A request's answer on its way; dropped before it is ready, the
    /// request is done.
    struct InFlight<F> {
        #[pin]
        future: F,
        activity: Option<Arc<Activity>>,
    }

    impl<F> PinnedDrop for InFlight<F> {
        fn drop(this: Pin<&mut Self>) {
            done(this.project().activity.take());
        }
    }
}

impl<F, R, E> Future for InFlight<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<InFlightBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.future.poll(cx));
        let activity = this.activity.take();
        Poll::Ready(match output {
            Ok(response) => {
                if let Some(activity) = &activity {
                    activity.sending.fetch_add(1, Ordering::Relaxed);
                    activity.took();
                }
                Ok(response.map(|body| InFlightBody { body, activity }))
            }
            Err(error) => {
                done(activity);
                Err(error)
            }
        })
    }
}

/// Marks an answer sent (or given up): its request is done.
fn sent(activity: Option<Arc<Activity>>) {
    if let Some(activity) = &activity {
        activity.sending.fetch_sub(1, Ordering::Relaxed);
    }
    done(activity);
}

pin_project_lite::pin_project! {
    /// An answer's body; ended or dropped, its request is done.
    pub struct InFlightBody<B> {
        #[pin]
        body: B,
        activity: Option<Arc<Activity>>,
    }

    impl<B> PinnedDrop for InFlightBody<B> {
        fn drop(this: Pin<&mut Self>) {
            sent(this.project().activity.take());
        }
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => sent(this.activity.take()),
            Poll::Ready(Some(Ok(_))) => {
                if let Some(activity) = this.activity {
                    activity.took();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
