//! Joining the job: detect the launcher, choose a backend, and build the training ranks'
//! communicator.

use crate::comm::{Communicator, LocalCommunicator};
use crate::launch_env::{Launcher, RankInfo};
use crate::{DdpError, Result};
use std::time::Duration;
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NCCL when CUDA is available, MPI otherwise; `local` for a single rank.
    Auto,
    Nccl,
    Mpi,
    Local,
}

impl std::str::FromStr for Backend {
    type Err = DdpError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "nccl" => Ok(Backend::Nccl),
            "mpi" => Ok(Backend::Mpi),
            "local" => Ok(Backend::Local),
            other => Err(DdpError::Launch(format!(
                "invalid --backend {other:?}: expected auto, nccl, mpi or local"
            ))),
        }
    }
}

/// This process's place in the job and its communicator.
pub struct World {
    pub info: RankInfo,
    pub comm: Box<dyn Communicator>,
    /// The device this rank trains on when the backend fixes it (NCCL: its local GPU).
    pub device: Option<Device>,
    // Dropped last: MPI is finalised after the communicators built on it.
    #[cfg(feature = "mpi")]
    _mpi: Option<crate::backends::mpi::MpiWorld>,
}

impl World {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// A single rank without any launcher.
    pub fn single() -> Self {
        World {
            info: RankInfo::single(),
            comm: Box::new(LocalCommunicator),
            device: None,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    /// Joins the job described by the environment. `timeout` bounds every wait for other ranks.
    pub fn join(backend: Backend, timeout: Duration) -> Result<Self> {
        let info = RankInfo::from_env()?;
        let cuda = tch::Cuda::is_available();
        let backend = match backend {
            Backend::Auto if info.world_size == 1 && info.slurm_tasks.is_none_or(|n| n <= 1) => {
                Backend::Local
            }
            Backend::Auto if cuda => Backend::Nccl,
            Backend::Auto => Backend::Mpi,
            chosen => chosen,
        };
        match backend {
            Backend::Local | Backend::Auto => {
                if info.world_size > 1 {
                    return Err(DdpError::Launch(format!(
                        "--backend local runs a single rank, but the launcher started {} ranks",
                        info.world_size
                    )));
                }
                Ok(World {
                    info,
                    ..World::single()
                })
            }
            Backend::Mpi => Self::join_mpi(info, timeout),
            Backend::Nccl => Self::join_nccl(info, cuda, timeout),
        }
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(info: RankInfo, timeout: Duration) -> Result<Self> {
        use crate::backends::mpi::MpiWorld;
        if info.launcher == Launcher::Torchrun && info.world_size > 1 {
            torchrun_rendezvous(&info, (info.rank == 0).then(Vec::new), timeout)?;
        }
        // Slurm variables without any MPI ones: srun ran without an MPI plugin, so every task
        // would start as an MPI world of one (or Open MPI would abort in MPI_Init).
        if info.launcher == Launcher::Slurm && info.world_size > 1 {
            return Err(DdpError::Launch(format!(
                "srun started {} tasks without MPI support, so MPI would see each as alone: launch with `srun --mpi=pmix ...` (or mpirun)",
                info.world_size
            )));
        }
        let mpi = MpiWorld::init(timeout)?;
        if mpi.size() != info.world_size && info.launcher != Launcher::Single {
            return Err(DdpError::Launch(format!(
                "the launcher says {} ranks but MPI sees {}: on CPUs start ranks with mpirun or `srun --mpi=pmix`; torchrun-style launches need --backend nccl on GPUs",
                info.world_size,
                mpi.size()
            )));
        }
        let members = mpi.size();
        let comm = mpi.communicator(members).expect("every rank is a member");
        let info = RankInfo {
            rank: mpi.rank(),
            world_size: members,
            ..info
        };
        Ok(World {
            info,
            comm: Box::new(comm),
            device: None,
            _mpi: Some(mpi),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(_: RankInfo, _: Duration) -> Result<Self> {
        Err(DdpError::Launch(
            "this build has no MPI backend (cargo feature `mpi`)".into(),
        ))
    }

    #[cfg(feature = "nccl")]
    fn join_nccl(info: RankInfo, cuda: bool, timeout: Duration) -> Result<Self> {
        use crate::backends::nccl::{check_library, new_unique_id, NcclCommunicator};
        if !cuda {
            return Err(DdpError::Launch(
                "--backend nccl needs CUDA, which is not available here; use --backend mpi on CPUs"
                    .into(),
            ));
        }
        check_library()?;
        #[cfg(feature = "mpi")]
        let mut mpi = None;
        let id = if info.world_size == 1 {
            new_unique_id()?
        } else if info.launcher == Launcher::Mpi {
            #[cfg(feature = "mpi")]
            {
                let world = crate::backends::mpi::MpiWorld::init(timeout)?;
                let mut id = if world.rank() == 0 {
                    new_unique_id()?
                } else {
                    vec![0u8; crate::backends::nccl::UNIQUE_ID_BYTES]
                };
                let _watchdog = crate::watchdog::Watchdog::arm(
                    "the NCCL unique id from rank 0 (MPI broadcast)",
                    timeout,
                );
                world.broadcast_bytes(&mut id);
                mpi = Some(world);
                id
            }
            #[cfg(not(feature = "mpi"))]
            return Err(DdpError::Launch(
                "an MPI launch needs the `mpi` cargo feature to exchange the NCCL id".into(),
            ));
        } else if info.master.is_some() {
            let payload = if info.rank == 0 {
                Some(new_unique_id()?)
            } else {
                None
            };
            torchrun_rendezvous(&info, payload, timeout)?
        } else {
            return Err(DdpError::Launch("several ranks without MPI need MASTER_ADDR and MASTER_PORT for the NCCL rendezvous".into()));
        };
        let local = info.local_rank;
        let comm = {
            let _watchdog =
                crate::watchdog::Watchdog::arm("every rank to join the NCCL communicator", timeout);
            NcclCommunicator::new(&id, info.rank, info.world_size, local)?
        };
        Ok(World {
            info,
            comm: Box::new(comm),
            device: Some(Device::Cuda(local)),
            #[cfg(feature = "mpi")]
            _mpi: mpi,
        })
    }

    #[cfg(not(feature = "nccl"))]
    fn join_nccl(_: RankInfo, _: bool, _: Duration) -> Result<Self> {
        Err(DdpError::Launch(
            "this build has no NCCL backend (cargo feature `nccl`)".into(),
        ))
    }
}

/// Under a torchrun-style launch every rank meets at a TCP rendezvous first, so that a rank that
/// never arrives is reported by name before any backend blocks; rank 0 hands out `payload`.
fn torchrun_rendezvous(
    info: &RankInfo,
    payload: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let (host, port) = info.master.clone().ok_or_else(|| {
        DdpError::Launch("several ranks without MPI need MASTER_ADDR and MASTER_PORT".into())
    })?;
    let port = crate::rendezvous::rendezvous_port(port, std::env::var("GFN_RENDEZVOUS_PORT").ok())?;
    crate::rendezvous::rendezvous(&host, port, info.rank, info.world_size, payload, timeout)
}
