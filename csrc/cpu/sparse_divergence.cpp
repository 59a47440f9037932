// CPU forward of the divergence against a sparse (top-k) teacher: loss per row, the dense
// student-logit gradient and d loss / d (teacher log-probs, tail log-prob).
//
// One row at a time (rows over torch's thread pool):
//   1. online log-sum-exp L of a = x * inv_T over the whole row (online_softmax.h; skipped under
//      "renormalize", whose normalizer is over the support only);
//   2. O(K): gather a_S, lq_i = a_i - L, the element terms (common/divergence_terms.h) of the K
//      entries and, under "bucket", of the tail outcome; H = sum_S h;
//   3. the dense gradient write, q_j times a per-row coefficient (zeros under "renormalize"),
//      then the K support entries overwritten with their own value.
// Under "bucket" the student tail q_tail = sum over the columns off S. When the support holds
// less than half the mass, 1 - sum_S q (log1mexp) is accurate; otherwise a second read of the
// row sums the off-support exps directly (a per-thread mark array flags S), so a tail of 1e-20
// is still exact rather than lost to the rounding of 1 - sum_S q.
// The math and its statement of record: fdiv_kernels/_sparse_divergence.py and
// sparse_divergence_fwd_torch in fdiv_kernels/backends/torch_ref.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/divergence_terms.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

// Tail ids: fdiv_kernels/_sparse_tails.py.

template <class T>
struct Terms3 {
  T t, h, k;
};

// (term, d/dlq, d/dlp) of one outcome; swap evaluates the base kind with p and q exchanged.
template <int B, class T>
FDIV_INLINE Terms3<T> eval_terms(const KindConsts<T>& c, bool swap, T lp, T lq) {
  const T p = vexp(lp), q = vexp(lq);
  if (swap) {
    const Elem<T> e = Terms<B>::template eval<CpuMath>(c, lq, lp, q, p);
    return {e.t, e.k, e.h};
  }
  const Elem<T> e = Terms<B>::template eval<CpuMath>(c, lp, lq, p, q);
  return {e.t, e.h, e.k};
}

template <class T>
Terms3<T> terms(int base, const KindConsts<T>& c, bool swap, T lp, T lq) {
  switch (base) {
    case KL: return eval_terms<KL>(c, swap, lp, lq);
    case JS: return eval_terms<JS>(c, swap, lp, lq);
    case TV: return eval_terms<TV>(c, swap, lp, lq);
    case HELLINGER: return eval_terms<HELLINGER>(c, swap, lp, lq);
    case CHI2: return eval_terms<CHI2>(c, swap, lp, lq);
    case ALPHA: return eval_terms<ALPHA>(c, swap, lp, lq);
    case SKEW_KL: return eval_terms<SKEW_KL>(c, swap, lp, lq);
    case SOFT_CE: return eval_terms<SOFT_CE>(c, swap, lp, lq);
    default: return eval_terms<JEFFREYS>(c, swap, lp, lq);
  }
}

// log(1 - exp(x)), x <= 0 (Maechler 2012).
FDIV_INLINE double log1mexp(double x) {
  return x > -0.6931471805599453 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// ---- the row passes (T = compute type, contiguous T input; 16-bit rows go through a buffer) ---

// sum over unmarked columns of exp(scale x - lse).
template <class T>
FDIV_INLINE double off_support_sum(const T* x, const uint8_t* mark, T scale, T lse, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = vexp(x[j] * scale - lse);
    s += mark[j] ? T(0) : e;
  }
  return double(s);
}

// out[j] = (c q_j + c_tail min(1, q_j inv_qt)) inv_t, q_j = exp(scale x_j - lse).
template <bool TAIL, class T>
FDIV_INLINE void dense_grad(const T* x, T* out, T scale, T lse, T c, T c_tail, T inv_qt, T inv_t,
                            int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T q = vexp(x[j] * scale - lse);
    T g = c * q;
    if constexpr (TAIL) g += c_tail * std::min(T(1), q * inv_qt);
    out[j] = g * inv_t;
  }
}

// The per-ISA entry points: one per compute type.
#define FDIV_SPARSE_ENTRY(T, ATTR)                                                           \
  ATTR void lse_entry(const T* x, T scale, int64_t n, OnlineSoftmax<T>& acc) {               \
    online_lse(x, scale, n, acc);                                                            \
  }                                                                                          \
  ATTR double off_entry(const T* x, const uint8_t* mark, T scale, T lse, int64_t n) {        \
    return off_support_sum(x, mark, scale, lse, n);                                          \
  }                                                                                          \
  ATTR void grad_entry(const T* x, T* out, T scale, T lse, T c, T c_tail, T inv_qt, T inv_t, \
                       int64_t n) {                                                          \
    if (c_tail != T(0)) dense_grad<true>(x, out, scale, lse, c, c_tail, inv_qt, inv_t, n);   \
    else dense_grad<false>(x, out, scale, lse, c, c_tail, inv_qt, inv_t, n);                 \
  }
FDIV_SPARSE_ENTRY(float, FDIV_CLONES)
FDIV_SPARSE_ENTRY(double, )
#undef FDIV_SPARSE_ENTRY

// Row views in the compute type: the row itself (fp32 / fp64) or a widened block of it.
template <class scalar_t, class T>
struct RowReader {
  const scalar_t* x;
  T* buf;  // kBlock T, narrow dtypes only
  template <class F>
  FDIV_INLINE void blocks(int64_t n, F&& f) const {
    if constexpr (std::is_same_v<scalar_t, T>) {
      f(x, int64_t(0), n);
    } else {
      for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
        const int64_t len = std::min(kBlock, n - j0);
        widen_block(buf, x + j0, len);
        f(static_cast<const T*>(buf), j0, len);
      }
    }
  }
};

struct Args {
  int base;
  bool swap;
  double param, inv_t;
  int tail;
  bool grad_s, grad_t;
  // Backward mode: the forward's per-row (lse, lq_tail) and the incoming per-row gradient; the
  // row passes of the forward are skipped and only the gradient (times grad_loss) is written.
  const at::Tensor* stats_in = nullptr;
  const at::Tensor* grad_loss = nullptr;
};

template <class scalar_t, class T>
void run(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& lp, const at::Tensor& lp_tail,
         const at::Tensor& support, const at::Tensor& valid, const Args& A, at::Tensor& loss,
         at::Tensor& gs, at::Tensor& gt, at::Tensor& stats) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = x.size(0), n = x.size(1), K = ids.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const T* lpp = lp.const_data_ptr<T>();
  const T* ltp = lp_tail.const_data_ptr<T>();
  const bool* sp = support.const_data_ptr<bool>();
  const bool* vp = valid.const_data_ptr<bool>();
  const bool bwd = A.stats_in != nullptr;
  T* lossp = bwd ? nullptr : loss.mutable_data_ptr<T>();
  T* statp = bwd ? nullptr : stats.mutable_data_ptr<T>();
  const T* stat_in = bwd ? A.stats_in->const_data_ptr<T>() : nullptr;
  const T* gl = bwd ? A.grad_loss->const_data_ptr<T>() : nullptr;
  scalar_t* gsp = A.grad_s ? gs.mutable_data_ptr<scalar_t>() : nullptr;
  T* gtp = A.grad_t ? gt.mutable_data_ptr<T>() : nullptr;
  const KindConsts<T> consts(A.param);
  const T inv_t = T(A.inv_t);
  const bool bucket = A.tail == TAIL_BUCKET, renorm = A.tail == TAIL_RENORMALIZE;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kWide ? 0 : size_t(2 * kBlock));
    std::vector<uint8_t> mark(bucket ? size_t(n) : 0);
    std::vector<T> lq(static_cast<size_t>(K)), h(static_cast<size_t>(K));
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * n;
      const int64_t* idr = idp + i * K;
      const bool* sr = sp + i * K;
      scalar_t* gr = gsp ? gsp + i * n : nullptr;
      T* gtr = gtp ? gtp + i * (K + 1) : nullptr;
      if (!vp[i]) {
        if (lossp) lossp[i] = T(0);
        if (statp) statp[2 * i] = statp[2 * i + 1] = T(0);
        if (gr) std::fill(gr, gr + n, scalar_t(0));
        if (gtr) std::fill(gtr, gtr + K + 1, T(0));
        continue;
      }
      const RowReader<scalar_t, T> rd{xr, buf.data()};
      // 1. the normalizer: over the row, or over S when renormalizing.
      double lse;
      if (bwd) {
        lse = double(stat_in[2 * i]);
      } else if (renorm) {
        double m = -std::numeric_limits<double>::infinity(), s = 0;
        for (int64_t k = 0; k < K; ++k)
          if (sr[k]) m = std::max(m, double(T(static_cast<T>(xr[idr[k]]) * inv_t)));
        if (m == -std::numeric_limits<double>::infinity()) {
          lse = m;
        } else {
          for (int64_t k = 0; k < K; ++k)
            if (sr[k]) s += std::exp(double(T(static_cast<T>(xr[idr[k]]) * inv_t)) - m);
          lse = m + std::log(s);
        }
      } else {
        OnlineSoftmax<T> acc;
        rd.blocks(n, [&](const T* b, int64_t, int64_t len) { lse_entry(b, inv_t, len, acc); });
        lse = acc.lse();
      }
      const T L = T(lse);
      // 2. the K entries.
      double loss_i = 0, H = 0, qs_max = -std::numeric_limits<double>::infinity(), qs_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (!sr[k]) {
          lq[k] = kNegInf;
          h[k] = T(0);
          if (gtr) gtr[k] = T(0);
          continue;
        }
        lq[k] = T(static_cast<T>(xr[idr[k]]) * inv_t) - L;
        const Terms3<T> e = terms(A.base, consts, A.swap, lpp[i * K + k], lq[k]);
        loss_i += double(e.t);
        H += double(e.h);
        h[k] = e.h;
        if (gtr) gtr[k] = e.k;
        qs_max = std::max(qs_max, double(lq[k]));
      }
      if (qs_max > -std::numeric_limits<double>::infinity())
        for (int64_t k = 0; k < K; ++k)
          if (sr[k]) qs_sum += std::exp(double(lq[k]) - qs_max);
      // log sum_S q, at most 0.
      const double mass = qs_sum > 0 ? std::min(0.0, qs_max + std::log(qs_sum))
                                     : -std::numeric_limits<double>::infinity();
      double h_tail = 0, lq_tail = -std::numeric_limits<double>::infinity();
      if (bucket) {
        if (bwd) {
          lq_tail = double(stat_in[2 * i + 1]);
        } else if (mass < -0.6931471805599453 || !std::isfinite(lse)) {
          lq_tail = log1mexp(mass);
        } else {
          for (int64_t k = 0; k < K; ++k)
            if (sr[k]) mark[size_t(idr[k])] = 1;
          double off = 0;
          rd.blocks(n, [&](const T* b, int64_t j0, int64_t len) {
            off += off_entry(b, mark.data() + j0, inv_t, L, len);
          });
          for (int64_t k = 0; k < K; ++k)
            if (sr[k]) mark[size_t(idr[k])] = 0;
          lq_tail = std::log(off);
        }
        const Terms3<T> e = terms(A.base, consts, A.swap, ltp[i], T(lq_tail));
        loss_i += double(e.t);
        h_tail = double(e.h);
        if (gtr) gtr[K] = e.k;
      } else if (gtr) {
        gtr[K] = T(0);
      }
      if (!renorm) loss_i += double(L - L);  // NaN logits: NaN loss
      if (lossp) {
        lossp[i] = T(loss_i);
        statp[2 * i] = L;
        statp[2 * i + 1] = T(lq_tail);
      }
      if (!gr) continue;
      // The incoming gradient of the row folds into every coefficient (backward mode).
      const double rs = gl ? double(gl[i]) : 1.0;
      // 3. the dense gradient, then the support entries.
      double c = -H * rs, c_tail = 0, inv_qt = 0, c_sup = H;
      if (bucket) {
        c_sup = H + h_tail;
        // The tail term off S: h_tail Q_S q_j / q_tail with the ratio clamped to 1; dropped
        // when the tail is empty or too small for 1 / q_tail to be finite.
        if (h_tail != 0 && lq_tail > -80.0) {
          c_tail = h_tail * std::exp(mass) * rs;
          inv_qt = std::exp(-lq_tail);
        }
      }
      if (renorm) {
        std::fill(gr, gr + n, scalar_t(0));
      } else if constexpr (kWide) {
        grad_entry(xr, gr, inv_t, L, T(c), T(c_tail), T(inv_qt), inv_t, n);
      } else {
        T* out = buf.data() + kBlock;
        rd.blocks(n, [&](const T* b, int64_t j0, int64_t len) {
          grad_entry(b, out, inv_t, L, T(c), T(c_tail), T(inv_qt), inv_t, len);
          narrow_block(gr + j0, out, len);
        });
      }
      for (int64_t k = 0; k < K; ++k)
        if (sr[k]) {
          const double q = std::exp(double(lq[k]));
          gr[idr[k]] = static_cast<scalar_t>(T((double(h[k]) - q * c_sup) * rs * double(inv_t)));
        }
    }
  });
}

void dispatch(at::ScalarType dt, const at::Tensor& x, const at::Tensor& id, const at::Tensor& lp,
              const at::Tensor& lt, const at::Tensor& sup, const at::Tensor& val, const Args& A,
              at::Tensor& loss, at::Tensor& gs, at::Tensor& gt, at::Tensor& stats) {
  switch (dt) {
    case at::kFloat: run<float, float>(x, id, lp, lt, sup, val, A, loss, gs, gt, stats); break;
    case at::kDouble: run<double, double>(x, id, lp, lt, sup, val, A, loss, gs, gt, stats); break;
    case at::kBFloat16:
      run<at::BFloat16, float>(x, id, lp, lt, sup, val, A, loss, gs, gt, stats);
      break;
    default: run<at::Half, float>(x, id, lp, lt, sup, val, A, loss, gs, gt, stats); break;
  }
}

void check_inputs(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
                  const at::Tensor& teacher_tail, const at::Tensor& support,
                  const at::Tensor& valid, int64_t kind, int64_t tail) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1,
                    "student must be 2-D (N, V) with V >= 1, got ", student.sizes());
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == N, "ids must be (", N, ", K), got ",
                    ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  const auto dt = student.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "student must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(teacher.sizes() == ids.sizes(), "teacher must have the shape of ids ",
                    ids.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(support.sizes() == ids.sizes() && support.scalar_type() == at::kBool,
                    "support must be a bool tensor of the shape of ids");
  TORCH_CHECK_VALUE(teacher_tail.dim() == 1 && teacher_tail.size(0) == N,
                    "teacher_tail must have shape (", N, ",), got ", teacher_tail.sizes());
  TORCH_CHECK_VALUE(valid.dim() == 1 && valid.size(0) == N && valid.scalar_type() == at::kBool,
                    "valid must be a bool tensor of shape (", N, ",)");
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "kind must be in [0, ", kNumKinds, "), got ",
                    kind);
  TORCH_CHECK_VALUE(tail >= 0 && tail < kNumTails, "tail must be a tail id in [0, ", kNumTails, "), got ", tail);
  for (const at::Tensor* t : {&student, &ids, &teacher, &teacher_tail, &support, &valid})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "sparse_divergence ops need CPU tensors");
  // Ids on the support are checked by the Python API; never read outside the row regardless.
  TORCH_CHECK_VALUE(!(support & ((ids < 0) | (ids >= student.size(1)))).any().item<bool>(),
                    "ids must be in [0, V) on the support");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
    const at::Tensor& teacher_tail, const at::Tensor& support, const at::Tensor& valid,
    int64_t kind, bool swap, double param, double inv_temperature, int64_t tail,
    bool grad_student, bool grad_teacher) {
  check_inputs(student, ids, teacher, teacher_tail, support, valid, kind, tail);
  const int64_t N = student.size(0), K = ids.size(1);
  const auto dt = student.scalar_type();
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = student.contiguous(), id = ids.contiguous(), sup = support.contiguous(),
                   val = valid.contiguous();
  const at::Tensor lp = teacher.to(ct).contiguous(), lt = teacher_tail.to(ct).contiguous();
  const auto opts = x.options();
  at::Tensor loss = at::empty({N}, opts.dtype(ct));
  at::Tensor gs = grad_student ? at::empty_like(x) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty({N, K + 1}, opts.dtype(ct)) : at::empty({0}, opts);
  at::Tensor stats = at::empty({N, 2}, opts.dtype(ct));
  if (N == 0) return {loss, gs, gt, stats};
  const Args A{int(kind), swap, param, inv_temperature, int(tail), grad_student, grad_teacher};
  dispatch(dt, x, id, lp, lt, sup, val, A, loss, gs, gt, stats);
  return {loss, gs, gt, stats};
}

// d loss / d student logits, scaled per row by grad_loss, from the forward's stats: one read of
// the row and one write (the same passes as a softmax backward).
at::Tensor sparse_divergence_bwd_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
    const at::Tensor& teacher_tail, const at::Tensor& support, const at::Tensor& valid,
    const at::Tensor& stats, const at::Tensor& grad_loss, int64_t kind, bool swap, double param,
    double inv_temperature, int64_t tail) {
  check_inputs(student, ids, teacher, teacher_tail, support, valid, kind, tail);
  const int64_t N = student.size(0);
  const auto ct = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({N, 2}), "stats must be (", N, ", 2), got ",
                    stats.sizes());
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must be (", N,
                    ",), got ", grad_loss.sizes());
  const at::Tensor x = student.contiguous(), id = ids.contiguous(), sup = support.contiguous(),
                   val = valid.contiguous();
  const at::Tensor lp = teacher.to(ct).contiguous(), lt = teacher_tail.to(ct).contiguous();
  const at::Tensor st = stats.to(ct).contiguous(), gl = grad_loss.to(ct).contiguous();
  at::Tensor gs = at::empty_like(x), none = at::empty({0}, x.options());
  if (N == 0) return gs;
  Args A{int(kind), swap, param, inv_temperature, int(tail), true, false};
  A.stats_in = &st;
  A.grad_loss = &gl;
  dispatch(x.scalar_type(), x, id, lp, lt, sup, val, A, none, gs, none, none);
  return gs;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("sparse_divergence_fwd_cpu", &sparse_divergence_fwd_cpu);
  m.impl("sparse_divergence_bwd_cpu", &sparse_divergence_bwd_cpu);
}

}  // namespace fdiv_kernels
