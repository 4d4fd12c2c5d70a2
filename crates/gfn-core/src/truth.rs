//! Exact ground truth by enumerating every state: log Z and the target distribution π(x) = R(x)/Z.

use crate::env::{Environment, Termination};
use crate::{Error, Result};

/// Largest state space enumerated for exact evaluation.
pub const MAX_ENUMERATED_STATES: usize = 1 << 24;

/// The number of states, when the environment can be enumerated and is small enough.
pub fn enumerable_states(env: &dyn Environment) -> Result<usize> {
    let enumeration = env.enumeration().ok_or_else(|| Error::NotEnumerable {
        env: env.describe(),
    })?;
    match enumeration.n_states() {
        Some(n) if n <= MAX_ENUMERATED_STATES as u64 => Ok(n as usize),
        count => Err(Error::TooLargeToEnumerate {
            env: env.describe(),
            n_states: count.map_or_else(|| "more than 2^64".into(), |n| n.to_string()),
            limit: MAX_ENUMERATED_STATES,
        }),
    }
}

/// All states in index order (`n_states × state_dim`).
pub fn all_states(env: &dyn Environment) -> Result<Vec<i64>> {
    let n = enumerable_states(env)?;
    let enumeration = env.enumeration().expect("enumerable_states checked it");
    let d = env.state_dim();
    let mut states = vec![0i64; n * d];
    for (i, row) in states.chunks_exact_mut(d).enumerate() {
        enumeration.state_from_index(i, row);
    }
    Ok(states)
}

/// Whether a trajectory can end in each state: the exit action is allowed there, or (without
/// an exit action) no action is.
pub fn can_terminate(env: &dyn Environment, states: &[i64]) -> Vec<bool> {
    let n_actions = env.n_actions();
    let mut masks = vec![false; states.len() / env.state_dim() * n_actions];
    env.forward_masks(states, &mut masks);
    masks
        .chunks_exact(n_actions)
        .map(|m| match env.termination() {
            Termination::ExitAction(exit) => m[exit],
            Termination::WhenComplete => !m.contains(&true),
        })
        .collect()
}

/// Whether each state (rows in index order) is reachable from s0: one pass in index order,
/// which is topological. Enumerations may index states that no trajectory reaches (a packing
/// over its capacity, say); those are no part of the target.
pub fn reachable(env: &dyn Environment, states: &[i64]) -> Vec<bool> {
    let enumeration = env.enumeration().expect("enumerated states");
    let (d, n_actions) = (env.state_dim(), env.n_actions());
    let exit = crate::env::exit_action(env);
    let n = states.len() / d;
    let mut masks = vec![false; n * n_actions];
    env.forward_masks(states, &mut masks);
    let mut reached = vec![false; n];
    let mut s0 = vec![0i64; d];
    env.initial_state(&mut s0);
    reached[enumeration.state_index(&s0)] = true;
    let mut child = vec![0i64; d];
    for i in 0..n {
        if !reached[i] {
            continue;
        }
        for a in (0..n_actions).filter(|&a| masks[i * n_actions + a] && Some(a) != exit) {
            child.copy_from_slice(&states[i * d..(i + 1) * d]);
            env.step(&mut child, &[a]);
            reached[enumeration.state_index(&child)] = true;
        }
    }
    reached
}

#[derive(Debug, Clone)]
pub struct GroundTruth {
    pub n_states: usize,
    /// log R per state index; `-inf` where no trajectory ends (not a terminal state, or not
    /// reachable).
    pub log_rewards: Vec<f64>,
    /// log of the unnormalised target per state index: log R(x), or, relative to a prior
    /// ([`GroundTruth::tilted`]), log p_prior(x) + β·log R(x).
    pub log_target: Vec<f64>,
    /// log Σ_x of the unnormalised target.
    pub log_z: f64,
    /// π(x) = target(x) / Z per state index (R(x) / Z unless tilted).
    pub probabilities: Vec<f64>,
}

impl GroundTruth {
    pub fn enumerate(env: &dyn Environment) -> Result<Self> {
        let states = all_states(env)?;
        let d = env.state_dim();
        let reached = reachable(env, &states);
        let terminal: Vec<bool> = can_terminate(env, &states)
            .into_iter()
            .zip(&reached)
            .map(|(t, &r)| t && r)
            .collect();
        let mut log_rewards = vec![f64::NEG_INFINITY; terminal.len()];
        let rows: Vec<usize> = (0..terminal.len()).filter(|&i| terminal[i]).collect();
        let mut terminal_states = Vec::with_capacity(rows.len() * d);
        for &i in &rows {
            terminal_states.extend_from_slice(&states[i * d..(i + 1) * d]);
        }
        let mut log_r32 = vec![0f32; rows.len()];
        env.log_reward(&terminal_states, &mut log_r32);
        for (&i, &lr) in rows.iter().zip(&log_r32) {
            log_rewards[i] = lr as f64;
        }
        Ok(GroundTruth::normalised(log_rewards.clone(), log_rewards))
    }

    fn normalised(log_rewards: Vec<f64>, log_target: Vec<f64>) -> Self {
        let log_z = log_sum_exp(&log_target);
        let probabilities = log_target.iter().map(|&lt| (lt - log_z).exp()).collect();
        GroundTruth {
            n_states: log_rewards.len(),
            log_rewards,
            log_target,
            log_z,
            probabilities,
        }
    }

    /// The target of an objective relative to a prior: p_prior(x)·R(x)^β / Z, from the exact
    /// probability `prior` (per state index) that the prior policy terminates in x.
    pub fn tilted(&self, prior: &[f64], beta: f64) -> Self {
        let log_target = self
            .log_rewards
            .iter()
            .zip(prior)
            .map(
                |(&log_r, &p)| match log_r == f64::NEG_INFINITY || p <= 0.0 {
                    true => f64::NEG_INFINITY,
                    false => p.ln() + beta * log_r,
                },
            )
            .collect();
        GroundTruth::normalised(self.log_rewards.clone(), log_target)
    }
}

pub fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{HyperGrid, HyperGridConfig, RewardPreset};

    #[test]
    fn hypergrid_4x8_easy_has_the_hand_computed_partition() {
        let env = HyperGrid::new(HyperGridConfig::new(4, 8, RewardPreset::Easy)).unwrap();
        let truth = GroundTruth::enumerate(&env).unwrap();
        assert_eq!(truth.n_states, 4096);
        // Per coordinate, 4 of 8 values lie in the outer band and 2 in the inner band, so
        // Z = 4096 R0 + 4^4 R1 + 2^4 R2.
        let z = 4096.0 * 1e-3 + 256.0 * 0.5 + 16.0 * 2.0;
        assert!(
            (truth.log_z - f64::ln(z)).abs() < 1e-5,
            "{} vs {}",
            truth.log_z,
            z.ln()
        );
        let total: f64 = truth.probabilities.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn too_large_spaces_name_their_real_size() {
        let env = HyperGrid::new(HyperGridConfig::new(10, 10, RewardPreset::Standard)).unwrap();
        let err = GroundTruth::enumerate(&env).unwrap_err().to_string();
        assert!(err.contains("10000000000 states"), "{err}");
        let env = HyperGrid::new(HyperGridConfig::new(40, 64, RewardPreset::Standard)).unwrap();
        let err = GroundTruth::enumerate(&env).unwrap_err().to_string();
        assert!(err.contains("more than 2^64 states"), "{err}");
    }
}
