use super::{
    per_trajectory_sum, Evaluated, Form, LogZEstimate, Needs, Objective, PerStateLoss,
    PreparedBatch, Residuals,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Trajectory balance (Malkin et al., 2022): mean over trajectories of
/// g(log Z + Σ log P_F − log R(x) − Σ log P_B). No settings of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrajectoryBalance {}

impl Objective for TrajectoryBalance {
    fn needs(&self) -> Needs {
        Needs {
            log_z: true,
            backward_policy: true,
            ..Needs::default()
        }
    }

    fn form(&self) -> Form<'_> {
        Form::PerState(self)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::Parameter
    }
}

impl PerStateLoss for TrajectoryBalance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let log_z = ev.log_z.as_ref().expect("TB needs a learned log Z");
        let residual =
            per_trajectory_sum(&(&ev.log_pf - &ev.log_pb), batch) + log_z - &batch.log_rewards;
        residuals.loss(&residual).mean(Kind::Float)
    }
}
