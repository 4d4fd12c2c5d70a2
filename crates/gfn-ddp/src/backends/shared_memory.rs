//! Collectives among ranks that share one node, through an MPI shared-memory window that every
//! rank maps: reduce-scatter (sum), all-gather, and all-reduce as the two in turn. The data moves
//! as plain loads and stores, and the ranks meet on one counter each in the window. Every
//! collective is one epoch of the same shape:
//!
//! 1. every rank copies into its slot the part of its buffer that others need (reduce-scatter:
//!    the other ranks' shares; all-gather: its own share) and announces it (`arrived = epoch`);
//! 2. once all have arrived, every rank reads what it needs from the others' slots
//!    (reduce-scatter: its share of every rank's buffer, summed in rank order into its own
//!    buffer; all-gather: every other share).
//!
//! Each element is summed once, by one rank, in rank order, so all ranks end bitwise equal.
//! Slots alternate between two buffers by epoch parity: a rank can only start epoch e + 2 (and
//! overwrite the buffer of epoch e) after all ranks arrived at e + 1, that is after they all
//! finished reading epoch e's, so no second synchronisation point is needed.
//!
//! Measured against Open MPI's `MPI_Allreduce` (single-copy CMA) of the 600 KB gradient between
//! two ranks in a training step on this 2-core VM: 0.090-0.095 ms against 0.101-0.109 ms. Both
//! are bound by moving cache lines between cores (a core here reads another's lines at ~15
//! GB/s); this path copies 300 KB fewer per rank (a rank's own share stays in its buffer) and
//! needs no per-call rendezvous.
//!
//! The counters are atomics in memory that the processes share; the window's memory is
//! coherent (shared windows follow MPI's unified memory model), and the acquire/release pairs
//! order the slot writes against the other processes' reads exactly as between threads.

use super::mpi::mpi_result;
use crate::watchdog::WAITING_FOR_RANK;
use crate::{DdpError, Result};
use gfn_core::parallel::even_shares;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives};
use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counter at the head of each rank's segment, on a cache line of its own.
const HEADER_BYTES: usize = 128;
const LINE: usize = 64;
/// Elements summed at a time: 4 KB of partial sums, which stay in L1.
const SUM_BLOCK: usize = 1024;
/// Polls before a waiting rank starts yielding its core (each a `pause`: 3-50 µs in all,
/// depending on the CPU); past that, on an oversubscribed node (more ranks than cores) the
/// rank being waited for may need this core.
const SPINS_BEFORE_YIELD: u32 = 1000;

pub struct SharedWindow {
    win: ffi::MPI_Win,
    /// f32 elements per slot.
    len: usize,
    /// Bytes from one slot's start to the next (a whole number of cache lines).
    slot_bytes: usize,
    rank: usize,
    /// Start of every rank's segment as mapped into this process, in rank order.
    segments: Vec<*mut u8>,
    /// Collectives run so far on this window (announced through the counters).
    epoch: u64,
}

fn round_up(bytes: usize, to: usize) -> usize {
    bytes.div_ceil(to) * to
}

impl SharedWindow {
    /// Collective over `comm`, whose ranks must all share this node: maps a window with two
    /// slots of `len` f32 values per rank.
    pub fn new(comm: &SimpleCommunicator, len: usize) -> Result<Self> {
        let slot_bytes = round_up(len * size_of::<f32>(), LINE);
        // A spare line to start the used part of each segment at a cache line, so that no
        // rank's slot shares a line with another's.
        let segment_bytes = HEADER_BYTES + 2 * slot_bytes + LINE;
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
        // SAFETY: MPI_Win_allocate_shared succeeded, so it initialised the handle. From here
        // on the window is freed on drop, also if a query below fails.
        let mut window = SharedWindow {
            win: unsafe { win.assume_init() },
            len,
            slot_bytes,
            rank: comm.rank() as usize,
            segments: Vec::with_capacity(comm.size() as usize),
            epoch: 0,
        };
        for rank in 0..comm.size() {
            let mut bytes: ffi::MPI_Aint = 0;
            let mut unit: c_int = 0;
            let mut address: *mut c_void = std::ptr::null_mut();
            // SAFETY: the window is live; the out-parameters are valid.
            mpi_result("MPI_Win_shared_query", unsafe {
                ffi::MPI_Win_shared_query(
                    window.win,
                    rank,
                    &mut bytes,
                    &mut unit,
                    (&mut address as *mut *mut c_void).cast(),
                )
            })?;
            // MPI only promises alignment for the basic types (Open MPI's segments start 0x108
            // bytes past a page here).
            let misalignment = (address as usize).wrapping_neg() % LINE;
            // SAFETY: the segment has `LINE` bytes to spare beyond what is used (see above).
            window
                .segments
                .push(unsafe { address.cast::<u8>().add(misalignment) });
        }
        // The window's memory starts undefined: every rank zeroes its own counter, and no
        // rank polls another's before all have.
        window.arrived(window.rank).store(0, Ordering::Relaxed);
        comm.barrier();
        Ok(window)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The last epoch that `rank` has arrived at.
    fn arrived(&self, rank: usize) -> &AtomicU64 {
        // SAFETY: the header of every segment lies inside the window, which lives as long as
        // `self`; it starts at a cache line, and every process accesses it only atomically.
        unsafe { &*self.segments[rank].cast::<AtomicU64>() }
    }

    fn slot(&self, rank: usize, parity: usize) -> *mut f32 {
        // SAFETY: both slots lie inside the segment, after its header (see `new`).
        unsafe {
            self.segments[rank]
                .add(HEADER_BYTES + parity * self.slot_bytes)
                .cast::<f32>()
        }
    }

    fn shares(&self) -> Vec<Range<usize>> {
        even_shares(self.len, self.segments.len()).collect()
    }

    /// Starts an epoch: copies `parts` of `data` into this rank's slot, announces them, and
    /// waits until every rank has announced its own. Returns the slots' parity.
    fn publish(&mut self, data: &[f32], parts: &[Range<usize>]) -> usize {
        assert_eq!(
            data.len(),
            self.len,
            "buffer length differs from the window's"
        );
        self.epoch += 1;
        let parity = (self.epoch % 2) as usize;
        let own = self.slot(self.rank, parity);
        for part in parts {
            // SAFETY: this rank's slot of this parity is read by nobody now: every rank
            // finished reading it (epoch - 2) before arriving at epoch - 1, which this rank
            // waited for.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data[part.clone()].as_ptr(),
                    own.add(part.start),
                    part.len(),
                )
            };
        }
        self.arrive_and_wait();
        parity
    }

    /// Announces this rank's arrival at the current epoch and waits for every other rank's.
    fn arrive_and_wait(&self) {
        self.arrived(self.rank).store(self.epoch, Ordering::Release);
        for rank in 0..self.segments.len() {
            // Named by the collective deadline if this wait never ends.
            WAITING_FOR_RANK.store(rank as i64, Ordering::Relaxed);
            wait_until(self.arrived(rank), self.epoch);
        }
    }

    /// What `rank` published in this epoch over `part`.
    fn published(&self, rank: usize, parity: usize, part: Range<usize>) -> &[f32] {
        // SAFETY: `rank` wrote this part of its slot before announcing the current epoch,
        // which this rank waited for, and writes that slot again only after this rank arrives
        // at the next epoch.
        unsafe { std::slice::from_raw_parts(self.slot(rank, parity).add(part.start), part.len()) }
    }

    /// Sums `data` over the ranks into this rank's share of it (the elements of
    /// `even_shares(len, ranks)` at this rank); the other elements are left as they were.
    pub fn reduce_scatter(&mut self, data: &mut [f32]) {
        let shares = self.shares();
        let mine = shares[self.rank].clone();
        let others: Vec<_> = (0..shares.len())
            .filter(|&r| r != self.rank)
            .map(|r| shares[r].clone())
            .collect();
        let parity = self.publish(data, &others);
        // Block by block, the partial sums staying in L1.
        let mut sum = [0f32; SUM_BLOCK];
        for block in (mine.start..mine.end).step_by(SUM_BLOCK) {
            let block = block..(block + SUM_BLOCK).min(mine.end);
            let sum = &mut sum[..block.len()];
            for rank in 0..shares.len() {
                let part = match rank == self.rank {
                    true => &data[block.clone()],
                    false => self.published(rank, parity, block.clone()),
                };
                match rank {
                    0 => sum.copy_from_slice(part),
                    _ => sum.iter_mut().zip(part).for_each(|(s, x)| *s += x),
                }
            }
            data[block].copy_from_slice(sum);
        }
    }

    /// Copies every rank's share of `data` from that rank into `data`.
    pub fn all_gather(&mut self, data: &mut [f32]) {
        let shares = self.shares();
        let parity = self.publish(data, std::slice::from_ref(&shares[self.rank]));
        for (rank, share) in shares.into_iter().enumerate() {
            if rank != self.rank {
                data[share.clone()].copy_from_slice(self.published(rank, parity, share));
            }
        }
    }

    /// Waits until every rank has arrived here: an epoch that publishes nothing.
    pub fn barrier(&mut self) {
        self.epoch += 1;
        self.arrive_and_wait();
    }

    /// Sums `data` over the ranks, in place.
    pub fn all_reduce(&mut self, data: &mut [f32]) {
        self.reduce_scatter(data);
        self.all_gather(data);
    }
}

fn wait_until(counter: &AtomicU64, epoch: u64) {
    let mut spins = 0;
    while counter.load(Ordering::Acquire) < epoch {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

impl Drop for SharedWindow {
    fn drop(&mut self) {
        // Collective, like every communicator's end: all training ranks drop together.
        // SAFETY: the window is live and nothing borrows its memory beyond `self`.
        unsafe {
            ffi::MPI_Win_free(&mut self.win);
        }
    }
}
