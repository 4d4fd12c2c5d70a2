//! gfnx's bitseq (non-autoregressive BitSequence): a sequence of n / k words of k bits starts
//! empty; a forward action writes one word at one empty position (action `p · 2^k + w`), a
//! backward action empties one written position; the trajectory ends, with no exit action,
//! when every position is written. The reward is the motif one of [`super::motifs`].

use super::motifs::{
    bit_sequence_methods, bit_sequence_modes, bit_sequence_tokens, BitReward, BitSeqConfig, EMPTY,
};
use super::{Enumerable, Environment, Termination, TokenLayout, Tokenized};
use crate::Result;

#[derive(Debug, Clone)]
pub struct BitSeq {
    reward: BitReward,
}

impl BitSeq {
    pub fn new(config: BitSeqConfig) -> Result<Self> {
        Ok(BitSeq {
            reward: BitReward::new(config, usize::saturating_mul)?,
        })
    }

    pub fn config(&self) -> &BitSeqConfig {
        &self.reward.config
    }
}

impl Environment for BitSeq {
    fn describe(&self) -> String {
        self.reward.describe("bitseq")
    }
    fn n_actions(&self) -> usize {
        self.reward.length * self.reward.choices
    }
    fn n_backward_actions(&self) -> usize {
        self.reward.length
    }
    fn termination(&self) -> Termination {
        Termination::WhenComplete
    }
    fn max_trajectory_length(&self) -> usize {
        self.reward.length + 1
    }

    fn initial_state(&self, out: &mut [i64]) {
        out.fill(EMPTY);
    }

    fn step(&self, states: &mut [i64], actions: &[usize]) {
        let (length, choices) = (self.reward.length, self.reward.choices);
        for (state, &a) in states.chunks_exact_mut(length).zip(actions) {
            debug_assert_eq!(state[a / choices], EMPTY, "writes an empty position");
            state[a / choices] = (a % choices) as i64;
        }
    }

    fn backward_step(&self, states: &mut [i64], actions: &[usize]) {
        for (state, &p) in states.chunks_exact_mut(self.reward.length).zip(actions) {
            state[p] = EMPTY;
        }
    }

    fn backward_action_of(&self, _parent: &[i64], forward_action: usize) -> usize {
        forward_action / self.reward.choices
    }

    fn forward_action_of(&self, child: &[i64], backward_action: usize) -> usize {
        backward_action * self.reward.choices + child[backward_action] as usize
    }

    fn forward_masks(&self, states: &[i64], out: &mut [bool]) {
        let (length, choices) = (self.reward.length, self.reward.choices);
        for (state, mask) in states
            .chunks_exact(length)
            .zip(out.chunks_exact_mut(length * choices))
        {
            for (&w, allowed) in state.iter().zip(mask.chunks_exact_mut(choices)) {
                allowed.fill(w == EMPTY);
            }
        }
    }

    fn backward_masks(&self, states: &[i64], out: &mut [bool]) {
        for (m, &w) in out.iter_mut().zip(states) {
            *m = w != EMPTY;
        }
    }

    bit_sequence_methods!();
}

impl Enumerable for BitSeq {
    fn n_states(&self) -> Option<u64> {
        ((self.reward.choices + 1) as u64).checked_pow(self.reward.length.try_into().ok()?)
    }
    fn state_index(&self, state: &[i64]) -> usize {
        self.reward.index(state)
    }
    fn state_from_index(&self, index: usize, out: &mut [i64]) {
        self.reward.state_of(index, out);
    }
}

/// gfnx's layout: BOS, then one token per position; position p's output gives the logits of
/// writing each word there, and the logit of emptying it.
impl Tokenized for BitSeq {
    bit_sequence_tokens!();
    fn forward_layout(&self) -> Option<TokenLayout> {
        Some(TokenLayout {
            first: 1,
            positions: self.reward.length,
            choices: self.reward.choices,
        })
    }
    fn backward_layout(&self) -> Option<TokenLayout> {
        Some(TokenLayout {
            first: 1,
            positions: self.reward.length,
            choices: 1,
        })
    }
}

bit_sequence_modes!(BitSeq);
