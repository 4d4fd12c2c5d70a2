use super::{Evaluated, PreparedBatch};
use tch::{Kind, Tensor};

/// Modified detailed balance, for environments where every state can terminate: for each
/// non-exit transition s → s',
/// (log R(s') + log P_B(s|s') + log P_F(exit|s) − log R(s) − log P_F(s'|s) − log P_F(exit|s'))².
/// Averaged over non-exit transitions; a batch of only exits at s0 contributes zero.
pub fn modified_detailed_balance(ev: &Evaluated, batch: &PreparedBatch) -> Tensor {
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
    (residual.square() * &batch.not_last).sum(Kind::Float) / transitions
}
