//! Checkpoints: parameters, optimizer moments, step, RNG position, replay buffer and every
//! metric's state, in one file written atomically (temporary file, fsync, rename), so that a
//! resumed run continues exactly where the stopped one was.

use crate::replay::ReplayBuffer;
use crate::train::TrainState;
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const FORMAT_VERSION: u32 = 2;
/// Tensor names of the metrics' states: this prefix and the metric's name.
const METRIC_PREFIX: &str = "metric.";

#[derive(Serialize, Deserialize)]
struct Metadata {
    format: u32,
    step: u64,
    trajectories: u64,
    optimizer_steps: u64,
    n_params: usize,
    rng_seed: [u8; 32],
    rng_stream: u64,
    /// u128 as a decimal string (JSON numbers cannot hold it).
    rng_word_pos: String,
    replay: ReplayBuffer,
}

fn checkpoint_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

pub fn save(state: &TrainState, path: &Path) -> Result<()> {
    let meta = Metadata {
        format: FORMAT_VERSION,
        step: state.step,
        trajectories: state.trajectories,
        optimizer_steps: state.optimizer.steps,
        n_params: state.estimators.params.len(),
        rng_seed: state.rng.get_seed(),
        rng_stream: state.rng.get_stream(),
        rng_word_pos: state.rng.get_word_pos().to_string(),
        replay: state.replay.clone(),
    };
    let meta = serde_json::to_vec(&meta).map_err(|e| checkpoint_error(path, e))?;
    let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
    let mut tensors = vec![
        ("params".to_string(), cpu(state.estimators.params.flat())),
        ("exp_avg".to_string(), cpu(&state.optimizer.exp_avg)),
        ("exp_avg_sq".to_string(), cpu(&state.optimizer.exp_avg_sq)),
        ("meta".to_string(), Tensor::from_slice(&meta)),
    ];
    for (name, bytes) in state.metrics.states() {
        if !bytes.is_empty() {
            tensors.push((format!("{METRIC_PREFIX}{name}"), Tensor::from_slice(&bytes)));
        }
    }
    let tmp = path.with_extension("tmp");
    Tensor::save_multi(&tensors, &tmp).map_err(|e| checkpoint_error(&tmp, e))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| checkpoint_error(path, e))?;
    Ok(())
}

/// Restores `state` (built from the same configuration) from a checkpoint.
pub fn load(state: &mut TrainState, path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(checkpoint_error(path, "no such file"));
    }
    let tensors = Tensor::load_multi(path).map_err(|e| {
        // libtorch's message continues with a C++ backtrace: keep its first line.
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default().to_string();
        checkpoint_error(path, format!("unreadable or corrupt ({first})"))
    })?;
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| checkpoint_error(path, format!("missing tensor `{name}`")))
    };
    let meta_bytes = get("meta")?;
    let meta_bytes = Vec::<u8>::try_from(meta_bytes.to_kind(Kind::Uint8))
        .map_err(|e| checkpoint_error(path, e))?;
    let meta: Metadata = serde_json::from_slice(&meta_bytes)
        .map_err(|e| checkpoint_error(path, format!("corrupt metadata ({e})")))?;
    if meta.format != FORMAT_VERSION {
        return Err(checkpoint_error(
            path,
            format!(
                "format {} is not the supported {FORMAT_VERSION}",
                meta.format
            ),
        ));
    }
    let n = state.estimators.params.len();
    if meta.n_params != n {
        return Err(checkpoint_error(
            path,
            format!(
                "holds {} parameters, this configuration has {n}",
                meta.n_params
            ),
        ));
    }
    let (params, exp_avg, exp_avg_sq) = (get("params")?, get("exp_avg")?, get("exp_avg_sq")?);
    for (name, t) in [
        ("params", &params),
        ("exp_avg", &exp_avg),
        ("exp_avg_sq", &exp_avg_sq),
    ] {
        if t.size() != [n as i64] || t.kind() != Kind::Float {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor `{name}` has shape {:?} and kind {:?}",
                    t.size(),
                    t.kind()
                ),
            ));
        }
    }
    let word_pos: u128 = meta
        .rng_word_pos
        .parse()
        .map_err(|_| checkpoint_error(path, "corrupt RNG position"))?;
    let metric_state = |name: &str| {
        let tensor = get(&format!("{METRIC_PREFIX}{name}")).ok()?;
        Vec::<u8>::try_from(tensor.to_kind(Kind::Uint8)).ok()
    };
    state
        .metrics
        .restore(metric_state)
        .map_err(|e| checkpoint_error(path, e))?;

    state.estimators.params.copy_from(&params);
    let device = state.estimators.device();
    state.optimizer.exp_avg = exp_avg.to_device(device);
    state.optimizer.exp_avg_sq = exp_avg_sq.to_device(device);
    state.optimizer.steps = meta.optimizer_steps;
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::from_seed(meta.rng_seed);
    rng.set_stream(meta.rng_stream);
    rng.set_word_pos(word_pos);
    state.rng = rng;
    state.step = meta.step;
    state.trajectories = meta.trajectories;
    state.replay = meta.replay;
    Ok(())
}
