"""The cpu backend: the C++ kernels of ``fdiv_kernels._C`` (csrc/), with their fakes registered.

The schemas and CPU kernels are defined in C++ (``TORCH_LIBRARY(fdiv, m)``); importing the
extension registers them, and this module adds the fake implementations torch.compile needs.
"""

import fdiv_kernels._C  # noqa: F401  (registers torch.ops.fdiv.*_cpu)
from fdiv_kernels.backends.common import register_fakes

register_fakes("cpu")

from fdiv_kernels.transport import _ops_cpu as _sinkhorn_cpu  # noqa: E402,F401  (sinkhorn ops, if built)
