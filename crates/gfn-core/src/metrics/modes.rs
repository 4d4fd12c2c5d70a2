//! What training has found: the modes under the environment's own criterion, and how many
//! distinct terminal states it reached. Both accumulate over the fresh training batches of
//! every rank.

use super::{bytes_to_u64s, u64s_to_bytes, EvalContext, Metric, ModesOf, Values};
use crate::env::Environment;
use crate::trajectories::Trajectories;
use crate::Result;
use rustc_hash::FxHashSet;
use std::collections::BTreeSet;

/// modes_found and n_modes.
pub struct ModesFound {
    n_modes: u64,
    of: ModesOf,
    found: BTreeSet<u64>,
    /// Found since the last share.
    fresh: Vec<u64>,
    scratch: Vec<u64>,
}

impl ModesFound {
    pub fn new(n_modes: u64, of: ModesOf) -> Self {
        ModesFound {
            n_modes,
            of,
            found: BTreeSet::new(),
            fresh: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn count(&self) -> usize {
        self.found.len()
    }

    /// Records the modes that `state` finds (`log_reward` NaN where no trajectory ends).
    fn observe_state(&mut self, modes: &dyn crate::env::Modes, state: &[i64], log_reward: f32) {
        let mut found = std::mem::take(&mut self.scratch);
        found.clear();
        modes.found_by(state, log_reward, &mut found);
        for &id in &found {
            if self.found.insert(id) {
                self.fresh.push(id);
            }
        }
        self.scratch = found;
    }
}

impl Metric for ModesFound {
    fn name(&self) -> &'static str {
        "modes"
    }

    fn observe(&mut self, env: &dyn Environment, batch: &Trajectories) {
        let modes = env.modes().expect("built only for environments with modes");
        for b in 0..batch.len() {
            let last = batch.offsets[b + 1] - 1;
            let visited = match self.of {
                ModesOf::Terminal => last..last + 1,
                ModesOf::Visited => batch.offsets[b]..last + 1,
            };
            for i in visited {
                let log_reward = if i == last {
                    batch.log_rewards[b]
                } else {
                    f32::NAN
                };
                self.observe_state(modes, batch.state(i), log_reward);
            }
        }
    }

    fn compute(&mut self, _ctx: &mut EvalContext) -> Result<Values> {
        Ok(vec![
            ("modes_found".into(), self.found.len() as f64),
            ("n_modes".into(), self.n_modes as f64),
        ])
    }

    fn share(&mut self) -> Vec<u8> {
        u64s_to_bytes(std::mem::take(&mut self.fresh).into_iter())
    }

    fn absorb(&mut self, shared: &[u8]) -> Result<()> {
        for id in bytes_to_u64s(self.name(), shared)? {
            self.found.insert(id);
        }
        Ok(())
    }

    fn state(&self) -> Vec<u8> {
        u64s_to_bytes(self.found.iter().copied())
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.found = bytes_to_u64s(self.name(), state)?.into_iter().collect();
        self.fresh.clear();
        Ok(())
    }
}

/// distinct_terminals: terminal states seen, counted by a 64-bit hash of their coordinates
/// (two states share a hash with probability ~2^-64 per pair).
#[derive(Default)]
pub struct DistinctTerminals {
    seen: FxHashSet<u64>,
    fresh: Vec<u64>,
}

/// A hash of a state's coordinates that does not change between builds or platforms
/// (SplitMix64's finaliser over each coordinate in turn).
pub fn state_hash(state: &[i64]) -> u64 {
    state.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &x| {
        let mut z = (h ^ x as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

impl Metric for DistinctTerminals {
    fn name(&self) -> &'static str {
        "distinct_terminals"
    }

    fn observe(&mut self, _env: &dyn Environment, batch: &Trajectories) {
        for b in 0..batch.len() {
            let hash = state_hash(batch.terminal_state(b));
            if self.seen.insert(hash) {
                self.fresh.push(hash);
            }
        }
    }

    fn compute(&mut self, _ctx: &mut EvalContext) -> Result<Values> {
        Ok(vec![("distinct_terminals".into(), self.seen.len() as f64)])
    }

    fn share(&mut self) -> Vec<u8> {
        u64s_to_bytes(std::mem::take(&mut self.fresh).into_iter())
    }

    fn absorb(&mut self, shared: &[u8]) -> Result<()> {
        self.seen.extend(bytes_to_u64s(self.name(), shared)?);
        Ok(())
    }

    fn state(&self) -> Vec<u8> {
        let mut hashes: Vec<u64> = self.seen.iter().copied().collect();
        hashes.sort_unstable();
        u64s_to_bytes(hashes.into_iter())
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.seen = bytes_to_u64s(self.name(), state)?.into_iter().collect();
        self.fresh.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{HyperGrid, HyperGridConfig, RewardPreset};

    fn batch(terminals: &[[i64; 2]]) -> Trajectories {
        let mut t = Trajectories::new(2);
        for x in terminals {
            t.push(x, &[2], 0.0);
        }
        t
    }

    #[test]
    fn modes_and_distinct_states_accumulate_and_merge() {
        let env = HyperGrid::new(HyperGridConfig::new(2, 8, RewardPreset::Standard)).unwrap();
        // Inner band at H = 8: coordinates 1 and 6, so the modes are (1|6, 1|6).
        let (mut a, mut b) = (
            ModesFound::new(4, ModesOf::Terminal),
            ModesFound::new(4, ModesOf::Terminal),
        );
        a.observe(&env, &batch(&[[1, 1], [0, 0], [1, 1]]));
        b.observe(&env, &batch(&[[6, 1], [1, 1], [3, 3]]));
        assert_eq!((a.count(), b.count()), (1, 2));
        a.absorb(&b.share()).unwrap();
        assert_eq!(a.count(), 2);
        assert!(b.share().is_empty(), "a share holds only what is new");
        let mut restored = ModesFound::new(4, ModesOf::Terminal);
        restored.restore(&a.state()).unwrap();
        assert_eq!(restored.state(), a.state());

        let mut distinct = DistinctTerminals::default();
        distinct.observe(&env, &batch(&[[1, 1], [0, 0], [1, 1]]));
        assert_eq!(distinct.seen.len(), 2);
        assert!(bytes_to_u64s("x", &[1, 2, 3]).is_err());

        // Counting visited states too: a trajectory through a mode on its way elsewhere.
        let mut path = Trajectories::new(2);
        path.push(&[0, 0, 0, 1, 1, 1, 2, 1], &[1, 0, 0, 2], 0.0);
        let mut visited = ModesFound::new(4, ModesOf::Visited);
        visited.observe(&env, &path);
        let mut terminal = ModesFound::new(4, ModesOf::Terminal);
        terminal.observe(&env, &path);
        assert_eq!((visited.count(), terminal.count()), (1, 0));
    }

    #[test]
    fn the_state_hash_is_stable() {
        // Fixed values: checkpoints keep these hashes across builds.
        assert_eq!(state_hash(&[]), 0x9E37_79B9_7F4A_7C15);
        assert_ne!(state_hash(&[0, 1]), state_hash(&[1, 0]));
        assert_eq!(state_hash(&[3, -1]), state_hash(&[3, -1]));
    }
}
