//! Replay-buffer ranks (`--num-remote-buffers N`): what each rank announces when joining, the
//! server loop of a buffer rank, and the training side — pushing fresh trajectories, mixing in
//! prefetched replay samples, falling back to local replay when a buffer rank is lost, and the
//! buffer statistics in rank 0's metrics and summary.

use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use gfn_buffer::client::{Client, ClientConfig, StatsView};
use gfn_buffer::protocol::{Item, Role, ServerStats, Token};
use gfn_buffer::server::{Server, ServerConfig};
use gfn_buffer::snapshot::SnapshotFiles;
use gfn_buffer::store::{ModeIds, StoreConfig};
use gfn_buffer::BufferError;
use gfn_core::env::Environment;
use gfn_core::fit::BatchSource;
use gfn_core::metrics::modes::state_hash;
use gfn_core::trajectories::Trajectories;
use gfn_ddp::comm::ReduceOp;
use gfn_ddp::world::{Placement, World};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

/// What a rank tells the others when joining.
#[derive(Debug, Serialize, Deserialize)]
enum Announcement {
    /// Rank 0: the job's token, which every buffer connection must present, and its run
    /// directory (absolute), where buffer ranks keep their snapshots.
    Root {
        token: [u8; 32],
        out: PathBuf,
    },
    /// A buffer rank: where its server listens.
    Buffer {
        host: String,
        port: u16,
    },
    Nothing,
}

/// This rank's side of the start-up exchange: rank 0 draws the token, a buffer rank binds its
/// server (before announcing, so that trainers can connect as soon as they know the address).
pub struct Announcer {
    pub server: Option<Server>,
    /// The run directory (`--out`), as rank 0 names it.
    pub out: PathBuf,
}

impl Announcer {
    pub fn announce(&mut self, placement: &Placement) -> gfn_ddp::Result<Vec<u8>> {
        let announcement = if placement.buffer_ranks() == 0 {
            Announcement::Nothing
        } else if placement.rank == 0 {
            Announcement::Root {
                token: Token::random().0,
                out: std::path::absolute(&self.out).unwrap_or_else(|_| self.out.clone()),
            }
        } else if !placement.is_trainer() {
            let server = Server::bind((
                listen_address(crate::config::ranks_on_this_host(), placement.world_size),
                0,
            ))
            .map_err(|e| {
                gfn_ddp::DdpError::Launch(format!(
                    "buffer rank {} cannot open a listening socket: {e}",
                    placement.rank
                ))
            })?;
            let port = server.local_addr()?.port();
            self.server = Some(server);
            Announcement::Buffer {
                host: advertised_host(),
                port,
            }
        } else {
            Announcement::Nothing
        };
        Ok(serde_json::to_vec(&announcement).expect("announcements serialise"))
    }
}

/// Where a buffer rank listens: loopback when the launcher runs every rank of the job on this
/// host; otherwise every interface, because the host's name may resolve to a loopback address
/// here (Debian's 127.0.1.1) while other hosts reach it by another. Connections must present
/// the job's token either way.
fn listen_address(ranks_on_this_host: usize, world_size: usize) -> &'static str {
    if ranks_on_this_host >= world_size {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

/// The name other ranks reach this host by: GFN_BUFFER_HOST if set, else the host name.
fn advertised_host() -> String {
    std::env::var("GFN_BUFFER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(host_name)
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "localhost".into(),
    }
}

fn decode(world: &World, rank: usize) -> Result<Announcement> {
    let bytes = world
        .announcements
        .get(rank)
        .ok_or_else(|| anyhow!("rank {rank} made no announcement at start-up"))?;
    serde_json::from_slice(bytes)
        .with_context(|| format!("malformed start-up announcement from rank {rank}"))
}

/// The job's token and rank 0's run directory.
fn from_root(world: &World) -> Result<(Token, PathBuf)> {
    match decode(world, 0)? {
        Announcement::Root { token, out } => Ok((Token(token), out)),
        other => bail!("rank 0 announced {other:?} instead of the job token"),
    }
}

fn job_token(world: &World) -> Result<Token> {
    Ok(from_root(world)?.0)
}

/// `host:port` to reach buffer rank `rank` from here (loopback when on the same host).
fn buffer_address(world: &World, rank: usize) -> Result<String> {
    match decode(world, rank)? {
        Announcement::Buffer { host, port } if host == advertised_host() => {
            Ok(format!("127.0.0.1:{port}"))
        }
        Announcement::Buffer { host, port } => Ok(format!("{host}:{port}")),
        other => bail!("buffer rank {rank} announced {other:?} instead of its address"),
    }
}

/// Runs a buffer rank's server until its training ranks are done, then prints its report.
pub fn serve(world: &World, server: Server, config: &Config) -> Result<()> {
    let b = &config.buffer;
    let placement = world.placement;
    let env: Arc<dyn Environment> = Arc::from(config.env.build()?);
    let trainers: Vec<u32> = placement
        .trainers_of(placement.rank)
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let address = server.local_addr()?;
    let (token, out) = from_root(world)?;
    tracing::info!(
        rank = placement.rank,
        pid = std::process::id(),
        port = address.port(),
        trainers = ?trainers,
        address = %address.ip(),
        snapshots = %out.display(),
        "replay-buffer server listening"
    );
    let report = server.serve(ServerConfig {
        store: StoreConfig {
            capacity: b.capacity,
            policy: b.policy,
            diversity: b.diversity()?,
            modes: mode_ids(env),
        },
        token,
        trainers,
        idle_timeout: Duration::from_secs(config.ddp.timeout_s),
        hello_timeout: Duration::from_secs(10),
        snapshots: Some(SnapshotFiles {
            dir: out,
            rank: placement.rank,
        }),
    })?;
    let s = &report.stats;
    println!(
        "buffer rank {}: size {}/{} received {} ({:.0}/s) sampled {} ({:.0}/s) duplicates {} modes {} trainers finished {} lost {} refused {} accept errors {}",
        placement.rank,
        s.size,
        s.capacity,
        s.received,
        s.pushes_per_s,
        s.sampled,
        s.samples_per_s,
        s.duplicates,
        s.modes_found,
        report.trainers_finished,
        report.trainers_lost,
        report.refused,
        report.accept_errors
    );
    Ok(())
}

/// The environment's own mode criterion applied to an item's terminal state, as the trainers'
/// metrics apply it; `None` where the environment has none.
fn mode_ids(env: Arc<dyn Environment>) -> Option<ModeIds> {
    env.modes()?;
    let d = env.state_dim();
    Some(Arc::new(move |item: &Item| {
        let mut found = Vec::new();
        if let (Some(modes), Some(x)) = (env.modes(), item.states.rchunks_exact(d).next()) {
            modes.found_by(x, item.log_reward, &mut found);
        }
        found
    }))
}

/// Buffer statistics over all buffer ranks, as rank 0 reports them.
#[derive(Debug, Clone, Serialize)]
pub struct BufferMetrics {
    pub buffer_size: u64,
    pub buffer_received: u64,
    pub buffer_sampled: u64,
    pub buffer_pushes_per_s: f64,
    pub buffer_samples_per_s: f64,
    pub buffer_log_reward_q10: f64,
    pub buffer_log_reward_q50: f64,
    pub buffer_log_reward_q90: f64,
    /// Distinct modes among everything the trainers pushed.
    pub buffer_modes_found: usize,
}

impl BufferMetrics {
    /// The latest statistics over all buffer ranks; `None` before any arrived.
    pub fn latest(views: &[StatsView]) -> Option<Self> {
        let stats: Vec<ServerStats> = views.iter().filter_map(StatsView::latest).collect();
        (!stats.is_empty()).then(|| BufferMetrics::combine(&stats))
    }

    fn combine(stats: &[ServerStats]) -> Self {
        let modes: BTreeSet<u64> = stats.iter().flat_map(|s| s.mode_keys.clone()).collect();
        let quantile = |q: f64| mixture_quantile(stats, q);
        BufferMetrics {
            buffer_size: stats.iter().map(|s| s.size).sum(),
            buffer_received: stats.iter().map(|s| s.received).sum(),
            buffer_sampled: stats.iter().map(|s| s.sampled).sum(),
            buffer_pushes_per_s: stats.iter().map(|s| s.pushes_per_s).sum(),
            buffer_samples_per_s: stats.iter().map(|s| s.samples_per_s).sum(),
            buffer_log_reward_q10: quantile(0.1),
            buffer_log_reward_q50: quantile(0.5),
            buffer_log_reward_q90: quantile(0.9),
            buffer_modes_found: modes.len().max(
                stats
                    .iter()
                    .map(|s| s.modes_found as usize)
                    .max()
                    .unwrap_or(0),
            ),
        }
    }
}

/// Quantile of the stored log-rewards over all servers: each server's 101 percentiles stand
/// for equal shares of its items.
fn mixture_quantile(stats: &[ServerStats], q: f64) -> f64 {
    let mut points: Vec<(f32, f64)> = stats
        .iter()
        .filter(|s| !s.log_reward_percentiles.is_empty())
        .flat_map(|s| {
            let weight = s.size as f64 / s.log_reward_percentiles.len() as f64;
            s.log_reward_percentiles.iter().map(move |&v| (v, weight))
        })
        .collect();
    if points.is_empty() {
        return f64::NAN;
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = points.iter().map(|p| p.1).sum();
    let mut seen = 0.0;
    for (value, weight) in &points {
        seen += weight;
        if seen >= q * total {
            return *value as f64;
        }
    }
    points.last().expect("not empty").0 as f64
}

/// What the summary adds when buffer ranks served the run.
#[derive(Debug, Clone, Serialize)]
pub struct BufferSummary {
    pub remote_buffers: usize,
    #[serde(flatten)]
    pub metrics: BufferMetrics,
    /// Pushes the trainers dropped because their queue was full or their buffer rank lost.
    pub buffer_pushes_dropped: u64,
    /// Replayed trajectories the trainers received from buffer ranks.
    pub buffer_replayed: u64,
    /// Training ranks that lost their buffer rank and went on with local replay.
    pub buffer_ranks_lost: usize,
}

/// A training rank's connections: to its own buffer rank, and on rank 0 also as an observer to
/// the others (for statistics).
pub struct RemoteReplay {
    client: Client,
    /// This trainer's buffer rank.
    own: usize,
    observers: Vec<Client>,
    /// The buffer ranks of `observers`, in order.
    observer_ranks: Vec<usize>,
    /// Buffer ranks that let a request time out with the connection open (stopped or stuck):
    /// not asked again.
    silent: BTreeSet<usize>,
    fatal: bool,
    lost_reported: bool,
    /// Trajectories from the buffer rank mixed into this trainer's batches.
    replayed: u64,
    state_dim: usize,
    timeout: Duration,
}

const STATS_EVERY: Duration = Duration::from_secs(1);

impl RemoteReplay {
    /// `None` without buffer ranks.
    pub fn connect(world: &World, config: &Config, state_dim: usize) -> Result<Option<Self>> {
        let placement = world.placement;
        let Some(own) = placement.buffer_of(placement.rank) else {
            return Ok(None);
        };
        let token = job_token(world)?;
        let timeout = Duration::from_secs(config.ddp.timeout_s);
        let rank = placement.rank as u32;
        let root = placement.rank == 0;
        let connect = |buffer: usize, role: Role| -> Result<Client> {
            let addr = buffer_address(world, buffer)?;
            Client::connect(ClientConfig {
                addr,
                token,
                role,
                state_dim: state_dim as u32,
                connect_timeout: timeout,
                push_queue: 1024,
                stats_every: root.then_some(STATS_EVERY),
            })
            .with_context(|| format!("connecting to buffer rank {buffer}"))
        };
        let client = connect(own, Role::Trainer { rank })?;
        let observer_ranks: Vec<usize> = if root {
            (placement.trainers..placement.world_size)
                .filter(|&b| b != own)
                .collect()
        } else {
            Vec::new()
        };
        let observers = observer_ranks
            .iter()
            .map(|&b| connect(b, Role::Observer { rank }))
            .collect::<Result<_>>()?;
        Ok(Some(RemoteReplay {
            client,
            own,
            observers,
            observer_ranks,
            silent: BTreeSet::new(),
            fatal: config.buffer.fatal,
            lost_reported: false,
            replayed: 0,
            state_dim,
            timeout,
        }))
    }

    /// Every buffer rank this trainer is connected to, with its rank.
    fn buffers(&self) -> impl Iterator<Item = (usize, &Client)> {
        std::iter::once((self.own, &self.client))
            .chain(self.observer_ranks.iter().copied().zip(&self.observers))
    }

    /// Snapshot requests wait at most half the job's deadline, so that a silent buffer rank
    /// is reported before the other ranks' deadline in the barrier that follows ends the job.
    fn snapshot_timeout(&self) -> Duration {
        self.timeout / 2
    }

    /// Every trainer, before a checkpoint: waits (bounded) until its buffer rank has stored
    /// every push, so that the snapshots hold the trajectories of every checkpointed step.
    fn sync_pushes(&mut self) {
        if self.silent.contains(&self.own) || self.client.lost().is_some() {
            return;
        }
        if let Err(e) = self.client.sync(self.snapshot_timeout()) {
            if matches!(e, BufferError::NoReply { .. }) {
                tracing::warn!("buffer rank {}: {e}; not asked again", self.own);
                self.silent.insert(self.own);
            }
        }
    }

    /// Rank 0, at a checkpoint: has every buffer rank write its snapshot of `step`. A buffer
    /// rank that cannot is reported; the run goes on (a resume then starts it empty).
    fn save(&mut self, step: u64) {
        let timeout = self.snapshot_timeout();
        let mut newly_silent = Vec::new();
        for (rank, client) in self.buffers() {
            if self.silent.contains(&rank) || client.lost().is_some() {
                continue;
            }
            if let Err(e) = client.save(step, timeout) {
                tracing::warn!("buffer rank {rank}: no snapshot of step {step}: {e}");
                if matches!(e, BufferError::NoReply { .. }) {
                    newly_silent.push(rank);
                }
            }
        }
        self.silent.extend(newly_silent);
    }

    /// Rank 0, on resume: has every buffer rank restore its snapshot of `step` (one without
    /// it starts empty, with a warning).
    pub fn restore(&self, step: u64) -> Result<()> {
        for (rank, client) in self.buffers() {
            match client.restore(step, self.snapshot_timeout()) {
                Ok(Some(items)) => tracing::info!(
                    "buffer rank {rank}: restored {items} trajectories of step {step}"
                ),
                Ok(None) => tracing::warn!(
                    "buffer rank {rank} starts empty: it has no snapshot of step {step}"
                ),
                Err(e) => return Err(e).with_context(|| format!("restoring buffer rank {rank}")),
            }
        }
        Ok(())
    }

    /// Handles on the statistics of every buffer rank (polled in the background on rank 0).
    pub fn stats_views(&self) -> Vec<StatsView> {
        self.buffers().map(|(_, c)| c.stats_view()).collect()
    }

    /// Ends the sessions: every trainer waits until its pushes are stored; then rank 0 reads
    /// the final statistics of every buffer rank; then all shut down.
    pub fn finish(self, world: &mut World) -> Result<Option<BufferSummary>> {
        let lost_before = self.client.lost().is_some();
        // A buffer rank that stops answering without closing the connection (stopped, stuck).
        let unresponsive = self.silent.contains(&self.own)
            || matches!(
                self.client.sync(self.timeout),
                Err(BufferError::NoReply { .. })
            );
        world.comm.barrier()?;
        let final_stats: Vec<ServerStats> = if world.is_root() {
            self.buffers()
                .filter(|(rank, _)| !self.silent.contains(rank))
                .filter_map(|(_, c)| c.sync(self.timeout).ok().or_else(|| c.latest_stats()))
                .collect()
        } else {
            Vec::new()
        };
        world.comm.barrier()?;
        let counts = [
            self.client.dropped_pushes() as f32,
            self.replayed as f32,
            (lost_before || self.client.lost().is_some()) as u8 as f32,
            unresponsive as u8 as f32,
        ];
        let mut totals = Tensor::from_slice(&counts);
        world.comm.all_reduce(&mut totals, ReduceOp::Sum)?;
        let totals = Vec::<f32>::try_from(totals.to_device(Device::Cpu))?;
        if totals[2] > 0.0 {
            world.peer_died();
        }
        if totals[3] > 0.0 {
            world.peer_unresponsive();
        }
        for client in std::iter::once(self.client).chain(self.observers) {
            if client.lost().is_none() && !unresponsive {
                let _ = client.shutdown(self.timeout);
            }
        }
        Ok(world.is_root().then(|| BufferSummary {
            remote_buffers: world.placement.buffer_ranks(),
            metrics: BufferMetrics::combine(&final_stats),
            buffer_pushes_dropped: totals[0] as u64,
            buffer_replayed: totals[1] as u64,
            buffer_ranks_lost: totals[2] as usize,
        }))
    }
}

/// Replayed trajectories from the buffer rank (whatever has been prefetched, never waiting),
/// or from local replay once the buffer rank is lost; fresh batches go to the buffer rank, and
/// checkpoints include its snapshot.
impl BatchSource for RemoteReplay {
    fn replayed(&mut self, k: usize) -> gfn_core::Result<Option<Trajectories>> {
        if let Some(reason) = self.client.lost() {
            let message = format!(
                "lost the replay-buffer rank at {}: {reason}",
                self.client.addr()
            );
            if self.fatal {
                return Err(gfn_core::Error::Hook(format!(
                    "{message} (buffer.fatal = true)"
                )));
            }
            if !self.lost_reported {
                tracing::warn!("{message}; continuing with local replay");
                self.lost_reported = true;
            }
            return Ok(None);
        }
        let mut replayed = Trajectories::new(self.state_dim);
        for item in self.client.take(k) {
            if item.validate(self.state_dim).is_ok() {
                let actions: Vec<usize> = item.actions.iter().map(|&a| a as usize).collect();
                replayed.push(&item.states, &actions, item.log_reward);
            }
        }
        self.replayed += replayed.len() as u64;
        Ok(Some(replayed))
    }

    fn fresh(&mut self, batch: &Trajectories) {
        self.client.push(items(batch));
    }

    fn before_checkpoint(&mut self) {
        self.sync_pushes();
    }

    fn checkpoint(&mut self, step: u64) {
        self.save(step);
    }
}

/// The batch as protocol items, keyed by a hash of the terminal state's coordinates.
fn items(batch: &Trajectories) -> Vec<Item> {
    let d = batch.state_dim;
    (0..batch.len())
        .map(|b| {
            let (start, end) = (batch.offsets[b], batch.offsets[b + 1]);
            Item {
                key: state_hash(batch.terminal_state(b)),
                log_reward: batch.log_rewards[b],
                states: batch.states[start * d..end * d].to_vec(),
                actions: batch.actions[start..end]
                    .iter()
                    .map(|&a| a as u32)
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(size: u64, percentiles: Vec<f32>, modes: Vec<u64>) -> ServerStats {
        ServerStats {
            size,
            log_reward_percentiles: percentiles,
            modes_found: modes.len() as u64,
            mode_keys: modes,
            ..Default::default()
        }
    }

    #[test]
    fn a_job_on_one_host_listens_on_loopback_only() {
        assert_eq!(listen_address(3, 3), "127.0.0.1");
        assert_eq!(listen_address(2, 4), "0.0.0.0");
    }

    #[test]
    fn statistics_of_several_servers_combine() {
        // Server A holds 300 items all at 0; server B 100 items all at 1: the median is 0, the
        // 90th percentile 1.
        let a = stats(300, vec![0.0; 101], vec![1, 2]);
        let b = stats(100, vec![1.0; 101], vec![2, 3]);
        let m = BufferMetrics::combine(&[a, b]);
        assert_eq!(m.buffer_size, 400);
        assert_eq!(m.buffer_log_reward_q50, 0.0);
        assert_eq!(m.buffer_log_reward_q90, 1.0);
        assert_eq!(m.buffer_modes_found, 3);
        assert!(BufferMetrics::combine(&[]).buffer_log_reward_q50.is_nan());
    }
}
