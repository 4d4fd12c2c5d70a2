//! Local replay buffer of whole trajectories, mixed into training batches.

use crate::trajectories::Trajectories;
use gfn_diversity::{Diversity, Scored};
use rand::distributions::{Distribution, WeightedIndex};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// Uniform sampling of the stored trajectories.
    Uniform,
    /// Sampling probability proportional to R(x).
    Prioritized,
    /// torchgfn's diverse prioritized buffer: the highest-reward trajectories whose terminal
    /// states lie apart (see [`gfn_diversity`]), sampled uniformly.
    Diverse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    states: Vec<i64>,
    actions: Vec<usize>,
    log_reward: f32,
    /// Coordinates per state (where the terminal state starts in `states`).
    #[serde(default)]
    state_dim: usize,
}

impl Scored for Stored {
    fn terminal(&self) -> &[i64] {
        &self.states[self.states.len() - self.state_dim..]
    }
    fn log_reward(&self) -> f32 {
        self.log_reward
    }
}

/// At most `capacity` trajectories: a FIFO ring, or (diverse) the highest-reward ones kept in
/// ascending order of reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayBuffer {
    capacity: usize,
    policy: ReplayPolicy,
    #[serde(default)]
    diversity: Diversity,
    items: Vec<Stored>,
    /// Slot the next push overwrites once the buffer is full.
    next: usize,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, policy: ReplayPolicy, diversity: Diversity) -> Self {
        ReplayBuffer {
            capacity,
            policy,
            diversity,
            items: Vec::new(),
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn push(&mut self, batch: &Trajectories) {
        if self.capacity == 0 {
            return;
        }
        let d = batch.state_dim;
        let stored = (0..batch.len()).map(|b| {
            let (start, end) = (batch.offsets[b], batch.offsets[b + 1]);
            Stored {
                states: batch.states[start * d..end * d].to_vec(),
                actions: batch.actions[start..end].to_vec(),
                log_reward: batch.log_rewards[b],
                state_dim: d,
            }
        });
        if self.policy == ReplayPolicy::Diverse {
            self.diversity
                .insert(&mut self.items, stored.collect(), self.capacity);
            return;
        }
        for item in stored {
            if self.items.len() < self.capacity {
                self.items.push(item);
            } else {
                self.items[self.next] = item;
            }
            self.next = (self.next + 1) % self.capacity;
        }
    }

    /// Draws `k` trajectories with replacement (none while the buffer is empty).
    pub fn sample(&self, k: usize, state_dim: usize, rng: &mut impl Rng) -> Trajectories {
        let mut out = Trajectories::new(state_dim);
        if self.items.is_empty() {
            return out;
        }
        let mut take = |i: usize| {
            let item = &self.items[i];
            out.push(&item.states, &item.actions, item.log_reward);
        };
        match self.policy {
            ReplayPolicy::Uniform | ReplayPolicy::Diverse => {
                (0..k).for_each(|_| take(rng.gen_range(0..self.items.len())))
            }
            ReplayPolicy::Prioritized => {
                let max = self
                    .items
                    .iter()
                    .map(|t| t.log_reward)
                    .fold(f32::NEG_INFINITY, f32::max);
                let weights = self
                    .items
                    .iter()
                    .map(|t| ((t.log_reward - max) as f64).exp());
                let dist =
                    WeightedIndex::new(weights).expect("rewards relative to the max are positive");
                (0..k).for_each(|_| take(dist.sample(rng)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn batch(log_rewards: &[f32]) -> Trajectories {
        let mut t = Trajectories::new(1);
        for (i, &lr) in log_rewards.iter().enumerate() {
            t.push(&[0, i as i64], &[0, 1], lr);
        }
        t
    }

    #[test]
    fn the_diverse_policy_keeps_apart_and_rewarding_trajectories() {
        let diversity = Diversity {
            cutoff_distance: 0.5,
            p_norm_distance: 1.0,
        };
        let mut buffer = ReplayBuffer::new(2, ReplayPolicy::Diverse, diversity);
        // Terminal states (0, i): 1 and 2 fill the buffer; 3 (the best, distance 1 from 2)
        // enters and evicts 1; a second 3 of higher reward is within the cutoff of the stored
        // one and stays out.
        buffer.push(&batch(&[0.0, 1.0, 2.0]));
        buffer.push(&batch(&[-1.0, -1.0, -1.0, 3.0]));
        let kept: Vec<(i64, f32)> = buffer
            .items
            .iter()
            .map(|s| (s.terminal()[0], s.log_reward))
            .collect();
        assert_eq!(kept, vec![(2, 2.0), (3, 3.0)]);
        let mut again = Trajectories::new(1);
        again.push(&[0, 3], &[0, 1], 5.0);
        buffer.push(&again);
        assert_eq!(buffer.items[1].log_reward, 3.0);
        let round_trip: ReplayBuffer =
            serde_json::from_str(&serde_json::to_string(&buffer).unwrap()).unwrap();
        assert_eq!(round_trip, buffer);
    }

    #[test]
    fn fifo_eviction_keeps_the_newest() {
        let mut buffer = ReplayBuffer::new(2, ReplayPolicy::Uniform, Diversity::default());
        buffer.push(&batch(&[0.0, 1.0, 2.0]));
        assert_eq!(buffer.len(), 2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let drawn = buffer.sample(100, 1, &mut rng);
        assert!(drawn.log_rewards.iter().all(|&r| r == 1.0 || r == 2.0));
        assert!(drawn.log_rewards.contains(&1.0) && drawn.log_rewards.contains(&2.0));
    }

    #[test]
    fn prioritized_sampling_follows_the_reward() {
        let mut buffer = ReplayBuffer::new(10, ReplayPolicy::Prioritized, Diversity::default());
        buffer.push(&batch(&[0.0, 3.0f32.ln()]));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let drawn = buffer.sample(40_000, 1, &mut rng);
        let high = drawn.log_rewards.iter().filter(|&&r| r > 0.5).count() as f64 / 40_000.0;
        assert!((high - 0.75).abs() < 0.01, "{high}");
    }
}
