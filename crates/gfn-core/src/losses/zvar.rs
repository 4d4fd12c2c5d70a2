use super::{
    per_trajectory_sum, Evaluated, Form, LogZEstimate, Needs, Objective, PerStateLoss,
    PreparedBatch, Residuals,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Log-partition variance (Zhang et al., 2023): the batch mean of g(ζ − mean ζ) for the
/// per-trajectory estimate ζ = log R(x) + Σ log P_B − Σ log P_F of log Z (no log Z to learn;
/// with g = t² the batch variance).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogPartitionVariance {}

impl Objective for LogPartitionVariance {
    fn needs(&self) -> Needs {
        Needs {
            backward_policy: true,
            ..Needs::default()
        }
    }

    fn form(&self) -> Form<'_> {
        Form::PerState(self)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::ExitAtInitial
    }
}

impl PerStateLoss for LogPartitionVariance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let zeta = per_trajectory_sum(&(&ev.log_pb - &ev.log_pf), batch) + &batch.log_rewards;
        residuals
            .loss(&(&zeta - zeta.mean(Kind::Float)))
            .mean(Kind::Float)
    }
}
