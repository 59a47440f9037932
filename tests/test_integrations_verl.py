"""fdiv_kernels.integrations.verl against the installed verl's own FSDP top-k forward KL
(``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``); skipped where verl is not
installed."""

import types

import pytest
import torch

fsdp_losses = pytest.importorskip("verl.trainer.distillation.fsdp.losses")

from fdiv_kernels.integrations import verl as fk_verl  # noqa: E402

VERL = fsdp_losses.compute_forward_kl_topk
NAMES = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count",
         "overlap_token_advantage")


def _inputs(lengths=(5, 8, 3), v=157, k=6, seed=0, scale=4.0):
    """Packed student logits (1, N, V) and the teacher's top-k as verl's nested tensors."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    s = torch.randn(1, n, v, generator=g) * scale
    t_logits = s[0] * 0.5 + torch.randn(n, v, generator=g) * scale   # overlapping supports
    lp, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = [torch.nested.nested_tensor_from_jagged(x, offsets) for x in (lp, ids)]
    return s, nested[0], nested[1]


def _config(clamp, chunked=False):
    return types.SimpleNamespace(distillation_loss=types.SimpleNamespace(
        log_prob_min_clamp=clamp, use_chunked_topk=chunked, chunked_topk_chunk_size=7, topk=6))


def _run(fn, s, lp, ids, cfg):
    z = s.clone().requires_grad_(True)
    out = fn(student_logits=z, teacher_topk_log_probs=lp, teacher_topk_ids=ids, config=cfg,
             data_format="thd")
    w = torch.linspace(0.5, 1.5, out["distillation_losses"].numel()).reshape(1, -1)
    (out["distillation_losses"] * w).sum().backward()
    return {k: v.detach() for k, v in out.items()}, z.grad


@pytest.mark.parametrize("clamp", [None, -10.0, -3.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_forward_kl_topk_matches_verl(clamp, chunked):
    s, lp, ids = _inputs()
    cfg = _config(clamp, chunked)
    ref, ref_grad = _run(VERL, s, lp, ids, cfg)
    ours, our_grad = _run(fk_verl.forward_kl_topk, s, lp, ids, cfg)
    assert set(ours) == set(NAMES) == set(ref)
    for name in NAMES:
        assert ours[name].shape == ref[name].shape == (1, 16), name
        if name == "overlap_count":
            assert torch.equal(ours[name], ref[name])
        else:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-5, atol=1e-7)
    # Not degenerate: supports overlap partly, and the clamp bites where it is set.
    assert 0 < ref["overlap_count"].float().mean() < 6
    if clamp == -3.0:
        assert (lp.values() < clamp).any()


def test_apply_fk_to_verl_rebinds_and_undoes():
    patch = fk_verl.apply_fk_to_verl()
    again = fk_verl.apply_fk_to_verl()
    try:
        assert fsdp_losses.compute_forward_kl_topk is fk_verl.forward_kl_topk
        assert again.targets == []
    finally:
        again.undo()
        patch.undo()
    assert fsdp_losses.compute_forward_kl_topk is VERL
