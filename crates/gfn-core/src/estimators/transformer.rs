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
//! layer forward and backward at 241 states, against 7.5 ms). So are the affine layers on
//! AVX-512 CPUs (`linear.cpp`). Rollouts, which ask for a few states at a time, run the whole
//! forward pass in plain Rust instead ([`Network::pf_logits_host`]): at 8 states a call,
//! libtorch's dispatch of ~60 operations took most of the rollout's time.

use super::linear::Linear;
use super::{at_least_one, HeadWidths, HostScratch, Network, Outputs, Wanted};
use crate::env::{Environment, TokenLayout, Tokenized};
use crate::params::{ParamGroup, ParamId, ParamStore, ParamStoreBuilder, ParamViews};
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
            dense(p, linear, &tokens).reshape([rows, -1])
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
            let attended = attention(&dense(p, &block.qkv, &x), heads);
            let attended = dense(p, &block.out, &attended) + x;
            let normed = block.norm_in.forward(p, &attended);
            let ff = dense(p, &block.ff_out, &dense(p, &block.ff_in, &normed).relu());
            x = block.norm_out.forward(p, &(ff + normed));
        }
        x
    }
}

/// Σ f(v) over `values`, sixteen partial sums at a time (which the compiler vectorises).
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// `x += residual`, then LayerNorm of each row of `x` in place.
fn add_and_normalise(params: &ParamStore, norm: &LayerNorm, x: &mut [f32], residual: &[f32]) {
    let host = |id: ParamId| params.host_values(id).expect("parameters on the CPU");
    let (weight, bias) = (host(norm.weight), host(norm.bias));
    x.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
    let n = weight.len() as f32;
    for row in x.chunks_exact_mut(weight.len()) {
        let mean = lane_sum(row, |v| v) / n;
        let variance = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
        let scale = 1.0 / (variance + LAYER_NORM_EPS as f32).sqrt();
        for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * scale * w + b;
        }
    }
}

impl Transformer {
    /// [`Transformer::encode`] in plain Rust for `rows` states: `[rows · length, width]` into
    /// the scratch's first buffer.
    fn encode_host(
        &self,
        params: &ParamStore,
        tokens: &dyn Tokenized,
        states: &[i64],
        rows: usize,
        scratch: &mut HostScratch,
    ) {
        let (ids, [x, qkv, attended, probs, normed, inner]) = scratch.tokens_and_buffers();
        let (length, width, heads) = (tokens.length(), self.config.width, self.config.heads);
        ids.resize(rows * length, 0);
        tokens.tokenize(states, ids);
        let embedding = params
            .host_values(self.embedding)
            .expect("parameters on the CPU");
        x.resize(ids.len() * width, 0.0);
        for (t, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(width)).enumerate() {
            let position = &self.positions[(t % length) * width..][..width];
            let embedded = &embedding[id as usize * width..][..width];
            for ((v, e), p) in row.iter_mut().zip(embedded).zip(position) {
                *v = e + p;
            }
        }
        for block in &self.blocks {
            block.qkv.forward_host(params, x, false, qkv);
            attended.resize(x.len(), 0.0);
            probs.resize(rows * heads * length * length, 0.0);
            // SAFETY: the buffers hold the sizes that the kernel reads and writes.
            unsafe {
                gfn_attention_forward(
                    qkv.as_ptr(),
                    attended.as_mut_ptr(),
                    probs.as_mut_ptr(),
                    rows as i64,
                    length as i64,
                    heads as i64,
                    width as i64,
                )
            };
            block.out.forward_host(params, attended, false, normed);
            add_and_normalise(params, &block.norm_in, normed, x);
            block.ff_in.forward_host(params, normed, true, inner);
            block.ff_out.forward_host(params, inner, false, x);
            add_and_normalise(params, &block.norm_out, x, normed);
        }
    }
}

/// `x · W + b` of `linear`: on AVX-512 CPUs, for widths that are multiples of 16, our own
/// autograd function (`linear.cpp`); elsewhere libtorch's.
fn dense(p: &ParamViews, linear: &Linear, x: &Tensor) -> Tensor {
    let (weight, bias) = (&p[linear.weight], &p[linear.bias]);
    let (inputs, outputs) = (weight.size()[0], weight.size()[1]);
    // SAFETY: a pure function of two integers.
    let fits = unsafe { gfn_small_linear_fits(inputs, outputs) };
    if x.device() != Device::Cpu || x.kind() != Kind::Float || !fits {
        return linear.forward(p, x);
    }
    // SAFETY: the three tensors are alive for the call; a non-null result is a new tensor whose
    // ownership passes to the returned `Tensor`.
    unsafe {
        let out = gfn_small_linear(
            x.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
        );
        assert!(
            !out.is_null(),
            "the CPU linear layer failed: {}",
            std::ffi::CStr::from_ptr(gfn_linear_error()).to_string_lossy()
        );
        Tensor::from_ptr(out.cast())
    }
}

extern "C" {
    /// `linear.cpp`: whether it takes a layer of these widths on this CPU.
    fn gfn_small_linear_fits(inputs: i64, outputs: i64) -> bool;
    /// `linear.cpp`: a new tensor the caller owns, or null (reason from the next).
    fn gfn_small_linear(x: *const c_void, w: *const c_void, b: *const c_void) -> *mut c_void;
    fn gfn_linear_error() -> *const std::ffi::c_char;
    /// `attention.cpp`: a new tensor the caller owns, or null (reason from the next).
    fn gfn_small_attention(qkv: *const c_void, heads: i64, allow_avx512: bool) -> *mut c_void;
    fn gfn_attention_error() -> *const std::ffi::c_char;
    /// `attention.cpp`: the forward pass on contiguous buffers, on this thread.
    fn gfn_attention_forward(
        qkv: *const f32,
        out: *mut f32,
        probs: *mut f32,
        rows: i64,
        length: i64,
        heads: i64,
        width: i64,
    );
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

impl Head {
    /// [`Head::forward`] in plain Rust from the encoder's `encoded` (`[rows · length, width]`).
    fn forward_host(
        &self,
        params: &ParamStore,
        encoded: &[f32],
        (length, width): (usize, usize),
        [gathered, per_token, pooled]: [&mut Vec<f32>; 3],
        logits: &mut Vec<f32>,
    ) {
        let rows = encoded.len() / (length * width);
        // Tokens `first..first + count` of every state, one after the other.
        let gather = |first: usize, count: usize, into: &mut Vec<f32>| {
            into.clear();
            for state in encoded.chunks_exact(length * width) {
                into.extend_from_slice(&state[first * width..(first + count) * width]);
            }
        };
        let per_token_width = self.per_token.as_ref().map_or(0, |(layout, linear)| {
            gather(layout.first, layout.positions, gathered);
            linear.forward_host(params, gathered, false, per_token);
            layout.actions()
        });
        let pooled_width = self.pooled.as_ref().map_or(0, |linear| {
            gather(0, 1, gathered);
            linear.forward_host(params, gathered, false, pooled);
            pooled.len() / rows.max(1)
        });
        logits.clear();
        for r in 0..rows {
            logits.extend_from_slice(&per_token[r * per_token_width..][..per_token_width]);
            logits.extend_from_slice(&pooled[r * pooled_width..][..pooled_width]);
        }
    }
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

    fn pf_logits_host(
        &self,
        params: &ParamStore,
        env: &dyn Environment,
        states: &[i64],
        logits: &mut Vec<f32>,
        scratch: &mut HostScratch,
    ) -> bool {
        let Some(head) = &self.pf else {
            return false;
        };
        let tokens = env
            .tokens()
            .expect("checked when the Transformer was built");
        let rows = states.len() / env.state_dim();
        self.encode_host(params, tokens, states, rows, scratch);
        let [encoded, gathered, per_token, pooled] = scratch.buffers();
        let shape = (tokens.length(), self.config.width);
        head.forward_host(
            params,
            encoded,
            shape,
            [gathered, per_token, pooled],
            logits,
        );
        true
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
    fn the_cpu_linear_layer_and_its_gradient_are_libtorch_s() {
        // SAFETY: a pure function of two integers.
        if !unsafe { gfn_small_linear_fits(16, 16) } {
            return; // no AVX-512 here: the Transformer uses libtorch's layers.
        }
        tch::manual_seed(5);
        let mut b = ParamStoreBuilder::default();
        let mut rng: ChaCha8Rng = rand::SeedableRng::seed_from_u64(1);
        // Row counts off the tiles of 8 and 4; 48 outputs end on a block of 16 columns; the
        // input a non-contiguous view of three dimensions, as the per-token head passes.
        let shapes = [(13, 64, 192), (5, 16, 48), (64, 32, 256)];
        let layers: Vec<Linear> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(_, k, n))| Linear::new(&mut b, &format!("l{i}"), k, n, &mut rng))
            .collect();
        let mut store = b.build(Device::Cpu);
        for (&(rows, k, n), layer) in shapes.iter().zip(&layers) {
            let base = Tensor::randn([rows, 3, k as i64 + 1], (Kind::Float, Device::Cpu));
            let weights = Tensor::randn([rows, 2, n as i64], (Kind::Float, Device::Cpu));
            let mut run = |f: &dyn Fn(&ParamViews, &Tensor) -> Tensor| {
                store.zero_grad();
                let leaf = base.detach().set_requires_grad(true);
                let out = f(&store.views(), &leaf.narrow(1, 1, 2).narrow(2, 1, k as i64));
                (&out * &weights).sum(Kind::Float).backward();
                (out.detach(), leaf.grad(), store.grad().copy())
            };
            let ours = run(&|p, x| dense(p, layer, x));
            let theirs = run(&|p, x| layer.forward(p, x));
            let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            let case = format!("{rows} rows, {k} inputs, {n} outputs");
            assert!(gap(&ours.0, &theirs.0) < 1e-5, "{case}: outputs");
            assert!(gap(&ours.1, &theirs.1) < 1e-4, "{case}: input gradients");
            assert!(
                gap(&ours.2, &theirs.2) < 1e-4,
                "{case}: parameter gradients"
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
