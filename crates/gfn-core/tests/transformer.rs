//! The Transformer's outputs against a second implementation: the encoder written out in f64
//! loops from its definition (embedding + sinusoidal positions; per layer multi-head
//! attention with a residual, then LayerNorm → Linear → ReLU → Linear added to the normalised
//! input and normalised again; heads per token and from token 0), reading the same parameters.
//! Both of our passes are checked: libtorch's (training) and the plain-Rust one of rollouts.

mod common;

use common::{param, small_bitseq};
use gfn_core::env::{BitSeq, BitSeqAppend, Environment};
use gfn_core::estimators::{
    Architecture, BackwardPolicy, EstimatorConfig, Estimators, HostScratch, TransformerConfig,
    Wanted,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

const CONFIG: TransformerConfig = TransformerConfig {
    layers: 2,
    heads: 2,
    width: 8,
    ff: 6,
};

/// `[rows][cols]` from a flat `[in, out]` weight: x · W + b for one row.
fn affine(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let out = b.len();
    (0..out)
        .map(|j| {
            b[j] + x
                .iter()
                .enumerate()
                .map(|(i, xi)| xi * w[i * out + j])
                .sum::<f64>()
        })
        .collect()
}

fn layer_norm(x: &[f64], gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) / (var + 1e-5).sqrt() * gamma[i] + beta[i])
        .collect()
}

/// The encoder's output for one sequence of tokens: `[length][width]`.
fn encode(est: &Estimators, net: &str, tokens: &[i64]) -> Vec<Vec<f64>> {
    let (w, h) = (CONFIG.width, CONFIG.heads);
    let dh = w / h;
    let embedding = param(est, &format!("{net}.embedding"));
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .enumerate()
        .map(|(t, &id)| {
            (0..w)
                .map(|i| {
                    let angle = t as f64 / 10000f64.powf((i - i % 2) as f64 / w as f64);
                    let pe = if i % 2 == 0 { angle.sin() } else { angle.cos() };
                    embedding[id as usize * w + i] + pe
                })
                .collect()
        })
        .collect();
    for l in 0..CONFIG.layers {
        let p = |name: &str| param(est, &format!("{net}.layer.{l}.{name}"));
        let qkv: Vec<Vec<f64>> = x
            .iter()
            .map(|row| affine(row, &p("qkv.weight"), &p("qkv.bias")))
            .collect();
        let mut attended = vec![vec![0.0; w]; x.len()];
        for head in 0..h {
            for (i, out) in attended.iter_mut().enumerate() {
                let q = &qkv[i][head * dh..(head + 1) * dh];
                let scores: Vec<f64> = qkv
                    .iter()
                    .map(|row| {
                        let k = &row[w + head * dh..w + (head + 1) * dh];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (dh as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, row) in qkv.iter().enumerate() {
                    let weight = (scores[j] - max).exp() / total;
                    for d in 0..dh {
                        out[head * dh + d] += weight * row[2 * w + head * dh + d];
                    }
                }
            }
        }
        x = attended
            .iter()
            .zip(&x)
            .map(|(a, input)| {
                let projected = affine(a, &p("attention_out.weight"), &p("attention_out.bias"));
                let residual: Vec<f64> = projected.iter().zip(input).map(|(a, b)| a + b).collect();
                let normed = layer_norm(&residual, &p("norm_in.weight"), &p("norm_in.bias"));
                let hidden: Vec<f64> = affine(&normed, &p("ff_in.weight"), &p("ff_in.bias"))
                    .into_iter()
                    .map(|v| v.max(0.0))
                    .collect();
                let ff = affine(&hidden, &p("ff_out.weight"), &p("ff_out.bias"));
                let sum: Vec<f64> = ff.iter().zip(&normed).map(|(a, b)| a + b).collect();
                layer_norm(&sum, &p("norm_out.weight"), &p("norm_out.bias"))
            })
            .collect();
    }
    x
}

fn values(t: &tch::Tensor) -> Vec<f64> {
    Vec::<f32>::try_from(t.contiguous().view([-1]))
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// Reached states of `env` (rows): a few rollouts' worth.
fn some_states(env: &dyn Environment) -> Vec<i64> {
    let mut states = Vec::new();
    let mut state = vec![0i64; env.state_dim()];
    env.initial_state(&mut state);
    let exit = gfn_core::env::exit_action(env);
    let mut mask = vec![false; env.n_actions()];
    for step in 0..env.max_trajectory_length() {
        states.extend_from_slice(&state);
        env.forward_masks(&state, &mut mask);
        let moves: Vec<usize> = (0..mask.len())
            .filter(|&a| mask[a] && Some(a) != exit)
            .collect();
        if moves.is_empty() {
            break;
        }
        env.step(&mut state, &[moves[(step * 7 + 3) % moves.len()]]);
    }
    states
}

fn check_against_the_loops(env: &dyn Environment, backward: BackwardPolicy) {
    let config = EstimatorConfig {
        architecture: Architecture::Transformer(CONFIG),
        backward,
        log_flow: true,
        log_z: false,
    };
    let est = Estimators::new(env, config, Device::Cpu, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    let states = some_states(env);
    let tokens = env.tokens().unwrap();
    let (length, rows) = (tokens.length(), states.len() / env.state_dim());
    let mut ids = vec![0i64; rows * length];
    tokens.tokenize(&states, &mut ids);
    let wanted = Wanted {
        pf: true,
        pb: true,
        log_flow: true,
    };
    let out = tch::no_grad(|| est.forward(&est.params.views(), &est.input(env, &states), wanted));
    let (mut pf, mut pb, mut flow) = (Vec::new(), Vec::new(), Vec::new());
    let pb_net = if backward == BackwardPolicy::Tied {
        "pf"
    } else {
        "pb"
    };
    for row in ids.chunks_exact(length) {
        let head = |encoded: &[Vec<f64>],
                    name: &str,
                    layout: Option<gfn_core::env::TokenLayout>,
                    total: usize| {
            let mut logits = Vec::new();
            if let Some(l) = layout {
                for position in 0..l.positions {
                    logits.extend(affine(
                        &encoded[l.first + position],
                        &param(&est, &format!("{name}.per_token.weight")),
                        &param(&est, &format!("{name}.per_token.bias")),
                    ));
                }
            }
            if logits.len() < total {
                logits.extend(affine(
                    &encoded[0],
                    &param(&est, &format!("{name}.pooled.weight")),
                    &param(&est, &format!("{name}.pooled.bias")),
                ));
            }
            logits
        };
        let encoded = encode(&est, "pf", row);
        pf.extend(head(
            &encoded,
            "pf",
            tokens.forward_layout(),
            env.n_actions(),
        ));
        let encoded_pb = encode(&est, pb_net, row);
        pb.extend(head(
            &encoded_pb,
            "pb",
            tokens.backward_layout(),
            env.n_backward_actions(),
        ));
        let encoded_flow = encode(&est, "log_flow", row);
        flow.extend(head(&encoded_flow, "log_flow", None, 1));
    }
    let case = format!("{} {backward:?}", env.describe());
    close(
        &values(&out.pf_logits.unwrap()),
        &pf,
        &format!("{case}: P_F logits"),
    );
    let mut host = Vec::new();
    assert!(est.pf_logits_host(env, &states, &mut host, &mut HostScratch::default()));
    let host: Vec<f64> = host.into_iter().map(f64::from).collect();
    close(
        &host,
        &pf,
        &format!("{case}: P_F logits of the rollouts' pass"),
    );
    close(
        &values(&out.pb_logits.unwrap()),
        &pb,
        &format!("{case}: P_B logits"),
    );
    close(
        &values(&out.log_flow.unwrap()),
        &flow,
        &format!("{case}: log F"),
    );
}

#[test]
fn the_transformer_computes_its_definition() {
    // Per-token heads (bitseq), pooled heads (the append variant, HyperGrid); P_B on the same
    // body or its own.
    for backward in [BackwardPolicy::Tied, BackwardPolicy::Learned] {
        check_against_the_loops(&BitSeq::new(small_bitseq(2)).unwrap(), backward);
        check_against_the_loops(&BitSeqAppend::new(small_bitseq(2)).unwrap(), backward);
        check_against_the_loops(&common::grid(3, 4, 0.1), backward);
    }
}
