// From the logits' storage dtype to the compute type and back: the one dtype dispatch of the CPU
// softmax kernels, and the one loop that brings a block of logits into the compute type with its
// logit transform applied (16-bit rows widened to float, once per element, so the float kernels
// serve every storage dtype; float64 computes in double).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu/logit_transform.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {

// f.operator()<scalar_t, T>() for logits of dtype dt (float32, float64, bfloat16 or float16,
// checked on entry), f a lambda `[&]<class scalar_t, class T>() {...}`: scalar_t the storage
// type, T the compute type (at::opmath_type: double for float64, float for the others).
template <class F>
void dispatch_logits(at::ScalarType dt, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "fdiv_kernels CPU kernel", [&] {
    f.template operator()<scalar_t, at::opmath_type<scalar_t>>();
  });
}

// 16-bit storage to float (exact) and back (rounded to nearest even), once per element.
template <class S>
FDIV_INLINE void widen_block(float* dst, const S* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
template <class S>
FDIV_INLINE void narrow_block(S* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<S>(src[j]);
}

// post z(src[0, n)) in the compute type T (z: the logit transform xf, logit_transform.h; post
// folds a 1 / T in). Returns src itself when there is nothing to do (storage in T, the identity,
// post 1), else buf (n T), into which 16-bit values are widened and then transformed in place.
template <class scalar_t, class T>
FDIV_INLINE const T* load_block(T* buf, const scalar_t* src, int64_t n,
                                const LogitTransform<T>& xf, T post = T(1)) {
  const bool transform = !xf.identity() || post != T(1);
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (!transform) return src;
    transform_block(buf, src, n, xf, post);
  } else {
    widen_block(buf, src, n);
    if (transform) transform_block(buf, buf, n, xf, post);
  }
  return buf;
}

// load_block and narrow_block as per-ISA clones (convert.cpp), for callers outside a cloned
// kernel: a row or block at a time, so the call costs nothing beside the loop it runs.
const float* load_row(float* buf, const float* src, int64_t n, const LogitTransform<float>& xf);
const float* load_row(float* buf, const at::BFloat16* src, int64_t n,
                      const LogitTransform<float>& xf);
const float* load_row(float* buf, const at::Half* src, int64_t n, const LogitTransform<float>& xf);
const double* load_row(double* buf, const double* src, int64_t n,
                       const LogitTransform<double>& xf);
void narrow_row(at::BFloat16* dst, const float* src, int64_t n);
void narrow_row(at::Half* dst, const float* src, int64_t n);

}  // namespace fdiv_kernels
