"""The backends' ops: each module registers its kernels as ``fdiv::<op>_<backend>`` ops and fills
its record (``fdiv_kernels.core._ops.SoftmaxOps``; Sinkhorn: ``transport._registry.SinkhornOps``).

``cpu_ops`` (C++ CPU kernels), ``cuda_ops`` (CUDA C++ kernels, CUDA builds only), ``triton_ops``
(Triton launchers), ``torch_ref`` (the chunked torch statement of every op: the spec the others
are tested against). The dispatch imports a module the first time its backend is considered.
"""
