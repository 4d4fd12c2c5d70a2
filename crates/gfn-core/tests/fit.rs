//! The library's training loop with one process: evaluations and checkpoints when due, a stop
//! request answered after the current step with a checkpoint, and a run resumed from it that
//! ends bitwise where an uninterrupted run ends; the memory bound refuses what cannot fit.

mod common;

use gfn_core::checkpoint::RunIdentity;
use gfn_core::env::{HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::fit::{self, Alone, Checkpointing, Ending, Hooks, LocalReplay, Schedule, StepReport};
use gfn_core::train::{Evaluation, TrainConfig, TrainState};
use std::path::Path;
use tch::Device;

/// Local replay on: its buffer and sampling are part of what a resume restores.
fn config(hidden: usize, memory_budget: Option<u64>) -> TrainConfig {
    TrainConfig {
        memory_budget,
        seed: 5,
        ..common::small_tb_config(hidden, 200)
    }
}

fn env() -> Box<HyperGrid> {
    Box::new(HyperGrid::new(HyperGridConfig::new(2, 5, RewardPreset::Standard)).unwrap())
}

fn state() -> TrainState {
    TrainState::new(env(), config(32, None), Device::Cpu, 0).unwrap()
}

/// Records what the loop reported; asks to stop once `stop_after` steps are done.
#[derive(Default)]
struct Recorder {
    steps: Vec<u64>,
    evaluations: Vec<u64>,
    stop_after: Option<u64>,
}

impl Hooks for Recorder {
    fn stop_requested(&self) -> bool {
        self.stop_after
            .is_some_and(|s| self.steps.last().copied().unwrap_or(0) >= s)
    }
    fn after_step(&mut self, _: &TrainState, report: &StepReport) -> gfn_core::Result<()> {
        self.steps.push(report.step);
        Ok(())
    }
    fn after_evaluation(
        &mut self,
        _: &TrainState,
        report: &StepReport,
        _: &Evaluation,
    ) -> gfn_core::Result<()> {
        self.evaluations.push(report.step);
        Ok(())
    }
}

fn schedule(path: &Path, steps: u64) -> Schedule {
    Schedule {
        steps,
        evaluate_every: 10,
        checkpoint_every: 0,
        checkpoint: Some(Checkpointing {
            path: path.to_path_buf(),
            identity: RunIdentity {
                world_size: 1,
                settings: vec![("env.height".into(), "5".into())],
            },
        }),
    }
}

#[test]
fn a_stopped_and_resumed_loop_ends_bitwise_where_an_uninterrupted_one_does() {
    let dir = std::env::temp_dir().join(format!("gfn-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (whole_path, part_path) = (dir.join("whole.pt"), dir.join("part.pt"));

    let mut whole = state();
    let mut hooks = Recorder::default();
    let report = fit::fit(
        &mut whole,
        &mut Alone,
        &mut LocalReplay,
        &mut hooks,
        &schedule(&whole_path, 30),
    )
    .unwrap();
    assert_eq!(report.ending, Ending::Finished);
    assert_eq!(hooks.steps, (1..=30).collect::<Vec<_>>());
    assert_eq!(hooks.evaluations, vec![10, 20, 30]);
    assert!(report.last_eval.is_some() && whole_path.exists());

    // Asked to stop once step 13 is done: the loop stops before step 14, with a checkpoint.
    let mut part = state();
    let mut hooks = Recorder {
        stop_after: Some(13),
        ..Default::default()
    };
    let report = fit::fit(
        &mut part,
        &mut Alone,
        &mut LocalReplay,
        &mut hooks,
        &schedule(&part_path, 30),
    )
    .unwrap();
    assert_eq!(report.ending, Ending::Stopped { step: 13 });
    assert_eq!(part.step, 13);

    let mut resumed = state();
    let plan = schedule(&part_path, 30);
    fit::resume(&mut resumed, &mut Alone, plan.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(resumed.step, 13);
    let mut hooks = Recorder::default();
    fit::fit(
        &mut resumed,
        &mut Alone,
        &mut LocalReplay,
        &mut hooks,
        &plan,
    )
    .unwrap();
    assert_eq!(hooks.steps.first(), Some(&14));
    assert_eq!(
        resumed.estimators.params.to_vec(),
        whole.estimators.params.to_vec(),
        "resumed parameters differ from the uninterrupted run's"
    );

    // Already at its last step: nothing to train, still evaluated and saved.
    let report = fit::fit(
        &mut resumed,
        &mut Alone,
        &mut LocalReplay,
        &mut Recorder::default(),
        &plan,
    )
    .unwrap();
    assert_eq!(report.ending, Ending::Finished);
    assert!(report.last_eval.is_some());
    // A schedule that ends before the checkpoint's step is refused by name.
    let err = fit::fit(
        &mut resumed,
        &mut Alone,
        &mut LocalReplay,
        &mut Recorder::default(),
        &schedule(&part_path, 5),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("invalid train.steps = 5"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_model_larger_than_the_memory_budget_is_refused_before_it_is_allocated() {
    // Two 512-wide MLPs of two hidden layers on a 2×5 grid (one-hot input of 10): P_F
    // 10·512+512 + 512·512+512 + 512·3+3 = 269,827, P_B 269,314 (2 outputs), log Z 1: 539,142
    // parameters at 20 bytes (value, gradient, two moments, host copy) = 10.3 MiB, more than the
    // 8 MB budget; the batch (12 trajectories of at most 9 states) needs far less.
    let err = TrainState::new(env(), config(512, Some(8_000_000)), Device::Cpu, 0)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.starts_with("invalid model.hidden = 512: the run would need about")
            && err.contains("(parameters, gradients and Adam moments 10.3 MiB)"),
        "{err}"
    );
    assert!(TrainState::new(env(), config(512, Some(1 << 30)), Device::Cpu, 0).is_ok());
}
