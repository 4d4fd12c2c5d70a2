//! Which rank am I? Read from the variables that launchers set, in this order of precedence:
//! torchrun-style (`RANK`, `WORLD_SIZE`, ...), MPI (Open MPI, PMI, PMIx, MVAPICH), Slurm. None of
//! them: a single rank.

use crate::hostlist::expand_hostlist;
use crate::DdpError;

/// Port of the rendezvous when the launcher gives a host but no port (Slurm).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Single,
    /// torchrun or anything else that sets RANK / WORLD_SIZE / MASTER_ADDR.
    Torchrun,
    /// mpirun/mpiexec or `srun --mpi=pmix` (MPI variables present).
    Mpi,
    /// srun without an MPI plugin: only Slurm variables.
    Slurm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: Option<usize>,
    /// Where rank 0 serves the rendezvous: MASTER_ADDR:MASTER_PORT, or the first Slurm host.
    pub master: Option<(String, u16)>,
    /// Tasks that Slurm says this step started, to catch `srun` without `--mpi=pmix`.
    pub slurm_tasks: Option<usize>,
}

impl RankInfo {
    pub fn single() -> Self {
        RankInfo {
            launcher: Launcher::Single,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: Some(1),
            master: None,
            slurm_tasks: None,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, DdpError> {
        Self::detect(|name| std::env::var(name).ok())
    }

    /// Reads variables through `var` (the environment, or a map in tests).
    pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Self, DdpError> {
        let number = |name: &'static str| -> Result<Option<usize>, DdpError> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| DdpError::InvalidEnv {
                        var: name,
                        value: v,
                        reason: "not a non-negative integer".into(),
                    }),
            }
        };
        let first_number = |names: &[&'static str]| -> Result<Option<usize>, DdpError> {
            for &name in names {
                if let Some(v) = number(name)? {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        };
        let slurm_tasks = first_number(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"])?;
        let slurm_master = || -> Result<Option<(String, u16)>, DdpError> {
            let Some(list) = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_NODELIST")) else {
                return Ok(None);
            };
            let host = expand_hostlist(&list)?.remove(0);
            Ok(Some((
                host,
                master_port(&var)?.unwrap_or(DEFAULT_MASTER_PORT),
            )))
        };

        let info = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            let rank = number("RANK")?.ok_or(DdpError::MissingEnv {
                var: "RANK",
                context: "WORLD_SIZE is set (torchrun-style launch)",
            })?;
            let world_size = number("WORLD_SIZE")?.ok_or(DdpError::MissingEnv {
                var: "WORLD_SIZE",
                context: "RANK is set (torchrun-style launch)",
            })?;
            let master = if world_size > 1 {
                let addr =
                    var("MASTER_ADDR")
                        .filter(|a| !a.trim().is_empty())
                        .ok_or(DdpError::MissingEnv {
                        var: "MASTER_ADDR",
                        context:
                            "a torchrun-style launch with WORLD_SIZE > 1 needs the rendezvous host",
                    })?;
                let port = master_port(&var)?.ok_or(DdpError::MissingEnv {
                    var: "MASTER_PORT",
                    context:
                        "a torchrun-style launch with WORLD_SIZE > 1 needs the rendezvous port",
                })?;
                Some((addr.trim().to_string(), port))
            } else {
                None
            };
            RankInfo {
                launcher: Launcher::Torchrun,
                rank,
                world_size,
                local_rank: number("LOCAL_RANK")?.unwrap_or(0),
                local_world_size: number("LOCAL_WORLD_SIZE")?,
                master,
                slurm_tasks,
            }
        } else if let Some((rank_var, size_var, local_var, local_size_var)) = [
            (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            (
                "MV2_COMM_WORLD_RANK",
                "MV2_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_SIZE",
            ),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
            (
                "PMIX_RANK",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ),
        ]
        .into_iter()
        .find(|(rank_var, ..)| var(rank_var).is_some())
        {
            let rank = number(rank_var)?.expect("present");
            let world_size = number(size_var)?.ok_or(DdpError::MissingEnv {
                var: size_var,
                context: "needed with the MPI rank variable",
            })?;
            RankInfo {
                launcher: Launcher::Mpi,
                rank,
                world_size,
                local_rank: number(local_var)?.unwrap_or(0),
                local_world_size: number(local_size_var)?,
                master: slurm_master()?,
                slurm_tasks,
            }
        } else if let Some(rank) = number("SLURM_PROCID")? {
            let world_size = slurm_tasks.ok_or(DdpError::MissingEnv {
                var: "SLURM_NTASKS",
                context: "SLURM_PROCID is set",
            })?;
            RankInfo {
                launcher: Launcher::Slurm,
                rank,
                world_size,
                local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: number("SLURM_NTASKS_PER_NODE")?,
                master: slurm_master()?,
                slurm_tasks,
            }
        } else {
            RankInfo::single()
        };
        info.validate()?;
        Ok(info)
    }

    fn validate(&self) -> Result<(), DdpError> {
        let names = match self.launcher {
            Launcher::Torchrun => ("RANK", "WORLD_SIZE"),
            Launcher::Mpi => ("MPI rank", "MPI world size"),
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS"),
            Launcher::Single => return Ok(()),
        };
        if self.world_size == 0 {
            return Err(DdpError::InvalidEnv {
                var: names.1,
                value: "0".into(),
                reason: "the world needs at least one rank".into(),
            });
        }
        if self.rank >= self.world_size {
            return Err(DdpError::InvalidEnv {
                var: names.0,
                value: self.rank.to_string(),
                reason: format!("must be below {} = {}", names.1, self.world_size),
            });
        }
        if let Some(local) = self.local_world_size {
            if self.local_rank >= local {
                return Err(DdpError::InvalidEnv {
                    var: "LOCAL_RANK",
                    value: self.local_rank.to_string(),
                    reason: format!("must be below the local world size {local}"),
                });
            }
        }
        Ok(())
    }
}

fn master_port(var: &impl Fn(&str) -> Option<String>) -> Result<Option<u16>, DdpError> {
    match var("MASTER_PORT") {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .map(Some)
            .ok_or(DdpError::InvalidEnv {
                var: "MASTER_PORT",
                value: v,
                reason: "not a port number (1-65535)".into(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)]) -> Result<RankInfo, DdpError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankInfo::detect(|name| map.get(name).cloned())
    }

    #[test]
    fn no_variables_is_a_single_rank() {
        assert_eq!(detect(&[]).unwrap(), RankInfo::single());
    }

    #[test]
    fn torchrun_variables() {
        let info = detect(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (info.launcher, info.rank, info.world_size, info.local_rank),
            (Launcher::Torchrun, 3, 4, 1)
        );
        assert_eq!(info.master, Some(("node7".to_string(), 29400)));
        // One rank needs no rendezvous.
        let info = detect(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!((info.world_size, info.master), (1, None));
    }

    #[test]
    fn torchrun_takes_precedence_over_mpi_and_slurm() {
        let info = detect(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap();
        assert_eq!((info.launcher, info.rank), (Launcher::Torchrun, 1));
    }

    #[test]
    fn open_mpi_pmi_mvapich_and_pmix_variables() {
        let info = detect(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ])
        .unwrap();
        assert_eq!(
            (
                info.launcher,
                info.rank,
                info.world_size,
                info.local_rank,
                info.local_world_size
            ),
            (Launcher::Mpi, 1, 3, 1, Some(3))
        );
        let info = detect(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]).unwrap();
        assert_eq!((info.rank, info.world_size), (2, 4));
        let info = detect(&[
            ("MV2_COMM_WORLD_RANK", "0"),
            ("MV2_COMM_WORLD_SIZE", "2"),
            ("MV2_COMM_WORLD_LOCAL_RANK", "0"),
        ])
        .unwrap();
        assert_eq!((info.rank, info.world_size), (0, 2));
        // srun --mpi=pmix: PMIx rank, size and hosts from Slurm.
        let info = detect(&[
            ("PMIX_RANK", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODELIST", "gpu[01-02]"),
        ])
        .unwrap();
        assert_eq!(
            (info.launcher, info.rank, info.world_size, info.local_rank),
            (Launcher::Mpi, 1, 2, 1)
        );
        assert_eq!(
            info.master,
            Some(("gpu01".to_string(), DEFAULT_MASTER_PORT))
        );
    }

    #[test]
    fn slurm_variables_and_the_first_host_as_master() {
        let info = detect(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NODELIST", "gpu[01-04,07],cpu3"),
            ("SLURM_NODELIST", "other"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap();
        assert_eq!(
            (info.launcher, info.rank, info.world_size, info.local_rank),
            (Launcher::Slurm, 5, 8, 1)
        );
        assert_eq!(info.master, Some(("gpu01".to_string(), 12345)));
        assert_eq!(info.slurm_tasks, Some(8));
        let info = detect(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ])
        .unwrap();
        assert_eq!(
            info.world_size, 1,
            "the step's task count wins over the job's"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("RANK", "2"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "RANK",
            ),
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "0")], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "2")], "RANK"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "MASTER_ADDR",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")],
                "MASTER_PORT",
            ),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (&[("OMPI_COMM_WORLD_RANK", "0")], "OMPI_COMM_WORLD_SIZE"),
            (
                &[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "2")],
                "MPI rank",
            ),
            (&[("SLURM_PROCID", "0")], "SLURM_NTASKS"),
            (
                &[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "2")],
                "SLURM_PROCID",
            ),
            (
                &[
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_NODELIST", "gpu[1-"),
                ],
                "SLURM_NODELIST",
            ),
        ];
        for (vars, name) in cases {
            let err = detect(vars).unwrap_err().to_string();
            assert!(err.contains(name), "{vars:?}: {err}");
        }
    }
}
