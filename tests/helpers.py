"""Helpers shared by the test modules: import them from here, never from another test module.

The float64 reference is reference.py; the tolerance tables and the backend fixtures are in
conftest.py (built with ``available_backends`` below).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import fdiv_kernels as fk

# Parameters that exercise each kind away from its degenerate limits (negative and >1 alpha too).
KIND_PARAMS = [
    ("kl", None), ("reverse_kl", None), ("js", 0.5), ("js", 0.1), ("tv", None),
    ("hellinger", None), ("chi2", None), ("alpha", 0.5), ("alpha", -0.5), ("alpha", 1.5),
    ("skew_kl", 0.1), ("skew_reverse_kl", 0.3), ("jeffreys", None),
]
PARAM_NAME = {"js": "beta", "alpha": "alpha", "skew_kl": "lam", "skew_reverse_kl": "lam"}


def kind_kwargs(kind: str, param: float | None) -> dict:
    """The keyword ``fk.divergence`` takes ``param`` under for ``kind`` (none without a param)."""
    return {PARAM_NAME[kind]: param} if param is not None else {}


def assert_close(actual, expected, tol: tuple[float, float], what: str = "") -> None:
    """``actual`` == ``expected`` within ``tol = (rtol, atol)``, compared in float64; NaN matches
    NaN. Either side may be a tensor, a number or an array."""
    rtol, atol = tol
    torch.testing.assert_close(
        torch.as_tensor(actual).to(torch.float64), torch.as_tensor(expected).to(torch.float64),
        rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


def available_backends(op: str, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` tensors of ``dtype`` here (on the CPU, Triton
    runs in the interpreter; on a GPU, only compiled Triton counts)."""
    x = torch.empty(1, dtype=dtype, device=device)
    out = []
    for name in fk.dispatch.BACKENDS:
        if device != "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            continue
        try:
            fk.dispatch.select(name, x, op)
        except fk.BackendUnavailableError:
            continue
        out.append(name)
    return out


def backend_cfg_fixture(backends: list[str], kernel_module: str):
    """A fixture over each backend, plus Triton with its block capped (``MAX_BLOCK = 64`` in
    ``kernel_module``) so short rows run the multi-block online loop of real vocabularies."""
    configs = [(b, False) for b in backends] + ([("triton", True)] if "triton" in backends else [])

    @pytest.fixture(params=configs, ids=[f"{b}{'-small_block' if c else ''}" for b, c in configs])
    def backend_cfg(request, monkeypatch):
        name, small = request.param
        if small:
            monkeypatch.setattr(importlib.import_module(kernel_module), "MAX_BLOCK", 64)
        return name

    return backend_cfg
