"""Compile every launched Triton kernel variant with Triton's real compiler, no GPU needed.

    python tools/triton_compile_check.py [--all] [--json PATH] [--md PATH] [--jobs 2]

The interpreter (``TRITON_INTERPRET=1``, how the tests run) accepts code the compiler rejects,
e.g. a non-constexpr global inside ``@triton.jit``. This check runs the same front end, LLVM and
``ptxas`` as a first launch on a GPU would, for ``GPUTarget("cuda", 80, 32)`` (sm_80) and
``GPUTarget("cuda", 90, 32)``, which Triton compiles for sm_90a (its NVIDIA backend appends the
``a`` to every capability >= 90; a plain sm_90 target is not expressible through ``GPUTarget``).

What is compiled comes from the launchers' own code: every module of ``triton_kernels/`` with a
``launch_variants()`` yields calls of its launchers on small CPU inputs (each kind, dtype, flag
and width); those run here with ``JITFunction.run`` intercepted, and each intercepted launch is
turned into the exact (signature, constexprs, alignment attributes, num_warps) Triton's own
launcher would compile, through Triton's own binder. A new kind, dtype or kernel is covered
without editing this file; a ``*_kernel`` of ``triton_kernels/`` that no launch reaches fails.

Identical launches are compiled once: 940 distinct launches today. Compiling all of them for
both targets (``--all``, about 0.9 CPU s per compile: some 28 CPU minutes, 14 min on 2 idle cores)
is too slow for CI, so by default a covering subset (97 today: 194 compiles, about 170 CPU s,
1.5 min on 2 idle cores) is compiled for both targets: variants taken largest tiles first (the
most registers), each kept if
it brings a value not yet compiled for its kernel (a kind, a dtype, a flag, a block size, a warp
count...), so every value of every axis is compiled at least once per kernel, every kind at its
largest block. Per compiled variant it reports registers per thread, local memory (spilled
bytes; Triton's ``n_spills`` is this / 4) and shared memory from the cubin (``cuobjdump
-res-usage``). Exit status 1 on a compile failure, a kernel never launched, or spills in a
variant not in ``SPILLS_ALLOWED``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

TARGETS = (80, 90)  # sm_80, sm_90a
# (kernel, reason): variants of these kernels may spill. Empty: no spill is expected.
SPILLS_ALLOWED: dict[str, str] = {}


@dataclass
class Variant:
    """One compile: what Triton's launcher would compile for one intercepted launch."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict
    options: dict
    labels: list = field(default_factory=list)  # the launch_variants labels that reach it

    def key(self) -> str:
        opts = {k: self.options[k] for k in ("num_warps", "num_stages", "num_ctas")}
        return repr((self.module, self.kernel, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), opts))

    def named_constexprs(self) -> dict:
        return {self.signature_names()[k[0]]: v for k, v in self.constexprs.items()}

    def signature_names(self) -> list:
        return list(self.signature)


@contextlib.contextmanager
def intercepted_launches():
    """Replace every Triton launch with a record of (kernel, args, kwargs); nothing runs."""
    from triton.runtime.jit import JITFunction

    calls = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


def to_variant(fn, args, kwargs, capability: int) -> Variant:
    """The compile Triton's launcher makes for ``fn[grid](*args, **kwargs)`` on this target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = {"debug": False, **kwargs}
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return Variant(fn.fn.__module__, fn.fn.__name__, dict(signature), dict(constexprs),
                   dict(attrs), dict(options.__dict__))


def launcher_modules() -> list:
    """Every module of triton_kernels/ that declares its launches."""
    import fdiv_kernels.triton_kernels as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__)]
    return [m for m in mods if hasattr(m, "launch_variants")]


def kernels_defined() -> set:
    """(module, name) of every top-level ``*_kernel`` JITFunction in triton_kernels/."""
    import fdiv_kernels.triton_kernels as pkg
    from triton.runtime.jit import JITFunction

    out = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == \
                    mod.__name__:
                out.add((mod.__name__, name))
    return out


def enumerate_variants(capability: int = 90) -> list[Variant]:
    """Every distinct compile the launchers make on this target, with the labels reaching it."""
    by_key: dict[str, Variant] = {}
    for mod in launcher_modules():
        for labels, call in mod.launch_variants():
            with intercepted_launches() as calls:
                call()
            for fn, args, kwargs in calls:
                v = to_variant(fn, args, kwargs, capability)
                by_key.setdefault(v.key(), v).labels.append(labels)
    return list(by_key.values())


def _size(v: Variant) -> tuple:
    blocks = [x for k, x in v.named_constexprs().items() if k.startswith("BLOCK")
              and isinstance(x, int)]
    return (v.options["num_warps"], math.prod(blocks))


def _values(v: Variant) -> set:
    vals = {("num_warps", v.options["num_warps"])}
    vals |= {(k, repr(x)) for k, x in v.named_constexprs().items()}
    vals |= {("pointers", tuple(sorted(t for t in v.signature.values() if t.startswith("*"))))}
    for labels in v.labels:
        vals |= {(k, repr(x)) for k, x in labels.items()}
    return vals


def covering_subset(variants: list[Variant]) -> list[Variant]:
    """Largest tiles first; keep a variant if it compiles a value not yet compiled for its kernel.
    A label shared by several launches (e.g. V = 128256 and 262144, same compile) counts once."""
    seen: dict[str, set] = {}
    out = []
    for v in sorted(variants, key=_size, reverse=True):
        vals = _values(v)
        if vals - seen.setdefault(v.kernel, set()):
            seen[v.kernel] |= vals
            out.append(v)
    return out


def cuobjdump_path() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def resources(cubin: bytes, kernel: str) -> dict:
    """Registers per thread, local (spill) bytes per thread, static shared bytes, from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out)
    fields = dict(re.findall(r"(\w+):(\d+)", m.group(1))) if m else {}
    return {"regs": int(fields.get("REG", -1)), "local_bytes": int(fields.get("LOCAL", -1)),
            "stack_bytes": int(fields.get("STACK", -1))}


def compile_variant(fn, signature, constexprs, attrs, options, capability) -> dict:
    """Compile one variant; {"ok", "error" | resources, "shared", "seconds"}. ``fn`` is a
    JITFunction or (module, name)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if isinstance(fn, tuple):
        fn = getattr(importlib.import_module(fn[0]), fn[1])
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                           target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as e:  # noqa: BLE001  (any compiler error is the finding to report)
        return {"ok": False, "error": f"{type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0}
    cpu = _cpu_seconds() - c0  # before cuobjdump: the compile's own cost
    res = resources(k.asm["cubin"], fn.fn.__name__)
    return {"ok": True, "shared": int(k.metadata.shared), **res,
            "seconds": time.perf_counter() - t0, "cpu_seconds": cpu}


def _cpu_seconds() -> float:
    # This process and its waited-for children (ptxas): the cost on idle cores, whatever the load.
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _job(v: Variant, capability: int) -> dict:
    opts = {k: v.options[k] for k in ("num_warps", "num_stages", "num_ctas", "debug")}
    return compile_variant((v.module, v.kernel), v.signature, v.constexprs, v.attrs, opts,
                           capability)


def _describe(v: Variant) -> str:
    c = ", ".join(f"{k}={x}" for k, x in v.named_constexprs().items())
    ptrs = sorted({t for t in v.signature.values() if t.startswith("*")})
    return f"{v.kernel}[{c}; warps={v.options['num_warps']}; {' '.join(ptrs)}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="compile every variant, not the cover")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", help="write the per-variant report here")
    ap.add_argument("--md", help="write the per-variant table here (markdown)")
    ap.add_argument("--list", action="store_true", help="only count and list the variants")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        print("check_triton: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    start = time.perf_counter()
    variants = enumerate_variants()
    chosen = variants if args.all else covering_subset(variants)
    launched = {(v.module, v.kernel) for v in variants}
    missing = kernels_defined() - launched
    print(f"check_triton: {len(variants)} distinct launch variants "
          f"({time.perf_counter() - start:.0f} s to enumerate), compiling "
          f"{'all' if args.all else 'a covering subset of'} {len(chosen)} for sm_80 and sm_90a "
          f"= {2 * len(chosen)} compiles, {args.jobs} processes")
    if args.list:
        for v in chosen:
            print("  ", _describe(v))
        return 0
    failures = [f"{m}.{k}: defined but never launched by a launch_variants()" for m, k in missing]
    rows = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futs = {pool.submit(_job, v, cap): (v, cap) for v in chosen for cap in TARGETS}
        for fut in cf.as_completed(futs):
            v, cap = futs[fut]
            r = fut.result()
            arch = "sm_80" if cap == 80 else "sm_90a"
            row = {"kernel": v.kernel, "arch": arch, "constexprs": v.named_constexprs(),
                   "num_warps": v.options["num_warps"],
                   "pointers": [t for t in v.signature.values() if t.startswith("*")],
                   "launches": len(v.labels), "labels": v.labels[:1], **r}
            rows.append(row)
            if not r["ok"]:
                failures.append(f"{arch} {_describe(v)}: {r['error'][:2000]}")
                print(f"  FAIL  {arch} {_describe(v)}")
            elif r["local_bytes"] > 0 and v.kernel not in SPILLS_ALLOWED:
                failures.append(f"{arch} {_describe(v)}: spills {r['local_bytes']} B/thread")
                print(f"  SPILL {arch} {_describe(v)}: {r['local_bytes']} B local")
            else:
                print(f"  ok    {arch} {_describe(v)}  regs {r['regs']} local "
                      f"{r['local_bytes']} shared {r['shared']}  {r['seconds']:.1f} s", flush=True)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], repr(sorted(r["constexprs"].items()))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants_enumerated": len(variants), "compiled": len(chosen),
                       "targets": ["sm_80", "sm_90a"], "triton": _triton_version(),
                       "wall_seconds": round(time.perf_counter() - start),
                       "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows)),
                       "rows": rows}, f, indent=1, default=str)
    if args.md:
        write_table(rows, args.md, len(variants), len(chosen))
    for msg in failures:
        print("FAILED:", msg)
    cpu = sum(r["cpu_seconds"] for r in rows)
    print(f"check_triton: {2 * len(chosen)} compiles in {time.perf_counter() - start:.0f} s "
          f"({cpu:.0f} CPU s: {cpu / args.jobs:.0f} s on {args.jobs} idle cores), "
          f"{'passed' if not failures else f'{len(failures)} FAILURES'}")
    return 1 if failures else 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def write_table(rows: list, path: str, n_variants: int, n_compiled: int) -> None:
    lines = [f"# Triton kernel resources, {time.strftime('%Y-%m-%d')} "
             "(`bash scripts/check_triton.sh --md PATH`: compiled, not run; no GPU)", "",
             f"Triton {_triton_version()}: {n_variants} distinct launch variants; {n_compiled} "
             "compiled per target (the covering subset unless --all). Registers per thread, "
             "local = spilled bytes per thread, shared = static shared bytes per block.", "",
             "| kernel | arch | compiled | regs (min-max) | max local | max shared |",
             "|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        regs = [r["regs"] for r in ok] or [0]
        lines.append(f"| {kernel} | {arch} | {len(ok)}/{len(rs)} | {min(regs)}-{max(regs)} | "
                     f"{max([r['local_bytes'] for r in ok] or [0])} | "
                     f"{max([r['shared'] for r in ok] or [0])} |")
    lines += ["", "| kernel | arch | constexprs | warps | pointers | regs | local | shared |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ptrs = " ".join(sorted(set(r["pointers"])))
        if r["ok"]:
            res = f"{r['regs']} | {r['local_bytes']} | {r['shared']}"
        else:
            res = "FAILED | | "
        lines.append(f"| {r['kernel']} | {r['arch']} | {c} | {r['num_warps']} | {ptrs} | {res} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
