use super::{Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Detailed balance over every edge of the batch:
/// (log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s'))² for s → s', where the sink's
/// log-flow is log R(x): the exit edge x → sink has no P_B term; without an exit action the
/// edge s → x ends at the sink and keeps its P_B term. Averaged over edges.
pub fn detailed_balance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
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
    let residual = (log_flow + &ev.log_pf - target).square();
    if batch.exits {
        residual.mean(Kind::Float)
    } else {
        (residual * &batch.starts_edge).sum(Kind::Float) / batch.n_edges.max(1) as f64
    }
}
