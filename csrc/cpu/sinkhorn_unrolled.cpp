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
// The cost rows of a problem (row stride ldc), the loop over problems, the dual's phi and the
// point gradients are the shared ones of sinkhorn_problem.h (as the solve and gradient ops).
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

#include "cpu/sinkhorn_problem.h"
#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

using namespace sinkhorn;  // NOLINT: the shared cost, per-problem loop, phi and point gradients

template <class T>
struct Params {
  T eps, ei, ka, kb, half;  // half: the weight of the LSE step, 1/2 when symmetric
  double rho_a, rho_b;
  int64_t n, m, K, ldc;     // ldc: the row stride of the cost rows
  bool symmetric;
};

// The tape of one problem: f^0..f^K, g^0..g^K, then Lr^1..Lr^K, Lc^1..Lc^K (the LSEs).
template <class T>
struct Tape {
  T *f, *g, *lr, *lc;
  Tape(T* t, int64_t n, int64_t m, int64_t K)
      : f(t), g(t + (K + 1) * n), lr(t + (K + 1) * (n + m)), lc(t + (K + 1) * (n + m) + K * n) {}
};

// Per-problem weights: a (n,), la = log a (-inf where a = 0); uniform when src is null.
template <class T>
void weights(const T* src, int64_t n, T* a, T* la) {
  for (int64_t i = 0; i < n; ++i) {
    a[i] = src ? src[i] : T(1) / T(n);
    la[i] = a[i] > 0 ? std::log(a[i]) : -std::numeric_limits<T>::infinity();
  }
}

// The row update's LSEs out[i] = LSE_j(h_j - c_ij ei) of an (n, m) cost of row stride ldc, two
// passes per row (max, then the sum of exps against it); the logs are taken together at the end,
// in one vectorized loop rather than one libm call per row. An all -inf row is -inf. mx: n.
template <class T>
FDIV_INLINE void cost_rows_lse(const T* c, int64_t ldc, const T* h, T ei, int64_t n, int64_t m,
                               T* out, T* mx) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = c + i * ldc;
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

// The column update's LSEs out[j] = LSE_i(h_i - c_ij ei), rows streamed (the cost is row-major,
// row stride ldc), zero-weight rows (h_i = -inf) skipped. mx: m.
template <class T>
FDIV_INLINE void cost_cols_lse(const T* c, int64_t ldc, const T* h, T ei, int64_t n, int64_t m,
                               T* out, T* mx) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < m; ++j) mx[j] = kNegInf, out[j] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] == kNegInf) continue;
    const T* ci = c + i * ldc;
    const T hi = h[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], hi - ci[j] * ei);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] == kNegInf) continue;
    const T* ci = c + i * ldc;
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
    cost_rows_lse(c, p.ldc, h, ei, n, m, lr, buf);
    for (int64_t i = 0; i < n; ++i)
      fk[i] = p.symmetric ? p.half * (fp[i] - p.ka * lr[i]) : -p.ka * lr[i];
    const T* fc = p.symmetric ? fp : fk;  // the f the column update reads
    for (int64_t i = 0; i < n; ++i) h[i] = la[i] + fc[i] * ei;
    cost_cols_lse(c, p.ldc, h, ei, n, m, lc, buf);
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
    const T* ci = c + i * p.ldc;
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
      const T* ci = c + i * p.ldc;
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
      const T* ci = c + i * p.ldc;
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

// Per-ISA entry points (target_clones); everything they call is inlined into them.
#define FDIV_UNROLLED_ENTRY(T, ATTR)                                                            \
  ATTR void forward_entry(const T* c, const T* a, const T* la, const T* b, const T* lb,          \
                          const Params<T>& p, Tape<T> tp, T* out, T* h, T* buf, T* colsum) {     \
    forward_problem<T>(c, a, la, b, lb, p, tp, out, h, buf, colsum);                             \
  }                                                                                              \
  ATTR void backward_entry(const T* c, const T* a, const T* b, const Params<T>& p, Tape<T> tp,   \
                           Adjoint<T> ad, T* fnew, T* u, T* q) {                                 \
    backward_problem<T>(c, a, b, p, tp, ad, fnew, u, q);                                         \
  }
FDIV_UNROLLED_ENTRY(float, FDIV_CLONES)
FDIV_UNROLLED_ENTRY(double, FDIV_CLONES)
#undef FDIV_UNROLLED_ENTRY

// The inputs of both ops: the cost source (dense, or padded points whose cost each task builds,
// as the solve and gradient ops), the weights in the compute type (undefined: uniform).
struct Inputs {
  CostSource src;
  at::Tensor a, b;
  at::ScalarType ct;
  int64_t B, n, m;
};

Inputs prepare(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
               const std::optional<at::Tensor>& cost, const std::optional<at::Tensor>& a,
               const std::optional<at::Tensor>& b, int64_t kind) {
  TORCH_CHECK_VALUE(cost || (x && y), "sinkhorn_unrolled needs points x, y or a cost");
  Inputs in;
  const at::Tensor& ref = cost ? *cost : *x;
  in.ct = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(ref.dim() == 3 && (cost || y->dim() == 3),
                    "cost (B, n, m) or points x (B, n, d), y (B, m, d) expected");
  in.B = ref.size(0), in.n = ref.size(1), in.m = cost ? cost->size(2) : y->size(1);
  in.src = cost_source(x, y, cost, in.ct, in.B, in.n, in.m, kind);
  auto weights_in = [&](const std::optional<at::Tensor>& w, int64_t len, const char* name) {
    if (!w) return at::Tensor();
    at::Tensor t = w->to(in.ct).contiguous();
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == in.B && t.size(1) == len, name,
                      " must be (B, ", len, "), got ", t.sizes());
    return t;
  };
  in.a = weights_in(a, in.n, "a");
  in.b = weights_in(b, in.m, "b");
  return in;
}

template <class T>
Params<T> params(const Inputs& in, double eps, double rho_a, double rho_b, int64_t K,
                 bool symmetric, int64_t ldc) {
  const double ta = rho_a <= 0 ? 1.0 : rho_a / (rho_a + eps);
  const double tb = rho_b <= 0 ? 1.0 : rho_b / (rho_b + eps);
  return Params<T>{T(eps), T(1.0 / eps), T(ta * eps), T(tb * eps), T(symmetric ? 0.5 : 1.0),
                   rho_a, rho_b, in.n, in.m, K, ldc, symmetric};
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

// Per-thread scratch (for_each_problem): the cost tile built from points, one problem's weights
// and vectors; cbar, the (n, m) cost gradient, only where the point gradients need it.
template <class T>
struct Scratch {
  AVec<T> tile, a, la, b, lb, h, buf, v1, v2, v3, cbar;
  void reserve(int64_t n, int64_t m, int64_t np, int64_t mp, bool points) {
    if (points) tile.resize(size_t(np * mp));
    a.resize(size_t(n)), la.resize(size_t(n)), b.resize(size_t(m)), lb.resize(size_t(m));
    h.resize(size_t(std::max(n, m))), buf.resize(size_t(std::max(n, m)));
    v1.resize(size_t(std::max(n, m))), v2.resize(size_t(m)), v3.resize(size_t(m));
  }

  void load_weights(const Inputs& in, int64_t bi) {
    weights<T>(in.a.defined() ? in.a.data_ptr<T>() + bi * in.n : nullptr, in.n, a.data(),
               la.data());
    weights<T>(in.b.defined() ? in.b.data_ptr<T>() + bi * in.m : nullptr, in.m, b.data(),
               lb.data());
  }
};

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
    T* tape_ = tape.data_ptr<T>();
    T* out_[3] = {value.data_ptr<T>(), lin.data_ptr<T>(), err.data_ptr<T>()};
    const T* f0_ = f0.defined() ? f0.data_ptr<T>() : nullptr;
    const T* g0_ = g0.defined() ? g0.data_ptr<T>() : nullptr;
    for_each_problem<T, Scratch<T>>(in.src, B, n, m,
                                    [&](int64_t bi, const T* c, int64_t ldc, Scratch<T>& s) {
      const Params<T> p = params<T>(in, eps, rho_a, rho_b, K, symmetric, ldc);
      s.load_weights(in, bi);
      Tape<T> tp(tape_ + bi * per, n, m, K);
      for (int64_t i = 0; i < n; ++i) tp.f[i] = f0_ ? f0_[bi * n + i] : T(0);
      for (int64_t j = 0; j < m; ++j) tp.g[j] = g0_ ? g0_[bi * m + j] : T(0);
      T res[3];
      forward_entry(c, s.a.data(), s.la.data(), s.b.data(), s.lb.data(), p, tp, res, s.h.data(),
                    s.buf.data(), s.v2.data());
      for (int r = 0; r < 3; ++r) out_[r][bi] = res[r];
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
  const int64_t B = in.B, n = in.n, m = in.m, K = n_iter;
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
  const bool points = !cost.has_value();
  const bool want_x = need[0] && points, want_y = need[1] && points;
  const bool want_c = need[2] && !points;
  const bool want_a = need[3] && in.a.defined(), want_b = need[4] && in.b.defined();
  // The points as given (the cost read them normalized for cosine): their gradients' inputs.
  const at::Tensor xs = want_x || want_y ? x->to(in.ct).contiguous() : at::Tensor();
  const at::Tensor ys = want_x || want_y ? y->to(in.ct).contiguous() : at::Tensor();
  // Unwanted gradients come back empty (a fixed number of outputs keeps the schema simple).
  auto alloc = [&](bool want, at::IntArrayRef sizes) {
    return at::empty(want ? sizes : at::IntArrayRef{0}, opt);
  };
  const int64_t d = points ? x->size(2) : 0;
  at::Tensor gx = alloc(want_x, {B, n, d}), gy = alloc(want_y, {B, m, d});
  at::Tensor gc = alloc(want_c, {B, n, m}), ga = alloc(want_a, {B, n}), gb = alloc(want_b, {B, m});
  at::Tensor gf0 = at::empty({B, n}, opt), gg0 = at::empty({B, m}, opt);
  AT_DISPATCH_FLOATING_TYPES(in.ct, "sinkhorn_unrolled_bwd_cpu", [&] {
    using T = scalar_t;
    const T* tape_ = tape.data_ptr<T>();
    for_each_problem<T, Scratch<T>>(in.src, B, n, m,
                                    [&](int64_t bi, const T* c, int64_t ldc, Scratch<T>& s) {
      const Params<T> p = params<T>(in, eps, rho_a, rho_b, K, symmetric, ldc);
      s.load_weights(in, bi);
      if ((want_x || want_y) && s.cbar.empty()) s.cbar.resize(size_t(n * m));
      Tape<T> tp(const_cast<T*>(tape_) + bi * per, n, m, K);
      Adjoint<T> ad;
      ad.gv = gv.defined() ? gv.data_ptr<T>()[bi] : T(0);
      ad.gl = gl.defined() ? gl.data_ptr<T>()[bi] : T(0);
      ad.gf = gf.defined() ? gf.data_ptr<T>() + bi * n : nullptr;
      ad.gg = gg.defined() ? gg.data_ptr<T>() + bi * m : nullptr;
      ad.cbar = want_c ? gc.data_ptr<T>() + bi * n * m : (s.cbar.empty() ? nullptr : s.cbar.data());
      ad.abar = want_a ? ga.data_ptr<T>() + bi * n : nullptr;
      ad.bbar = want_b ? gb.data_ptr<T>() + bi * m : nullptr;
      ad.fbar = gf0.data_ptr<T>() + bi * n;
      ad.gbar = gg0.data_ptr<T>() + bi * m;
      backward_entry(c, s.a.data(), s.b.data(), p, tp, ad, s.v1.data(), s.v2.data(),
                     s.v3.data());
      if (!(want_x || want_y)) return;
      T* q = s.cbar.data();
      if (kind == EUCLIDEAN)  // the shared point gradients read Q / (2 c) for euclidean (0 where c = 0)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < m; ++j) {
            const T cij = c[i * ldc + j];
            q[i * m + j] = cij > T(0) ? q[i * m + j] / (T(2) * cij) : T(0);
          }
      PointGrads<T> pg(xs[bi], ys[bi], kind);
      pg.add_rows(q, 0, n, want_x ? gx[bi] : at::Tensor(), want_y);
      if (want_y) pg.finish(gy[bi]);
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
