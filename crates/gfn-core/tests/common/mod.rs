//! Shared helpers of the core integration tests: exact optimal flows computed by enumeration.
#![allow(dead_code)]

use gfn_core::env::{
    BitSeqConfig, Environment, HyperGrid, HyperGridConfig, RewardPreset, Termination,
};
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::losses::{LossConfig, LossKind};
use gfn_core::metrics::MetricsConfig;
use gfn_core::optim::OptimizerConfig;
use gfn_core::params::ParamSpec;
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::{ReplayConfig, TrainConfig};
use gfn_core::truth::{all_states, can_terminate};
use rand::SeedableRng;
use tch::Tensor;

/// TB with an MLP of two `hidden`-wide layers and a learned P_B, batches of 8 with ε = 0.1,
/// on one thread: the setting of the tests that train a few steps.
pub fn small_tb_config(hidden: usize, replay_capacity: usize) -> TrainConfig {
    TrainConfig {
        architecture: Architecture::Mlp { hidden, layers: 2 },
        backward: BackwardPolicy::Learned,
        noisy: Default::default(),
        loss: LossConfig::new(LossKind::Tb),
        optimizer: OptimizerConfig::default(),
        batch_size: 8,
        epsilon: EpsilonSchedule {
            start: 0.1,
            end: 0.1,
            decay_steps: 0,
        },
        temperature: 1.0,
        replay: ReplayConfig {
            capacity: replay_capacity,
            policy: ReplayPolicy::Uniform,
            ratio: 0.5,
            diversity: Default::default(),
        },
        seed: 3,
        threads: 1,
        exact_samples: 1000,
        max_nonfinite_steps: 0,
        memory_budget: None,
        diagnostics_every: 0,
        metrics: MetricsConfig::default(),
    }
}

pub fn grid(dim: usize, height: usize, r0: f64) -> HyperGrid {
    HyperGrid::new(HyperGridConfig {
        r0: Some(r0),
        ..HyperGridConfig::new(dim, height, RewardPreset::Standard)
    })
    .unwrap()
}

/// A bit-sequence setting small enough to enumerate: 8 bits in words of `k`, 3 modes.
pub fn small_bitseq(k: usize) -> BitSeqConfig {
    BitSeqConfig {
        n: 8,
        k,
        modes: 3,
        beta: 3.0,
        mode_threshold: 2,
        ..BitSeqConfig::default()
    }
}

/// A flow-consistent solution for a given backward policy, by enumeration in reverse
/// topological order: F(s) = R(s)·[a trajectory can end at s] + Σ_children F(c) P_B(s | c).
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
    let enumeration = env.enumeration().unwrap();
    let (d, na, nb) = (env.state_dim(), env.n_actions(), env.n_backward_actions());
    let exit = match env.termination() {
        Termination::ExitAction(a) => Some(a),
        Termination::WhenComplete => None,
    };
    let n = states.len() / d;
    let mut fmask = vec![false; n * na];
    env.forward_masks(&states, &mut fmask);
    let mut bmask = vec![false; n * nb];
    env.backward_masks(&states, &mut bmask);
    let terminal = can_terminate(env, &states);
    let mut log_r = vec![f32::NEG_INFINITY; n];
    for i in (0..n).filter(|&i| terminal[i]) {
        env.log_reward(&states[i * d..(i + 1) * d], &mut log_r[i..i + 1]);
    }
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
        enumeration.state_index(&c)
    };
    let allowed = &fmask;
    let moves = |i: usize| (0..na).filter(move |&a| allowed[i * na + a] && Some(a) != exit);
    let edge = |flow: &[f64], i: usize, a: usize| {
        let c = child_of(i, a);
        flow[c] * pb[c * nb + env.backward_action_of(&states[i * d..(i + 1) * d], a)]
    };
    let mut flow = vec![0f64; n];
    for i in (0..n).rev() {
        let mut f = (log_r[i] as f64).exp();
        for a in moves(i) {
            f += edge(&flow, i, a);
        }
        flow[i] = f;
    }
    let mut log_pf = vec![f64::NEG_INFINITY; n * na];
    let mut log_edge_flow = vec![f64::NEG_INFINITY; n * na];
    for i in 0..n {
        for a in moves(i) {
            let e = edge(&flow, i, a);
            log_edge_flow[i * na + a] = e.ln();
            log_pf[i * na + a] = (e / flow[i]).ln();
        }
        if let Some(exit) = exit.filter(|_| terminal[i]) {
            log_edge_flow[i * na + exit] = log_r[i] as f64;
            log_pf[i * na + exit] = log_r[i] as f64 - flow[i].ln();
        }
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

/// `config` with, for an objective relative to a prior, a prior attached: a seeded MLP P_F
/// of two 8-wide layers (a policy of its own, unlike any the tests train).
pub fn with_prior(env: &dyn Environment, mut config: LossConfig) -> LossConfig {
    if let Some(prior) = config.objective_mut().prior_mut() {
        let estimators = EstimatorConfig {
            architecture: Architecture::Mlp {
                hidden: 8,
                layers: 2,
            },
            backward: BackwardPolicy::Uniform,
            log_flow: false,
            log_z: false,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        prior.attach(Estimators::new(env, estimators, tch::Device::Cpu, &mut rng).unwrap());
    }
    config
}

/// Overwrites the named parameter (e.g. `pf.table`) with `values` (−inf entries become 0:
/// they are masked anyway).
pub fn set_param(estimators: &mut Estimators, name: &str, values: &[f64]) {
    let mut flat = estimators.params.to_vec();
    let spec = spec(estimators, name);
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

fn spec(estimators: &Estimators, name: &str) -> ParamSpec {
    estimators
        .params
        .specs()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .clone()
}

/// The values of the named parameter.
pub fn param(estimators: &Estimators, name: &str) -> Vec<f64> {
    let spec = spec(estimators, name);
    estimators.params.to_vec()[spec.offset..spec.offset + spec.numel()]
        .iter()
        .map(|&v| v as f64)
        .collect()
}
