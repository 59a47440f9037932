// The divergence element terms (csrc/common/divergence_terms.h) with the CPU's transcendental functions:
// the branch-free polynomials of vec_math.h, which GCC vectorizes inside `omp simd` loops.
#pragma once

#include "cpu/vec_math.h"
#include "common/divergence_terms.h"

namespace fdiv_kernels {

// exp(x) - 1 without cancellation near 0, branch-free so `omp simd` loops stay vectorized: a
// Taylor polynomial for |x| < 1/2 (degree 9 in float, 16 in double: relative error below the
// type's epsilon), exp(x) - 1 beyond, where nothing cancels (<= 2.6 ulp) and +-inf / NaN pass.
template <class T>
FDIV_INLINE T vexpm1(T x) {
  constexpr int kDegree = sizeof(T) == 4 ? 9 : 16;
  T p = T(1);
#pragma GCC unroll 16
  for (int i = kDegree; i >= 2; --i) p = T(1) + x * p * (T(1) / T(i));  // folded constants
  const T small = x * p;
  const T big = vexp(x) - T(1);
  return (x < T(0.5) && x > T(-0.5)) ? small : big;
}

struct CpuMath {
  template <class T>
  FDIV_INLINE static T exp(T x) { return vexp(x); }
  template <class T>
  FDIV_INLINE static T log(T x) { return vlog(x); }
  template <class T>
  FDIV_INLINE static T log1p(T x) { return vlog1p(x); }
  template <class T>
  FDIV_INLINE static T expm1(T x) { return vexpm1(x); }
};

}  // namespace fdiv_kernels
