//! The training state: estimators, optimizer, step, RNG (plus replay and modes found), with one
//! `update` = forward → loss → backward → gradient hook → optimizer step. The hook is where data
//! parallelism all-reduces the flat gradient; a single rank passes [`NoReduction`].

use crate::bounds::{self, product, Demand};
use crate::env::{Environment, NO_ACTION};
use crate::estimators::{
    additive_mask, masked_log_softmax, Architecture, BackwardPolicy, EstimatorConfig, Estimators,
    NoisyConfig, ParameterNoise,
};
use crate::fit::{BatchSource, LocalReplay};
use crate::losses::{
    estimated_log_z, log_importance_weights, loss_and_backward, pool_pays, LossConfig,
};
use crate::metrics::exact::{exact_terminating_distribution, forward_policy_table};
use crate::metrics::{EvalContext, MetricSet, MetricsConfig, Values};
use crate::optim::{Adam, OptimizerConfig, ReducedGradient};
use crate::parallel::{resolve_threads, training_pool, with_intra_op_threads, ThreadPool};
use crate::params::{all_below, all_finite};
use crate::replay::{ReplayBuffer, ReplayPolicy};
use crate::sampler::{
    sample_trajectories, sample_trajectories_parallel, EpsilonSchedule, Exploration,
};
use crate::subnormals::set_flush_on_this_thread;
use crate::timing::PhaseTimes;
use crate::trajectories::Trajectories;
use crate::truth::GroundTruth;
use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayConfig {
    /// 0 disables replay.
    pub capacity: usize,
    pub policy: ReplayPolicy,
    /// Replayed trajectories added to each batch, as a fraction of the batch size.
    pub ratio: f64,
    /// The distance rule of the diverse policy.
    pub diversity: gfn_diversity::Diversity,
}

impl ReplayConfig {
    /// Replayed trajectories to add to `fresh` fresh ones.
    pub fn count(&self, fresh: usize) -> usize {
        (self.ratio * fresh as f64).round() as usize
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub architecture: Architecture,
    pub backward: BackwardPolicy,
    /// NoisyNet exploration on P_F's last layers (rollouts only).
    pub noisy: NoisyConfig,
    pub loss: LossConfig,
    pub optimizer: OptimizerConfig,
    pub batch_size: usize,
    pub epsilon: EpsilonSchedule,
    pub temperature: f64,
    pub replay: ReplayConfig,
    pub seed: u64,
    /// CPU threads of this process; 0: every CPU it may run on.
    pub threads: usize,
    /// Terminal states sampled for the sampled distances to the exact target.
    pub exact_samples: usize,
    pub metrics: MetricsConfig,
    /// Updates in a row that may be skipped for a non-finite loss or gradient before training
    /// stops with [`Error::NonFinite`]; 0 stops at the first.
    pub max_nonfinite_steps: u64,
    /// Training diagnostics ([`TrainState::diagnostics`]) and the gradient norm every this
    /// many steps (0: never; the norm is then measured only to clip it).
    pub diagnostics_every: u64,
    /// Bytes this process may use; `None`: the memory available on the machine now. A run
    /// that would need more is refused before it allocates (see [`crate::bounds`]).
    pub memory_budget: Option<u64>,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid(
                "sampling.batch_size",
                0,
                "must be at least 1",
            ));
        }
        for (field, value) in [
            ("sampling.epsilon", self.epsilon.start),
            ("sampling.epsilon_end", self.epsilon.end),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::invalid(field, value, "must be in [0, 1]"));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(
                "sampling.temperature",
                self.temperature,
                "must be > 0",
            ));
        }
        if let Some((key, value, reason)) = self.replay.diversity.problem() {
            let field = match key {
                "cutoff_distance" => "replay.cutoff_distance",
                _ => "replay.p_norm_distance",
            };
            return Err(Error::invalid(field, value, reason));
        }
        if !(self.replay.ratio >= 0.0 && self.replay.ratio.is_finite()) {
            return Err(Error::invalid(
                "replay.ratio",
                self.replay.ratio,
                "must be >= 0",
            ));
        }
        crate::bounds::check_threads("train.threads", self.threads)?;
        self.loss.validate()?;
        self.metrics.validate()?;
        self.optimizer.validate()
    }

    /// Refuses a run whose memory would exceed [`TrainConfig::memory_budget`] (evaluation
    /// works in fixed-size chunks and is not counted). On a GPU only
    /// what lives in host memory is counted (the initial parameters and the replay buffer).
    pub fn check_resources(&self, env: &dyn Environment, device: Device) -> Result<()> {
        let Some(available) = self.memory_budget.or_else(bounds::available_memory) else {
            return Ok(());
        };
        bounds::check_memory(&self.memory_demands(env, device)?, available)
    }

    /// What the run holds in host memory: the parameters (built there first), the replay
    /// buffer and, on the CPU, one training batch with its activations.
    fn memory_demands(&self, env: &dyn Environment, device: Device) -> Result<Vec<Demand>> {
        let estimators = self.estimator_config();
        let params = Estimators::count_params(env, estimators)? as u64;
        let (field, value) = self.architecture.size_setting();
        let networks = 1
            + (estimators.backward == BackwardPolicy::Learned) as u64
            + estimators.log_flow as u64;
        let states = env.max_trajectory_length() as u64;
        let state_bytes = 8 * env.state_dim() as u64;
        let activations = product(&[4, networks, self.architecture.activation_floats(env)]);
        let trajectory = |per_state: u64| product(&[states, state_bytes.saturating_add(per_state)]);
        let replayed = match self.replay.capacity {
            0 => 0,
            _ => self.replay.count(self.batch_size) as u64,
        };
        let batch_field = if replayed > self.batch_size as u64 {
            ("replay.ratio", self.replay.ratio.to_string())
        } else {
            ("sampling.batch_size", self.batch_size.to_string())
        };
        let mut demands = vec![
            Demand::new(
                field,
                value,
                "parameters, gradients and Adam moments",
                params.saturating_mul(bounds::BYTES_PER_PARAMETER),
            ),
            Demand::new(
                "replay.capacity",
                self.replay.capacity,
                "replay buffer",
                product(&[self.replay.capacity as u64, trajectory(8)]),
            ),
        ];
        if device == Device::Cpu {
            demands.push(Demand::new(
                batch_field.0,
                batch_field.1,
                "one training batch",
                product(&[
                    (self.batch_size as u64).saturating_add(replayed),
                    trajectory(activations),
                ]),
            ));
        }
        Ok(demands)
    }

    /// The exact target of the objective: R/Z, or relative to a prior p_prior(x)·R(x)^β / Z
    /// (the prior's terminating distribution propagated exactly over the DAG).
    fn target(&self, env: &dyn Environment, truth: GroundTruth) -> Result<GroundTruth> {
        let Some((prior, beta)) = self.loss.objective().relative_to() else {
            return Ok(truth);
        };
        let table = prior
            .with_policy(|prior| forward_policy_table(env, prior))
            .expect("the objective's validation requires a loaded prior")?;
        Ok(truth.tilted(&exact_terminating_distribution(env, &table), beta))
    }

    /// What the objective asks of the environment.
    fn validate_for(&self, env: &dyn Environment) -> Result<()> {
        self.loss.objective().validate_for(env)
    }

    /// The estimators this configuration builds (a prior's are rebuilt from its own).
    pub fn estimator_config(&self) -> EstimatorConfig {
        EstimatorConfig::for_objective(
            self.architecture,
            self.backward,
            self.loss.objective().needs(),
        )
    }
}

/// Called between backward and the optimizer step with the flat gradient: where data
/// parallelism plugs in. The ranks may share the update out (as ZeRO stage 1 does): each sums
/// and steps only its share of the elements, then hands its share of the parameters to the
/// others; each rank's optimizer moments are then current on its share only.
pub trait GradientReducer {
    /// Sums `flat_grad` over the ranks in place, at least over the share of the elements
    /// that this rank updates, and says which share that is and how many ranks' gradients the
    /// sum holds. The optimizer step takes their mean, folded into its own pass.
    fn reduce_sum(&mut self, flat_grad: &mut Tensor) -> Result<ReducedGradient>;
    /// Copies every rank's share (as `reduce_sum` returns them) of `flat` from the rank that
    /// owns it to all ranks: the parameters after a step, the moments before a checkpoint.
    /// Nothing to do when every rank updates every element.
    fn gather_shares(&mut self, flat: &mut Tensor) -> Result<()>;
    /// Sums one number over the ranks (the squared gradient norm of each rank's share). Only
    /// reducers whose `reduce_sum` returns less than the whole gradient are asked.
    fn sum_over_ranks(&mut self, value: f64) -> Result<f64> {
        Ok(value)
    }
}

/// Single rank: the gradient is used as it is.
pub struct NoReduction;

impl GradientReducer for NoReduction {
    fn reduce_sum(&mut self, flat_grad: &mut Tensor) -> Result<ReducedGradient> {
        Ok(ReducedGradient::whole(flat_grad.numel()))
    }
    fn gather_shares(&mut self, _flat: &mut Tensor) -> Result<()> {
        Ok(())
    }
}

impl StepMetrics {
    /// What a report shows before the first step.
    pub fn before_training(epsilon: f64) -> Self {
        StepMetrics {
            loss: f64::NAN,
            batch_trajectories: 0,
            mean_log_reward: f64::NAN,
            mean_length: f64::NAN,
            epsilon,
            grad_norm: f64::NAN,
            skipped: false,
        }
    }
}

/// What gfnx's baselines log every few steps, on one rank's fresh trajectories.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Diagnostics {
    /// Mean entropy of P_F(·|s) over the states where the trajectories took an action.
    #[serde(rename = "train_entropy")]
    pub entropy: f64,
    /// Mean of log P_B(τ|x) + log R(x) − log P_F(τ), a lower bound on log Z.
    #[serde(rename = "train_elbo")]
    pub elbo: f64,
    #[serde(rename = "train_mean_reward")]
    pub mean_reward: f64,
    #[serde(rename = "train_mean_log_reward")]
    pub mean_log_reward: f64,
    /// States per trajectory, s0 and x included.
    #[serde(rename = "train_mean_length")]
    pub mean_length: f64,
    /// L2 norm of the step's mean gradient before clipping.
    #[serde(rename = "train_grad_norm")]
    pub grad_norm: f64,
}

/// L2 norm of the mean gradient over the ranks (what clipping compares), from each rank's
/// share of the sum.
fn mean_gradient_norm(
    grad_sum: &Tensor,
    reduced: &ReducedGradient,
    reducer: &mut dyn GradientReducer,
) -> Result<f64> {
    let share = &reduced.share;
    let squares = grad_sum
        .narrow(0, share.start as i64, share.len() as i64)
        .square()
        .sum(tch::Kind::Double)
        .double_value(&[]);
    let total = match share.len() == grad_sum.numel() {
        true => squares,
        false => reducer.sum_over_ranks(squares)?,
    };
    Ok(total.sqrt() / reduced.ranks.max(1) as f64)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub loss: f64,
    /// Trajectories in the update (fresh plus replayed).
    pub batch_trajectories: usize,
    pub mean_log_reward: f64,
    pub mean_length: f64,
    pub epsilon: f64,
    /// L2 norm of the mean gradient before clipping; NaN when the update was skipped or the
    /// step measured none (see [`TrainConfig::diagnostics_every`]). Reported through
    /// [`Diagnostics`].
    #[serde(skip)]
    pub grad_norm: f64,
    /// The update was skipped for a non-finite loss or gradient.
    #[serde(skip)]
    pub skipped: bool,
}

/// The values of an evaluation, by name: the learned log Z estimate, then every metric's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub values: Values,
}

impl Evaluation {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == name).map(|&(_, v)| v)
    }
}

/// A map of the values by name; whole numbers (counts such as modes_found) as JSON integers.
impl Serialize for Evaluation {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.values.len()))?;
        for (k, v) in self.values.iter().map(|(k, v)| (k, *v)) {
            if v.fract() == 0.0 && v.abs() < (1u64 << 53) as f64 {
                map.serialize_entry(k, &(v as i64))?;
            } else {
                map.serialize_entry(k, &v)?;
            }
        }
        map.end()
    }
}

/// Larger gradient elements count as non-finite: Adam squares them into its second moment,
/// and f32 holds squares up to 3.4e38 only (an infinite moment then stalls or poisons the
/// update). The mean over ranks stays below it too.
const GRADIENT_LIMIT: f32 = 1e19;

pub struct TrainState {
    pub env: Box<dyn Environment>,
    pub config: TrainConfig,
    pub estimators: Estimators,
    pub optimizer: Adam,
    pub step: u64,
    pub rng: ChaCha8Rng,
    pub replay: ReplayBuffer,
    /// Fresh trajectories sampled so far (replayed ones not counted).
    pub trajectories: u64,
    /// The exact target, where the environment can be enumerated.
    pub truth: Option<GroundTruth>,
    /// Why there is no exact target (the environment cannot be enumerated, or is too large).
    pub no_truth: Option<String>,
    pub metrics: MetricSet,
    /// Updates skipped in a row for a non-finite loss or gradient (see
    /// [`TrainConfig::max_nonfinite_steps`]).
    pub nonfinite_in_a_row: u64,
    /// Time spent in each phase since this state was built (not checkpointed).
    pub times: PhaseTimes,
    /// NoisyNet's noise on P_F, drawn for every rollout ([`TrainConfig::noisy`]).
    noise: Option<ParameterNoise>,
    /// Helper threads for rollouts, the update and Adam (CPU, several threads, where
    /// [`pool_pays`]); see [`crate::parallel`].
    pool: Option<ThreadPool>,
    /// The threads libtorch's own ops may use outside the update (evaluation).
    threads: usize,
}

impl TrainState {
    /// `stream` separates the sampling randomness of ranks that share a seed. The calling
    /// thread, which trains, flushes subnormal floats from here on, as do the helper threads
    /// spawned for it ([`crate::subnormals`]).
    pub fn new(
        env: Box<dyn Environment>,
        config: TrainConfig,
        device: Device,
        stream: u64,
    ) -> Result<Self> {
        config.validate()?;
        config.validate_for(env.as_ref())?;
        config.check_resources(env.as_ref(), device)?;
        set_flush_on_this_thread(true);
        let (truth, no_truth) = match GroundTruth::enumerate(env.as_ref()) {
            Ok(truth) => (Some(config.target(env.as_ref(), truth)?), None),
            Err(e @ (Error::NotEnumerable { .. } | Error::TooLargeToEnumerate { .. })) => {
                (None, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let mut init_rng = ChaCha8Rng::seed_from_u64(config.seed);
        let estimators = Estimators::new(
            env.as_ref(),
            config.estimator_config(),
            device,
            &mut init_rng,
        )?;
        let noise = ParameterNoise::new(&estimators, config.noisy)?;
        let optimizer = Adam::new(&estimators.params, config.optimizer);
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(stream + 1);
        let metrics = MetricSet::for_env(
            env.as_ref(),
            truth.as_ref(),
            &config.metrics,
            config.exact_samples,
        );
        let threads = resolve_threads(config.threads, 1);
        let replayed = match config.replay.capacity {
            0 => 0,
            _ => config.replay.count(config.batch_size),
        };
        let batch_trajectories = config.batch_size + replayed;
        let pool_pays = device == Device::Cpu
            && pool_pays(
                &config.loss,
                &estimators,
                threads,
                batch_trajectories,
                env.max_trajectory_length(),
            );
        let pool = pool_pays.then(|| training_pool(threads)).flatten();
        // Our threads take the cores during training; libtorch's would only compete with them.
        tch::set_num_threads(if pool.is_some() { 1 } else { threads as i32 });
        let replay = ReplayBuffer::new(
            config.replay.capacity,
            config.replay.policy,
            config.replay.diversity,
        );
        Ok(TrainState {
            env,
            config,
            estimators,
            optimizer,
            step: 0,
            rng,
            replay,
            trajectories: 0,
            truth,
            no_truth,
            metrics,
            nonfinite_in_a_row: 0,
            times: PhaseTimes::default(),
            noise,
            pool,
            threads,
        })
    }

    pub fn epsilon(&self) -> f64 {
        self.config.epsilon.at(self.step)
    }

    /// A fresh on-policy batch (with exploration); the metrics observe it (modes found,
    /// distinct terminal states).
    pub fn sample_fresh(&mut self) -> Result<Trajectories> {
        let exploration = Exploration {
            epsilon: self.epsilon(),
            temperature: self.config.temperature,
        };
        let n = self.config.batch_size;
        let noise = self
            .noise
            .as_ref()
            .map(|noise| noise.perturb(&mut self.estimators.params, &mut self.rng));
        let env = self.env.as_ref();
        let batch = match &self.pool {
            Some(pool) => sample_trajectories_parallel(
                pool,
                env,
                &self.estimators,
                n,
                exploration,
                &mut self.rng,
            ),
            None => sample_trajectories(env, &self.estimators, n, exploration, &mut self.rng),
        };
        if let Some(noise) = noise {
            noise.restore(&mut self.estimators.params);
        }
        let batch = batch?;
        self.metrics.observe(env, &batch);
        self.trajectories += n as u64;
        Ok(batch)
    }

    /// Replayed trajectories to add to `fresh` fresh ones.
    pub fn replay_count(&self, fresh: usize) -> usize {
        self.config.replay.count(fresh)
    }

    /// A fresh batch, plus trajectories replayed from the local buffer when enabled. Returns
    /// the batch and the number of fresh trajectories at its front.
    pub fn sample_batch(&mut self) -> Result<(Trajectories, usize)> {
        self.sample_batch_with(&mut LocalReplay)
    }

    /// A fresh batch, plus (with replay enabled) trajectories replayed from `source` or, where
    /// it has none, from the local buffer, which keeps a copy of every fresh batch. Returns the
    /// batch and the number of fresh trajectories at its front.
    pub fn sample_batch_with(
        &mut self,
        source: &mut dyn BatchSource,
    ) -> Result<(Trajectories, usize)> {
        let mut batch = self.sample_fresh()?;
        let n = batch.len();
        if self.config.replay.capacity > 0 {
            let k = self.replay_count(n);
            let replayed = match source.replayed(k)? {
                Some(replayed) => replayed,
                None => self.replay.sample(k, self.env.state_dim(), &mut self.rng),
            };
            self.replay.push(&batch);
            source.fresh(&batch);
            batch.extend(&replayed);
        }
        Ok((batch, n))
    }

    /// One gradient step on `batch`. A non-finite loss or gradient on any rank skips the update
    /// on every rank (up to `max_nonfinite_steps` in a row, then [`Error::NonFinite`]); a
    /// non-finite parameter after the step stops training at once. Either way the parameters
    /// a checkpoint could hold stay finite.
    pub fn update(
        &mut self,
        batch: &Trajectories,
        reducer: &mut dyn GradientReducer,
    ) -> Result<StepMetrics> {
        self.estimators.params.zero_grad();
        let done = loss_and_backward(
            &self.config.loss,
            self.env.as_ref(),
            &mut self.estimators,
            batch,
            self.pool.as_ref(),
        );
        let loss = done.loss.double_value(&[]);
        self.times.loss += done.forward;
        self.times.backward += done.backward;
        let mut grad = self.estimators.params.grad();
        let finite_here = loss.is_finite() && all_below(&grad, GRADIENT_LIMIT);
        if !finite_here {
            // Every element NaN: after the reduction every rank's share shows it, so all ranks
            // skip this update together.
            let _ = grad.fill_(f64::NAN);
        }
        let reduced = reducer.reduce_sum(&mut grad)?;
        let finite_everywhere = grad.double_value(&[reduced.share.start as i64]).is_finite();
        self.step += 1;
        let mut grad_norm = f64::NAN;
        if finite_everywhere {
            self.nonfinite_in_a_row = 0;
            let max = self.config.optimizer.max_grad_norm;
            let every = self.config.diagnostics_every;
            if max > 0.0 || (every > 0 && self.step.is_multiple_of(every)) {
                grad_norm = mean_gradient_norm(&grad, &reduced, reducer)?;
            }
            let scale = match max > 0.0 && grad_norm > max {
                true => max / (grad_norm + 1e-6),
                false => 1.0,
            };
            let started = std::time::Instant::now();
            self.optimizer.step_scaled(
                &mut self.estimators.params,
                &grad,
                &reduced,
                scale,
                self.pool.as_ref(),
            );
            self.times.optimizer += started.elapsed();
            reducer.gather_shares(&mut self.estimators.params.flat().shallow_clone())?;
            if !all_finite(self.estimators.params.flat()) {
                return Err(self.nonfinite("a parameter became non-finite in the update"));
            }
        } else {
            self.nonfinite_in_a_row += 1;
            if self.nonfinite_in_a_row > self.config.max_nonfinite_steps {
                let what = match finite_here {
                    true => "another rank's loss or gradient is non-finite",
                    false if !loss.is_finite() => "the loss is non-finite",
                    false => {
                        "the gradient is non-finite (or beyond 1e19, whose square f32 cannot hold)"
                    }
                };
                let in_a_row = match self.nonfinite_in_a_row {
                    1 => String::new(),
                    n => format!(" ({n} updates in a row)"),
                };
                return Err(self.nonfinite(&format!("{what}{in_a_row}")));
            }
        }
        Ok(StepMetrics {
            loss,
            batch_trajectories: batch.len(),
            mean_log_reward: batch.log_rewards.iter().map(|&r| r as f64).sum::<f64>()
                / batch.len() as f64,
            mean_length: batch.n_states() as f64 / batch.len() as f64,
            epsilon: self.epsilon(),
            grad_norm,
            skipped: !finite_everywhere,
        })
    }

    fn nonfinite(&self, what: &str) -> Error {
        Error::NonFinite {
            step: self.step,
            what: what.to_string(),
            allowed: self.config.max_nonfinite_steps,
        }
    }

    /// Makes this rank's optimizer moments whole after updates that `reducer` shared out
    /// (before a checkpoint). Collective: every rank calls it at the same step.
    pub fn gather_optimizer_state(&mut self, reducer: &mut dyn GradientReducer) -> Result<()> {
        for moment in self.optimizer.moments_mut() {
            reducer.gather_shares(moment)?;
        }
        Ok(())
    }

    /// [`Diagnostics`] of `batch` under the current policy (no autograd), with the gradient
    /// norm of the update `metrics` reports.
    pub fn diagnostics(&self, batch: &Trajectories, metrics: &StepMetrics) -> Diagnostics {
        let env = self.env.as_ref();
        let n = batch.len().max(1) as f64;
        let mean = |values: &mut dyn Iterator<Item = f64>| values.sum::<f64>() / n;
        let relative = self.config.loss.objective().relative_to();
        let weights = log_importance_weights(relative, env, &self.estimators, batch);
        let rewards = &batch.log_rewards;
        Diagnostics {
            entropy: self.policy_entropy(batch),
            elbo: mean(&mut weights.into_iter()),
            mean_reward: mean(&mut rewards.iter().map(|&r| (r as f64).exp())),
            mean_log_reward: mean(&mut rewards.iter().map(|&r| r as f64)),
            mean_length: batch.n_states() as f64 / n,
            grad_norm: metrics.grad_norm,
        }
    }

    /// Mean entropy of P_F over the states of `batch` that took an action.
    fn policy_entropy(&self, batch: &Trajectories) -> f64 {
        let env = self.env.as_ref();
        let acting: Vec<usize> = (0..batch.n_states())
            .filter(|&i| batch.actions[i] != NO_ACTION)
            .collect();
        if acting.is_empty() {
            return f64::NAN;
        }
        let states: Vec<i64> = acting
            .iter()
            .flat_map(|&i| batch.state(i).to_vec())
            .collect();
        let n_actions = env.n_actions();
        let mut masks = vec![false; acting.len() * n_actions];
        env.forward_masks(&states, &mut masks);
        tch::no_grad(|| {
            let device = self.estimators.device();
            let logits = self
                .estimators
                .pf_logits_no_grad(&self.estimators.input(env, &states));
            let log_p = masked_log_softmax(&logits, &additive_mask(&masks, n_actions, device));
            let plogp = (log_p.exp() * &log_p)
                .sum(tch::Kind::Double)
                .double_value(&[]);
            -plogp / acting.len() as f64
        })
    }

    /// Sample a batch and update on it.
    pub fn train_step(&mut self, reducer: &mut dyn GradientReducer) -> Result<StepMetrics> {
        let (batch, _) = self.sample_batch()?;
        self.update(&batch, reducer)
    }

    /// Re-derives the sampling RNG from (seed, step, stream): a data-parallel run resumed from
    /// rank 0's checkpoint gives each rank a fresh, distinct stream.
    pub fn reseed_sampling(&mut self, stream: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(
            self.config.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.rng.set_stream(stream + 1);
    }

    /// Metrics of the current policy. Uses its own RNG (derived from seed and step) so that
    /// evaluating never changes the training trajectory.
    pub fn evaluate(&mut self) -> Result<Evaluation> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0x9E37_79B9_7F4A_7C15);
        rng.set_stream(self.step);
        let mut ctx = EvalContext {
            env: self.env.as_ref(),
            estimators: &self.estimators,
            truth: self.truth.as_ref(),
            relative: self.config.loss.objective().relative_to(),
            rng,
        };
        let metrics = &mut self.metrics;
        // Evaluation's large batches are libtorch's to split over the threads.
        let computed = match &self.pool {
            Some(pool) => with_intra_op_threads(pool, self.threads, || metrics.compute(&mut ctx)),
            None => metrics.compute(&mut ctx),
        }?;
        let mut values = Values::new();
        if let Some(log_z) = estimated_log_z(
            self.config.loss.objective(),
            self.env.as_ref(),
            &self.estimators,
        ) {
            values.push(("log_z".into(), log_z));
            values.extend(self.config.loss.objective().values_from_log_z(log_z));
        }
        values.extend(computed);
        Ok(Evaluation { values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{HyperGrid, HyperGridConfig, RewardPreset};
    use crate::losses::LossKind;
    use crate::parallel::map_on_pool;
    use crate::subnormals::flushed_on_this_thread;

    #[test]
    fn the_training_thread_and_its_helpers_flush_subnormals() {
        std::thread::spawn(|| {
            set_flush_on_this_thread(false);
            let config = TrainConfig {
                architecture: Architecture::Mlp {
                    hidden: 16,
                    layers: 2,
                },
                backward: BackwardPolicy::Learned,
                noisy: Default::default(),
                loss: LossConfig::new(LossKind::Tb),
                optimizer: OptimizerConfig::default(),
                batch_size: 4,
                epsilon: EpsilonSchedule {
                    start: 0.0,
                    end: 0.0,
                    decay_steps: 0,
                },
                temperature: 1.0,
                replay: ReplayConfig {
                    capacity: 0,
                    policy: ReplayPolicy::Uniform,
                    ratio: 0.5,
                    diversity: Default::default(),
                },
                seed: 0,
                threads: 3,
                exact_samples: 1000,
                max_nonfinite_steps: 0,
                memory_budget: None,
                diagnostics_every: 0,
                metrics: MetricsConfig::default(),
            };
            let env = HyperGrid::new(HyperGridConfig::new(2, 4, RewardPreset::Standard)).unwrap();
            let state = TrainState::new(Box::new(env), config, Device::Cpu, 0).unwrap();
            assert!(flushed_on_this_thread());
            let pool = state.pool.as_ref().expect("three threads on the CPU");
            let flushed = map_on_pool(pool, vec![(); 3], |()| flushed_on_this_thread());
            assert_eq!(flushed, [true; 3]);
        })
        .join()
        .unwrap();
    }
}
