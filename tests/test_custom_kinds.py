"""fk.register_divergence: f-divergences from a generator, against the float64 reference written
from sum q f(p / q), equal to the built-in kinds they restate; dispatch reasons of the backends
that cannot run them; validation."""

import math

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL
from helpers import assert_close, grad_tol
from reference import divergence_with_grads, logits

import fdiv_kernels as fk
from fdiv_kernels import phases


def pearson(t):
    return (t - 1) ** 2


def neyman(t):
    return (t - 1) ** 2 / t


def kl_gen(t):
    return torch.xlogy(t, t)


GENERATORS = {
    "my_pearson": (pearson, lambda t: 2 * (t - 1)),
    "my_neyman": (neyman, lambda t: 1 - 1 / t**2),
    "my_kl": (kl_gen, lambda t: torch.log(t) + 1),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name, (f, fp) in GENERATORS.items():
        fk.register_divergence(name, f, fp)
    yield
    for name in GENERATORS:
        fk.unregister_divergence(name)


def _run(kind, s, t, backend="torch", **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    return fk.divergence(s, t, kind, backend=backend, **kw), s, t


@pytest.mark.parametrize("name", list(GENERATORS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(name, dtype):
    s, t = logits((3, 2, 37), dtype, seed=1), logits((3, 2, 37), dtype, seed=2)
    loss, s_, t_ = _run(name, s, t, temperature=1.4, reduction="none")
    loss.sum().backward()
    ref, gs, gt = divergence_with_grads(s, t, name, GENERATORS[name][0], temperature=1.4)
    assert_close(loss, ref, LOSS_TOL[dtype], "loss")
    assert_close(s_.grad, gs, grad_tol(GRAD_TOL[dtype], gs), "student grad")
    assert_close(t_.grad, gt, grad_tol(GRAD_TOL[dtype], gt), "teacher grad")


@pytest.mark.parametrize("name,builtin", [("my_pearson", "chi2"), ("my_kl", "kl")])
def test_equals_the_builtin_kind(name, builtin):
    """Pearson chi^2 and KL defined by their generators are the built-in kinds."""
    s, t = logits((4, 50), seed=3), logits((4, 50), seed=4)
    s[:, 7] = t[:, 7] = -math.inf  # padded vocabulary entry
    got, gs, gt = _run(name, s, t, reduction="none")
    want, ws, wt = _run(builtin, s, t, reduction="none")
    (got.sum() + want.sum()).backward()
    assert_close(got, want, (1e-5, 1e-6), "loss")
    assert_close(gs.grad, ws.grad, (1e-5, 1e-7), "student grad")
    assert_close(gt.grad, wt.grad, (1e-5, 1e-7), "teacher grad")


def test_zero_probabilities_take_their_limits():
    s, t = logits((3, 20), seed=5), logits((3, 20), seed=6)
    s[0, 3] = -math.inf  # q = 0 < p: pearson and KL +inf, neyman p f'(inf) = p (finite)
    t[1, 4] = -math.inf  # p = 0 < q: pearson finite, neyman +inf (f(0) = inf), KL finite
    kw = dict(reduction="none")
    p = fk.divergence(s, t, "my_pearson", **kw)
    n = fk.divergence(s, t, "my_neyman", **kw)
    k = fk.divergence(s, t, "my_kl", **kw)
    assert p[0] == math.inf and k[0] == math.inf and torch.isfinite(n[0])
    assert torch.isfinite(p[1]) and n[1] == math.inf and torch.isfinite(k[1])
    assert_close(k[1:], fk.divergence(s, t, "kl", **kw)[1:], (1e-5, 1e-6), "KL with p = 0")
    assert not torch.isnan(torch.stack([p, n, k])).any()


def test_ignored_rows_and_gradcheck():
    s, t = logits((4, 30), seed=7), logits((4, 30), seed=8)
    labels = torch.tensor([0, -100, 2, -100])
    loss, s_, _ = _run("my_neyman", s, t, labels=labels, reduction="sum")
    loss.backward()
    ref, gs, _ = divergence_with_grads(s, t, "my_neyman", neyman)
    keep = labels != -100
    assert_close(loss, ref[keep].sum(), LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad, gs * keep[:, None], GRAD_TOL[torch.float32], "grad")
    s64 = logits((2, 6), torch.float64, seed=9).requires_grad_(True)
    t64 = logits((2, 6), torch.float64, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: fk.divergence(a, b, "my_neyman", backend="torch", reduction="none",
                                   inplace_backward=False), (s64, t64))


def test_dispatch_reasons_and_auto():
    s, t = logits((2, 30), seed=11), logits((2, 30), seed=12)
    auto = fk.divergence(s, t, "my_pearson", reduction="none")
    assert_close(auto, fk.divergence(s, t, "my_pearson", backend="torch", reduction="none"),
                 (0, 0), "auto picks a backend that runs custom kinds")
    for backend in ("cpu", "cuda", "triton"):
        with pytest.raises(fk.BackendUnavailableError) as e:
            fk.divergence(s, t, "my_pearson", backend=backend)
        assert backend in str(e.value)
    if "cpu" in fk.dispatch.BACKENDS and fk.dispatch.load_error("fdiv_kernels._C") is None:
        with pytest.raises(fk.BackendUnavailableError, match="custom kind"):
            fk.divergence(s, t, "my_pearson", backend="cpu")


def test_every_op_with_kind_takes_it():
    """fused_linear_divergence, the sparse ops and the phase ops run custom kinds (torch
    backend, chosen by auto) and agree with chi2 for the Pearson generator."""
    hs, ws = logits((3, 8), seed=13), logits((25, 8), seed=14)
    ht, wt = logits((3, 8), seed=15), logits((25, 8), seed=16)
    got = fk.fused_linear_divergence(hs, ws, ht, wt, kind="my_pearson", reduction="none")
    want = fk.fused_linear_divergence(hs, ws, ht, wt, kind="chi2", reduction="none")
    assert_close(got, want, (1e-5, 1e-6), "fused linear")
    s = logits((3, 25), seed=17)
    ids = torch.stack([torch.randperm(25, generator=torch.Generator().manual_seed(i))[:5]
                       for i in range(3)])
    lp = torch.log_softmax(logits((3, 5), seed=18), -1) + math.log(0.9)
    got = fk.sparse_divergence(s, ids, lp, kind="my_pearson", reduction="none")
    want = fk.sparse_divergence(s, ids, lp, kind="chi2", reduction="none")
    assert_close(got, want, (1e-5, 1e-6), "sparse")
    got = fk.fused_linear_sparse_divergence(hs, ws, ids, lp, kind="my_pearson", reduction="none")
    want = fk.fused_linear_sparse_divergence(hs, ws, ids, lp, kind="chi2", reduction="none")
    assert_close(got, want, (1e-5, 1e-6), "fused linear sparse")
    lse_s, lse_t = s.logsumexp(-1), s.flip(0).logsumexp(-1)
    got = phases.partials(s, s.flip(0), lse_s, lse_t, "my_pearson")
    want = phases.partials(s, s.flip(0), lse_s, lse_t, "chi2")
    assert_close(got, want, (1e-5, 1e-6), "phases")
    fk.nn.FDivergenceLoss("my_pearson")  # the module validates it at construction


def test_validation():
    def sq(t):
        return (t - 1) ** 2

    def dsq(t):
        return 2 * (t - 1)

    with pytest.raises(ValueError, match="built-in"):
        fk.register_divergence("chi2", sq, dsq)
    with pytest.raises(ValueError, match="built-in"):
        fk.register_divergence("renyi", sq, dsq)
    with pytest.raises(ValueError, match="already registered"):
        fk.register_divergence("my_pearson", sq, dsq)
    with pytest.raises(ValueError, match=r"f\(1\) must be 0"):
        fk.register_divergence("bad_f1", lambda t: t**2, lambda t: 2 * t)
    with pytest.raises(ValueError, match="not the derivative"):
        fk.register_divergence("bad_fp", sq, lambda t: t - 1)
    with pytest.raises(TypeError, match="f_prime must be callable"):
        fk.register_divergence("bad_type", sq, 3.0)
    with pytest.raises(TypeError, match="must return a tensor"):
        fk.register_divergence("bad_ret", lambda t: 0.0, dsq)
    with pytest.raises(ValueError, match="name must be"):
        fk.register_divergence("not a name", sq, dsq)
    with pytest.raises(NotImplementedError, match="Triton"):
        fk.register_divergence("with_triton", sq, dsq, triton_f=object())
    assert "bad_f1" not in fk._kinds.all_kinds() and "with_triton" not in fk._kinds.all_kinds()
    with pytest.raises(ValueError, match="kind must be one of"):
        fk.divergence(logits((1, 3), seed=1), logits((1, 3), seed=2), "bad_f1")
