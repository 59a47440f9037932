// The per-problem machinery of the CPU Sinkhorn ops that take one whole problem per task
// (sinkhorn_solve.cpp, sinkhorn_grads.cpp): a problem's cost rows, built once from its points in
// a per-thread scratch (never the batch's (B, n, m)) or read from a dense cost, and the parallel
// loop over problems.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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

// Calls fn(b, cost rows of problem b, their stride, the thread's scratch) for every problem, in
// parallel over problems. S: the caller's per-thread scratch, with a `tile` for the cost built
// from points and reserve(n, m, np, mp, points).
template <class T, class S, class Fn>
void for_each_problem(const CostSource& src, int64_t B, int64_t n, int64_t m, Fn fn) {
  const auto& pts = src.pts;
  const int64_t np = pts ? pts->np : n, mp = pts ? pts->mp : m, d = src.d;
  const T* c_ = src.dense ? src.dense->data_ptr<T>() : nullptr;
  const T* xp = pts ? pts->xp.data_ptr<T>() : nullptr;
  const T* yT = pts ? pts->yT.data_ptr<T>() : nullptr;
  const T* xx = pts ? pts->xx.data_ptr<T>() : nullptr;
  const T* yy = pts ? pts->yy.data_ptr<T>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    S w;
    w.reserve(n, m, np, mp, pts.has_value());
    for (int64_t b = begin; b < end; ++b) {
      if (pts)
        build_cost_entry(xp + b * np * d, yT + b * d * mp, xx + b * np, yy + b * mp, src.kind, d,
                         n, m, np, mp, w.tile.data());
      fn(b, c_ ? c_ + b * n * m : w.tile.data(), c_ ? m : mp, w);
    }
  });
}

}  // namespace
}  // namespace sinkhorn
}  // namespace fdiv_kernels
