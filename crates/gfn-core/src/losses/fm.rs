use super::{host_tensor, Form, LogZEstimate, LossContext, Needs, Objective, TrajectoryLoss};
use crate::env::exit_action;
use crate::estimators::{additive_mask, Wanted, MASKED_LOGIT};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Flow matching (Bengio et al., 2021). No settings of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowMatching {}

impl Objective for FlowMatching {
    /// It parametrises edge flows only: no backward policy, no log F, no log Z.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn form(&self) -> Form<'_> {
        Form::Trajectories(self)
    }

    fn log_z_estimate(&self) -> LogZEstimate {
        LogZEstimate::OutflowOfInitial
    }
}

impl TrajectoryLoss for FlowMatching {
    fn loss(&self, ctx: &LossContext) -> Tensor {
        flow_matching(ctx)
    }
}

/// Flow matching with the forward head read as log edge flows log F(s → s') (the exit edge's
/// flow is the reward): for every non-initial state s of the batch,
/// g(log Σ_parents F(p → s) − log Σ_children F(s → c)), plus the reward matching term
/// g(log F(x → exit) − log R(x)) at terminal states. Without an exit action, a complete x
/// has no children and its outflow is R(x) itself.
pub fn flow_matching(ctx: &LossContext) -> Tensor {
    let LossContext {
        env,
        estimators,
        p,
        batch,
        clip_min,
        residuals,
    } = *ctx;
    let device = estimators.device();
    let (n_actions, n_back) = (env.n_actions(), env.n_backward_actions());
    let s = batch.n_states();
    let is_first = batch.is_first();
    let mut backward_mask = vec![false; s * n_back];
    env.backward_masks(&batch.states, &mut backward_mask);

    // Every parent of every non-initial state, with the action that leads to the child.
    let (mut parents, mut parent_actions, mut children) = (Vec::new(), Vec::new(), Vec::new());
    let mut parent_slots = Vec::new(); // [children × n_back] into the parent list (padding: P)
    for i in (0..s).filter(|&i| !is_first[i]) {
        let child = batch.state(i);
        let row_start = parent_slots.len();
        parent_slots.resize(row_start + n_back, -1i64);
        for b in (0..n_back).filter(|&b| backward_mask[i * n_back + b]) {
            let mut parent = child.to_vec();
            env.backward_step(&mut parent, &[b]);
            parent_slots[row_start + b] = parent_actions.len() as i64;
            parent_actions.push(env.forward_action_of(child, b) as i64);
            parents.extend_from_slice(&parent);
        }
        children.push(i as i64);
    }
    let n_parents = parent_actions.len();
    for slot in parent_slots.iter_mut().filter(|v| **v < 0) {
        *slot = n_parents as i64;
    }

    let mut all_states = batch.states.clone();
    all_states.extend_from_slice(&parents);
    let mut masks = vec![false; (s + n_parents) * n_actions];
    env.forward_masks(&all_states, &mut masks);
    let input = estimators.input(env, &all_states);
    let logits = estimators
        .forward(
            p,
            &input,
            Wanted {
                pf: true,
                ..Default::default()
            },
        )
        .pf_logits
        .expect("pf asked for");
    let logits = logits + additive_mask(&masks, n_actions, device);
    let out_flow = logits
        .narrow(0, 0, s as i64)
        .logsumexp([1i64].as_slice(), false);
    let last: Vec<i64> = batch.offsets[1..].iter().map(|&e| e as i64 - 1).collect();
    let last = host_tensor(&last, device);
    let log_r: Vec<f32> = batch.log_rewards.iter().map(|&r| r.max(clip_min)).collect();
    let log_r = host_tensor(&log_r, device);
    let (out_flow, rm) = match exit_action(env) {
        Some(exit) => {
            let exit_flow = logits.index_select(0, &last).select(1, exit as i64);
            (
                out_flow,
                residuals.loss(&(exit_flow - log_r)).mean(Kind::Float),
            )
        }
        None => (
            out_flow.index_copy(0, &last, &log_r),
            Tensor::zeros([], (Kind::Float, device)),
        ),
    };
    if children.is_empty() {
        return rm;
    }
    let parent_flows = logits
        .narrow(0, s as i64, n_parents as i64)
        .gather(1, &host_tensor(&parent_actions, device).unsqueeze(1), false)
        .squeeze_dim(1);
    let padded = Tensor::cat(
        &[
            parent_flows,
            Tensor::full([1], MASKED_LOGIT as f64, (Kind::Float, device)),
        ],
        0,
    );
    let in_flow = padded
        .index_select(0, &host_tensor(&parent_slots, device))
        .view([children.len() as i64, n_back as i64])
        .logsumexp([1i64].as_slice(), false);
    let fm = residuals
        .loss(&(in_flow - out_flow.index_select(0, &host_tensor(&children, device))))
        .mean(Kind::Float);
    fm + rm
}
