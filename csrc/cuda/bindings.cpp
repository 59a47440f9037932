// The CUDA implementations of the fdiv ops whose schemas csrc/ops.cpp declares for every C++
// backend. Compiled only into a CUDA build of the extension (setup.py adds this file and
// csrc/cuda/*.cu, with -DFDIV_WITH_CUDA, when torch has CUDA and nvcc is found); a CPU build never
// sees it, so `hasattr(torch.ops.fdiv, "divergence_fwd_cuda")` tells the Python side whether the
// CUDA backend exists.
//
// The argument checks are the CPU ops' own (csrc/common/checks.h). The kernels (launch.h) take raw
// pointers; here tensors are made contiguous with 16-byte-aligned bases, which is all the layout
// the kernels assume.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "cuda/launch.h"

namespace fdiv_kernels {
namespace {

// The fields every launch over the rows of x has: the shape, the kernels' dtype tag
// (check_logits has already refused every dtype but these three) and 1 / T.
template <class Launch>
void set_rows(Launch& a, const at::Tensor& x, double inv_temperature) {
  const auto dt = x.scalar_type();
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.dtype = dt == at::kHalf       ? fdiv_cuda::DType::kFloat16
            : dt == at::kBFloat16 ? fdiv_cuda::DType::kBFloat16
                                  : fdiv_cuda::DType::kFloat32;
  a.inv_temperature = inv_temperature;
}

// Contiguous, with a 16-byte-aligned data pointer (a view may start anywhere).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) & 15u) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

void check(int err, const char* op) {
  TORCH_CHECK(err == 0, "fdiv::", op, ": CUDA error: ", fdiv_cuda::error_string(err));
}

// FDIV_CUDA_DIVERGENCE_PATH=multipass|cluster forces one kernel (tests, benchmarks).
fdiv_cuda::DivergencePath divergence_path() {
  const char* v = std::getenv("FDIV_CUDA_DIVERGENCE_PATH");
  if (v && std::strcmp(v, "multipass") == 0) return fdiv_cuda::DivergencePath::kMultiPass;
  if (v && std::strcmp(v, "cluster") == 0) return fdiv_cuda::DivergencePath::kCluster;
  return fdiv_cuda::DivergencePath::kAuto;
}

// The CUDA kernels do not fuse the logit transforms yet: anything but the identity is refused
// (the Triton backend has them on GPUs).
void check_no_transform(double scale, double softcap, const char* op) {
  TORCH_CHECK_VALUE(scale == 1.0 && softcap == 0.0, "fdiv::", op,
                    ": the CUDA kernels do not support a logit scale or softcap yet (got scale=",
                    scale, ", softcap=", softcap, "); use backend=\"triton\" or \"torch\"");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in, int64_t ignore_index,
    double inv_temperature, double scale, double softcap, bool entropy);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind,
    bool swap, double param, double inv_temperature, double student_scale,
    double student_softcap, double teacher_scale, double teacher_softcap, bool grad_student,
    bool grad_teacher) {
  check_divergence_args(student, teacher, valid, kind, kCudaTarget);
  check_no_transform(student_scale, student_softcap, "divergence_fwd_cuda");
  check_no_transform(teacher_scale, teacher_softcap, "divergence_fwd_cuda");

  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = aligned(student), t = aligned(teacher), v = valid.contiguous();
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(at::kFloat));
  at::Tensor gs = grad_student ? at::empty_like(s, at::MemoryFormat::Contiguous)
                               : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty_like(t, at::MemoryFormat::Contiguous)
                               : at::empty({0}, s.options());

  fdiv_cuda::DivergenceLaunch a;
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.valid = v.const_data_ptr<bool>();
  a.loss = loss.mutable_data_ptr<float>();
  a.grad_student = grad_student ? gs.mutable_data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.mutable_data_ptr() : nullptr;
  set_rows(a, s, inv_temperature);
  a.base = int(kind);
  a.swap = swap;
  a.param = param;
  a.path = divergence_path();
  check(fdiv_cuda::divergence_fwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "divergence_fwd_cuda");
  // The student's entropy, from the softmax-statistics kernel: one more read of the student
  // (the divergence kernels do not accumulate it yet); 0 on ignored rows.
  at::Tensor ent = std::get<1>(softmax_stats_fwd_cuda(s, std::nullopt, -100, inv_temperature,
                                                      1.0, 0.0, true));
  ent = at::where(v, ent, at::zeros_like(ent));
  return {loss, gs, gt, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in, int64_t ignore_index,
    double inv_temperature, double scale, double softcap, bool entropy) {
  check_logits(x_in, "x", kCudaTarget);
  check_no_transform(scale, softcap, "softmax_stats_fwd_cuda");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in);
  const int64_t rows = x.size(0);
  std::optional<at::Tensor> labels;
  if (labels_in) labels = checked_labels(*labels_in, x).to(at::kLong);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({rows}, opts);
  at::Tensor ent = at::empty({entropy ? rows : 0}, opts);
  at::Tensor lp = at::empty({labels ? rows : 0}, opts);
  if (rows == 0) return {lse, ent, lp};
  if (x.size(1) == 0) {  // the sum of nothing: lse -inf, entropy 0, any label out of range
    lse.fill_(-std::numeric_limits<float>::infinity());
    if (entropy) ent.zero_();
    if (labels)
      lp.copy_(at::where(*labels == ignore_index, at::zeros_like(lp),
                         at::full_like(lp, std::numeric_limits<float>::quiet_NaN())));
    return {lse, ent, lp};
  }
  fdiv_cuda::StatsFwdLaunch a;
  a.x = x.const_data_ptr();
  a.labels = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  a.lse = lse.mutable_data_ptr<float>();
  a.entropy = entropy ? ent.mutable_data_ptr<float>() : nullptr;
  a.label_logprob = labels ? lp.mutable_data_ptr<float>() : nullptr;
  set_rows(a, x, inv_temperature);
  a.ignore_index = ignore_index;
  check(fdiv_cuda::softmax_stats_fwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "softmax_stats_fwd_cuda");
  return {lse, ent, lp};
}

at::Tensor softmax_stats_bwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in, const at::Tensor& lse_in,
    const at::Tensor& entropy_in, const std::optional<at::Tensor>& g_lse_in,
    const std::optional<at::Tensor>& g_entropy_in, const std::optional<at::Tensor>& g_logprob_in,
    int64_t ignore_index, double inv_temperature, double scale, double softcap) {
  check_logits(x_in, "x", kCudaTarget);
  check_no_transform(scale, softcap, "softmax_stats_bwd_cuda");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in);
  StatsBwdInputs in = checked_stats_bwd_inputs(x, labels_in, lse_in, entropy_in, g_lse_in,
                                               g_entropy_in, g_logprob_in, at::kFloat);
  if (in.labels) in.labels = in.labels->to(at::kLong);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return dx;
  // No incoming gradient: 0 (not 0 * q, which a NaN would poison).
  if (!in.g_lse && !in.g_entropy && !in.g_logprob) {
    dx.zero_();
    return dx;
  }
  auto ptr = [](const std::optional<at::Tensor>& t) -> const float* {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  fdiv_cuda::StatsBwdLaunch a;
  a.x = x.const_data_ptr();
  a.dx = dx.mutable_data_ptr();
  a.labels = in.labels ? in.labels->const_data_ptr<int64_t>() : nullptr;
  a.lse = in.lse.const_data_ptr<float>();
  a.entropy = ptr(in.entropy);
  a.g_lse = ptr(in.g_lse);
  a.g_entropy = ptr(in.g_entropy);
  a.g_logprob = ptr(in.g_logprob);
  set_rows(a, x, inv_temperature);
  a.ignore_index = ignore_index;
  check(fdiv_cuda::softmax_stats_bwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "softmax_stats_bwd_cuda");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv, CUDA, m) {
  m.impl("divergence_fwd_cuda", &divergence_fwd_cuda);
  m.impl("softmax_stats_fwd_cuda", &softmax_stats_fwd_cuda);
  m.impl("softmax_stats_bwd_cuda", &softmax_stats_bwd_cuda);
}

}  // namespace fdiv_kernels
