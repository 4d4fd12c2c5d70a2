//! The server a buffer rank runs: accepts connections, authenticates them, stores pushed
//! trajectories, answers samples and statistics, and exits once every training rank assigned to
//! it has ended its session (cleanly or by disconnecting), or after a spell with none connected.

use crate::protocol::{
    self, codec, decode, decode_hello, encode, Item, Reply, Request, Role, ServerStats,
    SnapshotOutcome, Token, FRAME_LIMIT, HELLO_FRAME_LIMIT, MAX_SAMPLE,
};
use crate::snapshot::SnapshotFiles;
use crate::store::{Store, StoreConfig};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub store: StoreConfig,
    pub token: Token,
    /// Training ranks assigned to this server; it exits once each has ended its session. Other
    /// ranks may only connect as observers.
    pub trainers: Vec<u32>,
    /// How long the server waits while no training rank is connected before it gives up.
    pub idle_timeout: Duration,
    /// How long a new connection may take to send its hello.
    pub hello_timeout: Duration,
    /// Where `Save` and `Restore` requests write and read; `None`: they are refused.
    pub snapshots: Option<SnapshotFiles>,
}

/// What a server saw over its life.
#[derive(Debug, Clone)]
pub struct ServeReport {
    pub stats: ServerStats,
    /// Training sessions that ended with a shutdown request.
    pub trainers_finished: usize,
    /// Training sessions that ended by disconnecting or with a protocol error.
    pub trainers_lost: usize,
    /// Connections refused (wrong token or version, malformed hello, none in time).
    pub refused: usize,
    /// The server stopped waiting because no training rank was connected for `idle_timeout`.
    pub idle_exit: bool,
    /// Failed accepts (e.g. out of file descriptors), and how many log lines reported them.
    pub accept_errors: u64,
    pub accept_errors_logged: u64,
}

/// How long the server waits after a failed accept before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line about failed accepts per this long.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Failed accepts, logged at most once per [`ACCEPT_LOG_EVERY`] with the count since.
#[derive(Default)]
struct AcceptErrors {
    count: u64,
    logged: u64,
    unlogged: u64,
    last_logged: Option<Instant>,
}

impl AcceptErrors {
    fn record(&mut self, error: &std::io::Error) {
        self.count += 1;
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|t| t.elapsed() < ACCEPT_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            "replay-buffer server: accept failed: {error} ({} failure(s) since the last report; reported at most every {} s)",
            self.unlogged,
            ACCEPT_LOG_EVERY.as_secs()
        );
        self.logged += 1;
        self.unlogged = 0;
        self.last_logged = Some(Instant::now());
    }
}

#[derive(Debug, Default)]
struct Sessions {
    /// Training ranks connected now, and those whose session has ended.
    open: HashSet<u32>,
    ended: HashSet<u32>,
    finished: usize,
    lost: usize,
    refused: usize,
    /// Set by the first accepted hello; every later client must agree.
    state_dim: Option<u32>,
}

struct Shared {
    config: ServerConfig,
    store: Mutex<(Store, StdRng)>,
    sessions: Mutex<Sessions>,
    changed: Notify,
    started: Instant,
}

impl Shared {
    fn stats(&self) -> ServerStats {
        let trainers = self.sessions.lock().unwrap().open.len() as u32;
        let store = self.store.lock().unwrap();
        store
            .0
            .stats(self.started.elapsed().as_secs_f64(), trainers)
    }
}

impl Shared {
    fn snapshot_files(&self) -> Result<&SnapshotFiles, SnapshotOutcome> {
        self.config
            .snapshots
            .as_ref()
            .ok_or_else(|| failed("this buffer rank keeps no snapshots"))
    }

    /// Writes the store's snapshot of `step`.
    fn save(&self, step: u64) -> SnapshotOutcome {
        let files = match self.snapshot_files() {
            Ok(files) => files,
            Err(outcome) => return outcome,
        };
        let snapshot = self.store.lock().unwrap().0.snapshot();
        match files.save(step, &snapshot) {
            Ok(_) => SnapshotOutcome::Done {
                items: snapshot.items.len() as u64,
            },
            Err(e) => failed(&e.to_string()),
        }
    }

    /// Replaces the store with its snapshot of `step`.
    fn restore(&self, step: u64) -> SnapshotOutcome {
        let files = match self.snapshot_files() {
            Ok(files) => files,
            Err(outcome) => return outcome,
        };
        let snapshot = match files.load(step) {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return SnapshotOutcome::Missing,
            Err(e) => return failed(&e.to_string()),
        };
        let restored = Store::restore(self.config.store.clone(), snapshot);
        let items = restored.len() as u64;
        self.store.lock().unwrap().0 = restored;
        SnapshotOutcome::Done { items }
    }
}

fn failed(reason: &str) -> SnapshotOutcome {
    SnapshotOutcome::Failed {
        reason: reason.to_string(),
    }
}

enum Ended {
    Shutdown,
    Closed,
    Failed(String),
}

/// A bound listening socket: bound before the address is announced to the other ranks, so that
/// connections made as soon as they know it wait in the backlog.
pub struct Server {
    listener: std::net::TcpListener,
}

impl Server {
    pub fn bind(addr: impl ToSocketAddrs) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Server { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until done (see the module docs); blocks the calling thread.
    pub fn serve(self, config: ServerConfig) -> std::io::Result<ServeReport> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(self.run(config))
    }

    async fn run(self, config: ServerConfig) -> std::io::Result<ServeReport> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let shared = Arc::new(Shared {
            store: Mutex::new((Store::new(config.store.clone()), StdRng::from_entropy())),
            config,
            sessions: Mutex::new(Sessions::default()),
            changed: Notify::new(),
            started: Instant::now(),
        });
        let mut idle_since = Instant::now();
        let mut idle_exit = false;
        let mut accept_errors = AcceptErrors::default();
        loop {
            let (open, done) = {
                let s = shared.sessions.lock().unwrap();
                let done = shared.config.trainers.iter().all(|r| s.ended.contains(r));
                (s.open.len(), done)
            };
            if done {
                break;
            }
            if open > 0 {
                idle_since = Instant::now();
            }
            let idle_deadline =
                tokio::time::Instant::from_std(idle_since + shared.config.idle_timeout);
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(connection(stream, peer, Arc::clone(&shared)));
                    }
                    Err(e) => {
                        accept_errors.record(&e);
                        // Out of descriptors, accept fails at once: pause rather than spin.
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                },
                _ = shared.changed.notified() => {}
                _ = tokio::time::sleep_until(idle_deadline), if open == 0 => {
                    tracing::warn!(
                        "replay-buffer server: no training rank connected for {} s; stopping",
                        shared.config.idle_timeout.as_secs_f64()
                    );
                    idle_exit = true;
                    break;
                }
            }
        }
        let stats = shared.stats();
        let s = shared.sessions.lock().unwrap();
        Ok(ServeReport {
            stats,
            trainers_finished: s.finished,
            trainers_lost: s.lost,
            refused: s.refused,
            idle_exit,
            accept_errors: accept_errors.count,
            accept_errors_logged: accept_errors.logged,
        })
    }
}

type Connection = Framed<TcpStream, LengthDelimitedCodec>;

/// Best effort: the peer may already be gone. Reasons are cut so that the reply fits any frame
/// limit in force.
async fn send_error(framed: &mut Connection, reason: &str) {
    let reason: String = reason.chars().take(160).collect();
    let _ = framed.send(encode(&Reply::Error { reason })).await;
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, codec(HELLO_FRAME_LIMIT));
    let role = match handshake(&mut framed, &shared).await {
        Ok(role) => role,
        Err(reason) => {
            tracing::warn!("replay-buffer server: refused {peer}: {reason}");
            send_error(&mut framed, &reason).await;
            shared.sessions.lock().unwrap().refused += 1;
            return;
        }
    };
    let state_dim = shared.sessions.lock().unwrap().state_dim.unwrap_or(1) as usize;
    let trainer = match role {
        Role::Trainer { rank } => Some(rank),
        Role::Observer { .. } => None,
    };
    if trainer.is_some() {
        shared.changed.notify_one();
    }
    let ended = session(&mut framed, &shared, state_dim).await;
    if let Ended::Failed(reason) = &ended {
        tracing::warn!("replay-buffer server: closing {role:?} at {peer}: {reason}");
        send_error(&mut framed, reason).await;
    }
    if let Some(rank) = trainer {
        let mut s = shared.sessions.lock().unwrap();
        s.open.remove(&rank);
        s.ended.insert(rank);
        match ended {
            Ended::Shutdown => s.finished += 1,
            Ended::Closed | Ended::Failed(_) => {
                tracing::warn!(
                    "replay-buffer server: {role:?} at {peer} left without shutting down"
                );
                s.lost += 1;
            }
        }
        drop(s);
        shared.changed.notify_one();
    }
}

async fn handshake(framed: &mut Connection, shared: &Shared) -> Result<Role, String> {
    let timeout = shared.config.hello_timeout;
    let frame = match tokio::time::timeout(timeout, framed.next()).await {
        Err(_) => return Err(format!("no hello within {} s", timeout.as_secs_f64())),
        Ok(None) => return Err("closed before its hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad hello frame: {e}")),
        Ok(Some(Ok(frame))) => frame,
    };
    let hello = decode_hello(&frame)?;
    if !hello.token.matches(&shared.config.token) {
        return Err("wrong job token".into());
    }
    {
        let mut s = shared.sessions.lock().unwrap();
        match s.state_dim {
            Some(dim) if dim != hello.state_dim => {
                return Err(format!(
                    "state_dim {} differs from this buffer's {dim}",
                    hello.state_dim
                ))
            }
            _ => s.state_dim = Some(hello.state_dim),
        }
        if let Role::Trainer { rank } = hello.role {
            if !shared.config.trainers.contains(&rank) {
                return Err(format!(
                    "training rank {rank} is not assigned to this buffer"
                ));
            }
            if s.open.contains(&rank) || s.ended.contains(&rank) {
                return Err(format!("training rank {rank} already has a session"));
            }
            s.open.insert(rank);
        }
    }
    framed
        .send(encode(&Reply::Welcome {
            version: protocol::PROTOCOL_VERSION,
        }))
        .await
        .map_err(|e| format!("sending welcome: {e}"))?;
    framed.codec_mut().set_max_frame_length(FRAME_LIMIT);
    Ok(hello.role)
}

async fn session(framed: &mut Connection, shared: &Shared, state_dim: usize) -> Ended {
    loop {
        let frame = match framed.next().await {
            None => return Ended::Closed,
            Some(Err(e)) => return Ended::Failed(format!("bad frame: {e}")),
            Some(Ok(frame)) => frame,
        };
        let request = match decode::<Request>(&frame) {
            Ok(request) => request,
            Err(reason) => return Ended::Failed(reason),
        };
        let reply = match request {
            Request::Push { items } => {
                if let Some(reason) = items.iter().find_map(|i| i.validate(state_dim).err()) {
                    return Ended::Failed(reason);
                }
                shared.store.lock().unwrap().0.push_batch(items);
                continue;
            }
            Request::Sample { n } if n > MAX_SAMPLE => {
                return Ended::Failed(format!("sample of {n} items (at most {MAX_SAMPLE})"))
            }
            Request::Sample { n } => {
                let mut items = {
                    let mut guard = shared.store.lock().unwrap();
                    let (store, rng) = &mut *guard;
                    store.sample(n as usize, rng)
                };
                items.truncate(fitting_in_a_frame(&items));
                encode(&Reply::Samples { items })
            }
            Request::Stats => encode(&Reply::Stats(shared.stats())),
            Request::Save { step } => encode(&Reply::Snapshot {
                step,
                outcome: shared.save(step),
            }),
            Request::Restore { step } => encode(&Reply::Snapshot {
                step,
                outcome: shared.restore(step),
            }),
            Request::Shutdown => {
                let _ = framed.send(encode(&Reply::Bye(shared.stats()))).await;
                return Ended::Shutdown;
            }
        };
        if let Err(e) = framed.send(reply).await {
            return Ended::Failed(format!("sending a reply: {e}"));
        }
    }
}

/// How many of `items` surely fit in one reply frame, counting each at its largest encoding.
fn fitting_in_a_frame(items: &[Item]) -> usize {
    const ENVELOPE: usize = 16;
    let mut total = ENVELOPE;
    items
        .iter()
        .take_while(|item| {
            total += item.max_encoded_len();
            total <= FRAME_LIMIT
        })
        .count()
}
