"""Sinkhorn benchmark cases: fk.sinkhorn per backend (cost on the fly, and from a dense cost)
against POT's batch solver (``ot.batch.solve_batch``) and GeomLoss's tensorized backend when
installed, all on the same batch, squared Euclidean, epsilon = 0.05 x mean cost. Each row also
reports the worst problem's L1 marginal error of the returned plan (rows plus columns; ours
stops at 1e-4 on the rows) and, for ours, the mean iterations."""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch

from fdiv_kernels.transport._costs import pairwise_cost
from fdiv_kernels.bench.cases import Case, our_backends
from fdiv_kernels.core._dispatch import BACKENDS

# The module, not fk.sinkhorn (the function of the same name once the package exports it).
S = importlib.import_module("fdiv_kernels.transport._sinkhorn")

DEFAULT_SHAPES = {"cpu": [(64, 256, 256, 64)], "cuda": [(64, 256, 256, 64), (32, 1024, 1024, 128)]}
QUICK_SHAPES = [(4, 32, 32, 8)]
TOL = 1e-4


def _inputs(shape, dtype, device, seed=0):
    B, n, m, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, n, d, generator=g).to(device=device, dtype=dtype)
    y = (torch.randn(B, m, d, generator=g) + 0.5).to(device=device, dtype=dtype)
    cost = pairwise_cost(x.float(), y.float(), 0)
    eps = 0.05 * float(cost.mean())
    return x, y, cost, eps


def _marginal_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)).max())


def _holder():
    return {}


def sinkhorn_cases(shapes, dtype, device, peers=("pot", "geomloss"), backends=None):
    cases = []
    probe = torch.empty(1, dtype=dtype, device=device)
    # On the CPU: the C++ kernels (cpu) and the torch reference.
    ours = our_backends("sinkhorn_fwd", probe, backends or BACKENDS)
    for shape in shapes:
        B, n, m, d = shape
        # Compulsory bytes: read the points once (the cost is never stored).
        case = Case("sinkhorn:sqeuclidean", "fwd", shape, dtype, device,
                    B * (n + m) * d * probe.element_size())
        for b in ours:
            for dense in (False, True):
                name = f"fdiv-{b}{'-dense' if dense else ''}"
                out = _holder()

                def setup(b=b, dense=dense, out=out):
                    x, y, cost, eps = _inputs(shape, dtype, device)
                    kw = dict(cost=cost) if dense else dict(x=x, y=y)

                    def run():
                        with torch.no_grad():
                            out["r"] = S.sinkhorn(**kw, epsilon=eps, tol=TOL, backend=b)
                        return out["r"]
                    return run

                def extra(out=out):
                    # The same measure for every provider: from the plan, rows and columns.
                    r = out["r"]
                    a = torch.full((B, n), 1 / n, device=device)
                    bb = torch.full((B, m), 1 / m, device=device)
                    return {"marginal_err": _marginal_error(r.plan().float(), a, bb),
                            "iters": float(r.n_iter.float().mean())}

                case.providers[name] = setup
                case.extra[name] = extra
        case.ours = tuple(case.providers)
        if "pot" in peers and importlib.util.find_spec("ot") is not None:
            out = _holder()

            def pot_setup(out=out):
                import ot

                _, _, cost, eps = _inputs(shape, dtype, device)
                a = torch.full((B, n), 1 / n, device=device)
                bb = torch.full((B, m), 1 / m, device=device)

                def run():
                    out["P"] = ot.batch.solve_batch(cost, reg=eps, a=a, b=bb, max_iter=1000,
                                                    tol=TOL).plan
                    out["ab"] = (a, bb)
                    return out["P"]
                return run

            case.providers["pot-batch"] = pot_setup
            case.extra["pot-batch"] = lambda out=out: {
                "marginal_err": _marginal_error(out["P"].float(), *out["ab"])}
        if "geomloss" in peers and importlib.util.find_spec("geomloss") is not None:
            out = _holder()

            def geomloss_setup(out=out):
                from geomloss import SamplesLoss

                x, y, cost, eps = _inputs(shape, dtype, device)
                # GeomLoss's p=2 cost is |x - y|^2 / 2 and eps = blur^2: scaling the points by
                # sqrt(2) gives our cost |x - y|^2 at the same eps. It anneals eps (scaling 0.5,
                # its default) and stops at the end of the schedule: no tolerance to set.
                xs, ys = x * math.sqrt(2), y * math.sqrt(2)
                loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=0.5,
                                   debias=False, potentials=True, backend="tensorized")

                def run():
                    out["fg"] = loss(xs, ys)
                    return out["fg"]
                out["cost_eps"] = (cost, eps)
                return run

            def geomloss_extra(out=out):
                # The plan from its returned potentials, P = a b exp((F + G - C) / eps).
                F_, G_ = out["fg"]
                cost, eps = out["cost_eps"]
                P = torch.exp((F_[:, :, None] + G_[:, None, :] - cost) / eps) / (n * m)
                a = torch.full((B, n), 1 / n, device=device)
                bb = torch.full((B, m), 1 / m, device=device)
                return {"marginal_err": _marginal_error(P.float(), a, bb)}

            case.providers["geomloss-tensorized"] = geomloss_setup
            case.extra["geomloss-tensorized"] = geomloss_extra
        cases.append(case)
    return cases


if __name__ == "__main__":  # python -m fdiv_kernels.bench.sinkhorn [--quick]
    import sys

    from fdiv_kernels.bench.report import format_table, run_cases

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK_SHAPES if "--quick" in sys.argv else DEFAULT_SHAPES[dev.type]
    print(format_table(run_cases(sinkhorn_cases(shapes, torch.float32, dev))))
