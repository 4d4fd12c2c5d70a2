//! Exact ground truth by enumerating every state: log Z, the target distribution, the modes.

use crate::env::Environment;
use crate::{Error, Result};

/// Largest state space enumerated for exact evaluation.
pub const MAX_ENUMERATED_STATES: usize = 1 << 24;

pub fn enumerable_states(env: &dyn Environment) -> Result<usize> {
    match env.n_states() {
        Some(n) if n <= MAX_ENUMERATED_STATES => Ok(n),
        other => Err(Error::TooLargeToEnumerate {
            n_states: other.map_or(u128::MAX, |n| n as u128),
            limit: MAX_ENUMERATED_STATES,
        }),
    }
}

/// All states in index order (`n_states × state_dim`).
pub fn all_states(env: &dyn Environment) -> Result<Vec<i64>> {
    let n = enumerable_states(env)?;
    let d = env.state_dim();
    let mut states = vec![0i64; n * d];
    for (i, row) in states.chunks_exact_mut(d).enumerate() {
        env.state_from_index(i, row);
    }
    Ok(states)
}

#[derive(Debug, Clone)]
pub struct GroundTruth {
    pub n_states: usize,
    /// log R per state index; `-inf` where exit is not allowed (not a terminal state).
    pub log_rewards: Vec<f64>,
    pub log_z: f64,
    /// π(x) = R(x) / Z per state index.
    pub probabilities: Vec<f64>,
    /// State indices with the maximal reward.
    pub modes: Vec<usize>,
    pub is_mode: Vec<bool>,
}

impl GroundTruth {
    pub fn enumerate(env: &dyn Environment) -> Result<Self> {
        let states = all_states(env)?;
        let n = states.len() / env.state_dim();
        let mut log_r32 = vec![0f32; n];
        env.log_reward(&states, &mut log_r32);
        let mut masks = vec![false; n * env.n_actions()];
        env.forward_masks(&states, &mut masks);
        let exit = env.exit_action();
        let log_rewards: Vec<f64> = log_r32
            .iter()
            .zip(masks.chunks_exact(env.n_actions()))
            .map(|(&lr, m)| {
                if m[exit] {
                    lr as f64
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let log_z = log_sum_exp(&log_rewards);
        let probabilities = log_rewards.iter().map(|&lr| (lr - log_z).exp()).collect();
        let max = log_rewards
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        // f32 log-rewards of equal rewards are bitwise equal; the tolerance only guards rounding.
        let is_mode: Vec<bool> = log_rewards.iter().map(|&lr| lr >= max - 1e-6).collect();
        let modes = (0..n).filter(|&i| is_mode[i]).collect();
        Ok(GroundTruth {
            n_states: n,
            log_rewards,
            log_z,
            probabilities,
            modes,
            is_mode,
        })
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
    fn hypergrid_4x8_easy_has_16_modes_and_the_hand_computed_partition() {
        let env = HyperGrid::new(HyperGridConfig::new(4, 8, RewardPreset::Easy)).unwrap();
        let truth = GroundTruth::enumerate(&env).unwrap();
        assert_eq!(truth.n_states, 4096);
        assert_eq!(truth.modes.len(), 16);
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
    fn hypergrid_2x64_has_144_modes() {
        // |x/63 - 0.5| in (0.3, 0.4) for x in 7..=12 and 51..=56: 12 values per coordinate.
        let env = HyperGrid::new(HyperGridConfig::new(2, 64, RewardPreset::Standard)).unwrap();
        assert_eq!(GroundTruth::enumerate(&env).unwrap().modes.len(), 144);
    }
}
