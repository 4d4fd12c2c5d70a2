//! gfn-core: the GFlowNet itself, independent of ranks and sockets.
//!
//! - [`env`]: the [`env::Environment`] trait (batched stepping, masks and rewards in plain Rust,
//!   optional enumeration), HyperGrid and both BitSequence variants, and [`env::EnvConfig`].
//! - [`truth`]: exact ground truth by enumeration (log Z, target distribution).
//! - [`params`] and [`estimators`]: all parameters in one flat tensor (one buffer to all-reduce),
//!   MLP, tabular and Transformer policies, state flows and log Z on tch.
//! - [`trajectories`], [`sampler`], [`replay`]: rolling out batches with exploration, replay.
//! - [`losses`]: TB, DB, SubTB, FM, ZVar, ModifiedDB, and RTB, relative ZVar and Trust-PCL
//!   against a prior policy, as pure functions of a batch and the estimators.
//! - [`metrics`]: metric modules (exact distribution, modes, reward statistics, test-set
//!   correlation, ELBO/EUBO) that observe training and compute at evaluations.
//! - [`host_mlp`]: the plain-Rust linear layer that CPU rollouts run their policy with.
//! - [`unique`]: distinct states of a batch, so that networks run once per distinct state.
//! - [`optim`], [`train`], [`checkpoint`]: the training state and its single `update`.
//! - [`fit`]: the training loop over any number of ranks, with evaluation, checkpoint and
//!   stop hooks.
//! - [`parallel`], [`subnormals`]: the CPU threads of a rank, and their float mode.
//! - [`timing`]: where a run's time goes, phase by phase.
//! - [`bounds`]: what a configuration asks of memory and threads, checked before allocating.

pub mod bounds;
pub mod checkpoint;
pub mod env;
pub mod error;
pub mod estimators;
pub mod fit;
pub mod host_mlp;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod policy_weights;
pub mod replay;
pub mod sampler;
pub mod subnormals;
pub mod timing;
pub mod train;
pub mod trajectories;
pub mod truth;
pub mod unique;

pub use error::{Error, Result};
