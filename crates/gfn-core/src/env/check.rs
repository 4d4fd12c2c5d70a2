//! A brute-force check of the [`Environment`] contract, for every environment including a
//! user's own: explores the states reachable from s0 (breadth first up to a limit, then along
//! random trajectories to the end) and checks each transition against what the masks,
//! inverses and capabilities promise. The parents of a state are found by trying every forward
//! action of every explored state, so backward masks and steps are checked against an
//! independent enumeration, not against themselves.

use super::{Environment, Termination};
use rand::Rng;
use rustc_hash::{FxHashMap, FxHashSet};

/// What [`check_environment`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckReport {
    pub states: usize,
    pub transitions: usize,
    pub terminal_states: usize,
}

struct Checker<'a> {
    env: &'a dyn Environment,
    /// Every explored state, and the (parent, action) edges found into it.
    parents: FxHashMap<Vec<i64>, FxHashSet<(Vec<i64>, usize)>>,
    /// States whose transitions were checked.
    expanded: FxHashSet<Vec<i64>>,
    terminal: FxHashSet<Vec<i64>>,
}

/// Explores up to `breadth_states` states breadth first and `random_trajectories` random
/// trajectories, checking everything the contract promises. The error names the first
/// violation and the state where it happened.
pub fn check_environment(
    env: &dyn Environment,
    breadth_states: usize,
    random_trajectories: usize,
    rng: &mut impl Rng,
) -> Result<CheckReport, String> {
    let mut s0 = vec![0i64; env.state_dim()];
    env.initial_state(&mut s0);
    let mut checker = Checker {
        env,
        parents: FxHashMap::default(),
        expanded: FxHashSet::default(),
        terminal: FxHashSet::default(),
    };
    checker.parents.insert(s0.clone(), FxHashSet::default());
    let mut frontier = std::collections::VecDeque::from([s0.clone()]);
    while let Some(state) = frontier.front().cloned() {
        if checker.expanded.len() >= breadth_states {
            break;
        }
        frontier.pop_front();
        for (child, _) in checker.visit(&state, true)? {
            if !checker.expanded.contains(&child) && !frontier.contains(&child) {
                frontier.push_back(child);
            }
        }
    }
    for _ in 0..random_trajectories {
        let mut state = s0.clone();
        for _ in 0..env.max_trajectory_length() {
            let children = checker.visit(&state, false)?;
            if children.is_empty() {
                break;
            }
            let (parent, (child, action)) =
                (state, children[rng.gen_range(0..children.len())].clone());
            checker.record(&parent, &child, action);
            state = child;
        }
        if !checker.ends_here(&state) {
            return Err(format!(
                "a trajectory is still running after max_trajectory_length = {} states at {state:?}",
                env.max_trajectory_length()
            ));
        }
    }
    // Breadth-first exploration that ran out of states has seen every edge.
    checker.check_parents(frontier.is_empty())?;
    checker.check_enumeration()?;
    Ok(CheckReport {
        states: checker.parents.len(),
        transitions: checker.parents.values().map(|edges| edges.len()).sum(),
        terminal_states: checker.terminal.len(),
    })
}

impl Checker<'_> {
    fn forward_mask(&self, state: &[i64]) -> Vec<bool> {
        let mut mask = vec![false; self.env.n_actions()];
        self.env.forward_masks(state, &mut mask);
        mask
    }

    /// Whether a trajectory may end in `state` (and must, without an exit action).
    fn ends_here(&self, state: &[i64]) -> bool {
        let mask = self.forward_mask(state);
        match self.env.termination() {
            Termination::ExitAction(exit) => mask[exit],
            Termination::WhenComplete => !mask.contains(&true),
        }
    }

    fn record(&mut self, parent: &[i64], child: &[i64], action: usize) {
        self.parents
            .entry(child.to_vec())
            .or_default()
            .insert((parent.to_vec(), action));
    }

    /// Checks `state` and every transition out of it; returns its children (new or not) and
    /// the actions to them, having recorded them as edges when `record_all`.
    fn visit(&mut self, state: &[i64], record_all: bool) -> Result<Vec<(Vec<i64>, usize)>, String> {
        let env = self.env;
        self.expanded.insert(state.to_vec());
        let mask = self.forward_mask(state);
        let exit = match env.termination() {
            Termination::ExitAction(exit) => {
                if exit >= env.n_actions() {
                    return Err(format!(
                        "exit action {exit} is not below n_actions = {}",
                        env.n_actions()
                    ));
                }
                if !mask.contains(&true) {
                    return Err(format!(
                        "state {state:?} allows no action, not even the exit"
                    ));
                }
                Some(exit)
            }
            Termination::WhenComplete => None,
        };
        self.check_state(state)?;
        let mut children = Vec::new();
        for a in (0..env.n_actions()).filter(|&a| mask[a] && Some(a) != exit) {
            let mut child = state.to_vec();
            env.step(&mut child, &[a]);
            if child == state {
                return Err(format!("action {a} leaves state {state:?} unchanged"));
            }
            let b = env.backward_action_of(state, a);
            if b >= env.n_backward_actions() {
                return Err(format!(
                    "backward_action_of({state:?}, {a}) = {b} is not below n_backward_actions"
                ));
            }
            let mut back = vec![false; env.n_backward_actions()];
            env.backward_masks(&child, &mut back);
            if !back[b] {
                return Err(format!(
                    "child {child:?} of {state:?} by {a} does not allow backward action {b}"
                ));
            }
            let mut parent = child.clone();
            env.backward_step(&mut parent, &[b]);
            if parent != state {
                return Err(format!(
                    "backward action {b} from {child:?} gives {parent:?}, not {state:?}"
                ));
            }
            if env.forward_action_of(&child, b) != a {
                return Err(format!("forward_action_of({child:?}, {b}) is not {a}"));
            }
            if record_all {
                self.record(state, &child, a);
            }
            children.push((child, a));
        }
        Ok(children)
    }

    /// Rewards, encodings and tokens of one state.
    fn check_state(&mut self, state: &[i64]) -> Result<(), String> {
        let env = self.env;
        if self.ends_here(state) {
            self.terminal.insert(state.to_vec());
            let mut log_r = [0f32];
            env.log_reward(state, &mut log_r);
            if log_r[0].is_nan() || log_r[0] == f32::INFINITY {
                return Err(format!("log_reward({state:?}) = {}", log_r[0]));
            }
        }
        let mut encoded = vec![f32::NAN; env.encoding_dim()];
        env.encode(state, &mut encoded);
        if encoded.iter().any(|v| !v.is_finite()) {
            return Err(format!("encode({state:?}) leaves non-finite values"));
        }
        if let Some(tokens) = env.tokens() {
            let mut ids = vec![-1i64; tokens.length()];
            tokens.tokenize(state, &mut ids);
            if ids.iter().any(|&t| t < 0 || t as usize >= tokens.vocab()) {
                return Err(format!(
                    "tokens {ids:?} of {state:?} are not all in 0..{}",
                    tokens.vocab()
                ));
            }
        }
        Ok(())
    }

    /// Every explored state allows at least the backward actions of the edges found into it,
    /// exactly those when `complete`, and each of them leads to a parent that reaches it.
    fn check_parents(&self, complete: bool) -> Result<(), String> {
        let env = self.env;
        for (child, edges) in &self.parents {
            let mut back = vec![false; env.n_backward_actions()];
            env.backward_masks(child, &mut back);
            let allowed = back.iter().filter(|&&b| b).count();
            // Edges are only known from explored parents: all of them once breadth-first
            // exploration expanded every parent, the one taken along a random trajectory.
            if allowed < edges.len() || (complete && allowed > edges.len()) {
                return Err(format!(
                    "{child:?} has {} parents but allows {allowed} backward actions",
                    edges.len()
                ));
            }
            if edges.is_empty() && allowed > 0 {
                return Err(format!(
                    "the initial state {child:?} allows {allowed} backward actions"
                ));
            }
            for b in (0..back.len()).filter(|&b| back[b]) {
                let mut parent = child.clone();
                env.backward_step(&mut parent, &[b]);
                let a = env.forward_action_of(child, b);
                let mut forward = parent.clone();
                env.step(&mut forward, &[a]);
                if &forward != child || !self.forward_mask(&parent)[a] {
                    return Err(format!(
                        "backward action {b} from {child:?} leads to {parent:?}, which does not reach it by action {a}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Indices in range, invertible, distinct, and topological.
    fn check_enumeration(&self) -> Result<(), String> {
        let Some(enumeration) = self.env.enumeration() else {
            return Ok(());
        };
        let Some(n) = enumeration.n_states() else {
            return Ok(());
        };
        let mut seen = FxHashMap::default();
        let mut back = vec![0i64; self.env.state_dim()];
        for (state, edges) in &self.parents {
            let i = enumeration.state_index(state);
            if i as u64 >= n {
                return Err(format!(
                    "state_index({state:?}) = {i} is not below n_states = {n}"
                ));
            }
            enumeration.state_from_index(i, &mut back);
            if &back != state {
                return Err(format!("state_from_index({i}) = {back:?}, not {state:?}"));
            }
            if let Some(other) = seen.insert(i, state) {
                return Err(format!("{other:?} and {state:?} share index {i}"));
            }
            for (parent, _) in edges {
                if enumeration.state_index(parent) >= i {
                    return Err(format!(
                        "parent {parent:?} of {state:?} does not have a smaller index"
                    ));
                }
            }
        }
        Ok(())
    }
}
