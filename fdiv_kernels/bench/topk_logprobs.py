"""The teacher's side: fk.topk_logprobs per backend against ``log_softmax(x).topk(k)`` eager, and
fk.fused_linear_topk_logprobs against ``(h @ W.T).log_softmax(-1).topk(k)`` eager (forward only,
as a teacher runs: under torch.no_grad). Eager materializes the (N, V) log-softmax (and, from
hidden states, the (N, V) logits as well); ours reads each row once and keeps O(k) per row."""

from __future__ import annotations

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.cases import Case, our_backends


def eager_topk_logprobs(x: torch.Tensor, k: int):
    """What producers write today: the full log-softmax, then its top-k."""
    return torch.log_softmax(x.float(), -1).topk(k)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def topk_logprobs_cases(shapes, k, dtype, device, peers=("eager",), backends=None):
    cases = []
    probe = torch.empty(1, dtype=dtype, device=device)
    ours = our_backends("topk_logprobs_fwd", probe, backends)
    es = probe.element_size()
    for n, v in shapes:
        # read x once; the (N, k) outputs are negligible.
        case = Case("topk_logprobs", "fwd", (n, v, k), dtype, device, n * v * es)

        def setup(fn, n=n, v=v):
            def make():
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
                return _no_grad(lambda: fn(x))
            return make

        for b in ours:
            case.providers[f"fdiv-{b}"] = setup(lambda x, b=b: fk.topk_logprobs(x, k, backend=b))
        case.ours = tuple(case.providers)
        if "eager" in peers:
            case.providers["torch-eager"] = setup(lambda x: eager_topk_logprobs(x, k))
        cases.append(case)
    return cases


def fused_linear_topk_cases(shapes, k, dtype, device, peers=("eager",), backends=None):
    cases = []
    probe = torch.empty(1, dtype=torch.float32, device=device)
    ours = our_backends("topk_logprobs_fwd", probe, backends)
    for n, h, v in shapes:
        es = torch.empty(0, dtype=dtype).element_size()
        # read hidden + weight; the GEMM dominates.
        case = Case("fused_linear_topk_logprobs", "fwd", (n, h, v, k), dtype, device,
                    (n * h + v * h) * es)
        providers = {f"fdiv-{b}": (lambda hs, ws, b=b: fk.fused_linear_topk_logprobs(
            hs, ws, k, backend=b)) for b in ours}
        case.ours = tuple(providers)
        if "eager" in peers:
            providers["torch-eager"] = lambda hs, ws: eager_topk_logprobs(hs @ ws.t(), k)
        for name, fn in providers.items():
            def setup(fn=fn, n=n, h=h, v=v):
                g = torch.Generator().manual_seed(0)
                hs = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
                ws = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
                return _no_grad(lambda: fn(hs, ws))

            case.providers[name] = setup
        cases.append(case)
    return cases


def interleaved(n: int = 1024, v: int = 128256, k: int = 64, h: int = 256,
                reps: int = 7) -> dict[str, dict[str, float]]:
    """Forward seconds and peak memory of the producer ops (cpu) and their eager forms, in
    ``reps`` rounds alternated (order rotating) so that all see the same load on a shared
    machine. Per provider: the fastest round (``min``), the median over rounds of the time ratio
    to the op it is compared with in the same round (``ratio``, > 1: slower than ours), and the
    resident high-water mark above the inputs (``peak``, bytes, one separate call)."""
    import statistics
    import time

    from fdiv_kernels.bench.measure import peak_bytes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=g) * 2
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * h**-0.5
    fns = {
        "fk.topk_logprobs": lambda: fk.topk_logprobs(x, k, backend="cpu"),
        "eager log_softmax.topk": lambda: eager_topk_logprobs(x, k),
        "fk.fused_linear_topk_logprobs": lambda: fk.fused_linear_topk_logprobs(hs, ws, k,
                                                                                 backend="cpu"),
        "eager (h @ W.T) log_softmax.topk": lambda: eager_topk_logprobs(hs @ ws.t(), k),
    }
    names = list(fns)
    ours_of = {name: names[2 * (i // 2)] for i, name in enumerate(names)}  # each pair: ours first
    rounds = []
    with torch.no_grad():
        for rep in range(reps + 1):  # the first round warms up
            t = {}
            for name in names[rep % 4:] + names[: rep % 4]:
                t0 = time.perf_counter()
                fns[name]()
                t[name] = time.perf_counter() - t0
            if rep:
                rounds.append(t)
        peaks = {name: peak_bytes(fn, torch.device("cpu")) for name, fn in fns.items()}
    return {name: {"min": min(r[name] for r in rounds),
                   "ratio": statistics.median(r[name] / r[ours_of[name]] for r in rounds),
                   "peak": peaks[name]}
            for name in names}


if __name__ == "__main__":
    res = interleaved()
    for name, r in res.items():
        peak = f"{r['peak'] / 2**20:7.0f} MiB" if r["peak"] is not None else "   n/a"
        print(f"{name:34s} min {r['min'] * 1e3:7.0f} ms  median ratio to ours "
              f"{r['ratio']:.2f}  peak {peak}")
