//! Communicator backends: `local` (in [`crate::comm`]), `mpi`, `gloo` and `nccl` behind cargo
//! features.

#[cfg(feature = "gloo")]
pub mod gloo;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(any(feature = "mpi", feature = "gloo"))]
pub mod shared_memory;
