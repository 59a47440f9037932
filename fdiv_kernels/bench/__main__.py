"""``python -m fdiv_kernels.bench``: time every op and backend against the peers found in this run.

CPU-sized shapes by default on the CPU, LLM-sized shapes on a GPU. Progress goes to stderr, the
table to stdout. The run is saved under ``bench/results/`` (``--out``): ``<date>-<machine>.json``,
``.md`` (the full table) and one chart per op family, ``<date>-<machine>-<family>.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

import torch

from fdiv_kernels.bench.divergence import divergence_cases
from fdiv_kernels.bench.fused_linear import (fused_linear_cases, fused_linear_logprobs_cases,
                                             fused_linear_masked_cases)
from fdiv_kernels.bench.measure import copy_bandwidth_gbps
from fdiv_kernels.bench.report import (DEFAULT_CASE_CAP_S, format_table, metadata, run_cases,
                                       run_name, write_charts, write_json, write_markdown)
from fdiv_kernels.bench.sinkd import DEFAULT_SHAPES as SINKD_SHAPES
from fdiv_kernels.bench.sinkd import QUICK_SHAPES as SINKD_QUICK
from fdiv_kernels.bench.sinkd import sinkd_cases
from fdiv_kernels.bench.sinkhorn import DEFAULT_SHAPES as SINKHORN_SHAPES
from fdiv_kernels.bench.sinkhorn import QUICK_SHAPES as SINKHORN_QUICK
from fdiv_kernels.bench.sinkhorn import sinkhorn_cases
from fdiv_kernels.bench.softmax_stats import softmax_stats_cases
from fdiv_kernels.bench.sparse_divergence import fused_linear_sparse_cases, sparse_divergence_cases
from fdiv_kernels.bench.topk_logprobs import fused_linear_topk_cases, topk_logprobs_cases
from fdiv_kernels.core._dispatch import BACKENDS
from fdiv_kernels.kinds._registry import DIVERGENCES, ROW_DIVERGENCES

DEFAULT_SHAPES = {"cpu": [(64, 128256), (256, 32000)],
                  "cuda": [(8192, 32000), (8192, 128256), (8192, 262144)]}
# The softmax-statistics targets are stated at 256 rows on the CPU.
STATS_SHAPES = {"cpu": [(256, 128256)], "cuda": [(8192, 128256)]}
# Fused linear: (N, H, V); the CPU target is stated at N=1024, H=256, V=32000.
FUSED_SHAPES = {"cpu": [(1024, 256, 32000)], "cuda": [(8192, 4096, 128256)]}
# Token log-probs from hidden states: the CPU target is stated at N=4096, H=256, V=32000.
LOGPROBS_SHAPES = {"cpu": [(4096, 256, 32000)], "cuda": [(8192, 4096, 128256)]}
OPS = ("divergence", "softmax_stats", "fused_linear", "fused_linear_masked",
       "fused_linear_logprobs", "sinkhorn", "sinkd", "sparse_divergence", "topk_logprobs")
# Sparse teacher: (N, V) with K = 64 ids per row, and the fused form at (N, H, V); the CPU targets
# are stated at N=64 and 1024, V=128256 and N=1024, H=256, V=32000.
SPARSE_SHAPES = {"cpu": [(64, 128256), (1024, 128256)], "cuda": [(8192, 128256)]}
SPARSE_K = 64
# The teacher's side (fk.topk_logprobs, K = SPARSE_K) at (N, V), and its fused form at (N, H, V);
# the CPU targets are stated at 1024 x 128256, K = 64.
TOPK_SHAPES = {"cpu": [(1024, 128256)], "cuda": [(8192, 128256)]}
TOPK_FUSED_SHAPES = {"cpu": [(1024, 256, 128256)], "cuda": [(8192, 4096, 128256)]}
QUICK_SHAPES = [(4, 1000)]
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _shape(text: str) -> tuple[int, int]:
    try:
        n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x128256, got {text!r}") from None
    if n < 1 or v < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, v


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [x for x in text.split(",") if x]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {sorted(choices)}, got {text!r}")
        return items
    return parse


def _kinds(text: str) -> list[str]:
    """Comma-separated kinds, each ``name`` or ``name=value`` (the kind's parameter: renyi=2)."""
    kinds = {**DIVERGENCES, **ROW_DIVERGENCES}
    items = [x for x in text.split(",") if x]
    for item in items:
        name, eq, value = item.partition("=")
        if name not in kinds:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {sorted(kinds)} (each optionally =value, its "
                f"parameter), got {text!r}")
        if eq:
            if kinds[name].param is None:
                raise argparse.ArgumentTypeError(f"kind {name!r} takes no parameter, got {item!r}")
            try:
                float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name}'s {kinds[name].param} must be a number, got {item!r}") from None
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of kinds, got {text!r}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fdiv_kernels.bench", description=__doc__)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--ops", type=_list(OPS), default=list(OPS),
                   help="op families, comma separated (default: all)")
    p.add_argument("--kinds", type=_kinds, default=["js", "kl"],
                   help="divergence kinds, comma separated, each optionally =its parameter "
                        "(renyi=2, js=0.3); the row kinds renyi and cauchy_schwarz included "
                        "(default: js,kl)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, help="NxV shapes")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--modes", type=_list({"fwd", "full"}), default=["full"],
                   help="fwd (forward only) and/or full (forward + backward)")
    p.add_argument("--peers", type=_list({"eager", "compile", "liger", "trl"}),
                   default=["eager", "compile", "liger"],
                   help="peers to time (default eager,compile,liger); trl: the installed TRL's "
                        "own selective_log_softmax and chunked distillation loss")
    p.add_argument("--backends", type=_list(BACKENDS), default=None,
                   help="this library's backends to time (default: all available but torch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--interleave", type=int, default=0, metavar="R",
                   help="time each case's providers in R alternating rounds (the fastest "
                        "round), so that on a shared machine they see the same load")
    p.add_argument("--quick", action="store_true", help="tiny shapes, no compile: a smoke run")
    p.add_argument("--case-cap", type=float, default=DEFAULT_CASE_CAP_S, metavar="S",
                   help="the most seconds one provider's timing on one case may take (a slow "
                        "peer gets fewer calls; its row says 'capped'); default %(default)s")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="folder the run is saved in (default: bench/results)")
    p.add_argument("--name", default=None,
                   help="file stem of the saved run (default: <date>-<device>-<machine>)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--json", default=None, help="also write the rows and metadata to this file")
    p.add_argument("--png", default=None,
                   help="also write the charts as PNG-<family>.png (PNG without .png)")
    return p.parse_args(argv)


def absent_providers(device: torch.device, ops, peers, backends, quick: bool) -> dict[str, str]:
    """The peers and backends this run asked for (or would time by default) that it cannot
    time, each with why: the terminal table and the saved one say so instead of a bare gap."""
    import fdiv_kernels as fk

    probe = torch.empty(0, device=device)
    out = {}
    if device.type != "cuda" and "liger" in peers:
        out["liger"] = "Liger-Kernel's kernels are Triton kernels for a GPU: timed on CUDA only"
    elif "liger" in peers and importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = "liger-kernel is not installed (pip install -c scripts/constraints.txt " \
                       "-e '.[liger]')"
    if quick and "compile" in peers:
        out["torch-compile"] = "skipped under --quick (compile time)"
    if "trl" in peers and importlib.util.find_spec("trl") is None:
        out["trl"] = "trl is not installed (pip install -c scripts/constraints.txt -e '.[trl]')"
    if any(op in ops for op in ("sinkhorn",)):
        for mod, name in (("ot", "pot-batch"), ("geomloss", "geomloss-tensorized")):
            if importlib.util.find_spec(mod) is None:
                out[name] = f"{mod} is not installed (pip install -e '.[bench]')"
    for b in backends or [b for b in BACKENDS if b != "torch"]:
        reasons = fk.not_supported_reasons(b, probe)
        if device.type == "cpu" and b == "triton" and not reasons:
            reasons = ["on the CPU Triton runs under its interpreter, a correctness path"]
        if reasons:
            out[f"fdiv-{b}"] = "; ".join(reasons)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    def shapes_for(defaults):
        return args.shapes or (QUICK_SHAPES if args.quick else defaults[device.type])

    dtype = getattr(torch, args.dtype or DEFAULT_DTYPE[device.type])
    peers = [p for p in args.peers if not (args.quick and p == "compile")]
    cases = []
    if "divergence" in args.ops:
        cases += divergence_cases(args.kinds, shapes_for(DEFAULT_SHAPES), dtype, device,
                                  args.modes, peers, args.backends)
    if "softmax_stats" in args.ops:
        cases += softmax_stats_cases(shapes_for(STATS_SHAPES), dtype, device, peers,
                                     args.backends)
    if "fused_linear" in args.ops:
        fl_shapes = [(4, 16, 1000)] if args.quick else FUSED_SHAPES[device.type]
        cases += fused_linear_cases(fl_shapes, dtype, device, peers, args.backends)
    if "fused_linear_masked" in args.ops:
        fl_shapes = [(40, 16, 1000)] if args.quick else FUSED_SHAPES[device.type]
        cases += fused_linear_masked_cases(fl_shapes, dtype, device, args.backends)
    if "fused_linear_logprobs" in args.ops:
        lp_shapes = [(4, 16, 1000)] if args.quick else LOGPROBS_SHAPES[device.type]
        cases += fused_linear_logprobs_cases(lp_shapes, dtype, device, peers, args.backends)
    if "sinkhorn" in args.ops:
        cases += sinkhorn_cases(SINKHORN_QUICK if args.quick else SINKHORN_SHAPES[device.type],
                                torch.float32, device, ("pot", "geomloss"), args.backends)
    if "sinkd" in args.ops:
        # SinKD: (N, C) = 32 x 3 by default (the stated target), fp32, against the eager loop.
        cases += sinkd_cases(SINKD_QUICK if args.quick else SINKD_SHAPES, torch.float32, device,
                             args.modes, peers, args.backends)
    if "sparse_divergence" in args.ops:
        k = 8 if args.quick else SPARSE_K
        cases += sparse_divergence_cases(shapes_for(SPARSE_SHAPES), k, dtype, device, peers,
                                         args.backends)
        fl_shapes = [(4, 16, 1000)] if args.quick else FUSED_SHAPES[device.type]
        cases += fused_linear_sparse_cases(fl_shapes, k, dtype, device, peers, args.backends)
    if "topk_logprobs" in args.ops:
        k = 8 if args.quick else SPARSE_K
        cases += topk_logprobs_cases(shapes_for(TOPK_SHAPES), k, dtype, device, peers,
                                     args.backends)
        tf_shapes = [(4, 16, 1000)] if args.quick else TOPK_FUSED_SHAPES[device.type]
        cases += fused_linear_topk_cases(tf_shapes, k, dtype, device, peers, args.backends)
    print(f"measuring copy bandwidth on {device} ...", file=sys.stderr, flush=True)
    copy_bandwidth_gbps(str(device))
    # --quick is a smoke run: 5 repeats per provider, not 2 s of them.
    rows = run_cases(cases, interleave=args.interleave, case_cap_s=args.case_cap,
                     budget_s=0.0 if args.quick else 2.0)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m fdiv_kernels.bench " + " ".join(map(shlex.quote, given))
    meta = metadata(device, command)
    absent = absent_providers(device, args.ops, peers, args.backends, args.quick)
    meta["absent"] = absent
    print(f"\n{meta['device']}, {meta['allocator']}, torch {meta['versions']['torch']}, "
          f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s; speed-up = the fastest "
          "peer's time / ours (> 1: ours is faster)")
    print(format_table(rows))
    if absent:
        print("absent from this run:")
        for name, why in absent.items():
            print(f"  {name}: {why}")
    saved = []
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, args.name or run_name(meta))
        write_json(stem + ".json", meta, rows)
        write_markdown(stem + ".md", meta, rows, absent)
        saved += [stem + ".json", stem + ".md"] + write_charts(stem, meta, rows)
    if args.json:
        write_json(args.json, meta, rows)
        saved.append(args.json)
    if args.png:
        saved += write_charts(args.png[:-4] if args.png.endswith(".png") else args.png, meta, rows)
    if saved:
        print("saved: " + ", ".join(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
