//! `gfn train` across rank processes: two MPI ranks, torchrun-style variables, a rank that never
//! arrives, `srun` without the PMIx plugin, a stop signal under mpirun, and a Slurm job that
//! is preempted, requeued and resumed.

mod common;

use common::{
    assert_ok, bare_gfn, free_port, mpirun, scratch, signal_rank_mid_run, stopped_at, summary, GFN,
    QUALITY_RUN, UNTIL_STOPPED,
};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn two_mpi_ranks_learn_as_well_as_one_with_the_same_total_batch() {
    let two = scratch("two");
    let mut args = vec![
        "train",
        "--out",
        two.to_str().unwrap(),
        "--set",
        "sampling.batch_size=8",
    ];
    args.extend_from_slice(QUALITY_RUN);
    assert_ok(&mpirun(2, &[], &args));
    let s = summary(&two);
    assert_eq!(s["ranks"], 2);
    assert_eq!(s["backend"], "mpi");
    assert_eq!(s["trajectories"], 16_000);
    let tv = s["exact_tv"].as_f64().unwrap();
    // The single-rank test reaches < 0.05 with batch 16 in 1000 steps; so must two ranks of 8.
    assert!(tv < 0.05, "2 ranks x batch 8: exact TV {tv}");
    assert!(two.join("checkpoint.pt").exists());

    // Resuming with the same world size continues from rank 0's checkpoint.
    let resumed = mpirun(
        2,
        &[],
        &[
            "train",
            "--resume",
            two.to_str().unwrap(),
            "--set",
            "train.steps=1100",
        ],
    );
    assert_ok(&resumed);
    assert_eq!(summary(&two)["steps"], 1100);
    // With another world size the run would continue on other batches: refused by name.
    let one_rank = bare_gfn()
        .args([
            "train",
            "--resume",
            two.to_str().unwrap(),
            "--set",
            "train.steps=1200",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&one_rank.stderr);
    assert!(!one_rank.status.success());
    assert!(
        stderr.contains("written by 2 training ranks, this run has 1"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(two);
}

/// Two MPI ranks train a posterior against an earlier one-rank run (RTB) with NoisyNet
/// rollouts, each rank drawing its own noise: the exact target is the tilted one.
#[test]
fn two_mpi_ranks_train_a_posterior_against_a_prior_with_noisy_rollouts() {
    let prior = scratch("ddp-prior");
    let posterior = scratch("ddp-posterior");
    let short = [
        "--set",
        "train.steps=60",
        "--set",
        "train.validate_every=30",
        "--set",
        "train.eval_samples=1000",
        "--set",
        "model.hidden=32",
    ];
    let mut args = vec!["train", "--out", prior.to_str().unwrap()];
    args.extend_from_slice(&short);
    assert_ok(&bare_gfn().args(&args).output().unwrap());
    let setting = format!("loss.rtb.prior={:?}", prior.to_str().unwrap());
    let mut args = vec!["train", "--out", posterior.to_str().unwrap()];
    args.extend_from_slice(&short);
    args.extend_from_slice(&[
        "--set",
        "loss.name=rtb",
        "--set",
        &setting,
        "--set",
        "model.noisy_layers=2",
    ]);
    assert_ok(&mpirun(2, &[], &args));
    let (p, s) = (summary(&prior), summary(&posterior));
    assert_eq!(s["ranks"], 2);
    assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
    let (tilted, plain) = (
        s["true_log_z"].as_f64().unwrap(),
        p["true_log_z"].as_f64().unwrap(),
    );
    assert!((tilted - plain).abs() > 1e-3, "{tilted} vs {plain}");
    let _ = std::fs::remove_dir_all(prior);
    let _ = std::fs::remove_dir_all(posterior);
}

/// On one node the ranks share the optimizer step out, each holding current Adam moments for
/// its share only, and gather them before a checkpoint: the checkpoint must be the one that
/// every rank stepping every element writes, tensor for tensor and bit for bit.
#[test]
fn sharing_the_update_out_changes_no_bit_of_the_checkpoint() {
    let load = |shared: bool| {
        let dir = scratch(if shared { "shared-out" } else { "whole-step" });
        let shared_memory = format!("ddp.shared_memory={shared}");
        assert_ok(&mpirun(
            2,
            &[],
            &[
                "train",
                "--out",
                dir.to_str().unwrap(),
                "--set",
                &shared_memory,
                "--set",
                "train.steps=300",
                "--set",
                "train.checkpoint_every=200",
                "--set",
                "train.validate_every=0",
                "--set",
                "train.eval_samples=1000",
            ],
        ));
        let tensors = tch::Tensor::load_multi(dir.join("checkpoint.pt")).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        tensors
    };
    let (shared, whole) = (load(true), load(false));
    assert_eq!(shared.len(), whole.len());
    for ((name, a), (other, b)) in shared.iter().zip(&whole) {
        assert_eq!(name, other);
        assert!(a.equal(b), "checkpoint tensor {name} differs");
    }
    let names: Vec<_> = shared.iter().map(|(n, _)| n.as_str()).collect();
    for name in ["params", "exp_avg", "exp_avg_sq"] {
        assert!(names.contains(&name), "{names:?}");
    }
}

#[test]
fn torchrun_style_variables_with_one_rank_train() {
    let out = scratch("torchrun1");
    let result = bare_gfn()
        .args([
            "train",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "env.dim=2",
            "--set",
            "train.steps=20",
            "--set",
            "train.eval_samples=1000",
            "--device",
            "cpu",
        ])
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
        ])
        .output()
        .unwrap();
    assert_ok(&result);
    assert_eq!(summary(&out)["ranks"], 1);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_rank_that_never_arrives_ends_in_a_timeout_error() {
    let port = free_port();
    let out = scratch("timeout");
    let start = Instant::now();
    let result = bare_gfn()
        .args([
            "train",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "ddp.timeout_s=2",
            "--device",
            "cpu",
        ])
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port.to_string()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("ranks [1] of 2 did not arrive within 2 s"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn srun_without_pmix_is_explained() {
    let out = scratch("srun");
    let result = bare_gfn()
        .args([
            "train",
            "--out",
            out.to_str().unwrap(),
            "--backend",
            "mpi",
            "--set",
            "ddp.timeout_s=30",
        ])
        .envs([
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODELIST", "localhost"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("srun --mpi=pmix"), "{stderr}");
}

/// Under `srun` on the one-node Slurm cluster that launch/test.sh starts (GFN_TEST_SLURM=1).
#[test]
fn srun_with_pmix_trains_two_ranks_and_without_it_explains() {
    if std::env::var("GFN_TEST_SLURM").as_deref() != Ok("1") {
        eprintln!(
            "needs a Slurm cluster: run launch/local-slurm.sh as root and set GFN_TEST_SLURM=1"
        );
        return;
    }
    let out = scratch("srun-pmix");
    let train = [
        "train",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "env.dim=2",
        "--set",
        "train.steps=50",
        "--set",
        "train.eval_samples=1000",
        "--set",
        "train.threads=1",
        "--device",
        "cpu",
    ];
    let result = Command::new("srun")
        .args(["--mpi=pmix", "-n", "2", GFN])
        .args(train)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_ok(&result);
    assert_eq!(summary(&out)["ranks"], 2);
    assert_eq!(summary(&out)["backend"], "mpi");
    let result = Command::new("srun")
        .args(["-n", "2", GFN])
        .args(train)
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("srun --mpi=pmix"));
    let _ = std::fs::remove_dir_all(out);
}

/// SIGTERM to mpirun reaches both ranks, which stop after the same step with rank 0's
/// checkpoint; a resume continues from it.
#[test]
fn a_signal_to_mpirun_stops_both_ranks_with_a_checkpoint() {
    let out = scratch("mpirun-stop");
    let mut job = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", GFN])
        .args(["train", "--out", out.to_str().unwrap(), "--device", "cpu"])
        .args(UNTIL_STOPPED)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.join("checkpoint.pt").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &job.id().to_string()])
        .status()
        .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    job.wait().unwrap();
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let step = stopped_at(&stderr);
    assert_eq!(step % 8, 0, "ranks agree on a stop every 8 steps");
    let resumed = mpirun(
        2,
        &[],
        &[
            "train",
            "--resume",
            out.to_str().unwrap(),
            "--set",
            &format!("train.steps={}", step + 16),
        ],
    );
    assert_ok(&resumed);
    assert_eq!(summary(&out)["steps"], step + 16);
    let _ = std::fs::remove_dir_all(out);
}

/// launch/slurm.sbatch under a preemption: SIGTERM to the job's tasks (`scancel --signal`),
/// which exit 75 with a checkpoint; the script requeues the job, and the same command line
/// (`--auto-resume`) continues from that checkpoint.
#[test]
fn a_preempted_slurm_job_is_requeued_and_resumes_from_its_checkpoint() {
    if std::env::var("GFN_TEST_SLURM").as_deref() != Ok("1") {
        eprintln!(
            "needs a Slurm cluster: run launch/local-slurm.sh as root and set GFN_TEST_SLURM=1"
        );
        return;
    }
    let out = scratch("sbatch-requeue");
    let log = out.with_extension("log");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let submitted = Command::new("sbatch")
        .current_dir(root)
        .args([
            "--parsable",
            "-n",
            "2",
            &format!("--output={}", log.display()),
        ])
        .args([
            "launch/slurm.sbatch",
            "train",
            "--auto-resume",
            "--device",
            "cpu",
        ])
        .args(["--out", out.to_str().unwrap()])
        .args(UNTIL_STOPPED)
        // sbatch passes its environment on: the log must show where each run starts.
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_ok(&submitted);
    let job = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_for = |what: &str, ready: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !ready() {
            if start.elapsed() > Duration::from_secs(90) {
                let _ = Command::new("scancel").arg(&job).status();
                panic!("{what} within 90 s; log:\n{}", read_log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("a first checkpoint", &|| out.join("checkpoint.pt").exists());
    assert!(Command::new("scancel")
        .args(["--signal=TERM", &job])
        .status()
        .unwrap()
        .success());
    wait_for("the requeue", &|| read_log().contains("requeueing job"));
    // Slurm holds a requeued job back for a while; release it once it has been pending a
    // few seconds (sooner, the node may still hold the first run's PMIx socket).
    let state = || {
        let o = Command::new("squeue")
            .args(["-h", "-j", &job, "-o", "%T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    wait_for("the job pending again", &|| state() == "PENDING");
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("scontrol")
        .args(["update", &format!("JobId={job}"), "StartTime=now"])
        .output();
    wait_for("the resumed run", &|| {
        read_log().contains("--auto-resume: continuing")
    });
    wait_for("training after the resume", &|| {
        read_log().matches("training from step").count() == 2
    });
    let _ = Command::new("scancel").arg(&job).status();
    let text = read_log();
    let stopped = stopped_at(&text);
    assert!(
        text.contains(&format!("training from step {stopped} to")),
        "the requeued job did not continue from step {stopped}:\n{text}"
    );
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_file(log);
}

/// A rank that stops taking part after start-up (stopped, or killed under
/// `mpirun --enable-recovery`, where Open MPI keeps the others running) ends the whole job
/// within ddp.timeout_s and a few seconds, with the waiting rank naming what it waited for.
#[test]
fn a_stopped_or_killed_rank_ends_the_whole_job_within_the_timeout() {
    for (options, signal) in [(&[][..], "-STOP"), (&["--enable-recovery"][..], "-9")] {
        let out = scratch("deadline");
        let mut job = Command::new("mpirun");
        job.args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
            .args(options)
            .arg(GFN)
            .args(["train", "--out", out.to_str().unwrap(), "--device", "cpu"])
            .args(UNTIL_STOPPED)
            .args(["--set", "ddp.timeout_s=5"])
            .env("RUST_LOG", "warn");
        let (output, took) = signal_rank_mid_run(job, &out, 1, signal, Duration::from_secs(40));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("[rank 0]") && stderr.contains("did not complete within 5 s"),
            "{signal}: {stderr}"
        );
        if signal == "-STOP" {
            assert!(!output.status.success(), "{stderr}");
            assert!(stderr.contains("rank 1 did not arrive"), "{stderr}");
        }
        assert!(
            took < Duration::from_secs(20),
            "{signal}: ended after {took:?}"
        );
        let _ = std::fs::remove_dir_all(out);
    }
}
