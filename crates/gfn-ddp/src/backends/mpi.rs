//! MPI backend (rsmpi): collectives on host memory; device tensors are staged through the host.

use crate::backends::shared_memory::{on_host, segment_bytes, NodeMemory, SharedWindow, Windows};
use crate::comm::{prescale, with_host_slice, Communicator, ReduceOp};
use crate::watchdog::Watchdog;
use crate::{DdpError, Result};
use gfn_core::parallel::even_shares;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::time::Duration;
use tch::Tensor;

/// The MPI world of this process (`MPI_Init` on creation, `MPI_Finalize` on drop).
pub struct MpiWorld {
    universe: Universe,
}

impl MpiWorld {
    /// Initialises MPI, giving up after `timeout` if the other ranks never join.
    pub fn init(timeout: Duration) -> Result<Self> {
        let _watchdog = Watchdog::arm("MPI start-up (MPI_Init) to see every rank", timeout);
        let universe = mpi::initialize().ok_or_else(|| DdpError::Backend {
            backend: "mpi",
            reason: "MPI was already initialised".into(),
        })?;
        Ok(MpiWorld { universe })
    }

    pub fn rank(&self) -> usize {
        self.universe.world().rank() as usize
    }

    pub fn size(&self) -> usize {
        self.universe.world().size() as usize
    }

    /// Sends `bytes` from world rank 0 to every rank (e.g. the NCCL unique id).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        self.universe
            .world()
            .process_at_rank(0)
            .broadcast_into(bytes);
    }

    /// Every rank's `own` bytes, indexed by rank (lengths may differ).
    pub fn all_gather_bytes(&self, own: &[u8]) -> Vec<Vec<u8>> {
        let world = self.universe.world();
        let n = world.size() as usize;
        let mut lengths = vec![0u32; n];
        world.all_gather_into(&(own.len() as u32), &mut lengths[..]);
        let width = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = own.to_vec();
        padded.resize(width, 0);
        let mut all = vec![0u8; width * n];
        world.all_gather_into(&padded[..], &mut all[..]);
        (0..n)
            .map(|r| all[r * width..r * width + lengths[r] as usize].to_vec())
            .collect()
    }

    /// A communicator over the world ranks `0..members` (the training ranks); `None` on ranks
    /// outside it. With `shared_memory`, its collectives go through shared windows when every
    /// member is on this node ([`SharedWindow`]), and it shards.
    pub fn communicator(&self, members: usize, shared_memory: bool) -> Option<MpiCommunicator> {
        let world = self.universe.world();
        let color = if (world.rank() as usize) < members {
            Color::with_value(0)
        } else {
            Color::undefined()
        };
        let comm = world.split_by_color(color)?;
        let use_windows = shared_memory
            && comm.size() > 1
            && comm.split_shared(comm.rank()).size() == comm.size();
        Some(MpiCommunicator {
            windows: Windows::default(),
            use_windows,
            comm,
        })
    }
}

pub struct MpiCommunicator {
    /// Shared windows by buffer length, created on the first collective of each length
    /// (dropped before `comm`, which they are built on).
    windows: Windows,
    /// Shared windows are wanted, and there are several ranks, all on this node.
    use_windows: bool,
    comm: SimpleCommunicator,
}

extern "C" {
    /// `MPI_IN_PLACE` of the MPI library linked (see build.rs).
    static gfn_mpi_in_place: *mut c_void;
}

/// Sums `data` over the ranks of `comm` into `data` itself: no send copy to make and stream
/// through (rsmpi's `all_reduce_into` needs separate buffers).
fn all_reduce_sum_in_place(comm: &SimpleCommunicator, data: &mut [f32]) -> Result<()> {
    let count = mpi_count(data.len(), data.len())?;
    // SAFETY: `data` is a live, exclusively borrowed buffer of `count` f32 values, which is
    // what MPI reads and writes here; the datatype, operation and communicator handles are
    // valid for the lifetime of the MPI world that `comm` belongs to.
    let code = unsafe {
        ffi::MPI_Allreduce(
            gfn_mpi_in_place,
            data.as_mut_ptr().cast(),
            count,
            ffi::RSMPI_FLOAT,
            ffi::RSMPI_SUM,
            comm.as_raw(),
        )
    };
    mpi_result("MPI_Allreduce", code)
}

/// Each rank's element count and offset in `even_shares(len, ranks)`, as MPI takes them.
fn share_counts(comm: &SimpleCommunicator, len: usize) -> Result<(Vec<c_int>, Vec<c_int>)> {
    mpi_count(len, len)?;
    let shares: Vec<_> = even_shares(len, comm.size() as usize).collect();
    let counts = shares
        .iter()
        .map(|s| mpi_count(s.len(), len))
        .collect::<Result<_>>()?;
    let offsets = shares
        .iter()
        .map(|s| mpi_count(s.start, len))
        .collect::<Result<_>>()?;
    Ok((counts, offsets))
}

/// `n` as an MPI count or offset, for a collective over `len` elements.
fn mpi_count(n: usize, len: usize) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| DdpError::Backend {
        backend: "mpi",
        reason: format!("{len} elements exceed one MPI collective's count"),
    })
}

/// Sums `data` over the ranks into this rank's share of it. MPI leaves the share at the
/// front of the buffer; it is moved to its place.
fn reduce_scatter_sum_in_place(comm: &SimpleCommunicator, data: &mut [f32]) -> Result<()> {
    let (counts, offsets) = share_counts(comm, data.len())?;
    // SAFETY: `data` holds the full input (the sum of the counts is its length) and is
    // exclusively borrowed; the handles are valid for the lifetime of the MPI world.
    let code = unsafe {
        ffi::MPI_Reduce_scatter(
            gfn_mpi_in_place,
            data.as_mut_ptr().cast(),
            counts.as_ptr(),
            ffi::RSMPI_FLOAT,
            ffi::RSMPI_SUM,
            comm.as_raw(),
        )
    };
    mpi_result("MPI_Reduce_scatter", code)?;
    let rank = comm.rank() as usize;
    let (count, offset) = (counts[rank] as usize, offsets[rank] as usize);
    data.copy_within(0..count, offset);
    Ok(())
}

/// Copies every rank's share of `data` from that rank into `data`.
fn all_gather_in_place(comm: &SimpleCommunicator, data: &mut [f32]) -> Result<()> {
    let (counts, offsets) = share_counts(comm, data.len())?;
    // SAFETY: in place, each rank's share is read from where it is received; `data` is
    // exclusively borrowed and as long as the counts say; the handles are valid.
    let code = unsafe {
        ffi::MPI_Allgatherv(
            gfn_mpi_in_place,
            0,
            ffi::RSMPI_FLOAT,
            data.as_mut_ptr().cast(),
            counts.as_ptr(),
            offsets.as_ptr(),
            ffi::RSMPI_FLOAT,
            comm.as_raw(),
        )
    };
    mpi_result("MPI_Allgatherv", code)
}

/// MPI's shared window over every rank of a communicator on one node, one segment per rank;
/// freed on drop (collectively, as every communicator's end: all its ranks drop together).
struct MpiWindowMemory {
    win: ffi::MPI_Win,
    segments: Vec<*mut u8>,
}

impl NodeMemory for MpiWindowMemory {
    fn segments(&self) -> Vec<*mut u8> {
        self.segments.clone()
    }
}

impl Drop for MpiWindowMemory {
    fn drop(&mut self) {
        // SAFETY: the window is live and nothing borrows its memory beyond its SharedWindow,
        // which is dropped first.
        unsafe {
            ffi::MPI_Win_free(&mut self.win);
        }
    }
}

/// A [`SharedWindow`] for buffers of `len` values over every rank of `comm`, which must all
/// share this node. Collective.
fn shared_window(comm: &SimpleCommunicator, len: usize) -> Result<SharedWindow> {
    let segment_bytes = segment_bytes(len);
    let size = ffi::MPI_Aint::try_from(segment_bytes).map_err(|_| DdpError::Backend {
        backend: "mpi",
        reason: format!("a shared window of {segment_bytes} bytes per rank is too large"),
    })?;
    let mut base: *mut c_void = std::ptr::null_mut();
    let mut win = MaybeUninit::<ffi::MPI_Win>::uninit();
    // Failure (e.g. no room for the backing file in Docker's 64 MB /dev/shm) aborts the job
    // with Open MPI's message naming the file: with MPI_ERRORS_RETURN, Open MPI 4.1's
    // osc/sm returns on the rank that failed while the others wait for it forever.
    // SAFETY: `base` and `win` are valid out-parameters (MPI writes the segment's address
    // into the pointer that `baseptr` points to); the communicator is live.
    mpi_result("MPI_Win_allocate_shared", unsafe {
        ffi::MPI_Win_allocate_shared(
            size,
            1,
            ffi::RSMPI_INFO_NULL,
            comm.as_raw(),
            (&mut base as *mut *mut c_void).cast(),
            win.as_mut_ptr(),
        )
    })?;
    // SAFETY: MPI_Win_allocate_shared succeeded, so it initialised the handle. From here on
    // the window is freed on drop, also if a query below fails.
    let mut memory = MpiWindowMemory {
        win: unsafe { win.assume_init() },
        segments: Vec::with_capacity(comm.size() as usize),
    };
    for rank in 0..comm.size() {
        let mut bytes: ffi::MPI_Aint = 0;
        let mut unit: c_int = 0;
        let mut address: *mut c_void = std::ptr::null_mut();
        // SAFETY: the window is live; the out-parameters are valid.
        mpi_result("MPI_Win_shared_query", unsafe {
            ffi::MPI_Win_shared_query(
                memory.win,
                rank,
                &mut bytes,
                &mut unit,
                (&mut address as *mut *mut c_void).cast(),
            )
        })?;
        memory.segments.push(address.cast());
    }
    // No watch on the peers: Open MPI ends the job when a rank dies (or, under
    // --enable-recovery, the collective deadline does, through MPI_Abort).
    SharedWindow::new(Box::new(memory), comm.rank() as usize, len, false, || {
        comm.barrier();
        Ok(())
    })
}

/// Ends every process of the MPI job (stopped ones too: the runtime kills them), from any
/// thread.
pub(crate) fn abort_job(code: i32) {
    // SAFETY: MPI is initialised while a training communicator exists; MPI_Abort does not
    // return.
    unsafe {
        ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
    }
}

pub(crate) fn mpi_result(what: &str, code: c_int) -> Result<()> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(DdpError::Backend {
            backend: "mpi",
            reason: format!("{what} failed with error code {code}"),
        })
    }
}

impl MpiCommunicator {
    /// Runs a collective over `buffer`'s host data after `prepare`: through the shared window
    /// for its length where windows are used (created on first use: collective, as every rank
    /// runs the same collectives on buffers of the same lengths in the same order), through
    /// MPI otherwise.
    fn host_collective(
        &mut self,
        buffer: &mut Tensor,
        prepare: impl FnOnce(&mut [f32]),
        through_window: fn(&mut SharedWindow, &mut [f32]) -> Result<()>,
        through_mpi: fn(&SimpleCommunicator, &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let len = buffer.numel();
        let comm = &self.comm;
        let window = match self.use_windows && len > 0 {
            true => Some(self.windows.for_len(len, || shared_window(comm, len))?),
            false => None,
        };
        on_host("mpi", buffer, window, prepare, through_window, |data| {
            through_mpi(comm, data)
        })
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.comm.size() as usize
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.host_collective(
            buffer,
            prescale(op, self.world_size()),
            SharedWindow::all_reduce,
            all_reduce_sum_in_place,
        )
    }

    /// Only through a shared window: Open MPI's `MPI_Reduce_scatter` plus `MPI_Allgatherv` of
    /// the gradient took 0.155 ms per step here against 0.105 ms for its `MPI_Allreduce`,
    /// more than the halved optimizer step saves.
    fn shards(&self) -> bool {
        self.use_windows
    }

    fn reduce_scatter_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        self.host_collective(
            buffer,
            |_| {},
            SharedWindow::reduce_scatter,
            reduce_scatter_sum_in_place,
        )
    }

    fn all_gather_shares(&mut self, buffer: &mut Tensor) -> Result<()> {
        self.host_collective(
            buffer,
            |_| {},
            SharedWindow::all_gather,
            all_gather_in_place,
        )
    }

    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<()> {
        let comm = &self.comm;
        with_host_slice("mpi", buffer, |data| {
            comm.process_at_rank(root as i32).broadcast_into(data)
        })
    }

    /// Through a shared window where there is one (its waits name a missing rank).
    fn barrier(&mut self) -> Result<()> {
        match self.windows.any() {
            Some(window) => window.barrier(),
            None => {
                self.comm.barrier();
                Ok(())
            }
        }
    }

    fn gather(&mut self, values: &[f64], root: usize) -> Result<Option<Vec<f64>>> {
        let root_process = self.comm.process_at_rank(root as i32);
        if self.rank() == root {
            let mut out = vec![0f64; values.len() * self.world_size()];
            root_process.gather_into_root(values, &mut out[..]);
            Ok(Some(out))
        } else {
            root_process.gather_into(values);
            Ok(None)
        }
    }
}
