//! Two computations that skip libtorch or repeated work are checked against the plain tensor
//! path: the plain-Rust rollout policy, and the loss inputs evaluated once per distinct state.

mod common;

use gfn_core::env::{exit_action, BitSeq, BitSeqConfig, Environment};
use gfn_core::estimators::{
    additive_mask, masked_log_softmax, Architecture, BackwardPolicy, EstimatorConfig, Estimators,
    HostScratch, TransformerConfig, Wanted,
};
use gfn_core::losses::{evaluate, prepare, BatchNeeds};
use gfn_core::sampler::{sample_trajectories, Exploration};
use rand::{Rng, SeedableRng};
use tch::{Device, Tensor};

fn estimators(env: &dyn Environment, architecture: Architecture, seed: u64) -> Estimators {
    let config = EstimatorConfig {
        architecture,
        backward: BackwardPolicy::Learned,
        log_flow: true,
        log_z: true,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let est = Estimators::new(env, config, Device::Cpu, &mut rng).unwrap();
    // Tabular parameters start at zero; give every architecture distinct values.
    let noise = Tensor::randn([est.params.len() as i64], (tch::Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        let _ = est.params.flat().shallow_clone().g_add_(&(noise * 0.5));
    });
    est
}

/// TB's estimators with a uniform P_B, at their initial values.
fn pf_only(
    env: &dyn Environment,
    architecture: Architecture,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Estimators {
    let config = EstimatorConfig {
        architecture,
        backward: BackwardPolicy::Uniform,
        log_flow: false,
        log_z: true,
    };
    Estimators::new(env, config, Device::Cpu, rng).unwrap()
}

const UNCLIPPED: BatchNeeds = BatchNeeds {
    clip_min: f32::NEG_INFINITY,
    state_log_rewards: false,
    prior: None,
};

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap()
}

#[test]
fn host_policy_matches_libtorch() {
    tch::manual_seed(1);
    // One intra-op thread: MKL may otherwise pick its kernels (and summation order) by load.
    tch::set_num_threads(1);
    let env = common::grid(3, 6, 0.1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for architecture in [
        Architecture::Mlp {
            hidden: 256,
            layers: 2,
        },
        Architecture::Mlp {
            hidden: 37,
            layers: 1,
        },
        Architecture::Mlp {
            hidden: 8,
            layers: 0,
        },
        Architecture::Tabular,
    ] {
        let est = estimators(&env, architecture, 2);
        let mut scratch = HostScratch::default();
        for rows in [1, 2, 3, 4, 5, 9, 16] {
            let states: Vec<i64> = (0..rows * env.state_dim())
                .map(|_| rng.gen_range(0..6))
                .collect();
            let mut host = Vec::new();
            assert!(est.pf_logits_host(&env, &states, &mut host, &mut scratch));
            let torch = values(&est.pf_logits_no_grad(&est.input(&env, &states)));
            assert_eq!(host.len(), rows * env.n_actions());
            for (i, (h, t)) in host.iter().zip(&torch).enumerate() {
                assert!(
                    (h - t).abs() <= 1e-5 * (1.0 + t.abs()),
                    "{architecture:?}, {rows} rows, logit {i}: host {h} vs libtorch {t}"
                );
            }
        }
    }
}

#[test]
fn host_transformer_matches_libtorch_at_gfnx_size() {
    // gfnx's bitseq policy: sixteen tokens, heads of eight (the vector attention kernels), on
    // states of every length that its own rollouts reach.
    tch::set_num_threads(1);
    let env = BitSeq::new(BitSeqConfig::default()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let architecture = Architecture::Transformer(TransformerConfig::default());
    let est = pf_only(&env, architecture, &mut rng);
    let batch = sample_trajectories(&env, &est, 3, Exploration::ON_POLICY, &mut rng).unwrap();
    let mut scratch = HostScratch::default();
    for (chunk, states) in batch.states.chunks(8 * env.state_dim()).enumerate() {
        let mut host = Vec::new();
        assert!(est.pf_logits_host(&env, states, &mut host, &mut scratch));
        let torch = values(&est.pf_logits_no_grad(&est.input(&env, states)));
        assert_eq!(host.len(), torch.len());
        for (i, (h, t)) in host.iter().zip(&torch).enumerate() {
            assert!(
                (h - t).abs() <= 1e-4 * (1.0 + t.abs()),
                "chunk {chunk}, logit {i}: host {h} vs libtorch {t}"
            );
        }
    }
}

#[test]
fn loss_inputs_from_distinct_states_equal_those_of_every_state() {
    tch::manual_seed(3);
    let env = common::grid(2, 5, 0.1);
    let est = estimators(
        &env,
        Architecture::Mlp {
            hidden: 32,
            layers: 2,
        },
        4,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let batch = sample_trajectories(&env, &est, 64, Exploration::ON_POLICY, &mut rng).unwrap();
    let prepared = prepare(&env, &est, &batch, UNCLIPPED);
    let distinct = prepared.input.size()[0] as usize;
    assert!(
        distinct < batch.n_states() / 2,
        "64 trajectories on a 5x5 grid repeat states ({distinct} of {})",
        batch.n_states()
    );
    let p = est.params.views();
    let exit = exit_action(&env).unwrap();
    let ev = evaluate(&est, &p, &prepared, Some(exit));

    // The same quantities from one network row per state, repeats included.
    let s = batch.n_states();
    let (na, nb) = (env.n_actions(), env.n_backward_actions());
    let out = est.forward(
        &p,
        &est.input(&env, &batch.states),
        Wanted {
            pf: true,
            pb: true,
            log_flow: true,
        },
    );
    let mut fmask = vec![false; s * na];
    env.forward_masks(&batch.states, &mut fmask);
    let mut bmask = vec![false; s * nb];
    env.backward_masks(&batch.states, &mut bmask);
    let log_pf = values(&masked_log_softmax(
        &out.pf_logits.unwrap(),
        &additive_mask(&fmask, na, Device::Cpu),
    ));
    let log_pb = values(&masked_log_softmax(
        &out.pb_logits.unwrap(),
        &additive_mask(&bmask, nb, Device::Cpu),
    ));
    let log_flow = values(&out.log_flow.unwrap());
    let is_first = batch.is_first();
    let (got_pf, got_exit, got_pb, got_flow) = (
        values(&ev.log_pf),
        values(ev.log_pf_exit.as_ref().unwrap()),
        values(&ev.log_pb),
        values(ev.log_flow.as_ref().unwrap()),
    );
    let close = |a: f32, b: f32, what: &str, i: usize| {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{what} at state {i}: {a} vs {b}"
        )
    };
    for i in 0..s {
        close(got_pf[i], log_pf[i * na + batch.actions[i]], "log P_F", i);
        close(got_exit[i], log_pf[i * na + exit], "log P_F(exit)", i);
        let want_pb = if is_first[i] {
            0.0
        } else {
            log_pb[i * nb + env.backward_action_of(batch.state(i - 1), batch.actions[i - 1])]
        };
        close(got_pb[i], want_pb, "log P_B", i);
        close(got_flow[i], log_flow[i], "log F", i);
    }
}

#[test]
fn loss_inputs_leave_out_the_rows_that_nothing_reads() {
    // Bitseq has no exit action: with P_F alone (TB, uniform P_B) the networks skip the last
    // states, and log P_F is still that of every state's action (0 where none is taken).
    tch::manual_seed(8);
    let env = BitSeq::new(common::small_bitseq(2)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let architecture = Architecture::Mlp {
        hidden: 16,
        layers: 1,
    };
    let est = pf_only(&env, architecture, &mut rng);
    let batch = sample_trajectories(&env, &est, 12, Exploration::ON_POLICY, &mut rng).unwrap();
    let prepared = prepare(&env, &est, &batch, UNCLIPPED);
    let is_last = batch.is_last();
    let mut inner: Vec<&[i64]> = (0..batch.n_states())
        .filter(|&i| !is_last[i])
        .map(|i| batch.state(i))
        .collect();
    inner.sort();
    inner.dedup();
    assert_eq!(prepared.input.size()[0] as usize, inner.len());
    let ev = evaluate(&est, &est.params.views(), &prepared, None);
    let na = env.n_actions();
    let out = est.pf_logits_no_grad(&est.input(&env, &batch.states));
    let mut mask = vec![false; batch.n_states() * na];
    env.forward_masks(&batch.states, &mut mask);
    let log_pf = values(&masked_log_softmax(
        &out,
        &additive_mask(&mask, na, Device::Cpu),
    ));
    for (i, got) in values(&ev.log_pf).into_iter().enumerate() {
        let want = if is_last[i] {
            0.0
        } else {
            log_pf[i * na + batch.actions[i]]
        };
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "state {i}: {got} vs {want}"
        );
    }
}
