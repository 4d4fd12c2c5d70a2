//! One state's unnormalised policy weights exp(l / T − max) over its allowed actions, for the
//! sampler's draw. A bitseq state has 3,840 actions and a rollout weighs every one of them at
//! every step, so libm's scalar `exp` took more of a CPU rollout than the network's attention
//! (measured with perf: ~7% of a bitseq step). Here every loop vectorises: an exp of our own
//! (plain multiplies and adds, so each CPU gives the same bits) and sums in eight fixed lanes.

/// Below this many actions (HyperGrid's D + 1) one pass with libm's `exp` is quicker than the
/// vector passes (measured: `gfn bench`'s HyperGrid 2x64 at batch 128 sampled 10% slower).
const VECTOR_FROM: usize = 64;

/// Lanes of the sums: one AVX-512 register of f64, four SSE ones.
const LANES: usize = 8;

/// Fills `weights` with exp(l / T − max) for allowed actions and 0 for the others (`max` is
/// that of the allowed l / T) and returns their sum and the number of allowed actions. All
/// zero with no allowed action.
pub fn policy_weights(
    logits: &[f32],
    mask: &[bool],
    inv_temperature: f64,
    weights: &mut Vec<f64>,
) -> (f64, usize) {
    assert_eq!(logits.len(), mask.len(), "one mask entry per logit");
    weights.clear();
    if logits.len() < VECTOR_FROM {
        return few_weights(logits, mask, inv_temperature, weights);
    }
    weights.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { policy_weights_avx512(logits, mask, inv_temperature, weights) };
    }
    policy_weights_portable(logits, mask, inv_temperature, weights)
}

/// [`policy_weights`] for a few actions: one pass for the maximum, one for the weights.
fn few_weights(
    logits: &[f32],
    mask: &[bool],
    inv_temperature: f64,
    weights: &mut Vec<f64>,
) -> (f64, usize) {
    let max = logits
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&l, _)| l as f64 * inv_temperature)
        .fold(f64::NEG_INFINITY, f64::max);
    let (mut total, mut n_allowed) = (0.0, 0);
    for (&l, &m) in logits.iter().zip(mask) {
        let w = if m {
            (l as f64 * inv_temperature - max).exp()
        } else {
            0.0
        };
        n_allowed += m as usize;
        total += w;
        weights.push(w);
    }
    (total, n_allowed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn policy_weights_avx512(
    logits: &[f32],
    mask: &[bool],
    inv_temperature: f64,
    weights: &mut [f64],
) -> (f64, usize) {
    policy_weights_portable(logits, mask, inv_temperature, weights)
}

#[inline(always)]
fn policy_weights_portable(
    logits: &[f32],
    mask: &[bool],
    inv_temperature: f64,
    weights: &mut [f64],
) -> (f64, usize) {
    let n_allowed = mask.iter().map(|&m| m as usize).sum();
    if n_allowed == 0 {
        return (0.0, 0);
    }
    // The largest allowed logit, scaled after: T > 0 keeps the order.
    let max = allowed_max(logits, mask) as f64 * inv_temperature;
    // Eight actions at a time, each weighed and the masked ones then zeroed (no branch to
    // stop vectorising); a run of eight masked ones (a written bitseq word) is skipped.
    let weigh = |w: &mut [f64], l: &[f32], m: &[bool]| {
        for ((w, &l), &m) in w.iter_mut().zip(l).zip(m) {
            let x = (l as f64 * inv_temperature - max).min(0.0);
            *w = exp_nonpositive(x) * (m as u8 as f64);
        }
    };
    let mut chunks = weights
        .chunks_exact_mut(LANES)
        .zip(logits.chunks_exact(LANES).zip(mask.chunks_exact(LANES)));
    for (w, (l, m)) in &mut chunks {
        if m.contains(&true) {
            weigh(w, l, m);
        }
    }
    let tail = logits.len() - logits.len() % LANES;
    weigh(&mut weights[tail..], &logits[tail..], &mask[tail..]);
    (lane_sum(weights), n_allowed)
}

/// The largest logit among the allowed, in sixteen f32 lanes (one AVX-512 register), which
/// vectorises as [`lane_sum`] does.
#[inline(always)]
fn allowed_max(logits: &[f32], mask: &[bool]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 2 * LANES];
    let mut chunks = logits
        .chunks_exact(2 * LANES)
        .zip(mask.chunks_exact(2 * LANES));
    for (l, m) in &mut chunks {
        for ((lane, &l), &m) in lanes.iter_mut().zip(l).zip(m) {
            let candidate = if m { l } else { f32::NEG_INFINITY };
            *lane = lane.max(candidate);
        }
    }
    let tail = logits.len() - logits.len() % (2 * LANES);
    let tail_max =
        logits[tail..]
            .iter()
            .zip(&mask[tail..])
            .fold(
                f32::NEG_INFINITY,
                |acc, (&l, &m)| if m { acc.max(l) } else { acc },
            );
    lanes.iter().fold(tail_max, |acc, &v| acc.max(v))
}

/// Σ values in a fixed order (eight interleaved partial sums, then theirs), which vectorises
/// where one running sum cannot.
#[inline(always)]
fn lane_sum(values: &[f64]) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// 1/k! for k = 0..=13, the coefficients of [`exp_nonpositive`]'s Taylor series.
const COEFFICIENTS: [f64; 14] = {
    let mut out = [1.0; 14];
    let mut k = 1;
    while k < 14 {
        out[k] = out[k - 1] / k as f64;
        k += 1;
    }
    out
};

/// exp(x) for x ≤ 0, within 2 ulp: x = n ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor
/// series to degree 13 (remainder below 1e-17), times 2^n from the exponent bits. Under −708
/// (where e^x nears the smallest normal f64) it gives 0: such an action is never drawn.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 · 2^52 rounds to an integer, which the low mantissa bits then hold.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let clamped = x.max(-708.0);
    let shifted = clamped * std::f64::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    // Estrin's scheme: independent pairs, then pairs of pairs, for the vector units' latency.
    let c = &COEFFICIENTS;
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let pair = |k: usize| c[k] + c[k + 1] * r;
    let low = (pair(0) + pair(2) * r2) + (pair(4) + pair(6) * r2) * r4;
    let high = (pair(8) + pair(10) * r2) + pair(12) * r4;
    let p = low + high * r8;
    let exponent = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(1023);
    let kept = if x < -708.0 { 0.0 } else { 1.0 };
    p * f64::from_bits(exponent << 52) * kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_two_ulp() {
        for i in 0..=200_000 {
            let x = -708.0 * i as f64 / 200_000.0;
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            let ulp = libm * f64::EPSILON;
            assert!(
                (ours - libm).abs() <= 2.0 * ulp,
                "exp({x}): {ours} vs {libm}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-800.0), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn weights_are_the_allowed_softmax_numerators() {
        // 19 actions (the short path) and 83 (vector chunks, a run of eight masked actions,
        // a tail); the largest logit (9) is masked out.
        for n in [19, 83] {
            check_weights(n);
        }
    }

    fn check_weights(n: usize) {
        let mut logits: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        logits[5] = 9.0;
        let mask: Vec<bool> = (0..n)
            .map(|i| i != 5 && i % 3 != 1 && !(16..24).contains(&i))
            .collect();
        let inv_t = 0.5;
        let mut weights = Vec::new();
        let (total, allowed) = policy_weights(&logits, &mask, inv_t, &mut weights);
        let max = (0..n)
            .filter(|&i| mask[i])
            .map(|i| logits[i] as f64 * inv_t)
            .fold(f64::NEG_INFINITY, f64::max);
        let expected: Vec<f64> = (0..n)
            .map(|i| {
                if mask[i] {
                    (logits[i] as f64 * inv_t - max).exp()
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(allowed, mask.iter().filter(|&&m| m).count());
        for (i, (w, e)) in weights.iter().zip(&expected).enumerate() {
            assert!(
                (w - e).abs() <= 4.0 * f64::EPSILON * e,
                "action {i}: {w} vs {e}"
            );
        }
        let sum: f64 = expected.iter().sum();
        assert!((total - sum).abs() <= 1e-14 * sum, "{total} vs {sum}");
        assert_eq!(
            policy_weights(&logits, &vec![false; n], inv_t, &mut weights),
            (0.0, 0)
        );
    }
}
