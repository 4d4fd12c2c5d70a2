//! `gfn train`: the training loop around the core's `TrainState`, with progress, JSON-lines
//! metrics, periodic evaluation and checkpoints, and a final summary.

use crate::config::Config;
use crate::progress::Progress;
use crate::remote::{BufferMetrics, BufferSummary, RemoteReplay};
use crate::rundir::{OutMode, RunDir};
use crate::signals;
use crate::tensorboard::EventWriter;
use anyhow::{bail, Context, Result};
use gfn_buffer::client::StatsView;
use gfn_core::checkpoint::{self, RunIdentity};
use gfn_core::estimators::Estimators;
use gfn_core::fit::{
    self, Checkpointing, Ending, FitReport, Hooks, LocalReplay, Schedule, StepReport,
};
use gfn_core::losses::LossConfig;
use gfn_core::parallel;
use gfn_core::timing::PhaseSummary;
use gfn_core::train::{Diagnostics, Evaluation, StepMetrics, TrainState};
use gfn_ddp::ranks::DataParallel;
use gfn_ddp::world::World;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

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
    pub device: String,
    /// Rank 0's time per phase (`time_<phase>_s`, `time_<phase>_ms_per_step`).
    #[serde(flatten)]
    pub timing: PhaseSummary,
    #[serde(flatten)]
    pub buffer: Option<BufferSummary>,
    /// The last diagnostics (every `train.log_every` steps, rank 0's batch).
    #[serde(flatten)]
    pub diagnostics: Option<Diagnostics>,
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

/// Builds the state for `config` on `device` (sampling stream `stream`).
pub fn build_state(config: &Config, device: Device, stream: u64) -> Result<TrainState> {
    let mut train_config = config.train_config()?;
    load_prior(&mut train_config.loss, config, device)?;
    let env = config.env.build()?;
    Ok(TrainState::new(env, train_config, device, stream)?)
}

/// Loads the prior policy of a relative objective (`loss.<name>.prior`, an earlier run's
/// directory): its configuration rebuilds the estimators, its checkpoint sets them.
fn load_prior(loss: &mut LossConfig, config: &Config, device: Device) -> Result<()> {
    let key = loss.name.key();
    let Some(prior) = loss.objective_mut().prior_mut() else {
        return Ok(());
    };
    if prior.is_attached() {
        return Ok(());
    }
    let dir = prior.run.clone();
    if dir.as_os_str().is_empty() {
        bail!("loss.{key}.prior is not set: {key} trains against the policy of an earlier run (its directory)");
    }
    let setting = || format!("loss.{key}.prior = {}", dir.display());
    let prior_config = Config::from_file(&dir.join(CONFIG_FILE)).with_context(setting)?;
    if prior_config.env != config.env {
        let describe = |c: &Config| {
            c.env
                .build()
                .map_or_else(|e| e.to_string(), |env| env.describe())
        };
        bail!(
            "{}: that run trained {}, this one trains {}",
            setting(),
            describe(&prior_config),
            describe(config)
        );
    }
    let env = prior_config.env.build()?;
    let estimators = prior_config
        .train_config()
        .with_context(setting)?
        .estimator_config();
    let mut policy = Estimators::new(
        env.as_ref(),
        estimators,
        device,
        &mut ChaCha8Rng::seed_from_u64(0),
    )
    .with_context(setting)?;
    checkpoint::load_parameters(&mut policy, &dir.join(CHECKPOINT_FILE)).with_context(setting)?;
    prior.attach(policy);
    Ok(())
}

/// What a checkpoint of this run records about it, and a resume must match.
fn identity(config: &Config, world_size: usize) -> RunIdentity {
    RunIdentity {
        world_size,
        settings: config.identity_settings(),
    }
}

/// `train.threads`, with 0 resolved to this machine's CPUs shared among the ranks that the
/// launcher runs on it (all ranks when it does not say), so that ranks never oversubscribe.
pub fn threads_per_rank(threads: usize) -> usize {
    parallel::resolve_threads(threads, crate::config::ranks_on_this_host())
}

/// Rank 0's side of the loop: progress, metrics.jsonl, TensorBoard, and stop requests
/// (every rank).
struct RunHooks {
    root: Option<RootOutputs>,
    log_every: u64,
    max_nonfinite_steps: u64,
}

struct RootOutputs {
    progress: Progress,
    metrics_file: std::fs::File,
    events: EventWriter,
    buffers: Vec<StatsView>,
    started: Instant,
    last_eval: Option<Evaluation>,
}

impl RunHooks {
    fn create(
        config: &Config,
        out: &Path,
        root: bool,
        buffers: Vec<StatsView>,
        first_step: u64,
    ) -> Result<Self> {
        let root = match root {
            false => None,
            true => Some(RootOutputs {
                progress: Progress::new(first_step, config.train.steps),
                metrics_file: std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out.join(METRICS_FILE))
                    .with_context(|| format!("opening {}", out.join(METRICS_FILE).display()))?,
                events: EventWriter::create(out).with_context(|| {
                    format!("creating a TensorBoard event file in {}", out.display())
                })?,
                buffers,
                started: Instant::now(),
                last_eval: None,
            }),
        };
        Ok(RunHooks {
            root,
            log_every: config.train.log_every,
            max_nonfinite_steps: config.train.max_nonfinite_steps,
        })
    }
}

impl RootOutputs {
    fn evaluated(&mut self, report: &StepReport, eval: &Evaluation) -> Result<()> {
        let line = MetricsLine {
            step: report.step,
            trajectories: report.trajectories,
            wall_s: self.started.elapsed().as_secs_f64(),
            steps_per_s: report.steps_per_s,
            train: &report.metrics,
            eval,
            buffer: BufferMetrics::latest(&self.buffers),
        };
        writeln!(self.metrics_file, "{}", serde_json::to_string(&line)?)?;
        self.events
            .scalars(report.step, &numeric_fields(&serde_json::to_value(&line)?))?;
        self.events.flush()?;
        self.progress.evaluation(report.step, eval);
        self.last_eval = Some(eval.clone());
        Ok(())
    }

    fn stepped(&mut self, report: &StepReport, log_every: u64) -> Result<()> {
        if log_every > 0 && report.step.is_multiple_of(log_every) {
            let m = &report.metrics;
            let mut scalars = vec![
                ("train/loss".into(), m.loss),
                ("train/steps_per_s".into(), report.steps_per_s),
                ("train/trajectories_per_s".into(), report.trajectories_per_s),
            ];
            if let Some(d) = &report.diagnostics {
                scalars.extend(
                    numeric_fields(&serde_json::to_value(d)?)
                        .into_iter()
                        .map(|(name, value)| (name.replacen("train_", "train/", 1), value)),
                );
            }
            self.events.scalars(report.step, &scalars)?;
        }
        self.progress.step(
            report.step,
            report.trajectories,
            report.metrics.loss,
            report.steps_per_s,
            report.trajectories_per_s,
            self.last_eval.as_ref(),
        );
        Ok(())
    }
}

fn hook_error(e: anyhow::Error) -> gfn_core::Error {
    gfn_core::Error::Hook(format!("{e:#}"))
}

impl Hooks for RunHooks {
    fn stop_requested(&self) -> bool {
        signals::requested()
    }

    fn after_step(&mut self, state: &TrainState, report: &StepReport) -> gfn_core::Result<()> {
        if report.metrics.skipped {
            tracing::warn!(
                "step {}: non-finite loss or gradient, update skipped ({} in a row, train.max_nonfinite_steps = {})",
                report.step,
                state.nonfinite_in_a_row,
                self.max_nonfinite_steps
            );
        }
        match self.root.as_mut() {
            Some(root) => root.stepped(report, self.log_every).map_err(hook_error),
            None => Ok(()),
        }
    }

    fn after_evaluation(
        &mut self,
        _state: &TrainState,
        report: &StepReport,
        eval: &Evaluation,
    ) -> gfn_core::Result<()> {
        match self.root.as_mut() {
            Some(root) => root.evaluated(report, eval).map_err(hook_error),
            None => Ok(()),
        }
    }
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
    let checkpointing = Checkpointing {
        path: out.join(CHECKPOINT_FILE),
        identity: identity(&config, world_size),
    };
    let mut state = build_state(&config, device, rank as u64)?;
    let resuming = mode == OutMode::Resume;
    if resuming {
        fit::resume(
            &mut state,
            &mut DataParallel::new(world.comm.as_mut()),
            &checkpointing,
        )?;
    }
    let mut remote = RemoteReplay::connect(world, &config, state.env.state_dim())?;
    if let Some(remote) = &remote {
        if resuming && root {
            remote.restore(state.step)?;
        }
        // No trainer samples from a buffer rank before it holds what it had.
        world.comm.barrier()?;
    }
    if let Some(dir) = &run_dir {
        dir.trim_metrics_after(METRICS_FILE, state.step)?;
        std::fs::write(out.join(CONFIG_FILE), config.to_toml())
            .with_context(|| format!("writing {}", out.join(CONFIG_FILE).display()))?;
    }
    let device_name = format!("{device:?}").to_lowercase();
    if root {
        announce(&state, &config, world, &device_name, &out);
    }
    let buffers = remote
        .as_ref()
        .map(RemoteReplay::stats_views)
        .unwrap_or_default();
    let mut hooks = RunHooks::create(&config, &out, root, buffers, state.step)?;
    let schedule = Schedule {
        steps: config.train.steps,
        evaluate_every: config.train.validate_every,
        checkpoint_every: config.train.checkpoint_every,
        checkpoint: Some(checkpointing),
    };
    let started = Instant::now();
    let mut ranks = DataParallel::new(world.comm.as_mut());
    let report = match remote.as_mut() {
        Some(remote) => fit::fit(&mut state, &mut ranks, remote, &mut hooks, &schedule),
        None => fit::fit(
            &mut state,
            &mut ranks,
            &mut LocalReplay,
            &mut hooks,
            &schedule,
        ),
    }
    .with_context(|| format!("training in {}", out.display()))?;
    if let Some(root) = &hooks.root {
        root.progress.finish();
    }
    let buffer = match remote {
        Some(remote) => remote.finish(world)?,
        None => None,
    };
    if let Ending::Stopped { step } = report.ending {
        return Ok(Outcome::Stopped { step });
    }
    world.comm.barrier()?;
    if !root {
        return Ok(Outcome::Finished(None));
    }
    let summary = summarise(&state, &report, started, world, device_name, buffer);
    std::fs::write(
        out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(Outcome::Finished(Some(Box::new(summary))))
}

fn summarise(
    state: &TrainState,
    report: &FitReport,
    started: Instant,
    world: &World,
    device: String,
    buffer: Option<BufferSummary>,
) -> Summary {
    let steps_done = state.step - report.first_step;
    Summary {
        env: state.env.describe(),
        loss: report.last.loss,
        eval: report
            .last_eval
            .clone()
            .expect("rank 0 has evaluated at the end"),
        steps: state.step,
        trajectories: state.trajectories * world.world_size() as u64,
        wall_s: started.elapsed().as_secs_f64(),
        steps_per_s: if report.train_s > 0.0 {
            steps_done as f64 / report.train_s
        } else {
            0.0
        },
        ranks: world.world_size(),
        backend: world.comm.backend().to_string(),
        device,
        timing: PhaseSummary {
            times: state.times,
            steps: steps_done,
        },
        diagnostics: report.last_diagnostics,
        buffer,
    }
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

/// The summary as an aligned two-column table, then the time per phase.
pub fn summary_table(summary: &Summary) -> String {
    let value = serde_json::to_value(summary).expect("the summary serialises");
    let rows: Vec<(String, String)> = value
        .as_object()
        .expect("the summary is an object")
        .iter()
        .filter(|(k, _)| !k.starts_with("time_"))
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
    out + "\n" + &summary.timing.table()
}
