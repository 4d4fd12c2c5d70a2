use super::{Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Modified detailed balance, for environments where every state can terminate: for each
/// non-exit transition s → s',
/// (log R(s') + log P_B(s|s') + log P_F(exit|s) − log R(s) − log P_F(s'|s) − log P_F(exit|s'))².
/// Averaged over non-exit transitions; a batch of only exits at s0 contributes zero.
pub fn modified_detailed_balance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
    let next = |t: &Tensor| t.index_select(0, &batch.next_index);
    let residual = next(&batch.state_log_rewards) + next(&ev.log_pb) + &ev.log_pf_exit
        - &batch.state_log_rewards
        - &ev.log_pf
        - next(&ev.log_pf_exit);
    let transitions = batch.not_last.sum(Kind::Float).clamp_min(1.0);
    (residual.square() * &batch.not_last).sum(Kind::Float) / transitions
}
