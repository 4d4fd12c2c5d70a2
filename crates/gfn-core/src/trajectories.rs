//! A batch of complete trajectories in ragged, flat form.

/// Trajectory `b` visits states `offsets[b]..offsets[b + 1]` (rows of `states`, each
/// `state_dim` wide); `actions[i]` is the forward action taken from state `i`, the exit action
/// for the last state of each trajectory, whose state is the terminal object x.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trajectories {
    pub state_dim: usize,
    pub states: Vec<i64>,
    pub actions: Vec<usize>,
    pub offsets: Vec<usize>,
    pub log_rewards: Vec<f32>,
}

impl Trajectories {
    pub fn new(state_dim: usize) -> Self {
        Trajectories {
            state_dim,
            offsets: vec![0],
            ..Default::default()
        }
    }

    /// Number of trajectories.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of states over all trajectories.
    pub fn n_states(&self) -> usize {
        self.actions.len()
    }

    pub fn state(&self, i: usize) -> &[i64] {
        &self.states[i * self.state_dim..(i + 1) * self.state_dim]
    }

    /// The terminal object of trajectory `b`.
    pub fn terminal_state(&self, b: usize) -> &[i64] {
        self.state(self.offsets[b + 1] - 1)
    }

    /// Appends one trajectory given its states (rows) and actions (exit last).
    pub fn push(&mut self, states: &[i64], actions: &[usize], log_reward: f32) {
        debug_assert_eq!(states.len(), actions.len() * self.state_dim);
        self.states.extend_from_slice(states);
        self.actions.extend_from_slice(actions);
        self.offsets.push(self.actions.len());
        self.log_rewards.push(log_reward);
    }

    /// Appends trajectory `b` of `other`.
    pub fn push_from(&mut self, other: &Trajectories, b: usize) {
        let (start, end) = (other.offsets[b], other.offsets[b + 1]);
        self.push(
            &other.states[start * self.state_dim..end * self.state_dim],
            &other.actions[start..end],
            other.log_rewards[b],
        );
    }

    pub fn extend(&mut self, other: &Trajectories) {
        for b in 0..other.len() {
            self.push_from(other, b);
        }
    }

    /// Trajectories `range`, in order.
    pub fn subset(&self, range: std::ops::Range<usize>) -> Trajectories {
        let mut out = Trajectories::new(self.state_dim);
        for b in range {
            out.push_from(self, b);
        }
        out
    }

    /// Index of the trajectory that each state belongs to.
    pub fn trajectory_of_states(&self) -> Vec<i64> {
        (0..self.len())
            .flat_map(|b| std::iter::repeat_n(b as i64, self.offsets[b + 1] - self.offsets[b]))
            .collect()
    }

    /// Whether each state is the last (terminal) state of its trajectory.
    pub fn is_last(&self) -> Vec<bool> {
        let mut last = vec![false; self.n_states()];
        for &end in &self.offsets[1..] {
            last[end - 1] = true;
        }
        last
    }

    /// Whether each state is the first (initial) state of its trajectory.
    pub fn is_first(&self) -> Vec<bool> {
        let mut first = vec![false; self.n_states()];
        for &start in &self.offsets[..self.len()] {
            first[start] = true;
        }
        first
    }
}
