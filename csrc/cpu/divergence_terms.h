// The divergence element terms (csrc/common/divergence_terms.h) with the CPU's transcendental functions:
// the branch-free polynomials of vec_math.h, which GCC vectorizes inside `omp simd` loops.
#pragma once

#include "cpu/vec_math.h"
#include "common/divergence_terms.h"

namespace fdiv_kernels {

struct CpuMath {
  template <class T>
  FDIV_INLINE static T exp(T x) { return vexp(x); }
  template <class T>
  FDIV_INLINE static T log(T x) { return vlog(x); }
  template <class T>
  FDIV_INLINE static T log1p(T x) { return vlog1p(x); }
};

}  // namespace fdiv_kernels
