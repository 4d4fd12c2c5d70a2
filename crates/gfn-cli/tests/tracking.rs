//! What a run leaves for people to look at: TensorBoard event files (read back with Python's
//! `tensorboard`), the W&B upload or the command for it, and PNG plots.

mod common;

use common::{assert_ok, bare_gfn, scratch};
use std::path::{Path, PathBuf};
use std::process::Output;

fn short_run(out: &Path, extra: &[&str]) -> Output {
    bare_gfn()
        .args(["train", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "env.dim=2",
            "--set",
            "train.steps=200",
            "--set",
            "train.validate_every=50",
            "--set",
            "train.log_every=20",
            "--set",
            "train.eval_samples=2000",
            "--device",
            "cpu",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
}

#[test]
fn tensorboard_reads_back_every_metric_at_every_evaluation() {
    let out = scratch("tensorboard");
    assert_ok(&short_run(&out, &[]));
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let result = std::process::Command::new(venv_python())
        .args(["-c", script, out.to_str().unwrap()])
        .output()
        .expect("the project venv's python (./launch/test.sh installs tensorboard into it)");
    assert_ok(&result);
    let scalars: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        for (key, value) in line.as_object().unwrap() {
            let Some(expected) = value.as_f64().filter(|_| key != "step") else {
                continue;
            };
            let point = &scalars[key][i];
            assert_eq!(point[0], line["step"], "{key}");
            let read = point[1].as_f64().unwrap();
            let tolerance = 1e-6 * expected.abs().max(1.0);
            assert!(
                (read - expected).abs() <= tolerance,
                "{key}: {read} vs {expected}"
            );
        }
    }
    let loss_steps: Vec<u64> = scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(loss_steps, (1..=10).map(|k| 20 * k).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn without_a_logged_in_wandb_the_upload_command_is_printed() {
    let out = scratch("wandb-offline");
    let empty_path = scratch("wandb-offline-path");
    std::fs::create_dir_all(&empty_path).unwrap();
    let mut command = bare_gfn();
    command.env("PATH", &empty_path).env_remove("WANDB_API_KEY");
    let result = command
        .args(["train", "--out", out.to_str().unwrap()])
        .args(["--set", "env.dim=2", "--set", "train.steps=20"])
        .args(["--set", "train.eval_samples=500", "--device", "cpu"])
        .args(["--wandb-project", "gfn-tests", "--wandb-run-name", "run 1"])
        .output()
        .unwrap();
    assert_ok(&result);
    let stdout = String::from_utf8_lossy(&result.stdout);
    let expected = format!(
        "WANDB_NAME='run 1' wandb sync --sync-tensorboard -p gfn-tests --id run-1 {}",
        out.display()
    );
    assert!(
        stdout.contains("the wandb CLI is not installed") && stdout.contains(&expected),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn with_a_logged_in_wandb_the_run_is_synced() {
    let out = scratch("wandb-online");
    let bin = scratch("wandb-online-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = bin.join("invocation");
    // A stand-in CLI that records how it was called.
    let fake = bin.join("wandb");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$WANDB_NAME|$*\" > {}\n",
            record.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = bare_gfn();
    command
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("WANDB_API_KEY", "test-key")
        .env_remove("WANDB_MODE");
    let result = command
        .args(["train", "--out", out.to_str().unwrap()])
        .args(["--set", "env.dim=2", "--set", "train.steps=20"])
        .args(["--set", "train.eval_samples=500", "--device", "cpu"])
        .args([
            "--wandb-project",
            "p",
            "--wandb-entity",
            "lab",
            "--wandb-run-name",
            "r1",
        ])
        .output()
        .unwrap();
    assert_ok(&result);
    assert!(String::from_utf8_lossy(&result.stdout).contains("W&B: uploaded"));
    let invocation = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        invocation.trim(),
        format!(
            "r1|sync --sync-tensorboard -p p -e lab --id r1 {}",
            out.display()
        )
    );
    assert!(std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(bin);
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (word(16), word(20))
}

#[test]
fn a_run_ends_with_plots_and_gfn_plot_redraws_them() {
    let out = scratch("plots");
    let result = short_run(&out, &[]);
    assert_ok(&result);
    let curves = out.join("curves.png");
    let distribution = out.join("distribution.png");
    // Rows of two panels (against steps and seconds): the distance to the target, the modes
    // found; then the loss.
    assert_eq!(png_size(&curves), (1100, 3 * 380));
    assert_eq!(png_size(&distribution), (1000, 520));
    std::fs::remove_file(&curves).unwrap();
    std::fs::remove_file(&distribution).unwrap();
    let redraw = bare_gfn()
        .args(["plot", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&redraw);
    assert!(curves.exists() && distribution.exists());
    // A run directory without metrics gets a clear error.
    let empty = scratch("plots-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let failed = bare_gfn()
        .args(["plot", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("metrics.jsonl"));
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(empty);
}

#[test]
fn a_sweep_tabulates_every_config_over_its_seeds_and_resumes() {
    let out = scratch("sweep");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sweep");
    let sweep = || {
        bare_gfn()
            .args(["sweep", "--seeds", "0,1", "--out", out.to_str().unwrap()])
            .arg("--config")
            .args(["hypergrid-2x8-tb.toml", "hypergrid-2x8-db.toml"].map(|c| configs.join(c)))
            .args([
                "--set",
                "train.steps=100",
                "--set",
                "train.validate_every=50",
            ])
            .args([
                "--set",
                "train.eval_samples=1000",
                "--set",
                "train.threads=1",
            ])
            .args(["--tv-threshold", "0.9"])
            .output()
            .unwrap()
    };
    let first = sweep();
    assert_ok(&first);
    let table = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| hypergrid"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    // Each row: the mean over the two runs' own summaries.
    for (row, name) in rows.iter().zip(["hypergrid-2x8-tb", "hypergrid-2x8-db"]) {
        let tvs: Vec<f64> = (0..2)
            .map(|s| {
                common::summary(&out.join(name).join(format!("seed-{s}")))["exact_tv"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let mean = (tvs[0] + tvs[1]) / 2.0;
        assert!(
            row.starts_with(&format!("| {name} | 2 | {mean:.4} ± ")),
            "{row} vs {mean}"
        );
        // Exact TV ≤ 0.9 holds from the first evaluation (50 steps of 16 trajectories).
        assert!(row.ends_with("| 800 ± 0 |"), "{row}");
    }
    // Run again: every run is already done, so nothing is retrained and the table is the same.
    let summary_file = out.join("hypergrid-2x8-tb/seed-0/summary.json");
    let written = std::fs::metadata(&summary_file)
        .unwrap()
        .modified()
        .unwrap();
    let second = sweep();
    assert_ok(&second);
    assert_eq!(
        std::fs::metadata(&summary_file)
            .unwrap()
            .modified()
            .unwrap(),
        written
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sweep.md")).unwrap(),
        table
    );
    let _ = std::fs::remove_dir_all(out);
}
