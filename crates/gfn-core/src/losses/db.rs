use super::{
    Evaluated, Form, LogZEstimate, Needs, Objective, PerStateLoss, PreparedBatch, Residuals,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Detailed balance (Bengio et al., 2023) over every edge of the batch:
/// g(log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s')) for s → s', where the sink's
/// log-flow is log R(x): the exit edge x → sink has no P_B term; without an exit action the
/// edge s → x ends at the sink and keeps its P_B term. Averaged over edges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedBalance {}

impl Objective for DetailedBalance {
    fn needs(&self) -> Needs {
        Needs {
            log_flow: true,
            backward_policy: true,
            ..Needs::default()
        }
    }

    fn form(&self) -> Form<'_> {
        Form::PerState(self)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::InitialFlow
    }
}

impl PerStateLoss for DetailedBalance {
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor {
        let log_flow = ev.log_flow.as_ref().expect("DB needs a learned state flow");
        let next = |t: &Tensor| t.index_select(0, &batch.next_index);
        let next_log_pb = next(&ev.log_pb);
        let next_flow = next(log_flow) + &next_log_pb;
        let log_r = batch
            .log_rewards
            .index_select(0, &batch.trajectory_of_state);
        let sink = if batch.exits {
            log_r
        } else {
            log_r + next_log_pb
        };
        let target = sink.where_self(&batch.into_sink, &next_flow);
        let losses = residuals.loss(&(log_flow + &ev.log_pf - target));
        if batch.exits {
            losses.mean(Kind::Float)
        } else {
            (losses * &batch.starts_edge).sum(Kind::Float) / batch.n_edges.max(1) as f64
        }
    }
}
