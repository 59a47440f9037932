// The divergence element terms (csrc/common/divergence_terms.h, shared with the CPU kernels) with
// the GPU's transcendental functions: SFU approximations (as Triton's), and the precise log1pf
// where skew KL needs it. Padding elements give t = h = k = 0 for every kind, so the kernels run
// whole 16-byte chunks without masks.
#pragma once

#include <type_traits>

#include "common/divergence_terms.h"
#include "cuda/device_common.cuh"

namespace fdiv_cuda {

using fdiv_kernels::Base;
using fdiv_kernels::KL;
using fdiv_kernels::JS;
using fdiv_kernels::TV;
using fdiv_kernels::HELLINGER;
using fdiv_kernels::CHI2;
using fdiv_kernels::ALPHA;
using fdiv_kernels::SKEW_KL;
using fdiv_kernels::JEFFREYS;
using fdiv_kernels::kNumKinds;
using fdiv_kernels::Terms;
using KindConsts = fdiv_kernels::KindConsts<float>;
using Elem = fdiv_kernels::Elem<float>;

struct GpuMath {
  FDIV_DEV static float exp(float x) { return fexp(x); }
  FDIV_DEV static float log(float x) { return flog(x); }
  FDIV_DEV static float log1p(float x) { return log1pf(x); }
  FDIV_DEV static float expm1(float x) { return expm1f(x); }  // precise: alpha near 0 and 1
};

inline KindConsts make_consts(double param) { return KindConsts(param); }

// Host-side dispatch helper: calls f(std::integral_constant<int, B>{}) for the runtime base id.
template <int B = 0, class F>
inline int dispatch_kind(int base, F&& f) {
  if constexpr (B < kNumKinds) {
    if (base == B) return f(std::integral_constant<int, B>{});
    return dispatch_kind<B + 1>(base, static_cast<F&&>(f));
  } else {
    return int(cudaErrorInvalidValue);
  }
}

}  // namespace fdiv_cuda
