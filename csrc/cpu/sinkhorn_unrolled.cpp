// CPU Sinkhorn differentiated through exactly n_iter iterations (grad="unrolled"), one problem
// per task: the statement of record is transport._solver.unrolled + plan_totals + dual_value.
//
// Why: autograd through the torch loop records ~10 ops per half-iteration and checkpoints each
// one, so a small problem (SinKD: 32 x 32, 20 iterations) costs milliseconds of op overhead for
// microseconds of arithmetic. Here the forward is one call that runs the iterations in a
// per-thread scratch (the cost of one problem, n * m, built once from the points), and keeps a
// tape of the potentials and row / column LSEs of every iteration: O(n_iter (n + m)) per problem,
// never the plans. The backward is one call that walks the tape in reverse: the Jacobian of
//   f_i = -tau_a eps LSE_j(lb_j + (g_j - C_ij) / eps)
// is the row softmax S_ij = exp(lb_j + (g_j - C_ij) / eps - LSE_i), rebuilt from the saved LSE
// with one exp per entry. Conventions (per problem, ka = tau_a eps, kb = tau_b eps):
//   alternating  f^k = -ka Lr(g^{k-1}),             g^k = -kb Lc(f^k)
//   symmetric    f^k = (f^{k-1} - ka Lr(g^{k-1}))/2, g^k = (g^{k-1} - kb Lc(f^{k-1}))/2
//   P = a b exp((f + g - C) / eps), lin = <C, P>,
//   value = <a, phi_a(f)> + <b, phi_b(g)> - eps (sum P - sum a sum b).
// Weights come as a, b (None: uniform): their gradient is taken in a, not log a, so a point of
// zero weight gets its one-sided derivative (the exps are formed without the log weight).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <new>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

using namespace sinkhorn;  // NOLINT: exp_le0, finish_cost

template <class T>
struct Params {
  T eps, ei, ka, kb, half;  // half: the weight of the LSE step, 1/2 when symmetric
  double rho_a, rho_b;
  int64_t n, m, K;
  bool symmetric;
};

// The tape of one problem: f^0..f^K, g^0..g^K, then Lr^1..Lr^K, Lc^1..Lc^K (the LSEs).
template <class T>
struct Tape {
  T *f, *g, *lr, *lc;
  Tape(T* t, int64_t n, int64_t m, int64_t K)
      : f(t), g(t + (K + 1) * n), lr(t + (K + 1) * (n + m)), lc(t + (K + 1) * (n + m) + K * n) {}
};

template <class T>
FDIV_INLINE T phi(T f, double rho) { return rho <= 0 ? f : T(-rho) * std::expm1(-f / T(rho)); }
template <class T>
FDIV_INLINE T dphi(T f, double rho) { return rho <= 0 ? T(1) : std::exp(-f / T(rho)); }

// Per-problem weights: a (n,), la = log a (-inf where a = 0); uniform when src is null.
template <class T>
void weights(const T* src, int64_t n, T* a, T* la) {
  for (int64_t i = 0; i < n; ++i) {
    a[i] = src ? src[i] : T(1) / T(n);
    la[i] = a[i] > 0 ? std::log(a[i]) : -std::numeric_limits<T>::infinity();
  }
}

// The (n, m) cost of one problem from points x (n, d), y transposed (d, m): kind 0
// sqeuclidean, 1 euclidean (both as |x|^2 + |y|^2 - 2 x.y clamped at 0, as pairwise_cost),
// 2 l1, 3 dot (-x.y), 4 cosine (points normalized beforehand).
template <class T>
FDIV_INLINE void build_cost(const T* x, const T* yT, const T* xx, const T* yy, int64_t n,
                            int64_t m, int64_t d, int64_t kind, T* c) {
  for (int64_t i = 0; i < n; ++i) {
    T* ci = c + i * m;
    for (int64_t j = 0; j < m; ++j) ci[j] = T(0);
    for (int64_t k = 0; k < d; ++k) {
      const T xk = x[i * d + k];
      const T* yk = yT + k * m;
      if (kind == L1) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ci[j] += std::abs(xk - yk[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ci[j] += xk * yk[j];
      }
    }
    finish_cost(ci, m, kind, xx[i], yy);
  }
}

// Row LSEs out[i] = LSE_j(h_j - c_ij ei) of an (n, m) cost, two passes per row (max, then the
// sum of exps against it); the logs are taken together at the end, in one vectorized loop
// rather than one libm call per row. An all -inf row is -inf. mx: n.
template <class T>
FDIV_INLINE void row_lse(const T* c, const T* h, T ei, int64_t n, int64_t m, T* out, T* mx) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * m;
    T bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < m; ++j) bm = std::max(bm, h[j] - ci[j] * ei);
    const T m0 = bm == kNegInf ? T(0) : bm;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) s += exp_le0(h[j] - ci[j] * ei - m0);
    mx[i] = bm;
    out[i] = s;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = mx[i] == kNegInf ? kNegInf : mx[i] + vlog(out[i]);
}

// Column LSEs out[j] = LSE_i(h_i - c_ij ei), rows streamed (the cost is row-major), zero-weight
// rows (h_i = -inf) skipped. mx: m.
template <class T>
FDIV_INLINE void col_lse(const T* c, const T* h, T ei, int64_t n, int64_t m, T* out, T* mx) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < m; ++j) mx[j] = kNegInf, out[j] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] == kNegInf) continue;
    const T* ci = c + i * m;
    const T hi = h[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], hi - ci[j] * ei);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] == kNegInf) continue;
    const T* ci = c + i * m;
    const T hi = h[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) out[j] += exp_le0(hi - ci[j] * ei - mx[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) out[j] = mx[j] == kNegInf ? kNegInf : mx[j] + vlog(out[j]);
}

// Exactly K iterations, then the plan's totals and the marginal error, for one problem.
// out: value, lin, err. h, buf: max(n, m); colsum: m.
template <class T>
FDIV_INLINE void forward_problem(const T* c, const T* a, const T* la, const T* b, const T* lb,
                                 const Params<T>& p, Tape<T> tp, T* out, T* h, T* buf,
                                 T* colsum) {
  const int64_t n = p.n, m = p.m;
  const T ei = p.ei;
  for (int64_t k = 1; k <= p.K; ++k) {
    const T* fp = tp.f + (k - 1) * n;
    const T* gp = tp.g + (k - 1) * m;
    T* fk = tp.f + k * n;
    T* gk = tp.g + k * m;
    T* lr = tp.lr + (k - 1) * n;
    T* lc = tp.lc + (k - 1) * m;
    for (int64_t j = 0; j < m; ++j) h[j] = lb[j] + gp[j] * ei;
    row_lse(c, h, ei, n, m, lr, buf);
    for (int64_t i = 0; i < n; ++i)
      fk[i] = p.symmetric ? p.half * (fp[i] - p.ka * lr[i]) : -p.ka * lr[i];
    const T* fc = p.symmetric ? fp : fk;  // the f the column update reads
    for (int64_t i = 0; i < n; ++i) h[i] = la[i] + fc[i] * ei;
    col_lse(c, h, ei, n, m, lc, buf);
    for (int64_t j = 0; j < m; ++j)
      gk[j] = p.symmetric ? p.half * (gp[j] - p.kb * lc[j]) : -p.kb * lc[j];
  }
  // P_ij = a_i b_j e_ij with e = exp((f + g - C) / eps): row sums give the row marginal error
  // directly (no LSE needed), column sums the column one.
  const T* f = tp.f + p.K * n;
  const T* g = tp.g + p.K * m;
  for (int64_t j = 0; j < m; ++j) colsum[j] = T(0);
  T total = 0, lin = 0, err = 0, sa = 0, sb = 0, val = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(a[i] > 0)) continue;  // zero weight: no mass, no error term
    const T* ci = c + i * m;
    const T fi = f[i], ai = a[i];
    T rs = 0, li = 0;
#pragma omp simd reduction(+ : rs, li)
    for (int64_t j = 0; j < m; ++j) {
      const T e = vexp((fi + g[j] - ci[j]) * ei);
      const T be = b[j] > 0 ? b[j] * e : T(0);
      rs += be;
      li += be * ci[j];
      colsum[j] += ai * e;
    }
    total += ai * rs;
    lin += ai * li;
    err += ai * std::abs(rs - (p.rho_a <= 0 ? T(1) : std::exp(-fi / T(p.rho_a))));
    sa += ai;
    val += ai * phi(fi, p.rho_a);
  }
  for (int64_t j = 0; j < m; ++j) {
    if (!(b[j] > 0)) continue;
    if (p.symmetric)
      err += b[j] * std::abs(colsum[j] - (p.rho_b <= 0 ? T(1) : std::exp(-g[j] / T(p.rho_b))));
    sb += b[j];
    val += b[j] * phi(g[j], p.rho_b);
  }
  out[0] = val - p.eps * (total - sa * sb);
  out[1] = lin;
  out[2] = err != err ? std::numeric_limits<T>::infinity() : err;
}

// What one problem's backward reads and writes; null pointers: not wanted / not given.
template <class T>
struct Adjoint {
  T gv, gl;          // upstream gradients of value and lin (0 when not given)
  const T *gf, *gg;  // upstream gradients of the final f, g (null when not given)
  T *cbar;           // (n, m) gradient of the cost, or null
  T *abar, *bbar;    // (n,), (m,) gradients of the weights, or null
  T *fbar, *gbar;    // (n,), (m,) out: gradients of f^0, g^0
};

// Reverse mode through the final totals and the K iterations of one problem.
// Scratch: fnew (n), u (m), q (m).
template <class T>
FDIV_INLINE void backward_problem(const T* c, const T* a, const T* b, const Params<T>& p,
                                  Tape<T> tp, Adjoint<T> ad, T* fnew, T* u, T* q) {
  const int64_t n = p.n, m = p.m;
  const T ei = p.ei, eps = p.eps;
  T* F = ad.fbar;
  T* G = ad.gbar;
  for (int64_t i = 0; i < n; ++i) F[i] = ad.gf ? ad.gf[i] : T(0);
  for (int64_t j = 0; j < m; ++j) G[j] = ad.gg ? ad.gg[j] : T(0);
  if (ad.abar) std::fill(ad.abar, ad.abar + n, T(0));
  if (ad.bbar) std::fill(ad.bbar, ad.bbar + m, T(0));
  if (ad.cbar) std::fill(ad.cbar, ad.cbar + n * m, T(0));

  // The totals: with e = exp((f + g - C) / eps) and v = e (g_lin C - eps g_value),
  //   d/da_i = g_value (phi(f_i) + eps sum b) + sum_j b_j v_ij, d/df_i = a_i / eps of that sum
  //   + g_value a_i phi'(f_i), d/dC_ij = P_ij (g_value + g_lin (1 - C_ij / eps)).
  if (ad.gv != T(0) || ad.gl != T(0)) {
    const T* f = tp.f + p.K * n;
    const T* g = tp.g + p.K * m;
    const T gv = ad.gv, gl = ad.gl;
    T sa = 0, sb = 0;
    for (int64_t i = 0; i < n; ++i) sa += a[i];
    for (int64_t j = 0; j < m; ++j) {
      sb += b[j];
      u[j] = T(0);
    }
    for (int64_t i = 0; i < n; ++i) {
      const T* ci = c + i * m;
      T* cb = ad.cbar ? ad.cbar + i * m : nullptr;
      const T fi = f[i], ai = a[i];
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) {
        const T e = vexp((fi + g[j] - ci[j]) * ei);
        const T v = e * (gl * ci[j] - eps * gv);
        q[j] = e;
        s += b[j] * v;
        u[j] += ai * v;
      }
      if (cb) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) cb[j] = ai * b[j] * q[j] * (gv + gl * (T(1) - ci[j] * ei));
      }
      if (ad.abar) ad.abar[i] = gv * (phi(fi, p.rho_a) + eps * sb) + s;
      F[i] += gv * ai * dphi(fi, p.rho_a) + ai * ei * s;
    }
    for (int64_t j = 0; j < m; ++j) {
      if (ad.bbar) ad.bbar[j] = gv * (phi(g[j], p.rho_b) + eps * sa) + u[j];
      G[j] += gv * b[j] * dphi(g[j], p.rho_b) + b[j] * ei * u[j];
    }
  }

  // The iterations, last first. q_ij = T_ij / a_i (column softmax), s_ij = S_ij / b_j (row
  // softmax), both from the saved LSEs; ca = half kb / eps, cb = half ka / eps.
  const T ca = p.half * p.kb * ei, cb = p.half * p.ka * ei;
  for (int64_t k = p.K; k >= 1; --k) {
    const T* fc = tp.f + (p.symmetric ? k - 1 : k) * n;  // the f the column LSE read
    const T* gp = tp.g + (k - 1) * m;
    const T* lr = tp.lr + (k - 1) * n;
    const T* lc = tp.lc + (k - 1) * m;
    for (int64_t j = 0; j < m; ++j) u[j] = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T* ci = c + i * m;
      const T ai = a[i], fi = fc[i] * ei, li = lr[i];
      T t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < m; ++j) {
        q[j] = vexp(fi - ci[j] * ei - lc[j]);
        t += G[j] * q[j];
      }
      // Alternating: f^k feeds g^k, so its adjoint is complete only now; symmetric: g^k read
      // f^{k-1}, whose adjoint gets this term instead.
      const T Fi = p.symmetric ? F[i] : F[i] - ca * ai * t;
      if (ad.cbar) {
        T* cbi = ad.cbar + i * m;
        const T wa = ca * ai;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          const T s = vexp(gp[j] * ei - ci[j] * ei - li);
          u[j] += Fi * s;
          cbi[j] += wa * G[j] * q[j] + cb * Fi * b[j] * s;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) u[j] += Fi * vexp(gp[j] * ei - ci[j] * ei - li);
      }
      if (ad.abar) ad.abar[i] -= p.half * p.kb * t;
      fnew[i] = p.symmetric ? T(0.5) * F[i] - ca * ai * t : T(0);
    }
    for (int64_t j = 0; j < m; ++j) {
      if (ad.bbar) ad.bbar[j] -= p.half * p.ka * u[j];
      G[j] = (p.symmetric ? T(0.5) * G[j] : T(0)) - cb * b[j] * u[j];
    }
    for (int64_t i = 0; i < n; ++i) F[i] = fnew[i];
  }
}

// Points gradients from the cost's: xbar_i = sum_j cbar_ij dc(x_i, y_j)/dx_i, and for y.
// x, y (n, d), (m, d) as given (cosine: not normalized); cbar is overwritten (euclidean).
template <class T>
void points_grads(const T* x, const T* y, T* cbar, const T* c, int64_t n, int64_t m, int64_t d,
                  int64_t kind, T* gx, T* gy) {
  for (int64_t i = 0; i < n * d; ++i) if (gx) gx[i] = T(0);
  for (int64_t j = 0; j < m * d; ++j) if (gy) gy[j] = T(0);
  if (kind == L1) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const T w = cbar[i * m + j];
        for (int64_t k = 0; k < d; ++k) {
          const T df = x[i * d + k] - y[j * d + k];
          const T s = df > 0 ? w : (df < 0 ? -w : T(0));
          if (gx) gx[i * d + k] += s;
          if (gy) gy[j * d + k] -= s;
        }
      }
    return;
  }
  if (kind == EUCLIDEAN)  // sqrt(sq): dC = dsq / (2 C), 0 where C = 0 (as pairwise_cost's where)
    for (int64_t e = 0; e < n * m; ++e) cbar[e] = c[e] > 0 ? cbar[e] / (T(2) * c[e]) : T(0);
  if (kind == SQEUCLIDEAN || kind == EUCLIDEAN) {  // d|x - y|^2 = 2 (x - y)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const T w = T(2) * cbar[i * m + j];
        for (int64_t k = 0; k < d; ++k) {
          const T df = w * (x[i * d + k] - y[j * d + k]);
          if (gx) gx[i * d + k] += df;
          if (gy) gy[j * d + k] -= df;
        }
      }
    return;
  }
  // dot and cosine: dC/dxn_i = -yn_j (cosine then projects through the normalization).
  std::vector<T> xn(x, x + n * d), yn(y, y + m * d), nx(size_t(n), T(1)), ny(size_t(m), T(1));
  if (kind == COSINE) {
    for (int64_t i = 0; i < n; ++i) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += x[i * d + k] * x[i * d + k];
      nx[i] = std::max(std::sqrt(s), T(1e-12));
      for (int64_t k = 0; k < d; ++k) xn[i * d + k] /= nx[i];
    }
    for (int64_t j = 0; j < m; ++j) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += y[j * d + k] * y[j * d + k];
      ny[j] = std::max(std::sqrt(s), T(1e-12));
      for (int64_t k = 0; k < d; ++k) yn[j * d + k] /= ny[j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const T w = cbar[i * m + j];
      for (int64_t k = 0; k < d; ++k) {
        if (gx) gx[i * d + k] -= w * yn[j * d + k];
        if (gy) gy[j * d + k] -= w * xn[i * d + k];
      }
    }
  if (kind != COSINE) return;
  // x / max(|x|, 1e-12): the projection (I - xn xn^T) / |x| above the clamp, 1 / 1e-12 below.
  auto project = [&](T* gr, const T* pn, const T* nrm, int64_t rows) {
    for (int64_t i = 0; i < rows; ++i) {
      T* v = gr + i * d;
      if (nrm[i] > T(1e-12)) {
        T dotp = 0;
        for (int64_t k = 0; k < d; ++k) dotp += v[k] * pn[i * d + k];
        for (int64_t k = 0; k < d; ++k) v[k] = (v[k] - dotp * pn[i * d + k]) / nrm[i];
      } else {
        for (int64_t k = 0; k < d; ++k) v[k] /= nrm[i];
      }
    }
  };
  if (gx) project(gx, xn.data(), nx.data(), n);
  if (gy) project(gy, yn.data(), ny.data(), m);
}

// Per-ISA entry points (target_clones); everything they call is inlined into them.
#define FDIV_UNROLLED_ENTRY(T, ATTR)                                                            \
  ATTR void forward_entry(const T* c, const T* a, const T* la, const T* b, const T* lb,          \
                          const Params<T>& p, Tape<T> tp, T* out, T* h, T* buf, T* colsum) {     \
    forward_problem<T>(c, a, la, b, lb, p, tp, out, h, buf, colsum);                             \
  }                                                                                              \
  ATTR void backward_entry(const T* c, const T* a, const T* b, const Params<T>& p, Tape<T> tp,   \
                           Adjoint<T> ad, T* fnew, T* u, T* q) {                                 \
    backward_problem<T>(c, a, b, p, tp, ad, fnew, u, q);                                         \
  }                                                                                              \
  ATTR void cost_entry(const T* x, const T* yT, const T* xx, const T* yy, int64_t n, int64_t m,  \
                       int64_t d, int64_t kind, T* c) {                                          \
    build_cost<T>(x, yT, xx, yy, n, m, d, kind, c);                                              \
  }
FDIV_UNROLLED_ENTRY(float, FDIV_CLONES)
FDIV_UNROLLED_ENTRY(double, FDIV_CLONES)
#undef FDIV_UNROLLED_ENTRY

// The inputs of both ops in the compute type, contiguous, with the sizes checked.
struct Inputs {
  at::Tensor x, y, cost, a, b;  // undefined when absent
  at::ScalarType ct;
  int64_t B, n, m, d;
};

Inputs prepare(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
               const std::optional<at::Tensor>& cost, const std::optional<at::Tensor>& a,
               const std::optional<at::Tensor>& b, int64_t kind) {
  Inputs in;
  const at::Tensor& ref = cost ? *cost : *x;
  TORCH_CHECK_VALUE(cost || (x && y), "sinkhorn_unrolled needs points x, y or a cost");
  in.ct = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (cost) {
    in.cost = cost->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(in.cost.dim() == 3, "cost must be (B, n, m), got ", in.cost.sizes());
    in.B = in.cost.size(0), in.n = in.cost.size(1), in.m = in.cost.size(2), in.d = 0;
  } else {
    in.x = x->to(in.ct).contiguous();
    in.y = y->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(in.x.dim() == 3 && in.y.dim() == 3 && in.x.size(0) == in.y.size(0) &&
                          in.x.size(2) == in.y.size(2),
                      "x (B, n, d) and y (B, m, d) do not match: ", in.x.sizes(), in.y.sizes());
    TORCH_CHECK_VALUE(kind >= 0 && kind < kNumCosts, "unknown cost kind ", kind);
    in.B = in.x.size(0), in.n = in.x.size(1), in.m = in.y.size(1), in.d = in.x.size(2);
  }
  if (a) {
    in.a = a->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(in.a.dim() == 2 && in.a.size(0) == in.B && in.a.size(1) == in.n,
                      "a must be (B, n), got ", in.a.sizes());
  }
  if (b) {
    in.b = b->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(in.b.dim() == 2 && in.b.size(0) == in.B && in.b.size(1) == in.m,
                      "b must be (B, m), got ", in.b.sizes());
  }
  return in;
}

template <class T>
Params<T> params(const Inputs& in, double eps, double rho_a, double rho_b, int64_t K,
                 bool symmetric) {
  const double ta = rho_a <= 0 ? 1.0 : rho_a / (rho_a + eps);
  const double tb = rho_b <= 0 ? 1.0 : rho_b / (rho_b + eps);
  return Params<T>{T(eps), T(1.0 / eps), T(ta * eps), T(tb * eps), T(symmetric ? 0.5 : 1.0),
                   rho_a, rho_b, in.n, in.m, K, symmetric};
}

// 64-byte aligned vectors: GCC peels vectorized reductions up to an alignment boundary, so
// with malloc's 16-byte alignment the summation order (and the last bits) would change from
// call to call, and gradcheck's reentrancy check (nondet_tol = 0) fails.
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t k) {
    return static_cast<T*>(::operator new[](k * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* ptr, size_t) { ::operator delete[](ptr, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned<U>&) const { return true; }
};
template <class T>
using AVec = std::vector<T, Aligned<T>>;

// Per-thread scratch: one problem's cost (points only), weights, and vectors.
template <class T>
struct Scratch {
  AVec<T> c, yT, xx, yy, xs, ys, a, la, b, lb, h, buf, v1, v2, v3, cbar;
  Scratch(const Inputs& in, bool with_cbar) {
    const int64_t n = in.n, m = in.m, d = in.d;
    if (!in.cost.defined()) {
      c.resize(size_t(n * m));
      yT.resize(size_t(d * m));
      xx.resize(size_t(n));
      yy.resize(size_t(m));
      xs.resize(size_t(n * d));
      ys.resize(size_t(m * d));
    }
    a.resize(size_t(n)), la.resize(size_t(n)), b.resize(size_t(m)), lb.resize(size_t(m));
    h.resize(size_t(std::max(n, m))), buf.resize(size_t(std::max(n, m)));
    v1.resize(size_t(std::max(n, m))), v2.resize(size_t(m)), v3.resize(size_t(m));
    if (with_cbar) cbar.resize(size_t(n * m));
  }

  // Problem bi's cost: the dense input, or built here from the points.
  const T* cost(const Inputs& in, int64_t bi, int64_t kind) {
    const int64_t n = in.n, m = in.m, d = in.d;
    if (in.cost.defined()) return in.cost.data_ptr<T>() + bi * n * m;
    const T* x = in.x.data_ptr<T>() + bi * n * d;
    const T* y = in.y.data_ptr<T>() + bi * m * d;
    std::copy(x, x + n * d, xs.begin());
    std::copy(y, y + m * d, ys.begin());
    if (kind == COSINE) {
      normalize(xs.data(), n, d);
      normalize(ys.data(), m, d);
    }
    for (int64_t i = 0; i < n; ++i) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += xs[i * d + k] * xs[i * d + k];
      xx[i] = s;
    }
    for (int64_t j = 0; j < m; ++j) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) {
        s += ys[j * d + k] * ys[j * d + k];
        yT[k * m + j] = ys[j * d + k];
      }
      yy[j] = s;
    }
    cost_entry(xs.data(), yT.data(), xx.data(), yy.data(), n, m, d, kind, c.data());
    return c.data();
  }

  static void normalize(T* p, int64_t rows, int64_t d) {
    for (int64_t i = 0; i < rows; ++i) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += p[i * d + k] * p[i * d + k];
      const T nr = std::max(std::sqrt(s), T(1e-12));
      for (int64_t k = 0; k < d; ++k) p[i * d + k] /= nr;
    }
  }

  void load_weights(const Inputs& in, int64_t bi) {
    weights<T>(in.a.defined() ? in.a.data_ptr<T>() + bi * in.n : nullptr, in.n, a.data(),
               la.data());
    weights<T>(in.b.defined() ? in.b.data_ptr<T>() + bi * in.m : nullptr, in.m, b.data(),
               lb.data());
  }
};

// Problems in parallel; one problem runs on the calling thread (an OpenMP region costs
// microseconds, the whole SinKD forward is ~50).
template <class F>
void for_problems(int64_t B, const F& body) {
  if (B <= 1) body(int64_t(0), B);
  else at::parallel_for(0, B, 1, body);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinkhorn_unrolled_fwd_cpu(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
                          const std::optional<at::Tensor>& cost,
                          const std::optional<at::Tensor>& a_in,
                          const std::optional<at::Tensor>& b_in,
                          const std::optional<at::Tensor>& f0_in,
                          const std::optional<at::Tensor>& g0_in, double eps, int64_t kind,
                          double rho_a, double rho_b, int64_t n_iter, bool symmetric) {
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  const Inputs in = prepare(x, y, cost, a_in, b_in, kind);
  const int64_t B = in.B, n = in.n, m = in.m, K = n_iter;
  const auto opt = at::TensorOptions().dtype(in.ct);
  const int64_t per = (2 * K + 1) * (n + m);
  at::Tensor tape = at::empty({B, per}, opt);
  // value, lin, err: separate tensors (outputs must not alias).
  at::Tensor value = at::empty({B}, opt), lin = at::empty({B}, opt), err = at::empty({B}, opt);
  at::Tensor f0 = f0_in ? f0_in->to(in.ct).contiguous() : at::Tensor();
  at::Tensor g0 = g0_in ? g0_in->to(in.ct).contiguous() : at::Tensor();
  TORCH_CHECK_VALUE(!f0.defined() || f0.numel() == B * n, "f0 must be (B, n)");
  TORCH_CHECK_VALUE(!g0.defined() || g0.numel() == B * m, "g0 must be (B, m)");
  AT_DISPATCH_FLOATING_TYPES(in.ct, "sinkhorn_unrolled_fwd_cpu", [&] {
    using T = scalar_t;
    const Params<T> p = params<T>(in, eps, rho_a, rho_b, K, symmetric);
    T* tape_ = tape.data_ptr<T>();
    T* out_[3] = {value.data_ptr<T>(), lin.data_ptr<T>(), err.data_ptr<T>()};
    const T* f0_ = f0.defined() ? f0.data_ptr<T>() : nullptr;
    const T* g0_ = g0.defined() ? g0.data_ptr<T>() : nullptr;
    for_problems(B, [&](int64_t begin, int64_t end) {
      Scratch<T> s(in, false);
      for (int64_t bi = begin; bi < end; ++bi) {
        const T* c = s.cost(in, bi, kind);
        s.load_weights(in, bi);
        Tape<T> tp(tape_ + bi * per, n, m, K);
        for (int64_t i = 0; i < n; ++i) tp.f[i] = f0_ ? f0_[bi * n + i] : T(0);
        for (int64_t j = 0; j < m; ++j) tp.g[j] = g0_ ? g0_[bi * m + j] : T(0);
        T res[3];
        forward_entry(c, s.a.data(), s.la.data(), s.b.data(), s.lb.data(), p, tp, res,
                      s.h.data(), s.buf.data(), s.v2.data());
        for (int r = 0; r < 3; ++r) out_[r][bi] = res[r];
      }
    });
  });
  // The final potentials: their own tensors (outputs of the autograd graph), copied off the tape.
  at::Tensor f = tape.narrow(1, K * n, n).clone();
  at::Tensor g = tape.narrow(1, (K + 1) * n + K * m, m).clone();
  return {value, lin, f, g, err, tape};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinkhorn_unrolled_bwd_cpu(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
                          const std::optional<at::Tensor>& cost,
                          const std::optional<at::Tensor>& a_in,
                          const std::optional<at::Tensor>& b_in, const at::Tensor& tape_in,
                          const std::optional<at::Tensor>& g_value,
                          const std::optional<at::Tensor>& g_lin,
                          const std::optional<at::Tensor>& g_f,
                          const std::optional<at::Tensor>& g_g, double eps, int64_t kind,
                          double rho_a, double rho_b, int64_t n_iter,
                          bool symmetric, std::array<bool, 5> need) {  // need: x, y, cost, a, b
  const Inputs in = prepare(x, y, cost, a_in, b_in, kind);
  const int64_t B = in.B, n = in.n, m = in.m, d = in.d, K = n_iter;
  const int64_t per = (2 * K + 1) * (n + m);
  const at::Tensor tape = tape_in.to(in.ct).contiguous();
  TORCH_CHECK_VALUE(tape.numel() == B * per, "tape does not match the problem sizes");
  const auto opt = at::TensorOptions().dtype(in.ct);
  auto vec = [&](const std::optional<at::Tensor>& t, int64_t len) {
    if (!t) return at::Tensor();
    at::Tensor r = t->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(r.numel() == B * len, "upstream gradient of the wrong size");
    return r;
  };
  const at::Tensor gv = vec(g_value, 1), gl = vec(g_lin, 1), gf = vec(g_f, n), gg = vec(g_g, m);
  const bool want_x = need[0] && in.x.defined(), want_y = need[1] && in.x.defined();
  const bool want_c = need[2] && in.cost.defined();
  const bool want_a = need[3] && in.a.defined(), want_b = need[4] && in.b.defined();
  const bool with_cbar = want_x || want_y || want_c;
  // Unwanted gradients come back empty (a fixed number of outputs keeps the schema simple).
  auto alloc = [&](bool want, at::IntArrayRef sizes) {
    return at::empty(want ? sizes : at::IntArrayRef{0}, opt);
  };
  at::Tensor gx = alloc(want_x, {B, n, d}), gy = alloc(want_y, {B, m, d});
  at::Tensor gc = alloc(want_c, {B, n, m}), ga = alloc(want_a, {B, n}), gb = alloc(want_b, {B, m});
  at::Tensor gf0 = at::empty({B, n}, opt), gg0 = at::empty({B, m}, opt);
  AT_DISPATCH_FLOATING_TYPES(in.ct, "sinkhorn_unrolled_bwd_cpu", [&] {
    using T = scalar_t;
    const Params<T> p = params<T>(in, eps, rho_a, rho_b, K, symmetric);
    const T* tape_ = tape.data_ptr<T>();
    for_problems(B, [&](int64_t begin, int64_t end) {
      Scratch<T> s(in, with_cbar && !want_c);
      for (int64_t bi = begin; bi < end; ++bi) {
        const T* c = s.cost(in, bi, kind);
        s.load_weights(in, bi);
        Tape<T> tp(const_cast<T*>(tape_) + bi * per, n, m, K);
        Adjoint<T> ad;
        ad.gv = gv.defined() ? gv.data_ptr<T>()[bi] : T(0);
        ad.gl = gl.defined() ? gl.data_ptr<T>()[bi] : T(0);
        ad.gf = gf.defined() ? gf.data_ptr<T>() + bi * n : nullptr;
        ad.gg = gg.defined() ? gg.data_ptr<T>() + bi * m : nullptr;
        ad.cbar = want_c ? gc.data_ptr<T>() + bi * n * m : (with_cbar ? s.cbar.data() : nullptr);
        ad.abar = want_a ? ga.data_ptr<T>() + bi * n : nullptr;
        ad.bbar = want_b ? gb.data_ptr<T>() + bi * m : nullptr;
        ad.fbar = gf0.data_ptr<T>() + bi * n;
        ad.gbar = gg0.data_ptr<T>() + bi * m;
        backward_entry(c, s.a.data(), s.b.data(), p, tp, ad, s.v1.data(), s.v2.data(),
                       s.v3.data());
        if (want_x || want_y)
          points_grads<T>(in.x.data_ptr<T>() + bi * n * d, in.y.data_ptr<T>() + bi * m * d,
                          ad.cbar, c, n, m, d, kind,
                          want_x ? gx.data_ptr<T>() + bi * n * d : nullptr,
                          want_y ? gy.data_ptr<T>() + bi * m * d : nullptr);
      }
    });
  });
  // Gradients in the dtype of their input.
  if (want_x) gx = gx.to(x->scalar_type());
  if (want_y) gy = gy.to(y->scalar_type());
  if (want_c) gc = gc.to(cost->scalar_type());
  return {gx, gy, gc, ga, gb, gf0, gg0};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("sinkhorn_unrolled_fwd_cpu", &sinkhorn_unrolled_fwd_cpu);
  m.impl("sinkhorn_unrolled_bwd_cpu", &sinkhorn_unrolled_bwd_cpu);
}

}  // namespace fdiv_kernels
