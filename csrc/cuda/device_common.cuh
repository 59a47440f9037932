// Device building blocks shared by every CUDA kernel here: storage dtypes, 16-byte row chunks,
// fast exp/log, online softmax states and group reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

#define FDIV_DEV __device__ __forceinline__

namespace fdiv_cuda {

// ---- storage dtypes: tags, raw bits, conversions --------------------------------------------

struct F32 {};
struct F16 {};
struct BF16 {};

template <class S>
struct Tr;

template <>
struct Tr<F32> {
  using R = uint32_t;  // raw bits of one element
  static constexpr int kVec = 4;  // elements per 16-byte chunk
  static constexpr R kNegInf = 0xff800000u;
  FDIV_DEV static float to_f(R r) { return __uint_as_float(r); }
  FDIV_DEV static R from_f(float f) { return __float_as_uint(f); }
};

template <>
struct Tr<BF16> {
  using R = uint16_t;
  static constexpr int kVec = 8;
  static constexpr R kNegInf = 0xff80u;
  FDIV_DEV static float to_f(R r) { return __uint_as_float(uint32_t(r) << 16); }
  FDIV_DEV static R from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <>
struct Tr<F16> {
  using R = uint16_t;
  static constexpr int kVec = 8;
  static constexpr R kNegInf = 0xfc00u;
  FDIV_DEV static float to_f(R r) { return __half2float(__ushort_as_half(r)); }
  FDIV_DEV static R from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// One 16-byte chunk of a row.
template <class S>
union Chunk {
  uint4 v;
  typename Tr<S>::R e[Tr<S>::kVec];
};

// A row is walked in 16-byte-aligned chunks: chunk c holds elements [c kVec - off, (c+1) kVec - off)
// where off = (row address mod 16) / element size; elements outside [0, n) are padding. A chunk
// read from global memory carries -inf in its padding, which every pass below treats as an
// absent element (probability 0, term 0, nothing added to any sum).
struct RowGeom {
  int n;     // elements in the row
  int off;   // elements of padding before element 0 in chunk 0
  int nch;   // chunks
};

template <class S>
FDIV_DEV RowGeom row_geom(const void* row, int n) {
  constexpr int kV = Tr<S>::kVec;
  using R = typename Tr<S>::R;
  const int off = int((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(R));
  return {n, off, n > 0 ? (n + off + kV - 1) / kV : 0};
}

// `base` is the aligned address of chunk 0, i.e. row - off.
template <class S>
FDIV_DEV Chunk<S> load_chunk(const typename Tr<S>::R* base, int c, const RowGeom& g) {
  constexpr int kV = Tr<S>::kVec;
  Chunk<S> ch;
  const int lo = c * kV - g.off;
  if (lo >= 0 && lo + kV <= g.n) {
    ch.v = __ldcs(reinterpret_cast<const uint4*>(base) + c);  // streamed: read once
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = lo + i;
      ch.e[i] = (j >= 0 && j < g.n) ? base[c * kV + i] : Tr<S>::kNegInf;
    }
  }
  return ch;
}

template <class S>
FDIV_DEV void store_chunk(typename Tr<S>::R* base, int c, const RowGeom& g, const float* val) {
  constexpr int kV = Tr<S>::kVec;
  Chunk<S> ch;
#pragma unroll
  for (int i = 0; i < kV; ++i) ch.e[i] = Tr<S>::from_f(val[i]);
  const int lo = c * kV - g.off;
  if (lo >= 0 && lo + kV <= g.n) {
    __stcs(reinterpret_cast<uint4*>(base) + c, ch.v);
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = lo + i;
      if (j >= 0 && j < g.n) base[c * kV + i] = ch.e[i];
    }
  }
}

template <class S>
FDIV_DEV void unpack_scaled(const Chunk<S>& ch, float scale, float* x) {
#pragma unroll
  for (int i = 0; i < Tr<S>::kVec; ++i) x[i] = Tr<S>::to_f(ch.e[i]) * scale;
}

// ---- math -------------------------------------------------------------------------------------

FDIV_DEV float neg_inf() { return __uint_as_float(0xff800000u); }
FDIV_DEV float pos_inf() { return __uint_as_float(0x7f800000u); }
FDIV_DEV float qnan() { return __uint_as_float(0x7fc00000u); }

// exp / log on the SFU (what Triton's tl.exp / tl.log lower to): ~2 ulp, subnormals kept,
// exp(-inf) = 0, exp(+inf) = inf, log(0) = -inf, log(x < 0) = nan, nan in -> nan out.
FDIV_DEV float ex2(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FDIV_DEV float lg2(float x) {
  float y;
  asm("lg2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FDIV_DEV float fexp(float x) { return ex2(x * 1.44269504088896341f); }
FDIV_DEV float flog(float x) { return lg2(x) * 0.693147180559945309f; }

// ---- online softmax states --------------------------------------------------------------------

// Running (max m, sum s of exp(x - m)). Empty: m = -inf, s = 0. m never holds a NaN; a NaN
// element poisons s instead.
struct MS {
  float m, s;
};

FDIV_DEV MS ms_empty() { return {neg_inf(), 0.f}; }

FDIV_DEV MS ms_merge(MS x, MS y) {
  const float m = fmaxf(x.m, y.m);
  float s = 0.f;
  // An empty side (s = 0, maybe m = -inf) adds nothing: exp(-inf - -inf) would be NaN.
  if (x.s != 0.f) s += x.s * fexp(x.m - m);
  if (y.s != 0.f) s += y.s * fexp(y.m - m);
  return {m, s};
}

// Folds kV scaled elements (padding = -inf) into st.
template <int kV>
FDIV_DEV void ms_update(MS& st, const float* x) {
  float vm = x[0];
#pragma unroll
  for (int i = 1; i < kV; ++i) vm = fmaxf(vm, x[i]);
  if (vm > st.m) {
    st.s *= fexp(st.m - vm);  // st.m = -inf: s is 0 (or a NaN that stays)
    st.m = vm;
  }
  if (st.m == neg_inf()) {
    // Nothing finite yet: only a NaN matters.
#pragma unroll
    for (int i = 0; i < kV; ++i)
      if (x[i] != x[i]) st.s = qnan();
  } else {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kV; ++i) s += fexp(x[i] - st.m);
    st.s += s;
  }
}

FDIV_DEV float ms_lse(MS st) { return st.m + logf(st.s); }

struct MS2 {
  MS a, b;
};
FDIV_DEV MS2 ms2_merge(MS2 x, MS2 y) { return {ms_merge(x.a, y.a), ms_merge(x.b, y.b)}; }

struct Sum3 {
  float t, h, k;
};
FDIV_DEV Sum3 sum3_add(Sum3 x, Sum3 y) { return {x.t + y.t, x.h + y.h, x.k + y.k}; }

// ---- reductions over a group of G threads (G a power of two; G > 32: whole warps) -------------

template <class T>
FDIV_DEV T shfl_xor(T v, int o) {
  static_assert(sizeof(T) % sizeof(float) == 0, "float fields only");
  constexpr int kN = sizeof(T) / sizeof(float);
  float* f = reinterpret_cast<float*>(&v);
#pragma unroll
  for (int i = 0; i < kN; ++i) f[i] = __shfl_xor_sync(0xffffffffu, f[i], o);
  return v;
}

// Every thread of the group gets the group's reduction. Must be reached by the whole block
// (G > 32 synchronizes it); `scratch` holds blockDim / 32 values.
template <class T, class F>
FDIV_DEV T group_reduce(T v, int G, F merge, T* scratch) {
  const int width = G < 32 ? G : 32;
  for (int o = width >> 1; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  if (G > 32) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int wpg = G >> 5, first = (warp / wpg) * wpg;
    T r = scratch[first];
    for (int w = 1; w < wpg; ++w) r = merge(r, scratch[first + w]);
    __syncthreads();  // scratch is reused by the next reduction
    v = r;
  }
  return v;
}

// Host side: calls f(tag) with the storage tag of a runtime dtype.
template <class F>
inline int dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(F32{});
    case DType::kFloat16: return f(F16{});
    case DType::kBFloat16: return f(BF16{});
  }
  return int(cudaErrorInvalidValue);
}

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// Host side: the launch of a row-group kernel (a group of G threads per row, blockDim / G rows
// per block) over `rows` rows of `cols` elements of storage S. G doubles from a warp until each
// thread has ~4 16-byte chunks (up to kMaxThreads); a block has at least 256 threads.
struct GroupLaunch {
  int G, threads;
  int64_t blocks;
};

template <class S>
inline GroupLaunch group_launch(int64_t rows, int64_t cols) {
  const int64_t nch = (cols + Tr<S>::kVec - 1) / Tr<S>::kVec + 1;  // chunks, worst alignment
  int G = 32;
  while (G < kMaxThreads && int64_t(G) * 4 < nch) G <<= 1;
  const int threads = G > 256 ? G : 256;
  const int64_t per_block = threads / G;
  return {G, threads, (rows + per_block - 1) / per_block};
}

}  // namespace fdiv_cuda
