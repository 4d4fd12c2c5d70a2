use super::{per_trajectory_sum, Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Trajectory balance: mean over trajectories of
/// (log Z + Σ log P_F − log R(x) − Σ log P_B)².
pub fn trajectory_balance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
    let log_z = ev.log_z.as_ref().expect("TB needs a learned log Z");
    let residual =
        per_trajectory_sum(&(&ev.log_pf - &ev.log_pb), batch) + log_z - &batch.log_rewards;
    residual.square().mean(Kind::Float)
}
