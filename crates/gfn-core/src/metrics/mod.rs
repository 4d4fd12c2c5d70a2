//! Evaluation as metric modules that an environment opts into, shaped like gfnx's metrics
//! (`init / update / process / get`): each [`Metric`] observes the fresh training batches,
//! computes named values at an evaluation, and has a state that checkpoints keep (so a resumed
//! run evaluates exactly as an uninterrupted one) and that data-parallel ranks merge.
//!
//! - [`exact`]: TV/L1/KL/JSD against R/Z and the exact learned distribution (enumerable).
//! - [`modes`]: modes found under the environment's criterion, distinct terminal states seen.
//! - [`samples`]: reward statistics, mean reward of the top k and the ELBO over a fresh
//!   on-policy sample.
//! - [`correlation`]: Pearson and Spearman between log R(x) and the importance-sampled
//!   log p̂(x) on the environment's test set (gfnx's TestCorrelation).
//! - [`eubo`]: the EUBO, where an exact sampler of the target exists.

pub mod correlation;
pub mod eubo;
pub mod exact;
pub mod modes;
pub mod samples;

use crate::env::Environment;
use crate::estimators::Estimators;
use crate::losses::Prior;
use crate::trajectories::Trajectories;
use crate::truth::GroundTruth;
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What a metric may read at an evaluation.
pub struct EvalContext<'a> {
    pub env: &'a dyn Environment,
    pub estimators: &'a Estimators,
    pub truth: Option<&'a GroundTruth>,
    /// The prior and β of an objective relative to a prior (whose target is then tilted).
    pub relative: Option<(&'a Prior, f64)>,
    /// Derived from the seed and the step, so evaluating never moves the training RNG.
    pub rng: ChaCha8Rng,
}

/// Named values, in a stable order.
pub type Values = Vec<(String, f64)>;

pub trait Metric: Send {
    /// The name its state has in checkpoints.
    fn name(&self) -> &'static str;
    /// Sees every fresh batch of training trajectories (not replayed ones).
    fn observe(&mut self, _env: &dyn Environment, _batch: &Trajectories) {}
    /// The values at an evaluation.
    fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values>;
    /// What other ranks need to merge this rank's observations into theirs: everything
    /// observed since the last call (ranks exchange these at every evaluation).
    fn share(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Merges another rank's [`Metric::share`].
    fn absorb(&mut self, _shared: &[u8]) -> Result<()> {
        Ok(())
    }
    /// The state a checkpoint keeps.
    fn state(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// Which states count towards the modes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModesOf {
    /// The terminal states of training trajectories: the objects found.
    Terminal,
    /// Every state training visited, partial ones included (gfnx's bitseq baselines count
    /// these, a partial sequence's empty words as zero bits).
    Visited,
}

/// `[metrics]`: sizes of the sampled metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub modes_of: ModesOf,
    /// Fresh on-policy trajectories for reward statistics, top-k rewards and the ELBO.
    pub samples: usize,
    /// The k of the top-k mean rewards.
    pub top_k: Vec<usize>,
    /// Backward trajectories per test state in the importance-sampled log p̂(x) (gfnx: 10).
    pub test_rounds: usize,
    /// Target samples for the EUBO (enumerable environments).
    pub eubo_samples: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            modes_of: ModesOf::Terminal,
            samples: 1024,
            top_k: vec![10, 100],
            test_rounds: 10,
            eubo_samples: 1024,
        }
    }
}

/// Largest number of trajectories the sampled metrics roll out at once (a batch of the
/// networks' outputs per chunk).
const MAX_METRIC_SAMPLES: usize = 1 << 20;

impl MetricsConfig {
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("metrics.samples", self.samples),
            ("metrics.test_rounds", self.test_rounds),
            ("metrics.eubo_samples", self.eubo_samples),
        ] {
            if value == 0 || value > MAX_METRIC_SAMPLES {
                return Err(Error::invalid(
                    field,
                    value,
                    format!("must be in 1..={MAX_METRIC_SAMPLES}"),
                ));
            }
        }
        if let Some(&k) = self.top_k.iter().find(|&&k| k == 0 || k > self.samples) {
            return Err(Error::invalid(
                "metrics.top_k",
                k,
                format!("must be in 1..=metrics.samples = {}", self.samples),
            ));
        }
        Ok(())
    }
}

/// The metrics of one run, built from what the environment offers.
pub struct MetricSet {
    metrics: Vec<Box<dyn Metric>>,
}

impl MetricSet {
    /// Exact metrics where `truth` exists, modes where the environment has a criterion,
    /// test-set correlation where it has a test set; the rest for every environment.
    pub fn for_env(
        env: &dyn Environment,
        truth: Option<&GroundTruth>,
        config: &MetricsConfig,
        exact_samples: usize,
    ) -> Self {
        let mut metrics: Vec<Box<dyn Metric>> = Vec::new();
        if truth.is_some() {
            metrics.push(Box::new(exact::ExactDistribution::new(exact_samples)));
        }
        if let Some(modes) = env.modes() {
            metrics.push(Box::new(modes::ModesFound::new(
                modes.count(),
                config.modes_of,
            )));
        }
        metrics.push(Box::new(modes::DistinctTerminals::default()));
        metrics.push(Box::new(samples::OnPolicySamples::new(config)));
        if let Some(test_set) = env.test_set() {
            metrics.push(Box::new(correlation::TestCorrelation::new(
                env,
                test_set,
                config.test_rounds,
            )));
        }
        if truth.is_some() {
            metrics.push(Box::new(eubo::Eubo::new(config.eubo_samples)));
        }
        MetricSet { metrics }
    }

    pub fn observe(&mut self, env: &dyn Environment, batch: &Trajectories) {
        for metric in &mut self.metrics {
            metric.observe(env, batch);
        }
    }

    pub fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values> {
        let mut values = Values::new();
        for metric in &mut self.metrics {
            values.extend(metric.compute(ctx)?);
        }
        Ok(values)
    }

    /// Every metric's [`Metric::share`], in order, each behind its length (8 bytes, little
    /// endian): what this rank sends the others at an evaluation.
    pub fn share(&mut self) -> Vec<u8> {
        let mut packed = Vec::new();
        for metric in &mut self.metrics {
            let share = metric.share();
            packed.extend_from_slice(&(share.len() as u64).to_le_bytes());
            packed.extend_from_slice(&share);
        }
        packed
    }

    /// Merges another rank's [`MetricSet::share`].
    pub fn absorb(&mut self, mut packed: &[u8]) -> Result<()> {
        for metric in &mut self.metrics {
            let (length, rest) = packed
                .split_first_chunk::<8>()
                .ok_or_else(|| corrupt(metric.name(), "another rank's share ends early"))?;
            let length = u64::from_le_bytes(*length);
            if length > rest.len() as u64 {
                return Err(corrupt(metric.name(), "another rank's share is cut short"));
            }
            let (share, rest) = rest.split_at(length as usize);
            metric.absorb(share)?;
            packed = rest;
        }
        Ok(())
    }

    /// Each metric's name and checkpoint state.
    pub fn states(&self) -> Vec<(&'static str, Vec<u8>)> {
        self.metrics.iter().map(|m| (m.name(), m.state())).collect()
    }

    /// Restores each metric from its state; `lookup(name)` finds it in a checkpoint.
    pub fn restore(&mut self, lookup: impl Fn(&str) -> Option<Vec<u8>>) -> Result<()> {
        for metric in &mut self.metrics {
            let state = lookup(metric.name()).unwrap_or_default();
            metric.restore(&state)?;
        }
        Ok(())
    }
}

/// A malformed metric state (checkpoint) or share (another rank).
pub(crate) fn corrupt(metric: &str, what: &str) -> Error {
    Error::MetricData {
        metric: metric.to_string(),
        reason: what.to_string(),
    }
}

/// `u64`s as little-endian bytes, and back.
pub(crate) fn u64s_to_bytes(values: impl Iterator<Item = u64>) -> Vec<u8> {
    values.flat_map(u64::to_le_bytes).collect()
}

pub(crate) fn bytes_to_u64s(metric: &str, bytes: &[u8]) -> Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(corrupt(metric, "length is not a multiple of 8 bytes"));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}
