//! Where a run's time goes, phase by phase (torchgfn's `--timing`): the update adds its
//! phases, the communicator its collectives, the training loop sampling, evaluation and
//! checkpoints. Host-side wall time: on a GPU, kernels still running when a phase ends are
//! counted in the phase that waits for them.

use serde::ser::{Serialize, SerializeMap, Serializer};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Rolling out fresh trajectories and drawing replayed ones.
    pub sampling: Duration,
    /// The networks' forward pass and the loss.
    pub loss: Duration,
    pub backward: Duration,
    /// The gradient collectives themselves.
    pub all_reduce: Duration,
    /// Waiting, before them, for the rank with the longest trajectories.
    pub rank_wait: Duration,
    /// The optimizer step (and the finiteness checks around it).
    pub optimizer: Duration,
    pub evaluation: Duration,
    pub checkpoint: Duration,
}

impl PhaseTimes {
    /// Every phase by name, in the order of a step.
    pub fn phases(&self) -> [(&'static str, Duration); 8] {
        [
            ("sampling", self.sampling),
            ("loss", self.loss),
            ("backward", self.backward),
            ("all_reduce", self.all_reduce),
            ("rank_wait", self.rank_wait),
            ("optimizer", self.optimizer),
            ("evaluation", self.evaluation),
            ("checkpoint", self.checkpoint),
        ]
    }

    /// `time_<phase>_s` and `time_<phase>_ms_per_step` over `steps` steps.
    pub fn fields(&self, steps: u64) -> Vec<(String, f64)> {
        self.phases()
            .into_iter()
            .flat_map(|(name, d)| {
                [
                    (format!("time_{name}_s"), d.as_secs_f64()),
                    (format!("time_{name}_ms_per_step"), per_step_ms(d, steps)),
                ]
            })
            .collect()
    }

    /// The phases as an aligned table: seconds, ms per step and share of their total.
    pub fn table(&self, steps: u64) -> String {
        let total: f64 = self.phases().iter().map(|(_, d)| d.as_secs_f64()).sum();
        let mut out = format!(
            "{:<11} {:>9} {:>11} {:>6}\n",
            "phase", "s", "ms/step", "share"
        );
        for (name, d) in self.phases() {
            let share = if total > 0.0 {
                100.0 * d.as_secs_f64() / total
            } else {
                0.0
            };
            out += &format!(
                "{name:<11} {:>9.3} {:>11.3} {share:>5.1}%\n",
                d.as_secs_f64(),
                per_step_ms(d, steps)
            );
        }
        out
    }
}

/// A run's phase times over its `steps` steps: serialises as the [`PhaseTimes::fields`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseSummary {
    pub times: PhaseTimes,
    pub steps: u64,
}

impl PhaseSummary {
    pub fn table(&self) -> String {
        self.times.table(self.steps)
    }
}

impl Serialize for PhaseSummary {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.times.fields(self.steps);
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for (key, value) in &fields {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

fn per_step_ms(d: Duration, steps: u64) -> f64 {
    if steps == 0 {
        0.0
    } else {
        1e3 * d.as_secs_f64() / steps as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_table_show_every_phase_per_step() {
        let times = PhaseTimes {
            sampling: Duration::from_millis(300),
            loss: Duration::from_millis(100),
            ..Default::default()
        };
        let fields = times.fields(10);
        assert_eq!(fields.len(), 16);
        assert_eq!(fields[0], ("time_sampling_s".into(), 0.3));
        assert!((fields[1].1 - 30.0).abs() < 1e-9);
        let table = times.table(10);
        assert!(
            table.contains("sampling        0.300      30.000  75.0%"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 9);
        assert_eq!(PhaseTimes::default().fields(0)[1].1, 0.0);
        let json = serde_json::to_value(PhaseSummary { times, steps: 10 }).unwrap();
        assert_eq!(json["time_sampling_s"], 0.3);
        assert_eq!(json.as_object().unwrap().len(), 16);
    }
}
