use super::{
    Evaluated, Form, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch, Residuals,
};
use crate::env::Environment;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Modified detailed balance (Deleu et al., 2022), for environments where every state can
/// terminate: for each non-exit transition s → s',
/// g(log R(s') + log P_B(s|s') + log P_F(exit|s) − log R(s) − log P_F(s'|s) − log P_F(exit|s')).
/// Averaged over non-exit transitions; a batch of only exits at s0 contributes zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModifiedDetailedBalance {}

impl Objective for ModifiedDetailedBalance {
    fn needs(&self) -> Needs {
        Needs {
            backward_policy: true,
            state_log_rewards: true,
            ..Needs::default()
        }
    }

    fn validate_for(&self, env: &dyn Environment) -> Result<()> {
        if env.exits_everywhere() {
            return Ok(());
        }
        Err(Error::invalid(
            "loss.name",
            "modified_db",
            format!(
                "needs an environment where every state can terminate, which {} is not",
                env.describe()
            ),
        ))
    }

    fn form(&self) -> Form<'_> {
        Form::PerState(self)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::ExitAtInitial
    }
}

impl PerStateLoss for ModifiedDetailedBalance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let next = |t: &Tensor| t.index_select(0, &batch.next_index);
        let log_r = batch
            .state_log_rewards
            .as_ref()
            .expect("prepared with every state's reward");
        let log_pf_exit = ev
            .log_pf_exit
            .as_ref()
            .expect("checked: every state can exit");
        let residual =
            next(log_r) + next(&ev.log_pb) + log_pf_exit - log_r - &ev.log_pf - next(log_pf_exit);
        let transitions = batch.not_last.sum(Kind::Float).clamp_min(1.0);
        (residuals.loss(&residual) * &batch.not_last).sum(Kind::Float) / transitions
    }
}
