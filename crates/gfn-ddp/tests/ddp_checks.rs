//! Runs the `ddp_checks` example on MPI ranks (two and three through the shared-memory
//! all-reduce, the default on one node, and two through MPI_Allreduce) and on torchrun ranks
//! with the gloo backend (two and three, through the shared window and through gloo's own
//! all-reduce).

use std::path::{Path, PathBuf};
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // Examples are built beside the test executables: target/<profile>/examples/.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    deps.parent().unwrap().join("examples").join(name)
}

fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string());
    command
}

/// The project venv's torchrun (launch/setup.sh installs torch there), on a free port.
fn torchrun(ranks: usize) -> Command {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/torchrun"));
    command
        .arg(format!("--nproc-per-node={ranks}"))
        .arg(format!("--master-port={port}"))
        .arg("--no-python");
    command
}

/// Runs the checks under `launcher` on `ranks` ranks with `args`.
fn ddp_checks(mut launcher: Command, ranks: usize, args: &[&str]) {
    let exe = example("ddp_checks");
    assert!(exe.exists(), "{} was not built", exe.display());
    let out = launcher
        .arg(&exe)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("the launcher runs (launch/setup.sh installs mpirun and torchrun)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rank in 0..ranks {
        for kind in ["Tb", "Subtb"] {
            assert!(
                stdout.contains(&format!("rank {rank}: {kind} union step")),
                "{stdout}"
            );
        }
    }
}

#[test]
fn two_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    ddp_checks(mpirun(2), 2, &[]);
}

#[test]
fn three_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    ddp_checks(mpirun(3), 3, &[]);
}

#[test]
fn two_ranks_through_mpi_allreduce_match_one_rank_on_the_union() {
    ddp_checks(mpirun(2), 2, &["--no-shared-memory"]);
}

#[test]
fn two_gloo_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    ddp_checks(torchrun(2), 2, &["--gloo"]);
    ddp_checks(torchrun(2), 2, &["--gloo", "--no-shared-memory"]);
}

#[test]
fn three_gloo_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    ddp_checks(torchrun(3), 3, &["--gloo"]);
    ddp_checks(torchrun(3), 3, &["--gloo", "--no-shared-memory"]);
}
