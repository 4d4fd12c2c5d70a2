//! Runs the `ddp_checks` example on MPI ranks: two and three ranks through the shared-memory
//! all-reduce (the default on one node), two through MPI_Allreduce.

use std::path::PathBuf;
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

fn ddp_checks(ranks: usize, args: &[&str]) {
    let exe = example("ddp_checks");
    assert!(exe.exists(), "{} was not built", exe.display());
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(&exe)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("mpirun runs (installed by launch/setup.sh)");
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
    ddp_checks(2, &[]);
}

#[test]
fn three_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    ddp_checks(3, &[]);
}

#[test]
fn two_ranks_through_mpi_allreduce_match_one_rank_on_the_union() {
    ddp_checks(2, &["--mpi-all-reduce"]);
}
