"""The cuda backend: the CUDA C++ kernels of ``fdiv_kernels._C`` (csrc/cuda/), present only when
the extension was built against a CUDA torch with nvcc; their fakes are registered here."""

import fdiv_kernels._C  # noqa: F401  (registers torch.ops.fdiv.*_cuda in a CUDA build)
from fdiv_kernels.backends.common import register_fakes

register_fakes("cuda")
