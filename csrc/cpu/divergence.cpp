// CPU forward of every softmax divergence: loss per row plus the logit gradients of that loss.
//
// One row at a time (rows spread over torch's thread pool), three passes over the row:
//   1. online log-sum-exp of a = student * inv_T and b = teacher * inv_T (one read of each),
//      keeping the exps, so q and p later cost a multiply instead of an exp;
//   2. the element terms: sum t (the loss), sum h, sum k; h and k parked in the gradient rows;
//   3. grad_a = (h - q sum h) inv_T, grad_b = (k - p sum k) inv_T, in place.
// KL with no teacher gradient skips pass 3: h = -p sums to exactly -1, so grad_a = (q - p) inv_T
// is known in pass 2. Half-precision inputs are widened to a float row buffer first and their
// gradients are rounded once, from float, at the end. Swap (reverse kinds) exchanges the roles
// of student and teacher, which is all that "evaluate with (lp, lq) exchanged, exchange (h, k)"
// amounts to. Logit transforms (scale, softcap; cpu/logit_transform.h) are applied to the row in
// the per-thread buffer first, and the gradient rows multiplied by their derivative last. The
// student's entropy -sum q log q comes out of the term pass (one more accumulator).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "cpu/divergence_terms.h"
#include "cpu/convert.h"
#include "cpu/logit_transform.h"
#include "cpu/online_softmax.h"
#include "cpu/pair_rows.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

// Per-thread O(V) scratch for one row: the kept exps of both rows and their per-block shifts.
template <class T>
struct Scratch {
  T *ea, *eb, *sa, *sb;
};

inline int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// g = (g - prob * total) inv_t, in place; prob = e * (its block's scale), as in the term pass.
template <class T>
FDIV_INLINE void finish_grad(T* g, const T* e, const T* scale, int64_t n, T total, T inv_t) {
  for (int64_t j0 = 0, blk = 0; j0 < n; j0 += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - j0);
    T* gb = g + j0;
    const T* eb = e + j0;
    const T c = scale[blk];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) gb[j] = (gb[j] - eb[j] * c * total) * inv_t;
  }
}

// A row's loss and the entropy -sum q log q of the student's distribution.
struct RowOut {
  double loss, ent;
};

// The loss of one row; ga / gb receive the gradients when GA / GB.
template <int B, bool GA, bool GB, class T>
FDIV_INLINE RowOut divergence_row(const T* a, const T* b, T* ga, T* gb, int64_t n, T inv_t,
                                  const KindConsts<T>& c, const Scratch<T>& w, bool ent_b) {
  const MaxLogSum<T> ra = row_lse(a, inv_t, n, w.ea, w.sa);
  const MaxLogSum<T> rb = row_lse(b, inv_t, n, w.eb, w.sb);
  block_scales(w.sa, num_blocks(n), ra, w.sa);
  block_scales(w.sb, num_blocks(n), rb, w.sb);
  // NaN logits make the loss NaN even where the terms' guards would hide them.
  const double poison_a = ra.lse() - ra.lse(), poison_b = rb.lse() - rb.lse();
  // log q = (a - m) - log s: the row max first (see MaxLogSum).
  const T ma = ra.m, lsa = ra.log_s_t, mb = rb.m, lsb = rb.log_s_t;
  double sum_t = 0.0, sum_h = 0.0, sum_k = 0.0, sum_e = 0.0;
  // h = -p sums to -1: the student gradient needs no second pass.
  constexpr bool kFusedKL = B == KL && !GB;

  for (int64_t j0 = 0, blk = 0; j0 < n; j0 += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - j0);
    const T *ab = a + j0, *bb = b + j0, *eab = w.ea + j0, *ebb = w.eb + j0;
    const T ca = w.sa[blk], cb = w.sb[blk];
    T* gab = GA ? ga + j0 : nullptr;
    T* gbb = GB ? gb + j0 : nullptr;
    // The student's side for its entropy (b when swapped), chosen here per block: a select of p
    // or q inside the loop kept GCC from vectorizing it (1.6x the time of fused KL).
    const T *xe = ent_b ? bb : ab, *ee = ent_b ? ebb : eab;
    const T ce = ent_b ? cb : ca, me = ent_b ? mb : ma, lse_e = ent_b ? lsb : lsa;
    T st = 0, sh = 0, sk = 0, se = 0;
#pragma omp simd reduction(+ : st, sh, sk, se)
    for (int64_t j = 0; j < len; ++j) {
      const T lq = (ab[j] * inv_t - ma) - lsa, lp = (bb[j] * inv_t - mb) - lsb;
      const T q = eab[j] * ca, p = ebb[j] * cb;
      const Elem<T> e = Terms<B>::template eval<CpuMath>(c, lp, lq, p, q);
      st += e.t;
      sh += e.h;
      sk += e.k;
      // The student's q log q, 0 log 0 = 0 (the same values as q, lq or p, lp above).
      const T pe = ee[j] * ce, le = (xe[j] * inv_t - me) - lse_e;
      se += pe > T(0) ? pe * le : T(0);
      if constexpr (kFusedKL && GA) gab[j] = (q - p) * inv_t;
      else if constexpr (GA) gab[j] = e.h;
      if constexpr (GB) gbb[j] = e.k;
    }
    sum_t += double(st);
    sum_h += double(sh);
    sum_k += double(sk);
    sum_e += double(se);
  }
  if constexpr (GA && !kFusedKL) finish_grad(ga, w.ea, w.sa, n, T(sum_h), inv_t);
  if constexpr (GB) finish_grad(gb, w.eb, w.sb, n, T(sum_k), inv_t);
  return {sum_t + poison_a + poison_b, -sum_e + (ent_b ? poison_b : poison_a)};
}

template <class T>
struct RowArgs {
  const T *a, *b;
  T *ga, *gb;  // nullptr: gradient not wanted
  int64_t n;
  T inv_t;
  const KindConsts<T>* c;
  Scratch<T> w;
  bool ent_b;  // the student is side b (swapped): its entropy is the one wanted
};

// Compile-time dispatch over (kind, which gradients), fully inlined into the caller so that the
// whole row kernel lands in each target clone.
template <int B, class T>
FDIV_INLINE RowOut dispatch_row(int base, const RowArgs<T>& r) {
  if constexpr (B < kNumKinds) {
    if (base != B) return dispatch_row<B + 1>(base, r);
    if (r.ga && r.gb)
      return divergence_row<B, true, true>(r.a, r.b, r.ga, r.gb, r.n, r.inv_t, *r.c, r.w, r.ent_b);
    if (r.ga)
      return divergence_row<B, true, false>(r.a, r.b, r.ga, r.gb, r.n, r.inv_t, *r.c, r.w, r.ent_b);
    if (r.gb)
      return divergence_row<B, false, true>(r.a, r.b, r.ga, r.gb, r.n, r.inv_t, *r.c, r.w, r.ent_b);
    return divergence_row<B, false, false>(r.a, r.b, r.ga, r.gb, r.n, r.inv_t, *r.c, r.w, r.ent_b);
  } else {
    return {0.0, 0.0};  // unreachable: the kind was checked on entry
  }
}

FDIV_CLONES RowOut row_float(int base, const RowArgs<float>& r) { return dispatch_row<0>(base, r); }

RowOut row_double(int base, const RowArgs<double>& r) { return dispatch_row<0>(base, r); }

// Per-ISA clones of the gradient's chain rule (the rows' conversions are load_row / narrow_row,
// cpu/convert.h): called once per row, outside the cloned row kernel.
FDIV_CLONES void chain(float* g, const float* z, int64_t n, const LogitTransform<float>& x) {
  chain_block(g, z, n, x);
}
void chain(double* g, const double* z, int64_t n, const LogitTransform<double>& x) {
  chain_block(g, z, n, x);
}

// scalar_t: storage type; T: compute type (float for fp32/bf16/fp16, double for fp64).
template <class scalar_t, class T>
void run(const PairRows<scalar_t, T>& io, T* ent, int base, bool swap, double param,
         double inv_temperature, const LogitTransform<T>& xs, const LogitTransform<T>& xt) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t n = io.n;
  const bool want_s = io.gs != nullptr, want_t = io.gt != nullptr;
  const KindConsts<T> consts(param);
  const T inv_t = T(inv_temperature);
  // A side gets a row buffer when it is widened or transformed; narrow dtypes also get float
  // gradient rows, rounded once at the end.
  const bool own_s = !kWide || !xs.identity(), own_t = !kWide || !xt.identity();

  const int64_t blocks = num_blocks(n);
  at::parallel_for(0, io.rows, 1, [&](int64_t begin, int64_t end) {
    // Per thread, O(n): the kept exps and block shifts, the owned rows, the float gradients.
    const int64_t extra = n * (own_s + own_t + (kWide ? 0 : want_s + want_t));
    std::vector<T> buf(size_t(2 * n + 2 * blocks + extra));
    T* const base_ptr = buf.data();
    const Scratch<T> w{base_ptr, base_ptr + n, base_ptr + 2 * n, base_ptr + 2 * n + blocks};
    T* const row_s = base_ptr + 2 * n + 2 * blocks;
    T* const row_t = row_s + (own_s ? n : 0);
    T* const grad_s = row_t + (own_t ? n : 0);
    T* const grad_t = grad_s + (want_s ? n : 0);
    for (int64_t i = begin; i < end; ++i) {
      if (io.skip(i)) {
        ent[i] = T(0);
        continue;
      }
      const int64_t off = i * n;
      scalar_t* gsr = io.grad_s(i);
      scalar_t* gtr = io.grad_t(i);
      // The gradient rows in the compute type: the outputs, or float rows rounded at the end.
      T* g_s = nullptr;
      T* g_t = nullptr;
      if constexpr (kWide) {
        g_s = gsr;
        g_t = gtr;
      } else {
        g_s = want_s ? grad_s : nullptr;
        g_t = want_t ? grad_t : nullptr;
      }
      RowArgs<T> r{load_row(row_s, io.s + off, n, xs), load_row(row_t, io.t + off, n, xt),
                   g_s, g_t, n, inv_t, &consts, w, swap};
      if (swap) {
        std::swap(r.a, r.b);
        std::swap(r.ga, r.gb);
      }
      RowOut o;
      if constexpr (std::is_same_v<T, float>) o = row_float(base, r);
      else o = row_double(base, r);
      io.loss[i] = T(o.loss);
      ent[i] = T(o.ent);
      // The gradient rows (g_s / g_t keep their owners through a swap) times the transforms'
      // derivatives, then rounded once for narrow dtypes.
      if (g_s && !xs.identity()) chain(g_s, row_s, n, xs);
      if (g_t && !xt.identity()) chain(g_t, row_t, n, xt);
      if constexpr (!kWide) {
        if (want_s) narrow_row(gsr, grad_s, n);
        if (want_t) narrow_row(gtr, grad_t, n);
      }
    }
  });
}

// scale finite and nonzero, softcap 0 (none) or positive and finite: the public API checks
// them with clearer messages; this guards direct op calls.
void check_transform(double scale, double softcap, const char* scale_name,
                     const char* softcap_name) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, scale_name,
                    " must be finite and nonzero, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, softcap_name,
                    " must be finite and >= 0 (0: no softcap), got ", softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind,
    bool swap, double param, double inv_temperature, double student_scale,
    double student_softcap, double teacher_scale, double teacher_softcap, bool grad_student,
    bool grad_teacher) {
  check_divergence_args(student, teacher, valid, kind, kCpuTarget);
  check_transform(student_scale, student_softcap, "student_scale", "student_softcap");
  check_transform(teacher_scale, teacher_softcap, "teacher_scale", "teacher_softcap");
  const auto dt = student.scalar_type();

  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), v = valid.contiguous();
  const auto opts = student.options();
  at::Tensor loss = at::empty({s.size(0)}, opts.dtype(stats_dtype(dt)));
  at::Tensor ent = at::empty({s.size(0)}, opts.dtype(stats_dtype(dt)));
  at::Tensor gs = grad_student ? at::empty(s.sizes(), s.options()) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty(t.sizes(), t.options()) : at::empty({0}, opts);
  const int base = int(kind);
  dispatch_logits(dt, [&]<class S, class T>() {
    const LogitTransform<T> xs{T(student_scale), T(student_softcap)};
    const LogitTransform<T> xt{T(teacher_scale), T(teacher_softcap)};
    const PairRows<S, T> io(s, t, v, loss, gs, gt, grad_student, grad_teacher);
    run(io, ent.mutable_data_ptr<T>(), base, swap, param, inv_temperature, xs, xt);
  });
  return {loss, gs, gt, ent};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("divergence_fwd_cpu", &divergence_fwd_cpu); }

}  // namespace fdiv_kernels
