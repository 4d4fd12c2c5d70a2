//! The training loop's view of the ranks ([`gfn_core::fit::Ranks`]) over a communicator: the
//! update with the gradient reduced ([`AllReduceGradients`]), and the small collectives the
//! loop uses to agree on stops and merge evaluations. The time spent in the gradient
//! collectives goes into the state's phase times.

use crate::comm::{all_gather_bytes, sum_over_ranks, Communicator};
use crate::reducer::{collective, AllReduceGradients};
use gfn_core::fit::Ranks;
use gfn_core::train::{StepMetrics, TrainState};
use gfn_core::trajectories::Trajectories;
use tch::Device;

pub struct DataParallel<'a> {
    pub comm: &'a mut dyn Communicator,
}

impl<'a> DataParallel<'a> {
    pub fn new(comm: &'a mut dyn Communicator) -> Self {
        DataParallel { comm }
    }
}

impl Ranks for DataParallel<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn update(
        &mut self,
        state: &mut TrainState,
        batch: &Trajectories,
    ) -> gfn_core::Result<StepMetrics> {
        let mut reducer = AllReduceGradients::new(&mut *self.comm);
        let metrics = state.update(batch, &mut reducer);
        state.times.all_reduce += reducer.elapsed;
        state.times.rank_wait += reducer.waited;
        metrics
    }

    fn gather_optimizer_state(&mut self, state: &mut TrainState) -> gfn_core::Result<()> {
        state.gather_optimizer_state(&mut AllReduceGradients::new(&mut *self.comm))
    }

    fn broadcast_params(&mut self, state: &mut TrainState) -> gfn_core::Result<()> {
        let mut params = state.estimators.params.flat().shallow_clone();
        self.comm.broadcast(&mut params, 0).map_err(collective)
    }

    fn sum(&mut self, values: &mut [f32], device: Device) -> gfn_core::Result<()> {
        let summed =
            sum_over_ranks(&mut *self.comm, values.to_vec(), device).map_err(collective)?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    fn all_gather_bytes(&mut self, bytes: &[u8], device: Device) -> gfn_core::Result<Vec<Vec<u8>>> {
        all_gather_bytes(&mut *self.comm, bytes, device).map_err(collective)
    }

    fn barrier(&mut self) -> gfn_core::Result<()> {
        self.comm.barrier().map_err(collective)
    }
}
