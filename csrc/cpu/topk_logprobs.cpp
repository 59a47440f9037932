// CPU top-k of each row's transformed logits with the row's log-sum-exp, in one read of the row
// (fk.topk_logprobs, the teacher's side of top-k distillation).
//
// Per row, a = f(x) / T (the logit transform, cpu/logit_transform.h, with 1 / T folded in) is
// formed a block at a time; each block feeds the online log-sum-exp (cpu/online_softmax.h) and a
// running top-k of (value, id) (a 2k candidate buffer cut back to k, TopK below). Ranking: larger
// value first, then the lower id; a NaN ranks as -inf (its row's log-sum is NaN anyway). Ids
// arrive in increasing order, so an element enters only when strictly above the worst value kept,
// and a block is first screened in 64-element strides by a vectorized max against that threshold:
// after the first few thousand columns almost every stride is skipped, and the row costs about
// one pass of the log-sum-exp.
// Outputs: ids (N, k) int64 and values (N, k) of a in the compute type, best first, and stats
// (N, 2) = (m, log s), m = max a, s = sum exp(a - m); log-probs are (a - m) - log s.
// The statement of record is topk_logprobs_fwd_torch in fdiv_kernels/backends/torch_ref.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "cpu/convert.h"
#include "cpu/logit_transform.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

// Columns per screening stride: one vectorized max, then a scalar look only when it beats the
// top-k's threshold.
constexpr int64_t kStride = 64;

template <class T>
struct Entry {
  T v;
  int64_t id;
};

// a better than b: larger value, then lower id (a strict total order: ids are distinct).
template <class T>
FDIV_INLINE bool better(const Entry<T>& a, const Entry<T>& b) {
  return a.v > b.v || (a.v == b.v && a.id < b.id);
}

// The running top-k as a candidate buffer of 2k entries: an element enters while it beats the
// threshold (the worst of the k kept at the last compaction; before the first one, every element
// enters), and a full buffer is cut back to its best k by nth_element. A store per entry and an
// O(k) cut per k entries. Measured against a binary heap of k (push / pop per entry) on 256 rows
// in 8192-column tiles, k = 64, where a fresh top-k per tile takes ~k ln(V / k) entries: the
// top-k's share of the time fell from 470 ms to 190 ms (2 threads).
template <class T>
struct TopK {
  std::vector<Entry<T>> buf;
  int64_t k, used = 0;
  bool cut = false;                              // a compaction happened: thr is set
  T thr = -std::numeric_limits<T>::infinity();  // the worst value kept at the last compaction

  explicit TopK(int64_t k_) : buf(size_t(2 * k_)), k(k_) {}

  void clear() {
    used = 0;
    cut = false;
    thr = -std::numeric_limits<T>::infinity();
  }

  // Whether an element of value v may enter (ids are offered in increasing order, so a value
  // equal to the threshold loses to every kept entry of that value).
  FDIV_INLINE bool admits(T v) const { return !cut || v > thr; }

  FDIV_INLINE void offer(T v, int64_t id) {
    if (v != v) v = -std::numeric_limits<T>::infinity();  // NaN ranks last
    if (!admits(v)) return;
    if (used == 2 * k) compact();
    buf[size_t(used++)] = {v, id};
  }

  // Keep the best k of the buffer; the threshold becomes the worst of them.
  void compact() {
    auto first = buf.begin(), kth = first + k, last = first + used;
    std::nth_element(first, kth - 1, last, better<T>);
    used = k;
    cut = true;
    thr = (kth - 1)->v;
  }

  // The best k, best first, in buf[0, k) (at least k entries were offered).
  void finish() {
    auto first = buf.begin(), last = first + used;
    if (used > k) std::nth_element(first, first + k - 1, last, better<T>);
    std::sort(first, first + k, better<T>);
  }
};

// Offer a[0, n) (columns c0 + j) to the top-k, screening kStride columns at a time.
template <class T>
FDIV_INLINE void offer_block(const T* a, int64_t n, int64_t c0, TopK<T>& top) {
  int64_t j = 0;
  while (j < n && !top.cut) {  // no threshold yet: every element enters
    top.offer(a[j], c0 + j);
    ++j;
  }
  for (; j < n; j += kStride) {
    const int64_t len = std::min(kStride, n - j);
    T bm = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : bm)
    for (int64_t t = 0; t < len; ++t) bm = std::max(bm, a[j + t]);
    if (!(bm > top.thr)) continue;  // NaN-free max at or below the worst kept: nothing enters
    for (int64_t t = 0; t < len; ++t)
      if (top.admits(a[j + t])) top.offer(a[j + t], c0 + j + t);
  }
}

// One row: online lse over blocks of a, the top-k beside it; buf kBlock T (or unused).
template <class scalar_t, class T>
FDIV_INLINE void topk_row(const scalar_t* x, int64_t n, T inv_t, const LogitTransform<T>& xf,
                          TopK<T>& top, OnlineSoftmax<T>& acc, T* buf) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    const T* a = load_block(buf, x + j0, len, xf, inv_t);
    online_lse<T>(a, T(1), len, acc);
    offer_block(a, len, j0, top);
  }
}

// The per-ISA entry points: plain functions, one per storage dtype (see softmax_stats.cpp).
#define FDIV_TOPK_ENTRY(scalar_t, T, ATTR)                                                     \
  ATTR void topk_entry(const scalar_t* x, int64_t n, T inv_t, const LogitTransform<T>& xf,     \
                       TopK<T>& top, OnlineSoftmax<T>& acc, T* buf) {                          \
    topk_row(x, n, inv_t, xf, top, acc, buf);                                                  \
  }
FDIV_TOPK_ENTRY(float, float, FDIV_CLONES)
FDIV_TOPK_ENTRY(at::BFloat16, float, FDIV_CLONES)
FDIV_TOPK_ENTRY(at::Half, float, FDIV_CLONES)
FDIV_TOPK_ENTRY(double, double, )
#undef FDIV_TOPK_ENTRY

template <class scalar_t, class T>
void run_topk(const at::Tensor& x, int64_t k, T inv_t, const LogitTransform<T>& xf,
              at::Tensor& ids, at::Tensor& values, at::Tensor& stats) {
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  T* vp = values.mutable_data_ptr<T>();
  T* sp = stats.mutable_data_ptr<T>();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // The row buffer is needed unless the row is already a in T (fp32/fp64, identity, T = 1).
    std::vector<T> buf(static_cast<size_t>(kBlock));
    TopK<T> top(k);
    for (int64_t i = begin; i < end; ++i) {
      top.clear();
      OnlineSoftmax<T> acc;
      topk_entry(xp + i * n, n, inv_t, xf, top, acc, buf.data());
      top.finish();
      for (int64_t t = 0; t < k; ++t) {
        ip[i * k + t] = top.buf[size_t(t)].id;
        vp[i * k + t] = top.buf[size_t(t)].v;
      }
      // An all -inf row: no mass (log s = -inf); a +inf max: NaN, as log_softmax.
      double log_s = std::log(acc.s);
      if (acc.m == std::numeric_limits<T>::infinity()) log_s = kNaN;
      // A NaN logit: NaN statistics, also on a row whose other logits are all -inf.
      sp[2 * i] = std::isnan(log_s) ? T(kNaN) : acc.m;
      sp[2 * i + 1] = T(log_s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logprobs_fwd_cpu(
    const at::Tensor& x_in, int64_t k, double inv_temperature, double scale, double softcap) {
  check_logits(x_in, "x", kCpuTarget);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, "scale must be finite and nonzero, got ",
                    scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    "softcap must be finite and >= 0 (0: no softcap), got ", softcap);
  TORCH_CHECK_VALUE(std::isfinite(inv_temperature) && inv_temperature > 0.0,
                    "inv_temperature must be finite and positive, got ", inv_temperature);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "k must be in [1, V] = [1, ", n, "], got ", k);
  const auto dt = x.scalar_type();
  const auto opts = x.options().dtype(stats_dtype(dt));
  at::Tensor ids = at::empty({rows, k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({rows, k}, opts);
  at::Tensor stats = at::empty({rows, 2}, opts);
  if (rows == 0) return {ids, values, stats};
  dispatch_logits(dt, [&]<class S, class T>() {
    run_topk<S, T>(x, k, T(inv_temperature), {T(scale), T(softcap)}, ids, values, stats);
  });
  return {ids, values, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("topk_logprobs_fwd_cpu", &topk_logprobs_fwd_cpu); }

}  // namespace fdiv_kernels
