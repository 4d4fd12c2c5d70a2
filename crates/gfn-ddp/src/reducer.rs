//! The data-parallel gradient hook. Where the communicator has reduce-scatter and all-gather
//! collectives of its own (MPI), the ranks share the optimizer step out, as ZeRO stage 1 does:
//! each sums only its share of the gradient, steps its share of the parameters and moments, and
//! the updated parameter shares are gathered. That moves what one all-reduce moves and halves
//! the optimizer's work on two ranks. Otherwise (NCCL, one rank): one all-reduce (sum) and the
//! whole step on every rank.

use crate::comm::{share_of, Communicator, ReduceOp};
use gfn_core::optim::ReducedGradient;
use gfn_core::train::GradientReducer;
use std::time::{Duration, Instant};
use tch::Tensor;

pub struct AllReduceGradients<'a> {
    pub comm: &'a mut dyn Communicator,
    /// Time spent in the collectives themselves, for the benchmark.
    pub elapsed: Duration,
    /// Time spent waiting for the slowest rank to finish its backward pass. Ranks sample
    /// trajectories of different lengths, so they arrive at different times; a barrier before
    /// the reduction keeps that imbalance out of the communication time (it costs one
    /// latency-bound collective, a few µs on one node).
    pub waited: Duration,
}

impl<'a> AllReduceGradients<'a> {
    pub fn new(comm: &'a mut dyn Communicator) -> Self {
        AllReduceGradients {
            comm,
            elapsed: Duration::ZERO,
            waited: Duration::ZERO,
        }
    }
}

pub(crate) fn collective(e: crate::DdpError) -> gfn_core::Error {
    gfn_core::Error::Collective(e.to_string())
}

impl GradientReducer for AllReduceGradients<'_> {
    fn reduce_sum(&mut self, flat_grad: &mut Tensor) -> gfn_core::Result<ReducedGradient> {
        let (rank, ranks, len) = (self.comm.rank(), self.comm.world_size(), flat_grad.numel());
        if ranks > 1 {
            let start = Instant::now();
            self.comm.barrier().map_err(collective)?;
            self.waited += start.elapsed();
        }
        let start = Instant::now();
        let share = if self.comm.shards() {
            self.comm
                .reduce_scatter_sum(flat_grad)
                .map_err(collective)?;
            share_of(len, rank, ranks)
        } else {
            self.comm
                .all_reduce(flat_grad, ReduceOp::Sum)
                .map_err(collective)?;
            0..len
        };
        self.elapsed += start.elapsed();
        Ok(ReducedGradient { ranks, share })
    }

    fn sum_over_ranks(&mut self, value: f64) -> gfn_core::Result<f64> {
        let start = Instant::now();
        let mut buffer = Tensor::from_slice(&[value as f32]);
        self.comm
            .all_reduce(&mut buffer, ReduceOp::Sum)
            .map_err(collective)?;
        self.elapsed += start.elapsed();
        Ok(buffer.double_value(&[0]))
    }

    fn gather_shares(&mut self, flat: &mut Tensor) -> gfn_core::Result<()> {
        if self.comm.shards() {
            let start = Instant::now();
            self.comm.all_gather_shares(flat).map_err(collective)?;
            self.elapsed += start.elapsed();
        }
        Ok(())
    }
}
