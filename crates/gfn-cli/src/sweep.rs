//! `gfn sweep`: every config × seed trained in turn (one run directory each; finished runs are
//! kept, so an interrupted sweep continues where it stopped), then a markdown table of final
//! metrics, mean ± std over seeds: exact TV and L1 (where the environment has an exact
//! target), modes found, the test-set Spearman correlation (where it has a test set), and the
//! trajectories needed to reach an exact-TV threshold.

use crate::config::Config;
use crate::run::{self, METRICS_FILE, SUMMARY_FILE};
use crate::rundir::OutMode;
use anyhow::{bail, Context, Result};
use gfn_ddp::world::World;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub struct SweepPlan {
    pub configs: Vec<PathBuf>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub overrides: Vec<String>,
    pub tv_threshold: f64,
}

pub const TABLE_FILE: &str = "sweep.md";

/// Final metrics of one config over its seeds.
#[derive(Debug, Serialize)]
pub struct Row {
    pub setting: String,
    pub seeds: usize,
    pub exact_tv: Option<(f64, f64)>,
    pub exact_l1: Option<(f64, f64)>,
    pub modes_found: (f64, f64),
    pub spearman: Option<(f64, f64)>,
    pub n_modes: usize,
    /// Mean ± std over the seeds that reached the threshold, and how many did.
    pub trajectories_to_threshold: Option<(f64, f64)>,
    pub reached: usize,
}

/// Mean ± std of a metric every seed reported; `None` where the runs did not measure it.
fn reported(values: &[f64], seeds: usize) -> Option<(f64, f64)> {
    (values.len() == seeds && seeds > 0).then(|| mean_std(values))
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Trajectories at the first evaluation whose exact TV is at most `threshold`.
fn trajectories_to(dir: &Path, threshold: f64) -> Result<Option<f64>> {
    let text = std::fs::read_to_string(dir.join(METRICS_FILE))
        .with_context(|| format!("reading {}", dir.join(METRICS_FILE).display()))?;
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line)?;
        if value["exact_tv"].as_f64().is_some_and(|tv| tv <= threshold) {
            return Ok(value["trajectories"].as_f64());
        }
    }
    Ok(None)
}

fn read_summary(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE)).ok()?).ok()
}

pub fn run(plan: &SweepPlan) -> Result<Vec<Row>> {
    if plan.configs.is_empty() || plan.seeds.is_empty() {
        bail!("gfn sweep needs at least one --config and one seed");
    }
    let mut rows = Vec::new();
    for path in &plan.configs {
        let base = Config::from_file(path)
            .context("--config")?
            .with_overrides(&plan.overrides)?;
        let setting = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into(),
        );
        let mut summaries = Vec::new();
        let mut reached = Vec::new();
        for &seed in &plan.seeds {
            let config = base
                .clone()
                .with_overrides(&[format!("train.seed={seed}")])?;
            let dir = plan.out.join(&setting).join(format!("seed-{seed}"));
            let done =
                read_summary(&dir).is_some_and(|s| s["steps"].as_u64() == Some(config.train.steps));
            if done {
                tracing::info!("{setting} seed {seed}: already done in {}", dir.display());
            } else {
                tracing::info!("{setting} seed {seed}: training in {}", dir.display());
                let _ = std::fs::remove_dir_all(&dir);
                let request = run::TrainRequest {
                    config,
                    out: dir.clone(),
                    mode: OutMode::Fresh,
                };
                if let run::Outcome::Stopped { step } = run::train(request, &mut World::single())? {
                    bail!("{setting} seed {seed}: stopped by a signal after step {step}");
                }
            }
            let summary = read_summary(&dir)
                .with_context(|| format!("no {SUMMARY_FILE} in {}", dir.display()))?;
            reached.extend(trajectories_to(&dir, plan.tv_threshold)?);
            summaries.push(summary);
        }
        let field =
            |key: &str| -> Vec<f64> { summaries.iter().filter_map(|s| s[key].as_f64()).collect() };
        let exact_tv = field("exact_tv");
        let exact_l1: Vec<f64> = exact_tv.iter().map(|tv| 2.0 * tv).collect();
        let seeds = summaries.len();
        rows.push(Row {
            setting,
            seeds,
            exact_tv: reported(&exact_tv, seeds),
            exact_l1: reported(&exact_l1, seeds),
            modes_found: mean_std(&field("modes_found")),
            spearman: reported(&field("spearman"), seeds),
            n_modes: summaries[0]["n_modes"].as_u64().unwrap_or(0) as usize,
            trajectories_to_threshold: (!reached.is_empty()).then(|| mean_std(&reached)),
            reached: reached.len(),
        });
    }
    let table = markdown(&rows, plan.tv_threshold);
    std::fs::write(plan.out.join(TABLE_FILE), &table)
        .with_context(|| format!("writing {}", plan.out.join(TABLE_FILE).display()))?;
    std::fs::write(
        plan.out.join("sweep.json"),
        serde_json::to_string_pretty(&rows)? + "\n",
    )?;
    Ok(rows)
}

pub fn markdown(rows: &[Row], threshold: f64) -> String {
    let mut out = format!(
        "| setting | seeds | exact TV | exact L1 | modes found | Spearman | trajectories to exact TV ≤ {threshold} |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    let cell = |v: Option<(f64, f64)>| {
        v.map_or_else(|| "–".to_string(), |(m, s)| format!("{m:.4} ± {s:.4}"))
    };
    for r in rows {
        let to_threshold = match r.trajectories_to_threshold {
            Some((mean, std)) if r.reached == r.seeds => format!("{mean:.0} ± {std:.0}"),
            Some((mean, std)) => format!("{mean:.0} ± {std:.0} ({}/{} seeds)", r.reached, r.seeds),
            None if r.exact_tv.is_none() => "–".to_string(),
            None => format!("not reached (0/{})", r.seeds),
        };
        out += &format!(
            "| {} | {} | {} | {} | {:.1} ± {:.1} of {} | {} | {} |\n",
            r.setting,
            r.seeds,
            cell(r.exact_tv),
            cell(r.exact_l1),
            r.modes_found.0,
            r.modes_found.1,
            r.n_modes,
            cell(r.spearman),
            to_threshold
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_standard_deviation() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }

    #[test]
    fn the_table_says_how_many_seeds_reached_the_threshold() {
        let row = |reached, t| Row {
            setting: "x".into(),
            seeds: 3,
            exact_tv: Some((0.01, 0.001)),
            exact_l1: Some((0.02, 0.002)),
            modes_found: (4.0, 0.0),
            spearman: None,
            n_modes: 4,
            trajectories_to_threshold: t,
            reached,
        };
        let table = markdown(
            &[
                row(3, Some((800.0, 10.0))),
                row(2, Some((900.0, 5.0))),
                row(0, None),
            ],
            0.05,
        );
        assert!(table.contains(
            "| x | 3 | 0.0100 ± 0.0010 | 0.0200 ± 0.0020 | 4.0 ± 0.0 of 4 | – | 800 ± 10 |"
        ));
        assert!(table.contains("900 ± 5 (2/3 seeds)"));
        assert!(table.contains("not reached (0/3)"));
    }
}
