"""The huge-page placement of the C++ CPU kernels' (N, V) gradients (csrc/cpu/dense_output.cpp),
on and off: ``python -m fdiv_kernels.bench.dense_output``.

The switch (FDIV_KERNELS_HUGEPAGES) is read once per process, so each setting runs in its own
subprocess, the two alternated ``--pairs`` times. Each subprocess times ``--steps`` forward +
backward steps of one op with the gradient freed between steps (as a training loop does), and
reports the median and the slowest of the steps after the first (warm-up) one."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "token_logprobs 256x128256": (256, 128256),
    "token_logprobs 1024x128256": (1024, 128256),
    "divergence:kl 256x128256": (256, 128256),
    "sparse_divergence:kl:bucket 1024x128256x64": (1024, 128256),
}


def _step_fn(case: str):
    import torch

    import fdiv_kernels as fk

    n, v = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 2).requires_grad_(True)
    if case.startswith("token_logprobs"):
        y = torch.randint(0, v, (n,), generator=g)
        return x, lambda: fk.token_logprobs(x, y, backend="cpu").mean()
    if case.startswith("divergence"):
        t = torch.randn(n, v, generator=g) * 2
        return x, lambda: fk.divergence(x, t, "kl", backend="cpu")
    from fdiv_kernels.bench.sparse_divergence import _teacher

    ids, lp = _teacher(n, v, 64, "cpu", g)
    return x, lambda: fk.sparse_divergence(x, ids, lp, "kl", tail="bucket", backend="cpu")


def _child(case: str, steps: int) -> dict:
    x, fn = _step_fn(case)
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn().backward()
        x.grad = None
        ms.append((time.perf_counter() - t0) * 1e3)
    rest = ms[1:]
    return {"first": ms[0], "median": statistics.median(rest), "max": max(rest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.steps)))
        return
    rows = []
    for case in CASES:
        for p in range(a.pairs):
            for on in ("1", "0") if p % 2 == 0 else ("0", "1"):
                out = subprocess.run(
                    [sys.executable, "-m", "fdiv_kernels.bench.dense_output", "--child", case,
                     "--steps", str(a.steps)],
                    env={**os.environ, "FDIV_KERNELS_HUGEPAGES": on}, capture_output=True,
                    text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append({"case": case, "hugepages": on == "1", "pair": p, **r})
                print(f"{case:44s} hugepages={on} median {r['median']:7.1f} ms  "
                      f"first {r['first']:7.1f}  max {r['max']:7.1f}", file=sys.stderr, flush=True)
    print("| case | huge pages | median step ms (per pair) | slowest step after the first |")
    print("|---|---|---|---|")
    for case in CASES:
        for on in (True, False):
            rs = [r for r in rows if r["case"] == case and r["hugepages"] == on]
            medians = " / ".join(f"{r['median']:.1f}" for r in rs)
            slowest = max(r["max"] for r in rs)
            print(f"| {case} | {'on' if on else 'off'} | {medians} | {slowest:.1f} |")
    if a.json:
        import platform

        import torch

        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "python": platform.python_version(), "threads": torch.get_num_threads(),
                       "command": " ".join(["python -m fdiv_kernels.bench.dense_output"]
                                           + sys.argv[1:]),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
