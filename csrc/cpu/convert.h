// Widening 16-bit rows to float and rounding float back, once per element: the float kernels
// then serve every storage dtype. Shared by the divergence and softmax-statistics kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/vec_math.h"

namespace fdiv_kernels {

FDIV_INLINE void widen_block(float* dst, const at::BFloat16* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
FDIV_INLINE void widen_block(float* dst, const at::Half* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
FDIV_INLINE void narrow_block(at::BFloat16* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<at::BFloat16>(src[j]);
}
FDIV_INLINE void narrow_block(at::Half* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<at::Half>(src[j]);
}

}  // namespace fdiv_kernels
