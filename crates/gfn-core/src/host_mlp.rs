//! The forward pass of the estimators' linear layers in plain Rust, for the policy calls of
//! CPU rollouts.
//!
//! A rollout asks the policy for a few to a few dozen distinct states at every step. At that
//! size libtorch spends most of a call in operator dispatch, MKL's GEMM set-up and hand-offs to
//! its second thread. Here, with no allocation (except the portable loop's transposed copy of
//! a narrow head's columns):
//! - inputs that are mostly zeros (K-hot encodings) take a sparse path: one weight row added
//!   per nonzero input;
//! - dense inputs run an 8 × 32 register tile of AVX-512 fused multiply-adds where the CPU has
//!   AVX-512 (masked loads and stores for the last columns, so a head with 9 outputs needs no
//!   special case), and a portable 4 × 16 blocked loop elsewhere (AVX2/FMA when present) that
//!   skips the zeros of ReLU activations.
//!
//! Every path is checked against an f64 triple loop below, and the policy built from them
//! against libtorch in `tests/host_policy.rs`. Training keeps using libtorch (autograd, GPU);
//! this path only ever reads the parameters.

/// Rows and columns of the output that one block of the portable loop covers.
const ROWS: usize = 4;
const COLS: usize = 16;

/// Up to how many rows a policy call on one core here is faster than libtorch's GEMM on two
/// threads (hidden 256, `cargo run --release -p gfn-core --example rollout_policy`): with
/// AVX-512 they break even at 48 rows (32 rows: 42 vs 51 µs), the portable loop at 16.
pub fn rows_ahead_of_libtorch() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return 48;
    }
    16
}

/// `out = x · w + b` (then ReLU if `relu`) for `x` of `rows × inputs` and `w` of
/// `inputs × outputs` (row-major, the layout of the estimators' weights), `b` of `outputs`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], rows: usize, relu: bool, out: &mut [f32]) {
    let outputs = b.len();
    assert!(outputs > 0, "a layer has outputs");
    let inputs = w.len() / outputs;
    assert_eq!(x.len(), rows * inputs, "input is rows × inputs");
    assert_eq!(w.len(), inputs * outputs, "weight is inputs × outputs");
    assert_eq!(out.len(), rows * outputs, "output is rows × outputs");
    for row in out.chunks_exact_mut(outputs) {
        row.copy_from_slice(b);
    }
    let dims = Dims {
        m: rows,
        k: inputs,
        n: outputs,
    };
    // K-hot inputs: with a quarter or fewer nonzeros, one weight row per nonzero is cheaper.
    let sparse = 4 * x.iter().filter(|&&v| v != 0.0).count() <= x.len();
    accumulate(dims, x, w, out, sparse);
    if relu {
        out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// `c = m × n`, `a = m × k`, `b = k × n`.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

/// `c += a · b` with the best instructions the CPU has: one row of `b` per nonzero of `a` when
/// `sparse`, the dense tiles otherwise.
fn accumulate(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32], sparse: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, and `linear` checked the slices' lengths.
            unsafe {
                if sparse {
                    sparse_avx512(dims, a, b, c)
                } else {
                    avx512::gemm(dims, a, b, c)
                }
            };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features `portable_avx2` is compiled for.
            unsafe { portable_avx2(dims, a, b, c, sparse) };
            return;
        }
    }
    portable(dims, a, b, c, sparse);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn sparse_avx512(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32]) {
    sparse_rows(dims, a, b, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_avx2(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32], sparse: bool) {
    portable(dims, a, b, c, sparse)
}

/// The loops without intrinsics; inlined into each target-feature variant so that the compiler
/// vectorises them with that variant's instructions.
#[inline(always)]
fn portable(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32], sparse: bool) {
    if sparse {
        sparse_rows(dims, a, b, c)
    } else {
        blocks(dims, a, b, c)
    }
}

/// One row of `b` added into a row of `c` per nonzero of `a`.
#[inline(always)]
fn sparse_rows(Dims { m, k, n }: Dims, a: &[f32], b: &[f32], c: &mut [f32]) {
    if k == 0 {
        return;
    }
    for (ai, ci) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)).take(m) {
        for (kk, &v) in ai.iter().enumerate().filter(|(_, &v)| v != 0.0) {
            for (s, &bv) in ci.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                *s = v.mul_add(bv, *s);
            }
        }
    }
}

/// Register blocks of [`ROWS`] × [`COLS`], then the last columns ([`narrow`]).
#[inline(always)]
fn blocks(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Dims { m, n, .. } = dims;
    let wide = n - n % COLS;
    for col in (0..wide).step_by(COLS) {
        let mut row = 0;
        while row < m {
            let height = ROWS.min(m - row);
            match height {
                4 => block::<4>(dims, a, b, row, col, c),
                3 => block::<3>(dims, a, b, row, col, c),
                2 => block::<2>(dims, a, b, row, col, c),
                _ => block::<1>(dims, a, b, row, col, c),
            }
            row += height;
        }
    }
    if wide < n {
        narrow(dims, a, b, wide, c);
    }
}

/// The last `n - col` (< [`COLS`]) columns, a head with a few outputs: one dot product per row
/// and column over a transposed copy of those columns of `b`, vectorised along `k`.
#[inline(always)]
fn narrow(Dims { m, k, n }: Dims, a: &[f32], b: &[f32], col: usize, c: &mut [f32]) {
    let width = n - col;
    let mut columns = vec![0f32; width * k];
    for (kk, bk) in b.chunks_exact(n).enumerate() {
        for (j, &v) in bk[col..].iter().enumerate() {
            columns[j * k + kk] = v;
        }
    }
    for i in 0..m {
        let ai = &a[i * k..(i + 1) * k];
        for (j, column) in columns.chunks_exact(k.max(1)).enumerate() {
            c[i * n + col + j] += dot(ai, column);
        }
    }
}

/// Dot product with 32 lanes of partial sums (four vectors in flight).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (a_whole, b_whole) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_whole
        .remainder()
        .iter()
        .zip(b_whole.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (ac, bc) in a_whole.zip(b_whole) {
        for i in 0..LANES {
            acc[i] = ac[i].mul_add(bc[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `R` rows (at most [`ROWS`]) by a full [`COLS`] block of columns, the rows unrolled so that
/// the accumulators stay in registers.
#[inline(always)]
fn block<const R: usize>(dims: Dims, a: &[f32], b: &[f32], row: usize, col: usize, c: &mut [f32]) {
    let Dims { k, n, .. } = dims;
    let mut acc = [[0f32; COLS]; R];
    for (r, acc) in acc.iter_mut().enumerate() {
        let start = (row + r) * n + col;
        acc.copy_from_slice(&c[start..start + COLS]);
    }
    for kk in 0..k {
        let mut ak = [0f32; R];
        for (r, v) in ak.iter_mut().enumerate() {
            *v = a[(row + r) * k + kk];
        }
        // ReLU activations have many zeros.
        if ak.iter().all(|&v| v == 0.0) {
            continue;
        }
        let bk: &[f32; COLS] = b[kk * n + col..kk * n + col + COLS]
            .try_into()
            .expect("a full column block");
        for (acc, &av) in acc.iter_mut().zip(&ak) {
            for (s, &bv) in acc.iter_mut().zip(bk) {
                *s = av.mul_add(bv, *s);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let start = (row + r) * n + col;
        c[start..start + COLS].copy_from_slice(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Every load and store stays inside the slices whose lengths `linear` asserts: whole
    //! vectors where 16 columns remain, masked ones at the end of a row (masked-off lanes are
    //! neither read nor written).

    use super::Dims;
    use std::arch::x86_64::*;

    /// The first `lanes` (at most 16) lanes.
    #[inline(always)]
    fn mask(lanes: usize) -> __mmask16 {
        if lanes >= 16 {
            0xFFFF
        } else {
            ((1u32 << lanes) - 1) as __mmask16
        }
    }

    /// `c += a · b` in tiles of 8 rows (16 of the 32 vector registers accumulate) by 32
    /// columns (two vectors).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(dims: Dims, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        for col in (0..dims.n).step_by(32) {
            let width = dims.n - col;
            let masks = (mask(width), mask(width.saturating_sub(16)));
            let mut row = 0;
            while row < dims.m {
                row += match dims.m - row {
                    8.. => tile::<8>(dims, a, b, c, row, col, masks),
                    4..=7 => tile::<4>(dims, a, b, c, row, col, masks),
                    2..=3 => tile::<2>(dims, a, b, c, row, col, masks),
                    _ => tile::<1>(dims, a, b, c, row, col, masks),
                };
            }
        }
    }

    /// `R` rows by 32 columns (fewer where `masks` say) of `c += a · b`; returns `R`.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        Dims { k, n, .. }: Dims,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        row: usize,
        col: usize,
        (m0, m1): (__mmask16, __mmask16),
    ) -> usize {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let cr = c.add((row + r) * n + col);
            lo[r] = _mm512_maskz_loadu_ps(m0, cr);
            hi[r] = _mm512_maskz_loadu_ps(m1, cr.add(16));
        }
        for kk in 0..k {
            let bk = b.add(kk * n + col);
            let (b0, b1) = (
                _mm512_maskz_loadu_ps(m0, bk),
                _mm512_maskz_loadu_ps(m1, bk.add(16)),
            );
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add((row + r) * k + kk));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        }
        for r in 0..R {
            let cr = c.add((row + r) * n + col);
            _mm512_mask_storeu_ps(cr, m0, lo[r]);
            _mm512_mask_storeu_ps(cr.add(16), m1, hi[r]);
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `c + a · b` by the textbook triple loop in f64.
    fn reference(Dims { m, k, n }: Dims, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f64> {
        let mut out: Vec<f64> = c.iter().map(|&v| v as f64).collect();
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    out[i * n + j] += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                }
            }
        }
        out
    }

    fn random(rng: &mut impl Rng, len: usize, zeros: f64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                if rng.gen_bool(zeros) {
                    0.0
                } else {
                    rng.gen_range(-1.0..1.0)
                }
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what} at {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn every_path_matches_the_triple_loop_on_every_shape() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Shapes that fill whole tiles, leave row and column remainders of every size, are
        // below a tile, or are empty; dense, ReLU-like (half zeros) and K-hot-like inputs.
        for (m, k, n) in [
            (1, 32, 256),
            (3, 256, 256),
            (4, 256, 5),
            (7, 20, 33),
            (9, 17, 48),
            (16, 128, 16),
            (17, 9, 1),
            (13, 31, 70),
            (8, 16, 32),
            (0, 8, 8),
            (5, 0, 20),
        ] {
            let dims = Dims { m, k, n };
            for zeros in [0.0, 0.5, 0.9] {
                let a = random(&mut rng, m * k, zeros);
                let b = random(&mut rng, k * n, 0.0);
                let c0 = random(&mut rng, m * n, 0.0);
                let want = reference(dims, &a, &b, &c0);
                let what = format!("{m}x{k}x{n} zeros={zeros}");
                // Each path on its own, whatever the CPU and the density would pick: the
                // best one the CPU has (AVX-512 here) and the portable loops, dense and sparse.
                for sparse in [false, true] {
                    let mut c = c0.clone();
                    accumulate(dims, &a, &b, &mut c, sparse);
                    assert_close(&c, &want, &format!("sparse={sparse} {what}"));
                    let mut c = c0.clone();
                    portable(dims, &a, &b, &mut c, sparse);
                    assert_close(&c, &want, &format!("portable sparse={sparse} {what}"));
                }
            }
        }
    }

    #[test]
    fn linear_adds_the_bias_and_applies_relu() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (rows, inputs, outputs) = (5, 12, 19);
        let b = random(&mut rng, outputs, 0.0);
        let w = random(&mut rng, inputs * outputs, 0.0);
        let bias_rows: Vec<f32> = (0..rows).flat_map(|_| b.iter().copied()).collect();
        // Dense and K-hot-like inputs take different paths.
        for zeros in [0.0, 0.9] {
            let x = random(&mut rng, rows * inputs, zeros);
            let dims = Dims {
                m: rows,
                k: inputs,
                n: outputs,
            };
            let want = reference(dims, &x, &w, &bias_rows);
            for relu in [false, true] {
                let mut out = vec![f32::NAN; rows * outputs];
                linear(&x, &w, &b, rows, relu, &mut out);
                let want: Vec<f64> = want
                    .iter()
                    .map(|&v| if relu { v.max(0.0) } else { v })
                    .collect();
                assert_close(&out, &want, &format!("linear relu={relu} zeros={zeros}"));
            }
        }
    }
}
