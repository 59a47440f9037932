"""fdiv_kernels.integrations.axolotl against the installed axolotl's own top-k KD loss (the KD
plugin's ``topk_logprob.forward_kl``); skipped where axolotl is not installed."""

import sys
import types

import pytest
import torch

forward_kl = pytest.importorskip("axolotl.integrations.kd.topk_logprob.forward_kl")

from fdiv_kernels.integrations import axolotl as fk_axolotl  # noqa: E402

AXOLOTL_LOSS = forward_kl.loss
AXOLOTL_CHUNKED_FORWARD = forward_kl.ChunkedTopKKDLoss.forward


def _inputs(b=2, t=9, v=157, k=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t + 2, v, generator=g) * 2).to(dtype)    # longer than the teacher's T
    t_logits = torch.randn(b, t, v, generator=g) * 2
    lp, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    mask = torch.rand(b, t, k, generator=g) > 0.25
    mask[0, 0] = False                                   # a position with no real entry
    return s, ids, lp, mask.int()


def _run(fn, s, *rest, **kw):
    z = s.clone().requires_grad_(True)
    out = fn(z, *rest, **kw)
    out.backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nib,temperature", [(-1, 1.0), (-1, 2.0), (23, 1.0), (23, 0.7)])
def test_topk_kd_loss_matches_axolotl(nib, temperature, dtype):
    s, ids, lp, mask = _inputs(dtype=dtype)
    ref, ref_grad = _run(AXOLOTL_LOSS, s, ids, lp, mask, num_items_in_batch=nib,
                         kd_temperature=temperature)
    ours, our_grad = _run(fk_axolotl.topk_kd_loss, s, ids, lp, mask, num_items_in_batch=nib,
                          kd_temperature=temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    tol = (1e-5, 1e-7) if dtype == torch.float32 else (1e-2, 1e-4)   # the gradient's dtype
    torch.testing.assert_close(our_grad, ref_grad, rtol=tol[0], atol=tol[1])
    assert ref > 1e-2 and our_grad.dtype == dtype


@pytest.mark.parametrize("nib", [-1, 31])
def test_chunked_wrapper_matches_axolotl(nib):
    s, ids, lp, mask = _inputs(t=12, seed=1)
    s = s[:, :12]
    mod = forward_kl.ChunkedTopKKDLoss(num_output_chunks=3, kd_temperature=1.5)
    ref, ref_grad = _run(lambda *a, **k: AXOLOTL_CHUNKED_FORWARD(mod, *a, **k), s, ids, lp, mask,
                         num_items_in_batch=nib)
    ours, our_grad = _run(lambda *a, **k: fk_axolotl.chunked_topk_kd_forward(mod, *a, **k), s,
                          ids, lp, mask, num_items_in_batch=nib)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_apply_fk_to_axolotl_rebinds_everywhere_and_undoes():
    user = types.ModuleType("user_kd_script")
    user.loss = AXOLOTL_LOSS                          # `from ...forward_kl import loss`
    sys.modules[user.__name__] = user
    try:
        patch = fk_axolotl.apply_fk_to_axolotl()
        again = fk_axolotl.apply_fk_to_axolotl()
        assert forward_kl.loss is user.loss is fk_axolotl.topk_kd_loss
        assert forward_kl.ChunkedTopKKDLoss.forward is fk_axolotl.chunked_topk_kd_forward
        assert again.targets == []
        s, ids, lp, mask = _inputs(t=6, seed=2)
        out = forward_kl.ChunkedTopKKDLoss(2)(s[:, :6], ids, lp, mask)
        assert out.dtype == torch.float32 and out > 0
        again.undo()
        patch.undo()
        assert forward_kl.loss is user.loss is AXOLOTL_LOSS
        assert forward_kl.ChunkedTopKKDLoss.forward is AXOLOTL_CHUNKED_FORWARD
    finally:
        sys.modules.pop(user.__name__, None)
