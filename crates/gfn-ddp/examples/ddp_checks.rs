//! Run under `mpirun -np 2` (the `mpi_ddp` test does): checks that a 2-rank data-parallel step
//! equals a 1-rank step on the union of both ranks' trajectories, and that parameters stay
//! bitwise identical across ranks over further steps; first, that the all-reduce sums and
//! averages exactly.

use gfn_core::env::{HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::estimators::{Architecture, BackwardPolicy};
use gfn_core::losses::{LossConfig, LossKind};
use gfn_core::optim::OptimizerConfig;
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::{NoReduction, ReplayConfig, TrainConfig, TrainState};
use gfn_ddp::comm::ReduceOp;
use gfn_ddp::reducer::AllReduceGradients;
use gfn_ddp::world::{Backend, World};
use std::time::Duration;
use tch::{Device, Tensor};

fn state(kind: LossKind, stream: u64) -> TrainState {
    let config = TrainConfig {
        architecture: Architecture::Mlp {
            hidden: 32,
            layers: 2,
        },
        backward: BackwardPolicy::Learned,
        loss: LossConfig::new(kind),
        optimizer: OptimizerConfig::default(),
        batch_size: 8,
        epsilon: EpsilonSchedule {
            start: 0.1,
            end: 0.1,
            decay_steps: 0,
        },
        temperature: 1.0,
        replay: ReplayConfig {
            capacity: 0,
            policy: ReplayPolicy::Uniform,
            ratio: 0.0,
        },
        seed: 3,
        threads: 0,
    };
    let env = HyperGrid::new(HyperGridConfig::new(2, 6, RewardPreset::Standard)).unwrap();
    TrainState::new(Box::new(env), config, Device::Cpu, stream).unwrap()
}

fn main() {
    let mut world = World::join(Backend::Mpi, Duration::from_secs(60), 0, |_| Ok(Vec::new()))
        .expect("joining the MPI job");
    let (rank, size) = (world.rank(), world.world_size());
    assert_eq!(size, 2, "run under mpirun -np 2");
    // The collectives themselves, in place over a gradient-sized buffer: rank r holds
    // (i mod 7)(r + 1), so the sum is 3 (i mod 7) and the average 1.5 (i mod 7), exactly.
    let pattern: Vec<f32> = (0..150_000).map(|i| (i % 7) as f32).collect();
    for (op, factor) in [(ReduceOp::Sum, 3.0), (ReduceOp::Average, 1.5)] {
        let mut buffer = Tensor::from_slice(&pattern) * (rank as f64 + 1.0);
        world.comm.all_reduce(&mut buffer, op).unwrap();
        let expected = Tensor::from_slice(&pattern) * factor;
        assert!(
            buffer.equal(&expected),
            "{op:?} all-reduce is wrong on rank {rank}"
        );
    }
    // TB and SubTB (geometric_within) average over trajectories, so the mean of two ranks' losses
    // is the loss on the union. DB averages over transitions, whose count differs per rank: there
    // the union step is not the averaged step, by design (as in torchgfn's DDP).
    for kind in [LossKind::Tb, LossKind::Subtb] {
        let mut ddp = state(kind, rank as u64);
        let mut params = ddp.estimators.params.flat().shallow_clone();
        world.comm.broadcast(&mut params, 0).unwrap();

        // Sampling is deterministic per (seed, stream): every rank can rebuild both batches.
        let (mine, _) = ddp.sample_batch();
        let batches: Vec<_> = (0..size as u64)
            .map(|r| state(kind, r).sample_batch().0)
            .collect();
        assert_eq!(batches[rank], mine, "rank {rank} rebuilt a different batch");
        let mut union = batches[0].clone();
        union.extend(&batches[1]);

        ddp.update(&mine, &mut AllReduceGradients::new(world.comm.as_mut()))
            .unwrap();
        let mut single = state(kind, 0);
        single.update(&union, &mut NoReduction).unwrap();
        let diff = ddp
            .estimators
            .params
            .to_vec()
            .iter()
            .zip(single.estimators.params.to_vec())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-6,
            "{kind:?}: 2-rank step differs from the 1-rank step on the union by {diff}"
        );

        for _ in 0..20 {
            ddp.train_step(&mut AllReduceGradients::new(world.comm.as_mut()))
                .unwrap();
        }
        let ours = ddp.estimators.params.flat().copy();
        let mut roots = ours.copy();
        world.comm.broadcast(&mut roots, 0).unwrap();
        assert!(
            ours.equal(&roots),
            "{kind:?}: rank {rank} parameters differ bitwise from rank 0's after 21 steps"
        );
        println!("rank {rank}: {kind:?} union step within {diff:e}, parameters bitwise equal after 21 steps");
    }
    world.comm.barrier().unwrap();
}
