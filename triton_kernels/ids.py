"""The ids of ``fdiv_kernels.core._ids`` as ``tl.constexpr`` globals, which ``@triton.jit`` code may
read
(Triton's compiler rejects any other global; the interpreter does not, so only a real compile
catches it). Import the names themselves: ``from fdiv_kernels.triton_kernels.ids import KL``.
"""

import triton.language as tl

from fdiv_kernels.core import _ids

KL = tl.constexpr(_ids.KL)
JS = tl.constexpr(_ids.JS)
TV = tl.constexpr(_ids.TV)
HELLINGER = tl.constexpr(_ids.HELLINGER)
CHI2 = tl.constexpr(_ids.CHI2)
ALPHA = tl.constexpr(_ids.ALPHA)
SKEW_KL = tl.constexpr(_ids.SKEW_KL)
JEFFREYS = tl.constexpr(_ids.JEFFREYS)
SOFT_CE = tl.constexpr(_ids.SOFT_CE)

SQEUCLIDEAN = tl.constexpr(_ids.SQEUCLIDEAN)
EUCLIDEAN = tl.constexpr(_ids.EUCLIDEAN)
L1 = tl.constexpr(_ids.L1)
DOT = tl.constexpr(_ids.DOT)
COSINE = tl.constexpr(_ids.COSINE)

TAIL_NONE = tl.constexpr(_ids.TAIL_NONE)
TAIL_BUCKET = tl.constexpr(_ids.TAIL_BUCKET)
TAIL_RENORMALIZE = tl.constexpr(_ids.TAIL_RENORMALIZE)
