"""Triton kernels of fdiv-kernels, installed as ``fdiv_kernels.triton_kernels``.

Kernels and their launchers only: no autograd and no argument policing here (see
``fdiv_kernels/backends/triton_ops.py`` for the registered ops).
"""
