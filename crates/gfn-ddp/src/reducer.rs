//! The data-parallel gradient hook: one all-reduce of the flat gradient, averaged over ranks.

use crate::comm::{Communicator, ReduceOp};
use gfn_core::train::GradientReducer;
use std::time::{Duration, Instant};
use tch::Tensor;

pub struct AllReduceGradients<'a> {
    pub comm: &'a mut dyn Communicator,
    /// Time spent in the all-reduce, for the benchmark.
    pub elapsed: Duration,
}

impl<'a> AllReduceGradients<'a> {
    pub fn new(comm: &'a mut dyn Communicator) -> Self {
        AllReduceGradients {
            comm,
            elapsed: Duration::ZERO,
        }
    }
}

impl GradientReducer for AllReduceGradients<'_> {
    fn reduce(&mut self, flat_grad: &mut Tensor) -> gfn_core::Result<()> {
        let start = Instant::now();
        self.comm
            .all_reduce(flat_grad, ReduceOp::Average)
            .map_err(|e| gfn_core::Error::Collective(e.to_string()))?;
        self.elapsed += start.elapsed();
        Ok(())
    }
}
