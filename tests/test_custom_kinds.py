"""fk.register_divergence: f-divergences from a generator, against the float64 reference written
from sum q f(p / q), equal to the built-in kinds they restate; dispatch reasons of the backends
that cannot run them; validation."""

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL
from helpers import assert_close, grad_tol
from reference import divergence_with_grads, logits

import fdiv_kernels as fk
from fdiv_kernels.core import _dispatch as dispatch
from fdiv_kernels import phases

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton tests below skip
    triton = None


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
    if "cpu" in dispatch.BACKENDS and dispatch.load_error("fdiv_kernels._C") is None:
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
    assert "bad_f1" not in fk.kinds._registry.all_kinds()
    with pytest.raises(ValueError, match="kind must be one of"):
        fk.divergence(logits((1, 3), seed=1), logits((1, 3), seed=2), "bad_f1")


# ---- custom kinds in the Triton kernels (triton_f / triton_f_prime) -------------------------

needs_triton = pytest.mark.skipif(
    "triton" not in dispatch.BACKENDS, reason="Triton is not installed")

if triton is not None:
    # Module level: @triton.jit reads the source.
    @triton.jit
    def pearson_tl(t):
        return (t - 1.0) * (t - 1.0)

    @triton.jit
    def pearson_prime_tl(t):
        return 2.0 * (t - 1.0)

    @triton.jit
    def neyman_tl(t):
        return (t - 1.0) * (t - 1.0) / t  # f(0) = +inf: 1 / 0

    @triton.jit
    def neyman_prime_tl(t):
        return 1.0 - 1.0 / (t * t)  # f'(inf) = 1

    @triton.jit
    def hellinger_tl(t):
        return 0.5 * (tl.sqrt(t) - 1.0) * (tl.sqrt(t) - 1.0)

    @triton.jit
    def hellinger_prime_tl(t):
        return 0.5 - 0.5 / tl.sqrt(t)


def hellinger(t):
    return 0.5 * (t.sqrt() - 1) ** 2


TRITON_GENERATORS = {
    # name: (torch f, torch f', triton f name, triton f' name, the built-in kind it equals)
    "tl_pearson": (pearson, lambda t: 2 * (t - 1), "pearson_tl", "pearson_prime_tl", "chi2"),
    "tl_neyman": (neyman, lambda t: 1 - 1 / t**2, "neyman_tl", "neyman_prime_tl", None),
    # 0.5 (sqrt t - 1)^2: the built-in squared Hellinger 0.5 sum (sqrt p - sqrt q)^2
    "tl_hellinger": (hellinger, lambda t: 0.5 - 0.5 / t.sqrt(), "hellinger_tl",
                     "hellinger_prime_tl", "hellinger"),
}


@pytest.fixture(scope="module")
def triton_registered():
    if triton is None:
        pytest.skip("Triton is not installed")
    for name, (f, fp, tf, tfp, _) in TRITON_GENERATORS.items():
        fk.register_divergence(name, f, fp, triton_f=globals()[tf],
                               triton_f_prime=globals()[tfp])
    yield
    for name in TRITON_GENERATORS:
        fk.unregister_divergence(name)


@needs_triton
@pytest.mark.parametrize("small_block", [False, True], ids=["one_block", "multi_block"])
@pytest.mark.parametrize("name", ["tl_pearson", "tl_hellinger"])
def test_triton_equals_builtin_and_reference(triton_registered, monkeypatch, name, small_block):
    """On backend="triton": the built-in kind it restates, and the float64 reference; odd V, a
    padded entry, ignored rows, both gradients; multi_block: 32-element blocks (fp32 halves
    MAX_BLOCK), so V = 101 runs the online loop over 4 blocks."""
    if small_block:
        monkeypatch.setattr(importlib.import_module("fdiv_kernels.triton_kernels.divergence"),
                            "MAX_BLOCK", 64)
    builtin = TRITON_GENERATORS[name][4]
    s, t = logits((5, 101), seed=21), logits((5, 101), seed=22)
    s[:, 9] = t[:, 9] = -math.inf  # padded vocabulary entry: p = q = 0 adds nothing
    labels = torch.tensor([0, -100, 3, 4, -100])
    kw = dict(temperature=1.3, labels=labels, reduction="none")
    got, gs, gt = _run(name, s, t, backend="triton", **kw)
    want, ws, wt = _run(builtin, s, t, backend="triton", **kw)
    (got.sum() + want.sum()).backward()
    assert_close(got, want, (1e-5, 1e-6), "loss vs built-in")
    assert_close(gs.grad, ws.grad, (1e-5, 1e-7), "student grad vs built-in")
    assert_close(gt.grad, wt.grad, (1e-5, 1e-7), "teacher grad vs built-in")
    # The reference without the padded column (autograd through sqrt at p = q = 0 is NaN there;
    # the column changes neither the softmax of the others nor the loss).
    keep = (labels != -100).double()
    c = [j for j in range(101) if j != 9]
    ref, rs, rt = divergence_with_grads(s[:, c], t[:, c], name, TRITON_GENERATORS[name][0],
                                        temperature=1.3, weights=keep)
    assert_close(got, ref * keep, LOSS_TOL[torch.float32], "loss vs reference")
    assert_close(gs.grad[:, c], rs, grad_tol(GRAD_TOL[torch.float32], rs), "student grad vs ref")
    assert_close(gt.grad[:, c], rt, grad_tol(GRAD_TOL[torch.float32], rt), "teacher grad vs ref")
    assert (gs.grad[:, 9] == 0).all() and (gt.grad[:, 9] == 0).all()
    assert (got[labels == -100] == 0).all() and (gs.grad[labels == -100] == 0).all()


@needs_triton
def test_triton_neyman_reference_and_limits(triton_registered):
    """A kind with no built-in twin against the float64 reference (fp32, bf16), and the zero
    limits as the torch path takes them: q = 0 < p gives p f'(inf) = p (finite), p = 0 < q gives
    q f(0) = +inf; pearson's q = 0 < p is +inf."""
    for dtype in (torch.float32, torch.bfloat16):
        s, t = logits((3, 37), dtype, seed=23), logits((3, 37), dtype, seed=24)
        loss, s_, t_ = _run("tl_neyman", s, t, backend="triton", reduction="none")
        loss.sum().backward()
        ref, rs, rt = divergence_with_grads(s, t, "tl_neyman", neyman)
        assert_close(loss, ref, LOSS_TOL[dtype], "loss")
        assert_close(s_.grad, rs, grad_tol(GRAD_TOL[dtype], rs), "student grad")
        assert_close(t_.grad, rt, grad_tol(GRAD_TOL[dtype], rt), "teacher grad")
    s, t = logits((3, 20), seed=5), logits((3, 20), seed=6)
    s[0, 3] = -math.inf  # q = 0 < p
    t[1, 4] = -math.inf  # p = 0 < q
    for name in ("tl_neyman", "tl_pearson"):
        got = fk.divergence(s, t, name, backend="triton", reduction="none")
        want = fk.divergence(s, t, name, backend="torch", reduction="none")
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        assert not torch.isnan(got).any()
        fin = torch.isfinite(want)
        assert_close(got[fin], want[fin], (1e-5, 1e-6), name)
    assert torch.isfinite(fk.divergence(s, t, "tl_neyman", backend="triton",
                                        reduction="none")[0])


@needs_triton
def test_triton_fp32_overflow_takes_the_q_limit(triton_registered):
    """Where r = p / q or f(r) overflows fp32 (q ~ e^-60 p; the torch path, in float64, is still
    finite there) the element takes the q = 0 limit: +inf for pearson (f' unbounded), p f'(inf)
    for neyman -- never NaN, in the loss or the gradients' finite entries."""
    s = torch.tensor([[0.0, 0.0, -60.0]])
    t = torch.tensor([[0.0, 0.0, 0.0]])
    assert fk.divergence(s, t, "tl_pearson", backend="triton", reduction="none")[0] == math.inf
    got = fk.divergence(s, t, "tl_neyman", backend="triton", reduction="none")
    want = fk.divergence(s, t, "tl_neyman", backend="torch", reduction="none")
    assert_close(got, want, (1e-5, 1e-6), "neyman near the fp32 overflow")


@needs_triton
def test_triton_phase_and_fused_linear_ops(triton_registered):
    """The phase kernels (divergence_partials / divergence_grads) and fused_linear_divergence
    run a Triton-registered kind on backend="triton"; the sparse-teacher kernels refuse it."""
    s, t = logits((3, 25), seed=31), logits((3, 25), seed=32)
    lse_s, lse_t = s.logsumexp(-1), t.logsumexp(-1)
    got = phases.partials(s, t, lse_s, lse_t, "tl_pearson", backend="triton")
    want = phases.partials(s, t, lse_s, lse_t, "chi2", backend="triton")
    assert_close(got, want, (1e-5, 1e-6), "partials")
    got = phases.grads(s, t, lse_s, lse_t, want, "tl_pearson", grad_teacher=True,
                       backend="triton")
    ref = phases.grads(s, t, lse_s, lse_t, want, "chi2", grad_teacher=True, backend="triton")
    for g, r in zip(got, ref):
        assert_close(g, r, (1e-5, 1e-7), "grads")
    hs, ws = logits((3, 8), seed=33), logits((25, 8), seed=34)
    ht, wt = logits((3, 8), seed=35), logits((25, 8), seed=36)
    got = fk.fused_linear_divergence(hs, ws, ht, wt, kind="tl_pearson", reduction="none",
                                     backend="triton")
    want = fk.fused_linear_divergence(hs, ws, ht, wt, kind="chi2", reduction="none",
                                      backend="triton")
    assert_close(got, want, (1e-5, 1e-6), "fused linear")
    ids = torch.arange(5).expand(3, 5)
    with pytest.raises(fk.BackendUnavailableError, match="do not take custom kinds"):
        fk.sparse_divergence(s, ids, torch.log_softmax(t[:, :5], -1), kind="tl_pearson",
                             backend="triton")
    with pytest.raises(fk.BackendUnavailableError, match="custom kind"):
        fk.divergence(s, t, "tl_pearson", backend="cpu")


@needs_triton
def test_triton_generator_validation():
    def sq(t):
        return (t - 1) ** 2

    def dsq(t):
        return 2 * (t - 1)

    with pytest.raises(ValueError, match="triton_f was given without triton_f_prime"):
        fk.register_divergence("half_tl", sq, dsq, triton_f=pearson_tl)
    with pytest.raises(ValueError, match="triton_f_prime was given without triton_f"):
        fk.register_divergence("half_tl", sq, dsq, triton_f_prime=pearson_prime_tl)
    with pytest.raises(TypeError, match="triton_f must be a @triton.jit function"):
        fk.register_divergence("half_tl", sq, dsq, triton_f=sq, triton_f_prime=pearson_prime_tl)
    assert "half_tl" not in fk.kinds._registry.all_kinds()


# The generators in a module of their own: this test module imports conftest, which turns on
# the interpreter (TRITON_INTERPRET=1) before @triton.jit runs, and the compiler cannot take an
# interpreter function.
GENERATOR_MODULE = textwrap.dedent('''
    import triton


    @triton.jit
    def pearson_tl(t):
        return (t - 1.0) * (t - 1.0)


    @triton.jit
    def pearson_prime_tl(t):
        return 2.0 * (t - 1.0)
''')

COMPILE_DRIVER = textwrap.dedent('''
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import fdiv_kernels as fk
    sys.path.insert(0, sys.argv[2])
    import triton_compile_check as check
    from fdiv_kernels.triton_kernels import divergence as dv
    import generators as m

    fk.register_divergence("cc_pearson", lambda t: (t - 1) ** 2, lambda t: 2 * (t - 1),
                           triton_f=m.pearson_tl, triton_f_prime=m.pearson_prime_tl)
    base = fk.kinds._registry.lookup("cc_pearson").base
    s, valid, lse = torch.randn(1, 1000), torch.ones(1, dtype=torch.bool), torch.zeros(1)
    with check.intercepted_launches() as calls:
        dv.divergence_fwd(s, s, valid, base, False, 0.0, 1.0, 1.0, 0.0, 1.0, 30.0, True, True)
        dv.divergence_partials(s, s, valid, lse, lse, base, False, 0.0, 1.0)
        dv.divergence_grads(s, s, valid, lse, lse, torch.zeros(1, 3), base, False, 0.0, 1.0,
                            True, True)
    out = {}
    for fn, args, kwargs in calls:
        v = check.to_variant(fn, args, kwargs, 90)
        assert v.named_constexprs()["F"] is m.pearson_tl, v.named_constexprs()
        opts = {k: v.options[k] for k in ("num_warps", "num_stages", "num_ctas", "debug")}
        r = check.compile_variant(fn, v.signature, v.constexprs, v.attrs, opts, 90)
        out[v.kernel] = {k: x for k, x in r.items() if isinstance(x, (str, int, float, bool))}
    print(json.dumps(out))
''')


@needs_triton
def test_triton_custom_kind_compiles_for_sm90a(tmp_path):
    """The interpreter accepts what the compiler may not: the three divergence kernels with a
    registered kind's generator as F / F_PRIME constexprs compile with Triton's real compiler
    for sm_90a (in a fresh process without TRITON_INTERPRET; no GPU needed). Registration-time
    generators cannot be enumerated by ``launch_variants()``, hence this test."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    (tmp_path / "generators.py").write_text(GENERATOR_MODULE)
    out = subprocess.run([sys.executable, "-c", COMPILE_DRIVER, str(tmp_path),
                          str(Path(__file__).resolve().parents[1] / "tools")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) == {"_divergence_fwd_kernel", "_divergence_partials_kernel",
                        "_divergence_grads_kernel"}
    for kernel, r in res.items():
        assert r["ok"], (kernel, r.get("error"))
        assert r["local_bytes"] == 0, (kernel, "spills", r)
