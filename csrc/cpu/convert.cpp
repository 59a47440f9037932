// Per-ISA clones (AVX-512 / AVX2 / baseline) of the shared conversions in cpu/convert.h, for the
// kernels that call them outside their own cloned row code: out of line, they still get F16C /
// AVX-512 where the CPU has them. float64 is the gradcheck path: no clones.
#include "cpu/convert.h"

namespace fdiv_kernels {

#define FDIV_LOAD_ROW(scalar_t, T, ATTR)                                   \
  ATTR const T* load_row(T* buf, const scalar_t* src, int64_t n,           \
                         const LogitTransform<T>& xf) {                    \
    return load_block(buf, src, n, xf);                                    \
  }
FDIV_LOAD_ROW(float, float, FDIV_CLONES)
FDIV_LOAD_ROW(at::BFloat16, float, FDIV_CLONES)
FDIV_LOAD_ROW(at::Half, float, FDIV_CLONES)
FDIV_LOAD_ROW(double, double, )
#undef FDIV_LOAD_ROW

#define FDIV_NARROW_ROW(scalar_t)                                         \
  FDIV_CLONES void narrow_row(scalar_t* dst, const float* src, int64_t n) { \
    narrow_block(dst, src, n);                                              \
  }
FDIV_NARROW_ROW(at::BFloat16)
FDIV_NARROW_ROW(at::Half)
#undef FDIV_NARROW_ROW

}  // namespace fdiv_kernels
