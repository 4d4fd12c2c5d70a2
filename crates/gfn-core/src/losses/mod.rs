//! GFlowNet objectives. Each loss is a pure function of a batch of trajectories and the
//! estimators' outputs on it: [`prepare`] turns trajectories into index and mask tensors,
//! [`evaluate`] runs one batched forward over the distinct states of the batch and gathers the
//! per-state values, and the loss functions only combine those tensors.

mod db;
mod fm;
mod modified_db;
mod prior;
mod regression;
mod relative_zvar;
mod rtb;
mod subtb;
mod tb;
mod trust_pcl;
mod zvar;

pub use db::DetailedBalance;
pub use fm::{flow_matching, FlowMatching};
pub use modified_db::ModifiedDetailedBalance;
pub use prior::Prior;
pub use regression::{Regression, Residuals};
pub use relative_zvar::RelativeLogPartitionVariance;
pub use rtb::RelativeTrajectoryBalance;
pub use subtb::{sub_trajectory_balance, subtb_weights, SubTbWeighting, SubTrajectoryBalance};
pub use tb::TrajectoryBalance;
pub use trust_pcl::TrustPcl;
pub use zvar::LogPartitionVariance;

use crate::env::{exit_action, Environment, NO_ACTION};
use crate::estimators::{additive_mask, masked_log_softmax, Estimators, Wanted};
use crate::parallel::{even_shares, map_on_pool, ReadOnly, ThreadPool};
use crate::params::ParamViews;
use crate::trajectories::Trajectories;
use crate::unique::UniqueRows;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What an objective asks of the estimators and of a prepared batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    pub log_flow: bool,
    pub log_z: bool,
    /// A backward policy (learned, tied or uniform); flow matching has none.
    pub backward_policy: bool,
    /// log R(s) of every state, not only of each trajectory's x.
    pub state_log_rewards: bool,
}

/// How an objective's learned quantities estimate log Z (see [`estimated_log_z`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogZEstimate {
    /// The log Z parameter.
    Parameter,
    /// The learned log F(s0).
    InitialFlow,
    /// The total edge flow out of s0.
    OutflowOfInitial,
    /// log R(s0) − log P_F(exit | s0), where every state can exit.
    ExitAtInitial,
    /// No estimate (the relative log-partition variance learns none).
    None,
}

/// How an objective reads the networks.
pub enum Form<'a> {
    /// From per-state outputs (log P_F, log P_B, log F, log Z) of one batched forward over
    /// the batch's distinct states, which the thread pool may split.
    PerState(&'a dyn PerStateLoss),
    /// From the trajectories themselves (flow matching evaluates every parent's edge flows).
    Trajectories(&'a dyn TrajectoryLoss),
}

/// A GFlowNet objective: one type in its own file, whose fields are its own `[loss.<name>]`
/// settings, registered by one line in the list below.
pub trait Objective: Send + Sync {
    fn needs(&self) -> Needs;
    /// Checks the objective's own settings, naming the bad one.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// Refuses environments the objective cannot train on.
    fn validate_for(&self, _env: &dyn Environment) -> Result<()> {
        Ok(())
    }
    fn form(&self) -> Form<'_>;
    /// Elements of the loss's own tensor ops for a batch (for [`pool_pays`]).
    fn loss_elements(&self, trajectories: usize, max_length: usize) -> usize {
        trajectories * max_length
    }
    fn log_z_estimate(&self) -> LogZEstimate;
    /// The prior and reward exponent β of an objective relative to a prior policy: its target
    /// is then p_prior(x)·R(x)^β / Z.
    fn relative_to(&self) -> Option<(&Prior, f64)> {
        None
    }
    /// Mutable access to that prior, for the binary to load it.
    fn prior_mut(&mut self) -> Option<&mut Prior> {
        None
    }
    /// The regression applied to residuals when `loss.regression` is not set (torchgfn's
    /// default for the objective).
    fn default_regression(&self) -> Regression {
        Regression::Squared
    }
    /// Values the objective reports from its log Z estimate at every evaluation.
    fn values_from_log_z(&self, _log_z: f64) -> Vec<(String, f64)> {
        Vec::new()
    }
}

pub trait PerStateLoss {
    /// The loss from the networks' outputs on a prepared batch, each residual through
    /// `residuals`.
    fn loss(&self, ev: &Evaluated, batch: &PreparedBatch, residuals: Residuals) -> Tensor;
}

/// Everything a [`TrajectoryLoss`] evaluates its own networks from.
#[derive(Clone, Copy)]
pub struct LossContext<'a> {
    pub env: &'a dyn Environment,
    pub estimators: &'a Estimators,
    pub p: &'a ParamViews,
    pub batch: &'a Trajectories,
    pub clip_min: f32,
    pub residuals: Residuals,
}

pub trait TrajectoryLoss {
    fn loss(&self, ctx: &LossContext) -> Tensor;
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The one list of objectives: `Variant(type) = key`, where `key` is both `loss.name` and the
/// objective's settings section `[loss.key]`.
macro_rules! objectives {
    ($($variant:ident($objective:ty) = $key:ident),+ $(,)?) => {
        /// The objectives `loss.name` accepts.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum LossKind {
            $($variant,)+
        }

        impl LossKind {
            pub const ALL: &'static [LossKind] = &[$(LossKind::$variant,)+];

            /// The name, as `loss.name` and the objective's section spell it.
            pub fn key(self) -> &'static str {
                match self {
                    $(LossKind::$variant => stringify!($key),)+
                }
            }

            /// The names, as `loss.name` spells them.
            pub fn names() -> String {
                [$(stringify!($key),)+].join(", ")
            }
        }

        /// `[loss]`: the objective (`name`), what every objective shares, and each objective's
        /// own settings (`[loss.subtb]`).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct LossConfig {
            pub name: LossKind,
            /// Lower clip of log-rewards inside the losses (torchgfn's `log_reward_clip_min`).
            pub log_reward_clip_min: f32,
            /// g applied to every balance residual (torchgfn's `loss_fn`); unset: the
            /// objective's own default (squared; half-squared for the relative objectives).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub regression: Option<Regression>,
            /// α of `regression = "linex"`.
            pub linex_alpha: f64,
            $(
                #[serde(skip_serializing_if = "is_default")]
                pub $key: $objective,
            )+
        }

        impl Default for LossConfig {
            fn default() -> Self {
                LossConfig {
                    name: LossKind::Tb,
                    log_reward_clip_min: f32::NEG_INFINITY,
                    regression: None,
                    linex_alpha: 1.0,
                    $($key: <$objective>::default(),)+
                }
            }
        }

        impl LossConfig {
            /// The objective `name` picks, with its settings.
            pub fn objective(&self) -> &dyn Objective {
                match self.name {
                    $(LossKind::$variant => &self.$key,)+
                }
            }

            pub fn objective_mut(&mut self) -> &mut dyn Objective {
                match self.name {
                    $(LossKind::$variant => &mut self.$key,)+
                }
            }

            /// Every objective's settings, whichever `name` picks (all are checked).
            fn every_objective(&self) -> Vec<&dyn Objective> {
                vec![$(&self.$key as &dyn Objective,)+]
            }
        }
    };
}

objectives! {
    Tb(TrajectoryBalance) = tb,
    Db(DetailedBalance) = db,
    Subtb(SubTrajectoryBalance) = subtb,
    Fm(FlowMatching) = fm,
    Zvar(LogPartitionVariance) = zvar,
    ModifiedDb(ModifiedDetailedBalance) = modified_db,
    Rtb(RelativeTrajectoryBalance) = rtb,
    RelativeZvar(RelativeLogPartitionVariance) = relative_zvar,
    TrustPcl(TrustPcl) = trust_pcl,
}

impl LossConfig {
    pub fn new(name: LossKind) -> Self {
        LossConfig {
            name,
            ..LossConfig::default()
        }
    }

    pub fn residuals(&self) -> Residuals {
        Residuals {
            regression: self.regression(),
            linex_alpha: self.linex_alpha,
        }
    }

    /// `regression`, or the objective's default.
    pub fn regression(&self) -> Regression {
        self.regression
            .unwrap_or_else(|| self.objective().default_regression())
    }

    pub fn validate(&self) -> Result<()> {
        if self.log_reward_clip_min.is_nan() {
            return Err(Error::invalid(
                "loss.log_reward_clip_min",
                self.log_reward_clip_min,
                "must be a number",
            ));
        }
        self.regression().validate(self.linex_alpha)?;
        self.every_objective()
            .into_iter()
            .try_for_each(|objective| objective.validate())
    }
}

/// What [`prepare`] builds besides what every objective uses.
#[derive(Debug, Clone, Copy)]
pub struct BatchNeeds<'a> {
    /// Lower clip of log-rewards (torchgfn's `log_reward_clip_min`).
    pub clip_min: f32,
    /// log R(s) of every state, not only of each trajectory's x (modified detailed balance).
    pub state_log_rewards: bool,
    /// The prior whose Σ log P_F(τ) the relative objectives compare against.
    pub prior: Option<&'a Prior>,
}

impl<'a> BatchNeeds<'a> {
    pub fn of(config: &'a LossConfig) -> Self {
        let objective = config.objective();
        BatchNeeds {
            clip_min: config.log_reward_clip_min,
            state_log_rewards: objective.needs().state_log_rewards,
            prior: objective.relative_to().map(|(prior, _)| prior),
        }
    }

    /// Only what the networks' forward pass reads (a share of a batch being evaluated).
    fn networks_only(self) -> Self {
        BatchNeeds {
            prior: None,
            ..self
        }
    }
}

/// Tensors describing a batch, built once on the host and moved to the device. The networks
/// run once per distinct state of the batch ([`UniqueRows`]); per-state values are gathered
/// from those rows by the `*_pick` indices.
///
/// Trajectory b's edges run from its states to a sink whose log-flow is log R(x): with an exit
/// action, every state starts an edge and the last one (x → sink) is the exit; without one,
/// x is itself the sink, so the last state starts no edge and the edge into x ends at the sink.
pub struct PreparedBatch {
    pub n_trajectories: usize,
    /// Trajectory boundaries (host side, for sub-trajectory weights).
    pub offsets: Vec<usize>,
    /// Whether trajectories end with an exit action (else x is the sink itself).
    pub exits: bool,
    /// Network input: one row per distinct state.
    pub input: Tensor,
    /// Additive masks of the distinct states.
    forward_mask: Tensor,
    backward_mask: Option<Tensor>,
    /// Distinct row of each state.
    state_row: Tensor,
    /// Flat index into the distinct rows' forward log-probabilities: the action taken at each
    /// state.
    forward_pick: Tensor,
    /// Flat index into the distinct rows' backward log-probabilities: the backward action from
    /// state t to t-1 (action 0 at first states, where it is masked out).
    backward_pick: Tensor,
    /// log of the uniform P_B(s_{t-1} | s_t) when P_B is not learned.
    uniform_log_pb: Option<Tensor>,
    /// 0 at the last state of a trajectory without an exit action (no action taken there).
    has_action: Option<Tensor>,
    /// 1 where a state starts an edge, 0 at x when x is the sink.
    pub starts_edge: Tensor,
    /// Edges over the whole batch.
    pub n_edges: usize,
    /// Whether the edge that starts at each state ends at the sink.
    pub into_sink: Tensor,
    /// 0 at the first state of each trajectory, 1 elsewhere.
    pub not_first: Tensor,
    pub not_last: Tensor,
    pub is_last: Tensor,
    pub trajectory_of_state: Tensor,
    /// Index of the next state in the trajectory (the state itself for the last one).
    pub next_index: Tensor,
    /// Clipped log R(x) per trajectory.
    pub log_rewards: Tensor,
    /// Clipped log R(s) per state (for losses that treat every state as terminating).
    pub state_log_rewards: Option<Tensor>,
    /// Σ log P_F^prior(τ) per trajectory, for the relative objectives.
    pub prior_log_pf: Option<Tensor>,
}

impl PreparedBatch {
    /// Edges of trajectory `b`: its states, or one fewer when x is the sink.
    pub fn edges(&self, b: usize) -> usize {
        self.offsets[b + 1] - self.offsets[b] - usize::from(!self.exits)
    }
}

pub(crate) fn host_tensor<T: tch::kind::Element>(values: &[T], device: Device) -> Tensor {
    Tensor::from_slice(values).to_device(device)
}

fn as_f32(flags: &[bool]) -> Vec<f32> {
    flags.iter().map(|&f| f as u8 as f32).collect()
}

pub fn prepare(
    env: &dyn Environment,
    estimators: &Estimators,
    batch: &Trajectories,
    needs: BatchNeeds,
) -> PreparedBatch {
    let device = estimators.device();
    let s = batch.n_states();
    let (n_actions, n_back) = (env.n_actions(), env.n_backward_actions());
    let exits = exit_action(env).is_some();
    let unique = UniqueRows::new(&batch.states, batch.state_dim);
    let n_unique = unique.len();
    let is_first = batch.is_first();
    let is_last = batch.is_last();
    let network = NetworkRows::new(estimators, &unique, batch.state_dim, &is_last, exits);
    let mut forward_mask = vec![false; network.states.len() / batch.state_dim * n_actions];
    env.forward_masks(&network.states, &mut forward_mask);
    let mut backward_mask = vec![false; n_unique * n_back];
    env.backward_masks(&unique.rows, &mut backward_mask);
    let row = |i: usize| network.row_of[unique.index_of[i]] as i64;
    // A state without an action (x, without an exit action) picks column 0, masked out below.
    let forward_pick: Vec<i64> = (0..s)
        .map(|i| match batch.actions[i] {
            NO_ACTION => row(i) * n_actions as i64,
            a => row(i) * n_actions as i64 + a as i64,
        })
        .collect();
    let backward_pick: Vec<i64> = (0..s)
        .map(|i| {
            let action = if is_first[i] {
                0
            } else {
                env.backward_action_of(batch.state(i - 1), batch.actions[i - 1]) as i64
            };
            row(i) * n_back as i64 + action
        })
        .collect();
    let next_index: Vec<i64> = (0..s)
        .map(|i| if is_last[i] { i as i64 } else { i as i64 + 1 })
        .collect();
    let clip = |v: &mut f32| *v = v.max(needs.clip_min);
    let state_log_rewards = needs.state_log_rewards.then(|| {
        let mut values = vec![0f32; s];
        env.log_reward(&batch.states, &mut values);
        values.iter_mut().for_each(clip);
        host_tensor(&values, device)
    });
    let mut log_rewards = batch.log_rewards.clone();
    log_rewards.iter_mut().for_each(clip);
    let uniform_log_pb = (!estimators.has_learned_pb()).then(|| {
        let values: Vec<f32> = (0..s)
            .map(|i| {
                if is_first[i] {
                    0.0
                } else {
                    let r = unique.index_of[i];
                    let mask = &backward_mask[r * n_back..(r + 1) * n_back];
                    -(mask.iter().filter(|&&a| a).count() as f32).ln()
                }
            })
            .collect();
        host_tensor(&values, device)
    });
    let state_row: Vec<i64> = (0..s).map(row).collect();
    let not_first: Vec<bool> = is_first.iter().map(|f| !f).collect();
    let not_last: Vec<bool> = is_last.iter().map(|f| !f).collect();
    let starts_edge: Vec<bool> = if exits {
        vec![true; s]
    } else {
        not_last.clone()
    };
    let into_sink: Vec<bool> = if exits {
        is_last.clone()
    } else {
        (0..s).map(|i| i + 1 < s && is_last[i + 1]).collect()
    };
    let mut prepared = PreparedBatch {
        n_trajectories: batch.len(),
        offsets: batch.offsets.clone(),
        exits,
        input: estimators.input(env, &network.states),
        forward_mask: additive_mask(&forward_mask, n_actions, device),
        backward_mask: estimators
            .has_learned_pb()
            .then(|| additive_mask(&backward_mask, n_back, device)),
        state_row: host_tensor(&state_row, device),
        forward_pick: host_tensor(&forward_pick, device),
        backward_pick: host_tensor(&backward_pick, device),
        uniform_log_pb,
        has_action: (!exits).then(|| host_tensor(&as_f32(&not_last), device)),
        n_edges: starts_edge.iter().filter(|&&e| e).count(),
        starts_edge: host_tensor(&as_f32(&starts_edge), device),
        into_sink: host_tensor(&into_sink, device),
        not_first: host_tensor(&as_f32(&not_first), device),
        not_last: host_tensor(&as_f32(&not_last), device),
        is_last: host_tensor(&is_last, device),
        trajectory_of_state: host_tensor(&batch.trajectory_of_states(), device),
        next_index: host_tensor(&next_index, device),
        log_rewards: host_tensor(&log_rewards, device),
        state_log_rewards,
        prior_log_pf: None,
    };
    if let Some(prior) = needs.prior {
        prepared.prior_log_pf = prior.trajectory_log_pf(env, &network.states, &prepared);
    }
    prepared
}

/// The distinct states that the networks run on. Without an exit action the last state of a
/// trajectory takes no action, so where P_F is all the networks give, nothing of its row would
/// be read: those rows are left out (gfnx's bitseq: 16 of 241 rows at batch 16), and their
/// states point at row 0 (always kept), whose picked value `has_action` zeroes.
struct NetworkRows {
    /// The states, `dim` values each.
    states: Vec<i64>,
    /// Each distinct state's row among `states` (0 for those left out).
    row_of: Vec<usize>,
}

impl NetworkRows {
    fn new(
        estimators: &Estimators,
        unique: &UniqueRows,
        dim: usize,
        is_last: &[bool],
        exits: bool,
    ) -> Self {
        let skip_last = !exits && estimators.all_outputs() == Wanted::PF;
        let mut needed = vec![!skip_last; unique.len()];
        for (&u, &last) in unique.index_of.iter().zip(is_last) {
            needed[u] |= !last;
        }
        if let Some(first) = needed.first_mut() {
            *first = true;
        }
        let mut rows = NetworkRows {
            states: Vec::with_capacity(unique.rows.len()),
            row_of: vec![0; unique.len()],
        };
        for (u, state) in unique.rows.chunks_exact(dim).enumerate() {
            if needed[u] {
                rows.row_of[u] = rows.states.len() / dim;
                rows.states.extend_from_slice(state);
            }
        }
        rows
    }
}

/// Estimator outputs on every state of a batch.
pub struct Evaluated {
    /// log P_F(a_t | s_t) of the action taken (the exit at the last state).
    pub log_pf: Tensor,
    /// log P_F(exit | s_t) at every state, where there is an exit action.
    pub log_pf_exit: Option<Tensor>,
    /// log P_B(s_{t-1} | s_t); 0 at the first state.
    pub log_pb: Tensor,
    pub log_flow: Option<Tensor>,
    pub log_z: Option<Tensor>,
}

/// Per-state outputs of some of the networks; what they do not compute stays `None`.
#[derive(Default)]
struct NetworkOutputs {
    log_pf: Option<Tensor>,
    log_pf_exit: Option<Tensor>,
    log_pb: Option<Tensor>,
    log_flow: Option<Tensor>,
}

impl NetworkOutputs {
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        NetworkOutputs {
            log_pf: self.log_pf.as_ref().map(&f),
            log_pf_exit: self.log_pf_exit.as_ref().map(&f),
            log_pb: self.log_pb.as_ref().map(&f),
            log_flow: self.log_flow.as_ref().map(&f),
        }
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [
            &self.log_pf,
            &self.log_pf_exit,
            &self.log_pb,
            &self.log_flow,
        ]
        .into_iter()
        .flatten()
    }

    /// Outputs of two groups of networks together.
    fn or(self, other: Self) -> Self {
        NetworkOutputs {
            log_pf: self.log_pf.or(other.log_pf),
            log_pf_exit: self.log_pf_exit.or(other.log_pf_exit),
            log_pb: self.log_pb.or(other.log_pb),
            log_flow: self.log_flow.or(other.log_flow),
        }
    }

    /// Outputs of consecutive shares of a batch's states, joined in order.
    fn concat(parts: &[NetworkOutputs]) -> Self {
        let join = |field: fn(&NetworkOutputs) -> &Option<Tensor>| {
            let tensors: Option<Vec<&Tensor>> = parts.iter().map(|p| field(p).as_ref()).collect();
            tensors.map(|t| Tensor::cat(&t, 0))
        };
        NetworkOutputs {
            log_pf: join(|o| &o.log_pf),
            log_pf_exit: join(|o| &o.log_pf_exit),
            log_pb: join(|o| &o.log_pb),
            log_flow: join(|o| &o.log_flow),
        }
    }
}

/// Runs the networks of `wanted` over the batch's distinct states and gathers per-state values.
fn evaluate_networks(
    estimators: &Estimators,
    p: &ParamViews,
    batch: &PreparedBatch,
    exit_action: Option<usize>,
    wanted: Wanted,
) -> NetworkOutputs {
    let out = estimators.forward(p, &batch.input, wanted);
    let (log_pf, log_pf_exit) = match out.pf_logits {
        Some(logits) => {
            let log_probs = masked_log_softmax(&logits, &batch.forward_mask);
            let picked = log_probs.view([-1]).index_select(0, &batch.forward_pick);
            let exit = exit_action.map(|exit| {
                log_probs
                    .select(1, exit as i64)
                    .index_select(0, &batch.state_row)
            });
            match &batch.has_action {
                Some(has_action) => (Some(picked * has_action), exit),
                None => (Some(picked), exit),
            }
        }
        None => (None, None),
    };
    let log_pb = out.pb_logits.map(|logits| {
        let mask = batch
            .backward_mask
            .as_ref()
            .expect("a batch is prepared for the estimators that evaluate it");
        masked_log_softmax(&logits, mask)
            .view([-1])
            .index_select(0, &batch.backward_pick)
            * &batch.not_first
    });
    NetworkOutputs {
        log_pf,
        log_pf_exit,
        log_pb,
        log_flow: out.log_flow.map(|f| f.index_select(0, &batch.state_row)),
    }
}

/// Completes the networks' outputs with what needs no network (a uniform P_B, log Z).
fn evaluated(
    outputs: NetworkOutputs,
    estimators: &Estimators,
    p: &ParamViews,
    batch: &PreparedBatch,
) -> Evaluated {
    let log_pb = outputs
        .log_pb
        .or_else(|| batch.uniform_log_pb.as_ref().map(Tensor::shallow_clone))
        .expect("a batch is prepared for the estimators that evaluate it");
    Evaluated {
        log_pf: outputs.log_pf.expect("P_F is always evaluated"),
        log_pf_exit: outputs.log_pf_exit,
        log_pb,
        log_flow: outputs.log_flow,
        log_z: estimators.log_z(p).map(|t| t.shallow_clone()),
    }
}

pub fn evaluate(
    estimators: &Estimators,
    p: &ParamViews,
    batch: &PreparedBatch,
    exit_action: Option<usize>,
) -> Evaluated {
    let outputs = evaluate_networks(estimators, p, batch, exit_action, estimators.all_outputs());
    evaluated(outputs, estimators, p, batch)
}

/// Sum of per-state values over each trajectory.
pub fn per_trajectory_sum(values: &Tensor, batch: &PreparedBatch) -> Tensor {
    Tensor::zeros(
        [batch.n_trajectories as i64],
        (Kind::Float, values.device()),
    )
    .index_add(0, &batch.trajectory_of_state, values)
}

/// Σ log P_F(τ) (the exit included) and Σ log P_B(τ | x) of each trajectory, without autograd.
pub fn trajectory_log_probs(
    env: &dyn Environment,
    estimators: &Estimators,
    batch: &Trajectories,
) -> (Vec<f64>, Vec<f64>) {
    tch::no_grad(|| {
        let p = estimators.params.views();
        let needs = BatchNeeds {
            clip_min: f32::NEG_INFINITY,
            state_log_rewards: false,
            prior: None,
        };
        let prepared = prepare(env, estimators, batch, needs);
        let wanted = Wanted {
            pf: true,
            pb: estimators.has_learned_pb(),
            log_flow: false,
        };
        let outputs = evaluate_networks(estimators, &p, &prepared, exit_action(env), wanted);
        let ev = evaluated(outputs, estimators, &p, &prepared);
        let sums = |t: &Tensor| {
            Vec::<f32>::try_from(per_trajectory_sum(t, &prepared).to_device(Device::Cpu))
                .expect("f32 sums")
                .into_iter()
                .map(f64::from)
                .collect()
        };
        (sums(&ev.log_pf), sums(&ev.log_pb))
    })
}

/// log of the importance weight target(τ)/P_F(τ) of each trajectory, whose mean under P_F is
/// the ELBO, a lower bound on log Z: log P_B(τ|x) + log R(x) − log P_F(τ), or relative to a
/// prior at β (`Objective::relative_to`) log p_prior(τ) + β·log R(x) − log P_F(τ).
pub fn log_importance_weights(
    relative: Option<(&Prior, f64)>,
    env: &dyn Environment,
    estimators: &Estimators,
    batch: &Trajectories,
) -> Vec<f64> {
    let (log_pf, log_pb) = trajectory_log_probs(env, estimators, batch);
    let log_r = batch.log_rewards.iter().map(|&r| r as f64);
    let prior = relative.and_then(|(prior, beta)| {
        let log_prior = prior.with_policy(|p| trajectory_log_probs(env, p, batch).0)?;
        Some((log_prior, beta))
    });
    match prior {
        Some((log_prior, beta)) => log_r
            .zip(log_prior.iter().zip(&log_pf))
            .map(|(r, (prior, pf))| prior + beta * r - pf)
            .collect(),
        None => log_r
            .zip(log_pb.iter().zip(&log_pf))
            .map(|(r, (pb, pf))| pb + r - pf)
            .collect(),
    }
}

/// The loss of `config`'s objective on a batch of trajectories.
pub fn compute_loss(
    config: &LossConfig,
    env: &dyn Environment,
    estimators: &Estimators,
    p: &ParamViews,
    batch: &Trajectories,
) -> Tensor {
    let per_state = match config.objective().form() {
        Form::Trajectories(objective) => {
            return objective.loss(&LossContext {
                env,
                estimators,
                p,
                batch,
                clip_min: config.log_reward_clip_min,
                residuals: config.residuals(),
            })
        }
        Form::PerState(objective) => objective,
    };
    let prepared = prepare(env, estimators, batch, BatchNeeds::of(config));
    let ev = evaluate(estimators, p, &prepared, exit_action(env));
    per_state.loss(&ev, &prepared, config.residuals())
}

/// Whether [`loss_and_backward`] on a pool of `threads` beats libtorch's own intra-op threads
/// for batches of `trajectories` trajectories of at most `max_length` states. Measured on two
/// cores (README): the pool wins by running networks side by side (P_F and P_B: +11-17% at
/// 4x8 and 2x64, batch 16 and 128) and by splitting small batches' trajectories. It loses
/// where one thread is left with a large serial part that libtorch would split:
/// - the loss's own tensor ops, per state except SubTB's, which pair every two positions of
///   every trajectory (over ~64k elements: SubTB on 2x64 lost a fifth);
/// - networks that do not share out evenly (DB's three on two threads) on large batches (over
///   ~1k trajectory states: -4% and -7% at batch 128).
pub fn pool_pays(
    config: &LossConfig,
    estimators: &Estimators,
    threads: usize,
    trajectories: usize,
    max_length: usize,
) -> bool {
    let loss_elements = config.objective().loss_elements(trajectories, max_length);
    let groups = estimators
        .independent_groups(estimators.all_outputs())
        .len();
    let uneven = groups > 1 && !groups.is_multiple_of(threads.max(1));
    loss_elements <= 1 << 16 && !(uneven && trajectories * max_length > 1 << 10)
}

/// How [`loss_and_backward`] spreads the networks' work over threads.
enum Split {
    /// Groups of networks that share no parameters, each on its own thread, over all states.
    Networks(Vec<Wanted>),
    /// Consecutive shares of the trajectories, each on its own thread with its own leaf set,
    /// through every network: for estimators that are one group (a tied or uniform P_B).
    Rows(usize),
}

/// A loss with its backward pass done, and the time each took.
pub struct Backward {
    pub loss: Tensor,
    /// The networks' forward pass and the loss.
    pub forward: std::time::Duration,
    pub backward: std::time::Duration,
}

/// [`compute_loss`] and its backward pass, which accumulates the gradients into the parameter
/// leaves ([`ParamStore::grad`] sums them). With a thread pool the networks' forward and
/// backward passes run on several threads, split by network where they share no parameters,
/// else by trajectories; only the loss itself, a few small ops on per-state values, runs on
/// one thread between the two. Returns the loss.
///
/// [`ParamStore::grad`]: crate::params::ParamStore::grad
pub fn loss_and_backward(
    config: &LossConfig,
    env: &dyn Environment,
    estimators: &mut Estimators,
    batch: &Trajectories,
    pool: Option<&ThreadPool>,
) -> Backward {
    let started = std::time::Instant::now();
    let groups = estimators.independent_groups(estimators.all_outputs());
    let per_state = match config.objective().form() {
        Form::PerState(objective) => Some(objective),
        Form::Trajectories(_) => None,
    };
    let split = match pool {
        _ if per_state.is_none() => None,
        Some(_) if groups.len() > 1 => Some(Split::Networks(groups)),
        Some(pool) if batch.len() > 1 => Some(Split::Rows(pool.threads().min(batch.len()))),
        _ => None,
    };
    let (Some(split), Some(pool), Some(per_state)) = (split, pool, per_state) else {
        let loss = compute_loss(config, env, estimators, &estimators.params.views(), batch);
        let forward = started.elapsed();
        loss.backward();
        return Backward {
            loss,
            forward,
            backward: started.elapsed() - forward,
        };
    };
    if let Split::Rows(shares) = split {
        estimators.params.ensure_leaf_sets(shares);
    }
    let estimators = &*estimators;
    let p = estimators.params.views();
    let needs = BatchNeeds::of(config);
    let prepared = prepare(env, estimators, batch, needs);
    let exit_action = exit_action(env);
    // SAFETY: every thread writes only the gradients of its own leaves (its networks' in a
    // split by network, its leaf set's in a split by rows); everything else here is only read.
    let (shared_estimators, shared_p, shared_batch) = unsafe {
        (
            ReadOnly::new(estimators),
            ReadOnly::new(&p),
            ReadOnly::new(&prepared),
        )
    };
    let outputs = match &split {
        Split::Networks(groups) => map_on_pool(pool, groups.clone(), |wanted| {
            evaluate_networks(
                shared_estimators.get(),
                shared_p.get(),
                shared_batch.get(),
                exit_action,
                wanted,
            )
        }),
        Split::Rows(shares) => {
            let ranges = even_shares(batch.len(), *shares).enumerate();
            map_on_pool(pool, ranges.collect(), |(set, range)| {
                let estimators = shared_estimators.get();
                let share = prepare(env, estimators, &batch.subset(range), needs.networks_only());
                let all = estimators.all_outputs();
                let p = estimators.params.views_of(set);
                evaluate_networks(estimators, &p, &share, exit_action, all)
            })
        }
    };
    // The loss sees the outputs as leaves; their gradients then seed each thread's backward.
    let leaves: Vec<NetworkOutputs> = outputs
        .iter()
        .map(|o| o.map(|t| t.detach().set_requires_grad(true)))
        .collect();
    let merged = match split {
        Split::Networks(_) => leaves
            .iter()
            .map(|l| l.map(Tensor::shallow_clone))
            .fold(NetworkOutputs::default(), NetworkOutputs::or),
        Split::Rows(_) => NetworkOutputs::concat(&leaves),
    };
    let loss = per_state.loss(
        &evaluated(merged, estimators, &p, &prepared),
        &prepared,
        config.residuals(),
    );
    let forward = started.elapsed();
    loss.backward();
    let seeded: Vec<(NetworkOutputs, NetworkOutputs)> = outputs.into_iter().zip(leaves).collect();
    map_on_pool(pool, seeded, |(outputs, leaves)| {
        // Σ output · d loss/d output: its gradient is the vector-Jacobian product needed here.
        let surrogate = outputs
            .tensors()
            .zip(leaves.tensors())
            .filter_map(|(out, leaf)| {
                let grad = leaf.grad();
                grad.defined().then(|| (out * grad).sum(Kind::Float))
            })
            .reduce(|a, b| a + b);
        if let Some(surrogate) = surrogate {
            surrogate.backward();
        }
    });
    Backward {
        loss: loss.detach(),
        forward,
        backward: started.elapsed() - forward,
    }
}

/// The learned estimate of log Z, as the objective reads it ([`LogZEstimate`]): which equals
/// log Z wherever the policy samples x with probability R(x)/Z. `None` where the objective has
/// no estimate in this environment.
pub fn estimated_log_z(
    objective: &dyn Objective,
    env: &dyn Environment,
    estimators: &Estimators,
) -> Option<f64> {
    let mut s0 = vec![0i64; env.state_dim()];
    env.initial_state(&mut s0);
    let p = estimators.params.views();
    let estimate = objective.log_z_estimate();
    tch::no_grad(|| {
        let input = estimators.input(env, &s0);
        let wanted = Wanted {
            pf: true,
            pb: false,
            log_flow: estimate == LogZEstimate::InitialFlow,
        };
        let out = estimators.forward(&p, &input, wanted);
        let mut mask = vec![false; env.n_actions()];
        env.forward_masks(&s0, &mut mask);
        let mask = additive_mask(&mask, env.n_actions(), estimators.device());
        let logits = out.pf_logits.expect("pf asked for");
        let value = match estimate {
            LogZEstimate::Parameter => estimators.log_z(&p)?.shallow_clone(),
            LogZEstimate::InitialFlow => out.log_flow?,
            LogZEstimate::OutflowOfInitial => (logits + mask).logsumexp([1i64].as_slice(), false),
            LogZEstimate::ExitAtInitial => {
                let exit = exit_action(env).filter(|_| env.exits_everywhere())?;
                let mut log_r = [0f32];
                env.log_reward(&s0, &mut log_r);
                -masked_log_softmax(&logits, &mask).select(1, exit as i64) + log_r[0] as f64
            }
            LogZEstimate::None => return None,
        };
        Some(value.double_value(&[0]))
    })
}
