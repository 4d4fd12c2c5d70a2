//! The MLP over the environment's dense encoding: `layers` hidden layers of width `hidden`
//! with ReLU, and one linear head per output. Rollouts on the CPU run it in plain Rust
//! ([`crate::host_mlp`]).

use super::linear::Linear;
use super::{at_least_one, HeadWidths, HostScratch, Network, Outputs, Wanted};
use crate::env::Environment;
use crate::params::{ParamStore, ParamStoreBuilder, ParamViews};
use crate::Result;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

pub(crate) struct Mlp {
    trunk: Vec<Linear>,
    pf: Option<Linear>,
    pb: Option<Linear>,
    log_flow: Option<Linear>,
    heads: HeadWidths,
}

/// The dense encoding as a `[rows, encoding_dim]` tensor.
pub(crate) fn input(env: &dyn Environment, states: &[i64]) -> Tensor {
    let n = states.len() / env.state_dim();
    let width = env.encoding_dim();
    let mut encoded = vec![0f32; n * width];
    env.encode(states, &mut encoded);
    Tensor::from_slice(&encoded).view([n as i64, width as i64])
}

impl Mlp {
    pub fn new(
        env: &dyn Environment,
        b: &mut ParamStoreBuilder,
        name: &str,
        hidden: usize,
        layers: usize,
        heads: HeadWidths,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        at_least_one("model.hidden", hidden)?;
        let mut width = env.encoding_dim();
        let trunk = (0..layers)
            .map(|i| {
                let layer = Linear::new(b, &format!("{name}.trunk.{i}"), width, hidden, rng);
                width = hidden;
                layer
            })
            .collect();
        let mut head = |head: &str, outputs: Option<usize>| {
            outputs.map(|n| Linear::new(b, &format!("{head}.head"), width, n, rng))
        };
        let pf = head("pf", heads.pf);
        let pb = head("pb", heads.pb);
        let log_flow = head("log_flow", heads.log_flow.then_some(1));
        Ok(Mlp {
            trunk,
            pf,
            pb,
            log_flow,
            heads,
        })
    }
}

impl Network for Mlp {
    fn outputs(&self) -> Wanted {
        self.heads.outputs()
    }

    fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs {
        let hidden = self
            .trunk
            .iter()
            .fold(input.shallow_clone(), |x, l| l.forward(p, &x).relu());
        let run = |head: &Option<Linear>, asked: bool| {
            head.as_ref()
                .filter(|_| asked)
                .map(|h| h.forward(p, &hidden))
        };
        Outputs {
            pf_logits: run(&self.pf, wanted.pf),
            pb_logits: run(&self.pb, wanted.pb),
            log_flow: run(&self.log_flow, wanted.log_flow).map(|f| f.squeeze_dim(1)),
        }
    }

    fn pf_logits_host(
        &self,
        params: &ParamStore,
        env: &dyn Environment,
        states: &[i64],
        logits: &mut Vec<f32>,
        scratch: &mut HostScratch,
    ) -> bool {
        let Some(out) = &self.pf else {
            return false;
        };
        let rows = states.len() / env.state_dim();
        let [input, hidden, next] = scratch.buffers();
        input.resize(rows * env.encoding_dim(), 0.0);
        env.encode(states, input);
        let mut x: &[f32] = input;
        for layer in &self.trunk {
            layer.forward_host(params, x, true, next);
            std::mem::swap(hidden, next);
            x = hidden;
        }
        out.forward_host(params, x, false, logits);
        true
    }

    fn pf_chain(&self) -> Option<Vec<&Linear>> {
        let head = self.pf.as_ref()?;
        Some(self.trunk.iter().chain([head]).collect())
    }
}
