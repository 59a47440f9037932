"""Run cases, then print a terminal table and save JSON, a markdown table and one chart per op
family (``python -m fdiv_kernels.bench.report RESULT.json`` redraws the charts of a saved run)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys

import torch

from fdiv_kernels.bench.cases import Case, Row
from fdiv_kernels.bench.measure import (capped_ms, copy_bandwidth_gbps, device_name, peak_bytes,
                                        time_ms)

# The most seconds the timing of one provider on one case may take (its warm-up and repeats).
DEFAULT_CASE_CAP_S = 20.0


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


def run_cases(cases: list[Case], log=sys.stderr, interleave: int = 0,
              case_cap_s: float | None = DEFAULT_CASE_CAP_S, budget_s: float = 2.0) -> list[Row]:
    """Time (and measure the memory of) every provider of every case. ``interleave=R`` times
    the providers of a case in R alternating rounds instead of one after another; otherwise a
    provider whose calls are slow gets as many calls as fit in ``case_cap_s`` seconds (noted in
    its row as ``capped``). ``budget_s``: the seconds of repeats after the warm-up (at least
    5 repeats)."""
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
                if name in pre:
                    row.ms = pre[name]
                else:
                    row.ms, capped = capped_ms(fn, case.device, case_cap_s, budget_s)
                    if capped:
                        row.extra["capped"] = 1.0
                row.peak_mem_bytes = peak_bytes(fn, case.device)
                row.gbps = case.compulsory_bytes / (row.ms * 1e-3) / 1e9
                row.bandwidth_fraction = row.gbps / bw
                if name in case.extra:
                    row.extra.update(case.extra[name]())
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


def _get(r, key):
    return r[key] if isinstance(r, dict) else getattr(r, key)


def _notes(r) -> str:
    extra = _get(r, "extra") or {}
    return ", ".join("capped" if k == "capped" else f"{k}={v:.2e}" for k, v in extra.items())


def _render(head: list[str], lines: list[list[str]]) -> str:
    # Drop the columns that are empty in every row (a peer absent from this run, no notes).
    keep = [i for i in range(len(head)) if any(line[i] not in ("", "-") for line in lines)]
    head = [head[i] for i in keep]
    lines = [[line[i] for i in keep] for line in lines]
    widths = [max(len(str(x)) for x in [h] + [line[i] for line in lines])
              for i, h in enumerate(head)]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |"
           for line in [head] + lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_markdown(rows) -> str:
    """Every measured column (the saved markdown table); columns empty in every row dropped."""
    peers = sorted({p for r in rows for p in _get(r, "ratios")})
    head = ["op", "mode", "shape", "dtype", "provider", "ms", "GB/s", "of copy bw", "peak MiB"]
    head += [f"vs {p}" for p in peers] + ["notes"]
    lines = []
    for r in rows:
        ms, frac, peak = _get(r, "ms"), _get(r, "bandwidth_fraction"), _get(r, "peak_mem_bytes")
        ratios = _get(r, "ratios")
        lines.append([_get(r, "op"), _get(r, "mode"), "x".join(map(str, _get(r, "shape"))),
                      _get(r, "dtype"), _get(r, "backend"),
                      _fmt(ms, ".3f", _get(r, "error") or "-"), _fmt(_get(r, "gbps"), ".1f"),
                      f"{100 * frac:.0f}%" if frac is not None else "-",
                      _fmt(peak and peak / 2**20, ".1f") if peak is not None else "-"]
                     + [f"{ratios[p]:.2f}x" if p in ratios else "" for p in peers] + [_notes(r)])
    return _render(head, lines)


def format_table(rows) -> str:
    """The terminal table (about 110 columns): one line per provider with its time, peak memory
    and, for ours, the speed-up against the fastest peer of the same case (> 1: ours is faster).
    The saved markdown table (``format_markdown``) has every column."""
    head = ["case", "shape", "provider", "ms", "peak MiB", "speed-up", "notes"]
    lines = []
    for r in rows:
        peak, err = _get(r, "peak_mem_bytes"), _get(r, "error")
        ratios = {p: x for p, x in _get(r, "ratios").items() if not is_reference(p)}
        best = min(ratios, key=ratios.get) if ratios else None
        extra = _get(r, "extra") or {}
        lines.append([_get(r, "op") + (" fwd" if _get(r, "mode") == "fwd" else ""),
                      "x".join(map(str, _get(r, "shape"))), _get(r, "backend"),
                      _fmt(_get(r, "ms"), ".2f", "failed" if err else "-"),
                      _fmt(peak and peak / 2**20, ".1f") if peak is not None else "-",
                      f"{ratios[best]:.2f}x vs {best}" if best else "",
                      (err[:50] if err else "capped" if "capped" in extra else "")])
    return _render(head, lines)


def allocator_setting(device: torch.device) -> str:
    """The allocator setting every provider of the run shared (stated beside each CPU ratio)."""
    if device.type == "cuda":
        return "PYTORCH_CUDA_ALLOC_CONF=" + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    return "THP_MEM_ALLOC_ENABLE=" + os.environ.get("THP_MEM_ALLOC_ENABLE", "0")


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
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(device),
        "copy_bandwidth_gbps": copy_bandwidth_gbps(str(device)),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def run_name(meta: dict) -> str:
    """``<date>-<device type>-<machine>-<threads>t``, e.g. 2026-12-07-cpu-amd-epyc-7b13-2t."""
    model = re.sub(r"\(.*?\)|@.*|\b(processor|cpu|with|radeon graphics)\b", " ",
                   meta["device"].lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", model)[:4]) or "unknown"
    kind = meta.get("device_type", "cpu")
    threads = f"-{meta['threads']}t" if kind == "cpu" and meta.get("threads") else ""
    return f"{meta['date'][:10]}-{kind}-{slug}{threads}"


def write_json(path: str, meta: dict, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({**meta, "rows": [r.__dict__ for r in rows]}, f, indent=1)


def write_markdown(path: str, meta: dict, rows, absent: dict[str, str] | None = None) -> None:
    with open(path, "w") as f:
        f.write(f"# Benchmark, {meta['date'][:10]}\n\nCommand: `{meta['command']}`\n\n"
                f"{meta['device']}, "
                f"{meta.get('allocator', 'allocator not recorded')}, torch "
                f"{meta['versions']['torch']}, copy bandwidth {meta['copy_bandwidth_gbps']:.1f} "
                "GB/s. Forward + backward (`full`) unless `fwd`; ratios are peer time / our time "
                "in the same run (> 1: ours is faster).\n\n")
        f.write(format_markdown(rows) + "\n")
        if absent:
            f.write("\nAbsent from this run:\n\n"
                    + "".join(f"- {k}: {v}\n" for k, v in absent.items()))


# --------------------------------------------------------------------------------------------
# Charts

# One colour and marker per provider, the same in every figure (ours in warm colours / filled
# markers, peers in cool colours / open markers). Providers not listed get the next free style.
PROVIDER_STYLE = {
    "fdiv-cpu": ("#d62728", "o"), "fdiv-triton": ("#ff7f0e", "s"), "fdiv-cuda": ("#8c564b", "D"),
    "fdiv-torch": ("#e377c2", "^"), "fdiv-cpu-dense": ("#bcbd22", "v"),
    "fdiv-torch-dense": ("#f7b6d2", "<"), "fk-token_logprobs": ("#ff9896", "P"),
    "0%masked-fdiv-cpu": ("#c49c94", "X"),
    "torch-eager": ("#1f77b4", "o"), "torch-compile": ("#17becf", "s"),
    "liger": ("#2ca02c", "D"), "liger-fused-linear-jsd": ("#98df8a", "D"),
    "trl-selective": ("#9467bd", "^"), "trl-chunked": ("#c5b0d5", "^"),
    "pot-batch": ("#7f7f7f", "v"), "geomloss-tensorized": ("#393b79", "<"),
}
_SPARE_STYLES = [("#637939", "h"), ("#8c6d31", "p"), ("#843c39", "*"), ("#7b4173", "H"),
                 ("#3182bd", "d"), ("#e6550d", "8")]

# Op prefix -> the family (figure) it is drawn in.
FAMILIES = {"divergence": "divergence", "logsumexp": "softmax_stats",
            "token_logprobs": "softmax_stats", "entropy": "softmax_stats",
            "softmax_stats": "softmax_stats", "fused_linear": "fused_linear",
            "fused_linear_logprobs": "fused_linear", "sparse_divergence": "sparse",
            "fused_linear_sparse": "sparse", "sinkhorn": "sinkhorn", "sinkd": "sinkhorn",
            "topk_logprobs": "sparse", "fused_linear_topk_logprobs": "sparse"}


def family(op: str) -> str:
    return FAMILIES.get(op.split(":")[0], op.split(":")[0])


def provider_style(name: str) -> tuple[str, str]:
    if name in PROVIDER_STYLE:
        return PROVIDER_STYLE[name]
    handed_out = len([k for k in PROVIDER_STYLE if k.startswith("\0")])
    style = _SPARE_STYLES[handed_out % len(_SPARE_STYLES)]
    PROVIDER_STYLE[name] = style
    PROVIDER_STYLE["\0" + name] = style  # counts the spare styles handed out
    return style


def is_ours(provider: str) -> bool:
    return provider.startswith("fdiv-")


def is_reference(provider: str) -> bool:
    """Another of this library's ops timed beside the case (fk-token_logprobs, the unmasked
    call of a masked case): drawn, but not a peer to be faster than."""
    return provider.startswith("fk-") or "fdiv-" in provider and not is_ours(provider)


def _title(meta: dict, fam: str, dtypes: set[str]) -> str:
    threads = meta.get("threads")
    if threads is None:  # older runs: the thread count is in the device string
        m = re.search(r"\((\d+) threads\)", meta.get("device", ""))
        threads = m.group(1) if m else "?"
    device = re.sub(r"\s*\(\d+ threads\)", "", meta.get("device", "?"))
    return (f"{fam}: {device}, {threads} threads, {'/'.join(sorted(dtypes))}, "
            f"{meta.get('allocator') or 'allocator setting not recorded'}\n"
            f"torch {meta.get('versions', {}).get('torch', '?')}, {meta.get('date', '')[:10]}")


def write_charts(stem: str, meta: dict, rows) -> list[str]:
    """One PNG per op family, ``<stem>-<family>.png``: time per case (bars per provider, log
    scale, shapes on a categorical axis) and our speed-up against the fastest peer of each case.
    Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r if isinstance(r, dict) else r.__dict__ for r in rows]
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(family(r["op"]), []).append(r)
    paths = []
    for fam, frows in by_family.items():
        cases: dict[tuple, list[dict]] = {}
        for r in frows:
            cases.setdefault((r["op"], r["mode"], tuple(r["shape"]), r["dtype"]), []).append(r)
        keys = list(cases)
        # The op's name without the family's when the figure holds one op (divergence:js -> js).
        single = len({op.split(":")[0] for op, *_ in keys}) == 1
        labels = [f"{op.split(':', 1)[1] if single and ':' in op else op}"
                  f"{' (fwd)' if mode == 'fwd' else ''}".replace(":", ":\n")
                  + f"\n{'x'.join(map(str, shape))}" for op, mode, shape, _ in keys]
        providers = []
        for r in frows:
            if r["backend"] not in providers:
                providers.append(r["backend"])
        providers.sort(key=lambda p: (not is_ours(p), p))
        width = max(6.5, 2.0 * len(keys) + 3.0)
        fig, (ax_t, ax_s) = plt.subplots(2, 1, figsize=(width, 7.5),
                                         gridspec_kw={"height_ratios": [3, 2]}, sharex=True)
        bar_w = 0.8 / max(1, len(providers))
        for j, prov in enumerate(providers):
            colour, marker = provider_style(prov)
            xs, ys = [], []
            for i, k in enumerate(keys):
                r = next((r for r in cases[k] if r["backend"] == prov), None)
                if r is not None and r.get("ms"):
                    xs.append(i - 0.4 + (j + 0.5) * bar_w)
                    ys.append(r["ms"])
            if not xs:
                continue
            ax_t.bar(xs, ys, bar_w * 0.9, color=colour, alpha=0.85 if is_ours(prov) else 0.55,
                     edgecolor=colour, hatch="//" if is_reference(prov) else None)
            ax_t.scatter(xs, ys, marker=marker, s=40, zorder=3,
                         label=prov + (" (reference)" if is_reference(prov) else ""),
                         facecolors=colour if is_ours(prov) else "white", edgecolors=colour)
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_t.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_t.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax_t.set_ylabel("ms per call (log)")
        ax_t.grid(axis="y", which="both", alpha=0.3)
        ax_t.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                    title="provider", title_fontsize=8)
        # Speed-up of each of our providers against the fastest peer measured on that case.
        ours = [p for p in providers if is_ours(p)]
        sw = 0.8 / max(1, len(ours))
        top, fastest_peer = 1.0, {}
        for j, prov in enumerate(ours):
            colour, marker = provider_style(prov)
            for i, k in enumerate(keys):
                mine = next((r for r in cases[k] if r["backend"] == prov and r.get("ms")), None)
                peers = [r for r in cases[k] if not is_ours(r["backend"])
                         and not is_reference(r["backend"]) and r.get("ms")]
                if mine is None or not peers:
                    continue
                best = min(peers, key=lambda r: r["ms"])
                fastest_peer[i] = best["backend"]
                ratio = best["ms"] / mine["ms"]
                top = max(top, ratio)
                x = i - 0.4 + (j + 0.5) * sw
                ax_s.bar(x, ratio, sw * 0.9, color=colour, alpha=0.85)
                ax_s.scatter([x], [ratio], marker=marker, s=40, zorder=3, color=colour)
                ax_s.annotate(f"{ratio:.3g}x", (x, ratio), textcoords="offset points",
                              xytext=(0, 6), ha="center", fontsize=7)
        for i in range(len(keys)):  # the peer each case's ratios are against, once per case
            ax_s.text(i, top * 1.28, f"vs {fastest_peer[i]}" if i in fastest_peer else "no peer",
                      ha="center", va="top", fontsize=7, style="italic")
        ax_s.axhline(1.0, color="black", lw=0.8, ls="--")
        ax_s.set_ylim(0, top * 1.32)
        ax_s.set_ylabel("speed-up vs fastest peer\n(> 1: ours faster)")
        ax_s.grid(axis="y", alpha=0.3)
        ax_s.set_xticks(range(len(keys)))
        ax_s.set_xticklabels(labels, fontsize=8)
        ax_s.set_xlim(-0.6, len(keys) - 0.4)
        fig.suptitle(_title(meta, fam, {r["dtype"] for r in frows}), fontsize=9)
        fig.tight_layout()
        path = f"{stem}-{fam}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fdiv_kernels.bench.report",
                                description="Redraw the charts of saved runs (JSON files).")
    p.add_argument("json", nargs="+", help="results written by python -m fdiv_kernels.bench")
    p.add_argument("--out-dir", default=None, help="where to write (default: beside each JSON)")
    args = p.parse_args(argv)
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        rows = [r for r in data.get("rows", []) if {"op", "mode", "backend", "ms"} <= set(r)]
        if not rows:
            print(f"{path}: no benchmark rows", file=sys.stderr)
            continue
        stem = os.path.splitext(path)[0]
        if args.out_dir:
            stem = os.path.join(args.out_dir, os.path.basename(stem))
        for out in write_charts(stem, data, rows):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
