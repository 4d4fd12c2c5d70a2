//! A training rank's connection to a replay-buffer server. The connection lives on its own
//! thread; the training step only touches queues: `push` hands over a batch (dropped, and
//! counted, if the queue is full), `take` pops what the background task has prefetched. A
//! server that goes away is recorded once in `lost()` and never waited on.

use crate::protocol::{
    codec, decode, encode, Hello, Item, Reply, Request, Role, ServerStats, SnapshotOutcome, Token,
    FRAME_LIMIT, HELLO_FRAME_LIMIT, MAX_SAMPLE, PROTOCOL_VERSION,
};
use crate::{BufferError, Result};
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub addr: String,
    pub token: Token,
    pub role: Role,
    pub state_dim: u32,
    /// Bound on connecting and on the server's welcome.
    pub connect_timeout: Duration,
    /// Batches that may wait to be sent before further pushes are dropped.
    pub push_queue: usize,
    /// Ask for statistics this often in the background (`None`: only on request).
    pub stats_every: Option<Duration>,
}

enum Command {
    Push(Vec<Item>),
    /// Statistics whose reply also confirms every earlier push has been stored.
    Stats(std_mpsc::SyncSender<ServerStats>),
    Shutdown(std_mpsc::SyncSender<ServerStats>),
    /// `Save` or `Restore`, answered with the server's outcome.
    Snapshot(Request, std_mpsc::SyncSender<SnapshotOutcome>),
}

#[derive(Default)]
struct Shared {
    prefetched: Mutex<VecDeque<Item>>,
    /// Items the trainer takes per step; the background task keeps twice as many ready.
    wanted: AtomicUsize,
    wake: Notify,
    latest_stats: Mutex<Option<ServerStats>>,
    lost: Mutex<Option<String>>,
    dropped_pushes: AtomicU64,
    received_items: AtomicU64,
}

/// Reads a client's latest statistics where the client itself is borrowed elsewhere.
#[derive(Clone)]
pub struct StatsView(Arc<Shared>);

impl StatsView {
    pub fn latest(&self) -> Option<ServerStats> {
        self.0.latest_stats.lock().unwrap().clone()
    }
}

pub struct Client {
    addr: String,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected once the background thread has ended.
    finished: std_mpsc::Receiver<()>,
}

/// How long closing waits for the background thread before leaving it behind (it may be
/// blocked on a server that stopped answering; it ends with the process).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long to wait before asking an empty buffer for samples again.
const EMPTY_BUFFER_PAUSE: Duration = Duration::from_millis(20);

type Connection = Framed<TcpStream, LengthDelimitedCodec>;

impl Client {
    /// Connects and completes the hello (blocking, bounded by `connect_timeout`), then hands
    /// the connection to a background thread.
    pub fn connect(config: ClientConfig) -> Result<Client> {
        let shared = Arc::new(Shared::default());
        let (commands, command_rx) = mpsc::channel(config.push_queue.max(1));
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<()>>(1);
        let (finished_tx, finished) = std_mpsc::sync_channel::<()>(0);
        let addr = config.addr.clone();
        let thread = {
            let shared = Arc::clone(&shared);
            let config = config.clone();
            std::thread::Builder::new()
                .name("replay-client".into())
                .spawn(move || {
                    let _finished = finished_tx;
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let framed =
                            match tokio::time::timeout(config.connect_timeout, open(&config)).await
                            {
                                Ok(Ok(framed)) => framed,
                                Ok(Err(e)) => {
                                    let _ = ready_tx.send(Err(e));
                                    return;
                                }
                                Err(_) => {
                                    let _ = ready_tx.send(Err(BufferError::Connection {
                                        addr: config.addr.clone(),
                                        reason: format!(
                                            "no welcome within {} s",
                                            config.connect_timeout.as_secs_f64()
                                        ),
                                    }));
                                    return;
                                }
                            };
                        let _ = ready_tx.send(Ok(()));
                        let reason = run(framed, command_rx, &shared, config.stats_every).await;
                        if let Some(reason) = reason {
                            *shared.lost.lock().unwrap() = Some(reason);
                        }
                    });
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Client {
                addr,
                commands,
                shared,
                thread: Some(thread),
                finished,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BufferError::Connection {
                addr,
                reason: "the connection thread ended before connecting".into(),
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Queues items for the server; returns false (and counts them) when they were dropped
    /// because the queue is full or the server is lost.
    pub fn push(&self, items: Vec<Item>) -> bool {
        let n = items.len() as u64;
        let sent = self.commands.try_send(Command::Push(items)).is_ok();
        if !sent {
            self.shared.dropped_pushes.fetch_add(n, Ordering::Relaxed);
        }
        sent
    }

    /// Up to `n` prefetched samples, at once; also tells the background task to keep about 2n
    /// ready.
    pub fn take(&self, n: usize) -> Vec<Item> {
        if self.shared.wanted.swap(n, Ordering::Relaxed) != n {
            self.shared.wake.notify_one();
        }
        let mut prefetched = self.shared.prefetched.lock().unwrap();
        let k = n.min(prefetched.len());
        let items: Vec<Item> = prefetched.drain(..k).collect();
        let refill = prefetched.len() < 2 * n;
        drop(prefetched);
        if refill {
            self.shared.wake.notify_one();
        }
        items
    }

    /// Why the server was lost, once it is.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost.lock().unwrap().clone()
    }

    /// Items dropped because the push queue was full or the server lost.
    pub fn dropped_pushes(&self) -> u64 {
        self.shared.dropped_pushes.load(Ordering::Relaxed)
    }

    /// Items received in samples so far.
    pub fn received_items(&self) -> u64 {
        self.shared.received_items.load(Ordering::Relaxed)
    }

    /// The latest statistics received (background polling or `sync`).
    pub fn latest_stats(&self) -> Option<ServerStats> {
        self.shared.latest_stats.lock().unwrap().clone()
    }

    /// A handle that reads [`Client::latest_stats`] without the client.
    pub fn stats_view(&self) -> StatsView {
        StatsView(Arc::clone(&self.shared))
    }

    /// Waits (at most `timeout`) until the server has stored every earlier push; returns its
    /// statistics at that point.
    pub fn sync(&self, timeout: Duration) -> Result<ServerStats> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        self.request(Command::Stats(tx), rx, timeout, "statistics")
    }

    /// Has the server write its snapshot of `step`, after every earlier push; returns the
    /// items written.
    pub fn save(&self, step: u64, timeout: Duration) -> Result<u64> {
        Ok(self
            .snapshot(Request::Save { step }, timeout, "snapshot")?
            .unwrap_or(0))
    }

    /// Has the server replace its store with its snapshot of `step`; returns the items
    /// restored, or `None` where it has no snapshot of `step`.
    pub fn restore(&self, step: u64, timeout: Duration) -> Result<Option<u64>> {
        self.snapshot(Request::Restore { step }, timeout, "restore")
    }

    fn snapshot(&self, request: Request, timeout: Duration, what: &str) -> Result<Option<u64>> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        match self.request(Command::Snapshot(request, tx), rx, timeout, what)? {
            SnapshotOutcome::Done { items } => Ok(Some(items)),
            SnapshotOutcome::Missing => Ok(None),
            SnapshotOutcome::Failed { reason } => Err(BufferError::Connection {
                addr: self.addr.clone(),
                reason,
            }),
        }
    }

    /// Ends the session: the server replies with its statistics.
    pub fn shutdown(mut self, timeout: Duration) -> Result<ServerStats> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let stats = self.request(Command::Shutdown(tx), rx, timeout, "shutdown");
        self.close();
        stats
    }

    /// Ends the background task and joins its thread, waiting at most [`CLOSE_GRACE`].
    fn close(&mut self) {
        // Closing the command channel ends the background task, which closes the connection.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        self.shared.wake.notify_one();
        let ended = matches!(
            self.finished.recv_timeout(CLOSE_GRACE),
            Err(std_mpsc::RecvTimeoutError::Disconnected)
        );
        if let Some(thread) = self.thread.take() {
            if ended {
                let _ = thread.join();
            }
        }
    }

    fn request<T>(
        &self,
        command: Command,
        rx: std_mpsc::Receiver<T>,
        timeout: Duration,
        what: &str,
    ) -> Result<T> {
        let fail = |reason: String| BufferError::Connection {
            addr: self.addr.clone(),
            reason,
        };
        if let Some(reason) = self.lost() {
            return Err(fail(reason));
        }
        let deadline = std::time::Instant::now() + timeout;
        let no_reply = || {
            self.lost()
                .map(fail)
                .unwrap_or_else(|| BufferError::NoReply {
                    addr: self.addr.clone(),
                    what: what.to_string(),
                    seconds: timeout.as_secs_f64(),
                })
        };
        let mut command = Some(command);
        // The queue may be full of pushes: wait for room, within the deadline.
        while let Some(c) = command.take() {
            match self.commands.try_send(c) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(c)) if std::time::Instant::now() < deadline => {
                    command = Some(c);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return Err(no_reply()),
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        rx.recv_timeout(left).map_err(|_| no_reply())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

async fn open(config: &ClientConfig) -> Result<Connection> {
    let fail = |reason: String| BufferError::Connection {
        addr: config.addr.clone(),
        reason,
    };
    let stream = TcpStream::connect(&config.addr)
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    stream.set_nodelay(true)?;
    let mut framed = Framed::new(stream, codec(HELLO_FRAME_LIMIT));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        token: config.token,
        role: config.role,
        state_dim: config.state_dim,
    };
    framed
        .send(encode(&hello))
        .await
        .map_err(|e| fail(format!("sending hello: {e}")))?;
    let frame = framed
        .next()
        .await
        .ok_or_else(|| fail("closed the connection during the hello".into()))?
        .map_err(|e| fail(format!("bad welcome: {e}")))?;
    match decode::<Reply>(&frame).map_err(fail)? {
        Reply::Welcome { .. } => {}
        Reply::Error { reason } => {
            return Err(BufferError::Refused {
                addr: config.addr.clone(),
                reason,
            })
        }
        other => return Err(fail(format!("unexpected reply to hello: {other:?}"))),
    }
    framed.codec_mut().set_max_frame_length(FRAME_LIMIT);
    Ok(framed)
}

/// Drives one connection until the trainer hangs up (`None`) or the server is lost (its
/// reason).
async fn run(
    mut framed: Connection,
    mut commands: mpsc::Receiver<Command>,
    shared: &Shared,
    stats_every: Option<Duration>,
) -> Option<String> {
    // Who waits for each statistics reply, in request order (`None`: a background poll).
    let mut stats_waiters: VecDeque<Option<std_mpsc::SyncSender<ServerStats>>> = VecDeque::new();
    let mut bye: Option<std_mpsc::SyncSender<ServerStats>> = None;
    let mut snapshot_waiters: VecDeque<std_mpsc::SyncSender<SnapshotOutcome>> = VecDeque::new();
    let mut sample_in_flight = false;
    // After an empty sample (the buffer is still empty) ask again only after a pause.
    let mut next_sample = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(stats_every.unwrap_or(Duration::from_secs(3600)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    loop {
        let sample_paused = tokio::time::Instant::now() < next_sample;
        if bye.is_none() && !sample_in_flight && !sample_paused {
            let wanted = shared.wanted.load(Ordering::Relaxed);
            let ready = shared.prefetched.lock().unwrap().len();
            if wanted > 0 && ready < 2 * wanted {
                let n = (2 * wanted - ready).min(MAX_SAMPLE as usize) as u32;
                if let Err(e) = framed.feed(encode(&Request::Sample { n })).await {
                    return Some(format!("sending a sample request: {e}"));
                }
                sample_in_flight = true;
            }
        }
        // Requests are fed as they come and written together: a push and the sample request
        // that follows it leave in one write.
        if let Err(e) = SinkExt::<bytes::Bytes>::flush(&mut framed).await {
            return Some(format!("sending to the server: {e}"));
        }
        tokio::select! {
            command = commands.recv(), if bye.is_none() => {
                let request = match command {
                    None => return None,
                    Some(Command::Push(items)) => Request::Push { items },
                    Some(Command::Stats(tx)) => {
                        stats_waiters.push_back(Some(tx));
                        Request::Stats
                    }
                    Some(Command::Shutdown(tx)) => {
                        bye = Some(tx);
                        Request::Shutdown
                    }
                    Some(Command::Snapshot(request, tx)) => {
                        snapshot_waiters.push_back(tx);
                        request
                    }
                };
                if let Err(e) = framed.feed(encode(&request)).await {
                    return Some(format!("sending to the server: {e}"));
                }
            }
            frame = framed.next() => {
                let frame = match frame {
                    None if bye.is_some() => return None,
                    None => return Some("the server closed the connection".into()),
                    Some(Err(e)) => return Some(format!("bad frame from the server: {e}")),
                    Some(Ok(frame)) => frame,
                };
                match decode::<Reply>(&frame) {
                    Ok(Reply::Samples { items }) => {
                        sample_in_flight = false;
                        if items.is_empty() {
                            next_sample = tokio::time::Instant::now() + EMPTY_BUFFER_PAUSE;
                        }
                        shared.received_items.fetch_add(items.len() as u64, Ordering::Relaxed);
                        shared.prefetched.lock().unwrap().extend(items);
                    }
                    Ok(Reply::Stats(stats)) => {
                        *shared.latest_stats.lock().unwrap() = Some(stats.clone());
                        if let Some(Some(tx)) = stats_waiters.pop_front() {
                            let _ = tx.try_send(stats);
                        }
                    }
                    Ok(Reply::Bye(stats)) => {
                        *shared.latest_stats.lock().unwrap() = Some(stats.clone());
                        if let Some(tx) = bye.take() {
                            let _ = tx.try_send(stats);
                        }
                        return None;
                    }
                    Ok(Reply::Snapshot { outcome, .. }) => {
                        if let Some(tx) = snapshot_waiters.pop_front() {
                            let _ = tx.try_send(outcome);
                        }
                    }
                    Ok(Reply::Error { reason }) => return Some(format!("the server reported: {reason}")),
                    Ok(Reply::Welcome { .. }) => return Some("unexpected second welcome".into()),
                    Err(reason) => return Some(format!("from the server: {reason}")),
                }
            }
            _ = poll.tick(), if stats_every.is_some() && bye.is_none() => {
                stats_waiters.push_back(None);
                if let Err(e) = framed.feed(encode(&Request::Stats)).await {
                    return Some(format!("sending a statistics request: {e}"));
                }
            }
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(next_sample), if sample_paused => {}
        }
    }
}
