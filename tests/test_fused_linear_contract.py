"""The contract every fused-linear form shares, run over all four (dense divergence, sparse
teacher, token log-probs, vocabulary-parallel at one rank): they run on one chunk engine
(fdiv_kernels/fused_linear/_engine.py), so one rule, checked here once, holds for each.

Zero rows, all rows masked, labels of every integer width, num_items_in_batch as a number or a
tensor, chunk sizes 1 / odd / all rows, no_grad, autocast, and bad arguments named in the error.
(The vocabulary-parallel form's multi-rank path is tested in test_distributed.py; at one rank it
is the dense form, and its argument checks are its own.)
"""

import pytest
import torch
from conftest import BACKENDS
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd

N, H, V, K = 13, 6, 29, 5  # odd sizes: a chunk of 4 leaves a tail of 1
TOL = (2e-5, 2e-6)


def _inputs(n=N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = logits((n, H), dtype, seed=seed)
    ws = logits((V, H), dtype, seed=seed + 1, scale=0.7)
    ht = logits((n, H + 2), dtype, seed=seed + 2)
    wt = logits((V, H + 2), dtype, seed=seed + 3, scale=0.7)
    labels = torch.randint(0, V, (n,), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)]) if n else \
        torch.zeros(0, K, dtype=torch.int64)
    tlp = torch.log_softmax(logits((n, K), torch.float32, seed=seed + 4), -1) - 0.2
    return hs, ws, ht, wt, labels, ids, tlp


def _dense(hs, ws, ht, wt, labels, ids, tlp, **kw):
    return fk.fused_linear_divergence(hs, ws, ht, wt, "js", labels=labels, **kw)


def _sparse(hs, ws, ht, wt, labels, ids, tlp, **kw):
    return fk.fused_linear_sparse_divergence(hs, ws, ids, tlp, "kl", labels=labels, **kw)


def _logprobs(hs, ws, ht, wt, labels, ids, tlp, **kw):
    kw.pop("reduction", None)
    kw.pop("num_items_in_batch", None)
    lp, ent = fk.fused_linear_token_logprobs(hs, ws, labels, return_entropy=True, **kw)
    return lp.sum() + ent.sum()


def _vocab_parallel(hs, ws, ht, wt, labels, ids, tlp, **kw):
    wt = wt[:, :H]  # one partition for both heads: same hidden width here
    return fkd.vocab_parallel_fused_linear_divergence(hs, ws, hs, wt, "js", labels=labels, **kw)


FORMS = {"dense": _dense, "sparse": _sparse, "logprobs": _logprobs,
         "vocab_parallel": _vocab_parallel}
REDUCING = ("dense", "sparse", "vocab_parallel")


# Each form on the cpu and torch backends (the vocabulary-parallel form at one rank is the dense
# form: torch only); the Triton interpreter is slow, so Triton runs the row-count edge cases only.
CASES = [(f, b) for f in FORMS for b in BACKENDS
         if b != "triton" and (f != "vocab_parallel" or b == "torch")]
EDGE_CASES = CASES + [(f, "triton") for f in ("dense", "sparse", "logprobs") if "triton" in BACKENDS]


def _form(request, monkeypatch):
    name, backend = request.param
    monkeypatch.setenv("FDIV_BACKEND", backend)  # what backend="auto" resolves to
    return name


@pytest.fixture(params=CASES, ids=[f"{f}-{b}" for f, b in CASES])
def form(request, monkeypatch):
    """A form, on one backend."""
    return _form(request, monkeypatch)


@pytest.fixture(params=EDGE_CASES, ids=[f"{f}-{b}" for f, b in EDGE_CASES])
def edge_form(request, monkeypatch):
    """A form, on one backend, Triton included."""
    return _form(request, monkeypatch)


def _run(form, inputs, backward=True, **kw):
    hs, ws, *rest = inputs
    hs, ws = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    out = FORMS[form](hs, ws, *rest, **kw)
    if backward and torch.is_grad_enabled():
        out.sum().backward()
    return out.detach(), hs.grad, ws.grad


def test_zero_rows(edge_form):
    """A zero-row batch runs: an empty (or zero) result and zero-size / zero gradients."""
    form = edge_form
    out, gh, gw = _run(form, _inputs(n=0))
    assert out.numel() == 0 or float(out) == 0.0
    assert gh is not None and gh.shape == (0, H)
    assert gw is not None and torch.all(gw == 0)
    if form in REDUCING:
        out, gh, _ = _run(form, _inputs(n=0), reduction="none")
        assert out.shape == (0,) and gh.shape == (0, H)


def test_all_rows_masked(edge_form):
    """Every row ignored: a zero loss that stays in the graph, zero (not None) gradients."""
    form = edge_form
    inputs = list(_inputs())
    inputs[4] = torch.full((N,), -100)
    out, gh, gw = _run(form, inputs)
    if form == "logprobs":  # the entropy does not depend on the labels: only the log-probs vanish
        lp = fk.fused_linear_token_logprobs(inputs[0], inputs[1], inputs[4])
        assert torch.all(lp == 0)
        return
    assert float(out) == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_label_dtypes(form, dtype):
    """int32 and narrower labels give what int64 labels give (uint8 cannot hold -100: V < 256
    ids only, no ignored rows)."""
    inputs = list(_inputs())
    if dtype != torch.uint8:
        inputs[4][::4] = -100
    ref = _run(form, inputs)
    if dtype == torch.uint8:
        with pytest.raises(TypeError, match="labels"):
            _run(form, inputs[:4] + [inputs[4].to(dtype)] + inputs[5:])
        return
    got = _run(form, inputs[:4] + [inputs[4].to(dtype)] + inputs[5:])
    for a, b, what in zip(got, ref, ("loss", "grad h", "grad W")):
        assert_close(a, b, TOL, what)


def test_num_items_number_or_tensor(form):
    if form not in REDUCING:
        pytest.skip("token log-probs have no reduction")
    inputs = list(_inputs())
    inputs[4][::3] = -100
    a = _run(form, inputs, num_items_in_batch=7)
    b = _run(form, inputs, num_items_in_batch=torch.tensor(7))
    s = _run(form, inputs, reduction="sum")
    for x, y, what in zip(a, b, ("loss", "grad h", "grad W")):
        assert_close(x, y, TOL, what)
    assert_close(a[0], s[0] / 7, TOL, "mean over num_items_in_batch = sum / 7")


@pytest.mark.parametrize("chunk_size", [1, 4, N, 10 * N])
def test_chunk_sizes(form, chunk_size):
    """The chunking changes nothing but the rounding of the weight gradient's sum."""
    inputs = list(_inputs())
    inputs[4][1::5] = -100
    ref = _run(form, inputs)
    got = _run(form, inputs, chunk_size=chunk_size)
    for a, b, what in zip(got, ref, ("loss", "grad h", "grad W")):
        assert_close(a, b, TOL, what)


def test_no_grad(form):
    inputs = _inputs()
    ref = _run(form, inputs, backward=False)[0]
    with torch.no_grad():
        out, gh, gw = _run(form, inputs)
    assert_close(out, ref, TOL, "loss under no_grad")
    assert gh is None and gw is None and not out.requires_grad


def test_autocast_keeps_fp32_logits(form):
    """Under CPU bf16 autocast the chunk GEMMs still run in fp32 (the fp32-logits contract)."""
    inputs = _inputs()
    ref = _run(form, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(form, inputs)
    for a, b, what in zip(got, ref, ("loss", "grad h", "grad W")):
        assert_close(a, b, TOL, what)


@pytest.mark.parametrize("kw, exc, match", [
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"chunk_size": True}, ValueError, "chunk_size"),
    ({"num_items_in_batch": -1}, ValueError, "num_items_in_batch"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"backend": "gpu"}, ValueError, "backend"),
])
def test_bad_arguments(form, kw, exc, match):
    if form == "logprobs" and ("num_items_in_batch" in kw or "reduction" in kw):
        pytest.skip("not an argument of token log-probs")
    with pytest.raises(exc, match=match):
        _run(form, _inputs(), **kw)


def test_bad_labels(form):
    inputs = list(_inputs())
    with pytest.raises(ValueError, match="labels"):
        _run(form, inputs[:4] + [inputs[4][:-1]] + inputs[5:])  # wrong length
    with pytest.raises(TypeError, match="labels"):
        _run(form, inputs[:4] + [inputs[4].float()] + inputs[5:])


def test_bad_weight(form):
    hs, ws, *rest = _inputs()
    with pytest.raises(ValueError, match="weight"):
        FORMS[form](hs, ws[:, :-1], *rest)
    with pytest.raises(TypeError, match="weight"):
        FORMS[form](hs, ws.long(), *rest)
