//! The data-parallel gradient hook: one all-reduce (sum) of the flat gradient; the optimizer
//! step averages it.

use crate::comm::{Communicator, ReduceOp};
use gfn_core::train::GradientReducer;
use std::time::{Duration, Instant};
use tch::Tensor;

pub struct AllReduceGradients<'a> {
    pub comm: &'a mut dyn Communicator,
    /// Time spent in the all-reduce itself, for the benchmark.
    pub elapsed: Duration,
    /// Time spent waiting for the slowest rank to finish its backward pass. Ranks sample
    /// trajectories of different lengths, so they arrive at different times; a barrier before
    /// the all-reduce keeps that imbalance out of the communication time (it costs one
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

impl GradientReducer for AllReduceGradients<'_> {
    fn reduce_sum(&mut self, flat_grad: &mut Tensor) -> gfn_core::Result<usize> {
        let collective = |e: crate::DdpError| gfn_core::Error::Collective(e.to_string());
        if self.comm.world_size() > 1 {
            let start = Instant::now();
            self.comm.barrier().map_err(collective)?;
            self.waited += start.elapsed();
        }
        let start = Instant::now();
        self.comm
            .all_reduce(flat_grad, ReduceOp::Sum)
            .map_err(collective)?;
        self.elapsed += start.elapsed();
        Ok(self.comm.world_size())
    }
}
