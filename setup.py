"""Build fdiv-kernels: the Python package, its Triton kernels and the C++ CPU extension.

The CPU extension is always built (torch's cpp_extension, no nvcc needed). Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed instead of
fetching another one into an isolated environment.
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_extension() -> CppExtension:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # C++20: what torch's own headers are written for (C++17 builds but warns in c10).
    # -fno-trapping-math: lets GCC if-convert the kernels' selects (exp/log edge cases, zero
    # guards) into blends; without it a loop with a guarded exp/log stays scalar. No code here
    # relies on FP exception flags. -ffp-contract=fast: FMAs in the polynomials.
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the rows run on
    # one thread. It shares torch's libgomp, so torch.set_num_threads applies.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
           "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Per-ISA clones are chosen at load time (target_clones), so the baseline stays portable.
        cxx += ["-DFDIV_TARGET_CLONES"]
    return CppExtension(
        name="fdiv_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


setup(
    name="fdiv-kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for softmax divergences, log-sum-exp statistics and Sinkhorn",
    packages=["fdiv_kernels", "fdiv_kernels.backends", "fdiv_kernels.bench", "fdiv_kernels.triton_kernels"],
    package_dir={"fdiv_kernels.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0", "numpy"],
        "bench": ["matplotlib", "pytest-benchmark>=4"],
    },
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    zip_safe=False,
)
