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
            let eval_part = eval.map_or(String::new(), |e| {
                format!(
                    " exact_tv {:.4} modes {}/{}",
                    e.distribution.exact_tv, e.modes_found, e.n_modes
                )
            });
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
        let d = &eval.distribution;
        let line = format!(
            "eval step {step}: l1 {:.4} tv {:.4} kl {:.4} exact_tv {:.4} exact_kl {:.4} modes {}/{} log_z {:.4} (true {:.4})",
            d.l1, d.tv, d.kl, d.exact_tv, d.exact_kl, eval.modes_found, eval.n_modes, eval.log_z, eval.true_log_z
        );
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
