//! Marketo's large answers (bulk export files) read at full speed into a
//! spool and passed on to the client at the client's own pace.
//!
//! A call holds one of Marketo's few concurrency slots until Marketo has
//! finished sending its answer, and not a moment longer: a slow client, or
//! one that went away, must not keep it (nginx's `proxy_buffering` is the
//! model). A task reads the rest of the answer as fast as Marketo sends it
//! and then gives the slot back; the client reads from the spool. The
//! spool keeps up to [`MEMORY_BYTES`] of an answer in memory and the rest
//! in a temporary file (in `server.spool_dir`), unlinked as soon as it is
//! created, so nothing is left behind. A client that goes away mid-answer
//! does not free the slot early: the task reads Marketo's answer to its
//! end (or until the request timeout has passed) and throws it away.
//!
//! All spools together keep at most `server.spool_memory_bytes` in memory
//! and `server.spool_disk_bytes` on disk ([`Spooler`]). Past them an
//! answer keeps no more than the part its client is taking: it streams at
//! the client's pace and holds its slot meanwhile, and
//! `marketo_proxy_spool_streamed_total` counts it. A client that takes
//! nothing for `server.send_timeout` is disconnected (see `server`), which
//! frees its spool.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use crate::admission::Slot;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use tower::BoxError;

/// Bytes of an answer kept in memory before the rest goes to a file.
pub const MEMORY_BYTES: usize = 1024 * 1024;

/// The most read from the file at once.
const FILE_CHUNK: usize = 64 * 1024;

/// Why a spooled answer could not be passed on whole.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the answer from Marketo broke off")]
    Upstream(#[source] BoxError),
    #[error("the answer could not be kept on disk")]
    File(#[source] io::Error),
    #[error("the answer from Marketo took longer than {0:?}")]
    TooSlow(Duration),
}

/// Where spools go and what bounds them all: bytes in memory and on disk,
/// the directory of their files, the longest Marketo may take to send an
/// answer, and the tasks that read them.
pub struct Spooler {
    memory: Bound,
    disk: Bound,
    dir: PathBuf,
    /// Marketo's answer must have arrived whole within this.
    deadline: Duration,
    tasks: Tasks,
    streamed: IntCounter,
}

/// Bytes all spools hold in one place, within a limit, shown by a gauge.
struct Bound {
    limit: u64,
    held: AtomicU64,
    gauge: IntGauge,
}

impl Bound {
    fn new(limit: u64, gauge: IntGauge) -> Self {
        Self {
            limit,
            held: AtomicU64::new(0),
            gauge,
        }
    }

    /// Takes `bytes`: within the limit, or past it when `force` (the one
    /// part an answer streams through).
    fn take(&self, bytes: usize, force: bool) -> bool {
        let bytes = bytes as u64;
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (force || held + bytes <= self.limit).then_some(held + bytes)
            })
            .is_ok();
        if taken {
            self.gauge.add(bytes as i64);
        }
        taken
    }

    fn give(&self, bytes: u64) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
            self.gauge.sub(bytes as i64);
        }
    }
}

impl Spooler {
    pub fn new(server: &ServerConfig, deadline: Duration, metrics: &Metrics, tasks: Tasks) -> Arc<Self> {
        Arc::new(Self {
            memory: Bound::new(
                server.spool_memory_bytes.get() as u64,
                metrics.spool_bytes.with_label_values(&["memory"]),
            ),
            disk: Bound::new(
                server.spool_disk_bytes.get(),
                metrics.spool_bytes.with_label_values(&["disk"]),
            ),
            dir: server.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            deadline,
            tasks,
            streamed: metrics.spool_streamed.clone(),
        })
    }

    /// The default bounds, for tests of the layers.
    pub fn for_tests(deadline: Duration) -> Arc<Self> {
        Self::new(&ServerConfig::default(), deadline, &Metrics::new(), Tasks::new())
    }

    /// A new file only this process can read, already unlinked.
    fn temporary_file(&self) -> io::Result<File> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "marketo-proxy-spool-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }
}

/// Starts reading `body` (the rest of Marketo's answer) into a spool;
/// `slot` is given back when Marketo has finished, at most the spooler's
/// deadline from now. Returns the client's end.
pub fn spool<B>(body: B, slot: Option<Slot>, spooler: &Arc<Spooler>) -> SpoolReader
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        taken: Notify::new(),
        spooler: Arc::clone(spooler),
    });
    spooler
        .tasks
        .until_stopped(fill(Arc::clone(&shared), body, slot, spooler.deadline));
    SpoolReader {
        shared,
        reading: None,
    }
}

#[derive(Default)]
struct State {
    memory: VecDeque<Bytes>,
    memory_bytes: usize,
    file: Option<Arc<File>>,
    /// Bytes written to the file, and read back from it.
    written: u64,
    read: u64,
    /// Bytes of the spooler's disk bound this answer holds.
    disk_held: u64,
    /// Marketo's answer has ended (well or not).
    finished: Option<Result<(), Arc<SpoolError>>>,
    /// The client went away: what arrives is thrown away.
    abandoned: bool,
    /// The spooler's bounds made it stream at its client's pace.
    streamed: bool,
    waker: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    /// The client took a part: room may have come back.
    taken: Notify,
    spooler: Arc<Spooler>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let state = self.lock();
        let (memory, disk) = (state.memory_bytes, state.disk_held);
        drop(state);
        self.spooler.memory.give(memory as u64);
        self.spooler.disk.give(disk);
    }
}

/// Reads Marketo's answer to its end into the spool, then gives the slot
/// back.
async fn fill<B>(shared: Arc<Shared>, mut body: B, slot: Option<Slot>, deadline: Duration)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let reading = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| SpoolError::Upstream(error.into()))?;
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            store(&shared, data).await?;
        }
        Ok::<(), SpoolError>(())
    };
    let result = tokio::time::timeout(deadline, reading)
        .await
        .unwrap_or(Err(SpoolError::TooSlow(deadline)));
    // Marketo is done with this call: its slot is free.
    drop(slot);
    let mut state = shared.lock();
    if let Err(error) = &result {
        tracing::warn!(%error, "a streamed answer from Marketo did not arrive whole");
    }
    state.finished = Some(result.map_err(Arc::new));
    if let Some(waker) = state.waker.take() {
        waker.wake();
    }
}

/// Where one part of the answer goes.
enum Place {
    Kept,
    File(Arc<File>, u64),
    /// No room: wait for the client to take what this answer holds.
    Wait,
}

/// Keeps one part of the answer: in memory while there is room and nothing
/// is on disk yet (order matters), else at the end of the file; with no
/// room in either, once the client has taken everything before it.
async fn store(shared: &Shared, data: Bytes) -> Result<(), SpoolError> {
    let spooler = &shared.spooler;
    let length = data.len();
    loop {
        let taken = shared.taken.notified();
        let place = {
            let mut state = shared.lock();
            if state.abandoned {
                return Ok(());
            }
            let drained = state.memory.is_empty() && state.read >= state.written;
            let in_memory = (state.file.is_none() && state.memory_bytes + length <= MEMORY_BYTES) || drained;
            if in_memory && spooler.memory.take(length, false) {
                Place::Kept
            } else if spooler.disk.take(length, false) {
                state.disk_held += length as u64;
                match &state.file {
                    Some(file) => Place::File(Arc::clone(file), state.written),
                    None => {
                        let file = Arc::new(spooler.temporary_file().map_err(SpoolError::File)?);
                        state.file = Some(Arc::clone(&file));
                        Place::File(file, 0)
                    }
                }
            } else {
                if !state.streamed {
                    state.streamed = true;
                    spooler.streamed.inc();
                }
                if drained {
                    // Nothing of this answer waits for its client: this
                    // part passes through, past the bound.
                    spooler.memory.take(length, true);
                    Place::Kept
                } else {
                    Place::Wait
                }
            }
        };
        match place {
            Place::Kept => {
                let mut state = shared.lock();
                state.memory_bytes += length;
                state.memory.push_back(data);
                if let Some(waker) = state.waker.take() {
                    waker.wake();
                }
                return Ok(());
            }
            Place::File(file, at) => {
                let length = length as u64;
                tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
                    .await
                    .map_err(|error| SpoolError::File(io::Error::other(error)))?
                    .map_err(SpoolError::File)?;
                let mut state = shared.lock();
                state.written += length;
                if let Some(waker) = state.waker.take() {
                    waker.wake();
                }
                return Ok(());
            }
            Place::Wait => taken.await,
        }
    }
}

/// The client's end of a spool: a response body.
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// A read from the file under way.
    reading: Option<BoxFuture<'static, io::Result<Bytes>>>,
}

impl Body for SpoolReader {
    type Data = Bytes;
    type Error = Arc<SpoolError>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(reading) = this.reading.as_mut() {
                let read = std::task::ready!(reading.as_mut().poll(cx));
                this.reading = None;
                return match read {
                    Ok(bytes) => {
                        this.shared.lock().read += bytes.len() as u64;
                        this.shared.taken.notify_one();
                        Poll::Ready(Some(Ok(Frame::data(bytes))))
                    }
                    Err(error) => Poll::Ready(Some(Err(Arc::new(SpoolError::File(error))))),
                };
            }
            let mut state = this.shared.lock();
            if let Some(bytes) = state.memory.pop_front() {
                state.memory_bytes -= bytes.len();
                drop(state);
                this.shared.spooler.memory.give(bytes.len() as u64);
                this.shared.taken.notify_one();
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let (Some(file), true) = (&state.file, state.read < state.written) {
                let file = Arc::clone(file);
                let at = state.read;
                let length = usize::try_from(state.written - at)
                    .unwrap_or(usize::MAX)
                    .min(FILE_CHUNK);
                drop(state);
                this.reading = Some(Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        let mut buffer = vec![0; length];
                        file.read_exact_at(&mut buffer, at)?;
                        Ok(Bytes::from(buffer))
                    })
                    .await
                    .map_err(io::Error::other)?
                }));
                continue;
            }
            return match &state.finished {
                Some(Ok(())) => Poll::Ready(None),
                Some(Err(error)) => Poll::Ready(Some(Err(Arc::clone(error)))),
                None => {
                    state.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.shared.lock();
        self.reading.is_none()
            && state.memory.is_empty()
            && state.read >= state.written
            && matches!(state.finished, Some(Ok(())))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        // The client went away: Marketo's answer is still read to its end
        // (the slot stays taken until then), but nothing more is kept, and
        // what was kept is given back.
        let mut state = self.shared.lock();
        state.abandoned = true;
        state.memory.clear();
        let memory = std::mem::take(&mut state.memory_bytes);
        let disk = std::mem::take(&mut state.disk_held);
        state.file = None;
        drop(state);
        self.shared.spooler.memory.give(memory as u64);
        self.shared.spooler.disk.give(disk);
        self.shared.taken.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Admission;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    type Sender = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

    /// An upstream answer whose parts the test sends.
    fn upstream() -> (
        Sender,
        impl Body<Data = Bytes, Error = io::Error> + Send + Unpin + 'static,
    ) {
        let (sender, receiver) = mpsc::channel(64);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        (sender, StreamBody::new(Box::pin(stream)))
    }

    async fn slot() -> (Arc<Admission>, Slot) {
        let config = Config::from_yaml_with_env(
            "marketo: { base_url: 'http://127.0.0.1:1', client_id: a, client_secret: b }\n\
             services: [{ name: s, api_key: key-s-0123456789abcdef }]\nstate: { file: ~ }",
            |_| None,
        )
        .unwrap();
        let admission = Admission::new(&config, Metrics::new());
        let permit = admission
            .admit(0, Instant::now() + Duration::from_secs(1), false)
            .await
            .unwrap();
        (admission, Slot::local(permit))
    }

    async fn in_flight_becomes(admission: &Admission, expected: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while admission.snapshot().in_flight != expected {
            assert!(
                Instant::now() < deadline,
                "in flight stayed {}",
                admission.snapshot().in_flight
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn parts(count: usize, size: usize) -> Vec<Bytes> {
        (0..count)
            .map(|index| Bytes::from(vec![b'a' + (index % 26) as u8; size]))
            .collect()
    }

    #[tokio::test]
    async fn the_slot_is_free_when_marketo_has_sent_all_however_slowly_the_client_reads() {
        let (admission, slot) = slot().await;
        let (sender, body) = upstream();
        let reader = spool(body, Some(slot), &Spooler::for_tests(Duration::from_secs(60)));
        let sent = parts(3, 1000);
        for part in &sent {
            sender.send(Ok(Frame::data(part.clone()))).await.unwrap();
        }
        // Long enough for the spool to take what was sent.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.snapshot().in_flight, 1, "Marketo is still sending");
        drop(sender);
        // The client has read nothing yet.
        in_flight_becomes(&admission, 0).await;
        let received = reader.collect().await.unwrap().to_bytes();
        assert_eq!(received, Bytes::from(sent.concat()));
    }

    #[tokio::test]
    async fn an_answer_larger_than_memory_goes_to_a_file_and_arrives_whole() {
        let (_admission, slot) = slot().await;
        let (sender, body) = upstream();
        let reader = spool(body, Some(slot), &Spooler::for_tests(Duration::from_secs(60)));
        let sent = parts(50, 64 * 1024);
        let writer = tokio::spawn(async move {
            for part in sent {
                sender.send(Ok(Frame::data(part))).await.unwrap();
            }
        });
        let received = reader.collect().await.unwrap().to_bytes();
        writer.await.unwrap();
        assert!(received.len() > MEMORY_BYTES);
        assert_eq!(received, Bytes::from(parts(50, 64 * 1024).concat()));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_does_not_free_the_slot_before_marketo_is_done() {
        let (admission, slot) = slot().await;
        let (sender, body) = upstream();
        let reader = spool(body, Some(slot), &Spooler::for_tests(Duration::from_secs(60)));
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        drop(reader);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.snapshot().in_flight, 1, "Marketo is still sending");
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"more"))))
            .await
            .unwrap();
        drop(sender);
        in_flight_becomes(&admission, 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_never_ends_frees_the_slot_at_the_deadline() {
        let (admission, slot) = slot().await;
        let (sender, body) = upstream();
        let reader = spool(body, Some(slot), &Spooler::for_tests(Duration::from_secs(60)));
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(admission.snapshot().in_flight, 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(admission.snapshot().in_flight, 0);
        let error = reader.collect().await.expect_err("the answer is cut off");
        assert!(error.to_string().contains("took longer"), "{error}");
        drop(sender);
    }
}
