// The per-problem machinery of the CPU Sinkhorn ops that take one problem per task
// (sinkhorn_solve.cpp, sinkhorn_grads.cpp, sinkhorn_unrolled.cpp): a problem's cost rows, built
// from its points in a per-thread scratch (never the batch's (B, n, m)) or read from a dense
// cost, the parallel loops over problems (whole, or a row block at a time for the plan ops),
// the dual's marginal terms and the point gradients from a cost gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace sinkhorn {
namespace {  // internal linkage: every including file gets its own target_clones copies

// A lambda is a function of its own: without this it is compiled for the baseline ISA, not for
// the target_clones clone it is called from (measured: 5x slower).
#define FDIV_INLINE_LAMBDA __attribute__((always_inline))

// The cost rows of one problem from its padded points, into tile (np, mp): micro kernel tiles,
// then the per-kind finish on the m real columns of the n real rows.
template <class T>
FDIV_INLINE void build_cost(const T* xp, const T* yT, const T* xx, const T* yy, int64_t kind,
                            int64_t d, int64_t n, int64_t m, int64_t np, int64_t mp, T* tile) {
  const int64_t mc = micro_cols<T>();
  for (int64_t r0 = 0; r0 < np; r0 += kR)
    for (int64_t j0 = 0; j0 < mp; j0 += mc) {
      if (kind == L1) micro<true>(xp + r0 * d, d, yT + j0, mp, tile + r0 * mp + j0, mp);
      else micro<false>(xp + r0 * d, d, yT + j0, mp, tile + r0 * mp + j0, mp);
    }
  for (int64_t i = 0; i < n; ++i) finish_cost(tile + i * mp, m, kind, xx[i], yy);
}

FDIV_CLONES void build_cost_entry(const float* xp, const float* yT, const float* xx,
                                  const float* yy, int64_t kind, int64_t d, int64_t n, int64_t m,
                                  int64_t np, int64_t mp, float* tile) {
  build_cost<float>(xp, yT, xx, yy, kind, d, n, m, np, mp, tile);
}
FDIV_CLONES void build_cost_entry(const double* xp, const double* yT, const double* xx,
                                  const double* yy, int64_t kind, int64_t d, int64_t n, int64_t m,
                                  int64_t np, int64_t mp, double* tile) {
  build_cost<double>(xp, yT, xx, yy, kind, d, n, m, np, mp, tile);
}

// The cost of a batch, one problem at a time: a dense (B, n, m) tensor, or padded points whose
// cost is built per problem in the thread's scratch.
struct CostSource {
  std::optional<at::Tensor> dense;
  std::optional<PaddedPoints> pts;
  int64_t kind = 0, d = 0;
};

// Validates and converts: a dense cost, or points (the cost from ATen for tiny problems, as
// sinkhorn_lse_cpu does, so the plans match torch's).
CostSource cost_source(const std::optional<at::Tensor>& x_in, const std::optional<at::Tensor>& y_in,
                       const std::optional<at::Tensor>& cost_in, at::ScalarType ct, int64_t B,
                       int64_t n, int64_t m, int64_t kind) {
  CostSource src;
  src.kind = kind;
  if (cost_in) {
    src.dense = cost_in->to(ct).contiguous();
    TORCH_CHECK_VALUE(src.dense->dim() == 3 && src.dense->size(0) == B &&
                          src.dense->size(1) == n && src.dense->size(2) == m,
                      "cost must be (B, n, m) matching the weights");
    return src;
  }
  TORCH_CHECK_VALUE(x_in && y_in, "needs points x, y or a cost");
  const at::Tensor x = x_in->to(ct).contiguous(), y = y_in->to(ct).contiguous();
  TORCH_CHECK_VALUE(x.dim() == 3 && y.dim() == 3 && x.size(0) == B && y.size(0) == B &&
                        x.size(1) == n && y.size(1) == m && x.size(2) == y.size(2),
                    "x (B, n, d), y (B, m, d) and the weights do not match");
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumCosts, "unknown cost kind ", kind);
  src.d = x.size(2);
  if (src.d * n * m < kTinyMacs) src.dense = pairwise_cost(x, y, kind).contiguous();
  else if (ct == at::kDouble) src.pts = pad_points<double>(x, y, kind);
  else src.pts = pad_points<float>(x, y, kind);
  return src;
}

// The weights and potentials every plan op takes, checked and in the compute type (float64 for
// float64 potentials, else float32).
struct PlanArgs {
  at::ScalarType ct;
  at::Tensor a, b, f, g;
  int64_t B, n, m;
};

inline PlanArgs plan_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& f,
                          const at::Tensor& g, double eps) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && f.sizes() == a.sizes() &&
                        g.sizes() == b.sizes() && a.size(0) == b.size(0),
                    "a, f (B, n) and b, g (B, m) do not match");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0");
  PlanArgs p;
  p.ct = f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.a = a.to(p.ct).contiguous();
  p.b = b.to(p.ct).contiguous();
  p.f = f.to(p.ct).contiguous();
  p.g = g.to(p.ct).contiguous();
  p.B = p.a.size(0);
  p.n = p.a.size(1);
  p.m = p.b.size(1);
  return p;
}

// Runs body(begin, end) over problems [0, B), in parallel; one problem on the calling thread (an
// OpenMP region costs microseconds, a small unrolled forward tens of them).
template <class F>
void run_problems(int64_t B, const F& body) {
  if (B <= 1) body(int64_t(0), B);
  else at::parallel_for(0, B, 1, body);
}

// Calls fn(b, cost rows of problem b, their stride, the thread's scratch) for every problem, in
// parallel over problems. S: the caller's per-thread scratch, with a `tile` for the cost built
// from points and reserve(n, m, tile rows, mp, points).
// The raw pointers of a cost source (null where absent) and its padded sizes.
template <class T>
struct CostPtrs {
  const T *c, *xp, *yT, *xx, *yy;
  int64_t np, mp, d;
  bool points;
  CostPtrs(const CostSource& src, int64_t n, int64_t m) {
    const auto& pts = src.pts;
    points = pts.has_value();
    np = points ? pts->np : n, mp = points ? pts->mp : m, d = src.d;
    c = src.dense ? src.dense->data_ptr<T>() : nullptr;
    xp = points ? pts->xp.data_ptr<T>() : nullptr;
    yT = points ? pts->yT.data_ptr<T>() : nullptr;
    xx = points ? pts->xx.data_ptr<T>() : nullptr;
    yy = points ? pts->yy.data_ptr<T>() : nullptr;
  }
};

template <class T, class S, class Fn>
void for_each_problem(const CostSource& src, int64_t B, int64_t n, int64_t m, Fn fn) {
  const CostPtrs<T> p(src, n, m);
  const int64_t np = p.np, mp = p.mp, d = p.d;
  run_problems(B, [&](int64_t begin, int64_t end) {
    S w;
    w.reserve(n, m, np, mp, p.points);
    for (int64_t b = begin; b < end; ++b) {
      if (p.points)
        build_cost_entry(p.xp + b * np * d, p.yT + b * d * mp, p.xx + b * np, p.yy + b * mp,
                         src.kind, d, n, m, np, mp, w.tile.data());
      fn(b, p.c ? p.c + b * n * m : w.tile.data(), p.c ? m : mp, w);
    }
  });
}

// Cost entries of one row block of the plan ops (totals, gradients, plan products): a problem up
// to this size is one block, so its results do not depend on the blocking; a larger one is
// streamed a block at a time (4 MiB of fp32), never held whole.
constexpr int64_t kPlanBlockElems = int64_t(1) << 20;

inline int64_t plan_block_rows(int64_t rows, int64_t cols) {
  if (rows * cols <= kPlanBlockElems) return rows;
  return std::max<int64_t>(kRB, kPlanBlockElems / cols / kRB * kRB);
}

// Calls fn(b, r0, rows, cost rows [r0, r0 + rows) of problem b, their stride, scratch) for every
// problem and row block in order, in parallel over problems. S: as for for_each_problem, its
// tile reserved for one block of rows.
template <class T, class S, class Fn>
void for_each_row_block(const CostSource& src, int64_t B, int64_t n, int64_t m, Fn fn) {
  const CostPtrs<T> p(src, n, m);
  const int64_t np = p.np, mp = p.mp, d = p.d;
  const int64_t rb = plan_block_rows(np, mp);  // np, rb: multiples of kRB with points
  run_problems(B, [&](int64_t begin, int64_t end) {
    S w;
    w.reserve(n, m, rb, mp, p.points);
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r0 = 0; r0 < n; r0 += rb) {
        const int64_t rows = std::min(rb, n - r0);
        if (p.points) {
          build_cost_entry(p.xp + (b * np + r0) * d, p.yT + b * d * mp, p.xx + b * np + r0,
                           p.yy + b * mp, src.kind, d, rows, m, std::min(rb, np - r0), mp,
                           w.tile.data());
          fn(b, r0, rows, w.tile.data(), mp, w);
        } else {
          fn(b, r0, rows, p.c + (b * n + r0) * m, m, w);
        }
      }
  });
}

// The dual's marginal terms: phi(f) = f (balanced, rho <= 0) or -rho (exp(-f / rho) - 1).
template <class T>
FDIV_INLINE T phi(T f, double rho) { return rho <= 0 ? f : T(-rho) * std::expm1(-f / T(rho)); }
template <class T>
FDIV_INLINE T dphi(T f, double rho) { return rho <= 0 ? T(1) : std::exp(-f / T(rho)); }

// Point gradients of one problem from the gradient Q of its cost, given a row block at a time:
// dx_i = sum_j Q_ij dc(x_i, y_j)/dx_i (rows of a block are complete), dy_j = sum_i Q_ij
// dc(x_i, y_j)/dy_j (accumulated over blocks, written by finish). Two small GEMMs per block for
// every kind but L1. Q holds Q / (2 c) for kind 1 (euclidean; 0 where c = 0, torch's
// subgradient): its gradient then has the squared Euclidean form. x (n, d), y (m, d) as given
// (cosine: unnormalized; the gradient goes through x / max(|x|, 1e-12), as F.normalize).
template <class T>
struct PointGrads {
  at::Tensor x, y, xh, yh;  // xh, yh: the points the cost reads (normalized for cosine)
  at::Tensor acc, col;      // sum over blocks of Q^T xh (L1: of -sign terms) (m, d), Q^T 1 (m)
  int64_t kind;
  bool first = true;

  PointGrads(const at::Tensor& x_, const at::Tensor& y_, int64_t kind_)
      : x(x_), y(y_), xh(x_), yh(y_), kind(kind_) {
    if (kind == COSINE) {
      xh = x / x.norm(2, {1}, true).clamp_min(1e-12);
      yh = y / y.norm(2, {1}, true).clamp_min(1e-12);
    }
  }

  static at::Tensor normalize_back(const at::Tensor& p, const at::Tensor& gh) {
    const at::Tensor nrm = p.norm(2, {1}, true);
    const at::Tensor den = nrm.clamp_min(1e-12);
    const at::Tensor ph = p / den;
    // Where |p| > 1e-12: (gh - ph (ph . gh)) / |p|; else the clamp is constant: gh / 1e-12.
    return at::where(nrm > 1e-12, (gh - ph * (ph * gh).sum(1, true)) / den, gh / den);
  }

  // Q: rows [r0, r0 + rows) (row stride m); gx (n, d) or undefined; want_y: accumulate dy.
  void add_rows(const T* q, int64_t r0, int64_t rows, const at::Tensor& gx, bool want_y) {
    const int64_t m = y.size(0), d = x.size(1);
    const at::Tensor Q = at::from_blob(const_cast<T*>(q), {rows, m}, x.options());
    const at::Tensor xr = x.narrow(0, r0, rows);
    at::Tensor gxr = gx.defined() ? gx.narrow(0, r0, rows) : at::Tensor();
    if (kind == L1) {  // L1: sign(x_ik - y_jk), no GEMM form
      if (want_y && first) acc = at::zeros({m, d}, x.options());
      const T *x_ = xr.data_ptr<T>(), *y_ = y.data_ptr<T>();
      T* gx_ = gxr.defined() ? gxr.data_ptr<T>() : nullptr;
      T* gy_ = want_y ? acc.data_ptr<T>() : nullptr;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t k = 0; k < d; ++k) {
          const T xik = x_[i * d + k];
          T s_acc = 0;
          for (int64_t j = 0; j < m; ++j) {
            const T diff = xik - y_[j * d + k];
            const T s = diff > T(0) ? q[i * m + j] : (diff < T(0) ? -q[i * m + j] : T(0));
            s_acc += s;
            if (gy_) gy_[j * d + k] -= s;
          }
          if (gx_) gx_[i * d + k] = s_acc;
        }
      }
    } else {
      if (gxr.defined()) {
        if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) gxr.copy_(2 * (Q.sum(1, true) * xr - at::mm(Q, y)));
        else if (kind == DOT) gxr.copy_(-at::mm(Q, y));
        else gxr.copy_(normalize_back(xr, -at::mm(Q, yh)));
      }
      if (want_y) {
        at::Tensor t = at::mm(Q.t(), kind == COSINE ? xh.narrow(0, r0, rows) : xr);
        acc = first ? t : acc.add_(t);
        if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) col = first ? Q.sum(0) : col.add_(Q.sum(0));
      }
    }
    first = false;
  }

  void finish(const at::Tensor& gy) {
    if (!gy.defined()) return;
    if (kind == L1) gy.copy_(acc);
    else if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) gy.copy_(2 * (col.unsqueeze(1) * y - acc));
    else if (kind == DOT) gy.copy_(-acc);
    else gy.copy_(normalize_back(y, -acc));
  }
};

}  // namespace
}  // namespace sinkhorn
}  // namespace fdiv_kernels
