//! Runs the `ddp_checks` example on two MPI ranks.

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

#[test]
fn two_ranks_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    let exe = example("ddp_checks");
    assert!(exe.exists(), "{} was not built", exe.display());
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&exe)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("mpirun runs (installed by launch/setup.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rank in 0..2 {
        for kind in ["Tb", "Subtb"] {
            assert!(
                stdout.contains(&format!("rank {rank}: {kind} union step")),
                "{stdout}"
            );
        }
    }
}
