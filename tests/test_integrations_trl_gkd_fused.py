"""TRL 1.16's GKD on the fused path (``integrations.trl.gkd_compute_loss``: hidden states and lm
heads through fk.fused_linear_divergence, no (B, T, V) logits) against plain TRL GKD on a tiny
random Llama pair; and padded vocabularies (lm heads wider than the tokenizer)."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
pytest.importorskip("transformers")
gkd_mod = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

from fdiv_kernels.integrations import trl as fk_trl  # noqa: E402
from tiny_lm import collate, lm_batches, tiny_tokenizer  # noqa: E402

GKD = gkd_mod.GKDTrainer
TRL_COMPUTE_LOSS = GKD.__dict__["compute_loss"]
TRL_JSD = GKD.__dict__["generalized_jsd_loss"].__func__
V = 96


def tiny_llama(seed, hidden=32, layers=1, vocab=V, softcap=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():   # logits of a realistic spread, not ~0 (random init is tiny)
        model.lm_head.weight.mul_(20)
    return model


def _batch(n=3, length=11, vocab=V, seed=0):
    return collate(lm_batches(n, length, vocab, seed=seed))


def _host(student, teacher, beta=0.5, tokenizer=None):
    """A stand-in GKD trainer: what compute_loss reads from self."""
    cls = type("StandIn", (), {"generalized_jsd_loss": staticmethod(fk_trl.generalized_jsd_loss)})
    this = cls()
    this.beta, this.teacher_model, this.processing_class = beta, teacher, tokenizer
    return this


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("nib", [None, 17])
def test_fused_compute_loss_matches_trl_loss_and_gradients(beta, nib):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48, layers=2)
    batch = _batch()
    ref_self = _host(student, teacher, beta)
    type(ref_self).generalized_jsd_loss = staticmethod(TRL_JSD)   # plain TRL
    ref = TRL_COMPUTE_LOSS(ref_self, student, batch, num_items_in_batch=nib)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ours = fk_trl.gkd_compute_loss(_host(student, teacher, beta), student, batch,
                                   num_items_in_batch=nib)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for p, r in zip(student.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    assert ref > 1e-2


def test_fused_path_forms_no_logits_and_falls_back_where_it_must():
    student, teacher = tiny_llama(0), tiny_llama(1)
    calls = []
    for m in (student, teacher):
        m.lm_head.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch()
    fk_trl.gkd_compute_loss(_host(student, teacher), student, batch)
    assert calls == []                          # neither lm head ran: no (B, T, V) logits
    # Evaluation reads the logits: TRL's own compute_loss runs and returns them.
    _, out = fk_trl.gkd_compute_loss(_host(student, teacher), student, batch,
                                     return_outputs=True)
    assert out.logits.shape == (3, 11, V) and len(calls) == 2
    # A subclass's own generalized_jsd_loss is honoured (TRL's path, which calls it).
    this = _host(student, teacher)
    type(this).generalized_jsd_loss = staticmethod(lambda **kw: torch.tensor(7.0))
    assert fk_trl.gkd_compute_loss(this, student, batch).item() == 7.0


def test_padded_heads_of_different_widths_with_one_tokenizer():
    """Student head 100 rows, teacher 104, one tokenizer of 96 entries: the loss is TRL's on the
    logits sliced to the tokenizer by hand, the padding rows get exactly zero gradient."""
    student, teacher = tiny_llama(0, vocab=100), tiny_llama(1, vocab=104)
    batch = _batch(vocab=V)
    tok = tiny_tokenizer(V)
    assert len(tok) == V
    ours = fk_trl.gkd_compute_loss(_host(student, teacher, 0.4, tok), student, batch)
    ours.backward()
    grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    s = student(input_ids=batch["input_ids"]).logits[:, :-1, :V]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1, :V]
    ref = TRL_JSD(s, t, labels=batch["labels"][:, 1:], beta=0.4)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, student.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(grad[V:] == 0) and grad[:V].abs().max() > 0
    # Without a tokenizer size the widths cannot be reconciled: a clear error.
    with pytest.raises(ValueError, match=r"different widths \(100, 104\).*vocab_size"):
        fk_trl.gkd_compute_loss(_host(student, teacher, 0.4, None), student, batch)
    # A tokenizer larger than a head cannot reconcile different widths either.
    with pytest.raises(ValueError, match=r"different widths \(100, 104\).*tokenizer has 101"):
        fk_trl.tokenizer_vocab_size(tiny_tokenizer(101), 100, 104)
    assert fk_trl.tokenizer_vocab_size(tiny_tokenizer(101), 100, 100) is None   # used whole
    assert fk_trl.tokenizer_vocab_size(tok, 100, 104) == V
    assert fk_trl.tokenizer_vocab_size(tok, V, V) is None          # nothing padded
    assert fk_trl.tokenizer_vocab_size(None, V, V) is None


def _gkd_run(tmp_path, patched, steps=3, bf16=False):
    from datasets import Dataset

    from trl.experimental.gkd import GKDConfig

    losses, head_calls = [], []

    class Recording(GKD):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.item())
            return loss

    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                     lmbda=0.0, beta=0.5, learning_rate=1e-2, logging_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", seed=0, max_length=32,
                     disable_tqdm=True, dataloader_num_workers=0, bf16=bf16)
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48, layers=2)
    student.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    ds = Dataset.from_list(lm_batches(2 * steps, 12, V))
    patch = None
    if patched:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch = fk_trl.apply_fk_to_trl()
    try:
        assert (GKD.compute_loss is fk_trl.gkd_compute_loss) == patched
        trainer = Recording(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                            data_collator=collate, processing_class=tiny_tokenizer(V))
        trainer.train()
    finally:
        if patch is not None:
            patch.undo()
    assert GKD.__dict__["compute_loss"] is TRL_COMPUTE_LOSS
    return losses, len(head_calls)


def test_gkd_trainer_fused_same_losses_as_plain_trl(tmp_path):
    """fp32 (GKDConfig's default bf16=True rounds TRL's logits to bf16, which fk does not)."""
    ref, ref_calls = _gkd_run(tmp_path / "ref", patched=False)
    ours, our_calls = _gkd_run(tmp_path / "fk", patched=True)
    assert len(ref) == len(ours) == 3 and len(set(ref)) == 3      # the student did train
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert ref_calls == 3 and our_calls == 0     # the swapped run never formed the logits


def test_gkd_trainer_fused_under_bf16_is_nearer_fp32(tmp_path):
    """GKDConfig's default bf16=True: TRL rounds the logits to bf16, fk forms them in fp32 from
    the same autocast hidden states; the first step's loss (same weights) is nearer the fp32
    run's."""
    ref = _gkd_run(tmp_path / "fp32", patched=False, steps=1)[0][0]
    trl_bf16 = _gkd_run(tmp_path / "trl", patched=False, steps=1, bf16=True)[0][0]
    fk_bf16 = _gkd_run(tmp_path / "fk", patched=True, steps=1, bf16=True)[0][0]
    assert abs(fk_bf16 - ref) < abs(trl_bf16 - ref) and abs(fk_bf16 - ref) < 1e-2 * ref


def test_apply_fk_to_trl_gkd_fused_flag():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fk_trl.apply_fk_to_trl(gkd_fused=False):
            assert GKD.__dict__["compute_loss"] is TRL_COMPUTE_LOSS
            assert GKD.generalized_jsd_loss is fk_trl.generalized_jsd_loss
        with fk_trl.apply_fk_to_trl(gkd=False):
            assert GKD.__dict__["compute_loss"] is TRL_COMPUTE_LOSS
    assert GKD.__dict__["compute_loss"] is TRL_COMPUTE_LOSS
