//! Every environment against the brute-force contract check (steps, backward steps, masks,
//! action inverses, parents found by trying every action, enumeration), plus each one's own
//! rules and rewards worked out by hand.

mod common;

use common::{grid, small_bitseq};
use gfn_core::env::{
    check_environment, hamming, BitSeq, BitSeqAppend, BitSeqConfig, Environment, ModeSet,
    Termination, MOTIFS,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn check(env: &dyn Environment, breadth: usize, random: usize) -> gfn_core::env::CheckReport {
    check_environment(env, breadth, random, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap_or_else(|e| panic!("{}: {e}", env.describe()))
}

#[test]
fn every_environment_keeps_its_contract_over_all_small_states() {
    // Whole state spaces: H^D grid states; 5^4 non-autoregressive and 1 + 4 + ... + 4^4
    // append states for 8 bits in words of 2.
    let report = check(&grid(3, 4, 0.1), 1 << 20, 0);
    assert_eq!((report.states, report.terminal_states), (64, 64));
    let report = check(&BitSeq::new(small_bitseq(2)).unwrap(), 1 << 20, 0);
    assert_eq!((report.states, report.terminal_states), (625, 256));
    // Every written position can be emptied: 4 · 4^1 · C(4,1) ... edges = Σ_k C(4,k)·4^k·k.
    assert_eq!(
        report.transitions,
        4 * 4 + 6 * 16 * 2 + 4 * 64 * 3 + 256 * 4
    );
    let report = check(&BitSeqAppend::new(small_bitseq(2)).unwrap(), 1 << 20, 0);
    assert_eq!((report.states, report.terminal_states), (341, 256));
    assert_eq!(
        report.transitions, 340,
        "a tree: one parent per state but s0"
    );
}

#[test]
fn the_published_sizes_keep_their_contract_along_deep_trajectories() {
    for env in [
        Box::new(BitSeq::new(BitSeqConfig::default()).unwrap()) as Box<dyn Environment>,
        Box::new(BitSeqAppend::new(BitSeqConfig::default()).unwrap()),
        Box::new(grid(4, 8, 0.1)),
    ] {
        let report = check(env.as_ref(), 3, 10);
        assert!(report.terminal_states > 0, "{}", env.describe());
    }
}

#[test]
fn bitseq_writes_words_anywhere_and_ends_when_full() {
    let env = BitSeq::new(small_bitseq(2)).unwrap();
    assert_eq!((env.n_actions(), env.n_backward_actions()), (16, 4));
    assert_eq!(env.termination(), Termination::WhenComplete);
    assert_eq!(env.max_trajectory_length(), 5);
    let mut state = vec![-1, -1, -1, -1];
    env.step(&mut state, &[2 * 4 + 3]); // word 3 at position 2
    assert_eq!(state, [-1, -1, 3, -1]);
    let mut mask = vec![false; 16];
    env.forward_masks(&state, &mut mask);
    let allowed: Vec<usize> = (0..16).filter(|&a| mask[a]).collect();
    assert_eq!(allowed, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]);
    assert_eq!(env.backward_action_of(&[-1; 4], 11), 2);
    assert_eq!(env.forward_action_of(&state, 2), 11);
    // Word 0 at position 0, 1 at 1, 2 at 3.
    for a in [0, 4 + 1, 3 * 4 + 2] {
        env.step(&mut state, &[a]);
    }
    assert_eq!(state, [0, 1, 3, 2]);
    env.forward_masks(&state, &mut mask);
    assert!(!mask.contains(&true), "a complete sequence allows nothing");
}

#[test]
fn bitseq_append_writes_left_to_right_and_exits_only_when_full() {
    let env = BitSeqAppend::new(small_bitseq(2)).unwrap();
    assert_eq!((env.n_actions(), env.n_backward_actions()), (5, 1));
    assert_eq!(env.termination(), Termination::ExitAction(4));
    let mut state = vec![-1; 4];
    let mut mask = vec![false; 5];
    for (i, w) in [2, 0, 3, 1].into_iter().enumerate() {
        env.forward_masks(&state, &mut mask);
        assert_eq!(mask, [true, true, true, true, false], "after {i} words");
        env.step(&mut state, &[w]);
    }
    assert_eq!(state, [2, 0, 3, 1]);
    env.forward_masks(&state, &mut mask);
    assert_eq!(mask, [false, false, false, false, true]);
    assert_eq!(env.forward_action_of(&state, 0), 1);
    env.backward_step(&mut state, &[0]);
    assert_eq!(state, [2, 0, 3, -1]);
}

#[test]
fn the_reward_is_minus_beta_times_the_hamming_distance_over_n() {
    let config = BitSeqConfig::default();
    let env = BitSeq::new(config).unwrap();
    let modes = ModeSet::random(120, 60, config.seed).unwrap();
    // A mode written word by word (8 bits, most significant first) has log R = 0.
    let words = |bits: &[u64]| -> Vec<i64> {
        (0..15)
            .map(|p| {
                (0..8).fold(0i64, |w, j| {
                    (w << 1) | ((bits[(p * 8 + j) / 64] >> ((p * 8 + j) % 64)) & 1) as i64
                })
            })
            .collect()
    };
    let mut log_r = [0f32; 2];
    let mut x = words(modes.mode(7));
    // Flip the lowest bit of the first word and the highest of the last one: d = 2 unless
    // another mode is nearer, which the brute force below decides.
    let mut flipped = x.clone();
    flipped[0] ^= 1;
    flipped[14] ^= 0x80;
    x.extend_from_slice(&flipped);
    env.log_reward(&x, &mut log_r);
    assert_eq!(log_r[0], 0.0);
    let mut bits = modes.mode(7).to_vec();
    bits[0] ^= 1 << 7;
    bits[1] ^= 1 << (112 - 64);
    let nearest = (0..60)
        .map(|m| hamming(&bits, modes.mode(m)))
        .min()
        .unwrap();
    assert_eq!(nearest, 2);
    assert!(
        (log_r[1] as f64 - (-3.0 * 2.0 / 120.0)).abs() < 1e-6,
        "{}",
        log_r[1]
    );
    // Every mode block is one of the five motifs.
    let first = words(modes.mode(0));
    assert!(first.iter().all(|&w| MOTIFS.contains(&(w as u8))));
}

#[test]
fn the_test_set_is_gfnx_s() {
    let env = BitSeq::new(BitSeqConfig::default()).unwrap();
    let test = env.test_set().unwrap();
    assert_eq!(
        test.len(),
        7200 * 15,
        "60 modes × 120 copies, 15 words each"
    );
    let mut log_r = vec![0f32; 7200];
    env.log_reward(&test, &mut log_r);
    // Copy c of a mode has c bits flipped: its distance to that mode is c, so log R ≥ −3c/120.
    for (i, &lr) in log_r.iter().enumerate() {
        let c = (i % 120) as f32;
        assert!(lr >= -3.0 * c / 120.0 - 1e-6, "test state {i}: {lr}");
    }
    assert_eq!(log_r[0], 0.0);
}

#[test]
fn enumeration_is_offered_where_it_fits() {
    let small = BitSeq::new(small_bitseq(2)).unwrap();
    assert_eq!(small.enumeration().unwrap().n_states(), Some(625));
    let append = BitSeqAppend::new(small_bitseq(2)).unwrap();
    assert_eq!(append.enumeration().unwrap().n_states(), Some(341));
    let big = BitSeq::new(BitSeqConfig::default()).unwrap();
    assert_eq!(big.enumeration().unwrap().n_states(), None, "257^15 states");
}

#[test]
fn bad_bitseq_configs_name_the_field() {
    let err = |config: BitSeqConfig| BitSeq::new(config).unwrap_err().to_string();
    assert!(err(BitSeqConfig {
        k: 7,
        ..BitSeqConfig::default()
    })
    .contains("env.n = 120"));
    assert!(err(BitSeqConfig {
        k: 0,
        ..BitSeqConfig::default()
    })
    .contains("env.k = 0"));
    assert!(err(BitSeqConfig {
        n: 12,
        k: 4,
        ..BitSeqConfig::default()
    })
    .contains("env.n = 12"));
    assert!(err(BitSeqConfig {
        modes: 0,
        ..BitSeqConfig::default()
    })
    .contains("env.modes = 0"));
    assert!(err(BitSeqConfig {
        beta: f64::NAN,
        ..BitSeqConfig::default()
    })
    .contains("env.beta"));
    assert!(err(BitSeqConfig {
        k: 16,
        n: 512,
        ..BitSeqConfig::default()
    })
    .contains("env.k = 16"));
}
