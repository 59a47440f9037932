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

// z(x) of one logit; the block form below computes the same expression.
template <class T>
FDIV_INLINE T transform_one(T x, const LogitTransform<T>& t) {
  return t.softcap == T(0) ? x * t.scale : t.softcap * vtanh(x * (t.scale / t.softcap));
}

// dz/dx / scale = 1 - (z / c)^2 from the capped value z (inv_c = 1 / c); clamped at 0 because
// z / c may round past 1.
template <class T>
FDIV_INLINE T softcap_slope(T z, T inv_c) {
  const T th = z * inv_c;
  return std::max(T(0), T(1) - th * th);
}

// dst = post z(src) (dst may be src); post lets a caller fold 1 / T into the same pass.
template <class T>
FDIV_INLINE void transform_block(T* dst, const T* src, int64_t n, const LogitTransform<T>& x,
                                 T post = T(1)) {
  const T s = x.scale, c = x.softcap;
  if (c == T(0)) {
    const T f = s * post;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * f;
    return;
  }
  const T k = s / c, cp = c * post;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = cp * vtanh(src[j] * k);
}

// g *= post dz/dx, from the transformed row y = post z (as transform_block writes it).
template <class T>
FDIV_INLINE void chain_block(T* g, const T* y, int64_t n, const LogitTransform<T>& x,
                             T post = T(1)) {
  const T f = x.scale * post, c = x.softcap;
  if (c == T(0)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= f;
    return;
  }
  const T inv_c = T(1) / (c * post);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] *= f * softcap_slope(y[j], inv_c);
}

}  // namespace fdiv_kernels
