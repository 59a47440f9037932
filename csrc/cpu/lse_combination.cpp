// CPU row divergences that are weighted sums of three log-sum-exps, with their logit gradients.
//
// With a = student / T and b = teacher / T (after the optional logit transforms) and three
// terms k = 0, 1, 2 given by finite (ca_k, cb_k, w_k):
//   D = sum_k w_k lse(ca_k a + cb_k b),
//   dD/da = sum_k w_k ca_k softmax(ca_k a + cb_k b),  dD/db = sum_k w_k cb_k softmax(...).
// Cauchy-Schwarz is (2, 0, 1/2), (0, 2, 1/2), (1, 1, -1); Renyi (alpha != 1) is
// (1-alpha, alpha, 1/(alpha-1)), (1, 0, 1), (0, 1, alpha/(1-alpha)) (fdiv_kernels/divergences/_row_kinds.py
// states both, and why). One row at a time (rows over torch's thread pool): the transformed pair
// goes to a per-thread buffer (16-bit rows are widened there); one pass finds the three maxima,
// one the three sums (block sums in the compute type, accumulated in double: the terms cancel as
// p -> q), one writes the gradients (in double when wide_grad(): a coefficient below 0 or above 2,
// or a weighted one above 1 in magnitude, as Renyi's teacher side alpha / (alpha - 1) (r - p),
// whose float terms would cancel). A coefficient 0 contributes 0, also against a -inf logit; a
// -inf from a positive coefficient beats the +inf of a negative one (that outcome has no mass),
// and a term with a +inf entry has lse = +inf (D = +inf), left out of the gradient.
//
// Logit transforms, per input, in this order (0 softcap = none):
//   z <- z * scale;  z <- cap * tanh(z / cap);  a = z / T,
// so da/dz = scale (1 - (z/cap)^2) / T with z the capped value, recovered from a: no buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/convert.h"
#include "cpu/logit_transform.h"
#include "cpu/online_softmax.h"
#include "cpu/pair_rows.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

constexpr int kTerms = 3;

// One input's transform: z * scale, then the softcap, then / T.
struct Transform {
  double scale, cap, inv_t;
};

struct Coeffs {
  std::array<double, kTerms> ca, cb, w;
  // The gradient pass in double (triton_kernels/lse_combination.py: wide_grad).
  bool wide_grad() const {
    for (int k = 0; k < kTerms; ++k)
      if (!(ca[k] >= 0 && ca[k] <= 2 && cb[k] >= 0 && cb[k] <= 2) ||
          std::abs(w[k] * ca[k]) > 1 || std::abs(w[k] * cb[k]) > 1)
        return true;
    return false;
  }
};

template <class T>
FDIV_INLINE T shift_of(T m) {  // an all -inf term is shifted by 0: exp(-inf - 0) = 0, not NaN
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// c x with 0 (-inf) = 0: a zero coefficient drops the input.
template <class T>
FDIV_INLINE T times(T c, T x) {
  return c == T(0) ? T(0) : c * x;
}

// ca a + cb b; -inf from either side wins over the +inf of a negative coefficient.
template <class T>
FDIV_INLINE T mix(T ca, T a, T cb, T b) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T x = times(ca, a), y = times(cb, b);
  return x == kNegInf || y == kNegInf ? kNegInf : x + y;
}

// The mix of a term: with both coefficients >= 0 the plain sum already gives -inf where it
// must (and never +inf), and vectorizes as before; mix() only for a negative coefficient.
template <bool kNeg, class T>
FDIV_INLINE T mix_of(T ca, T a, T cb, T b) {
  if constexpr (kNeg) return mix(ca, a, cb, b);
  else return times(ca, a) + times(cb, b);
}

// One term's shift (its max, 0 when all -inf) and log-sum: the max pass, then the sum pass.
template <bool kNeg, class T>
FDIV_INLINE void term_stats(const T* a, const T* b, int64_t n, double ca, double cb,
                            double& shift, double& log_sum) {
  double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j)
    m = std::max(m, mix_of<kNeg>(ca, double(a[j]), cb, double(b[j])));
  const double sh = shift_of(m);
  shift = sh;
  if (sh == std::numeric_limits<double>::infinity()) {  // a +inf entry: lse = +inf
    log_sum = 0;
    return;
  }
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j)
    sum += exp_nonpositive(mix_of<kNeg>(ca, double(a[j]), cb, double(b[j])) - sh);
  log_sum = std::log(sum);
}

// The input's transform with 1 / T folded in (the chain rule's factor too).
template <class T>
LogitTransform<T> logit_transform(const Transform& tr) {
  return {T(tr.scale), T(tr.cap)};
}

// g[j] *= d(transformed)/d(raw) at j: scale (1 - (z / cap)^2) / T, z = a T from the row a.
template <class T>
FDIV_INLINE void chain_rule(T* g, const T* a, int64_t n, const Transform& tr) {
  chain_block(g, a, n, logit_transform<T>(tr), T(tr.inv_t));
}

// Per term: log softmax_k(j) = (x_kj - shift_k) - log_sum_k, the shift first (x - (m + log s)
// would lose eps |x| to rounding).
struct RowStats {
  double loss;
  std::array<double, kTerms> shift, log_sum;
};

// The three log-sum-exps in double, exps included: the terms cancel as p -> q (Cauchy-Schwarz:
// D ~ 1e-6 while each lse ~ 10), where float exps alone would leave ~3e-7 of rounding. The mixes
// are formed in double too (a + b rounded to float is off by eps |a + b|).
template <class T>
FDIV_INLINE RowStats row_stats(const T* a, const T* b, int64_t n, const Coeffs& c) {
  RowStats r{};
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) nan |= int(a[j] != a[j]) | int(b[j] != b[j]);
  for (int k = 0; k < kTerms; ++k) {
    const double ca = c.ca[k], cb = c.cb[k];
    if (ca >= 0 && cb >= 0)
      term_stats<false>(a, b, n, ca, cb, r.shift[k], r.log_sum[k]);
    else
      term_stats<true>(a, b, n, ca, cb, r.shift[k], r.log_sum[k]);
  }
  // The shifts, which carry the large magnitudes, combine first (for Cauchy-Schwarz they cancel
  // exactly on identical rows); then the small log-sums. A term with no mass (lse = -inf, e.g.
  // a + b on disjoint supports) makes D = +inf for a negative weight.
  double shifts = 0, logs = 0;
  for (int k = 0; k < kTerms; ++k) {
    shifts += c.w[k] * r.shift[k];
    logs += c.w[k] * r.log_sum[k];
  }
  r.loss = nan ? std::numeric_limits<double>::quiet_NaN() : shifts + logs;
  return r;
}

// Per-ISA clones of the sums pass (AVX-512 / AVX2 / baseline), as the divergence kernels do.
FDIV_CLONES RowStats stats_float(const float* a, const float* b, int64_t n, const Coeffs& c) {
  return row_stats(a, b, n, c);
}
RowStats stats_double(const double* a, const double* b, int64_t n, const Coeffs& c) {
  return row_stats(a, b, n, c);
}
FDIV_INLINE RowStats stats(const float* a, const float* b, int64_t n, const Coeffs& c) {
  return stats_float(a, b, n, c);
}
FDIV_INLINE RowStats stats(const double* a, const double* b, int64_t n, const Coeffs& c) {
  return stats_double(a, b, n, c);
}

// Whether term k enters the gradient: a weight, and a finite lse (no mass: -inf; +inf entries).
FDIV_INLINE bool grad_term_live(const RowStats& r, int k, double wk) {
  return wk != 0 && r.log_sum[k] != -std::numeric_limits<double>::infinity() &&
         r.shift[k] != std::numeric_limits<double>::infinity();
}

// acc[j] += w exp(mix(ca a_j, cb b_j) - off), the mix and its exp in double (<= 0: a term's
// log-softmax). A zero coefficient drops its input at compile time (ZA, ZB): decided per element,
// the condition kept GCC from vectorizing the loop at all.
template <bool ZA, bool ZB, class T>
FDIV_INLINE void add_term(double* __restrict acc, const T* __restrict a, const T* __restrict b,
                          int64_t len, double w, double ca, double cb, double off) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    double x = 0, y = 0;
    if constexpr (!ZA) x = ca * double(a[j]);
    if constexpr (!ZB) y = cb * double(b[j]);
    const double m = (x == kNegInf) | (y == kNegInf) ? kNegInf : x + y;  // as mix()
    acc[j] += w * exp_nonpositive(std::min(0.0, m - off));
  }
}

template <class T>
FDIV_INLINE void add_term(double* acc, const T* a, const T* b, int64_t len, double w, double ca,
                          double cb, double off) {
  if (ca == 0 && cb == 0) add_term<true, true>(acc, a, b, len, w, ca, cb, off);
  else if (ca == 0) add_term<true, false>(acc, a, b, len, w, ca, cb, off);
  else if (cb == 0) add_term<false, true>(acc, a, b, len, w, ca, cb, off);
  else add_term<false, false>(acc, a, b, len, w, ca, cb, off);
}

// g = sum_k w_k c_k softmax_k (c = ca for the student, cb for the teacher), then the chain rule
// of x's transform. A term with no mass (log_sum = -inf) is left out rather than NaN.
template <class T>
FDIV_INLINE void row_grad(T* g, const T* x, const T* a, const T* b, int64_t n, const RowStats& r,
                          const Coeffs& c, const std::array<double, kTerms>& cx,
                          const Transform& tr) {
  std::fill(g, g + n, T(0));
  if (c.wide_grad()) {
    // Exponents, exps and the sum in double, rounded once. A dead term has w = 0 (skipped).
    std::array<double, kTerms> w{}, ca{}, cb{}, off{};
    for (int k = 0; k < kTerms; ++k) {
      const double wk = c.w[k] * cx[k];
      if (!grad_term_live(r, k, wk)) continue;
      w[k] = wk;
      ca[k] = c.ca[k];
      cb[k] = c.cb[k];
      off[k] = r.shift[k] + r.log_sum[k];
    }
    // In blocks of a double accumulator on the stack, term by term (loops that vectorize).
    constexpr int64_t kAcc = 256;
    double acc[kAcc];
    for (int64_t j0 = 0; j0 < n; j0 += kAcc) {
      const int64_t len = std::min(kAcc, n - j0);
      const T* aj = a + j0;
      const T* bj = b + j0;
      std::fill(acc, acc + len, 0.0);
      for (int k = 0; k < kTerms; ++k)
        if (w[k] != 0) add_term(acc, aj, bj, len, w[k], ca[k], cb[k], off[k]);
      for (int64_t j = 0; j < len; ++j) g[j0 + j] = T(acc[j]);
    }
    chain_rule(g, x, n, tr);
    return;
  }
  for (int k = 0; k < kTerms; ++k) {
    const double wk = c.w[k] * cx[k];
    if (!grad_term_live(r, k, wk)) continue;
    const T w = T(wk), ca = T(c.ca[k]), cb = T(c.cb[k]), sh = T(r.shift[k]), ls = T(r.log_sum[k]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      g[j] += w * vexp(((times(ca, a[j]) + times(cb, b[j])) - sh) - ls);
  }
  chain_rule(g, x, n, tr);
}

// Per-ISA clones of the gradient pass too: its exps (in double for wide_grad(), Renyi with alpha
// > 1) are most of the op's time, and the baseline ISA runs them two doubles at a time.
FDIV_CLONES void grad_float(float* g, const float* x, const float* a, const float* b, int64_t n,
                            const RowStats& r, const Coeffs& c,
                            const std::array<double, kTerms>& cx, const Transform& tr) {
  row_grad(g, x, a, b, n, r, c, cx, tr);
}
void grad_double(double* g, const double* x, const double* a, const double* b, int64_t n,
                 const RowStats& r, const Coeffs& c, const std::array<double, kTerms>& cx,
                 const Transform& tr) {
  row_grad(g, x, a, b, n, r, c, cx, tr);
}
FDIV_INLINE void grad(float* g, const float* x, const float* a, const float* b, int64_t n,
                      const RowStats& r, const Coeffs& c, const std::array<double, kTerms>& cx,
                      const Transform& tr) {
  grad_float(g, x, a, b, n, r, c, cx, tr);
}
FDIV_INLINE void grad(double* g, const double* x, const double* a, const double* b, int64_t n,
                      const RowStats& r, const Coeffs& c, const std::array<double, kTerms>& cx,
                      const Transform& tr) {
  grad_double(g, x, a, b, n, r, c, cx, tr);
}

template <class scalar_t, class T>
void run(const PairRows<scalar_t, T>& io, const Coeffs& c, const Transform& ts,
         const Transform& tt) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t n = io.n;
  const LogitTransform<T> xs = logit_transform<T>(ts), xt = logit_transform<T>(tt);

  at::parallel_for(0, io.rows, 1, [&](int64_t begin, int64_t end) {
    // Per thread, O(n): the transformed pair, and for 16-bit rows a float gradient row.
    std::vector<T> buf(size_t(n * (kWide ? 2 : 3)));
    T* const a_buf = buf.data();
    T* const b_buf = a_buf + n;
    T* const g16 = kWide ? nullptr : b_buf + n;
    for (int64_t i = begin; i < end; ++i) {
      if (io.skip(i)) continue;
      const int64_t off = i * n;
      scalar_t* gsr = io.grad_s(i);
      scalar_t* gtr = io.grad_t(i);
      const T* a = load_block(a_buf, io.s + off, n, xs, T(ts.inv_t));
      const T* b = load_block(b_buf, io.t + off, n, xt, T(tt.inv_t));
      const RowStats r = stats(a, b, n, c);
      io.loss[i] = T(r.loss);
      if constexpr (kWide) {
        if (gsr) grad(gsr, a, a, b, n, r, c, c.ca, ts);
        if (gtr) grad(gtr, b, a, b, n, r, c, c.cb, tt);
      } else {
        if (gsr) {
          grad(g16, a, a, b, n, r, c, c.ca, ts);
          narrow_block(gsr, g16, n);
        }
        if (gtr) {
          grad(g16, b, a, b, n, r, c, c.cb, tt);
          narrow_block(gtr, g16, n);
        }
      }
    }
  });
}

void check_transform(double scale, double cap, const char* who) {
  TORCH_CHECK_VALUE(std::isfinite(scale), who, "_scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(cap) && cap >= 0, who,
                    "_softcap must be finite and >= 0 (0: none), got ", cap);
}

Coeffs checked_coeffs(at::ArrayRef<double> coeffs) {
  TORCH_CHECK_VALUE(coeffs.size() == 3 * kTerms, "coeffs must hold ", 3 * kTerms,
                    " numbers (ca, cb, w per term), got ", coeffs.size());
  Coeffs c;
  for (int k = 0; k < kTerms; ++k) {
    c.ca[k] = coeffs[3 * k];
    c.cb[k] = coeffs[3 * k + 1];
    c.w[k] = coeffs[3 * k + 2];
    TORCH_CHECK_VALUE(std::isfinite(c.ca[k]) && std::isfinite(c.cb[k]) && std::isfinite(c.w[k]),
                      "coeffs must be finite, got term ", k, " = (", c.ca[k], ", ", c.cb[k],
                      ", ", c.w[k], ")");
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_combination_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
    at::ArrayRef<double> coeffs, double inv_temperature, double student_scale,
    double student_softcap, double teacher_scale, double teacher_softcap, bool grad_student,
    bool grad_teacher) {
  // KL's id: any valid base passes the shared check; no element kind is used here.
  check_divergence_args(student, teacher, valid, KL, kCpuTarget);
  check_transform(student_scale, student_softcap, "student");
  check_transform(teacher_scale, teacher_softcap, "teacher");
  const Coeffs c = checked_coeffs(coeffs);
  const auto dt = student.scalar_type();
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), v = valid.contiguous();
  const auto opts = student.options();
  at::Tensor loss = at::empty({s.size(0)}, opts.dtype(stats_dtype(dt)));
  at::Tensor gs = grad_student ? at::empty(s.sizes(), s.options()) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty(t.sizes(), t.options()) : at::empty({0}, opts);
  const Transform ts{student_scale, student_softcap, inv_temperature};
  const Transform tt{teacher_scale, teacher_softcap, inv_temperature};
  dispatch_logits(dt, [&]<class S, class T>() {
    run(PairRows<S, T>(s, t, v, loss, gs, gt, grad_student, grad_teacher), c, ts, tt);
  });
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("lse_combination_fwd_cpu", &lse_combination_fwd_cpu); }

}  // namespace fdiv_kernels
