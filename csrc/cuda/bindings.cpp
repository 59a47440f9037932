// The CUDA ops: schemas (a fragment of the fdiv library defined in csrc/ops.cpp) and their CUDA
// implementations. Compiled only into a CUDA build of the extension (setup.py adds this file and
// csrc/cuda/*.cu, with -DFDIV_WITH_CUDA, when torch has CUDA and nvcc is found); a CPU build never
// sees it, so `hasattr(torch.ops.fdiv, "divergence_fwd_cuda")` tells the Python side whether the
// CUDA backend exists.
//
// Argument checks mirror csrc/cpu/*.cpp. The kernels (launch.h) take raw pointers; here tensors
// are made contiguous with 16-byte-aligned bases, which is all the layout the kernels assume.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "cuda/launch.h"

namespace fdiv_kernels {
namespace {

fdiv_cuda::DType kernel_dtype(at::ScalarType dt, const char* name) {
  switch (dt) {
    case at::kFloat: return fdiv_cuda::DType::kFloat32;
    case at::kHalf: return fdiv_cuda::DType::kFloat16;
    case at::kBFloat16: return fdiv_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16 for the CUDA kernels, got ",
                       dt);
  }
  return fdiv_cuda::DType::kFloat32;
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

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
                    t.device());
}

// FDIV_CUDA_DIVERGENCE_PATH=multipass|cluster forces one kernel (tests, benchmarks).
fdiv_cuda::DivergencePath divergence_path() {
  const char* v = std::getenv("FDIV_CUDA_DIVERGENCE_PATH");
  if (v && std::strcmp(v, "multipass") == 0) return fdiv_cuda::DivergencePath::kMultiPass;
  if (v && std::strcmp(v, "cluster") == 0) return fdiv_cuda::DivergencePath::kCluster;
  return fdiv_cuda::DivergencePath::kAuto;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind,
    bool swap, double param, double inv_temperature, bool grad_student, bool grad_teacher) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student must be 2-D (N, V), got ", student.dim(), "-D");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the shape of student ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(0) >= 1 && student.size(1) >= 1,
                    "student must have N >= 1 rows and V >= 1 columns, got ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) < std::numeric_limits<int32_t>::max() - 64,
                    "the CUDA kernels need V < 2^31, got ", student.size(1));
  TORCH_CHECK_VALUE(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  check_cuda(teacher, student, "teacher");
  check_cuda(valid, student, "valid");
  const auto dt = student.scalar_type();
  const fdiv_cuda::DType kdt = kernel_dtype(dt, "student");
  TORCH_CHECK_TYPE(teacher.scalar_type() == dt, "teacher must have the dtype of student (", dt,
                   "), got ", teacher.scalar_type());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK_VALUE(valid.dim() == 1 && valid.size(0) == student.size(0),
                    "valid must have shape (", student.size(0), ",), got ", valid.sizes());
  TORCH_CHECK_VALUE(kind >= 0 && kind < 8, "kind must be a base divergence id in [0, 8), got ",
                    kind);

  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = aligned(student), t = aligned(teacher), v = valid.contiguous();
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(at::kFloat));
  at::Tensor gs = grad_student ? at::empty_like(s, at::MemoryFormat::Contiguous) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::empty({0}, s.options());

  fdiv_cuda::DivergenceLaunch a;
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.valid = v.const_data_ptr<bool>();
  a.loss = loss.mutable_data_ptr<float>();
  a.grad_student = grad_student ? gs.mutable_data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.mutable_data_ptr() : nullptr;
  a.rows = s.size(0);
  a.cols = s.size(1);
  a.dtype = kdt;
  a.base = int(kind);
  a.swap = swap;
  a.param = param;
  a.inv_temperature = inv_temperature;
  a.path = divergence_path();
  check(fdiv_cuda::divergence_fwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "divergence_fwd_cuda");
  return {loss, gs, gt};
}

at::Tensor check_labels(const at::Tensor& labels, const at::Tensor& x) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", labels.scalar_type());
  check_cuda(labels, x, "labels");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must have shape (",
                    x.size(0), ",), got ", labels.sizes());
  return labels.to(at::kLong).contiguous();
}

at::Tensor check_row_vector(const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), name,
                   " must be a floating point tensor, got ", v.scalar_type());
  check_cuda(v, x, name);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(0), name, " must have shape (", x.size(0),
                    ",), got ", v.sizes());
  return v.to(at::kFloat).contiguous();
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, V), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(1) < std::numeric_limits<int32_t>::max() - 64,
                    "the CUDA kernels need V < 2^31, got ", x.size(1));
  kernel_dtype(x.scalar_type(), "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in, int64_t ignore_index,
    double inv_temperature, bool entropy) {
  check_x(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in);
  const int64_t rows = x.size(0);
  std::optional<at::Tensor> labels;
  if (labels_in) labels = check_labels(*labels_in, x);
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
  a.rows = rows;
  a.cols = x.size(1);
  a.dtype = kernel_dtype(x.scalar_type(), "x");
  a.ignore_index = ignore_index;
  a.inv_temperature = inv_temperature;
  check(fdiv_cuda::softmax_stats_fwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "softmax_stats_fwd_cuda");
  return {lse, ent, lp};
}

at::Tensor softmax_stats_bwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& labels_in,
                                  const at::Tensor& lse_in, const at::Tensor& entropy_in,
                                  const std::optional<at::Tensor>& g_lse_in,
                                  const std::optional<at::Tensor>& g_entropy_in,
                                  const std::optional<at::Tensor>& g_logprob_in,
                                  int64_t ignore_index, double inv_temperature) {
  check_x(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in);
  const at::Tensor lse = check_row_vector("lse", lse_in, x);
  std::optional<at::Tensor> labels, ent, g_lse, g_ent, g_lp;
  if (g_lse_in) g_lse = check_row_vector("g_lse", *g_lse_in, x);
  if (g_entropy_in) {
    g_ent = check_row_vector("g_entropy", *g_entropy_in, x);
    ent = check_row_vector("entropy (needed with g_entropy)", entropy_in, x);
  }
  if (g_logprob_in) {
    TORCH_CHECK_VALUE(labels_in.has_value(), "g_logprob needs labels, got labels=None");
    g_lp = check_row_vector("g_logprob", *g_logprob_in, x);
  }
  if (labels_in) labels = check_labels(*labels_in, x);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return dx;
  if (!g_lse && !g_ent && !g_lp) {  // no incoming gradient: 0 (not 0 * q, which NaN would poison)
    dx.zero_();
    return dx;
  }
  auto ptr = [](const std::optional<at::Tensor>& t) -> const float* {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  fdiv_cuda::StatsBwdLaunch a;
  a.x = x.const_data_ptr();
  a.dx = dx.mutable_data_ptr();
  a.labels = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  a.lse = lse.const_data_ptr<float>();
  a.entropy = ptr(ent);
  a.g_lse = ptr(g_lse);
  a.g_entropy = ptr(g_ent);
  a.g_logprob = ptr(g_lp);
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.dtype = kernel_dtype(x.scalar_type(), "x");
  a.ignore_index = ignore_index;
  a.inv_temperature = inv_temperature;
  check(fdiv_cuda::softmax_stats_bwd(a, c10::cuda::getCurrentCUDAStream().stream()),
        "softmax_stats_bwd_cuda");
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fdiv, m) {
  m.def(
      "divergence_fwd_cuda(Tensor student, Tensor teacher, Tensor valid, int kind, bool swap, "
      "float param, float inv_temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  m.def(
      "softmax_stats_fwd_cuda(Tensor x, Tensor? labels, int ignore_index, float inv_temperature, "
      "bool entropy) -> (Tensor lse, Tensor entropy, Tensor label_logprob)");
  m.def(
      "softmax_stats_bwd_cuda(Tensor x, Tensor? labels, Tensor lse, Tensor entropy, Tensor? g_lse, "
      "Tensor? g_entropy, Tensor? g_logprob, int ignore_index, float inv_temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(fdiv, CUDA, m) {
  m.impl("divergence_fwd_cuda", &divergence_fwd_cuda);
  m.impl("softmax_stats_fwd_cuda", &softmax_stats_fwd_cuda);
  m.impl("softmax_stats_bwd_cuda", &softmax_stats_bwd_cuda);
}

}  // namespace fdiv_kernels
