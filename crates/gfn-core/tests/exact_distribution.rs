//! The exact learned terminating distribution (propagation over the DAG) agrees with the
//! frequencies of terminal states sampled from the same network policy.

mod common;

use common::grid;
use gfn_core::env::Environment;
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::metrics::exact::{
    exact_terminating_distribution, forward_policy_table, sample_terminal_counts, total_variation,
};
use gfn_core::sampler::{sample_trajectories, Exploration};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

#[test]
fn exact_distribution_matches_sampled_frequencies() {
    let env = grid(2, 5, 0.1);
    let config = EstimatorConfig {
        architecture: Architecture::Mlp {
            hidden: 16,
            layers: 2,
        },
        backward: BackwardPolicy::Uniform,
        log_flow: false,
        log_z: false,
    };
    // Random weights scaled up so the policy is far from uniform.
    let mut est =
        Estimators::new(&env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    let scaled = tch::no_grad(|| est.params.flat() * 4.0);
    est.params.copy_from(&scaled);

    let table = forward_policy_table(&env, &est).unwrap();
    let exact = exact_terminating_distribution(&env, &table);
    assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-9);

    // Rollouts through the network, one forward per step.
    let n = 100_000;
    let batch = sample_trajectories(
        &env,
        &est,
        n,
        Exploration::ON_POLICY,
        &mut ChaCha8Rng::seed_from_u64(2),
    )
    .unwrap();
    let enumeration = env.enumeration().unwrap();
    let mut empirical = vec![0f64; exact.len()];
    for b in 0..batch.len() {
        empirical[enumeration.state_index(batch.terminal_state(b))] += 1.0 / n as f64;
    }
    // With 25 states and 1e5 samples the expected TV from sampling noise alone is about 0.006.
    let tv = total_variation(&exact, &empirical);
    assert!(tv < 0.015, "network rollouts: TV {tv}");

    // The table sampler used by evaluation draws from the same distribution.
    let counts = sample_terminal_counts(&env, &table, n, &mut ChaCha8Rng::seed_from_u64(3));
    let table_empirical: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
    let tv = total_variation(&exact, &table_empirical);
    assert!(tv < 0.015, "table sampler: TV {tv}");
}
