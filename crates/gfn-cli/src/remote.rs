//! Replay-buffer ranks (`--num-remote-buffers N`): what each rank announces when joining, the
//! server loop of a buffer rank, and the training side — pushing fresh trajectories, mixing in
//! prefetched replay samples, falling back to local replay when a buffer rank is lost, and the
//! buffer statistics in rank 0's metrics and summary.

use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use gfn_buffer::client::{Client, ClientConfig};
use gfn_buffer::protocol::{Item, Role, ServerStats, Token};
use gfn_buffer::server::{Server, ServerConfig};
use gfn_buffer::store::{ModeIds, StoreConfig};
use gfn_core::env::Environment;
use gfn_core::metrics::modes::state_hash;
use gfn_core::train::TrainState;
use gfn_core::trajectories::Trajectories;
use gfn_ddp::comm::ReduceOp;
use gfn_ddp::world::{Placement, World};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

/// What a rank tells the others when joining.
#[derive(Debug, Serialize, Deserialize)]
enum Announcement {
    /// Rank 0: the job's token, which every buffer connection must present.
    Token([u8; 32]),
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
}

impl Announcer {
    pub fn announce(&mut self, placement: &Placement) -> gfn_ddp::Result<Vec<u8>> {
        let announcement = if placement.buffer_ranks() == 0 {
            Announcement::Nothing
        } else if placement.rank == 0 {
            Announcement::Token(Token::random().0)
        } else if !placement.is_trainer() {
            let server = Server::bind(("0.0.0.0", 0)).map_err(|e| {
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

fn job_token(world: &World) -> Result<Token> {
    match decode(world, 0)? {
        Announcement::Token(bytes) => Ok(Token(bytes)),
        other => bail!("rank 0 announced {other:?} instead of the job token"),
    }
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
    if b.capacity == 0 {
        bail!("invalid buffer.capacity = 0: a buffer rank must hold at least 1 trajectory");
    }
    let placement = world.placement;
    let env: Arc<dyn Environment> = Arc::from(config.env.build()?);
    let trainers: Vec<u32> = placement
        .trainers_of(placement.rank)
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let address = server.local_addr()?;
    tracing::info!(
        rank = placement.rank,
        pid = std::process::id(),
        port = address.port(),
        trainers = ?trainers,
        "replay-buffer server listening"
    );
    let report = server.serve(ServerConfig {
        store: StoreConfig {
            capacity: b.capacity,
            policy: b.policy,
            modes: mode_ids(env),
        },
        token: job_token(world)?,
        trainers,
        idle_timeout: Duration::from_secs(config.ddp.timeout_s),
        hello_timeout: Duration::from_secs(10),
    })?;
    let s = &report.stats;
    println!(
        "buffer rank {}: size {}/{} received {} ({:.0}/s) sampled {} ({:.0}/s) duplicates {} modes {} trainers finished {} lost {} refused {}",
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
        report.refused
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
    observers: Vec<Client>,
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
        let observers = if root {
            (placement.trainers..placement.world_size)
                .filter(|&b| b != own)
                .map(|b| connect(b, Role::Observer { rank }))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Some(RemoteReplay {
            client,
            observers,
            fatal: config.buffer.fatal,
            lost_reported: false,
            replayed: 0,
            state_dim,
            timeout,
        }))
    }

    /// A fresh batch plus replayed trajectories: from the buffer rank (whatever has been
    /// prefetched, never waiting), or from local replay once the buffer rank is lost. Returns
    /// the batch and the number of fresh trajectories at its front.
    pub fn sample_batch(&mut self, state: &mut TrainState) -> Result<(Trajectories, usize)> {
        let mut batch = state.sample_fresh()?;
        let n = batch.len();
        let k = state.replay_count(n);
        let replayed = match self.client.lost() {
            None => {
                let mut replayed = Trajectories::new(self.state_dim);
                for item in self.client.take(k) {
                    if item.validate(self.state_dim).is_ok() {
                        let actions: Vec<usize> =
                            item.actions.iter().map(|&a| a as usize).collect();
                        replayed.push(&item.states, &actions, item.log_reward);
                    }
                }
                self.replayed += replayed.len() as u64;
                replayed
            }
            Some(reason) => {
                if self.fatal {
                    bail!(
                        "lost the replay-buffer rank at {}: {reason} (buffer.fatal = true)",
                        self.client.addr()
                    );
                }
                if !self.lost_reported {
                    tracing::warn!(
                        "lost the replay-buffer rank at {}: {reason}; continuing with local replay",
                        self.client.addr()
                    );
                    self.lost_reported = true;
                }
                state.replay.sample(k, self.state_dim, &mut state.rng)
            }
        };
        // Local replay also keeps a copy, to fall back on.
        state.replay.push(&batch);
        self.client.push(items(&batch));
        batch.extend(&replayed);
        Ok((batch, n))
    }

    /// Latest statistics over all buffer ranks (rank 0; polled in the background).
    pub fn metrics(&self) -> Option<BufferMetrics> {
        let stats: Vec<ServerStats> = std::iter::once(&self.client)
            .chain(&self.observers)
            .filter_map(Client::latest_stats)
            .collect();
        (!stats.is_empty()).then(|| BufferMetrics::combine(&stats))
    }

    /// Ends the sessions: every trainer waits until its pushes are stored; then rank 0 reads
    /// the final statistics of every buffer rank; then all shut down.
    pub fn finish(self, world: &mut World) -> Result<Option<BufferSummary>> {
        let lost_before = self.client.lost().is_some();
        // A buffer rank that stops answering without closing the connection (stopped, stuck).
        let unresponsive = self.client.sync(self.timeout).is_err() && self.client.lost().is_none();
        world.comm.barrier()?;
        let final_stats: Vec<ServerStats> = if world.is_root() {
            std::iter::once(&self.client)
                .chain(&self.observers)
                .filter_map(|c| c.sync(self.timeout).ok().or_else(|| c.latest_stats()))
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
