"""Interleaved CPU timings of the sparse forms against what they replace (developer tool, not
installed), as ratios per round (every provider once per round, the order rotating), so that on
a shared machine each ratio compares calls made under the same load:

    python tools/bench_sparse_forms.py sparse N ROUNDS
        fk.sparse_divergence (random K ids, and a peaked student's own top-k) against
        fk.token_logprobs (the same passes over the row), forward + backward, V = 128256, K = 64
    python tools/bench_sparse_forms.py fused ROUNDS [CHUNKS]
        fk.fused_linear_sparse_divergence (default chunk, or the comma list CHUNKS) against eager
        (logits = h @ W.T, log_softmax, gather, the bucket KL, backward) at N = 1024, H = 256,
        V = 32000, K = 64: speed and peak memory (VmHWM above the inputs)

Wall medians, the median of per-round ratios, and the process CPU time (both threads), which a
busy machine inflates less than wall time. Run under the same allocator setting for every
provider (THP_MEM_ALLOC_ENABLE as set in the environment).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.measure import peak_bytes
from fdiv_kernels.bench.sparse_divergence import _teacher, eager_sparse_kl


def rounds_of(fns: dict, reps: int, after=None) -> list[dict]:
    names, out = list(fns), []
    for rep in range(reps + 1):  # the first round warms up
        t = {}
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            t[name] = (time.perf_counter() - t0, time.process_time() - c0)
        if rep:
            out.append(t)
    return out


def report(rounds: list[dict], ref: str, peaks: dict | None = None) -> None:
    for name in rounds[0]:
        wall = statistics.median(r[name][0] for r in rounds) * 1e3
        cpu = statistics.median(r[name][1] for r in rounds) * 1e3
        ratio = statistics.median(r[ref][0] / r[name][0] for r in rounds)
        cratio = statistics.median(r[ref][1] / r[name][1] for r in rounds)
        peak = f"  peak {peaks[name] / 2**20:6.1f} MiB ({peaks[name] / peaks[ref]:.2f}x)" if (
            peaks) else ""
        print(f"{name:18s} wall med {wall:7.1f} ms  cpu med {cpu:7.1f} ms  speed vs {ref}: "
              f"{ratio:.2f}x wall, {cratio:.2f}x cpu{peak}")


def sparse(n: int, reps: int) -> None:
    v, k = 128256, 64
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, v, generator=g) * 2
    ids, lp = _teacher(n, v, k, "cpu", g)
    x1 = x0.clone().scatter_add_(-1, ids, torch.full(ids.shape, 12.0))
    own = x1.topk(k, -1).indices
    y = ids[:, 0].contiguous()

    # Each provider its own copy of the logits: at 64 rows (33 MB) an input another provider
    # has just read may still sit in the cache, and sharing one would favour the sharers.
    def step(x, f):
        x = x.clone().requires_grad_(True)

        def run():
            f(x).backward()
            x.grad = None
        return run

    fns = {"sparse random ids": step(x0, lambda x: fk.sparse_divergence(x, ids, lp, "kl",
                                                                         backend="cpu")),
           "token_logprobs": step(x0, lambda x: fk.token_logprobs(x, y, backend="cpu").mean()),
           "sparse own top-k": step(x1, lambda x: fk.sparse_divergence(x, own, lp, "kl",
                                                                        backend="cpu")),
           "token_logprobs peaked": step(x1, lambda x: fk.token_logprobs(x, own[:, 0],
                                                                         backend="cpu").mean())}
    rounds = rounds_of(fns, reps)
    report([{k: r[k] for k in list(fns)[:2]} for r in rounds], "token_logprobs")
    report([{k: r[k] for k in list(fns)[2:]} for r in rounds], "token_logprobs peaked")


def fused(reps: int, chunks: list[int | None]) -> None:
    n, h, v, k = 1024, 256, 32000, 64
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_(True)
    ids, lp = _teacher(n, v, k, "cpu", g)

    def step(f):
        def run():
            f().backward()
            hs.grad = ws.grad = None
        return run

    fns = {"eager": step(lambda: eager_sparse_kl(hs @ ws.t(), ids, lp))}
    for c in chunks:
        fns[f"fused chunk={c or 'default'}"] = step(
            lambda c=c: fk.fused_linear_sparse_divergence(hs, ws, ids, lp, "kl", backend="cpu",
                                                          chunk_size=c))
    peaks = {}
    for name, f in fns.items():
        f()
        peaks[name] = peak_bytes(f, torch.device("cpu"))
    report(rounds_of(fns, reps), "eager", peaks)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "sparse":
        sparse(int(sys.argv[2]), int(sys.argv[3]))
    else:
        fused(int(sys.argv[2]), [None if c == "default" else int(c)
                                 for c in (sys.argv[3] if len(sys.argv) > 3 else "default")
                                 .split(",")])
