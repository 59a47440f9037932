// Branch-free float exp/log that GCC vectorizes inside `#pragma omp simd` loops.
//
// libm's expf/logf are opaque calls, so a loop calling them stays scalar. These are Cephes-style
// (range reduction + minimax polynomial, about 1 ulp) written with selects instead of branches,
// so every lane follows the same instruction stream. Edge cases are IEEE-exact: exp(-inf) = 0,
// exp(+inf) = inf, exp(nan) = nan, gradual underflow to denormals then 0, overflow to inf;
// log(0) = -inf, log(inf) = inf, log(x < 0) = log(nan) = nan, denormal inputs handled.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#define FDIV_INLINE inline __attribute__((always_inline))

// One binary for every x86-64 CPU: the loader picks the widest clone the CPU supports.
// Everything a cloned function calls must be FDIV_INLINE so that it is compiled for that clone.
#ifdef FDIV_TARGET_CLONES
#define FDIV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FDIV_CLONES
#endif

namespace fdiv_kernels {

// exp(x) = 2^n * y with n = round(x / ln 2) and y = exp(x - n ln 2) from a degree-7 polynomial:
// the range reduction shared by the exp variants (the caller clamps x and scales by 2^n).
struct ExpReduced {
  float y, n;
};

FDIV_INLINE ExpReduced exp_reduced(float xc) {
  // Round to nearest with the 1.5 * 2^23 trick: no libm call, so the SSE2 clone vectorizes too.
  const float kShift = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kShift) - kShift;
  // ln 2 split in two: n * 0.693359375 is exact, so r carries no cancellation error.
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return {y * (r * r) + r + 1.0f, n};
}

FDIV_INLINE float vexp(float x) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // Past these, exp(x) rounds to +inf / 0 anyway; clamping keeps the exponent arithmetic in range.
  constexpr float kHi = 88.8f, kLo = -104.0f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  const ExpReduced e = exp_reduced(xc);
  const float y = e.y, n = e.n;
  // 2^n in two factors (n in [-150, 128]): each stays a normal float, and the final product
  // rounds once, into a denormal when the result is one.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  const float s1 = std::bit_cast<float>(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = std::bit_cast<float>(static_cast<uint32_t>(n2 + 127) << 23);
  float res = (y * s1) * s2;
  res = x > kHi ? kInf : res;
  return x != x ? x : res;
}

FDIV_INLINE float vlog(float x) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  // Denormals: scale into the normal range first so the exponent field is meaningful.
  const bool sub = x < std::numeric_limits<float>::min();
  const float xs = sub ? x * 8388608.0f : x;
  const uint32_t u = std::bit_cast<uint32_t>(xs);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 126;
  e = sub ? e - 23 : e;
  // The mantissa in [0.5, 1).
  const float m = std::bit_cast<float>((u & 0x007fffffu) | 0x3f000000u);
  // Center the mantissa on 1 ([sqrt(1/2), sqrt(2))) so the polynomial argument is small.
  const bool low = m < 0.707106781186547524f;
  const float f = low ? (m + m) - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(low ? e - 1 : e);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = f + y;
  res = res + fe * 0.693359375f;
  res = x == kInf ? kInf : res;
  res = x == 0.0f ? -kInf : res;
  return x >= 0.0f ? res : kNaN;  // false for x < 0 and for nan
}

// log1p(y) for y >= 0 without libm, exact to ~1 ulp: Goldberg's u = 1 + y correction.
FDIV_INLINE float vlog1p(float y) {
  const float u = 1.0f + y;
  const float d = u - 1.0f;
  const float r = vlog(u) * (y / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? y : r;
}

// exp(x) in double for x <= 0 (NaN passes), branch-free so `omp simd` vectorizes it (libm's exp
// is an opaque call: lse_combination's float64 sums pass ran 3x slower than the divergence
// kernels with it). n =
// round(x / ln 2) by the 1.5 * 2^52 trick (n also read from the bits: no double -> int64
// conversion, which AVX2 lacks), r = x - n ln 2 with ln 2 split (fdlibm's hi/lo), exp(r) by its
// degree-13 Taylor polynomial (|r| <= ln 2 / 2: truncation < 4e-18 relative), times 2^n built in
// the exponent field. Below -708 the result would leave the normal range: 0 there, which a sum
// that holds exp(0) = 1 (its max term) cannot notice.
FDIV_INLINE double exp_nonpositive(double x) {
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  constexpr uint64_t kShiftBits = 0x4338000000000000ull;
  const double xc = x < -708.0 ? -708.0 : x;
  const double t = xc * 1.4426950408889634 + kShift;
  const double n = t - kShift;
  double r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double y = 1.0 / 6227020800.0;  // 1/13!
  y = y * r + 1.0 / 479001600.0;
  y = y * r + 1.0 / 39916800.0;
  y = y * r + 1.0 / 3628800.0;
  y = y * r + 1.0 / 362880.0;
  y = y * r + 1.0 / 40320.0;
  y = y * r + 1.0 / 5040.0;
  y = y * r + 1.0 / 720.0;
  y = y * r + 1.0 / 120.0;
  y = y * r + 1.0 / 24.0;
  y = y * r + 1.0 / 6.0;
  y = y * r + 0.5;
  y = y * r + 1.0;
  y = y * r + 1.0;
  const uint64_t ni = std::bit_cast<uint64_t>(t) - kShiftBits;  // n, two's complement
  const double scale = std::bit_cast<double>((ni + 1023ull) << 52);
  const double res = x < -708.0 ? 0.0 : y * scale;
  return x != x ? x : res;
}

// float64 is the gradcheck path: accuracy over speed, so plain libm.
FDIV_INLINE double vexp(double x) { return std::exp(x); }
FDIV_INLINE double vlog(double x) { return std::log(x); }
FDIV_INLINE double vlog1p(double x) { return std::log1p(x); }

}  // namespace fdiv_kernels
