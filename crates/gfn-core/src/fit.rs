//! The training loop, as burn's Learner holds it: [`fit`] runs a [`TrainState`] to its last
//! step over any number of data-parallel ranks, with evaluations, checkpoints, an agreed stop
//! on request (a signal) and the divergence guard of [`TrainState::update`]. What differs
//! between runs plugs in through three traits:
//!
//! - [`Ranks`]: the other ranks (gfn-ddp implements it over its communicators; [`Alone`] is
//!   one process);
//! - [`BatchSource`]: where replayed trajectories come from ([`LocalReplay`], or a buffer rank)
//!   and what sees every fresh batch and every checkpoint;
//! - [`Hooks`]: progress, logging and metrics files, and stop requests (the binary's).

use crate::checkpoint::{self, RunIdentity};
use crate::train::{Diagnostics, Evaluation, NoReduction, StepMetrics, TrainState};
use crate::trajectories::Trajectories;
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

/// Ranks agree on a stop request every this many steps (one tiny all-reduce each time).
pub const STOP_CHECK_EVERY: u64 = 8;

/// The other ranks, as the loop needs them.
pub trait Ranks {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// [`TrainState::update`] with the gradient reduced over the ranks.
    fn update(&mut self, state: &mut TrainState, batch: &Trajectories) -> Result<StepMetrics>;
    /// Every rank's share of the optimizer moments on every rank (before a checkpoint).
    fn gather_optimizer_state(&mut self, state: &mut TrainState) -> Result<()>;
    /// Rank 0's parameters on every rank.
    fn broadcast_params(&mut self, state: &mut TrainState) -> Result<()>;
    /// Sums `values` over the ranks, in place.
    fn sum(&mut self, values: &mut [f32], device: Device) -> Result<()>;
    /// Every rank's `bytes`, in rank order.
    fn all_gather_bytes(&mut self, bytes: &[u8], device: Device) -> Result<Vec<Vec<u8>>>;
    fn barrier(&mut self) -> Result<()>;
}

/// One process, no other ranks.
pub struct Alone;

impl Ranks for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn update(&mut self, state: &mut TrainState, batch: &Trajectories) -> Result<StepMetrics> {
        state.update(batch, &mut NoReduction)
    }
    fn gather_optimizer_state(&mut self, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }
    fn broadcast_params(&mut self, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }
    fn sum(&mut self, _values: &mut [f32], _device: Device) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&mut self, bytes: &[u8], _device: Device) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Where a step's replayed trajectories come from, and who else sees the run's batches and
/// checkpoints.
pub trait BatchSource {
    /// `k` replayed trajectories for this step, or `None` to draw them from the state's own
    /// replay buffer.
    fn replayed(&mut self, k: usize) -> Result<Option<Trajectories>>;
    /// Sees every fresh batch (after the state's replay buffer has it).
    fn fresh(&mut self, _batch: &Trajectories) {}
    /// Every rank, before a checkpoint is written.
    fn before_checkpoint(&mut self) {}
    /// Rank 0, just before it writes the checkpoint of `step`.
    fn checkpoint(&mut self, _step: u64) {}
}

/// Replay from the state's own buffer (when `replay.capacity` > 0).
pub struct LocalReplay;

impl BatchSource for LocalReplay {
    fn replayed(&mut self, _k: usize) -> Result<Option<Trajectories>> {
        Ok(None)
    }
}

/// Where a run is after a step, as hooks see it.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    /// Fresh trajectories sampled so far by all ranks.
    pub trajectories: u64,
    pub steps_per_s: f64,
    pub trajectories_per_s: f64,
    /// At an evaluation, `loss` is the mean over the ranks.
    pub metrics: StepMetrics,
    /// Every `TrainConfig::diagnostics_every` steps: this rank's fresh batch under the policy.
    pub diagnostics: Option<Diagnostics>,
}

/// The binary's part of the loop. Every method has a default that does nothing.
pub trait Hooks {
    /// Whether this process was asked to stop; the ranks agree on it every
    /// [`STOP_CHECK_EVERY`] steps, then stop together after a checkpoint.
    fn stop_requested(&self) -> bool {
        false
    }
    /// Rank 0, after every step.
    fn after_step(&mut self, _state: &TrainState, _report: &StepReport) -> Result<()> {
        Ok(())
    }
    /// Rank 0, at every evaluation (every rank's observations merged into its metrics).
    fn after_evaluation(
        &mut self,
        _state: &TrainState,
        _report: &StepReport,
        _eval: &Evaluation,
    ) -> Result<()> {
        Ok(())
    }
}

/// No progress, no logging, never asked to stop.
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Where checkpoints go, and what they record about the run.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    pub path: PathBuf,
    pub identity: RunIdentity,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    /// The step to train to.
    pub steps: u64,
    /// Evaluate every this many steps (0: only at the last).
    pub evaluate_every: u64,
    /// Checkpoint every this many steps (0: only at the last, or when stopped).
    pub checkpoint_every: u64,
    pub checkpoint: Option<Checkpointing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every step done.
    Finished,
    /// Stopped on request after this step, with a checkpoint.
    Stopped { step: u64 },
}

/// How the loop went.
#[derive(Debug)]
pub struct FitReport {
    pub ending: Ending,
    pub first_step: u64,
    /// Seconds in sampling and updates (evaluations and checkpoints excluded).
    pub train_s: f64,
    pub last: StepMetrics,
    /// Rank 0, finished: the last evaluation (made at the end if none was due).
    pub last_eval: Option<Evaluation>,
    pub last_diagnostics: Option<Diagnostics>,
}

/// Restores `state` from the checkpoint at `path` on every rank, refusing one of another run
/// (`identity`), and gives every rank its own sampling stream from there.
pub fn resume(
    state: &mut TrainState,
    ranks: &mut dyn Ranks,
    checkpoint: &Checkpointing,
) -> Result<()> {
    checkpoint::load(state, &checkpoint.path, Some(&checkpoint.identity))?;
    if ranks.world_size() > 1 {
        state.reseed_sampling(ranks.rank() as u64);
    }
    Ok(())
}

/// Trains `state` to `schedule.steps` (see the module docs). Every rank starts from rank 0's
/// parameters.
pub fn fit(
    state: &mut TrainState,
    ranks: &mut dyn Ranks,
    source: &mut dyn BatchSource,
    hooks: &mut dyn Hooks,
    schedule: &Schedule,
) -> Result<FitReport> {
    if state.step > schedule.steps {
        return Err(Error::invalid(
            "train.steps",
            schedule.steps,
            format!("the checkpoint is already at step {}", state.step),
        ));
    }
    if ranks.world_size() > 1 {
        ranks.broadcast_params(state)?;
    }
    let root = ranks.rank() == 0;
    let mut report = FitReport {
        ending: Ending::Finished,
        first_step: state.step,
        train_s: 0.0,
        last: StepMetrics::before_training(state.epsilon()),
        last_eval: None,
        last_diagnostics: None,
    };
    let due = |every: u64, step: u64| every > 0 && step.is_multiple_of(every);
    while state.step < schedule.steps {
        if stop_agreed(ranks, hooks, state)? {
            save(state, ranks, source, schedule)?;
            report.ending = Ending::Stopped { step: state.step };
            return Ok(report);
        }
        let started = Instant::now();
        let (batch, fresh) = state.sample_batch_with(source)?;
        state.times.sampling += started.elapsed();
        report.last = ranks.update(state, &batch)?;
        report.train_s += started.elapsed().as_secs_f64();
        let last_step = state.step == schedule.steps;
        let diagnostics = due(state.config.diagnostics_every, state.step)
            .then(|| state.diagnostics(&batch.subset(0..fresh), &report.last));
        report.last_diagnostics = diagnostics.or(report.last_diagnostics);
        let mut step = step_report(state, ranks.world_size(), &report, diagnostics);
        if due(schedule.evaluate_every, state.step) || last_step {
            step.metrics.loss = mean_loss(state, ranks, report.last.loss)?;
            report.last.loss = step.metrics.loss;
            if root {
                let eval = evaluate(state)?;
                hooks.after_evaluation(state, &step, &eval)?;
                report.last_eval = Some(eval);
            }
        }
        if due(schedule.checkpoint_every, state.step) || last_step {
            save(state, ranks, source, schedule)?;
        }
        if root {
            hooks.after_step(state, &step)?;
        }
    }
    if state.step == report.first_step {
        // Nothing was left to do (resumed at the last step): still save and report.
        save(state, ranks, source, schedule)?;
        if root {
            report.last_eval = Some(evaluate(state)?);
        }
    }
    Ok(report)
}

/// Rank 0's evaluation, its time counted.
fn evaluate(state: &mut TrainState) -> Result<Evaluation> {
    let started = Instant::now();
    let eval = state.evaluate()?;
    state.times.evaluation += started.elapsed();
    Ok(eval)
}

fn step_report(
    state: &TrainState,
    world_size: usize,
    report: &FitReport,
    diagnostics: Option<Diagnostics>,
) -> StepReport {
    let steps_per_s = (state.step - report.first_step) as f64 / report.train_s;
    StepReport {
        step: state.step,
        trajectories: state.trajectories * world_size as u64,
        steps_per_s,
        // Every rank samples one fresh batch per step.
        trajectories_per_s: steps_per_s * (state.config.batch_size * world_size) as f64,
        metrics: report.last,
        diagnostics,
    }
}

/// Writes a checkpoint: buffer ranks first (they follow every rank's pushes), then rank 0's
/// file; no rank goes on (or exits, which a launcher may answer by killing the rest) before it
/// is written.
fn save(
    state: &mut TrainState,
    ranks: &mut dyn Ranks,
    source: &mut dyn BatchSource,
    schedule: &Schedule,
) -> Result<()> {
    let Some(target) = &schedule.checkpoint else {
        return Ok(());
    };
    let started = Instant::now();
    source.before_checkpoint();
    // Ranks that shared the update out hold current moments for their share only.
    ranks.gather_optimizer_state(state)?;
    if ranks.rank() == 0 {
        source.checkpoint(state.step);
        checkpoint::save(state, &target.path, &target.identity)?;
    }
    ranks.barrier()?;
    state.times.checkpoint += started.elapsed();
    Ok(())
}

/// Whether every rank should stop before this step's update: a request reached this process
/// (one rank) or any rank (checked together every [`STOP_CHECK_EVERY`] steps).
fn stop_agreed(ranks: &mut dyn Ranks, hooks: &dyn Hooks, state: &TrainState) -> Result<bool> {
    if ranks.world_size() == 1 {
        return Ok(hooks.stop_requested());
    }
    if !state.step.is_multiple_of(STOP_CHECK_EVERY) {
        return Ok(false);
    }
    let mut flag = [hooks.stop_requested() as u8 as f32];
    ranks.sum(&mut flag, state.estimators.device())?;
    Ok(flag[0] > 0.0)
}

/// What every rank's metrics observed (modes found, terminal states seen), merged into every
/// rank's own, and the ranks' mean loss.
fn mean_loss(state: &mut TrainState, ranks: &mut dyn Ranks, loss: f64) -> Result<f64> {
    if ranks.world_size() == 1 {
        return Ok(loss);
    }
    let device = state.estimators.device();
    let everyone = ranks.all_gather_bytes(&state.metrics.share(), device)?;
    for (rank, shared) in everyone.iter().enumerate() {
        if rank != ranks.rank() {
            state
                .metrics
                .absorb(shared)
                .map_err(|e| Error::MetricData {
                    metric: format!("the shares of rank {rank}"),
                    reason: e.to_string(),
                })?;
        }
    }
    let mut sum = [loss as f32];
    ranks.sum(&mut sum, device)?;
    Ok(sum[0] as f64 / ranks.world_size() as f64)
}
