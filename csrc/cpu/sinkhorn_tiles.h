// The pieces of the CPU Sinkhorn kernels that the per-half-iteration LSE op (sinkhorn.cpp) and
// the whole-solve op (sinkhorn_solve.cpp) share: the register-blocked dot / L1 micro kernel that
// builds cost tiles from points, the cost finish per kind, the exact two-pass LSE of a block,
// dense row LSEs, and the padded point layout the micro kernel reads.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/ids.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace sinkhorn {

constexpr int kR = 8;          // rows of the register-blocked micro kernel
constexpr int kV = 2;          // 64-byte vectors per row of the micro kernel
constexpr int64_t kRB = 32;    // rows per work item (multiple of kR)
constexpr int64_t kJC = 512;   // columns per tile (multiple of the micro kernel's columns)
constexpr int64_t kColBlock = 64;  // output columns per work item of the transposed dense path
// d * n * m below this: the cost is built by ATen exactly as torch's (see sinkhorn_lse_cpu).
constexpr int64_t kTinyMacs = 400;

template <class T>
constexpr int64_t micro_cols() { return kV * int64_t(64 / sizeof(T)); }

// exp(x) for x <= 0 (or NaN) inside a sum that holds an exp(0) = 1 term: x is clamped at -87,
// where exp is below 2^-125, so an exp(-inf) adds at most 2^-125 to a sum >= 1, which rounds it
// away exactly; no overflow or denormal handling needed. NaN stays NaN. About 1 ulp, as vexp.
FDIV_INLINE float exp_le0(float x) {
  const ExpReduced e = exp_reduced(x < -87.0f ? -87.0f : x);
  // n in [-126, 0]: 2^n is a normal float.
  return e.y *
         std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(e.n) + 127) << 23);
}
FDIV_INLINE double exp_le0(double x) { return std::exp(x); }

// out[r][j] = sum_k x[r, k] y[k, j] (or sum_k |x[r, k] - y[k, j]| when L1) for kR rows and
// micro_cols<T>() columns; x row-major (stride d), yT (d, ldy).
template <bool L1, class T>
FDIV_INLINE void micro(const T* x, int64_t d, const T* yT, int64_t ldy, T* out, int64_t ldo) {
  typedef T vec __attribute__((vector_size(64)));
  constexpr int W = int(64 / sizeof(T));
  vec acc[kR][kV];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) acc[r][v] = vec{};
  for (int64_t k = 0; k < d; ++k) {
    vec yv[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) std::memcpy(&yv[v], yT + k * ldy + v * W, sizeof(vec));
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const T xr = x[r * d + k];
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        if constexpr (L1) {
          vec t = xr - yv[v];
          acc[r][v] += t < 0 ? -t : t;
        } else {
          acc[r][v] += xr * yv[v];
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) std::memcpy(out + r * ldo + v * W, &acc[r][v], sizeof(vec));
}

// Folds LSE_j(v_j) of v = h - c * ei (len entries) into acc; v is written to buf (may be c).
template <class T>
FDIV_INLINE void fold_block(const T* c, const T* h, T ei, int64_t len, OnlineSoftmax<T>& acc,
                            T* buf) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T bm = kNegInf;
#pragma omp simd reduction(max : bm)
  for (int64_t j = 0; j < len; ++j) {
    const T v = h[j] - c[j] * ei;
    buf[j] = v;
    bm = std::max(bm, v);
  }
  const T* vb = buf;
  const T m = acc.rebase(bm);
  if (m == kNegInf) {
    for (int64_t j = 0; j < len; ++j)
      if (vb[j] != vb[j]) acc.poison();
    return;
  }
  // m is this row's exact running max: the block's exps are <= 1 and the row's sum holds a 1.
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < len; ++j) s += exp_le0(vb[j] - m);
  acc.add(static_cast<double>(s));
}

// Cost from the dot (or L1) tile, in place: kind 0 sqeuclidean, 1 euclidean, 2 l1, 3 dot,
// 4 cosine (points normalized beforehand).
template <class T>
FDIV_INLINE void finish_cost(T* c, int64_t len, int64_t kind, T xx, const T* yy) {
  if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      T sq = xx + yy[j] - T(2) * c[j];
      sq = sq > T(0) ? sq : T(0);
      c[j] = kind == SQEUCLIDEAN ? sq : (sq > T(0) ? std::sqrt(sq) : T(0));
    }
  } else if (kind == DOT) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = -c[j];
  } else if (kind == COSINE) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = T(1) - c[j];
  }
}


// Dense rows: out[i] = LSE_j(h_j - c[i, j] ei) for `rows` rows of m entries, stride ldc.
// buf: kJC T.
template <class T>
FDIV_INLINE void dense_rows_item(const T* c, const T* h, T ei, int64_t m, int64_t ldc,
                                 int64_t rows, T* out, T* buf) {
  for (int64_t r = 0; r < rows; ++r) {
    OnlineSoftmax<T> acc;
    for (int64_t j0 = 0; j0 < m; j0 += kJC) {
      const int64_t len = std::min(kJC, m - j0);
      fold_block(c + r * ldc + j0, h + j0, ei, len, acc, buf);
    }
    out[r] = static_cast<T>(acc.lse());
  }
}


// Dense columns: out[j] = LSE_i(h_i - c[i, j] ei) for `cols` columns (<= kColBlock) of a
// (n, m) cost of row stride ldc, two passes over the column block (max, then sum of exps), rows
// in chunks whose
// float sums are folded into double.
template <class T>
FDIV_INLINE void dense_cols_item(const T* c, const T* h, T ei, int64_t n, int64_t ldc,
                                 int64_t cols, T* out) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // A NaN never wins the max (comparisons are false) and then poisons the sum of exps.
  alignas(64) T mx[kColBlock], s[kColBlock];
  double sd[kColBlock];
  for (int64_t j = 0; j < kColBlock; ++j) {
    mx[j] = kNegInf;
    sd[j] = 0.0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * ldc;
    const T hi = h[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) mx[j] = std::max(mx[j], hi - ci[j] * ei);
  }
  // An all -inf column (every point of zero weight) is -inf (NaN if it held a NaN); its
  // exp_le0(-inf) terms are not negligible there, there being no exp(0) term.
  bool empty[kColBlock];
  for (int64_t j = 0; j < cols; ++j) {
    empty[j] = mx[j] == kNegInf;
    mx[j] = empty[j] ? T(0) : mx[j];
  }
  constexpr int64_t kChunk = 1024;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    for (int64_t j = 0; j < kColBlock; ++j) s[j] = T(0);
    for (int64_t i = i0; i < i1; ++i) {
      const T* ci = c + i * ldc;
      const T hi = h[i];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) s[j] += exp_le0(hi - ci[j] * ei - mx[j]);
    }
    for (int64_t j = 0; j < cols; ++j) sd[j] += static_cast<double>(s[j]);
  }
  for (int64_t j = 0; j < cols; ++j)
    out[j] = empty[j] && sd[j] == sd[j]
                 ? kNegInf
                 : static_cast<T>(static_cast<double>(mx[j]) + std::log(sd[j]));
}

// transport._solver.pairwise_cost, op for op (same roundings).
inline at::Tensor pairwise_cost(const at::Tensor& x, const at::Tensor& y, int64_t kind) {
  if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) {
    const at::Tensor sq = ((x * x).sum(-1).unsqueeze(2) + (y * y).sum(-1).unsqueeze(1) -
                           2 * at::bmm(x, y.transpose(1, 2)))
                              .clamp_min(0);
    if (kind == SQEUCLIDEAN) return sq;
    return at::where(sq > 0, sq.clamp_min(1e-30).sqrt(), at::zeros_like(sq));
  }
  if (kind == L1) return at::cdist(x, y, 1);
  if (kind == DOT) return -at::bmm(x, y.transpose(1, 2));
  const at::Tensor xn = x / x.norm(2, {-1}, true).clamp_min(1e-12).expand_as(x);
  const at::Tensor yn = y / y.norm(2, {-1}, true).clamp_min(1e-12).expand_as(y);
  return 1 - at::bmm(xn, yn.transpose(1, 2));
}

// Points in the micro kernel's layout: x (B, np, d) with np a multiple of kRB, yT (B, d, mp)
// with mp a multiple of the micro kernel's columns (zero padded), squared norms xx (B, np) and
// yy (B, mp) for the Euclidean kinds, cosine points normalized. A: the accumulation type.
struct PaddedPoints {
  at::Tensor xp, yT, xx, yy;
  int64_t np, mp;
};

template <class A>
inline PaddedPoints pad_points(const at::Tensor& x, const at::Tensor& y, int64_t kind) {
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  const int64_t mc = micro_cols<float>();  // a multiple of micro_cols<A>()
  PaddedPoints p;
  p.np = (n + kRB - 1) / kRB * kRB;
  p.mp = std::max<int64_t>(mc, (m + mc - 1) / mc * mc);
  at::Tensor xs = x, ys = y;
  if (kind == COSINE) {
    xs = xs / xs.norm(2, {-1}, true).clamp_min(1e-12);
    ys = ys / ys.norm(2, {-1}, true).clamp_min(1e-12);
  }
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  p.xp = at::zeros({B, p.np, d}, aopt);
  p.xp.narrow(1, 0, n).copy_(xs);
  p.yT = at::zeros({B, d, p.mp}, aopt);
  p.yT.narrow(2, 0, m).copy_(ys.transpose(1, 2));
  p.xx = at::zeros({B, p.np}, x.options());
  p.yy = at::zeros({B, p.mp}, x.options());
  if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) {
    p.xx.narrow(1, 0, n).copy_((xs * xs).sum(-1));
    p.yy.narrow(1, 0, m).copy_((ys * ys).sum(-1));
  }
  return p;
}

}  // namespace sinkhorn
}  // namespace fdiv_kernels
