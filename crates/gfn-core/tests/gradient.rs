//! Autograd gradients of the losses agree with central finite differences: on a tiny MLP over
//! HyperGrid, and on a tiny Transformer (with the CPU attention's own backward) over a bit
//! sequence without an exit action.

mod common;

use common::{grid, small_bitseq};
use gfn_core::env::{BitSeq, Environment};
use gfn_core::estimators::{
    Architecture, BackwardPolicy, EstimatorConfig, Estimators, TransformerConfig,
};
use gfn_core::losses::{compute_loss, LossConfig, LossKind};
use gfn_core::sampler::{sample_trajectories, Exploration};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

#[test]
fn loss_gradients_match_finite_differences() {
    let mlp = Architecture::Mlp {
        hidden: 6,
        layers: 1,
    };
    check_gradients(&grid(2, 3, 0.1), mlp, &LossKind::ALL, 1e-2);
}

#[test]
fn transformer_gradients_match_finite_differences_for_every_loss() {
    let transformer = Architecture::Transformer(TransformerConfig {
        layers: 1,
        heads: 2,
        width: 4,
        ff: 4,
    });
    // Every loss a bit sequence can train (modified DB needs every state to terminate).
    let kinds = [
        LossKind::Tb,
        LossKind::Db,
        LossKind::Subtb,
        LossKind::Fm,
        LossKind::Zvar,
    ];
    // A smaller step than the MLP's: f32 rounding bounds h from below, and the feed-forward
    // ReLUs' kinks within h of a pre-activation (more of them here) bound it from above.
    check_gradients(
        &BitSeq::new(small_bitseq(2)).unwrap(),
        transformer,
        &kinds,
        1e-3,
    );
}

/// Central differences with step `h` on every parameter against autograd, per loss.
fn check_gradients(env: &dyn Environment, architecture: Architecture, kinds: &[LossKind], h: f32) {
    for &kind in kinds {
        let config = EstimatorConfig {
            architecture,
            backward: if kind.uses_backward_policy() {
                BackwardPolicy::Learned
            } else {
                BackwardPolicy::Uniform
            },
            log_flow: kind.needs_log_flow(),
            log_z: kind.needs_log_z(),
        };
        let mut est =
            Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
        let batch = sample_trajectories(
            env,
            &est,
            8,
            Exploration {
                epsilon: 0.3,
                temperature: 1.0,
            },
            &mut ChaCha8Rng::seed_from_u64(9),
        )
        .unwrap();
        let loss_config = LossConfig::new(kind);
        let loss_at = |est: &Estimators| {
            tch::no_grad(|| {
                compute_loss(&loss_config, env, est, &est.params.views(), &batch).double_value(&[])
            })
        };

        est.params.zero_grad();
        compute_loss(&loss_config, env, &est, &est.params.views(), &batch).backward();
        let analytic = Vec::<f32>::try_from(est.params.grad()).unwrap();

        let base = est.params.to_vec();
        let mut numeric = vec![0f64; base.len()];
        for i in 0..base.len() {
            let mut shifted = base.clone();
            shifted[i] = base[i] + h;
            est.params.copy_from(&Tensor::from_slice(&shifted));
            let plus = loss_at(&est);
            shifted[i] = base[i] - h;
            est.params.copy_from(&Tensor::from_slice(&shifted));
            let minus = loss_at(&est);
            numeric[i] = (plus - minus) / (2.0 * h as f64);
        }
        est.params.copy_from(&Tensor::from_slice(&base));
        let diff: f64 = analytic
            .iter()
            .zip(&numeric)
            .map(|(&a, &n)| (a as f64 - n).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
        let case = format!("{} {architecture:?} {kind:?}", env.describe());
        assert!(norm > 1e-3, "{case}: gradient too small to test ({norm})");
        assert!(
            diff / norm < 1e-2,
            "{case}: relative error {} (|g| = {norm})",
            diff / norm
        );
    }
}
