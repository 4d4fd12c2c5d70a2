//! The run configuration: TOML (serde, unknown keys rejected by name), every field overridable
//! with `--set section.key=value`, validated into the core library's types.

use anyhow::{anyhow, bail, Context, Result};
use gfn_buffer::store::Policy as BufferPolicy;
use gfn_core::bounds;
use gfn_core::env::EnvConfig;
use gfn_core::estimators::{Architecture, BackwardPolicy, NoisyConfig, TransformerConfig};
use gfn_core::losses::LossConfig;
use gfn_core::metrics::MetricsConfig;
use gfn_core::optim::{OptimizerConfig, OptimizerKind};
use gfn_core::replay::ReplayPolicy;
use gfn_core::sampler::EpsilonSchedule;
use gfn_core::train::{ReplayConfig, TrainConfig};
use gfn_ddp::launch_env::RankInfo;
use gfn_diversity::Diversity;
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub env: EnvConfig,
    pub model: ModelSection,
    /// `[loss]` is the core's own configuration (objectives, regression, `[loss.subtb]`).
    pub loss: LossConfig,
    pub optim: OptimSection,
    pub sampling: SamplingSection,
    pub replay: ReplaySection,
    pub train: TrainSection,
    pub ddp: DdpSection,
    pub buffer: BufferSection,
    pub metrics: MetricsConfig,
    pub wandb: WandbSection,
}

/// Weights & Biases: with a project set, the run's TensorBoard files are uploaded with
/// `wandb sync` at the end (or the command to do so is printed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WandbSection {
    pub project: Option<String>,
    pub entity: Option<String>,
    /// Display name, also the run id (characters other than letters, digits, - and _ become -).
    pub run_name: Option<String>,
}

/// Replay-buffer ranks: the last `num_remote` ranks of the job serve a shared replay buffer
/// and never train; replayed trajectories are mixed in at `replay.ratio`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSection {
    /// Number of buffer ranks (`--num-remote-buffers`); 0: none.
    pub num_remote: usize,
    /// Trajectories each buffer rank keeps.
    pub capacity: usize,
    /// fifo, prioritized (sampling proportional to R(x)) or unique (one per terminal state).
    pub policy: BufferPolicy,
    /// A lost buffer rank ends the run instead of falling back to local replay.
    pub fatal: bool,
    /// `policy = "diverse"`: terminal states closer than this (p-norm) are one too many.
    pub cutoff_distance: f64,
    pub p_norm_distance: f64,
}

impl BufferSection {
    pub fn diversity(&self) -> Result<Diversity> {
        let d = Diversity {
            cutoff_distance: self.cutoff_distance,
            p_norm_distance: self.p_norm_distance,
        };
        match d.problem() {
            Some((key, value, reason)) => bail!("invalid buffer.{key} = {value}: {reason}"),
            None => Ok(d),
        }
    }
}

impl Default for BufferSection {
    fn default() -> Self {
        BufferSection {
            num_remote: 0,
            capacity: 100_000,
            policy: BufferPolicy::Fifo,
            fatal: false,
            cutoff_distance: Diversity::default().cutoff_distance,
            p_norm_distance: Diversity::default().p_norm_distance,
        }
    }
}

/// Local replay kept by each trainer while remote buffers are in use, to fall back on if its
/// buffer rank is lost (unless `replay.capacity` sets it).
pub const FALLBACK_REPLAY_CAPACITY: usize = 10_000;

/// Longest deadline accepted (a week), so that deadlines stay representable.
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// Bytes a buffer rank holds per stored item besides its states and actions.
const BUFFER_ITEM_OVERHEAD: u64 = 96;

/// Ranks that the launcher runs on this host (every rank when it does not say; 1 alone).
pub fn ranks_on_this_host() -> usize {
    RankInfo::from_env()
        .ok()
        .map_or(1, |info| info.local_world_size.unwrap_or(info.world_size))
}

/// Training ranks of this job: the launcher's world size less the buffer ranks (1 alone).
pub fn training_ranks(buffer_ranks: usize) -> usize {
    RankInfo::from_env()
        .ok()
        .map_or(1, |info| info.world_size)
        .saturating_sub(buffer_ranks)
}

/// This rank's share of the memory available on its host.
fn memory_per_rank() -> Option<u64> {
    bounds::available_memory().map(|m| m / ranks_on_this_host().max(1) as u64)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdpSection {
    /// auto (local for one rank; else NCCL with CUDA, gloo under torchrun, MPI otherwise),
    /// nccl, mpi, gloo or local.
    pub backend: String,
    /// Seconds any rank waits for the others before the job is ended: at start-up, in every
    /// collective (including while rank 0 evaluates or checkpoints) and for a buffer rank.
    pub timeout_s: u64,
    /// MPI or gloo backend, every training rank on one node: collectives through shared memory
    /// and the optimizer step shared out across the ranks (false: MPI's or gloo's all-reduce,
    /// whole step per rank).
    pub shared_memory: bool,
}

impl Default for DdpSection {
    fn default() -> Self {
        DdpSection {
            backend: "auto".into(),
            timeout_s: 300,
            shared_memory: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchitectureName {
    Mlp,
    Tabular,
    Transformer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub architecture: ArchitectureName,
    pub hidden: usize,
    /// Hidden layers.
    pub layers: usize,
    /// learned, tied (shares the forward body) or uniform.
    pub backward: BackwardPolicy,
    /// The Transformer's size (architecture = "transformer").
    pub transformer: TransformerConfig,
    /// NoisyNet: P_F's last affine layers with factorised Gaussian noise during rollouts
    /// (torchgfn's `n_noisy_layers`); 0: none. Left out of a run's config.toml when 0, so
    /// that runs written before it was added still resume.
    #[serde(skip_serializing_if = "is_zero")]
    pub noisy_layers: usize,
    /// Initial σ scale of the noisy layers (torchgfn's `noisy_std_init`).
    #[serde(skip_serializing_if = "is_default_noisy_std")]
    pub noisy_std_init: f64,
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

fn is_default_noisy_std(value: &f64) -> bool {
    *value == NoisyConfig::default().std_init
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            architecture: ArchitectureName::Mlp,
            hidden: 256,
            layers: 2,
            backward: BackwardPolicy::Learned,
            transformer: TransformerConfig::default(),
            noisy_layers: 0,
            noisy_std_init: NoisyConfig::default().std_init,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub name: OptimizerKind,
    pub lr: f64,
    pub lr_log_z: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the mean gradient to this L2 norm before each step; 0: no clipping.
    pub max_grad_norm: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        let d = OptimizerConfig::default();
        OptimSection {
            name: d.kind,
            lr: d.lr,
            lr_log_z: d.lr_log_z,
            weight_decay: d.weight_decay,
            beta1: d.beta1,
            beta2: d.beta2,
            eps: d.eps,
            max_grad_norm: d.max_grad_norm,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    /// Trajectories each training rank samples per step.
    pub batch_size: usize,
    /// The batch of all training ranks together (torchgfn's `--batch_size`), split evenly
    /// among them; when set (not 0) it decides `batch_size`.
    pub global_batch_size: usize,
    /// ε at step 0.
    pub epsilon: f64,
    /// ε after `epsilon_decay_steps` (linear schedule); defaults to `epsilon` (constant).
    pub epsilon_end: Option<f64>,
    pub epsilon_decay_steps: u64,
    pub temperature: f64,
}

impl Default for SamplingSection {
    fn default() -> Self {
        SamplingSection {
            batch_size: 16,
            global_batch_size: 0,
            epsilon: 0.0,
            epsilon_end: None,
            epsilon_decay_steps: 0,
            temperature: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaySection {
    /// Trajectories kept; 0 disables replay.
    pub capacity: usize,
    pub policy: ReplayPolicy,
    /// Replayed trajectories per batch, as a fraction of the batch size.
    pub ratio: f64,
    /// `policy = "diverse"`: terminal states closer than this (p-norm) are one too many.
    pub cutoff_distance: f64,
    pub p_norm_distance: f64,
}

impl Default for ReplaySection {
    fn default() -> Self {
        let d = Diversity::default();
        ReplaySection {
            capacity: 0,
            policy: ReplayPolicy::Uniform,
            ratio: 0.5,
            cutoff_distance: d.cutoff_distance,
            p_norm_distance: d.p_norm_distance,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub steps: u64,
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
    /// CPU threads of each rank; 0: every CPU the rank may run on.
    pub threads: usize,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    pub validate_every: u64,
    /// Terminal states sampled for the sampled distances to the exact target.
    pub eval_samples: usize,
    /// Training scalars (loss, speed) go to TensorBoard every this many steps; 0: never.
    pub log_every: u64,
    /// Checkpoint every this many steps (and at the end); 0: only at the end.
    pub checkpoint_every: u64,
    /// Updates in a row that may be skipped for a non-finite loss or gradient before the run
    /// stops with an error; 0: stop at the first.
    pub max_nonfinite_steps: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 5000,
            seed: 0,
            device: "auto".into(),
            threads: 0,
            validate_every: 500,
            eval_samples: 200_000,
            log_every: 50,
            checkpoint_every: 1000,
            max_nonfinite_steps: 0,
        }
    }
}

impl Config {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text, naming the offending key on error.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let value: toml::Value =
            toml::from_str(text).map_err(|e| anyhow!("{origin}: {}", e.message()))?;
        Self::from_value(value, origin)
    }

    fn from_value(mut value: toml::Value, origin: &str) -> Result<Self> {
        // An `[env]` section without a name is HyperGrid's (configurations written before
        // there were other environments).
        if let Some(env) = value.get_mut("env").and_then(toml::Value::as_table_mut) {
            env.entry("name").or_insert_with(|| "hypergrid".into());
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow!(
                "{origin}: {} {}",
                if path == "." {
                    "config".into()
                } else {
                    format!("`{path}`:")
                },
                // The message alone: the error's display adds a second line with the table.
                e.into_inner().message()
            )
        })
    }

    /// Applies `section.key=value` overrides. Values are TOML (numbers, booleans, strings);
    /// anything that does not parse as TOML is taken as a string.
    ///
    /// `env.name` goes first: naming another environment starts its section afresh (its own
    /// keys and defaults), so that `--set env.name=bitseq --set env.n=64` works from any config.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        let mut root = toml::Value::try_from(self).context("serialising the configuration")?;
        let mut parsed = overrides
            .iter()
            .map(|item| {
                let (key, raw) = item.split_once('=').ok_or_else(|| {
                    anyhow!("--set {item:?}: expected key=value, e.g. loss.name=db")
                })?;
                Ok((key.trim(), raw))
            })
            .collect::<Result<Vec<_>>>()?;
        parsed.sort_by_key(|&(key, _)| key != "env.name");
        for (key, raw) in parsed {
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            if key == "env.name" && root.get("env").and_then(|e| e.get("name")) != Some(&value) {
                let mut fresh = toml::Table::new();
                fresh.insert("name".into(), value);
                root["env"] = toml::Value::Table(fresh);
                continue;
            }
            let mut table = root.as_table_mut().expect("the config is a table");
            let parts: Vec<&str> = key.split('.').collect();
            for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
                // A subsection left out for holding only defaults (`[loss.subtb]`) starts
                // empty; deserialising names a key that is not one.
                if depth > 0 && !table.contains_key(*part) {
                    table.insert(part.to_string(), toml::Value::Table(toml::Table::new()));
                }
                table = table
                    .get_mut(*part)
                    .and_then(|v| v.as_table_mut())
                    .ok_or_else(|| anyhow!("--set {key}: unknown section `{part}` (sections: env, model, loss, optim, sampling, replay, train, ddp, buffer, metrics, wandb)"))?;
            }
            table.insert(parts[parts.len() - 1].to_string(), value);
        }
        Self::from_value(root, "--set")
    }

    /// The settings a resumed run must share with its checkpoint: every `env.*` and `model.*`
    /// value (the problem and the network's shape), as `key` and TOML text.
    pub fn identity_settings(&self) -> Vec<(String, String)> {
        fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
            match value.as_table() {
                Some(table) => table
                    .iter()
                    .for_each(|(k, v)| flatten(&format!("{prefix}.{k}"), v, out)),
                None => out.push((prefix.to_string(), value.to_string())),
            }
        }
        let root = toml::Value::try_from(self).expect("the configuration serialises");
        let mut out = Vec::new();
        for section in ["env", "model"] {
            if let Some(value) = root.get(section) {
                flatten(section, value, &mut out);
            }
        }
        out
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }

    pub fn train_config(&self) -> Result<TrainConfig> {
        let m = &self.model;
        let architecture = match m.architecture {
            ArchitectureName::Mlp => Architecture::Mlp {
                hidden: m.hidden,
                layers: m.layers,
            },
            ArchitectureName::Tabular => Architecture::Tabular,
            ArchitectureName::Transformer => Architecture::Transformer(m.transformer),
        };
        let o = &self.optim;
        let s = &self.sampling;
        let config = TrainConfig {
            architecture,
            backward: m.backward,
            noisy: NoisyConfig {
                layers: m.noisy_layers,
                std_init: m.noisy_std_init,
            },
            loss: self.loss.clone(),
            optimizer: OptimizerConfig {
                kind: o.name,
                lr: o.lr,
                lr_log_z: o.lr_log_z,
                weight_decay: o.weight_decay,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                max_grad_norm: o.max_grad_norm,
            },
            batch_size: s.batch_size,
            epsilon: EpsilonSchedule {
                start: s.epsilon,
                end: s.epsilon_end.unwrap_or(s.epsilon),
                decay_steps: s.epsilon_decay_steps,
            },
            temperature: s.temperature,
            replay: ReplayConfig {
                capacity: if self.buffer.num_remote > 0 && self.replay.capacity == 0 {
                    FALLBACK_REPLAY_CAPACITY.min(self.buffer.capacity)
                } else {
                    self.replay.capacity
                },
                policy: self.replay.policy,
                ratio: self.replay.ratio,
                diversity: Diversity {
                    cutoff_distance: self.replay.cutoff_distance,
                    p_norm_distance: self.replay.p_norm_distance,
                },
            },
            seed: self.train.seed,
            threads: self.train.threads,
            exact_samples: self.train.eval_samples,
            metrics: self.metrics.clone(),
            max_nonfinite_steps: self.train.max_nonfinite_steps,
            memory_budget: memory_per_rank(),
            diagnostics_every: self.train.log_every,
        };
        config.validate()?;
        Ok(config)
    }

    /// Splits `sampling.global_batch_size` (when set) among `training_ranks`.
    pub fn split_global_batch(&mut self, training_ranks: usize) -> Result<()> {
        let global = self.sampling.global_batch_size;
        if global == 0 {
            return Ok(());
        }
        if training_ranks == 0 || !global.is_multiple_of(training_ranks) {
            bail!(
                "invalid sampling.global_batch_size = {global}: does not split evenly among the {training_ranks} training rank(s)"
            );
        }
        self.sampling.batch_size = global / training_ranks;
        Ok(())
    }

    /// Everything that can be refused before the ranks join (so that every rank, buffer
    /// ranks included, stops at once with the same message): the training settings, what they
    /// ask of this machine's memory and threads, the buffer ranks' size and the deadlines.
    pub fn check_job(&self) -> Result<()> {
        let train = self.train_config()?;
        let env = self.env.build()?;
        train.check_resources(env.as_ref(), self.device()?)?;
        if !(1..=MAX_TIMEOUT_S).contains(&self.ddp.timeout_s) {
            bail!(
                "invalid ddp.timeout_s = {}: must be in 1..={MAX_TIMEOUT_S} (seconds)",
                self.ddp.timeout_s
            );
        }
        if self.buffer.num_remote > 0 {
            self.buffer.diversity()?;
            if self.buffer.capacity == 0 {
                bail!("invalid buffer.capacity = 0: a buffer rank must hold at least 1 trajectory");
            }
            let item = bounds::product(&[
                env.max_trajectory_length() as u64,
                8 * env.state_dim() as u64 + 4,
            ]) + BUFFER_ITEM_OVERHEAD;
            let demand = bounds::Demand::new(
                "buffer.capacity",
                self.buffer.capacity,
                "a buffer rank's store",
                bounds::product(&[self.buffer.capacity as u64, item]),
            );
            if let Some(available) = memory_per_rank() {
                bounds::check_memory(&[demand], available)?;
            }
        }
        Ok(())
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.train.device)
    }

    pub fn backend(&self) -> Result<gfn_ddp::world::Backend> {
        self.ddp.backend.parse().map_err(|_| {
            anyhow!(
                "invalid ddp.backend = {:?}: expected auto, nccl, mpi, gloo or local",
                self.ddp.backend
            )
        })
    }
}

pub fn parse_device(name: &str) -> Result<Device> {
    let cuda = |i: usize| -> Result<Device> {
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            bail!("invalid train.device = {name:?}: CUDA is not available on this machine ({n} devices)");
        }
        Ok(Device::Cuda(i))
    };
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => cuda(i),
            None => bail!("invalid train.device = {other:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_reach_every_section_and_keep_types() {
        let c = Config::default()
            .with_overrides(&[
                "loss.name=subtb".into(),
                "env.height=16".into(),
                "env.preset=easy".into(),
                "optim.lr=3e-4".into(),
            ])
            .unwrap();
        assert_eq!(c.loss.name, gfn_core::losses::LossKind::Subtb);
        let c = c
            .with_overrides(&[
                "loss.subtb.lambda=0.5".into(),
                "loss.regression=linex".into(),
            ])
            .unwrap();
        assert_eq!(c.loss.subtb.lambda, 0.5);
        assert_eq!(c.loss.regression, Some(gfn_core::losses::Regression::Linex));
        // Round trip through the TOML a run directory keeps.
        assert_eq!(Config::from_toml(&c.to_toml(), "config.toml").unwrap(), c);
        let err = Config::default()
            .with_overrides(&["loss.subtb.lamda=0.5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lamda"), "{err}");
        let EnvConfig::Hypergrid(grid) = c.env else {
            panic!("still a grid: {:?}", c.env)
        };
        assert_eq!(grid.height, 16);
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(grid.constants().0, 1e-3);
    }

    #[test]
    fn a_global_batch_splits_evenly_among_the_training_ranks() {
        let mut c = Config::default()
            .with_overrides(&["sampling.global_batch_size=64".into()])
            .unwrap();
        c.split_global_batch(4).unwrap();
        assert_eq!(c.sampling.batch_size, 16);
        c.split_global_batch(1).unwrap();
        assert_eq!(c.sampling.batch_size, 64);
        let err = c.split_global_batch(3).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid sampling.global_batch_size = 64: does not split evenly among the 3 training rank(s)"
        );
        let mut unset = Config::default();
        unset.split_global_batch(3).unwrap();
        assert_eq!(unset.sampling.batch_size, 16);
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let err = Config::from_toml("[env]\nhieght = 3\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hieght"), "{err}");
        let err = Config::default()
            .with_overrides(&["loss.name=foo".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("loss.name") && err.contains("foo"), "{err}");
        let err = Config::default()
            .with_overrides(&["nope.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = Config::default()
            .with_overrides(&["sampling.batch_size=0".into()])
            .unwrap()
            .train_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sampling.batch_size = 0"), "{err}");
    }

    #[test]
    fn every_shipped_config_is_valid() {
        fn check(dir: &std::path::Path, seen: &mut usize) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    check(&path, seen);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    let config = Config::from_toml(
                        &std::fs::read_to_string(&path).unwrap(),
                        &path.display().to_string(),
                    )
                    .unwrap();
                    config.env.build().unwrap();
                    config.train_config().unwrap();
                    *seen += 1;
                }
            }
        }
        let mut seen = 0;
        check(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs"),
            &mut seen,
        );
        // 3 examples, 30 trajectory-balance, 12 sub-trajectory-balance, 3 gfnx HyperGrid and
        // 3 gfnx bitseq, 6 sweep.
        assert_eq!(seen, 57, "configs/ holds {seen} TOML files");
    }

    #[test]
    fn the_toml_round_trip_is_lossless() {
        let c = Config::default()
            .with_overrides(&["replay.capacity=100".into()])
            .unwrap();
        assert_eq!(Config::from_toml(&c.to_toml(), "x").unwrap(), c);
    }
}
