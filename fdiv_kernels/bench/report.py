"""Run cases, then print the table and write JSON / a PNG chart."""

from __future__ import annotations

import datetime
import json
import platform
import sys

import torch

from fdiv_kernels.bench.cases import Case, Row
from fdiv_kernels.bench.measure import copy_bandwidth_gbps, device_name, peak_bytes, time_ms


def _interleaved_ms(case: Case, rounds: int, log) -> dict[str, float | str]:
    """Fastest ms per provider over ``rounds`` rounds that call every provider once each, in
    turn: on a shared machine all providers then see the same load (sequential medians do not),
    and the minimum, since load only ever adds time."""
    fns, times, out = {}, {}, {}
    for name, setup in case.providers.items():
        try:
            fns[name] = setup()
            fns[name]()  # warm-up
            times[name] = []
        except Exception as e:  # noqa: BLE001 - reported in the row like a sequential failure
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    for r in range(rounds):
        print(f"  interleaved round {r + 1}/{rounds} of {case.op}", file=log, flush=True)
        for name, fn in fns.items():
            times[name].append(time_ms(fn, case.device, warmup=0, min_repeats=1, budget_s=0.0))
    for name, ts in times.items():
        out[name] = min(ts)
    return out


def run_cases(cases: list[Case], log=sys.stderr, interleave: int = 0) -> list[Row]:
    """Time (and measure the memory of) every provider of every case. ``interleave=R`` times
    the providers of a case in R alternating rounds instead of one after another."""
    rows: list[Row] = []
    total = sum(len(c.providers) for c in cases)
    done = 0
    for case in cases:
        bw = copy_bandwidth_gbps(str(case.device))
        case_rows: list[Row] = []
        pre = _interleaved_ms(case, interleave, log) if interleave else {}
        for name, setup in case.providers.items():
            done += 1
            print(f"[{done}/{total}] {case.op} {case.mode} {list(case.shape)} "
                  f"{str(case.dtype).replace('torch.', '')} {name} ...", file=log, flush=True)
            row = Row(case.op, case.mode, name, list(case.shape),
                      str(case.dtype).replace("torch.", ""), None, None, None, None)
            try:
                if isinstance(pre.get(name), str):
                    raise RuntimeError(pre[name])
                fn = setup()
                row.ms = pre[name] if name in pre else time_ms(fn, case.device)
                row.peak_mem_bytes = peak_bytes(fn, case.device)
                row.gbps = case.compulsory_bytes / (row.ms * 1e-3) / 1e9
                row.bandwidth_fraction = row.gbps / bw
                if name in case.extra:
                    row.extra = case.extra[name]()
            except Exception as e:  # noqa: BLE001 - a peer that fails (OOM, missing op) is reported
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            finally:
                if case.device.type == "cuda":
                    torch.cuda.empty_cache()
            case_rows.append(row)
        for row in case_rows:
            if row.backend in case.ours and row.ms:
                row.ratios = {p.backend: p.ms / row.ms for p in case_rows
                              if p.backend not in case.ours and p.ms}
        rows.extend(case_rows)
    return rows


def _fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    peers = sorted({p for r in rows for p in r.ratios})
    head = ["op", "mode", "shape", "dtype", "provider", "ms", "GB/s", "of copy bw", "peak MiB"]
    head += [f"vs {p}" for p in peers] + ["notes"]
    lines = [head]
    for r in rows:
        cells = [r.op, r.mode, "x".join(map(str, r.shape)), r.dtype, r.backend,
                 _fmt(r.ms, ".3f", r.error or "-"), _fmt(r.gbps, ".1f"),
                 _fmt(r.bandwidth_fraction and 100 * r.bandwidth_fraction, ".0f") + "%"
                 if r.bandwidth_fraction is not None else "-",
                 _fmt(r.peak_mem_bytes and r.peak_mem_bytes / 2**20, ".1f")
                 if r.peak_mem_bytes is not None else "-"]
        cells += [f"{r.ratios[p]:.2f}x" if p in r.ratios else "" for p in peers]
        cells.append(", ".join(f"{k}={v:.2e}" for k, v in r.extra.items()))
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def metadata(device: torch.device, command: str) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    import fdiv_kernels

    versions["fdiv_kernels"] = fdiv_kernels.__version__
    return {
        "device": device_name(device),
        "copy_bandwidth_gbps": copy_bandwidth_gbps(str(device)),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def write_json(path: str, meta: dict, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({**meta, "rows": [r.__dict__ for r in rows]}, f, indent=1)


def write_png(path: str, meta: dict, rows: list[Row]) -> None:
    """Time and bandwidth fraction against V, one line per (op, mode, provider) of the (N, V) ops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.ms is not None and len(r.shape) == 2:  # (N, V) ops: the x axis is V
            series.setdefault(f"{r.op} {r.mode} {r.backend}", []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r.shape[-1])
        vs = [r.shape[-1] for r in rs]
        ax_t.plot(vs, [r.ms for r in rs], marker="o", label=label)
        ax_b.plot(vs, [100 * (r.bandwidth_fraction or 0) for r in rs], marker="o", label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="V", ylabel="ms (median)", title="time")
    ax_b.set(xscale="log", xlabel="V", ylabel="% of measured copy bandwidth",
             title="achieved bandwidth (compulsory bytes)")
    ax_b.legend(fontsize=6, loc="best")
    fig.suptitle(f"{meta['device']} - torch {meta['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
