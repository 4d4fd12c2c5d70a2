//! A user's own environment, outside gfn-core's source: packing a knapsack. A state is the set
//! of items packed so far (one 0/1 coordinate per item); a forward action packs an item that
//! still fits, or stops (the exit action); a backward action unpacks any packed item. The
//! reward favours valuable packings: log R(x) = Σ value of the packed items. The DAG has many
//! paths to each packing (any order of packing), so P_B matters.
//!
//! It implements [`Environment`] (and [`Enumerable`], so that training is judged against the
//! exact target), passes the library's brute-force contract check, and trains with the
//! library's `TrainState`:
//!
//! ```bash
//! cargo run --release -p gfn-core --example own_environment
//! ```

use gfn_core::env::{check_environment, Enumerable, Environment, Modes, Termination};
use gfn_core::estimators::{Architecture, BackwardPolicy};
use gfn_core::fit;
use gfn_core::losses::{LossConfig, LossKind};
use gfn_core::metrics::MetricsConfig;
use gfn_core::optim::OptimizerConfig;
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::{ReplayConfig, TrainConfig, TrainState};
use rand::SeedableRng;

/// Items as (weight, value); a packing may weigh at most `capacity`.
pub struct Knapsack {
    items: Vec<(u32, f32)>,
    capacity: u32,
    best: f32,
}

impl Knapsack {
    pub fn new(items: Vec<(u32, f32)>, capacity: u32) -> Self {
        let mut knapsack = Knapsack {
            items,
            capacity,
            best: f32::NEG_INFINITY,
        };
        // The most valuable packing, by enumerating all 2^n subsets (n is small here).
        let n = knapsack.items.len();
        let mut state = vec![0i64; n];
        for index in 0..1usize << n {
            knapsack.state_from_index(index, &mut state);
            if knapsack.weight(&state) <= capacity {
                knapsack.best = knapsack.best.max(knapsack.value(&state));
            }
        }
        knapsack
    }

    fn weight(&self, state: &[i64]) -> u32 {
        state
            .iter()
            .zip(&self.items)
            .map(|(&s, &(w, _))| s as u32 * w)
            .sum()
    }

    fn value(&self, state: &[i64]) -> f32 {
        state
            .iter()
            .zip(&self.items)
            .map(|(&s, &(_, v))| s as f32 * v)
            .sum()
    }
}

impl Environment for Knapsack {
    fn describe(&self) -> String {
        format!("knapsack of {} items", self.items.len())
    }
    fn state_dim(&self) -> usize {
        self.items.len()
    }
    /// Pack item i, or stop (the last action).
    fn n_actions(&self) -> usize {
        self.items.len() + 1
    }
    fn n_backward_actions(&self) -> usize {
        self.items.len()
    }
    fn termination(&self) -> Termination {
        Termination::ExitAction(self.items.len())
    }
    fn max_trajectory_length(&self) -> usize {
        self.items.len() + 1
    }
    fn initial_state(&self, out: &mut [i64]) {
        out.fill(0);
    }
    fn step(&self, states: &mut [i64], actions: &[usize]) {
        for (state, &a) in states.chunks_exact_mut(self.items.len()).zip(actions) {
            state[a] = 1;
        }
    }
    fn backward_step(&self, states: &mut [i64], actions: &[usize]) {
        for (state, &b) in states.chunks_exact_mut(self.items.len()).zip(actions) {
            state[b] = 0;
        }
    }
    fn backward_action_of(&self, _parent: &[i64], forward_action: usize) -> usize {
        forward_action
    }
    fn forward_action_of(&self, _child: &[i64], backward_action: usize) -> usize {
        backward_action
    }
    fn forward_masks(&self, states: &[i64], out: &mut [bool]) {
        let n = self.items.len();
        for (state, mask) in states.chunks_exact(n).zip(out.chunks_exact_mut(n + 1)) {
            let room = self.capacity - self.weight(state);
            for (i, m) in mask[..n].iter_mut().enumerate() {
                *m = state[i] == 0 && self.items[i].0 <= room;
            }
            mask[n] = true;
        }
    }
    fn backward_masks(&self, states: &[i64], out: &mut [bool]) {
        for (m, &s) in out.iter_mut().zip(states) {
            *m = s == 1;
        }
    }
    fn log_reward(&self, states: &[i64], out: &mut [f32]) {
        for (state, r) in states.chunks_exact(self.items.len()).zip(out) {
            *r = self.value(state);
        }
    }
    fn encoding_dim(&self) -> usize {
        self.items.len()
    }
    fn encode(&self, states: &[i64], out: &mut [f32]) {
        for (o, &s) in out.iter_mut().zip(states) {
            *o = s as f32;
        }
    }
    fn exits_everywhere(&self) -> bool {
        true
    }
    fn enumeration(&self) -> Option<&dyn Enumerable> {
        Some(self)
    }
    fn modes(&self) -> Option<&dyn Modes> {
        Some(self)
    }
}

/// A packing is its bit mask: packing an item sets a bit, so children have larger indices.
impl Enumerable for Knapsack {
    fn n_states(&self) -> Option<u64> {
        1u64.checked_shl(self.items.len() as u32)
    }
    fn state_index(&self, state: &[i64]) -> usize {
        state
            .iter()
            .enumerate()
            .map(|(i, &s)| (s as usize) << i)
            .sum()
    }
    fn state_from_index(&self, index: usize, out: &mut [i64]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = ((index >> i) & 1) as i64;
        }
    }
}

/// The modes are the most valuable packings, identified by their index.
impl Modes for Knapsack {
    fn count(&self) -> u64 {
        let n = self.items.len();
        let mut state = vec![0i64; n];
        (0..1usize << n)
            .filter(|&i| {
                self.state_from_index(i, &mut state);
                self.weight(&state) <= self.capacity && self.value(&state) == self.best
            })
            .count() as u64
    }
    fn found_by(&self, x: &[i64], log_reward: f32, found: &mut Vec<u64>) {
        if log_reward == self.best {
            found.push(self.state_index(x) as u64);
        }
    }
    fn criterion(&self) -> String {
        "the most valuable packing".into()
    }
}

fn knapsack() -> Knapsack {
    Knapsack::new(
        vec![
            (3, 1.0),
            (4, 1.3),
            (2, 0.4),
            (5, 1.6),
            (1, 0.2),
            (3, 0.9),
            (2, 0.7),
        ],
        10,
    )
}

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        architecture: Architecture::Mlp {
            hidden: 64,
            layers: 2,
        },
        backward: BackwardPolicy::Learned,
        noisy: Default::default(),
        loss: LossConfig::new(LossKind::Tb),
        optimizer: OptimizerConfig::default(),
        batch_size: 16,
        epsilon: EpsilonSchedule {
            start: 0.05,
            end: 0.0,
            decay_steps: 500,
        },
        temperature: 1.0,
        replay: ReplayConfig {
            capacity: 0,
            policy: ReplayPolicy::Uniform,
            ratio: 0.5,
            diversity: Default::default(),
        },
        seed,
        threads: 1,
        exact_samples: 20_000,
        max_nonfinite_steps: 0,
        memory_budget: None,
        diagnostics_every: 0,
        metrics: MetricsConfig::default(),
    }
}

/// Trains `steps` steps of trajectory balance; returns the final evaluation.
fn train(steps: u64) -> gfn_core::Result<gfn_core::train::Evaluation> {
    let mut state = TrainState::new(Box::new(knapsack()), config(0), tch::Device::Cpu, 0)?;
    let schedule = fit::Schedule {
        steps,
        evaluate_every: 0,
        checkpoint_every: 0,
        checkpoint: None,
    };
    let report = fit::fit(
        &mut state,
        &mut fit::Alone,
        &mut fit::LocalReplay,
        &mut fit::NoHooks,
        &schedule,
    )?;
    Ok(report
        .last_eval
        .expect("one process evaluates at its last step"))
}

fn main() -> gfn_core::Result<()> {
    let env = knapsack();
    let report = check_environment(
        &env,
        1 << 12,
        100,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    )
    .map_err(|reason| gfn_core::Error::Environment {
        env: env.describe(),
        reason,
    })?;
    println!(
        "{}: contract holds over {} states, {} transitions, {} terminal",
        env.describe(),
        report.states,
        report.transitions,
        report.terminal_states
    );
    let eval = train(1500)?;
    for (name, value) in &eval.values {
        println!("{name:>20} {value:.4}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_knapsack_keeps_the_contract_and_learns_its_target() {
        let env = knapsack();
        let report = check_environment(
            &env,
            1 << 12,
            100,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap();
        // 2^7 packings, of which those within the capacity are reachable.
        assert!(report.states > 64 && report.states < 128, "{report:?}");
        let eval = train(1500).unwrap();
        let tv = eval.get("exact_tv").unwrap();
        assert!(tv < 0.05, "exact TV {tv} after 1500 steps");
        assert_eq!(eval.get("modes_found"), eval.get("n_modes"));
    }
}
