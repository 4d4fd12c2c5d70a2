//! What a diverging run and a damaged checkpoint do: a non-finite gradient (here injected by the
//! gradient hook, as another rank's NaN would arrive) skips the update without touching the
//! parameters or the optimizer, and stops training with an error naming the step once more than
//! `max_nonfinite_steps` come in a row; a checkpoint is never written from non-finite values,
//! and one whose bytes changed is refused by its checksum.

mod common;

use gfn_core::checkpoint::{self, RunIdentity};
use gfn_core::env::{HyperGrid, HyperGridConfig, RewardPreset};
use gfn_core::optim::ReducedGradient;
use gfn_core::train::{GradientReducer, NoReduction, TrainConfig, TrainState};
use gfn_core::Error;
use tch::{Device, Tensor};

fn state(max_nonfinite_steps: u64) -> TrainState {
    state_of_width(max_nonfinite_steps, 32)
}

fn state_of_width(max_nonfinite_steps: u64, hidden: usize) -> TrainState {
    let config = TrainConfig {
        max_nonfinite_steps,
        ..common::small_tb_config(hidden, 0)
    };
    let env = HyperGrid::new(HyperGridConfig::new(2, 5, RewardPreset::Standard)).unwrap();
    TrainState::new(Box::new(env), config, Device::Cpu, 0).unwrap()
}

/// The gradient hook of one rank whose peers sent a NaN at the given steps (1-based): a rank
/// with a non-finite loss or gradient fills its whole gradient with NaN before the sum.
struct PoisonAt(Vec<u64>, u64);

impl GradientReducer for PoisonAt {
    fn reduce_sum(&mut self, grad: &mut Tensor) -> gfn_core::Result<ReducedGradient> {
        self.1 += 1;
        if self.0.contains(&self.1) {
            let _ = grad.fill_(f64::NAN);
        }
        Ok(ReducedGradient::whole(grad.numel()))
    }
    fn gather_shares(&mut self, _flat: &mut Tensor) -> gfn_core::Result<()> {
        Ok(())
    }
}

fn moments(s: &mut TrainState) -> Vec<f32> {
    let [m, v] = s.optimizer.moments_mut();
    [m, v]
        .iter()
        .flat_map(|t| Vec::<f32>::try_from(&**t).unwrap())
        .collect()
}

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gfn-divergence-{}-{name}.pt", std::process::id()))
}

#[test]
fn a_non_finite_gradient_skips_the_update_and_then_stops_training() {
    let mut s = state(1);
    let mut hook = PoisonAt(vec![3, 5, 6], 0);
    for _ in 0..2 {
        assert!(!s.train_step(&mut hook).unwrap().skipped);
    }
    let (params, moments_before, steps) = (
        s.estimators.params.to_vec(),
        moments(&mut s),
        s.optimizer.steps(),
    );
    let skipped = s.train_step(&mut hook).unwrap();
    assert!(skipped.skipped);
    assert_eq!(s.step, 3);
    assert_eq!(
        s.estimators.params.to_vec(),
        params,
        "a skipped update moved the parameters"
    );
    assert_eq!(moments(&mut s), moments_before);
    assert_eq!(
        s.optimizer.steps(),
        steps,
        "a skipped update counted for Adam's bias correction"
    );
    // A good step resets the count; then two in a row exceed max_nonfinite_steps = 1.
    assert!(!s.train_step(&mut hook).unwrap().skipped);
    assert!(s.train_step(&mut hook).unwrap().skipped);
    let err = s.train_step(&mut hook).unwrap_err();
    assert!(matches!(err, Error::NonFinite { step: 6, .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("step 6") && message.contains("2 updates in a row"),
        "{message}"
    );
    assert!(checkpoint::save(&s, &scratch("after-stop"), &RunIdentity::default()).is_ok());
    let _ = std::fs::remove_file(scratch("after-stop"));
}

#[test]
fn with_no_skips_allowed_the_first_non_finite_gradient_stops_training() {
    let mut s = state(0);
    let err = s.train_step(&mut PoisonAt(vec![1], 0)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("step 1: another rank's loss or gradient is non-finite"),
        "{err}"
    );
}

#[test]
fn non_finite_parameters_never_replace_a_good_checkpoint() {
    let mut s = state(0);
    s.train_step(&mut NoReduction).unwrap();
    let path = scratch("good");
    checkpoint::save(&s, &path, &RunIdentity::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut poisoned = s.estimators.params.to_vec();
    poisoned[11] = f32::INFINITY;
    s.estimators
        .params
        .copy_from(&Tensor::from_slice(&poisoned));
    let err = checkpoint::save(&s, &path, &RunIdentity::default()).unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the good checkpoint changed"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_checkpoint_with_changed_bytes_is_refused_and_an_intact_one_restores_exactly() {
    let mut s = state(0);
    for _ in 0..3 {
        s.train_step(&mut NoReduction).unwrap();
    }
    let identity = RunIdentity {
        world_size: 2,
        settings: vec![("env.height".into(), "5".into())],
    };
    let path = scratch("flipped");
    checkpoint::save(&s, &path, &identity).unwrap();
    let mut restored = state(0);
    assert_eq!(
        checkpoint::load(&mut restored, &path, Some(&identity)).unwrap(),
        identity
    );
    assert_eq!(
        restored.estimators.params.to_vec(),
        s.estimators.params.to_vec()
    );
    assert_eq!(restored.step, 3);
    let err = checkpoint::load(&mut state_of_width(0, 48), &path, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[48, 10]") || err.contains("48"), "{err}");

    // 64 bytes in the middle of the file: inside the parameters or moments, which the archive
    // format itself does not check.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5A;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = checkpoint::load(&mut state(0), &path, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_resume_names_the_first_setting_that_differs() {
    let saved = RunIdentity {
        world_size: 2,
        settings: vec![
            ("env.preset".into(), "\"standard\"".into()),
            ("model.hidden".into(), "256".into()),
        ],
    };
    assert_eq!(saved.difference(&saved.clone()), None);
    let mut other = saved.clone();
    other.world_size = 3;
    assert_eq!(
        saved.difference(&other).unwrap(),
        "it was written by 2 training ranks, this run has 3"
    );
    let mut other = saved.clone();
    other.settings[0].1 = "\"hard\"".into();
    assert_eq!(
        saved.difference(&other).unwrap(),
        "env.preset is \"standard\" in the checkpoint and \"hard\" in this run"
    );
    let mut other = saved.clone();
    other
        .settings
        .push(("model.transformer.layers".into(), "3".into()));
    assert!(saved
        .difference(&other)
        .unwrap()
        .contains("unset in the checkpoint"));
}
