//! Autograd gradients of the losses agree with central finite differences on a tiny MLP.

mod common;

use common::grid;
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::losses::{compute_loss, LossConfig, LossKind};
use gfn_core::sampler::{sample_trajectories, Exploration};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

#[test]
fn loss_gradients_match_finite_differences() {
    let env = grid(2, 3, 0.1);
    for kind in LossKind::ALL {
        let config = EstimatorConfig {
            architecture: Architecture::Mlp {
                hidden: 6,
                layers: 1,
            },
            backward: if kind.uses_backward_policy() {
                BackwardPolicy::Learned
            } else {
                BackwardPolicy::Uniform
            },
            log_flow: kind.needs_log_flow(),
            log_z: kind.needs_log_z(),
        };
        let mut est =
            Estimators::new(&env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
        let batch = sample_trajectories(
            &env,
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
                compute_loss(&loss_config, &env, est, &est.params.views(), &batch).double_value(&[])
            })
        };

        est.params.zero_grad();
        compute_loss(&loss_config, &env, &est, &est.params.views(), &batch).backward();
        let analytic = Vec::<f32>::try_from(est.params.grad()).unwrap();

        let base = est.params.to_vec();
        let h = 1e-2f32;
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
        assert!(norm > 1e-3, "{kind:?}: gradient too small to test ({norm})");
        assert!(
            diff / norm < 1e-2,
            "{kind:?}: relative error {} (|g| = {norm})",
            diff / norm
        );
    }
}
