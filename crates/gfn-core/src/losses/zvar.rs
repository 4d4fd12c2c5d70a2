use super::{per_trajectory_sum, Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Log-partition variance: the batch variance of the per-trajectory estimate
/// ζ = log R(x) + Σ log P_B − Σ log P_F of log Z (no log Z to learn).
pub fn log_partition_variance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
    let zeta = per_trajectory_sum(&(&ev.log_pb - &ev.log_pf), batch) + &batch.log_rewards;
    (&zeta - zeta.mean(Kind::Float)).square().mean(Kind::Float)
}
