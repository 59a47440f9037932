// CPU Cauchy-Schwarz divergence of softmax rows, with its logit gradients.
//
// With a = student / T and b = teacher / T (after the optional logit transforms), q = softmax(a),
// p = softmax(b), the per-row log-sum-exps of the definition cancel:
//   D_CS = -log sum p q + 1/2 log sum p^2 + 1/2 log sum q^2
//        = 1/2 lse(2a) + 1/2 lse(2b) - lse(a + b),
//   dD/da = softmax(2a) - softmax(a + b),   dD/db = softmax(2b) - softmax(a + b).
// One row at a time (rows over torch's thread pool): the transformed row pair goes to a per-thread
// buffer (16-bit rows are widened there), one pass finds the three maxima, one the three sums
// (block sums in the compute type, accumulated in double: D_CS -> 0 as p -> q, where the three
// terms cancel), one writes the gradients. The row-sum design of the divergence kernels, with
// three sums instead of (t, h, k); fdiv_kernels/_row_kinds.py states it in torch.
//
// Logit transforms, per input, in this order (0 softcap = none):
//   z <- z * scale;  z <- cap * tanh(z / cap);  a = z / T,
// so da/dz = scale (1 - (z/cap)^2) / T with z the capped value, recovered from a: no buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/convert.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

// One input's transform: z * scale, then the softcap, then / T.
struct Transform {
  double scale, cap, inv_t;
};

template <class T>
FDIV_INLINE T shift_of(T m) {  // an all -inf row is shifted by 0: exp(-inf - 0) = 0, not NaN
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// dst = transform(src), in the compute type.
template <class T>
void transform_row(T* dst, const T* src, int64_t n, const Transform& tr) {
  const T scale = T(tr.scale), inv_t = T(tr.inv_t);
  if (tr.cap > 0) {
    const T cap = T(tr.cap), inv_cap = T(1.0 / tr.cap);
    for (int64_t j = 0; j < n; ++j) dst[j] = cap * std::tanh(src[j] * scale * inv_cap) * inv_t;
  } else {
    const T f = scale * inv_t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * f;
  }
}

// g[j] *= d(transformed)/d(raw) at j: scale (1 - tanh^2) / T, tanh = a T / cap.
template <class T>
void chain_rule(T* g, const T* a, int64_t n, const Transform& tr) {
  const T f = T(tr.scale * tr.inv_t);
  if (tr.cap > 0) {
    const T k = T(1.0 / (tr.inv_t * tr.cap));
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T th = a[j] * k;
      g[j] *= f * (T(1) - th * th);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= f;
  }
}

// log softmax(2a)_j = 2 (a_j - sa) - ls2a, log softmax(a + b)_j = (a_j + b_j - sab) - lsab:
// shift first, then the log-sum (x - (m + log s) would lose eps |x| to rounding).
template <class T>
struct RowStats {
  double loss;
  T sa, sb, sab;
  double ls2a, ls2b, lsab;
};

// The three log-sum-exps and the loss of the transformed row pair (a, b).
template <class T>
RowStats<T> row_stats(const T* a, const T* b, int64_t n) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T ma = kNegInf, mb = kNegInf, mab = kNegInf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    nan |= (a[j] != a[j]) || (b[j] != b[j]);
    ma = std::max(ma, a[j]);
    mb = std::max(mb, b[j]);
    mab = std::max(mab, a[j] + b[j]);
  }
  const T sa = shift_of(ma), sb = shift_of(mb), sab = shift_of(mab);
  double s2a = 0, s2b = 0, sab_sum = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    T ea = 0, eb = 0, eab = 0;
#pragma omp simd reduction(+ : ea, eb, eab)
    for (int64_t j = j0; j < j0 + len; ++j) {
      ea += vexp(T(2) * (a[j] - sa));
      eb += vexp(T(2) * (b[j] - sb));
      eab += vexp((a[j] + b[j]) - sab);
    }
    s2a += double(ea);
    s2b += double(eb);
    sab_sum += double(eab);
  }
  RowStats<T> r{0.0, sa, sb, sab, std::log(s2a), std::log(s2b), std::log(sab_sum)};
  // The shifts, which carry the large magnitudes, cancel first; then the small log-sums.
  // Disjoint supports: every a + b = -inf, sab = 0, log(0) = -inf, D = +inf.
  r.loss = (double(sa) + double(sb) - double(sab)) + (0.5 * r.ls2a + 0.5 * r.ls2b - r.lsab);
  if (nan) r.loss = std::numeric_limits<double>::quiet_NaN();
  return r;
}

// g = softmax(2x) - softmax(a + b), then the chain rule of x's transform. Disjoint supports
// (lab = -inf, D = +inf): the second term is left out rather than NaN.
template <class T>
void row_grad(T* g, const T* x, const T* a, const T* b, int64_t n, T sx, double ls2x,
              const RowStats<T>& r, const Transform& tr) {
  const T l2 = T(ls2x), sab = r.sab, lab = T(r.lsab);
  const bool joint = r.lsab != -std::numeric_limits<double>::infinity();
  const T on = joint ? T(1) : T(0);
  const T lab_safe = joint ? lab : T(0);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T own = vexp(T(2) * (x[j] - sx) - l2);
    const T mix = vexp(((a[j] + b[j]) - sab) - lab_safe) * on;
    g[j] = own - mix;
  }
  chain_rule(g, x, n, tr);
}

template <class scalar_t, class T>
void run(const at::Tensor& s, const at::Tensor& t, const at::Tensor& valid, const Transform& ts,
         const Transform& tt, at::Tensor& loss, at::Tensor& gs, at::Tensor& gt, bool want_s,
         bool want_t) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t rows = s.size(0), n = s.size(1);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const bool* vp = valid.const_data_ptr<bool>();
  T* lp = loss.mutable_data_ptr<T>();
  scalar_t* gsp = want_s ? gs.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gtp = want_t ? gt.mutable_data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // Per thread, O(n): the transformed pair, and for 16-bit rows a float gradient row.
    std::vector<T> buf(size_t(n * (kWide ? 2 : 3)));
    T* const a = buf.data();
    T* const b = a + n;
    T* const g16 = kWide ? nullptr : b + n;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * n;
      scalar_t* gsr = gsp ? gsp + off : nullptr;
      scalar_t* gtr = gtp ? gtp + off : nullptr;
      if (!vp[i]) {
        lp[i] = T(0);
        if (gsr) std::fill(gsr, gsr + n, scalar_t(0));
        if (gtr) std::fill(gtr, gtr + n, scalar_t(0));
        continue;
      }
      if constexpr (kWide) {
        transform_row(a, sp + off, n, ts);
        transform_row(b, tp + off, n, tt);
      } else {
        widen_block(a, sp + off, n);
        widen_block(b, tp + off, n);
        transform_row(a, a, n, ts);
        transform_row(b, b, n, tt);
      }
      const RowStats<T> r = row_stats(a, b, n);
      lp[i] = T(r.loss);
      if constexpr (kWide) {
        if (gsr) row_grad(gsr, a, a, b, n, r.sa, r.ls2a, r, ts);
        if (gtr) row_grad(gtr, b, a, b, n, r.sb, r.ls2b, r, tt);
      } else {
        if (gsr) {
          row_grad(g16, a, a, b, n, r.sa, r.ls2a, r, ts);
          narrow_block(gsr, g16, n);
        }
        if (gtr) {
          row_grad(g16, b, a, b, n, r.sb, r.ls2b, r, tt);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> cauchy_schwarz_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
    double inv_temperature, double student_scale, double student_softcap, double teacher_scale,
    double teacher_softcap, bool grad_student, bool grad_teacher) {
  // KL's id: any valid base passes the shared check; the kind itself is not used.
  check_divergence_args(student, teacher, valid, KL, kCpuTarget);
  check_transform(student_scale, student_softcap, "student");
  check_transform(teacher_scale, teacher_softcap, "teacher");
  const auto dt = student.scalar_type();
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), v = valid.contiguous();
  const auto opts = student.options();
  at::Tensor loss = at::empty({s.size(0)}, opts.dtype(stats_dtype(dt)));
  at::Tensor gs = grad_student ? at::empty_like(s) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty_like(t) : at::empty({0}, opts);
  const Transform ts{student_scale, student_softcap, inv_temperature};
  const Transform tt{teacher_scale, teacher_softcap, inv_temperature};
  switch (dt) {
    case at::kFloat:
      run<float, float>(s, t, v, ts, tt, loss, gs, gt, grad_student, grad_teacher);
      break;
    case at::kDouble:
      run<double, double>(s, t, v, ts, tt, loss, gs, gt, grad_student, grad_teacher);
      break;
    case at::kBFloat16:
      run<at::BFloat16, float>(s, t, v, ts, tt, loss, gs, gt, grad_student, grad_teacher);
      break;
    default:
      run<at::Half, float>(s, t, v, ts, tt, loss, gs, gt, grad_student, grad_teacher);
      break;
  }
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("cauchy_schwarz_fwd_cpu", &cauchy_schwarz_fwd_cpu); }

}  // namespace fdiv_kernels
