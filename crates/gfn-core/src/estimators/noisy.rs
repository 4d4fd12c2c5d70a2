//! NoisyNet exploration (Fortunato et al., ICLR 2018; torchgfn's `n_noisy_layers`):
//! factorised Gaussian noise on P_F's last affine layers, drawn afresh for every rollout.
//! A noisy layer computes y = (μ_W + σ_W ⊙ ε_W)·x + μ_b + σ_b ⊙ ε_b with ε_W[i, o] =
//! f(ε_in[i])·f(ε_out[o]), ε_b = f(ε_out), f(e) = sign(e)·√|e| and ε_in, ε_out ~ N(0, 1).
//!
//! The loss evaluates the noise-free policy (μ alone): training on noisy rollouts is
//! off-policy, and σ, which would then get no gradient, is not a parameter here but stays at
//! torchgfn's initial values σ_W = std_init/√fan_in and σ_b = std_init/√fan_out.

use super::Estimators;
use crate::params::{standard_normal, ParamId, ParamStore};
use crate::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `model.noisy_layers`, `model.noisy_std_init`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoisyConfig {
    /// Noisy affine layers counted from P_F's output (0: none). The input layer is never
    /// noisy, so at most `model.layers`.
    pub layers: usize,
    pub std_init: f64,
}

impl Default for NoisyConfig {
    fn default() -> Self {
        NoisyConfig {
            layers: 0,
            std_init: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct NoisyLayer {
    weight: ParamId,
    bias: ParamId,
    inputs: usize,
    outputs: usize,
}

/// The noise of `NoisyConfig` on one set of estimators.
#[derive(Debug, Clone)]
pub struct ParameterNoise {
    layers: Vec<NoisyLayer>,
    std_init: f64,
}

/// The noise-free values of the perturbed parameters, to put back after the rollout.
#[must_use = "the parameters stay perturbed until restored"]
pub struct Unperturb(Vec<(ParamId, Tensor)>);

/// f(e) = sign(e)·√|e| of one standard normal draw per element.
fn scaled_noise(n: usize, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let e = standard_normal(rng);
            e.signum() * e.abs().sqrt()
        })
        .collect()
}

impl ParameterNoise {
    /// `None` without noisy layers; an error naming the setting where P_F cannot have them.
    pub fn new(estimators: &Estimators, config: NoisyConfig) -> Result<Option<Self>> {
        if config.layers == 0 {
            return Ok(None);
        }
        if !(config.std_init > 0.0 && config.std_init.is_finite()) {
            return Err(Error::invalid(
                "model.noisy_std_init",
                config.std_init,
                "must be > 0",
            ));
        }
        let Some(chain) = estimators.pf_chain() else {
            return Err(Error::invalid(
                "model.noisy_layers",
                config.layers,
                "noisy layers need model.architecture = \"mlp\"",
            ));
        };
        // The input layer is never noisy (torchgfn's rule).
        let allowed = chain.len() - 1;
        if config.layers > allowed {
            return Err(Error::invalid(
                "model.noisy_layers",
                config.layers,
                format!("at most model.layers = {allowed} (the input layer is never noisy)"),
            ));
        }
        let params = &estimators.params;
        let layers = chain[chain.len() - config.layers..]
            .iter()
            .map(|layer| {
                let shape = &params.spec(layer.weight).shape; // [in, out]
                NoisyLayer {
                    weight: layer.weight,
                    bias: layer.bias,
                    inputs: shape[0] as usize,
                    outputs: shape[1] as usize,
                }
            })
            .collect();
        Ok(Some(ParameterNoise {
            layers,
            std_init: config.std_init,
        }))
    }

    /// Adds fresh noise (from `rng`) to the noisy layers' parameters in place; the returned
    /// values restore them exactly.
    pub fn perturb(&self, params: &mut ParamStore, rng: &mut impl Rng) -> Unperturb {
        let mut saved = Vec::with_capacity(2 * self.layers.len());
        for layer in &self.layers {
            let (delta_w, delta_b) = self.draw(layer, rng);
            for (id, delta) in [(layer.weight, delta_w), (layer.bias, delta_b)] {
                saved.push((id, params.value(id)));
                params.add_to(id, &delta);
            }
        }
        Unperturb(saved)
    }

    /// σ ⊙ ε of one layer's weight (row-major [in, out]) and bias.
    fn draw(&self, layer: &NoisyLayer, rng: &mut impl Rng) -> (Vec<f32>, Vec<f32>) {
        let eps_in = scaled_noise(layer.inputs, rng);
        let eps_out = scaled_noise(layer.outputs, rng);
        let sigma_w = self.std_init / (layer.inputs as f64).sqrt();
        let sigma_b = self.std_init / (layer.outputs as f64).sqrt();
        let weight = eps_in
            .iter()
            .flat_map(|&i| eps_out.iter().map(move |&o| (sigma_w * i * o) as f32))
            .collect();
        let bias = eps_out.iter().map(|&o| (sigma_b * o) as f32).collect();
        (weight, bias)
    }
}

impl Unperturb {
    pub fn restore(self, params: &mut ParamStore) {
        for (id, values) in self.0 {
            params.set(id, &values);
        }
    }
}
