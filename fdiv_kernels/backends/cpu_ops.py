"""The cpu backend: the C++ kernels of ``fdiv_kernels._C`` (csrc/), with their fakes registered.

The schemas and CPU kernels are defined in C++ (``TORCH_LIBRARY(fdiv, m)``); importing the
extension registers them, and this module adds the fake implementations torch.compile needs.
"""

import fdiv_kernels._C  # noqa: F401  (registers torch.ops.fdiv.*_cpu)
from fdiv_kernels.backends.common import register_fakes

register_fakes("cpu")

from fdiv_kernels.transport import _ops_cpu as _sinkhorn_cpu  # noqa: E402,F401  (sinkhorn ops, if built)
# The fakes of the unrolled Sinkhorn ops: with the rest, so every C++ op has its fake once the cpu
# backend is loaded (not only after a first unrolled solve).
from fdiv_kernels.transport import _unrolled as _sinkhorn_unrolled  # noqa: E402,F401
