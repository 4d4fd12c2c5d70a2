use super::prior::{check_beta, relative_scores, relative_to_prior, Prior};
use super::{Evaluated, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch, Residuals};
use crate::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Relative log-partition variance (torchgfn's RelativeLogPartitionVarianceGFlowNet): the
/// residuals of relative trajectory balance without log Z, centred on their batch mean, so
/// that nothing but the posterior is learned: batch mean of g(s − mean s) for
/// s = log p_post(τ) − log p_prior(τ) − β·log R(x).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelativeLogPartitionVariance {
    /// The prior: an earlier run's directory (its config.toml and checkpoint.pt).
    pub prior: Prior,
    /// Exponent of the reward.
    pub beta: f64,
}

impl Default for RelativeLogPartitionVariance {
    fn default() -> Self {
        RelativeLogPartitionVariance {
            prior: Prior::default(),
            beta: 1.0,
        }
    }
}

impl RelativeLogPartitionVariance {
    fn beta(&self) -> f64 {
        self.beta
    }
}

impl Objective for RelativeLogPartitionVariance {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn validate(&self) -> Result<()> {
        check_beta("loss.relative_zvar.beta", self.beta)
    }

    relative_to_prior!("loss.relative_zvar.prior");

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::None
    }
}

impl PerStateLoss for RelativeLogPartitionVariance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let scores = relative_scores(ev, batch, self.beta);
        residuals
            .loss(&(&scores - scores.mean(Kind::Float)))
            .mean(Kind::Float)
    }
}
