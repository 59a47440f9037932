"""The reverse direction (docs/families/sparse.md): the student's own top-k support, the teacher
looked up there (from dense teacher logits, or from its lm head evaluated only at the K ids and
one chunked log-prob), and fk.sparse_divergence on it. Against the float64 definitions, and
against the installed TRL's student-support loss (``compute_topk_self_distillation_loss``,
``trl.experimental.sdpo``) with gradients into both the student's and the teacher's logits."""

import warnings

import pytest
import torch
from helpers import assert_close, available_backends
from reference import logits, sparse_divergence_with_grads

import fdiv_kernels as fk

BACKENDS = available_backends("sparse_divergence_fwd")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def student_support(student_logits, k):
    """The recipe's first line: the student's top-k ids, no gradient through the selection."""
    return student_logits.detach().topk(k, dim=-1).indices


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_reverse_kl_on_student_support_matches_float64(tail, backend):
    """Reverse KL on the student's top-k with the dense teacher's log-probs gathered there: loss,
    student gradient and the gradient into the teacher's logits (through log_softmax + gather)
    against the float64 definitions, fp32 inputs, 9 x 503 (an odd V, more than one block)."""
    s = logits((9, 503), seed=70)
    t = logits((9, 503), seed=71)
    k = 12
    ids = student_support(s, k)
    t_fk = t.clone().requires_grad_(True)
    lp = t_fk.log_softmax(-1).gather(-1, ids)
    s_fk = s.clone().requires_grad_(True)
    out = fk.sparse_divergence(s_fk, ids, lp, "reverse_kl", tail=tail, reduction="none",
                               backend=backend)
    w = torch.linspace(0.5, 1.5, 9)
    (out * w).sum().backward()
    rows, gs, glp = sparse_divergence_with_grads(s, ids, lp.detach(), "reverse_kl", tail=tail,
                                                 weights=w)
    # d / d teacher logits = the float64 d / d lp carried through log_softmax + gather.
    t64 = t.double().requires_grad_(True)
    (gt,) = torch.autograd.grad(t64.log_softmax(-1).gather(-1, ids), t64, glp)
    assert_close(out, rows, (2e-5, 2e-6), "loss")
    assert_close(s_fk.grad, gs, (2e-4, 1e-7), "student grad")
    assert_close(t_fk.grad, gt, (2e-4, 1e-7), "teacher grad")


def test_teacher_head_at_the_support_only(backend):
    """The teacher's log-probs at the student's ids from its lm head without its (N, V) logits:
    its log-prob at one id (fk.fused_linear_token_logprobs) plus the K logit differences, equal
    to the dense log_softmax gathered there; the loss from either is the same."""
    n, h, v, k = 11, 24, 389, 10
    g = torch.Generator().manual_seed(72)
    th = torch.randn(n, h, generator=g)
    tw = torch.randn(v, h, generator=g) / h**0.5 * 3
    s = logits((n, v), seed=73)
    ids = student_support(s, k)
    z = torch.einsum("nh,nkh->nk", th, tw[ids])
    lp = fk.fused_linear_token_logprobs(th, tw, ids[:, 0], backend=backend)[:, None] + (
        z - z[:, :1])
    dense = (th.double() @ tw.double().T).log_softmax(-1).gather(-1, ids)
    assert_close(lp, dense, (1e-5, 1e-5), "teacher log-probs at the support")
    a = fk.sparse_divergence(s, ids, lp, "reverse_kl", reduction="none", backend=backend)
    b = fk.sparse_divergence(s, ids, dense.float(), "reverse_kl", reduction="none",
                             backend=backend)
    assert_close(a, b, (1e-4, 1e-6), "loss")


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("add_tail", [True, False])
def test_trl_student_support_with_teacher_gradient(add_tail, alpha, backend):
    """TRL's compute_topk_self_distillation_loss (its own function, installed) on a teacher whose
    logits require grad: fk's recipe gives its per-position loss and both gradients. alpha = 1
    (reverse KL) is fk's "reverse_kl"; other alphas are "js" with beta = alpha."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        sdpo = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    s = logits((2, 7, 401), seed=74)
    t = logits((2, 7, 401), seed=75)
    k = 9
    s_ref, t_ref = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = sdpo.compute_topk_self_distillation_loss(
        s_ref, t_ref, distillation_topk=k, distillation_alpha=alpha,
        distillation_add_tail=add_tail)
    w = torch.linspace(0.2, 1.0, 14).reshape(2, 7)
    (ref * w).sum().backward()
    s_fk, t_fk = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ids = student_support(s_fk, k)
    lp = t_fk.log_softmax(-1).gather(-1, ids)
    kind, beta = ("reverse_kl", None) if alpha == 1.0 else ("js", alpha)
    out = fk.sparse_divergence(s_fk, ids, lp, kind, beta=beta,
                               tail="bucket" if add_tail else "renormalize", reduction="none",
                               backend=backend)
    (out * w).sum().backward()
    assert_close(out, ref, (1e-5, 1e-6), "loss")
    assert_close(s_fk.grad, s_ref.grad, (1e-4, 1e-6), "student grad")
    assert_close(t_fk.grad, t_ref.grad, (1e-4, 1e-6), "teacher grad")
