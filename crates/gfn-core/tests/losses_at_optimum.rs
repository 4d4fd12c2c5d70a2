//! Every loss vanishes at an exactly constructed optimum (flows from enumeration) and is clearly
//! positive once the forward policy is perturbed; the learned log Z there equals the true one.

mod common;

use common::{grid, has_param, optimal_flows, set_param, small_bitseq};
use gfn_core::env::{BitSeq, BitSeqAppend, Environment};
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::losses::{
    compute_loss, estimated_log_z, LossConfig, LossKind, SubTbWeighting, SubTrajectoryBalance,
};
use gfn_core::sampler::{sample_trajectories, Exploration};
use gfn_core::truth::GroundTruth;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

fn optimal_estimators(env: &dyn Environment, kind: LossKind) -> Estimators {
    let config = EstimatorConfig::for_objective(
        Architecture::Tabular,
        BackwardPolicy::Learned,
        LossConfig::new(kind).objective().needs(),
    );
    let backward = config.backward;
    let mut est =
        Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
    // A deliberately non-uniform backward policy, when one is learned.
    let learned_pb = backward == BackwardPolicy::Learned;
    let flows = optimal_flows(env, |i, b| {
        if learned_pb {
            1.0 + ((i * 7 + b * 3) % 5) as f64
        } else {
            1.0
        }
    });
    if kind == LossKind::Fm {
        set_param(&mut est, "pf.table", &flows.log_edge_flow);
    } else {
        set_param(&mut est, "pf.table", &flows.log_pf);
        set_param(&mut est, "pb.table", &flows.log_pb);
    }
    if has_param(&est, "log_flow.table") {
        set_param(&mut est, "log_flow.table", &flows.log_flow);
    }
    if has_param(&est, "log_z") {
        set_param(&mut est, "log_z", &[flows.log_flow[0]]);
    }
    est
}

fn loss_on_explored_batch(env: &dyn Environment, est: &Estimators, config: &LossConfig) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Exploratory trajectories: balance must hold on any trajectory, not only on-policy ones.
    let batch = sample_trajectories(
        env,
        est,
        64,
        Exploration {
            epsilon: 0.5,
            temperature: 1.0,
        },
        &mut rng,
    )
    .unwrap();
    let p = est.params.views();
    compute_loss(config, env, est, &p, &batch).double_value(&[])
}

fn perturb_forward(est: &mut Estimators, rng: &mut impl Rng) {
    let spec = est
        .params
        .specs()
        .iter()
        .find(|s| s.name == "pf.table")
        .unwrap()
        .clone();
    let mut values: Vec<f64> = est.params.to_vec()[spec.offset..spec.offset + spec.numel()]
        .iter()
        .map(|&v| v as f64)
        .collect();
    values
        .iter_mut()
        .for_each(|v| *v += rng.gen_range(-0.3..0.3));
    set_param(est, "pf.table", &values);
}

/// Every loss of `kinds` (SubTB with every weighting) vanishes at the optimum built by
/// enumeration and not once P_F is perturbed; the learned log Z is the true one wherever the
/// objective has an estimate.
fn check_every_loss_at_the_optimum(env: &dyn Environment, kinds: &[LossKind]) {
    let truth = GroundTruth::enumerate(env).unwrap();
    let mut configs: Vec<LossConfig> = kinds.iter().copied().map(LossConfig::new).collect();
    for weighting in [
        SubTbWeighting::GeometricWithin,
        SubTbWeighting::Geometric,
        SubTbWeighting::EqualWithin,
        SubTbWeighting::Equal,
        SubTbWeighting::Tb,
        SubTbWeighting::Db,
    ] {
        configs.push(LossConfig {
            subtb: SubTrajectoryBalance {
                weighting,
                ..Default::default()
            },
            ..LossConfig::new(LossKind::Subtb)
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for config in configs {
        let case = format!("{}: {config:?}", env.describe());
        let mut est = optimal_estimators(env, config.name);
        let at_optimum = loss_on_explored_batch(env, &est, &config);
        assert!(
            at_optimum < 1e-8,
            "{case}: loss {at_optimum:e} at the optimum"
        );
        match estimated_log_z(config.objective(), env, &est) {
            Some(log_z) => assert!(
                (log_z - truth.log_z).abs() < 1e-4,
                "{case}: log Z {log_z} vs {}",
                truth.log_z
            ),
            None => assert!(
                config.name == LossKind::Zvar && !env.exits_everywhere(),
                "{case}: no log Z estimate"
            ),
        }
        perturb_forward(&mut est, &mut rng);
        let perturbed = loss_on_explored_batch(env, &est, &config);
        assert!(
            perturbed > 1e-3,
            "{case}: loss {perturbed:e} after perturbation"
        );
    }
}

#[test]
fn every_loss_is_zero_at_the_optimum_and_positive_when_perturbed() {
    check_every_loss_at_the_optimum(
        &grid(3, 4, 0.1),
        &[
            LossKind::Tb,
            LossKind::Db,
            LossKind::Fm,
            LossKind::Zvar,
            LossKind::ModifiedDb,
        ],
    );
}

#[test]
fn the_bit_sequences_optima_hold_with_and_without_an_exit_action() {
    // Not every bit-sequence state can terminate: modified DB does not apply.
    let kinds = [LossKind::Tb, LossKind::Db, LossKind::Fm, LossKind::Zvar];
    check_every_loss_at_the_optimum(&BitSeq::new(small_bitseq(2)).unwrap(), &kinds);
    check_every_loss_at_the_optimum(&BitSeqAppend::new(small_bitseq(2)).unwrap(), &kinds);
}
