//! Statistics of a fresh on-policy sample (no exploration): the reward's mean and quantiles,
//! the mean reward of the top k samples (gfnx's TopK), and the ELBO
//! E_{τ~P_F}[log P_B(τ|x) + log R(x) − log P_F(τ)], a lower bound on log Z.

use super::{EvalContext, Metric, MetricsConfig, Values};
use crate::losses::log_importance_weights;
use crate::sampler::{sample_trajectories, Exploration};
use crate::Result;

/// Trajectories rolled out and scored together.
const CHUNK: usize = 256;

pub struct OnPolicySamples {
    samples: usize,
    top_k: Vec<usize>,
}

impl OnPolicySamples {
    pub fn new(config: &MetricsConfig) -> Self {
        OnPolicySamples {
            samples: config.samples,
            top_k: config.top_k.clone(),
        }
    }
}

/// The q-quantile of sorted values, interpolating linearly between ranks (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

impl Metric for OnPolicySamples {
    fn name(&self) -> &'static str {
        "samples"
    }

    fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values> {
        let (mut log_rewards, mut elbo) = (Vec::with_capacity(self.samples), 0.0);
        let mut left = self.samples;
        while left > 0 {
            let n = left.min(CHUNK);
            left -= n;
            let batch = sample_trajectories(
                ctx.env,
                ctx.estimators,
                n,
                Exploration::ON_POLICY,
                &mut ctx.rng,
            )?;
            let weights = log_importance_weights(ctx.relative, ctx.env, ctx.estimators, &batch);
            elbo += weights.iter().sum::<f64>();
            log_rewards.extend(batch.log_rewards.iter().map(|&r| r as f64));
        }
        let n = log_rewards.len() as f64;
        let mut rewards: Vec<f64> = log_rewards.iter().map(|l| l.exp()).collect();
        rewards.sort_by(f64::total_cmp);
        let mut values = vec![
            ("reward_mean".to_string(), rewards.iter().sum::<f64>() / n),
            (
                "log_reward_mean".to_string(),
                log_rewards.iter().sum::<f64>() / n,
            ),
        ];
        for q in [10, 50, 90] {
            values.push((format!("reward_q{q}"), quantile(&rewards, q as f64 / 100.0)));
        }
        for &k in &self.top_k {
            let top = &rewards[rewards.len() - k..];
            values.push((
                format!("top_{k}_reward"),
                top.iter().sum::<f64>() / k as f64,
            ));
        }
        values.push(("elbo".to_string(), elbo / n));
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // numpy.quantile([1, 2, 4, 8], [0, 0.1, 0.5, 0.9, 1]) = 1, 1.3, 3, 6.8, 8
        let v = [1.0, 2.0, 4.0, 8.0];
        for (q, expected) in [(0.0, 1.0), (0.1, 1.3), (0.5, 3.0), (0.9, 6.8), (1.0, 8.0)] {
            assert!((quantile(&v, q) - expected).abs() < 1e-12, "{q}");
        }
        assert!(quantile(&[], 0.5).is_nan());
    }
}
