//! The communicator every backend implements: collectives over one flat f32 tensor, plus a
//! barrier and a gather of small host values for metrics.

use crate::watchdog::{Collective, CollectiveDeadline};
use crate::{DdpError, Result};
use gfn_core::parallel::even_shares;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Average,
}

/// The share of a buffer of `len` elements that `rank` of `world` ranks owns in
/// [`Communicator::reduce_scatter_sum`] and [`Communicator::all_gather_shares`]: consecutive
/// elements, as even as whole numbers allow.
pub fn share_of(len: usize, rank: usize, world: usize) -> Range<usize> {
    even_shares(len, world)
        .nth(rank)
        .expect("rank is below the world size")
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

    /// Whether ranks gain by sharing an update out here: [`Self::reduce_scatter_sum`] plus
    /// [`Self::all_gather_shares`] cost no more than one all-reduce. Every communicator has
    /// both; the defaults below are exact fallbacks built on the all-reduce.
    fn shards(&self) -> bool {
        false
    }

    /// Sums a contiguous f32 tensor over the ranks into this rank's share of it ([`share_of`]);
    /// the other elements are left unspecified. Fallback: an all-reduce.
    fn reduce_scatter_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        self.all_reduce(buffer, ReduceOp::Sum)
    }

    /// Copies every rank's share of a contiguous f32 tensor ([`share_of`]) from that rank to
    /// all ranks. Fallback: zero the other shares and sum (exact: x + 0 = x).
    fn all_gather_shares(&mut self, buffer: &mut Tensor) -> Result<()> {
        zero_other_shares(buffer, self.rank(), self.world_size());
        self.all_reduce(buffer, ReduceOp::Sum)
    }
}

/// What the host backends do to a buffer before they sum it: divide by the ranks for an
/// average, while the buffer is still in this core's cache from the backward pass (exactly the
/// same values for power-of-two world sizes).
pub(crate) fn prescale(op: ReduceOp, world: usize) -> impl FnOnce(&mut [f32]) {
    let inverse_world = 1.0 / world as f32;
    move |data| {
        if op == ReduceOp::Average {
            data.iter_mut().for_each(|x| *x *= inverse_world);
        }
    }
}

/// Zeroes every element of `buffer` outside `rank`'s share ([`share_of`]): what the
/// all-gather by summation starts from.
pub(crate) fn zero_other_shares(buffer: &mut Tensor, rank: usize, world: usize) {
    let len = buffer.numel();
    let mine = share_of(len, rank, world);
    tch::no_grad(|| {
        let _ = buffer.narrow(0, 0, mine.start as i64).zero_();
        let _ = buffer
            .narrow(0, mine.end as i64, (len - mine.end) as i64)
            .zero_();
    });
}

/// Every rank's `bytes` (any length), in rank order, on every rank: built on the all-reduce
/// (lengths first, then each rank's bytes at its own offset, zeros elsewhere). Integers ride in
/// f32 below 2^16, where f32 sums are exact: two bytes per value, lengths as two 16-bit halves.
pub fn all_gather_bytes(
    comm: &mut dyn Communicator,
    bytes: &[u8],
    device: tch::Device,
) -> Result<Vec<Vec<u8>>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut lengths = vec![0f32; 2 * world];
    lengths[2 * rank] = (bytes.len() & 0xFFFF) as f32;
    lengths[2 * rank + 1] = (bytes.len() >> 16) as f32;
    let lengths: Vec<usize> = sum_over_ranks(comm, lengths, device)?
        .chunks_exact(2)
        .map(|pair| pair[0] as usize | (pair[1] as usize) << 16)
        .collect();
    let words: Vec<usize> = lengths.iter().map(|l| l.div_ceil(2)).collect();
    let offsets: Vec<usize> = words
        .iter()
        .scan(0, |at, &w| {
            *at += w;
            Some(*at - w)
        })
        .collect();
    let mut payload = vec![0f32; words.iter().sum::<usize>().max(1)];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let high = pair.get(1).copied().unwrap_or(0) as u32;
        payload[offsets[rank] + i] = (pair[0] as u32 | high << 8) as f32;
    }
    let payload = sum_over_ranks(comm, payload, device)?;
    Ok((0..world)
        .map(|r| {
            let mut out: Vec<u8> = payload[offsets[r]..offsets[r] + words[r]]
                .iter()
                .flat_map(|&w| [(w as u32 & 0xFF) as u8, (w as u32 >> 8) as u8])
                .collect();
            out.truncate(lengths[r]);
            out
        })
        .collect())
}

pub(crate) fn sum_over_ranks(
    comm: &mut dyn Communicator,
    values: Vec<f32>,
    device: tch::Device,
) -> Result<Vec<f32>> {
    let mut tensor = Tensor::from_slice(&values).to_device(device);
    comm.all_reduce(&mut tensor, ReduceOp::Sum)?;
    Ok(Vec::<f32>::try_from(tensor.to_device(tch::Device::Cpu))?)
}

/// Runs `f` on the tensor's f32 data in host memory (the host backends' staging), copying back
/// if it lives elsewhere.
pub(crate) fn with_host_slice<R>(
    backend: &'static str,
    buffer: &mut Tensor,
    f: impl FnOnce(&mut [f32]) -> R,
) -> Result<R> {
    if buffer.kind() != Kind::Float {
        return Err(DdpError::Backend {
            backend,
            reason: format!("collectives take f32 tensors, got {:?}", buffer.kind()),
        });
    }
    let on_host = buffer.device() == Device::Cpu && buffer.is_contiguous();
    let host = if on_host {
        buffer.shallow_clone()
    } else {
        buffer.to_device(Device::Cpu).contiguous()
    };
    let n = host.numel();
    // SAFETY: `host` is a contiguous f32 CPU tensor of `n` elements that nothing else touches
    // while `f` runs.
    let slice = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut f32, n) };
    let out = f(slice);
    if !on_host {
        tch::no_grad(|| buffer.copy_(&host));
    }
    Ok(out)
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

/// Any communicator with a deadline on each of its collectives ([`CollectiveDeadline`]).
pub struct WithDeadline {
    inner: Box<dyn Communicator>,
    deadline: CollectiveDeadline,
}

impl WithDeadline {
    pub fn new(inner: Box<dyn Communicator>, deadline: CollectiveDeadline) -> Self {
        WithDeadline { inner, deadline }
    }
}

impl Communicator for WithDeadline {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn shards(&self) -> bool {
        self.inner.shards()
    }
    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        let _running = self.deadline.enter(Collective::AllReduce);
        self.inner.all_reduce(buffer, op)
    }
    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<()> {
        let _running = self.deadline.enter(Collective::Broadcast);
        self.inner.broadcast(buffer, root)
    }
    fn barrier(&mut self) -> Result<()> {
        let _running = self.deadline.enter(Collective::Barrier);
        self.inner.barrier()
    }
    fn gather(&mut self, values: &[f64], root: usize) -> Result<Option<Vec<f64>>> {
        let _running = self.deadline.enter(Collective::Gather);
        self.inner.gather(values, root)
    }
    fn reduce_scatter_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        let _running = self.deadline.enter(Collective::ReduceScatter);
        self.inner.reduce_scatter_sum(buffer)
    }
    fn all_gather_shares(&mut self, buffer: &mut Tensor) -> Result<()> {
        let _running = self.deadline.enter(Collective::AllGather);
        self.inner.all_gather_shares(buffer)
    }
}
