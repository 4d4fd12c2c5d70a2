//! Shared helpers of the core integration tests: exact optimal flows computed by enumeration.
#![allow(dead_code)]

use gfn_core::env::{Environment, HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::estimators::Estimators;
use gfn_core::truth::all_states;
use tch::Tensor;

pub fn grid(dim: usize, height: usize, r0: f64) -> HyperGrid {
    HyperGrid::new(HyperGridConfig {
        r0,
        ..HyperGridConfig::new(dim, height, RewardPreset::Standard)
    })
    .unwrap()
}

/// A flow-consistent solution for a given backward policy, by enumeration in reverse
/// topological order: F(s) = R(s) + Σ_children F(c) P_B(s | c).
pub struct OptimalFlows {
    /// log P_B(parent via b | s), `n_states × n_back` (−inf where not allowed).
    pub log_pb: Vec<f64>,
    pub log_flow: Vec<f64>,
    /// log P_F(a | s), `n_states × n_actions` (−inf where not allowed).
    pub log_pf: Vec<f64>,
    /// log F(s → child), exit edge log R(s).
    pub log_edge_flow: Vec<f64>,
}

/// `pb_weights(state_index, backward_action)` gives unnormalised backward preferences.
pub fn optimal_flows(
    env: &dyn Environment,
    pb_weights: impl Fn(usize, usize) -> f64,
) -> OptimalFlows {
    let states = all_states(env).unwrap();
    let (d, na, nb) = (env.state_dim(), env.n_actions(), env.n_backward_actions());
    let n = states.len() / d;
    let mut fmask = vec![false; n * na];
    env.forward_masks(&states, &mut fmask);
    let mut bmask = vec![false; n * nb];
    env.backward_masks(&states, &mut bmask);
    let mut log_r = vec![0f32; n];
    env.log_reward(&states, &mut log_r);
    let mut pb = vec![0f64; n * nb];
    for i in 0..n {
        let total: f64 = (0..nb)
            .filter(|&b| bmask[i * nb + b])
            .map(|b| pb_weights(i, b))
            .sum();
        for b in (0..nb).filter(|&b| bmask[i * nb + b]) {
            pb[i * nb + b] = pb_weights(i, b) / total;
        }
    }
    let child_of = |i: usize, a: usize| {
        let mut c = states[i * d..(i + 1) * d].to_vec();
        env.step(&mut c, &[a]);
        env.state_index(&c)
    };
    let mut flow = vec![0f64; n];
    for i in (0..n).rev() {
        let mut f = (log_r[i] as f64).exp();
        for a in (0..na - 1).filter(|&a| fmask[i * na + a]) {
            let c = child_of(i, a);
            f += flow[c] * pb[c * nb + env.backward_action_of(&states[i * d..(i + 1) * d], a)];
        }
        flow[i] = f;
    }
    let mut log_pf = vec![f64::NEG_INFINITY; n * na];
    let mut log_edge_flow = vec![f64::NEG_INFINITY; n * na];
    for i in 0..n {
        for a in (0..na - 1).filter(|&a| fmask[i * na + a]) {
            let c = child_of(i, a);
            let edge =
                flow[c] * pb[c * nb + env.backward_action_of(&states[i * d..(i + 1) * d], a)];
            log_edge_flow[i * na + a] = edge.ln();
            log_pf[i * na + a] = (edge / flow[i]).ln();
        }
        log_edge_flow[i * na + na - 1] = log_r[i] as f64;
        log_pf[i * na + na - 1] = log_r[i] as f64 - flow[i].ln();
    }
    OptimalFlows {
        log_pb: pb
            .iter()
            .map(|p| if *p > 0.0 { p.ln() } else { f64::NEG_INFINITY })
            .collect(),
        log_flow: flow.iter().map(|f| f.ln()).collect(),
        log_pf,
        log_edge_flow,
    }
}

/// Overwrites the named parameter (e.g. `pf.table`) with `values` (−inf entries become 0:
/// they are masked anyway).
pub fn set_param(estimators: &mut Estimators, name: &str, values: &[f64]) {
    let mut flat = estimators.params.to_vec();
    let spec = estimators
        .params
        .specs()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .clone();
    assert_eq!(spec.numel(), values.len(), "{name}");
    for (dst, &v) in flat[spec.offset..spec.offset + spec.numel()]
        .iter_mut()
        .zip(values)
    {
        *dst = if v.is_finite() { v as f32 } else { 0.0 };
    }
    estimators.params.copy_from(&Tensor::from_slice(&flat));
}

pub fn has_param(estimators: &Estimators, name: &str) -> bool {
    estimators.params.specs().iter().any(|s| s.name == name)
}
