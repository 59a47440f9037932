"""fdiv_kernels.integrations.torchtune against torchtune's KD losses, transcribed below from
torchtune 0.6.1 ``torchtune/modules/loss/kd_losses.py`` (torchtune itself needs torchao and
torchdata, too heavy for CI; the transcription keeps its arithmetic line for line)."""

import pytest
import torch
import torch.nn.functional as F

from fdiv_kernels.integrations import torchtune as fk_tt


def tt_forward_kl(student_logits, teacher_logits, labels, normalize=True, ignore_index=-100):
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def tt_reverse_kl(student_logits, teacher_logits, labels, normalize=True, ignore_index=-100):
    student_prob = F.softmax(student_logits, dim=-1, dtype=torch.float32)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    teacher_logprob = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def tt_symmetric(s, t, labels, normalize=True, ratio=0.5):
    return ratio * tt_forward_kl(s, t, labels, normalize) + (1 - ratio) * tt_reverse_kl(
        s, t, labels, normalize)


def tt_chunked(fn, s_chunks, t_chunks, labels, n, split="chunk"):
    # ForwardKLWithChunkedOutputLoss.forward: per-chunk unnormalized sums over the global count;
    # torchtune 0.6.1 chunks the labels with .chunk, later versions with .tensor_split.
    mask = (labels != -100).int()
    total = 0.0
    for s, t, lab in zip(s_chunks, t_chunks, getattr(labels, split)(n, dim=1)):
        total += fn(s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), lab.reshape(-1), False)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0)
    return total / torch.sum(mask.view(-1), dim=0)


def _inputs(b=3, t=10, v=151, seed=0, masked_row=True, neg_inf=True):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(b, t, v, generator=g) * 2, torch.randn(b, t, v, generator=g) * 2
    if neg_inf:                           # masked vocabulary entries in both models
        te[..., :7] = float("-inf")
        s[..., :7] = float("-inf")
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    if masked_row:
        labels[0] = -100
    return s, te, labels


def _both(fn, ref, s, t, *args):
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ta, tb = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out, r = fn(a, ta, *args), ref(b, tb, *args)
    torch.testing.assert_close(out, r, rtol=1e-5, atol=1e-6)
    out.backward()
    r.backward()
    for ours, ref in ((a.grad, b.grad), (ta.grad, tb.grad)):
        # torchtune backpropagates 0 * -inf at -inf entries (NaN gradients: reverse KL to the
        # student, forward KL to the teacher); fk's are finite, and equal wherever torchtune's are.
        assert torch.isfinite(ours).all()
        ok = ~torch.isnan(ref)
        torch.testing.assert_close(ours[ok], ref[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neg_inf", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_kl_losses_match_torchtune(normalize, flat, neg_inf):
    s, t, labels = _inputs(neg_inf=neg_inf)
    if flat:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    _both(lambda *a: fk_tt.ForwardKLLoss()(*a), tt_forward_kl, s, t, labels, normalize)
    _both(lambda *a: fk_tt.ReverseKLLoss()(*a), tt_reverse_kl, s, t, labels, normalize)
    _both(lambda *a: fk_tt.SymmetricKLLoss(0.3)(*a),
          lambda *a: tt_symmetric(*a, ratio=0.3), s, t, labels, normalize)


def test_all_masked_is_zero():
    s, t, labels = _inputs()
    labels[:] = -100
    for cls in (fk_tt.ForwardKLLoss, fk_tt.ReverseKLLoss, fk_tt.SymmetricKLLoss):
        assert cls()(s, t, labels).item() == 0.0


@pytest.mark.parametrize("split", ["chunk", "tensor_split"])
@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_chunked_variants_match_torchtune(n, split):
    # T = 10: with n = 4, .chunk gives widths (3, 3, 3, 1) and .tensor_split (3, 3, 2, 2).
    s, t, labels = _inputs(t=10, seed=1)
    sc, tc = list(getattr(s, split)(n, dim=1)), list(getattr(t, split)(n, dim=1))
    ref = lambda fn: tt_chunked(fn, sc, tc, labels, n, split)  # noqa: E731
    torch.testing.assert_close(fk_tt.ForwardKLWithChunkedOutputLoss(n)(sc, tc, labels),
                               ref(tt_forward_kl), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fk_tt.ReverseKLWithChunkedOutputLoss(n)(sc, tc, labels),
                               ref(tt_reverse_kl), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        fk_tt.SymmetricKLWithChunkedOutputLoss(n, sym_kd_ratio=0.25)(sc, tc, labels),
        ref(lambda *a: tt_symmetric(*a, ratio=0.25)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunks"):
        fk_tt.ForwardKLWithChunkedOutputLoss(n)(sc + sc[:1], tc + tc[:1], labels)


@pytest.mark.parametrize("normalize", [True, False])
def test_hidden_state_losses_match_torchtune_chunked(normalize):
    """The hidden-state classes against torchtune's chunked losses on the logits they avoid."""
    g = torch.Generator().manual_seed(7)
    hs, ht = torch.randn(3, 10, 24, generator=g), torch.randn(3, 10, 40, generator=g)
    ws, wt = torch.randn(151, 24, generator=g) * 0.4, torch.randn(151, 40, generator=g) * 0.3
    labels = torch.randint(0, 151, (3, 10), generator=g)
    labels[torch.rand(3, 10, generator=g) < 0.3] = -100
    labels[0] = -100
    cases = [(fk_tt.ForwardKLWithHiddenStatesLoss(), tt_forward_kl),
             (fk_tt.ReverseKLWithHiddenStatesLoss(chunk_size=7), tt_reverse_kl),
             (fk_tt.SymmetricKLWithHiddenStatesLoss(0.3),
              lambda *a: tt_symmetric(*a, ratio=0.3))]
    for ours, ref in cases:
        a = [x.clone().requires_grad_(True) for x in (hs, ws)]
        b = [x.clone().requires_grad_(True) for x in (hs, ws)]
        out = ours(a[0], a[1], ht, wt, labels, normalize)
        s_chunks = [c @ b[1].t() for c in b[0].tensor_split(4, dim=1)]
        t_chunks = [c @ wt.t() for c in ht.tensor_split(4, dim=1)]
        if normalize:
            r = tt_chunked(ref, s_chunks, t_chunks, labels, 4, "tensor_split")
        else:
            r = ref(torch.cat(s_chunks, 1).reshape(-1, 151),
                    torch.cat(t_chunks, 1).reshape(-1, 151), labels.reshape(-1), False)
        torch.testing.assert_close(out, r, rtol=1e-5, atol=1e-6)
        out.backward()
        r.backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_bad_ratio():
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        fk_tt.SymmetricKLLoss(1.5)


# ---- against the installed torchtune (where it imports: it needs torchao, omegaconf,
# sentencepiece, tiktoken and blobfile, which CI does not install; there the transcription above
# is the check) -----------------------------------------------------------------------------------


def test_against_installed_torchtune():
    tt = pytest.importorskip("torchtune.modules.loss", exc_type=ImportError)
    s, t, labels = _inputs(seed=3)
    for ours, theirs in [(fk_tt.ForwardKLLoss(), tt.ForwardKLLoss()),
                         (fk_tt.ReverseKLLoss(), tt.ReverseKLLoss()),
                         (fk_tt.SymmetricKLLoss(0.3), tt.SymmetricKLLoss(sym_kd_ratio=0.3))]:
        for normalize in (True, False):
            _both(ours, theirs, s, t, labels, normalize)
    n = 4
    sc, tc = list(s.chunk(n, dim=1)), list(t.chunk(n, dim=1))
    for ours, theirs in [
        (fk_tt.ForwardKLWithChunkedOutputLoss(n), tt.ForwardKLWithChunkedOutputLoss(n)),
        (fk_tt.ReverseKLWithChunkedOutputLoss(n), tt.ReverseKLWithChunkedOutputLoss(n)),
        (fk_tt.SymmetricKLWithChunkedOutputLoss(n, sym_kd_ratio=0.25),
         tt.SymmetricKLWithChunkedOutputLoss(n, sym_kd_ratio=0.25)),
    ]:
        torch.testing.assert_close(ours(sc, tc, labels), theirs(sc, tc, labels), rtol=1e-5,
                                   atol=1e-6)
    # The hidden-state classes against torchtune's chunked classes on the logits they avoid.
    g = torch.Generator().manual_seed(8)
    hs, ht = torch.randn(3, 10, 24, generator=g), torch.randn(3, 10, 40, generator=g)
    ws, wt = torch.randn(151, 24, generator=g) * 0.4, torch.randn(151, 40, generator=g) * 0.3
    for ours, theirs in [
        (fk_tt.ForwardKLWithHiddenStatesLoss(), tt.ForwardKLWithChunkedOutputLoss(n)),
        (fk_tt.ReverseKLWithHiddenStatesLoss(chunk_size=7), tt.ReverseKLWithChunkedOutputLoss(n)),
        (fk_tt.SymmetricKLWithHiddenStatesLoss(0.3),
         tt.SymmetricKLWithChunkedOutputLoss(n, sym_kd_ratio=0.3)),
    ]:
        a = [x.clone().requires_grad_(True) for x in (hs, ws)]
        b = [x.clone().requires_grad_(True) for x in (hs, ws)]
        out = ours(a[0], a[1], ht, wt, labels)
        ref = theirs([c @ b[1].t() for c in b[0].chunk(n, dim=1)],
                     [c @ wt.t() for c in ht.chunk(n, dim=1)], labels)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        out.backward()
        ref.backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
