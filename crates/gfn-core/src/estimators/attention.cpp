// Multi-head self-attention for short sequences on the CPU, as one autograd function of
// libtorch: gfn_core's Transformer runs it on every state of a batch (16 tokens, heads of 8
// values for gfnx's bitseq policy), where libtorch's scaled_dot_product_attention spends most
// of its time setting up thousands of tiny matrix products. Here each (state, head) is a few
// hundred multiply-adds in registers: with AVX-512 a query's sixteen scores are one register
// and four queries go through together (their dependent chains interleave; measured with
// perf on the bitseq step: the forward kernel's share fell from 10.8% to 5.6%), else eight
// lanes (AVX2) or plain loops. Forward saves the softmax weights; backward is the textbook
// one:
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = c dS K,  dK = c dSᵀ Q
// with c = 1/sqrt(head width). Input and output keep the Transformer's layouts: qkv is
// [rows, length, 3 · width] (queries, keys, values side by side, heads consecutive within each),
// the output [rows, length, width].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <cstring>
#include <string>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Compiled for the machine's vector units where it has AVX2 and FMA, else for any x86-64.
#if defined(__x86_64__) && defined(__GNUC__)
#define GFN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GFN_CLONES
#endif

struct Shape {
  int64_t rows, length, width, heads, head_width;
};

// Eight floats, as the vector extensions of GCC and Clang write them: one AVX register in the
// x86-64-v3 clone, two SSE ones otherwise.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

inline float sum(v8 v) {
  float total = 0.0f;
  for (int k = 0; k < 8; ++k) total += v[k];
  return total;
}

inline float max(v8 v) {
  float m = v[0];
  for (int k = 1; k < 8; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// exp(x) for x <= 0 (softmax arguments less their maximum) on eight lanes, branch-free:
// 2^(x log2 e) split into 2^n (exponent bits) and 2^f, f in [-1/2, 1/2], by a degree-6
// polynomial (relative error below 2e-7); arguments under -87 give exp(-87).
inline v8 exp_nonpositive(v8 x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const v8 t = x * 1.44269504088896341f;
  // Adding 1.5 · 2^23 rounds t to an integer in the low mantissa bits.
  const v8 shifted = t + 12582912.0f;
  const v8 f = t - (shifted - 12582912.0f);
  v8 p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const v8i bits = ((v8i)shifted - 0x4B400000 + 127) << 23;
  return p * (v8)bits;
}

// The same for one value (the general loops).
inline float exp_nonpositive(float x) { return exp_nonpositive(splat(x))[0]; }

// Sixteen tokens, heads of eight values: per (state, head) the keys and values are transposed
// into kt, vt[d] = lanes of tokens 0-7 and 8-15, and every loop is a few register operations.
constexpr int64_t L16 = 16, D8 = 8;

// One head's keys or values transposed, times `factor`: out[d][j] = factor · column d of
// token j, from `first` (token 0's first value of that head) with tokens `stride` apart.
inline void transpose_head(const float* first, int64_t stride, float factor,
                           float out[D8][L16]) {
  for (int64_t j = 0; j < L16; ++j) {
    for (int64_t d = 0; d < D8; ++d) out[d][j] = first[j * stride + d] * factor;
  }
}

GFN_CLONES void forward_16x8(const float* qkv, float* out, float* probs, const Shape& s,
                             int64_t begin, int64_t end) {
  const int64_t W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(8.0f);
  float kt[D8][L16];
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L16 * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      transpose_head(base + W + h * D8, stride, scale, kt);
      v8 values[L16];
      for (int64_t j = 0; j < L16; ++j) values[j] = load(base + j * stride + 2 * W + h * D8);
      float* p_rh = probs + ((r * s.heads + h) * L16) * L16;
      for (int64_t i = 0; i < L16; ++i) {
        const float* q = base + i * stride + h * D8;
        v8 low = splat(0.0f), high = splat(0.0f);
        for (int64_t d = 0; d < D8; ++d) {
          low += q[d] * load(&kt[d][0]);
          high += q[d] * load(&kt[d][8]);
        }
        const float m = std::fmax(max(low), max(high));
        low = exp_nonpositive(low - m);
        high = exp_nonpositive(high - m);
        const float inverse = 1.0f / (sum(low) + sum(high));
        low *= inverse;
        high *= inverse;
        store(p_rh + i * L16, low);
        store(p_rh + i * L16 + 8, high);
        v8 o = splat(0.0f);
        for (int64_t j = 0; j < 8; ++j) o += low[j] * values[j];
        for (int64_t j = 0; j < 8; ++j) o += high[j] * values[8 + j];
        store(out + (r * L16 + i) * W + h * D8, o);
      }
    }
  }
}

GFN_CLONES void backward_16x8(const float* qkv, const float* probs, const float* grad_out,
                              float* grad_qkv, const Shape& s, int64_t begin, int64_t end) {
  const int64_t W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(8.0f);
  float vt[D8][L16];
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L16 * stride;
    float* grad = grad_qkv + r * L16 * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      const float* p_rh = probs + ((r * s.heads + h) * L16) * L16;
      v8 queries[L16], keys[L16], dk[L16], dv[L16];
      for (int64_t j = 0; j < L16; ++j) {
        const float* row = base + j * stride + h * D8;
        queries[j] = load(row);
        keys[j] = load(row + W);
        dk[j] = dv[j] = splat(0.0f);
      }
      transpose_head(base + 2 * W + h * D8, stride, 1.0f, vt);
      for (int64_t i = 0; i < L16; ++i) {
        const v8 go = load(grad_out + (r * L16 + i) * W + h * D8);
        const v8 p_low = load(p_rh + i * L16), p_high = load(p_rh + i * L16 + 8);
        // dP_ij = dO_i · V_j, then dS_ij = c P_ij (dP_ij − Σ_j P_ij dP_ij).
        v8 low = splat(0.0f), high = splat(0.0f);
        for (int64_t d = 0; d < D8; ++d) {
          low += go[d] * load(&vt[d][0]);
          high += go[d] * load(&vt[d][8]);
        }
        const float weighted = sum(p_low * low) + sum(p_high * high);
        low = p_low * (low - weighted) * scale;
        high = p_high * (high - weighted) * scale;
        // dV_j += P_ij dO_i; dQ_i = Σ_j dS_ij K_j; dK_j += dS_ij Q_i.
        v8 dq = splat(0.0f);
        for (int64_t j = 0; j < 8; ++j) {
          dv[j] += p_low[j] * go;
          dv[8 + j] += p_high[j] * go;
          dq += low[j] * keys[j] + high[j] * keys[8 + j];
          dk[j] += low[j] * queries[i];
          dk[8 + j] += high[j] * queries[i];
        }
        store(grad + i * stride + h * D8, dq);
      }
      for (int64_t j = 0; j < L16; ++j) {
        store(grad + j * stride + W + h * D8, dk[j]);
        store(grad + j * stride + 2 * W + h * D8, dv[j]);
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GFN_AVX512 1
#define GFN_512 __attribute__((target("avx512f,avx512dq,avx512vl,fma")))

// With AVX-512 a head's sixteen scores fit one register, so the softmax's maximum and sum are
// one in-register reduction each instead of sixteen lane extractions.
GFN_512 inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t QUERIES = 4;

GFN_512 void forward_16x8_avx512(const float* qkv, float* out, float* probs, const Shape& s,
                                 int64_t begin, int64_t end) {
  const int64_t W = s.width, stride = 3 * W;
  const float scale = 1.0f / std::sqrt(8.0f);
  alignas(64) float kt[D8][L16];
  for (int64_t r = begin; r < end; ++r) {
    const float* base = qkv + r * L16 * stride;
    for (int64_t h = 0; h < s.heads; ++h) {
      transpose_head(base + W + h * D8, stride, scale, kt);
      __m256 values[L16];
      for (int64_t j = 0; j < L16; ++j) values[j] = _mm256_loadu_ps(base + j * stride + 2 * W + h * D8);
      float* p_rh = probs + ((r * s.heads + h) * L16) * L16;
      // QUERIES queries at a time: their chains of dependent operations (the score sums, the
      // reductions, exp, the output sums) interleave instead of waiting on one another.
      for (int64_t i0 = 0; i0 < L16; i0 += QUERIES) {
        __m512 scores[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) {
          const float* q = base + (i0 + u) * stride + h * D8;
          scores[u] = _mm512_mul_ps(_mm512_set1_ps(q[0]), _mm512_load_ps(kt[0]));
        }
        for (int64_t d = 1; d < D8; ++d) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            const float* q = base + (i0 + u) * stride + h * D8;
            scores[u] = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_load_ps(kt[d]), scores[u]);
          }
        }
        __m256 o[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) {
          const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(scores[u]));
          const __m512 e = exp_nonpositive16(_mm512_sub_ps(scores[u], m));
          const __m512 p = _mm512_mul_ps(e, _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(e)));
          _mm512_storeu_ps(p_rh + (i0 + u) * L16, p);
          o[u] = _mm256_setzero_ps();
        }
        for (int64_t j = 0; j < L16; ++j) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            const float p_ij = p_rh[(i0 + u) * L16 + j];
            o[u] = _mm256_fmadd_ps(_mm256_set1_ps(p_ij), values[j], o[u]);
          }
        }
        for (int64_t u = 0; u < QUERIES; ++u) {
          _mm256_storeu_ps(out + (r * L16 + i0 + u) * W + h * D8, o[u]);
        }
      }
    }
  }
}

GFN_512 void backward_16x8_avx512(const float* qkv, const float* probs, const float* grad_out,
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
      __m256 queries[L16], keys[L16], dk[L16], dv[L16];
      for (int64_t j = 0; j < L16; ++j) {
        const float* row = base + j * stride + h * D8;
        queries[j] = _mm256_loadu_ps(row);
        keys[j] = _mm256_loadu_ps(row + W);
        dk[j] = dv[j] = _mm256_setzero_ps();
      }
      transpose_head(base + 2 * W + h * D8, stride, 1.0f, vt);
      // QUERIES queries at a time, as in the forward pass.
      for (int64_t i0 = 0; i0 < L16; i0 += QUERIES) {
        const float* go_i[QUERIES];
        __m256 go[QUERIES], dq[QUERIES];
        __m512 dp[QUERIES];
        for (int64_t u = 0; u < QUERIES; ++u) {
          go_i[u] = grad_out + (r * L16 + i0 + u) * W + h * D8;
          go[u] = _mm256_loadu_ps(go_i[u]);
          dq[u] = _mm256_setzero_ps();
          dp[u] = _mm512_mul_ps(_mm512_set1_ps(go_i[u][0]), _mm512_load_ps(vt[0]));
        }
        // dP_ij = dO_i · V_j, then dS_ij = c P_ij (dP_ij − Σ_j P_ij dP_ij).
        for (int64_t d = 1; d < D8; ++d) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            dp[u] = _mm512_fmadd_ps(_mm512_set1_ps(go_i[u][d]), _mm512_load_ps(vt[d]), dp[u]);
          }
        }
        for (int64_t u = 0; u < QUERIES; ++u) {
          const __m512 p = _mm512_loadu_ps(p_rh + (i0 + u) * L16);
          const __m512 weighted = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_mul_ps(p, dp[u])));
          _mm512_store_ps(ds[u], _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp[u], weighted)),
                                               _mm512_set1_ps(scale)));
        }
        // dV_j += P_ij dO_i; dQ_i = Σ_j dS_ij K_j; dK_j += dS_ij Q_i.
        for (int64_t j = 0; j < L16; ++j) {
          for (int64_t u = 0; u < QUERIES; ++u) {
            const __m256 dsj = _mm256_set1_ps(ds[u][j]);
            dv[j] = _mm256_fmadd_ps(_mm256_set1_ps(p_rh[(i0 + u) * L16 + j]), go[u], dv[j]);
            dq[u] = _mm256_fmadd_ps(dsj, keys[j], dq[u]);
            dk[j] = _mm256_fmadd_ps(dsj, queries[i0 + u], dk[j]);
          }
        }
        for (int64_t u = 0; u < QUERIES; ++u) {
          _mm256_storeu_ps(grad + (i0 + u) * stride + h * D8, dq[u]);
        }
      }
      for (int64_t j = 0; j < L16; ++j) {
        _mm256_storeu_ps(grad + j * stride + W + h * D8, dk[j]);
        _mm256_storeu_ps(grad + j * stride + 2 * W + h * D8, dv[j]);
      }
    }
  }
}
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

// Which loops run a shape: gfnx's bitseq policy (sixteen tokens, heads of eight values) takes
// vector kernels, the AVX-512 ones where the CPU has it (unless the caller asks for the
// narrower ones, as the tests do to check both).
enum class Kernels : int64_t { General, Vector8, Avx512 };

Kernels kernels_for(const Shape& s, bool allow_avx512) {
  if (s.length != L16 || s.head_width != D8) return Kernels::General;
#ifdef GFN_AVX512
  if (allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl")) {
    return Kernels::Avx512;
  }
#endif
  return Kernels::Vector8;
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
    const Kernels kernels = kernels_for(s, allow_avx512);
    at::Tensor out = at::empty({s.rows, s.length, s.width}, qkv.options());
    at::Tensor probs = at::empty({s.rows, s.heads, s.length, s.length}, qkv.options());
    const float* q = qkv.data_ptr<float>();
    float* o = out.data_ptr<float>();
    float* p = probs.data_ptr<float>();
    at::parallel_for(0, s.rows, GRAIN, [&](int64_t begin, int64_t end) {
      switch (kernels) {
#ifdef GFN_AVX512
        case Kernels::Avx512:
          forward_16x8_avx512(q, o, p, s, begin, end);
          break;
#endif
        case Kernels::Vector8:
          forward_16x8(q, o, p, s, begin, end);
          break;
        default:
          forward_general(q, o, p, s, begin, end);
      }
    });
    ctx->save_for_backward({qkv, probs});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kernels"] = static_cast<int64_t>(kernels);
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& qkv = saved[0];
    const at::Tensor& probs = saved[1];
    const Shape s = shape_of(qkv, ctx->saved_data["heads"].toInt());
    const auto kernels = static_cast<Kernels>(ctx->saved_data["kernels"].toInt());
    const at::Tensor grad_out = grads[0].contiguous();
    // The vector kernels write every gradient; the general loops accumulate into zeros.
    at::Tensor grad_qkv =
        kernels == Kernels::General ? at::zeros_like(qkv) : at::empty_like(qkv);
    const float* q = qkv.data_ptr<float>();
    const float* p = probs.data_ptr<float>();
    const float* go = grad_out.data_ptr<float>();
    float* g = grad_qkv.data_ptr<float>();
    at::parallel_for(0, s.rows, GRAIN, [&](int64_t begin, int64_t end) {
      switch (kernels) {
#ifdef GFN_AVX512
        case Kernels::Avx512:
          backward_16x8_avx512(q, p, go, g, s, begin, end);
          break;
#endif
        case Kernels::Vector8:
          backward_16x8(q, p, go, g, s, begin, end);
          break;
        default:
          backward_general(q, p, go, g, s, begin, end);
      }
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
