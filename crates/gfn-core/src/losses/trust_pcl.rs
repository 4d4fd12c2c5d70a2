use super::prior::{relative_scores, relative_to_prior, Prior};
use super::{Evaluated, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch, Residuals};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Trust-PCL (Nachum et al., 2017), which Deleu et al. (2025) show is relative trajectory
/// balance at β = 1/α: α² times the RTB loss, a KL-regularised RL objective towards the prior
/// (the reference policy) at temperature α. Reports the soft value v_soft(s0) = α·log Z.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustPcl {
    /// The reference policy: an earlier run's directory (its config.toml and checkpoint.pt).
    pub prior: Prior,
    /// Temperature α > 0 (RTB's β = 1/α).
    pub alpha: f64,
}

impl Default for TrustPcl {
    fn default() -> Self {
        TrustPcl {
            prior: Prior::default(),
            alpha: 1.0,
        }
    }
}

impl TrustPcl {
    fn beta(&self) -> f64 {
        1.0 / self.alpha
    }
}

impl Objective for TrustPcl {
    fn needs(&self) -> Needs {
        Needs {
            log_z: true,
            ..Needs::default()
        }
    }

    fn validate(&self) -> Result<()> {
        match self.alpha > 0.0 && self.alpha.is_finite() {
            true => Ok(()),
            false => Err(Error::invalid(
                "loss.trust_pcl.alpha",
                self.alpha,
                "must be > 0",
            )),
        }
    }

    relative_to_prior!("loss.trust_pcl.prior");

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::Parameter
    }

    fn values_from_log_z(&self, log_z: f64) -> Vec<(String, f64)> {
        vec![("v_soft_s0".into(), self.alpha * log_z)]
    }
}

impl PerStateLoss for TrustPcl {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let log_z = ev.log_z.as_ref().expect("Trust-PCL needs a learned log Z");
        let residual = relative_scores(ev, batch, self.beta()) + log_z;
        residuals.loss(&residual).mean(Kind::Float) * (self.alpha * self.alpha)
    }
}
