// Why the dense gradients get huge pages. A fresh (N, V) gradient is written once per step, and
// glibc serves an allocation that large with a fresh mmap: its first write takes one page fault
// per 4 KiB page. On the CI VM that first touch of a 525 MB gradient (N=1024, V=128256, fp32)
// costs ~150 ms, more than the kernel's own read + write of the row (~40 ms); backed by 2 MiB
// pages it costs ~40 ms (bench/results/2026-12-02-cpu-2t-dense-output.md).
//
// When. Only if the kernel's buddy allocator already holds enough free 2 MiB blocks
// (/proc/buddyinfo, read per allocation, ~20 us): with `defrag` at its default (`madvise`) a huge
// page the kernel must first compact memory for stalls the faulting thread instead, which was
// measured at seconds on a busy, fragmented machine. Off when THP is `never`, on non-Linux, and
// when FDIV_KERNELS_HUGEPAGES=0.
//
// The memory still comes from torch's CPU allocator, so memory profiling sees it; the tensor
// keeps the allocation alive and starts at its first 2 MiB boundary.
#include "cpu/dense_output.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fdiv_kernels {
namespace {

constexpr int64_t kHugePage = int64_t(2) << 20;
constexpr int64_t kMinBytes = int64_t(16) << 20;
constexpr int kHugeOrder = 9;  // 2 MiB = 2^9 pages of 4 KiB

bool hugepages_allowed() {
  static const bool allowed = [] {
#ifdef __linux__
    const char* env = std::getenv("FDIV_KERNELS_HUGEPAGES");
    if (env && std::strcmp(env, "0") == 0) return false;
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;  // e.g. "always [madvise] never"; empty where THP is not built in
    std::getline(f, mode);
    return !mode.empty() && mode.find("[never]") == std::string::npos;
#else
    return false;
#endif
  }();
  return allowed;
}

// Free 2 MiB blocks the buddy allocator holds now, over every zone ("Node 0, zone Normal c0 c1
// ... c10": c_k free blocks of 2^k pages; a block of order k >= 9 holds 2^(k-9) huge pages).
int64_t free_huge_blocks() {
  std::ifstream f("/proc/buddyinfo");
  std::string line;
  int64_t total = 0;
  while (std::getline(f, line)) {
    const auto at = line.find("zone");
    if (at == std::string::npos) continue;
    std::istringstream in(line.substr(at + 4));
    std::string zone;
    in >> zone;
    int64_t count = 0;
    for (int order = 0; in >> count; ++order)
      if (order >= kHugeOrder) total += count << (order - kHugeOrder);
  }
  return total;
}

}  // namespace

at::Tensor empty_dense(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (nbytes < kMinBytes || !hugepages_allowed()) return at::empty(sizes, options);
  const int64_t span = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
  if (free_huge_blocks() < span / kHugePage) return at::empty(sizes, options);
  at::Tensor raw = at::empty({span + kHugePage}, options.dtype(at::kByte));
  const auto base = reinterpret_cast<uintptr_t>(raw.data_ptr());
  void* aligned = reinterpret_cast<void*>((base + kHugePage - 1) & ~uintptr_t(kHugePage - 1));
#ifdef __linux__
  madvise(aligned, size_t(span), MADV_HUGEPAGE);  // advice only: on failure, 4 KiB pages
#endif
  return at::for_blob(aligned, sizes)
      .options(options)
      .deleter([raw](void*) mutable { raw.reset(); })
      .make_tensor();
}

}  // namespace fdiv_kernels
