//! `gfn train`: the training loop around the core's `TrainState`, with progress, JSON-lines
//! metrics, periodic evaluation and checkpoints, and a final summary.

use crate::config::Config;
use crate::progress::Progress;
use crate::remote::{BufferMetrics, BufferSummary, RemoteReplay};
use crate::rundir::{OutMode, RunDir};
use crate::signals;
use crate::tensorboard::EventWriter;
use anyhow::{bail, Context, Result};
use gfn_core::checkpoint::{self, RunIdentity};
use gfn_core::parallel;
use gfn_core::train::{Evaluation, StepMetrics, TrainState};
use gfn_ddp::comm::{all_gather_bytes, ReduceOp};
use gfn_ddp::launch_env::RankInfo;
use gfn_ddp::reducer::AllReduceGradients;
use gfn_ddp::world::World;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

pub const CONFIG_FILE: &str = "config.toml";
pub const CHECKPOINT_FILE: &str = "checkpoint.pt";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// One line of `metrics.jsonl`, written at each evaluation.
#[derive(Serialize)]
struct MetricsLine<'a> {
    step: u64,
    trajectories: u64,
    wall_s: f64,
    steps_per_s: f64,
    #[serde(flatten)]
    train: &'a StepMetrics,
    #[serde(flatten)]
    eval: &'a Evaluation,
    #[serde(flatten)]
    buffer: Option<BufferMetrics>,
}

#[derive(Serialize)]
pub struct Summary {
    pub env: String,
    pub loss: f64,
    /// Every value of the last evaluation, by name.
    #[serde(flatten)]
    pub eval: Evaluation,
    pub steps: u64,
    pub trajectories: u64,
    pub wall_s: f64,
    pub steps_per_s: f64,
    /// Training ranks (data parallel).
    pub ranks: usize,
    pub backend: String,
    /// The all-reduce of the gradient itself.
    pub all_reduce_ms_per_step: f64,
    /// Waiting, before the all-reduce, for the rank with the longest trajectories.
    pub rank_wait_ms_per_step: f64,
    pub device: String,
    #[serde(flatten)]
    pub buffer: Option<BufferSummary>,
}

pub struct TrainRequest {
    pub config: Config,
    pub out: PathBuf,
    pub mode: OutMode,
}

/// How a run ended.
pub enum Outcome {
    /// Every step done; rank 0 has the summary.
    Finished(Option<Box<Summary>>),
    /// Stopped by a signal after `step` steps, with a checkpoint to resume from.
    Stopped { step: u64 },
}

/// Ranks agree on a stop request every this many steps (one tiny all-reduce each time).
const STOP_CHECK_EVERY: u64 = 8;

/// Builds the state for `config` on `device` (sampling stream `stream`).
pub fn build_state(config: &Config, device: Device, stream: u64) -> Result<TrainState> {
    let train_config = config.train_config()?;
    let env = config.env.build()?;
    Ok(TrainState::new(env, train_config, device, stream)?)
}

/// What a checkpoint of this run records about it, and a resume must match.
fn identity(config: &Config, world_size: usize) -> RunIdentity {
    RunIdentity {
        world_size,
        settings: config.identity_settings(),
    }
}

/// Restores `state` from the checkpoint in `out`, refusing one written by a different run.
fn resume_from(state: &mut TrainState, out: &Path, identity: &RunIdentity) -> Result<()> {
    checkpoint::load(state, &out.join(CHECKPOINT_FILE), Some(identity))?;
    Ok(())
}

/// `train.threads`, with 0 resolved to this machine's CPUs shared among the ranks that the
/// launcher runs on it (all ranks when it does not say), so that ranks never oversubscribe.
pub fn threads_per_rank(threads: usize) -> usize {
    let ranks_here = RankInfo::from_env()
        .ok()
        .map_or(1, |info| info.local_world_size.unwrap_or(info.world_size));
    parallel::resolve_threads(threads, ranks_here)
}

/// Everything rank 0 needs at an evaluation that involves the other ranks: what every rank's
/// metrics observed (modes found, terminal states seen), merged into every rank's own, and
/// their mean loss.
fn gather_for_evaluation(state: &mut TrainState, world: &mut World, loss: f64) -> Result<f64> {
    if world.world_size() == 1 {
        return Ok(loss);
    }
    let device = state.estimators.device();
    let everyone = all_gather_bytes(world.comm.as_mut(), &state.metrics.share(), device)?;
    for (rank, shared) in everyone.iter().enumerate() {
        if rank != world.rank() {
            state
                .metrics
                .absorb(shared)
                .with_context(|| format!("the metric shares of rank {rank}"))?;
        }
    }
    let mut buffer = Tensor::from_slice(&[loss as f32]).to_device(device);
    world.comm.all_reduce(&mut buffer, ReduceOp::Sum)?;
    let summed = Vec::<f32>::try_from(buffer.to_device(Device::Cpu))?;
    Ok(summed[0] as f64 / world.world_size() as f64)
}

/// Trains on this rank. Rank 0 evaluates, logs, checkpoints and returns the summary; the other
/// ranks finish with `None`. A stop signal ends every rank after the same step, with a
/// checkpoint.
pub fn train(request: TrainRequest, world: &mut World) -> Result<Outcome> {
    let TrainRequest { config, out, mode } = request;
    let root = world.is_root();
    let (rank, world_size) = (world.rank(), world.world_size());
    let run_dir = root.then(|| RunDir::claim(&out, mode)).transpose()?;
    let device = match world.device {
        Some(device) => device,
        None => config.device()?,
    };
    let identity = identity(&config, world_size);
    let mut state = build_state(&config, device, rank as u64)?;
    if mode == OutMode::Resume {
        resume_from(&mut state, &out, &identity)?;
    }
    if world_size > 1 {
        // Every rank starts from rank 0's parameters (and, resuming, its optimizer state).
        let mut params = state.estimators.params.flat().shallow_clone();
        world.comm.broadcast(&mut params, 0)?;
        if mode == OutMode::Resume {
            state.reseed_sampling(rank as u64);
        }
    }
    let mut remote = RemoteReplay::connect(world, &config, state.env.state_dim())?;
    if let Some(dir) = &run_dir {
        dir.trim_metrics_after(METRICS_FILE, state.step)?;
        std::fs::write(out.join(CONFIG_FILE), config.to_toml())
            .with_context(|| format!("writing {}", out.join(CONFIG_FILE).display()))?;
    }
    let total = config.train.steps;
    if state.step > total {
        bail!(
            "invalid train.steps = {total}: the checkpoint in {} is already at step {}",
            out.display(),
            state.step
        );
    }
    let device_name = format!("{device:?}").to_lowercase();
    if root {
        announce(&state, &config, world, &device_name, &out);
    }
    let mut events =
        if root {
            Some(EventWriter::create(&out).with_context(|| {
                format!("creating a TensorBoard event file in {}", out.display())
            })?)
        } else {
            None
        };
    let mut metrics_file = if root {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.join(METRICS_FILE))?,
        )
    } else {
        None
    };
    let checkpoint_path = out.join(CHECKPOINT_FILE);
    let save = |state: &mut TrainState, world: &mut World| -> Result<()> {
        // Ranks that shared the update out hold current moments for their share only.
        state.gather_optimizer_state(&mut AllReduceGradients::new(world.comm.as_mut()))?;
        if world.is_root() {
            checkpoint::save(state, &checkpoint_path, &identity)?;
        }
        Ok(())
    };
    let started = Instant::now();
    let mut train_time = 0.0;
    let (mut all_reduce_time, mut rank_wait_time) = (Duration::ZERO, Duration::ZERO);
    let first_step = state.step;
    let mut progress = root.then(|| Progress::new(first_step, total));
    let env_name = state.env.describe();
    let mut last = StepMetrics {
        loss: f64::NAN,
        batch_trajectories: 0,
        mean_log_reward: f64::NAN,
        mean_length: f64::NAN,
        epsilon: state.epsilon(),
        skipped: false,
    };
    let mut last_eval = None;
    let due = |every: u64, step: u64| every > 0 && step.is_multiple_of(every);
    while state.step < total {
        if stop_agreed(world, state.estimators.device(), state.step)? {
            save(&mut state, world)?;
            // No rank exits (which a launcher may answer by killing the rest) before rank 0
            // has written the checkpoint.
            world.comm.barrier()?;
            if let Some(remote) = remote {
                remote.finish(world)?;
            }
            if let Some(p) = &progress {
                p.finish();
            }
            return Ok(Outcome::Stopped { step: state.step });
        }
        let t = Instant::now();
        let mut reducer = AllReduceGradients::new(world.comm.as_mut());
        let (batch, _) = match remote.as_mut() {
            Some(remote) => remote.sample_batch(&mut state)?,
            None => state.sample_batch()?,
        };
        last = state.update(&batch, &mut reducer)?;
        all_reduce_time += reducer.elapsed;
        rank_wait_time += reducer.waited;
        train_time += t.elapsed().as_secs_f64();
        if last.skipped && root {
            tracing::warn!(
                "step {}: non-finite loss or gradient, update skipped ({} in a row, train.max_nonfinite_steps = {})",
                state.step,
                state.nonfinite_in_a_row,
                config.train.max_nonfinite_steps
            );
        }
        let steps_per_s = (state.step - first_step) as f64 / train_time;
        // Fresh trajectories: every training rank samples one batch per step.
        let trajectories_per_s = steps_per_s * (config.sampling.batch_size * world_size) as f64;
        let trajectories = state.trajectories * world_size as u64;
        if due(config.train.validate_every, state.step) || state.step == total {
            last.loss = gather_for_evaluation(&mut state, world, last.loss)?;
            if let Some(file) = metrics_file.as_mut() {
                let eval = state.evaluate()?;
                let line = MetricsLine {
                    step: state.step,
                    trajectories,
                    wall_s: started.elapsed().as_secs_f64(),
                    steps_per_s,
                    train: &last,
                    eval: &eval,
                    buffer: remote.as_ref().and_then(RemoteReplay::metrics),
                };
                writeln!(file, "{}", serde_json::to_string(&line)?)?;
                if let Some(events) = events.as_mut() {
                    events.scalars(state.step, &numeric_fields(&serde_json::to_value(&line)?))?;
                    events.flush()?;
                }
                if let Some(p) = &progress {
                    p.evaluation(state.step, &eval);
                }
                last_eval = Some(eval);
            }
        }
        if let Some(events) = events.as_mut() {
            if due(config.train.log_every, state.step) {
                events.scalars(
                    state.step,
                    &[
                        ("train/loss".into(), last.loss),
                        ("train/mean_log_reward".into(), last.mean_log_reward),
                        ("train/steps_per_s".into(), steps_per_s),
                        ("train/trajectories_per_s".into(), trajectories_per_s),
                    ],
                )?;
            }
        }
        if due(config.train.checkpoint_every, state.step) || state.step == total {
            save(&mut state, world)?;
        }
        if let Some(p) = progress.as_mut() {
            p.step(
                state.step,
                trajectories,
                last.loss,
                steps_per_s,
                trajectories_per_s,
                last_eval.as_ref(),
            );
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    let buffer = match remote {
        Some(remote) => remote.finish(world)?,
        None => None,
    };
    world.comm.barrier()?;
    if !root {
        return Ok(Outcome::Finished(None));
    }
    // A run with nothing left to do (e.g. resumed at its last step) still reports and saves.
    let eval = match last_eval {
        Some(eval) => eval,
        None => {
            checkpoint::save(&state, &checkpoint_path, &identity)?;
            state.evaluate()?
        }
    };
    let steps_done = state.step - first_step;
    let per_step_ms = |total: Duration| {
        if steps_done > 0 {
            1e3 * total.as_secs_f64() / steps_done as f64
        } else {
            0.0
        }
    };
    let summary = Summary {
        env: env_name,
        loss: last.loss,
        eval,
        steps: state.step,
        trajectories: state.trajectories * world_size as u64,
        wall_s: started.elapsed().as_secs_f64(),
        steps_per_s: if train_time > 0.0 {
            steps_done as f64 / train_time
        } else {
            0.0
        },
        ranks: world_size,
        backend: world.comm.backend().to_string(),
        all_reduce_ms_per_step: per_step_ms(all_reduce_time),
        rank_wait_ms_per_step: per_step_ms(rank_wait_time),
        device: device_name,
        buffer,
    };
    std::fs::write(
        out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(Outcome::Finished(Some(Box::new(summary))))
}

/// Whether every rank should stop before `step`'s update: a signal reached this process (one
/// rank) or any rank (checked together every [`STOP_CHECK_EVERY`] steps).
fn stop_agreed(world: &mut World, device: Device, step: u64) -> Result<bool> {
    if world.world_size() == 1 {
        return Ok(signals::requested());
    }
    if !step.is_multiple_of(STOP_CHECK_EVERY) {
        return Ok(false);
    }
    let mut flag = Tensor::from_slice(&[signals::requested() as u8 as f32]).to_device(device);
    world.comm.all_reduce(&mut flag, ReduceOp::Sum)?;
    Ok(flag.double_value(&[0]) > 0.0)
}

fn announce(state: &TrainState, config: &Config, world: &World, device: &str, out: &Path) {
    if let Some(reason) = &state.no_truth {
        tracing::info!("no exact metrics: {reason}");
    }
    tracing::info!(
        env = %state.env.describe(),
        loss = ?config.loss.name,
        batch = config.sampling.batch_size,
        ranks = world.world_size(),
        threads = config.train.threads,
        backend = world.comm.backend(),
        params = state.estimators.params.len(),
        device = %device,
        out = %out.display(),
        "training from step {} to {}",
        state.step,
        config.train.steps
    );
}

/// Every number in a metrics line except the step, as TensorBoard scalars named by their key.
fn numeric_fields(line: &serde_json::Value) -> Vec<(String, f64)> {
    line.as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.as_str() != "step")
        .filter_map(|(key, value)| value.as_f64().map(|v| (key.clone(), v)))
        .collect()
}

/// The summary as an aligned two-column table.
pub fn summary_table(summary: &Summary) -> String {
    let value = serde_json::to_value(summary).expect("the summary serialises");
    let rows: Vec<(String, String)> = value
        .as_object()
        .expect("the summary is an object")
        .iter()
        .map(|(k, v)| {
            let shown = match v.as_f64() {
                Some(x) if v.is_f64() => format!("{x:.6}"),
                _ => v.to_string().trim_matches('"').to_string(),
            };
            (k.clone(), shown)
        })
        .collect();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!(
        "{:<width$}  value\n{}  -----\n",
        "metric",
        "-".repeat(width)
    );
    for (k, v) in rows {
        out += &format!("{k:<width$}  {v}\n");
    }
    out
}
