use super::prior::{check_beta, relative_scores, relative_to_prior, Prior};
use super::{Evaluated, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch, Residuals};
use crate::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Relative trajectory balance (Venkatraman et al., 2024): a posterior P_F trained against a
/// fixed prior forward policy, mean over trajectories of
/// g(log Z + log p_post(τ) − log p_prior(τ) − β·log R(x)). Its target is
/// p_post(x) ∝ p_prior(x)·R(x)^β, and log Z = log Σ_x p_prior(x)·R(x)^β.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelativeTrajectoryBalance {
    /// The prior: an earlier run's directory (its config.toml and checkpoint.pt).
    pub prior: Prior,
    /// Exponent of the reward.
    pub beta: f64,
}

impl Default for RelativeTrajectoryBalance {
    fn default() -> Self {
        RelativeTrajectoryBalance {
            prior: Prior::default(),
            beta: 1.0,
        }
    }
}

impl RelativeTrajectoryBalance {
    fn beta(&self) -> f64 {
        self.beta
    }
}

impl Objective for RelativeTrajectoryBalance {
    fn needs(&self) -> Needs {
        Needs {
            log_z: true,
            ..Needs::default()
        }
    }

    fn validate(&self) -> Result<()> {
        check_beta("loss.rtb.beta", self.beta)
    }

    relative_to_prior!("loss.rtb.prior");

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::Parameter
    }
}

impl PerStateLoss for RelativeTrajectoryBalance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let log_z = ev.log_z.as_ref().expect("RTB needs a learned log Z");
        let residual = relative_scores(ev, batch, self.beta) + log_z;
        residuals.loss(&residual).mean(Kind::Float)
    }
}
