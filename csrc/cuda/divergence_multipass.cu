// Multi-pass divergence forward+gradient: the fallback for every architecture (sm_80) and for rows
// too long (or too short) for the on-chip cluster kernel.
//
// A group of G threads (a power of two, 32..512) owns one row; a block holds blockDim / G rows.
// Three passes over the row in global memory, 16-byte chunks:
//   1. online (max, sum) of a and b -> lse_a, lse_b
//   2. sum t, sum h, sum k -> loss (KL with only ga wanted: also ga = (q - p) inv_T, done)
//   3. ga = (h - q H) inv_T, gb = (k - p K) inv_T (terms recomputed)
// One kernel templated over the kind and the storage dtype; which gradients are wanted is a
// uniform runtime flag.
#include "cuda/divergence_kernel.cuh"

namespace fdiv_cuda {
namespace {

template <int B, class S>
__global__ void __launch_bounds__(kMaxThreads)
    divergence_multipass_kernel(const DivParams prm, const int G) {
  using R = typename Tr<S>::R;
  constexpr int kV = Tr<S>::kVec;
  __shared__ MS2 red_ms[kMaxWarps];
  __shared__ Sum3 red_sum[kMaxWarps];

  const int lane = threadIdx.x & (G - 1);
  const int64_t local = int64_t(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const bool in_range = local < prm.rows;
  const int64_t row = prm.row0 + (in_range ? local : 0);
  const bool active = in_range && prm.valid[row];
  const int64_t roff = row * int64_t(prm.n);
  const R* arow = static_cast<const R*>(prm.a) + roff;
  const R* brow = static_cast<const R*>(prm.b) + roff;
  R* garow = prm.ga ? static_cast<R*>(prm.ga) + roff : nullptr;
  R* gbrow = prm.gb ? static_cast<R*>(prm.gb) + roff : nullptr;
  // All four rows share one alignment (16-byte-aligned bases, same row offset).
  const RowGeom full = row_geom<S>(arow, prm.n);
  const RowGeom g = active ? full : RowGeom{0, 0, 0};
  const R* abase = arow - full.off;
  const R* bbase = brow - full.off;
  R* gabase = garow ? garow - full.off : nullptr;
  R* gbbase = gbrow ? gbrow - full.off : nullptr;

  if (in_range && !active) {  // ignored row: loss 0, gradients 0
    float zero[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) zero[i] = 0.f;
    for (int c = lane; c < full.nch; c += G) {
      if (gabase) store_chunk<S>(gabase, c, full, zero);
      if (gbbase) store_chunk<S>(gbbase, c, full, zero);
    }
    if (lane == 0) prm.loss[row] = 0.f;
  }
  // Every group runs the reductions below (they synchronize the block when G > 32); inactive
  // groups do so with empty rows.

  // Pass 1: log-sum-exp of both rows; two chunks of each row in flight per thread.
  MS2 st{ms_empty(), ms_empty()};
  for (int c = lane; c < g.nch; c += 2 * G) {
    const bool two = c + G < g.nch;
    const Chunk<S> ca0 = load_chunk<S>(abase, c, g), cb0 = load_chunk<S>(bbase, c, g);
    Chunk<S> ca1, cb1;
    if (two) {
      ca1 = load_chunk<S>(abase, c + G, g);
      cb1 = load_chunk<S>(bbase, c + G, g);
    }
    chunk_stats<S>(ca0, cb0, prm.inv_t, st);
    if (two) chunk_stats<S>(ca1, cb1, prm.inv_t, st);
  }
  st = group_reduce(st, G, ms2_merge, red_ms);
  const RowShift ra = row_shift(st.a), rb = row_shift(st.b);
  const float lse_a = ra.lse(), lse_b = rb.lse();  // only for the NaN poison below

  // Pass 2: the row sums. KL's h = -p sums to -1, so with only ga wanted it is final here.
  const bool fused = B == KL && gabase != nullptr && gbbase == nullptr;
  Sum3 acc{0.f, 0.f, 0.f};
  for (int c = lane; c < g.nch; c += G) {
    const Chunk<S> ca = load_chunk<S>(abase, c, g), cb = load_chunk<S>(bbase, c, g);
    float q[kV], p[kV];
    Elem e[kV];
    chunk_terms<B, S>(ca, cb, prm.inv_t, ra, rb, prm.kc, q, p, e);
    add_terms(e, acc);
    if (fused) {
      float gv[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) gv[i] = (q[i] - p[i]) * prm.inv_t;
      store_chunk<S>(gabase, c, g, gv);
    }
  }
  acc = group_reduce(acc, G, sum3_add, red_sum);
  // lse - lse is 0, or NaN when a row held a NaN (or +inf): NaN in, NaN out.
  if (active && lane == 0) prm.loss[row] = acc.t + (lse_a - lse_a) + (lse_b - lse_b);

  // Pass 3: the gradients.
  if (!((gabase && !fused) || gbbase)) return;
  const float H = acc.h, K = acc.k;
  for (int c = lane; c < g.nch; c += G) {
    const Chunk<S> ca = load_chunk<S>(abase, c, g), cb = load_chunk<S>(bbase, c, g);
    float q[kV], p[kV];
    Elem e[kV];
    chunk_terms<B, S>(ca, cb, prm.inv_t, ra, rb, prm.kc, q, p, e);
    store_grads<S>(fused ? nullptr : gabase, gbbase, c, g, q, p, e, H, K, prm.inv_t);
  }
}

}  // namespace

int launch_divergence_multipass(const DivParams& prm, int base, DType dt, cudaStream_t stream) {
  if (prm.rows <= 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = decltype(tag);
    const GroupLaunch l = group_launch<S>(prm.rows, prm.n);
    const dim3 grid(unsigned(l.blocks));
    return dispatch_kind(base, [&](auto kind) {
      constexpr int B = decltype(kind)::value;
      divergence_multipass_kernel<B, S><<<grid, l.threads, 0, stream>>>(prm, l.G);
      return int(cudaGetLastError());
    });
  });
}

}  // namespace fdiv_cuda
