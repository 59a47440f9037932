"""The divergence phases, composed over a vocabulary split in shards, equal the fused op."""

import pytest
import torch
from conftest import BACKENDS, GRAD_TOL, LOSS_TOL
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels import phases

PHASE_BACKENDS = [b for b in BACKENDS
                  if hasattr(torch.ops.fdiv, f"divergence_partials_{b}")]


@pytest.mark.parametrize("backend", PHASE_BACKENDS)
@pytest.mark.parametrize("kind,kw", [("kl", {}), ("js", {"beta": 0.3}), ("tv", {}),
                                     ("alpha", {"alpha": -0.5}), ("skew_reverse_kl", {})])
def test_sharded_phases_match_fused(kind, kw, backend):
    s, t = logits((5, 301), seed=51), logits((5, 301), seed=52)
    valid = torch.tensor([True, True, False, True, True])
    cuts = [0, 100, 101, 301]  # uneven shards, one of a single column
    shards = [(s[:, a:b], t[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    T = 1.4
    lse_s = phases.combine_lse(torch.stack([phases.row_lse(x, T, backend=backend) for x, _ in shards]))
    lse_t = phases.combine_lse(torch.stack([phases.row_lse(y, T, backend=backend) for _, y in shards]))
    sums = sum(phases.partials(x, y, lse_s, lse_t, kind, temperature=T, valid=valid,
                               backend=backend, **kw) for x, y in shards)
    pieces = [phases.grads(x, y, lse_s, lse_t, sums, kind, temperature=T, valid=valid,
                           grad_teacher=True, backend=backend, **kw) for x, y in shards]
    gs = torch.cat([p[0] for p in pieces], -1)
    gt = torch.cat([p[1] for p in pieces], -1)

    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    labels = torch.where(valid, 0, -100)
    loss = fk.divergence(s_, t_, kind, temperature=T, labels=labels, reduction="none",
                         backend=backend, **kw)
    loss.sum().backward()
    assert_close(sums[:, 0], loss, LOSS_TOL[torch.float32], "loss")
    assert_close(gs, s_.grad, GRAD_TOL[torch.float32], "student grad")
    assert_close(gt, t_.grad, GRAD_TOL[torch.float32], "teacher grad")


def test_auto_picks_a_backend_that_has_the_phase():
    """auto skips backends lacking a phase op (the C++ CPU kernel has only the fused op)."""
    s, t = logits((2, 30), seed=53), logits((2, 30), seed=54)
    lse_s, lse_t = phases.row_lse(s), phases.row_lse(t)
    sums = phases.partials(s, t, lse_s, lse_t, "js")
    expected = fk.divergence(s, t, "js", reduction="none")
    assert_close(sums[:, 0], expected, LOSS_TOL[torch.float32], "loss")
    if "cpu" in BACKENDS and not hasattr(torch.ops.fdiv, "divergence_partials_cpu"):
        with pytest.raises(fk.BackendUnavailableError, match="divergence_partials is not"):
            phases.partials(s, t, lse_s, lse_t, "js", backend="cpu")


@pytest.mark.parametrize("backend", PHASE_BACKENDS)
def test_phases_validate_their_inputs(backend):
    """The phases check their inputs like the public ops: a short lse or a float ``valid`` read
    out of bounds on a GPU; each error names the argument."""
    s, t = logits((4, 30), seed=55), logits((4, 30), seed=56)
    lse = phases.row_lse(s, backend=backend)
    sums = phases.partials(s, t, lse, lse, backend=backend)
    ok = dict(backend=backend)
    bad_partials = [
        ((s, t, lse[:3], lse), {}, ValueError, r"lse_student must have shape \(4,\)"),
        ((s, t, lse, lse.reshape(4, 1)), {}, ValueError, "lse_teacher must have shape"),
        ((s, t, lse, lse.long()), {}, TypeError, "lse_teacher must be a floating point"),
        ((s, t, lse, [0.0] * 4), {}, TypeError, "lse_teacher must be a torch.Tensor"),
        ((s, t, lse, lse), {"valid": torch.ones(4)}, TypeError, "valid must be a bool tensor"),
        ((s, t, lse, lse), {"valid": torch.ones(3, dtype=torch.bool)}, ValueError,
         "valid must have the logits' leading shape"),
        ((s, t, lse, lse.to("meta")), {}, ValueError, "lse_teacher must be on the logits' device"),
        ((s, t[:, :7], lse, lse), {}, ValueError, "vocabulary size"),
        ((s.long(), t, lse, lse), {}, TypeError, "student must be floating point"),
        ((s, t, lse, lse), {"temperature": 1e-40}, ValueError, "temperature must be in"),
    ]
    for args, kw, exc, match in bad_partials:
        with pytest.raises(exc, match=match):
            phases.partials(*args, **ok, **kw)
    with pytest.raises(ValueError, match=r"sums must have shape \(4, 3\)"):
        phases.grads(s, t, lse, lse, sums[:, :2], **ok)
    with pytest.raises(TypeError, match="grad_teacher must be a bool"):
        phases.grads(s, t, lse, lse, sums, grad_teacher=1, **ok)
    with pytest.raises(ValueError, match="V >= 1"):
        phases.row_lse(s[:, :0], backend=backend)
