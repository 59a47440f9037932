// Gradients of the Sinkhorn value at fixed potentials (envelope, plus the implicit correction
// when lam is given), one problem per task; the statement of record is transport._solver.dual_grads.
//
// With E_ij = exp((f_i + g_j - C_ij) / eps), P_ij = a_i b_j E_ij, w_ij = gv + lam_f_i + lam_g_j:
//   dC_ij = w_ij P_ij                                                      (=: Q_ij)
//   da_i  = gv (phi_a(f_i) + eps sum b) + eps lam_f_i phi_a'(f_i) - eps sum_j w_ij b_j E_ij
//   db_j  = gv (phi_b(g_j) + eps sum a) + eps lam_g_j phi_b'(g_j) - eps sum_i w_ij a_i E_ij
//   dx_i  = sum_j Q_ij dc(x_i, y_j)/dx_i,  dy_j = sum_i Q_ij dc(x_i, y_j)/dy_j,
// the point gradients through two small GEMMs per row block (Q y and Q^T x) for every kind but L1.
// Q lives in a per-thread scratch of one row block (sinkhorn_problem.h for_each_row_block): the
// plan is applied a block at a time, never stored, and a problem's cost never held whole.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/sinkhorn_problem.h"
#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

using namespace sinkhorn;  // NOLINT: the shared per-problem machinery

template <class T>
struct GradScratch {
  std::vector<T> tile, q, colw, wg;
  void reserve(int64_t n, int64_t m, int64_t rows, int64_t mp, bool points) {
    if (points) tile.resize(size_t(rows * mp));
    q.resize(size_t(std::min(rows, n) * m));
    colw.resize(size_t(m));
    wg.resize(size_t(m));
  }
};

// The plan pass over n rows of one problem (a row block): Q (n, m) into q, sum_j w_ij b_j E_ij
// into roww (n); adds sum_i w_ij a_i E_ij to colw (m); wg (m): gv + lam_g, set per problem.
// kind 1 (euclidean) stores Q_ij / (2 c_ij) (0 where c_ij = 0, as torch's subgradient): its
// point gradient then has the squared Euclidean form.
template <class T>
FDIV_INLINE void plan_pass(const T* c, int64_t ldc, const T* a, const T* b, const T* f, const T* g,
                           T gv, const T* lf, const T* lg, T eps, int64_t n, int64_t m,
                           int64_t kind, T* q, T* roww, T* colw, T* wg) {
  const T ei = T(1) / eps;
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * ldc;
    T* qi = q + i * m;
    const T ai = a[i], fi = f[i], lfi = lf ? lf[i] : T(0);
    T rw = 0;
#pragma omp simd reduction(+ : rw)
    for (int64_t j = 0; j < m; ++j) {
      const T e = vexp((fi + g[j] - ci[j]) * ei);
      const T w = lfi + wg[j];
      const T wb = w * b[j] * e;
      rw += wb;
      colw[j] += w * ai * e;
      qi[j] = ai * wb;
    }
    roww[i] = rw;
    if (kind == EUCLIDEAN) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) qi[j] = ci[j] > T(0) ? qi[j] / (T(2) * ci[j]) : T(0);
    }
  }
}

// (P vg, P^T vf, P 1, P^T 1) of n rows of one problem (a row block): the products the implicit
// gradient's conjugate gradient needs, one pass over the plan; ptv and c1 accumulate over blocks.
template <class T>
FDIV_INLINE void apply_pass(const T* c, int64_t ldc, const T* a, const T* b, const T* f,
                            const T* g, const T* vf, const T* vg, T eps, int64_t n, int64_t m,
                            T* pv, T* ptv, T* r1, T* c1) {
  const T ei = T(1) / eps;
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * ldc;
    const T ai = a[i], fi = f[i], vfi = vf[i];
    T s = 0, sv = 0;
#pragma omp simd reduction(+ : s, sv)
    for (int64_t j = 0; j < m; ++j) {
      const T pij = ai * b[j] * vexp((fi + g[j] - ci[j]) * ei);
      s += pij;
      sv += pij * vg[j];
      c1[j] += pij;
      ptv[j] += pij * vfi;
    }
    r1[i] = s;
    pv[i] = sv;
  }
}

#define FDIV_GRADS_ENTRY(T)                                                                      \
  FDIV_CLONES void plan_entry(const T* c, int64_t ldc, const T* a, const T* b, const T* f,       \
                              const T* g, T gv, const T* lf, const T* lg, T eps, int64_t n,      \
                              int64_t m, int64_t kind, T* q, T* roww, T* colw, T* wg) {          \
    plan_pass<T>(c, ldc, a, b, f, g, gv, lf, lg, eps, n, m, kind, q, roww, colw, wg);           \
  }                                                                                              \
  FDIV_CLONES void apply_entry(const T* c, int64_t ldc, const T* a, const T* b, const T* f,      \
                               const T* g, const T* vf, const T* vg, T eps, int64_t n,           \
                               int64_t m, T* pv, T* ptv, T* r1, T* c1) {                         \
    apply_pass<T>(c, ldc, a, b, f, g, vf, vg, eps, n, m, pv, ptv, r1, c1);                       \
  }
FDIV_GRADS_ENTRY(float)
FDIV_GRADS_ENTRY(double)
#undef FDIV_GRADS_ENTRY

// da (or db, with the roles swapped) of one problem; roww: sum_j w_ij b_j E_ij.
template <class T>
void weight_grad(const T* f, const T* lf, const T* roww, T gv, T eps, T other_mass, double rho,
                 int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = gv * (phi(f[i], rho) + eps * other_mass) + (lf ? eps * lf[i] * dphi(f[i], rho) : T(0))
             - eps * roww[i];
}

at::Tensor opt_ct(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  return t ? t->to(ct).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_grads_cpu(
    const std::optional<at::Tensor>& x_in, const std::optional<at::Tensor>& y_in,
    const std::optional<at::Tensor>& cost_in, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& f_in, const at::Tensor& g_in, const at::Tensor& gv_in,
    const std::optional<at::Tensor>& lam_f, const std::optional<at::Tensor>& lam_g, double eps,
    int64_t kind, double rho_a, double rho_b, std::array<bool, 5> need) {
  const PlanArgs pa = plan_args(a_in, b_in, f_in, g_in, eps);
  const at::ScalarType ct = pa.ct;
  const at::Tensor &a = pa.a, &b = pa.b, &f = pa.f, &g = pa.g;
  const int64_t B = pa.B, n = pa.n, m = pa.m;
  const at::Tensor gv = gv_in.to(ct).contiguous();
  TORCH_CHECK_VALUE(gv.numel() == B, "g_value must be (B,)");
  const at::Tensor lf = opt_ct(lam_f, ct), lg = opt_ct(lam_g, ct);
  TORCH_CHECK_VALUE(!lf.defined() || lf.sizes() == f.sizes(), "lam_f must match f");
  TORCH_CHECK_VALUE(!lg.defined() || lg.sizes() == g.sizes(), "lam_g must match g");
  const bool points = !cost_in.has_value();
  const at::Tensor xs = points ? opt_ct(x_in, ct) : at::Tensor();
  const at::Tensor ys = points ? opt_ct(y_in, ct) : at::Tensor();
  // Gradients not asked for are empty (each its own tensor: outputs must not alias).
  auto none = [&] { return a.new_empty({0}); };
  at::Tensor gx = need[0] && points ? at::empty_like(xs) : none();
  at::Tensor gy = need[1] && points ? at::empty_like(ys) : none();
  at::Tensor gc = need[2] && !points ? at::empty({B, n, m}, a.options()) : none();
  at::Tensor ga = need[3] ? at::empty({B, n}, a.options()) : none();
  at::Tensor gb = need[4] ? at::empty({B, m}, a.options()) : none();
  if (B == 0 || n == 0 || m == 0) return {gx.zero_(), gy.zero_(), gc.zero_(), ga.zero_(),
                                          gb.zero_()};
  const CostSource src = cost_source(x_in, y_in, cost_in, ct, B, n, m, kind);
  // The dense path has no points: the cost kind plays no part there.
  const int64_t pkind = points ? kind : 0;
  const at::Tensor amass = a.sum(1), bmass = b.sum(1);
  AT_DISPATCH_FLOATING_TYPES(ct, "sinkhorn_grads_cpu", [&] {
    using T = scalar_t;
    const T *a_ = a.data_ptr<T>(), *b_ = b.data_ptr<T>(), *f_ = f.data_ptr<T>();
    const T *g_ = g.data_ptr<T>(), *gv_ = gv.data_ptr<T>();
    const T* lf_ = lf.defined() ? lf.data_ptr<T>() : nullptr;
    const T* lg_ = lg.defined() ? lg.data_ptr<T>() : nullptr;
    const T *am = amass.data_ptr<T>(), *bm = bmass.data_ptr<T>();
    // The row weights sum_j w_ij b_j E_ij: written per block, read once per problem.
    at::Tensor roww_all = at::empty({B, n}, a.options());
    T* rw_ = roww_all.data_ptr<T>();
    const bool want_pts = gx.numel() || gy.numel();
    std::vector<std::optional<PointGrads<T>>> pg(size_t(want_pts ? B : 0));
    for_each_row_block<T, GradScratch<T>>(src, B, n, m,
        [&](int64_t p, int64_t r0, int64_t rows, const T* c, int64_t ldc, GradScratch<T>& w) {
      const T* lfp = lf_ ? lf_ + p * n : nullptr;
      const T* lgp = lg_ ? lg_ + p * m : nullptr;
      if (r0 == 0) {
        for (int64_t j = 0; j < m; ++j) {
          w.colw[j] = 0;
          w.wg[j] = gv_[p] + (lgp ? lgp[j] : T(0));  // w_ij = lam_f_i + wg_j: no inner branch
        }
        if (want_pts) pg[p].emplace(xs[p], ys[p], kind);
      }
      plan_entry(c, ldc, a_ + p * n + r0, b_ + p * m, f_ + p * n + r0, g_ + p * m, gv_[p],
                 lfp ? lfp + r0 : nullptr, lgp, T(eps), rows, m, pkind, w.q.data(),
                 rw_ + p * n + r0, w.colw.data(), w.wg.data());
      if (gc.numel())
        std::copy(w.q.begin(), w.q.begin() + rows * m, gc.data_ptr<T>() + (p * n + r0) * m);
      if (want_pts)
        pg[p]->add_rows(w.q.data(), r0, rows, gx.numel() ? gx[p] : at::Tensor(), gy.numel() > 0);
      if (r0 + rows < n) return;  // the problem's last block: finish it
      if (ga.numel())
        weight_grad(f_ + p * n, lfp, rw_ + p * n, gv_[p], T(eps), bm[p], rho_a, n,
                    ga.data_ptr<T>() + p * n);
      if (gb.numel())
        weight_grad(g_ + p * m, lgp, w.colw.data(), gv_[p], T(eps), am[p], rho_b, m,
                    gb.data_ptr<T>() + p * m);
      if (gy.numel()) pg[p]->finish(gy[p]);
      if (want_pts) pg[p].reset();
    });
  });
  return {gx, gy, gc, ga, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_plan_apply_cpu(
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& cost, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& f_in, const at::Tensor& g_in, double eps, int64_t kind,
    const at::Tensor& vf_in, const at::Tensor& vg_in) {
  const PlanArgs pa = plan_args(a_in, b_in, f_in, g_in, eps);
  const at::ScalarType ct = pa.ct;
  const at::Tensor &a = pa.a, &b = pa.b, &f = pa.f, &g = pa.g;
  const int64_t B = pa.B, n = pa.n, m = pa.m;
  TORCH_CHECK_VALUE(vf_in.sizes() == f.sizes() && vg_in.sizes() == g.sizes(),
                    "vf (B, n) and vg (B, m) must match f and g");
  const at::Tensor vf = vf_in.to(ct).contiguous(), vg = vg_in.to(ct).contiguous();
  at::Tensor pv = at::zeros_like(f), r1 = at::zeros_like(f);
  at::Tensor ptv = at::zeros_like(g), c1 = at::zeros_like(g);
  if (B == 0 || n == 0 || m == 0) return {pv, ptv, r1, c1};
  const CostSource src = cost_source(x, y, cost, ct, B, n, m, kind);
  AT_DISPATCH_FLOATING_TYPES(ct, "sinkhorn_plan_apply_cpu", [&] {
    using T = scalar_t;
    const T *a_ = a.data_ptr<T>(), *b_ = b.data_ptr<T>(), *f_ = f.data_ptr<T>();
    const T *g_ = g.data_ptr<T>(), *vf_ = vf.data_ptr<T>(), *vg_ = vg.data_ptr<T>();
    T *pv_ = pv.data_ptr<T>(), *ptv_ = ptv.data_ptr<T>(), *r1_ = r1.data_ptr<T>();
    T* c1_ = c1.data_ptr<T>();
    // ptv and c1 start at zero (zeros_like) and accumulate over a problem's row blocks.
    for_each_row_block<T, GradScratch<T>>(src, B, n, m,
        [&](int64_t p, int64_t r0, int64_t rows, const T* c, int64_t ldc, GradScratch<T>&) {
      apply_entry(c, ldc, a_ + p * n + r0, b_ + p * m, f_ + p * n + r0, g_ + p * m,
                  vf_ + p * n + r0, vg_ + p * m, T(eps), rows, m, pv_ + p * n + r0, ptv_ + p * m,
                  r1_ + p * n + r0, c1_ + p * m);
    });
  });
  return {pv, ptv, r1, c1};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("sinkhorn_grads_cpu", &sinkhorn_grads_cpu);
  m.impl("sinkhorn_plan_apply_cpu", &sinkhorn_plan_apply_cpu);
}

}  // namespace fdiv_kernels
