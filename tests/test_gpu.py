"""The GPU backends (triton compiled, cuda C++) on CUDA tensors, against the float64 reference.

Skipped without a GPU (CI has none). On a GPU machine, compiled Triton needs the interpreter off:

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py -q

Every other test file builds CPU tensors, so this is the file that exercises the GPU paths: every
divergence kind and dtype per GPU backend (V = 1, odd V, a V past one cluster's tile, -inf
logits, ignored rows, N = 1), the softmax statistics, and the Sinkhorn solves against the torch
backend on the same device. The shapes stay small except one large-V case per kind family.
"""

import math
import zlib

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL
from helpers import KIND_PARAMS, assert_close, available_backends, kind_kwargs
from reference import (
    divergence_with_grads,
    logits,
    softmax_stats_rows,
    sparse_divergence_with_grads,
    sparse_teacher,
    topk_logprobs_rows,
)

import fdiv_kernels as fk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def gpu_backends(op: str) -> list[str]:
    return available_backends(op, device=DEV) if torch.cuda.is_available() else []


DIV_BACKENDS = gpu_backends("divergence_fwd")
STATS_BACKENDS = gpu_backends("softmax_stats_fwd")
SPARSE_BACKENDS = gpu_backends("sparse_divergence_fwd")
TOPK_BACKENDS = gpu_backends("topk_logprobs_fwd")
# (rows, V): V = 1, odd small V, and V past one CTA's share of a 16-CTA cluster (not a multiple).
SHAPES = [(1, 1), (3, 17), (2, 3, 129), (1, 128256 + 37), (4, 262144 - 5)]


@pytest.mark.parametrize("backend", DIV_BACKENDS)
@pytest.mark.parametrize("kind,param", KIND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_divergence_on_gpu_matches_reference(backend, kind, param, dtype, shape):
    seed = zlib.crc32(repr((kind, param, dtype, shape)).encode())
    s, t = logits(shape, dtype, seed=seed), logits(shape, dtype, seed=seed + 1)
    keep = torch.ones(shape[-1], dtype=torch.bool)
    # A padded vocabulary on the real-vocabulary shapes: -inf in both inputs at the same columns
    # (on tiny V, dropping columns leaves chi2 too ill-conditioned for fp32 tolerances).
    if shape[-1] > 1000:
        keep[[5, shape[-1] - 1]] = False
        s[..., ~keep] = t[..., ~keep] = -math.inf
    # The reference drops the padded columns (their terms are 0, their gradients 0).
    ref, gs, gt = divergence_with_grads(s[..., keep], t[..., keep], kind, param, temperature=1.7)
    sd = s.to(DEV).requires_grad_(True)
    td = t.to(DEV).requires_grad_(True)
    loss = fk.divergence(sd, td, kind, backend=backend, temperature=1.7, reduction="none",
                         **kind_kwargs(kind, param))
    loss.sum().backward()
    assert_close(loss.cpu(), ref, LOSS_TOL[dtype], f"{backend} loss")
    assert_close(sd.grad.cpu()[..., keep], gs, GRAD_TOL[dtype], f"{backend} student grad")
    assert_close(td.grad.cpu()[..., keep], gt, GRAD_TOL[dtype], f"{backend} teacher grad")
    assert (sd.grad[..., ~keep.to(DEV)] == 0).all() and (td.grad[..., ~keep.to(DEV)] == 0).all()


@pytest.mark.parametrize("backend", DIV_BACKENDS)
def test_ignored_rows_on_gpu(backend):
    s, t = logits((2, 5, 1000), seed=5), logits((2, 5, 1000), seed=6)
    labels = torch.tensor([[1, -100, 3, 4, -100], [7, 8, -100, 1, 2]])
    ref, gs, _ = divergence_with_grads(s, t, "js", 0.5)
    keep = labels != -100
    sd = s.to(DEV).requires_grad_(True)
    loss = fk.divergence(sd, t.to(DEV), "js", beta=0.5, labels=labels.to(DEV), backend=backend)
    loss.backward()
    want = torch.where(keep, ref, 0.0).sum() / keep.sum()
    assert_close(loss.cpu(), want, LOSS_TOL[torch.float32], "loss")
    assert_close(sd.grad.cpu(), gs * keep[..., None] / keep.sum(), GRAD_TOL[torch.float32], "grad")


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 128256 + 37)], ids=str)
def test_softmax_stats_on_gpu_match_reference(backend, dtype, shape):
    x = logits(shape, dtype, seed=11)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(12))
    labels[0] = -100
    lse, ent, lp = softmax_stats_rows(x, labels, temperature=0.9)
    out = fk.softmax_stats(x.to(DEV), labels=labels.to(DEV), temperature=0.9, backend=backend)
    got = [t.cpu() for t in out]
    assert_close(got[0], lse, LOSS_TOL[dtype], "lse")
    assert_close(got[1], ent, LOSS_TOL[dtype], "entropy")
    assert_close(got[2], lp, LOSS_TOL[dtype], "label log-prob")
    assert_close(fk.logsumexp(x.to(DEV), dim=-1, backend=backend).cpu().float(),
                 torch.logsumexp(x.double(), -1), (1e-2 if dtype != torch.float32 else 2e-5,
                                                   1e-2), "logsumexp")


def _stopping_margin(kw: dict, ref) -> float:
    """Smallest relative distance |err / tol - 1| (in log) between tol and the errors of the
    checks that decide each problem's n_iter: its stopping check (the final error) and the check
    before it (the final error of a solve stopped check_every iterations earlier)."""
    tol, every = kw["tol"], kw["check_every"]
    errs = [ref.marginal_error.flatten()]
    for v in ref.n_iter.unique().tolist():
        if v > every:  # at v == every the check before is the start, far above tol
            prev = fk.sinkhorn(**{**kw, "max_iter": v - every}, backend="torch").marginal_error
            errs.append(prev[ref.n_iter == v].flatten())
    e = torch.cat(errs).double()
    return math.expm1((e.log() - math.log(tol)).abs().min().item())


# (shape, symmetric, tol): each tol sits between the problems' check errors, at least 1.6 %
# from every error that decides an n_iter (found from the torch backend's error after each 5
# iterations, fp32 on the CPU; the GPU's fp32 errors differ from those by ~1e-4 relative). B = 16
# rather than 64: 64 problems' errors leave no tol further than 0.5 % from one of them.
# n_iter: 15-30 and 55-105 (B = 16), 40-45 and 85-100 (B = 2).
SINKHORN_CASES = [((16, 32, 32, 8), False, 2.7e-2), ((16, 32, 32, 8), True, 2.47e-2),
                  ((2, 300, 200, 16), False, 4e-3), ((2, 300, 200, 16), True, 1.8e-2)]


@pytest.mark.parametrize("shape,symmetric,tol", SINKHORN_CASES, ids=str)
def test_sinkhorn_on_gpu_matches_torch_backend(shape, symmetric, tol):
    """The GPU sinkhorn backends (whole-solve and per-update) against the torch backend on the
    same device, exact iteration counts included: the tolerance is chosen away from every check's
    error, and asserted to be, so an equal count is a fair demand of fp32 backends."""
    backends = [b for b in gpu_backends("sinkhorn_fwd") if b != "torch"]
    if not backends:
        pytest.skip("no GPU sinkhorn backend here")
    B, n, m, d = shape
    x = logits((B, n, d), torch.float32, seed=13, scale=1.0).to(DEV)
    y = logits((B, m, d), torch.float32, seed=14, scale=1.0).to(DEV)
    kw = dict(x=x, y=y, epsilon=0.5, tol=tol, max_iter=500, check_every=5, symmetric=symmetric)
    ref = fk.sinkhorn(**kw, backend="torch")
    assert ref.converged.all()
    margin = _stopping_margin(kw, ref)
    assert margin > 0.01, f"tol {tol} is {margin:.2%} from a check's error: pick another"
    for b in backends:
        r = fk.sinkhorn(**kw, backend=b)
        assert torch.equal(r.n_iter, ref.n_iter), b
        assert_close(r.value, ref.value, (2e-5, 2e-5), f"{b} value")
        assert_close(r.f - r.f.mean(-1, keepdim=True), ref.f - ref.f.mean(-1, keepdim=True),
                     (1e-4, 1e-4), f"{b} f")


def _autocast_case(dev: str, amp_dtype: torch.dtype) -> None:
    """Each op that states its precision gives, under autocast, the result it gives without."""
    g = torch.Generator().manual_seed(5)
    hs, ws = torch.randn(6, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    ht, wt = torch.randn(6, 20, generator=g), torch.randn(300, 20, generator=g) / 4
    s, t = torch.randn(5, 301, generator=g) * 3, torch.randn(5, 301, generator=g) * 3
    x, y = torch.randn(3, 12, 4, generator=g), torch.randn(3, 9, 4, generator=g)
    hs, ws, ht, wt, s, t, x, y = (v.to(dev) for v in (hs, ws, ht, wt, s, t, x, y))

    def run():
        return (fk.fused_linear_divergence(hs, ws, ht, wt, "js"),
                fk.divergence(s, t, "kl"),
                fk.token_logprobs(s, torch.arange(5, device=dev)),
                fk.sinkhorn(x=x, y=y, epsilon=0.2, tol=1e-6, max_iter=2000).value)

    plain = run()
    with torch.autocast(dev, amp_dtype):
        amp = run()
    for name, a, p in zip(("fused_linear", "divergence", "token_logprobs", "sinkhorn"), amp, plain):
        assert a.dtype == p.dtype == torch.float32, name
        assert_close(a, p, (1e-5, 1e-6), f"{name} under {amp_dtype} autocast")


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_on_gpu_keeps_precision(amp_dtype):
    _autocast_case(DEV, amp_dtype)


# ---- batch invariance and determinism on the GPU (docs/numerics.md) ------------------------------

BI_PLACEMENTS = [(1, 0), (7, 3), (33, 32)]  # (batch size, the row's position)


def _row_in_batch(row: torch.Tensor, n: int, pos: int, seed: int) -> torch.Tensor:
    x = logits((n, row.shape[-1]), torch.float32, seed=seed, scale=5.0)
    x[::2, :3] = float("-inf")
    x[pos] = row.cpu()
    return x.to(DEV).requires_grad_(True)


def _bi_labels(n: int, pos: int, v: int) -> torch.Tensor:
    lab = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(n))
    lab[1::3] = -100
    lab[pos] = 4
    return lab.to(DEV)


def _assert_row_invariant(fn, v: int):
    """fn(s, t, labels) -> per-row outputs; the row's outputs and gradients for every placement."""
    row_s, row_t = logits((v,), torch.float32, seed=11), logits((v,), torch.float32, seed=12)
    first = None
    for n, pos in BI_PLACEMENTS:
        for seed in (20, 120):
            s, t = _row_in_batch(row_s, n, pos, seed), _row_in_batch(row_t, n, pos, seed + 1)
            outs = [o for o in fn(s, t, _bi_labels(n, pos, v)) if o is not None]
            total = sum((o * (1.0 + torch.arange(n, device=DEV) % 5)).sum() for o in outs)
            grads = torch.autograd.grad(total, (s, t), allow_unused=True)
            got = [o.detach()[pos] for o in outs] + [g[pos] for g in grads if g is not None]
            first = first or got
            for a, b in zip(first, got):
                assert torch.equal(a, b), f"n={n}, pos={pos}: the row changed with its batch"


BI_KINDS = [("kl", None), ("reverse_kl", None), ("js", 0.3), ("alpha", 0.5), ("renyi", 2.0),
            ("cauchy_schwarz", None)]


@pytest.mark.parametrize("backend", sorted(set(DIV_BACKENDS) | {"torch"}))
@pytest.mark.parametrize("v", [37, 128256 + 37])
def test_batch_invariance_gpu(backend, v):
    """Per-row ops on the GPU, torch backend included (torch's CUDA reductions are not promised
    shape-independent by torch: a failure here for "torch" goes in docs/numerics.md)."""
    for kind, param in BI_KINDS:
        if backend == "cuda" and kind in ("renyi", "cauchy_schwarz"):
            continue  # the cuda C++ backend lacks the row op
        kw = kind_kwargs(kind, param)
        _assert_row_invariant(lambda s, t, lab, kind=kind, kw=kw: (fk.divergence(
            s, t, kind, reduction="none", backend=backend, inplace_backward=False, **kw),), v)
    if backend in STATS_BACKENDS or backend == "torch":
        _assert_row_invariant(lambda s, t, lab: (
            fk.token_logprobs(s, lab, temperature=0.7, backend=backend),
            fk.entropy(t, backend=backend), fk.logsumexp(s, backend=backend)), v)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_batch_invariant_gpu(backend):
    h_dim, v = 256, 32000 + 37
    w = logits((v, h_dim), torch.float32, seed=70, scale=0.05).to(DEV)
    row = logits((h_dim,), torch.float32, seed=72)
    first = None
    for n, pos, chunk in [(1, 0, None), (7, 3, None), (33, 32, None), (300, 150, None),
                          (33, 17, 5)]:
        h = logits((n, h_dim), torch.float32, seed=n)
        h[pos] = row
        h = h.to(DEV).requires_grad_(True)
        lp, ent = fk.fused_linear_token_logprobs(h, w, _bi_labels(n, pos, v), return_entropy=True,
                                                 chunk_size=chunk, backend=backend,
                                                 batch_invariant=True)
        (gh,) = torch.autograd.grad((lp + ent).sum(), (h,))
        got = [lp.detach()[pos], ent.detach()[pos], gh[pos]]
        first = first or got
        for a, b in zip(first, got):
            assert torch.equal(a, b), f"n={n}, pos={pos}, chunk={chunk}: the row changed"


@pytest.mark.parametrize("backend", sorted(set(DIV_BACKENDS) | {"torch"}))
def test_determinism_gpu(backend):
    """Repeated runs under torch.use_deterministic_algorithms(True): bit-identical."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        n, v, h_dim = 33, 128256 + 37, 64
        labels = _bi_labels(n, 3, v)
        g = torch.Generator().manual_seed(4)
        ids = torch.stack([torch.randperm(v, generator=g)[:8] for _ in range(n)]).to(DEV)
        tlp = (torch.log_softmax(logits((n, 8), torch.float32, seed=5), -1) - 0.2).to(DEV)
        fused = backend in ("triton", "torch")

        def run():
            s = logits((n, v), torch.float32, seed=1).to(DEV).requires_grad_(True)
            t = logits((n, v), torch.float32, seed=2).to(DEV).requires_grad_(True)
            outs = [fk.divergence(s, t, "js", beta=0.3, labels=labels, backend=backend)]
            if backend in STATS_BACKENDS or backend == "torch":
                outs += [fk.token_logprobs(s, labels, backend=backend).sum(),
                         fk.entropy(t, backend=backend).sum()]
            leaves = [s, t]
            if fused:
                outs.append(fk.sparse_divergence(s, ids, tlp, "kl", labels=labels,
                                                 backend=backend))
                hs = logits((n, h_dim), torch.float32, seed=3).to(DEV).requires_grad_(True)
                w = logits((v, h_dim), torch.float32, seed=6, scale=0.05).to(DEV)
                w.requires_grad_(True)
                outs.append(fk.fused_linear_divergence(hs, w, hs.detach(), w.detach() * 0.9,
                                                       "kl", labels=labels, chunk_size=8,
                                                       backend=backend))
                leaves += [hs, w]
            grads = torch.autograd.grad(sum(outs), leaves)
            return [o.detach() for o in outs] + list(grads)

        first = run()
        for _ in range(2):
            for a, b in zip(first, run()):
                assert torch.equal(a, b), "a repeated run differs"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", [((1, 5), 5), ((3, 129), 7), ((2, 128256 + 37), 64)],
                         ids=str)
def test_sparse_divergence_on_gpu_matches_reference(backend, tail, dtype, shape, k):
    """A top-k teacher on the GPU kernels: every tail, reverse KL and JS, against float64."""
    seed = zlib.crc32(repr((tail, dtype, shape)).encode())
    s = logits(shape, dtype, seed=seed)
    ids, lp = sparse_teacher(shape, k, seed=seed + 1, mass=1.0 if tail == "none" or k == shape[-1] else 0.9)
    for kind, param in [("reverse_kl", None), ("js", 0.3)]:
        ref, gs, gt = sparse_divergence_with_grads(s, ids, lp, kind, param, tail=tail,
                                                   temperature=1.3)
        sd = s.to(DEV, copy=True).requires_grad_(True)
        lpd = lp.to(DEV, torch.float32, copy=True).requires_grad_(True)
        loss = fk.sparse_divergence(sd, ids.to(DEV), lpd, kind, tail=tail, temperature=1.3,
                                    reduction="none", backend=backend, **kind_kwargs(kind, param))
        loss.sum().backward()
        assert_close(loss.cpu(), ref, LOSS_TOL[dtype], f"{backend} {kind} loss")
        assert_close(sd.grad.cpu(), gs, GRAD_TOL[dtype], f"{backend} {kind} student grad")
        assert_close(lpd.grad.cpu(), gt, GRAD_TOL[torch.float32], f"{backend} {kind} teacher grad")


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((3, 129), 7), ((2, 128256 + 37), 64),
                                     ((4, 262144 - 5), 100)], ids=str)
def test_topk_logprobs_on_gpu_matches_reference(backend, dtype, shape, k):
    """The teacher's top-k on the GPU kernel: the k log-probs (sorted) against float64, the ids
    where they sit (a near-tie may order two ids either way after rounding), int32 ids, the
    top_p mask, and the fused form from hidden states."""
    seed = zlib.crc32(repr((dtype, shape, k)).encode())
    x = logits(shape, dtype, seed=seed)
    for T, cap, top_p in [(1.0, None, None), (0.7, 5.0, 0.9)]:
        _, ref_lp, _ = topk_logprobs_rows(x.double(), k, T, 1.0, cap, top_p)
        out = fk.topk_logprobs(x.to(DEV), k, temperature=T, softcap=cap, top_p=top_p,
                               backend=backend)
        assert out.ids.dtype == torch.int32
        full = torch.log_softmax(topk_transform(x.double(), cap) / T, -1)
        real = out.support_mask.cpu() if top_p is not None else torch.ones(*shape[:-1], k,
                                                                          dtype=torch.bool)
        got = out.logprobs.cpu().double()
        assert_close(got[real], ref_lp[real], LOSS_TOL[torch.float32], f"{backend} log-probs")
        at_ids = full.gather(-1, out.ids.cpu().long().clamp_min(0))
        assert_close(got[real], at_ids[real], LOSS_TOL[torch.float32], f"{backend} ids")
    h = logits((37, 64), dtype, seed=seed + 1).to(DEV)
    w = logits((shape[-1], 64), dtype, seed=seed + 2, scale=0.2).to(DEV)
    fused = fk.fused_linear_topk_logprobs(h, w, k, backend=backend)
    want = fk.topk_logprobs(h.float() @ w.float().T, k, backend=backend)
    assert_close(fused.logprobs.cpu(), want.logprobs.cpu(), (1e-4, 1e-4), f"{backend} fused")


def topk_transform(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)
