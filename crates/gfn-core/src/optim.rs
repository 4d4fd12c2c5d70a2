//! Adam / AdamW over the flat parameter tensor, with per-group learning rates (network, log Z).
//! Written here rather than taken from libtorch so that its state (moments, step) can be
//! checkpointed and restored exactly.

use crate::parallel::{even_shares, map_on_pool, ThreadPool};
use crate::params::{ParamGroup, ParamStore};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// What an optimizer step takes from the data-parallel reduction of the gradient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducedGradient {
    /// Ranks whose gradients the sum holds (the step uses their mean).
    pub ranks: usize,
    /// The elements this rank updates: all of them, unless the ranks share the update out
    /// (each then updates its share and hands it to the others).
    pub share: Range<usize>,
}

impl ReducedGradient {
    /// One rank's gradient, all of whose `len` elements it updates.
    pub fn whole(len: usize) -> Self {
        ReducedGradient {
            ranks: 1,
            share: 0..len,
        }
    }
}

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
    /// Clip the mean gradient to this L2 norm before the step (torch's `clip_grad_norm_`);
    /// 0: no clipping.
    pub max_grad_norm: f64,
}

/// torchgfn's HyperGrid defaults: Adam, lr 1e-3, log Z lr 0.1, weight decay 1e-4.
impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            lr_log_z: 0.1,
            weight_decay: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 0.0,
        }
    }
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("optim.lr", self.lr),
            ("optim.lr_log_z", self.lr_log_z),
            ("optim.eps", self.eps),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(Error::invalid(field, value, "must be > 0"));
            }
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return Err(Error::invalid(
                "optim.max_grad_norm",
                self.max_grad_norm,
                "must be >= 0 (0: no clipping)",
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(
                "optim.weight_decay",
                self.weight_decay,
                "must be >= 0",
            ));
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
    /// Per-element learning rate and weight decay, for the tensor (accelerator) path.
    lr: Tensor,
    weight_decay: Tensor,
    /// (offset, length, lr, weight decay) per parameter, for the fused CPU path.
    segments: Vec<(usize, usize, f64, f64)>,
    pub(crate) exp_avg: Tensor,
    pub(crate) exp_avg_sq: Tensor,
    pub(crate) steps: u64,
}

impl Adam {
    pub fn new(params: &ParamStore, config: OptimizerConfig) -> Self {
        let lr_of = |g| match g {
            ParamGroup::Network => config.lr,
            ParamGroup::LogZ => config.lr_log_z,
        };
        // log Z is a free scalar: decaying it toward 0 would bias the partition estimate.
        let weight_decay_of = |g| match g {
            ParamGroup::Network => config.weight_decay,
            ParamGroup::LogZ => 0.0,
        };
        let segments = params
            .specs()
            .iter()
            .map(|s| {
                (
                    s.offset,
                    s.numel(),
                    lr_of(s.group),
                    weight_decay_of(s.group),
                )
            })
            .collect();
        let zeros = params.flat().detach().zeros_like();
        Adam {
            config,
            lr: params.per_group(lr_of),
            weight_decay: params.per_group(weight_decay_of),
            segments,
            exp_avg: zeros.copy(),
            exp_avg_sq: zeros,
            steps: 0,
        }
    }

    /// One update of `params` from the flat gradient `grad`.
    pub fn step(&mut self, params: &mut ParamStore, grad: &Tensor) {
        self.step_on(params, grad, &ReducedGradient::whole(params.len()), None)
    }

    /// One update from `grad_sum`, the sum of `reduced.ranks` data-parallel ranks' gradients,
    /// whose mean it uses, of the elements in `reduced.share` (parameters and moments; the
    /// rest are left as they are); spread over `pool`'s threads on the CPU.
    pub fn step_on(
        &mut self,
        params: &mut ParamStore,
        grad_sum: &Tensor,
        reduced: &ReducedGradient,
        pool: Option<&ThreadPool>,
    ) {
        self.step_scaled(params, grad_sum, reduced, 1.0, pool)
    }

    /// [`Adam::step_on`] on the mean gradient times `scale` (gradient-norm clipping), folded
    /// into the same pass.
    pub fn step_scaled(
        &mut self,
        params: &mut ParamStore,
        grad_sum: &Tensor,
        reduced: &ReducedGradient,
        scale: f64,
        pool: Option<&ThreadPool>,
    ) {
        assert!(
            reduced.share.end <= params.len(),
            "share {:?} of {} parameters",
            reduced.share,
            params.len()
        );
        self.steps += 1;
        let grad_scale = scale / reduced.ranks.max(1) as f64;
        let share = reduced.share.clone();
        if params.device() == Device::Cpu {
            self.step_fused_cpu(params, grad_sum, grad_scale, share, pool);
        } else {
            self.step_tensor_ops(params, grad_sum, grad_scale, share);
        }
    }

    /// Updates taken so far (the count in Adam's bias correction).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The first and second moments, whose shares a sharded data-parallel update leaves stale
    /// on the ranks that did not update them (see [`crate::train::GradientReducer`]).
    pub fn moments_mut(&mut self) -> [&mut Tensor; 2] {
        [&mut self.exp_avg, &mut self.exp_avg_sq]
    }

    fn bias_corrections(&self) -> (f64, f64) {
        let c = &self.config;
        (
            1.0 - c.beta1.powi(self.steps as i32),
            1.0 - c.beta2.powi(self.steps as i32),
        )
    }

    /// Device-agnostic update in a dozen tensor ops, on views of `share`.
    fn step_tensor_ops(
        &mut self,
        params: &mut ParamStore,
        grad_sum: &Tensor,
        grad_scale: f64,
        share: Range<usize>,
    ) {
        let c = self.config;
        let (bias1, bias2) = self.bias_corrections();
        let of = |t: &Tensor| t.narrow(0, share.start as i64, share.len() as i64);
        tch::no_grad(|| {
            let mut p = of(params.flat());
            let (mut exp_avg, mut exp_avg_sq) = (of(&self.exp_avg), of(&self.exp_avg_sq));
            let (lr, weight_decay) = (of(&self.lr), of(&self.weight_decay));
            let grad = if grad_scale == 1.0 {
                of(grad_sum)
            } else {
                of(grad_sum) * grad_scale
            };
            // Out of place: `grad` may still be the caller's gradient.
            let grad = match c.kind {
                OptimizerKind::Adam if c.weight_decay > 0.0 => grad + &p * &weight_decay,
                OptimizerKind::AdamW if c.weight_decay > 0.0 => {
                    let _ = p.g_mul_(&(1.0 - &lr * &weight_decay));
                    grad
                }
                _ => grad,
            };
            let _ = exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = exp_avg_sq.lerp_(&grad.square(), 1.0 - c.beta2);
            let denom = (exp_avg_sq.sqrt() / bias2.sqrt()) + c.eps;
            let _ = p.g_sub_(&(&exp_avg / denom * &lr / bias1));
        });
    }

    /// The same update in one pass over memory: on CPU the tensor version spends most of its
    /// time allocating and streaming a dozen temporaries. With a pool, each thread updates
    /// its own contiguous share of the parameters.
    fn step_fused_cpu(
        &mut self,
        params: &mut ParamStore,
        grad_sum: &Tensor,
        grad_scale: f64,
        share: Range<usize>,
        pool: Option<&ThreadPool>,
    ) {
        let c = self.config;
        let (bias1, bias2) = self.bias_corrections();
        let grad = grad_sum.to_kind(Kind::Float).contiguous();
        let n = params.len();
        let constants = AdamConstants {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            grad_scale: grad_scale as f32,
        };
        // SAFETY: all four tensors are contiguous f32 CPU tensors of `n` elements owned by this
        // optimizer and the parameter store, which are exclusively borrowed here.
        let (p, g, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(params.flat().data_ptr() as *mut f32, n),
                std::slice::from_raw_parts(grad.data_ptr() as *const f32, n),
                std::slice::from_raw_parts_mut(self.exp_avg.data_ptr() as *mut f32, n),
                std::slice::from_raw_parts_mut(self.exp_avg_sq.data_ptr() as *mut f32, n),
            )
        };
        // Each parameter's range and the constants of its group.
        let segments: Vec<(std::ops::Range<usize>, AdamSegment)> = self
            .segments
            .iter()
            .map(|&(offset, len, lr, wd)| {
                let (decay, l2) = match c.kind {
                    OptimizerKind::Adam => (1.0, wd as f32),
                    OptimizerKind::AdamW => ((1.0 - lr * wd) as f32, 0.0),
                };
                let step = (lr / bias1) as f32;
                (offset..offset + len, AdamSegment { step, decay, l2 })
            })
            .collect();
        let threads = pool.map_or(1, ThreadPool::threads);
        // Each thread updates its own contiguous part of the share.
        let (_, mut rest) = AdamBuffers { p, g, m, v }.split_at(share.start);
        let mut shares = Vec::with_capacity(threads);
        for range in even_shares(share.len(), threads) {
            let (part, tail) = rest.split_at(range.len());
            shares.push((share.start + range.start, part));
            rest = tail;
        }
        let update_share = |(start, mut share): (usize, AdamBuffers)| {
            let end = start + share.p.len();
            for (range, segment) in &segments {
                let (lo, hi) = (range.start.max(start), range.end.min(end));
                if lo < hi {
                    adam_elements(&constants, segment, share.range(lo - start..hi - start));
                }
            }
        };
        match pool {
            Some(pool) => {
                map_on_pool(pool, shares, update_share);
            }
            None => shares.into_iter().for_each(update_share),
        }
    }
}

struct AdamConstants {
    beta1: f32,
    beta2: f32,
    eps: f32,
    inv_sqrt_bias2: f32,
    /// Turns the gradient sum over ranks into their mean (1 on one rank: the same bits).
    grad_scale: f32,
}

struct AdamSegment {
    step: f32,
    decay: f32,
    l2: f32,
}

/// Parameters, gradient and both moments over the same elements.
struct AdamBuffers<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
}

impl<'a> AdamBuffers<'a> {
    fn split_at(self, mid: usize) -> (AdamBuffers<'a>, AdamBuffers<'a>) {
        let (p0, p1) = self.p.split_at_mut(mid);
        let (g0, g1) = self.g.split_at(mid);
        let (m0, m1) = self.m.split_at_mut(mid);
        let (v0, v1) = self.v.split_at_mut(mid);
        (
            AdamBuffers {
                p: p0,
                g: g0,
                m: m0,
                v: v0,
            },
            AdamBuffers {
                p: p1,
                g: g1,
                m: m1,
                v: v1,
            },
        )
    }

    fn range(&mut self, range: std::ops::Range<usize>) -> AdamBuffers<'_> {
        AdamBuffers {
            p: &mut self.p[range.clone()],
            g: &self.g[range.clone()],
            m: &mut self.m[range.clone()],
            v: &mut self.v[range],
        }
    }
}

/// The element-wise update, compiled for AVX-512 where the CPU has it: its square roots and
/// divisions are exact, so both versions give the same bits.
fn adam_elements(c: &AdamConstants, s: &AdamSegment, b: AdamBuffers) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { adam_elements_avx512(c, s, b) };
    }
    adam_elements_portable(c, s, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn adam_elements_avx512(c: &AdamConstants, s: &AdamSegment, b: AdamBuffers) {
    adam_elements_portable(c, s, b)
}

#[inline(always)]
fn adam_elements_portable(c: &AdamConstants, s: &AdamSegment, b: AdamBuffers) {
    let AdamBuffers { p, g, m, v } = b;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * c.grad_scale + s.l2 * *p;
        *p *= s.decay;
        *m += (1.0 - c.beta1) * (g - *m);
        *v += (1.0 - c.beta2) * (g * g - *v);
        *p -= s.step * *m / (v.sqrt() * c.inv_sqrt_bias2 + c.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{ParamId, ParamStoreBuilder};
    use crate::subnormals::set_flush_on_this_thread;

    /// Adam written out for one scalar, as in Kingma & Ba (2015), as the second implementation.
    fn scalar_adam(
        mut x: f64,
        grads: impl Fn(f64) -> f64,
        lr: f64,
        wd: f64,
        decoupled: bool,
        steps: usize,
    ) -> f64 {
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

    fn quadratic_params() -> (ParamStore, ParamId, ParamId) {
        let mut b = ParamStoreBuilder::default();
        let w = b.add("w", &[1], ParamGroup::Network, || 2.0);
        let log_z = b.add("log_z", &[1], ParamGroup::LogZ, || -1.0);
        (b.build(Device::Cpu), w, log_z)
    }

    /// The data-parallel step: a sum over 4 ranks of the same gradient moves the parameters
    /// exactly as that gradient does on one rank (dividing by 4 is exact), on both paths.
    #[test]
    fn a_gradient_sum_over_ranks_steps_like_its_mean() {
        let build = || {
            let mut b = ParamStoreBuilder::default();
            let mut k = 0;
            b.add("w", &[300], ParamGroup::Network, || {
                k += 1;
                (k as f32 * 0.618_034).fract() - 0.5
            });
            b.build(Device::Cpu)
        };
        let grad = Tensor::from_slice(
            &(0..300)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<_>>(),
        );
        for fused in [true, false] {
            let (mut one, mut four) = (build(), build());
            let mut adam_one = Adam::new(&one, OptimizerConfig::default());
            let mut adam_four = Adam::new(&four, OptimizerConfig::default());
            for _ in 0..3 {
                for (adam, params, g, scale) in [
                    (&mut adam_one, &mut one, grad.shallow_clone(), 1.0),
                    (&mut adam_four, &mut four, &grad * 4.0, 0.25),
                ] {
                    adam.steps += 1;
                    if fused {
                        adam.step_fused_cpu(params, &g, scale, 0..300, None)
                    } else {
                        adam.step_tensor_ops(params, &g, scale, 0..300)
                    }
                }
            }
            assert_eq!(one.to_vec(), four.to_vec(), "fused={fused}");
        }
    }

    /// A sharded data-parallel update: two ranks each step their own share of the elements
    /// (uneven, cutting through a parameter) and copy the other's share of the parameters after
    /// every step, as the all-gather does; parameters and (gathered) moments end bitwise equal
    /// to whole updates, on both paths and for both kinds.
    #[test]
    fn updating_shares_and_exchanging_them_is_the_whole_update() {
        let build = || {
            let mut b = ParamStoreBuilder::default();
            let mut k = 0;
            let mut next = || {
                k += 1;
                (k as f32 * 0.618_034).fract() - 0.5
            };
            b.add("w", &[200], ParamGroup::Network, &mut next);
            b.add("log_z", &[1], ParamGroup::LogZ, &mut next);
            b.add("b", &[99], ParamGroup::Network, &mut next);
            b.build(Device::Cpu)
        };
        let grads: Vec<Tensor> = (0..4)
            .map(|t| {
                Tensor::from_slice(
                    &(0..300)
                        .map(|i| ((i * 7 + t * 13) as f32 * 0.37).sin())
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let step = |adam: &mut Adam, params: &mut ParamStore, g: &Tensor, share, fused| {
            adam.steps += 1;
            match fused {
                true => adam.step_fused_cpu(params, g, 1.0, share, None),
                false => adam.step_tensor_ops(params, g, 1.0, share),
            }
        };
        let copy_share = |from: &Tensor, to: &Tensor, share: Range<usize>| {
            let of = |t: &Tensor| t.narrow(0, share.start as i64, share.len() as i64);
            tch::no_grad(|| of(to).copy_(&of(from)));
        };
        for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
            let config = OptimizerConfig {
                kind,
                ..OptimizerConfig::default()
            };
            for fused in [true, false] {
                let mut whole = build();
                let mut adam = Adam::new(&whole, config);
                let mut ranks: Vec<(ParamStore, Adam)> = (0..2)
                    .map(|_| {
                        let params = build();
                        let adam = Adam::new(&params, config);
                        (params, adam)
                    })
                    .collect();
                let shares = [0..130, 130..300];
                for g in &grads {
                    step(&mut adam, &mut whole, g, 0..300, fused);
                    for ((params, adam), share) in ranks.iter_mut().zip(&shares) {
                        step(adam, params, g, share.clone(), fused);
                    }
                    let (first, second) = ranks.split_at_mut(1);
                    copy_share(second[0].0.flat(), first[0].0.flat(), shares[1].clone());
                    copy_share(first[0].0.flat(), second[0].0.flat(), shares[0].clone());
                }
                for (r, (params, rank_adam)) in ranks.iter().enumerate() {
                    assert_eq!(params.to_vec(), whole.to_vec(), "{kind:?} fused={fused}");
                    let own = shares[r].clone();
                    let of = |t: &Tensor| t.narrow(0, own.start as i64, own.len() as i64);
                    assert!(of(&rank_adam.exp_avg).equal(&of(&adam.exp_avg)));
                    assert!(of(&rank_adam.exp_avg_sq).equal(&of(&adam.exp_avg_sq)));
                }
            }
        }
    }

    /// Adam's L2 decay alone (a weight whose gradient is zero, as behind a dead ReLU unit)
    /// shrinks weights geometrically into the subnormal range: torch.optim.Adam with
    /// torchgfn's settings leaves 222 of 256 such weights subnormal after 2,000 steps. On a
    /// thread that flushes subnormals they end at zero instead.
    #[test]
    fn weight_decay_alone_reaches_subnormals_unless_they_are_flushed() {
        let run = |flush: bool| {
            std::thread::spawn(move || {
                set_flush_on_this_thread(flush);
                let mut b = ParamStoreBuilder::default();
                let mut k = 0;
                // nn.Linear's U(-1/16, 1/16) for 256 inputs, spread evenly.
                b.add("w", &[256], ParamGroup::Network, || {
                    k += 1;
                    ((k as f32 * 0.618_034).fract() * 2.0 - 1.0) / 16.0
                });
                let mut params = b.build(Device::Cpu);
                let mut adam = Adam::new(&params, OptimizerConfig::default());
                let zero = Tensor::zeros([256], (Kind::Float, Device::Cpu));
                for _ in 0..2000 {
                    adam.step(&mut params, &zero);
                }
                params.to_vec()
            })
            .join()
            .unwrap()
        };
        let ieee = run(false);
        let subnormal = ieee.iter().filter(|w| w.is_subnormal()).count();
        assert!(subnormal > 128, "{subnormal} of 256 subnormal");
        let flushed = run(true);
        assert!(flushed.iter().all(|w| !w.is_subnormal() && w.abs() < 1e-30));
    }

    #[test]
    fn both_update_paths_match_a_scalar_reference_on_a_quadratic() {
        for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
            let config = OptimizerConfig {
                kind,
                lr: 0.05,
                lr_log_z: 0.2,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                max_grad_norm: 0.0,
            };
            for fused in [true, false] {
                let (mut params, w, log_z) = quadratic_params();
                let mut adam = Adam::new(&params, config);
                for _ in 0..25 {
                    params.zero_grad();
                    // f = (w - 1)^2 + (log_z - 3)^2
                    let v = params.views();
                    let f = (Tensor::cat(&[&v[w], &v[log_z]], 0)
                        - Tensor::from_slice(&[1.0f32, 3.0]))
                    .square()
                    .sum(Kind::Float);
                    f.backward();
                    let grad = params.grad();
                    adam.steps += 1;
                    if fused {
                        adam.step_fused_cpu(&mut params, &grad, 1.0, 0..2, None)
                    } else {
                        adam.step_tensor_ops(&mut params, &grad, 1.0, 0..2)
                    }
                }
                let got = params.to_vec();
                let decoupled = kind == OptimizerKind::AdamW;
                let expected_w = scalar_adam(2.0, |x| 2.0 * (x - 1.0), 0.05, 0.1, decoupled, 25);
                let expected_z = scalar_adam(-1.0, |x| 2.0 * (x - 3.0), 0.2, 0.0, decoupled, 25);
                // f32 updates against an f64 reference: agreement to a few f32 ulps per step.
                let close = |got: f32, expected: f64| {
                    (got as f64 - expected).abs() < 2e-5 * expected.abs().max(1.0)
                };
                assert!(
                    close(got[0], expected_w),
                    "{kind:?} fused={fused} w: {} vs {expected_w}",
                    got[0]
                );
                assert!(
                    close(got[1], expected_z),
                    "{kind:?} fused={fused} log_z: {} vs {expected_z}",
                    got[1]
                );
            }
        }
    }
}
