"""Divergence benchmark cases: fk.divergence per backend against torch eager, torch.compile and,
on a GPU with Liger-Kernel installed, Liger's log_softmax + JSD / KL pipeline."""

from __future__ import annotations

import importlib.util

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.cases import Case, our_backends
from fdiv_kernels.kinds._registry import ROW_DIVERGENCES, lookup, resolve
from fdiv_kernels.kinds._terms import element_terms

KIND_PARAMS = {"js": {"beta": 0.5}, "alpha": {"alpha": 0.5}, "skew_kl": {"lam": 0.1},
               "skew_reverse_kl": {"lam": 0.1}}


def kind_params(kind: str) -> tuple[str, dict]:
    """(name, keyword parameters) of a bench kind, ``name`` or ``name=value``."""
    name, eq, value = kind.partition("=")
    if eq:
        return name, {lookup(name).param: float(value)}
    return name, KIND_PARAMS.get(name, {})


def torch_pipeline(kind: str):
    """What a user writes without this library: two log_softmax passes, then the divergence
    (for the row kinds, the log-sum-exps of their definitions)."""
    kind, params = kind_params(kind)
    if kind in ROW_DIVERGENCES:
        return _row_pipeline(kind, params)
    spec = resolve(kind, params.get("beta"), params.get("alpha"), params.get("lam"))

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lq = torch.log_softmax(s.float(), dim=-1)
        lp = torch.log_softmax(t.float(), dim=-1)
        return element_terms(spec, lp, lq)[0].sum(-1).mean()

    return loss_fn


def _row_pipeline(kind: str, params: dict):
    """Renyi: log(sum p^a q^(1-a)) / (a - 1); Cauchy-Schwarz: -log <p, q> + (log |p|^2 +
    log |q|^2) / 2; from the two log_softmax tensors."""
    lse = torch.logsumexp
    a = params.get("alpha", lookup(kind).default)

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lq = torch.log_softmax(s.float(), dim=-1)
        lp = torch.log_softmax(t.float(), dim=-1)
        if kind == "renyi":
            rows = lse(a * lp + (1 - a) * lq, -1) / (a - 1)
        else:
            rows = -lse(lp + lq, -1) + 0.5 * (lse(2 * lp, -1) + lse(2 * lq, -1))
        return rows.mean()

    return loss_fn


def _liger_pipeline(kind: str):
    if kind not in ("js", "kl") or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    if kind == "js":
        crit = LigerJSD(beta=0.5)
        return lambda s, t: crit(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    crit = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda s, t: crit(torch.log_softmax(s, -1), torch.log_softmax(t, -1))


def _inputs(shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
    return s, t


def _runner(loss_fn, shape, dtype, device, mode):
    def setup():
        s, t = _inputs(shape, dtype, device, seed=0)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return loss_fn(s, t)
            return run
        s.requires_grad_(True)

        def run():
            loss_fn(s, t).backward()
            s.grad = None
        return run

    return setup


def divergence_cases(kinds, shapes, dtype, device, modes, peers=("eager", "compile", "liger"),
                     backends=None):
    cases = []
    probe = torch.empty(1, dtype=dtype, device=device)
    ours = our_backends("divergence_fwd", probe, backends)
    for kind in kinds:
        name, params = kind_params(kind)
        for shape in shapes:
            n, v = shape
            for mode in modes:
                # fwd: read s, t. full: read s, t; write d loss / d s.
                nbytes = (2 if mode == "fwd" else 3) * n * v * probe.element_size()
                case = Case(f"divergence:{kind}", mode, shape, dtype, device, nbytes)
                for b in ours:
                    def fused(s, t, b=b, name=name, params=params):
                        return fk.divergence(s, t, name, backend=b, **params)

                    case.providers[f"fdiv-{b}"] = _runner(fused, shape, dtype, device, mode)
                case.ours = tuple(case.providers)
                pipeline = torch_pipeline(kind)
                if "eager" in peers:
                    case.providers["torch-eager"] = _runner(pipeline, shape, dtype, device, mode)
                if "compile" in peers:
                    compiled = torch.compile(pipeline, dynamic=False)
                    case.providers["torch-compile"] = _runner(compiled, shape, dtype, device, mode)
                on_gpu = device.type == "cuda"
                liger = _liger_pipeline(kind) if on_gpu and "liger" in peers else None
                if liger is not None:
                    case.providers["liger"] = _runner(liger, shape, dtype, device, mode)
                cases.append(case)
    return cases
