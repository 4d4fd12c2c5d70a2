//! gfn-diversity: the rule by which a diverse prioritized replay buffer admits trajectories,
//! as torchgfn's `NormBasedDiversePrioritizedReplayBuffer` does. Its own crate because both the
//! trainers' local replay (gfn-core) and the buffer ranks (gfn-buffer) keep such a buffer, and
//! neither depends on the other.
//!
//! The buffer keeps at most `capacity` items, those of highest log-reward. While it is not
//! full everything enters. Once full, a batch is sorted by log-reward (highest first); items
//! below the lowest stored log-reward are dropped; then, unless `cutoff_distance` is negative,
//! an item is dropped when its terminal state lies within `cutoff_distance` (p-norm distance,
//! `p_norm_distance`) of a higher-ranked item of the batch, or of any stored item. What is left
//! enters, and the lowest-reward items beyond `capacity` leave.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Diversity {
    /// Terminal states closer than this are one too many; negative: no distance filter.
    pub cutoff_distance: f64,
    /// The p of the p-norm distance (infinity: the largest coordinate difference).
    pub p_norm_distance: f64,
}

impl Default for Diversity {
    /// torchgfn's `train_hypergrid_ddp.py` defaults.
    fn default() -> Self {
        Diversity {
            cutoff_distance: 0.1,
            p_norm_distance: 2.0,
        }
    }
}

/// What the rule reads of an item.
pub trait Scored {
    fn terminal(&self) -> &[i64];
    fn log_reward(&self) -> f32;
}

impl Diversity {
    /// Why the settings are unusable (with the setting's suffix), if they are.
    pub fn problem(&self) -> Option<(&'static str, f64, &'static str)> {
        if self.cutoff_distance.is_nan() {
            return Some(("cutoff_distance", self.cutoff_distance, "must be a number"));
        }
        if self.p_norm_distance.is_nan() || self.p_norm_distance <= 0.0 {
            return Some(("p_norm_distance", self.p_norm_distance, "must be > 0"));
        }
        None
    }

    pub fn distance(&self, a: &[i64], b: &[i64]) -> f64 {
        let p = self.p_norm_distance;
        let diffs = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x - y).unsigned_abs() as f64);
        if p.is_infinite() {
            return diffs.fold(0.0, f64::max);
        }
        diffs.map(|d| d.powf(p)).sum::<f64>().powf(1.0 / p)
    }

    /// Admits what the rule lets in from `incoming` into `stored` (kept in ascending order of
    /// log-reward, at most `capacity` items). Returns how many of `incoming` were kept out.
    pub fn insert<T: Scored>(
        &self,
        stored: &mut Vec<T>,
        mut incoming: Vec<T>,
        capacity: usize,
    ) -> usize {
        let offered = incoming.len();
        if stored.len() >= capacity && !stored.is_empty() {
            incoming.sort_by(|a, b| b.log_reward().total_cmp(&a.log_reward()));
            let lowest = stored[0].log_reward();
            incoming.retain(|item| item.log_reward() >= lowest);
            if self.cutoff_distance >= 0.0 {
                incoming = self.spread_out(incoming, stored);
            }
        }
        let admitted = incoming.len();
        stored.extend(incoming);
        stored.sort_by(|a, b| a.log_reward().total_cmp(&b.log_reward()));
        let excess = stored.len().saturating_sub(capacity);
        stored.drain(..excess);
        offered - admitted
    }

    /// The items of `batch` (highest reward first) farther than the cutoff from every
    /// higher-ranked item of the batch, and then from every stored item.
    fn spread_out<T: Scored>(&self, batch: Vec<T>, stored: &[T]) -> Vec<T> {
        let far = |a: &T, b: &T| self.distance(a.terminal(), b.terminal()) > self.cutoff_distance;
        let apart: Vec<bool> = (0..batch.len())
            .map(|i| batch[..i].iter().all(|earlier| far(&batch[i], earlier)))
            .collect();
        batch
            .into_iter()
            .zip(apart)
            .filter(|(item, apart)| *apart && stored.iter().all(|s| far(item, s)))
            .map(|(item, _)| item)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[derive(Debug, Clone, PartialEq)]
    struct Item(Vec<i64>, f32);

    impl Scored for Item {
        fn terminal(&self) -> &[i64] {
            &self.0
        }
        fn log_reward(&self) -> f32 {
            self.1
        }
    }

    /// torchgfn's procedure written out as plainly as possible: pairwise distance matrices,
    /// upper triangle masked, row minima, over the sorted batch.
    fn brute_force(d: &Diversity, stored: &[Item], batch: &[Item], capacity: usize) -> Vec<Item> {
        let mut all: Vec<Item> = stored.to_vec();
        if stored.len() < capacity {
            all.extend_from_slice(batch);
        } else {
            let mut order: Vec<usize> = (0..batch.len()).collect();
            order.sort_by(|&a, &b| batch[b].1.total_cmp(&batch[a].1));
            let min = stored.iter().map(|s| s.1).fold(f32::INFINITY, f32::min);
            let mut kept: Vec<Item> = order
                .iter()
                .map(|&i| batch[i].clone())
                .filter(|c| c.1 >= min)
                .collect();
            if d.cutoff_distance >= 0.0 {
                let n = kept.len();
                let mut row_min = vec![f64::MAX; n];
                for (i, m) in row_min.iter_mut().enumerate() {
                    for j in 0..n {
                        if j < i {
                            *m = m.min(d.distance(&kept[i].0, &kept[j].0));
                        }
                    }
                }
                kept = kept
                    .into_iter()
                    .zip(row_min)
                    .filter(|(_, m)| *m > d.cutoff_distance)
                    .map(|(c, _)| c)
                    .collect();
                kept.retain(|c| {
                    stored
                        .iter()
                        .map(|s| d.distance(&c.0, &s.0))
                        .fold(f64::MAX, f64::min)
                        > d.cutoff_distance
                });
            }
            all.extend(kept);
        }
        all.sort_by(|a, b| a.1.total_cmp(&b.1));
        let excess = all.len().saturating_sub(capacity);
        all[excess..].to_vec()
    }

    #[test]
    fn random_batches_enter_as_the_brute_force_procedure_says() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (cutoff, p) in [
            (0.1, 2.0),
            (1.5, 1.0),
            (2.0, f64::INFINITY),
            (-1.0, 2.0),
            (0.0, 3.0),
        ] {
            let d = Diversity {
                cutoff_distance: cutoff,
                p_norm_distance: p,
            };
            let mut stored: Vec<Item> = Vec::new();
            let mut reference: Vec<Item> = Vec::new();
            for _ in 0..40 {
                let batch: Vec<Item> = (0..rng.gen_range(1..12))
                    .map(|_| {
                        // Rewards in steps of 0.25 so that ties happen; distinct rewards within a
                        // batch keep the (unstable) order of ties out of the comparison.
                        let state = vec![rng.gen_range(0..4), rng.gen_range(0..4)];
                        Item(
                            state,
                            rng.gen_range(0..16) as f32 * 0.25 + rng.gen::<f32>() * 1e-3,
                        )
                    })
                    .collect();
                reference = brute_force(&d, &reference, &batch, 10);
                d.insert(&mut stored, batch, 10);
                assert_eq!(stored, reference, "cutoff {cutoff}, p {p}");
            }
            assert_eq!(stored.len(), 10);
        }
    }

    #[test]
    fn distances_are_p_norms() {
        let d = |p| Diversity {
            cutoff_distance: 0.0,
            p_norm_distance: p,
        };
        assert_eq!(d(1.0).distance(&[0, 0], &[3, -4]), 7.0);
        assert_eq!(d(2.0).distance(&[0, 0], &[3, -4]), 5.0);
        assert_eq!(d(f64::INFINITY).distance(&[0, 0], &[3, -4]), 4.0);
        assert!(d(0.0).problem().is_some() && d(2.0).problem().is_none());
    }
}
