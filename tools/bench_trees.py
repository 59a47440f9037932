"""Time the same CPU cases with two checkouts of the package, interleaved, each step in a fresh
process per round (developer tool, not installed): did a change move the figures?

    python tools/bench_trees.py OLD_TREE NEW_TREE [--rounds 3] [--steps 5] [--env K=V ...]

Each round runs every case once per tree, alternating which tree goes first; a case reports the
median step (forward + backward) of each tree over all rounds and the per-round ratio
old / new (> 1: the new tree is faster). Both trees run with the same environment (allocator
setting included: pass ``--env THP_MEM_ALLOC_ENABLE=1`` to put both on huge pages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {
    "divergence js 64x128256": "div:js:64:128256",
    "divergence kl 64x128256": "div:kl:64:128256",
    "token_logprobs 1024x128256": "tlp:1024:128256",
    "fused_linear js N=1024 H=256 V=32000": "fl:js:1024:256:32000",
    "sparse bucket 1024x128256 K=64": "sp:bucket:1024:128256:64",
}

CHILD = r"""
import json, sys, time, statistics
import torch
import fdiv_kernels as fk
spec, steps = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
parts = spec.split(":")
if parts[0] == "div":
    n, v = int(parts[2]), int(parts[3])
    s = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    t = torch.randn(n, v, generator=g) * 3
    step = lambda: fk.divergence(s, t, parts[1], backend="cpu").backward()
elif parts[0] == "tlp":
    n, v = int(parts[1]), int(parts[2])
    x = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    lab = torch.randint(0, v, (n,), generator=g)
    step = lambda: fk.token_logprobs(x, lab, backend="cpu").sum().backward()
elif parts[0] == "fl":
    n, h, v = int(parts[2]), int(parts[3]), int(parts[4])
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h ** -0.5
    step = lambda: fk.fused_linear_divergence(hs, ws, ht, wt, parts[1], backend="cpu").backward()
else:
    n, v, k = int(parts[2]), int(parts[3]), int(parts[4])
    s = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.05
    step = lambda: fk.sparse_divergence(s, ids, lp, "kl", tail=parts[1], backend="cpu").backward()
step()  # warm-up
times, cpu = [], []
for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - t0) * 1e3)
    cpu.append((time.process_time() - c0) * 1e3)
print(json.dumps({"median": statistics.median(times), "cpu": statistics.median(cpu),
                  "file": fk.__file__}))
"""


# "median": wall ms per step; "cpu": the process's CPU ms per step (both threads), which a busy
# machine inflates less than wall time.
METRIC = "median"


def _run(tree: str, spec: str, steps: int, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, spec, str(steps)], cwd="/",
                         env={**os.environ, **env, "PYTHONPATH": tree}, capture_output=True,
                         text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["file"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"{tree}: imported {res['file']} instead")
    return res[METRIC]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--env", nargs="*", default=[])
    ap.add_argument("--json")
    ap.add_argument("--cpu-time", action="store_true",
                    help="compare process CPU time per step instead of wall time (busy machines)")
    ap.add_argument("--cases", help="comma list of case-name prefixes to run")
    args = ap.parse_args()
    global METRIC
    METRIC = "cpu" if args.cpu_time else "median"
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = []
    for name, spec in CASES.items():
        if args.cases and not any(name.startswith(c) for c in args.cases.split(",")):
            continue
        old, new, ratios = [], [], []
        for r in range(args.rounds):
            order = (("old", args.old), ("new", args.new))
            got = {}
            for which, tree in (order if r % 2 == 0 else order[::-1]):
                got[which] = _run(tree, spec, args.steps, env)
            old.append(got["old"])
            new.append(got["new"])
            ratios.append(got["old"] / got["new"])
        row = {"case": name, "old_ms": statistics.median(old), "new_ms": statistics.median(new),
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios)}
        rows.append(row)
        print(f"{name:40s} old {row['old_ms']:8.1f} ms  new {row['new_ms']:8.1f} ms  "
              f"old/new {row['ratio_median']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "metric": METRIC, "rounds": args.rounds, "steps": args.steps,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
