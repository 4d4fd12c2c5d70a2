//! Run under `mpirun -np N`, or with `--gloo` under `torchrun --nproc-per-node N --no-python`
//! (the `ddp_checks` tests do both, N = 2 and 3): checks that an N-rank data-parallel step
//! equals a 1-rank step on the union of every rank's trajectories, and that parameters stay
//! bitwise identical across ranks over further steps; first, that the all-reduce sums and
//! averages exactly. `--no-shared-memory` checks MPI's or gloo's all-reduce instead of the
//! shared-memory collectives that ranks on one node use by default. Where the communicator
//! shards (shared memory), training steps share the update out; a twin trained with the whole
//! update on every rank must end with the same parameters and moments, bit for bit.

use gfn_core::env::{HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::estimators::{Architecture, BackwardPolicy};
use gfn_core::losses::{LossConfig, LossKind};
use gfn_core::metrics::MetricsConfig;
use gfn_core::optim::OptimizerConfig;
use gfn_core::optim::ReducedGradient;
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::GradientReducer;
use gfn_core::train::{NoReduction, ReplayConfig, TrainConfig, TrainState};
use gfn_ddp::comm::{all_gather_bytes, share_of, Communicator, ReduceOp};
use gfn_ddp::reducer::AllReduceGradients;
use gfn_ddp::world::{Backend, JoinOptions, World};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use tch::{Device, Tensor};

/// Every rank all-reduces the whole gradient and steps every element.
struct WholeUpdate<'a>(&'a mut dyn Communicator);

impl GradientReducer for WholeUpdate<'_> {
    fn reduce_sum(&mut self, flat_grad: &mut Tensor) -> gfn_core::Result<ReducedGradient> {
        self.0.all_reduce(flat_grad, ReduceOp::Sum).unwrap();
        Ok(ReducedGradient {
            ranks: self.0.world_size(),
            share: 0..flat_grad.numel(),
        })
    }
    fn gather_shares(&mut self, _flat: &mut Tensor) -> gfn_core::Result<()> {
        Ok(())
    }
}

/// The collectives themselves, in place over gradient-sized buffers.
/// Every rank's bytes on every rank, whatever their lengths: rank r sends r · 37 + 3 bytes
/// (odd and even lengths, one over 2^16 bytes so both halves of a length travel), rank 1 none.
fn check_all_gather_bytes(world: &mut World) {
    let size = world.world_size();
    let bytes_of = |r: usize| -> Vec<u8> {
        let len = if r == 1 {
            0
        } else {
            r * 37 + 3 + (r == 2) as usize * 70_000
        };
        (0..len).map(|i| (i * 31 + r * 7) as u8).collect()
    };
    let mine = bytes_of(world.rank());
    let all = all_gather_bytes(world.comm.as_mut(), &mine, Device::Cpu).unwrap();
    assert_eq!(all.len(), size);
    for (r, got) in all.iter().enumerate() {
        assert_eq!(
            got,
            &bytes_of(r),
            "rank {r}'s bytes as rank {} received them",
            world.rank()
        );
    }
}

fn check_all_reduce(world: &mut World, shared_memory: bool) {
    let (rank, size) = (world.rank(), world.world_size());
    // Rank r holds (i mod 7)(r + 1): small integers, so the sum (i mod 7) n(n + 1)/2 is exact
    // whatever the order of the sum. The average, (i mod 7)(n + 1)/2, is exact when n is a power
    // of two (the scaling by 1/n is) and otherwise within rounding.
    let pattern: Vec<f32> = (0..150_000).map(|i| (i % 7) as f32).collect();
    let triangle = (size * (size + 1) / 2) as f64;
    for (op, factor) in [
        (ReduceOp::Sum, triangle),
        (ReduceOp::Average, triangle / size as f64),
    ] {
        let mut buffer = Tensor::from_slice(&pattern) * (rank as f64 + 1.0);
        world.comm.all_reduce(&mut buffer, op).unwrap();
        let expected = Tensor::from_slice(&pattern) * factor;
        let exact = op == ReduceOp::Sum || size.is_power_of_two();
        let right = match exact {
            true => buffer.equal(&expected),
            false => buffer.allclose(&expected, 1e-6, 0.0, false),
        };
        assert!(right, "{op:?} all-reduce is wrong on rank {rank}");
    }
    // Arbitrary floats, whose sum depends on its order: every rank rebuilds every rank's values
    // and sums them in rank order, as the shared-memory all-reduce does; repeatedly (the
    // window's buffers alternate) and with two lengths, one not divisible by the number of
    // ranks. MPI_Allreduce and gloo's all-reduce may sum in another order, except with two ranks
    // (a + b = b + a).
    if !shared_memory && size > 2 {
        return;
    }
    let values = |r: usize, round: usize, len: usize| -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64((r * 1000 + round) as u64);
        // Magnitudes spread over 2^-10..2^10: sums of uniform [-1, 1) values alone are mostly
        // exact (their 24-bit fractions fit), and would not show the order.
        (0..len)
            .map(|_| rng.gen_range(-1.0f32..1.0) * 2f32.powi(rng.gen_range(-10..=10)))
            .collect()
    };
    for round in 0..6 {
        let len = if round % 2 == 0 { 150_001 } else { 1_003 };
        let mut expected = values(0, round, len);
        for r in 1..size {
            expected
                .iter_mut()
                .zip(values(r, round, len))
                .for_each(|(e, v)| *e += v);
        }
        let expected = Tensor::from_slice(&expected);
        let mut buffer = Tensor::from_slice(&values(rank, round, len));
        world.comm.all_reduce(&mut buffer, ReduceOp::Sum).unwrap();
        assert!(
            buffer.equal(&expected),
            "round {round}: the sum of {len} floats is not the rank-order sum on rank {rank}"
        );
        // The same sum in two halves: each rank's share, then the shares gathered; through the
        // backend's own collectives and through the trait's fallbacks.
        let in_halves = |comm: &mut dyn Communicator, how: &str| {
            let mut buffer = Tensor::from_slice(&values(rank, round, len));
            comm.reduce_scatter_sum(&mut buffer).unwrap();
            let mine = share_of(len, rank, size);
            let of = |t: &Tensor| t.narrow(0, mine.start as i64, mine.len() as i64);
            assert!(
                of(&buffer).equal(&of(&expected)),
                "round {round} ({how}): rank {rank}'s reduce-scatter share is not the rank-order sum"
            );
            comm.all_gather_shares(&mut buffer).unwrap();
            assert!(
                buffer.equal(&expected),
                "round {round} ({how}): the gathered shares differ from the sum on rank {rank}"
            );
        };
        in_halves(world.comm.as_mut(), "backend");
        in_halves(&mut Fallbacks(world.comm.as_mut()), "fallbacks");
    }
}

/// A communicator that keeps the trait's reduce-scatter and all-gather fallbacks.
struct Fallbacks<'a>(&'a mut dyn Communicator);

impl Communicator for Fallbacks<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> gfn_ddp::Result<()> {
        self.0.all_reduce(buffer, op)
    }
    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> gfn_ddp::Result<()> {
        self.0.broadcast(buffer, root)
    }
    fn barrier(&mut self) -> gfn_ddp::Result<()> {
        self.0.barrier()
    }
    fn gather(&mut self, values: &[f64], root: usize) -> gfn_ddp::Result<Option<Vec<f64>>> {
        self.0.gather(values, root)
    }
}

fn state(kind: LossKind, max_grad_norm: f64, stream: u64) -> TrainState {
    let config = TrainConfig {
        architecture: Architecture::Mlp {
            hidden: 32,
            layers: 2,
        },
        backward: BackwardPolicy::Learned,
        noisy: Default::default(),
        loss: LossConfig::new(kind),
        optimizer: OptimizerConfig {
            max_grad_norm,
            ..OptimizerConfig::default()
        },
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
            diversity: Default::default(),
        },
        seed: 3,
        threads: 0,
        exact_samples: 1000,
        max_nonfinite_steps: 0,
        memory_budget: None,
        diagnostics_every: 0,
        metrics: MetricsConfig::default(),
    };
    let env = HyperGrid::new(HyperGridConfig::new(2, 6, RewardPreset::Standard)).unwrap();
    TrainState::new(Box::new(env), config, Device::Cpu, stream).unwrap()
}

fn main() {
    // `--no-shared-memory`: MPI's or gloo's all-reduce even when every rank is on this node.
    let flag = |name: &str| std::env::args().any(|a| a == name);
    let backend = if flag("--gloo") {
        Backend::Gloo
    } else {
        Backend::Mpi
    };
    let options = JoinOptions {
        timeout: Duration::from_secs(60),
        shared_memory: !flag("--no-shared-memory"),
        ..JoinOptions::new(backend)
    };
    let mut world = World::join(options, |_| Ok(Vec::new())).expect("joining the job");
    let expected = match backend {
        Backend::Gloo => "gloo",
        _ => "mpi",
    };
    assert_eq!(world.comm.backend(), expected);
    let (rank, size) = (world.rank(), world.world_size());
    assert!(size >= 2, "run under mpirun -np N with N >= 2");
    // Windows are used where every rank is on one node (not across the simulated nodes).
    let shared_memory = world.comm.shards();
    check_all_reduce(&mut world, shared_memory);
    check_all_gather_bytes(&mut world);
    // TB and SubTB (geometric_within) average over trajectories, so the mean of two ranks' losses
    // is the loss on the union. DB averages over transitions, whose count differs per rank: there
    // the union step is not the averaged step, by design (as in torchgfn's DDP).
    // With clipping (a norm far below TB's first gradients) the ranks clip the mean gradient
    // by its norm, summed from their shares where the update is shared out.
    for (kind, clip) in [
        (LossKind::Tb, 0.0),
        (LossKind::Subtb, 0.0),
        (LossKind::Tb, 0.05),
    ] {
        let state = |kind, stream| state(kind, clip, stream);
        let mut ddp = state(kind, rank as u64);
        let mut params = ddp.estimators.params.flat().shallow_clone();
        world.comm.broadcast(&mut params, 0).unwrap();

        // Sampling is deterministic per (seed, stream): every rank can rebuild both batches.
        let (mine, _) = ddp.sample_batch().unwrap();
        let batches: Vec<_> = (0..size as u64)
            .map(|r| state(kind, r).sample_batch().unwrap().0)
            .collect();
        assert_eq!(batches[rank], mine, "rank {rank} rebuilt a different batch");
        let mut union = batches[0].clone();
        batches[1..].iter().for_each(|batch| union.extend(batch));

        let ours = ddp
            .update(&mine, &mut AllReduceGradients::new(world.comm.as_mut()))
            .unwrap();
        let mut single = state(kind, 0);
        let theirs = single.update(&union, &mut NoReduction).unwrap();
        if clip > 0.0 {
            let (a, b) = (ours.grad_norm, theirs.grad_norm);
            assert!(
                b > clip && (a - b).abs() < 1e-4 * b,
                "{kind:?}: gradient norm {a} vs {b}"
            );
        }
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
            "{kind:?}: {size}-rank step differs from the 1-rank step on the union by {diff}"
        );

        // A twin trained on the same batches with the whole update on every rank: the shared
        // out update (where the communicator shards) must give the same bits, and so must its
        // moments once gathered. (Not with clipping: the norm summed from shares may differ from
        // the whole one in its last bits.)
        if clip > 0.0 {
            continue;
        }
        let mut twin = state(kind, rank as u64);
        let (first, _) = twin.sample_batch().unwrap();
        twin.update(&first, &mut WholeUpdate(world.comm.as_mut()))
            .unwrap();
        for _ in 0..20 {
            let (batch, _) = ddp.sample_batch().unwrap();
            assert_eq!(
                twin.sample_batch().unwrap().0,
                batch,
                "{kind:?}: the twin sampled another batch"
            );
            ddp.update(&batch, &mut AllReduceGradients::new(world.comm.as_mut()))
                .unwrap();
            twin.update(&batch, &mut WholeUpdate(world.comm.as_mut()))
                .unwrap();
        }
        let ours = ddp.estimators.params.flat().copy();
        let mut roots = ours.copy();
        world.comm.broadcast(&mut roots, 0).unwrap();
        assert!(
            ours.equal(&roots),
            "{kind:?}: rank {rank} parameters differ bitwise from rank 0's after 21 steps"
        );
        assert!(
            ours.equal(twin.estimators.params.flat()),
            "{kind:?}: the shared-out update differs from the whole update on rank {rank}"
        );
        ddp.gather_optimizer_state(&mut AllReduceGradients::new(world.comm.as_mut()))
            .unwrap();
        for (moment, whole) in ddp
            .optimizer
            .moments_mut()
            .into_iter()
            .zip(twin.optimizer.moments_mut())
        {
            assert!(
                moment.equal(whole),
                "{kind:?}: gathered moments differ from the whole update's on rank {rank}"
            );
        }
        println!("rank {rank}: {kind:?} union step within {diff:e}, parameters bitwise equal after 21 steps");
    }
    world.comm.barrier().unwrap();
}
