//! Progress of a long run: a progress bar on a terminal, periodic log lines otherwise.

use gfn_core::train::Evaluation;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between log lines when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_line: Instant,
}

impl Progress {
    pub fn new(start: u64, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar.set_position(start);
            bar
        });
        Progress {
            bar,
            total,
            last_line: Instant::now(),
        }
    }

    pub fn step(
        &mut self,
        step: u64,
        trajectories: u64,
        loss: f64,
        steps_per_s: f64,
        trajectories_per_s: f64,
        eval: Option<&Evaluation>,
    ) {
        let message = || {
            let eval_part = eval.map_or(String::new(), |e| format!(" {}", headline(e)));
            format!(
                "loss {loss:.4} {steps_per_s:.1} steps/s {trajectories_per_s:.0} traj/s{eval_part}"
            )
        };
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                if step.is_multiple_of(16) || step == self.total {
                    bar.set_message(message());
                }
            }
            None if self.last_line.elapsed() >= LOG_INTERVAL => {
                self.last_line = Instant::now();
                tracing::info!(
                    "step {step}/{} trajectories {trajectories} {}",
                    self.total,
                    message()
                );
            }
            None => {}
        }
    }

    pub fn evaluation(&self, step: u64, eval: &Evaluation) {
        let shown: Vec<String> = eval
            .values
            .iter()
            .filter(|(k, _)| k.as_str() != "n_modes")
            .map(|(k, v)| match k.as_str() {
                "modes_found" => format!("modes {v}/{}", eval.get("n_modes").unwrap_or(f64::NAN)),
                _ if v.fract() == 0.0 && v.abs() < 1e15 => format!("{k} {v}"),
                _ => format!("{k} {v:.4}"),
            })
            .collect();
        let line = format!("eval step {step}: {}", shown.join(" "));
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{line}")),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The few values of an evaluation that a progress line has room for: the distance to the
/// target where it is known, else the test-set correlation, and the modes found.
fn headline(eval: &Evaluation) -> String {
    let mut parts = Vec::new();
    for key in ["exact_tv", "spearman"] {
        if let Some(v) = eval.get(key) {
            parts.push(format!("{key} {v:.4}"));
            break;
        }
    }
    if let (Some(found), Some(n)) = (eval.get("modes_found"), eval.get("n_modes")) {
        parts.push(format!("modes {found}/{n}"));
    }
    parts.join(" ")
}
