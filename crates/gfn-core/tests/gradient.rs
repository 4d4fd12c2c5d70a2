//! Autograd gradients of the losses agree with central finite differences: on a tiny MLP over
//! HyperGrid, and on a tiny Transformer (with the CPU attention's own backward) over a bit
//! sequence without an exit action.

mod common;

use common::{grid, small_bitseq, with_prior};
use gfn_core::env::{BitSeq, Environment};
use gfn_core::estimators::{
    Architecture, BackwardPolicy, EstimatorConfig, Estimators, TransformerConfig,
};
use gfn_core::losses::{compute_loss, LossConfig, LossKind, Regression};
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
    let env = grid(2, 3, 0.1);
    check_gradients(&env, mlp, &configs(&env, LossKind::ALL), 1e-2);
}

/// Each objective's default settings, a prior attached to the relative ones.
fn configs(env: &dyn Environment, kinds: &[LossKind]) -> Vec<LossConfig> {
    kinds
        .iter()
        .map(|&k| with_prior(env, LossConfig::new(k)))
        .collect()
}

#[test]
fn every_regression_of_every_loss_has_the_gradient_of_its_finite_differences() {
    let mlp = Architecture::Mlp {
        hidden: 6,
        layers: 1,
    };
    let env = grid(2, 3, 0.1);
    let mut cases = Vec::new();
    for (regression, linex_alpha) in [
        (Regression::HalfSquared, 1.0),
        (Regression::ShiftedCosh, 1.0),
        (Regression::Linex, 1.0),
        (Regression::Linex, -0.5),
    ] {
        for &name in LossKind::ALL {
            let config = LossConfig {
                regression: Some(regression),
                linex_alpha,
                ..LossConfig::new(name)
            };
            cases.push(with_prior(&env, config));
        }
    }
    check_gradients(&env, mlp, &cases, 1e-2);
}

/// On one trajectory TB has one residual r: squared gives r², and every other regression
/// must give its own g(r) of that same r (found from r² and, for Linex, its sign).
#[test]
fn a_regression_applies_its_formula_to_the_balance_residual() {
    let env = grid(2, 3, 0.1);
    let config = EstimatorConfig::for_objective(
        Architecture::Mlp {
            hidden: 6,
            layers: 1,
        },
        BackwardPolicy::Learned,
        LossConfig::new(LossKind::Tb).objective().needs(),
    );
    let est =
        Estimators::new(&env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    let batch = sample_trajectories(
        &env,
        &est,
        4,
        Exploration {
            epsilon: 0.5,
            temperature: 1.0,
        },
        &mut ChaCha8Rng::seed_from_u64(8),
    )
    .unwrap();
    for b in 0..batch.len() {
        let one = batch.subset(b..b + 1);
        let loss = |regression: Regression, alpha: f64| {
            let config = LossConfig {
                regression: Some(regression),
                linex_alpha: alpha,
                ..LossConfig::new(LossKind::Tb)
            };
            tch::no_grad(|| compute_loss(&config, &env, &est, &est.params.views(), &one))
                .double_value(&[])
        };
        let r = loss(Regression::Squared, 1.0).sqrt();
        assert!(r > 1e-3, "trajectory {b}: residual {r} too small to tell");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-3);
        assert!(close(loss(Regression::HalfSquared, 1.0), r * r / 2.0));
        assert!(close(
            loss(Regression::ShiftedCosh, 1.0),
            2.0 * (r.cosh() - 1.0)
        ));
        let linex = |t: f64, a: f64| ((a * t).exp() - a * t - 1.0) / (a * a);
        let (plus, minus) = (loss(Regression::Linex, 1.0), loss(Regression::Linex, -1.0));
        // Linex with α and with −α swap g(r) and g(−r); one sign fits both.
        assert!(
            (close(plus, linex(r, 1.0)) && close(minus, linex(r, -1.0)))
                || (close(plus, linex(-r, 1.0)) && close(minus, linex(-r, -1.0))),
            "trajectory {b}: linex {plus}, {minus} for |r| = {r}"
        );
    }
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
    let env = BitSeq::new(small_bitseq(2)).unwrap();
    check_gradients(&env, transformer, &configs(&env, &kinds), 1e-3);
}

/// Central differences with step `h` on every parameter against autograd, per loss.
fn check_gradients(
    env: &dyn Environment,
    architecture: Architecture,
    losses: &[LossConfig],
    h: f32,
) {
    for loss_config in losses {
        let kind = loss_config.name;
        let config = EstimatorConfig::for_objective(
            architecture,
            BackwardPolicy::Learned,
            loss_config.objective().needs(),
        );
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
        let loss_at = |est: &Estimators| {
            tch::no_grad(|| {
                compute_loss(loss_config, env, est, &est.params.views(), &batch).double_value(&[])
            })
        };

        est.params.zero_grad();
        compute_loss(loss_config, env, &est, &est.params.views(), &batch).backward();
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
        let case = format!(
            "{} {architecture:?} {kind:?} {:?}",
            env.describe(),
            loss_config.regression
        );
        assert!(norm > 1e-3, "{case}: gradient too small to test ({norm})");
        assert!(
            diff / norm < 1e-2,
            "{case}: relative error {} (|g| = {norm})",
            diff / norm
        );
    }
}
