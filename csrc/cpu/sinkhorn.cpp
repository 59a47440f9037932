// CPU batched log-domain Sinkhorn primitive: out[b, i] = LSE_j(h[b, j] - c(b, i, j) eps_inv[b]).
//
// The cost is either dense ((B, n, m), `transpose` reducing over its rows instead) or computed on
// the fly from points x (B, n, d), y (B, m, d): a per-thread tile of rows x columns at a time
// (a register-blocked dot / L1 kernel over y transposed), never the whole (B, n, m).
// Each row's LSE is exact two-pass per block (block max, then the sum of exps against the
// running max), folded into an OnlineSoftmax. -inf entries of h (zero-weight points) add exactly
// 0; an all -inf row gives -inf. Problems with active[b] == false are skipped (output -inf), as
// the triton kernel does. The statement of record is sinkhorn_core.lse_torch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

constexpr int kR = 8;          // rows of the register-blocked micro kernel
constexpr int kV = 2;          // 64-byte vectors per row of the micro kernel
constexpr int64_t kRB = 32;    // rows per work item (multiple of kR)
constexpr int64_t kJC = 512;   // columns per tile (multiple of the micro kernel's columns)
constexpr int64_t kColBlock = 64;
constexpr int64_t kTinyMacs = 400;  // d * n * m below this: the cost from ATen, as torch's  // output columns per work item of the transposed dense path

template <class T>
constexpr int64_t micro_cols() { return kV * int64_t(64 / sizeof(T)); }

// exp(x) for x <= 0 (or NaN) inside a sum that holds an exp(0) = 1 term: x is clamped at -87,
// where exp is below 2^-125, so an exp(-inf) adds at most 2^-125 to a sum >= 1, which rounds it
// away exactly; no overflow or denormal handling needed. NaN stays NaN. About 1 ulp, as vexp.
FDIV_INLINE float exp_le0(float x) {
  const ExpReduced e = exp_reduced(x < -87.0f ? -87.0f : x);
  // n in [-126, 0]: 2^n is a normal float.
  return e.y * bits_float(static_cast<uint32_t>(static_cast<int32_t>(e.n) + 127) << 23);
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
  if (kind == 0 || kind == 1) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      T sq = xx + yy[j] - T(2) * c[j];
      sq = sq > T(0) ? sq : T(0);
      c[j] = kind == 0 ? sq : (sq > T(0) ? std::sqrt(sq) : T(0));
    }
  } else if (kind == 3) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = -c[j];
  } else if (kind == 4) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = T(1) - c[j];
  }
}

// One work item of the point path: rows [i0, i0 + rows) of problem b (x padded to kRB rows,
// yT padded to mp columns). tile: (kRB + 1) * kJC A.
// A: the type the dots accumulate in (T; kept a parameter for a wider accumulator).
template <class T, class A>
FDIV_INLINE void points_item(const A* x, const A* yT, const T* xx, const T* yy, const T* h,
                             T ei, int64_t kind, int64_t d, int64_t m, int64_t mp, int64_t rows,
                             T* out, A* tile) {
  OnlineSoftmax<T> acc[kRB];
  const int64_t mc = micro_cols<A>();
  const int64_t rb = (rows + kR - 1) / kR * kR;
  for (int64_t j0 = 0; j0 < m; j0 += kJC) {
    const int64_t len = std::min(kJC, m - j0);
    const int64_t lenp = std::min(kJC, mp - j0);
    for (int64_t r0 = 0; r0 < rb; r0 += kR)
      for (int64_t jj = 0; jj < lenp; jj += mc) {
        if (kind == 2) micro<true>(x + r0 * d, d, yT + j0 + jj, mp, tile + r0 * kJC + jj, kJC);
        else micro<false>(x + r0 * d, d, yT + j0 + jj, mp, tile + r0 * kJC + jj, kJC);
      }
    for (int64_t r = 0; r < rows; ++r) {
      T* c;
      if constexpr (std::is_same_v<T, A>) {
        c = tile + r * kJC;
      } else {
        // Narrowed into the spare row after the tile (only ever accessed as T).
        c = reinterpret_cast<T*>(tile + kRB * kJC);
        const A* t = tile + r * kJC;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) c[j] = static_cast<T>(t[j]);
      }
      finish_cost(c, len, kind, xx[r], yy + j0);
      fold_block(c, h + j0, ei, len, acc[r], c);
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<T>(acc[r].lse());
}

// Dense rows: out[i] = LSE_j(h_j - c[i, j] ei) for `rows` rows of stride m. buf: kJC T.
template <class T>
FDIV_INLINE void dense_rows_item(const T* c, const T* h, T ei, int64_t m, int64_t rows, T* out,
                                 T* buf) {
  for (int64_t r = 0; r < rows; ++r) {
    OnlineSoftmax<T> acc;
    for (int64_t j0 = 0; j0 < m; j0 += kJC) {
      const int64_t len = std::min(kJC, m - j0);
      fold_block(c + r * m + j0, h + j0, ei, len, acc, buf);
    }
    out[r] = static_cast<T>(acc.lse());
  }
}

// Dense columns: out[j] = LSE_i(h_i - c[i, j] ei) for `cols` columns (<= kColBlock) of a
// (n, m) cost, two passes over the column block (max, then sum of exps), rows in chunks whose
// float sums are folded into double.
template <class T>
FDIV_INLINE void dense_cols_item(const T* c, const T* h, T ei, int64_t n, int64_t m, int64_t cols,
                                 T* out) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // A NaN never wins the max (comparisons are false) and then poisons the sum of exps.
  alignas(64) T mx[kColBlock], s[kColBlock];
  double sd[kColBlock];
  for (int64_t j = 0; j < kColBlock; ++j) {
    mx[j] = kNegInf;
    sd[j] = 0.0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * m;
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
      const T* ci = c + i * m;
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

// Per-ISA entry points (target_clones); everything above is inlined into them.
#define FDIV_POINTS_ENTRY(T, A, ATTR)                                                           \
  ATTR void points_entry(const A* x, const A* yT, const T* xx, const T* yy, const T* h, T ei,    \
                         int64_t kind, int64_t d, int64_t m, int64_t mp, int64_t rows, T* out,   \
                         A* tile) {                                                              \
    points_item<T, A>(x, yT, xx, yy, h, ei, kind, d, m, mp, rows, out, tile);                    \
  }
FDIV_POINTS_ENTRY(float, float, FDIV_CLONES)
FDIV_POINTS_ENTRY(double, double, FDIV_CLONES)
#undef FDIV_POINTS_ENTRY
#define FDIV_SINKHORN_ENTRY(T, ATTR)                                                             \
  ATTR void rows_entry(const T* c, const T* h, T ei, int64_t m, int64_t rows, T* out, T* buf) {  \
    dense_rows_item<T>(c, h, ei, m, rows, out, buf);                                             \
  }                                                                                              \
  ATTR void cols_entry(const T* c, const T* h, T ei, int64_t n, int64_t m, int64_t cols,         \
                       T* out) {                                                                 \
    dense_cols_item<T>(c, h, ei, n, m, cols, out);                                               \
  }
FDIV_SINKHORN_ENTRY(float, FDIV_CLONES)
FDIV_SINKHORN_ENTRY(double, FDIV_CLONES)
#undef FDIV_SINKHORN_ENTRY

template <class T, class A>
void run_points(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                const at::Tensor& ei, const bool* active, int64_t kind, at::Tensor& out) {
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  const int64_t mc = micro_cols<float>();  // a multiple of micro_cols<A>()
  const int64_t np = (n + kRB - 1) / kRB * kRB, mp = std::max<int64_t>(mc, (m + mc - 1) / mc * mc);
  at::Tensor xs = x, ys = y;
  if (kind == 4) {
    xs = xs / xs.norm(2, {-1}, true).clamp_min(1e-12);
    ys = ys / ys.norm(2, {-1}, true).clamp_min(1e-12);
  }
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor xp = at::zeros({B, np, d}, aopt);
  xp.narrow(1, 0, n).copy_(xs);
  at::Tensor yT = at::zeros({B, d, mp}, aopt);
  yT.narrow(2, 0, m).copy_(ys.transpose(1, 2));
  at::Tensor xx = at::zeros({B, np}, x.options()), yy = at::zeros({B, mp}, x.options());
  if (kind == 0 || kind == 1) {
    xx.narrow(1, 0, n).copy_((xs * xs).sum(-1));
    yy.narrow(1, 0, m).copy_((ys * ys).sum(-1));
  }
  const A* xp_ = xp.data_ptr<A>();
  const A* yT_ = yT.data_ptr<A>();
  const T* xx_ = xx.data_ptr<T>();
  const T* yy_ = yy.data_ptr<T>();
  const T* h_ = h.data_ptr<T>();
  const T* ei_ = ei.data_ptr<T>();
  T* o_ = out.data_ptr<T>();
  const int64_t blocks = np / kRB;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> tile(size_t(kRB * kJC + kJC));  // the tile and a spare row
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / blocks, i0 = (it % blocks) * kRB;
      const int64_t rows = std::min(kRB, n - i0);
      if (active && !active[b]) {
        std::fill(o_ + b * n + i0, o_ + b * n + i0 + rows, -std::numeric_limits<T>::infinity());
        continue;
      }
      points_entry(xp_ + (b * np + i0) * d, yT_ + b * d * mp, xx_ + b * np + i0, yy_ + b * mp,
                   h_ + b * m, ei_[b], kind, d, m, mp, rows, o_ + b * n + i0, tile.data());
    }
  });
}

template <class T>
void run_dense(const at::Tensor& c, const at::Tensor& h, const at::Tensor& ei, const bool* active,
               bool transpose, at::Tensor& out) {
  const int64_t B = c.size(0), n = c.size(1), m = c.size(2);
  const T* c_ = c.data_ptr<T>();
  const T* h_ = h.data_ptr<T>();
  const T* ei_ = ei.data_ptr<T>();
  T* o_ = out.data_ptr<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!transpose) {
    const int64_t per = 8, blocks = (n + per - 1) / per;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(static_cast<size_t>(kJC));
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / blocks, i0 = (it % blocks) * per, rows = std::min(per, n - i0);
        T* o = o_ + b * n + i0;
        if (active && !active[b]) {
          std::fill(o, o + rows, kNegInf);
          continue;
        }
        rows_entry(c_ + (b * n + i0) * m, h_ + b * m, ei_[b], m, rows, o, buf.data());
      }
    });
  } else {
    const int64_t blocks = (m + kColBlock - 1) / kColBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / blocks, j0 = (it % blocks) * kColBlock;
        const int64_t cols = std::min(kColBlock, m - j0);
        T* o = o_ + b * m + j0;
        if (active && !active[b]) {
          std::fill(o, o + cols, kNegInf);
          continue;
        }
        cols_entry(c_ + b * n * m + j0, h_ + b * n, ei_[b], n, m, cols, o);
      }
    });
  }
}

// sinkhorn_core.pairwise_cost, op for op (same roundings).
at::Tensor pairwise_cost(const at::Tensor& x, const at::Tensor& y, int64_t kind) {
  if (kind == 0 || kind == 1) {
    const at::Tensor sq = ((x * x).sum(-1).unsqueeze(2) + (y * y).sum(-1).unsqueeze(1) -
                           2 * at::bmm(x, y.transpose(1, 2)))
                              .clamp_min(0);
    if (kind == 0) return sq;
    return at::where(sq > 0, sq.clamp_min(1e-30).sqrt(), at::zeros_like(sq));
  }
  if (kind == 2) return at::cdist(x, y, 1);
  if (kind == 3) return -at::bmm(x, y.transpose(1, 2));
  const at::Tensor xn = x / x.norm(2, {-1}, true).clamp_min(1e-12).expand_as(x);
  const at::Tensor yn = y / y.norm(2, {-1}, true).clamp_min(1e-12).expand_as(y);
  return 1 - at::bmm(xn, yn.transpose(1, 2));
}

at::Tensor sinkhorn_lse_cpu(const std::optional<at::Tensor>& x_in,
                            const std::optional<at::Tensor>& y_in,
                            const std::optional<at::Tensor>& cost_in, const at::Tensor& h_in,
                            const at::Tensor& eps_inv_in, int64_t kind, bool transpose,
                            const std::optional<at::Tensor>& active_in) {
  TORCH_CHECK_VALUE(h_in.dim() == 2, "h must be (B, m), got ", h_in.sizes());
  const at::ScalarType ct = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor h = h_in.to(ct).contiguous();
  const int64_t B = h.size(0), mr = h.size(1);
  const at::Tensor ei = eps_inv_in.to(ct).contiguous();
  TORCH_CHECK_VALUE(ei.dim() == 1 && ei.size(0) == B, "eps_inv must be (B,), got ", ei.sizes());
  std::optional<at::Tensor> act;
  if (active_in) {
    act = active_in->to(at::kBool).contiguous();
    TORCH_CHECK_VALUE(act->numel() == B, "active must be (B,)");
  }
  const bool* active = act ? act->data_ptr<bool>() : nullptr;
  at::Tensor out;
  if (cost_in) {
    const at::Tensor c = cost_in->to(ct).contiguous();
    TORCH_CHECK_VALUE(c.dim() == 3 && c.size(0) == B, "cost must be (B, n, m)");
    const int64_t n = transpose ? c.size(2) : c.size(1);
    TORCH_CHECK_VALUE((transpose ? c.size(1) : c.size(2)) == mr, "cost and h do not match");
    out = at::empty({B, n}, h.options());
    if (out.numel() == 0) return out.to(h_in.scalar_type());
    if (mr == 0) return out.fill_(-std::numeric_limits<double>::infinity()).to(h_in.scalar_type());
    if (ct == at::kDouble) run_dense<double>(c, h, ei, active, transpose, out);
    else run_dense<float>(c, h, ei, active, transpose, out);
  } else {
    TORCH_CHECK_VALUE(x_in && y_in, "sinkhorn_lse_cpu needs points x, y or a cost");
    const at::Tensor x = x_in->to(ct).contiguous(), y = y_in->to(ct).contiguous();
    TORCH_CHECK_VALUE(x.dim() == 3 && y.dim() == 3 && x.size(0) == B && y.size(0) == B &&
                          x.size(2) == y.size(2) && y.size(1) == mr,
                      "x (B, n, d), y (B, m, d) and h (B, m) do not match");
    TORCH_CHECK_VALUE(kind >= 0 && kind <= 4, "unknown cost kind ", kind);
    const int64_t n = x.size(1);
    out = at::empty({B, n}, h.options());
    if (out.numel() == 0) return out.to(h_in.scalar_type());
    if (mr == 0) return out.fill_(-std::numeric_limits<double>::infinity()).to(h_in.scalar_type());
    // Tiny problems (torch's bmm takes its naive, unfused kernel below 400 multiply-adds per
    // matrix): the cost is built exactly as sinkhorn_core.pairwise_cost builds it, then reduced
    // as a dense one. A plan rebuilt from the potentials with torch's cost at eps << cost is off
    // by exp(ulp(cost) / eps) otherwise. Above that, the FMA micro kernel accumulates over d in
    // the order BLAS does for these shapes.
    if (x.size(2) * n * mr < kTinyMacs) {
      at::Tensor c = pairwise_cost(x, y, kind).contiguous();
      if (ct == at::kDouble) run_dense<double>(c, h, ei, active, false, out);
      else run_dense<float>(c, h, ei, active, false, out);
    } else if (ct == at::kDouble) {
      run_points<double, double>(x, y, h, ei, active, kind, out);
    } else {
      run_points<float, float>(x, y, h, ei, active, kind, out);
    }
  }
  return out.scalar_type() == h_in.scalar_type() ? out : out.to(h_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("sinkhorn_lse_cpu", &sinkhorn_lse_cpu); }

}  // namespace fdiv_kernels
