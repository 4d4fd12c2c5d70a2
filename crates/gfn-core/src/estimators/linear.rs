//! The affine layer every architecture builds on.

use crate::params::{ParamId, ParamStore, ParamStoreBuilder, ParamViews};
use rand::Rng;
use tch::Tensor;

pub(crate) struct Linear {
    pub weight: ParamId, // [in, out]
    pub bias: ParamId,   // [out]
}

impl Linear {
    /// PyTorch's nn.Linear (and equinox's) default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    /// weight and bias.
    pub fn new(
        b: &mut ParamStoreBuilder,
        name: &str,
        input: usize,
        output: usize,
        rng: &mut impl Rng,
    ) -> Self {
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

    /// `x · W + b` (then ReLU if `relu`) in plain Rust from the CPU parameters, for `x` of
    /// rows × inputs, into `out` ([`crate::host_mlp::linear`]).
    pub fn forward_host(&self, params: &ParamStore, x: &[f32], relu: bool, out: &mut Vec<f32>) {
        let host = |id: ParamId| params.host_values(id).expect("parameters on the CPU");
        let (weight, bias) = (host(self.weight), host(self.bias));
        let rows = x.len() / (weight.len() / bias.len());
        out.resize(rows * bias.len(), 0.0);
        crate::host_mlp::linear(x, weight, bias, rows, relu, out);
    }

    /// `x · W + b` over the last dimension of `x` (rows of any leading shape).
    pub fn forward(&self, p: &ParamViews, x: &Tensor) -> Tensor {
        let size = x.size();
        if size.len() == 2 {
            return p[self.bias].addmm(x, &p[self.weight]);
        }
        let width = *size.last().expect("at least one dimension");
        let mut out_size = size.clone();
        *out_size.last_mut().expect("at least one dimension") = p[self.bias].size()[0];
        p[self.bias]
            .addmm(&x.reshape([-1, width]), &p[self.weight])
            .view(out_size.as_slice())
    }
}
