// The (N, V) outputs of the CPU kernels (logit gradients), allocated on transparent huge pages.
#pragma once

#include <ATen/ATen.h>

namespace fdiv_kernels {

// Like at::empty(sizes, options) (contiguous, from torch's CPU allocator), but for a buffer of at
// least 16 MiB the tensor starts on a 2 MiB boundary inside a slightly larger allocation and the
// range is madvise(MADV_HUGEPAGE)d, when the kernel already holds enough free 2 MiB blocks for it.
// See dense_output.cpp for why and when.
at::Tensor empty_dense(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fdiv_kernels
