//! The `gfn` binary.

mod bench;
mod config;
mod plot;
mod progress;
mod remote;
mod run;
mod rundir;
mod signals;
mod sweep;
mod tensorboard;
mod wandb;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use config::Config;
use gfn_ddp::launch_env::RankInfo;
use gfn_ddp::world::{JoinOptions, World};
use run::Outcome;
use rundir::OutMode;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gfn",
    version,
    about = "Train GFlowNets on one CPU or GPU (multi-rank: see the README)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (defaults: HyperGrid 4x8, trajectory balance, MLP 2x256, batch 16).
    Train(TrainArgs),
    /// Measure steps/s and trajectories/s over environments, batch sizes and losses.
    Bench(BenchArgs),
    /// Train every config with every seed, then tabulate final metrics (mean ± std over seeds).
    Sweep(SweepArgs),
    /// Draw a run's curves and learned-vs-true distribution as PNG files in its directory.
    Plot {
        /// The run directory (metrics.jsonl, config.toml, checkpoint.pt).
        dir: PathBuf,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// TOML configuration; omitted: the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one field, e.g. --set loss.name=db --set env.preset=easy.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (config, metrics.jsonl, checkpoint, summary.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint (with its saved config).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Delete the run already in --out (its config, checkpoint, metrics, summary, event files
    /// and plots) instead of refusing to train there.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Continue the run in --out when it holds a checkpoint (as --resume would), else start
    /// it: a requeued job (launch/slurm.sbatch) runs the same command line again.
    #[arg(long, requires = "out", conflicts_with_all = ["resume", "overwrite"])]
    auto_resume: bool,
    /// auto, cpu, cuda or cuda:N (same as --set train.device=...).
    #[arg(long)]
    device: Option<String>,
    /// Communicator between rank processes: auto, nccl, mpi, gloo or local (same as --set ddp.backend=...).
    #[arg(long)]
    backend: Option<String>,
    /// The last N ranks serve a shared replay buffer instead of training (same as
    /// --set buffer.num_remote=N).
    #[arg(long, value_name = "N")]
    num_remote_buffers: Option<usize>,
    /// Upload the run to this W&B project at the end (via `wandb sync --sync-tensorboard`).
    #[arg(long, value_name = "NAME")]
    wandb_project: Option<String>,
    #[arg(long, value_name = "NAME")]
    wandb_entity: Option<String>,
    #[arg(long, value_name = "NAME")]
    wandb_run_name: Option<String>,
}

#[derive(Args)]
struct SweepArgs {
    /// Config files (e.g. configs/sweep/*.toml).
    #[arg(long = "config", value_name = "FILE", required = true, num_args = 1..)]
    configs: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Where the runs (CONFIG/seed-N) and sweep.md go.
    #[arg(long, default_value = "runs/sweep")]
    out: PathBuf,
    /// Overrides applied to every run, e.g. --set train.threads=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Exact TV to count trajectories to.
    #[arg(long, default_value_t = 0.1)]
    tv_threshold: f64,
}

#[derive(Args)]
struct BenchArgs {
    /// Environments as NAME[:KEY=VALUE,...], e.g. hypergrid:dim=2,height=64 or bitseq:n=120.
    #[arg(long = "env", value_name = "SPEC", num_args = 1.., default_values_t = ["hypergrid:dim=4,height=8".to_string(), "hypergrid:dim=2,height=64".to_string()])]
    envs: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "16,128")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "tb,db,subtb")]
    losses: Vec<String>,
    /// Untimed steps before measuring each setting.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Measured seconds per setting.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Extra overrides applied to every setting, e.g. --set train.threads=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long)]
    device: Option<String>,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn train(args: TrainArgs) -> Result<()> {
    let mut overrides = args.set;
    if let Some(device) = args.device {
        overrides.push(format!("train.device={device:?}"));
    }
    if let Some(backend) = args.backend {
        overrides.push(format!("ddp.backend={backend:?}"));
    }
    if let Some(n) = args.num_remote_buffers {
        overrides.push(format!("buffer.num_remote={n}"));
    }
    for (key, value) in [
        ("project", &args.wandb_project),
        ("entity", &args.wandb_entity),
        ("run_name", &args.wandb_run_name),
    ] {
        if let Some(value) = value {
            overrides.push(format!("wandb.{key}={value:?}"));
        }
    }
    let stopped_run = args
        .out
        .as_ref()
        .filter(|out| args.auto_resume && out.join(run::CHECKPOINT_FILE).exists());
    if let Some(out) = stopped_run {
        tracing::info!(
            "--auto-resume: continuing the run in {} from its checkpoint",
            out.display()
        );
    }
    let (mut config, out, mode) = match args.resume.or(stopped_run.cloned()) {
        Some(dir) => {
            let path = dir.join(run::CONFIG_FILE);
            if !dir.join(run::CHECKPOINT_FILE).exists() {
                bail!(
                    "--resume {}: no {} there",
                    dir.display(),
                    run::CHECKPOINT_FILE
                );
            }
            (
                Config::from_file(&path)
                    .with_context(|| format!("--resume {}", dir.display()))?
                    .with_overrides(&overrides)?,
                dir,
                OutMode::Resume,
            )
        }
        None => {
            let base = match &args.config {
                Some(path) => Config::from_file(path).context("--config")?,
                None => Config::default(),
            };
            let out = args.out.unwrap_or_else(|| {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                PathBuf::from(format!("runs/run-{secs}"))
            });
            let mode = match args.overwrite {
                true => OutMode::Overwrite,
                false => OutMode::Fresh,
            };
            (base.with_overrides(&overrides)?, out, mode)
        }
    };
    config.train.threads = run::threads_per_rank(config.train.threads);
    config.split_global_batch(config::training_ranks(config.buffer.num_remote))?;
    config.check_job()?;
    let backend = config.backend()?;
    let mut announcer = remote::Announcer {
        server: None,
        out: out.clone(),
    };
    let options = JoinOptions {
        backend,
        timeout: Duration::from_secs(config.ddp.timeout_s),
        buffer_ranks: config.buffer.num_remote,
        shared_memory: config.ddp.shared_memory,
        // `--device cpu` on a GPU machine trains on CPUs: gloo or MPI, not NCCL.
        cuda: config.device()? != tch::Device::Cpu,
    };
    let mut world = World::join(options, |placement| announcer.announce(placement))?;
    if let Some(server) = announcer.server.take() {
        return remote::serve(&world, server, &config);
    }
    let wandb_config = config.wandb.clone();
    signals::install();
    let request = run::TrainRequest {
        config,
        out: out.clone(),
        mode,
    };
    let summary = match run::train(request, &mut world)? {
        Outcome::Finished(summary) => summary,
        Outcome::Stopped { step } => {
            if world.is_root() {
                eprintln!(
                    "stopped by a signal after step {step}; checkpoint written; continue with: gfn train --resume {}",
                    out.display()
                );
            }
            std::process::exit(signals::STOPPED_EXIT_CODE);
        }
    };
    if let Some(summary) = summary {
        print!("{}", run::summary_table(&summary));
        println!("run directory: {}", out.display());
        match plot::plot_run(&out) {
            Ok(paths) => paths.iter().for_each(|p| println!("plot: {}", p.display())),
            Err(e) => tracing::warn!("no plots: {e:#}"),
        }
        wandb::sync(&wandb_config, &out);
    }
    // Rank 0 has saved everything; a stopped buffer rank would keep the launcher waiting.
    if world.is_root() && world.has_unresponsive_peer() {
        eprintln!(
            "error: a buffer rank stopped answering (within ddp.timeout_s); the run's results are saved in {}; ending the job",
            out.display()
        );
        world.end_job(gfn_ddp::watchdog::TIMEOUT_EXIT_CODE);
    }
    Ok(())
}

fn sweep(args: SweepArgs) -> Result<()> {
    let plan = sweep::SweepPlan {
        configs: args.configs,
        seeds: args.seeds,
        out: args.out,
        overrides: args.set,
        tv_threshold: args.tv_threshold,
    };
    let rows = sweep::run(&plan)?;
    print!("{}", sweep::markdown(&rows, plan.tv_threshold));
    println!("table: {}", plan.out.join(sweep::TABLE_FILE).display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let mut overrides = args.set;
    if let Some(device) = args.device {
        overrides.push(format!("train.device={device:?}"));
    }
    let plan = bench::BenchPlan {
        envs: args
            .envs
            .iter()
            .map(|spec| bench::env_overrides(spec))
            .collect(),
        batches: args.batches,
        losses: args.losses,
        warmup: args.warmup,
        seconds: args.seconds,
        overrides,
    };
    let rows = bench::run(&plan)?;
    print!("{}", bench::markdown(&rows));
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Training allocates and frees the same few large tensors every step. glibc would hand them
/// back to the kernel each time (mmap/munmap, heap trimming) and page-fault them in again, which
/// cost about a fifth of a CPU step; keeping freed memory in the process removes that.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() {
    keep_freed_memory();
    // Before any thread exists, so that all of them (libtorch's, MPI's, the buffer client's)
    // inherit it: subnormal weights otherwise halve CPU training speed after ~2k steps.
    gfn_core::subnormals::set_flush_on_this_thread(true);
    // Only rank 0 talks; the others log warnings and errors. (The rank is read again, and
    // validated, when joining the job; here a malformed variable just means "not a peer".)
    let peer = RankInfo::from_env().ok().filter(|info| info.world_size > 1);
    let default_level = if peer.as_ref().is_some_and(|info| info.rank > 0) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Bench(args) => bench(args),
        Command::Sweep(args) => sweep(args),
        Command::Plot { dir } => plot::plot_run(&dir).map(|paths| {
            paths.iter().for_each(|p| println!("{}", p.display()));
        }),
    };
    if let Err(err) = result {
        match peer {
            Some(info) => eprintln!("error: [rank {}] {err:#}", info.rank),
            None => eprintln!("error: {err:#}"),
        }
        // Exit without unwinding: a rank that fails must not wait in MPI_Finalize for peers that
        // are blocked in a collective; the launcher sees the exit code and ends the job.
        std::process::exit(1);
    }
}
