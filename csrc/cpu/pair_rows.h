// What a CPU row kernel over a (student, teacher) pair of (N, V) logits reads and writes per row
// (divergence.cpp, lse_combination.cpp): the two rows, whether the row is kept, its loss and the
// logit gradients of either side.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace fdiv_kernels {

// scalar_t: storage type; T: compute type, the loss's dtype.
template <class scalar_t, class T>
struct PairRows {
  int64_t rows, n;
  const scalar_t *s, *t;
  const bool* valid;
  T* loss;
  scalar_t *gs, *gt;  // nullptr: gradient not wanted

  PairRows(const at::Tensor& s_, const at::Tensor& t_, const at::Tensor& valid_, at::Tensor& loss_,
           at::Tensor& gs_, at::Tensor& gt_, bool want_s, bool want_t)
      : rows(s_.size(0)),
        n(s_.size(1)),
        s(s_.const_data_ptr<scalar_t>()),
        t(t_.const_data_ptr<scalar_t>()),
        valid(valid_.const_data_ptr<bool>()),
        loss(loss_.mutable_data_ptr<T>()),
        gs(want_s ? gs_.mutable_data_ptr<scalar_t>() : nullptr),
        gt(want_t ? gt_.mutable_data_ptr<scalar_t>() : nullptr) {}

  // Row i's gradient rows, nullptr where not wanted.
  scalar_t* grad_s(int64_t i) const { return gs ? gs + i * n : nullptr; }
  scalar_t* grad_t(int64_t i) const { return gt ? gt + i * n : nullptr; }

  // Whether row i is left out (valid false); its loss and gradients are set to 0 then.
  bool skip(int64_t i) const {
    if (valid[i]) return false;
    loss[i] = T(0);
    if (gs) std::fill(gs + i * n, gs + (i + 1) * n, scalar_t(0));
    if (gt) std::fill(gt + i * n, gt + (i + 1) * n, scalar_t(0));
    return true;
  }
};

}  // namespace fdiv_kernels
