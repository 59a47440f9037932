"""logsumexp / token_logprobs / entropy / softmax_stats against float64 references."""

import math

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL, STATS_BACKENDS
from helpers import assert_close, available_backends, backend_cfg_fixture
from reference import logits, softmax_stats_rows

import fdiv_kernels as fk

BACKENDS = STATS_BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that implements the softmax statistics op here."""
    return request.param


backend_cfg = backend_cfg_fixture(BACKENDS, "fdiv_kernels.triton_kernels.softmax_stats")
SHAPES = [(1, 1), (3, 17), (2, 300), (2, 3, 129)]  # V=1; one block + tail; multi-block; 3-D


def _grad(x, out_fn):
    x = x.detach().clone().requires_grad_(True)
    out = out_fn(x)
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.to(torch.float64) * w).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_stats_matches_reference(dtype, shape, backend_cfg):
    x = logits(shape, dtype, seed=31)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    labels.view(-1)[0] = -100
    ref = softmax_stats_rows(x, labels, temperature=0.8)
    got = fk.softmax_stats(x, labels, temperature=0.8, backend=backend_cfg)
    for name, a, b in zip(("lse", "entropy", "label_logprob"), got, ref):
        assert a.shape == shape[:-1] and a.dtype == torch.float32
        assert_close(a, b, LOSS_TOL[dtype], name)
    for i, name in enumerate(("lse", "entropy", "label_logprob")):
        out, g = _grad(x, lambda t: fk.softmax_stats(t, labels, 0.8, backend=backend_cfg)[i])
        _, g_ref = _grad(x, lambda t: softmax_stats_rows(t, labels, 0.8)[i])
        assert g.dtype == dtype
        assert_close(g, g_ref, GRAD_TOL[dtype], f"d {name}")


@pytest.mark.parametrize("dim,keepdim", [(-1, False), (-1, True), (0, False), (1, True),
                                         ((0, 2), False), ((2, 0), True), ([1], False)])
def test_logsumexp_like_torch(dim, keepdim, backend):
    x = logits((4, 5, 33), seed=32)
    out, g = _grad(x, lambda t: fk.logsumexp(t, dim, keepdim, backend=backend))
    ref, g_ref = _grad(x.double(), lambda t: torch.logsumexp(t, dim, keepdim))
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert_close(out, ref, LOSS_TOL[torch.float32], "lse")
    assert_close(g, g_ref, GRAD_TOL[torch.float32], "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logsumexp_infinities_and_dtype(dtype, backend):
    x = logits((4, 40), dtype, seed=33)
    x[0] = -math.inf          # all -inf -> -inf
    x[1, 3] = math.inf        # any +inf -> +inf
    x[2, ::2] = -math.inf     # some -inf -> ignored
    out = fk.logsumexp(x, backend=backend)
    ref = torch.logsumexp(x.double(), -1)
    assert out.dtype == dtype
    assert out[0] == -math.inf and out[1] == math.inf
    assert_close(out[2:], ref[2:], (1e-2, 1e-2) if dtype != torch.float32 else (1e-6, 1e-6), "lse")


def test_logsumexp_edge_shapes(backend):
    x = logits((3, 1), seed=34)
    assert torch.equal(fk.logsumexp(x, backend=backend), x[:, 0])
    assert_close(fk.logsumexp(logits((7,), seed=35), backend=backend),
                 torch.logsumexp(logits((7,), seed=35).double(), 0), (1e-6, 1e-6), "1-D")
    empty_dim = torch.empty(3, 0)
    assert torch.equal(fk.logsumexp(empty_dim), torch.logsumexp(empty_dim, -1))
    assert fk.logsumexp(torch.empty(0, 5)).shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_token_logprobs_and_ignored_rows(temperature, backend):
    x = logits((6, 257), seed=36, scale=4.0)
    labels = torch.tensor([0, 256, -100, 17, -100, 100])
    out, g = _grad(x, lambda t: fk.token_logprobs(t, labels, temperature, backend=backend))
    ref, g_ref = _grad(x, lambda t: softmax_stats_rows(t, labels, temperature)[2])
    assert_close(out, ref, LOSS_TOL[torch.float32], "logprob")
    assert_close(g, g_ref, GRAD_TOL[torch.float32], "grad")
    ignored = labels == -100
    assert torch.all(out[ignored] == 0) and torch.all(g[ignored] == 0)


def test_entropy_properties(backend):
    v = 64
    uniform = torch.full((2, v), 3.25)
    assert_close(fk.entropy(uniform, backend=backend), torch.full((2,), math.log(v)),
                 (1e-6, 1e-6), "uniform")
    x = logits((3, v), seed=37)
    x[:, :10] = -math.inf  # masked entries contribute nothing
    out, g = _grad(x, lambda t: fk.entropy(t, 1.5, backend=backend))
    ref, g_ref = _grad(x[:, 10:], lambda t: softmax_stats_rows(t, None, 1.5)[1])
    assert_close(out, ref, LOSS_TOL[torch.float32], "entropy")
    assert_close(g[:, 10:], g_ref, GRAD_TOL[torch.float32], "grad")
    assert torch.all(g[:, :10] == 0)
    shifted = fk.entropy(x + 1000.0, 1.5, backend=backend)  # shift invariance, no cancellation
    assert_close(shifted, out, (1e-5, 1e-5), "shifted")


def test_nan_propagates(backend):
    x = logits((2, 50), seed=38)
    x[1, 3] = math.nan
    st = fk.softmax_stats(x, torch.tensor([1, 2]), backend=backend)
    assert torch.isfinite(st.lse[0]) and torch.isnan(st.lse[1]) and torch.isnan(st.entropy[1])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fk.token_logprobs(logits((2, 5), seed=0), torch.tensor([0, 5])), ValueError,
         r"labels must be in \[0, 5\)"),
        (lambda: fk.token_logprobs(logits((2, 5), seed=0), torch.tensor([0, -1])), ValueError,
         "labels must be in"),
        (lambda: fk.token_logprobs(logits((2, 5), seed=0), torch.tensor([0.0, 1.0])), TypeError,
         "integer tensor"),
        (lambda: fk.token_logprobs(logits((2, 5), seed=0), torch.tensor([0, 1, 2])), ValueError,
         "leading shape"),
        (lambda: fk.token_logprobs(logits((2, 5), seed=0), None), TypeError, "labels"),
        (lambda: fk.entropy(torch.ones(2, 3, dtype=torch.long)), TypeError, "floating point"),
        (lambda: fk.entropy(logits((2, 5), seed=0), temperature=0), ValueError, "temperature"),
        (lambda: fk.entropy(torch.empty(5, 0)), ValueError, r"non-empty last dim \(V >= 1\)"),
        (lambda: fk.entropy(logits((2, 5), seed=0), temperature=1e-39), ValueError,
         r"temperature must be in \[2.939e-39, inf\)"),
        (lambda: fk.logsumexp(logits((2, 5), seed=0), 2), ValueError, "out of range"),
        (lambda: fk.logsumexp(logits((2, 5), seed=0), "x"), TypeError, "dim must be"),
        (lambda: fk.logsumexp(torch.ones(2, dtype=torch.long)), TypeError, "floating point"),
        (lambda: fk.logsumexp([1.0, 2.0]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


F64 = available_backends("softmax_stats_fwd", torch.float64)


@pytest.mark.parametrize("backend", F64)
def test_gradcheck_float64(backend):
    x = logits((3, 9), torch.float64, seed=39).requires_grad_(True)
    labels = torch.tensor([2, -100, 8])

    def f(x):
        st = fk.softmax_stats(x, labels, 1.7, backend=backend)
        return st.lse, st.entropy, st.label_logprob

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x, labels):
        return fk.token_logprobs(x, labels, 2.0, backend=backend).sum() + fk.logsumexp(
            x, backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = logits((4, 64), seed=41)
    labels = torch.tensor([1, -100, 3, 63])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    compiled(x1, labels).backward()
    f(x2, labels).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
