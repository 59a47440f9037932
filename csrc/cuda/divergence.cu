// Divergence forward+gradient on sm_90: a thread-block cluster holds a whole row pair on chip.
//
// A cluster of C CTAs (C in 1, 2, 4, 8, 16; 16 is a non-portable size) owns one row: CTA r keeps
// chunks [r L, (r+1) L) of both rows in its shared memory, L = chunks_per_cta. HBM traffic is one
// read of each row and one write of each wanted gradient:
//   1. load the slice into smem (16-byte streaming loads), folding it into per-thread online
//      (max, sum) states on the way; CTA reduce; publish the CTA's two states in smem
//   2. cluster.sync; every warp merges the C states through DSMEM -> lse_a, lse_b
//   3. terms from smem: sum t, h, k; CTA reduce; publish; cluster.sync; every warp merges -> T, H, K
//   4. cluster arrive (done reading remote smem); gradients from smem; cluster wait (no CTA may
//      exit while another can still read its smem)
// One kernel templated over the kind and the storage dtype; C, the slice length and the wanted
// gradients are runtime values. The host (below) picks C from V and dtype, and falls back to the
// multi-pass kernel (divergence_multipass.cu) for short rows, rows that do not fit, pre-sm_90
// devices and binaries without sm_90 code.
#include <cooperative_groups.h>

#include <atomic>
#include <climits>
#include <cstdlib>

#include "cuda/divergence_kernel.cuh"

namespace fdiv_cuda {
namespace {

namespace cg = cooperative_groups;

template <int B, class S>
__global__ void __launch_bounds__(kMaxThreads, 1) divergence_cluster_kernel(const DivParams prm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using R = typename Tr<S>::R;
  constexpr int kV = Tr<S>::kVec;
  extern __shared__ uint4 smem[];  // [L] chunks of a, then [L] chunks of b
  __shared__ MS2 red_ms[kMaxWarps];
  __shared__ Sum3 red_sum[kMaxWarps];
  __shared__ MS2 pub_ms;    // this CTA's (max, sum) states, read by the whole cluster
  __shared__ Sum3 pub_sum;  // this CTA's (t, h, k) sums, read by the whole cluster

  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks());
  const int rank = int(cluster.block_rank());
  const int tid = threadIdx.x, nt = blockDim.x;
  const int warp_lane = tid & 31;
  const int L = prm.chunks_per_cta;
  uint4* sa = smem;
  uint4* sb = smem + L;

  const int64_t row = prm.row0 + blockIdx.x / unsigned(C);
  const int64_t roff = row * int64_t(prm.n);
  const R* arow = static_cast<const R*>(prm.a) + roff;
  const R* brow = static_cast<const R*>(prm.b) + roff;
  const RowGeom g = row_geom<S>(arow, prm.n);
  const R* abase = arow - g.off;
  const R* bbase = brow - g.off;
  R* gabase = prm.ga ? static_cast<R*>(prm.ga) + roff - g.off : nullptr;
  R* gbbase = prm.gb ? static_cast<R*>(prm.gb) + roff - g.off : nullptr;
  const int c0 = rank * L;
  const int mine = max(0, min(g.nch, c0 + L) - c0);

  if (!prm.valid[row]) {  // uniform over the cluster: nobody synchronizes
    float zero[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) zero[i] = 0.f;
    for (int i = tid; i < mine; i += nt) {
      if (gabase) store_chunk<S>(gabase, c0 + i, g, zero);
      if (gbbase) store_chunk<S>(gbbase, c0 + i, g, zero);
    }
    if (rank == 0 && tid == 0) prm.loss[row] = 0.f;
    return;
  }

  // 1. Load the slice (four chunks of each row in flight per thread) and fold it into the stats.
  MS2 st{ms_empty(), ms_empty()};
  constexpr int kBatch = 4;
  for (int i0 = tid; i0 < mine; i0 += kBatch * nt) {
    Chunk<S> ca[kBatch], cb[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * nt;
      if (i < mine) {
        ca[u] = load_chunk<S>(abase, c0 + i, g);
        cb[u] = load_chunk<S>(bbase, c0 + i, g);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * nt;
      if (i < mine) {
        sa[i] = ca[u].v;
        sb[i] = cb[u].v;
        chunk_stats<S>(ca[u], cb[u], prm.inv_t, st);
      }
    }
  }
  st = group_reduce(st, nt, ms2_merge, red_ms);
  if (tid == 0) pub_ms = st;
  cluster.sync();  // also: every CTA of the cluster is running, and the slices are in smem

  // 2. Merge the cluster's states; every warp does it on its own (no block barrier needed).
  {
    MS2 v{ms_empty(), ms_empty()};
    if (warp_lane < C) v = *cluster.map_shared_rank(&pub_ms, warp_lane);
    st = group_reduce(v, 32, ms2_merge, red_ms);  // G = 32: shuffles only
  }
  const RowShift ra = row_shift(st.a), rb = row_shift(st.b);
  const float lse_a = ra.lse(), lse_b = rb.lse();  // only for the NaN poison below

  // The terms, q and p of chunk i of this CTA's slice, from smem (passes 3 and 4).
  auto slice_terms = [&](int i, float* q, float* p, Elem* e) {
    Chunk<S> ca, cb;
    ca.v = sa[i];
    cb.v = sb[i];
    chunk_terms<B, S>(ca, cb, prm.inv_t, ra, rb, prm.kc, q, p, e);
  };

  // 3. Row sums from smem.
  Sum3 acc{0.f, 0.f, 0.f};
  for (int i = tid; i < mine; i += nt) {
    float q[kV], p[kV];
    Elem e[kV];
    slice_terms(i, q, p, e);
    add_terms(e, acc);
  }
  acc = group_reduce(acc, nt, sum3_add, red_sum);
  if (tid == 0) pub_sum = acc;
  cluster.sync();
  {
    Sum3 v{0.f, 0.f, 0.f};
    if (warp_lane < C) v = *cluster.map_shared_rank(&pub_sum, warp_lane);
    acc = group_reduce(v, 32, sum3_add, red_sum);
  }
  // Done reading other CTAs' smem: let them run to their exit barrier.
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  if (rank == 0 && tid == 0) prm.loss[row] = acc.t + (lse_a - lse_a) + (lse_b - lse_b);

  // 4. Gradients from smem.
  if (gabase || gbbase) {
    const float H = acc.h, K = acc.k;
    for (int i = tid; i < mine; i += nt) {
      float q[kV], p[kV];
      Elem e[kV];
      slice_terms(i, q, p, e);
      store_grads<S>(gabase, gbbase, c0 + i, g, q, p, e, H, K, prm.inv_t);
    }
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();  // the host never launches this without sm_90 code (binaryVersion check)
#endif
}

// Per-CTA smem the planner aims for: ~3 CTAs per SM on H100 (227 KiB), so one CTA's load phase
// overlaps another's compute. Longer rows use C = 16 and up to the opt-in maximum.
constexpr int64_t kTargetSmem = 66 * 1024;  // 64 KiB of row + the alignment chunk
constexpr int kMinChunks = 256;  // shorter rows: multi-pass with several rows per block

struct ClusterPlan {
  int C, threads, chunks_per_cta;
  size_t smem;
};

bool plan_cluster(int64_t n, int kV, int64_t max_smem, ClusterPlan& out) {
  const int64_t nch = (n + kV - 1) / kV + 1;  // worst case over the row alignments
  if (nch < kMinChunks) return false;
  for (int C = 1; C <= 16; C <<= 1) {
    const int64_t per = (nch + C - 1) / C;
    const int64_t bytes = 2 * per * 16;
    if (bytes <= kTargetSmem || (C == 16 && bytes <= max_smem)) {
      out.C = C;
      out.chunks_per_cta = int(per);
      out.smem = size_t(bytes);
      out.threads = per > 4096 ? 512 : 256;
      return true;
    }
  }
  return false;
}

constexpr int kMaxDevices = 64;

// Per kernel instantiation and device: 0 unknown, -1 unusable, else the max dynamic smem + 1.
template <int B, class S>
std::atomic<int64_t>& cluster_state(int dev) {
  static std::atomic<int64_t> state[kMaxDevices];
  return state[dev];
}

// Per kernel instantiation, device and log2(C): the largest smem size known to fit.
template <int B, class S>
std::atomic<int64_t>& cluster_fits(int dev, int C) {
  static std::atomic<int64_t> fits[kMaxDevices][5];
  int lg = 0;
  while ((1 << lg) < C) ++lg;
  return fits[dev][lg];
}

template <int B, class S>
int launch_cluster(DivParams prm, cudaStream_t stream) {
  auto kern = divergence_cluster_kernel<B, S>;
  int dev = 0;
  if (int e = int(cudaGetDevice(&dev))) return e;
  if (dev < 0 || dev >= kMaxDevices) return int(cudaErrorNotSupported);
  std::atomic<int64_t>& state = cluster_state<B, S>(dev);
  int64_t s = state.load(std::memory_order_acquire);
  if (s == 0) {
    s = -1;
    int major = 0, optin = 0;
    cudaFuncAttributes fa{};
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        major >= 9 && cudaFuncGetAttributes(&fa, kern) == cudaSuccess && fa.binaryVersion >= 90 &&
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) ==
            cudaSuccess) {
      const int64_t dyn = int64_t(optin) - int64_t(fa.sharedSizeBytes);
      if (dyn > 0 &&
          cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
              cudaSuccess &&
          cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dyn)) ==
              cudaSuccess)
        s = dyn + 1;
    }
    (void)cudaGetLastError();  // a failed query must not surface at the next launch
    state.store(s, std::memory_order_release);
  }
  if (s < 0) return int(cudaErrorNotSupported);
  ClusterPlan plan;
  if (!plan_cluster(prm.n, Tr<S>::kVec, s - 1, plan)) return int(cudaErrorNotSupported);
  prm.chunks_per_cta = plan.chunks_per_cta;

  // Whether such a cluster fits on this device at all (GPCs with fewer free SMs than C, MIG
  // slices, ...): asked once per (C, smem size) and device, then remembered.
  std::atomic<int64_t>& known = cluster_fits<B, S>(dev, plan.C);
  const bool checked = int64_t(plan.smem) <= known.load(std::memory_order_relaxed);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(plan.C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(unsigned(plan.threads));
  cfg.dynamicSmemBytes = plan.smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (!checked) {
    cfg.gridDim = dim3(unsigned(plan.C));
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg) != cudaSuccess || clusters < 1) {
      (void)cudaGetLastError();
      return int(cudaErrorNotSupported);
    }
    known.store(int64_t(plan.smem), std::memory_order_relaxed);
  }
  // gridDim.x = rows * C must stay below 2^31: launch in row batches.
  const int64_t batch = int64_t(INT_MAX) / plan.C;
  const int64_t rows = prm.rows, row0 = prm.row0;
  for (int64_t r = 0; r < rows; r += batch) {
    DivParams p = prm;
    p.row0 = row0 + r;
    p.rows = rows - r < batch ? rows - r : batch;
    cfg.gridDim = dim3(unsigned(p.rows * plan.C));
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kern, p);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      // Nothing launched yet: the caller may fall back. Later batches cannot fail differently.
      return int(r == 0 ? cudaErrorNotSupported : e);
    }
  }
  return 0;
}

}  // namespace

int divergence_fwd(const DivergenceLaunch& a, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.rows < 0 || a.cols < 1 || a.cols > INT_MAX - 64) return int(cudaErrorInvalidValue);
  if (a.base < 0 || a.base >= kNumKinds) return int(cudaErrorInvalidValue);
  for (const void* p : {a.student, a.teacher, static_cast<const void*>(a.grad_student),
                        static_cast<const void*>(a.grad_teacher)})
    if (reinterpret_cast<uintptr_t>(p) & 15u) return int(cudaErrorMisalignedAddress);
  if (a.rows == 0) return 0;
  DivParams prm{};
  prm.a = a.swap ? a.teacher : a.student;
  prm.b = a.swap ? a.student : a.teacher;
  prm.ga = a.swap ? a.grad_teacher : a.grad_student;
  prm.gb = a.swap ? a.grad_student : a.grad_teacher;
  prm.valid = a.valid;
  prm.loss = a.loss;
  prm.rows = a.rows;
  prm.row0 = 0;
  prm.n = int(a.cols);
  prm.inv_t = float(a.inv_temperature);
  prm.kc = make_consts(a.param);
  prm.chunks_per_cta = 0;

  if (a.path != DivergencePath::kMultiPass) {
    const int e = dispatch_dtype(a.dtype, [&](auto tag) {
      using S = decltype(tag);
      return dispatch_kind(a.base, [&](auto kind) {
        return launch_cluster<decltype(kind)::value, S>(prm, stream);
      });
    });
    if (e == 0 || a.path == DivergencePath::kCluster || e != int(cudaErrorNotSupported)) return e;
  }
  return launch_divergence_multipass(prm, a.base, a.dtype, stream);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace fdiv_cuda
