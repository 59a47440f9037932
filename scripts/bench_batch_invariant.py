"""batch_invariant=True against the default on the fused forms: forward + backward, fp32,
interleaved runs (median of each). Usage: python scripts/bench_batch_invariant.py [N H V reps]"""

import statistics
import sys
import time

import torch

import fdiv_kernels as fk

N, H, V, REPS = (int(x) for x in (sys.argv[1:] + ["1024", "256", "32000", "5"])[:4])
g = torch.Generator().manual_seed(0)
hs = torch.randn(N, H, generator=g).requires_grad_(True)
ht = torch.randn(N, H, generator=g)
ws = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
wt = torch.randn(V, H, generator=g) / H**0.5
labels = torch.randint(0, V, (N,), generator=g)


def logprobs(bi):
    fk.fused_linear_token_logprobs(hs, ws, labels, batch_invariant=bi).sum().backward()


def divergence(bi):
    fk.fused_linear_divergence(hs, ws, ht, wt, "kl", batch_invariant=bi).backward()


FORMS = (("fused_linear_token_logprobs", logprobs), ("fused_linear_divergence", divergence))
for name, fn in FORMS:
    times = {False: [], True: []}
    fn(False), fn(True)  # warm-up
    for _ in range(REPS):
        for bi in (False, True):
            t0 = time.perf_counter()
            fn(bi)
            times[bi].append(time.perf_counter() - t0)
    d, b = statistics.median(times[False]), statistics.median(times[True])
    print(f"{name}: default {d * 1e3:.1f} ms, batch_invariant {b * 1e3:.1f} ms, "
          f"ratio {b / d:.3f} (N={N}, H={H}, V={V}, fp32, fwd+bwd, median of {REPS})")
