//! gfnx's TestCorrelation: on a fixed test set of terminal states, Pearson and Spearman
//! correlations between log R(x) and the learned log p̂(x), estimated by importance sampling
//! over backward trajectories: log p̂(x) = log mean_r exp(log P_F(τ_r) − log P_B(τ_r | x)) with
//! τ_r ~ P_B(· | x), an unbiased estimate of the terminating probability p(x) in probability
//! space (exact with one round where the DAG is a tree).

use super::{EvalContext, Metric, Values};
use crate::env::Environment;
use crate::estimators::Estimators;
use crate::losses::trajectory_log_probs;
use crate::sampler::backward_rollout;
use crate::truth::log_sum_exp;
use crate::Result;
use rand::Rng;

/// Test states rolled back and scored together.
const CHUNK: usize = 256;

pub struct TestCorrelation {
    /// Rows of `state_dim`.
    test_set: Vec<i64>,
    log_rewards: Vec<f64>,
    rounds: usize,
}

impl TestCorrelation {
    pub fn new(env: &dyn Environment, test_set: Vec<i64>, rounds: usize) -> Self {
        let mut log_r = vec![0f32; test_set.len() / env.state_dim()];
        env.log_reward(&test_set, &mut log_r);
        TestCorrelation {
            test_set,
            log_rewards: log_r.into_iter().map(f64::from).collect(),
            rounds,
        }
    }
}

impl Metric for TestCorrelation {
    fn name(&self) -> &'static str {
        "correlation"
    }

    fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values> {
        let log_p = importance_sampled_log_probs(
            ctx.env,
            ctx.estimators,
            &self.test_set,
            self.rounds,
            &mut ctx.rng,
        )?;
        Ok(vec![
            ("pearson".into(), pearson(&log_p, &self.log_rewards)),
            ("spearman".into(), spearman(&log_p, &self.log_rewards)),
        ])
    }
}

/// log p̂(x) for each terminal state of `states` (rows), from `rounds` backward trajectories
/// each.
pub fn importance_sampled_log_probs(
    env: &dyn Environment,
    estimators: &Estimators,
    states: &[i64],
    rounds: usize,
    rng: &mut impl Rng,
) -> Result<Vec<f64>> {
    let d = env.state_dim();
    let n = states.len() / d;
    let mut ratios = vec![Vec::with_capacity(rounds); n];
    for _ in 0..rounds {
        for (c, chunk) in states.chunks(CHUNK * d).enumerate() {
            let batch = backward_rollout(env, estimators, chunk, rng)?;
            let (log_pf, log_pb) = trajectory_log_probs(env, estimators, &batch);
            for (i, (pf, pb)) in log_pf.iter().zip(&log_pb).enumerate() {
                ratios[c * CHUNK + i].push(pf - pb);
            }
        }
    }
    let log_rounds = (rounds as f64).ln();
    Ok(ratios.iter().map(|r| log_sum_exp(r) - log_rounds).collect())
}

/// Pearson's correlation coefficient; NaN where either side is constant.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (mean_a, mean_b) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut var_a, mut var_b) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - mean_a, y - mean_b);
        cov += dx * dy;
        var_a += dx * dx;
        var_b += dy * dy;
    }
    cov / (var_a * var_b).sqrt()
}

/// Ranks 1..=n, ties sharing their average rank (scipy's `rankdata(method="average")`).
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Spearman's rank correlation: Pearson's on average ranks; NaN if any value is NaN.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    if a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ties in both; expected values from scipy 1.x: stats.pearsonr, stats.spearmanr and
    // stats.rankdata on the same data.
    const A: [f64; 10] = [0.3, -1.2, 2.5, 2.5, 0.0, 7.1, -3.3, 0.3, 1.0, 4.4];
    const B: [f64; 10] = [1.0, 0.1, 3.0, 2.0, -0.5, 5.0, -2.0, 0.3, 1.5, 1.5];

    #[test]
    fn correlations_match_scipy() {
        assert!((pearson(&A, &B) - 0.9169107418292785).abs() < 1e-12);
        assert!((spearman(&A, &B) - 0.929667955700181).abs() < 1e-12);
        assert_eq!(
            average_ranks(&A),
            [4.5, 2.0, 7.5, 7.5, 3.0, 10.0, 1.0, 4.5, 6.0, 9.0]
        );
        assert!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]).is_nan());
        assert!(
            pearson(&[1.0, 1.0], &[1.0, 2.0]).is_nan(),
            "a constant side"
        );
    }
}
