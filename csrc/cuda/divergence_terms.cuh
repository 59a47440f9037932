// The per-element divergence math on the GPU: a line-by-line mirror of csrc/cpu/divergence_terms.h
// (float only, SFU exp/log). The statement of record is `_terms` in fdiv_kernels/divergences.py;
// every guard mirrors one there: an exact zero probability contributes 0 (never 0 * inf = NaN), an
// infinite divergence (p > 0 = q for KL) is +inf. Adding a kind: one Terms<id> here (and bump
// kNumKinds); the launchers instantiate 0..kNumKinds-1 by themselves.
//
// Padding elements (lp = lq = -inf, p = q = 0) give t = h = k = 0 for every kind: the kernels rely
// on it to run whole 16-byte chunks without masks.
#pragma once

#include <cmath>

#include "cuda/device_common.cuh"

namespace fdiv_cuda {

enum Base : int { KL = 0, JS, TV, HELLINGER, CHI2, ALPHA, SKEW_KL, JEFFREYS };
constexpr int kNumKinds = 8;

// Everything derived from the scalar parameter; built on the host in double (make_consts).
struct KindConsts {
  float w, w1;               // param, 1 - param
  float log_w, log_w1;       // log(param), log1p(-param)  (-inf at the ends, never NaN)
  float inv_w, inv_w1, inv_ww1;
};

inline KindConsts make_consts(double param) {
  const double inf = INFINITY;
  KindConsts c;
  c.w = float(param);
  c.w1 = float(1.0 - param);
  c.log_w = float(param > 0 ? std::log(param) : -inf);
  c.log_w1 = float(param < 1 ? std::log1p(-param) : -inf);
  c.inv_w = float(1.0 / param);
  c.inv_w1 = float(1.0 / (1.0 - param));
  c.inv_ww1 = float(1.0 / (param * (1.0 - param)));
  return c;
}

FDIV_DEV float xlogy_ratio(float x, float lx, float ly) {  // x (lx - ly), with 0 log 0 = 0
  return x > 0.f ? x * (lx - ly) : 0.f;
}

struct Elem {
  float t, h, k;
};

template <int B>
struct Terms;

template <>
struct Terms<KL> {
  FDIV_DEV static Elem eval(const KindConsts&, float lp, float lq, float p, float) {
    const float t = xlogy_ratio(p, lp, lq);
    return {t, -p, p > 0.f ? t + p : 0.f};
  }
};

template <>
struct Terms<JS> {
  // lm = log(w p + (1-w) q) in linear space; below the normal range the larger log term stands in
  // (see the CPU header for why that is harmless).
  FDIV_DEV static Elem eval(const KindConsts& c, float lp, float lq, float p, float q) {
    const float mix = c.w * p + c.w1 * q;
    const float la = lp + c.log_w, lb = lq + c.log_w1;
    const float lm = mix >= 1.17549435e-38f ? flog(mix) : fmaxf(la, lb);
    const float tp = c.w * xlogy_ratio(p, lp, lm);
    const float tq = c.w1 * xlogy_ratio(q, lq, lm);
    return {tp + tq, tq, tp};
  }
};

template <>
struct Terms<TV> {
  FDIV_DEV static Elem eval(const KindConsts&, float, float, float p, float q) {
    const float sgn = float(q > p) - float(q < p);
    return {0.5f * fabsf(p - q), 0.5f * sgn * q, -0.5f * sgn * p};
  }
};

template <>
struct Terms<HELLINGER> {
  FDIV_DEV static Elem eval(const KindConsts&, float lp, float lq, float p, float q) {
    const float g = fexp(0.5f * (lp + lq));
    return {0.5f * (p + q) - g, 0.5f * (q - g), 0.5f * (p - g)};
  }
};

template <>
struct Terms<CHI2> {
  FDIV_DEV static Elem eval(const KindConsts&, float lp, float lq, float p, float q) {
    const float r = p > 0.f ? fexp(2.f * lp - lq) : 0.f;  // p^2 / q: +inf where q = 0 < p
    return {r - 2.f * p + q, q - r, 2.f * (r - p)};
  }
};

template <>
struct Terms<ALPHA> {
  FDIV_DEV static Elem eval(const KindConsts& c, float lp, float lq, float p, float q) {
    const float w = (p > 0.f || q > 0.f) ? fexp(c.w * lp + c.w1 * lq) : 0.f;
    return {(c.w * p + c.w1 * q - w) * c.inv_ww1, (q - w) * c.inv_w, (p - w) * c.inv_w1};
  }
};

template <>
struct Terms<SKEW_KL> {
  // t carries no lam factor, so lm is the true logaddexp (precise log1pf).
  FDIV_DEV static Elem eval(const KindConsts& c, float lp, float lq, float p, float) {
    const float la = lp + c.log_w, lb = lq + c.log_w1;
    const float hi = fmaxf(la, lb);
    const float d = -fabsf(la - lb);
    const float lm = hi + log1pf(fexp(d == d ? d : 0.f));
    const float t = xlogy_ratio(p, lp, lm);
    const float pr = p > 0.f ? p * fexp(c.log_w1 + lq - lm) : 0.f;
    return {t, -pr, p > 0.f ? t + pr : 0.f};
  }
};

template <>
struct Terms<JEFFREYS> {
  FDIV_DEV static Elem eval(const KindConsts&, float lp, float lq, float p, float q) {
    const float d = lq - lp;
    return {xlogy_ratio(p, lp, lq) + xlogy_ratio(q, lq, lp),
            (q > 0.f ? q * d : 0.f) + q - p,
            (p > 0.f ? -p * d : 0.f) + p - q};
  }
};

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
