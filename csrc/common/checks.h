// The argument checks of the registered C++ ops, written once for the CPU and CUDA bindings.
//
// User input has already been validated in Python (fdiv_kernels/core/_validation.py) with messages in
// the user's terms; these checks guard the ops themselves, which can also be called directly
// (torch.ops.fdiv.*, opcheck): a wrong shape, dtype or device raises a ValueError / TypeError
// naming the argument instead of a kernel reading out of bounds. What differs between the
// backends (device, float64, widest row) is one `Target` record.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "common/divergence_terms.h"  // kNumKinds: the one count of base kinds

namespace fdiv_kernels {

// What one backend's kernels take.
struct Target {
  c10::DeviceType device;
  const char* name;  // in messages: "CPU", "CUDA"
  bool float64;      // float64 logits (the CPU kernels take them, for gradcheck)
  int64_t max_cols;  // rows must be shorter than this
};

inline constexpr Target kCpuTarget{c10::DeviceType::CPU, "CPU", true,
                                   std::numeric_limits<int64_t>::max()};
// The CUDA kernels index a row with int32, plus up to 64 elements of alignment padding.
inline constexpr Target kCudaTarget{c10::DeviceType::CUDA, "CUDA", false,
                                    std::numeric_limits<int32_t>::max() - 64};

// Per-row losses and statistics: float64 for float64 logits, float32 for every other dtype.
inline at::ScalarType stats_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Logits `name`: 2-D (N, V) on the target's device, in a dtype its kernels take.
inline void check_logits(const at::Tensor& x, const char* name, const Target& tg) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D (N, V), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().type() == tg.device, name, " must be a ", tg.name,
                    " tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(1) < tg.max_cols, "the ", tg.name, " kernels need V < ", tg.max_cols,
                    ", got ", name, " with V = ", x.size(1));
  const auto dt = x.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ||
                  (tg.float64 && dt == at::kDouble);
  const char* allowed =
      tg.float64 ? "float32, float64, bfloat16 or float16" : "float32, bfloat16 or float16";
  TORCH_CHECK_TYPE(ok, name, " must be ", allowed, " for the ", tg.name, " kernels, got ", dt);
}

// `t` (named `name`) on the device of `like` (the logits, already checked).
inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(),
                    " (the device of the logits), got ", t.device());
}

// divergence_fwd_<backend>(student, teacher, valid, kind, ...).
inline void check_divergence_args(const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& valid, int64_t kind, const Target& tg) {
  check_logits(student, "student", tg);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the shape of student ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(0) >= 1 && student.size(1) >= 1,
                    "student must have N >= 1 rows and V >= 1 columns, got ", student.sizes());
  check_same_device(teacher, student, "teacher");
  check_same_device(valid, student, "valid");
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "valid must be bool, got ",
                   valid.scalar_type());
  TORCH_CHECK_VALUE(valid.dim() == 1 && valid.size(0) == student.size(0), "valid must have shape (",
                    student.size(0), ",), got ", valid.sizes());
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "kind must be a base divergence id in [0, ",
                    kNumKinds, "), got ", kind);
}

// labels: int64 or int32 of shape (N,) on the device of x; contiguous on return.
inline at::Tensor checked_labels(const at::Tensor& labels, const at::Tensor& x) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", labels.scalar_type());
  check_same_device(labels, x, "labels");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must have shape (",
                    x.size(0), ",), got ", labels.sizes());
  return labels.contiguous();
}

// A per-row float vector (lse, entropy, an incoming gradient): shape (N,) on the device of x;
// converted to `dt` and contiguous on return.
inline at::Tensor checked_row_vector(const char* name, const at::Tensor& v, const at::Tensor& x,
                                     at::ScalarType dt) {
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), name,
                   " must be a floating point tensor, got ", v.scalar_type());
  check_same_device(v, x, name);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(0), name, " must have shape (", x.size(0),
                    ",), got ", v.sizes());
  return v.to(dt).contiguous();
}

// The per-row inputs of softmax_stats_bwd_<backend>, checked and converted to `dt`. Only what
// an incoming gradient needs is kept: entropy with g_entropy, labels with g_logprob (or given).
struct StatsBwdInputs {
  at::Tensor lse;
  std::optional<at::Tensor> labels, entropy, g_lse, g_entropy, g_logprob;
};

inline StatsBwdInputs checked_stats_bwd_inputs(
    const at::Tensor& x, const std::optional<at::Tensor>& labels, const at::Tensor& lse,
    const at::Tensor& entropy, const std::optional<at::Tensor>& g_lse,
    const std::optional<at::Tensor>& g_entropy, const std::optional<at::Tensor>& g_logprob,
    at::ScalarType dt) {
  StatsBwdInputs in{checked_row_vector("lse", lse, x, dt), {}, {}, {}, {}, {}};
  if (g_lse) in.g_lse = checked_row_vector("g_lse", *g_lse, x, dt);
  if (g_entropy) {
    in.g_entropy = checked_row_vector("g_entropy", *g_entropy, x, dt);
    in.entropy = checked_row_vector("entropy (needed with g_entropy)", entropy, x, dt);
  }
  if (g_logprob) {
    TORCH_CHECK_VALUE(labels.has_value(), "g_logprob needs labels, got labels=None");
    in.g_logprob = checked_row_vector("g_logprob", *g_logprob, x, dt);
  }
  if (labels) in.labels = checked_labels(*labels, x);
  return in;
}

}  // namespace fdiv_kernels
