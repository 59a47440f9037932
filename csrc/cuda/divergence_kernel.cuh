// What the two divergence kernels (divergence_multipass.cu, divergence.cu) share: the kernel
// parameters and the per-chunk element math.
//
// Roles after the host has applied `swap` (as the CPU kernel does): a = the row whose softmax is
// q (student, or teacher when swapped), b = the row whose softmax is p; ga / gb their gradients.
#pragma once

#include "cuda/device_common.cuh"
#include "cuda/divergence_terms.cuh"

namespace fdiv_cuda {

struct DivParams {
  const void* a;
  const void* b;
  void* ga;  // nullptr: not wanted
  void* gb;
  const bool* valid;
  float* loss;
  int64_t rows;  // rows of this launch, starting at row0
  int64_t row0;
  int n;         // columns
  float inv_t;
  KindConsts kc;
  int chunks_per_cta;  // cluster kernel: chunks of one row held by one CTA
};

// A row's max m and log s (s = sum exp(x - m)): log-probabilities are formed as (x - m) - log s,
// the max subtracted first, so the error stays at rounding of the small terms for any |x / T|
// (x - lse would lose eps |lse|).
struct RowShift {
  float m, ls;
  FDIV_DEV float lse() const { return m + ls; }
};
FDIV_DEV RowShift row_shift(MS st) { return {st.m, logf(st.s)}; }

// The element terms, q and p of one chunk pair (padding: -inf logits -> all zero).
template <int B, class S>
FDIV_DEV void chunk_terms(const Chunk<S>& ca, const Chunk<S>& cb, float inv_t, RowShift ra,
                          RowShift rb, const KindConsts& kc, float* q, float* p, Elem* e) {
#pragma unroll
  for (int i = 0; i < Tr<S>::kVec; ++i) {
    const float lq = (Tr<S>::to_f(ca.e[i]) * inv_t - ra.m) - ra.ls;
    const float lp = (Tr<S>::to_f(cb.e[i]) * inv_t - rb.m) - rb.ls;
    q[i] = fexp(lq);
    p[i] = fexp(lp);
    e[i] = Terms<B>::template eval<GpuMath>(kc, lp, lq, p[i], q[i]);
  }
}

// Adds one chunk's element terms to the row sums (sum t, sum h, sum k).
template <int kV>
FDIV_DEV void add_terms(const Elem (&e)[kV], Sum3& acc) {
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    acc.t += e[i].t;
    acc.h += e[i].h;
    acc.k += e[i].k;
  }
}

// Stores chunk c of the wanted gradients (a null base: not wanted), from the row sums H = sum h,
// K = sum k: ga = (h - q H) inv_T, gb = (k - p K) inv_T.
template <class S>
FDIV_DEV void store_grads(typename Tr<S>::R* gabase, typename Tr<S>::R* gbbase, int c,
                          const RowGeom& g, const float* q, const float* p, const Elem* e, float H,
                          float K, float inv_t) {
  constexpr int kV = Tr<S>::kVec;
  float gv[kV];
  if (gabase) {
#pragma unroll
    for (int i = 0; i < kV; ++i) gv[i] = (e[i].h - q[i] * H) * inv_t;
    store_chunk<S>(gabase, c, g, gv);
  }
  if (gbbase) {
#pragma unroll
    for (int i = 0; i < kV; ++i) gv[i] = (e[i].k - p[i] * K) * inv_t;
    store_chunk<S>(gbbase, c, g, gv);
  }
}

template <class S>
FDIV_DEV void chunk_stats(const Chunk<S>& ca, const Chunk<S>& cb, float inv_t, MS2& st) {
  constexpr int kV = Tr<S>::kVec;
  float xa[kV], xb[kV];
  unpack_scaled(ca, inv_t, xa);
  unpack_scaled(cb, inv_t, xb);
  ms_update<kV>(st.a, xa);
  ms_update<kV>(st.b, xb);
}

// The multi-pass kernel (any architecture, any row length).
int launch_divergence_multipass(const DivParams& prm, int base, DType dt, cudaStream_t stream);

}  // namespace fdiv_cuda
