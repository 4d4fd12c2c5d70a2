// The Transformer's affine layers on AVX-512 CPUs, as one autograd function of libtorch:
// y = x W + b, with dx = dy Wᵀ, dW = xᵀ dy, db = Σ_rows dy. libtorch's MKL takes its generic
// AVX2 kernels on AMD CPUs; at the bitseq policy's shapes (inner dimension 64, 64 to 256
// outputs) tiles of 8 rows by 32 columns accumulated in registers run the same products in
// about half its time (measured with perf on a bitseq step: the rollouts' plain-Rust GEMM,
// `host_mlp.rs`, did a quarter of the multiply-adds in 6% of the time, MKL the rest in 43%).
// Output widths must be multiples of 16, and so input widths where dx is needed; the
// Transformer falls back to libtorch for other shapes and CPUs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "vectors.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// c (m × n, rows n apart) += a · b, where a's element (i, p) sits at a[i · row + p · column]
// (a row-major matrix, or the transpose of one) and b is k × n row-major.
struct Product {
  const float* a;
  int64_t row, column;
  const float* b;
  float* c;
  int64_t m, k, n;
};

// R rows by 16 · V columns of the product from (i, j), summed over p in order.
template <int R, int V>
GFN_INLINE void tile(const Product& g, int64_t i, int64_t j) {
  v16 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = load<v16>(g.c + (i + r) * g.n + j + 16 * v);
  }
  for (int64_t p = 0; p < g.k; ++p) {
    v16 b[V];
    for (int v = 0; v < V; ++v) b[v] = load<v16>(g.b + p * g.n + j + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float x = g.a[(i + r) * g.row + p * g.column];
      for (int v = 0; v < V; ++v) acc[r][v] += x * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) store(g.c + (i + r) * g.n + j + 16 * v, acc[r][v]);
  }
}

// Rows begin..end of one block of 16 · V columns.
template <int V>
GFN_INLINE void rows(const Product& g, int64_t j, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) tile<8, V>(g, i, j);
  for (; i + 4 <= end; i += 4) tile<4, V>(g, i, j);
  for (; i < end; ++i) tile<1, V>(g, i, j);
}

GFN_512 void multiply_rows(const Product& g, int64_t begin, int64_t end) {
  int64_t j = 0;
  for (; j + 32 <= g.n; j += 32) rows<2>(g, j, begin, end);
  if (j < g.n) rows<1>(g, j, begin, end);
}

// Rows at least this many per parallel task: enough work to pay for a handoff.
constexpr int64_t GRAIN = 64;

void multiply(const Product& g) {
  at::parallel_for(0, g.m, GRAIN, [&](int64_t begin, int64_t end) { multiply_rows(g, begin, end); });
}

at::Tensor rows_of(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

struct SmallLinear : public torch::autograd::Function<SmallLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in,
                            const at::Tensor& bias) {
    const at::Tensor x = rows_of(x_in), w = w_in.contiguous();
    const int64_t m = x.size(0), k = x.size(1), n = w.size(1);
    at::Tensor out = bias.reshape({1, n}).expand({m, n}).contiguous();
    multiply({x.data_ptr<float>(), k, 1, w.data_ptr<float>(), out.data_ptr<float>(), m, k, n});
    ctx->save_for_backward({x, w});
    std::vector<int64_t> shape = x_in.sizes().vec();
    shape.back() = n;
    return out.view(shape);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const int64_t m = x.size(0), k = x.size(1), n = w.size(1);
    const at::Tensor dy = rows_of(grads[0]);
    at::Tensor dx, dw = at::zeros_like(w);
    if (ctx->needs_input_grad(0)) {
      const at::Tensor wt = w.t().contiguous();
      dx = at::zeros({m, k}, x.options());
      multiply({dy.data_ptr<float>(), n, 1, wt.data_ptr<float>(), dx.data_ptr<float>(), m, n, k});
      std::vector<int64_t> shape = grads[0].sizes().vec();
      shape.back() = k;
      dx = dx.view(shape);
    }
    // dW = xᵀ dy: x read down its columns, the sum over the batch's rows in order.
    multiply({x.data_ptr<float>(), 1, k, dy.data_ptr<float>(), dw.data_ptr<float>(), k, m, n});
    return {dx, dw, dy.sum(0)};
  }
};

thread_local std::string last_error;

}  // namespace

// Whether gfn_small_linear can compute y = x W + b for x [..., inputs] and W [inputs, outputs].
extern "C" bool gfn_small_linear_fits(int64_t inputs, int64_t outputs) {
  return has_avx512() && inputs % 16 == 0 && outputs % 16 == 0;
}

// x W + b for float CPU tensors x [..., inputs], W [inputs, outputs], b [outputs] (sizes that
// gfn_small_linear_fits accepts), as a new tensor the caller owns; null on failure, with the
// reason from gfn_linear_error.
extern "C" at::Tensor* gfn_small_linear(const at::Tensor* x, const at::Tensor* w,
                                        const at::Tensor* b) {
  try {
    return new at::Tensor(SmallLinear::apply(*x, *w, *b));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

extern "C" const char* gfn_linear_error() { return last_error.c_str(); }
