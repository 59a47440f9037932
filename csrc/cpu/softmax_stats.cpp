// CPU softmax statistics of rows: log-sum-exp, entropy and the label's log-probability (forward),
// and the logit gradient of any combination of them (backward).
//
// Forward: one read of each row, online (max, sum[, weighted sum]) block by block, nothing kept.
// Backward: one read of x and one write of dx, from the saved per-row lse / entropy:
//   dx = (g_lse q - g_H [q > 0] q (a - lse + H) + g_lp (onehot(label) - q)) / T,
//   a = x / T, q = exp(a - lse).
// Work items are (row, stretch of columns): with few rows, each row is cut into stretches so that
// every thread has work; the forward merges the stretches' partial states per row afterwards.
// Half-precision rows are widened block by block into a per-thread float buffer (and gradients
// narrowed from one), so the float kernels run on every dtype; float64 computes in double.
// A logit transform (scale, softcap; cpu/logit_transform.h) takes the same buffered path: each
// block is transformed in the buffer, and the backward multiplies its gradient block by dz/dx.
// The statement of record is softmax_stats_{fwd,bwd}_torch in fdiv_kernels/backends/torch_ref.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "cpu/convert.h"
#include "cpu/logit_transform.h"
#include "cpu/online_softmax.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

// How the (N, V) matrix is cut into work items: `parts` stretches of `len` columns per row.
struct Split {
  int64_t parts, len;
};

Split split_rows(int64_t rows, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough items (8 per thread) that an uneven count costs little; never stretches below a
  // block, and one stretch per row once the rows alone balance.
  const int64_t want = 8 * threads;
  int64_t parts = rows >= want ? 1 : (want + rows - 1) / std::max<int64_t>(rows, 1);
  parts = std::max<int64_t>(1, std::min(parts, n / kBlock));
  // Stretch starts on a 64-element (cache line) boundary.
  int64_t len = (n + parts - 1) / parts;
  len = (len + 63) / 64 * 64;
  parts = std::max<int64_t>(1, (n + len - 1) / std::max<int64_t>(len, 1));
  return {parts, std::max<int64_t>(len, 1)};
}

// ---- element kernels, float (any storage dtype) and double ---------------------------------


// Forward over one stretch of a row into a partial state; buf: kBlock T (narrow dtypes or XF).
template <bool ENT, bool XF, class scalar_t, class T>
FDIV_INLINE void fwd_stretch(const scalar_t* x, int64_t n, T scale, const LogitTransform<T>& xf,
                             OnlineSoftmax<T>& lse, OnlineEntropy<T>& ent, T* buf) {
  if constexpr (std::is_same_v<scalar_t, T> && !XF) {
    (void)buf;
    (void)xf;
    if constexpr (ENT) online_lse_entropy(x, scale, n, ent);
    else online_lse(x, scale, n, lse);
  } else {
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t len = std::min(kBlock, n - j0);
      const T* z = load_block(buf, x + j0, len, xf);
      if constexpr (ENT) online_lse_entropy<T>(z, scale, len, ent);
      else online_lse<T>(z, scale, len, lse);
    }
  }
}

// Backward over one stretch: out[j] = (cq q - ge [q > 0] q (a - lse + H)) * scale.
template <bool CQ, bool ENT, class T>
FDIV_INLINE void bwd_block(const T* x, T* out, int64_t n, T scale, T lse, T cq, T ge, T h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T la = x[j] * scale - lse;
    const T q = vexp(la);
    T g = CQ ? cq * q : T(0);
    if constexpr (ENT) g -= ge * (q == T(0) ? T(0) : q * (la + h));
    out[j] = g * scale;
  }
}

struct BwdRow {
  int64_t label;  // column of the onehot term, or -1 for none
  double lse, cq, ge, h, glp;
};

// dx for columns [0, n) of a row stretch starting at column c0; buf: 2 kBlock T (narrow or XF).
template <bool CQ, bool ENT, bool XF, class scalar_t, class T>
FDIV_INLINE void bwd_stretch(const scalar_t* x, scalar_t* dx, int64_t n, int64_t c0, T scale,
                             const LogitTransform<T>& xf, const BwdRow& r, T* buf) {
  const T lse = T(r.lse), cq = T(r.cq), ge = T(r.ge), h = T(r.h);
  const int64_t lab = r.label - c0;  // onehot column inside the stretch, if in [0, n)
  if constexpr (std::is_same_v<scalar_t, T> && !XF) {
    (void)buf;
    (void)xf;
    bwd_block<CQ, ENT>(x, dx, n, scale, lse, cq, ge, h);
    if (lab >= 0 && lab < n) dx[lab] += T(r.glp) * scale;
  } else {
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t len = std::min(kBlock, n - j0);
      const T* z = load_block(buf, x + j0, len, xf);
      bwd_block<CQ, ENT>(z, buf + kBlock, len, scale, lse, cq, ge, h);
      if (lab >= j0 && lab < j0 + len) buf[kBlock + lab - j0] += T(r.glp) * scale;
      if constexpr (XF) chain_block(buf + kBlock, z, len, xf);  // d/dz -> d/dx
      if constexpr (std::is_same_v<scalar_t, T>)
        std::copy(buf + kBlock, buf + kBlock + len, dx + j0);
      else
        narrow_block(dx + j0, buf + kBlock, len);
    }
  }
}

// The per-ISA entry points: plain (non-template) functions, one per storage dtype, so each is a
// target_clones function with every kernel above inlined into it.
#define FDIV_FWD_ENTRY(scalar_t, T, ATTR)                                                    \
  ATTR void fwd_entry(const scalar_t* x, int64_t n, T scale, const LogitTransform<T>& xf,    \
                      bool ent, OnlineSoftmax<T>& lse, OnlineEntropy<T>& en, T* buf) {       \
    const bool xt = !xf.identity();                                                          \
    if (ent && xt) fwd_stretch<true, true>(x, n, scale, xf, lse, en, buf);                   \
    else if (ent) fwd_stretch<true, false>(x, n, scale, xf, lse, en, buf);                   \
    else if (xt) fwd_stretch<false, true>(x, n, scale, xf, lse, en, buf);                    \
    else fwd_stretch<false, false>(x, n, scale, xf, lse, en, buf);                           \
  }                                                                                          \
  template <bool XF>                                                                         \
  FDIV_INLINE void bwd_any(const scalar_t* x, scalar_t* dx, int64_t n, int64_t c0, T scale,  \
                           const LogitTransform<T>& xf, bool cq, bool ent, const BwdRow& r,  \
                           T* buf) {                                                         \
    if (cq && ent) bwd_stretch<true, true, XF>(x, dx, n, c0, scale, xf, r, buf);             \
    else if (cq) bwd_stretch<true, false, XF>(x, dx, n, c0, scale, xf, r, buf);              \
    else if (ent) bwd_stretch<false, true, XF>(x, dx, n, c0, scale, xf, r, buf);             \
    else bwd_stretch<false, false, XF>(x, dx, n, c0, scale, xf, r, buf);                     \
  }                                                                                          \
  ATTR void bwd_entry(const scalar_t* x, scalar_t* dx, int64_t n, int64_t c0, T scale,       \
                      const LogitTransform<T>& xf, bool cq, bool ent, const BwdRow& r,       \
                      T* buf) {                                                              \
    if (xf.identity()) bwd_any<false>(x, dx, n, c0, scale, xf, cq, ent, r, buf);             \
    else bwd_any<true>(x, dx, n, c0, scale, xf, cq, ent, r, buf);                            \
  }
FDIV_FWD_ENTRY(float, float, FDIV_CLONES)
FDIV_FWD_ENTRY(at::BFloat16, float, FDIV_CLONES)
FDIV_FWD_ENTRY(at::Half, float, FDIV_CLONES)
FDIV_FWD_ENTRY(double, double, )
#undef FDIV_FWD_ENTRY

template <class T>
struct Partial {
  OnlineSoftmax<T> lse;
  OnlineEntropy<T> ent;
};

// Whether x[0:n] holds a NaN (only asked for rows whose max is +inf: rare).
template <class scalar_t>
bool has_nan(const scalar_t* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(static_cast<double>(x[j]))) return true;
  return false;
}

template <class scalar_t, class T>
void run_fwd(const at::Tensor& x, const at::Tensor* labels, int64_t ignore_index, T scale,
             const LogitTransform<T>& xf, bool want_ent, at::Tensor& lse, at::Tensor& ent,
             at::Tensor& lp) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const Split sp = split_rows(rows, n);
  std::vector<Partial<T>> parts(size_t(rows * sp.parts));
  at::parallel_for(0, rows * sp.parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kWide && xf.identity() ? 0 : size_t(kBlock));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / sp.parts, c0 = (t % sp.parts) * sp.len;
      const int64_t len = std::min(sp.len, n - c0);
      if (len <= 0) continue;
      Partial<T>& p = parts[size_t(t)];
      fwd_entry(xp + i * n + c0, len, scale, xf, want_ent, p.lse, p.ent, buf.data());
    }
  });

  T* lse_p = lse.mutable_data_ptr<T>();
  T* ent_p = want_ent ? ent.mutable_data_ptr<T>() : nullptr;
  T* lp_p = labels ? lp.mutable_data_ptr<T>() : nullptr;
  const bool lab64 = labels && labels->scalar_type() == at::kLong;
  const int64_t* l64 = lab64 ? labels->const_data_ptr<int64_t>() : nullptr;
  const int32_t* l32 = labels && !lab64 ? labels->const_data_ptr<int32_t>() : nullptr;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Partial<T>* p = &parts[size_t(i * sp.parts)];
      double l, h = 0.0, log_s;
      T m;
      if (want_ent) {
        OnlineEntropy<T> acc = p[0].ent;
        for (int64_t k = 1; k < sp.parts; ++k) acc.merge(p[k].ent);
        l = acc.lse();
        h = n == 0 ? 0.0 : acc.entropy();  // an empty row: 0 (the sum of nothing)
        m = acc.m;
        log_s = std::log(acc.s);
      } else {
        OnlineSoftmax<T> acc = p[0].lse;
        for (int64_t k = 1; k < sp.parts; ++k) acc.merge(p[k].lse);
        l = acc.lse();
        m = acc.m;
        log_s = std::log(acc.s);
      }
      // A +inf logit: lse = +inf unless the row also holds a NaN (s is NaN either way).
      if (m == std::numeric_limits<T>::infinity()) l = has_nan(xp + i * n, n) ? kNaN : kInf;
      const T lse_t = T(l);
      lse_p[i] = lse_t;
      if (ent_p) ent_p[i] = T(h);
      if (lp_p) {
        const int64_t lab = lab64 ? l64[i] : int64_t(l32[i]);
        T v;
        if (lab == ignore_index) v = T(0);
        else if (lab < 0 || lab >= n) v = T(kNaN);
        else {
          T z = static_cast<T>(xp[i * n + lab]);
          transform_block(&z, &z, 1, xf);
          if (std::isfinite(static_cast<double>(m)))
            // (x - m) - log s, the max first: x - lse would lose eps |lse|.
            v = (z * scale - m) - static_cast<T>(log_s);
          else v = z * scale - lse_t;  // +-inf max: the limits
        }
        lp_p[i] = v;
      }
    }
  });
}

template <class scalar_t, class T>
void run_bwd(const at::Tensor& x, const StatsBwdInputs& in, int64_t ignore_index, T scale,
             const LogitTransform<T>& xf, at::Tensor& dx) {
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t ? t->const_data_ptr<T>() : nullptr;
  };
  const T* lse_p = in.lse.const_data_ptr<T>();
  const T* ent_p = ptr(in.entropy);
  const T* gl_p = ptr(in.g_lse);
  const T* ge_p = ptr(in.g_entropy);
  const T* gp_p = ptr(in.g_logprob);
  const at::Tensor* labels = in.labels ? &*in.labels : nullptr;
  const bool lab64 = labels && labels->scalar_type() == at::kLong;
  const int64_t* l64 = lab64 ? labels->const_data_ptr<int64_t>() : nullptr;
  const int32_t* l32 = labels && !lab64 ? labels->const_data_ptr<int32_t>() : nullptr;
  const bool cq = gl_p || gp_p, en = ge_p != nullptr;
  if (!cq && !en) {  // no incoming gradient: dx = 0 (not 0 * q, which a NaN q would poison)
    dx.zero_();
    return;
  }
  const Split sp = split_rows(rows, n);
  at::parallel_for(0, rows * sp.parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kWide && xf.identity() ? 0 : size_t(2 * kBlock));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / sp.parts, c0 = (t % sp.parts) * sp.len;
      const int64_t len = std::min(sp.len, n - c0);
      if (len <= 0) continue;
      BwdRow r{-1, double(lse_p[i]), gl_p ? double(gl_p[i]) : 0.0, ge_p ? double(ge_p[i]) : 0.0,
               ent_p ? double(ent_p[i]) : 0.0, 0.0};
      if (gp_p) {
        const int64_t lab = lab64 ? l64[i] : int64_t(l32[i]);
        // Ignored rows: coefficient 0 (even for a NaN incoming gradient). As the reference's
        // one_hot(label.clamp(0, V - 1)), an out-of-range label lands on the nearest column.
        if (lab == ignore_index && !gl_p && !ge_p) {
          // Only the label's log-prob flows back: an ignored row is inert, zero gradient even
          // where its logits hold NaN (0 * q would be NaN).
          std::fill(dxp + i * n + c0, dxp + i * n + c0 + len, scalar_t(0));
          continue;
        }
        r.glp = lab == ignore_index ? 0.0 : double(gp_p[i]);
        r.cq -= r.glp;
        r.label = std::clamp<int64_t>(lab, 0, n - 1);
      }
      bwd_entry(xp + i * n + c0, dxp + i * n + c0, len, c0, scale, xf, cq, en, r, buf.data());
    }
  });
}

void check_transform(double scale, double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, "scale must be finite and nonzero, got ",
                    scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    "softcap must be finite and >= 0 (0: no softcap), got ", softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in, int64_t ignore_index,
    double inv_temperature, double scale, double softcap, bool entropy) {
  check_logits(x_in, "x", kCpuTarget);
  check_transform(scale, softcap);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0);
  std::optional<at::Tensor> labels;
  if (labels_in) labels = checked_labels(*labels_in, x);
  const auto dt = x.scalar_type();
  const auto opts = x.options().dtype(stats_dtype(dt));
  at::Tensor lse = at::empty({rows}, opts);
  at::Tensor ent = at::empty({entropy ? rows : 0}, opts);
  at::Tensor lp = at::empty({labels ? rows : 0}, opts);
  if (rows == 0) return {lse, ent, lp};
  const at::Tensor* lab = labels ? &*labels : nullptr;
  dispatch_logits(dt, [&]<class S, class T>() {
    run_fwd<S, T>(x, lab, ignore_index, T(inv_temperature), {T(scale), T(softcap)}, entropy, lse,
                  ent, lp);
  });
  return {lse, ent, lp};
}

at::Tensor softmax_stats_bwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in,
                                 const at::Tensor& lse_in, const at::Tensor& entropy_in,
                                 const std::optional<at::Tensor>& g_lse_in,
                                 const std::optional<at::Tensor>& g_entropy_in,
                                 const std::optional<at::Tensor>& g_logprob_in,
                                 int64_t ignore_index, double inv_temperature, double scale,
                                 double softcap) {
  check_logits(x_in, "x", kCpuTarget);
  check_transform(scale, softcap);
  const at::Tensor x = x_in.contiguous();
  const auto dt = x.scalar_type();
  const StatsBwdInputs in = checked_stats_bwd_inputs(x, labels_in, lse_in, entropy_in, g_lse_in,
                                                     g_entropy_in, g_logprob_in, stats_dtype(dt));
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  dispatch_logits(dt, [&]<class S, class T>() {
    run_bwd<S, T>(x, in, ignore_index, T(inv_temperature), {T(scale), T(softcap)}, dx);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) {
  m.impl("softmax_stats_fwd_cpu", &softmax_stats_fwd_cpu);
  m.impl("softmax_stats_bwd_cpu", &softmax_stats_bwd_cpu);
}

}  // namespace fdiv_kernels
