"""fk.topk_logprobs and fk.fused_linear_topk_logprobs (the teacher's side of top-k distillation)
against the float64 reference (reference.topk_logprobs_rows), on every backend; their outputs
fed to fk.sparse_divergence as they are."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import available_backends, backend_cfg_fixture
from reference import logits, topk_logprobs_rows

import fdiv_kernels as fk

BACKENDS = available_backends("topk_logprobs_fwd")
backend_cfg = backend_cfg_fixture(BACKENDS, "fdiv_kernels.triton_kernels.topk_logprobs")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernels compute in fp32 from the rounded inputs: log-probs to a few fp32 ulps of |a|.
TOL = dict(rtol=1e-5, atol=2e-5)

# (shape, k), each a regime: V = 1; k = V; odd V over several blocks (the Triton small-block
# fixture makes it 5 blocks of 64, the running top-k merged and blocks skipped); leading dims.
SHAPES = [((3, 1), 1), ((2, 7), 7), ((2, 301), 6), ((2, 2, 133), 5)]


def _check(out, x, k, *, exact_ids=False, **kw):
    """out against the reference on x (as given, in float64): log-probs, and the ids consistent
    with them (the reference's log-prob at each returned id; distinct), or equal to the
    reference's ids."""
    ids, lp, _ = topk_logprobs_rows(x.double(), k, **kw)
    assert out.ids.shape == out.logprobs.shape == (*x.shape[:-1], k)
    torch.testing.assert_close(out.logprobs.double(), lp, **TOL)
    at_ids = torch.log_softmax(_a(x, **kw), -1).gather(-1, out.ids.long())
    torch.testing.assert_close(out.logprobs.double(), at_ids, **TOL)
    assert (out.ids.long().sort(-1).values.diff(dim=-1) > 0).all(), "ids repeat within a row"
    if exact_ids:
        torch.testing.assert_close(out.ids.long(), ids)


def _a(x, temperature=1.0, scale=1.0, softcap=None, top_p=None):
    z = x.double() * scale
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    return z / temperature


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", SHAPES)
def test_matches_reference(backend_cfg, dtype, shape, k):
    x = logits(shape, dtype, seed=1)
    out = fk.topk_logprobs(x, k, backend=backend_cfg)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float32
    assert out.support_mask is None
    # Random fp32 logits have no ties: the ids are the reference's exactly.
    _check(out, x, k, exact_ids=dtype == torch.float32)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(scale=0.5, temperature=2.0),
                                dict(softcap=3.0), dict(scale=2.0, softcap=30.0, temperature=0.5)])
def test_transforms_and_temperature(backend_cfg, kw):
    x = logits((2, 203), seed=2, scale=4.0)
    out = fk.topk_logprobs(x, 5, temperature=kw.get("temperature", 1.0),
                           logit_scale=kw.get("scale"), softcap=kw.get("softcap"),
                           backend=backend_cfg)
    _check(out, x, 5, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lower_id(backend_cfg, dtype):
    """Integer logits in a small range: most values tie; every backend gives the reference's
    ids (a stable sort: equal values by increasing id), the same on every call."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 3, (2, 150), generator=g).to(dtype)
    out = fk.topk_logprobs(x, 12, backend=backend_cfg)
    _check(out, x, 12, exact_ids=True)
    again = fk.topk_logprobs(x, 12, backend=backend_cfg)
    assert torch.equal(out.ids, again.ids) and torch.equal(out.logprobs, again.logprobs)


def test_neg_inf_logits(backend_cfg):
    """-inf logits: fewer finite entries than k gives -inf log-probs at the lowest -inf ids; a
    row of only -inf has no distribution: ids 0..k-1, log-probs -inf; with top_p both are masked
    (id -1, log-prob -inf)."""
    x = logits((3, 70), seed=4)
    x[0, ::3] = float("-inf")
    x[1, 2:] = float("-inf")  # two finite entries, k = 5
    x[2] = float("-inf")
    out = fk.topk_logprobs(x, 5, backend=backend_cfg)
    _check(fk.topk_logprobs(x[:1], 5, backend=backend_cfg), x[:1], 5, exact_ids=True)
    lp1 = torch.log_softmax(x[1, :2].double(), -1).sort(descending=True)
    torch.testing.assert_close(out.logprobs[1, :2].double(), lp1.values, **TOL)
    assert out.ids[1].tolist() == [lp1.indices[0].item(), lp1.indices[1].item(), 2, 3, 4]
    assert (out.logprobs[1, 2:] == -math.inf).all()
    assert out.ids[2].tolist() == [0, 1, 2, 3, 4] and (out.logprobs[2] == -math.inf).all()
    masked = fk.topk_logprobs(x, 5, top_p=1.0, backend=backend_cfg)
    assert masked.support_mask.tolist() == [[True] * 5, [True, True, False, False, False],
                                             [False] * 5]
    assert (masked.ids[~masked.support_mask] == -1).all()
    assert (masked.logprobs[~masked.support_mask] == -math.inf).all()


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 1e-6])
def test_top_p(backend_cfg, top_p):
    x = logits((3, 97), seed=5, scale=3.0)
    out = fk.topk_logprobs(x, 8, top_p=top_p, backend=backend_cfg)
    ids, lp, keep = topk_logprobs_rows(x.double(), 8, top_p=top_p)
    assert torch.equal(out.support_mask, keep)
    assert out.support_mask[:, 0].all()  # the first entry always stays
    if top_p == 1e-6:
        assert not out.support_mask[:, 1:].any()
    if top_p == 1.0:
        assert out.support_mask.all()
    torch.testing.assert_close(out.ids.long(), torch.where(keep, ids, -1))
    torch.testing.assert_close(out.logprobs.double(), torch.where(keep, lp, -math.inf), **TOL)
    # The kept prefix is the smallest that reaches top_p: without its last entry it falls short.
    p = lp.exp() * keep
    n_kept = keep.sum(-1)
    short = p.sum(-1) - p.gather(-1, (n_kept - 1)[:, None]).squeeze(-1)
    assert (short < top_p).all()
    assert ((p.sum(-1) >= top_p) | (n_kept == 8)).all()


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lp_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtypes(ids_dtype, lp_dtype):
    x = logits((3, 50), seed=6)
    ref = fk.topk_logprobs(x, 8)
    out = fk.topk_logprobs(x, 8, ids_dtype=ids_dtype, logprobs_dtype=lp_dtype)
    assert out.ids.dtype == ids_dtype and out.logprobs.dtype == lp_dtype
    assert torch.equal(out.ids.long(), ref.ids.long())
    assert torch.equal(out.logprobs, ref.logprobs.to(lp_dtype))  # rounded once, at the end


def test_top_p_masks_what_the_store_rounds_to_zero(backend_cfg):
    """An entry whose log-prob is below fp16's range is -inf once stored in fp16: masked like any
    entry of zero probability (id -1), so the mask and TRL's logprobs > -inf agree."""
    x = torch.tensor([[0.0, -70000.0, -1.0, -2.0]])
    out = fk.topk_logprobs(x, 4, top_p=1.0, logprobs_dtype=torch.float16, backend=backend_cfg)
    assert torch.equal(out.support_mask, out.logprobs > float("-inf"))
    assert out.support_mask.tolist() == [[True, True, True, False]]
    assert out.ids.tolist() == [[0, 2, 3, -1]]
    wide = fk.topk_logprobs(x, 4, top_p=1.0, backend=backend_cfg)  # fp32 keeps it
    assert wide.support_mask.all()


def test_vocab_parallel_checks_k_as_the_op_does():
    """vocab_parallel_topk_logprobs (one process, no group) takes what fk.topk_logprobs takes
    for k (a numpy integer) and raises the same error types (a float: TypeError)."""
    import numpy as np

    import fdiv_kernels.distributed as fkd

    x = logits((3, 50), seed=9)
    ref = fk.topk_logprobs(x, 4)
    out = fkd.vocab_parallel_topk_logprobs(x, np.int64(4))
    assert torch.equal(out.ids, ref.ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)
    for bad, err in ((2.0, TypeError), (True, TypeError), (0, ValueError), (51, ValueError)):
        for op in (fk.topk_logprobs, fkd.vocab_parallel_topk_logprobs):
            with pytest.raises(err, match="k"):
                op(x, bad)


def test_float64_logits_compute_in_float64():
    x = logits((3, 50), torch.float64, seed=7)
    out = fk.topk_logprobs(x, 8, backend="cpu" if "cpu" in BACKENDS else "torch")
    assert out.logprobs.dtype == torch.float64
    _, lp, _ = topk_logprobs_rows(x, 8)
    torch.testing.assert_close(out.logprobs, lp, rtol=1e-12, atol=1e-12)


def test_zero_rows(backend_cfg):
    for shape in [(0, 9), (2, 0, 9)]:
        out = fk.topk_logprobs(torch.randn(shape), 4, top_p=0.5, backend=backend_cfg)
        assert out.ids.shape == out.logprobs.shape == out.support_mask.shape == (*shape[:-1], 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be in"), (dict(k=51), "k must be in"), (dict(k=True), "k must be"),
    (dict(k=3, ids_dtype=torch.int16), "ids_dtype"),
    (dict(k=3, logprobs_dtype=torch.int32), "logprobs_dtype"),
    (dict(k=3, temperature=float("nan")), "temperature"),
    (dict(k=3, temperature=float("inf")), "temperature"),
    (dict(k=3, temperature=0.0), "temperature"),
    (dict(k=3, top_p=0.0), "top_p"), (dict(k=3, top_p=1.5), "top_p"),
    (dict(k=3, top_p=float("nan")), "top_p"),
    (dict(k=3, softcap=0.0), "softcap"), (dict(k=3, logit_scale=-1.0), "logit_scale"),
    (dict(k=3, backend="nope"), "backend"),
])
def test_bad_arguments(kwargs, match):
    x = logits((2, 50), seed=8)
    err = TypeError if kwargs.get("k") is True else ValueError
    with pytest.raises(err, match=match):
        fk.topk_logprobs(x, **kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        fk.topk_logprobs(torch.zeros(2, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="logits"):
        fk.topk_logprobs(torch.zeros(2, 0), 1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    x = logits((3, 11), torch.float64, seed=9).requires_grad_(True)

    def f(x):
        return fk.topk_logprobs(x, 4, temperature=0.7, softcap=5.0, backend=backend).logprobs

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradient_against_reference(backend_cfg):
    """fp32 gradient with a top_p mask (masked entries send none) against float64 autograd."""
    x = logits((2, 150), seed=10, scale=3.0)
    w = logits((2, 6), seed=11)
    xs = x.clone().requires_grad_(True)
    out = fk.topk_logprobs(xs, 6, temperature=0.8, softcap=4.0, top_p=0.8, backend=backend_cfg)
    (torch.where(out.support_mask, out.logprobs * w, 0.0)).sum().backward()
    xr = x.double().requires_grad_(True)
    lp = torch.log_softmax(_a(xr, temperature=0.8, softcap=4.0), -1).gather(-1, out.ids.long()
                                                                            .clamp(min=0))
    (torch.where(out.support_mask, lp * w.double(), 0.0)).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_saves_nothing():
    x = logits((2, 30), seed=12).requires_grad_(True)
    with torch.no_grad():
        out = fk.topk_logprobs(x, 3)
    assert not out.logprobs.requires_grad


@pytest.mark.parametrize("backend", available_backends("sparse_divergence_fwd"))
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "none"])
def test_sparse_divergence_takes_the_outputs_as_they_are(tail, backend):
    """int32 ids, fp16 log-probs and the top_p mask go straight into fk.sparse_divergence (the
    cpu and triton kernels read them in those dtypes): the same loss (and student gradient) as
    with int64 / fp32 copies."""
    teacher = logits((2, 3, 120), seed=13, scale=3.0)
    out = fk.topk_logprobs(teacher, 16, top_p=0.95, temperature=2.0,
                           logprobs_dtype=torch.float16)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float16
    student = logits((2, 3, 120), seed=14)
    labels = torch.tensor([[1, -100, 3], [4, 5, -100]])
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    loss = fk.sparse_divergence(s1, out.ids, out.logprobs, "kl", tail=tail, backend=backend,
                                support_mask=out.support_mask, labels=labels, temperature=2.0)
    ref = fk.sparse_divergence(s2, out.ids.long(), out.logprobs.float(), "kl", tail=tail,
                               support_mask=out.support_mask.clone(), labels=labels,
                               temperature=2.0, backend=backend)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_compile_fullgraph():
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    torch._dynamo.reset()

    def f(x):
        out = fk.topk_logprobs(x, 5, top_p=0.9, logprobs_dtype=torch.float16, backend=backend)
        return out.ids, out.logprobs, out.support_mask

    x = logits((4, 64), seed=15)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(got, f(x)):
        assert torch.equal(a, b)


# ---- fk.fused_linear_topk_logprobs ------------------------------------------------------------


FUSED_CASES = [(b, dt, kw) for b in BACKENDS if b != "triton" for dt in DTYPES
               for kw in (dict(), dict(temperature=0.5, softcap=3.0, top_p=0.9),
                          dict(logit_scale=0.25, top_p=1e-6))]
# Triton (the interpreter, slow): one case with every feature.
FUSED_CASES += [("triton", torch.bfloat16, dict(temperature=0.5, softcap=3.0, top_p=0.9))
                ] if "triton" in BACKENDS else []


@pytest.mark.parametrize("backend,dtype,kw", FUSED_CASES)
def test_fused_equals_topk_of_the_logits(backend, dtype, kw):
    """Two row chunks and vocabulary tiles of odd sizes (and tiles narrower than k) against
    fk.topk_logprobs on the fp32 logits hidden @ weight.T + bias."""
    h = logits((2, 3, 16), dtype, seed=16, scale=1.0)
    w = logits((301, 16), dtype, seed=17, scale=1.0)
    b = logits((301,), dtype, seed=18)
    out = fk.fused_linear_topk_logprobs(h, w, 12, bias=b, chunk_size=4, vocab_chunk_size=100,
                                        backend=backend, **kw)
    z = h.float() @ w.float().T + b.float()
    ref = fk.topk_logprobs(z, 12, backend="torch", **kw)
    assert torch.equal(out.ids, ref.ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    if ref.support_mask is not None:
        assert torch.equal(out.support_mask, ref.support_mask)
    if backend != "triton":
        # A tile narrower than k: the running top-k fills over several tiles.
        small = fk.fused_linear_topk_logprobs(h, w, 12, bias=b, vocab_chunk_size=7,
                                              backend=backend, **kw)
        assert torch.equal(small.ids, ref.ids)


def test_fused_ties_and_defaults():
    """Tied logits across tiles still go to the lower id; the default chunking agrees."""
    h = torch.ones(3, 4)
    w = torch.randint(-2, 2, (257, 4)).float()
    out = fk.fused_linear_topk_logprobs(h, w, 30, vocab_chunk_size=50)
    ref = topk_logprobs_rows((h @ w.T).double(), 30)
    assert torch.equal(out.ids.long(), ref[0])
    assert torch.equal(fk.fused_linear_topk_logprobs(h, w, 30).ids, out.ids)


def test_fused_mixed_float64_operands_compute_in_float64():
    """float64 hidden states with an fp32 head: the float64 product (the result is float64, so
    its digits must be), not the fp32 GEMM's; a bad vocab_chunk_size is named as such."""
    h = logits((4, 16), torch.float64, seed=21)
    w = logits((100, 16), seed=22)
    with torch.no_grad():
        out = fk.fused_linear_topk_logprobs(h, w, 5, backend="torch")
    _, lp, _ = topk_logprobs_rows(h @ w.double().T, 5)
    assert out.logprobs.dtype == torch.float64
    torch.testing.assert_close(out.logprobs, lp, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fk.fused_linear_topk_logprobs(h, w, 3, vocab_chunk_size=0)


def test_fused_is_forward_only():
    h = logits((3, 8), seed=19).requires_grad_(True)
    w = logits((40, 8), seed=20)
    with pytest.raises(RuntimeError, match="forward-only"):
        fk.fused_linear_topk_logprobs(h, w, 4)
    with torch.no_grad():
        out = fk.fused_linear_topk_logprobs(h, w, 4)
    assert out.ids.shape == (3, 4)
    with pytest.raises(ValueError, match="k must be in"):
        fk.fused_linear_topk_logprobs(h.detach(), w, 41)


def test_bench_interleaved_runner():
    """python -m fdiv_kernels.bench.topk_logprobs: every provider gets a fastest round, a median
    ratio to the op it is compared with (1 for ours) and a peak, on a tiny shape."""
    from fdiv_kernels.bench.topk_logprobs import interleaved

    if "cpu" not in BACKENDS:
        pytest.skip("the runner times the C++ backend")
    res = interleaved(n=8, v=300, k=4, h=8, reps=2)
    assert len(res) == 4
    assert res["fk.topk_logprobs"]["ratio"] == res["fk.fused_linear_topk_logprobs"]["ratio"] == 1
    assert all(r["min"] > 0 and r["ratio"] > 0 for r in res.values())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("k", [64, 3000])
def test_rows_longer_than_a_cpu_block(backend, k):
    """V = 9001 spans three of the C++ kernel's 4096-column blocks; k = 3000 fills its 2k
    candidate buffer across block boundaries before the first cut. Sorted-ascending rows make
    every element a new best (the worst case of the running top-k); ties at the threshold too."""
    x = logits((3, 9001), seed=21)
    x[1] = torch.linspace(-5, 5, 9001)
    x[2, ::2] = 1.0  # 4501 ties of the largest value
    out = fk.topk_logprobs(x, k, backend=backend)
    _check(out, x, k, exact_ids=True)


@pytest.mark.skipif("cpu" not in available_backends("sparse_divergence_fwd"),
                    reason="needs the C++ extension")
def test_cpu_kernel_reads_int32_ids_and_fp16_logprobs():
    """The C++ op itself takes the stored dtypes (nothing converts them before it)."""
    student = logits((3, 50), seed=16)
    out = fk.topk_logprobs(logits((3, 50), seed=17), 6, logprobs_dtype=torch.float16)
    empty = torch.empty(0, dtype=torch.bool)
    from fdiv_kernels.core._ids import KL, TAIL_BUCKET

    args = (KL, False, 0.0, 1.0, TAIL_BUCKET, 0.0, 1e-2, 1.0, 0.0, True, True)
    got = torch.ops.fdiv.sparse_divergence_fwd_cpu(student, out.ids, out.logprobs, empty, empty,
                                                   *args)
    want = torch.ops.fdiv.sparse_divergence_fwd_cpu(student, out.ids.long(),
                                                    out.logprobs.double(), empty, empty, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(a.dtype))
