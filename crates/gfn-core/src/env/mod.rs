//! Environments: discrete DAGs with a batched forward/backward step and action masks.
//!
//! States are fixed-width rows of `i64` stored contiguously (`batch × state_dim`); stepping,
//! masks, rewards and encodings are plain Rust over such batches. Tensors appear only at the
//! estimators. Forward action `n_actions() - 1` is always the exit action.

mod hypergrid;

pub use hypergrid::{HyperGrid, HyperGridConfig, RewardPreset};

pub trait Environment: Send + Sync {
    /// Number of `i64` coordinates per state.
    fn state_dim(&self) -> usize;
    /// Number of forward actions, the exit action (the last one) included.
    fn n_actions(&self) -> usize;
    /// Number of backward actions.
    fn n_backward_actions(&self) -> usize;
    fn exit_action(&self) -> usize {
        self.n_actions() - 1
    }
    /// Longest possible trajectory, counted in forward actions including the exit.
    fn max_trajectory_length(&self) -> usize;

    fn initial_state(&self, out: &mut [i64]);
    /// Applies one non-exit forward action to each state in place.
    fn step(&self, states: &mut [i64], actions: &[usize]);
    /// Applies one backward action to each state in place.
    fn backward_step(&self, states: &mut [i64], actions: &[usize]);
    /// The backward action that undoes `forward_action` taken from `parent`.
    fn backward_action_of(&self, parent: &[i64], forward_action: usize) -> usize;
    /// The forward action that leads from the parent reached by `backward_action` back to `child`.
    fn forward_action_of(&self, child: &[i64], backward_action: usize) -> usize;

    /// `out[b * n_actions + a]` tells whether forward action `a` is allowed in state `b`.
    fn forward_masks(&self, states: &[i64], out: &mut [bool]);
    /// `out[b * n_backward_actions + a]` tells whether backward action `a` is allowed in state `b`.
    fn backward_masks(&self, states: &[i64], out: &mut [bool]);
    /// Log-reward of terminating in each state.
    fn log_reward(&self, states: &[i64], out: &mut [f32]);

    /// Width of the network input for one state.
    fn encoding_dim(&self) -> usize;
    /// Dense network input (`batch × encoding_dim`), e.g. K-hot coordinates.
    fn encode(&self, states: &[i64], out: &mut [f32]);

    /// Number of states, when small enough to enumerate (exact evaluation, tabular estimators).
    fn n_states(&self) -> Option<usize>;
    /// Index of a state in `0..n_states`. Indices are a topological order: a child's index is
    /// larger than its parent's, so one pass in index order propagates flow over the DAG.
    fn state_index(&self, state: &[i64]) -> usize;
    fn state_from_index(&self, index: usize, out: &mut [i64]);
}
