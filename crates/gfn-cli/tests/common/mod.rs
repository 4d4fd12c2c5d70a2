//! Helpers shared by the end-to-end tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const GFN: &str = env!("CARGO_BIN_EXE_gfn");

/// An empty directory path unique to this test process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gfn-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// `gfn` under `mpirun -np N` (extra mpirun options before the binary).
pub fn mpirun(np: usize, mpirun_options: &[&str], args: &[&str]) -> Output {
    Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .args(mpirun_options)
        .arg(GFN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("mpirun runs (installed by launch/setup.sh)")
}

/// A command with no launcher variables inherited from the test's own environment.
pub fn bare_gfn() -> Command {
    let mut c = Command::new(GFN);
    for (k, _) in std::env::vars() {
        if [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_",
            "OMPI_",
            "PMI",
            "SLURM_",
            "MV2_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
        {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A MASTER_PORT for a test job: free, with the port after it (the job's rendezvous), and
/// below the ephemeral range, so that no other test's gloo pair or connection takes either
/// before the job binds them.
pub fn free_port() -> u16 {
    gfn_ddp::rendezvous::free_port_pair().expect("a free pair of ports below the ephemeral range")
}

/// 2x8 TB with one intra-op thread: reaches exact TV < 0.05 in 1000 steps at batch 16.
pub const QUALITY_RUN: &[&str] = &[
    "--set",
    "env.dim=2",
    "--set",
    "train.steps=1000",
    "--set",
    "train.validate_every=1000",
    "--set",
    "train.eval_samples=10000",
    "--set",
    "train.threads=1",
    "--device",
    "cpu",
];

/// A small grid run that goes on until a signal stops it, checkpointing every 100 steps.
pub const UNTIL_STOPPED: &[&str] = &[
    "--set",
    "train.steps=10000000",
    "--set",
    "train.validate_every=0",
    "--set",
    "train.checkpoint_every=100",
    "--set",
    "train.threads=1",
    "--set",
    "env.dim=2",
    "--set",
    "model.hidden=32",
];

/// The step after which a signal stopped a run, from its "stopped by a signal after step N;"
/// line.
pub fn stopped_at(stderr: &str) -> u64 {
    stderr
        .split("after step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stop step in {stderr}"))
}

/// The pid of MPI rank `rank` among the `gfn` processes writing to `out`.
pub fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    // Open MPI's variable, or torchrun's (its agent, whose command line also names OUT, has
    // neither).
    let wanted = [
        format!("OMPI_COMM_WORLD_RANK={rank}"),
        format!("RANK={rank}"),
    ];
    let out = out.to_str().unwrap();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let has = |bytes: &[u8], s: &str| bytes.split(|&b| b == 0).any(|p| p == s.as_bytes());
            let ranked = wanted.iter().any(|w| has(&environ, w));
            (has(&cmdline, out) && ranked).then_some(pid)
        })
}

/// Runs `job` (an mpirun or torchrun of `gfn train --out OUT ...`), sends `signal` to rank `rank` once
/// `OUT/checkpoint.pt` exists, and returns the job's output and how long it took to end after
/// the signal (panics past `limit`).
pub fn signal_rank_mid_run(
    mut job: Command,
    out: &Path,
    rank: usize,
    signal: &str,
    limit: std::time::Duration,
) -> (Output, std::time::Duration) {
    use std::time::{Duration, Instant};
    let child = job
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pid = loop {
        if out.join("checkpoint.pt").exists() {
            if let Some(pid) = rank_pid(out, rank) {
                break pid;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(output) => (output.unwrap(), signalled.elapsed()),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = Command::new("pkill")
                .args(["-9", "-f", out.to_str().unwrap()])
                .status();
            panic!("the job still ran {limit:?} after {signal} to rank {rank}");
        }
    }
}
