//! The fixed prior forward policy of the relative objectives (RTB, relative log-partition
//! variance, Trust-PCL), and the residual they share:
//! log p_post(τ) − log p_prior(τ) − β·log R(x).

use super::{per_trajectory_sum, Evaluated, PreparedBatch};
use crate::env::Environment;
use crate::estimators::{masked_log_softmax, Estimators};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// Where the prior comes from (`loss.<name>.prior`: an earlier run's directory, which the
/// binary loads) and, once loaded, the prior itself. Configurations compare and serialise by
/// the path alone.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(from = "PathBuf", into = "PathBuf")]
pub struct Prior {
    pub run: PathBuf,
    /// Behind a mutex because tensors may be sent between threads but not shared; it is only
    /// ever read.
    policy: Option<Arc<Mutex<Estimators>>>,
}

impl Prior {
    /// A prior already in memory (a library user's own).
    pub fn attached(policy: Estimators) -> Self {
        Prior {
            run: PathBuf::new(),
            policy: Some(Arc::new(Mutex::new(policy))),
        }
    }

    pub fn attach(&mut self, policy: Estimators) {
        self.policy = Some(Arc::new(Mutex::new(policy)));
    }

    pub fn is_attached(&self) -> bool {
        self.policy.is_some()
    }

    /// Runs `f` on the prior's estimators; `None` before one is attached.
    pub fn with_policy<T>(&self, f: impl FnOnce(&Estimators) -> T) -> Option<T> {
        let policy = self.policy.as_ref()?;
        let guard = policy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(f(&guard))
    }

    /// Refuses to train before the prior is loaded, naming the setting.
    pub(super) fn require(&self, field: &'static str) -> Result<()> {
        match self.is_attached() {
            true => Ok(()),
            false if self.run.as_os_str().is_empty() => Err(Error::invalid(
                field,
                "\"\"",
                "the relative objectives need a prior policy: an earlier run's directory",
            )),
            false => Err(Error::invalid(
                field,
                self.run.display(),
                "the prior policy was not loaded from it",
            )),
        }
    }

    /// Σ log P_F^prior(τ) per trajectory of a prepared batch, without autograd; the batch's
    /// distinct states are `rows`.
    pub(super) fn trajectory_log_pf(
        &self,
        env: &dyn Environment,
        rows: &[i64],
        batch: &PreparedBatch,
    ) -> Option<Tensor> {
        self.with_policy(|prior| {
            tch::no_grad(|| {
                let logits = prior.pf_logits_no_grad(&prior.input(env, rows));
                let picked = masked_log_softmax(&logits, &batch.forward_mask)
                    .view([-1])
                    .index_select(0, &batch.forward_pick);
                let picked = match &batch.has_action {
                    Some(has_action) => picked * has_action,
                    None => picked,
                };
                per_trajectory_sum(&picked, batch)
            })
        })
    }
}

impl From<PathBuf> for Prior {
    fn from(run: PathBuf) -> Self {
        Prior { run, policy: None }
    }
}

impl From<Prior> for PathBuf {
    fn from(prior: Prior) -> Self {
        prior.run
    }
}

impl PartialEq for Prior {
    fn eq(&self, other: &Self) -> bool {
        self.run == other.run
    }
}

impl std::fmt::Debug for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.is_attached() {
            "loaded"
        } else {
            "not loaded"
        };
        write!(f, "Prior({:?}, {state})", self.run)
    }
}

/// The `Objective` methods the relative objectives share: their `prior` field (the setting
/// named `$field`), a `beta()` method, one batched forward (`Form::PerState`) and torchgfn's
/// default regression for them, t²/2.
macro_rules! relative_to_prior {
    ($field:literal) => {
        fn validate_for(&self, _env: &dyn crate::env::Environment) -> crate::Result<()> {
            self.prior.require($field)
        }

        fn form(&self) -> super::Form<'_> {
            super::Form::PerState(self)
        }

        fn prior_mut(&mut self) -> Option<&mut Prior> {
            Some(&mut self.prior)
        }

        fn relative_to(&self) -> Option<(&Prior, f64)> {
            Some((&self.prior, self.beta()))
        }

        fn default_regression(&self) -> super::Regression {
            super::Regression::HalfSquared
        }
    };
}
pub(super) use relative_to_prior;

/// β must be a finite number (0 ignores the reward, which torchgfn allows).
pub(super) fn check_beta(field: &'static str, beta: f64) -> Result<()> {
    match beta.is_finite() {
        true => Ok(()),
        false => Err(Error::invalid(field, beta, "must be a finite number")),
    }
}

/// log p_post(τ) − log p_prior(τ) − β·log R(x) per trajectory (torchgfn's RTB scores). No
/// backward policy appears: both sides are forward probabilities of the same trajectory.
pub(super) fn relative_scores(ev: &Evaluated, batch: &PreparedBatch, beta: f64) -> Tensor {
    let prior = batch
        .prior_log_pf
        .as_ref()
        .expect("a relative objective's batch is prepared with its prior");
    per_trajectory_sum(&ev.log_pf, batch) - prior - &batch.log_rewards * beta
}
