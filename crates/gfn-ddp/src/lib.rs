//! gfn-ddp: data-parallel training across rank processes.
//!
//! - [`launch_env`]: rank, world size, local rank and rendezvous address from torchrun-style,
//!   MPI or Slurm variables; [`hostlist`]: Slurm hostlist expansion.
//! - [`comm`]: the [`comm::Communicator`] trait; [`backends`]: `mpi`, `nccl`, and `local`.
//! - [`rendezvous`]: a TCP rendezvous (NCCL id exchange without MPI); [`watchdog`]: deadlines
//!   for waits the backends cannot time out themselves.
//! - [`reducer`]: the gradient hook that all-reduces the flat gradient inside `TrainState::update`.

pub mod backends;
pub mod comm;
mod error;
pub mod hostlist;
pub mod launch_env;
pub mod reducer;
pub mod rendezvous;
pub mod watchdog;
pub mod world;

pub use error::{DdpError, Result};
