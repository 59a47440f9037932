// CPU kernels of the divergence against a sparse (top-k) teacher: loss per row, the dense
// student-logit gradient and d loss / d teacher log-probs, with everything O(K) done per row
// inside the kernel (no torch op around it):
//
//   0. checks of the row's teacher (ids in [0, V) and distinct on the support, and under
//      "bucket" a teacher mass on S of at most 1 + mass_slack): ValueError naming the argument;
//   1. the teacher's final log-probs from the raw ones, in double (tail 1 - sum_S p by log1mexp,
//      re-tempering by alpha = T_teacher / T, renormalization): prepare_teacher in
//      fdiv_kernels/divergences/_sparse_tails.py, the statement of record;
//   2. online log-sum-exp L of a = f(z) / T over the whole row (online_softmax.h), where
//      f(z) = c tanh(s z / c) (softcap c) or s z (logit scale s); skipped under "renormalize",
//      whose normalizer is over the support only;
//   3. O(K): gather a_S, lq_i = a_i - L, the element terms (common/divergence_terms.h) of the K
//      entries and, under "bucket", of the tail outcome; H = sum_S h; the teacher gradient
//      through step 1 (teacher_vjp in _sparse_tails.py);
//   4. the dense gradient, q_j times one per-row coefficient (zeros under "renormalize") times
//      f'(z_j) / T, then the K support entries overwritten with their own value.
// Under "bucket" the student tail q_tail = sum over the columns off S. When the support holds
// less than half the mass, 1 - sum_S q (log1mexp) is accurate; otherwise it is the sum of the
// off-support exps, taken apart in step 2's read of the row, and
// when that sum underflows a second read takes the online log-sum-exp of the off-support
// logits, so a tail of e^-110 is still exact rather than lost to the rounding of 1 - sum_S q or
// to the underflow of its exps. Off S the gradient q_j (-H) + h_tail Q_S q_j / q_tail is written as
// exp(a_j - L_off) (h_tail Q_S - H q_tail), L_off = L + lq_tail: no 1 / q_tail is formed.
// A support covering all V ids leaves no outcome for the teacher's tail (its mass deficit is
// rounding: an empty tail, and the check asks for a mass of 1 within the slack); a student tail
// of 0 drops a teacher tail within the slack (fdiv_kernels/_sparse_divergence.py).
// The backward launch redoes steps 0 (range only), 1 and 3 from the forward's per-row (L,
// lq_tail) and writes step 4 scaled by the incoming gradient: one read and one write of the row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/divergence_terms.h"
#include "cpu/logit_transform.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
constexpr double kLnHalf = -0.6931471805599453;

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

// The cases of a switch over the base kind id (checked on entry), each running X(B): the one
// list of kinds for this file's dispatches.
#define FDIV_KIND_CASES(X)                                                                   \
  case KL: X(KL) case JS: X(JS) case TV: X(TV) case HELLINGER: X(HELLINGER)               \
  case CHI2: X(CHI2) case ALPHA: X(ALPHA) case SKEW_KL: X(SKEW_KL)                         \
  case SOFT_CE: X(SOFT_CE) default: X(JEFFREYS)

template <class T>
Terms3<T> terms(int base, const KindConsts<T>& c, bool swap, T lp, T lq) {
#define FDIV_TERMS(B) return eval_terms<B>(c, swap, lp, lq);
  switch (base) { FDIV_KIND_CASES(FDIV_TERMS) }
#undef FDIV_TERMS
}

// log(1 - exp(x)), x <= 0 (Maechler 2012).
FDIV_INLINE double log1mexp(double x) {
  return x > kLnHalf ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// ---- step 1: the teacher side, O(K) per row in double ----------------------------------------

// log sum exp(w x_k) over the support; -inf when it is empty.
FDIV_INLINE double masked_lse(const double* x, const bool* sup, int64_t K, double w,
                              double extra = kNegInfD) {
  double m = extra;
  for (int64_t k = 0; k < K; ++k)
    if (sup[k]) m = std::max(m, w * x[k]);
  if (m == kNegInfD) return m;
  double s = std::exp(extra - m);
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += sup[k] ? exp_nonpositive(w * x[k] - m) : 0.0;
  return m + std::log(s);
}

// The teacher row: raw log-probs in, final log-probs out (prepare_teacher in _sparse_tails.py).
struct TeacherRow {
  double mass = kNegInfD;      // log sum_S p, raw
  double raw_tail = kNegInfD;  // log(1 - sum_S p) under "bucket" (-inf when S holds it all)
  double tail = kNegInfD;      // the final tail log-prob
  double a = 1.0;              // the power the entries are raised to (re-tempering)
  bool renorm = false;         // entries (and tail) renormalized after the power
  double z = 0.0;              // the log normalizer of that renormalization

  // covered: S holds every id of the row, so no outcome is left for the tail.
  void prepare(const double* raw, const bool* sup, int64_t K, int tail_mode, double alpha,
               bool covered, double* out) {
    mass = masked_lse(raw, sup, K, 1.0);
    a = alpha > 0 ? alpha : 1.0;
    z = 0.0;
    if (tail_mode == TAIL_BUCKET) {
      raw_tail = mass >= 0.0 || covered ? kNegInfD : log1mexp(mass);
      renorm = alpha > 0;
      if (renorm) z = masked_lse(raw, sup, K, a, a * raw_tail);
      tail = renorm ? (z == kNegInfD ? kNegInfD : a * raw_tail - z) : raw_tail;
    } else {
      // "renormalize" always, "none" only when re-tempered (as axolotl does).
      renorm = tail_mode == TAIL_RENORMALIZE || alpha > 0;
      if (renorm) z = masked_lse(raw, sup, K, a);
    }
    for (int64_t k = 0; k < K; ++k)
      out[k] = !sup[k] || (renorm && z == kNegInfD) ? kNegInfD : a * raw[k] - z;
  }

  // d loss / d raw from d loss / d final (kd on the K entries, kd_tail): teacher_vjp.
  void vjp(const double* raw, const double* fin, const bool* sup, int64_t K, bool bucket,
           const double* kd, double kd_tail, double* g) const {
    double sum_k = bucket ? kd_tail : 0.0;
    for (int64_t k = 0; k < K; ++k)
      if (sup[k]) sum_k += kd[k];
    double g_tail = kd_tail;
    if (renorm) g_tail = a * (kd_tail - (tail == kNegInfD ? 0.0 : std::exp(tail)) * sum_k);
    // d raw_tail / d raw_k = -p_k / p_tail; no tail mass: the tail does not move.
    const bool through_tail = bucket && raw_tail > kNegInfD && g_tail != 0.0;
    for (int64_t k = 0; k < K; ++k) {
      if (!sup[k]) {
        g[k] = 0.0;
        continue;
      }
      double gk = renorm ? a * (kd[k] - (fin[k] == kNegInfD ? 0.0 : std::exp(fin[k])) * sum_k)
                         : kd[k];
      if (through_tail) gk -= g_tail * std::exp(raw[k] - raw_tail);
      g[k] = gk;
    }
  }
};

// ---- step 0: distinct ids ----------------------------------------------------------------------

// The set of one row's support ids, for the duplicate check: open addressing in a table of 2K to
// 4K slots that stays in L1. (A mark per vocabulary column would be evicted by every row's pass,
// and its K random probes then miss the cache one after another.)
class IdSet {
 public:
  explicit IdSet(int64_t K) {
    size_t cap = 16;
    while (cap < size_t(2 * K)) cap <<= 1;
    slots_.assign(cap, -1);
    mask_ = cap - 1;
  }
  // Adds id (>= 0); false when it is already in the set.
  bool insert(int64_t id) {
    size_t h = size_t((uint64_t(id) * 0x9E3779B97F4A7C15ull) >> 40) & mask_;
    for (; slots_[h] != -1; h = (h + 1) & mask_)
      if (slots_[h] == id) return false;
    slots_[h] = id;
    return true;
  }
  void clear() { std::fill(slots_.begin(), slots_.end(), int64_t(-1)); }

 private:
  std::vector<int64_t> slots_;
  size_t mask_;
};

// ---- steps 2 and 4: the row passes (T = compute type) -----------------------------------------

// The unmarked columns of m1 b folded into an online log-sum-exp, block by block (max, then the
// exps against it): exact however far below the row's normalizer they sit.
template <class T>
FDIV_INLINE void off_support_lse(const T* b, const uint8_t* mark, T m1, int64_t n,
                                 OnlineSoftmax<T>& acc) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    const T* bb = b + j0;
    const uint8_t* mb = mark + j0;
    T bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < len; ++j) bm = std::max(bm, mb[j] ? kNegInf : bb[j] * m1);
    const T m = acc.rebase(bm);
    if (m == kNegInf) continue;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) {
      const T e = vexp(bb[j] * m1 - m);
      s += mb[j] ? T(0) : e;
    }
    acc.add(double(s));
  }
}

// exp(scale xb[j] - m) over j in [a, b): added to s, the largest scale xb[j] folded into bm.
template <class T>
FDIV_INLINE void exp_stretch(const T* xb, int64_t a, int64_t b, T scale, T m, T& s, T& bm) {
  T ls = 0, lm = bm;
#pragma omp simd reduction(max : lm) reduction(+ : ls)
  for (int64_t j = a; j < b; ++j) {
    const T xj = xb[j] * scale;
    lm = std::max(lm, xj);
    ls += vexp(xj - m);
  }
  s += ls;
  bm = lm;
}

// One block's exps against m, off the support (into off) and on it (into on, one column at a
// time), with the block's max: the block in stretches between its support columns cols[0:nc)
// (ascending), so no per-column mask is read.
template <class T>
FDIV_INLINE void split_block(const T* xb, int64_t len, const int64_t* cols, int64_t nc,
                             int64_t col0, T scale, T m, T& off, T& on, T& bm) {
  off = on = T(0);
  bm = -std::numeric_limits<T>::infinity();
  int64_t a = 0;
  for (int64_t r = 0; r < nc; ++r) {
    const int64_t c = cols[r] - col0;
    exp_stretch(xb, a, c, scale, m, off, bm);
    const T xc = xb[c] * scale;
    bm = std::max(bm, xc);
    on += vexp(xc - m);
    a = c + 1;
  }
  exp_stretch(xb, a, len, scale, m, off, bm);
}

// The online log-sum-exp of the row (online_lse's blocks and slack) with the exps of the
// off-support columns summed apart into `off`, relative to the running max: the "bucket" tail's
// off-support mass, off / acc.s, from the one read of the row that the normalizer makes anyway.
// sid: the support ids, ascending, over the whole row; this stretch of it starts at column
// `base`. Each block runs as vector loops between its support columns (about K / 32 of them at
// 128k columns) with those columns summed one by one: no per-column mask is read and no exps are
// stored. (A mask array read beside the exps cost a quarter of the normalizer's time at 64 x
// 128256; a second read of the row, 2.2x the forward time with a support holding 98% of the mass,
// the case of a teacher close to the student and of the student's own top-k.) The normalizer
// sums the same exps as online_lse in another order: equal to it up to rounding, not to the bit.
template <class T>
FDIV_INLINE void lse_and_off_support(const T* x, const int64_t* sid, int64_t n_sid, int64_t base,
                                     T scale, int64_t n, OnlineSoftmax<T>& acc, double& off) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr T kSlack = T(64);  // as lse_blocks: a block may exceed the running max by this
  int64_t p = 0;
  while (p < n_sid && sid[p] < base) ++p;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    const T* xb = x + j0;
    int64_t q = p;  // sid[p:q): this block's support columns
    while (q < n_sid && sid[q] < base + j0 + len) ++q;
    const T before = acc.m;
    T m = before, bo = 0, bs = 0, bm = kNegInf;
    bool done = false;
    if (m != kNegInf) {
      split_block(xb, len, sid + p, q - p, base + j0, scale, m, bo, bs, bm);
      done = !(bm > m + kSlack);
    } else {
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < len; ++j) bm = std::max(bm, xb[j] * scale);
    }
    if (!done) {
      // The first block with a finite value, or one far above the running max: against its max.
      m = acc.rebase(bm);
      if (m == kNegInf) {  // all -inf so far: only a NaN matters
        for (int64_t j = 0; j < len; ++j)
          if (xb[j] != xb[j]) acc.poison();
        p = q;
        continue;
      }
      T unused;
      split_block(xb, len, sid + p, q - p, base + j0, scale, m, bo, bs, unused);
    }
    acc.add(static_cast<double>(bo) + static_cast<double>(bs));
    acc.rebase(bm);
    const double to_m = static_cast<double>(acc.m);
    if (before != kNegInf && acc.m != before) off *= std::exp(static_cast<double>(before) - to_m);
    off += static_cast<double>(bo) * std::exp(static_cast<double>(m) - to_m);
    p = q;
  }
}

// out[j] = c q_j f'_j, q_j = exp(m1 b_j - lse), with f'_j = 1 - (b_j / cap)^2 under a softcap
// (b the capped logits), else 1; c already holds 1 / T and the logit scale. (The passes of a
// softmax backward: one read, one write.)
template <bool CAP, class T>
FDIV_INLINE void dense_grad(const T* b, T* out, T m1, T lse, T c, T inv_cap, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T g = c * vexp(b[j] * m1 - lse);
    if constexpr (CAP) g *= softcap_slope(b[j], inv_cap);
    out[j] = g;
  }
}

// Step 3 over the K entries of one kind, in one loop the compiler vectorizes: h and d/dlp per
// entry (0 on padding), the sums of the terms and of h added to loss and H.
template <int B, class T>
FDIV_INLINE void support_terms(const KindConsts<T>& c, bool swap, const double* lp, const T* lq,
                               const bool* sup, int64_t K, T* h, double* kd, double& loss,
                               double& H) {
  double ls = 0, hs = 0;
#pragma omp simd reduction(+ : ls, hs)
  for (int64_t k = 0; k < K; ++k) {
    const Terms3<T> e = eval_terms<B>(c, swap, T(lp[k]), lq[k]);
    const bool on = sup[k];
    h[k] = on ? e.h : T(0);
    kd[k] = on ? double(e.k) : 0.0;
    ls += on ? double(e.t) : 0.0;
    hs += on ? double(e.h) : 0.0;
  }
  loss += ls;
  H += hs;
}

template <class T>
FDIV_INLINE void support_terms_any(int base, const KindConsts<T>& c, bool swap, const double* lp,
                                   const T* lq, const bool* sup, int64_t K, T* h, double* kd,
                                   double& loss, double& H) {
#define FDIV_SUPPORT(B) return support_terms<B>(c, swap, lp, lq, sup, K, h, kd, loss, H);
  switch (base) { FDIV_KIND_CASES(FDIV_SUPPORT) }
#undef FDIV_SUPPORT
}

// sum over the support of exp(lq_k - m), m >= every lq_k, in double (each exp is at most 1, so
// a support of tiny probabilities keeps its log-mass).
template <class T>
FDIV_INLINE double support_sum(const T* lq, const bool* sup, T m, int64_t K) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += sup[k] ? double(vexp(lq[k] - m)) : 0.0;
  return s;
}

// The per-ISA entry points: one per compute type.
#define FDIV_SPARSE_ENTRY(T, ATTR)                                                            \
  ATTR void terms_entry(int base, const KindConsts<T>& c, bool swap, const double* lp,       \
                        const T* lq, const bool* sup, int64_t K, T* h, double* kd,           \
                        double& loss, double& H) {                                           \
    support_terms_any(base, c, swap, lp, lq, sup, K, h, kd, loss, H);                        \
  }                                                                                           \
  ATTR double shifted_sum(const T* lq, const bool* sup, T m, int64_t K) {                    \
    return support_sum(lq, sup, m, K);                                                        \
  }                                                                                           \
  ATTR void lse_entry(const T* x, T scale, int64_t n, OnlineSoftmax<T>& acc) {                \
    online_lse(x, scale, n, acc);                                                             \
  }                                                                                           \
  ATTR void lse_off_entry(const T* x, const int64_t* sid, int64_t n_sid, int64_t base,     \
                          T scale, int64_t n, OnlineSoftmax<T>& acc, double& off) {           \
    lse_and_off_support(x, sid, n_sid, base, scale, n, acc, off);                             \
  }                                                                                           \
  ATTR void off_lse_entry(const T* x, const uint8_t* mark, T scale, int64_t n,               \
                          OnlineSoftmax<T>& acc) {                                            \
    off_support_lse(x, mark, scale, n, acc);                                                  \
  }                                                                                           \
  ATTR void grad_entry(const T* b, T* out, T m1, T lse, T c, T inv_cap, bool cap,            \
                       int64_t n) {                                                           \
    if (cap) dense_grad<true>(b, out, m1, lse, c, inv_cap, n);                                \
    else dense_grad<false>(b, out, m1, lse, c, inv_cap, n);                                   \
  }
FDIV_SPARSE_ENTRY(float, FDIV_CLONES)
FDIV_SPARSE_ENTRY(double, )
#undef FDIV_SPARSE_ENTRY

// The row in blocks of the compute type: the row itself (fp32 / fp64, no softcap) or a block of
// it widened and / or softcapped into a per-thread buffer (one read of memory either way).
template <class scalar_t, class T>
struct RowReader {
  const scalar_t* x;
  T* buf;  // kBlock T, when a block must be formed
  bool cap;
  LogitTransform<T> xf;  // used only under cap (else the scale is folded into m1)
  template <class F>
  FDIV_INLINE void blocks(int64_t n, F&& f) const {
    if (std::is_same_v<scalar_t, T> && !cap) {
      f(reinterpret_cast<const T*>(x), int64_t(0), n);
      return;
    }
    const LogitTransform<T> z = cap ? xf : LogitTransform<T>{};
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t len = std::min(kBlock, n - j0);
      f(load_row(buf, x + j0, len, z), j0, len);
    }
  }
  // The transformed logit of one column (before the 1 / T).
  FDIV_INLINE T at(int64_t j) const {
    const T v = static_cast<T>(x[j]);
    return cap ? transform_one(v, xf) : v;
  }
};

struct Args {
  int base;
  bool swap;
  double param, inv_t;
  int tail;
  double alpha;       // re-tempering T_teacher / T; 0: none
  double mass_slack;  // "bucket": teacher mass on S accepted up to 1 + this
  double scale, cap;  // student logit transforms; cap 0: no softcap
  bool grad_s, grad_t;
  // Backward mode: the forward's per-row (lse, lq_tail) and the incoming per-row gradient; the
  // row passes of the forward are skipped and only the gradient (times grad_loss) is written.
  const at::Tensor* stats_in = nullptr;
  const at::Tensor* grad_loss = nullptr;
};

// The teacher's (N, K) ids and log-probs in the dtypes offline stores keep them (int32 / int64
// ids; fp16, bf16, fp32 or fp64 log-probs), read element by element into the row's int64 / double
// buffers: O(K) a row, no converted copy of the inputs.
struct TeacherInputs {
  const void* ids;
  bool ids32;
  const void* lp;
  at::ScalarType lp_type;

  int64_t id(int64_t j) const {
    return ids32 ? int64_t(static_cast<const int32_t*>(ids)[j])
                 : static_cast<const int64_t*>(ids)[j];
  }
  double logprob(int64_t j) const {
    switch (lp_type) {
      case at::kDouble: return static_cast<const double*>(lp)[j];
      case at::kFloat: return double(static_cast<const float*>(lp)[j]);
      case at::kHalf: return double(float(static_cast<const at::Half*>(lp)[j]));
      default: return double(float(static_cast<const at::BFloat16*>(lp)[j]));
    }
  }
};

template <class scalar_t, class T>
void run(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& lp,
         const at::Tensor& support, const at::Tensor& valid, const Args& A, at::Tensor& loss,
         at::Tensor& gs, at::Tensor& gt, at::Tensor& stats) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = x.size(0), n = x.size(1), K = ids.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const TeacherInputs teacher{ids.const_data_ptr(), ids.scalar_type() == at::kInt,
                              lp.const_data_ptr(), lp.scalar_type()};
  // Empty support / valid tensors: every entry real, every row kept.
  const bool* sp = support.numel() ? support.const_data_ptr<bool>() : nullptr;
  const bool* vp = valid.numel() ? valid.const_data_ptr<bool>() : nullptr;
  const bool bwd = A.stats_in != nullptr;
  T* lossp = bwd ? nullptr : loss.mutable_data_ptr<T>();
  T* statp = bwd ? nullptr : stats.mutable_data_ptr<T>();
  const T* stat_in = bwd ? A.stats_in->const_data_ptr<T>() : nullptr;
  const T* gl = bwd ? A.grad_loss->const_data_ptr<T>() : nullptr;
  scalar_t* gsp = A.grad_s ? gs.mutable_data_ptr<scalar_t>() : nullptr;
  T* gtp = A.grad_t ? gt.mutable_data_ptr<T>() : nullptr;
  const KindConsts<T> consts(A.param);
  const bool bucket = A.tail == TAIL_BUCKET, renorm = A.tail == TAIL_RENORMALIZE;
  const bool cap = A.cap > 0;
  // a = m1 b with b the row (times the scale folded into m1) or its softcapped values;
  // d a / d z = gm f'(z).
  const T m1 = T(cap ? A.inv_t : A.inv_t * A.scale), gm = T(A.inv_t * A.scale);
  const T inv_cap = cap ? T(1.0 / A.cap) : T(0);
  const LogitTransform<T> xf{T(A.scale), T(A.cap)};
  const bool need_buf = !kWide || cap;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(need_buf ? size_t(2 * kBlock) : 0);
    // The "bucket" forward's support ids, ascending; the mark array flags S for the rare
    // second read of the row (sized on first use, set and cleared around it).
    std::vector<int64_t> sid;
    sid.reserve(size_t(K));
    std::vector<uint8_t> mark;
    IdSet seen(K);
    const size_t nk = static_cast<size_t>(K);
    std::vector<T> lq(nk), h(nk), xs(nk);
    std::vector<double> raw(nk), fin(nk), kd(nk), gd(nk);
    std::vector<int64_t> row_ids(nk);
    const std::vector<uint8_t> ones(sp ? 0 : size_t(K), 1);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * n;
      for (int64_t k = 0; k < K; ++k) row_ids[size_t(k)] = teacher.id(i * K + k);
      const int64_t* idr = row_ids.data();
      const bool* sr = sp ? sp + i * K : reinterpret_cast<const bool*>(ones.data());
      scalar_t* gr = gsp ? gsp + i * n : nullptr;
      T* gtr = gtp ? gtp + i * K : nullptr;
      if (vp && !vp[i]) {
        if (lossp) lossp[i] = T(0);
        if (statp) statp[2 * i] = statp[2 * i + 1] = T(0);
        if (gr) std::fill(gr, gr + n, scalar_t(0));
        if (gtr) std::fill(gtr, gtr + K, T(0));
        continue;
      }
      // 0. the row's ids: in range (never read outside the row) and, in the forward, distinct.
      for (int64_t k = 0; k < K; ++k) {
        if (!sr[k]) continue;
        const int64_t id = idr[k];
        TORCH_CHECK_VALUE(id >= 0 && id < n, "teacher_ids must be in [0, ", n,
                          ") on the support, got ", id, " (row ", i, ")");
        if (!bwd)
          TORCH_CHECK_VALUE(seen.insert(id), "teacher_ids must not repeat an id within a row "
                            "(on the support): id ", id, " twice in row ", i);
      }
      if (!bwd) seen.clear();
      // 1. the teacher.
      for (int64_t k = 0; k < K; ++k) raw[k] = sr[k] ? teacher.logprob(i * K + k) : 0.0;
      TeacherRow tr;
      int64_t n_sup = 0;
      for (int64_t k = 0; k < K; ++k) n_sup += sr[k] ? 1 : 0;
      const bool covered = bucket && n_sup == n;  // the ids are distinct (checked above)
      tr.prepare(raw.data(), sr, K, A.tail, A.alpha, covered, fin.data());
      TORCH_CHECK_VALUE(bwd || !bucket ||
                            (!(tr.mass > std::log1p(A.mass_slack)) &&
                             !(covered && tr.mass < std::log1p(-A.mass_slack))),
                        "teacher_logprobs: under tail='bucket' the teacher mass on the support "
                        "must be at most 1 (+", A.mass_slack, " rounding), and 1 (-+",
                        A.mass_slack, ") where the support covers all ", n, " ids, got ",
                        std::exp(tr.mass), " (row ", i, ")");
      // Renormalizing over S needs some teacher mass there (all -inf would be 0 / 0); under
      // "bucket" the tail then holds it all.
      TORCH_CHECK_VALUE(bwd || bucket || !tr.renorm || n_sup == 0 || tr.z > kNegInfD,
                        "teacher_logprobs: renormalized over the support (tail='renormalize', or "
                        "tail='none' with a teacher_temperature), a row's teacher needs some mass "
                        "there; row ", i, " has every log-prob on its support -inf");
      const RowReader<scalar_t, T> rd{xr, buf.data(), cap, xf};
      // 2. the normalizer: over the row, or over S when renormalizing; under "bucket" the
      // off-support mass in the same read (relative to the normalizer: off / sum).
      double lse = 0, off_rel = 0;
      const bool fwd_bucket = bucket && !bwd;
      if (fwd_bucket) {
        sid.clear();
        for (int64_t k = 0; k < K; ++k)
          if (sr[k]) sid.push_back(idr[k]);
        std::sort(sid.begin(), sid.end());
      }
      if (bwd) {
        lse = double(stat_in[2 * i]);
      } else if (fwd_bucket) {
        OnlineSoftmax<T> acc;
        double off = 0;
        rd.blocks(n, [&](const T* b, int64_t j0, int64_t len) {
          lse_off_entry(b, sid.data(), int64_t(sid.size()), j0, m1, len, acc, off);
        });
        lse = acc.lse();
        off_rel = off / acc.s;
      } else if (!renorm) {
        OnlineSoftmax<T> acc;
        rd.blocks(n, [&](const T* b, int64_t, int64_t len) { lse_entry(b, m1, len, acc); });
        lse = acc.lse();
      }
      // The support's transformed logits, gathered in one loop of independent loads: K
      // scattered reads that mostly miss the cache (in the backward no pass has read the row
      // yet) overlap instead of waiting one by one behind the per-entry math below.
      for (int64_t k = 0; k < K; ++k) xs[k] = sr[k] ? rd.at(idr[k]) : T(0);
      if (renorm && !bwd) {
        double m = kNegInfD, s = 0;
        for (int64_t k = 0; k < K; ++k)
          if (sr[k]) m = std::max(m, double(T(xs[k] * m1)));
        if (m == kNegInfD) {
          lse = m;
        } else {
          for (int64_t k = 0; k < K; ++k)
            if (sr[k]) s += std::exp(double(T(xs[k] * m1)) - m);
          lse = m + std::log(s);
        }
      }
      const T L = T(lse);
      // 3. the K entries.
      T qs_max = kNegInf;
      for (int64_t k = 0; k < K; ++k) {
        lq[k] = sr[k] ? T(xs[k] * m1) - L : kNegInf;
        qs_max = std::max(qs_max, lq[k]);
      }
      double loss_i = 0, H = 0;
      terms_entry(A.base, consts, A.swap, fin.data(), lq.data(), sr, K, h.data(), kd.data(),
                  loss_i, H);
      const double qs_sum = qs_max > kNegInf ? shifted_sum(lq.data(), sr, qs_max, K) : 0.0;
      // log sum_S q, at most 0.
      const double mass =
          qs_sum > 0 ? std::min(0.0, double(qs_max) + std::log(qs_sum)) : kNegInfD;
      double h_tail = 0, kd_tail = 0, lq_tail = kNegInfD;
      if (bucket) {
        if (bwd) {
          lq_tail = double(stat_in[2 * i + 1]);
        } else if (mass < kLnHalf || !std::isfinite(lse)) {
          lq_tail = log1mexp(mass);
        } else {
          lq_tail = std::log(off_rel);
          // Below ~2^-100 the exps against the running max may have underflowed (all of them
          // past a gap of ~104 in float): the tail's log-mass from the off-support
          // log-sum-exp instead, one more read of the row, exact at any gap.
          if (!(off_rel > 0x1p-100)) {
            if (mark.empty()) mark.assign(size_t(n), 0);
            for (const int64_t id : sid) mark[size_t(id)] = 1;
            OnlineSoftmax<T> acc;
            rd.blocks(n, [&](const T* b, int64_t j0, int64_t len) {
              off_lse_entry(b, mark.data() + j0, m1, len, acc);
            });
            for (const int64_t id : sid) mark[size_t(id)] = 0;
            lq_tail = acc.lse() - lse;
          }
        }
        const Terms3<T> e = terms(A.base, consts, A.swap, T(tr.tail), T(lq_tail));
        // No student tail: a teacher tail within the slack is rounding, dropped (the backward,
        // which sees only q_tail = 0, drops it too: its gradient is used only when finite).
        const bool forgive =
            lq_tail == kNegInfD && (bwd || tr.tail <= std::log(A.mass_slack));
        if (!forgive) {
          loss_i += double(e.t);
          h_tail = double(e.h);
          kd_tail = double(e.k);
        }
      }
      if (!renorm) loss_i += double(L - L);  // NaN logits: NaN loss
      if (lossp) {
        lossp[i] = T(loss_i);
        statp[2 * i] = L;
        statp[2 * i + 1] = T(lq_tail);
      }
      if (gtr) {
        tr.vjp(raw.data(), fin.data(), sr, K, bucket, kd.data(), kd_tail, gd.data());
        for (int64_t k = 0; k < K; ++k) gtr[k] = T(gd[k]);
      }
      if (!gr) continue;
      // The incoming gradient of the row folds into every coefficient (backward mode).
      const double rs = gl ? double(gl[i]) : 1.0;
      // 4. the dense gradient, then the support entries. Off S the gradient is q_j times one
      // coefficient: -H, plus under "bucket" the tail's h_tail Q_S / q_tail (d lq_tail / d a_j =
      // q_j Q_S / q_tail there), taken as exp(a_j - L_off) (h_tail Q_S - H q_tail) with
      // L_off = L + lq_tail (q_j / q_tail <= 1 off S; on S, overwritten below, it may overflow).
      double c = -H, c_sup = H;
      T ref = L;
      if (bucket) {
        c_sup = H + h_tail;
        if (h_tail != 0 && lq_tail > kNegInfD) {
          c = h_tail * std::exp(mass) - H * std::exp(lq_tail);
          ref = T(lse + lq_tail);
        }
      }
      c *= rs * double(gm);
      if (renorm) {
        std::fill(gr, gr + n, scalar_t(0));
      } else {
        T* obuf = need_buf ? buf.data() + kBlock : nullptr;
        rd.blocks(n, [&](const T* b, int64_t j0, int64_t len) {
          if constexpr (kWide) {
            grad_entry(b, gr + j0, m1, ref, T(c), inv_cap, cap, len);
          } else {
            grad_entry(b, obuf, m1, ref, T(c), inv_cap, cap, len);
            narrow_block(gr + j0, obuf, len);
          }
        });
      }
      // The support entries' values in one vectorized loop (lq <= 0 up to rounding), then
      // the K scattered writes.
      const double gs_row = rs * double(gm);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        double d = (double(h[k]) - exp_nonpositive(double(lq[k])) * c_sup) * gs_row;
        if (cap) d *= softcap_slope(double(xs[k]), double(inv_cap));
        gd[k] = d;
      }
      for (int64_t k = 0; k < K; ++k)
        if (sr[k]) gr[idr[k]] = static_cast<scalar_t>(T(gd[k]));
    }
  });
}

// The teacher's log-probs are read as float64, whatever their dtype (an (N, K) copy).
void dispatch(const at::Tensor& x, const at::Tensor& id, const at::Tensor& teacher,
              const at::Tensor& sup, const at::Tensor& val, const Args& A, at::Tensor& loss,
              at::Tensor& gs, at::Tensor& gt, at::Tensor& stats) {
  const at::Tensor lp = teacher.contiguous();
  dispatch_logits(x.scalar_type(), [&]<class S, class T>() {
    run<S, T>(x, id, lp, sup, val, A, loss, gs, gt, stats);
  });
}

bool is_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}

void check_inputs(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
                  const at::Tensor& support, const at::Tensor& valid, int64_t kind,
                  int64_t tail, double scale, double cap) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1,
                    "student must be 2-D (N, V) with V >= 1, got ", student.sizes());
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == N, "ids must be (", N, ", K), got ",
                    ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_TYPE(is_float(student.scalar_type()),
                   "student must be float32, float64, bfloat16 or float16, got ",
                   student.scalar_type());
  TORCH_CHECK_TYPE(is_float(teacher.scalar_type()),
                   "teacher must be float32, float64, bfloat16 or float16, got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.sizes() == ids.sizes(), "teacher must have the shape of ids ",
                    ids.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(support.scalar_type() == at::kBool &&
                        (support.numel() == 0 || support.sizes() == ids.sizes()),
                    "support must be a bool tensor of the shape of ids, or empty (all real)");
  TORCH_CHECK_VALUE(valid.scalar_type() == at::kBool &&
                        (valid.numel() == 0 || (valid.dim() == 1 && valid.size(0) == N)),
                    "valid must be a bool tensor of shape (", N, ",), or empty (all kept)");
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "kind must be in [0, ", kNumKinds, "), got ",
                    kind);
  TORCH_CHECK_VALUE(tail >= 0 && tail < kNumTails, "tail must be a tail id in [0, ", kNumTails,
                    "), got ", tail);
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "logit_scale must be positive, got ",
                    scale);
  TORCH_CHECK_VALUE(cap >= 0 && std::isfinite(cap), "softcap must be positive (0: none), got ",
                    cap);
  for (const at::Tensor* t : {&student, &ids, &teacher, &support, &valid})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "sparse_divergence ops need CPU tensors");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
    const at::Tensor& support, const at::Tensor& valid, int64_t kind, bool swap, double param,
    double inv_temperature, int64_t tail, double teacher_alpha, double mass_slack,
    double logit_scale, double softcap, bool grad_student, bool grad_teacher) {
  check_inputs(student, ids, teacher, support, valid, kind, tail, logit_scale, softcap);
  const int64_t N = student.size(0), K = ids.size(1);
  const auto dt = student.scalar_type();
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = student.contiguous(), id = ids.contiguous(), sup = support.contiguous(),
                   val = valid.contiguous();
  const auto opts = x.options();
  at::Tensor loss = at::empty({N}, opts.dtype(ct));
  at::Tensor gs = grad_student ? at::empty(x.sizes(), x.options()) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty({N, K}, opts.dtype(ct)) : at::empty({0}, opts);
  at::Tensor stats = at::empty({N, 2}, opts.dtype(ct));
  if (N == 0) return {loss, gs, gt, stats};
  const Args A{int(kind), swap, param, inv_temperature, int(tail), teacher_alpha, mass_slack,
               logit_scale, softcap, grad_student, grad_teacher};
  dispatch(x, id, teacher, sup, val, A, loss, gs, gt, stats);
  return {loss, gs, gt, stats};
}

// The forward with the student gradient written over the student logits (the fused linear
// form's chunk of logits, which nothing reads afterwards): no second (N, V) buffer, so the
// fused form's chunks can have twice the rows for the same memory. Safe in place: each row's
// passes read all of the row (its normalizer, the support's gather, the tail's pass) before its
// gradient pass, which writes column j only after reading it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_divergence_fwd_inplace_cpu(
    at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
    const at::Tensor& support, const at::Tensor& valid, int64_t kind, bool swap, double param,
    double inv_temperature, int64_t tail, double teacher_alpha, double mass_slack,
    double logit_scale, double softcap, bool grad_teacher) {
  check_inputs(student, ids, teacher, support, valid, kind, tail, logit_scale, softcap);
  TORCH_CHECK_VALUE(student.is_contiguous(), "student must be contiguous (it is overwritten by "
                    "its gradient)");
  const int64_t N = student.size(0), K = ids.size(1);
  const auto ct = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor id = ids.contiguous(), sup = support.contiguous(), val = valid.contiguous();
  const auto opts = student.options();
  at::Tensor loss = at::empty({N}, opts.dtype(ct));
  at::Tensor gt = grad_teacher ? at::empty({N, K}, opts.dtype(ct)) : at::empty({0}, opts);
  at::Tensor stats = at::empty({N, 2}, opts.dtype(ct));
  if (N == 0) return {loss, gt, stats};
  const Args A{int(kind), swap, param, inv_temperature, int(tail), teacher_alpha, mass_slack,
               logit_scale, softcap, true, grad_teacher};
  dispatch(student, id, teacher, sup, val, A, loss, student, gt, stats);
  return {loss, gt, stats};
}

// d loss / d student logits, scaled per row by grad_loss, from the forward's stats: one read of
// the row and one write (the same passes as a softmax backward).
at::Tensor sparse_divergence_bwd_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& teacher,
    const at::Tensor& support, const at::Tensor& valid, const at::Tensor& stats,
    const at::Tensor& grad_loss, int64_t kind, bool swap, double param, double inv_temperature,
    int64_t tail, double teacher_alpha, double logit_scale, double softcap) {
  check_inputs(student, ids, teacher, support, valid, kind, tail, logit_scale, softcap);
  const int64_t N = student.size(0);
  const auto ct = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({N, 2}), "stats must be (", N, ", 2), got ",
                    stats.sizes());
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must be (", N,
                    ",), got ", grad_loss.sizes());
  const at::Tensor x = student.contiguous(), id = ids.contiguous(), sup = support.contiguous(),
                   val = valid.contiguous();
  const at::Tensor st = stats.to(ct).contiguous(), gl = grad_loss.to(ct).contiguous();
  at::Tensor gs = at::empty(x.sizes(), x.options()), none = at::empty({0}, x.options());
  if (N == 0) return gs;
  Args A{int(kind), swap, param, inv_temperature, int(tail), teacher_alpha, 0.0, logit_scale,
         softcap, true, false};
  A.stats_in = &st;
  A.grad_loss = &gl;
  dispatch(x, id, teacher, sup, val, A, none, gs, none, none);
  return gs;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("sparse_divergence_fwd_cpu", &sparse_divergence_fwd_cpu);
  m.impl("sparse_divergence_bwd_cpu", &sparse_divergence_bwd_cpu);
  m.impl("sparse_divergence_fwd_inplace_cpu", &sparse_divergence_fwd_inplace_cpu);
}

}  // namespace fdiv_kernels
