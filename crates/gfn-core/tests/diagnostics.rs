//! The training diagnostics and gradient clipping against hand computations: a zero table is
//! the uniform policy, whose entropy at a state is the log of its allowed actions and whose
//! ELBO terms are sums of such logs; a clipped first Adam step (eps = 1, no decay) moves each
//! parameter by lr·g_c/(|g_c| + 1) for the gradient g scaled to the clipping norm.

mod common;

use gfn_core::estimators::{Architecture, BackwardPolicy};
use gfn_core::optim::OptimizerConfig;
use gfn_core::train::{NoReduction, StepMetrics, TrainConfig, TrainState};
use tch::Device;

fn tabular(max_grad_norm: f64) -> TrainState {
    let config = TrainConfig {
        architecture: Architecture::Tabular,
        backward: BackwardPolicy::Uniform,
        noisy: Default::default(),
        optimizer: OptimizerConfig {
            eps: 1.0,
            weight_decay: 0.0,
            max_grad_norm,
            ..OptimizerConfig::default()
        },
        // The gradient norm is measured every step.
        diagnostics_every: 1,
        ..common::small_tb_config(8, 0)
    };
    TrainState::new(Box::new(common::grid(2, 4, 0.1)), config, Device::Cpu, 0).unwrap()
}

#[test]
fn diagnostics_of_the_uniform_policy_match_counting_its_choices() {
    let mut state = tabular(0.0);
    let (batch, _) = state.sample_batch().unwrap();
    let env = state.env.as_ref();
    let (n_actions, n_back) = (env.n_actions(), env.n_backward_actions());
    let allowed = |mask_of: &dyn Fn(&[i64], &mut [bool]), width: usize, s: &[i64]| {
        let mut mask = vec![false; width];
        mask_of(s, &mut mask);
        mask.iter().filter(|&&m| m).count() as f64
    };
    let forward = |s: &[i64]| allowed(&|s, m| env.forward_masks(s, m), n_actions, s);
    let backward = |s: &[i64]| allowed(&|s, m| env.backward_masks(s, m), n_back, s);
    // Every state of a HyperGrid trajectory acts (the last one exits).
    let states: Vec<&[i64]> = (0..batch.n_states()).map(|i| batch.state(i)).collect();
    let entropy = states.iter().map(|s| forward(s).ln()).sum::<f64>() / states.len() as f64;
    let mut elbo = 0.0;
    for b in 0..batch.len() {
        let (start, end) = (batch.offsets[b], batch.offsets[b + 1]);
        let log_pf: f64 = (start..end).map(|i| -forward(states[i]).ln()).sum();
        let log_pb: f64 = (start + 1..end).map(|i| -backward(states[i]).ln()).sum();
        elbo += log_pb + batch.log_rewards[b] as f64 - log_pf;
    }
    elbo /= batch.len() as f64;
    let step = StepMetrics {
        grad_norm: 1.5,
        ..StepMetrics::before_training(0.0)
    };
    let d = state.diagnostics(&batch, &step);
    assert_eq!(d.grad_norm, 1.5);
    assert!(
        (d.entropy - entropy).abs() < 1e-5,
        "{} vs {entropy}",
        d.entropy
    );
    assert!((d.elbo - elbo).abs() < 1e-4, "{} vs {elbo}", d.elbo);
    let n = batch.len() as f64;
    let mean_reward = batch
        .log_rewards
        .iter()
        .map(|&r| (r as f64).exp())
        .sum::<f64>()
        / n;
    assert!((d.mean_reward - mean_reward).abs() < 1e-9);
    assert_eq!(d.mean_length, batch.n_states() as f64 / n);
}

#[test]
fn a_clipped_step_moves_by_the_gradient_scaled_to_the_clipping_norm() {
    let mut free = tabular(0.0);
    let before = free.estimators.params.to_vec();
    let metrics = free.train_step(&mut NoReduction).unwrap();
    let grad = Vec::<f32>::try_from(free.estimators.params.grad()).unwrap();
    let norm = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
    assert!(
        (metrics.grad_norm - norm).abs() < 1e-4 * norm,
        "{} vs {norm}",
        metrics.grad_norm
    );

    let max = norm / 4.0;
    let mut clipped = tabular(max);
    assert_eq!(clipped.estimators.params.to_vec(), before);
    clipped.train_step(&mut NoReduction).unwrap();
    let lrs: Vec<f64> = clipped
        .estimators
        .params
        .specs()
        .iter()
        .flat_map(|s| {
            let lr = match s.name.as_str() {
                "log_z" => clipped.config.optimizer.lr_log_z,
                _ => clipped.config.optimizer.lr,
            };
            std::iter::repeat_n(lr, s.numel())
        })
        .collect();
    let scale = max / (norm + 1e-6);
    for (i, (&after, &p0)) in clipped
        .estimators
        .params
        .to_vec()
        .iter()
        .zip(&before)
        .enumerate()
    {
        let g = grad[i] as f64 * scale;
        // Adam's first step: m̂ = g, v̂ = g².
        let expected = p0 as f64 - lrs[i] * g / (g.abs() + 1.0);
        assert!(
            (after as f64 - expected).abs() < 1e-6,
            "parameter {i}: {after} vs {expected}"
        );
    }
}
