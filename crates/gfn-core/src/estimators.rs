//! Policies and flows on tch: forward logits P_F, backward logits P_B, log state flow log F(s),
//! and a learnable log Z. MLP (K-hot input) or tabular (one row per state index).

use crate::env::Environment;
use crate::params::{ParamGroup, ParamId, ParamStore, ParamStoreBuilder, ParamViews};
use crate::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Architecture {
    /// `layers` hidden layers of width `hidden`, ReLU, then a linear head.
    Mlp { hidden: usize, layers: usize },
    /// One free row of outputs per state (needs an enumerable environment).
    Tabular,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackwardPolicy {
    /// Its own network.
    Learned,
    /// A head on the forward policy's trunk.
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

struct Linear {
    weight: ParamId, // [in, out]
    bias: ParamId,   // [out]
}

impl Linear {
    fn new(
        b: &mut ParamStoreBuilder,
        name: &str,
        input: usize,
        output: usize,
        rng: &mut impl Rng,
    ) -> Self {
        // PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        let bound = 1.0 / (input as f32).sqrt();
        let weight = b.add_uniform(
            &format!("{name}.weight"),
            &[input as i64, output as i64],
            bound,
            rng,
        );
        let bias = b.add_uniform(&format!("{name}.bias"), &[output as i64], bound, rng);
        Linear { weight, bias }
    }

    fn forward(&self, p: &ParamViews, x: &Tensor) -> Tensor {
        p[self.bias].addmm(x, &p[self.weight])
    }
}

enum Head {
    Mlp { trunk: usize, out: Linear },
    Table(ParamId),
}

/// The network outputs a loss or sampler asked for, one row per input state.
#[derive(Default)]
pub struct Outputs {
    pub pf_logits: Option<Tensor>,
    pub pb_logits: Option<Tensor>,
    pub log_flow: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    pub pf: bool,
    pub pb: bool,
    pub log_flow: bool,
}

impl Wanted {
    /// What either asks for.
    fn or(self, other: Wanted) -> Wanted {
        Wanted {
            pf: self.pf || other.pf,
            pb: self.pb || other.pb,
            log_flow: self.log_flow || other.log_flow,
        }
    }
}

pub struct Estimators {
    config: EstimatorConfig,
    trunks: Vec<Vec<Linear>>,
    pf: Head,
    pb: Option<Head>,
    log_flow: Option<Head>,
    log_z: Option<ParamId>,
    pub params: ParamStore,
}

impl Estimators {
    pub fn new(
        env: &dyn Environment,
        config: EstimatorConfig,
        device: Device,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let mut b = ParamStoreBuilder::default();
        let mut trunks = Vec::new();
        let (n_actions, n_back) = (env.n_actions(), env.n_backward_actions());
        let head = |b: &mut ParamStoreBuilder,
                    trunks: &mut Vec<Vec<Linear>>,
                    name: &str,
                    outputs: usize,
                    trunk: Option<usize>,
                    rng: &mut _|
         -> Result<Head> {
            Ok(match config.architecture {
                Architecture::Tabular => {
                    let n = env
                        .n_states()
                        .filter(|&n| n <= crate::truth::MAX_ENUMERATED_STATES)
                        .ok_or_else(|| {
                            Error::invalid(
                                "model.architecture",
                                "tabular",
                                "needs an environment small enough to enumerate",
                            )
                        })?;
                    Head::Table(b.add(
                        &format!("{name}.table"),
                        &[n as i64, outputs as i64],
                        ParamGroup::Network,
                        || 0.0,
                    ))
                }
                Architecture::Mlp { hidden, layers } => {
                    let trunk = trunk.unwrap_or_else(|| {
                        let mut input = env.encoding_dim();
                        let layers = (0..layers)
                            .map(|i| {
                                let l = Linear::new(
                                    b,
                                    &format!("{name}.trunk.{i}"),
                                    input,
                                    hidden,
                                    rng,
                                );
                                input = hidden;
                                l
                            })
                            .collect();
                        trunks.push(layers);
                        trunks.len() - 1
                    });
                    let width = if layers == 0 {
                        env.encoding_dim()
                    } else {
                        hidden
                    };
                    Head::Mlp {
                        trunk,
                        out: Linear::new(b, &format!("{name}.head"), width, outputs, rng),
                    }
                }
            })
        };
        if let Architecture::Mlp { hidden, .. } = config.architecture {
            if hidden == 0 {
                return Err(Error::invalid("model.hidden", hidden, "must be at least 1"));
            }
        }
        let pf = head(&mut b, &mut trunks, "pf", n_actions, None, rng)?;
        let pf_trunk = match &pf {
            Head::Mlp { trunk, .. } => Some(*trunk),
            Head::Table(_) => None,
        };
        let pb = match config.backward {
            BackwardPolicy::Uniform => None,
            BackwardPolicy::Learned => Some(head(&mut b, &mut trunks, "pb", n_back, None, rng)?),
            BackwardPolicy::Tied => Some(head(&mut b, &mut trunks, "pb", n_back, pf_trunk, rng)?),
        };
        let log_flow = if config.log_flow {
            Some(head(&mut b, &mut trunks, "log_flow", 1, None, rng)?)
        } else {
            None
        };
        let log_z = config
            .log_z
            .then(|| b.add("log_z", &[1], ParamGroup::LogZ, || 0.0));
        Ok(Estimators {
            config,
            trunks,
            pf,
            pb,
            log_flow,
            log_z,
            params: b.build(device),
        })
    }

    pub fn config(&self) -> &EstimatorConfig {
        &self.config
    }
    pub fn has_learned_pb(&self) -> bool {
        self.pb.is_some()
    }
    pub fn has_log_flow(&self) -> bool {
        self.log_flow.is_some()
    }
    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// The network input for a batch of states: K-hot floats (MLP) or state indices (tabular).
    pub fn input(&self, env: &dyn Environment, states: &[i64]) -> Tensor {
        let n = states.len() / env.state_dim();
        let cpu = match self.config.architecture {
            Architecture::Mlp { .. } => {
                let width = env.encoding_dim();
                let mut encoded = vec![0f32; n * width];
                env.encode(states, &mut encoded);
                Tensor::from_slice(&encoded).view([n as i64, width as i64])
            }
            Architecture::Tabular => {
                let idx: Vec<i64> = states
                    .chunks_exact(env.state_dim())
                    .map(|s| env.state_index(s) as i64)
                    .collect();
                Tensor::from_slice(&idx)
            }
        };
        cpu.to_device(self.device())
    }

    pub fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs {
        let mut trunk_out: Vec<Option<Tensor>> = (0..self.trunks.len()).map(|_| None).collect();
        let mut run = |head: &Head| -> Tensor {
            match head {
                Head::Table(table) => p[*table].index_select(0, input),
                Head::Mlp { trunk, out } => {
                    let hidden = trunk_out[*trunk].get_or_insert_with(|| {
                        self.trunks[*trunk]
                            .iter()
                            .fold(input.shallow_clone(), |x, l| l.forward(p, &x).relu())
                    });
                    out.forward(p, hidden)
                }
            }
        };
        Outputs {
            pf_logits: wanted.pf.then(|| run(&self.pf)),
            pb_logits: if wanted.pb {
                self.pb.as_ref().map(&mut run)
            } else {
                None
            },
            log_flow: if wanted.log_flow {
                self.log_flow.as_ref().map(|h| run(h).squeeze_dim(1))
            } else {
                None
            },
        }
    }

    /// `wanted` split into groups of outputs that share no parameters, each group computed by
    /// its own networks: their forward and backward passes can run on separate threads. A
    /// tied P_B stays with P_F (one trunk); tables never share.
    pub fn independent_groups(&self, wanted: Wanted) -> Vec<Wanted> {
        let trunk_of = |head: &Head| match head {
            Head::Mlp { trunk, .. } => Some(*trunk),
            Head::Table(_) => None,
        };
        let pf_trunk = trunk_of(&self.pf);
        let shares_pf_trunk = |head: &Head| pf_trunk.is_some() && trunk_of(head) == pf_trunk;
        let mut first = Wanted {
            pf: wanted.pf,
            ..Default::default()
        };
        let mut groups = Vec::new();
        let pb_only = Wanted {
            pb: true,
            ..Default::default()
        };
        let flow_only = Wanted {
            log_flow: true,
            ..Default::default()
        };
        let others = [
            (self.pb.as_ref().filter(|_| wanted.pb), pb_only),
            (
                self.log_flow.as_ref().filter(|_| wanted.log_flow),
                flow_only,
            ),
        ];
        for (head, own) in others {
            match head {
                Some(head) if shares_pf_trunk(head) => first = first.or(own),
                Some(_) => groups.push(own),
                None => {}
            }
        }
        if first.pf || first.pb || first.log_flow {
            groups.insert(0, first);
        }
        groups
    }

    pub fn log_z<'a>(&self, p: &'a ParamViews) -> Option<&'a Tensor> {
        self.log_z.map(|id| &p[id])
    }

    /// Forward logits of a batch of states, computed in plain Rust from the CPU parameters
    /// ([`crate::host_mlp`]): what a rollout asks for at every step. Returns false, leaving
    /// `logits` alone, when the parameters are not on the CPU, or when the batch is large
    /// enough for libtorch's GEMM on several threads to be faster than this one core.
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
        let host = |id: ParamId| self.params.host_values(id).expect("parameters on the CPU");
        match &self.pf {
            Head::Table(table) => {
                let (table, n_actions) = (host(*table), env.n_actions());
                logits.clear();
                for state in states.chunks_exact(env.state_dim()) {
                    let i = env.state_index(state);
                    logits.extend_from_slice(&table[i * n_actions..(i + 1) * n_actions]);
                }
            }
            Head::Mlp { trunk, out } => {
                let HostScratch {
                    input,
                    hidden,
                    next,
                } = scratch;
                input.resize(rows * env.encoding_dim(), 0.0);
                env.encode(states, input);
                let mut x: &[f32] = input;
                for layer in &self.trunks[*trunk] {
                    let b = host(layer.bias);
                    next.resize(rows * b.len(), 0.0);
                    crate::host_mlp::linear(x, host(layer.weight), b, rows, true, next);
                    std::mem::swap(hidden, next);
                    x = hidden;
                }
                let b = host(out.bias);
                logits.resize(rows * b.len(), 0.0);
                crate::host_mlp::linear(x, host(out.weight), b, rows, false, logits);
            }
        }
        true
    }

    /// Forward logits for a batch of states, without autograd (sampling, evaluation).
    pub fn pf_logits_no_grad(&self, input: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let p = self.params.views();
            self.forward(
                &p,
                input,
                Wanted {
                    pf: true,
                    ..Default::default()
                },
            )
            .pf_logits
            .expect("pf asked for")
        })
    }
}

/// Buffers that [`Estimators::pf_logits_host`] reuses between the steps of a rollout.
#[derive(Debug, Default)]
pub struct HostScratch {
    input: Vec<f32>,
    hidden: Vec<f32>,
    next: Vec<f32>,
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
