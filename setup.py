"""Build fdiv-kernels: the Python package, its Triton kernels and the C++ CPU extension.

The CPU extension is always built (torch's cpp_extension, no nvcc needed). When the installed torch
is a CUDA build and nvcc is found (CUDA_HOME), the same module fdiv_kernels._C is built as a
CUDAExtension that also holds the CUDA kernels (csrc/cuda/, compiled for TORCH_CUDA_ARCH_LIST,
default "8.0;9.0a"); FDIV_NO_CUDA=1 forces the CPU-only build. Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed instead of
fetching another one into an isolated environment.

Objects are compiled (by ninja) into one persistent directory, build/temp.<platform>-<python>, for
every way of building: ``pip install -e`` would otherwise compile in a fresh temporary directory
each time, so the test and bench commands (scripts/) each recompiled every C++ file. ninja then
recompiles only the sources whose text, included headers or flags changed.
"""

import glob
import os
import platform
import re
import sys
import sysconfig

from setuptools import setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """The one version: ``__version__`` in fdiv_kernels/__init__.py, read as text (importing the
    package here would need its extension built)."""
    with open(os.path.join(ROOT, "fdiv_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def long_description() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def cpu_sources() -> list:
    return sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


def headers() -> list:
    """Every header the sources include: the build is redone when one changes (setuptools
    otherwise compares only the .cpp/.cu files with the built library)."""
    return sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))


def cpu_extension() -> CppExtension:
    sources = cpu_sources()
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
        depends=headers(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


def cuda_wanted() -> bool:
    """A CUDA torch and an nvcc: only then is anything compiled for the GPU."""
    if os.environ.get("FDIV_NO_CUDA", "") == "1" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def cuda_extension():
    """fdiv_kernels._C with the CPU sources plus csrc/cuda (kernels in .cu, torch glue in bindings.cpp)."""
    from torch.utils.cpp_extension import CUDAExtension

    # sm_80 gets the multi-pass kernels; sm_90a also the thread-block-cluster kernel.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # nvcc on many template instantiations needs ~2-4 GB per job: bound the parallel jobs by RAM.
    if "MAX_JOBS" not in os.environ:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 8 << 30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, ram // (4 << 30))))
    base = cpu_extension()
    sources = base.sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + [
        os.path.join("csrc", "cuda", "bindings.cpp")
    ]
    cxx = base.extra_compile_args["cxx"] + ["-DFDIV_WITH_CUDA"]
    nvcc = ["-O3", "-std=c++17", "-DFDIV_WITH_CUDA"]
    return CUDAExtension(
        name="fdiv_kernels._C",
        sources=sources,
        depends=headers(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


class BuildExt(BuildExtension):
    """torch's BuildExtension, compiling into the persistent build/temp.* directory."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # The default name of `setup.py build_ext`, fixed for pip's editable builds too (PEP 660
        # builds set a temporary directory here). Per platform and interpreter: objects of two
        # Python versions never mix.
        self.build_temp = os.path.join(
            ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        )


setup(
    name="fdiv-kernels",
    version=version(),
    description="Fused GPU/CPU kernels for softmax divergences, log-sum-exp statistics and Sinkhorn",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    # Listed, not found: find_packages() would also install tools/ and a top-level triton_kernels.
    packages=["fdiv_kernels", "fdiv_kernels.core", "fdiv_kernels.kinds", "fdiv_kernels.divergences",
              "fdiv_kernels.stats", "fdiv_kernels.fused_linear", "fdiv_kernels.backends",
              "fdiv_kernels.transport", "fdiv_kernels.distributed", "fdiv_kernels.integrations",
              "fdiv_kernels.bench", "fdiv_kernels.triton_kernels"],
    package_dir={"fdiv_kernels.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    # No extra names torch: each is installed with the constraints file (scripts/constraints.txt)
    # or next to a torch already present, so no install pulls another torch.
    extras_require={
        "triton": ["triton>=3.0"],
        # POT is the float64 oracle of the Sinkhorn tests; GeomLoss a peer (both torch-agnostic).
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0", "numpy", "matplotlib", "pot",
                 "geomloss"],
        # The hosts fdiv_kernels.integrations plugs into (scripts/requirements-integrations.txt
        # pins the versions the parity tests were written for).
        "trl": ["trl>=1.16", "transformers>=5", "accelerate"],
        "hf": ["transformers>=5", "accelerate"],
        "liger": ["liger-kernel>=0.8.5", "triton>=3.0"],
        "integrations": ["trl>=1.16", "transformers>=5", "accelerate", "liger-kernel>=0.8.5"],
        "bench": ["matplotlib", "pytest-benchmark>=4", "pot", "geomloss"],
        # The documentation site: mkdocs build --strict (mkdocs.yml).
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    ext_modules=[cuda_extension() if cuda_wanted() else cpu_extension()],
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=False)},
    zip_safe=False,
)
