//! Communicator backends: `local` (in [`crate::comm`]), `mpi` and `nccl` behind cargo features.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "mpi")]
pub mod shared_memory;
