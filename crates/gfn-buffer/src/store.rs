//! The buffer a server holds: a ring of at most `capacity` items with one of three policies,
//! and the statistics reported to rank 0.

use crate::protocol::{Item, ServerStats, MAX_MODE_KEYS};
use gfn_diversity::{Diversity, Scored};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Oldest out, uniform sampling.
    Fifo,
    /// Oldest out, sampling probability proportional to R(x).
    Prioritized,
    /// At most one item per terminal state (later duplicates are dropped), oldest out, uniform
    /// sampling.
    Unique,
    /// torchgfn's diverse prioritized buffer: the highest-reward items whose terminal states
    /// lie apart ([`gfn_diversity`]), uniform sampling.
    Diverse,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(Policy::Fifo),
            "prioritized" => Ok(Policy::Prioritized),
            "unique" => Ok(Policy::Unique),
            "diverse" => Ok(Policy::Diverse),
            other => Err(format!(
                "unknown buffer policy {other:?}: expected fifo, prioritized, unique or diverse"
            )),
        }
    }
}

/// The ids of the modes an item's terminal state finds, under its environment's criterion.
pub type ModeIds = Arc<dyn Fn(&Item) -> Vec<u64> + Send + Sync>;

#[derive(Clone)]
pub struct StoreConfig {
    pub capacity: usize,
    pub policy: Policy,
    /// The distance rule of [`Policy::Diverse`].
    pub diversity: Diversity,
    /// Counts the distinct modes among the items received; `None`: not counted.
    pub modes: Option<ModeIds>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("capacity", &self.capacity)
            .field("policy", &self.policy)
            .field("diversity", &self.diversity)
            .field("modes", &self.modes.is_some())
            .finish()
    }
}

/// Sums over slot weights in a complete binary tree, so that updating one slot and drawing a
/// slot with probability proportional to its weight both take O(log capacity), with no drift
/// from repeated additions and subtractions.
#[derive(Debug)]
struct SumTree {
    leaves: usize,
    nodes: Vec<f64>,
}

impl SumTree {
    fn new(capacity: usize) -> Self {
        let leaves = capacity.next_power_of_two().max(1);
        SumTree {
            leaves,
            nodes: vec![0.0; 2 * leaves],
        }
    }

    fn set(&mut self, slot: usize, weight: f64) {
        let mut i = self.leaves + slot;
        self.nodes[i] = weight;
        while i > 1 {
            i /= 2;
            self.nodes[i] = self.nodes[2 * i] + self.nodes[2 * i + 1];
        }
    }

    fn total(&self) -> f64 {
        self.nodes[1]
    }

    /// The slot where the running sum passes `u` (0 ≤ u < total).
    fn find(&self, mut u: f64) -> usize {
        let mut i = 1;
        while i < self.leaves {
            let left = self.nodes[2 * i];
            if u < left || self.nodes[2 * i + 1] == 0.0 {
                i *= 2;
            } else {
                u -= left;
                i = 2 * i + 1;
            }
        }
        i - self.leaves
    }
}

impl Scored for Item {
    /// The last state's coordinates (an item holds one state per action).
    fn terminal(&self) -> &[i64] {
        let dim = self.states.len() / self.actions.len().max(1);
        &self.states[self.states.len() - dim..]
    }
    fn log_reward(&self) -> f32 {
        self.log_reward
    }
}

/// A store's contents as a snapshot file keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    /// Oldest first.
    pub items: Vec<Item>,
    pub received: u64,
    pub duplicates: u64,
    pub sampled: u64,
    /// Ids of the modes found so far, sorted.
    pub modes: Vec<u64>,
}

#[derive(Debug)]
pub struct Store {
    config: StoreConfig,
    items: Vec<Item>,
    /// Slot the next item overwrites once the ring is full.
    next: usize,
    /// Unique policy: keys held.
    held: HashMap<u64, usize>,
    /// Prioritized policy: exp(log_reward − reference) per slot.
    weights: Option<SumTree>,
    reference: f32,
    received: u64,
    duplicates: u64,
    sampled: u64,
    modes: HashSet<u64>,
}

/// Weights are exp(log R − reference); the reference moves up when a reward would overflow.
const REBASE_MARGIN: f32 = 60.0;

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        let weights = (config.policy == Policy::Prioritized).then(|| SumTree::new(config.capacity));
        Store {
            config,
            items: Vec::new(),
            next: 0,
            held: HashMap::new(),
            weights,
            reference: f32::NAN,
            received: 0,
            duplicates: 0,
            sampled: 0,
            modes: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Stores a pushed batch (the diverse policy judges its items together).
    pub fn push_batch(&mut self, items: Vec<Item>) {
        if self.config.policy != Policy::Diverse {
            items.into_iter().for_each(|item| self.push(item));
            return;
        }
        self.received += items.len() as u64;
        if let Some(modes) = &self.config.modes {
            items.iter().for_each(|item| self.modes.extend(modes(item)));
        }
        let kept_out = self
            .config
            .diversity
            .insert(&mut self.items, items, self.config.capacity);
        self.duplicates += kept_out as u64;
    }

    pub fn push(&mut self, item: Item) {
        if self.config.policy == Policy::Diverse {
            return self.push_batch(vec![item]);
        }
        self.received += 1;
        if let Some(modes) = &self.config.modes {
            self.modes.extend(modes(&item));
        }
        if self.config.capacity == 0 {
            return;
        }
        if self.config.policy == Policy::Unique {
            if self.held.contains_key(&item.key) {
                self.duplicates += 1;
                return;
            }
            self.held.insert(item.key, self.next);
        }
        let slot = self.next;
        let log_reward = item.log_reward;
        if slot < self.items.len() {
            let evicted = std::mem::replace(&mut self.items[slot], item);
            if self.config.policy == Policy::Unique {
                self.held.remove(&evicted.key);
            }
        } else {
            self.items.push(item);
        }
        self.next = (self.next + 1) % self.config.capacity;
        self.set_weight(slot, log_reward);
    }

    fn set_weight(&mut self, slot: usize, log_reward: f32) {
        let Some(tree) = self.weights.as_mut() else {
            return;
        };
        if self.reference.is_nan() {
            self.reference = log_reward;
        }
        if log_reward > self.reference + REBASE_MARGIN {
            self.reference = log_reward;
            for (i, item) in self.items.iter().enumerate() {
                tree.set(i, ((item.log_reward - self.reference) as f64).exp());
            }
        }
        tree.set(slot, ((log_reward - self.reference) as f64).exp());
    }

    /// Up to `n` items drawn with replacement (none while empty).
    pub fn sample(&mut self, n: usize, rng: &mut impl Rng) -> Vec<Item> {
        if self.items.is_empty() {
            return Vec::new();
        }
        let picks: Vec<usize> = match &self.weights {
            Some(tree) if tree.total() > 0.0 => (0..n)
                .map(|_| {
                    tree.find(rng.gen::<f64>() * tree.total())
                        .min(self.items.len() - 1)
                })
                .collect(),
            _ => (0..n).map(|_| rng.gen_range(0..self.items.len())).collect(),
        };
        self.sampled += picks.len() as u64;
        picks.into_iter().map(|i| self.items[i].clone()).collect()
    }

    /// Everything the store holds, oldest item first, for a snapshot file.
    pub fn snapshot(&self) -> StoreSnapshot {
        let split = if self.items.len() < self.config.capacity {
            0
        } else {
            self.next
        };
        let mut modes: Vec<u64> = self.modes.iter().copied().collect();
        modes.sort_unstable();
        StoreSnapshot {
            items: self.items[split..]
                .iter()
                .chain(&self.items[..split])
                .cloned()
                .collect(),
            received: self.received,
            duplicates: self.duplicates,
            sampled: self.sampled,
            modes,
        }
    }

    /// A store under `config` holding what `snapshot` held (its newest `capacity` items when
    /// the capacity is now smaller), with its counters.
    pub fn restore(config: StoreConfig, snapshot: StoreSnapshot) -> Self {
        let mut store = Store::new(config);
        let keep = snapshot.items.len().min(store.config.capacity);
        let skip = snapshot.items.len() - keep;
        snapshot
            .items
            .into_iter()
            .skip(skip)
            .for_each(|item| store.push(item));
        store.received = snapshot.received;
        store.duplicates = snapshot.duplicates;
        store.sampled = snapshot.sampled;
        store.modes = snapshot.modes.into_iter().collect();
        store
    }

    pub fn stats(&self, uptime_s: f64, trainers: u32) -> ServerStats {
        let mut log_rewards: Vec<f32> = self.items.iter().map(|i| i.log_reward).collect();
        log_rewards.sort_by(f32::total_cmp);
        let percentiles = if log_rewards.is_empty() {
            Vec::new()
        } else {
            (0..=100)
                .map(|p| log_rewards[(p * (log_rewards.len() - 1) + 50) / 100])
                .collect()
        };
        let mut mode_keys: Vec<u64> = self.modes.iter().copied().collect();
        mode_keys.sort_unstable();
        mode_keys.truncate(MAX_MODE_KEYS);
        let rate = |count: u64| {
            if uptime_s > 0.0 {
                count as f64 / uptime_s
            } else {
                0.0
            }
        };
        ServerStats {
            size: self.items.len() as u64,
            capacity: self.config.capacity as u64,
            received: self.received,
            duplicates: self.duplicates,
            sampled: self.sampled,
            uptime_s,
            pushes_per_s: rate(self.received),
            samples_per_s: rate(self.sampled),
            log_reward_percentiles: percentiles,
            mode_keys,
            modes_found: self.modes.len() as u64,
            trainers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn item(key: u64, log_reward: f32) -> Item {
        Item {
            key,
            log_reward,
            states: vec![key as i64],
            actions: vec![0],
        }
    }

    fn store(capacity: usize, policy: Policy) -> Store {
        Store::new(StoreConfig {
            capacity,
            policy,
            diversity: Diversity {
                cutoff_distance: 0.5,
                p_norm_distance: 1.0,
            },
            // Items of log-reward 1.0 or more are modes, one per key.
            modes: Some(std::sync::Arc::new(|item: &Item| {
                if item.log_reward >= 1.0 {
                    vec![item.key]
                } else {
                    Vec::new()
                }
            })),
        })
    }

    #[test]
    fn fifo_keeps_the_newest_and_samples_uniformly() {
        let mut s = store(3, Policy::Fifo);
        (0..5).for_each(|k| s.push(item(k, 0.0)));
        assert_eq!(s.len(), 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let drawn = s.sample(30_000, &mut rng);
        let mut counts = [0usize; 5];
        drawn.iter().for_each(|i| counts[i.key as usize] += 1);
        assert_eq!(&counts[..2], &[0, 0]);
        for c in &counts[2..] {
            assert!(
                (*c as f64 / 30_000.0 - 1.0 / 3.0).abs() < 0.015,
                "{counts:?}"
            );
        }
        assert_eq!(s.stats(1.0, 0).sampled, 30_000);
    }

    #[test]
    fn prioritized_sampling_is_proportional_to_the_reward_after_eviction() {
        let mut s = store(3, Policy::Prioritized);
        // Rewards 100, 1, 2, 5: the first is evicted, so the draw is 1 : 2 : 5 of 8.
        for (k, r) in [(0, 100.0f32), (1, 1.0), (2, 2.0), (3, 5.0)] {
            s.push(item(k, r.ln()));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 80_000;
        let mut counts = [0usize; 4];
        s.sample(n, &mut rng)
            .iter()
            .for_each(|i| counts[i.key as usize] += 1);
        assert_eq!(counts[0], 0);
        for (k, expected) in [(1, 1.0 / 8.0), (2, 2.0 / 8.0), (3, 5.0 / 8.0)] {
            let p = counts[k] as f64 / n as f64;
            assert!((p - expected).abs() < 0.01, "key {k}: {p} vs {expected}");
        }
    }

    #[test]
    fn prioritized_survives_rewards_far_apart() {
        let mut s = store(4, Policy::Prioritized);
        s.push(item(0, -500.0));
        s.push(item(1, 0.0));
        s.push(item(2, 300.0));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        assert!(s.sample(1000, &mut rng).iter().all(|i| i.key == 2));
    }

    #[test]
    fn unique_drops_duplicates_and_frees_keys_on_eviction() {
        let mut s = store(2, Policy::Unique);
        for k in [5, 5, 6, 5, 7, 5] {
            s.push(item(k, 0.0));
        }
        // 5 stored, 5 dup, 6 stored, 5 dup, 7 evicts 5, then 5 is new again and evicts 6.
        let stats = s.stats(1.0, 0);
        assert_eq!((stats.size, stats.received, stats.duplicates), (2, 6, 2));
        let mut keys: Vec<u64> = s.items.iter().map(|i| i.key).collect();
        keys.sort();
        assert_eq!(keys, vec![5, 7]);
        assert_eq!(s.held.len(), 2);
    }

    #[test]
    fn statistics_count_modes_and_percentiles() {
        let mut s = store(101, Policy::Fifo);
        (0..101).for_each(|k| s.push(item(k, k as f32 / 50.0)));
        s.push(item(100, 2.0));
        let stats = s.stats(2.0, 1);
        // log_reward >= 1.0 for keys 50..=100: 51 distinct modes.
        assert_eq!(stats.modes_found, 51);
        assert_eq!(stats.mode_keys.first(), Some(&50));
        assert_eq!(stats.log_reward_percentiles.len(), 101);
        // Key 0 was evicted: the stored rewards are 1/50 ..= 100/50 and 2.0 again.
        assert_eq!(stats.log_reward_percentiles[50], 51.0 / 50.0);
        assert_eq!(stats.pushes_per_s, 51.0);
    }

    #[test]
    fn a_restored_store_holds_the_same_items_in_the_same_order_of_eviction() {
        for policy in [
            Policy::Fifo,
            Policy::Prioritized,
            Policy::Unique,
            Policy::Diverse,
        ] {
            let mut s = store(4, policy);
            // 6 pushes into 4 slots: the ring has wrapped, keys 2..=5 remain, 2 the oldest.
            (0..6).for_each(|k| s.push(item(k, k as f32 / 2.0)));
            let snapshot = s.snapshot();
            let keys: Vec<u64> = snapshot.items.iter().map(|i| i.key).collect();
            assert_eq!(keys, vec![2, 3, 4, 5], "{policy:?}");
            let mut restored = Store::restore(s.config.clone(), snapshot.clone());
            assert_eq!(restored.snapshot(), snapshot, "{policy:?}");
            assert_eq!(restored.stats(1.0, 0), s.stats(1.0, 0), "{policy:?}");
            // The next push evicts the same (oldest) item in both.
            s.push(item(9, 0.0));
            restored.push(item(9, 0.0));
            assert_eq!(restored.snapshot(), s.snapshot(), "{policy:?}");
        }
        // Restored into a smaller store: the newest items stay.
        let mut s = store(4, Policy::Fifo);
        (0..4).for_each(|k| s.push(item(k, 0.0)));
        let smaller = Store::restore(store(2, Policy::Fifo).config, s.snapshot());
        let keys: Vec<u64> = smaller.snapshot().items.iter().map(|i| i.key).collect();
        assert_eq!(keys, vec![2, 3]);
    }

    #[test]
    fn the_diverse_policy_admits_as_the_shared_rule_does() {
        // Terminal states (key): a batch judged together, then items alone.
        let mut s = store(3, Policy::Diverse);
        s.push_batch((0..5).map(|k| item(k, k as f32)).collect());
        let mut reference = Vec::new();
        let rule = s.config.diversity;
        rule.insert(
            &mut reference,
            (0..5).map(|k| item(k, k as f32)).collect(),
            3,
        );
        assert_eq!(s.items, reference);
        // Full: key 9 (reward 9) is far from 2..=4 and enters; key 4 again (reward 8) is
        // within the cutoff of the stored 4 and counts as a duplicate; key 1 is below the
        // lowest stored reward.
        s.push_batch(vec![item(9, 9.0), item(4, 8.0), item(1, 1.0)]);
        let keys: Vec<u64> = s.items.iter().map(|i| i.key).collect();
        assert_eq!(keys, vec![3, 4, 9]);
        let stats = s.stats(1.0, 0);
        assert_eq!((stats.received, stats.duplicates, stats.size), (8, 2, 3));
    }

    #[test]
    fn sum_tree_finds_slots_by_cumulative_weight() {
        let mut t = SumTree::new(5);
        for (slot, w) in [(0, 1.0), (1, 0.0), (2, 2.0), (3, 0.5), (4, 0.5)] {
            t.set(slot, w);
        }
        assert_eq!(t.total(), 4.0);
        assert_eq!(t.find(0.5), 0);
        assert_eq!(t.find(1.0), 2);
        assert_eq!(t.find(2.99), 2);
        assert_eq!(t.find(3.2), 3);
        assert_eq!(t.find(3.9), 4);
    }
}
