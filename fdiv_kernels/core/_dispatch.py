"""One dispatch for every op: a table of backends, each able to say why it cannot take an input.

``auto`` takes the first backend, in the device's order of preference, with no reasons;
``FDIV_BACKEND`` overrides ``auto``; an explicit request that cannot be met raises an error listing
the reasons. Never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

BACKENDS = ("triton", "cuda", "cpu", "torch")
# Preference per device type for ``auto``: fastest first, the torch reference last. The CUDA C++
# kernels have not yet been measured on a GPU, so auto prefers Triton there until a bench says so.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def load_error(module: str) -> str | None:
    """Import ``module`` once; return why it failed (the error text), or None when it loaded."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - reported to the user, never swallowed
        return f"{type(e).__name__}: {e}"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dtype_reasons(dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    return [] if dtype in dtypes else [f"dtype {dtype} is not one of {list(dtypes)}"]


def _triton_reasons(device: str, dtype: torch.dtype) -> list[str]:
    err = load_error("triton")
    if err:
        return [f"triton is not installed ({err})"]
    reasons = []
    if device != "cuda" and not triton_interpret():
        reasons.append(f"tensor is on {device}, needs a CUDA device (or TRITON_INTERPRET=1)")
    if not reasons:
        err = load_error("fdiv_kernels.backends.triton_ops")
        if err:
            reasons.append(f"the Triton kernels failed to load ({err})")
    return reasons + _dtype_reasons(dtype, FLOAT_DTYPES)


def _cpu_reasons(device: str, dtype: torch.dtype) -> list[str]:
    reasons = []
    err = load_error("fdiv_kernels._C")
    if err:
        reasons.append(f"the C++ extension fdiv_kernels._C is not built ({err})")
    if device != "cpu":
        reasons.append(f"tensor is on {device}, needs the CPU")
    return reasons + _dtype_reasons(dtype, FLOAT_DTYPES + (torch.float64,))


def _cuda_reasons(device: str, dtype: torch.dtype) -> list[str]:
    err = load_error("fdiv_kernels._C")
    if err:
        return [f"the C++ extension fdiv_kernels._C is not built ({err})"]
    reasons = []
    if not _RECORDS.get("cuda"):
        importlib.import_module(TABLE["cuda"].module)  # registers the records a CUDA build has
    if not _RECORDS.get("cuda"):
        reasons.append("the CUDA C++ kernels are not part of this build (needs a CUDA torch and "
                       "nvcc when installing)")
    if device != "cuda":
        reasons.append(f"tensor is on {device}, needs a CUDA device")
    return reasons + _dtype_reasons(dtype, FLOAT_DTYPES)


def _torch_reasons(device: str, dtype: torch.dtype) -> list[str]:
    return _dtype_reasons(dtype, FLOAT_DTYPES + (torch.float64,))


class OpRecord(Protocol):
    """What a family's per-backend record tells the dispatch (``fdiv_kernels.core._ops.SoftmaxOps``,
    ``fdiv_kernels.transport._registry.SinkhornOps``)."""

    name: str

    def provides(self, op: str) -> bool: ...

    def reasons(self, op: str, base: int, plain: bool) -> list[str]: ...


# backend name -> the records its ops module registered (one per op family).
_RECORDS: dict[str, list[OpRecord]] = {}


def register(record: OpRecord) -> None:
    """Declare what a backend implements: called by the backends' ops modules on import."""
    records = _RECORDS.setdefault(record.name, [])
    records[:] = [r for r in records if type(r) is not type(record)] + [record]


def record_for(backend: str, op: str) -> OpRecord | None:
    """The record of ``backend`` that provides ``op`` (None: the backend lacks it)."""
    return next((r for r in _RECORDS.get(backend, ()) if r.provides(op)), None)


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every ``auto`` candidate) cannot run on the given inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    reasons: Callable[[str, torch.dtype], list[str]]  # (device type, dtype) -> reasons
    module: str  # imported on first use: registers the backend's ops and records


TABLE = {
    "triton": Backend("triton", _triton_reasons, "fdiv_kernels.backends.triton_ops"),
    "cuda": Backend("cuda", _cuda_reasons, "fdiv_kernels.backends.cuda_ops"),
    "cpu": Backend("cpu", _cpu_reasons, "fdiv_kernels.backends.cpu_ops"),
    "torch": Backend("torch", _torch_reasons, "fdiv_kernels.backends.torch_ref"),
}


def not_supported_reasons(backend: str, x: Tensor) -> list[str]:
    """Why ``backend`` cannot run on tensors like ``x`` (empty list: it can)."""
    return TABLE[backend].reasons(x.device.type, x.dtype)


def select(requested: str, x: Tensor, op: str, base: int | None = None,
           transforms: tuple[float, ...] | None = None) -> str:
    """Resolve ``requested`` ("auto" or a backend name) for ``op`` on tensors like ``x``.

    ``op`` names a kernel of an op family's record (``"divergence_fwd"``, ``"sinkhorn_fwd"``).
    ``base``: the divergence base id the op will run (the backend's kernels may not take custom
    kinds); ``transforms``: the (scale, softcap, ...) pairs the kernel must fuse in. The backend
    qualifies when its device and dtype reasons are empty and its record provides ``op`` and
    declares what ``base`` and ``transforms`` need.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, got {type(requested).__name__}")
    plain = transforms is None or all(
        v == (1.0 if i % 2 == 0 else 0.0) for i, v in enumerate(transforms))
    return _select(requested, x.device.type, x.dtype, op, -1 if base is None else int(base),
                   plain)


# A pure function of its arguments and the environment: torch.compile runs it once while tracing
# and keeps the answer, so dispatch adds nothing to the compiled graph.
@torch.compiler.assume_constant_result
def _select(requested: str, device: str, dtype: torch.dtype, op: str, base: int = -1,
            plain: bool = True) -> str:
    if requested == "auto":
        requested = os.environ.get("FDIV_BACKEND", "auto") or "auto"
    if requested != "auto" and requested not in TABLE:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {requested!r}")
    candidates = AUTO_ORDER.get(device, ("torch",)) if requested == "auto" else (requested,)
    why = {}
    for name in candidates:
        reasons = TABLE[name].reasons(device, dtype)
        if not reasons:
            importlib.import_module(TABLE[name].module)  # registers the backend's records
            record = record_for(name, op)
            if record is None:
                reasons = [f"{op} is not implemented by this backend"]
            else:
                reasons = record.reasons(op, base, plain)
        if not reasons:
            return name
        why[name] = reasons
    lines = "\n".join(f"  {name}: {'; '.join(r)}" for name, r in why.items())
    raise BackendUnavailableError(
        f"no backend can run {op} with backend={requested!r} on these inputs:\n{lines}"
    )


def describe(x: Tensor) -> dict[str, list[str]]:
    """Every backend's reasons for tensors like ``x`` (used by ``python -m fdiv_kernels.info``)."""
    return {name: not_supported_reasons(name, x) for name in BACKENDS}
