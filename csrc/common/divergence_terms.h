// The per-element divergence math, shared by the CPU and CUDA kernels: the only C++ that knows it.
//
// For each base kind, in log space (lp = log p, lq = log q, p = exp(lp), q = exp(lq)):
//   t = the element's contribution (D = sum t),  h = dt/dlq,  k = dt/dlp.
// The statement of record is `_terms` in fdiv_kernels/kinds/_terms.py; every guard here mirrors
// one there: an exact zero probability contributes 0 (never 0 * inf = NaN), and an infinite
// divergence (p > 0 = q for KL) is +inf. Padding (lp = lq = -inf, p = q = 0) gives t = h = k = 0
// for every kind. Adding a kind: one `Terms<id>` specialization below and an id in common/ids.h.
//
// The transcendental functions come from a policy M (M::exp, M::log, M::log1p, M::expm1): vectorizable
// polynomials on the CPU (csrc/cpu/divergence_terms.h), SFU approximations on the GPU
// (csrc/cuda/divergence_terms.cuh).
#pragma once

#include <cmath>
#include <limits>

#include "common/ids.h"

#if defined(__CUDACC__)
#define FDIV_HD __host__ __device__ __forceinline__
#else
#define FDIV_HD inline __attribute__((always_inline))
#endif

namespace fdiv_kernels {


// Everything derived from the scalar parameter, computed once per call (on the host) in double.
template <class T>
struct KindConsts {
  T w, w1;                   // param, 1 - param
  T log_w, log_w1;           // log(param), log1p(-param)  (-inf at the ends, never NaN)
  T inv_w, inv_w1, inv_ww1;  // 1/param, 1/(1-param), 1/(param (1-param))

  KindConsts() = default;
  explicit KindConsts(double param)
      : w(T(param)), w1(T(1.0 - param)),
        log_w(T(param > 0 ? std::log(param) : -std::numeric_limits<double>::infinity())),
        log_w1(T(param < 1 ? std::log1p(-param) : -std::numeric_limits<double>::infinity())),
        inv_w(T(1.0 / param)), inv_w1(T(1.0 / (1.0 - param))),
        inv_ww1(T(1.0 / (param * (1.0 - param)))) {}
};

template <class T>
FDIV_HD T xlogy_ratio(T x, T lx, T ly) {  // x (lx - ly), with 0 log 0 = 0
  return x > T(0) ? x * (lx - ly) : T(0);
}

// Returned by value, not through references, so the simd loops keep it in registers.
template <class T>
struct Elem {
  T t, h, k;
};

template <int B>
struct Terms;

template <>
struct Terms<KL> {
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T lp, T lq, T p, T) {
    const T t = xlogy_ratio(p, lp, lq);
    return {t, -p, p > T(0) ? t + p : T(0)};
  }
};

template <>
struct Terms<JS> {
  // lm = log(w p + (1-w) q). Formed in linear space (one log instead of logaddexp's exp + log1p);
  // where the mixture is below the normal range its log is replaced by the larger of the two log
  // terms, off by at most log 2 -- but then every term it feeds is weighted by w p or (1-w) q,
  // both below that same ~1e-38, so the absolute error is nil and nothing turns into inf/NaN.
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>& c, T lp, T lq, T p, T q) {
    const T mix = c.w * p + c.w1 * q;
    const T la = lp + c.log_w, lb = lq + c.log_w1;
    const T lmix = M::log(mix);  // unconditional: a call under a branch would block if-conversion
    const T lm = mix >= std::numeric_limits<T>::min() ? lmix : (la > lb ? la : lb);
    const T tp = c.w * xlogy_ratio(p, lp, lm);
    const T tq = c.w1 * xlogy_ratio(q, lq, lm);
    return {tp + tq, tq, tp};
  }
};

template <>
struct Terms<TV> {
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T, T, T p, T q) {
    const T sgn = T(q > p) - T(q < p);
    const T d = p - q;
    return {T(0.5) * (d < T(0) ? -d : d), T(0.5) * sgn * q, T(-0.5) * sgn * p};
  }
};

template <>
struct Terms<HELLINGER> {
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T lp, T lq, T p, T q) {
    const T g = M::exp(T(0.5) * (lp + lq));
    return {T(0.5) * (p + q) - g, T(0.5) * (q - g), T(0.5) * (p - g)};
  }
};

template <>
struct Terms<CHI2> {
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T lp, T lq, T p, T q) {
    const T r = p > T(0) ? M::exp(T(2) * lp - lq) : T(0);  // p^2 / q: +inf where q = 0 < p
    return {r - T(2) * p + q, q - r, T(2) * (r - p)};
  }
};

template <>
struct Terms<ALPHA> {
  // With w = p^a q^(1-a) = q e^(a d) = p e^(-(1-a) d), d = lp - lq: q - w = -q expm1(a d) and
  // p - w = -p expm1(-(1-a) d) never cancel, and expm1(a d) / a -> d as a -> 0, so the kind moves
  // continuously into reverse / forward KL. The loss (a p + (1-a) q - w) / (a (1-a)) is regrouped
  // as (q - p + k) / a (a >= 1/2) or (p - q + h) / (1-a) (a < 1/2): the q - p terms sum to 0,
  // divided by the larger factor. (1 - sum w) / (a (1-a)) cancelled as 1 / (a (1-a)).
  // A vanishing p or q gives the limits: expm1(-inf) = -1, expm1(+inf) = +inf. Past x = 80,
  // q expm1(x) is e^(lq + x) - q: e^x alone overflows float32 at 88.7 while q e^x (|a| large, q
  // tiny) can be far inside the range.
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>& c, T lp, T lq, T p, T q) {
    const T d = lp - lq;
    const T x = c.w * d, y = -c.w1 * d;
    const T qe = x > T(80) ? M::exp(lq + x) - q : q * M::expm1(x);
    const T pe = y > T(80) ? M::exp(lp + y) - p : p * M::expm1(y);
    const T h = q > T(0) ? -qe * c.inv_w : T(0);
    const T k = p > T(0) ? -pe * c.inv_w1 : T(0);
    const T t = c.w >= T(0.5) ? (q - p + k) * c.inv_w : (p - q + h) * c.inv_w1;
    return {t, h, k};
  }
};

template <>
struct Terms<SKEW_KL> {
  // Unlike JS, t = p (lp - lm) carries no lam factor, so a tiny lam would make the linear-space
  // shortcut inexact: lm is the true logaddexp here.
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>& c, T lp, T lq, T p, T) {
    const T la = lp + c.log_w, lb = lq + c.log_w1;
    const T hi = la > lb ? la : lb;
    const T d = la - lb;
    const T lo_minus_hi = d > T(0) ? -d : d;
    // Both -inf: hi = -inf and the guards below zero everything; avoid a NaN in between anyway.
    const T lm = hi + M::log1p(M::exp(lo_minus_hi == lo_minus_hi ? lo_minus_hi : T(0)));
    const T t = xlogy_ratio(p, lp, lm);
    const T pr = p > T(0) ? p * M::exp(c.log_w1 + lq - lm) : T(0);
    return {t, -pr, p > T(0) ? t + pr : T(0)};
  }
};

template <>
struct Terms<JEFFREYS> {
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T lp, T lq, T p, T q) {
    const T d = lq - lp;
    return {xlogy_ratio(p, lp, lq) + xlogy_ratio(q, lq, lp),
            (q > T(0) ? q * d : T(0)) + q - p,
            (p > T(0) ? -p * d : T(0)) + p - q};
  }
};

template <>
struct Terms<SOFT_CE> {
  // Cross-entropy to the teacher, -sum p lq = KL(p||q) + H(p): not a divergence (its value at
  // p = q is H(p)), but the same element-term shape. p = 0 contributes 0 even where lq = -inf;
  // p > 0 = q gives +inf.
  template <class M, class T>
  FDIV_HD static Elem<T> eval(const KindConsts<T>&, T, T lq, T p, T) {
    const T t = p > T(0) ? -p * lq : T(0);
    return {t, -p, t};
  }
};

}  // namespace fdiv_kernels
