//! Environments: discrete DAGs with a batched forward/backward step, action masks and rewards.
//!
//! States are fixed-width rows of `i64` stored contiguously (`batch × state_dim`); stepping,
//! masks, rewards and encodings are plain Rust over such batches. Tensors appear only at the
//! estimators. What an environment may lack is an optional capability, asked for by a method
//! that returns `None` by default (as torchgfn's `Env` raises `NotImplementedError`):
//! enumeration ([`Enumerable`]: exact metrics, tabular estimators), a token encoding
//! ([`Tokenized`]: the Transformer), a mode criterion ([`Modes`]) and a test set.
//!
//! Every environment is built from its own section of the configuration, `[env]` with
//! `name = "..."`; [`EnvConfig`] is the one list of them (see "Adding an environment" in the
//! README).

mod bitseq;
mod bitseq_append;
mod check;
mod hypergrid;
mod motifs;

pub use bitseq::BitSeq;
pub use bitseq_append::BitSeqAppend;
pub use check::{check_environment, CheckReport};
pub use hypergrid::{HyperGrid, HyperGridConfig, RewardPreset};
pub use motifs::{hamming, hamming_to_modes, BitSeqConfig, ModeSet, MOTIFS};

use crate::Result;
use serde::{Deserialize, Serialize};

/// How a trajectory ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// This forward action ends the trajectory in the state where it is taken, which is then
    /// the object x (HyperGrid, torchgfn's BitSequence).
    ExitAction(usize),
    /// A trajectory ends at the first state that allows no forward action: that complete
    /// state is the object x (gfnx's bitseq). Its last state carries [`NO_ACTION`].
    WhenComplete,
}

/// The action recorded for the last state of a trajectory that ended without an exit action.
/// (`u32::MAX`, so that it crosses the replay-buffer protocol's `u32` actions unchanged.)
pub const NO_ACTION: usize = u32::MAX as usize;

/// The contract every environment implements. All methods work on batches of states; none
/// may panic on a state reachable from [`Environment::initial_state`].
pub trait Environment: Send + Sync {
    /// Short description for logs and summaries, e.g. `hypergrid 4x8`.
    fn describe(&self) -> String;
    /// Number of `i64` coordinates per state.
    fn state_dim(&self) -> usize;
    /// Number of forward actions, the exit action (if there is one) included.
    fn n_actions(&self) -> usize;
    /// Number of backward actions.
    fn n_backward_actions(&self) -> usize;
    fn termination(&self) -> Termination;
    /// The most states a trajectory visits, s0 and x included.
    fn max_trajectory_length(&self) -> usize;

    fn initial_state(&self, out: &mut [i64]);
    /// Applies one forward action (never the exit action) to each state in place.
    fn step(&self, states: &mut [i64], actions: &[usize]);
    /// Applies one backward action to each state in place.
    fn backward_step(&self, states: &mut [i64], actions: &[usize]);
    /// The backward action that undoes `forward_action` taken from `parent`.
    fn backward_action_of(&self, parent: &[i64], forward_action: usize) -> usize;
    /// The forward action that leads from the parent reached by `backward_action` back to `child`.
    fn forward_action_of(&self, child: &[i64], backward_action: usize) -> usize;

    /// `out[b * n_actions + a]` tells whether forward action `a` is allowed in state `b`. With
    /// an exit action, every state allows at least one action; without one, exactly the
    /// complete states allow none.
    fn forward_masks(&self, states: &[i64], out: &mut [bool]);
    /// `out[b * n_backward_actions + a]` tells whether backward action `a` is allowed in state
    /// `b`; the initial state allows none, every other state at least one.
    fn backward_masks(&self, states: &[i64], out: &mut [bool]);
    /// log R(x) of each state. Asked only for states where a trajectory can end, except by
    /// objectives that need every state to terminate ([`Environment::exits_everywhere`]).
    fn log_reward(&self, states: &[i64], out: &mut [f32]);

    /// Width of the dense network input for one state.
    fn encoding_dim(&self) -> usize;
    /// Dense network input (`batch × encoding_dim`), e.g. one-hot coordinates.
    fn encode(&self, states: &[i64], out: &mut [f32]);

    /// Whether every state allows the exit action (objectives such as modified detailed
    /// balance need a reward for every state).
    fn exits_everywhere(&self) -> bool {
        false
    }
    /// Enumeration of the state space, where the environment offers it.
    fn enumeration(&self) -> Option<&dyn Enumerable> {
        None
    }
    /// A token encoding for sequence models (the Transformer), where the environment offers it.
    fn tokens(&self) -> Option<&dyn Tokenized> {
        None
    }
    /// The environment's own criterion for finding a mode.
    fn modes(&self) -> Option<&dyn Modes> {
        None
    }
    /// A fixed set of terminal states (rows of `state_dim`) for test-set correlation metrics.
    fn test_set(&self) -> Option<Vec<i64>> {
        None
    }
    /// The side of the grid formed by the first two coordinates, for environments whose
    /// distribution is drawn as a heatmap over them (HyperGrid).
    fn grid_side(&self) -> Option<usize> {
        None
    }
}

/// Index order over the whole state space: exact metrics, tabular estimators and DAG
/// propagation use it.
pub trait Enumerable {
    /// Number of states, `None` when it exceeds `u64::MAX`.
    fn n_states(&self) -> Option<u64>;
    /// Index of a state in `0..n_states`. Indices are a topological order: a child's index is
    /// larger than its parent's, so one pass in index order propagates flow over the DAG.
    fn state_index(&self, state: &[i64]) -> usize;
    fn state_from_index(&self, index: usize, out: &mut [i64]);
}

/// Where in a token sequence a network reads a block of action logits: action
/// `p * choices + c` (for `p < positions`) is choice `c` at token `first + p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    pub first: usize,
    pub positions: usize,
    pub choices: usize,
}

impl TokenLayout {
    pub fn actions(&self) -> usize {
        self.positions * self.choices
    }
}

/// A state as a sequence of tokens. Token 0 summarises the state (a BOS token): actions not
/// laid out per token, and the state flow, are read from its output.
pub trait Tokenized {
    /// Tokens per state.
    fn length(&self) -> usize;
    /// Distinct token values.
    fn vocab(&self) -> usize;
    /// `batch × length` token ids in `0..vocab`.
    fn tokenize(&self, states: &[i64], out: &mut [i64]);
    /// Forward actions laid out per token (the rest, e.g. an exit action, from token 0).
    fn forward_layout(&self) -> Option<TokenLayout> {
        None
    }
    /// Backward actions laid out per token.
    fn backward_layout(&self) -> Option<TokenLayout> {
        None
    }
}

/// An environment's criterion for "a mode was found".
pub trait Modes: Send + Sync {
    /// Number of modes.
    fn count(&self) -> u64;
    /// Appends to `found` the ids of the modes that terminal state `x` with log-reward
    /// `log_reward` counts as finding (an id names one mode, whichever state finds it).
    fn found_by(&self, x: &[i64], log_reward: f32, found: &mut Vec<u64>);
    /// The criterion in words, for logs.
    fn criterion(&self) -> String;
}

/// Builds the environments named in configurations: one line per environment.
macro_rules! environments {
    ($($variant:ident($config:ty) => $env:ty),+ $(,)?) => {
        /// The `[env]` section: `name` picks the environment, the other keys are its own.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "name", rename_all = "snake_case")]
        pub enum EnvConfig {
            $($variant($config),)+
        }

        impl EnvConfig {
            /// The environment this section describes; bad values are named.
            pub fn build(&self) -> Result<Box<dyn Environment>> {
                match self {
                    $(EnvConfig::$variant(config) => Ok(Box::new(<$env>::new(config.clone())?)),)+
                }
            }
        }
    };
}

environments! {
    Hypergrid(HyperGridConfig) => HyperGrid,
    Bitseq(BitSeqConfig) => BitSeq,
    BitseqAppend(BitSeqConfig) => BitSeqAppend,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig::Hypergrid(HyperGridConfig::default())
    }
}

impl EnvConfig {
    /// The names `env.name` accepts.
    pub const NAMES: &'static str = "hypergrid, bitseq, bitseq_append";
}

/// The exit action of environments that have one.
pub fn exit_action(env: &dyn Environment) -> Option<usize> {
    match env.termination() {
        Termination::ExitAction(a) => Some(a),
        Termination::WhenComplete => None,
    }
}
