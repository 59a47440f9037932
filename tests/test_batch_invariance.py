"""Batch invariance: a row's outputs and gradient are bit-identical (``torch.equal``) whatever the
batch it is computed in: batch size 1, odd or larger, the row at any position, its neighbours'
contents changed, masked (``ignore_index``) or holding -inf entries.

Why it holds: every per-row op runs one row per kernel program (triton), one row per task (cpu,
whose reductions walk the row in a fixed order) or, on the torch backend, torch's own row
reductions along the last dimension, which read one row at a time whatever the row count. The
row-weighted reduction (``"mean"``/``"sum"``) is the only cross-row step; it is left out here
(``reduction="none"``), as an RL trainer compares per-token values.
"""

import pytest
import torch
from helpers import KIND_PARAMS, kind_kwargs
from reference import logits

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd

V = 37
# (batch size, the row's position): alone, odd batch in the middle, larger batch at the end.
PLACEMENTS = [(1, 0), (7, 3), (33, 32)]
KINDS = KIND_PARAMS + [("renyi", 0.5), ("renyi", 2.0), ("cauchy_schwarz", None)]


def _batch(row: torch.Tensor, n: int, pos: int, seed: int) -> torch.Tensor:
    """``row`` at ``pos`` among n - 1 seeded neighbours of another scale, some holding -inf."""
    x = logits((n, row.shape[-1]), torch.float32, seed=seed, scale=5.0)
    x[::2, :3] = float("-inf")  # neighbours with masked entries
    x[pos] = row
    return x.detach().requires_grad_(True)


def _labels(n: int, pos: int, label: int) -> torch.Tensor:
    lab = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
    lab[1::3] = -100  # ignored neighbours
    lab[pos] = label
    return lab


def _upstream(n: int, pos: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.rand(like.shape, generator=torch.Generator().manual_seed(n + 1), dtype=like.dtype)
    g[pos] = 0.75
    return g


def _row_results(fn, inputs, n, pos):
    """(the row's outputs, the row's gradient of every input) of ``fn(*inputs)`` -> per-row out."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = tuple(o for o in outs if o is not None)
    total = sum((o * _upstream(n, pos, o)).sum() for o in outs if o.requires_grad)
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(total, leaves) if torch.is_tensor(total) else ()
    return [o.detach()[pos] for o in outs], [g[pos] for g in grads]


def _assert_invariant(make, fn, seed):
    """``make(n, pos, seed)`` -> the inputs; the row's results are the same for every placement,
    and for two different neighbourhoods of each placement."""
    first = None
    for n, pos in PLACEMENTS:
        for s in (seed, seed + 100):
            got = _row_results(fn, make(n, pos, s), n, pos)
            if first is None:
                first = got
                continue
            for a, b in zip(first[0] + first[1], got[0] + got[1]):
                assert torch.equal(a, b), f"n={n}, pos={pos}: the row changed with its batch"


ROW_S = logits((V,), torch.float32, seed=11)
ROW_T = logits((V,), torch.float32, seed=12)
ROW_S[5] = float("-inf")  # the row itself has a masked entry (in both: a masked vocabulary entry)
ROW_T[5] = float("-inf")


@pytest.mark.parametrize("kind, param", KINDS, ids=[f"{k}-{p}" for k, p in KINDS])
def test_divergence(kind, param, backend):
    kw = kind_kwargs(kind, param)

    def make(n, pos, s):
        return _batch(ROW_S, n, pos, s), _batch(ROW_T, n, pos, s + 1)

    def fn(s, t):
        return fk.divergence(s, t, kind, reduction="none", backend=backend,
                             inplace_backward=False, **kw)

    _assert_invariant(make, fn, seed=20)


def test_divergence_labels(backend):
    """Masked neighbours (``ignore_index``) and temperature leave the kept row alone."""
    def make(n, pos, s):
        return _batch(ROW_S, n, pos, s), _batch(ROW_T, n, pos, s + 1)

    _assert_invariant(make, lambda s, t: fk.divergence(
        s, t, "js", beta=0.3, temperature=0.7, reduction="none", backend=backend,
        labels=_labels(s.shape[0], _pos(s), 4)), seed=30)


def _pos(x: torch.Tensor) -> int:
    """The placement whose batch size is ``x.shape[0]``."""
    return dict(PLACEMENTS)[x.shape[0]]


@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "softmax_stats", "logsumexp"])
def test_stats(op, backend):
    def make(n, pos, s):
        return (_batch(ROW_S, n, pos, s),)

    def fn(x):
        n, pos = x.shape[0], _pos(x)
        if op == "token_logprobs":
            return fk.token_logprobs(x, _labels(n, pos, 4), temperature=0.7, backend=backend)
        if op == "entropy":
            return fk.entropy(x, temperature=0.7, backend=backend)
        if op == "logsumexp":
            return fk.logsumexp(x, backend=backend)
        return tuple(fk.softmax_stats(x, _labels(n, pos, 4), temperature=0.7, backend=backend))

    _assert_invariant(make, fn, seed=40)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "none"])
def test_sparse_divergence(tail, backend):
    k = 5
    ids_row = torch.tensor([4, 0, 17, 30, 9])
    lp_row = torch.log_softmax(logits((k,), torch.float32, seed=13), -1) - 0.2

    def make(n, pos, s):
        g = torch.Generator().manual_seed(s)
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
        lp = torch.log_softmax(logits((n, k), torch.float32, seed=s), -1) - 0.3
        ids[pos], lp[pos] = ids_row, lp_row
        return _batch(ROW_S, n, pos, s), ids, lp

    def fn(x, ids, lp):
        return fk.sparse_divergence(x, ids, lp, "reverse_kl", tail=tail, reduction="none",
                                    backend=backend, inplace_backward=False,
                                    labels=_labels(x.shape[0], _pos(x), 4))

    _assert_invariant(make, fn, seed=50)


@pytest.mark.parametrize("op", ["divergence", "token_logprobs", "entropy", "logsumexp"])
def test_vocab_parallel_one_rank(op):
    """The vocab-parallel ops at one rank (no process group): the same invariance."""
    def make(n, pos, s):
        if op == "divergence":
            return _batch(ROW_S, n, pos, s), _batch(ROW_T, n, pos, s + 1)
        return (_batch(ROW_S, n, pos, s),)

    def fn(*xs):
        if op == "divergence":
            return fkd.vocab_parallel_divergence(*xs, "kl", reduction="none",
                                                 inplace_backward=False)
        if op == "token_logprobs":
            return fkd.vocab_parallel_token_logprobs(xs[0], _labels(xs[0].shape[0],
                                                                   _pos(xs[0]), 4))
        return getattr(fkd, f"vocab_parallel_{op}")(xs[0])

    _assert_invariant(make, fn, seed=60)


# ---- the fused forms, batch_invariant=True ------------------------------------------------------

FH = 64  # wide enough that BLAS picks different kernels for 1 and 33 rows (the default differs)
FUSED_BACKENDS = ["cpu", "torch"]
# (rows, the row's position, chunk_size): alone, odd and larger batches, the row in the first,
# a middle or the last (padded) chunk of a fixed 5-row chunk, ignored neighbours packed away.
FUSED_PLACEMENTS = [(1, 0, None), (7, 3, None), (33, 32, None), (33, 0, 5), (33, 17, 5),
                    (7, 6, 5)]
W_S = logits((V, FH), torch.float32, seed=70, scale=0.3)
W_T = logits((V, FH), torch.float32, seed=71, scale=0.3)
H_ROW = logits((FH,), torch.float32, seed=72)
HT_ROW = logits((FH,), torch.float32, seed=73)


def _hidden(row, n, pos, seed):
    h = logits((n, FH), torch.float32, seed=seed)
    h[pos] = row
    return h.requires_grad_(True)


def _fused_row(form, backend, n, pos, chunk, invariant):
    """The row's outputs and hidden-state gradients in one placement."""
    lab = _labels(n, pos, 4)
    hs, ht = _hidden(H_ROW, n, pos, 74 + n), _hidden(HT_ROW, n, pos, 75 + n)
    kw = {"chunk_size": chunk, "backend": backend, "batch_invariant": invariant}
    if form == "token_logprobs":
        outs = fk.fused_linear_token_logprobs(hs, W_S, lab, return_entropy=True, **kw)
        leaves = (hs,)
    elif form == "divergence":
        outs = (fk.fused_linear_divergence(hs, W_S, ht, W_T, "js", beta=0.3, labels=lab,
                                           reduction="none", ce_weight=0.2, **kw),)
        leaves = (hs, ht)
    else:
        g = torch.Generator().manual_seed(n)
        ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(n)])
        lp = torch.log_softmax(logits((n, 5), torch.float32, seed=n), -1) - 0.3
        ids[pos], lp[pos] = torch.tensor([4, 0, 17, 30, 9]), torch.linspace(-1, -3, 5)
        outs = (fk.fused_linear_sparse_divergence(hs, W_S, ids, lp, "reverse_kl", labels=lab,
                                                  reduction="none", **kw),)
        leaves = (hs,)
    total = sum((o * _upstream(n, pos, o)).sum() for o in outs)
    grads = torch.autograd.grad(total, leaves)
    return [o.detach()[pos] for o in outs] + [g[pos] for g in grads]


@pytest.mark.parametrize("form", ["token_logprobs", "divergence", "sparse_divergence"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_batch_invariant(form, backend):
    first = None
    for n, pos, chunk in FUSED_PLACEMENTS:
        got = _fused_row(form, backend, n, pos, chunk, True)
        first = first or got
        for a, b in zip(first, got):
            assert torch.equal(a, b), f"n={n}, pos={pos}, chunk={chunk}: the row changed"


def test_fused_default_is_not_batch_invariant():
    """Why the flag exists: by default the GEMM shape follows the row count, and the row's
    hidden-state gradient changes in its last bits (this also shows the test above can fail)."""
    a = _fused_row("token_logprobs", "cpu", 1, 0, None, False)
    b = _fused_row("token_logprobs", "cpu", 33, 32, None, False)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_fused_batch_invariant_must_be_a_bool():
    h, lab = logits((3, FH), torch.float32, seed=1), torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="batch_invariant"):
        fk.fused_linear_token_logprobs(h, W_S, lab, batch_invariant=1)


def test_module_takes_batch_invariant_and_transforms():
    """``fk.nn.FusedLinearDivergenceLoss`` passes ``batch_invariant`` and the logit transforms
    through: the row is invariant through the module, and it equals the functional op."""
    def row(n, pos):
        hs, ht = _hidden(H_ROW, n, pos, 80 + n), _hidden(HT_ROW, n, pos, 81 + n)
        crit = fk.nn.FusedLinearDivergenceLoss("js", beta=0.3, reduction="none", backend="cpu",
                                               batch_invariant=True, student_softcap=3.0,
                                               teacher_logit_scale=0.7)
        out = crit(hs, W_S, ht, W_T)
        ref = fk.fused_linear_divergence(hs, W_S, ht, W_T, "js", beta=0.3, reduction="none",
                                         backend="cpu", batch_invariant=True,
                                         student_softcap=3.0, teacher_logit_scale=0.7)
        plain = fk.fused_linear_divergence(hs, W_S, ht, W_T, "js", beta=0.3, reduction="none",
                                           backend="cpu", batch_invariant=True)
        assert torch.equal(out, ref) and not torch.equal(out, plain)
        (g,) = torch.autograd.grad((out * _upstream(n, pos, out)).sum(), (hs,))
        return out.detach()[pos], g[pos]

    first = row(1, 0)
    for n, pos in [(7, 3), (33, 32)]:
        assert all(torch.equal(a, b) for a, b in zip(first, row(n, pos)))
