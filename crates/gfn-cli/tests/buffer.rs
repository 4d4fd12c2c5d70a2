//! Replay-buffer ranks end to end: two trainers and a buffer rank under mpirun, and with
//! torchrun-style variables a buffer rank or a trainer killed mid-run.

mod common;

use common::{
    assert_ok, bare_gfn, free_port, mpirun, scratch, signal_rank_mid_run, summary, GFN, QUALITY_RUN,
};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[test]
fn two_trainers_and_a_buffer_rank_learn_as_well_as_two_trainers_alone() {
    let runs = [("buffer-none", 2, "0"), ("buffer-one", 3, "1")];
    for (name, np, buffers) in runs {
        let out = scratch(name);
        let mut args = vec![
            "train",
            "--out",
            out.to_str().unwrap(),
            "--num-remote-buffers",
            buffers,
            "--set",
            "sampling.batch_size=8",
            "--set",
            "replay.ratio=0.5",
        ];
        args.extend_from_slice(QUALITY_RUN);
        let result = mpirun(np, &[], &args);
        assert_ok(&result);
        let s = summary(&out);
        assert_eq!(s["ranks"], 2);
        assert_eq!(s["trajectories"], 16_000);
        let tv = s["exact_tv"].as_f64().unwrap();
        assert!(tv < 0.05, "{name}: exact TV {tv}");
        if buffers == "0" {
            assert!(s.get("remote_buffers").is_none());
            continue;
        }
        // Everything both trainers sampled reached the buffer rank, and came back as replay.
        assert_eq!(s["remote_buffers"], 1);
        assert_eq!(s["buffer_received"], 16_000);
        assert_eq!(s["buffer_size"], 16_000);
        assert_eq!(s["buffer_pushes_dropped"], 0);
        assert_eq!(s["buffer_ranks_lost"], 0);
        let replayed = s["buffer_replayed"].as_u64().unwrap();
        // Up to 4 per trainer and step; only the first steps (empty buffer) may get fewer.
        assert!(replayed > 7_000 && replayed <= 8_000, "{replayed}");
        assert!(s["buffer_sampled"].as_u64().unwrap() >= replayed);
        // The buffer rank counts modes on its own; the trainers' union must agree.
        assert_eq!(s["buffer_modes_found"], s["modes_found"]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            stdout.contains("buffer rank 2: size 16000/100000 received 16000")
                && stdout.contains("trainers finished 2 lost 0 refused 0"),
            "{stdout}"
        );
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        assert!(last["buffer_size"].as_u64().unwrap() > 0, "{last}");
        let _ = std::fs::remove_dir_all(out);
    }
}

#[test]
fn a_resumed_run_gets_back_the_buffer_rank_it_had() {
    let out = scratch("buffer-resume");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--num-remote-buffers",
            "1",
            "--set",
            "sampling.batch_size=8",
            "--set",
            "replay.ratio=0.5",
            "--set",
            "train.checkpoint_every=100",
        ];
        args.extend_from_slice(extra);
        let result = mpirun(3, &[], &args);
        assert_ok(&result);
        summary(&out)
    };
    let first = run(&["--out", o, "--set", "train.steps=200"]);
    assert_eq!(first["buffer_received"], 2 * 200 * 8);
    let snapshot = |step: u64| out.join(format!("buffer-rank-2.step-{step}.bin"));
    assert!(snapshot(100).exists() && snapshot(200).exists());
    // The resumed buffer rank starts with the 3,200 trajectories and counts it had; the
    // 1,600 pushed after the resume come on top.
    let resumed = run(&["--resume", o, "--set", "train.steps=300"]);
    assert_eq!(resumed["buffer_received"], 2 * 300 * 8);
    assert_eq!(resumed["buffer_size"], 2 * 300 * 8);
    assert_eq!(resumed["buffer_pushes_dropped"], 0);
    // Snapshots of the last two checkpoints stay.
    assert!(!snapshot(100).exists() && snapshot(200).exists() && snapshot(300).exists());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_diverse_buffer_rank_keeps_distinct_high_reward_states() {
    let out = scratch("buffer-diverse");
    let result = mpirun(
        3,
        &[],
        &[
            "train",
            "--out",
            out.to_str().unwrap(),
            "--num-remote-buffers",
            "1",
            "--set",
            "buffer.policy=diverse",
            "--set",
            "buffer.capacity=50",
            "--set",
            "train.steps=150",
        ],
    );
    assert_ok(&result);
    let s = summary(&out);
    assert_eq!(s["buffer_received"], 2 * 150 * 16);
    assert_eq!(s["buffer_size"], 50);
    // The buffer rank's last snapshot: 50 trajectories with pairwise distinct terminal states
    // (on the grid any two distinct states lie at distance >= 1 > the 0.1 cutoff), in
    // ascending order of reward.
    let files = gfn_buffer::snapshot::SnapshotFiles {
        dir: out.clone(),
        rank: 2,
    };
    let stored = files
        .load(150)
        .unwrap()
        .expect("a snapshot of the last step")
        .items;
    assert_eq!(stored.len(), 50);
    let distinct: std::collections::BTreeSet<Vec<i64>> = stored
        .iter()
        .map(|item| gfn_diversity::Scored::terminal(item).to_vec())
        .collect();
    assert_eq!(distinct.len(), 50);
    assert!(stored
        .windows(2)
        .all(|w| w[0].log_reward <= w[1].log_reward));
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn two_trainers_and_a_buffer_rank_on_a_bit_sequence() {
    // A peaked bit sequence (6 modes, β = 16): items are keyed by their terminal sequence, and
    // the buffer rank counts modes with the environment's own criterion (Hamming distance < 3).
    let out = scratch("buffer-bitseq");
    let o = out.to_str().unwrap();
    let args = [
        "train",
        "--out",
        o,
        "--num-remote-buffers",
        "1",
        "--set",
        "env.name=bitseq",
        "--set",
        "env.n=24",
        "--set",
        "env.k=4",
        "--set",
        "env.modes=6",
        "--set",
        "env.beta=16",
        "--set",
        "env.mode_threshold=3",
        "--set",
        "model.hidden=128",
        "--set",
        "model.backward=uniform",
        "--set",
        "sampling.batch_size=8",
        "--set",
        "sampling.epsilon=0.01",
        "--set",
        "replay.ratio=0.5",
        "--set",
        "buffer.policy=unique",
        "--set",
        "train.steps=600",
        "--set",
        "train.validate_every=300",
        "--set",
        "metrics.test_rounds=2",
        "--set",
        "train.threads=1",
        "--device",
        "cpu",
    ];
    let result = mpirun(3, &[], &args);
    assert_ok(&result);
    let s = summary(&out);
    assert_eq!(
        (s["ranks"].as_u64(), s["remote_buffers"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(s["buffer_received"], 2 * 8 * 600);
    // One item per distinct terminal sequence, as many as the trainers' union saw.
    assert_eq!(s["buffer_size"], s["distinct_terminals"], "{s}");
    assert_eq!(s["buffer_modes_found"], s["modes_found"], "{s}");
    // A uniform policy finds about one mode in 9,600 sequences; the trained one 3 to 5 (the
    // replayed items depend on the ranks' timing, so the count varies from run to run).
    assert!(s["modes_found"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["buffer_replayed"].as_u64().unwrap() > 0);
    assert!(s["spearman"].as_f64().unwrap() > 0.3, "{s}");
    let _ = std::fs::remove_dir_all(out);
}

/// One buffer rank and a run long enough (seconds) to kill a rank in the middle of it, with
/// metrics every 200 steps to tell when the buffer is in use.
const LONG_RUN: &[&str] = &[
    "--num-remote-buffers",
    "1",
    "--set",
    "env.dim=2",
    "--set",
    "train.validate_every=200",
    "--set",
    "train.eval_samples=2000",
    "--set",
    "train.threads=1",
    "--device",
    "cpu",
];

/// Rank `rank` of a 2-rank torchrun-style job whose rank 1 serves the buffer.
fn torchrun_rank(rank: usize, port: u16, out: &Path, extra: &[&str]) -> Child {
    bare_gfn()
        .args(["train", "--out", out.to_str().unwrap()])
        .args(LONG_RUN)
        .args(["--set", "train.steps=4000", "--set", "ddp.timeout_s=30"])
        .args(extra)
        .envs([
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A test that hangs must fail, not stall the suite: `pid` is killed after `seconds`.
fn kill_after(pid: u32, seconds: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    });
}

/// Waits until the trainer has logged metrics that show the buffer rank at work; a trainer
/// that ends before (or a wait past the deadline, on a loaded machine) fails with what it said.
fn wait_for_buffer_traffic(out: &Path, trainer: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
        if metrics.contains("\"buffer_received\"") {
            return;
        }
        let ended = trainer.try_wait().unwrap().is_some();
        if ended || Instant::now() > deadline {
            let _ = trainer.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = trainer.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            panic!("no buffer statistics in metrics.jsonl (trainer ended: {ended}): {metrics}\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_buffer_rank_mid_run(extra: &[&str]) -> (std::process::Output, std::path::PathBuf) {
    let out = scratch(&format!("buffer-kill-{}", extra.len()));
    let port = free_port();
    let mut buffer = torchrun_rank(1, port, &out, extra);
    let mut trainer = torchrun_rank(0, port, &out, extra);
    kill_after(trainer.id(), 180);
    wait_for_buffer_traffic(&out, &mut trainer);
    buffer.kill().unwrap();
    buffer.wait().unwrap();
    (trainer.wait_with_output().unwrap(), out)
}

#[test]
fn a_killed_buffer_rank_is_reported_once_and_training_finishes_on_local_replay() {
    let (result, out) = kill_buffer_rank_mid_run(&[]);
    assert_ok(&result);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(
        stderr.matches("continuing with local replay").count(),
        1,
        "{stderr}"
    );
    let s = summary(&out);
    assert_eq!(s["steps"], 4000);
    assert_eq!(s["buffer_ranks_lost"], 1);
    // After the loss the trainer still replays (locally): every batch has 16 + 8.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["batch_trajectories"], 24);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn under_mpirun_with_recovery_two_trainers_outlive_their_killed_buffer_rank() {
    let out = scratch("buffer-kill-mpi");
    let mut job = std::process::Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--enable-recovery",
            "-np",
            "3",
        ])
        .args(["-x", "RUST_LOG=warn,gfn::remote=info", common::GFN])
        .args(["train", "--out", out.to_str().unwrap()])
        .args(LONG_RUN)
        .args(["--set", "train.steps=3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kill_after(job.id(), 180);
    // The buffer rank names its pid when it starts listening.
    let stderr = job.stderr.take().unwrap();
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("replay-buffer server listening") {
                let pid = line.split("pid=").nth(1).and_then(|rest| {
                    rest.split_whitespace()
                        .next()
                        .and_then(|p| p.parse::<i32>().ok())
                });
                let _ = pid_tx.send(pid.expect("the listening line names the pid"));
            }
            text += &line;
            text.push('\n');
        }
        text
    });
    let pid = pid_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("buffer rank started");
    wait_for_buffer_traffic(&out, &mut job);
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = job.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("continuing with local replay").count(),
        2,
        "{stderr}"
    );
    let s = summary(&out);
    assert_eq!(s["steps"], 3000);
    assert_eq!(s["ranks"], 2);
    assert_eq!(s["buffer_ranks_lost"], 2);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn with_buffer_fatal_a_lost_buffer_rank_ends_the_run() {
    let (result, out) = kill_buffer_rank_mid_run(&["--set", "buffer.fatal=true"]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("lost the replay-buffer rank") && stderr.contains("buffer.fatal = true"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_buffer_rank_whose_trainer_dies_exits_instead_of_waiting() {
    let out = scratch("buffer-trainer-dies");
    let port = free_port();
    let buffer = torchrun_rank(1, port, &out, &[]);
    let mut trainer = torchrun_rank(0, port, &out, &[]);
    kill_after(buffer.id(), 180);
    wait_for_buffer_traffic(&out, &mut trainer);
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    let started = Instant::now();
    let result = buffer.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_ok(&result);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("trainers finished 0 lost 1"), "{stdout}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn more_buffer_ranks_than_the_job_allows_is_an_error() {
    let out = scratch("buffer-too-many");
    let result = bare_gfn()
        .args([
            "train",
            "--out",
            out.to_str().unwrap(),
            "--num-remote-buffers",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("--num-remote-buffers 1 leaves no training rank in a job of 1 rank(s)"),
        "{stderr}"
    );
}

/// A buffer rank stopped mid-run (not dead: its connections stay open) costs the trainers
/// their replay, not the run: they finish on local replay, rank 0 writes the summary, and the
/// job ends (status 124) instead of waiting for the stopped rank forever.
#[test]
fn a_stopped_buffer_rank_neither_hangs_the_trainers_nor_the_job() {
    let out = scratch("buffer-stopped");
    let mut job = std::process::Command::new("mpirun");
    job.args(["--allow-run-as-root", "--oversubscribe", "-np", "3", GFN])
        .args(["train", "--out", out.to_str().unwrap(), "--device", "cpu"])
        .args(["--num-remote-buffers", "1", "--set", "ddp.timeout_s=5"])
        .args([
            "--set",
            "train.steps=2000",
            "--set",
            "train.validate_every=0",
        ])
        .args([
            "--set",
            "train.checkpoint_every=100",
            "--set",
            "train.threads=1",
        ])
        .args(["--set", "env.dim=2", "--set", "model.hidden=32"])
        .env("RUST_LOG", "warn");
    let (output, _) = signal_rank_mid_run(job, &out, 2, "-STOP", Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("a buffer rank stopped answering"),
        "{stderr}"
    );
    assert_eq!(summary(&out)["steps"], 2000);
    let _ = std::fs::remove_dir_all(out);
}
