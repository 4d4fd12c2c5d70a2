//! The forward pass of a linear layer in plain Rust, for the policy calls of CPU rollouts.
//!
//! A rollout asks the policy for a handful of rows at every step. For 4 rows of the default
//! MLP (hidden 256) libtorch takes about 20 µs per call, most of it operator dispatch and MKL's
//! set-up for a GEMM with a tiny M. This kernel streams each weight column block once per four
//! rows with fused multiply-adds, skips the zero inputs of K-hot encodings, and needs no
//! allocation, so the policy call costs little more than its arithmetic. Training keeps using
//! libtorch (autograd, GPU); this path only ever reads the parameters.

/// Rows and columns of the output that one block of accumulators covers.
const ROWS: usize = 4;
const COLS: usize = 16;

/// `out = x · w + b` (then ReLU if `relu`) for `x` of `rows × inputs` and `w` of
/// `inputs × outputs` (row-major, the layout of the estimators' weights), `b` of `outputs`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], rows: usize, relu: bool, out: &mut [f32]) {
    let outputs = b.len();
    let inputs = w.len() / outputs.max(1);
    assert_eq!(x.len(), rows * inputs, "input is rows × inputs");
    assert_eq!(w.len(), inputs * outputs, "weight is inputs × outputs");
    assert_eq!(out.len(), rows * outputs, "output is rows × outputs");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `linear_avx2` is compiled for.
        unsafe { linear_avx2(x, w, b, rows, inputs, relu, out) };
        return;
    }
    linear_blocks(x, w, b, rows, inputs, relu, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_avx2(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    inputs: usize,
    relu: bool,
    out: &mut [f32],
) {
    linear_blocks(x, w, b, rows, inputs, relu, out)
}

/// The blocked loop; inlined into each target-feature variant so that the compiler vectorises
/// the column loop with that variant's instructions.
#[inline(always)]
fn linear_blocks(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    inputs: usize,
    relu: bool,
    out: &mut [f32],
) {
    let outputs = b.len();
    let mut col = 0;
    while col < outputs {
        let width = COLS.min(outputs - col);
        let mut row = 0;
        while row < rows {
            let height = ROWS.min(rows - row);
            if width == COLS {
                match height {
                    4 => block::<4>(x, w, b, row, col, inputs, relu, out),
                    3 => block::<3>(x, w, b, row, col, inputs, relu, out),
                    2 => block::<2>(x, w, b, row, col, inputs, relu, out),
                    _ => block::<1>(x, w, b, row, col, inputs, relu, out),
                }
            } else {
                narrow_block(x, w, b, row, height, col, width, inputs, relu, out);
            }
            row += height;
        }
        col += width;
    }
}

/// `R` rows (at most [`ROWS`]) by a full [`COLS`] block of columns, the rows unrolled so that
/// the accumulators stay in registers. (One row is bound by reading the weights from L2 rather
/// than by the multiply-add latency, so more partial sums would not help it.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<const R: usize>(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    row: usize,
    col: usize,
    inputs: usize,
    relu: bool,
    out: &mut [f32],
) {
    let outputs = b.len();
    let bias: &[f32; COLS] = b[col..col + COLS].try_into().expect("a full column block");
    let mut acc = [*bias; R];
    let xs = &x[row * inputs..(row + R) * inputs];
    for k in 0..inputs {
        let mut xk = [0f32; R];
        for (r, v) in xk.iter_mut().enumerate() {
            *v = xs[r * inputs + k];
        }
        // K-hot inputs and ReLU activations have many zeros.
        if xk.iter().all(|&v| v == 0.0) {
            continue;
        }
        let wk: &[f32; COLS] = w[k * outputs + col..k * outputs + col + COLS]
            .try_into()
            .expect("a full column block");
        for (a, &xv) in acc.iter_mut().zip(&xk) {
            for (a, &wv) in a.iter_mut().zip(wk) {
                *a = xv.mul_add(wv, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let start = (row + r) * outputs + col;
        store(&mut out[start..start + COLS], a, relu);
    }
}

/// Fewer than [`COLS`] columns (a head with a few outputs): one dot product per row and output
/// over a transposed copy of the weight columns, vectorised along the inputs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn narrow_block(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    row: usize,
    height: usize,
    col: usize,
    width: usize,
    inputs: usize,
    relu: bool,
    out: &mut [f32],
) {
    let outputs = b.len();
    let mut columns = vec![0f32; width * inputs];
    for (k, wk) in w.chunks_exact(outputs).enumerate() {
        for (j, &v) in wk[col..col + width].iter().enumerate() {
            columns[j * inputs + k] = v;
        }
    }
    for r in row..row + height {
        let xr = &x[r * inputs..(r + 1) * inputs];
        let mut values = [0f32; COLS];
        for (j, column) in columns.chunks_exact(inputs).enumerate() {
            values[j] = b[col + j] + dot(xr, column);
        }
        let start = r * outputs + col;
        store(&mut out[start..start + width], &values[..width], relu);
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

#[inline(always)]
fn store(dst: &mut [f32], acc: &[f32], relu: bool) {
    for (d, &v) in dst.iter_mut().zip(acc) {
        *d = if relu { v.max(0.0) } else { v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The textbook triple loop in f64.
    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, relu: bool) -> Vec<f64> {
        let outputs = b.len();
        let inputs = w.len() / outputs;
        let mut out = vec![0f64; rows * outputs];
        for r in 0..rows {
            for o in 0..outputs {
                let mut v = b[o] as f64;
                for k in 0..inputs {
                    v += x[r * inputs + k] as f64 * w[k * outputs + o] as f64;
                }
                out[r * outputs + o] = if relu { v.max(0.0) } else { v };
            }
        }
        out
    }

    #[test]
    fn matches_the_triple_loop_on_every_block_shape() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Row and column counts that fill whole blocks, leave remainders, or are below a block;
        // inputs with zeros (K-hot) and without.
        for &(rows, inputs, outputs) in &[
            (1, 32, 256),
            (3, 256, 256),
            (4, 256, 5),
            (7, 20, 33),
            (16, 128, 16),
            (17, 9, 1),
            (0, 8, 8),
        ] {
            for relu in [false, true] {
                let sparse = rng.gen_bool(0.5);
                let x: Vec<f32> = (0..rows * inputs)
                    .map(|_| {
                        if sparse && rng.gen_bool(0.8) {
                            0.0
                        } else {
                            rng.gen_range(-1.0..1.0)
                        }
                    })
                    .collect();
                let w: Vec<f32> = (0..inputs * outputs)
                    .map(|_| rng.gen_range(-1.0..1.0))
                    .collect();
                let b: Vec<f32> = (0..outputs).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut out = vec![f32::NAN; rows * outputs];
                linear(&x, &w, &b, rows, relu, &mut out);
                let expected = reference(&x, &w, &b, rows, relu);
                for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{rows}x{inputs}x{outputs} relu={relu} at {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
