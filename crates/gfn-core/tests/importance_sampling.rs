//! The importance-sampled log p̂(x) of the test-set correlation against the exact terminating
//! probability (P_F propagated over the enumerated DAG). With P_B set to the exact posterior of
//! P_F every backward trajectory's weight is p(x) itself, so the estimate is exact from one
//! round (this checks every term of log P_F(τ) − log P_B(τ|x), with and without an exit
//! action); with a uniform P_B it converges over many rounds.

mod common;

use common::{grid, set_param, small_bitseq};
use gfn_core::env::{exit_action, BitSeq, BitSeqAppend, Environment};
use gfn_core::estimators::{Architecture, BackwardPolicy, EstimatorConfig, Estimators};
use gfn_core::metrics::correlation::importance_sampled_log_probs;
use gfn_core::metrics::exact::{exact_terminating_distribution, forward_policy_table};
use gfn_core::truth::{all_states, can_terminate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

/// Tabular estimators with random P_F logits (spread over ±2) and the given P_B.
fn random_forward(env: &dyn Environment, backward: BackwardPolicy) -> Estimators {
    let config = EstimatorConfig {
        architecture: Architecture::Tabular,
        backward,
        log_flow: false,
        log_z: false,
    };
    let mut est =
        Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(6)).unwrap();
    let n = all_states(env).unwrap().len() / env.state_dim();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let logits: Vec<f64> = (0..n * env.n_actions())
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    set_param(&mut est, "pf.table", &logits);
    est
}

/// Sets P_B to the posterior of P_F: P_B(s | s') = reach(s) P_F(s' | s) / reach(s').
fn set_posterior_backward(env: &dyn Environment, est: &mut Estimators) {
    let states = all_states(env).unwrap();
    let enumeration = env.enumeration().unwrap();
    let (d, na, nb) = (env.state_dim(), env.n_actions(), env.n_backward_actions());
    let n = states.len() / d;
    let policy = forward_policy_table(env, est).unwrap();
    let exit = exit_action(env);
    let mut reach = vec![0f64; n];
    let mut s0 = vec![0i64; d];
    env.initial_state(&mut s0);
    reach[enumeration.state_index(&s0)] = 1.0;
    let mut child = vec![0i64; d];
    for i in 0..n {
        for a in (0..na).filter(|&a| Some(a) != exit && policy[i * na + a] > 0.0) {
            child.copy_from_slice(&states[i * d..(i + 1) * d]);
            env.step(&mut child, &[a]);
            reach[enumeration.state_index(&child)] += reach[i] * policy[i * na + a];
        }
    }
    let mut log_pb = vec![f64::NEG_INFINITY; n * nb];
    let mut mask = vec![false; nb];
    for c in 0..n {
        let state = &states[c * d..(c + 1) * d];
        env.backward_masks(state, &mut mask);
        for b in (0..nb).filter(|&b| mask[b]) {
            let mut parent = state.to_vec();
            env.backward_step(&mut parent, &[b]);
            let p = enumeration.state_index(&parent);
            let a = env.forward_action_of(state, b);
            log_pb[c * nb + b] = (reach[p] * policy[p * na + a] / reach[c]).ln();
        }
    }
    set_param(est, "pb.table", &log_pb);
}

/// Terminal states, their exact log p(x), and the estimate from `rounds` rounds.
fn estimate(env: &dyn Environment, est: &Estimators, rounds: usize) -> (Vec<f64>, Vec<f64>) {
    let states = all_states(env).unwrap();
    let terminal = can_terminate(env, &states);
    let exact = exact_terminating_distribution(env, &forward_policy_table(env, est).unwrap());
    let d = env.state_dim();
    let (mut xs, mut log_p) = (Vec::new(), Vec::new());
    for i in (0..terminal.len()).filter(|&i| terminal[i] && exact[i] > 0.0) {
        xs.extend_from_slice(&states[i * d..(i + 1) * d]);
        log_p.push(exact[i].ln());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let estimated = importance_sampled_log_probs(env, est, &xs, rounds, &mut rng).unwrap();
    (log_p, estimated)
}

fn environments() -> Vec<Box<dyn Environment>> {
    vec![
        Box::new(BitSeq::new(small_bitseq(2)).unwrap()),
        Box::new(BitSeqAppend::new(small_bitseq(2)).unwrap()),
        Box::new(grid(2, 4, 0.1)),
    ]
}

#[test]
fn the_posterior_backward_policy_makes_every_estimate_exact() {
    for env in environments() {
        let mut est = random_forward(env.as_ref(), BackwardPolicy::Learned);
        set_posterior_backward(env.as_ref(), &mut est);
        let (exact, estimated) = estimate(env.as_ref(), &est, 2);
        for (i, (e, s)) in exact.iter().zip(&estimated).enumerate() {
            assert!(
                (e - s).abs() < 1e-4,
                "{}: terminal state {i}: {s} vs {e}",
                env.describe()
            );
        }
    }
}

#[test]
fn a_uniform_backward_policy_converges_over_rounds() {
    for env in environments() {
        let est = random_forward(env.as_ref(), BackwardPolicy::Uniform);
        let (exact, estimated) = estimate(env.as_ref(), &est, 1500);
        // Unbiased in probability space: the estimates still sum to about 1.
        let total: f64 = estimated.iter().map(|l| l.exp()).sum();
        let mut errors: Vec<f64> = exact
            .iter()
            .zip(&estimated)
            .map(|(e, s)| (e - s).abs())
            .collect();
        errors.sort_by(f64::total_cmp);
        let median = errors[errors.len() / 2];
        assert!(
            (total - 1.0).abs() < 0.02,
            "{}: Σ p̂ = {total}",
            env.describe()
        );
        assert!(
            median < 0.05,
            "{}: median |log p̂ − log p| = {median}",
            env.describe()
        );
    }
}
