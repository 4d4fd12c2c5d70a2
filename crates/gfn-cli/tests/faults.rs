//! What `gfn train` does when things go wrong around it: a stop signal, a second run on the
//! same directory, a directory that already holds a run, a resume with a different problem or
//! model, a diverging optimizer.

mod common;

use common::{assert_ok, bare_gfn, scratch, stopped_at};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// A 2x6 grid with a small MLP: hundreds of steps a second.
fn args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--set",
        &format!("train.steps={steps}"),
        "--set",
        "env.dim=2",
        "--set",
        "env.height=6",
        "--set",
        "model.hidden=32",
        "--set",
        "replay.capacity=64",
        "--set",
        "sampling.epsilon=0.1",
        "--set",
        "train.eval_samples=2000",
        "--set",
        "train.validate_every=0",
        "--set",
        "train.checkpoint_every=50",
        "--set",
        "train.threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> Output {
    bare_gfn().args(args).output().unwrap()
}

fn spawn(args: &[String]) -> Child {
    bare_gfn()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn params(dir: &Path) -> Vec<f32> {
    let tensors = Tensor::load_multi(dir.join("checkpoint.pt")).unwrap();
    let (_, p) = tensors.into_iter().find(|(n, _)| n == "params").unwrap();
    Vec::<f32>::try_from(p).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The one error line of a failed run, checked to name every needle.
fn error_line(output: &Output, needles: &[&str]) -> String {
    let text = stderr(output);
    assert!(!output.status.success(), "expected a failure: {text}");
    assert!(!text.contains("panicked"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {text}"))
        .to_string();
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    line
}

fn wait_for(what: &str, deadline: Duration, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < deadline, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_run_checkpoints_locks_its_directory_and_resumes_bitwise() {
    let split = scratch("faults-split");
    let first = spawn(&args(&split, 10_000_000, &[]));
    wait_for("a first checkpoint", Duration::from_secs(60), || {
        split.join("checkpoint.pt").exists()
    });
    let second = run(&args(&split, 100, &["--overwrite"]));
    error_line(
        &second,
        &["in use by another gfn run", &format!("pid {}", first.id())],
    );
    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = first.wait_with_output().unwrap();
    let stopped_in = signalled.elapsed();
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(75), "{text}");
    assert!(stopped_in < Duration::from_secs(10), "took {stopped_in:?}");
    let step = stopped_at(&text);
    assert!(
        !split.join("summary.json").exists(),
        "a stopped run is not finished"
    );

    let total = step + 40;
    let resumed = run(&[
        "train".into(),
        "--resume".into(),
        split.to_str().unwrap().into(),
        "--set".into(),
        format!("train.steps={total}"),
    ]);
    assert_ok(&resumed);
    let whole = scratch("faults-whole");
    assert_ok(&run(&args(&whole, total, &[])));
    assert_eq!(
        params(&whole),
        params(&split),
        "stopped at {step}, resumed to {total}"
    );
    let _ = std::fs::remove_dir_all(split);
    let _ = std::fs::remove_dir_all(whole);
}

#[test]
fn a_directory_with_a_run_needs_resume_or_overwrite_and_metrics_never_repeat_a_step() {
    let dir = scratch("faults-reuse");
    let every = [
        "--set",
        "train.validate_every=10",
        "--set",
        "train.checkpoint_every=20",
    ];
    let overwrite = [&every[..], &["--overwrite"]].concat();
    assert_ok(&run(&args(&dir, 30, &every)));
    error_line(
        &run(&args(&dir, 30, &every)),
        &["is not empty", "--resume", "--overwrite"],
    );
    // The checkpoint is at step 30 and metrics.jsonl has 10, 20, 30; a resume from a checkpoint
    // at 20 (as after a crash between the two) must not write 30 twice.
    assert_ok(&run(&args(&dir, 20, &overwrite)));
    let checkpoint_at_20 = std::fs::read(dir.join("checkpoint.pt")).unwrap();
    assert_ok(&run(&args(&dir, 30, &overwrite)));
    std::fs::write(dir.join("checkpoint.pt"), checkpoint_at_20).unwrap();
    let resumed = run(&[
        "train".into(),
        "--resume".into(),
        dir.to_str().unwrap().into(),
        "--set".into(),
        "train.steps=40".into(),
    ]);
    assert_ok(&resumed);
    let steps: Vec<u64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [10, 20, 30, 40]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_resume_with_another_problem_or_model_is_refused_by_name() {
    let dir = scratch("faults-identity");
    assert_ok(&run(&args(&dir, 20, &[])));
    let resume = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "train",
            "--resume",
            dir.to_str().unwrap(),
            "--set",
            "train.steps=40",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        run(&a)
    };
    error_line(
        &resume(&["--set", "env.preset=hard"]),
        &["different run", "env.preset", "\"standard\"", "\"hard\""],
    );
    error_line(
        &resume(&["--set", "model.hidden=64"]),
        &["different run", "model.hidden", "32", "64"],
    );
    let mut bytes = std::fs::read(dir.join("checkpoint.pt")).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 64]
        .iter_mut()
        .for_each(|b| *b ^= 0xA5);
    std::fs::write(dir.join("checkpoint.pt"), bytes).unwrap();
    error_line(&resume(&[]), &["checkpoint.pt", "checksum mismatch"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_a_finite_checkpoint() {
    let dir = scratch("faults-nan");
    let output = run(&args(
        &dir,
        300,
        &[
            "--set",
            "optim.lr=100",
            "--set",
            "train.checkpoint_every=1",
            // The default grid and width, which lr = 100 sends to infinity within a few steps.
            "--set",
            "env.dim=4",
            "--set",
            "env.height=8",
            "--set",
            "model.hidden=256",
        ],
    ));
    error_line(
        &output,
        &["step ", "non-finite", "train.max_nonfinite_steps = 0"],
    );
    assert!(params(&dir).iter().all(|p| p.is_finite()));
    assert!(!dir.join("summary.json").exists());
    let _ = std::fs::remove_dir_all(dir);
}
