"""Inputs at the edges of the supported range, on every backend, against the float64 reference:
no finite-looking wrong number anywhere (issue 16), empty batches and forward-only calls (issue 10).
"""

import math

import pytest
import torch
from conftest import GRAD_TOL, LOSS_TOL, STATS_BACKENDS
from helpers import assert_close, available_backends
from reference import divergence_with_grads, logits
from torch.utils._python_dispatch import TorchDispatchMode

import fdiv_kernels as fk
from fdiv_kernels import phases

PHASE_BACKENDS = available_backends("divergence_partials")


# ---- alpha-divergence near its limits ------------------------------------------------------

# A log grid towards both limits: the closed form cancelled as 1 / (alpha (1 - alpha)).
ALPHAS = [1e-12, 1e-8, 1e-4, 1 - 1e-4, 1 - 1e-8, 1 - 1e-12, -1e-8, 1 + 1e-8]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_alpha_near_limits_matches_reference(alpha, backend):
    s, t = logits((2, 300), seed=101), logits((2, 300), seed=102)
    s_, t_ = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = fk.divergence(s_, t_, "alpha", alpha=alpha, reduction="none", backend=backend,
                         temperature=1.3)
    loss.sum().backward()
    ref, gs, gt = divergence_with_grads(s, t, "alpha", alpha, temperature=1.3)
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "student grad")
    assert_close(t_.grad, gt, GRAD_TOL[torch.float32], "teacher grad")


def test_alpha_moves_continuously_into_kl(backend):
    s, t = logits((3, 200), seed=103), logits((3, 200), seed=104)
    kw = dict(reduction="none", backend=backend)
    kl, rkl = fk.divergence(s, t, "kl", **kw), fk.divergence(s, t, "reverse_kl", **kw)
    assert_close(fk.divergence(s, t, "alpha", alpha=1 - 1e-12, **kw), kl, (1e-5, 1e-7), "a->1")
    assert_close(fk.divergence(s, t, "alpha", alpha=1e-12, **kw), rkl, (1e-5, 1e-7), "a->0")


def test_alpha_reference_is_the_closed_form():
    """The float64 reference's expm1 form equals the textbook one where that one is exact."""
    p = torch.softmax(logits((2, 50), torch.float64, seed=105), -1)
    q = torch.softmax(logits((2, 50), torch.float64, seed=106), -1)
    from reference import divergence_from_probs
    for a in (0.3, 0.5, 0.7, -0.5, 1.5):
        closed = (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
        torch.testing.assert_close(divergence_from_probs("alpha", p, q, a), closed)


# ---- labels dtypes -------------------------------------------------------------------------

def test_narrow_label_dtypes_never_wrap(backend):
    """uint8 cannot hold -100 (it wrapped to 156 and dropped rows): rejected; int8 / int16 hold
    it and are widened; int32 and int64 are read as they are."""
    s, t = logits((4, 200), seed=107), logits((4, 200), seed=108)
    lab = torch.tensor([156, -100, 3, 0])
    ref = fk.divergence(s, t, labels=lab, reduction="sum", backend=backend)
    for dt in (torch.int32, torch.int16):
        assert_close(fk.divergence(s, t, labels=lab.to(dt), reduction="sum", backend=backend),
                     ref, (0, 0), str(dt))
    with pytest.raises(TypeError, match="cannot hold ignore_index=-100"):
        fk.divergence(s, t, labels=lab.clamp(min=0).to(torch.uint8), backend=backend)
    # uint8 labels with an ignore_index it can hold: label 156 is kept, 255 ignored.
    u8 = torch.tensor([156, 255, 3, 0], dtype=torch.uint8)
    got = fk.divergence(s, t, labels=u8, ignore_index=255, reduction="sum", backend=backend)
    assert_close(got, ref, (0, 0), "uint8")


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_label_dtypes_in_token_logprobs(backend):
    x = logits((4, 200), seed=109)
    lab = torch.tensor([156, -100, 3, 0])
    ref = fk.token_logprobs(x, lab, backend=backend)
    for dt in (torch.int32, torch.int16):
        assert_close(fk.token_logprobs(x, lab.to(dt), backend=backend), ref, (0, 0), str(dt))
        assert_close(fk.softmax_stats(x, lab.to(dt), backend=backend).label_logprob, ref, (0, 0),
                     str(dt))
    with pytest.raises(TypeError, match="cannot hold ignore_index=-100"):
        fk.token_logprobs(x, lab.clamp(min=0).to(torch.uint8), backend=backend)
    u8 = torch.tensor([156, 255, 3, 0], dtype=torch.uint8)
    assert_close(fk.token_logprobs(x, u8, ignore_index=255, backend=backend), ref, (0, 0), "u8")


def test_label_dtypes_in_fused_linear():
    g = torch.Generator().manual_seed(110)
    h, w = torch.randn(4, 16, generator=g), torch.randn(200, 16, generator=g)
    lab = torch.tensor([156, -100, 3, 0])
    kw = dict(ce_weight=0.5, backend="torch")
    ref = fk.fused_linear_divergence(h, w, h.flip(0), w, labels=lab, **kw)
    assert_close(fk.fused_linear_divergence(h, w, h.flip(0), w, labels=lab.to(torch.int16), **kw),
                 ref, (0, 0), "int16")
    with pytest.raises(TypeError, match="cannot hold ignore_index"):
        fk.fused_linear_divergence(h, w, h.flip(0), w, labels=lab.clamp(min=0).to(torch.uint8),
                                   **kw)


# ---- num_items_in_batch ----------------------------------------------------------------------

def test_num_items_scalar_forms():
    s, t = logits((4, 30), seed=111), logits((4, 30), seed=112)
    ref = fk.divergence(s, t, reduction="sum", backend="torch") / 7
    for n in (7, 7.0, torch.tensor(7), torch.tensor([7.0])):
        got = fk.divergence(s, t, num_items_in_batch=n, backend="torch")
        assert got.shape == () and torch.allclose(got, ref)
    h, w = s[:, :8].contiguous(), logits((30, 8), seed=113)
    with pytest.raises(ValueError, match="one-element tensor"):
        fk.fused_linear_divergence(h, w, h, w, num_items_in_batch=torch.tensor([2.0, 3.0]))
    got = fk.fused_linear_divergence(h, w, h.flip(0), w, num_items_in_batch=torch.tensor([7.0]))
    assert got.shape == ()


# ---- ignored rows are inert ------------------------------------------------------------------

@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ignored_row_holding_nan_gets_zero_gradient(backend):
    x = logits((3, 70), seed=114)
    x[1, 5] = math.nan
    lab = torch.tensor([4, -100, 9])
    for f in (lambda z: fk.token_logprobs(z, lab, backend=backend),
              lambda z: fk.softmax_stats(z, lab, backend=backend).label_logprob):
        x_ = x.clone().requires_grad_(True)
        out = f(x_)
        assert out[1] == 0 and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.all(x_.grad[1] == 0)
        assert torch.isfinite(x_.grad).all()


def test_ignored_row_holding_nan_in_divergence(backend):
    s, t = logits((3, 70), seed=115), logits((3, 70), seed=116)
    s[1, 5] = math.nan
    t[1, 7] = math.inf
    s_, t_ = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = fk.divergence(s_, t_, "js", labels=torch.tensor([4, -100, 9]), backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(s_.grad[1] == 0) and torch.all(t_.grad[1] == 0)


# ---- logsumexp with +inf and NaN -------------------------------------------------------------

@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_logsumexp_inf_and_nan_is_nan(backend):
    x = logits((4, 300), seed=117)
    x[0, 3], x[0, 250] = math.inf, math.nan   # NaN after the +inf (another block when capped)
    x[1, 3], x[1, 250] = math.nan, math.inf   # NaN before
    x[2, 3], x[2, 100] = math.inf, math.inf   # two +inf: +inf
    got = fk.logsumexp(x, backend=backend)
    assert_close(got, torch.logsumexp(x, -1), (0, 0), "lse")
    assert torch.isnan(got[:2]).all() and got[2] == math.inf and torch.isfinite(got[3])


def test_logsumexp_inf_and_nan_multiblock(monkeypatch):
    if "triton" not in STATS_BACKENDS:
        pytest.skip("no triton")
    import importlib
    monkeypatch.setattr(importlib.import_module("fdiv_kernels.triton_kernels.softmax_stats"),
                        "MAX_BLOCK", 64)
    test_logsumexp_inf_and_nan_is_nan("triton")


# ---- precision at large |x / T| ---------------------------------------------------------------

def _err(v, ref):
    return float(((v.double() - ref).abs() / ref.abs().clamp(min=1e-30)).max())


@pytest.mark.parametrize("offset,temperature", [(300.0, 1.0), (5e3, 1.0), (50.0, 0.01)])
def test_sharp_softmax_error_at_torch_level(offset, temperature, backend):
    """|x / T| ~ 3e2..5e3: log-probabilities from (x - max) - log s keep the torch backend's
    accuracy (x - lse lost eps |lse|: 5-35x its error)."""
    spread = 3.0 * temperature
    s = (offset + logits((4, 500), torch.float64, seed=118, scale=spread)).float()
    t = (offset + logits((4, 500), torch.float64, seed=119, scale=spread)).float()
    ref, _, _ = divergence_with_grads(s, t, "kl", temperature=temperature)
    kw = dict(reduction="none", temperature=temperature)
    base = _err(fk.divergence(s, t, backend="torch", **kw), ref)
    got = _err(fk.divergence(s, t, backend=backend, **kw), ref)
    assert got <= 3 * base + 1e-6, (got, base)


def test_huge_logits_give_no_wrong_finite_number(backend):
    """Logits ~1e7 (negative KL before) and next to the float32 limit (+3e38: 10.7 for 0.63)."""
    s, t = logits((3, 400), seed=120), logits((3, 400), seed=121)
    for kind, spread, shift, temperature in [("kl", 1.0, 1e7, 1.0), ("js", 1e31, 3e38, 1.0),
                                              ("js", 1e31, 3e38, 2.0), ("js", 3e30, 3e38, 1.0)]:
        ss = (s.double() * spread + shift).float()
        tt = (t.double() * spread + shift).float()
        ref, _, _ = divergence_with_grads(ss, tt, kind, temperature=temperature)
        got = fk.divergence(ss, tt, kind, reduction="none", backend=backend,
                            temperature=temperature)
        assert (got >= 0).all()
        assert_close(got, ref, (1e-4, 1e-6), f"{kind} shift {shift} T {temperature}")
    # x / T overflows float32: NaN (documented), never a finite number.
    got = fk.divergence((s.double() + 3e38).float(), (t.double() + 3e38).float(), "js",
                        temperature=0.5, reduction="none", backend=backend)
    assert torch.isnan(got).all()


# ---- extreme temperatures --------------------------------------------------------------------

def test_temperature_range(backend):
    s, t = logits((2, 40), seed=122), logits((2, 40), seed=123)
    with pytest.raises(ValueError, match="temperature must be in"):
        fk.divergence(s, t, temperature=1e-39, backend=backend)
    with pytest.raises(ValueError, match="temperature must be in"):
        fk.entropy(s, temperature=1e-39)
    # The smallest allowed temperature still gives the reference where x / T is finite.
    T = 3e-39
    ss, tt = s * 1e-38, t * 1e-38
    ref, _, _ = divergence_with_grads(ss, tt, "tv", temperature=T)
    got = fk.divergence(ss, tt, "tv", temperature=T, reduction="none", backend=backend)
    assert_close(got, ref, LOSS_TOL[torch.float32], "tiny T")
    # float64 inputs compute in float64: their range reaches far lower.
    if backend not in available_backends("divergence_fwd", torch.float64):
        return
    sd, td = s.double(), t.double()
    got = fk.divergence(sd, td, "tv", temperature=1e-300, reduction="none", backend=backend)
    assert_close(got, divergence_with_grads(sd, td, "tv", temperature=1e-300)[0],
                 LOSS_TOL[torch.float64], "float64 tiny T")


# ---- forward-only under no_grad / inference_mode ----------------------------------------------

class _OpLog(TorchDispatchMode):
    """Records every fdiv:: op call with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fdiv":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_only_without_grad_mode(mode, backend):
    s = logits((3, 90), seed=124).requires_grad_(True)
    t = logits((3, 90), seed=125).requires_grad_(True)
    expected = fk.divergence(s, t, "js", backend=backend).detach()
    with mode(), _OpLog() as log:
        got = fk.divergence(s, t, "js", backend=backend)
    # The forward-only kernel is another compiled variant (no gradient stores), whose vectorized
    # row sums may round differently: the same value to a few fp32 ulps, not bit for bit.
    torch.testing.assert_close(got, expected, rtol=4 * 2.0**-23, atol=0.0)
    fwd = [a for name, a in log.calls if name.startswith("divergence_fwd")]
    # grad_student, grad_teacher are the op's last two arguments: False, so no (N, V) buffer.
    assert fwd and all(a[-2] is False and a[-1] is False for a in fwd)

    w = torch.nn.Parameter(logits((90, 16), seed=126))
    h = logits((3, 16), seed=127)
    expected = fk.fused_linear_divergence(h, w, h.flip(0), w, backend=backend).detach()
    with mode(), _OpLog() as log:
        got = fk.fused_linear_divergence(h, w, h.flip(0), w, backend=backend)
    torch.testing.assert_close(got, expected, rtol=4 * 2.0**-23, atol=0.0)
    fwd = [a for name, a in log.calls if name.startswith("divergence_fwd")]
    assert fwd and all(a[-2] is False and a[-1] is False for a in fwd)


# ---- zero-row inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zero_rows_divergence(reduction, backend):
    s = logits((0, 50), seed=128).requires_grad_(True)
    t = logits((2, 0, 50), seed=129).reshape(0, 50).requires_grad_(True)
    for labels in (None, torch.zeros(0, dtype=torch.long)):
        loss = fk.divergence(s, t, "js", reduction=reduction, labels=labels, backend=backend)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert loss.dtype == torch.float32
        if reduction != "none":
            assert loss.item() == 0.0
        loss.sum().backward()
        assert s.grad.shape == (0, 50) and t.grad.shape == (0, 50)
    with pytest.raises(ValueError, match="V >= 1"):
        fk.divergence(logits((3, 0), seed=1), logits((3, 0), seed=1), backend=backend)


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_zero_rows_softmax_stats(backend):
    x = logits((2, 0, 40), seed=130).requires_grad_(True)
    lab = torch.zeros(2, 0, dtype=torch.long)
    st = fk.softmax_stats(x, lab, backend=backend)
    for v in st:
        assert v.shape == (2, 0)
    (st.lse.sum() + st.entropy.sum() + st.label_logprob.sum()).backward()
    assert x.grad.shape == x.shape
    assert fk.token_logprobs(x, lab, backend=backend).shape == (2, 0)
    assert fk.entropy(x, backend=backend).shape == (2, 0)
    assert fk.logsumexp(x, backend=backend).shape == (2, 0)
    with pytest.raises(ValueError, match="V >= 1"):
        fk.entropy(logits((3, 0), seed=1), backend=backend)


def test_zero_rows_fused_linear(backend):
    h = logits((0, 16), seed=131).requires_grad_(True)
    w = logits((40, 16), seed=132).requires_grad_(True)
    for reduction in ("none", "sum", "mean"):
        loss = fk.fused_linear_divergence(h, w, h, w, reduction=reduction, backend=backend)
        assert loss.shape == ((0,) if reduction == "none" else ())
        loss.sum().backward()
        assert h.grad.shape == (0, 16) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", PHASE_BACKENDS)
def test_zero_rows_phases(backend):
    s, t = logits((0, 30), seed=133), logits((0, 30), seed=134)
    lse_s, lse_t = phases.row_lse(s, backend=backend), phases.row_lse(t, backend=backend)
    assert lse_s.shape == (0,)
    sums = phases.partials(s, t, lse_s, lse_t, "js", backend=backend)
    assert sums.shape == (0, 3)
    gs, gt = phases.grads(s, t, lse_s, lse_t, sums, "js", grad_teacher=True, backend=backend)
    assert gs.shape == (0, 30) and gt.shape == (0, 30)


# ---- autocast ------------------------------------------------------------------------------

def test_every_op_keeps_its_precision_under_cpu_autocast(backend):
    """torch.autocast("cpu", bfloat16), as most training runs: the same numbers as without it."""
    s, t = logits((3, 64), seed=135), logits((3, 64), seed=136)
    lab = torch.tensor([1, -100, 5])
    g = torch.Generator().manual_seed(137)
    h, w = torch.randn(5, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    sb = backend if backend in STATS_BACKENDS else "torch"
    calls = {
        "divergence": lambda: fk.divergence(s, t, "js", labels=lab, backend=backend),
        "token_logprobs": lambda: fk.token_logprobs(s, lab, backend=sb),
        "entropy": lambda: fk.entropy(s, backend=sb),
        "softmax_stats": lambda: torch.stack(fk.softmax_stats(s, lab, backend=sb)),
        "logsumexp": lambda: fk.logsumexp(s, backend=sb),
        "fused_linear_divergence": lambda: fk.fused_linear_divergence(
            h, w, h.flip(0), w, "kl", reduction="none", backend=backend),
        "row_lse": lambda: phases.row_lse(s, backend=sb),
    }
    for name, f in calls.items():
        plain = f()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = f()
        assert auto.dtype == plain.dtype, name
        assert_close(auto, plain, (1e-6, 1e-7), name)
    # And against float64: bf16 logits gave 6e-4, fp32 ones 3e-7.
    zs, zt = h.double() @ w.double().t(), h.flip(0).double() @ w.double().t()
    ref, _, _ = divergence_with_grads(zs, zt, "kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fk.fused_linear_divergence(h, w, h.flip(0), w, "kl", reduction="none",
                                         backend=backend)
    assert_close(got, ref, (1e-5, 1e-6), "fused vs float64")


# ---- the CPU backward of 16-bit gradients allocates no (N, V) fp32 temporaries ---------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_rows_16bit_cpu_in_place_without_full_temporaries(dtype):
    from torch.profiler import ProfilerActivity, profile

    g = logits((64, 32000), seed=138).to(dtype)
    scale = torch.rand(64, generator=torch.Generator().manual_seed(139))
    expected = (g.float() * scale[:, None]).to(dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ops.fdiv.scale_rows_(g, scale)
    assert torch.equal(g, expected)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    # One fp32 (N, V) temporary would be 7.8 MiB; a chunk's is 1 MiB.
    assert biggest <= 4 * (1 << 18) + 4096, biggest


def test_fused_linear_ignored_row_holding_nan_is_inert(backend):
    g = torch.Generator().manual_seed(140)
    h, w = torch.randn(4, 16, generator=g), torch.randn(60, 16, generator=g)
    ht = torch.randn(4, 16, generator=g)
    lab = torch.tensor([3, -100, 7, 1])
    grads = []
    for hidden in (h, torch.where(torch.arange(4)[:, None] == 1, math.nan, h)):
        h_ = hidden.clone().requires_grad_(True)
        w_ = w.clone().requires_grad_(True)
        loss = fk.fused_linear_divergence(h_, w_, ht, w, "js", labels=lab, ce_weight=0.3,
                                          backend=backend)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.all(h_.grad[1] == 0)
        grads.append((loss, w_.grad))
    assert_close(grads[1][0], grads[0][0], (0, 0), "loss")
    assert_close(grads[1][1], grads[0][1], (1e-6, 1e-7), "weight grad")
