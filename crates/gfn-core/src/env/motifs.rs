//! The bit-sequence reward shared by both BitSequence variants (Malkin et al., 2022; gfnx and
//! torchgfn build it the same way): |M| modes, each a concatenation of 8-bit blocks drawn from
//! five motifs, and log R(x) = −β·d(x)/n with d(x) the Hamming distance from x to the nearest
//! mode. Sequences are bitsets of `u64` words, bit i of the sequence at word i / 64.

use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

/// The five 8-bit motifs, most significant bit first: 00000000, 11111111, 11110000, 00001111,
/// 00111100.
pub const MOTIFS: [u8; 5] = [
    0b0000_0000,
    0b1111_1111,
    0b1111_0000,
    0b0000_1111,
    0b0011_1100,
];
const BLOCK: usize = 8;

/// The modes of a bit-sequence environment, as bitsets.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeSet {
    bits: usize,
    /// `u64` words per sequence.
    words: usize,
    /// `count × words`.
    modes: Vec<u64>,
}

impl ModeSet {
    /// `count` distinct modes of `bits` bits drawn with `seed`.
    pub fn random(bits: usize, count: usize, seed: u64) -> Result<Self> {
        if bits == 0 || !bits.is_multiple_of(BLOCK) {
            return Err(Error::invalid(
                "env.n",
                bits,
                "must be a positive multiple of the 8-bit motif width",
            ));
        }
        let blocks = bits / BLOCK;
        // 5^blocks distinct sequences exist; more than u64 holds counts as plenty.
        let possible = 5u64.checked_pow(blocks as u32).unwrap_or(u64::MAX);
        if count == 0 || count as u64 > possible {
            return Err(Error::invalid(
                "env.modes",
                count,
                format!("must be in 1..={possible} (distinct sequences of {blocks} motifs)"),
            ));
        }
        let words = bits.div_ceil(64);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seen = FxHashSet::default();
        let mut modes = Vec::with_capacity(count * words);
        while seen.len() < count {
            let choice: Vec<u8> = (0..blocks)
                .map(|_| rng.gen_range(0..MOTIFS.len()) as u8)
                .collect();
            if seen.insert(choice.clone()) {
                let mut mode = vec![0u64; words];
                for (b, &m) in choice.iter().enumerate() {
                    write_bits(&mut mode, b * BLOCK, BLOCK, MOTIFS[m as usize] as u64);
                }
                modes.extend_from_slice(&mode);
            }
        }
        Ok(ModeSet { bits, words, modes })
    }

    pub fn len(&self) -> usize {
        self.modes.len() / self.words
    }
    pub fn is_empty(&self) -> bool {
        self.modes.is_empty()
    }
    pub fn bits(&self) -> usize {
        self.bits
    }
    /// `u64` words per sequence.
    pub fn words(&self) -> usize {
        self.words
    }
    /// Mode `i` as a bitset.
    pub fn mode(&self, i: usize) -> &[u64] {
        &self.modes[i * self.words..(i + 1) * self.words]
    }

    /// Hamming distance from `x` to the nearest mode.
    pub fn nearest(&self, x: &[u64]) -> u32 {
        self.modes
            .chunks_exact(self.words)
            .map(|m| hamming(x, m))
            .min()
            .expect("a mode set has modes")
    }

    /// gfnx's test set: each mode, and for every c in 1..bits a copy of it with exactly c
    /// distinct random bits flipped (`len × bits` sequences), drawn with `seed`.
    pub fn test_set(&self, seed: u64) -> Vec<Vec<u64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(self.len() * self.bits);
        let positions: Vec<usize> = (0..self.bits).collect();
        for i in 0..self.len() {
            let mode = self.mode(i);
            out.push(mode.to_vec());
            for c in 1..self.bits {
                let mut flipped = mode.to_vec();
                for bit in rand::seq::index::sample(&mut rng, positions.len(), c).iter() {
                    flipped[bit / 64] ^= 1 << (bit % 64);
                }
                out.push(flipped);
            }
        }
        out
    }
}

/// Hamming distances between equal-length bitsets.
pub fn hamming(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// Ids of the modes within `threshold` (exclusive) Hamming distance of `x`.
pub fn hamming_to_modes(modes: &ModeSet, x: &[u64], threshold: u32, found: &mut Vec<u64>) {
    for i in 0..modes.len() {
        if hamming(x, modes.mode(i)) < threshold {
            found.push(i as u64);
        }
    }
}

/// Writes the `width` low bits of `value`, most significant first, at bit `start`.
pub fn write_bits(bits: &mut [u64], start: usize, width: usize, value: u64) {
    for j in 0..width {
        if (value >> (width - 1 - j)) & 1 == 1 {
            let bit = start + j;
            bits[bit / 64] |= 1 << (bit % 64);
        }
    }
}

/// Reads `width` bits at bit `start`, most significant first.
pub fn read_bits(bits: &[u64], start: usize, width: usize) -> u64 {
    (0..width).fold(0, |acc, j| {
        let bit = start + j;
        (acc << 1) | ((bits[bit / 64] >> (bit % 64)) & 1)
    })
}

/// `[env]` of both bit-sequence environments (`name = "bitseq"` or `"bitseq_append"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BitSeqConfig {
    /// Sequence length in bits: a multiple of 8 (the motif width) and of `k`.
    pub n: usize,
    /// Bits per word: one forward action writes one word.
    pub k: usize,
    /// Number of modes |M|.
    pub modes: usize,
    /// β in log R(x) = −β·d(x)/n.
    pub beta: f64,
    /// A terminal state finds every mode closer than this Hamming distance.
    pub mode_threshold: u32,
    /// Seed of the mode set.
    pub seed: u64,
    /// Seed of the test set (the modes with c random bits flipped, for c in 1..n).
    pub test_seed: u64,
}

impl Default for BitSeqConfig {
    /// gfnx's `tb_bitseq` setting.
    fn default() -> Self {
        BitSeqConfig {
            n: 120,
            k: 8,
            modes: 60,
            beta: 3.0,
            mode_threshold: 30,
            seed: 0,
            test_seed: 1,
        }
    }
}

/// Most forward actions a bit-sequence environment may have (one row of logits per state).
const MAX_ACTIONS: usize = 1 << 20;

/// What both bit-sequence environments share: the words, the mode set and the reward. A
/// state is `n / k` words, each in `0..2^k` or [`EMPTY`].
#[derive(Debug, Clone)]
pub(crate) struct BitReward {
    pub config: BitSeqConfig,
    pub modes: ModeSet,
    /// Words per sequence.
    pub length: usize,
    /// Values a word takes, 2^k.
    pub choices: usize,
}

/// A word not yet written.
pub(crate) const EMPTY: i64 = -1;

impl BitReward {
    /// `forward_actions(length, choices)` counts the environment's forward actions.
    pub fn new(
        config: BitSeqConfig,
        forward_actions: impl Fn(usize, usize) -> usize,
    ) -> Result<Self> {
        let BitSeqConfig { n, k, .. } = config;
        if !(1..=16).contains(&k) {
            return Err(Error::invalid("env.k", k, "must be in 1..=16"));
        }
        if n == 0 || !n.is_multiple_of(k) {
            return Err(Error::invalid(
                "env.n",
                n,
                format!("must be a positive multiple of env.k = {k}"),
            ));
        }
        let (length, choices) = (n / k, 1usize << k);
        let actions = forward_actions(length, choices);
        if actions > MAX_ACTIONS {
            return Err(Error::invalid(
                "env.k",
                k,
                format!("gives {actions} forward actions, more than the {MAX_ACTIONS} allowed"),
            ));
        }
        if !(config.beta.is_finite() && config.beta >= 0.0) {
            return Err(Error::invalid(
                "env.beta",
                config.beta,
                "must be finite and >= 0",
            ));
        }
        let modes = ModeSet::random(n, config.modes, config.seed)?;
        Ok(BitReward {
            config,
            modes,
            length,
            choices,
        })
    }

    /// The bits of a state's words (empty words as zeros).
    fn bits(&self, words: &[i64], out: &mut Vec<u64>) {
        out.clear();
        out.resize(self.modes.words(), 0);
        let k = self.config.k;
        for (p, &w) in words.iter().enumerate() {
            if w != EMPTY {
                write_bits(out, p * k, k, w as u64);
            }
        }
    }

    pub fn log_rewards(&self, states: &[i64], out: &mut [f32]) {
        let scale = -self.config.beta / self.config.n as f64;
        let mut bits = Vec::new();
        for (state, r) in states.chunks_exact(self.length).zip(out) {
            self.bits(state, &mut bits);
            *r = (scale * self.modes.nearest(&bits) as f64) as f32;
        }
    }

    pub fn found_by(&self, x: &[i64], found: &mut Vec<u64>) {
        let mut bits = Vec::new();
        self.bits(x, &mut bits);
        hamming_to_modes(&self.modes, &bits, self.config.mode_threshold, found);
    }

    /// `name n=.. k=.. modes=..`, the environment's one-line description.
    pub fn describe(&self, name: &str) -> String {
        let c = &self.config;
        format!("{name} n={} k={} modes={}", c.n, c.k, self.modes.len())
    }

    pub fn describe_modes(&self) -> String {
        format!(
            "Hamming distance < {} to one of {} modes",
            self.config.mode_threshold,
            self.modes.len()
        )
    }

    /// The test set as complete states (rows of words).
    pub fn test_states(&self) -> Vec<i64> {
        let k = self.config.k;
        self.modes
            .test_set(self.config.test_seed)
            .iter()
            .flat_map(|bits| (0..self.length).map(move |p| read_bits(bits, p * k, k) as i64))
            .collect()
    }

    /// One-hot words: `length × (2^k + 1)` values, slot 0 for an empty word.
    pub fn encode(&self, states: &[i64], out: &mut [f32]) {
        let width = self.choices + 1;
        out.fill(0.0);
        for (state, row) in states
            .chunks_exact(self.length)
            .zip(out.chunks_exact_mut(self.length * width))
        {
            for (p, &w) in state.iter().enumerate() {
                row[p * width + (w + 1) as usize] = 1.0;
            }
        }
    }

    /// Tokens: BOS (2^k + 1), then each word, 2^k for an empty one (gfnx's layout).
    pub fn tokenize(&self, states: &[i64], out: &mut [i64]) {
        let pad = self.choices as i64;
        for (state, row) in states
            .chunks_exact(self.length)
            .zip(out.chunks_exact_mut(self.length + 1))
        {
            row[0] = pad + 1;
            for (t, &w) in row[1..].iter_mut().zip(state) {
                *t = if w == EMPTY { pad } else { w };
            }
        }
    }

    /// Index in base 2^k + 1 (an empty word is digit 0), position p with weight base^p:
    /// writing a word raises a digit, so children have larger indices.
    pub fn index(&self, words: &[i64]) -> usize {
        let base = self.choices + 1;
        words
            .iter()
            .rev()
            .fold(0, |acc, &w| acc * base + (w + 1) as usize)
    }

    pub fn state_of(&self, mut index: usize, out: &mut [i64]) {
        let base = self.choices + 1;
        for w in out.iter_mut() {
            *w = (index % base) as i64 - 1;
            index /= base;
        }
    }
}

/// The `Environment` methods both bit-sequence environments answer from their `reward`
/// field alone (inside their `impl Environment`).
macro_rules! bit_sequence_methods {
    () => {
        fn state_dim(&self) -> usize {
            self.reward.length
        }
        fn log_reward(&self, states: &[i64], out: &mut [f32]) {
            self.reward.log_rewards(states, out);
        }
        fn encoding_dim(&self) -> usize {
            self.reward.length * (self.reward.choices + 1)
        }
        fn encode(&self, states: &[i64], out: &mut [f32]) {
            self.reward.encode(states, out);
        }
        fn enumeration(&self) -> Option<&dyn $crate::env::Enumerable> {
            Some(self)
        }
        fn tokens(&self) -> Option<&dyn $crate::env::Tokenized> {
            Some(self)
        }
        fn modes(&self) -> Option<&dyn $crate::env::Modes> {
            Some(self)
        }
        fn test_set(&self) -> Option<Vec<i64>> {
            Some(self.reward.test_states())
        }
    };
}

/// The mode criterion both bit-sequence environments share.
macro_rules! bit_sequence_modes {
    ($env:ty) => {
        impl $crate::env::Modes for $env {
            fn count(&self) -> u64 {
                self.reward.modes.len() as u64
            }
            fn found_by(&self, x: &[i64], _log_reward: f32, found: &mut Vec<u64>) {
                self.reward.found_by(x, found);
            }
            fn criterion(&self) -> String {
                self.reward.describe_modes()
            }
        }
    };
}

/// The `Tokenized` methods both bit-sequence environments share (inside their impls).
macro_rules! bit_sequence_tokens {
    () => {
        fn length(&self) -> usize {
            self.reward.length + 1
        }
        fn vocab(&self) -> usize {
            self.reward.choices + 2
        }
        fn tokenize(&self, states: &[i64], out: &mut [i64]) {
            self.reward.tokenize(states, out);
        }
    };
}

pub(crate) use bit_sequence_methods;
pub(crate) use bit_sequence_modes;
pub(crate) use bit_sequence_tokens;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_distinct_concatenations_of_motifs() {
        let set = ModeSet::random(120, 60, 0).unwrap();
        assert_eq!(set.len(), 60);
        let mut distinct = FxHashSet::default();
        for i in 0..set.len() {
            let mode = set.mode(i);
            assert!(distinct.insert(mode.to_vec()));
            for b in 0..15 {
                let block = read_bits(mode, b * 8, 8) as u8;
                assert!(
                    MOTIFS.contains(&block),
                    "block {b} of mode {i}: {block:08b}"
                );
            }
            assert_eq!(set.nearest(mode), 0);
        }
        assert!(
            ModeSet::random(8, 6, 0).is_err(),
            "only 5 one-block modes exist"
        );
        assert!(ModeSet::random(12, 1, 0).is_err());
    }

    #[test]
    fn bits_round_trip_most_significant_first() {
        let mut bits = vec![0u64; 2];
        write_bits(&mut bits, 62, 4, 0b1011);
        assert_eq!(bits, [1 << 62, 0b11]);
        assert_eq!(read_bits(&bits, 62, 4), 0b1011);
    }

    #[test]
    fn the_test_set_flips_exactly_c_bits() {
        let set = ModeSet::random(16, 3, 1).unwrap();
        let test = set.test_set(2);
        assert_eq!(test.len(), 3 * 16);
        for (i, x) in test.iter().enumerate() {
            let (mode, c) = (i / 16, i % 16);
            assert_eq!(hamming(x, set.mode(mode)) as usize, c);
        }
    }
}
