//! Evaluation against the exact target (enumerable environments): the learned terminating
//! distribution computed exactly by propagating P_F over the DAG, and the empirical
//! distribution of freshly sampled states.

use super::{EvalContext, Metric, Values};
use crate::env::{exit_action, Environment};
use crate::estimators::Estimators;
use crate::policy_weights::policy_weights;
use crate::truth::{all_states, GroundTruth};
use crate::Result;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// States per forward pass when tabulating the policy.
const TABLE_CHUNK: usize = 1 << 16;
/// Floor of empirical probabilities inside KL(π‖p̂), so unseen states give a finite value.
pub const EMPIRICAL_FLOOR: f64 = 1e-10;

/// P_F(a | s) for every state index, `n_states × n_actions`, in f64.
pub fn forward_policy_table(env: &dyn Environment, estimators: &Estimators) -> Result<Vec<f64>> {
    let states = all_states(env)?;
    let (d, n_actions) = (env.state_dim(), env.n_actions());
    let n = states.len() / d;
    let mut table = Vec::with_capacity(n * n_actions);
    let mut masks = vec![false; TABLE_CHUNK.min(n) * n_actions];
    let mut weights = Vec::with_capacity(n_actions);
    for chunk in states.chunks(TABLE_CHUNK * d) {
        let rows = chunk.len() / d;
        let logits = estimators
            .pf_logits_no_grad(&estimators.input(env, chunk))
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let logits = Vec::<f32>::try_from(logits.contiguous().view([-1])).expect("f32 logits");
        let masks = &mut masks[..rows * n_actions];
        env.forward_masks(chunk, masks);
        for (row, mask) in logits
            .chunks_exact(n_actions)
            .zip(masks.chunks_exact(n_actions))
        {
            // The sampler's own weights; a row with no allowed action (a complete state) is
            // all zeros, left as it is.
            let (total, _) = policy_weights(row, mask, 1.0, &mut weights);
            let total = if total > 0.0 { total } else { 1.0 };
            table.extend(weights.iter().map(|&w| w / total));
        }
    }
    Ok(table)
}

/// The exact probability of terminating in each state under `policy` (from
/// [`forward_policy_table`]): one pass in index order, which is topological. A state ends a
/// trajectory with the policy's exit probability, or, without an exit action, always once
/// complete (a row with no allowed action).
pub fn exact_terminating_distribution(env: &dyn Environment, policy: &[f64]) -> Vec<f64> {
    let (d, n_actions, exit) = (env.state_dim(), env.n_actions(), exit_action(env));
    let enumeration = env
        .enumeration()
        .expect("a policy table implies enumeration");
    let n = policy.len() / n_actions;
    let mut reach = vec![0f64; n];
    let mut terminate = vec![0f64; n];
    let mut s0 = vec![0i64; d];
    env.initial_state(&mut s0);
    reach[enumeration.state_index(&s0)] = 1.0;
    let (mut state, mut child) = (vec![0i64; d], vec![0i64; d]);
    for i in 0..n {
        if reach[i] == 0.0 {
            continue;
        }
        let row = &policy[i * n_actions..(i + 1) * n_actions];
        terminate[i] = match exit {
            Some(exit) => reach[i] * row[exit],
            None if row.iter().all(|&p| p == 0.0) => reach[i],
            None => 0.0,
        };
        enumeration.state_from_index(i, &mut state);
        for (a, &p) in row
            .iter()
            .enumerate()
            .filter(|&(a, &p)| Some(a) != exit && p > 0.0)
        {
            child.copy_from_slice(&state);
            env.step(&mut child, &[a]);
            reach[enumeration.state_index(&child)] += reach[i] * p;
        }
    }
    terminate
}

/// Terminal-state counts of `n` trajectories sampled from `policy`. Equivalent in distribution
/// to rolling out the network, at a table lookup per step.
pub fn sample_terminal_counts(
    env: &dyn Environment,
    policy: &[f64],
    n: usize,
    rng: &mut impl Rng,
) -> Vec<u64> {
    let (d, n_actions, exit) = (env.state_dim(), env.n_actions(), exit_action(env));
    let enumeration = env
        .enumeration()
        .expect("a policy table implies enumeration");
    let mut counts = vec![0u64; policy.len() / n_actions];
    let mut state = vec![0i64; d];
    for _ in 0..n {
        env.initial_state(&mut state);
        loop {
            let i = enumeration.state_index(&state);
            let row = &policy[i * n_actions..(i + 1) * n_actions];
            // Rounding can leave `u` past the last cumulative value: fall back to the last
            // action with probability mass. A row without any is a complete state.
            let Some(mut action) = row.iter().rposition(|&p| p > 0.0) else {
                counts[i] += 1;
                break;
            };
            let u: f64 = rng.gen();
            let mut acc = 0.0;
            for (a, &p) in row.iter().enumerate() {
                acc += p;
                if u < acc && p > 0.0 {
                    action = a;
                    break;
                }
            }
            if Some(action) == exit {
                counts[i] += 1;
                break;
            }
            env.step(&mut state, &[action]);
        }
    }
    counts
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributionMetrics {
    /// Σ |p̂ − π| over states, p̂ the empirical distribution of the samples.
    pub l1: f64,
    /// L1 / 2.
    pub tv: f64,
    /// KL(π ‖ p̂), p̂ floored at [`EMPIRICAL_FLOOR`].
    pub kl: f64,
    /// Jensen–Shannon divergence between π and p̂ (nats).
    pub jsd: f64,
    /// TV between π and the exact learned terminating distribution.
    pub exact_tv: f64,
    /// KL(π ‖ P_T) with P_T the exact learned terminating distribution.
    pub exact_kl: f64,
}

pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

/// KL(p ‖ q) with q floored at `floor`.
pub fn kl_divergence(p: &[f64], q: &[f64], floor: f64) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| a * (a / b.max(floor)).ln())
        .sum()
}

pub fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| 0.5 * (a + b)).collect();
    0.5 * kl_divergence(p, &m, 0.0) + 0.5 * kl_divergence(q, &m, 0.0)
}

/// All distribution metrics of the current forward policy against the truth.
pub fn evaluate_policy(
    env: &dyn Environment,
    estimators: &Estimators,
    truth: &GroundTruth,
    n_samples: usize,
    rng: &mut impl Rng,
) -> Result<DistributionMetrics> {
    let policy = forward_policy_table(env, estimators)?;
    let exact = exact_terminating_distribution(env, &policy);
    let counts = sample_terminal_counts(env, &policy, n_samples, rng);
    let empirical: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 / n_samples.max(1) as f64)
        .collect();
    let pi = &truth.probabilities;
    let tv = total_variation(&empirical, pi);
    Ok(DistributionMetrics {
        l1: 2.0 * tv,
        tv,
        kl: kl_divergence(pi, &empirical, EMPIRICAL_FLOOR),
        jsd: jensen_shannon(pi, &empirical),
        exact_tv: total_variation(&exact, pi),
        exact_kl: kl_divergence(pi, &exact, 0.0),
    })
}

/// l1, tv, kl, jsd (sampled), exact_tv, exact_kl and true_log_z.
pub struct ExactDistribution {
    samples: usize,
}

impl ExactDistribution {
    /// `samples` terminal states drawn for the sampled distances.
    pub fn new(samples: usize) -> Self {
        ExactDistribution { samples }
    }
}

impl Metric for ExactDistribution {
    fn name(&self) -> &'static str {
        "exact"
    }

    fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values> {
        let truth = ctx.truth.expect("built only where the truth is known");
        let d = evaluate_policy(ctx.env, ctx.estimators, truth, self.samples, &mut ctx.rng)?;
        Ok([
            ("l1", d.l1),
            ("tv", d.tv),
            ("kl", d.kl),
            ("jsd", d.jsd),
            ("exact_tv", d.exact_tv),
            ("exact_kl", d.exact_kl),
            ("true_log_z", truth.log_z),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergences_by_hand() {
        let p = [0.5, 0.5, 0.0];
        let q = [0.25, 0.25, 0.5];
        assert!((total_variation(&p, &q) - 0.5).abs() < 1e-12);
        assert!((kl_divergence(&p, &q, 0.0) - (2.0f64).ln()).abs() < 1e-12);
        // m = (3/8, 3/8, 1/4): JSD = ½ ln(4/3) + ½ (½ ln(2/3) + ½ ln 2).
        let expected =
            0.5 * (4.0f64 / 3.0).ln() + 0.5 * (0.5 * (2.0f64 / 3.0).ln() + 0.5 * 2.0f64.ln());
        assert!((jensen_shannon(&p, &q) - expected).abs() < 1e-12);
    }
}
