//! Policies and flows on tch: forward logits P_F, backward logits P_B, log state flow log F(s),
//! and a learnable log Z. Each architecture is one file implementing [`Network`]: `mlp`
//! (dense encoding), `tabular` (one row per state; enumerable environments) and `transformer`
//! (token encoding). An [`Estimators`] holds one network for P_F (with P_B on the same body
//! when tied), one for a learned P_B, and one for log F.

mod linear;
mod mlp;
mod noisy;
mod tabular;
mod transformer;

pub use noisy::{NoisyConfig, ParameterNoise, Unperturb};
pub use transformer::TransformerConfig;

use crate::env::Environment;
use crate::params::{ParamGroup, ParamId, ParamStore, ParamStoreBuilder, ParamViews};
use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Architecture {
    /// `layers` hidden layers of width `hidden`, ReLU, then a linear head.
    Mlp { hidden: usize, layers: usize },
    /// One free row of outputs per state (needs an enumerable environment).
    Tabular,
    /// A Transformer encoder over the environment's tokens (gfnx's bitseq policy).
    Transformer(TransformerConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackwardPolicy {
    /// Its own network.
    Learned,
    /// A head on the forward policy's body.
    Tied,
    /// Uniform over the allowed backward actions; nothing to learn.
    Uniform,
}

/// What to build; the loss decides which optional parts it needs.
#[derive(Debug, Clone, Copy)]
pub struct EstimatorConfig {
    pub architecture: Architecture,
    pub backward: BackwardPolicy,
    pub log_flow: bool,
    pub log_z: bool,
}

impl EstimatorConfig {
    /// The estimators an objective needs: log F and log Z where it learns them, and
    /// `backward` where it has a backward policy (else none to learn).
    pub fn for_objective(
        architecture: Architecture,
        backward: BackwardPolicy,
        needs: crate::losses::Needs,
    ) -> Self {
        EstimatorConfig {
            architecture,
            backward: if needs.backward_policy {
                backward
            } else {
                BackwardPolicy::Uniform
            },
            log_flow: needs.log_flow,
            log_z: needs.log_z,
        }
    }
}

/// The network outputs a loss or sampler asked for, one row per input state.
#[derive(Default)]
pub struct Outputs {
    pub pf_logits: Option<Tensor>,
    pub pb_logits: Option<Tensor>,
    pub log_flow: Option<Tensor>,
}

impl Outputs {
    /// Outputs of two networks together.
    fn or(self, other: Outputs) -> Outputs {
        Outputs {
            pf_logits: self.pf_logits.or(other.pf_logits),
            pb_logits: self.pb_logits.or(other.pb_logits),
            log_flow: self.log_flow.or(other.log_flow),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub pf: bool,
    pub pb: bool,
    pub log_flow: bool,
}

impl Wanted {
    pub const PF: Wanted = Wanted {
        pf: true,
        pb: false,
        log_flow: false,
    };
    pub const PB: Wanted = Wanted {
        pf: false,
        pb: true,
        log_flow: false,
    };
    pub const LOG_FLOW: Wanted = Wanted {
        pf: false,
        pb: false,
        log_flow: true,
    };

    /// What both ask for.
    fn and(self, other: Wanted) -> Wanted {
        Wanted {
            pf: self.pf && other.pf,
            pb: self.pb && other.pb,
            log_flow: self.log_flow && other.log_flow,
        }
    }

    /// What either asks for.
    fn or(self, other: Wanted) -> Wanted {
        Wanted {
            pf: self.pf || other.pf,
            pb: self.pb || other.pb,
            log_flow: self.log_flow || other.log_flow,
        }
    }

    fn any(self) -> bool {
        self.pf || self.pb || self.log_flow
    }
}

/// Output widths of the heads a network is built with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadWidths {
    pub pf: Option<usize>,
    pub pb: Option<usize>,
    pub log_flow: bool,
}

impl HeadWidths {
    fn outputs(&self) -> Wanted {
        Wanted {
            pf: self.pf.is_some(),
            pb: self.pb.is_some(),
            log_flow: self.log_flow,
        }
    }
}

/// One architecture: a body shared by the heads it was built with. Its parameters live in the
/// [`ParamStore`] that built it; `forward` reads them from `p`.
pub(crate) trait Network: Send + Sync {
    /// The outputs this network has heads for.
    fn outputs(&self) -> Wanted;
    /// The `wanted` outputs (a subset of [`Network::outputs`]) for one batch of inputs.
    fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs;
    /// P_F logits computed in plain Rust from CPU parameters, where the architecture has such a
    /// path (what a rollout asks for at every step). Returns false, leaving `logits` alone,
    /// where it has none.
    fn pf_logits_host(
        &self,
        _params: &ParamStore,
        _env: &dyn Environment,
        _states: &[i64],
        _logits: &mut Vec<f32>,
        _scratch: &mut HostScratch,
    ) -> bool {
        false
    }
    /// The affine layers from the input to P_F's logits, in order, where the network is such a
    /// chain (the MLP): NoisyNet perturbs the last of them.
    fn pf_chain(&self) -> Option<Vec<&linear::Linear>> {
        None
    }
}

impl Architecture {
    fn build(
        &self,
        env: &dyn Environment,
        b: &mut ParamStoreBuilder,
        name: &str,
        heads: HeadWidths,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Network>> {
        Ok(match *self {
            Architecture::Mlp { hidden, layers } => {
                Box::new(mlp::Mlp::new(env, b, name, hidden, layers, heads, rng)?)
            }
            Architecture::Tabular => Box::new(tabular::Table::new(env, b, name, heads)?),
            Architecture::Transformer(config) => Box::new(transformer::Transformer::new(
                env, b, name, config, heads, rng,
            )?),
        })
    }

    /// The setting that sizes this architecture, and its value (for error messages).
    pub fn size_setting(&self) -> (&'static str, String) {
        match self {
            Architecture::Mlp { hidden, .. } => ("model.hidden", hidden.to_string()),
            Architecture::Tabular => ("model.architecture", "tabular".into()),
            Architecture::Transformer(c) => ("model.transformer.width", c.width.to_string()),
        }
    }

    /// About how many floats one network's forward and backward pass keep per input state
    /// (inputs, activations and their gradients), to size a batch before running it.
    pub fn activation_floats(&self, env: &dyn Environment) -> u64 {
        use crate::bounds::product;
        let heads = (env.n_actions() + env.n_backward_actions() + 1) as u64;
        let body = match *self {
            Architecture::Mlp { hidden, layers } => product(&[3, hidden as u64, layers as u64])
                .saturating_add(env.encoding_dim() as u64),
            Architecture::Tabular => 0,
            Architecture::Transformer(c) => {
                let length = env.tokens().map_or(1, |t| t.length()) as u64;
                let (width, ff, layers) = (c.width as u64, c.ff as u64, c.layers as u64);
                let per_token = (12 * width).saturating_add(3 * ff);
                let attention = product(&[3, c.heads as u64, length, length]);
                product(&[layers, length, per_token]).saturating_add(product(&[layers, attention]))
            }
        };
        body.saturating_add(2 * heads)
    }

    /// The network input for a batch of states: the dense encoding (MLP), state indices
    /// (tabular) or tokens (Transformer).
    fn input(&self, env: &dyn Environment, states: &[i64]) -> Tensor {
        match self {
            Architecture::Mlp { .. } => mlp::input(env, states),
            Architecture::Tabular => tabular::input(env, states),
            Architecture::Transformer(_) => transformer::input(env, states),
        }
    }
}

/// The networks (in [`Estimators`] order) and log Z.
type Parts = (Vec<Box<dyn Network>>, Option<ParamId>);

pub struct Estimators {
    config: EstimatorConfig,
    /// P_F's network first (with P_B when tied), then a learned P_B's, then log F's.
    networks: Vec<Box<dyn Network>>,
    log_z: Option<ParamId>,
    pub params: ParamStore,
}

impl Estimators {
    pub fn new(
        env: &dyn Environment,
        config: EstimatorConfig,
        device: Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let mut b = ParamStoreBuilder::default();
        let (networks, log_z) = Self::assemble(env, config, &mut b, rng)?;
        Ok(Estimators {
            config,
            networks,
            log_z,
            params: b.build(device),
        })
    }

    /// The number of parameters `new` would create, found without allocating them.
    pub fn count_params(env: &dyn Environment, config: EstimatorConfig) -> Result<usize> {
        let mut b = ParamStoreBuilder::counting();
        Self::assemble(env, config, &mut b, &mut ChaCha8Rng::seed_from_u64(0))?;
        Ok(b.numel())
    }

    fn assemble(
        env: &dyn Environment,
        config: EstimatorConfig,
        b: &mut ParamStoreBuilder,
        rng: &mut ChaCha8Rng,
    ) -> Result<Parts> {
        let (n_actions, n_back) = (env.n_actions(), env.n_backward_actions());
        let arch = config.architecture;
        // Tables have no body to share: a tied P_B is a table of its own.
        let tied = config.backward == BackwardPolicy::Tied && arch != Architecture::Tabular;
        let mut networks = vec![arch.build(
            env,
            b,
            "pf",
            HeadWidths {
                pf: Some(n_actions),
                pb: tied.then_some(n_back),
                log_flow: false,
            },
            rng,
        )?];
        if config.backward != BackwardPolicy::Uniform && !tied {
            let heads = HeadWidths {
                pf: None,
                pb: Some(n_back),
                log_flow: false,
            };
            networks.push(arch.build(env, b, "pb", heads, rng)?);
        }
        if config.log_flow {
            let heads = HeadWidths {
                pf: None,
                pb: None,
                log_flow: true,
            };
            networks.push(arch.build(env, b, "log_flow", heads, rng)?);
        }
        let log_z = config
            .log_z
            .then(|| b.add("log_z", &[1], ParamGroup::LogZ, || 0.0));
        Ok((networks, log_z))
    }

    /// P_F's affine layers from input to logits, where its network is such a chain.
    fn pf_chain(&self) -> Option<Vec<&linear::Linear>> {
        self.networks[0].pf_chain()
    }

    pub fn config(&self) -> &EstimatorConfig {
        &self.config
    }
    pub fn has_learned_pb(&self) -> bool {
        self.config.backward != BackwardPolicy::Uniform
    }
    pub fn has_log_flow(&self) -> bool {
        self.config.log_flow
    }
    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// The network input for a batch of states, on the parameters' device.
    pub fn input(&self, env: &dyn Environment, states: &[i64]) -> Tensor {
        self.config
            .architecture
            .input(env, states)
            .to_device(self.device())
    }

    pub fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs {
        self.networks
            .iter()
            .map(|net| (net, net.outputs().and(wanted)))
            .filter(|(_, asked)| asked.any())
            .map(|(net, asked)| net.forward(p, input, asked))
            .fold(Outputs::default(), Outputs::or)
    }

    /// `wanted` split into groups of outputs that share no parameters, each group computed by
    /// its own network: their forward and backward passes can run on separate threads. A tied
    /// P_B stays with P_F (one body).
    pub fn independent_groups(&self, wanted: Wanted) -> Vec<Wanted> {
        self.networks
            .iter()
            .map(|net| net.outputs().and(wanted))
            .filter(|group| group.any())
            .collect()
    }

    /// Every output the estimators have.
    pub fn all_outputs(&self) -> Wanted {
        self.networks
            .iter()
            .fold(Wanted::default(), |all, net| all.or(net.outputs()))
    }

    pub fn log_z<'a>(&self, p: &'a ParamViews) -> Option<&'a Tensor> {
        self.log_z.map(|id| &p[id])
    }

    /// Forward logits of a batch of states, computed in plain Rust from the CPU parameters
    /// ([`crate::host_mlp`]): what a rollout asks for at every step. Returns false, leaving
    /// `logits` alone, when the parameters are not on the CPU, when the architecture has no
    /// such path, or when the batch is large enough for libtorch's GEMM on several threads to
    /// be faster than this one core.
    pub fn pf_logits_host(
        &self,
        env: &dyn Environment,
        states: &[i64],
        logits: &mut Vec<f32>,
        scratch: &mut HostScratch,
    ) -> bool {
        let rows = states.len() / env.state_dim();
        let libtorch_faster =
            rows > crate::host_mlp::rows_ahead_of_libtorch() && tch::get_num_threads() > 1;
        if self.device() != Device::Cpu || libtorch_faster {
            return false;
        }
        self.networks[0].pf_logits_host(&self.params, env, states, logits, scratch)
    }

    /// Forward logits for a batch of states, without autograd (sampling, evaluation).
    pub fn pf_logits_no_grad(&self, input: &Tensor) -> Tensor {
        self.no_grad_output(input, Wanted::PF)
    }

    /// Backward logits for a batch of states, without autograd; `None` for a uniform P_B.
    pub fn pb_logits_no_grad(&self, input: &Tensor) -> Option<Tensor> {
        self.has_learned_pb()
            .then(|| self.no_grad_output(input, Wanted::PB))
    }

    fn no_grad_output(&self, input: &Tensor, wanted: Wanted) -> Tensor {
        tch::no_grad(|| {
            let out = self.forward(&self.params.views(), input, wanted);
            out.pf_logits
                .or(out.pb_logits)
                .expect("the estimators have the asked-for head")
        })
    }
}

/// Buffers that the host forward pass reuses between the steps of a rollout.
#[derive(Debug, Default)]
pub struct HostScratch {
    tokens: Vec<i64>,
    buffers: Vec<Vec<f32>>,
}

impl HostScratch {
    /// `N` distinct buffers, each as the last call left it.
    fn buffers<const N: usize>(&mut self) -> [&mut Vec<f32>; N] {
        self.tokens_and_buffers().1
    }

    /// A buffer of token ids and `N` of values.
    fn tokens_and_buffers<const N: usize>(&mut self) -> (&mut Vec<i64>, [&mut Vec<f32>; N]) {
        if self.buffers.len() < N {
            self.buffers.resize_with(N, Vec::new);
        }
        let mut each = self.buffers.iter_mut();
        let buffers = std::array::from_fn(|_| each.next().expect("resized to at least N"));
        (&mut self.tokens, buffers)
    }
}

/// Large negative logit for masked actions: finite, so rows with no allowed action (P_B at the
/// initial state) stay finite and never turn gradients into NaN.
pub const MASKED_LOGIT: f32 = -1e9;

/// Additive mask (0 for allowed, [`MASKED_LOGIT`] for forbidden) as a tensor `[rows, width]`.
pub fn additive_mask(mask: &[bool], width: usize, device: Device) -> Tensor {
    let values: Vec<f32> = mask
        .iter()
        .map(|&m| if m { 0.0 } else { MASKED_LOGIT })
        .collect();
    Tensor::from_slice(&values)
        .view([(mask.len() / width) as i64, width as i64])
        .to_device(device)
}

/// Log-probabilities from logits and an additive mask.
pub fn masked_log_softmax(logits: &Tensor, additive_mask: &Tensor) -> Tensor {
    (logits + additive_mask).log_softmax(-1, Kind::Float)
}

/// The network-size error every architecture gives for a zero width.
fn at_least_one(field: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid(field, value, "must be at least 1"));
    }
    Ok(())
}
