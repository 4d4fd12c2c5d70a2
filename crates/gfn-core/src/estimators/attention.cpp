// Multi-head self-attention for short sequences on the CPU, as one autograd function of
// libtorch: gfn_core's Transformer runs it on every state of a batch (16 tokens, heads of 8
// values for gfnx's bitseq policy), where libtorch's scaled_dot_product_attention spends most
// of its time setting up thousands of tiny matrix products. Here each (state, head) is a few
// hundred multiply-adds in registers, four queries at a time (one body, compiled for AVX-512,
// AVX2 or any x86-64), or plain loops for other shapes. Forward saves the softmax weights;
// backward is the textbook one:
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = c dS K,  dK = c dSᵀ Q
// with c = 1/sqrt(head width). Input and output keep the Transformer's layouts: qkv is
// [rows, length, 3 · width] (queries, keys, values side by side, heads consecutive within each),
// the output [rows, length, width].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <string>
#include <vector>

#include "vectors.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The vector kernels' one body is compiled three times: for AVX-512 (a query's sixteen scores in
// one register), for AVX2 and FMA, and for any x86-64.

struct Shape {
  int64_t rows, length, width, heads, head_width;
};

// `op` folded over sixteen lanes by halves: one fixed order of sums whatever the register width.
template <class Op>
GFN_INLINE float reduce(v16 v, Op op) {
  const v8 eight = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const v4 four = op(__builtin_shufflevector(eight, eight, 0, 1, 2, 3),
                     __builtin_shufflevector(eight, eight, 4, 5, 6, 7));
  const v4 two = op(four, __builtin_shufflevector(four, four, 2, 3, 0, 1));
  return op(two[0], two[1]);
}

GFN_INLINE float sum(v16 v) {
  return reduce(v, [](auto a, auto b) { return a + b; });
}

GFN_INLINE float max(v16 v) {
  return reduce(v, [](auto a, auto b) { return a > b ? a : b; });
}

// exp(x) for x <= 0 (softmax arguments less their maximum), branch-free: 2^(x log2 e) split
// into 2^n (exponent bits) and 2^f, f in [-1/2, 1/2], by a degree-6 polynomial (relative error
// below 2e-7); arguments under -87 give exp(-87). Clamping t = x log2 e (the same bits as
// clamping x first) also keeps t rounded: no fused multiply-add may merge it into its sums.
template <class V>
GFN_INLINE V exp_nonpositive(V x) {
  constexpr float LOG2E = 1.44269504088896341f;
  const V lowest = splat<V>(-87.0f * LOG2E);
  V t = x * LOG2E;
  t = t < lowest ? lowest : t;
  // Adding 1.5 · 2^23 rounds t to an integer in the low mantissa bits.
  const V shifted = t + 12582912.0f;
  const V f = t - (shifted - 12582912.0f);
  V p = splat<V>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  using Bits = decltype(t < t);
  const Bits bits = ((Bits)shifted - 0x4B400000 + 127) << 23;
  return p * (V)bits;
}

// The same for one value (the general loops).
inline float exp_nonpositive(float x) { return exp_nonpositive(splat<v8>(x))[0]; }

// Sixteen tokens, heads of eight values: per (state, head) the keys (forward) or values
// (backward) are transposed into kt, vt[d] = column d of tokens 0-15, so a query's sixteen
// scores are one v16. QUERIES queries go through together: their chains of dependent
// operations (the score sums, the reductions, exp, the output sums) interleave instead of
// waiting on one another (measured with perf on the bitseq step, with AVX-512: the forward
// kernel's share fell from 10.8% to 5.6%, against one query at a time).
constexpr int64_t L16 = 16, D8 = 8, QUERIES = 4;

// One head's keys or values transposed, times `factor`: out[d][j] = factor · column d of
// token j, from `first` (token 0's first value of that head) with tokens `stride` apart.
GFN_INLINE void transpose_head(const float* first, int64_t stride, float factor,
                               float out[D8][L16]) {
  for (int64_t j = 0; j < L16; ++j) {
    for (int64_t d = 0; d < D8; ++d) out[d][j] = first[j * stride + d] * factor;
  }
}

GFN_INLINE void forward_16x8(const float* qkv, float* out, float* probs, const Shape& s,
                             int64_t begin, int64_t end) {
  const int64_t W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(8.0f);
  alignas(64) float kt[D8][L16];
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L16 * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      transpose_head(base + W + h * D8, stride, scale, kt);
      v8 values[L16];
      for (int64_t j = 0; j < L16; ++j) values[j] = load<v8>(base + j * stride + 2 * W + h * D8);
      float* p_rh = probs + ((r * s.heads + h) * L16) * L16;
      for (int64_t i0 = 0; i0 < L16; i0 += QUERIES) {
        v16 scores[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) scores[u] = splat<v16>(0.0f);
        for (int64_t d = 0; d < D8; ++d) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            scores[u] += base[(i0 + u) * stride + h * D8 + d] * load<v16>(kt[d]);
          }
        }
        v8 o[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) {
          const v16 e = exp_nonpositive(scores[u] - max(scores[u]));
          store(p_rh + (i0 + u) * L16, e * (1.0f / sum(e)));
          o[u] = splat<v8>(0.0f);
        }
        for (int64_t j = 0; j < L16; ++j) {
          for (int64_t u = 0; u < QUERIES; ++u) o[u] += p_rh[(i0 + u) * L16 + j] * values[j];
        }
        for (int64_t u = 0; u < QUERIES; ++u) store(out + (r * L16 + i0 + u) * W + h * D8, o[u]);
      }
    }
  }
}

GFN_INLINE void backward_16x8(const float* qkv, const float* probs, const float* grad_out,
                              float* grad_qkv, const Shape& s, int64_t begin, int64_t end) {
  const int64_t W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(8.0f);
  alignas(64) float vt[D8][L16];
  alignas(64) float ds[QUERIES][L16];
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L16 * stride;
    float* grad = grad_qkv + r * L16 * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      const float* p_rh = probs + ((r * s.heads + h) * L16) * L16;
      v8 queries[L16], keys[L16], dk[L16], dv[L16];
      for (int64_t j = 0; j < L16; ++j) {
        const float* row = base + j * stride + h * D8;
        queries[j] = load<v8>(row);
        keys[j] = load<v8>(row + W);
        dk[j] = dv[j] = splat<v8>(0.0f);
      }
      transpose_head(base + 2 * W + h * D8, stride, 1.0f, vt);
      for (int64_t i0 = 0; i0 < L16; i0 += QUERIES) {
        const float* go = grad_out + (r * L16 + i0) * W + h * D8;
        v8 dq[QUERIES];
        v16 dp[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) {
          dq[u] = splat<v8>(0.0f);
          dp[u] = splat<v16>(0.0f);
        }
        // dP_ij = dO_i · V_j, then dS_ij = c P_ij (dP_ij − Σ_j P_ij dP_ij).
        for (int64_t d = 0; d < D8; ++d) {
          for (int64_t u = 0; u < QUERIES; ++u) dp[u] += go[u * W + d] * load<v16>(vt[d]);
        }
        for (int64_t u = 0; u < QUERIES; ++u) {
          const v16 p = load<v16>(p_rh + (i0 + u) * L16);
          store(ds[u], p * (dp[u] - sum(p * dp[u])) * scale);
        }
        // dV_j += P_ij dO_i; dQ_i = Σ_j dS_ij K_j; dK_j += dS_ij Q_i.
        for (int64_t j = 0; j < L16; ++j) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            dv[j] += p_rh[(i0 + u) * L16 + j] * load<v8>(go + u * W);
            dq[u] += ds[u][j] * keys[j];
            dk[j] += ds[u][j] * queries[i0 + u];
          }
        }
        for (int64_t u = 0; u < QUERIES; ++u) store(grad + (i0 + u) * stride + h * D8, dq[u]);
      }
      for (int64_t j = 0; j < L16; ++j) {
        store(grad + j * stride + W + h * D8, dk[j]);
        store(grad + j * stride + 2 * W + h * D8, dv[j]);
      }
    }
  }
}

// The two kernels compiled for the vector units named by ATTRIBUTES (a template cannot vary
// a function's target).
#define GFN_VECTOR_KERNELS(ATTRIBUTES, FORWARD, BACKWARD)                                    \
  ATTRIBUTES void FORWARD(const float* qkv, float* out, float* probs, const Shape& s,        \
                          int64_t begin, int64_t end) {                                      \
    forward_16x8(qkv, out, probs, s, begin, end);                                            \
  }                                                                                          \
  ATTRIBUTES void BACKWARD(const float* qkv, const float* probs, const float* grad_out,      \
                           float* grad_qkv, const Shape& s, int64_t begin, int64_t end) {    \
    backward_16x8(qkv, probs, grad_out, grad_qkv, s, begin, end);                            \
  }

GFN_VECTOR_KERNELS(GFN_CLONES, forward_vector, backward_vector)
#ifdef GFN_AVX512
GFN_VECTOR_KERNELS(GFN_512, forward_avx512, backward_avx512)
#endif

// Any length and head width: the same computation in plain loops.
void forward_general(const float* qkv, float* out, float* probs, const Shape& s, int64_t begin,
                     int64_t end) {
  const int64_t L = s.length, D = s.head_width, W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> scores(L);
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      float* p_rh = probs + ((r * s.heads + h) * L) * L;
      for (int64_t i = 0; i < L; ++i) {
        const float* q = base + i * stride + h * D;
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          const float* k = base + j * stride + W + h * D;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
          scores[j] = dot * scale;
          m = std::fmax(m, scores[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
          scores[j] = exp_nonpositive(scores[j] - m);
          total += scores[j];
        }
        float* o = out + (r * L + i) * W + h * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
          const float p = scores[j] / total;
          p_rh[i * L + j] = p;
          const float* v = base + j * stride + 2 * W + h * D;
          for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
        }
      }
    }
  }
}

void backward_general(const float* qkv, const float* probs, const float* grad_out,
                      float* grad_qkv, const Shape& s, int64_t begin, int64_t end) {
  const int64_t L = s.length, D = s.head_width, W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> ds(L);
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L * stride;
    float* grad = grad_qkv + r * L * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      const float* p_rh = probs + ((r * s.heads + h) * L) * L;
      for (int64_t i = 0; i < L; ++i) {
        const float* go = grad_out + (r * L + i) * W + h * D;
        const float* p_i = p_rh + i * L;
        float weighted = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
          const float* v = base + j * stride + 2 * W + h * D;
          float dp = 0.0f;
          for (int64_t d = 0; d < D; ++d) dp += go[d] * v[d];
          ds[j] = dp;
          weighted += p_i[j] * dp;
        }
        const float* q = base + i * stride + h * D;
        float* gq = grad + i * stride + h * D;
        for (int64_t j = 0; j < L; ++j) {
          const float g = p_i[j] * (ds[j] - weighted) * scale;
          const float* k = base + j * stride + W + h * D;
          float* gk = grad + j * stride + W + h * D;
          float* gv = grad + j * stride + 2 * W + h * D;
          for (int64_t d = 0; d < D; ++d) {
            gq[d] += g * k[d];
            gk[d] += g * q[d];
            gv[d] += p_i[j] * go[d];
          }
        }
      }
    }
  }
}

using Forward = void (*)(const float* qkv, float* out, float* probs, const Shape& s,
                        int64_t begin, int64_t end);
using Backward = void (*)(const float* qkv, const float* probs, const float* grad_out,
                          float* grad_qkv, const Shape& s, int64_t begin, int64_t end);

struct Kernels {
  Forward forward;
  Backward backward;
  // The vector kernels write every gradient; the general loops accumulate into zeros.
  bool writes_every_gradient;
};

enum Choice : int64_t { GENERAL, VECTOR, AVX512 };

const Kernels KERNELS[] = {
    {forward_general, backward_general, false},
    {forward_vector, backward_vector, true},
#ifdef GFN_AVX512
    {forward_avx512, backward_avx512, true},
#endif
};

// Which loops run a shape: gfnx's bitseq policy (sixteen tokens, heads of eight values) takes
// the vector kernels, the AVX-512 ones where the CPU has it (unless the caller asks for the
// narrower ones, as the tests do to check both).
Choice kernels_for(const Shape& s, bool allow_avx512) {
  if (s.length != L16 || s.head_width != D8) return GENERAL;
  if (allow_avx512 && has_avx512()) return AVX512;
  return VECTOR;
}

Shape shape_of(const at::Tensor& qkv, int64_t heads) {
  Shape s;
  s.rows = qkv.size(0);
  s.length = qkv.size(1);
  s.width = qkv.size(2) / 3;
  s.heads = heads;
  s.head_width = s.width / heads;
  return s;
}

// Rows per parallel task: enough work to pay for a handoff.
constexpr int64_t GRAIN = 16;

struct SmallAttention : public torch::autograd::Function<SmallAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv_in, int64_t heads,
                            bool allow_avx512) {
    const at::Tensor qkv = qkv_in.contiguous();
    const Shape s = shape_of(qkv, heads);
    const Choice choice = kernels_for(s, allow_avx512);
    at::Tensor out = at::empty({s.rows, s.length, s.width}, qkv.options());
    at::Tensor probs = at::empty({s.rows, s.heads, s.length, s.length}, qkv.options());
    const float* q = qkv.data_ptr<float>();
    float* o = out.data_ptr<float>();
    float* p = probs.data_ptr<float>();
    at::parallel_for(0, s.rows, GRAIN, [&](int64_t begin, int64_t end) {
      KERNELS[choice].forward(q, o, p, s, begin, end);
    });
    ctx->save_for_backward({qkv, probs});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kernels"] = static_cast<int64_t>(choice);
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& qkv = saved[0];
    const at::Tensor& probs = saved[1];
    const Shape s = shape_of(qkv, ctx->saved_data["heads"].toInt());
    const Kernels& kernels = KERNELS[ctx->saved_data["kernels"].toInt()];
    const at::Tensor grad_out = grads[0].contiguous();
    at::Tensor grad_qkv =
        kernels.writes_every_gradient ? at::empty_like(qkv) : at::zeros_like(qkv);
    const float* q = qkv.data_ptr<float>();
    const float* p = probs.data_ptr<float>();
    const float* go = grad_out.data_ptr<float>();
    float* g = grad_qkv.data_ptr<float>();
    at::parallel_for(0, s.rows, GRAIN, [&](int64_t begin, int64_t end) {
      kernels.backward(q, p, go, g, s, begin, end);
    });
    return {grad_qkv, at::Tensor(), at::Tensor()};
  }
};

thread_local std::string last_error;

}  // namespace

// The attention output for `qkv` (a contiguous or not float CPU tensor [rows, length, 3 · width]
// whose width divides into `heads`), as a new tensor the caller owns; null on failure, with
// the reason from gfn_attention_error. `allow_avx512` false keeps to the AVX2 (or portable)
// loops.
extern "C" at::Tensor* gfn_small_attention(const at::Tensor* qkv, int64_t heads,
                                           bool allow_avx512) {
  try {
    return new at::Tensor(SmallAttention::apply(*qkv, heads, allow_avx512));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

extern "C" const char* gfn_attention_error() { return last_error.c_str(); }

// The forward pass alone on plain buffers, on the calling thread (a rollout's policy call):
// `qkv` [rows, length, 3 · width] contiguous into `out` [rows, length, width], with `probs`
// ([rows, heads, length, length]) as scratch for the softmax weights.
extern "C" void gfn_attention_forward(const float* qkv, float* out, float* probs, int64_t rows,
                                      int64_t length, int64_t heads, int64_t width) {
  const Shape s{rows, length, width, heads, width / heads};
  KERNELS[kernels_for(s, true)].forward(qkv, out, probs, s, 0, rows);
}
