// The CUDA kernels' host interface: plain C++, no torch and no CUDA headers.
//
// csrc/cuda/*.cu implement these with raw pointers (so nvcc compiles them without torch, see
// scripts/check_cuda.sh); csrc/cuda/bindings.cpp turns tensors into these structs. Every entry
// point returns a cudaError_t value (0 = success; error_string() names it) and launches on the
// given stream (a cudaStream_t passed as void*). Nothing here synchronizes.
//
// Layout contract: every (rows, cols) matrix is contiguous row-major with a 16-byte-aligned base
// pointer (bindings.cpp copies a tensor that is not); rows themselves may be misaligned (cols odd),
// the kernels handle that. cols < 2^31; rows and offsets are int64.
#pragma once

#include <cstdint>

namespace fdiv_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which divergence kernel: auto (cluster kernel where it fits on sm_90, else multi-pass), or one
// of them forced (tests / benchmarks). A forced cluster path that cannot run returns
// cudaErrorNotSupported.
enum class DivergencePath : int { kAuto = 0, kMultiPass = 1, kCluster = 2 };

struct DivergenceLaunch {
  const void* student;   // (rows, cols) logits of q
  const void* teacher;   // (rows, cols) logits of p
  const bool* valid;     // (rows,)
  float* loss;           // (rows,) out
  void* grad_student;    // (rows, cols) out, or nullptr when not wanted
  void* grad_teacher;    // (rows, cols) out, or nullptr when not wanted
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  int base = 0;          // base kind id (fdiv_kernels/kinds/_terms.py)
  bool swap = false;
  double param = 0.0;
  double inv_temperature = 1.0;
  DivergencePath path = DivergencePath::kAuto;
};

int divergence_fwd(const DivergenceLaunch& args, void* stream);

struct StatsFwdLaunch {
  const void* x;               // (rows, cols)
  const int64_t* labels;       // (rows,) or nullptr
  float* lse;                  // (rows,) out
  float* entropy;              // (rows,) out, or nullptr when not wanted
  float* label_logprob;        // (rows,) out, or nullptr (iff labels is nullptr)
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
};

int softmax_stats_fwd(const StatsFwdLaunch& args, void* stream);

// dx = (g_lse q - g_H [q > 0] q (a - lse + H) + g_lp (onehot(label) - q)) inv_T,  a = x inv_T.
// At least one of g_lse / g_entropy / g_logprob must be given (the caller zero-fills otherwise).
struct StatsBwdLaunch {
  const void* x;               // (rows, cols)
  void* dx;                    // (rows, cols) out, dtype of x
  const int64_t* labels;       // (rows,) or nullptr; needed with g_logprob
  const float* lse;            // (rows,)
  const float* entropy;        // (rows,), needed with g_entropy
  const float* g_lse;          // (rows,) or nullptr
  const float* g_entropy;      // (rows,) or nullptr
  const float* g_logprob;      // (rows,) or nullptr
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
};

int softmax_stats_bwd(const StatsBwdLaunch& args, void* stream);

const char* error_string(int err);

}  // namespace fdiv_cuda
