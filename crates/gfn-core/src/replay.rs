//! Local replay buffer of whole trajectories, mixed into training batches.

use crate::trajectories::Trajectories;
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    states: Vec<i64>,
    actions: Vec<usize>,
    log_reward: f32,
}

/// FIFO ring of at most `capacity` trajectories.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayBuffer {
    capacity: usize,
    policy: ReplayPolicy,
    items: Vec<Stored>,
    /// Slot the next push overwrites once the buffer is full.
    next: usize,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, policy: ReplayPolicy) -> Self {
        ReplayBuffer {
            capacity,
            policy,
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
        for b in 0..batch.len() {
            let (start, end) = (batch.offsets[b], batch.offsets[b + 1]);
            let item = Stored {
                states: batch.states[start * d..end * d].to_vec(),
                actions: batch.actions[start..end].to_vec(),
                log_reward: batch.log_rewards[b],
            };
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
            ReplayPolicy::Uniform => (0..k).for_each(|_| take(rng.gen_range(0..self.items.len()))),
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
    fn fifo_eviction_keeps_the_newest() {
        let mut buffer = ReplayBuffer::new(2, ReplayPolicy::Uniform);
        buffer.push(&batch(&[0.0, 1.0, 2.0]));
        assert_eq!(buffer.len(), 2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let drawn = buffer.sample(100, 1, &mut rng);
        assert!(drawn.log_rewards.iter().all(|&r| r == 1.0 || r == 2.0));
        assert!(drawn.log_rewards.contains(&1.0) && drawn.log_rewards.contains(&2.0));
    }

    #[test]
    fn prioritized_sampling_follows_the_reward() {
        let mut buffer = ReplayBuffer::new(10, ReplayPolicy::Prioritized);
        buffer.push(&batch(&[0.0, 3.0f32.ln()]));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let drawn = buffer.sample(40_000, 1, &mut rng);
        let high = drawn.log_rewards.iter().filter(|&&r| r > 0.5).count() as f64 / 40_000.0;
        assert!((high - 0.75).abs() < 0.01, "{high}");
    }
}
