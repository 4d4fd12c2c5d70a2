//! A Transformer encoder over the environment's tokens, built from libtorch ops the way gfnx's
//! bitseq baselines build theirs (equinox): token embedding plus a fixed sinusoidal position
//! encoding; each layer is multi-head self-attention with a residual connection, then per
//! token LayerNorm → Linear → ReLU → Linear, added to the normalised input and normalised
//! again. Action logits laid out per token ([`TokenLayout`]) come from a linear head on each
//! of those tokens' outputs; the other outputs (an exit action, log F) from token 0's.
//!
//! On the CPU the attention is our own autograd function (`attention.cpp`, built by gfn-core's
//! build script against libtorch's headers): libtorch's scaled_dot_product_attention spent
//! most of a bitseq step setting up thousands of 16 × 8 matrix products (measured: 23 ms per
//! layer forward and backward at 241 states, against 7.5 ms).

use super::linear::Linear;
use super::{at_least_one, HeadWidths, Network, Outputs, Wanted};
use crate::env::{Environment, TokenLayout, Tokenized};
use crate::params::{ParamGroup, ParamId, ParamStoreBuilder, ParamViews};
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

/// `[model.transformer]`: gfnx's bitseq baselines use 3 layers, 8 heads, width 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerConfig {
    pub layers: usize,
    pub heads: usize,
    /// Embedding and hidden width (a multiple of `heads`).
    pub width: usize,
    /// Width of the feed-forward block's inner layer.
    pub ff: usize,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            layers: 3,
            heads: 8,
            width: 64,
            ff: 64,
        }
    }
}

impl TransformerConfig {
    pub fn validate(&self) -> Result<()> {
        at_least_one("model.transformer.layers", self.layers)?;
        at_least_one("model.transformer.heads", self.heads)?;
        at_least_one("model.transformer.ff", self.ff)?;
        if self.width == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                "model.transformer.width",
                self.width,
                format!(
                    "must be a positive multiple of model.transformer.heads = {}",
                    self.heads
                ),
            ));
        }
        Ok(())
    }
}

const LAYER_NORM_EPS: f64 = 1e-5;

struct LayerNorm {
    weight: ParamId,
    bias: ParamId,
}

impl LayerNorm {
    fn new(b: &mut ParamStoreBuilder, name: &str, width: usize) -> Self {
        let shape = [width as i64];
        LayerNorm {
            weight: b.add(
                &format!("{name}.weight"),
                &shape,
                ParamGroup::Network,
                || 1.0,
            ),
            bias: b.add(&format!("{name}.bias"), &shape, ParamGroup::Network, || 0.0),
        }
    }

    fn forward(&self, p: &ParamViews, x: &Tensor) -> Tensor {
        let width = p[self.bias].size()[0];
        x.layer_norm(
            [width],
            Some(&p[self.weight]),
            Some(&p[self.bias]),
            LAYER_NORM_EPS,
            false,
        )
    }
}

struct Block {
    /// Query, key and value projections side by side: `[width, 3 · width]`.
    qkv: Linear,
    out: Linear,
    norm_in: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    norm_out: LayerNorm,
}

/// Logits of a block of outputs: per-token for the laid-out actions, then from token 0.
struct Head {
    per_token: Option<(TokenLayout, Linear)>,
    pooled: Option<Linear>,
}

pub(crate) struct Transformer {
    config: TransformerConfig,
    embedding: ParamId,
    /// Sinusoidal position encoding, `length × width` values, not learned.
    positions: Vec<f32>,
    blocks: Vec<Block>,
    pf: Option<Head>,
    pb: Option<Head>,
    log_flow: Option<Linear>,
    heads: HeadWidths,
}

/// Token ids as a `[rows, length]` tensor.
pub(crate) fn input(env: &dyn Environment, states: &[i64]) -> Tensor {
    let tokens = env
        .tokens()
        .expect("checked when the Transformer was built");
    let rows = states.len() / env.state_dim();
    let mut ids = vec![0i64; rows * tokens.length()];
    tokens.tokenize(states, &mut ids);
    Tensor::from_slice(&ids).view([rows as i64, tokens.length() as i64])
}

/// pe[t, 2i] = sin(t · 10000^(−2i/width)), pe[t, 2i + 1] = cos(same).
fn sinusoidal(length: usize, width: usize) -> Vec<f32> {
    let mut pe = vec![0f32; length * width];
    for t in 0..length {
        for i in (0..width).step_by(2) {
            let angle = t as f64 * (-(i as f64) * 10000f64.ln() / width as f64).exp();
            pe[t * width + i] = angle.sin() as f32;
            if i + 1 < width {
                pe[t * width + i + 1] = angle.cos() as f32;
            }
        }
    }
    pe
}

impl Head {
    fn new(
        b: &mut ParamStoreBuilder,
        name: &str,
        width: usize,
        outputs: usize,
        layout: Option<TokenLayout>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let laid_out = layout.map_or(0, |l| l.actions());
        if laid_out > outputs {
            return Err(Error::invalid(
                "model.architecture",
                "transformer",
                format!(
                    "the token layout has {laid_out} actions, more than the {outputs} of {name}"
                ),
            ));
        }
        let per_token = layout.map(|l| {
            (
                l,
                Linear::new(b, &format!("{name}.per_token"), width, l.choices, rng),
            )
        });
        let pooled = (outputs > laid_out)
            .then(|| Linear::new(b, &format!("{name}.pooled"), width, outputs - laid_out, rng));
        Ok(Head { per_token, pooled })
    }

    /// `[rows, outputs]` logits from the encoder's `[rows, length, width]` output.
    fn forward(&self, p: &ParamViews, encoded: &Tensor) -> Tensor {
        let rows = encoded.size()[0];
        let per_token = self.per_token.as_ref().map(|(layout, linear)| {
            let tokens = encoded.narrow(1, layout.first as i64, layout.positions as i64);
            linear.forward(p, &tokens).reshape([rows, -1])
        });
        let pooled = self
            .pooled
            .as_ref()
            .map(|linear| linear.forward(p, &encoded.select(1, 0)));
        match (per_token, pooled) {
            (Some(a), Some(b)) => Tensor::cat(&[a, b], 1),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => unreachable!("a head has at least one output"),
        }
    }
}

impl Transformer {
    pub fn new(
        env: &dyn Environment,
        b: &mut ParamStoreBuilder,
        name: &str,
        config: TransformerConfig,
        heads: HeadWidths,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        config.validate()?;
        let tokens: &dyn Tokenized = env.tokens().ok_or_else(|| {
            Error::invalid(
                "model.architecture",
                "transformer",
                format!(
                    "needs a token encoding, which {} does not offer",
                    env.describe()
                ),
            )
        })?;
        let width = config.width;
        let embedding = b.add_normal(
            &format!("{name}.embedding"),
            &[tokens.vocab() as i64, width as i64],
            rng,
        );
        let blocks = (0..config.layers)
            .map(|i| {
                let layer = format!("{name}.layer.{i}");
                Block {
                    qkv: Linear::new(b, &format!("{layer}.qkv"), width, 3 * width, rng),
                    out: Linear::new(b, &format!("{layer}.attention_out"), width, width, rng),
                    norm_in: LayerNorm::new(b, &format!("{layer}.norm_in"), width),
                    ff_in: Linear::new(b, &format!("{layer}.ff_in"), width, config.ff, rng),
                    ff_out: Linear::new(b, &format!("{layer}.ff_out"), config.ff, width, rng),
                    norm_out: LayerNorm::new(b, &format!("{layer}.norm_out"), width),
                }
            })
            .collect();
        let pf = heads
            .pf
            .map(|n| Head::new(b, "pf", width, n, tokens.forward_layout(), rng))
            .transpose()?;
        let pb = heads
            .pb
            .map(|n| Head::new(b, "pb", width, n, tokens.backward_layout(), rng))
            .transpose()?;
        let log_flow = heads
            .log_flow
            .then(|| Linear::new(b, "log_flow.pooled", width, 1, rng));
        Ok(Transformer {
            config,
            embedding,
            positions: sinusoidal(tokens.length(), width),
            blocks,
            pf,
            pb,
            log_flow,
            heads,
        })
    }

    /// The encoder's output `[rows, length, width]` for `[rows, length]` token ids.
    fn encode(&self, p: &ParamViews, tokens: &Tensor) -> Tensor {
        let size = tokens.size();
        let (rows, length) = (size[0], size[1]);
        let (width, heads) = (self.config.width as i64, self.config.heads as i64);
        let embedded = p[self.embedding]
            .index_select(0, &tokens.reshape([-1]))
            .view([rows, length, width]);
        let positions = Tensor::from_slice(&self.positions)
            .view([length, width])
            .to_device(embedded.device());
        let mut x = embedded + positions;
        for block in &self.blocks {
            let attended = attention(&block.qkv.forward(p, &x), heads);
            let attended = block.out.forward(p, &attended) + x;
            let normed = block.norm_in.forward(p, &attended);
            let ff = block
                .ff_out
                .forward(p, &block.ff_in.forward(p, &normed).relu());
            x = block.norm_out.forward(p, &(ff + normed));
        }
        x
    }
}

extern "C" {
    /// `attention.cpp`: a new tensor the caller owns, or null (reason from the next).
    fn gfn_small_attention(qkv: *const c_void, heads: i64, allow_avx512: bool) -> *mut c_void;
    fn gfn_attention_error() -> *const std::ffi::c_char;
}

/// Multi-head self-attention of `qkv` (`[rows, length, 3 · width]`: queries, keys, values) into
/// `[rows, length, width]`. On the CPU our own autograd function (`attention.cpp`); elsewhere
/// libtorch's scaled_dot_product_attention on the heads split out.
fn attention(qkv: &Tensor, heads: i64) -> Tensor {
    if qkv.device() == Device::Cpu && qkv.kind() == Kind::Float {
        small_attention(qkv, heads, true)
    } else {
        library_attention(qkv, heads)
    }
}

/// `allow_avx512` false keeps to the narrower loops (the tests check both).
fn small_attention(qkv: &Tensor, heads: i64, allow_avx512: bool) -> Tensor {
    // SAFETY: `qkv` is a live tensor for the duration of the call; a non-null result is a
    // newly allocated tensor whose ownership passes to the returned `Tensor`.
    unsafe {
        let out = gfn_small_attention(qkv.as_ptr().cast(), heads, allow_avx512);
        assert!(
            !out.is_null(),
            "the CPU attention failed: {}",
            std::ffi::CStr::from_ptr(gfn_attention_error()).to_string_lossy()
        );
        Tensor::from_ptr(out.cast())
    }
}

fn library_attention(qkv: &Tensor, heads: i64) -> Tensor {
    let size = qkv.size();
    let (rows, length, width) = (size[0], size[1], size[2] / 3);
    // [rows, length, 3, heads, width / heads] → three [rows, heads, length, width / heads].
    let qkv = qkv
        .view([rows, length, 3, heads, width / heads])
        .permute([2, 0, 3, 1, 4]);
    Tensor::scaled_dot_product_attention::<Tensor>(
        &qkv.get(0),
        &qkv.get(1),
        &qkv.get(2),
        None,
        0.0,
        false,
        None,
        false,
    )
    .permute([0, 2, 1, 3])
    .reshape([rows, length, width])
}

impl Network for Transformer {
    fn outputs(&self) -> Wanted {
        self.heads.outputs()
    }

    fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs {
        let encoded = self.encode(p, input);
        let run = |head: &Option<Head>, asked: bool| {
            head.as_ref()
                .filter(|_| asked)
                .map(|h| h.forward(p, &encoded))
        };
        Outputs {
            pf_logits: run(&self.pf, wanted.pf),
            pb_logits: run(&self.pb, wanted.pb),
            log_flow: self
                .log_flow
                .as_ref()
                .filter(|_| wanted.log_flow)
                .map(|l| l.forward(p, &encoded.select(1, 0)).squeeze_dim(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_attention_and_its_gradient_are_libtorch_s() {
        tch::manual_seed(4);
        // The general loops (7 tokens, heads of 4) and the vector kernels (16 tokens, heads of
        // 8; AVX-512 where the CPU has it, and the narrower ones), on a non-contiguous input
        // (a view) as the Transformer may pass.
        let cases = [
            (5, 7, 3, 4, true),
            (9, 16, 2, 8, true),
            (9, 16, 2, 8, false),
        ];
        for (rows, length, heads, head_width, widest) in cases {
            let width = heads * head_width;
            let base = Tensor::randn([rows, length, 3 * width + 2], (Kind::Float, Device::Cpu));
            let weights = Tensor::randn([rows, length, width], (Kind::Float, Device::Cpu));
            let run = |f: &dyn Fn(&Tensor, i64) -> Tensor| {
                let leaf = base.detach().set_requires_grad(true);
                let out = f(&leaf.narrow(2, 1, 3 * width), heads);
                (&out * &weights).sum(Kind::Float).backward();
                (out.detach(), leaf.grad())
            };
            let (ours, our_grad) = run(&|qkv, heads| small_attention(qkv, heads, widest));
            let (theirs, their_grad) = run(&library_attention);
            let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            let case = format!("{length} tokens, heads of {head_width}, widest {widest}");
            assert!(
                gap(&ours, &theirs) < 1e-5,
                "{case}: outputs differ by {}",
                gap(&ours, &theirs)
            );
            assert!(
                gap(&our_grad, &their_grad) < 1e-4,
                "{case}: gradients differ by {}",
                gap(&our_grad, &their_grad)
            );
            assert_eq!(
                our_grad
                    .narrow(2, 0, 1)
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
        }
    }

    #[test]
    fn the_position_encoding_follows_its_formula() {
        let pe = sinusoidal(3, 4);
        // t = 2: angles 2 and 2 / 100 for the two frequencies.
        let expected = [2f64.sin(), 2f64.cos(), 0.02f64.sin(), 0.02f64.cos()];
        for (i, e) in expected.iter().enumerate() {
            assert!(
                (pe[8 + i] as f64 - e).abs() < 1e-6,
                "{i}: {} vs {e}",
                pe[8 + i]
            );
        }
        assert_eq!(&pe[..4], &[0.0, 1.0, 0.0, 1.0]);
    }
}
