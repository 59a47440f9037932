"""Sparse (top-k) teacher cases: fk.sparse_divergence per backend against the eager formula users
write today (log_softmax over V, gather the K ids, the loss on K + 1 outcomes) and against
fk.token_logprobs forward + backward on the same (N, V), which makes the same passes over the
logits (one read for the LSE, one read + one write for the gradient). The fused linear form is
compared with materialized eager logits, chiefly for peak memory."""

from __future__ import annotations

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.cases import Case, backward_step, our_backends


def _teacher(n, v, k, device, g):
    ids = torch.rand(n, v, generator=g).argsort(-1)[:, :k].to(device)
    lp = (torch.log_softmax(torch.randn(n, k, generator=g) * 1.5, -1) + torch.log(
        torch.tensor(0.9))).to(device)
    return ids, lp


def eager_sparse_kl(logits, ids, lp, tail="bucket"):
    """What users write (TRL / DistillKit style): full log_softmax, gather, KL over the support
    (+ the tail bucket, 1 - sum exp)."""
    lq = torch.log_softmax(logits.float(), -1).gather(-1, ids)
    loss = (lp.exp() * (lp - lq)).sum(-1)
    if tail == "bucket":
        lp_t = torch.log(-torch.expm1(torch.logsumexp(lp, -1).clamp(max=-1e-7)))
        lq_t = torch.log(-torch.expm1(torch.logsumexp(lq, -1).clamp(max=-1e-7)))
        loss = loss + lp_t.exp() * (lp_t - lq_t)
    return loss.mean()


def sparse_divergence_cases(shapes, k, dtype, device, peers=("eager",), backends=None,
                            tails=("bucket",), supports=("random", "own-topk")):
    """``supports``: "random", K ids drawn at random (the support holds a sliver of the
    student's mass); "own-topk", a peaked student (about 98% of its mass on K columns per
    row, as a trained LM's) and its own top-k ids (self-distillation, or a teacher close to the
    student), where the "bucket" tail is taken from the off-support columns."""
    cases = []
    probe = torch.empty(1, dtype=dtype, device=device)
    es = probe.element_size()
    ours = our_backends("sparse_divergence_fwd", probe, backends)
    for n, v in shapes:
        for tail, support in ((t, s) for t in tails for s in supports):
            # read x (LSE), read x + write dx (gradient); the K-wide teacher is negligible.
            name = f"sparse_divergence:kl:{tail}" + (":own-topk" if support != "random"
                                                      else "")
            case = Case(name, "full", (n, v, k), dtype, device, 3 * n * v * es)

            def setup(fn, n=n, v=v, support=support):
                def make():
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(n, v, generator=g) * 2
                    ids, lp = _teacher(n, v, k, device, g)
                    if support != "random":
                        x.scatter_add_(-1, ids.cpu(), torch.full(ids.shape, 12.0))
                        ids = x.topk(k, dim=-1).indices.to(device)
                    x = x.to(device=device, dtype=dtype)
                    labels = ids[:, 0].contiguous()
                    x.requires_grad_(True)

                    def run():
                        fn(x, ids, lp, labels).backward()
                        x.grad = None
                    return run
                return make

            for b in ours:
                case.providers[f"fdiv-{b}"] = setup(
                    lambda x, ids, lp, y, b=b, tail=tail: fk.sparse_divergence(
                        x, ids, lp, "kl", tail=tail, backend=b))
            case.ours = tuple(case.providers)
            if "eager" in peers:
                case.providers["torch-eager"] = setup(
                    lambda x, ids, lp, y, tail=tail: eager_sparse_kl(x, ids, lp, tail))
            for b in ours[:1]:
                case.providers["fk-token_logprobs"] = setup(
                    lambda x, ids, lp, y, b=b: fk.token_logprobs(x, y, backend=b).mean())
            cases.append(case)
    return cases


def fused_linear_sparse_cases(shapes, k, dtype, device, peers=("eager",), backends=None):
    cases = []
    probe = torch.empty(1, dtype=torch.float32, device=device)
    ours = our_backends("sparse_divergence_fwd", probe, backends)
    for n, h, v in shapes:
        es = torch.empty(0, dtype=dtype).element_size()
        # read hidden + weight; write d hidden, d weight. The GEMMs dominate.
        case = Case("fused_linear_sparse:kl", "full", (n, h, v, k), dtype, device,
                    2 * (n * h + v * h) * es)
        providers = {f"fdiv-{b}": (lambda hs, ws, ids, lp, b=b: fk.fused_linear_sparse_divergence(
            hs, ws, ids, lp, "kl", backend=b)) for b in ours}
        case.ours = tuple(providers)
        if "eager" in peers:
            providers["torch-eager"] = lambda hs, ws, ids, lp: eager_sparse_kl(hs @ ws.t(), ids, lp)
        for name, fn in providers.items():
            def setup(fn=fn, n=n, h=h, v=v):
                g = torch.Generator().manual_seed(0)
                hs = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
                ws = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
                ids, lp = _teacher(n, v, k, device, g)
                return backward_step(fn, hs, ws, ids, lp, leaves=(hs, ws))

            case.providers[name] = setup
        cases.append(case)
    return cases


def interleaved(n: int = 1024, v: int = 128256, k: int = 64, tail: str = "bucket",
                reps: int = 15) -> dict[str, dict[str, float]]:
    """Forward + backward seconds of fk.sparse_divergence (cpu), the eager formula and
    fk.token_logprobs (cpu) in ``reps`` rounds, the three alternated (their order rotating) so
    that all see the same load on a shared machine. Per provider: the fastest round (``min``) and
    the median over rounds of the time ratio to fk.sparse_divergence in the same round
    (``ratio``, > 1: slower than ours)."""
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 2).requires_grad_(True)
    ids, lp = _teacher(n, v, k, "cpu", g)
    y = ids[:, 0].contiguous()
    fns = {
        "fk.sparse_divergence": lambda: fk.sparse_divergence(x, ids, lp, "kl", tail=tail,
                                                             backend="cpu"),
        "eager": lambda: eager_sparse_kl(x, ids, lp, tail),
        "fk.token_logprobs": lambda: fk.token_logprobs(x, y, backend="cpu").mean(),
    }
    names = list(fns)
    rounds = []
    for rep in range(reps + 1):  # the first round warms up
        t = {}
        for name in names[rep % 3:] + names[: rep % 3]:
            t0 = time.perf_counter()
            fns[name]().backward()
            x.grad = None
            t[name] = time.perf_counter() - t0
        if rep:
            rounds.append(t)
    ours = names[0]
    return {name: {"min": min(r[name] for r in rounds),
                   "ratio": statistics.median(r[name] / r[ours] for r in rounds)}
            for name in names}


if __name__ == "__main__":
    import sys

    tail = sys.argv[1] if len(sys.argv) > 1 else "bucket"
    res = interleaved(tail=tail)
    for name, r in res.items():
        print(f"{name:22s} min {r['min'] * 1e3:7.0f} ms   median ratio to ours {r['ratio']:.3f}")
    print(f"tail={tail}: {res['eager']['ratio']:.2f}x eager, "
          f"{res['fk.token_logprobs']['ratio']:.2f}x token_logprobs (medians of per-round ratios)")
