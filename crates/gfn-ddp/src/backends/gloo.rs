//! gloo backend (Facebook's collective library behind PyTorch's gloo backend, Debian's
//! `libgloo-dev`) for CPU ranks that a launcher other than MPI started (torchrun, or RANK /
//! WORLD_SIZE / MASTER_ADDR / MASTER_PORT by hand): TCP pairs between every two ranks, ring
//! all-reduce. Each rank creates its pairs first and announces their addresses through the job's
//! own rendezvous ([`crate::rendezvous`]), then connects them: no gloo Store is needed.
//! Through the C++ shim `gloo_shim.cc`. Ranks that all share a node meet in shared windows
//! instead for the gradient's collectives and barriers (gloo's loopback TCP is ten times
//! slower, see [`crate::backends::shared_memory`]).

use crate::backends::shared_memory::{on_host, segment_bytes, NodeFile, SharedWindow, Windows};
use crate::comm::{prescale, with_host_slice, zero_other_shares, Communicator, ReduceOp};
use crate::{DdpError, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::{ToSocketAddrs, UdpSocket};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn gfn_gloo_last_error() -> *const c_char;
    fn gfn_gloo_library() -> *const c_char;
    fn gfn_gloo_create(
        rank: c_int,
        size: c_int,
        local_rank: c_int,
        host: *const c_char,
        iface: *const c_char,
        timeout_ms: i64,
    ) -> *mut c_void;
    fn gfn_gloo_addresses(handle: *mut c_void, len: *mut usize) -> *const c_char;
    fn gfn_gloo_connect(
        handle: *mut c_void,
        peer: c_int,
        address: *const c_char,
        len: usize,
    ) -> c_int;
    fn gfn_gloo_allreduce_sum_f32(handle: *mut c_void, data: *mut f32, n: usize) -> c_int;
    fn gfn_gloo_broadcast_f32(handle: *mut c_void, data: *mut f32, n: usize, root: c_int) -> c_int;
    fn gfn_gloo_barrier(handle: *mut c_void) -> c_int;
    fn gfn_gloo_gather_f64(
        handle: *mut c_void,
        values: *const f64,
        n: usize,
        out: *mut f64,
        root: c_int,
    ) -> c_int;
    fn gfn_gloo_destroy(handle: *mut c_void);
}

fn gloo_error(what: &str) -> DdpError {
    // SAFETY: the shim returns a NUL-terminated string owned by this thread.
    let message = unsafe { CStr::from_ptr(gfn_gloo_last_error()) };
    DdpError::Backend {
        backend: "gloo",
        reason: format!("{what}: {}", message.to_string_lossy()),
    }
}

fn check(what: &str, code: c_int) -> Result<()> {
    match code {
        0 => Ok(()),
        _ => Err(gloo_error(what)),
    }
}

/// libtorch carries its own copy of gloo: refuse to run if the shim's calls bind to it instead
/// of the gloo it was compiled against.
fn check_library() -> Result<()> {
    // SAFETY: a NUL-terminated string from dladdr, or an empty one.
    let library = unsafe { CStr::from_ptr(gfn_gloo_library()) }.to_string_lossy();
    match library.contains("libgloo.so") {
        true => Ok(()),
        false => Err(DdpError::Backend {
            backend: "gloo",
            reason: format!(
                "gloo's functions resolve to {library:?}, not to Debian's libgloo.so: link libgloo before libtorch"
            ),
        }),
    }
}

/// The local address this host reaches `master` from: where the other ranks can reach this
/// one too (gethostname may resolve to a loopback address, or to the same name on every node).
fn local_address_towards(master: &str, port: u16) -> Result<String> {
    let fail = |reason: String| DdpError::Launch(format!("MASTER_ADDR {master}: {reason}"));
    let target = (master, port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve ({e})")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    // A connected UDP socket sends nothing: it only asks the kernel for the route.
    let socket = UdpSocket::bind(bind).map_err(|e| fail(format!("no local socket ({e})")))?;
    socket
        .connect(target)
        .map_err(|e| fail(format!("no route ({e})")))?;
    Ok(socket.local_addr()?.ip().to_string())
}

fn hostname() -> Result<String> {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// This rank's gloo context with its pairs created but not connected yet.
pub struct GlooPairs {
    handle: *mut c_void,
    rank: usize,
    size: usize,
}

impl GlooPairs {
    /// Creates this rank's TCP device on the address it reaches `master` from (or on the
    /// interface `GLOO_SOCKET_IFNAME` names, as PyTorch reads it; or, without a master, on
    /// its host name's address) and one pair per peer. Every collective over them ends in an
    /// error past `timeout`.
    pub fn create(
        rank: usize,
        size: usize,
        local_rank: usize,
        master: Option<(&str, u16)>,
        timeout: Duration,
    ) -> Result<Self> {
        check_library()?;
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let host = match (iface.is_empty(), master) {
            (false, _) => String::new(),
            (true, Some((addr, port))) => local_address_towards(addr, port)?,
            // No master to route towards (under mpirun): the host's own name, as gloo's default.
            (true, None) => hostname()?,
        };
        let text = |s: String, var: &'static str| {
            CString::new(s.clone()).map_err(|_| DdpError::InvalidEnv {
                var,
                value: s,
                reason: "contains a NUL byte".into(),
            })
        };
        let (host, iface) = (
            text(host, "MASTER_ADDR")?,
            text(iface, "GLOO_SOCKET_IFNAME")?,
        );
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        // SAFETY: valid NUL-terminated strings; the handle is owned by the returned value.
        let handle = unsafe {
            gfn_gloo_create(
                rank as c_int,
                size as c_int,
                local_rank as c_int,
                host.as_ptr(),
                iface.as_ptr(),
                timeout_ms,
            )
        };
        if handle.is_null() {
            return Err(gloo_error("creating the TCP device and pairs"));
        }
        Ok(GlooPairs { handle, rank, size })
    }

    /// The pairs' addresses, every peer's in peer order: this rank's announcement.
    pub fn addresses(&self) -> Vec<u8> {
        let mut len = 0usize;
        // SAFETY: the shim returns a pointer to `len` bytes owned by the live handle.
        unsafe {
            let data = gfn_gloo_addresses(self.handle, &mut len);
            std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()
        }
    }

    /// Connects every pair from the addresses every rank announced (indexed by rank). With
    /// `shared_memory`, and every rank able to map one file in this node's /dev/shm, the
    /// gradient collectives and barriers go through shared windows and the communicator
    /// shards; gloo carries them otherwise (ranks on several nodes).
    pub fn connect(self, announced: &[Vec<u8>], shared_memory: bool) -> Result<GlooCommunicator> {
        for (peer, addresses) in announced.iter().enumerate() {
            if peer == self.rank {
                continue;
            }
            let address = own_address(addresses, self.rank, peer, self.size).ok_or_else(|| {
                DdpError::Backend {
                    backend: "gloo",
                    reason: format!(
                        "rank {peer} announced {} bytes of pair addresses for {} peers",
                        addresses.len(),
                        self.size - 1
                    ),
                }
            })?;
            // SAFETY: `address` is valid for its length; the handle is live.
            let code = unsafe {
                gfn_gloo_connect(
                    self.handle,
                    peer as c_int,
                    address.as_ptr().cast(),
                    address.len(),
                )
            };
            check(&format!("connecting to rank {peer}"), code)?;
        }
        let mut communicator = GlooCommunicator {
            gloo: Connected {
                handle: self.handle,
                rank: self.rank,
                size: self.size,
            },
            windows: Windows::default(),
            node: None,
        };
        std::mem::forget(self);
        if shared_memory && communicator.gloo.size > 1 {
            communicator.share_node()?;
        }
        Ok(communicator)
    }
}

impl Drop for GlooPairs {
    fn drop(&mut self) {
        // SAFETY: the handle came from gfn_gloo_create and is dropped once.
        unsafe { gfn_gloo_destroy(self.handle) }
    }
}

/// The address of `peer`'s pair for `rank` within `peer`'s announcement (its pairs for every
/// rank but itself, in rank order, all of one size).
fn own_address(announced: &[u8], rank: usize, peer: usize, size: usize) -> Option<&[u8]> {
    let peers = size.checked_sub(1).filter(|&p| p > 0)?;
    if announced.is_empty() || !announced.len().is_multiple_of(peers) {
        return None;
    }
    let width = announced.len() / peers;
    let index = if rank > peer { rank - 1 } else { rank };
    announced.get(index * width..(index + 1) * width)
}

/// The training ranks' communicator over connected gloo pairs.
pub struct GlooCommunicator {
    gloo: Connected,
    /// Shared windows by buffer length where the ranks share a node (dropped before the
    /// gloo context, whose barrier their creation uses).
    windows: Windows,
    /// Where the ranks share a node: the name that this job's window files start with.
    node: Option<NodeFiles>,
}

/// The connected gloo context (freed by the communicator) and what its calls need.
#[derive(Clone, Copy)]
struct Connected {
    handle: *mut c_void,
    rank: usize,
    size: usize,
}

/// Names of one job's window files in /dev/shm: `gfn-TOKEN-N`, N counting the windows made.
struct NodeFiles {
    token: u64,
    made: u64,
}

impl NodeFiles {
    fn next_path(&mut self) -> String {
        self.made += 1;
        format!("/dev/shm/gfn-{:016x}-{}", self.token, self.made)
    }
}

// SAFETY: the gloo context is used by one thread at a time (the communicator is not Sync) and
// owns no thread-affine state.
unsafe impl Send for GlooCommunicator {}

impl Drop for GlooCommunicator {
    fn drop(&mut self) {
        // The windows first: their memory goes with them, the gloo context after.
        self.windows = Windows::default();
        // SAFETY: the handle came from gfn_gloo_create and is dropped once.
        unsafe { gfn_gloo_destroy(self.gloo.handle) }
    }
}

impl Connected {
    fn barrier(self) -> Result<()> {
        // SAFETY: the handle is live.
        check("barrier", unsafe { gfn_gloo_barrier(self.handle) })
    }

    fn sum(self, data: &mut [f32]) -> Result<()> {
        // SAFETY: `data` is exclusively borrowed for the call; the handle is live.
        let code =
            unsafe { gfn_gloo_allreduce_sum_f32(self.handle, data.as_mut_ptr(), data.len()) };
        check("all-reduce", code)
    }

    /// A window for buffers of `len` values in a file that rank 0 creates and every rank maps,
    /// or `None` where some rank cannot (another node, no /dev/shm, no room): every rank gets
    /// the same answer. Collective. Rank 0 removes the file's name whatever happens.
    fn node_window(self, files: &mut NodeFiles, len: usize) -> Result<Option<SharedWindow>> {
        let path = files.next_path();
        let created = match self.rank {
            0 => NodeFile::create(&path, self.size, len).ok(),
            _ => None,
        };
        let mapped = self.map_everywhere(created, &path, len);
        if self.rank == 0 {
            NodeFile::unlink(&path);
        }
        match mapped? {
            Some(memory) => Ok(Some(SharedWindow::new(
                Box::new(memory),
                self.rank,
                len,
                true,
                || self.barrier(),
            )?)),
            None => Ok(None),
        }
    }

    /// Tells every rank whether rank 0 `created` the file, maps it on the others, and returns
    /// this rank's mapping if every rank has one.
    fn map_everywhere(
        self,
        created: Option<NodeFile>,
        path: &str,
        len: usize,
    ) -> Result<Option<NodeFile>> {
        let mut exists = [created.is_some() as u8 as f32];
        self.sum(&mut exists)?;
        if exists[0] == 0.0 {
            return Ok(None);
        }
        let memory = match created {
            Some(file) => Some(file),
            None => NodeFile::open(path, self.size, len).ok(),
        };
        let mut mapped = [memory.is_some() as u8 as f32];
        self.sum(&mut mapped)?;
        Ok(memory.filter(|_| mapped[0] == self.size as f32))
    }
}

impl GlooCommunicator {
    /// Agrees on a name for this job's window files and maps a first, one-value window, if
    /// every rank can: then the ranks share this node's memory. Collective.
    fn share_node(&mut self) -> Result<()> {
        // Rank 0's token, in 16-bit pieces (exact in f32 sums), to every rank.
        let mut pieces = [0f32; 4];
        if self.gloo.rank == 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let token = (u64::from(std::process::id()) << 32) ^ now.as_nanos() as u64;
            for (i, piece) in pieces.iter_mut().enumerate() {
                *piece = ((token >> (16 * i)) & 0xFFFF) as f32;
            }
        }
        self.gloo.sum(&mut pieces)?;
        let token = pieces
            .iter()
            .enumerate()
            .fold(0u64, |t, (i, &p)| t | (p as u64) << (16 * i));
        let mut files = NodeFiles { token, made: 0 };
        if let Some(window) = self.gloo.node_window(&mut files, 1)? {
            self.windows.for_len(1, || Ok(window))?;
            self.node = Some(files);
        }
        Ok(())
    }

    /// Runs a collective over `buffer`'s host data after `prepare`: through the shared window
    /// for its length where the ranks share a node (created on first use), through gloo's
    /// all-reduce otherwise (which does for reduce-scatter, and for all-gather once the other
    /// shares are zeroed).
    fn host_collective(
        &mut self,
        buffer: &mut Tensor,
        prepare: impl FnOnce(&mut [f32]),
        through_window: fn(&mut SharedWindow, &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let len = buffer.numel();
        let gloo = self.gloo;
        let window = match (&mut self.node, len) {
            (Some(files), 1..) => {
                let make = || {
                    gloo.node_window(files, len)?.ok_or_else(|| DdpError::Backend {
                        backend: "gloo",
                        reason: format!(
                            "a rank could not map a shared window of {} bytes per rank in /dev/shm (full?); ddp.shared_memory = false avoids the windows",
                            segment_bytes(len)
                        ),
                    })
                };
                Some(self.windows.for_len(len, make)?)
            }
            _ => None,
        };
        on_host("gloo", buffer, window, prepare, through_window, |data| {
            gloo.sum(data)
        })
    }
}

impl Communicator for GlooCommunicator {
    fn rank(&self) -> usize {
        self.gloo.rank
    }
    fn world_size(&self) -> usize {
        self.gloo.size
    }
    fn backend(&self) -> &'static str {
        "gloo"
    }

    fn all_reduce(&mut self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.host_collective(
            buffer,
            prescale(op, self.gloo.size),
            SharedWindow::all_reduce,
        )
    }

    fn shards(&self) -> bool {
        self.node.is_some()
    }

    fn reduce_scatter_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        self.host_collective(buffer, |_| {}, SharedWindow::reduce_scatter)
    }

    fn all_gather_shares(&mut self, buffer: &mut Tensor) -> Result<()> {
        if self.node.is_none() {
            zero_other_shares(buffer, self.gloo.rank, self.gloo.size);
        }
        self.host_collective(buffer, |_| {}, SharedWindow::all_gather)
    }

    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<()> {
        let handle = self.gloo.handle;
        with_host_slice("gloo", buffer, |data| {
            // SAFETY: `data` is exclusively borrowed for the call; the handle is live.
            let code = unsafe {
                gfn_gloo_broadcast_f32(handle, data.as_mut_ptr(), data.len(), root as c_int)
            };
            check("broadcast", code)
        })?
    }

    /// Through a shared window where there is one (its waits name a missing rank).
    fn barrier(&mut self) -> Result<()> {
        match self.windows.any() {
            Some(window) => window.barrier(),
            None => self.gloo.barrier(),
        }
    }

    fn gather(&mut self, values: &[f64], root: usize) -> Result<Option<Vec<f64>>> {
        let mut out = vec![
            0f64;
            if self.gloo.rank == root {
                values.len() * self.gloo.size
            } else {
                0
            }
        ];
        // SAFETY: `values` and `out` are valid for the lengths the shim reads and writes
        // (`out` only on the root); the handle is live.
        let code = unsafe {
            gfn_gloo_gather_f64(
                self.gloo.handle,
                values.as_ptr(),
                values.len(),
                out.as_mut_ptr(),
                root as c_int,
            )
        };
        check("gather", code)?;
        Ok((self.gloo.rank == root).then_some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::Rendezvous;
    use std::thread;
    use std::time::Instant;

    /// `size` ranks on threads of this process, met at the job's rendezvous (joined before the
    /// pairs open their ports, as `world` does), each running
    /// `body` on its connected communicator (meeting in shared windows with `shared_memory`).
    fn on_ranks<T: Send + 'static>(
        size: usize,
        shared_memory: bool,
        timeout: Duration,
        body: impl Fn(GlooCommunicator) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        // Below the ephemeral range: the gloo pairs of tests running beside cannot take it.
        let port = crate::rendezvous::free_port_pair().unwrap();
        let ranks: Vec<_> = (0..size)
            .map(|rank| {
                thread::spawn(move || {
                    let rendezvous =
                        Rendezvous::join("127.0.0.1", port, rank, size, timeout).unwrap();
                    let master = Some(("127.0.0.1", port));
                    let pairs = GlooPairs::create(rank, size, rank, master, timeout).unwrap();
                    let all = rendezvous.all_gather(pairs.addresses()).unwrap();
                    body(pairs.connect(&all, shared_memory).unwrap())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    }

    #[test]
    fn collectives_of_three_ranks_give_exact_results_on_every_rank() {
        for shared_memory in [false, true] {
            three_ranks_exact(shared_memory);
        }
    }

    fn three_ranks_exact(shared_memory: bool) {
        let results = on_ranks(
            3,
            shared_memory,
            Duration::from_secs(20),
            move |mut comm| {
                assert_eq!(comm.shards(), shared_memory);
                let rank = comm.rank();
                // Whole numbers below 2^24: every order of summation is exact.
                let values: Vec<f32> = (0..150_001)
                    .map(|i| ((i % 1000) * (rank + 1)) as f32)
                    .collect();
                let mut sum = Tensor::from_slice(&values);
                comm.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
                let mut average = Tensor::from_slice(&[4.0f32 * (rank as f32 + 1.0)]);
                comm.all_reduce(&mut average, ReduceOp::Average).unwrap();
                let mut broadcast = Tensor::from_slice(&[rank as f32; 5]);
                comm.broadcast(&mut broadcast, 1).unwrap();
                let gathered = comm.gather(&[rank as f64, 10.0 + rank as f64], 2).unwrap();
                comm.barrier().unwrap();
                // More lengths than windows are kept: each is made again when it comes back.
                for len in (1..=6).chain(1..=6).map(|k| 7 * k) {
                    let mut t = Tensor::from_slice(&vec![rank as f32 + 1.0; len]);
                    comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                    assert_eq!(
                        Vec::<f32>::try_from(t).unwrap(),
                        vec![6.0; len],
                        "{len} values"
                    );
                }
                (
                    rank,
                    Vec::<f32>::try_from(sum).unwrap(),
                    average.double_value(&[0]),
                    Vec::<f32>::try_from(broadcast).unwrap(),
                    gathered,
                )
            },
        );
        for (rank, sum, average, broadcast, gathered) in results {
            for (i, s) in sum.iter().enumerate() {
                assert_eq!(*s, ((i % 1000) * 6) as f32, "rank {rank}, element {i}");
            }
            assert_eq!(average, 8.0);
            assert_eq!(broadcast, vec![1.0; 5]);
            match rank {
                2 => assert_eq!(gathered, Some(vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0])),
                _ => assert_eq!(gathered, None),
            }
        }
    }

    #[test]
    fn a_peer_that_leaves_or_never_comes_is_an_error_not_a_hang() {
        let results = on_ranks(2, false, Duration::from_secs(2), |mut comm| {
            // Connecting is not a barrier: leaving before one could fail the peer's connect.
            comm.barrier().unwrap();
            if comm.rank() == 1 {
                drop(comm);
                return None;
            }
            let start = Instant::now();
            let err = comm
                .all_reduce(&mut Tensor::from_slice(&[1.0f32; 8]), ReduceOp::Sum)
                .unwrap_err();
            Some((err.to_string(), start.elapsed()))
        });
        let (err, waited) = results[0].clone().unwrap();
        assert!(err.contains("gloo") && err.contains("all-reduce"), "{err}");
        assert!(waited < Duration::from_secs(10), "waited {waited:?}");

        let results = on_ranks(2, false, Duration::from_secs(1), |mut comm| {
            if comm.rank() == 1 {
                thread::sleep(Duration::from_secs(3));
                return None;
            }
            let start = Instant::now();
            let err = comm.barrier().unwrap_err();
            Some((err.to_string(), start.elapsed()))
        });
        let (err, waited) = results[0].clone().unwrap();
        assert!(err.contains("barrier"), "{err}");
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    }

    #[test]
    fn each_peer_announces_one_address_per_other_rank() {
        // Rank 2 of 4 announces its pairs for ranks 0, 1 and 3.
        let announced: Vec<u8> = [[0u8; 3], [1; 3], [3; 3]].concat();
        assert_eq!(own_address(&announced, 0, 2, 4), Some(&[0u8; 3][..]));
        assert_eq!(own_address(&announced, 1, 2, 4), Some(&[1u8; 3][..]));
        assert_eq!(own_address(&announced, 3, 2, 4), Some(&[3u8; 3][..]));
        assert_eq!(own_address(&announced[..8], 0, 2, 4), None);
        assert_eq!(own_address(&[], 0, 1, 2), None);
    }
}
