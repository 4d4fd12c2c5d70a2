//! `gfn bench`: steps/s and trajectories/s of single-rank training over a grid of settings,
//! with the split between sampling (rollouts) and the update (loss, backward, optimizer).

use crate::config::Config;
use crate::run::build_state;
use anyhow::Result;
use gfn_core::train::NoReduction;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub grid: String,
    pub batch: usize,
    pub loss: String,
    pub steps: u64,
    pub steps_per_s: f64,
    pub trajectories_per_s: f64,
    pub sample_ms: f64,
    pub update_ms: f64,
}

pub struct BenchPlan {
    pub grids: Vec<(usize, usize)>,
    pub batches: Vec<usize>,
    pub losses: Vec<String>,
    pub warmup: u64,
    pub seconds: f64,
    pub overrides: Vec<String>,
}

pub fn run(plan: &BenchPlan) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &(dim, height) in &plan.grids {
        for &batch in &plan.batches {
            for loss in &plan.losses {
                let mut overrides = vec![
                    format!("env.dim={dim}"),
                    format!("env.height={height}"),
                    format!("sampling.batch_size={batch}"),
                    format!("loss.name={loss}"),
                ];
                overrides.extend(plan.overrides.iter().cloned());
                let config = Config::default().with_overrides(&overrides)?;
                let mut state = build_state(&config, Path::new("."), false, config.device()?, 0)?;
                let mut reducer = NoReduction;
                for _ in 0..plan.warmup {
                    state.train_step(&mut reducer)?;
                }
                let (mut sample_s, mut update_s, mut steps) = (0.0, 0.0, 0u64);
                let started = Instant::now();
                while started.elapsed().as_secs_f64() < plan.seconds || steps < 5 {
                    let t = Instant::now();
                    let (batch, _) = state.sample_batch();
                    sample_s += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    state.update(&batch, &mut reducer)?;
                    update_s += t.elapsed().as_secs_f64();
                    steps += 1;
                }
                let total = sample_s + update_s;
                let row = BenchRow {
                    grid: format!("{dim}x{height}"),
                    batch,
                    loss: loss.clone(),
                    steps,
                    steps_per_s: steps as f64 / total,
                    trajectories_per_s: (steps as usize * batch) as f64 / total,
                    sample_ms: 1e3 * sample_s / steps as f64,
                    update_ms: 1e3 * update_s / steps as f64,
                };
                tracing::info!(
                    "{} batch {} {}: {:.1} steps/s",
                    row.grid,
                    row.batch,
                    row.loss,
                    row.steps_per_s
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = String::from("| grid | batch | loss | steps/s | trajectories/s | sample ms/step | update ms/step |\n|---|---:|---|---:|---:|---:|---:|\n");
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.2} |\n",
            r.grid, r.batch, r.loss, r.steps_per_s, r.trajectories_per_s, r.sample_ms, r.update_ms
        );
    }
    out
}
