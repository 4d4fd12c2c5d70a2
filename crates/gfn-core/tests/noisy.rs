//! NoisyNet exploration: the noisy layer's outputs have the mean and variance of its
//! definition, the noise touches only the last layers and is removed exactly, rollouts use it
//! and training (off-policy, on the noise-free policy) still reaches the target.

mod common;

use common::{grid, param};
use gfn_core::env::Environment;
use gfn_core::estimators::{
    Architecture, BackwardPolicy, EstimatorConfig, Estimators, NoisyConfig, ParameterNoise,
};
use gfn_core::train::{NoReduction, TrainConfig, TrainState};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

fn mlp(env: &dyn Environment, hidden: usize, layers: usize) -> Estimators {
    let config = EstimatorConfig {
        architecture: Architecture::Mlp { hidden, layers },
        backward: BackwardPolicy::Uniform,
        log_flow: false,
        log_z: true,
    };
    Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(3)).unwrap()
}

fn noisy(layers: usize, std_init: f64) -> NoisyConfig {
    NoisyConfig { layers, std_init }
}

/// x·W + b in f64 (W stored [in, out]), with ReLU when `relu`.
fn affine(x: &[f64], w: &[f64], b: &[f64], relu: bool) -> Vec<f64> {
    (0..b.len())
        .map(|o| {
            let y = b[o] + (0..x.len()).map(|i| x[i] * w[i * b.len() + o]).sum::<f64>();
            if relu {
                y.max(0.0)
            } else {
                y
            }
        })
        .collect()
}

/// With the head noisy, logit o is μ_o + f(ε_out,o)·(σ_W Σ_i f(ε_in,i)·h_i + σ_b), where h is
/// the noise-free hidden layer and E f(ε)² = E|ε| = √(2/π) =: c: so its mean is the noise-free
/// logit and its variance c·(c·σ_W²·Σ h_i² + σ_b²), with σ_W = std_init/√fan_in and
/// σ_b = std_init/√fan_out; distinct logits are uncorrelated.
#[test]
fn a_noisy_layer_has_the_mean_and_variance_of_its_definition() {
    let env = grid(2, 5, 0.1);
    let (hidden, std_init) = (16, 0.5);
    let mut est = mlp(&env, hidden, 2);
    let noise = ParameterNoise::new(&est, noisy(1, std_init))
        .unwrap()
        .unwrap();
    let mut state = vec![0i64; env.state_dim()];
    env.initial_state(&mut state);
    state[0] = 2;
    let mut x = vec![0f32; env.encoding_dim()];
    env.encode(&state, &mut x);
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let layer = |name: &str| {
        (
            param(&est, &format!("{name}.weight")),
            param(&est, &format!("{name}.bias")),
        )
    };
    let (w0, b0) = layer("pf.trunk.0");
    let (w1, b1) = layer("pf.trunk.1");
    let (wh, bh) = layer("pf.head");
    let h = affine(&affine(&x, &w0, &b0, true), &w1, &b1, true);
    let mean = affine(&h, &wh, &bh, false);
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let sigma_w = std_init / (hidden as f64).sqrt();
    let sigma_b = std_init / (bh.len() as f64).sqrt();
    let h_squared: f64 = h.iter().map(|v| v * v).sum();
    let variance = c * (c * sigma_w * sigma_w * h_squared + sigma_b * sigma_b);

    let input = est.input(&env, &state);
    let n = 20_000;
    let width = bh.len();
    let (mut sum, mut squares, mut cross) = (vec![0f64; width], vec![0f64; width], 0f64);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..n {
        let restore = noise.perturb(&mut est.params, &mut rng);
        let logits = Vec::<f32>::try_from(est.pf_logits_no_grad(&input).view([-1])).unwrap();
        restore.restore(&mut est.params);
        for o in 0..width {
            let d = logits[o] as f64 - mean[o];
            sum[o] += d;
            squares[o] += d * d;
        }
        cross += (logits[0] as f64 - mean[0]) * (logits[1] as f64 - mean[1]);
    }
    let standard_error = (variance / n as f64).sqrt();
    for o in 0..width {
        let (bias, var) = (sum[o] / n as f64, squares[o] / n as f64);
        assert!(
            bias.abs() < 4.0 * standard_error,
            "logit {o}: mean off by {bias}"
        );
        assert!(
            (var / variance - 1.0).abs() < 0.05,
            "logit {o}: variance {var} vs {variance}"
        );
    }
    let correlation = cross / n as f64 / variance;
    assert!(
        correlation.abs() < 0.05,
        "logits 0 and 1 correlate: {correlation}"
    );
}

#[test]
fn noise_touches_only_the_last_layers_and_is_removed_exactly() {
    let env = grid(2, 5, 0.1);
    let mut est = mlp(&env, 16, 2);
    let before = est.params.to_vec();
    let noise = ParameterNoise::new(&est, noisy(2, 0.5)).unwrap().unwrap();
    let restore = noise.perturb(&mut est.params, &mut ChaCha8Rng::seed_from_u64(2));
    for spec in est.params.specs() {
        let range = spec.offset..spec.offset + spec.numel();
        let now = &est.params.to_vec()[range.clone()];
        let changed = now
            .iter()
            .zip(&before[range])
            .filter(|(a, b)| a != b)
            .count();
        let noisy = spec.name.starts_with("pf.trunk.1") || spec.name.starts_with("pf.head");
        match noisy {
            true => assert!(changed == spec.numel(), "{}: {changed} changed", spec.name),
            false => assert_eq!(changed, 0, "{}", spec.name),
        }
    }
    restore.restore(&mut est.params);
    assert_eq!(est.params.to_vec(), before, "restored bitwise");
}

#[test]
fn noisy_layers_are_refused_where_p_f_cannot_have_them() {
    let env = grid(2, 5, 0.1);
    let cases = [
        (
            mlp(&env, 8, 2),
            noisy(3, 0.5),
            "model.noisy_layers = 3: at most model.layers = 2",
        ),
        (
            mlp(&env, 8, 2),
            noisy(1, 0.0),
            "model.noisy_std_init = 0: must be > 0",
        ),
    ];
    for (est, config, message) in cases {
        let err = ParameterNoise::new(&est, config).unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
    let table = Estimators::new(
        &env,
        EstimatorConfig {
            architecture: Architecture::Tabular,
            backward: BackwardPolicy::Uniform,
            log_flow: false,
            log_z: true,
        },
        Device::Cpu,
        &mut ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();
    let err = ParameterNoise::new(&table, noisy(1, 0.5))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.noisy_layers = 1") && err.contains("mlp"),
        "{err}"
    );
}

fn state(noisy_layers: usize) -> TrainState {
    let config = TrainConfig {
        noisy: noisy(noisy_layers, 0.5),
        batch_size: 16,
        epsilon: gfn_core::sampler::EpsilonSchedule {
            start: 0.0,
            end: 0.0,
            decay_steps: 0,
        },
        ..common::small_tb_config(64, 0)
    };
    TrainState::new(Box::new(grid(2, 8, 0.1)), config, Device::Cpu, 0).unwrap()
}

/// Rollouts see the noise (another batch than the noise-free policy's from the same seed),
/// the update sees the noise-free parameters, and TB still learns the 2x8 grid.
#[test]
fn training_with_noisy_rollouts_learns_the_noise_free_policy() {
    let (mut plain, mut noisy) = (state(0), state(1));
    let before = noisy.estimators.params.to_vec();
    let (a, b) = (plain.sample_fresh().unwrap(), noisy.sample_fresh().unwrap());
    assert_ne!(a.actions, b.actions);
    assert_eq!(noisy.estimators.params.to_vec(), before);
    for _ in 0..1000 {
        noisy.train_step(&mut NoReduction).unwrap();
    }
    let tv = noisy.evaluate().unwrap().get("exact_tv").unwrap();
    assert!(tv < 0.05, "exact TV {tv} after 1000 steps");
}
