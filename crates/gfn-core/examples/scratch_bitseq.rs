use gfn_core::env::{BitSeq, BitSeqConfig};
use gfn_core::estimators::{Architecture, BackwardPolicy, TransformerConfig};
use gfn_core::losses::{LossConfig, LossKind};
use gfn_core::metrics::MetricsConfig;
use gfn_core::optim::{OptimizerConfig, OptimizerKind};
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::{NoReduction, ReplayConfig, TrainConfig, TrainState};
use std::time::Instant;
fn main() {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2);
    let steps: u64 = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(50);
    let config = TrainConfig {
        architecture: Architecture::Transformer(TransformerConfig::default()),
        backward: BackwardPolicy::Uniform,
        loss: LossConfig::new(LossKind::Tb),
        optimizer: OptimizerConfig { kind: OptimizerKind::AdamW, lr: 1e-3, lr_log_z: 5e-2, weight_decay: 1e-5, ..OptimizerConfig::default() },
        batch_size: 16,
        epsilon: EpsilonSchedule { start: 1e-3, end: 1e-3, decay_steps: 0 },
        temperature: 1.0,
        replay: ReplayConfig { capacity: 0, policy: ReplayPolicy::Uniform, ratio: 0.5 },
        seed: 0,
        threads,
        exact_samples: 1000,
        metrics: MetricsConfig::default(),
    };
    let env = BitSeq::new(BitSeqConfig::default()).unwrap();
    let mut state = TrainState::new(Box::new(env), config, tch::Device::Cpu, 0).unwrap();
    for _ in 0..5 { state.train_step(&mut NoReduction).unwrap(); }
    let (mut ts, mut tu) = (0.0, 0.0);
    let t0 = Instant::now();
    for _ in 0..steps {
        let t = Instant::now();
        let (batch, _) = state.sample_batch().unwrap();
        ts += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let m = state.update(&batch, &mut NoReduction).unwrap();
        tu += t.elapsed().as_secs_f64();
        let _ = m;
    }
    let total = t0.elapsed().as_secs_f64();
    println!("threads {threads}: {:.2} steps/s, sample {:.1} ms, update {:.1} ms", steps as f64 / total, 1e3 * ts / steps as f64, 1e3 * tu / steps as f64);
    if std::env::args().nth(3).is_some() { return; }
    let t = Instant::now();
    let eval = state.evaluate().unwrap();
    println!("eval {:.1} s: {:?}", t.elapsed().as_secs_f64(), eval.values);
}
