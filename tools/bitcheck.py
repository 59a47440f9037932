"""Bit-for-bit check of the C++ CPU kernels between two builds of the extension.

    python tools/bitcheck.py OLD_C.so NEW_C.so

runs the same seeded calls once per build, each in its own process (a build registers the
``fdiv`` ops once per process), and compares every output bit for bit (NaNs included). The calls:
``torch.ops.fdiv`` divergence_fwd_cpu (every base kind, both directions, float32 / float64 /
bfloat16 / float16, with and without logit transforms), lse_combination_fwd_cpu,
softmax_stats_fwd/bwd_cpu, sparse_divergence_fwd/bwd_cpu (every kind and tail), and through the
public API with ``backend="cpu"``: a Sinkhorn solve with its gradients and the fused-linear forms
with theirs. The Python package is the one importable here (``PYTHONPATH``); only
``fdiv_kernels._C`` is taken from the given file. ``--save OUT`` writes one build's outputs
(``torch.save``) for a comparison with ``--compare A B`` later.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (student_scale, student_softcap, teacher_scale, teacher_softcap, inv_temperature)
TRANSFORMS = ((1.0, 0.0, 1.0, 0.0, 1.0), (0.7, 0.0, 1.3, 0.0, 0.5),
              (1.2, 20.0, 0.9, 7.0, 1.0 / 1.5))
KINDS = ((0, 0.0), (1, 0.5), (2, 0.0), (3, 0.0), (4, 0.0), (5, 0.3), (6, 0.1), (7, 0.0), (8, 0.0))


class _BuildFinder(importlib.abc.MetaPathFinder):
    """Serves ``fdiv_kernels._C`` from one file, whatever the package folder holds."""

    def __init__(self, path: str):
        self.path = path

    def find_spec(self, name, path=None, target=None):
        if name != "fdiv_kernels._C":
            return None
        return importlib.util.spec_from_file_location(name, self.path)


def _logits(gen, shape, dtype):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x[0, :: max(1, shape[1] // 7)] = float("-inf")  # -inf logits in the first row
    return x.to(dtype)


def _divergence(out, gen):
    for dtype in DTYPES:
        for n, v in ((4, 4500), (6, 33)):  # over one 4096 block / one short block
            s, t = _logits(gen, (n, v), dtype), _logits(gen, (n, v), dtype)
            valid = torch.ones(n, dtype=torch.bool)
            valid[-1] = False
            for ti, (ss, sc, ts, tc, inv_t) in enumerate(TRANSFORMS):
                for base, param in KINDS:
                    for swap in (False, True):
                        gs, gt = (True, base % 2 == 0) if swap else (base != 3, True)
                        key = f"div/{dtype}/{v}/{ti}/{base}/{swap}"
                        out[key] = torch.ops.fdiv.divergence_fwd_cpu(
                            s, t, valid, base, swap, param, inv_t, ss, sc, ts, tc, gs, gt)
                a = 0.7  # Cauchy-Schwarz and Renyi's three log-sum-exps
                for ci, coeffs in enumerate(([2, 0, .5, 0, 2, .5, 1, 1, -1],
                                             [1 - a, a, 1 / (a - 1), 1, 0, 1, 0, 1, a / (1 - a)])):
                    out[f"lse/{dtype}/{v}/{ti}/{ci}"] = torch.ops.fdiv.lse_combination_fwd_cpu(
                        s, t, valid, coeffs, inv_t, ss, sc, ts, tc, True, ci == 0)


def _softmax_stats(out, gen):
    for dtype in DTYPES:
        for n, v in ((3, 10000), (50, 257)):  # rows cut into stretches / one stretch per row
            x = _logits(gen, (n, v), dtype)
            lab = torch.randint(0, v, (n,), generator=gen)
            lab[1] = -100
            for ti, (sc, cap, _, _, inv_t) in enumerate(TRANSFORMS):
                for li, labels in enumerate((None, lab, lab.int())):
                    for ent in (False, True):
                        key = f"stats/{dtype}/{v}/{ti}/{li}/{ent}"
                        fwd = torch.ops.fdiv.softmax_stats_fwd_cpu(x, labels, -100, inv_t, sc, cap,
                                                                   ent)
                        out[key] = fwd
                        if labels is None or not ent:
                            continue
                        lse, entropy, _ = fwd
                        g = torch.randn(3, n, generator=gen)
                        for gi, (gl, ge, gp) in enumerate(((g[0], None, None), (None, g[1], None),
                                                           (None, None, g[2]), tuple(g))):
                            out[f"{key}/bwd{gi}"] = torch.ops.fdiv.softmax_stats_bwd_cpu(
                                x, labels, lse, entropy, gl, ge, gp, -100, inv_t, sc, cap)


def _sparse(out, gen):
    n, v, k = 5, 5000, 8
    for dtype in DTYPES:
        x = _logits(gen, (n, v), dtype)
        teacher = torch.randn(n, v, generator=gen, dtype=torch.float64).log_softmax(-1)
        lp, ids = teacher.topk(k, dim=-1)
        support = torch.ones(n, k, dtype=torch.bool)
        support[2, -3:] = False
        valid = torch.ones(n, dtype=torch.bool)
        valid[3] = False
        for tdtype in (torch.float32, torch.bfloat16):
            lpt = lp.to(tdtype)
            for scale, cap in ((1.0, 0.0), (1.3, 25.0)):
                for tail in (0, 1, 2):
                    for base, param in KINDS:
                        for swap in (False, True):
                            alpha = 1.5 if swap else 0.0
                            key = f"sparse/{dtype}/{tdtype}/{cap}/{tail}/{base}/{swap}"
                            fwd = torch.ops.fdiv.sparse_divergence_fwd_cpu(
                                x, ids, lpt, support, valid, base, swap, param, 0.8, tail, alpha,
                                1e-3, scale, cap, True, True)
                            out[key] = fwd
                            gl = torch.randn(n, generator=gen, dtype=fwd[0].dtype)
                            out[key + "/bwd"] = torch.ops.fdiv.sparse_divergence_bwd_cpu(
                                x, ids, lpt, support, valid, fwd[3], gl, base, swap, param, 0.8,
                                tail, alpha, scale, cap)


def _public(out, gen):
    import fdiv_kernels as fk

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(40, 3, generator=gen, dtype=dtype, requires_grad=True)
        y = torch.randn(33, 3, generator=gen, dtype=dtype, requires_grad=True)
        r = fk.sinkhorn(x=x, y=y, epsilon=0.1, backend="cpu")
        r.value.backward()
        out[f"sinkhorn/{dtype}"] = (r.value.detach(), r.f, r.g, x.grad, y.grad)

    n, d, v = 12, 16, 301
    for dtype in (torch.float32, torch.bfloat16):
        hs = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
        ws = (torch.randn(v, d, generator=gen) / 4).to(dtype).requires_grad_()
        ht = torch.randn(n, d, generator=gen).to(dtype)
        wt = (torch.randn(v, d, generator=gen) / 4).to(dtype)
        labels = torch.randint(0, v, (n,), generator=gen)
        labels[0] = -100
        for kind in ("kl", "js", "reverse_kl", "tv"):
            loss = fk.fused_linear_divergence(hs, ws, ht, wt, kind, labels=labels, ce_weight=0.3,
                                              student_softcap=15.0, chunk_size=5, backend="cpu")
            hs.grad = ws.grad = None
            loss.backward()
            out[f"fused/{dtype}/{kind}"] = (loss.detach(), hs.grad, ws.grad)
        lp = fk.fused_linear_token_logprobs(hs, ws, labels, temperature=0.7, chunk_size=5,
                                            backend="cpu")
        hs.grad = ws.grad = None
        lp.sum().backward()
        out[f"fused_logprobs/{dtype}"] = (lp.detach(), hs.grad, ws.grad)
        tlp, tids = torch.randn(n, v, generator=gen).log_softmax(-1).topk(6, dim=-1)
        loss = fk.fused_linear_sparse_divergence(hs, ws, tids, tlp, "kl", chunk_size=5,
                                                 backend="cpu")
        hs.grad = ws.grad = None
        loss.backward()
        out[f"fused_sparse/{dtype}"] = (loss.detach(), hs.grad, ws.grad)


def save(path: str) -> None:
    import fdiv_kernels._C  # noqa: F401  (the build under test: defines torch.ops.fdiv.*_cpu)

    print("build:", fdiv_kernels._C.__file__)
    torch.set_num_threads(2)  # the row splits depend on the thread count: the same for both
    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    for part in (_divergence, _softmax_stats, _sparse, _public):
        part(out, gen)
    torch.save(out, path)


def _flat(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat(x)]
    return [torch.as_tensor(v)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.contiguous().view(ints), b.contiguous().view(ints)
    return torch.equal(a, b)


def compare(path_a: str, path_b: str) -> int:
    a, b = torch.load(path_a), torch.load(path_b)
    bad = sorted(k for k in a.keys() | b.keys()
                 if k not in a or k not in b
                 or len(_flat(a[k])) != len(_flat(b[k]))
                 or not all(_same_bits(x, y) for x, y in zip(_flat(a[k]), _flat(b[k]))))
    n = sum(len(_flat(v)) for v in a.values())
    print(f"{len(a)} calls, {n} output tensors: {len(bad)} calls differ")
    for k in bad[:20]:
        print("  differs:", k)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="*", help="two _C*.so files: run both and compare")
    p.add_argument("--save", help="write the outputs of this process's build (--so) to this file")
    p.add_argument("--so", help="with --save: the _C*.so to load (default: the package's own)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files")
    args = p.parse_args(argv)
    if args.save:
        if args.so:
            sys.meta_path.insert(0, _BuildFinder(os.path.abspath(args.so)))
        save(args.save)
        return 0
    if args.compare:
        return compare(*args.compare)
    if len(args.builds) != 2:
        p.error("give two builds (_C*.so files), --save, or --compare")
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for i, so in enumerate(args.builds):
            outs.append(os.path.join(tmp, f"{i}.pt"))
            subprocess.run([sys.executable, __file__, "--save", outs[-1], "--so", so], check=True)
        return compare(*outs)


if __name__ == "__main__":
    sys.exit(main())
