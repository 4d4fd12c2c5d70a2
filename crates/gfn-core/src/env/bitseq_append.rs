//! torchgfn's BitSequence (append-only): a sequence of n / k words of k bits is written left to
//! right, one word per forward action (action w < 2^k appends word w); the exit action (2^k)
//! is allowed only once every word is written, and nothing else is then. The one backward
//! action removes the last word: every state has one parent, the DAG is a tree and P_B = 1.
//! The reward is the motif one of [`super::motifs`].

use super::motifs::{
    bit_sequence_methods, bit_sequence_modes, bit_sequence_tokens, BitReward, BitSeqConfig, EMPTY,
};
use super::{Enumerable, Environment, Termination, Tokenized};
use crate::Result;

#[derive(Debug, Clone)]
pub struct BitSeqAppend {
    reward: BitReward,
}

impl BitSeqAppend {
    pub fn new(config: BitSeqConfig) -> Result<Self> {
        let reward = BitReward::new(config, |_, choices| choices.saturating_add(1))?;
        Ok(BitSeqAppend { reward })
    }

    /// Words written so far.
    fn written(state: &[i64]) -> usize {
        state.iter().take_while(|&&w| w != EMPTY).count()
    }

    /// States of fewer than `len` words: Σ_{l < len} (2^k)^l.
    fn states_shorter_than(&self, len: usize) -> Option<u64> {
        let choices = self.reward.choices as u64;
        (0..len).try_fold(0u64, |total, l| {
            total.checked_add(choices.checked_pow(l as u32)?)
        })
    }
}

impl Environment for BitSeqAppend {
    fn describe(&self) -> String {
        self.reward.describe("bitseq_append")
    }
    fn n_actions(&self) -> usize {
        self.reward.choices + 1
    }
    fn n_backward_actions(&self) -> usize {
        1
    }
    fn termination(&self) -> Termination {
        Termination::ExitAction(self.reward.choices)
    }
    fn max_trajectory_length(&self) -> usize {
        self.reward.length + 1
    }

    fn initial_state(&self, out: &mut [i64]) {
        out.fill(EMPTY);
    }

    fn step(&self, states: &mut [i64], actions: &[usize]) {
        for (state, &a) in states.chunks_exact_mut(self.reward.length).zip(actions) {
            debug_assert!(a < self.reward.choices, "exit is not a state transition");
            state[Self::written(state)] = a as i64;
        }
    }

    fn backward_step(&self, states: &mut [i64], _actions: &[usize]) {
        for state in states.chunks_exact_mut(self.reward.length) {
            state[Self::written(state) - 1] = EMPTY;
        }
    }

    fn backward_action_of(&self, _parent: &[i64], _forward_action: usize) -> usize {
        0
    }

    fn forward_action_of(&self, child: &[i64], _backward_action: usize) -> usize {
        child[Self::written(child) - 1] as usize
    }

    fn forward_masks(&self, states: &[i64], out: &mut [bool]) {
        let (length, choices) = (self.reward.length, self.reward.choices);
        for (state, mask) in states
            .chunks_exact(length)
            .zip(out.chunks_exact_mut(choices + 1))
        {
            let full = Self::written(state) == length;
            mask[..choices].fill(!full);
            mask[choices] = full;
        }
    }

    fn backward_masks(&self, states: &[i64], out: &mut [bool]) {
        for (state, m) in states.chunks_exact(self.reward.length).zip(out) {
            *m = state[0] != EMPTY;
        }
    }

    bit_sequence_methods!();
}

/// States ordered by the number of words written, then by the words as a base-2^k number:
/// a child has one word more than its parent, so a larger index.
impl Enumerable for BitSeqAppend {
    fn n_states(&self) -> Option<u64> {
        self.states_shorter_than(self.reward.length + 1)
    }
    fn state_index(&self, state: &[i64]) -> usize {
        let len = Self::written(state);
        let offset = self
            .states_shorter_than(len)
            .expect("indexed only when enumerable");
        let choices = self.reward.choices;
        offset as usize
            + state[..len]
                .iter()
                .fold(0, |acc, &w| acc * choices + w as usize)
    }
    fn state_from_index(&self, index: usize, out: &mut [i64]) {
        let choices = self.reward.choices;
        let mut len = 0;
        while self
            .states_shorter_than(len + 1)
            .is_some_and(|n| n as usize <= index)
        {
            len += 1;
        }
        let mut value = index - self.states_shorter_than(len).expect("below n_states") as usize;
        out.fill(EMPTY);
        for w in out[..len].iter_mut().rev() {
            *w = (value % choices) as i64;
            value /= choices;
        }
    }
}

/// BOS, then the words (2^k for one not yet written); every action is read from the BOS output.
impl Tokenized for BitSeqAppend {
    bit_sequence_tokens!();
}

bit_sequence_modes!(BitSeqAppend);
