//! The communicator every backend implements: collectives over one flat f32 tensor, plus a
//! barrier and a gather of small host values for metrics.

use crate::Result;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Average,
}

pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn backend(&self) -> &'static str;
    /// Reduces a contiguous f32 tensor in place across ranks.
    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Overwrites `buffer` on every rank with its value on `root`.
    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
    /// Every rank's `values` (same length everywhere), concatenated in rank order, on `root`.
    fn gather(&mut self, values: &[f64], root: usize) -> Result<Option<Vec<f64>>>;
}

/// World size 1: every collective is the identity.
pub struct LocalCommunicator;

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce(&mut self, _buffer: &mut Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buffer: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn gather(&mut self, values: &[f64], _root: usize) -> Result<Option<Vec<f64>>> {
        Ok(Some(values.to_vec()))
    }
}
