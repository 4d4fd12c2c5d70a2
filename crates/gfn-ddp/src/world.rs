//! Joining the job: detect the launcher, meet every rank (exchanging a few bytes each: the NCCL
//! id, the job token, the replay-buffer servers' addresses), choose a backend, and build the
//! training ranks' communicator. With `buffer_ranks = N` the last N ranks of the job serve a
//! replay buffer and stay out of the training communicator.

use crate::comm::{Communicator, LocalCommunicator, WithDeadline};
use crate::launch_env::{Launcher, RankInfo};
use crate::rendezvous::Rendezvous;
use crate::watchdog::{Abort, CollectiveDeadline};
use crate::{DdpError, Result};
use std::time::Duration;
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `local` for a single training rank; else NCCL when CUDA is available, gloo under a
    /// torchrun-style launch, MPI otherwise.
    Auto,
    Nccl,
    Mpi,
    Gloo,
    Local,
}

impl Backend {
    /// What `Auto` means for one training rank (`single`), on GPUs (`cuda`) or CPUs, under
    /// `launcher`; any other choice stands.
    fn resolve(self, single: bool, cuda: bool, launcher: Launcher) -> Backend {
        match self {
            Backend::Auto if single => Backend::Local,
            Backend::Auto if cuda => Backend::Nccl,
            Backend::Auto if launcher == Launcher::Torchrun => Backend::Gloo,
            Backend::Auto => Backend::Mpi,
            chosen => chosen,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DdpError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "nccl" => Ok(Backend::Nccl),
            "mpi" => Ok(Backend::Mpi),
            "gloo" => Ok(Backend::Gloo),
            "local" => Ok(Backend::Local),
            other => Err(DdpError::Launch(format!(
                "invalid --backend {other:?}: expected auto, nccl, mpi, gloo or local"
            ))),
        }
    }
}

/// Where a rank sits in the job: ranks `0..trainers` train, the rest serve replay buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world_size: usize,
    pub trainers: usize,
}

impl Placement {
    pub fn new(rank: usize, world_size: usize, buffer_ranks: usize) -> Result<Self> {
        if buffer_ranks >= world_size {
            return Err(DdpError::Launch(format!(
                "--num-remote-buffers {buffer_ranks} leaves no training rank in a job of {world_size} rank(s): start at least {} ranks",
                buffer_ranks + 1
            )));
        }
        Ok(Placement {
            rank,
            world_size,
            trainers: world_size - buffer_ranks,
        })
    }

    pub fn is_trainer(&self) -> bool {
        self.rank < self.trainers
    }

    pub fn buffer_ranks(&self) -> usize {
        self.world_size - self.trainers
    }

    /// The buffer rank that serves training rank `trainer` (round robin), if there are any.
    pub fn buffer_of(&self, trainer: usize) -> Option<usize> {
        (self.buffer_ranks() > 0).then(|| self.trainers + trainer % self.buffer_ranks())
    }

    /// The training ranks that buffer rank `buffer` serves.
    pub fn trainers_of(&self, buffer: usize) -> Vec<usize> {
        (0..self.trainers)
            .filter(|&t| self.buffer_of(t) == Some(buffer))
            .collect()
    }
}

/// How to join the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinOptions {
    pub backend: Backend,
    /// Bounds every wait for other ranks (start-up, rendezvous, the NCCL communicator).
    pub timeout: Duration,
    /// The last `buffer_ranks` ranks serve replay buffers instead of training.
    pub buffer_ranks: usize,
    /// MPI or gloo backend, every training rank on this node: collectives through a
    /// shared-memory window (see [`crate::backends::shared_memory`]) and the optimizer step
    /// shared out across the ranks. Otherwise `MPI_Allreduce` or gloo's all-reduce and the
    /// whole step on every rank.
    pub shared_memory: bool,
    /// The ranks train on GPUs: `Backend::Auto` then means NCCL.
    pub cuda: bool,
}

impl JoinOptions {
    /// Training ranks only, shared memory where it applies, GPUs where there are any, and a
    /// 5-minute timeout.
    pub fn new(backend: Backend) -> Self {
        JoinOptions {
            backend,
            timeout: Duration::from_secs(300),
            buffer_ranks: 0,
            shared_memory: true,
            cuda: tch::Cuda::is_available(),
        }
    }
}

/// This process's place in the job and, on training ranks, their communicator.
pub struct World {
    pub info: RankInfo,
    pub placement: Placement,
    /// What every rank announced when joining, indexed by rank in the whole job.
    pub announcements: Vec<Vec<u8>>,
    /// Among the training ranks; a buffer rank gets a communicator of itself alone.
    pub comm: Box<dyn Communicator>,
    /// The device this rank trains on when the backend fixes it (NCCL: its local GPU).
    pub device: Option<Device>,
    /// False once a rank of the job has died: MPI_Finalize would wait for it forever.
    finalize: bool,
    /// A rank of the job stopped answering without dying ([`World::peer_unresponsive`]).
    unresponsive_peer: bool,
    // Dropped last: MPI is finalised after the communicators built on it.
    #[cfg(feature = "mpi")]
    _mpi: Option<crate::backends::mpi::MpiWorld>,
}

/// What each rank sends ahead of its announcement at start-up: rank 0 the NCCL unique id when
/// NCCL trains more than one rank, every training rank its gloo pairs' addresses under gloo.
#[derive(Debug, Clone, PartialEq, Default)]
struct Header {
    nccl_id: Option<Vec<u8>>,
    gloo: Vec<u8>,
}

const NO_NCCL_ID: u8 = 0;
const WITH_NCCL_ID: u8 = 1;

impl Header {
    /// `[0]` or `[1, id]`, then the gloo addresses' length (u32, little-endian) and bytes,
    /// then the announcement.
    fn encode(&self, announcement: Vec<u8>) -> Vec<u8> {
        let mut out = match &self.nccl_id {
            Some(id) => [&[WITH_NCCL_ID][..], id].concat(),
            None => vec![NO_NCCL_ID],
        };
        out.extend((self.gloo.len() as u32).to_le_bytes());
        out.extend(&self.gloo);
        out.extend(announcement);
        out
    }

    fn decode(bytes: &[u8]) -> Option<(Header, Vec<u8>)> {
        let (&flag, rest) = bytes.split_first()?;
        let (nccl_id, rest) = match flag {
            NO_NCCL_ID => (None, rest),
            WITH_NCCL_ID => {
                let (id, rest) = rest.split_at_checked(NCCL_ID_BYTES)?;
                (Some(id.to_vec()), rest)
            }
            _ => return None,
        };
        let (len, rest) = rest.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (gloo, announcement) = rest.split_at_checked(len)?;
        let header = Header {
            nccl_id,
            gloo: gloo.to_vec(),
        };
        Some((header, announcement.to_vec()))
    }
}

impl World {
    /// Rank among the training ranks.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    /// Number of training ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    pub fn is_root(&self) -> bool {
        self.placement.is_trainer() && self.rank() == 0
    }

    /// Records that a rank of the job (e.g. a replay-buffer rank) died: this process then
    /// leaves without MPI_Finalize, which would wait for the dead rank.
    pub fn peer_died(&mut self) {
        self.finalize = false;
    }

    /// Records that a rank of the job stopped answering without dying (e.g. a stopped
    /// buffer rank): the launcher would wait for it forever, so the job must be ended
    /// ([`World::end_job`]) once this rank's work is saved.
    pub fn peer_unresponsive(&mut self) {
        self.finalize = false;
        self.unresponsive_peer = true;
    }

    pub fn has_unresponsive_peer(&self) -> bool {
        self.unresponsive_peer
    }

    /// Ends every process of the job with `code` (MPI_Abort under MPI, which ends stopped
    /// processes too; elsewhere this process exits and its launcher ends the rest).
    pub fn end_job(&self, code: i32) -> ! {
        self.abort()(code);
        unreachable!("ending the job returned")
    }

    /// How to end the whole job: MPI_Abort wherever MPI is running (whatever carries the
    /// gradients), else exiting.
    fn abort(&self) -> Abort {
        #[cfg(feature = "mpi")]
        if self._mpi.is_some() {
            return crate::backends::mpi::abort_job;
        }
        exit_now
    }

    /// A single rank without any launcher.
    pub fn single() -> Self {
        World {
            info: RankInfo::single(),
            placement: Placement {
                rank: 0,
                world_size: 1,
                trainers: 1,
            },
            announcements: Vec::new(),
            comm: Box::new(LocalCommunicator),
            device: None,
            finalize: true,
            unresponsive_peer: false,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    /// Joins the job described by the environment. `announce` gives this rank's bytes for
    /// [`World::announcements`] once its placement is known (a buffer rank binds its server
    /// first and announces the address).
    pub fn join(
        options: JoinOptions,
        announce: impl FnOnce(&Placement) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let JoinOptions {
            backend,
            timeout,
            buffer_ranks,
            cuda,
            ..
        } = options;
        let info = RankInfo::from_env()?;
        let placement = Placement::new(info.rank, info.world_size, buffer_ranks)?;
        let alone = info.world_size == 1 && info.slurm_tasks.is_none_or(|n| n <= 1);
        let backend = backend.resolve(alone || placement.trainers == 1, cuda, info.launcher);
        // Slurm variables without any MPI ones: srun ran without an MPI plugin, so every task
        // would start as an MPI world of one (or Open MPI would abort in MPI_Init).
        if info.launcher == Launcher::Slurm && info.world_size > 1 && backend == Backend::Mpi {
            return Err(DdpError::Launch(format!(
                "srun started {} tasks without MPI support, so MPI would see each as alone: launch with `srun --mpi=pmix ...` (or mpirun)",
                info.world_size
            )));
        }
        if backend == Backend::Nccl && !cuda {
            return Err(DdpError::Launch(
                "--backend nccl needs GPUs, and this run is on CPUs (no CUDA here, or --device cpu): use --backend gloo or mpi"
                    .into(),
            ));
        }
        let nccl_id_needed = backend == Backend::Nccl && placement.trainers > 1;
        let gloo_needed = backend == Backend::Gloo && placement.trainers > 1;
        let over_mpi =
            info.launcher == Launcher::Mpi || (backend == Backend::Mpi && info.world_size == 1);
        // Joined before the gloo pairs open their ports (see rendezvous::Rendezvous).
        let rendezvous = match !over_mpi && info.world_size > 1 {
            true => Some(tcp_rendezvous(&info, timeout)?),
            false => None,
        };
        let gloo_pairs = match gloo_needed && placement.is_trainer() {
            true => Some(gloo_pairs(&info, placement.trainers, timeout)?),
            false => None,
        };
        let header = Header {
            nccl_id: (nccl_id_needed && info.rank == 0)
                .then(nccl_unique_id)
                .transpose()?,
            gloo: gloo_pairs.as_ref().map(gloo_addresses).unwrap_or_default(),
        };
        let own = header.encode(announce(&placement)?);

        #[cfg(feature = "mpi")]
        let mut mpi = None;
        let with_header = if over_mpi {
            #[cfg(feature = "mpi")]
            {
                let world = crate::backends::mpi::MpiWorld::init(timeout)?;
                if world.size() != info.world_size && info.launcher != Launcher::Single {
                    return Err(DdpError::Launch(format!(
                        "the launcher says {} ranks but MPI sees {}: on CPUs start ranks with mpirun or `srun --mpi=pmix`",
                        info.world_size,
                        world.size()
                    )));
                }
                let all = {
                    let _watchdog = crate::watchdog::Watchdog::arm(
                        "every rank to join the start-up exchange (MPI all-gather)",
                        timeout,
                    );
                    world.all_gather_bytes(&own)
                };
                mpi = Some(world);
                all
            }
            #[cfg(not(feature = "mpi"))]
            return Err(DdpError::Launch(
                "this build has no MPI backend (cargo feature `mpi`)".into(),
            ));
        } else if let Some(rendezvous) = rendezvous {
            rendezvous.all_gather(own)?
        } else {
            vec![own]
        };
        let (headers, announcements): (Vec<Header>, Vec<Vec<u8>>) = with_header
            .iter()
            .enumerate()
            .map(|(rank, bytes)| {
                Header::decode(bytes).ok_or_else(|| {
                    DdpError::Launch(format!(
                        "rank {rank} sent a malformed start-up announcement ({} bytes)",
                        bytes.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let nccl_id = headers[0].nccl_id.clone();

        // Every rank of an MPI job takes part in forming the training communicator.
        #[cfg(feature = "mpi")]
        let mpi_training = mpi
            .as_ref()
            .and_then(|m| m.communicator(placement.trainers, options.shared_memory));
        let mut world = World {
            info,
            placement,
            announcements,
            comm: Box::new(LocalCommunicator),
            device: None,
            finalize: true,
            unresponsive_peer: false,
            #[cfg(feature = "mpi")]
            _mpi: None,
        };
        if !placement.is_trainer() {
            #[cfg(feature = "mpi")]
            {
                world._mpi = mpi;
            }
            return Ok(world);
        }
        match backend {
            Backend::Local | Backend::Auto => {
                if placement.trainers > 1 {
                    return Err(DdpError::Launch(format!(
                        "--backend local runs a single training rank, but the launcher started {}",
                        placement.trainers
                    )));
                }
            }
            Backend::Mpi => {
                #[cfg(feature = "mpi")]
                match mpi_training {
                    Some(comm) => world.comm = Box::new(comm),
                    None if placement.trainers == 1 => {}
                    None => {
                        return Err(DdpError::Launch(format!(
                            "the launcher says {} ranks but MPI sees 1: start MPI ranks with mpirun or `srun --mpi=pmix`; torchrun-style launches use --backend gloo on CPUs (nccl on GPUs)",
                            world.info.world_size
                        )))
                    }
                }
                #[cfg(not(feature = "mpi"))]
                return Err(DdpError::Launch(
                    "this build has no MPI backend (cargo feature `mpi`)".into(),
                ));
            }
            Backend::Gloo => {
                if let Some(pairs) = gloo_pairs {
                    let addresses: Vec<Vec<u8>> = headers[..placement.trainers]
                        .iter()
                        .map(|h| h.gloo.clone())
                        .collect();
                    world.comm = gloo_connect(pairs, &addresses, options.shared_memory)?;
                }
            }
            Backend::Nccl => {
                let id = match nccl_id {
                    Some(id) => id,
                    None => nccl_unique_id()?,
                };
                let (comm, device) = nccl_communicator(&id, &world, timeout)?;
                world.comm = comm;
                world.device = Some(device);
            }
        }
        #[cfg(feature = "mpi")]
        {
            world._mpi = mpi;
        }
        if world.comm.world_size() > 1 {
            let deadline = CollectiveDeadline::start(world.rank(), timeout, world.abort());
            let comm = std::mem::replace(&mut world.comm, Box::new(LocalCommunicator));
            world.comm = Box::new(WithDeadline::new(comm, deadline));
        }
        Ok(world)
    }
}

/// Ends this process at once (its launcher then ends the other ranks).
fn exit_now(code: i32) {
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}

impl Drop for World {
    fn drop(&mut self) {
        #[cfg(feature = "mpi")]
        if !self.finalize {
            std::mem::forget(self._mpi.take());
        }
    }
}

#[cfg(feature = "nccl")]
const NCCL_ID_BYTES: usize = crate::backends::nccl::UNIQUE_ID_BYTES;
#[cfg(not(feature = "nccl"))]
const NCCL_ID_BYTES: usize = 128;

#[cfg(feature = "nccl")]
fn nccl_unique_id() -> Result<Vec<u8>> {
    crate::backends::nccl::new_unique_id()
}

#[cfg(not(feature = "nccl"))]
fn nccl_unique_id() -> Result<Vec<u8>> {
    Err(DdpError::Launch(
        "this build has no NCCL backend (cargo feature `nccl`)".into(),
    ))
}

#[cfg(feature = "gloo")]
type GlooPairs = crate::backends::gloo::GlooPairs;
/// Without gloo there are no pairs: `gloo_pairs` always fails, and what takes them cannot run.
#[cfg(not(feature = "gloo"))]
type GlooPairs = std::convert::Infallible;

/// This training rank's gloo pairs, created before the start-up exchange that announces them.
#[cfg(feature = "gloo")]
fn gloo_pairs(info: &RankInfo, trainers: usize, timeout: Duration) -> Result<GlooPairs> {
    let master = info
        .master
        .as_ref()
        .map(|(host, port)| (host.as_str(), *port));
    GlooPairs::create(info.rank, trainers, info.local_rank, master, timeout)
}

#[cfg(not(feature = "gloo"))]
fn gloo_pairs(_: &RankInfo, _: usize, _: Duration) -> Result<GlooPairs> {
    Err(DdpError::Launch(
        "this build has no gloo backend (cargo feature `gloo`)".into(),
    ))
}

#[cfg(feature = "gloo")]
fn gloo_addresses(pairs: &GlooPairs) -> Vec<u8> {
    pairs.addresses()
}

#[cfg(not(feature = "gloo"))]
fn gloo_addresses(pairs: &GlooPairs) -> Vec<u8> {
    match *pairs {}
}

#[cfg(feature = "gloo")]
fn gloo_connect(
    pairs: GlooPairs,
    addresses: &[Vec<u8>],
    shared_memory: bool,
) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(pairs.connect(addresses, shared_memory)?))
}

#[cfg(not(feature = "gloo"))]
fn gloo_connect(pairs: GlooPairs, _: &[Vec<u8>], _: bool) -> Result<Box<dyn Communicator>> {
    match pairs {}
}

/// One GPU per local rank, training ranks only.
#[cfg(feature = "nccl")]
fn nccl_communicator(
    id: &[u8],
    world: &World,
    timeout: Duration,
) -> Result<(Box<dyn Communicator>, Device)> {
    let local = world.info.local_rank;
    let _watchdog =
        crate::watchdog::Watchdog::arm("every rank to join the NCCL communicator", timeout);
    let comm = crate::backends::nccl::NcclCommunicator::new(
        id,
        world.placement.rank,
        world.placement.trainers,
        local,
    )?;
    Ok((Box::new(comm), Device::Cuda(local)))
}

#[cfg(not(feature = "nccl"))]
fn nccl_communicator(_: &[u8], _: &World, _: Duration) -> Result<(Box<dyn Communicator>, Device)> {
    Err(DdpError::Launch(
        "this build has no NCCL backend (cargo feature `nccl`)".into(),
    ))
}

/// Without MPI, every rank meets at a TCP rendezvous served by rank 0, so that a rank that never
/// arrives is reported by name before any backend blocks.
fn tcp_rendezvous(info: &RankInfo, timeout: Duration) -> Result<Rendezvous> {
    let (host, port) = info.master.clone().ok_or_else(|| {
        DdpError::Launch("several ranks without MPI need MASTER_ADDR and MASTER_PORT".into())
    })?;
    let port = crate::rendezvous::rendezvous_port(port, std::env::var("GFN_RENDEZVOUS_PORT").ok())?;
    Rendezvous::join(&host, port, info.rank, info.world_size, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_nccl_on_gpus_gloo_under_torchrun_on_cpus_and_mpi_otherwise() {
        use Launcher::*;
        let auto = |single, cuda, launcher| Backend::Auto.resolve(single, cuda, launcher);
        for launcher in [Single, Torchrun, Mpi, Slurm] {
            assert_eq!(auto(true, true, launcher), Backend::Local);
            assert_eq!(auto(false, true, launcher), Backend::Nccl);
        }
        assert_eq!(auto(false, false, Torchrun), Backend::Gloo);
        assert_eq!(auto(false, false, Mpi), Backend::Mpi);
        assert_eq!(auto(false, false, Slurm), Backend::Mpi);
        assert_eq!(Backend::Mpi.resolve(false, false, Torchrun), Backend::Mpi);
        assert_eq!(Backend::Gloo.resolve(true, true, Mpi), Backend::Gloo);
    }

    #[test]
    fn start_up_headers_round_trip_and_malformed_ones_are_refused() {
        let headers = [
            Header::default(),
            Header {
                nccl_id: Some(vec![7; NCCL_ID_BYTES]),
                gloo: vec![1, 2, 3],
            },
        ];
        for header in headers {
            let bytes = header.encode(b"announced".to_vec());
            assert_eq!(
                Header::decode(&bytes),
                Some((header.clone(), b"announced".to_vec()))
            );
            for cut in 0..bytes.len() - b"announced".len() {
                assert_eq!(Header::decode(&bytes[..cut]), None, "cut at {cut}");
            }
        }
        assert_eq!(Header::decode(&[9, 0, 0, 0, 0]), None);
    }

    #[test]
    fn buffer_ranks_are_the_last_and_served_round_robin() {
        let p = Placement::new(1, 5, 2).unwrap();
        assert_eq!(p.trainers, 3);
        assert!(p.is_trainer());
        assert!(!Placement::new(3, 5, 2).unwrap().is_trainer());
        assert_eq!(
            (0..3).map(|t| p.buffer_of(t).unwrap()).collect::<Vec<_>>(),
            vec![3, 4, 3]
        );
        assert_eq!(p.trainers_of(3), vec![0, 2]);
        assert_eq!(p.trainers_of(4), vec![1]);
        assert_eq!(Placement::new(0, 2, 0).unwrap().buffer_of(0), None);
        let err = Placement::new(0, 2, 2).unwrap_err().to_string();
        assert!(
            err.contains("--num-remote-buffers 2") && err.contains("at least 3"),
            "{err}"
        );
    }
}
