// Online log-sum-exp: one read of the row, block by block.
//
// Each block's exps are taken against the running max while the block's own max is found in the
// same loop; the running sum is rescaled whenever a block raises the max, and kept in double so
// a 128k-wide row loses nothing. Only a block that jumps far above the running max (or the first
// finite one) is redone against its own max.
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

  // Folds in the state of another stretch of the same row (any order).
  FDIV_INLINE void merge(const OnlineSoftmax& o) {
    rebase(o.m);
    // o empty (m = -inf, s = 0) adds nothing; exp(-inf - -inf) would be NaN. A poisoned o
    // (s = NaN) still poisons.
    if (o.s != 0.0) s += o.s * std::exp(static_cast<double>(o.m) - static_cast<double>(m));
  }
};

// OnlineSoftmax plus w = sum exp(x - m) (x - m), rescaled as the max moves: the entropy of
// softmax(x) is then log s - w / s, shifted by the running max so that it never subtracts two
// large numbers. (triton_kernels/online_softmax.py: online_update_weighted.)
template <class T>
struct OnlineEntropy {
  T m = -std::numeric_limits<T>::infinity();
  double s = 0.0, w = 0.0;

  // Raises the max to `new_max` if larger; returns the max elements are now shifted by.
  FDIV_INLINE T rebase(T new_max) {
    if (new_max > m) {
      const double d = static_cast<double>(m) - static_cast<double>(new_max);  // -inf if m = -inf
      const double c = std::exp(d);
      // exp(x - m') (x - m') = c exp(x - m) ((x - m) + d). Nothing accumulated yet: w stays 0.
      w = s == 0.0 ? w : c * (w + d * s);
      s *= c;
      m = new_max;
    }
    return m;
  }

  FDIV_INLINE void poison() { s = w = std::numeric_limits<double>::quiet_NaN(); }

  FDIV_INLINE void merge(const OnlineEntropy& o) {
    OnlineEntropy b = o;
    rebase(b.m);
    b.rebase(m);
    s += b.s;
    w += b.w;
  }

  FDIV_INLINE double lse() const { return static_cast<double>(m) + std::log(s); }
  // -sum q log q: NaN for an all -inf row (no distribution), any +inf or NaN.
  FDIV_INLINE double entropy() const { return std::log(s) - w / s; }
};

// Online log-sum-exp of scale * x[0:n] folded into acc, block by block; with KEEP also the exps
// (row_lse below). The running max may lag a block's max by up to the slack (s is kept in double),
// so almost every block is a single fused loop.
template <bool KEEP, class T>
FDIV_INLINE void lse_blocks(const T* x, T scale, int64_t n, OnlineSoftmax<T>& acc, T* e,
                            T* shift) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // A block may exceed the running max by this much and still be shifted by it: its exps stay
  // below e^64 and a block sum below 4096 e^64, far from overflow.
  constexpr T kSlack = T(64);
  for (int64_t j0 = 0, blk = 0; j0 < n; j0 += kBlock, ++blk) {
    const T* xb = x + j0;
    T* eb = nullptr;
    if constexpr (KEEP) eb = e + j0;
    const int64_t len = std::min(kBlock, n - j0);
    T m = acc.m, bm = kNegInf, bs = 0;
    if (m != kNegInf) {
      // Common case: one loop computes the exps against the running max and the block's max
      // together, so the row is read once and its load latency hides behind the exps.
#pragma omp simd reduction(max : bm) reduction(+ : bs)
      for (int64_t j = 0; j < len; ++j) {
        const T xj = xb[j] * scale;
        bm = std::max(bm, xj);
        const T ej = vexp(xj - m);
        if constexpr (KEEP) eb[j] = ej;
        bs += ej;
      }
      if (!(bm > m + kSlack)) {
        acc.add(static_cast<double>(bs));
        acc.rebase(bm);
        if constexpr (KEEP) shift[blk] = m;
        continue;
      }
    } else {
      // No finite max yet: find this block's first. NaN-ignoring max (NaN comparisons are
      // false); a NaN then shows up in the sum below.
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < len; ++j) bm = std::max(bm, xb[j] * scale);
    }
    // The block raised the max by more than the slack (or is the first with a finite value):
    // rebase on its max and redo its exps.
    m = acc.rebase(bm);
    if constexpr (KEEP) shift[blk] = m;
    if (m == kNegInf) {
      // Everything so far is -inf (or NaN): the probabilities are 0, only a NaN matters.
      for (int64_t j = 0; j < len; ++j) {
        if constexpr (KEEP) eb[j] = T(0);
        if (xb[j] != xb[j]) acc.poison();
      }
      continue;
    }
    bs = 0;
#pragma omp simd reduction(+ : bs)
    for (int64_t j = 0; j < len; ++j) {
      const T ej = vexp(xb[j] * scale - m);
      if constexpr (KEEP) eb[j] = ej;
      bs += ej;
    }
    acc.add(static_cast<double>(bs));
  }
}

// Online log-sum-exp of scale * x[0:n] folded into acc; as row_lse without keeping the exps.
template <class T>
FDIV_INLINE void online_lse(const T* x, T scale, int64_t n, OnlineSoftmax<T>& acc) {
  lse_blocks<false>(x, scale, n, acc, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
}

// Online (max, sum, weighted sum) of scale * x[0:n] folded into acc. Each block is shifted by
// the exact running max (block max first, from L1 on the second loop): the weighted sum must
// not be computed against a lagging max, or log s - w / s would cancel.
template <class T>
FDIV_INLINE void online_lse_entropy(const T* x, T scale, int64_t n, OnlineEntropy<T>& acc) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* xb = x + j0;
    const int64_t len = std::min(kBlock, n - j0);
    T bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < len; ++j) bm = std::max(bm, xb[j] * scale);
    const T m = acc.rebase(bm);
    if (m == kNegInf) {
      for (int64_t j = 0; j < len; ++j)
        if (xb[j] != xb[j]) acc.poison();
      continue;
    }
    T bs = 0, bw = 0;
#pragma omp simd reduction(+ : bs, bw)
    for (int64_t j = 0; j < len; ++j) {
      const T d = xb[j] * scale - m;
      const T e = vexp(d);
      bs += e;
      bw += e == T(0) ? T(0) : e * d;  // 0 log 0 = 0 (d = -inf)
    }
    acc.s += static_cast<double>(bs);
    acc.w += static_cast<double>(bw);
  }
}

// Online log-sum-exp of scale * x[0:n], as (max, log sum). scale * x is rounded to T first,
// exactly as the later passes form the same logits.
//
// The exps are kept: e[j] = exp(scale x[j] - shift[j / kBlock]), shift being the running max
// before the block was read (or the block's own max when that is much larger). Then softmax(x)[j]
// = e[j] * exp(shift - lse), one scalar exp per block, so the later passes get the probabilities
// for a multiply instead of an exp per element.
// The row's max m and log s, s = sum exp(x - m): log-probabilities are then formed as
// (x - m) - log s, exact up to rounding of the small terms for any |x|; x - lse would lose
// eps |lse| (1e-3 at |x/T| ~ 1e4, whole units at logits ~ 1e7).
template <class T>
struct MaxLogSum {
  T m;
  double log_s;
  T log_s_t;  // log_s rounded once, for the element loops
  double lse() const { return static_cast<double>(m) + log_s; }
};

template <class T>
FDIV_INLINE MaxLogSum<T> row_lse(const T* x, T scale, int64_t n, T* e, T* shift) {
  OnlineSoftmax<T> acc;
  lse_blocks<true>(x, scale, n, acc, e, shift);
  const double log_s = std::log(acc.s);
  return {acc.m, log_s, static_cast<T>(log_s)};
}

// Per-block factors turning row_lse's e into probabilities: exp((shift - m) - log s).
template <class T>
FDIV_INLINE void block_scales(const T* shift, int64_t blocks, const MaxLogSum<T>& r, T* scale) {
  for (int64_t k = 0; k < blocks; ++k)
    scale[k] = static_cast<T>(
        std::exp((static_cast<double>(shift[k]) - static_cast<double>(r.m)) - r.log_s));
}

}  // namespace fdiv_kernels
