// Integer ids shared by Python, Triton and C++. The values are stated in fdiv_kernels/core/_ids.py;
// tests/test_ids.py parses this header and fails if the two disagree.
#pragma once

namespace fdiv_kernels {

// Divergence base kernels: each kind of the registry is a base plus a swap flag.
enum Base : int {
  KL = 0,
  JS = 1,
  TV = 2,
  HELLINGER = 3,
  CHI2 = 4,
  ALPHA = 5,
  SKEW_KL = 6,
  JEFFREYS = 7,
  SOFT_CE = 8,
};
constexpr int kNumKinds = 9;

// Sinkhorn ground costs.
enum Cost : int { SQEUCLIDEAN = 0, EUCLIDEAN = 1, L1 = 2, DOT = 3, COSINE = 4 };
constexpr int kNumCosts = 5;

// Tails of a top-k (sparse) teacher.
enum Tail : int { TAIL_NONE = 0, TAIL_BUCKET = 1, TAIL_RENORMALIZE = 2 };
constexpr int kNumTails = 3;

}  // namespace fdiv_kernels
