//! HyperGrid (Bengio et al., 2021): states in {0..H-1}^D from the origin; forward actions
//! increment one coordinate or exit; backward actions decrement one coordinate.

use super::{Enumerable, Environment, Modes, Termination, Tokenized};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Named reward constants (R0, R1, R2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RewardPreset {
    /// R0 = 0.1, R1 = 0.5, R2 = 2.0 (the trajectory-balance paper).
    #[default]
    Standard,
    /// R0 = 1e-3, R1 = 0.5, R2 = 2.0.
    Easy,
    /// R0 = 1e-4, R1 = 1.0, R2 = 3.0.
    Hard,
}

impl RewardPreset {
    pub fn constants(self) -> (f64, f64, f64) {
        match self {
            RewardPreset::Standard => (0.1, 0.5, 2.0),
            RewardPreset::Easy => (1e-3, 0.5, 2.0),
            RewardPreset::Hard => (1e-4, 1.0, 3.0),
        }
    }
}

/// `[env]` with `name = "hypergrid"`: the grid {0..height-1}^dim and its reward constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HyperGridConfig {
    pub dim: usize,
    pub height: usize,
    /// standard (0.1, 0.5, 2.0), easy (1e-3, 0.5, 2.0) or hard (1e-4, 1.0, 3.0).
    pub preset: RewardPreset,
    /// Explicit R0, R1, R2 override the preset's.
    pub r0: Option<f64>,
    pub r1: Option<f64>,
    pub r2: Option<f64>,
}

impl Default for HyperGridConfig {
    fn default() -> Self {
        HyperGridConfig::new(4, 8, RewardPreset::Standard)
    }
}

impl HyperGridConfig {
    pub fn new(dim: usize, height: usize, preset: RewardPreset) -> Self {
        HyperGridConfig {
            dim,
            height,
            preset,
            r0: None,
            r1: None,
            r2: None,
        }
    }

    /// (R0, R1, R2): the preset's, with explicit values in their place.
    pub fn constants(&self) -> (f64, f64, f64) {
        let (r0, r1, r2) = self.preset.constants();
        (
            self.r0.unwrap_or(r0),
            self.r1.unwrap_or(r1),
            self.r2.unwrap_or(r2),
        )
    }
}

#[derive(Debug, Clone)]
pub struct HyperGrid {
    config: HyperGridConfig,
    /// R0, R1, R2 resolved from the preset and overrides.
    r: [f64; 3],
    /// Per-value band flags, so a reward costs a few lookups per coordinate.
    outer_band: Vec<bool>,
    inner_band: Vec<bool>,
    log_rewards_by_level: [f32; 3],
    modes: MaximalReward,
}

/// HyperGrid's modes: the states of maximal reward, identified by their index.
#[derive(Debug, Clone)]
struct MaximalReward {
    /// Reward levels whose reward is the maximum.
    levels: [bool; 3],
    count: u64,
    height: usize,
}

impl HyperGrid {
    pub fn new(config: HyperGridConfig) -> Result<Self> {
        if config.dim < 1 {
            return Err(Error::invalid("env.dim", config.dim, "must be at least 1"));
        }
        if config.height < 2 {
            return Err(Error::invalid(
                "env.height",
                config.height,
                "must be at least 2",
            ));
        }
        let (r0, r1, r2) = config.constants();
        for (field, value) in [("env.r0", r0), ("env.r1", r1), ("env.r2", r2)] {
            if !value.is_finite() {
                return Err(Error::invalid(field, value, "must be finite"));
            }
        }
        if r0 <= 0.0 {
            return Err(Error::invalid(
                "env.r0",
                r0,
                "must be > 0 (log-rewards must be finite)",
            ));
        }
        if r1 < 0.0 || r2 < 0.0 {
            let (field, value) = if r1 < 0.0 {
                ("env.r1", r1)
            } else {
                ("env.r2", r2)
            };
            return Err(Error::invalid(field, value, "must be >= 0"));
        }
        let h = config.height;
        let distance = |x: usize| (x as f64 / (h - 1) as f64 - 0.5).abs();
        let outer_band: Vec<bool> = (0..h).map(|x| distance(x) > 0.25).collect();
        let inner_band: Vec<bool> = (0..h)
            .map(|x| distance(x) > 0.3 && distance(x) < 0.4)
            .collect();
        let rewards = [r0, r0 + r1, r0 + r1 + r2];
        let log_rewards_by_level = rewards.map(|r| r.ln() as f32);
        let modes = MaximalReward::new(&outer_band, &inner_band, &log_rewards_by_level, config);
        Ok(HyperGrid {
            config,
            r: [r0, r1, r2],
            outer_band,
            inner_band,
            log_rewards_by_level,
            modes,
        })
    }

    pub fn config(&self) -> &HyperGridConfig {
        &self.config
    }

    /// Reward level of a state: 0 (R0), 1 (R0 + R1) or 2 (R0 + R1 + R2). An inner-band
    /// coordinate is always in the outer band too, so the levels nest.
    fn level(&self, state: &[i64]) -> usize {
        if state.iter().all(|&x| self.inner_band[x as usize]) {
            2
        } else if state.iter().all(|&x| self.outer_band[x as usize]) {
            1
        } else {
            0
        }
    }

    /// R(x) in f64.
    pub fn reward(&self, state: &[i64]) -> f64 {
        let [r0, r1, r2] = self.r;
        [r0, r0 + r1, r0 + r1 + r2][self.level(state)]
    }
}

impl MaximalReward {
    fn new(
        outer: &[bool],
        inner: &[bool],
        log_rewards: &[f32; 3],
        config: HyperGridConfig,
    ) -> Self {
        let count = |band: &[bool]| band.iter().filter(|&&b| b).count() as u64;
        let (h, m1, m2) = (config.height as u64, count(outer), count(inner));
        let power = |base: u64| base.saturating_pow(config.dim as u32);
        // States per level: level 2 all-inner, level 1 all-outer but not all-inner, 0 the rest.
        let per_level = [
            power(h).saturating_sub(power(m1)),
            power(m1).saturating_sub(power(m2)),
            power(m2),
        ];
        let max = (0..3)
            .filter(|&l| per_level[l] > 0)
            .map(|l| log_rewards[l])
            .fold(f32::NEG_INFINITY, f32::max);
        let levels = [0, 1, 2].map(|l| per_level[l] > 0 && log_rewards[l] == max);
        let count = (0..3)
            .filter(|&l| levels[l])
            .map(|l| per_level[l])
            .fold(0u64, u64::saturating_add);
        MaximalReward {
            levels,
            count,
            height: config.height,
        }
    }
}

impl Modes for HyperGrid {
    fn count(&self) -> u64 {
        self.modes.count
    }

    fn found_by(&self, x: &[i64], _log_reward: f32, found: &mut Vec<u64>) {
        if self.modes.levels[self.level(x)] {
            found.push(index_of(x, self.modes.height) as u64);
        }
    }

    fn criterion(&self) -> String {
        "maximal reward".into()
    }
}

/// Coordinate i has weight H^i: incrementing any coordinate increases the index.
fn index_of(state: &[i64], h: usize) -> usize {
    state
        .iter()
        .rev()
        .fold(0usize, |acc, &x| acc * h + x as usize)
}

impl Environment for HyperGrid {
    fn describe(&self) -> String {
        format!("hypergrid {}x{}", self.config.dim, self.config.height)
    }
    fn state_dim(&self) -> usize {
        self.config.dim
    }
    fn n_actions(&self) -> usize {
        self.config.dim + 1
    }
    fn n_backward_actions(&self) -> usize {
        self.config.dim
    }
    fn termination(&self) -> Termination {
        Termination::ExitAction(self.config.dim)
    }
    fn max_trajectory_length(&self) -> usize {
        self.config.dim * (self.config.height - 1) + 1
    }

    fn initial_state(&self, out: &mut [i64]) {
        out.fill(0);
    }

    fn step(&self, states: &mut [i64], actions: &[usize]) {
        let d = self.config.dim;
        for (state, &a) in states.chunks_exact_mut(d).zip(actions) {
            debug_assert!(a < d, "exit is not a state transition");
            state[a] += 1;
        }
    }

    fn backward_step(&self, states: &mut [i64], actions: &[usize]) {
        let d = self.config.dim;
        for (state, &a) in states.chunks_exact_mut(d).zip(actions) {
            state[a] -= 1;
        }
    }

    fn backward_action_of(&self, _parent: &[i64], forward_action: usize) -> usize {
        forward_action
    }

    fn forward_action_of(&self, _child: &[i64], backward_action: usize) -> usize {
        backward_action
    }

    fn forward_masks(&self, states: &[i64], out: &mut [bool]) {
        let d = self.config.dim;
        let top = self.config.height as i64 - 1;
        for (state, mask) in states.chunks_exact(d).zip(out.chunks_exact_mut(d + 1)) {
            for (m, &x) in mask.iter_mut().zip(state) {
                *m = x < top;
            }
            mask[d] = true;
        }
    }

    fn backward_masks(&self, states: &[i64], out: &mut [bool]) {
        for (m, &x) in out.iter_mut().zip(states) {
            *m = x > 0;
        }
    }

    fn log_reward(&self, states: &[i64], out: &mut [f32]) {
        for (state, r) in states.chunks_exact(self.config.dim).zip(out) {
            *r = self.log_rewards_by_level[self.level(state)];
        }
    }

    fn encoding_dim(&self) -> usize {
        self.config.dim * self.config.height
    }

    fn encode(&self, states: &[i64], out: &mut [f32]) {
        let (d, h) = (self.config.dim, self.config.height);
        out.fill(0.0);
        for (state, row) in states.chunks_exact(d).zip(out.chunks_exact_mut(d * h)) {
            for (i, &x) in state.iter().enumerate() {
                row[i * h + x as usize] = 1.0;
            }
        }
    }

    fn exits_everywhere(&self) -> bool {
        true
    }
    fn enumeration(&self) -> Option<&dyn Enumerable> {
        Some(self)
    }
    fn tokens(&self) -> Option<&dyn Tokenized> {
        Some(self)
    }
    fn modes(&self) -> Option<&dyn Modes> {
        Some(self)
    }
    fn grid_side(&self) -> Option<usize> {
        (self.config.dim >= 2).then_some(self.config.height)
    }
}

impl Enumerable for HyperGrid {
    fn n_states(&self) -> Option<u64> {
        (self.config.height as u64).checked_pow(self.config.dim.try_into().ok()?)
    }

    fn state_index(&self, state: &[i64]) -> usize {
        index_of(state, self.config.height)
    }

    fn state_from_index(&self, mut index: usize, out: &mut [i64]) {
        let h = self.config.height;
        for x in out.iter_mut() {
            *x = (index % h) as i64;
            index /= h;
        }
    }
}

/// Tokens: a BOS token (id H), then one token per coordinate (its value).
impl Tokenized for HyperGrid {
    fn length(&self) -> usize {
        self.config.dim + 1
    }
    fn vocab(&self) -> usize {
        self.config.height + 1
    }
    fn tokenize(&self, states: &[i64], out: &mut [i64]) {
        let d = self.config.dim;
        for (state, row) in states.chunks_exact(d).zip(out.chunks_exact_mut(d + 1)) {
            row[0] = self.config.height as i64;
            row[1..].copy_from_slice(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(d: usize, h: usize) -> HyperGrid {
        HyperGrid::new(HyperGridConfig::new(d, h, RewardPreset::Standard)).unwrap()
    }

    #[test]
    fn reward_matches_the_formula_by_hand() {
        // H = 8: |x/7 - 0.5| = 0.5, .357, .214, .071, .071, .214, .357, .5
        let g = grid(2, 8);
        assert!((g.reward(&[0, 0]) - 0.6).abs() < 1e-12); // outer band only
        assert!((g.reward(&[1, 6]) - 2.6).abs() < 1e-12); // both bands
        assert!((g.reward(&[1, 0]) - 0.6).abs() < 1e-12);
        assert!((g.reward(&[3, 0]) - 0.1).abs() < 1e-12);
        let mut lr = [0f32; 3];
        g.log_reward(&[0, 0, 1, 6, 3, 0], &mut lr);
        assert!((lr[0] - 0.6f32.ln()).abs() < 1e-6 && (lr[1] - 2.6f32.ln()).abs() < 1e-6);
        assert!((lr[2] - 0.1f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn masks_steps_and_indices() {
        let g = grid(3, 4);
        let mut s = vec![0, 3, 1];
        let mut fm = vec![false; 4];
        g.forward_masks(&s, &mut fm);
        assert_eq!(fm, [true, false, true, true]);
        let mut bm = vec![false; 3];
        g.backward_masks(&s, &mut bm);
        assert_eq!(bm, [false, true, true]);
        let before = g.state_index(&s);
        g.step(&mut s, &[2]);
        assert_eq!(s, [0, 3, 2]);
        assert!(g.state_index(&s) > before);
        let mut back = vec![0; 3];
        g.state_from_index(g.state_index(&s), &mut back);
        assert_eq!(back, s);
        assert_eq!(g.n_states(), Some(64));
    }

    #[test]
    fn modes_are_the_states_of_maximal_reward() {
        // Inner band: 2 values per coordinate at H = 8, 12 at H = 64 (x in 7..=12, 51..=56).
        assert_eq!(Modes::count(&grid(4, 8)), 16);
        assert_eq!(Modes::count(&grid(2, 64)), 144);
        // H = 4 has no inner band: the outer-band corners are the maximal level.
        let small = grid(2, 4);
        assert_eq!(Modes::count(&small), 4);
        // R2 = 0 ties levels 1 and 2: every all-outer state is a mode (4 values per coordinate).
        let tied = HyperGrid::new(HyperGridConfig {
            r2: Some(0.0),
            ..HyperGridConfig::new(4, 8, RewardPreset::Standard)
        })
        .unwrap();
        assert_eq!(Modes::count(&tied), 256);
        let mut found = Vec::new();
        let g = grid(2, 8);
        g.found_by(&[1, 6], 0.0, &mut found);
        g.found_by(&[0, 6], 0.0, &mut found);
        assert_eq!(found, [g.state_index(&[1, 6]) as u64]);
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        let err = HyperGrid::new(HyperGridConfig {
            height: 1,
            ..HyperGridConfig::new(2, 8, RewardPreset::Standard)
        });
        assert!(err.unwrap_err().to_string().contains("env.height = 1"));
        let err = HyperGrid::new(HyperGridConfig {
            r0: Some(0.0),
            ..HyperGridConfig::new(2, 8, RewardPreset::Standard)
        });
        assert!(err.unwrap_err().to_string().contains("env.r0 = 0"));
        let err = HyperGrid::new(HyperGridConfig {
            dim: 0,
            ..HyperGridConfig::new(2, 8, RewardPreset::Standard)
        });
        assert!(err.unwrap_err().to_string().contains("env.dim = 0"));
    }
}
