// Softmax statistics of rows on the GPU: log-sum-exp, entropy and the label's log-probability
// (forward, one read of each row) and the logit gradient of any combination of them (backward,
// one read of x and one write of dx). Any architecture (sm_80+).
//
// A group of G threads (power of two, 32..512) owns a row; a block holds blockDim / G rows.
// Statement of record: softmax_stats_{fwd,bwd}_torch in fdiv_kernels/backends/torch_ref.py; edge
// cases as csrc/cpu/softmax_stats.cpp: a +inf logit gives lse = +inf (NaN if the row also holds
// a NaN) and entropy NaN; an all -inf row gives lse = -inf, entropy NaN; an out-of-range label
// gives log-probability NaN, an ignored one 0.
#include <climits>

#include "cuda/device_common.cuh"

namespace fdiv_cuda {
namespace {

// Online (max m, sum s, weighted sum w = sum exp(x - m) (x - m)) plus a NaN flag.
struct MSW {
  float m, s, w, nan;
};

FDIV_DEV MSW msw_empty() { return {neg_inf(), 0.f, 0.f, 0.f}; }

// Rebases (m, s, w) onto the larger max m2 >= m; an empty state stays empty.
FDIV_DEV void msw_rebase(float m, float& s, float& w, float m2) {
  if (s != 0.f) {  // a NaN s stays NaN
    const float d = m - m2;
    const float c = fexp(d);
    w = c * (w + d * s);
    s *= c;
  } else {
    w = 0.f;
  }
}

FDIV_DEV MSW msw_merge(MSW x, MSW y) {
  const float m = fmaxf(x.m, y.m);
  msw_rebase(x.m, x.s, x.w, m);
  msw_rebase(y.m, y.s, y.w, m);
  return {m, x.s + y.s, x.w + y.w, fmaxf(x.nan, y.nan)};
}

template <bool ENT, int kV>
FDIV_DEV void msw_update(MSW& st, const float* x) {
  float vm = x[0];
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    vm = fmaxf(vm, x[i]);
    nan |= x[i] != x[i];
  }
  if (nan) st.nan = 1.f;
  if (vm > st.m) {
    if (ENT) msw_rebase(st.m, st.s, st.w, vm);
    else st.s *= fexp(st.m - vm);
    st.m = vm;
  }
  if (st.m == neg_inf()) return;  // nothing finite yet (a NaN is in the flag)
  float s = 0.f, w = 0.f;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const float d = x[i] - st.m;
    const float e = fexp(d);
    s += e;
    if (ENT) w += e == 0.f ? 0.f : e * d;  // 0 log 0 = 0 (d = -inf)
  }
  st.s += s;
  if (ENT) st.w += w;
}

struct FwdParams {
  const void* x;
  const int64_t* labels;
  float* lse;
  float* ent;
  float* lp;
  int64_t rows;
  int n;
  int64_t ignore_index;
  float scale;
};

template <class S, bool ENT>
__global__ void __launch_bounds__(kMaxThreads) softmax_stats_fwd_kernel(const FwdParams prm,
                                                                        const int G) {
  using R = typename Tr<S>::R;
  constexpr int kV = Tr<S>::kVec;
  __shared__ MSW red[kMaxWarps];
  const int lane = threadIdx.x & (G - 1);
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const bool active = r < prm.rows;
  const int64_t row = active ? r : 0;
  const R* xrow = static_cast<const R*>(prm.x) + row * int64_t(prm.n);
  const RowGeom full = row_geom<S>(xrow, prm.n);
  const RowGeom g = active ? full : RowGeom{0, 0, 0};
  const R* base = xrow - full.off;

  MSW st = msw_empty();
  for (int c = lane; c < g.nch; c += 2 * G) {
    const bool two = c + G < g.nch;
    const Chunk<S> c0 = load_chunk<S>(base, c, g);
    Chunk<S> c1;
    if (two) c1 = load_chunk<S>(base, c + G, g);
    float x[kV];
    unpack_scaled(c0, prm.scale, x);
    msw_update<ENT, kV>(st, x);
    if (two) {
      unpack_scaled(c1, prm.scale, x);
      msw_update<ENT, kV>(st, x);
    }
  }
  st = group_reduce(st, G, msw_merge, red);
  if (!active || lane != 0) return;

  float lse, h;
  const float ls = logf(st.s);
  if (st.nan != 0.f) {
    lse = h = qnan();
  } else if (st.m == pos_inf()) {
    lse = pos_inf();
    h = qnan();
  } else {
    lse = st.m + ls;
    h = ls - st.w / st.s;
  }
  prm.lse[row] = lse;
  if (ENT) prm.ent[row] = h;
  if (prm.labels) {
    const int64_t lab = prm.labels[row];
    float v;
    if (lab == prm.ignore_index) v = 0.f;
    else if (lab < 0 || lab >= prm.n) v = qnan();
    else if (st.m == pos_inf() || st.m == -pos_inf()) v = Tr<S>::to_f(xrow[lab]) * prm.scale - lse;
    else v = (Tr<S>::to_f(xrow[lab]) * prm.scale - st.m) - ls;  // the max first: see the CPU
    prm.lp[row] = v;
  }
}

struct BwdParams {
  const void* x;
  void* dx;
  const int64_t* labels;
  const float* lse;
  const float* ent;
  const float* g_lse;
  const float* g_ent;
  const float* g_lp;
  int64_t rows;
  int n;
  int64_t ignore_index;
  float scale;
};

template <class S>
__global__ void __launch_bounds__(kMaxThreads) softmax_stats_bwd_kernel(const BwdParams prm,
                                                                        const int G) {
  using R = typename Tr<S>::R;
  constexpr int kV = Tr<S>::kVec;
  const int lane = threadIdx.x & (G - 1);
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  if (row >= prm.rows) return;  // no block-wide synchronization in this kernel
  const int64_t roff = row * int64_t(prm.n);
  const R* xrow = static_cast<const R*>(prm.x) + roff;
  const RowGeom g = row_geom<S>(xrow, prm.n);
  const R* xbase = xrow - g.off;
  R* dbase = static_cast<R*>(prm.dx) + roff - g.off;

  const bool has_cq = prm.g_lse || prm.g_lp, has_ent = prm.g_ent != nullptr;
  const float lse = prm.lse[row];
  float cq = prm.g_lse ? prm.g_lse[row] : 0.f;
  const float ge = has_ent ? prm.g_ent[row] : 0.f;
  const float H = has_ent ? prm.ent[row] : 0.f;
  float glp = 0.f;
  int64_t label = -1;
  if (prm.g_lp) {
    const int64_t lab = prm.labels[row];
    // Ignored rows: coefficient 0 (even for a NaN incoming gradient). As the reference's
    // one_hot(label.clamp(0, V - 1)), an out-of-range label lands on the nearest column.
    glp = lab == prm.ignore_index ? 0.f : prm.g_lp[row];
    cq -= glp;
    label = lab < 0 ? 0 : (lab >= prm.n ? prm.n - 1 : lab);
  }
  const int lab_col = int(label) + g.off;  // the label's position in chunk coordinates
  // Only the label's log-prob flows back to an ignored row: inert, zero gradient even where its
  // logits hold NaN (0 * q would be NaN).
  const bool inert = prm.g_lp && !prm.g_lse && !has_ent && prm.labels[row] == prm.ignore_index;

  for (int c = lane; c < g.nch; c += G) {
    const Chunk<S> ch = load_chunk<S>(xbase, c, g);
    float gv[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const float la = Tr<S>::to_f(ch.e[i]) * prm.scale - lse;
      const float q = fexp(la);
      float v = has_cq ? cq * q : 0.f;
      if (has_ent) v += ge * (q == 0.f ? 0.f : -q * (la + H));
      if (c * kV + i == lab_col) v += glp;
      gv[i] = inert ? 0.f : v * prm.scale;
    }
    store_chunk<S>(dbase, c, g, gv);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

int softmax_stats_fwd(const StatsFwdLaunch& a, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.rows < 0 || a.cols < 1 || a.cols > INT_MAX - 64) return int(cudaErrorInvalidValue);
  if (!aligned16(a.x)) return int(cudaErrorMisalignedAddress);
  if (a.rows == 0) return 0;
  FwdParams prm{a.x, a.labels, a.lse, a.entropy, a.label_logprob, a.rows, int(a.cols),
                a.ignore_index, float(a.inv_temperature)};
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using S = decltype(tag);
    const GroupLaunch l = group_launch<S>(a.rows, a.cols);
    const dim3 grid(unsigned(l.blocks));
    if (a.entropy)
      softmax_stats_fwd_kernel<S, true><<<grid, l.threads, 0, stream>>>(prm, l.G);
    else
      softmax_stats_fwd_kernel<S, false><<<grid, l.threads, 0, stream>>>(prm, l.G);
    return int(cudaGetLastError());
  });
}

int softmax_stats_bwd(const StatsBwdLaunch& a, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.rows < 0 || a.cols < 1 || a.cols > INT_MAX - 64) return int(cudaErrorInvalidValue);
  if (!aligned16(a.x) || !aligned16(a.dx)) return int(cudaErrorMisalignedAddress);
  if (!a.g_lse && !a.g_entropy && !a.g_logprob) return int(cudaErrorInvalidValue);
  if ((a.g_logprob && !a.labels) || (a.g_entropy && !a.entropy)) return int(cudaErrorInvalidValue);
  if (a.rows == 0) return 0;
  BwdParams prm{a.x, a.dx, a.labels, a.lse, a.entropy, a.g_lse, a.g_entropy, a.g_logprob,
                a.rows, int(a.cols), a.ignore_index, float(a.inv_temperature)};
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using S = decltype(tag);
    const GroupLaunch l = group_launch<S>(a.rows, a.cols);
    const dim3 grid(unsigned(l.blocks));
    softmax_stats_bwd_kernel<S><<<grid, l.threads, 0, stream>>>(prm, l.G);
    return int(cudaGetLastError());
  });
}

}  // namespace fdiv_cuda
