use super::{
    host_tensor, Evaluated, Form, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch,
    Residuals,
};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Sub-trajectory balance (Madan et al., 2023); `[loss.subtb]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubTrajectoryBalance {
    /// λ of the geometric weightings.
    pub lambda: f64,
    pub weighting: SubTbWeighting,
}

impl Default for SubTrajectoryBalance {
    fn default() -> Self {
        SubTrajectoryBalance {
            lambda: 0.9,
            weighting: SubTbWeighting::GeometricWithin,
        }
    }
}

impl Objective for SubTrajectoryBalance {
    fn needs(&self) -> Needs {
        Needs {
            log_flow: true,
            backward_policy: true,
            ..Needs::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.lambda > 0.0 && self.lambda.is_finite() {
            return Ok(());
        }
        Err(Error::invalid(
            "loss.subtb.lambda",
            self.lambda,
            "must be > 0",
        ))
    }

    fn form(&self) -> Form<'_> {
        Form::PerState(self)
    }

    /// Every pair of positions of every trajectory.
    fn loss_elements(&self, trajectories: usize, max_length: usize) -> usize {
        trajectories * (max_length + 1) * (max_length + 1)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::InitialFlow
    }
}

impl PerStateLoss for SubTrajectoryBalance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        sub_trajectory_balance(ev, batch, self.lambda, self.weighting, residuals)
    }
}

/// How sub-trajectories are weighted (the options torchgfn offers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubTbWeighting {
    /// λ^(length−1), normalised within each trajectory, then averaged over trajectories.
    GeometricWithin,
    /// Mean loss per sub-trajectory length over the batch, lengths weighted ∝ λ^(length−1).
    Geometric,
    /// Every sub-trajectory of a trajectory alike, then averaged over trajectories.
    EqualWithin,
    /// Every sub-trajectory of the batch alike.
    Equal,
    /// Only whole trajectories (trajectory balance with log F(s0) as log Z).
    Tb,
    /// Only single transitions (detailed balance).
    Db,
}

/// Weight of sub-trajectory (i → j) of trajectory b, as a dense `[B, P, P]` array with
/// P = (longest trajectory's state count) + 1 positions; position L_b is the sink, whose
/// "flow" is R(x). Invalid pairs (i ≥ j, j > L_b) weigh 0.
pub fn subtb_weights(
    offsets: &[usize],
    lambda: f64,
    weighting: SubTbWeighting,
) -> (Vec<f32>, usize) {
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let n_traj = lengths.len();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let p = max_len + 1;
    let mut w = vec![0f64; n_traj * p * p];
    let geometric = |len: usize| lambda.powi(len as i32 - 1);
    // Number of valid sub-trajectories of each length over the batch (for `geometric`).
    let mut per_length = vec![0usize; p];
    for &l in &lengths {
        for (len, count) in per_length.iter_mut().enumerate().take(l + 1).skip(1) {
            *count += l + 1 - len;
        }
    }
    let total_pairs: usize = per_length.iter().sum();
    let total_edges = per_length.get(1).copied().unwrap_or(0);
    let length_norm: f64 = (1..=max_len).map(geometric).sum();
    for (b, &l) in lengths.iter().enumerate() {
        let within_norm: f64 = (1..=l)
            .map(|len| geometric(len) * (l + 1 - len) as f64)
            .sum();
        let pairs_b = (l * (l + 1) / 2) as f64;
        for i in 0..l {
            for j in i + 1..=l {
                let len = j - i;
                let value = match weighting {
                    SubTbWeighting::GeometricWithin => geometric(len) / within_norm / n_traj as f64,
                    SubTbWeighting::Geometric => {
                        geometric(len) / length_norm / per_length[len] as f64
                    }
                    SubTbWeighting::EqualWithin => 1.0 / pairs_b / n_traj as f64,
                    SubTbWeighting::Equal => 1.0 / total_pairs as f64,
                    SubTbWeighting::Tb if i == 0 && j == l => 1.0 / n_traj as f64,
                    SubTbWeighting::Db if len == 1 => 1.0 / total_edges as f64,
                    SubTbWeighting::Tb | SubTbWeighting::Db => 0.0,
                };
                w[(b * p + i) * p + j] = value;
            }
        }
    }
    (w.into_iter().map(|v| v as f32).collect(), p)
}

/// Sub-trajectory balance: for every sub-trajectory s_i → … → s_j of every trajectory,
/// g(log F(s_i) + Σ log P_F − log F(s_j) − Σ log P_B), where the sink has log-flow log R(x)
/// (the sink follows x's exit, or is x itself without an exit action; i = 0, j = sink is
/// trajectory balance with log F(s0) as log Z), weighted by [`subtb_weights`] over each
/// trajectory's edges.
pub fn sub_trajectory_balance(
    ev: &Evaluated,
    batch: &PreparedBatch,
    lambda: f64,
    weighting: SubTbWeighting,
    residuals: Residuals,
) -> Tensor {
    let log_flow = ev
        .log_flow
        .as_ref()
        .expect("SubTB needs a learned state flow");
    let device = log_flow.device();
    let n_traj = batch.n_trajectories;
    // Offsets of each trajectory's edges: position t of trajectory b is its state t, and
    // position edges(b) the sink.
    let mut edge_offsets = vec![0];
    for b in 0..n_traj {
        edge_offsets.push(edge_offsets[b] + batch.edges(b));
    }
    let (weights, p) = subtb_weights(&edge_offsets, lambda, weighting);
    let n_states = *batch.offsets.last().unwrap_or(&0);
    // Edge t goes from position t to t + 1; an exit edge has no P_B term (P_B = 1).
    let edge = &ev.log_pf - ev.log_pb.index_select(0, &batch.next_index) * &batch.not_last;
    // Gather positions into padded [B, P] rows; index n_states (+ B) reads a padding zero.
    let mut edge_index = vec![n_states as i64; n_traj * (p - 1)];
    let mut flow_index = vec![(n_states + n_traj) as i64; n_traj * p];
    for b in 0..n_traj {
        let (start, edges) = (batch.offsets[b], batch.edges(b));
        for t in 0..edges {
            edge_index[b * (p - 1) + t] = (start + t) as i64;
            flow_index[b * p + t] = (start + t) as i64;
        }
        flow_index[b * p + edges] = (n_states + b) as i64;
    }
    let zero = Tensor::zeros([1], (Kind::Float, device));
    let edges = Tensor::cat(&[edge, zero.shallow_clone()], 0)
        .index_select(0, &host_tensor(&edge_index, device))
        .view([n_traj as i64, p as i64 - 1]);
    let cumulative = Tensor::cat(
        &[
            Tensor::zeros([n_traj as i64, 1], (Kind::Float, device)),
            edges.cumsum(1, Kind::Float),
        ],
        1,
    );
    let flows = Tensor::cat(
        &[
            log_flow.shallow_clone(),
            batch.log_rewards.shallow_clone(),
            zero,
        ],
        0,
    )
    .index_select(0, &host_tensor(&flow_index, device))
    .view([n_traj as i64, p as i64]);
    // residual(i, j) = (log F_i − C_i) − (log F_j − C_j), with C the cumulative log-ratio.
    let g = flows - cumulative;
    let residual = g.unsqueeze(2) - g.unsqueeze(1);
    let weights = host_tensor(&weights, device).view([n_traj as i64, p as i64, p as i64]);
    // Invalid pairs weigh 0 but must not be NaN: their residuals are finite differences.
    (residuals.loss(&residual) * weights).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_weighting_sums_to_one() {
        let offsets = [0, 3, 4, 9];
        for weighting in [
            SubTbWeighting::GeometricWithin,
            SubTbWeighting::Geometric,
            SubTbWeighting::EqualWithin,
            SubTbWeighting::Equal,
            SubTbWeighting::Tb,
            SubTbWeighting::Db,
        ] {
            let (w, _) = subtb_weights(&offsets, 0.9, weighting);
            let total: f32 = w.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{weighting:?}: {total}");
        }
    }

    #[test]
    fn geometric_within_by_hand() {
        // One trajectory with 2 states: positions 0, 1, sink(2); pairs (0,1), (1,2) of length 1
        // and (0,2) of length 2: weights 1, 1, λ normalised by 2 + λ.
        let (w, p) = subtb_weights(&[0, 2], 0.5, SubTbWeighting::GeometricWithin);
        assert_eq!(p, 3);
        let at = |i: usize, j: usize| w[i * p + j];
        assert!(
            (at(0, 1) - 0.4).abs() < 1e-6
                && (at(1, 2) - 0.4).abs() < 1e-6
                && (at(0, 2) - 0.2).abs() < 1e-6
        );
        assert_eq!(at(1, 0), 0.0);
    }
}
