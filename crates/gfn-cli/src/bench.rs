//! `gfn bench`: steps/s and trajectories/s of single-rank training over environments, batch
//! sizes and losses, with the split between sampling (rollouts) and the update (loss,
//! backward, optimizer).

use crate::config::Config;
use crate::run::build_state;
use anyhow::Result;
use gfn_core::train::NoReduction;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub env: String,
    pub batch: usize,
    pub loss: String,
    pub steps: u64,
    pub steps_per_s: f64,
    pub trajectories_per_s: f64,
    pub sample_ms: f64,
    pub update_ms: f64,
}

pub struct BenchPlan {
    /// Each environment as the `--set` overrides that select it.
    pub envs: Vec<Vec<String>>,
    pub batches: Vec<usize>,
    pub losses: Vec<String>,
    pub warmup: u64,
    pub seconds: f64,
    pub overrides: Vec<String>,
}

pub fn run(plan: &BenchPlan) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for env in &plan.envs {
        for &batch in &plan.batches {
            for loss in &plan.losses {
                let mut overrides = env.clone();
                overrides.push(format!("sampling.batch_size={batch}"));
                overrides.push(format!("loss.name={loss}"));
                overrides.extend(plan.overrides.iter().cloned());
                let config = Config::default().with_overrides(&overrides)?;
                let mut state = build_state(&config, config.device()?, 0)?;
                let mut reducer = NoReduction;
                for _ in 0..plan.warmup {
                    state.train_step(&mut reducer)?;
                }
                let env_name = state.env.describe();
                let (mut sample_s, mut update_s, mut steps) = (0.0, 0.0, 0u64);
                let started = Instant::now();
                while started.elapsed().as_secs_f64() < plan.seconds || steps < 5 {
                    let t = Instant::now();
                    let (batch, _) = state.sample_batch()?;
                    sample_s += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    state.update(&batch, &mut reducer)?;
                    update_s += t.elapsed().as_secs_f64();
                    steps += 1;
                }
                let total = sample_s + update_s;
                let row = BenchRow {
                    env: env_name,
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
                    row.env,
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
    let mut out = String::from("| env | batch | loss | steps/s | trajectories/s | sample ms/step | update ms/step |\n|---|---:|---|---:|---:|---:|---:|\n");
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.2} |\n",
            r.env, r.batch, r.loss, r.steps_per_s, r.trajectories_per_s, r.sample_ms, r.update_ms
        );
    }
    out
}

/// `--env NAME[:KEY=VALUE,...]` as `--set` overrides, e.g. `hypergrid:dim=2,height=64` or
/// `bitseq:n=120,k=8`.
pub fn env_overrides(spec: &str) -> Vec<String> {
    let (name, keys) = spec.split_once(':').unwrap_or((spec, ""));
    std::iter::once(format!("env.name={name:?}"))
        .chain(
            keys.split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| format!("env.{kv}")),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_specs_become_overrides() {
        assert_eq!(
            env_overrides("hypergrid:dim=2,height=64"),
            ["env.name=\"hypergrid\"", "env.dim=2", "env.height=64"]
        );
        assert_eq!(env_overrides("bitseq"), ["env.name=\"bitseq\""]);
    }
}
