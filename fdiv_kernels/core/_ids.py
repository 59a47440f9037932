"""Integer ids shared by Python, Triton and C++: divergence base kernels and Sinkhorn cost kinds.

The values are stated once here. ``triton_kernels/ids.py`` wraps them as ``tl.constexpr`` (the
only globals a ``@triton.jit`` body may read), ``csrc/common/ids.h`` holds the same enums for
C++, and ``tests/test_ids.py`` parses that header and checks that the two agree.
"""

# Divergence base kernels (``fdiv_kernels.kinds._registry``): each kind is a base id plus a swap
# flag.
KL = 0
JS = 1
TV = 2
HELLINGER = 3
CHI2 = 4
ALPHA = 5
SKEW_KL = 6
JEFFREYS = 7
SOFT_CE = 8
NUM_BASES = 9

# Sinkhorn ground costs (``fdiv_kernels.transport._costs.COST_KINDS``).
SQEUCLIDEAN = 0
EUCLIDEAN = 1
L1 = 2
DOT = 3
COSINE = 4
NUM_COSTS = 5

# Tails of a top-k (sparse) teacher (``fdiv_kernels.divergences._sparse_tails.TAILS``).
TAIL_NONE = 0
TAIL_BUCKET = 1
TAIL_RENORMALIZE = 2
NUM_TAILS = 3

BASES = {"KL": KL, "JS": JS, "TV": TV, "HELLINGER": HELLINGER, "CHI2": CHI2, "ALPHA": ALPHA,
         "SKEW_KL": SKEW_KL, "JEFFREYS": JEFFREYS, "SOFT_CE": SOFT_CE}
COSTS = {"SQEUCLIDEAN": SQEUCLIDEAN, "EUCLIDEAN": EUCLIDEAN, "L1": L1, "DOT": DOT,
         "COSINE": COSINE}
TAIL_IDS = {"TAIL_NONE": TAIL_NONE, "TAIL_BUCKET": TAIL_BUCKET,
            "TAIL_RENORMALIZE": TAIL_RENORMALIZE}
