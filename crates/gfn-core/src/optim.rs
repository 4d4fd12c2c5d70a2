//! Adam / AdamW over the flat parameter tensor, with per-group learning rates (network, log Z).
//! Written here rather than taken from libtorch so that its state (moments, step) can be
//! checkpointed and restored exactly.

use crate::params::{ParamGroup, ParamStore};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// L2 penalty added to the gradient (torch.optim.Adam's weight_decay).
    Adam,
    /// Decoupled weight decay (torch.optim.AdamW).
    AdamW,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub lr_log_z: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [("optim.lr", self.lr), ("optim.lr_log_z", self.lr_log_z), ("optim.eps", self.eps)] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(Error::invalid(field, value, "must be > 0"));
            }
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid("optim.weight_decay", self.weight_decay, "must be >= 0"));
        }
        for (field, value) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::invalid(field, value, "must be in [0, 1)"));
            }
        }
        Ok(())
    }
}

pub struct Adam {
    config: OptimizerConfig,
    lr: Tensor,
    weight_decay: Tensor,
    pub(crate) exp_avg: Tensor,
    pub(crate) exp_avg_sq: Tensor,
    pub(crate) steps: u64,
}

impl Adam {
    pub fn new(params: &ParamStore, config: OptimizerConfig) -> Self {
        let lr = params.per_group(|g| match g {
            ParamGroup::Network => config.lr,
            ParamGroup::LogZ => config.lr_log_z,
        });
        // log Z is a free scalar: decaying it toward 0 would bias the partition estimate.
        let weight_decay = params.per_group(|g| match g {
            ParamGroup::Network => config.weight_decay,
            ParamGroup::LogZ => 0.0,
        });
        let zeros = params.flat().detach().zeros_like();
        Adam { config, lr, weight_decay, exp_avg: zeros.copy(), exp_avg_sq: zeros, steps: 0 }
    }

    /// One update from the gradient currently accumulated in `params`.
    pub fn step(&mut self, params: &mut ParamStore) {
        let c = self.config;
        self.steps += 1;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        tch::no_grad(|| {
            let mut p = params.flat().shallow_clone();
            let mut grad = params.grad();
            match c.kind {
                OptimizerKind::Adam if c.weight_decay > 0.0 => grad = grad + &p * &self.weight_decay,
                OptimizerKind::AdamW if c.weight_decay > 0.0 => {
                    let _ = p.g_mul_(&(1.0 - &self.lr * &self.weight_decay));
                }
                _ => {}
            }
            let _ = self.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = self.exp_avg_sq.lerp_(&grad.square(), 1.0 - c.beta2);
            let denom = (self.exp_avg_sq.sqrt() / bias2.sqrt()) + c.eps;
            let _ = p.g_sub_(&(&self.exp_avg / denom * &self.lr / bias1));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStoreBuilder;
    use tch::{Device, Kind};

    /// Adam written out for one scalar, as in Kingma & Ba (2015), as the second implementation.
    fn scalar_adam(mut x: f64, grads: impl Fn(f64) -> f64, lr: f64, wd: f64, decoupled: bool, steps: usize) -> f64 {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let (mut m, mut v) = (0.0, 0.0);
        for t in 1..=steps {
            let mut g = grads(x);
            if decoupled {
                x *= 1.0 - lr * wd;
            } else {
                g += wd * x;
            }
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let (mh, vh) = (m / (1.0 - b1.powi(t as i32)), v / (1.0 - b2.powi(t as i32)));
            x -= lr * mh / (vh.sqrt() + eps);
        }
        x
    }

    #[test]
    fn matches_a_scalar_reference_on_a_quadratic() {
        for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
            let mut b = ParamStoreBuilder::default();
            b.add("w", &[1], ParamGroup::Network, || 2.0);
            b.add("log_z", &[1], ParamGroup::LogZ, || -1.0);
            let mut params = b.build(Device::Cpu);
            let config = OptimizerConfig { kind, lr: 0.05, lr_log_z: 0.2, weight_decay: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
            let mut adam = Adam::new(&params, config);
            for _ in 0..25 {
                params.zero_grad();
                // f = (w - 1)^2 + (log_z - 3)^2
                let f = (params.flat() - Tensor::from_slice(&[1.0f32, 3.0])).square().sum(Kind::Float);
                f.backward();
                adam.step(&mut params);
            }
            let got = params.to_vec();
            let w = scalar_adam(2.0, |x| 2.0 * (x - 1.0), 0.05, 0.1, kind == OptimizerKind::AdamW, 25);
            let z = scalar_adam(-1.0, |x| 2.0 * (x - 3.0), 0.2, 0.0, kind == OptimizerKind::AdamW, 25);
            assert!((got[0] as f64 - w).abs() < 1e-5, "{kind:?} w: {} vs {w}", got[0]);
            assert!((got[1] as f64 - z).abs() < 1e-5, "{kind:?} log_z: {} vs {z}", got[1]);
        }
    }
}
