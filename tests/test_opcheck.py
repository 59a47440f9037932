"""torch.library.opcheck on every registered ``fdiv::`` op, enumerated from the dispatcher.

The ops are read from torch's registry after importing every backend module that loads here, so
an op added anywhere is found without editing this file; one without a sample in ``SAMPLES``
fails ``test_opcheck`` until a sample is added. opcheck checks the schema (mutation and aliasing
as declared), the autograd registration, the fake (meta) implementation against the real
outputs, and AOT dispatch with dynamic shapes: what torch.compile(fullgraph=True) relies on.
Shapes stay tiny: this is about the op contract, not the numbers (the other tests do those).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.core import _dispatch as dispatch
from fdiv_kernels.kinds._registry import resolve

BACKEND_SUFFIXES = ("cpu", "cuda", "torch", "triton")


def registered_ops() -> list[str]:
    """Names (without ``fdiv::``) of every op registered once each loadable backend is imported."""
    for backend in dispatch.TABLE.values():
        if backend.module and dispatch.load_error(backend.module) is None:
            importlib.import_module(backend.module)
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("fdiv::")}
    return sorted(names)


def family(name: str) -> tuple[str, str | None]:
    """("divergence_fwd", "cpu") for divergence_fwd_cpu; (name, None) for an op of no backend."""
    head, _, tail = name.rpartition("_")
    return (head, tail) if tail in BACKEND_SUFFIXES else (name, None)


def device_for(backend: str | None) -> str:
    if backend == "cuda" or (backend == "triton" and not dispatch.triton_interpret()):
        return "cuda"
    return "cpu"


# ---- samples: per op family, a function of (device, backend) giving a list of argument tuples ---


def _divergence_args(dev):
    spec = resolve("js", None, None, None)
    s, t = logits((3, 40), seed=3).to(dev), logits((3, 40), seed=4).to(dev)
    valid = torch.tensor([True, False, True], device=dev)
    return s, t, valid, spec.base, spec.swap, spec.param


def _divergence_fwd(dev, backend):
    s, t, valid, base, swap, param = _divergence_args(dev)
    plain = [(s, t, valid, base, swap, param, 0.5, 1.0, 0.0, 1.0, 0.0, gs, gt)
             for gs, gt in ((True, False), (False, True), (True, True), (False, False))]
    if backend == "cuda":  # its kernels do not take the logit transforms (the binding refuses)
        return plain
    return plain + [(s, t, valid, base, swap, param, 0.5, 0.0625, 2.0, 2.0, 30.0, True, True)]


def _phase_inputs(dev):
    s, t, valid, base, swap, param = _divergence_args(dev)
    inv_t = 0.5
    lse_s, lse_t = torch.logsumexp(s * inv_t, -1), torch.logsumexp(t * inv_t, -1)
    return s, t, valid, lse_s, lse_t, base, swap, param, inv_t


def _divergence_partials(dev, backend):
    return [_phase_inputs(dev)]


def _divergence_grads(dev, backend):
    s, t, valid, lse_s, lse_t, base, swap, param, inv_t = _phase_inputs(dev)
    sums = logits((3, 3), seed=5).to(dev)
    return [(s, t, valid, lse_s, lse_t, sums, base, swap, param, inv_t, gs, gt)
            for gs, gt in ((True, False), (False, True), (True, True))]


def _stats_inputs(dev):
    return logits((3, 40), seed=40).to(dev), torch.tensor([1, -100, 39], device=dev)


def _softmax_stats_fwd(dev, backend):
    x, labels = _stats_inputs(dev)
    plain = [(x, labels, -100, 0.5, 1.0, 0.0, True), (x, None, -100, 1.0, 1.0, 0.0, False)]
    return plain if backend == "cuda" else plain + [(x, labels, -100, 0.5, 0.0625, 2.0, True)]


def _softmax_stats_bwd(dev, backend):
    x, labels = _stats_inputs(dev)
    a = x * 0.5
    lse = torch.logsumexp(a, -1)
    ent = -(torch.softmax(a, -1) * torch.log_softmax(a, -1)).sum(-1)
    g = torch.tensor([0.5, -1.0, 2.0], device=dev)
    plain = [(x, labels, lse, ent, g, g, g, -100, 0.5, 1.0, 0.0),
             (x, None, lse, ent, g, None, None, -100, 0.5, 1.0, 0.0)]
    return plain if backend == "cuda" else plain + [(x, labels, lse, ent, g, g, g, -100, 0.5,
                                                     0.0625, 2.0)]


def _scale_rows(dev, backend):
    return [(logits((3, 40), seed=5).to(dev), torch.tensor([0.5, 2.0, -1.0], device=dev))]


# Sinkhorn: B = 2 problems of n = 6 and m = 5 points in 3-D, uniform weights.
def _points(B, n, seed, dtype):
    return logits((B, n, 3), dtype, seed=seed, scale=1.0)


def _weights(B, n, seed, dtype):
    w = logits((B, n), torch.float64, seed=seed).exp()
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def _sinkhorn_inputs(dev, dtype=torch.float32):
    x, y = _points(2, 6, 61, dtype).to(dev), _points(2, 5, 62, dtype).to(dev)
    la = torch.full((2, 6), -math.log(6), dtype=dtype, device=dev)
    lb = torch.full((2, 5), -math.log(5), dtype=dtype, device=dev)
    return x, y, la, lb


def _sinkhorn_lse(dev, backend):
    x, y, _, _ = _sinkhorn_inputs(dev)
    h, h_cols = logits((2, 5), seed=63).to(dev), logits((2, 6), seed=64).to(dev)
    ei = torch.tensor([1.0, 2.0], device=dev)
    cost = torch.cdist(x, y) ** 2
    # `active` all true: a backend may leave inactive problems' rows unwritten, which opcheck's
    # eager-vs-compiled comparison would read.
    active = torch.ones(2, dtype=torch.bool, device=dev)
    return [(x, y, None, h, ei, 0, False, None), (x, y, None, h, ei, 0, False, active),
            (None, None, cost, h_cols, ei, 0, True, None)]


def _sinkhorn_fwd(dev, backend):
    x, y, la, lb = _sinkhorn_inputs(dev)
    # Three iterations under the Triton interpreter (each opcheck test runs the solve).
    it, every = (3, 2) if backend == "triton" else (20, 5)
    return [(x, y, None, la, lb, None, None, None, 0.5, 0, 0.0, 0.0, it, 1e-6, every, 0.0, False)]


def _sinkhorn_solve(dev, backend):
    from fdiv_kernels.transport._solver import eps_schedule

    x, y, la, lb = _sinkhorn_inputs(dev)
    # Without and with an eps-scaling table (levels, B) of the one host-side schedule.
    levels = eps_schedule(torch.tensor([8.0, 3.0], device=dev), 0.5, 0.5, torch.float32)
    return [(x, y, None, la, lb, None, None, None, 0.5, 0, 0.0, 0.0, 20, 1e-6, 1, False),
            (x, y, None, la, lb, None, None, levels, 0.5, 0, 0.0, 0.0, 20, 1e-6, 1, False)]


def _sinkhorn_totals(dev, backend):
    x, y, la, lb = _sinkhorn_inputs(dev)
    return [(x, y, None, la.exp(), lb.exp(), la, lb, 0.5, 0)]


def _sinkhorn_grads(dev, backend):
    x, y, la, lb = _sinkhorn_inputs(dev)
    f, g = logits((2, 6), seed=64).to(dev) * 0.2, logits((2, 5), seed=65).to(dev) * 0.2
    gv = torch.ones(2, device=dev)
    return [(x, y, None, la.exp(), lb.exp(), f, g, gv, None, None, 0.3, 0, 0.0, 0.0,
             [True, True, False, True, False])]


def _sinkhorn_plan_apply(dev, backend):
    F64 = torch.float64
    x, y = _points(3, 15, 66, F64).to(dev), _points(3, 12, 67, F64).to(dev)
    a, b = _weights(3, 15, 68, F64).to(dev), _weights(3, 12, 69, F64).to(dev)
    f, g = logits((3, 15), F64, seed=95).to(dev) * 0.2, logits((3, 12), F64, seed=96).to(dev) * 0.2
    vf, vg = logits((3, 15), F64, seed=97).to(dev), logits((3, 12), F64, seed=98).to(dev)
    cost = torch.cdist(x, y) ** 2
    return [(x, y, None, a, b, f, g, 0.4, 0, vf, vg),
            (None, None, cost, a, b, f, g, 0.4, 0, vf, vg)]


_UNROLLED_K = 7


def _unrolled_inputs(dev):
    F64 = torch.float64
    x, y = _points(2, 6, 35, F64).to(dev), _points(2, 5, 36, F64).to(dev)
    a, b = _weights(2, 6, 37, F64).to(dev), _weights(2, 5, 38, F64).to(dev)
    return (x, y, None, a, b, None, None, 0.3, 0, 0.0, 0.0, _UNROLLED_K, False)


def _sinkhorn_unrolled_fwd(dev, backend):
    return [_unrolled_inputs(dev)]


def _sinkhorn_unrolled_bwd(dev, backend):
    args = _unrolled_inputs(dev)
    x, y, _, a, b = args[:5]
    tape = getattr(torch.ops.fdiv, f"sinkhorn_unrolled_fwd_{backend}")(*args)[5]
    gv = torch.ones(2, dtype=torch.float64, device=dev)
    return [(x, y, None, a, b, tape, gv, None, None, None, 0.3, 0, 0.0, 0.0, _UNROLLED_K, False,
             [True, True, False, True, False])]


def _sparse_fwd_args(dev, tail, extras=False):
    # 3 rows of V = 40, K = 4 duplicate-free ids per row, one ignored row; kind js (base 1).
    # extras: re-tempered teacher (alpha 1.5) and a softcapped, scaled student.
    s = logits((3, 40), seed=23).to(dev)
    g = torch.Generator().manual_seed(24)
    ids = torch.stack([torch.randperm(40, generator=g)[:4] for _ in range(3)]).to(dev)
    lp = torch.log_softmax(logits((3, 4), seed=25), -1).sub(0.2).to(dev)  # mass 0.82 on S
    support = torch.ones(3, 4, dtype=torch.bool, device=dev)
    support[1, 3] = False  # a padding entry
    valid = torch.tensor([True, False, True], device=dev)
    alpha, scale, cap = (1.5, 0.8, 3.0) if extras else (0.0, 1.0, 0.0)
    return (s, ids, lp, support, valid, 1, False, 0.3, 0.7, tail, alpha, 1e-4, scale, cap, True,
            True)


def _sparse_divergence_fwd(dev, backend):
    # none, bucket, renormalize; then bucket with the extras and with empty masks (all real).
    out = [_sparse_fwd_args(dev, tail) for tail in (0, 1, 2)] + [_sparse_fwd_args(dev, 1, True)]
    plain = _sparse_fwd_args(dev, 1)
    empty = torch.ones(0, dtype=torch.bool, device=dev)
    return out + [plain[:3] + (empty, empty) + plain[5:]]


def _sparse_divergence_fwd_inplace(dev, backend):
    # The forward's samples without grad_student (the gradient overwrites the student).
    return [args[:14] + args[15:] for args in _sparse_divergence_fwd(dev, backend)]


def _sparse_divergence_bwd(dev, backend):
    out = []
    for args in _sparse_divergence_fwd(dev, backend):
        stats = getattr(torch.ops.fdiv, f"sparse_divergence_fwd_{backend}")(*args)[3]
        g = torch.tensor([0.5, 1.0, -2.0], device=dev)
        out.append(args[:5] + (stats, g) + args[5:11] + args[12:14])
    return out


def _lse_combination_fwd(dev, backend):
    # Cauchy-Schwarz's terms, and Renyi's (alpha = 0.3; alpha = 2: a negative coefficient and
    # the float64 gradient pass) with the logit transforms (scale, softcap) on.
    from fdiv_kernels.divergences._row_kinds import CAUCHY_SCHWARZ_COEFFS, renyi_coeffs

    s, t, valid, _, _, _ = _divergence_args(dev)
    cs, renyi = list(CAUCHY_SCHWARZ_COEFFS), list(renyi_coeffs(0.3))
    return [(s, t, valid, cs, 0.5, 1.0, 0.0, 1.0, 0.0, True, True),
            (s, t, valid, renyi, 0.5, 1.3, 4.0, 0.8, 0.0, True, False),
            (s, t, valid, cs, 1.0, 1.0, 0.0, 1.0, 3.0, False, True),
            (s, t, valid, cs, 1.0, 1.0, 0.0, 1.0, 0.0, False, False),
            (s, t, valid, list(renyi_coeffs(2.0)), 1.0, 1.0, 0.0, 1.0, 0.0, True, True)]


def _topk_logprobs_fwd(dev, backend):
    # Ties (a repeated value) and an all -inf row, beside plain rows; k = 1, a middle k, k = V.
    x = logits((3, 40), seed=41).to(dev)
    x[0, 5] = x[0, 9]
    x[2] = float("-inf")
    return [(x, 1, 1.0, 1.0, 0.0), (x, 7, 0.5, 1.0, 0.0), (x, 40, 1.0, 1.0, 0.0),
            (x, 7, 0.5, 0.0625, 2.0)]


SAMPLES = {
    "lse_combination_fwd": _lse_combination_fwd,
    "divergence_fwd": _divergence_fwd,
    "divergence_partials": _divergence_partials,
    "divergence_grads": _divergence_grads,
    "softmax_stats_fwd": _softmax_stats_fwd,
    "softmax_stats_bwd": _softmax_stats_bwd,
    "scale_rows_": _scale_rows,
    "sinkhorn_lse": _sinkhorn_lse,
    "sinkhorn_fwd": _sinkhorn_fwd,
    "sinkhorn_solve": _sinkhorn_solve,
    "sinkhorn_totals": _sinkhorn_totals,
    "sinkhorn_grads": _sinkhorn_grads,
    "sinkhorn_plan_apply": _sinkhorn_plan_apply,
    "sinkhorn_unrolled_fwd": _sinkhorn_unrolled_fwd,
    "sinkhorn_unrolled_bwd": _sinkhorn_unrolled_bwd,
    "sparse_divergence_fwd": _sparse_divergence_fwd,
    "sparse_divergence_fwd_inplace": _sparse_divergence_fwd_inplace,
    "sparse_divergence_bwd": _sparse_divergence_bwd,
    "topk_logprobs_fwd": _topk_logprobs_fwd,
}

# Ops that fail a check today, with the reason; strict, so a fix shows up as an XPASS failure.
KNOWN_FAILURES = {
    "sinkhorn_grads_torch": "its torch.func.vjp cannot run on the storage-less tensors of "
                            "opcheck's schema/fake checks (the fake itself works under "
                            "torch.compile, tested in test_sinkhorn_edges)",
}

OPS = registered_ops()


@pytest.fixture
def whole_solve_forced():
    """The Triton Sinkhorn forward on its whole-solve kernel (its other path is the LSE op's
    loop, which the sinkhorn_lse sample covers)."""
    mod = importlib.import_module("fdiv_kernels.transport._ops_triton")
    mod.FORCE_WHOLE_SOLVE = True
    yield
    mod.FORCE_WHOLE_SOLVE = None


def test_registry_lists_the_ops_of_every_loaded_backend():
    """The enumeration itself: a broken one would make test_opcheck pass vacuously."""
    assert {"scale_rows_", "divergence_fwd_torch", "softmax_stats_fwd_torch",
            "divergence_partials_torch", "sinkhorn_lse_torch"} <= set(OPS)
    for name, backend in dispatch.TABLE.items():
        if not backend.reasons(device_for(name), torch.float32):  # it runs here: ops listed
            assert any(family(op)[1] == name for op in OPS), name


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, request):
    fam, backend = family(name)
    if fam not in SAMPLES:
        pytest.fail(f"fdiv::{name} has no opcheck sample: add {fam!r} to SAMPLES in {__file__}")
    dev = device_for(backend)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"fdiv::{name} runs on CUDA tensors; no GPU here")
    if name == "sinkhorn_fwd_triton":
        request.getfixturevalue("whole_solve_forced")
    if name in KNOWN_FAILURES:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True))
    op = getattr(torch.ops.fdiv, name)
    for args in SAMPLES[fam](dev, backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_cpp_ops_check_their_arguments(backend):
    """The C++ ops' own checks (csrc/common/checks.h), shared by both backends: bad arguments
    raise ValueError / TypeError naming the argument, before any kernel reads memory."""
    if f"divergence_fwd_{backend}" not in OPS:
        pytest.skip(f"no {backend} C++ ops in this build")
    dev = device_for(backend)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    div = getattr(torch.ops.fdiv, f"divergence_fwd_{backend}")
    fwd = getattr(torch.ops.fdiv, f"softmax_stats_fwd_{backend}")
    bwd = getattr(torch.ops.fdiv, f"softmax_stats_bwd_{backend}")
    s, t, valid, base, swap, param = _divergence_args(dev)
    tail = (base, swap, param, 0.5, 1.0, 0.0, 1.0, 0.0, True, False)
    bad_div = [
        ((s[0], t[0], valid, *tail), ValueError, "student must be 2-D"),
        ((s, t[:, :5], valid, *tail), ValueError, "teacher must have the shape of student"),
        ((s, t.double(), valid, *tail), TypeError, "teacher must have the dtype of student"),
        ((s.long(), t.long(), valid, *tail), TypeError, "student must be float32"),
        ((s, t, valid.int(), *tail), TypeError, "valid must be bool"),
        ((s, t, valid[:2], *tail), ValueError, "valid must have shape"),
        ((s, t, valid, 99, swap, param, 0.5, 1.0, 0.0, 1.0, 0.0, True, False), ValueError,
         "kind must be a base"),
    ]
    xf = (s, t, valid, base, swap, param, 0.5)
    if backend == "cpu":
        bad_div += [
            ((*xf, 0.0, 0.0, 1.0, 0.0, True, False), ValueError, "student_scale must be finite"),
            ((*xf, 1.0, -1.0, 1.0, 0.0, True, False), ValueError, "student_softcap must be"),
            ((*xf, 1.0, 0.0, 1.0, float("inf"), True, False), ValueError, "teacher_softcap"),
        ]
    else:
        bad_div += [((*xf, 1.0, 30.0, 1.0, 0.0, True, False), ValueError,
                     "do not support a logit scale or softcap")]
    for args, exc, match in bad_div:
        with pytest.raises(exc, match=match):
            div(*args)
    x, labels = _stats_inputs(dev)
    g = torch.ones(3, device=dev)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        fwd(x, labels.float(), -100, 1.0, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="labels must have shape"):
        fwd(x, labels[:2], -100, 1.0, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="g_lse must have shape"):
        bwd(x, None, g, g, g[:2], None, None, -100, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="g_logprob needs labels"):
        bwd(x, None, g, g, None, None, g, -100, 1.0, 1.0, 0.0)


def test_every_backend_op_has_the_shared_schema():
    """Each registered ``fdiv::<op>_<backend>`` (C++ ones included) has the schema of its op
    (fdiv_kernels.core._ops.SCHEMAS): one signature per op, whatever the backend."""
    from fdiv_kernels.core._ops import SCHEMAS

    checked = 0
    for name in registered_ops():
        op, backend = family(name)
        if backend is None or op not in SCHEMAS:
            continue
        got = getattr(torch.ops.fdiv, name).default._schema
        want = torch._C.parse_schema(f"fdiv::{name}{SCHEMAS[op]}")
        assert str(got) == str(want), (name, str(got), str(want))
        checked += 1
    assert checked >= 8 * 2  # at least the torch and one kernel backend
