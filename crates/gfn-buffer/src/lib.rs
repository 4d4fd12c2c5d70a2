//! gfn-buffer: a replay buffer served by dedicated ranks, and the client training ranks use.
//!
//! - [`protocol`]: frames, messages, version and token — everything that crosses the wire.
//! - [`store`]: the buffer itself (FIFO, reward-prioritized, unique-state) and its statistics.
//! - [`server`]: the tokio TCP server on a buffer rank.
//! - [`snapshot`]: its snapshot files, written at each checkpoint and read on resume.
//! - [`client`]: a connection that never blocks the training step: pushes are queued, replay
//!   samples are prefetched in the background, a lost server is reported, not waited on.
//! - [`fuzzing`]: the fuzz target's entry point (see `fuzz/`).
//!
//! The crate knows nothing of tensors or environments: an item is a trajectory as plain
//! integers (states, actions), its log-reward and its terminal state's key.

pub mod client;
mod error;
pub mod fuzzing;
pub mod protocol;
pub mod server;
pub mod snapshot;
pub mod store;

pub use error::{BufferError, Result};
