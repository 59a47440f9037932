// CPU batched Sinkhorn, one whole problem per task: the statement of record is
// transport._solver.solve (same updates, schedule, checks and counts); this runs it per problem.
//
// Why: the per-half-iteration op streams the (B, n, m) cost (or rebuilds it from the points)
// from memory on every update and pays an op call and a host sync per check. A problem of
// n, m <= a few hundred fits in a core's cache: its cost is built once per solve in a per-thread
// scratch (never (B, n, m)), every update reads it from cache (columns in blocks of kColBlock),
// each problem stops on its own error with no sync, and problems run in parallel across threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/sinkhorn_problem.h"
#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

using namespace sinkhorn;  // NOLINT: the shared tile kernels

// Everything one problem needs; pointers into batch tensors already offset to problem b.
template <class T>
struct Problem {
  const T* c;      // (n, ldc) rows of the cost: the dense input, or the scratch built from points
  int64_t ldc;
  const T* la;     // (n,) log weights, -inf for zero-weight points
  const T* lb;     // (m,)
  T* f;            // (n,) in: initial potentials, out: final
  T* g;            // (m,)
  int64_t n, m;
};

struct Schedule {
  double eps, rho_a, rho_b, tol;
  const double* levels_eps;  // this problem's eps-scaling levels (stride level_stride), or null
  int64_t levels, level_stride, max_iter, check_every;
  bool symmetric;
};

// Per-thread scratch: the padded cost tile built from points, and the vectors of one problem.
template <class T>
struct Scratch {
  std::vector<T> tile, ha, hb, lr, lc, buf;
  void reserve(int64_t n, int64_t m, int64_t np, int64_t mp, bool points) {
    if (points) tile.resize(size_t(np * mp));
    ha.resize(size_t(n));
    lr.resize(size_t(n));
    hb.resize(size_t(m));
    lc.resize(size_t(m));
    buf.resize(size_t(kJC));
  }
};

// sum_i [la_i > -inf] exp(la_i) |exp(f_i / ev + lse_i) - target_i|, target 1 (balanced) or
// exp(-f_i / rho); NaN -> +inf (a NaN problem never counts as converged). As core.marginal_error.
template <class T>
T marginal_error(const T* f, const T* lse, const T* la, int64_t n, T ev, double rho) {
  double err = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(la[i] > -std::numeric_limits<T>::infinity())) continue;
    const T marg = std::exp(f[i] / ev + lse[i]);
    const T target = rho <= 0 ? T(1) : std::exp(-f[i] / T(rho));
    err += double(std::exp(la[i]) * std::abs(marg - target));
  }
  return err != err ? std::numeric_limits<T>::infinity() : T(err);
}

template <class T>
FDIV_INLINE T tau_eps(double rho, T ev) { return rho <= 0 ? ev : T(rho) / (T(rho) + ev) * ev; }

// The whole solve of one problem (see transport._solver.solve). Returns (n_iter, error).
template <class T>
FDIV_INLINE std::pair<int32_t, T> solve_problem(const Problem<T>& p, const Schedule& s,
                                                Scratch<T>& w) {
  const int64_t n = p.n, m = p.m;
  T *f = p.f, *g = p.g, *ha = w.ha.data(), *hb = w.hb.data(), *lr = w.lr.data(),
    *lc = w.lc.data(), *buf = w.buf.data();
  // lr_i = LSE_j(lb_j + g_j / ev - C_ij / ev); lc_j = LSE_i(la_i + f_i / ev - C_ij / ev).
  auto rows = [&](T ev) FDIV_INLINE_LAMBDA {
    for (int64_t j = 0; j < m; ++j) hb[j] = p.lb[j] + g[j] / ev;
    dense_rows_item<T>(p.c, hb, T(1) / ev, m, p.ldc, n, lr, buf);
  };
  auto cols = [&](T ev) FDIV_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) ha[i] = p.la[i] + f[i] / ev;
    for (int64_t j0 = 0; j0 < m; j0 += kColBlock)
      dense_cols_item<T>(p.c + j0, ha, T(1) / ev, n, p.ldc, std::min(kColBlock, m - j0), lc + j0);
  };
  // One iteration at ev, the rows (and, symmetric, the columns) already reduced.
  auto update = [&](T ev) FDIV_INLINE_LAMBDA {
    const T ta = tau_eps(s.rho_a, ev), tb = tau_eps(s.rho_b, ev);
    if (s.symmetric) {
      for (int64_t i = 0; i < n; ++i) f[i] = T(0.5) * (f[i] - ta * lr[i]);
      for (int64_t j = 0; j < m; ++j) g[j] = T(0.5) * (g[j] - tb * lc[j]);
    } else {
      for (int64_t i = 0; i < n; ++i) f[i] = -ta * lr[i];
      cols(ev);
      for (int64_t j = 0; j < m; ++j) g[j] = -tb * lc[j];
    }
  };
  const T eps = T(s.eps);
  for (int64_t k = 0; k < s.levels; ++k) {
    const T ev = T(s.levels_eps[k * s.level_stride]);
    rows(ev);
    if (s.symmetric) cols(ev);
    update(ev);
  }
  auto error = [&]() FDIV_INLINE_LAMBDA {
    T err = marginal_error(f, lr, p.la, n, eps, s.rho_a);
    if (s.symmetric) err += marginal_error(g, lc, p.lb, m, eps, s.rho_b);
    return err;
  };
  int32_t iters = 0;
  for (int64_t it = 0; it < s.max_iter; ++it) {
    rows(eps);
    if (s.symmetric) cols(eps);
    if (it % s.check_every == 0 && !(error() > T(s.tol))) break;
    update(eps);
    ++iters;
  }
  rows(eps);
  if (s.symmetric) cols(eps);
  return {iters, error()};
}

// (sum P, <C, P>) over n rows of one problem (a row block), P_ij = a_i b_j exp((f_i + g_j -
// C_ij) / eps), as _dual.plan_totals computes them (float terms, double row sums), added to
// acc[0], acc[1] row by row (so the sums do not depend on the blocking).
template <class T>
FDIV_INLINE void totals_rows(const T* c, int64_t ldc, const T* a, const T* b, const T* f,
                             const T* g, T eps, int64_t n, int64_t m, double* acc) {
  double total = acc[0], lin = acc[1];
  const T ei = T(1) / eps;
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * ldc;
    const T ai = a[i], fi = f[i];
    T s = 0, sc = 0;
#pragma omp simd reduction(+ : s, sc)
    for (int64_t j = 0; j < m; ++j) {
      const T p = ai * b[j] * vexp((fi + g[j] - ci[j]) * ei);
      s += p;
      sc += p * ci[j];
    }
    total += double(s);
    lin += double(sc);
  }
  acc[0] = total;
  acc[1] = lin;
}

#define FDIV_SOLVE_ENTRY(T)                                                                       \
  FDIV_CLONES std::pair<int32_t, T> solve_entry(const Problem<T>& p, const Schedule& s,           \
                                                Scratch<T>& w) {                                  \
    return solve_problem<T>(p, s, w);                                                             \
  }                                                                                               \
  FDIV_CLONES void totals_entry(const T* c, int64_t ldc, const T* a, const T* b, const T* f,     \
                                const T* g, T eps, int64_t n, int64_t m, double* acc) {          \
    totals_rows<T>(c, ldc, a, b, f, g, eps, n, m, acc);                                           \
  }
FDIV_SOLVE_ENTRY(float)
FDIV_SOLVE_ENTRY(double)
#undef FDIV_SOLVE_ENTRY

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_solve_cpu(
    const std::optional<at::Tensor>& x_in, const std::optional<at::Tensor>& y_in,
    const std::optional<at::Tensor>& cost_in, const at::Tensor& log_a, const at::Tensor& log_b,
    const std::optional<at::Tensor>& f0, const std::optional<at::Tensor>& g0,
    const std::optional<at::Tensor>& eps_levels, double eps, int64_t kind, double rho_a,
    double rho_b, int64_t max_iter, double tol, int64_t check_every, bool symmetric) {
  TORCH_CHECK_VALUE(log_a.dim() == 2 && log_b.dim() == 2 && log_a.size(0) == log_b.size(0),
                    "log_a (B, n) and log_b (B, m) do not match");
  TORCH_CHECK_VALUE(eps > 0 && check_every >= 1 && max_iter >= 0, "bad eps/check_every/max_iter");
  const at::ScalarType ct = log_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor la = log_a.to(ct).contiguous(), lb = log_b.to(ct).contiguous();
  const int64_t B = la.size(0), n = la.size(1), m = lb.size(1);
  at::Tensor f = f0 ? f0->to(ct).contiguous().clone() : at::zeros({B, n}, la.options());
  at::Tensor g = g0 ? g0->to(ct).contiguous().clone() : at::zeros({B, m}, la.options());
  TORCH_CHECK_VALUE(f.sizes() == la.sizes() && g.sizes() == lb.sizes(), "f0/g0 do not match");
  at::Tensor n_iter = at::zeros({B}, la.options().dtype(at::kInt));
  at::Tensor err = at::empty({B}, la.options());
  Schedule s{eps, rho_a, rho_b, tol, nullptr, 0, B, max_iter, check_every, symmetric};
  // The schedule of transport._solver.eps_schedule (levels, B), computed once on the host for
  // every backend; the level values were rounded to the compute type there, so the round trip
  // through double is exact.
  at::Tensor levels;
  if (eps_levels) {
    levels = eps_levels->to(at::kDouble).contiguous();
    TORCH_CHECK_VALUE(levels.dim() == 2 && levels.size(1) == B, "eps_levels must be (levels, B)");
    s.levels = levels.size(0);
  }
  if (B == 0 || n == 0 || m == 0) return {f, g, n_iter, err.fill_(0)};
  const CostSource src = cost_source(x_in, y_in, cost_in, ct, B, n, m, kind);
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "sinkhorn_solve_cpu", [&] {
    const scalar_t *la_ = la.data_ptr<scalar_t>(), *lb_ = lb.data_ptr<scalar_t>();
    scalar_t *f_ = f.data_ptr<scalar_t>(), *g_ = g.data_ptr<scalar_t>();
    scalar_t* e_ = err.data_ptr<scalar_t>();
    int32_t* it_ = n_iter.data_ptr<int32_t>();
    const double* lv = levels.defined() ? levels.data_ptr<double>() : nullptr;
    for_each_problem<scalar_t, Scratch<scalar_t>>(src, B, n, m,
                               [&](int64_t b, const scalar_t* c, int64_t ldc, Scratch<scalar_t>& w) {
      const Problem<scalar_t> p{c, ldc, la_ + b * n, lb_ + b * m, f_ + b * n, g_ + b * m, n, m};
      Schedule sb = s;
      sb.levels_eps = lv ? lv + b : nullptr;
      const auto [iters, e] = solve_entry(p, sb, w);
      it_[b] = iters;
      e_[b] = e;
    });
  });
  return {f, g, n_iter, err};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_totals_cpu(
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& cost, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& f_in, const at::Tensor& g_in, double eps, int64_t kind) {
  const PlanArgs pa = plan_args(a_in, b_in, f_in, g_in, eps);
  const at::ScalarType ct = pa.ct;
  const at::Tensor &a = pa.a, &b = pa.b, &f = pa.f, &g = pa.g;
  const int64_t B = pa.B, n = pa.n, m = pa.m;
  at::Tensor total = at::zeros({B}, a.options()), lin = at::zeros({B}, a.options());
  if (B == 0 || n == 0 || m == 0) return {total, lin};
  const CostSource src = cost_source(x, y, cost, ct, B, n, m, kind);
  AT_DISPATCH_FLOATING_TYPES(ct, "sinkhorn_totals_cpu", [&] {
    const scalar_t *a_ = a.data_ptr<scalar_t>(), *b_ = b.data_ptr<scalar_t>();
    const scalar_t *f_ = f.data_ptr<scalar_t>(), *g_ = g.data_ptr<scalar_t>();
    scalar_t *t_ = total.data_ptr<scalar_t>(), *l_ = lin.data_ptr<scalar_t>();
    std::vector<double> acc(size_t(2 * B), 0.0);  // each problem's running sums, its own thread's
    for_each_row_block<scalar_t, Scratch<scalar_t>>(src, B, n, m,
        [&](int64_t bi, int64_t r0, int64_t rows, const scalar_t* c, int64_t ldc,
            Scratch<scalar_t>&) {
      double* s = acc.data() + 2 * bi;
      totals_entry(c, ldc, a_ + bi * n + r0, b_ + bi * m, f_ + bi * n + r0, g_ + bi * m,
                   scalar_t(eps), rows, m, s);
      if (r0 + rows < n) return;
      t_[bi] = scalar_t(s[0]);
      l_[bi] = scalar_t(s[1]);
    });
  });
  return {total, lin};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("sinkhorn_solve_cpu", &sinkhorn_solve_cpu);
  m.impl("sinkhorn_totals_cpu", &sinkhorn_totals_cpu);
}

}  // namespace fdiv_kernels
