//! gfn-core: the GFlowNet itself, independent of ranks and sockets.
//!
//! - [`env`]: the [`env::Environment`] trait (batched stepping and masks in plain Rust) and HyperGrid.
//! - [`truth`]: exact ground truth by enumeration (log Z, target distribution, modes).
//! - [`params`] and [`estimators`]: all parameters in one flat tensor (one buffer to all-reduce),
//!   MLP/tabular policies, state flows and log Z on tch.
//! - [`trajectories`], [`sampler`], [`replay`]: rolling out batches with exploration, replay.
//! - [`losses`]: TB, DB, SubTB, FM, ZVar, ModifiedDB as pure functions of a batch and the estimators.
//! - [`evaluation`]: exact learned distribution (propagation over the DAG) and sampled metrics.
//! - [`optim`], [`train`], [`checkpoint`]: the training state and its single `update`.

pub mod checkpoint;
pub mod env;
pub mod error;
pub mod estimators;
pub mod evaluation;
pub mod losses;
pub mod optim;
pub mod params;
pub mod replay;
pub mod sampler;
pub mod train;
pub mod trajectories;
pub mod truth;

pub use error::{Error, Result};
