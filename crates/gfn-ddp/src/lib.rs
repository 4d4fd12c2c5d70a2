//! gfn-ddp: data-parallel training across rank processes.
//!
//! - [`launch_env`]: rank, world size, local rank and rendezvous address from torchrun-style,
//!   MPI or Slurm variables; [`hostlist`]: Slurm hostlist expansion.
//! - [`comm`]: the [`comm::Communicator`] trait; [`backends`]: `mpi` and `gloo` (both with
//!   shared-memory collectives among ranks on one node), `nccl`, and `local`.
//! - [`rendezvous`]: a TCP rendezvous (NCCL ids and gloo addresses exchanged without MPI); [`watchdog`]: deadlines
//!   for waits the backends cannot time out themselves.
//! - [`reducer`]: the gradient hook inside `TrainState::update`: one all-reduce of the flat
//!   gradient, or the update shared out across ranks (reduce-scatter, step, all-gather).
//! - [`ranks`]: the training loop's view of the ranks (`gfn_core::fit::Ranks`).

pub mod backends;
pub mod comm;
mod error;
pub mod hostlist;
pub mod launch_env;
pub mod ranks;
pub mod reducer;
pub mod rendezvous;
pub mod watchdog;
pub mod world;

pub use error::{DdpError, Result};
