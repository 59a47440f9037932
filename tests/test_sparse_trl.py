"""fk.sparse_divergence against the installed TRL's own top-k losses (no transcription): the
self-distillation loss on the student's top-k (``trl.experimental.sdpo``, both
``distillation_add_tail`` modes) and the server-distillation forward KL on a teacher's top-k
with padding (``trl.experimental.server_distillation``), under the mapping of the README's
offline / served teachers section. Loss and student-logit gradients, fp32."""

import types
import warnings

import pytest
import torch
from helpers import assert_close, available_backends
from reference import logits, sparse_teacher

import fdiv_kernels as fk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning
    sdpo = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    server = pytest.importorskip(
        "trl.experimental.server_distillation.server_distillation_trainer")

BACKENDS = available_backends("sparse_divergence_fwd")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_trl_topk_self_distillation(add_tail, alpha, backend):
    """TRL's compute_topk_self_distillation_loss = fk on the student's top-k ids with the
    teacher's log_softmax gathered there: distillation_add_tail=True -> tail="bucket", False ->
    "renormalize"; distillation_alpha -> kind "js" with beta = alpha (0: KL(teacher || student),
    1: KL(student || teacher)). Per row, reduction="none"."""
    s = logits((2, 9, 503), seed=40)
    t = logits((2, 9, 503), seed=41)
    k = 16
    s_ref = s.clone().requires_grad_(True)
    ref = sdpo.compute_topk_self_distillation_loss(
        s_ref, t, distillation_topk=k, distillation_alpha=alpha, distillation_add_tail=add_tail)
    ref.sum().backward()
    ids = s.topk(k, dim=-1).indices
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    s_fk = s.clone().requires_grad_(True)
    out = fk.sparse_divergence(s_fk, ids, lp, "js", beta=alpha,
                               tail="bucket" if add_tail else "renormalize", reduction="none",
                               backend=backend)
    out.sum().backward()
    assert_close(out, ref, (1e-5, 1e-6), "loss")
    assert_close(s_fk.grad, s_ref.grad, (1e-4, 1e-6), "grad")


def _server_forward_kl(s, ids, lp, labels, add_tail, temperature):
    """ServerDistillationTrainer._compute_server_forward_kl_loss, TRL's own method, on a stand-in
    self that carries the two attributes it reads."""
    this = types.SimpleNamespace(
        loss_add_tail=add_tail,
        _reduce_divergence_loss=server.ServerDistillationTrainer._reduce_divergence_loss)
    student_lp = torch.log_softmax(s / temperature, -1)
    teacher_result = {"topk_logprobs": lp, "topk_token_ids": ids}
    return server.ServerDistillationTrainer._compute_server_forward_kl_loss(
        this, teacher_result, student_lp, labels)


@pytest.mark.parametrize("add_tail", [True, False])
def test_trl_server_forward_kl_with_padding(add_tail, backend):
    """TRL's server forward KL takes padding as -inf teacher log-probs and keeps the entries
    where ``topk_logprobs > -inf``: that is fk's ``support_mask`` (True = a real entry). tail:
    loss_add_tail -> "bucket", else "renormalize"; kind "kl"; TRL's batchmean over the
    completion tokens -> reduction="mean" with the same labels."""
    s = logits((2, 7, 301), seed=60)
    ids, lp = sparse_teacher((2, 7, 301), 8, seed=61, mass=0.8)
    real = torch.rand(ids.shape, generator=torch.Generator().manual_seed(62)) > 0.3
    real[..., 0] = True
    lp_server = torch.where(real, lp, float("-inf")).float()
    labels = torch.randint(0, 301, (2, 7), generator=torch.Generator().manual_seed(63))
    labels[0, :2] = -100
    s_ref = s.clone().requires_grad_(True)
    ref = _server_forward_kl(s_ref, ids, lp_server, labels, add_tail, 1.0)
    ref.backward()
    s_fk = s.clone().requires_grad_(True)
    out = fk.sparse_divergence(s_fk, ids, lp_server, "kl", support_mask=real,
                               tail="bucket" if add_tail else "renormalize", labels=labels,
                               backend=backend)
    out.backward()
    assert_close(out, ref, (1e-5, 1e-6), "loss")
    assert_close(s_fk.grad, s_ref.grad, (1e-4, 1e-7), "grad")
    # The convention matters: the flipped mask keeps the padding and drops real entries.
    flipped = fk.sparse_divergence(s, ids, torch.where(real, lp, -3.0).float(), "kl",
                                   support_mask=~real, tail="bucket" if add_tail else
                                   "renormalize", labels=labels, backend=backend)
    assert (flipped - ref).abs() > 1e-3
