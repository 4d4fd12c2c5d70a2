//! Times one rollout policy call (forward logits for a few states) through libtorch and through
//! the plain-Rust host kernel, for the default MLP (hidden 256, 2 layers) on a 4x8 HyperGrid.
//! `cargo run --release -p gfn-core --example rollout_policy`

use gfn_core::env::{Environment, HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::estimators::{
    Architecture, BackwardPolicy, EstimatorConfig, Estimators, HostScratch,
};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn micros_per_call(calls: usize, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..calls {
        f();
    }
    started.elapsed().as_secs_f64() / calls as f64 * 1e6
}

fn main() {
    let env = HyperGrid::new(HyperGridConfig::new(4, 8, RewardPreset::Standard)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let config = EstimatorConfig {
        architecture: Architecture::Mlp {
            hidden: 256,
            layers: 2,
        },
        backward: BackwardPolicy::Tied,
        log_flow: false,
        log_z: true,
    };
    let est = Estimators::new(&env, config, tch::Device::Cpu, &mut rng).unwrap();
    let threads = tch::get_num_threads();
    println!("libtorch threads: {threads}");
    println!("| rows | libtorch µs/call | host µs/call |");
    println!("|---:|---:|---:|");
    for rows in [1usize, 4, 16, 32, 48, 64, 128] {
        let states: Vec<i64> = (0..rows * env.state_dim())
            .map(|_| rng.gen_range(0..8))
            .collect();
        let mut logits = Vec::new();
        let torch = micros_per_call(20_000, || {
            let out = est.pf_logits_no_grad(&est.input(&env, &states));
            logits.resize(out.numel(), 0.0);
            out.copy_data(&mut logits, out.numel());
        });
        let mut scratch = HostScratch::default();
        // The host path declines large batches when libtorch has several threads; time the
        // kernel itself here by asking for it on every size.
        tch::set_num_threads(1);
        let host = micros_per_call(20_000, || {
            assert!(est.pf_logits_host(&env, &states, &mut logits, &mut scratch));
        });
        tch::set_num_threads(threads);
        println!("| {rows} | {torch:.1} | {host:.1} |");
    }
}
