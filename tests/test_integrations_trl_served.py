"""The served-teacher losses of TRL 1.16 against the installed TRL's own code: the server
distillation's top-k forward KL (``ServerDistillationTrainer._compute_server_forward_kl_loss``,
also IW-OPD's) and the asynchronous distillation's chunked sparse JSD (``_chunked_jsd_loss``),
values and gradients, with their own arguments; and their rebinding by ``apply_fk_to_trl``."""

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning
    server = pytest.importorskip(
        "trl.experimental.server_distillation.server_distillation_trainer")
    async_mod = pytest.importorskip(
        "trl.experimental.async_distillation.async_distillation_trainer")
    iw_opd = pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer")

from fdiv_kernels.integrations import trl as fk_trl  # noqa: E402

SERVER = server.ServerDistillationTrainer
TRL_SERVER_KL = SERVER.__dict__["_compute_server_forward_kl_loss"]
TRL_ASYNC_JSD = async_mod._chunked_jsd_loss


def _served_teacher(shape, k, seed, pad_frac=0.3):
    """A teacher's top-k over a vocabulary as a server returns it: sorted log-probs of a real
    softmax, padding entries at -inf (id 0), padded positions (-inf throughout)."""
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(*shape, generator=g) * 2
    lp, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    real = torch.rand(ids.shape, generator=g) > pad_frac
    real[..., 0] = True
    return torch.where(real, ids, 0), torch.where(real, lp, float("-inf"))


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("add_tail", [True, False])
def test_server_forward_kl_matches_trl(add_tail, temperature):
    b, t, v, k = 3, 7, 211, 8
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(b, t, v, generator=g) * 2
    ids, lp = _served_teacher((b, t, v), k, seed=2)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    lp[0, :3] = float("-inf")              # padded positions: nothing from the server
    lp[2, 4, :] = float("-inf")            # a kept position the teacher window did not cover
    teacher_result = {"topk_logprobs": lp, "topk_token_ids": ids}
    this = types.SimpleNamespace(loss_add_tail=add_tail,
                                 _reduce_divergence_loss=SERVER._reduce_divergence_loss)

    def run(fn):
        z = logits.clone().requires_grad_(True)
        student_lp = torch.log_softmax(z / temperature, -1)   # as the trainer passes it
        loss = fn(this, teacher_result, student_lp, labels)
        loss.backward()
        return loss.detach(), z.grad

    ref, ref_grad = run(TRL_SERVER_KL)
    ours, our_grad = run(fk_trl.server_forward_kl_loss)
    assert ours.shape == ref.shape == ()
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert ref > 1e-2 and ref_grad.abs().max() > 1e-4


def test_iw_opd_server_forward_kl_is_the_same_method():
    """IW-OPD's copy differs only in its reducer's argument name: fk's method serves both."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 97, generator=g)
    ids, lp = _served_teacher((2, 5, 97), 6, seed=4)
    labels = torch.randint(0, 97, (2, 5), generator=g)
    labels[1, 0] = -100
    this = types.SimpleNamespace(loss_add_tail=True,
                                 _reduce_divergence_loss=iw_opd.IWOPDTrainer._reduce_divergence_loss)
    res = {"topk_logprobs": lp, "topk_token_ids": ids}
    ref = iw_opd.IWOPDTrainer.__dict__["_compute_server_forward_kl_loss"](
        this, res, torch.log_softmax(z, -1), labels)
    ours = fk_trl.server_forward_kl_loss(this, res, torch.log_softmax(z, -1), labels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _async_inputs(n=45, h=24, v=301, k=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    ids, lp = _served_teacher((n, v), k, seed=seed + 1)
    mask = lp > float("-inf")
    ids = torch.where(mask, ids, -1)        # TRL clamps negative candidate ids to 0
    lp = torch.where(mask, lp, float("nan"))  # and never reads an invalid slot's log-prob
    teacher_idx = torch.randint(0, 3, (n,), generator=g)
    return hidden, weight, b, ids, lp, mask, teacher_idx


def _run_async(fn, hidden, weight, b, scale, cap, ids, lp, mask, beta, temperature, add_tail,
               teacher_idx, n_teachers):
    leaves = [x.clone().requires_grad_(True) if x is not None else None
              for x in (hidden, weight, b)]
    out = fn(leaves[0], leaves[1], leaves[2], scale, cap, ids, lp, mask, beta, temperature,
             add_tail, teacher_idx, n_teachers, 16)
    out[0].backward()
    return [o.detach() for o in out], [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("scale,cap,temperature,bias,teachers",
                         [(1.0, None, 1.0, True, None), (0.5, 3.0, 1.3, False, 3),
                          (2.0, None, 0.8, True, 3)])
def test_async_chunked_jsd_matches_trl(beta, add_tail, scale, cap, temperature, bias, teachers):
    hidden, weight, b, ids, lp, mask, idx = _async_inputs(bias=bias)
    idx = idx if teachers else None
    n_teachers = teachers or 1
    args = (hidden, weight, b, scale, cap, ids, lp, mask, beta, temperature, add_tail, idx,
            n_teachers)
    ref, ref_grads = _run_async(TRL_ASYNC_JSD, *args)
    ours, our_grads = _run_async(fk_trl.chunked_sparse_jsd_loss, *args)
    names = ("loss", "jsd_sum", "entropy_sum", "teacher_entropy_sum", "per_teacher_stats")
    for name, o, r in zip(names, ours, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5, msg=name)
    for name, o, r in zip(("hidden", "weight", "bias"), our_grads, ref_grads):
        assert (o is None) == (r is None), name
        if o is not None:
            # fp32 sums over the vocabulary: the error is relative to the largest entry.
            atol = 1e-5 * r.abs().max().item()
            torch.testing.assert_close(o, r, rtol=1e-4, atol=atol, msg=f"d{name}")
    assert ref[0] > 1e-2
    assert ref[4].abs().sum() > 0 if teachers else not ref[4].any()


def test_async_non_positive_scale_runs_trls_function():
    hidden, weight, b, ids, lp, mask, _ = _async_inputs(n=9, seed=5)
    args = (hidden, weight, b, -1.0, None, ids, lp, mask, 0.5, 1.0, True, None, 1)
    ref, _ = _run_async(TRL_ASYNC_JSD, *args)
    ours, _ = _run_async(fk_trl.chunked_sparse_jsd_loss, *args)
    torch.testing.assert_close(ours[0], ref[0])


def test_apply_fk_to_trl_rebinds_served_losses_and_undoes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fk_trl.apply_fk_to_trl()
        again = fk_trl.apply_fk_to_trl()
    try:
        assert SERVER._compute_server_forward_kl_loss is fk_trl.server_forward_kl_loss
        assert iw_opd.IWOPDTrainer._compute_server_forward_kl_loss is fk_trl.server_forward_kl_loss
        assert async_mod._chunked_jsd_loss is fk_trl.chunked_sparse_jsd_loss
        assert again.targets == []
    finally:
        again.undo()
        patch.undo()
    assert SERVER.__dict__["_compute_server_forward_kl_loss"] is TRL_SERVER_KL
    assert async_mod._chunked_jsd_loss is TRL_ASYNC_JSD
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = fk_trl.apply_fk_to_trl(server=False, async_distillation=False)
    try:
        assert SERVER.__dict__["_compute_server_forward_kl_loss"] is TRL_SERVER_KL
        assert async_mod._chunked_jsd_loss is TRL_ASYNC_JSD
    finally:
        off.undo()


_FRESH_PROCESS = """
import warnings
warnings.simplefilter("ignore")
from fdiv_kernels.integrations import trl as fk_trl
patch = fk_trl.apply_fk_to_trl()
# Imported after the patch: each swap is made on first import.
from trl.experimental.server_distillation import ServerDistillationTrainer
import trl.experimental.async_distillation.async_distillation_trainer as a
import trl.experimental.sdft.loss_utils as sdft_lu
assert ServerDistillationTrainer._compute_server_forward_kl_loss is fk_trl.server_forward_kl_loss
assert a._chunked_jsd_loss is fk_trl.chunked_sparse_jsd_loss
assert sdft_lu.compute_topk_self_distillation_loss is fk_trl.compute_topk_self_distillation_loss
patch.undo()
assert ServerDistillationTrainer._compute_server_forward_kl_loss is not fk_trl.server_forward_kl_loss
assert a._chunked_jsd_loss is not fk_trl.chunked_sparse_jsd_loss
assert sdft_lu.compute_topk_self_distillation_loss is not fk_trl.compute_topk_self_distillation_loss
"""


def test_served_swaps_made_on_first_import_and_undone():
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS], check=True)


def test_undo_gives_each_package_its_own_copy():
    """SDPO and SDFT hold two copies of one function, both swapped to fk's: a module that copied
    the swapped name while the patch was active (as a trainer imported then does) gets its own
    package's copy back."""
    sdpo_lu = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    sdft_lu = pytest.importorskip("trl.experimental.sdft.loss_utils")
    name = "compute_topk_self_distillation_loss"
    originals = getattr(sdpo_lu, name), getattr(sdft_lu, name)
    assert originals[0] is not originals[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fk_trl.apply_fk_to_trl()
    late = {}
    try:
        for pkg in ("sdpo", "sdft"):
            late[pkg] = types.ModuleType(f"trl.experimental.{pkg}.late_trainer")
            setattr(late[pkg], name, getattr(sdft_lu, name))
            sys.modules[late[pkg].__name__] = late[pkg]
        assert getattr(late["sdpo"], name) is fk_trl.compute_topk_self_distillation_loss
        patch.undo()
        assert getattr(late["sdpo"], name) is originals[0]
        assert getattr(late["sdft"], name) is originals[1]
        assert (getattr(sdpo_lu, name), getattr(sdft_lu, name)) == originals
    finally:
        patch.undo()
        for mod in late.values():
            sys.modules.pop(mod.__name__, None)
