// CPU batched log-domain Sinkhorn primitive: out[b, i] = LSE_j(h[b, j] - c(b, i, j) eps_inv[b]).
//
// The cost is either dense ((B, n, m), `transpose` reducing over its rows instead) or computed on
// the fly from points x (B, n, d), y (B, m, d): a per-thread tile of rows x columns at a time
// (a register-blocked dot / L1 kernel over y transposed), never the whole (B, n, m).
// Each row's LSE is exact two-pass per block (block max, then the sum of exps against the
// running max), folded into an OnlineSoftmax. -inf entries of h (zero-weight points) add exactly
// 0; an all -inf row gives -inf. Problems with active[b] == false are skipped (output -inf), as
// the triton kernel does. The statement of record is transport._solver.lse_torch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/online_softmax.h"
#include "cpu/sinkhorn_tiles.h"
#include "cpu/vec_math.h"

namespace fdiv_kernels {
namespace {

using namespace sinkhorn;  // NOLINT: the shared tile kernels

// One work item of the point path: rows [i0, i0 + rows) of problem b (x padded to kRB rows,
// yT padded to mp columns). tile: (kRB + 1) * kJC A.
// A: the type the dots accumulate in (T; kept a parameter for a wider accumulator).
template <class T, class A>
FDIV_INLINE void points_item(const A* x, const A* yT, const T* xx, const T* yy, const T* h,
                             T ei, int64_t kind, int64_t d, int64_t m, int64_t mp, int64_t rows,
                             T* out, A* tile) {
  OnlineSoftmax<T> acc[kRB];
  const int64_t mc = micro_cols<A>();
  const int64_t rb = (rows + kR - 1) / kR * kR;
  for (int64_t j0 = 0; j0 < m; j0 += kJC) {
    const int64_t len = std::min(kJC, m - j0);
    const int64_t lenp = std::min(kJC, mp - j0);
    for (int64_t r0 = 0; r0 < rb; r0 += kR)
      for (int64_t jj = 0; jj < lenp; jj += mc) {
        if (kind == L1) micro<true>(x + r0 * d, d, yT + j0 + jj, mp, tile + r0 * kJC + jj, kJC);
        else micro<false>(x + r0 * d, d, yT + j0 + jj, mp, tile + r0 * kJC + jj, kJC);
      }
    for (int64_t r = 0; r < rows; ++r) {
      T* c;
      if constexpr (std::is_same_v<T, A>) {
        c = tile + r * kJC;
      } else {
        // Narrowed into the spare row after the tile (only ever accessed as T).
        c = reinterpret_cast<T*>(tile + kRB * kJC);
        const A* t = tile + r * kJC;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) c[j] = static_cast<T>(t[j]);
      }
      finish_cost(c, len, kind, xx[r], yy + j0);
      fold_block(c, h + j0, ei, len, acc[r], c);
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<T>(acc[r].lse());
}

// Per-ISA entry points (target_clones); everything above is inlined into them.
#define FDIV_POINTS_ENTRY(T, A, ATTR)                                                           \
  ATTR void points_entry(const A* x, const A* yT, const T* xx, const T* yy, const T* h, T ei,    \
                         int64_t kind, int64_t d, int64_t m, int64_t mp, int64_t rows, T* out,   \
                         A* tile) {                                                              \
    points_item<T, A>(x, yT, xx, yy, h, ei, kind, d, m, mp, rows, out, tile);                    \
  }
FDIV_POINTS_ENTRY(float, float, FDIV_CLONES)
FDIV_POINTS_ENTRY(double, double, FDIV_CLONES)
#undef FDIV_POINTS_ENTRY
#define FDIV_SINKHORN_ENTRY(T, ATTR)                                                             \
  ATTR void rows_entry(const T* c, const T* h, T ei, int64_t m, int64_t rows, T* out, T* buf) {  \
    dense_rows_item<T>(c, h, ei, m, m, rows, out, buf);                                             \
  }                                                                                              \
  ATTR void cols_entry(const T* c, const T* h, T ei, int64_t n, int64_t m, int64_t cols,         \
                       T* out) {                                                                 \
    dense_cols_item<T>(c, h, ei, n, m, cols, out);                                               \
  }
FDIV_SINKHORN_ENTRY(float, FDIV_CLONES)
FDIV_SINKHORN_ENTRY(double, FDIV_CLONES)
#undef FDIV_SINKHORN_ENTRY

template <class T, class A>
void run_points(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                const at::Tensor& ei, const bool* active, int64_t kind, at::Tensor& out) {
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  const PaddedPoints pp = pad_points<A>(x, y, kind);
  const int64_t np = pp.np, mp = pp.mp;
  const at::Tensor &xp = pp.xp, &yT = pp.yT, &xx = pp.xx, &yy = pp.yy;
  const A* xp_ = xp.data_ptr<A>();
  const A* yT_ = yT.data_ptr<A>();
  const T* xx_ = xx.data_ptr<T>();
  const T* yy_ = yy.data_ptr<T>();
  const T* h_ = h.data_ptr<T>();
  const T* ei_ = ei.data_ptr<T>();
  T* o_ = out.data_ptr<T>();
  const int64_t blocks = np / kRB;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> tile(size_t(kRB * kJC + kJC));  // the tile and a spare row
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / blocks, i0 = (it % blocks) * kRB;
      const int64_t rows = std::min(kRB, n - i0);
      if (active && !active[b]) {
        std::fill(o_ + b * n + i0, o_ + b * n + i0 + rows, -std::numeric_limits<T>::infinity());
        continue;
      }
      points_entry(xp_ + (b * np + i0) * d, yT_ + b * d * mp, xx_ + b * np + i0, yy_ + b * mp,
                   h_ + b * m, ei_[b], kind, d, m, mp, rows, o_ + b * n + i0, tile.data());
    }
  });
}

template <class T>
void run_dense(const at::Tensor& c, const at::Tensor& h, const at::Tensor& ei, const bool* active,
               bool transpose, at::Tensor& out) {
  const int64_t B = c.size(0), n = c.size(1), m = c.size(2);
  const T* c_ = c.data_ptr<T>();
  const T* h_ = h.data_ptr<T>();
  const T* ei_ = ei.data_ptr<T>();
  T* o_ = out.data_ptr<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!transpose) {
    const int64_t per = 8, blocks = (n + per - 1) / per;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(static_cast<size_t>(kJC));
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / blocks, i0 = (it % blocks) * per, rows = std::min(per, n - i0);
        T* o = o_ + b * n + i0;
        if (active && !active[b]) {
          std::fill(o, o + rows, kNegInf);
          continue;
        }
        rows_entry(c_ + (b * n + i0) * m, h_ + b * m, ei_[b], m, rows, o, buf.data());
      }
    });
  } else {
    const int64_t blocks = (m + kColBlock - 1) / kColBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / blocks, j0 = (it % blocks) * kColBlock;
        const int64_t cols = std::min(kColBlock, m - j0);
        T* o = o_ + b * m + j0;
        if (active && !active[b]) {
          std::fill(o, o + cols, kNegInf);
          continue;
        }
        cols_entry(c_ + b * n * m + j0, h_ + b * n, ei_[b], n, m, cols, o);
      }
    });
  }
}

at::Tensor sinkhorn_lse_cpu(const std::optional<at::Tensor>& x_in,
                            const std::optional<at::Tensor>& y_in,
                            const std::optional<at::Tensor>& cost_in, const at::Tensor& h_in,
                            const at::Tensor& eps_inv_in, int64_t kind, bool transpose,
                            const std::optional<at::Tensor>& active_in) {
  TORCH_CHECK_VALUE(h_in.dim() == 2, "h must be (B, m), got ", h_in.sizes());
  const at::ScalarType ct = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor h = h_in.to(ct).contiguous();
  const int64_t B = h.size(0), mr = h.size(1);
  const at::Tensor ei = eps_inv_in.to(ct).contiguous();
  TORCH_CHECK_VALUE(ei.dim() == 1 && ei.size(0) == B, "eps_inv must be (B,), got ", ei.sizes());
  std::optional<at::Tensor> act;
  if (active_in) {
    act = active_in->to(at::kBool).contiguous();
    TORCH_CHECK_VALUE(act->numel() == B, "active must be (B,)");
  }
  const bool* active = act ? act->data_ptr<bool>() : nullptr;
  at::Tensor out;
  if (cost_in) {
    const at::Tensor c = cost_in->to(ct).contiguous();
    TORCH_CHECK_VALUE(c.dim() == 3 && c.size(0) == B, "cost must be (B, n, m)");
    const int64_t n = transpose ? c.size(2) : c.size(1);
    TORCH_CHECK_VALUE((transpose ? c.size(1) : c.size(2)) == mr, "cost and h do not match");
    out = at::empty({B, n}, h.options());
    if (out.numel() == 0) return out.to(h_in.scalar_type());
    if (mr == 0) return out.fill_(-std::numeric_limits<double>::infinity()).to(h_in.scalar_type());
    if (ct == at::kDouble) run_dense<double>(c, h, ei, active, transpose, out);
    else run_dense<float>(c, h, ei, active, transpose, out);
  } else {
    TORCH_CHECK_VALUE(x_in && y_in, "sinkhorn_lse_cpu needs points x, y or a cost");
    const at::Tensor x = x_in->to(ct).contiguous(), y = y_in->to(ct).contiguous();
    TORCH_CHECK_VALUE(x.dim() == 3 && y.dim() == 3 && x.size(0) == B && y.size(0) == B &&
                          x.size(2) == y.size(2) && y.size(1) == mr,
                      "x (B, n, d), y (B, m, d) and h (B, m) do not match");
    TORCH_CHECK_VALUE(kind >= 0 && kind < kNumCosts, "unknown cost kind ", kind);
    const int64_t n = x.size(1);
    out = at::empty({B, n}, h.options());
    if (out.numel() == 0) return out.to(h_in.scalar_type());
    if (mr == 0) return out.fill_(-std::numeric_limits<double>::infinity()).to(h_in.scalar_type());
    // Tiny problems (torch's bmm takes its naive, unfused kernel below 400 multiply-adds per
    // matrix): the cost is built exactly as transport._solver.pairwise_cost builds it, then reduced
    // as a dense one. A plan rebuilt from the potentials with torch's cost at eps << cost is off
    // by exp(ulp(cost) / eps) otherwise. Above that, the FMA micro kernel accumulates over d in
    // the order BLAS does for these shapes.
    if (x.size(2) * n * mr < kTinyMacs) {
      at::Tensor c = pairwise_cost(x, y, kind).contiguous();
      if (ct == at::kDouble) run_dense<double>(c, h, ei, active, false, out);
      else run_dense<float>(c, h, ei, active, false, out);
    } else if (ct == at::kDouble) {
      run_points<double, double>(x, y, h, ei, active, kind, out);
    } else {
      run_points<float, float>(x, y, h, ei, active, kind, out);
    }
  }
  return out.scalar_type() == h_in.scalar_type() ? out : out.to(h_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CPU, m) { m.impl("sinkhorn_lse_cpu", &sinkhorn_lse_cpu); }

}  // namespace fdiv_kernels
