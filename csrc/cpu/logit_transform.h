// The per-model logit transforms the row kernels fuse in (Gemma-2/3 final-logit softcapping,
// Cohere's logit scale): z = c tanh(x scale / c) with a softcap c > 0, else z = x scale; the
// temperature divides z afterwards. A -inf logit becomes the finite -c under a cap.
//
// The kernels transform a row into a per-thread buffer, run on it, and multiply the gradient row
// by dz/dx = scale (1 - (z / c)^2) before writing it out: O(V) per thread, no (N, V) buffer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/divergence_terms.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {

// tanh without cancellation near 0 and branch-free (vectorizes in `omp simd` loops):
// tanh|y| = -u / (2 + u), u = expm1(-2|y|) in [-1, 0]; +-inf give +-1, NaN passes.
template <class T>
FDIV_INLINE T vtanh(T y) {
  const T u = vexpm1(T(-2) * std::fabs(y));
  return std::copysign(-u / (T(2) + u), y);
}

// (scale, softcap) of one side; softcap 0 means none.
template <class T>
struct LogitTransform {
  T scale = T(1), softcap = T(0);
  bool identity() const { return scale == T(1) && softcap == T(0); }
};

// dst = z(src) (dst may be src).
template <class T>
FDIV_INLINE void transform_block(T* dst, const T* src, int64_t n, const LogitTransform<T>& x) {
  const T s = x.scale, c = x.softcap;
  if (c == T(0)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * s;
    return;
  }
  const T k = s / c;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = c * vtanh(src[j] * k);
}

// g *= dz/dx, from the transformed row z.
template <class T>
FDIV_INLINE void chain_block(T* g, const T* z, int64_t n, const LogitTransform<T>& x) {
  const T s = x.scale, c = x.softcap;
  if (c == T(0)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= s;
    return;
  }
  const T inv_c = T(1) / c;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T th = z[j] * inv_c;
    g[j] *= s * std::max(T(0), T(1) - th * th);  // z / c may round past 1
  }
}

}  // namespace fdiv_kernels
