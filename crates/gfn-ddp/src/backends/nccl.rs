//! NCCL backend (cudarc's `nccl` module, loaded at run time, so this builds without a CUDA
//! toolkit). One GPU per local rank; collectives run on the legacy default stream, which is the
//! stream libtorch queues its own kernels on, so they are ordered with the training step.

use crate::comm::{Communicator, ReduceOp};
use crate::{DdpError, Result};
use cudarc::nccl::{result, sys};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

/// Size of NCCL's unique id, which every rank needs before creating the communicator.
pub const UNIQUE_ID_BYTES: usize = 128;

fn nccl_error(reason: impl std::fmt::Display) -> DdpError {
    DdpError::Backend {
        backend: "nccl",
        reason: reason.to_string(),
    }
}

/// cudarc panics when it cannot load the library, so look for it first.
pub fn check_library() -> Result<()> {
    for name in [c"libnccl.so", c"libnccl.so.2"] {
        // SAFETY: dlopen with a valid C string; the handle is closed right away.
        unsafe {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
            if !handle.is_null() {
                libc::dlclose(handle);
                if name == c"libnccl.so" {
                    return Ok(());
                }
                return Err(nccl_error("found libnccl.so.2 but not libnccl.so, the name cudarc loads: run launch/setup.sh (it links it)"));
            }
        }
    }
    Err(nccl_error(
        "libnccl.so not found: run launch/setup.sh, or put NCCL on LD_LIBRARY_PATH",
    ))
}

/// A fresh unique id (rank 0), as bytes to send to the other ranks.
pub fn new_unique_id() -> Result<Vec<u8>> {
    check_library()?;
    let id = result::get_uniqueid().map_err(|e| nccl_error(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl NcclCommunicator {
    /// Joins the communicator identified by `unique_id` (from rank 0) on CUDA device `device`.
    pub fn new(unique_id: &[u8], rank: usize, world_size: usize, device: usize) -> Result<Self> {
        check_library()?;
        if unique_id.len() != UNIQUE_ID_BYTES {
            return Err(nccl_error(format!(
                "unique id has {} bytes, expected {UNIQUE_ID_BYTES}",
                unique_id.len()
            )));
        }
        if device >= tch::Cuda::device_count() as usize {
            return Err(nccl_error(format!(
                "local rank needs CUDA device {device}, but this node has {}",
                tch::Cuda::device_count()
            )));
        }
        let mut id = sys::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (dst, &src) in id.internal.iter_mut().zip(unique_id) {
            *dst = src as _;
        }
        // NCCL binds the communicator to the current device; make it this rank's GPU.
        let ctx = cudarc::driver::CudaContext::new(device)
            .map_err(|e| nccl_error(format!("CUDA device {device}: {e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| nccl_error(format!("CUDA device {device}: {e:?}")))?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer and the id came from ncclGetUniqueId on rank 0.
        unsafe { result::comm_init_rank(&mut comm, world_size as i32, id, rank as i32) }
            .map_err(|e| nccl_error(format!("ncclCommInitRank: {e:?}")))?;
        Ok(NcclCommunicator {
            comm,
            rank,
            world_size,
            device: Device::Cuda(device),
        })
    }

    fn check(&self, buffer: &Tensor) -> Result<()> {
        if buffer.device() != self.device || buffer.kind() != Kind::Float || !buffer.is_contiguous()
        {
            return Err(nccl_error(format!(
                "collectives take contiguous f32 tensors on {:?}, got {:?} {:?}",
                self.device,
                buffer.kind(),
                buffer.device()
            )));
        }
        Ok(())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check(buffer)?;
        let op = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Average => sys::ncclRedOp_t::ncclAvg,
        };
        let ptr = buffer.data_ptr();
        // SAFETY: in-place all-reduce of `numel` floats of a live device tensor.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr,
                buffer.numel(),
                sys::ncclDataType_t::ncclFloat32,
                op,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(format!("ncclAllReduce: {e:?}")))?;
        Ok(())
    }

    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<()> {
        self.check(buffer)?;
        let ptr = buffer.data_ptr();
        // SAFETY: in-place broadcast of `numel` floats of a live device tensor.
        unsafe {
            result::broadcast(
                ptr as *const c_void,
                ptr,
                buffer.numel(),
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(format!("ncclBroadcast: {e:?}")))?;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce(&mut token, ReduceOp::Sum)?;
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(())
    }

    fn gather(&mut self, values: &[f64], root: usize) -> Result<Option<Vec<f64>>> {
        let n = values.len();
        let send = Tensor::from_slice(&values.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .to_device(self.device);
        let recv = Tensor::zeros([(n * self.world_size) as i64], (Kind::Float, self.device));
        // SAFETY: all-gather of `n` floats per rank into a buffer of `n * world_size` floats.
        unsafe {
            result::all_gather(
                send.data_ptr() as *const c_void,
                recv.data_ptr(),
                n,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(format!("ncclAllGather: {e:?}")))?;
        if self.rank != root {
            return Ok(None);
        }
        let host = Vec::<f32>::try_from(recv.to_device(Device::Cpu)).map_err(nccl_error)?;
        Ok(Some(host.into_iter().map(f64::from).collect()))
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
