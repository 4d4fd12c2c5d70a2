//! The `gfn` binary end to end: a run's outputs, exact resume, and one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

fn gfn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gfn"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("gfn runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gfn-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A small, fast setting that still exercises replay and an ε schedule.
const SMALL: &[&str] = &[
    // The grid's own keys first (train_bitseq leaves them out).
    "--set",
    "env.dim=2",
    "--set",
    "env.height=6",
    "--set",
    "model.hidden=32",
    "--set",
    "replay.capacity=64",
    "--set",
    "sampling.epsilon=0.2",
    "--set",
    "sampling.epsilon_end=0.0",
    "--set",
    "sampling.epsilon_decay_steps=30",
    "--set",
    "train.eval_samples=2000",
    "--set",
    "train.validate_every=10",
    "--set",
    "train.checkpoint_every=10",
    "--device",
    "cpu",
];

/// A bit sequence too large to enumerate (257^3 states: no exact metrics), with a small
/// Transformer, replay and an ε schedule.
const SMALL_BITSEQ: &[&str] = &[
    "--set",
    "env.name=bitseq",
    "--set",
    "env.n=24",
    "--set",
    "env.k=8",
    "--set",
    "env.modes=4",
    "--set",
    "env.mode_threshold=6",
    "--set",
    "model.architecture=transformer",
    "--set",
    "model.transformer.layers=1",
    "--set",
    "model.transformer.heads=2",
    "--set",
    "model.transformer.width=16",
    "--set",
    "model.transformer.ff=16",
    "--set",
    "model.backward=uniform",
    "--set",
    "metrics.samples=64",
    "--set",
    "metrics.top_k=[10]",
    "--set",
    "metrics.test_rounds=2",
];

fn train(out: &Path, steps: u64, extra: &[&str]) -> Output {
    let steps = format!("train.steps={steps}");
    let mut args = vec!["train", "--out", out.to_str().unwrap(), "--set", &steps];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    gfn(&args)
}

/// `SMALL` on the bit sequence instead of the grid.
fn train_bitseq(out: &Path, steps: u64) -> Output {
    let steps = format!("train.steps={steps}");
    let mut args = vec!["train", "--out", out.to_str().unwrap(), "--set", &steps];
    args.extend_from_slice(&SMALL[4..]);
    args.extend_from_slice(SMALL_BITSEQ);
    gfn(&args)
}

fn params(dir: &Path) -> Vec<f32> {
    let tensors = Tensor::load_multi(dir.join("checkpoint.pt")).unwrap();
    let (_, p) = tensors.into_iter().find(|(n, _)| n == "params").unwrap();
    Vec::<f32>::try_from(p).unwrap()
}

#[test]
fn a_run_writes_metrics_checkpoint_and_summary() {
    let out = scratch("run");
    let result = train(&out, 20, &[]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("exact_tv") && stdout.contains("modes_found"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "loss",
        "l1",
        "tv",
        "kl",
        "exact_tv",
        "exact_kl",
        "modes_found",
        "n_modes",
        "log_z",
        "true_log_z",
        "steps",
        "trajectories",
        "wall_s",
        "steps_per_s",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    assert_eq!(summary["steps"], 20);
    assert_eq!(summary["trajectories"], 320);
    // Time per phase: every phase a one-rank run has took time, and they fit in the wall time.
    let seconds = |phase: &str| summary[format!("time_{phase}_s")].as_f64().unwrap();
    let local_phases = [
        "sampling",
        "loss",
        "backward",
        "optimizer",
        "evaluation",
        "checkpoint",
    ];
    for phase in local_phases {
        assert!(seconds(phase) > 0.0, "no time in {phase}: {summary}");
        let per_step = summary[format!("time_{phase}_ms_per_step")]
            .as_f64()
            .unwrap();
        assert!((per_step - 1e3 * seconds(phase) / 20.0).abs() < 1e-9);
    }
    // One rank: the local communicator's all-reduce returns at once, and nobody is waited for.
    assert!(
        seconds("all_reduce") < 1e-3 && seconds("rank_wait") == 0.0,
        "{summary}"
    );
    let phases: f64 = local_phases.iter().map(|p| seconds(p)).sum();
    assert!(phases <= summary["wall_s"].as_f64().unwrap(), "{summary}");
    assert!(
        stdout.contains("phase") && stdout.contains("ms/step") && !stdout.contains("time_loss_s"),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        2,
        "one line per evaluation (steps 10 and 20)"
    );
    let _ = std::fs::remove_dir_all(out);
}

/// Trains one run for `long` steps and another for `short`, then resumes it to `long`; checks
/// that both end with bitwise the same parameters and returns their summaries.
fn whole_and_resumed(
    name: &str,
    train: impl Fn(&Path, u64) -> Output,
    short: u64,
    long: u64,
) -> (serde_json::Value, serde_json::Value) {
    let whole = scratch(&format!("{name}-whole"));
    let split = scratch(&format!("{name}-split"));
    for (dir, steps) in [(&whole, long), (&split, short)] {
        let result = train(dir, steps);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let steps = format!("train.steps={long}");
    let resumed = gfn(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--set",
        &steps,
    ]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        params(&whole),
        params(&split),
        "{name}: parameters after {long} steps differ"
    );
    let summary = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    let summaries = (summary(&whole), summary(&split));
    let _ = std::fs::remove_dir_all(whole);
    let _ = std::fs::remove_dir_all(split);
    summaries
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one_bitwise() {
    let (a, b) = whole_and_resumed("grid", |dir, steps| train(dir, steps, &[]), 20, 40);
    for key in ["loss", "exact_tv", "modes_found", "trajectories", "log_z"] {
        assert_eq!(a[key], b[key], "{key}");
    }
}

#[test]
fn a_resumed_bitseq_run_matches_an_uninterrupted_one_bitwise() {
    let (a, b) = whole_and_resumed("bitseq", train_bitseq, 20, 30);
    assert!(
        a.get("exact_tv").is_none(),
        "257^3 states are not enumerated: {a}"
    );
    for key in [
        "loss",
        "modes_found",
        "distinct_terminals",
        "spearman",
        "pearson",
        "elbo",
        "top_10_reward",
        "log_z",
    ] {
        assert!(a.get(key).is_some(), "summary lacks {key}: {a}");
        assert_eq!(a[key], b[key], "{key}");
    }
}

fn summary_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// Posteriors trained against an earlier run (`loss.<name>.prior`), with NoisyNet rollouts:
/// the exact target is the tilted one, a resume is bitwise, Trust-PCL reports its soft value,
/// and a prior of another environment is refused.
#[test]
fn relative_objectives_train_against_an_earlier_run() {
    let prior = scratch("prior");
    let result = train(&prior, 20, &[]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let rtb_prior = format!("loss.rtb.prior={:?}", prior.to_str().unwrap());
    let rtb = [
        "--set",
        "loss.name=rtb",
        "--set",
        &rtb_prior,
        "--set",
        "loss.rtb.beta=2",
        "--set",
        "model.noisy_layers=1",
    ];
    let (a, b) = whole_and_resumed("rtb", |dir, steps| train(dir, steps, &rtb), 20, 40);
    for key in ["loss", "exact_tv", "log_z", "true_log_z", "modes_found"] {
        assert!(a.get(key).is_some(), "summary lacks {key}: {a}");
        assert_eq!(a[key], b[key], "{key}");
    }
    let untilted = summary_of(&prior)["true_log_z"].as_f64().unwrap();
    let tilted = a["true_log_z"].as_f64().unwrap();
    assert!((tilted - untilted).abs() > 0.1, "{tilted} vs {untilted}");

    let out = scratch("trust-pcl");
    let pcl_prior = format!("loss.trust_pcl.prior={:?}", prior.to_str().unwrap());
    let pcl = [
        "--set",
        "loss.name=trust_pcl",
        "--set",
        &pcl_prior,
        "--set",
        "loss.trust_pcl.alpha=0.5",
    ];
    let result = train(&out, 10, &pcl);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let summary = summary_of(&out);
    let (v_soft, log_z) = (summary["v_soft_s0"].as_f64(), summary["log_z"].as_f64());
    assert!(
        (v_soft.unwrap() - 0.5 * log_z.unwrap()).abs() < 1e-6,
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&out);

    let mut other_env = vec!["train", "--out", out.to_str().unwrap()];
    other_env.extend_from_slice(&SMALL[4..]);
    other_env.extend_from_slice(SMALL_BITSEQ);
    other_env.extend_from_slice(&pcl);
    assert_clean_error(
        &gfn(&other_env),
        &["loss.trust_pcl.prior", "that run trained"],
    );
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(prior);
}

#[test]
fn the_env_section_is_the_named_environment_s_own() {
    let out = scratch("env-section");
    let config = out.with_extension("toml");
    // A section without a name is HyperGrid's; naming another one starts its keys afresh.
    std::fs::write(&config, "[env]\ndim = 2\nheight = 5\n").unwrap();
    let o = out.to_str().unwrap();
    let c = config.to_str().unwrap();
    let result = gfn(&[
        "train",
        "--out",
        o,
        "--config",
        c,
        "--set",
        "train.steps=2",
        "--set",
        "env.name=bitseq_append",
        "--set",
        "env.n=8",
        "--set",
        "env.k=2",
        "--set",
        "env.modes=2",
        "--set",
        "model.hidden=8",
        "--set",
        "train.eval_samples=100",
        "--device",
        "cpu",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let written = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        written.contains("name = \"bitseq_append\"") && written.contains("n = 8"),
        "{written}"
    );
    assert!(!written.contains("height"), "{written}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["env"], "bitseq_append n=8 k=2 modes=2");
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_file(config);
}

fn assert_clean_error(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    assert_eq!(
        stderr.trim_end().lines().last(),
        Some(line),
        "the error spans more than one line"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_naming_field_and_value() {
    let out = scratch("bad");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--set", "env.height=1"], &["env.height", "1"]),
        (&["--set", "env.dim=0"], &["env.dim", "0"]),
        (&["--set", "env.r0=0"], &["env.r0", "0"]),
        (&["--set", "env.r0=-1"], &["env.r0", "-1"]),
        (&["--set", "loss.name=foo"], &["loss.name", "foo"]),
        (
            &["--set", "sampling.batch_size=0"],
            &["sampling.batch_size", "0"],
        ),
        (&["--set", "env.hieght=3"], &["hieght"]),
        (&["--set", "optim.lr=-1"], &["optim.lr", "-1"]),
        (&["--device", "tpu"], &["train.device", "tpu"]),
        (&["--set", "env.name=sudoku"], &["env", "sudoku", "bitseq"]),
        (
            &["--set", "env.name=bitseq", "--set", "env.dim=3"],
            &["dim"],
        ),
        (
            &["--set", "env.name=bitseq", "--set", "env.k=7"],
            &["env.n", "120"],
        ),
        (
            &["--set", "env.name=bitseq", "--set", "loss.name=modified_db"],
            &["loss.name", "modified_db"],
        ),
        (
            &[
                "--set",
                "model.architecture=transformer",
                "--set",
                "model.transformer.width=10",
            ],
            &["model.transformer.width", "10"],
        ),
        // Sizes that would exhaust the machine are refused before anything is allocated.
        (
            &["--set", "sampling.batch_size=100000000"],
            &["sampling.batch_size", "100000000", "memory available"],
        ),
        (
            &["--set", "model.hidden=100000"],
            &["model.hidden", "100000", "parameters", "memory available"],
        ),
        (
            &["--set", "replay.capacity=1000", "--set", "replay.ratio=1e9"],
            &["replay.ratio", "1000000000", "one training batch"],
        ),
        (
            &["--set", "replay.capacity=100000000000"],
            &["replay.capacity", "100000000000", "replay buffer"],
        ),
        (
            &[
                "--set",
                "buffer.num_remote=1",
                "--set",
                "buffer.capacity=10000000000",
            ],
            &["buffer.capacity", "10000000000", "buffer rank"],
        ),
        (
            &["--set", "train.threads=100000"],
            &["train.threads", "100000", "per CPU"],
        ),
        (&["--set", "ddp.timeout_s=0"], &["ddp.timeout_s", "0"]),
        (
            &[
                "--set",
                "replay.policy=diverse",
                "--set",
                "replay.p_norm_distance=0",
            ],
            &["replay.p_norm_distance", "0"],
        ),
        (
            &[
                "--set",
                "buffer.num_remote=1",
                "--set",
                "buffer.p_norm_distance=-1",
            ],
            &["buffer.p_norm_distance", "-1"],
        ),
        (
            &["--set", "optim.max_grad_norm=-1"],
            &["optim.max_grad_norm", "-1"],
        ),
        (
            &[
                "--set",
                "loss.regression=linex",
                "--set",
                "loss.linex_alpha=0",
            ],
            &["loss.linex_alpha", "0"],
        ),
        // Checked whichever objective trains.
        (
            &["--set", "loss.subtb.lambda=0"],
            &["loss.subtb.lambda", "0"],
        ),
        (&["--set", "loss.name=rtb"], &["loss.rtb.prior", "not set"]),
        (
            &[
                "--set",
                "loss.name=rtb",
                "--set",
                "loss.rtb.prior='/no/such/run'",
            ],
            &["loss.rtb.prior", "/no/such/run", "config.toml"],
        ),
        (&["--set", "loss.rtb.beta=nan"], &["loss.rtb.beta", "NaN"]),
        (
            &["--set", "loss.trust_pcl.alpha=0"],
            &["loss.trust_pcl.alpha", "0"],
        ),
        (
            &["--set", "model.noisy_layers=3"],
            &["model.noisy_layers", "3", "model.layers = 2"],
        ),
        (
            &[
                "--set",
                "model.architecture=tabular",
                "--set",
                "model.noisy_layers=1",
            ],
            &["model.noisy_layers", "1", "mlp"],
        ),
    ];
    for (args, needles) in cases {
        let mut full = vec!["train", "--out", o];
        full.extend_from_slice(args);
        assert_clean_error(&gfn(&full), needles);
    }
    let config = out.with_extension("toml");
    std::fs::write(&config, "[loss]\nname = \"tb\"\nlamda = 0.9\n").unwrap();
    assert_clean_error(
        &gfn(&["train", "--out", o, "--config", config.to_str().unwrap()]),
        &["lamda"],
    );
    let _ = std::fs::remove_file(config);
}

#[test]
fn checkpoint_and_output_problems_are_reported() {
    let missing = scratch("missing");
    assert_clean_error(
        &gfn(&["train", "--resume", missing.to_str().unwrap()]),
        &[missing.to_str().unwrap()],
    );

    let corrupt = scratch("corrupt");
    assert!(train(&corrupt, 10, &[]).status.success());
    std::fs::write(corrupt.join("checkpoint.pt"), b"not a checkpoint").unwrap();
    assert_clean_error(
        &gfn(&[
            "train",
            "--resume",
            corrupt.to_str().unwrap(),
            "--set",
            "train.steps=20",
        ]),
        &["checkpoint.pt", "corrupt"],
    );

    let file = scratch("file");
    std::fs::write(&file, b"").unwrap();
    let unwritable = file.join("run");
    assert_clean_error(
        &train(&unwritable, 10, &[]),
        &["--out", unwritable.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(corrupt);
    let _ = std::fs::remove_file(file);
}
