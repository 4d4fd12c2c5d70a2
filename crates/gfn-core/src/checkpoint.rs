//! Checkpoints: parameters, optimizer moments, step, RNG position, replay buffer and every
//! metric's state, in one file written atomically (temporary file, fsync, rename), so that a
//! resumed run continues exactly where the stopped one was. A CRC-32 over every tensor's bytes
//! catches a damaged file; the run's identity (world size, the settings that must not change,
//! the parameter layout) lets a resume refuse a different run; and non-finite parameters or
//! moments are never written, so a diverged run cannot replace its last good checkpoint.

use crate::estimators::Estimators;
use crate::params::all_finite;
use crate::replay::ReplayBuffer;
use crate::train::TrainState;
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const FORMAT_VERSION: u32 = 3;
/// The tensor holding the CRC-32 of all the others (little-endian, 4 bytes).
const CHECKSUM: &str = "checksum";
/// Tensor names of the metrics' states: this prefix and the metric's name.
const METRIC_PREFIX: &str = "metric.";

#[derive(Serialize, Deserialize)]
struct Metadata {
    format: u32,
    step: u64,
    trajectories: u64,
    optimizer_steps: u64,
    rng_seed: [u8; 32],
    rng_stream: u64,
    /// u128 as a decimal string (JSON numbers cannot hold it).
    rng_word_pos: String,
    replay: ReplayBuffer,
    /// Consecutive updates skipped for non-finite values ([`TrainState::update`]).
    nonfinite_in_a_row: u64,
    identity: RunIdentity,
    /// Every parameter's name and shape.
    layout: Vec<(String, Vec<i64>)>,
}

/// What makes a checkpoint belong to one run: a resume must match it. `settings` are the
/// configuration values (as `key = value` text) that the caller says must not change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunIdentity {
    pub world_size: usize,
    pub settings: Vec<(String, String)>,
}

impl RunIdentity {
    /// The first difference between the checkpoint's identity (`self`) and the current run's,
    /// as one line naming the setting and both values.
    pub fn difference(&self, current: &RunIdentity) -> Option<String> {
        if self.world_size != current.world_size {
            return Some(format!(
                "it was written by {} training ranks, this run has {}",
                self.world_size, current.world_size
            ));
        }
        let lookup = |settings: &[(String, String)], key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let keys = self
            .settings
            .iter()
            .chain(&current.settings)
            .map(|(k, _)| k);
        for key in keys {
            let (saved, now) = (lookup(&self.settings, key), lookup(&current.settings, key));
            if saved != now {
                let shown = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
                return Some(format!(
                    "{key} is {} in the checkpoint and {} in this run",
                    shown(saved),
                    shown(now)
                ));
            }
        }
        None
    }
}

fn checkpoint_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Writes `state` to `path` atomically; refuses (leaving `path` as it was) when a parameter or
/// optimizer moment is not finite.
pub fn save(state: &TrainState, path: &Path, identity: &RunIdentity) -> Result<()> {
    for (name, t) in [
        ("a parameter", state.estimators.params.flat()),
        ("an optimizer moment", &state.optimizer.exp_avg),
        ("an optimizer moment", &state.optimizer.exp_avg_sq),
    ] {
        if !all_finite(t) {
            return Err(checkpoint_error(
                path,
                format!(
                    "not written at step {}: {name} is not finite (the last good checkpoint is kept)",
                    state.step
                ),
            ));
        }
    }
    let meta = Metadata {
        format: FORMAT_VERSION,
        step: state.step,
        trajectories: state.trajectories,
        optimizer_steps: state.optimizer.steps,
        rng_seed: state.rng.get_seed(),
        rng_stream: state.rng.get_stream(),
        rng_word_pos: state.rng.get_word_pos().to_string(),
        replay: state.replay.clone(),
        nonfinite_in_a_row: state.nonfinite_in_a_row,
        identity: identity.clone(),
        layout: layout(&state.estimators),
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
    let checksum = checksum(tensors.iter()).to_le_bytes();
    tensors.push((CHECKSUM.to_string(), Tensor::from_slice(&checksum)));
    // The process id keeps two writers (which the run directory's lock should prevent) from
    // sharing a temporary file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    Tensor::save_multi(&tensors, &tmp).map_err(|e| checkpoint_error(&tmp, e))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| checkpoint_error(path, e))?;
    Ok(())
}

fn layout(estimators: &Estimators) -> Vec<(String, Vec<i64>)> {
    estimators
        .params
        .specs()
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect()
}

/// CRC-32 over every tensor's name and bytes, in the order of their names (a loaded archive
/// need not keep the order they were saved in).
fn checksum<'a>(tensors: impl Iterator<Item = &'a (String, Tensor)>) -> u32 {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = crc32fast::Hasher::new();
    for (name, t) in sorted {
        crc.update(name.as_bytes());
        let t = t.contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor of `bytes` bytes, borrowed for the update.
        crc.update(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) });
    }
    crc.finalize()
}

/// A checkpoint file, its checksum and format checked, not yet applied.
struct Loaded<'a> {
    path: &'a Path,
    tensors: Vec<(String, Tensor)>,
    meta: Metadata,
}

impl<'a> Loaded<'a> {
    fn read(path: &'a Path) -> Result<Self> {
        if !path.exists() {
            return Err(checkpoint_error(path, "no such file"));
        }
        let tensors = Tensor::load_multi(path).map_err(|e| {
            // libtorch's message continues with a C++ backtrace: keep its first line.
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default().to_string();
            checkpoint_error(path, format!("unreadable or corrupt ({first})"))
        })?;
        verify_checksum(path, &tensors)?;
        let meta_bytes = find(path, &tensors, "meta")?;
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
        Ok(Loaded {
            path,
            tensors,
            meta,
        })
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        find(self.path, &self.tensors, name)
    }

    /// A flat f32 tensor of `n` elements (parameters or a moment).
    fn flat(&self, name: &str, n: usize) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.size() != [n as i64] || t.kind() != Kind::Float {
            return Err(checkpoint_error(
                self.path,
                format!(
                    "tensor `{name}` has shape {:?} and kind {:?}",
                    t.size(),
                    t.kind()
                ),
            ));
        }
        Ok(t)
    }

    /// The parameters, once their layout is found to be that of `estimators`.
    fn params_for(&self, estimators: &Estimators) -> Result<Tensor> {
        if let Some(reason) = layout_difference(&self.meta.layout, &layout(estimators)) {
            return Err(checkpoint_error(self.path, reason));
        }
        self.flat("params", estimators.params.len())
    }
}

fn find(path: &Path, tensors: &[(String, Tensor)], name: &str) -> Result<Tensor> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.shallow_clone())
        .ok_or_else(|| checkpoint_error(path, format!("missing tensor `{name}`")))
}

/// Restores `state` (built from the same configuration) from a checkpoint, after checking its
/// checksum, that it belongs to the run `expected` (when given: a resume) and that its
/// parameters have the layout of `state`'s. Returns the identity of the run that wrote it.
pub fn load(
    state: &mut TrainState,
    path: &Path,
    expected: Option<&RunIdentity>,
) -> Result<RunIdentity> {
    let loaded = Loaded::read(path)?;
    let meta = &loaded.meta;
    if let Some(difference) = expected.and_then(|e| meta.identity.difference(e)) {
        return Err(checkpoint_error(
            path,
            format!("belongs to a different run: {difference}"),
        ));
    }
    let params = loaded.params_for(&state.estimators)?;
    let n = state.estimators.params.len();
    let (exp_avg, exp_avg_sq) = (loaded.flat("exp_avg", n)?, loaded.flat("exp_avg_sq", n)?);
    let word_pos: u128 = meta
        .rng_word_pos
        .parse()
        .map_err(|_| checkpoint_error(path, "corrupt RNG position"))?;
    let metric_state = |name: &str| {
        let tensor = loaded.get(&format!("{METRIC_PREFIX}{name}")).ok()?;
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
    state.replay = meta.replay.clone();
    state.nonfinite_in_a_row = meta.nonfinite_in_a_row;
    Ok(meta.identity.clone())
}

/// Sets `estimators` (built from the configuration of the run that wrote the checkpoint) to
/// its parameters: a trained policy to use as it is, e.g. as a prior.
pub fn load_parameters(estimators: &mut Estimators, path: &Path) -> Result<()> {
    let loaded = Loaded::read(path)?;
    let params = loaded.params_for(estimators)?;
    estimators.params.copy_from(&params);
    Ok(())
}

fn verify_checksum(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let stored = match tensors.iter().find(|(n, _)| n == CHECKSUM) {
        Some((_, t)) => {
            Vec::<u8>::try_from(t.to_kind(Kind::Uint8)).map_err(|e| checkpoint_error(path, e))?
        }
        None => {
            return Err(checkpoint_error(
                path,
                "has no checksum (not written by this version)",
            ))
        }
    };
    let computed = checksum(tensors.iter().filter(|(n, _)| n != CHECKSUM)).to_le_bytes();
    if stored != computed {
        return Err(checkpoint_error(
            path,
            format!(
                "checksum mismatch (stored {}, computed {:08x}): the file is damaged",
                stored
                    .iter()
                    .rev()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
                u32::from_le_bytes(computed)
            ),
        ));
    }
    Ok(())
}

/// The first parameter whose name or shape differs between the checkpoint and this model.
fn layout_difference(
    saved: &[(String, Vec<i64>)],
    current: &[(String, Vec<i64>)],
) -> Option<String> {
    for (i, (s, c)) in saved.iter().zip(current).enumerate() {
        if s != c {
            return Some(format!(
                "parameter {i} is {} {:?} in the checkpoint and {} {:?} in this model (a different model.* setting?)",
                s.0, s.1, c.0, c.1
            ));
        }
    }
    (saved.len() != current.len()).then(|| {
        format!(
            "holds {} parameter tensors, this model has {} (a different model.* setting?)",
            saved.len(),
            current.len()
        )
    })
}
