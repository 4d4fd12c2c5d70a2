//! Rolling out trajectories: batched environment stepping in Rust, one policy forward per step
//! over the trajectories still running, ε-uniform exploration and temperature.

use crate::env::{exit_action, Environment, NO_ACTION};
use crate::estimators::{Estimators, HostScratch};
use crate::parallel::{even_shares, map_on_pool, ReadOnly, ThreadPool};
use crate::policy_weights::policy_weights;
use crate::trajectories::Trajectories;
use crate::unique::UniqueRows;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// How actions are drawn from the forward logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exploration {
    /// Probability of drawing uniformly among the allowed actions instead of from the policy.
    pub epsilon: f64,
    /// Logits are divided by this before the softmax.
    pub temperature: f64,
}

impl Exploration {
    pub const ON_POLICY: Exploration = Exploration {
        epsilon: 0.0,
        temperature: 1.0,
    };
}

/// ε as a function of the training step: constant, or linear from `start` to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonSchedule {
    pub start: f64,
    pub end: f64,
    /// Steps over which ε goes linearly from `start` to `end`; 0 keeps `start`.
    pub decay_steps: u64,
}

impl EpsilonSchedule {
    pub fn at(&self, step: u64) -> f64 {
        if self.decay_steps == 0 {
            return self.start;
        }
        let t = (step as f64 / self.decay_steps as f64).min(1.0);
        self.start + (self.end - self.start) * t
    }
}

/// Draws an action from `logits` restricted to `mask`, with exploration. Probabilities are
/// formed in f64 so that tiny ε and peaked policies stay exact.
pub fn choose_action(
    logits: &[f32],
    mask: &[bool],
    exploration: Exploration,
    rng: &mut impl Rng,
    scratch: &mut Vec<f64>,
) -> usize {
    let (total, n_allowed) = policy_weights(logits, mask, 1.0 / exploration.temperature, scratch);
    let eps = exploration.epsilon;
    let uniform = if n_allowed > 0 {
        eps / n_allowed as f64
    } else {
        0.0
    };
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    let mut last_allowed = 0;
    for (a, (&w, &m)) in scratch.iter().zip(mask).enumerate() {
        if !m {
            continue;
        }
        last_allowed = a;
        acc += (1.0 - eps) * w / total + uniform;
        if u < acc {
            return a;
        }
    }
    last_allowed
}

/// Rolls out `n` trajectories from the initial state. `policy` fills forward logits
/// (`rows × n_actions`) for a batch of states; it is called once per step with the distinct
/// states of the running trajectories that still have an action to take (all of them start at
/// s0, and many share prefixes). A trajectory ends with the exit action, or, in environments
/// without one, at the first state that allows no action (recorded with [`NO_ACTION`]).
pub fn rollout(
    env: &dyn Environment,
    n: usize,
    exploration: Exploration,
    rng: &mut impl Rng,
    mut policy: impl FnMut(&[i64], &mut Vec<f32>),
) -> Result<Trajectories> {
    let (d, n_actions, exit) = (env.state_dim(), env.n_actions(), exit_action(env));
    // `batch` holds the states of the running trajectories, in the order of `active`.
    let mut batch = vec![0i64; n * d];
    for row in batch.chunks_exact_mut(d) {
        env.initial_state(row);
    }
    let mut visited: Vec<Vec<i64>> = vec![Vec::new(); n];
    let mut taken: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut active: Vec<usize> = (0..n).collect();
    let (mut masks, mut logits, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let (mut next_batch, mut next_active, mut stepping) = (Vec::new(), Vec::new(), Vec::new());
    let (mut live_rows, mut live_of) = (Vec::new(), Vec::new());
    let mut unique = UniqueRows::default();
    for length in 1.. {
        if active.is_empty() {
            break;
        }
        if length > env.max_trajectory_length() {
            return Err(contract(
                env,
                format!(
                    "trajectories run past max_trajectory_length = {}",
                    length - 1
                ),
            ));
        }
        unique.fill(&batch, d);
        masks.resize(unique.len() * n_actions, false);
        env.forward_masks(&unique.rows, &mut masks);
        // The policy runs only on states with an action to take.
        live_rows.clear();
        live_of.clear();
        for (u, (row, mask)) in unique
            .rows
            .chunks_exact(d)
            .zip(masks.chunks_exact(n_actions))
            .enumerate()
        {
            if mask.contains(&true) {
                live_of.push(live_rows.len() / d);
                live_rows.extend_from_slice(row);
            } else if exit.is_some() {
                return Err(contract(
                    env,
                    format!("state {row:?} allows no action, not even the exit"),
                ));
            } else {
                live_of.push(usize::MAX);
            }
            debug_assert_eq!(live_of.len(), u + 1);
        }
        if !live_rows.is_empty() {
            policy(&live_rows, &mut logits);
        }
        next_batch.clear();
        next_active.clear();
        stepping.clear();
        for (row, &i) in active.iter().enumerate() {
            let u = unique.index_of[row];
            let state = &batch[row * d..(row + 1) * d];
            visited[i].extend_from_slice(state);
            if live_of[u] == usize::MAX {
                taken[i].push(NO_ACTION);
                continue;
            }
            let live = live_of[u] * n_actions..(live_of[u] + 1) * n_actions;
            let a = choose_action(
                &logits[live],
                &masks[u * n_actions..(u + 1) * n_actions],
                exploration,
                rng,
                &mut scratch,
            );
            taken[i].push(a);
            if Some(a) != exit {
                next_batch.extend_from_slice(state);
                next_active.push(i);
                stepping.push(a);
            }
        }
        env.step(&mut next_batch, &stepping);
        std::mem::swap(&mut batch, &mut next_batch);
        std::mem::swap(&mut active, &mut next_active);
    }
    let mut out = Trajectories::new(d);
    let mut log_r = [0f32];
    for (states, acts) in visited.iter().zip(&taken) {
        env.log_reward(&states[states.len() - d..], &mut log_r);
        out.push(states, acts, log_r[0]);
    }
    Ok(out)
}

fn contract(env: &dyn Environment, reason: String) -> Error {
    Error::Environment {
        env: env.describe(),
        reason,
    }
}

/// Rolls out `n` trajectories with the current forward policy (no autograd): in plain Rust
/// when the parameters are on the CPU, else through the device.
pub fn sample_trajectories(
    env: &dyn Environment,
    estimators: &Estimators,
    n: usize,
    exploration: Exploration,
    rng: &mut impl Rng,
) -> Result<Trajectories> {
    let mut scratch = HostScratch::default();
    rollout(env, n, exploration, rng, |states, logits| {
        if estimators.pf_logits_host(env, states, logits, &mut scratch) {
            return;
        }
        let out = estimators.pf_logits_no_grad(&estimators.input(env, states));
        let out = out.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        logits.resize(out.numel(), 0.0);
        out.copy_data(logits, out.numel());
    })
}

/// [`sample_trajectories`] with the batch split into one share per thread of `pool`, each
/// rolled out with its own RNG seeded from `rng`; the shares in order.
pub fn sample_trajectories_parallel(
    pool: &ThreadPool,
    env: &dyn Environment,
    estimators: &Estimators,
    n: usize,
    exploration: Exploration,
    rng: &mut impl Rng,
) -> Result<Trajectories> {
    let threads = pool.threads().clamp(1, n.max(1));
    let shares: Vec<(usize, ChaCha8Rng)> = even_shares(n, threads)
        .map(|share| (share.len(), ChaCha8Rng::seed_from_u64(rng.gen())))
        .collect();
    // SAFETY: rollouts only read the parameters.
    let shared = unsafe { ReadOnly::new(estimators) };
    let parts = map_on_pool(pool, shares, |(count, mut rng)| {
        sample_trajectories(env, shared.get(), count, exploration, &mut rng)
    });
    let mut batch = Trajectories::new(env.state_dim());
    for part in parts {
        batch.extend(&part?);
    }
    Ok(batch)
}

/// Samples one backward trajectory from each terminal state in `terminal` (rows of
/// `state_dim`) down to s0 with the backward policy (learned, or uniform over the allowed
/// backward actions), and returns them as forward trajectories ending at those states, with
/// their log-rewards.
pub fn backward_rollout(
    env: &dyn Environment,
    estimators: &Estimators,
    terminal: &[i64],
    rng: &mut impl Rng,
) -> Result<Trajectories> {
    let (d, n_back, exit) = (env.state_dim(), env.n_backward_actions(), exit_action(env));
    let n = terminal.len() / d;
    let mut s0 = vec![0i64; d];
    env.initial_state(&mut s0);
    // Each trajectory's states from x backwards, and the forward action into each.
    let mut visited: Vec<Vec<i64>> = terminal.chunks_exact(d).map(<[i64]>::to_vec).collect();
    let mut forward_actions: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut batch = terminal.to_vec();
    let mut active: Vec<usize> = (0..n).collect();
    let (mut masks, mut scratch) = (Vec::new(), Vec::new());
    let mut unique = UniqueRows::default();
    for length in 1.. {
        // Trajectories at s0 are done; every other state has a parent.
        let mut still = Vec::with_capacity(active.len());
        let mut rows = Vec::with_capacity(batch.len());
        for (row, &i) in active.iter().enumerate() {
            let state = &batch[row * d..(row + 1) * d];
            if state != s0.as_slice() {
                still.push(i);
                rows.extend_from_slice(state);
            }
        }
        (active, batch) = (still, rows);
        if active.is_empty() {
            break;
        }
        if length >= env.max_trajectory_length() {
            return Err(contract(
                env,
                format!(
                    "backward trajectories run past max_trajectory_length = {}",
                    length
                ),
            ));
        }
        unique.fill(&batch, d);
        masks.resize(unique.len() * n_back, false);
        env.backward_masks(&unique.rows, &mut masks);
        let logits = match estimators.pb_logits_no_grad(&estimators.input(env, &unique.rows)) {
            Some(t) => Vec::<f32>::try_from(t.to_device(Device::Cpu).contiguous().view([-1]))
                .expect("f32 logits"),
            None => vec![0.0; unique.len() * n_back],
        };
        let mut actions = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let u = unique.index_of[row];
            let mask = &masks[u * n_back..(u + 1) * n_back];
            if !mask.contains(&true) {
                let state = &batch[row * d..(row + 1) * d];
                return Err(contract(
                    env,
                    format!("state {state:?} is not s0 but has no parent"),
                ));
            }
            let logits = &logits[u * n_back..(u + 1) * n_back];
            let b = choose_action(logits, mask, Exploration::ON_POLICY, rng, &mut scratch);
            forward_actions[i].push(env.forward_action_of(&batch[row * d..(row + 1) * d], b));
            actions.push(b);
        }
        env.backward_step(&mut batch, &actions);
        for (row, &i) in active.iter().enumerate() {
            visited[i].extend_from_slice(&batch[row * d..(row + 1) * d]);
        }
    }
    let mut out = Trajectories::new(d);
    let mut log_r = vec![0f32; n];
    env.log_reward(terminal, &mut log_r);
    let (mut states, mut acts) = (Vec::new(), Vec::new());
    for i in 0..n {
        states.clear();
        for row in visited[i].chunks_exact(d).rev() {
            states.extend_from_slice(row);
        }
        acts.clear();
        acts.extend(forward_actions[i].iter().rev());
        acts.push(exit.unwrap_or(NO_ACTION));
        out.push(&states, &acts, log_r[i]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn choose_action_frequencies_match_the_mixture() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let logits = [0.0f32, (3.0f32).ln(), 100.0, 0.0];
        let mask = [true, true, false, true];
        let exploration = Exploration {
            epsilon: 0.3,
            temperature: 1.0,
        };
        let mut counts = [0usize; 4];
        let mut scratch = Vec::new();
        let n = 200_000;
        for _ in 0..n {
            counts[choose_action(&logits, &mask, exploration, &mut rng, &mut scratch)] += 1;
        }
        // Policy over allowed actions: (1, 3, 1) / 5; mixture: 0.7 * policy + 0.3 / 3.
        let expected = [0.7 * 0.2 + 0.1, 0.7 * 0.6 + 0.1, 0.0, 0.7 * 0.2 + 0.1];
        for a in 0..4 {
            let freq = counts[a] as f64 / n as f64;
            assert!(
                (freq - expected[a]).abs() < 0.005,
                "action {a}: {freq} vs {}",
                expected[a]
            );
        }
    }

    #[test]
    fn temperature_flattens_the_policy() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let logits = [0.0f32, 2.0];
        let hot = Exploration {
            epsilon: 0.0,
            temperature: 2.0,
        };
        let mut scratch = Vec::new();
        let n = 100_000;
        let ones = (0..n)
            .filter(|_| choose_action(&logits, &[true, true], hot, &mut rng, &mut scratch) == 1)
            .count();
        let expected = 1.0f64.exp() / (1.0 + 1.0f64.exp());
        assert!((ones as f64 / n as f64 - expected).abs() < 0.006);
    }

    #[test]
    fn epsilon_schedule_is_linear_then_flat() {
        let s = EpsilonSchedule {
            start: 0.5,
            end: 0.1,
            decay_steps: 100,
        };
        assert_eq!(s.at(0), 0.5);
        assert!((s.at(50) - 0.3).abs() < 1e-12);
        assert!((s.at(1000) - 0.1).abs() < 1e-12);
    }
}
