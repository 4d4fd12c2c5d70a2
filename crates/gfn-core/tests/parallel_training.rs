//! The multi-threaded CPU training pieces against their one-thread versions: the forward and
//! backward split by network or by trajectories give the same loss and gradients, the shared
//! Adam step the same parameters, and the split rollout the trajectories of its shares rolled
//! out one by one.

mod common;

use common::grid;
use gfn_core::env::Environment;
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::losses::{loss_and_backward, pool_pays, LossConfig, LossKind};
use gfn_core::optim::{Adam, OptimizerConfig, OptimizerKind, ReducedGradient};
use gfn_core::parallel::training_pool;
use gfn_core::sampler::{sample_trajectories, sample_trajectories_parallel, Exploration};
use gfn_core::trajectories::Trajectories;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

const MLP: Architecture = Architecture::Mlp {
    hidden: 16,
    layers: 2,
};

const EXPLORATION: Exploration = Exploration {
    epsilon: 0.2,
    temperature: 1.0,
};

fn estimators(
    env: &dyn Environment,
    kind: LossKind,
    architecture: Architecture,
    backward: BackwardPolicy,
) -> Estimators {
    let config = EstimatorConfig::for_objective(
        architecture,
        backward,
        LossConfig::new(kind).objective().needs(),
    );
    let mut est =
        Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(5)).unwrap();
    // Tables start at zero; spread them so that every output matters.
    let n = est.params.len();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect();
    est.params.copy_from(&Tensor::from_slice(&values));
    est
}

fn loss_and_gradient(
    env: &dyn Environment,
    est: &mut Estimators,
    config: &LossConfig,
    batch: &Trajectories,
    threads: usize,
) -> (f64, Vec<f32>) {
    let pool = training_pool(threads);
    est.params.zero_grad();
    let loss = loss_and_backward(config, env, est, batch, pool.as_ref()).loss;
    (
        loss.double_value(&[]),
        Vec::<f32>::try_from(est.params.grad()).unwrap(),
    )
}

#[test]
fn split_backward_gives_the_one_thread_loss_and_gradients() {
    tch::set_num_threads(1);
    let env = grid(2, 5, 0.1);
    let architectures = [MLP, Architecture::Tabular];
    let backwards = [
        BackwardPolicy::Learned,
        BackwardPolicy::Tied,
        BackwardPolicy::Uniform,
    ];
    let mut split_cases = 0;
    for architecture in architectures {
        for backward in backwards {
            for &kind in LossKind::ALL {
                let mut est = estimators(&env, kind, architecture, backward);
                let batch = sample_trajectories(
                    &env,
                    &est,
                    12,
                    EXPLORATION,
                    &mut ChaCha8Rng::seed_from_u64(8),
                )
                .unwrap();
                let config = common::with_prior(&env, LossConfig::new(kind));
                let (loss_1, grad_1) = loss_and_gradient(&env, &mut est, &config, &batch, 1);
                let case = format!("{kind:?} {architecture:?} {backward:?}");
                assert!(
                    loss_1 > 1e-3,
                    "{case}: a loss worth differentiating ({loss_1})"
                );
                let scale = grad_1.iter().fold(0f32, |m, g| m.max(g.abs()));
                assert!(scale > 0.0, "{case}: some gradient");
                for threads in [2, 3] {
                    let (loss_n, grad_n) =
                        loss_and_gradient(&env, &mut est, &config, &batch, threads);
                    assert!(
                        (loss_1 - loss_n).abs() <= 1e-6 * loss_1,
                        "{case}, {threads} threads: loss {loss_1} vs {loss_n}"
                    );
                    for (i, (a, b)) in grad_1.iter().zip(&grad_n).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-6 * scale,
                            "{case}, {threads} threads: gradient {i}: {a} vs {b}"
                        );
                    }
                }
                let groups = est.independent_groups(gfn_core::estimators::Wanted {
                    pf: true,
                    pb: est.has_learned_pb(),
                    log_flow: est.has_log_flow(),
                });
                split_cases += (groups.len() > 1 && kind != LossKind::Fm) as usize;
            }
        }
    }
    // Split by network: every loss but FM with a learned P_B on both architectures (2 x 5)
    // and with a tied one on tables (5: tables never share); DB and SubTB with a tied or
    // uniform P_B on the MLP and a uniform one on tables (3 x 2: log F has its own network).
    // The other cases but FM are split by trajectories.
    assert_eq!(
        split_cases,
        2 * 5 + 5 + 3 * 2,
        "cases that really ran split"
    );
}

#[test]
fn adam_on_a_pool_gives_the_same_parameters() {
    let env = grid(2, 5, 0.1);
    for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
        let config = OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        };
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            let pool = training_pool(threads);
            let mut est = estimators(&env, LossKind::Tb, MLP, BackwardPolicy::Learned);
            let mut adam = Adam::new(&est.params, config);
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            for _ in 0..5 {
                let grad: Vec<f32> = (0..est.params.len())
                    .map(|_| rng.gen_range(-1.0..1.0))
                    .collect();
                adam.step_on(
                    &mut est.params,
                    &Tensor::from_slice(&grad),
                    &ReducedGradient::whole(grad.len()),
                    pool.as_ref(),
                );
            }
            results.push(est.params.to_vec());
        }
        assert_eq!(results[0], results[1], "{kind:?}: 2 threads");
        assert_eq!(results[0], results[2], "{kind:?}: 3 threads");
    }
}

#[test]
fn split_rollout_is_its_shares_rolled_out_in_order() {
    let env = grid(3, 6, 0.1);
    let est = estimators(&env, LossKind::Tb, MLP, BackwardPolicy::Learned);
    let pool = training_pool(3).unwrap();
    for n in [1, 2, 3, 7, 16] {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let batch =
            sample_trajectories_parallel(&pool, &env, &est, n, EXPLORATION, &mut rng).unwrap();

        // The shares' sizes and seeds as documented, each rolled out on this thread.
        let mut expected_rng = ChaCha8Rng::seed_from_u64(21);
        let threads = 3.min(n);
        let mut expected = Trajectories::new(env.state_dim());
        let seeds: Vec<u64> = (0..threads).map(|_| expected_rng.gen()).collect();
        for (k, seed) in seeds.into_iter().enumerate() {
            let count = n * (k + 1) / threads - n * k / threads;
            let part = sample_trajectories(
                &env,
                &est,
                count,
                EXPLORATION,
                &mut ChaCha8Rng::seed_from_u64(seed),
            )
            .unwrap();
            expected.extend(&part);
        }
        assert_eq!(batch.len(), n);
        assert_eq!(batch.states, expected.states, "n = {n}");
        assert_eq!(batch.actions, expected.actions, "n = {n}");
        assert_eq!(batch.offsets, expected.offsets, "n = {n}");
        assert_eq!(batch.log_rewards, expected.log_rewards, "n = {n}");
        // The caller's RNG moved on by the seeds it gave away.
        assert_eq!(rng.gen::<u64>(), expected_rng.gen::<u64>());
    }
}

#[test]
fn the_pool_is_chosen_where_it_was_measured_to_pay() {
    let pays = |kind, backward, dim, height, batch| {
        let env = grid(dim, height, 0.1);
        let est = estimators(&env, kind, MLP, backward);
        let config = LossConfig::new(kind);
        pool_pays(&config, &est, 2, batch, env.max_trajectory_length())
    };
    use BackwardPolicy::{Learned, Tied};
    // P_F and P_B side by side, and trajectories split for one network, at every size.
    for (dim, height) in [(4, 8), (2, 64)] {
        for batch in [16, 128] {
            assert!(pays(LossKind::Tb, Learned, dim, height, batch));
            assert!(pays(LossKind::Tb, Tied, dim, height, batch));
        }
    }
    // SubTB's pairwise terms: only on short trajectories and small batches.
    assert!(pays(LossKind::Subtb, Learned, 4, 8, 16));
    assert!(!pays(LossKind::Subtb, Learned, 4, 8, 128));
    assert!(!pays(LossKind::Subtb, Learned, 2, 64, 16));
    // DB's three networks on two threads: only on small batches.
    assert!(pays(LossKind::Db, Learned, 4, 8, 16));
    assert!(!pays(LossKind::Db, Learned, 4, 8, 128));
    assert!(!pays(LossKind::Db, Learned, 2, 64, 16));
    // Tied P_B: P_F's trunk and log F's share out evenly again.
    assert!(pays(LossKind::Db, Tied, 4, 8, 128));
}
