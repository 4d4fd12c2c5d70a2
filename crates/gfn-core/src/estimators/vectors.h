// What the CPU kernels of gfn_core's Transformer (attention.cpp, linear.cpp) share: the vector
// types of GCC and Clang, and the attributes that compile one body for several instruction sets.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define GFN_AVX512 1
#define GFN_512 __attribute__((target("avx512f,avx512dq,avx512vl,fma")))
#define GFN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GFN_512
#define GFN_CLONES
#endif
// A body that takes the vector width of the function it is inlined into.
#define GFN_INLINE inline __attribute__((always_inline))

namespace {

// Four, eight and sixteen floats: each compiles to the widest registers of the function it
// ends up in.
typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));

template <class V>
GFN_INLINE V splat(float x) {
  return V{} + x;
}

template <class V>
GFN_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
GFN_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Whether the GFN_512 functions may run here.
inline bool has_avx512() {
#ifdef GFN_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

}  // namespace
