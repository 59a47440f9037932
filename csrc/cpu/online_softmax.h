// Online log-sum-exp: one read of the row, block by block.
//
// Each block is small enough to stay in L1, so its max and its exp-sum are two cheap vector
// loops over cached data while the row itself streams from memory once. The running sum is
// rescaled whenever a block raises the max, and kept in double so a 128k-wide row loses nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vec_math.h"

namespace fdiv_kernels {

// Elements per block in every row loop: 16 KiB of float, well inside L1 for two rows.
constexpr int64_t kBlock = 4096;

// Running (max m, sum s of exp(x - m)). Starts at the empty row: m = -inf, s = 0, lse = -inf.
template <class T>
struct OnlineSoftmax {
  T m = -std::numeric_limits<T>::infinity();
  double s = 0.0;

  // Raises the max to cover a block whose max is `block_max` and returns the max the block's
  // elements must be shifted by. An all -inf prefix leaves m = -inf, and the caller must then
  // skip the block sum: exp(-inf - (-inf)) would be NaN.
  FDIV_INLINE T rebase(T block_max) {
    if (block_max > m) {
      s *= std::exp(static_cast<double>(m) - static_cast<double>(block_max));  // m = -inf: s = 0
      m = block_max;
    }
    return m;
  }

  FDIV_INLINE void add(double block_sum) { s += block_sum; }

  // A NaN poisons the result for good (NaN in, NaN out).
  FDIV_INLINE void poison() { s = std::numeric_limits<double>::quiet_NaN(); }

  // m + log(s): -inf for an all -inf row, NaN if any element was NaN or +inf.
  FDIV_INLINE double lse() const { return static_cast<double>(m) + std::log(s); }
};

// log-sum-exp of scale * x[0:n], rounded to T. scale * x is rounded to T first, exactly as the
// later passes form the same logits.
template <class T>
FDIV_INLINE T row_lse(const T* x, T scale, int64_t n) {
  OnlineSoftmax<T> acc;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* xb = x + j0;
    const int64_t len = std::min(kBlock, n - j0);
    // NaN-ignoring max (NaN comparisons are false); a NaN then shows up in the sum below.
    T bm = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < len; ++j) bm = std::max(bm, xb[j] * scale);
    const T m = acc.rebase(bm);
    if (m == -std::numeric_limits<T>::infinity()) {
      // Everything so far is -inf (or NaN): only a NaN can change the result.
      for (int64_t j = 0; j < len; ++j)
        if (xb[j] != xb[j]) acc.poison();
      continue;
    }
    T bs = 0;
#pragma omp simd reduction(+ : bs)
    for (int64_t j = 0; j < len; ++j) bs += vexp(xb[j] * scale - m);
    acc.add(static_cast<double>(bs));
  }
  return static_cast<T>(acc.lse());
}

}  // namespace fdiv_kernels
