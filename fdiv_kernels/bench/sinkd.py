"""SinKD benchmark case: the Sinkhorn distillation loss (``fk.nn.SinkhornDistillationLoss``:
softened rows, L1 cost between them, 20 alternating log-domain iterations at eps = 0.1, loss
<C, P>, differentiated through the iterations) per backend, against the eager loop it replaces.
Shape (N, C): N rows of C classes (the target is stated at N = 32, C = 3). Each of our rows also
reports its loss's distance to the eager loop's."""

from __future__ import annotations

import math

import torch

from fdiv_kernels.bench.cases import Case, our_backends
from fdiv_kernels.core._dispatch import BACKENDS
from fdiv_kernels.nn import SinkhornDistillationLoss

DEFAULT_SHAPES = [(32, 3)]
QUICK_SHAPES = [(8, 3)]
TEMPERATURE, EPS, N_ITER = 2.0, 0.1, 20


def eager_sinkd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a user writes without this library: the SinKD loop in plain torch ops."""
    ps = torch.softmax(s / TEMPERATURE, -1)
    pt = torch.softmax(t.detach() / TEMPERATURE, -1)
    C = torch.cdist(ps, pt, p=1)
    N = C.shape[0]
    lw = torch.full((N,), -math.log(N), dtype=C.dtype, device=C.device)
    f = torch.zeros(N, dtype=C.dtype, device=C.device)
    g = torch.zeros_like(f)
    for _ in range(N_ITER):
        f = -EPS * torch.logsumexp(lw[None] + (g[None] - C) / EPS, 1)
        g = -EPS * torch.logsumexp(lw[:, None] + (f[:, None] - C) / EPS, 0)
    P = torch.exp(lw[:, None] + lw[None] + (f[:, None] + g[None] - C) / EPS)
    return (P * C).sum()


def _inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return s, t


def _setup(loss_fn, shape, dtype, device, mode, out):
    def setup():
        s, t = _inputs(shape, dtype, device)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    out["loss"] = loss_fn(s, t)
                return out["loss"]
            return run
        s.requires_grad_(True)

        def run():
            loss = loss_fn(s, t)
            loss.backward()
            s.grad = None
            out["loss"] = loss.detach()
        return run

    return setup


def sinkd_cases(shapes, dtype, device, modes=("full",), peers=("eager",), backends=None):
    probe = torch.empty(1, dtype=dtype, device=device)
    # The cpu backend runs the fused C++ op; the others the checkpointed torch loop.
    ours = our_backends("sinkhorn_fwd", probe, backends or BACKENDS)
    cases = []
    for shape in shapes:
        N, C = shape
        s, t = _inputs(shape, torch.float64, device)
        ref = float(eager_sinkd(s, t))
        for mode in modes:
            # Compulsory bytes: read the student and teacher logits (and write the student's
            # gradient in full mode); the N x N cost and plans need never leave the cache.
            moved = (2 + (mode == "full")) * N * C * probe.element_size()
            case = Case("sinkd:l1", mode, shape, dtype, device, moved)
            for b in ours:
                out = {}
                crit = SinkhornDistillationLoss(TEMPERATURE, EPS, N_ITER, backend=b)
                case.providers[f"fdiv-{b}"] = _setup(crit, shape, dtype, device, mode, out)
                case.extra[f"fdiv-{b}"] = lambda out=out, ref=ref: {
                    "loss_err_vs_f64": abs(float(out["loss"]) - ref)}
            case.ours = tuple(case.providers)
            if "eager" in peers:
                case.providers["torch-eager"] = _setup(eager_sinkd, shape, dtype, device, mode,
                                                       {})
            cases.append(case)
    return cases


if __name__ == "__main__":  # python -m fdiv_kernels.bench.sinkd [--quick]
    import sys

    from fdiv_kernels.bench.report import format_table, run_cases

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK_SHAPES if "--quick" in sys.argv else DEFAULT_SHAPES
    print(format_table(run_cases(sinkd_cases(shapes, torch.float32, dev, ("fwd", "full")))))
