use super::{Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Detailed balance over every transition of the batch, the exit included:
/// (log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s'))² for s → s', and
/// (log F(x) + log P_F(exit|x) − log R(x))² for the exit from x.
pub fn detailed_balance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
    let log_flow = ev.log_flow.as_ref().expect("DB needs a learned state flow");
    let next_flow =
        log_flow.index_select(0, &batch.next_index) + ev.log_pb.index_select(0, &batch.next_index);
    let terminal_flow = batch
        .log_rewards
        .index_select(0, &batch.trajectory_of_state);
    let target = terminal_flow.where_self(&batch.is_last, &next_flow);
    (log_flow + &ev.log_pf - target).square().mean(Kind::Float)
}
